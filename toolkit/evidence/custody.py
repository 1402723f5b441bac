"""The chain-of-custody log: JSON lines, each naming the sha256 of the line before it.

Entry: seq, prev_sha256, time (UTC), action, actor, location, purpose,
payload_sha256 (the payload the actor saw), manifest_sha256 (the detached
manifest the actor saw), and optionally an SSHSIG signature (namespace
bookgen-kit) of the canonical JSON of the entry without its signature and
signer fields: so a signed entry covers its seq and prev_sha256, that is the
whole chain before it. Appending rewrites the log atomically.

Anchoring. The first entry's prev_sha256 is the genesis: the sha256 of a
domain-separated encoding of the payload's and the detached manifest's sha256
(`genesis()`), so the chain cannot be replayed onto another bundle nor rewritten
from its start without breaking the signature of the first entry. Bundles of
schema 1 (written before) start from 64 zeros; that is accepted only for them.

The head. The sha256 of the last line is the chain's head (`chain_head()`).
Whoever holds the bundle records it after each transfer; a chain cut short or
extended no longer ends at it (`check_chain(head=...)`).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from toolkit import utc
from toolkit.errors import BadInputError, UsageError, VerificationFailed
from toolkit.host.atomic import AtomicFile

ACTIONS = ("collected", "transferred", "received", "verified", "extracted")
SIGNATURE_NAMESPACE = "bookgen-kit"
SCHEMA_1 = "bookgen-kit/evidence-manifest/1"
SCHEMA_2 = "bookgen-kit/evidence-manifest/2"
SCHEMA_3 = "bookgen-kit/evidence-manifest/3"  # as 2; host files under fs/$rootfs$/ (dissect.target's acquire layout)
LEGACY_GENESIS = "0" * 64  # schema 1 only: a chain bound to nothing
GENESIS = LEGACY_GENESIS  # the old name, kept for readers of schema-1 logs
GENESIS_DOMAIN = b"bookgen-kit custody genesis v2\n"
LOG_SUFFIX = ".custody.jsonl"
MANIFEST_SUFFIX = ".manifest.json"
FIELDS = ("seq", "prev_sha256", "time", "action", "actor", "location", "purpose", "payload_sha256",
          "manifest_sha256")
SIGNATURE_FIELDS = ("signature", "signer")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def canonical(entry: Dict[str, Any]) -> bytes:
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def is_sha256(value: Any) -> bool:
    return isinstance(value, str) and bool(_HEX64.match(value))


def genesis(payload_sha256: str, manifest_sha256: str) -> str:
    """The first entry's prev_sha256 (schema 2): binds the chain to this payload and this detached manifest."""
    if not (is_sha256(payload_sha256) and is_sha256(manifest_sha256)):
        raise BadInputError("custody genesis needs the payload's and the manifest's sha256 (64 lowercase hex)")
    return hashlib.sha256(GENESIS_DOMAIN + payload_sha256.encode("ascii") + b"\n" +
                          manifest_sha256.encode("ascii") + b"\n").hexdigest()


def normalize_head(text: str) -> str:
    """A chain head given by a person: 64 hex digits (any case, surrounding space ignored)."""
    head = (text or "").strip().lower()
    if not is_sha256(head):
        raise UsageError("a custody chain head is a sha256: 64 hex digits, not %r" % text)
    return head


def _read_lines(path: str) -> List[bytes]:
    """The log's lines, split on LF only (as written); a missing final LF keeps the last line."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise BadInputError("no custody log at %s" % path) from None
    except OSError as error:
        raise BadInputError("cannot read custody log %s: %s" % (path, error.strerror)) from None
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return lines


def read_log(path: str) -> List[Dict[str, Any]]:
    entries = []
    for number, line in enumerate(_read_lines(path), 1):
        try:
            entry = json.loads(line)
        except ValueError:
            raise VerificationFailed("custody log %s line %d is not JSON (altered?)" % (path, number)) from None
        if not isinstance(entry, dict):
            raise VerificationFailed("custody log %s line %d is not a JSON object (altered?)" % (path, number))
        entries.append(entry)
    return entries


def _line_hashes(path: str) -> List[str]:
    return [hashlib.sha256(line).hexdigest() for line in _read_lines(path)]


def chain_head(path: str) -> str:
    """The sha256 of the log's last line: what a holder records to detect truncation and extension later."""
    hashes = _line_hashes(path)
    if not hashes:
        raise VerificationFailed("custody log %s is empty" % path)
    return hashes[-1]


