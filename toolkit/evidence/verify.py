"""`verify`: prove a bundle, reporting every failure (not just the first).

Without a key: SHA256SUMS, the payload's file, size, sha256, compression and
encryption against the detached manifest, the manifest's signature, and the
custody chain (anchored in this payload and manifest). With a key: every member
against the manifest inside the payload, that manifest against its sha256 in
the detached one, and every field the two manifests share, compared deeply.

What that proves depends on what is given; the report says so (notes):
without a key the content is unproven, without --allowed-signers authorship is.
With --allowed-signers a signature is required: on the manifest, by a principal
allowed for the bookgen-kit namespace, and on every custody entry, by a key
allowed for the entry's actor.

Schema 1 bundles (written before schema 2) keep the old rules: the detached
manifest lists every artifact, and the custody chain starts from zeros.
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from toolkit.errors import BadInputError, KitError
from toolkit.evidence import custody
from toolkit.evidence.bundle import (
    BundlePaths,
    iterate_members,
    load_manifest,
    locate,
    member_kind,
    open_counted_tar_stream,
    open_tar_stream,
    read_member,
)
from toolkit.host.hashing import sha256_path as sha256_file

SCHEMA_1 = custody.SCHEMA_1
SCHEMA_2 = custody.SCHEMA_2
SCHEMA_3 = custody.SCHEMA_3
SCHEMAS = (SCHEMA_1, SCHEMA_2, SCHEMA_3)
CONTAINER = "POSIX pax tar"
AGE_MAGIC = b"age-encryption.org/v1\n"
# what only the detached manifest has (schema 2), and what only the inner one has
DETACHED_ONLY = ("inner_manifest_sha256", "payload", "artifacts_count")
INNER_ONLY = ("artifacts",)
MAX_INNER_MANIFEST = 512 * 1024 * 1024
MAX_LISTED_PROBLEMS = 10


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class VerifyReport:
    bundle: str
    complete: bool
    checks: List[Check] = field(default_factory=list)
    members_checked: int = 0
    intact_members: Optional[int] = None
    schema: Optional[str] = None
    notes: List[str] = field(default_factory=list)
    content_checked: bool = False  # decrypted, every member and the inner manifest checked
    authorship_checked: bool = False  # --allowed-signers given: signatures required and their keys allowed
    custody_head: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.complete and all(c.ok for c in self.checks)

    def add(self, name: str, ok: bool, detail: str) -> bool:
        self.checks.append(Check(name, ok, detail))
        return ok

    def fail(self, name: str, detail: str) -> None:
        self.add(name, False, detail)

    def failures(self) -> List[Check]:
        return [c for c in self.checks if not c.ok]


def _read_sums(path: str) -> Dict[str, str]:
    sums = {}
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if "  " in line:
                digest, name = line.rstrip("\n").split("  ", 1)
                sums[name.lstrip("*")] = digest
    return sums


def _check_partial(paths: BundlePaths, report: VerifyReport, identities: Sequence[Any]) -> None:
    size = os.path.getsize(paths.partial)
    report.complete = False
    report.add("complete", False, "incomplete: only %s (%d bytes) exists; the capture did not finish" % (
        os.path.basename(paths.partial), size))
    if not identities:
        return
    intact = 0
    try:
        with open(paths.partial, "rb") as source:
            tar = open_tar_stream(source, paths.compression, paths.encrypted, identities)
            for member in iterate_members(tar):
                read_member(tar, member)
                intact += 1
    except Exception:  # the stream ends where the capture was cut: that is the finding
        pass
    report.intact_members = intact
    report.add("intact members", True, "%d members at its start are intact" % intact)


def _read_allowed_signers(path: Optional[str]) -> Optional[str]:
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as error:
        raise BadInputError("cannot read allowed signers %s: %s" % (path, error.strerror or error)) from None
    from toolkit.crypto import sshsig

    sshsig.parse_allowed_signers(text)  # a malformed file is bad input (exit 3), not a failed bundle
    return text


def verify_bundle(path: str, identities: Sequence[Any] = (), allowed_signers: Optional[str] = None,
                  custody_head: Optional[str] = None) -> VerifyReport:
    """Check everything that can be checked with what is given; every failure is a Check of its own."""
    allowed_text = _read_allowed_signers(allowed_signers)
    if custody_head is not None:
        custody_head = custody.normalize_head(custody_head)
    paths = locate(path)
    report = VerifyReport(bundle=paths.payload, complete=True)
    if not os.path.exists(paths.payload):
        if os.path.exists(paths.partial):
            _check_partial(paths, report, identities)
            return report
        report.complete = False
        report.add("payload", False, "payload %s is missing" % paths.payload)
        return report
    try:
        manifest = load_manifest(paths)
    except KitError as error:
        report.add("manifest", False, error.message)
        return report
    if not isinstance(manifest, dict):
        report.add("manifest", False, "the detached manifest is not a JSON object")
        return report
    payload_sha = sha256_file(paths.payload)
    manifest_sha = sha256_file(paths.manifest)
    schema = manifest.get("schema")
    report.schema = schema if isinstance(schema, str) else None
    legacy = schema == SCHEMA_1
    if schema not in SCHEMAS:
        report.fail("schema", "unknown manifest schema %r (this kit reads %s)" % (schema, ", ".join(SCHEMAS)))
    elif legacy:
        report.add("schema", True, "%s: the OLDER, WEAKER schema (its detached manifest lists every file's hash, "
                   "and its custody chain is not anchored in the bundle); checked by its own rules" % schema)
        report.notes.append("schema 1 bundle: older and weaker. Its custody chain starts from zeros, so without "
                            "signatures it can be rewritten from its first entry; its detached manifest carries "
                            "per-file hashes of the collected files")
    else:
        report.add("schema", True, schema)

    _check_sums(paths, report, payload_sha, manifest_sha)
    _check_payload_fields(paths, manifest, report, payload_sha, legacy)
    signature_ok = _check_signature(paths, report, allowed_text, allowed_signers)
    custody_ok = _check_custody(paths, report, payload_sha, manifest_sha, schema, allowed_text, custody_head)

    if identities or not paths.encrypted:
        _check_members(paths, manifest, identities, report, legacy)
    _conclude(report, paths, identities, allowed_text, signature_ok, custody_ok, custody_head)
    return report


def _check_sums(paths: BundlePaths, report: VerifyReport, payload_sha: str, manifest_sha: str) -> None:
    """SHA256SUMS, as `sha256sum -c` would see it."""
    if not os.path.exists(paths.sums):
        report.fail("SHA256SUMS", "no SHA256SUMS beside the bundle")
        return
    sums = _read_sums(paths.sums)
    for name, actual in ((os.path.basename(paths.payload), payload_sha),
                         (os.path.basename(paths.manifest), manifest_sha)):
        listed = sums.get(name)
        report.add("SHA256SUMS " + name, listed == actual,
                   "matches" if listed == actual else ("not listed" if listed is None else
                                                       "sha256 %s, SHA256SUMS says %s" % (actual, listed)))


def _check_payload_fields(paths: BundlePaths, manifest: Dict[str, Any], report: VerifyReport, payload_sha: str,
                          legacy: bool) -> None:
    """The detached manifest's record of the payload, against the payload file (no key needed)."""
    info = manifest.get("payload")
    if not isinstance(info, dict):
        report.fail("payload", "the detached manifest has no payload record")
        info = {}
    payload_size = os.path.getsize(paths.payload)
    report.add("payload sha256", payload_sha == info.get("sha256"),
               "matches the manifest" if payload_sha == info.get("sha256") else
               "payload sha256 %s, manifest says %s (payload altered?)" % (payload_sha, info.get("sha256")))
    report.add("payload size", payload_size == info.get("size"),
               "%d bytes" % payload_size if payload_size == info.get("size") else
               "%d bytes, manifest says %s" % (payload_size, info.get("size")))
    name = os.path.basename(paths.payload)
    report.add("payload file", info.get("file") == name,
               name if info.get("file") == name else "the payload is %s, manifest says %r" % (name, info.get("file")))
    report.add("payload compression", info.get("compression") == paths.compression,
               paths.compression if info.get("compression") == paths.compression else
               "the file name says %s, manifest says %r" % (paths.compression, info.get("compression")))
    with open(paths.payload, "rb") as handle:
        is_age = handle.read(len(AGE_MAGIC)) == AGE_MAGIC
    problems = []
    if info.get("encrypted") is not paths.encrypted:
        problems.append("the file name says %s, manifest says encrypted=%r" % (
            "encrypted" if paths.encrypted else "not encrypted", info.get("encrypted")))
    if is_age != paths.encrypted:
        problems.append("the file %s an age header" % ("lacks" if paths.encrypted else "has"))
    encryption = manifest.get("encryption")
    if not isinstance(encryption, dict) or encryption.get("encrypted") is not paths.encrypted:
        problems.append("the manifest's encryption section says encrypted=%r" % (
            encryption.get("encrypted") if isinstance(encryption, dict) else None))
    report.add("payload encrypted", not problems, "; ".join(problems) if problems else
               ("age v1" if paths.encrypted else "NOT encrypted (as the manifest says)"))
    report.add("payload container", info.get("container") == CONTAINER,
               CONTAINER if info.get("container") == CONTAINER else
               "manifest says %r, the kit writes %r" % (info.get("container"), CONTAINER))
    for key in ("members", "tar_bytes"):
        value = info.get(key)
        if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            report.fail("payload %s" % key, "manifest says %r: not a positive count" % (value,))
    inner_sha = manifest.get("inner_manifest_sha256")
    if not custody.is_sha256(inner_sha):
        report.fail("inner_manifest_sha256", "manifest says %r: not a sha256" % (inner_sha,))
    if legacy:
        if not isinstance(manifest.get("artifacts"), list):
            report.fail("manifest field artifacts", "a schema-1 manifest lists its artifacts; this one does not")
        return
    if "artifacts" in manifest:
        report.fail("manifest field artifacts", "the detached manifest carries per-file entries, which schema 2 "
                    "keeps inside the encrypted payload (their hashes are an oracle for short secrets)")
    count = manifest.get("artifacts_count")
    if not (isinstance(count, int) and not isinstance(count, bool) and count >= 0):
        report.fail("manifest field artifacts_count", "manifest says %r: not a count" % (count,))