def make_entry(previous: Optional[str], seq: int, action: str, actor: str, location: str, purpose: str,
               payload_sha256: str, manifest_sha256: str, signer=None) -> Dict[str, Any]:
    """An entry; previous None means the first one, chained to the genesis of this payload and manifest."""
    if action not in ACTIONS:
        raise BadInputError("custody action must be one of %s" % ", ".join(ACTIONS))
    entry = {"seq": seq, "prev_sha256": previous or genesis(payload_sha256, manifest_sha256),
             "time": utc.iso(), "action": action, "actor": actor,
             "location": location, "purpose": purpose, "payload_sha256": payload_sha256,
             "manifest_sha256": manifest_sha256}
    if signer is not None:
        from toolkit.crypto import sshsig

        # everything but the signature itself: seq and prev_sha256 included, so it covers the chain so far
        entry["signature"] = sshsig.sign(signer, io.BytesIO(canonical(entry)), SIGNATURE_NAMESPACE)
        entry["signer"] = signer.public.fingerprint()
    return entry


def append(path: str, entry_args: Dict[str, Any], signer=None, schema: Optional[str] = None) -> Dict[str, Any]:
    """Add an entry chained to the last one; the whole log is rewritten atomically.

    A new log starts at the genesis of entry_args' payload and manifest sha256. An existing one must verify
    first, against those same hashes (schema: the detached manifest's; None reads it from beside the log).
    """
    existing = b""
    previous, seq = None, 1
    if os.path.exists(path):
        verify_chain(path, entry_args.get("payload_sha256"), manifest_sha256=entry_args.get("manifest_sha256"),
                     schema=schema)
        with open(path, "rb") as handle:
            existing = handle.read()
        if existing and not existing.endswith(b"\n"):
            raise VerificationFailed("custody log %s does not end with a newline (cut mid-line?)" % path)
        hashes = _line_hashes(path)
        previous, seq = hashes[-1], len(hashes) + 1
    entry = make_entry(previous, seq, signer=signer, **entry_args)
    with AtomicFile(path, 0o644, overwrite=True) as out:
        out.write(existing + canonical(entry) + b"\n")
        out.commit()
    return entry


# --------------------------------------------------------------------------- checking
@dataclass
class ChainProblem:
    name: str  # "custody genesis", "custody entry 3", "custody head", ...
    detail: str


@dataclass
class ChainReport:
    path: str
    entries: List[Dict[str, Any]] = field(default_factory=list)
    head: Optional[str] = None
    problems: List[ChainProblem] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    signed_entries: int = 0
    legacy: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems

    def problem(self, name: str, detail: str) -> None:
        self.problems.append(ChainProblem(name, detail))


def _sibling_manifest(path: str) -> Optional[str]:
    if path.endswith(LOG_SUFFIX):
        candidate = path[: -len(LOG_SUFFIX)] + MANIFEST_SUFFIX
        if os.path.exists(candidate):
            return candidate
    return None


def _manifest_facts(path: str) -> Dict[str, Optional[str]]:
    """The detached manifest beside a log: its sha256 and schema (None when there is none, or unreadable)."""
    manifest = _sibling_manifest(path)
    if manifest is None:
        return {"sha256": None, "schema": None}
    with open(manifest, "rb") as handle:
        data = handle.read()
    try:
        schema = json.loads(data).get("schema")
    except (ValueError, AttributeError):
        schema = None
    return {"sha256": hashlib.sha256(data).hexdigest(), "schema": schema if isinstance(schema, str) else None}