def _check_signature(paths: BundlePaths, report: VerifyReport, allowed_text: Optional[str],
                     allowed_path: Optional[str]) -> bool:
    """The detached manifest's SSHSIG: required and by an allowed principal with --allowed-signers."""
    from toolkit.crypto import sshsig
    from toolkit.crypto.errors import SignatureError

    if not os.path.exists(paths.signature):
        if allowed_text is not None:
            report.fail("signature", "none, but --allowed-signers requires the manifest to be signed (signature "
                        "removed, or the capture was not signed): authorship cannot be established")
            return False
        report.add("signature", True, "none (the capture was not signed)")
        return True
    try:
        with open(paths.signature, encoding="ascii", errors="replace") as sig, open(paths.manifest, "rb") as data:
            parsed = sshsig.check_signature(sig.read(), data, sshsig.DEFAULT_NAMESPACE)
    except SignatureError as error:
        report.fail("signature", "manifest signature: %s" % error.message)
        return False
    detail = "good signature by %s" % parsed.public.fingerprint()
    if allowed_text is None:
        report.add("signature", True, detail + " (whose key is unknown: no --allowed-signers)")
        return True
    principals = sshsig.allowed_principals(parsed.public, allowed_text, sshsig.DEFAULT_NAMESPACE)
    if not principals:
        report.fail("signature", detail + ", but %s does not allow that key for namespace %s now (not listed, "
                    "another namespace, or outside valid-after/valid-before)" % (allowed_path,
                                                                                  sshsig.DEFAULT_NAMESPACE))
        return False
    report.add("signature", True, detail + ", allowed as %s" % ", ".join(principals))
    return True