def check_chain(path: str, payload_sha256: Optional[str] = None, manifest_sha256: Optional[str] = None,
                schema: Optional[str] = None, allowed_signers: Optional[str] = None, head: Optional[str] = None,
                require_signatures: Optional[bool] = None, discover: bool = True) -> ChainReport:
    """Every problem of the chain, not just the first.

    payload_sha256, manifest_sha256: the hashes of the bundle's files as they are now; the genesis must bind
    them and every entry must have seen them. schema: the detached manifest's; only SCHEMA_1 admits the
    all-zero genesis. With discover, what is not given is read from the manifest beside the log.
    allowed_signers (its text): every entry must then be signed by a key allowed for its actor in the
    bookgen-kit namespace (require_signatures defaults to whether allowed_signers is given).
    head: the sha256 of the last line the holder recorded; the chain must end there.
    """
    report = ChainReport(path)
    if discover and (manifest_sha256 is None or schema is None):
        facts = _manifest_facts(path)
        manifest_sha256 = manifest_sha256 if manifest_sha256 is not None else facts["sha256"]
        schema = schema if schema is not None else facts["schema"]
    report.legacy = schema == SCHEMA_1
    if require_signatures is None:
        require_signatures = allowed_signers is not None
    try:
        lines = _read_lines(path)
    except BadInputError as error:
        report.problem("custody", error.message)
        return report
    if not lines:
        report.problem("custody", "custody log %s is empty" % path)
        return report
    hashes = [hashlib.sha256(line).hexdigest() for line in lines]
    report.head = hashes[-1]
    parsed: List[Optional[Dict[str, Any]]] = []
    for number, line in enumerate(lines, 1):
        try:
            entry = json.loads(line)
        except ValueError:
            report.problem("custody entry %d" % number, "line %d is not JSON (altered?)" % number)
            parsed.append(None)
            continue
        if not isinstance(entry, dict):
            report.problem("custody entry %d" % number, "line %d is not a JSON object (altered?)" % number)
            parsed.append(None)
            continue
        parsed.append(entry)
        report.entries.append(entry)

    _check_genesis(report, parsed[0], payload_sha256, manifest_sha256, schema)
    for index, entry in enumerate(parsed):
        if entry is None:
            continue
        _check_entry(report, index, entry, lines[index], hashes, payload_sha256, manifest_sha256,
                     allowed_signers, require_signatures)
    if head is not None:
        _check_head(report, normalize_head(head), hashes)
    return report


def _check_genesis(report: ChainReport, first: Optional[Dict[str, Any]], payload_sha256: Optional[str],
                   manifest_sha256: Optional[str], schema: Optional[str]) -> None:
    if first is None:
        report.problem("custody genesis", "the first entry cannot be read, so the chain's anchor cannot be checked")
        return
    prev = first.get("prev_sha256")
    if first.get("action") != "collected":
        report.problem("custody genesis", "the first entry is %r, not the collection: the chain does not start "
                       "where the evidence was captured" % first.get("action"))
    if report.legacy:
        if prev != LEGACY_GENESIS:
            report.problem("custody genesis", "the first entry's prev_sha256 is %s, but a schema-1 chain starts "
                           "from 64 zeros" % prev)
        else:
            report.notes.append("custody: a schema-1 chain (older, weaker): it starts from zeros, bound to no "
                                "bundle, so it could be rewritten from its first entry; only signatures and a "
                                "recorded head protect it")
        return
    if prev == LEGACY_GENESIS:
        report.problem("custody genesis", "the chain starts from 64 zeros (bound to nothing), which only schema-1 "
                       "bundles may; this manifest says %r (rewritten from its first entry?)" % schema)
        return
    payload = payload_sha256 or first.get("payload_sha256")
    manifest = manifest_sha256 or first.get("manifest_sha256")
    if not (is_sha256(payload) and is_sha256(manifest)):
        report.problem("custody genesis", "cannot compute the genesis: no payload or manifest sha256")
        return
    expected = genesis(payload, manifest)
    if prev != expected:
        report.problem("custody genesis", "the first entry is not anchored in this bundle: prev_sha256 %s, the "
                       "genesis of this payload and manifest is %s (transplanted, or rewritten from its start)"
                       % (prev, expected))
    if payload_sha256 is None or manifest_sha256 is None:
        report.notes.append("custody: genesis checked against the hashes the first entry records, not against "
                            "the bundle's files")


def _check_entry(report: ChainReport, index: int, entry: Dict[str, Any], line: bytes, hashes: List[str],
                 payload_sha256: Optional[str], manifest_sha256: Optional[str], allowed_signers: Optional[str],
                 require_signatures: bool) -> None:
    name = "custody entry %d" % (index + 1)
    what = "%s by %s" % (entry.get("action"), entry.get("actor"))
    if entry.get("seq") != index + 1:
        report.problem(name, "sequence number %r, expected %d (reordered, removed or inserted?)"
                       % (entry.get("seq"), index + 1))
    if index > 0 and entry.get("prev_sha256") != hashes[index - 1]:
        report.problem(name, "the chain is broken: prev_sha256 is not the hash of entry %d (that entry altered, "
                       "removed or reordered)" % index)
    missing = [key for key in FIELDS if key not in entry]
    unknown = sorted(key for key in entry if key not in FIELDS and key not in SIGNATURE_FIELDS)
    if missing:
        report.problem(name, "fields missing: %s" % ", ".join(missing))
    if unknown:
        report.problem(name, "unknown fields: %s" % ", ".join(unknown))
    if entry.get("action") not in ACTIONS:
        report.problem(name, "action %r is not one of %s" % (entry.get("action"), ", ".join(ACTIONS)))
    if line != canonical(entry):
        report.problem(name, "the line is not in the canonical form the kit writes (edited by hand?)")
    if payload_sha256 and entry.get("payload_sha256") != payload_sha256:
        report.problem(name, "%s saw payload %s, but the payload is %s" % (what, entry.get("payload_sha256"),
                                                                          payload_sha256))
    if manifest_sha256 and entry.get("manifest_sha256") != manifest_sha256:
        report.problem(name, "%s saw manifest %s, but the detached manifest is %s (manifest altered?)"
                       % (what, entry.get("manifest_sha256"), manifest_sha256))
    if "signature" in entry:
        report.signed_entries += 1
        _check_entry_signature(report, name, what, entry, allowed_signers)
    elif "signer" in entry:
        report.problem(name, "names signer %s but carries no signature (signature stripped?)" % entry["signer"])
    elif require_signatures:
        report.problem(name, "%s is not signed; --allowed-signers requires every entry signed by its actor"
                       % what)


def _check_entry_signature(report: ChainReport, name: str, what: str, entry: Dict[str, Any],
                           allowed_signers: Optional[str]) -> None:
    from toolkit.crypto import sshsig
    from toolkit.crypto.errors import SignatureError

    unsigned = canonical({k: v for k, v in entry.items() if k not in SIGNATURE_FIELDS})
    signature = entry["signature"]
    if not isinstance(signature, str):
        report.problem(name, "signature is not an armored SSH signature")
        return
    try:
        parsed = sshsig.check_signature(signature, io.BytesIO(unsigned), SIGNATURE_NAMESPACE)
    except SignatureError as error:
        report.problem(name, "signature of %s: %s" % (what, error.message))
        return
    fingerprint = parsed.public.fingerprint()
    if "signer" in entry and entry["signer"] != fingerprint:
        report.problem(name, "says it is signed by %s, but the signature's key is %s" % (entry["signer"],
                                                                                        fingerprint))
    if allowed_signers is None:
        return
    actor = entry.get("actor")
    if not isinstance(actor, str) or not actor:
        report.problem(name, "signed, but names no actor to check the key against")
        return
    try:
        sshsig.verify(signature, io.BytesIO(unsigned), allowed_signers, actor, SIGNATURE_NAMESPACE)
    except SignatureError:
        report.problem(name, "signed by %s, which the allowed signers do not allow for actor %r in namespace %s"
                       % (fingerprint, actor, SIGNATURE_NAMESPACE))


def _check_head(report: ChainReport, head: str, hashes: List[str]) -> None:
    if hashes[-1] == head:
        return
    if head in hashes:
        at = hashes.index(head) + 1
        report.problem("custody head", "the chain was extended: the recorded head is entry %d, but %d entries "
                       "follow it (%d to %d)" % (at, len(hashes) - at, at + 1, len(hashes)))
    else:
        report.problem("custody head", "the chain does not contain the recorded head %s: it was cut short or "
                       "rewritten (it now ends at entry %d, %s)" % (head, len(hashes), hashes[-1]))


def verify_chain(path: str, payload_sha256: Optional[str] = None, allowed_signers: Optional[str] = None,
                 manifest_sha256: Optional[str] = None, schema: Optional[str] = None, head: Optional[str] = None
                 ) -> List[Dict[str, Any]]:
    """check_chain() that raises VerificationFailed naming every problem; the entries when all holds."""
    report = check_chain(path, payload_sha256, manifest_sha256, schema, allowed_signers, head)
    if report.problems:
        if len(report.problems) == 1 and report.problems[0].name == "custody" and not os.path.exists(path):
            raise BadInputError(report.problems[0].detail)
        raise VerificationFailed("custody log %s: %s" % (path, "; ".join(
            "%s: %s" % (p.name, p.detail) for p in report.problems)))
    return report.entries