def _check_custody(paths: BundlePaths, report: VerifyReport, payload_sha: str, manifest_sha: str,
                   schema: Any, allowed_text: Optional[str], head: Optional[str]) -> bool:
    chain = custody.check_chain(paths.custody, payload_sha, manifest_sha,
                                schema if isinstance(schema, str) else None, allowed_text, head, discover=False)
    report.custody_head = chain.head
    for problem in chain.problems:
        report.fail(problem.name, problem.detail)
    report.notes.extend(note for note in chain.notes if not note.startswith("custody: a schema-1"))
    if chain.ok:
        anchored = "starts from zeros (schema 1)" if chain.legacy else "anchored in this payload and manifest"
        report.add("custody", True, "%d entries (%d signed), chain intact, %s, each saw this payload and manifest; "
                   "head %s%s" % (len(chain.entries), chain.signed_entries, anchored, chain.head,
                                  " as recorded" if head else ""))
    return chain.ok


def _conclude(report: VerifyReport, paths: BundlePaths, identities: Sequence[Any], allowed_text: Optional[str],
              signature_ok: bool, custody_ok: bool, head: Optional[str]) -> None:
    """What this run proves, said plainly."""
    has_signature = os.path.exists(paths.signature)
    report.authorship_checked = allowed_text is not None
    if identities or not paths.encrypted:
        report.content_checked = any(c.name == "members" for c in report.checks)
    if not report.content_checked:
        report.notes.append("content UNPROVEN: the payload was not decrypted, so the manifest inside it and its "
                            "members were not checked; only the payload's sha256 against the detached manifest "
                            "(give -i IDENTITY)")
    if allowed_text is None:
        if has_signature:
            report.notes.append("authorship UNPROVEN: the signature holds under the key it carries, but anyone can "
                                "sign; nothing says whose key that is (give --allowed-signers)")
        else:
            report.notes.append("authorship UNPROVEN: the bundle is not signed; anyone could have written it")
    if not report.content_checked and allowed_text is None and not has_signature:
        report.notes.insert(0, "authorship and content are UNPROVEN: without a key, a signature and "
                            "--allowed-signers, this shows only that the files that travel unencrypted agree with "
                            "each other; whoever rewrites them all passes")
    if head is None:
        report.notes.append("custody truncation not checked: give --custody-head with the head recorded at the "
                            "last transfer (now %s)" % report.custody_head)


# --------------------------------------------------------------------------- with the key
@dataclass
class _Member:
    name: str
    kind: str  # file, dir, symlink, other
    size: int
    sha256: Optional[str]
    target: Optional[str]




def _check_members(paths: BundlePaths, manifest: Dict[str, Any], identities: Sequence[Any], report: VerifyReport,
                   legacy: bool) -> None:
    """Decrypt and read every member; then the inner manifest against the detached one, and the members against
    the inner manifest's artifacts (the inner manifest is the last member, so members are recorded first)."""
    members: List[_Member] = []
    inner_bytes: Optional[bytes] = None
    inner_digest: Optional[str] = None
    last = None
    stream_problem = None
    counter = None
    info = manifest.get("payload") if isinstance(manifest.get("payload"), dict) else {}
    try:
        with open(paths.payload, "rb") as source:
            tar, counter = open_counted_tar_stream(source, paths.compression, paths.encrypted, identities)
            for member in iterate_members(tar):
                last = member.name
                report.members_checked += 1
                if member.name == "manifest.json" and member.isreg() and member.size <= MAX_INNER_MANIFEST:
                    sink = io.BytesIO()
                    inner_digest = read_member(tar, member, sink.write)
                    inner_bytes = sink.getvalue()
                    members.append(_Member(member.name, "file", member.size, inner_digest, None))
                    continue
                digest = read_member(tar, member)
                members.append(_Member(member.name, member_kind(member), member.size if member.isreg() else 0, digest,
                                       member.linkname if member.issym() else None))
            counter.drain()
    except KitError as error:
        stream_problem = "payload stream: %s" % error.message
    except Exception as error:  # zstd, gzip or tar reporting a damaged stream
        stream_problem = "payload stream damaged after %d members: %s" % (report.members_checked, error)
    if stream_problem is not None:
        report.fail("members", stream_problem)
        return

    # the payload's shape against the detached record
    shape_ok = True
    if info.get("members") != len(members):
        shape_ok = report.add("payload members", False, "the payload holds %d members, manifest says %r"
                              % (len(members), info.get("members")))
    if counter is not None and info.get("tar_bytes") != counter.count:
        shape_ok = report.add("payload tar_bytes", False, "the tar stream is %d bytes, manifest says %r"
                              % (counter.count, info.get("tar_bytes")))
    if shape_ok:
        report.add("payload shape", True, "%d members, %d tar bytes, as the manifest says" % (
            len(members), counter.count if counter is not None else 0))

    # the inner manifest
    if last != "manifest.json":
        report.fail("inner manifest", "the last member is %s, not manifest.json" % last)
    inner: Optional[Dict[str, Any]] = None
    if inner_bytes is None:
        report.fail("inner manifest", "the payload holds no manifest.json")
    else:
        if inner_digest != manifest.get("inner_manifest_sha256"):
            report.fail("inner_manifest_sha256", "manifest.json inside the payload has sha256 %s, the detached "
                        "manifest says %s" % (inner_digest, manifest.get("inner_manifest_sha256")))
        try:
            inner = json.loads(inner_bytes)
        except ValueError:
            report.fail("inner manifest", "manifest.json inside the payload is not JSON")
        if inner is not None and not isinstance(inner, dict):
            report.fail("inner manifest", "manifest.json inside the payload is not a JSON object")
            inner = None
    if inner is not None:
        _compare_manifests(manifest, inner, report, legacy)
        artifacts = inner.get("artifacts")
    else:
        artifacts = manifest.get("artifacts") if legacy else None
    if not isinstance(artifacts, list):
        report.fail("members", "no artifact list to check the members against")
        return
    problems = _match_members(members, artifacts)
    report.add("members", not problems, _summarize(problems) if problems else
               "%d members match the manifest inside the payload (hash, size, type, exact set)" % len(members))


def _summarize(problems: List[str]) -> str:
    shown = "; ".join(problems[:MAX_LISTED_PROBLEMS])
    if len(problems) > MAX_LISTED_PROBLEMS:
        shown += "; and %d more" % (len(problems) - MAX_LISTED_PROBLEMS)
    return shown


def _differences(detached: Any, inner: Any, where: str, found: List[str], limit: int = 5) -> None:
    """Paths at which two JSON values differ (deep, exact: types too)."""
    if len(found) >= limit:
        return
    if isinstance(detached, dict) and isinstance(inner, dict):
        for key in sorted(set(detached) | set(inner), key=str):
            here = "%s.%s" % (where, key)
            if key not in inner:
                found.append("%s only in the detached manifest" % here)
            elif key not in detached:
                found.append("%s missing from the detached manifest" % here)
            else:
                _differences(detached[key], inner[key], here, found, limit)
            if len(found) >= limit:
                return
        return
    if isinstance(detached, list) and isinstance(inner, list):
        if len(detached) != len(inner):
            found.append("%s: %d items in the detached manifest, %d inside" % (where, len(detached), len(inner)))
            return
        for index, (a, b) in enumerate(zip(detached, inner)):
            _differences(a, b, "%s[%d]" % (where, index), found, limit)
            if len(found) >= limit:
                return
        return
    if type(detached) is not type(inner) or detached != inner:
        found.append("%s: detached %s, inside %s" % (where, _short(detached), _short(inner)))


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def _compare_manifests(detached: Dict[str, Any], inner: Dict[str, Any], report: VerifyReport, legacy: bool) -> None:
    """Every field the two manifests share, deeply; and what only one of them may have."""
    detached_only = ("inner_manifest_sha256", "payload") if legacy else DETACHED_ONLY
    inner_only = () if legacy else INNER_ONLY
    differing = []
    for key in sorted(set(detached) | set(inner), key=str):
        name = "manifest field %s" % key
        if key in detached and key in inner:
            found: List[str] = []
            _differences(detached[key], inner[key], key, found)
            if found:
                differing.append(key)
                report.fail(name, "differs from the manifest inside the payload: %s" % "; ".join(found))
        elif key in detached and key not in detached_only:
            differing.append(key)
            report.fail(name, "only in the detached manifest (the manifest inside the payload has no %r)" % key)
        elif key in inner and key not in inner_only:
            differing.append(key)
            report.fail(name, "missing from the detached manifest (the manifest inside the payload has it)")
    if not legacy:
        artifacts = inner.get("artifacts")
        count = detached.get("artifacts_count")
        if not isinstance(artifacts, list):
            differing.append("artifacts")
            report.fail("manifest field artifacts", "the manifest inside the payload has no artifact list")
        elif count != len(artifacts):
            differing.append("artifacts_count")
            report.fail("manifest field artifacts_count", "the detached manifest says %r, the manifest inside the "
                        "payload lists %d" % (count, len(artifacts)))
    if not differing:
        shared = sorted(set(detached) & set(inner), key=str)
        report.add("manifests agree", True, "every field the two manifests share (%d: %s) is identical%s"
                   % (len(shared), ", ".join(shared), "" if legacy else ", and artifacts_count holds"))


def _match_members(members: List[_Member], artifacts: List[Any]) -> List[str]:
    """Every member against its artifact entry, and none missing or extra. A path may repeat: matched in order
    (as extract does); entries of type "reference" have no member of their own."""
    problems: List[str] = []
    expected: Dict[str, List[Dict[str, Any]]] = {}
    for entry in artifacts:
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            problems.append("an artifact entry without a path: %s" % _short(entry))
            continue
        if entry.get("type") == "reference":
            continue
        expected.setdefault(entry["path"], []).append(entry)
    used: Dict[str, int] = {}
    for member in members[:-1] if members and members[-1].name == "manifest.json" else members:
        index = used.get(member.name, 0)
        used[member.name] = index + 1
        candidates = expected.get(member.name, [])
        if index >= len(candidates):
            problems.append("member %s is not in the manifest" % member.name if not candidates else
                            "member %s appears more often than the manifest lists it" % member.name)
            continue
        problems += _member_problems(member, candidates[index])
    missing = sorted(path for path, listed in expected.items() if used.get(path, 0) < len(listed))
    if missing:
        problems.append("%d manifest entries have no member (first: %s)" % (len(missing), missing[0]))
    return problems


def _member_problems(member: _Member, entry: Dict[str, Any]) -> List[str]:
    kind = entry.get("type")
    wanted: Tuple[str, ...] = {"file": ("file",), "generated": ("file",), "dir": ("dir",),
                               "symlink": ("symlink",)}.get(kind, ("file", "dir", "symlink", "other"))
    if member.kind not in wanted:
        return ["member %s is a %s, manifest says %s" % (member.name, member.kind, kind)]
    if member.kind == "file":
        if member.size != entry.get("size") or member.sha256 != entry.get("sha256"):
            return ["member %s: sha256 %s size %d, manifest says %s size %s" % (
                member.name, member.sha256, member.size, entry.get("sha256"), entry.get("size"))]
    elif member.kind == "symlink" and member.target != entry.get("target"):
        return ["symlink %s points to %s, manifest says %s" % (member.name, member.target, entry.get("target"))]
    return []
