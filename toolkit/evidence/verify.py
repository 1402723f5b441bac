"""`verify`: prove a bundle with the tools' own rules, without the key (hashes, signature, custody) and with it
(every member against the manifest)."""
from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from toolkit.errors import KitError
from toolkit.evidence import custody
from toolkit.evidence.bundle import BundlePaths, iterate_members, load_manifest, locate, open_tar_stream, read_member
from toolkit.host.hashing import sha256_path as sha256_file


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

    @property
    def ok(self) -> bool:
        return self.complete and all(c.ok for c in self.checks)

    def add(self, name: str, ok: bool, detail: str) -> bool:
        self.checks.append(Check(name, ok, detail))
        return ok

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


def verify_bundle(path: str, identities: Sequence[Any] = (), allowed_signers: Optional[str] = None) -> VerifyReport:
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
    payload_info = manifest.get("payload", {})
    payload_sha = sha256_file(paths.payload)
    payload_size = os.path.getsize(paths.payload)
    manifest_sha = sha256_file(paths.manifest)

    # SHA256SUMS, as `sha256sum -c` would see it
    if os.path.exists(paths.sums):
        sums = _read_sums(paths.sums)
        for name, actual in ((os.path.basename(paths.payload), payload_sha),
                             (os.path.basename(paths.manifest), manifest_sha)):
            listed = sums.get(name)
            report.add("SHA256SUMS " + name, listed == actual,
                       "matches" if listed == actual else ("not listed" if listed is None else
                                                           "sha256 %s, SHA256SUMS says %s" % (actual, listed)))
    else:
        report.add("SHA256SUMS", False, "no SHA256SUMS beside the bundle")

    # the payload against the manifest
    report.add("payload sha256", payload_sha == payload_info.get("sha256"),
               "matches the manifest" if payload_sha == payload_info.get("sha256") else
               "payload sha256 %s, manifest says %s (payload altered?)" % (payload_sha, payload_info.get("sha256")))
    report.add("payload size", payload_size == payload_info.get("size"),
               "%d bytes" % payload_size if payload_size == payload_info.get("size") else
               "%d bytes, manifest says %s" % (payload_size, payload_info.get("size")))

    # the signature of the manifest
    if os.path.exists(paths.signature):
        from toolkit.crypto import sshsig
        from toolkit.crypto.errors import SignatureError

        try:
            with open(paths.signature, encoding="ascii", errors="replace") as sig, open(paths.manifest, "rb") as data:
                parsed = sshsig.check_signature(sig.read(), data)
            detail = "good signature by %s" % parsed.public.fingerprint()
            ok = True
            if allowed_signers is not None:
                with open(allowed_signers, encoding="utf-8") as allowed:
                    principals = sshsig.allowed_principals(parsed.public, allowed.read())
                ok = bool(principals)
                detail += ", allowed as %s" % ", ".join(principals) if ok else \
                    ", but that key is not in %s" % allowed_signers
            else:
                detail += " (signer not checked: no --allowed-signers)"
            report.add("signature", ok, detail)
        except SignatureError as error:
            report.add("signature", False, "manifest signature: %s" % error.message)
    else:
        report.add("signature", True, "none (the capture was not signed)")

    # the custody chain
    try:
        allowed_text = None
        if allowed_signers:
            with open(allowed_signers, encoding="utf-8") as allowed:
                allowed_text = allowed.read()
        entries = custody.verify_chain(paths.custody, payload_info.get("sha256"), allowed_text)
        report.add("custody", True, "%d entries, chain intact, each saw this payload" % len(entries))
    except KitError as error:
        report.add("custody", False, error.message)

    if identities or not paths.encrypted:
        _check_members(paths, manifest, identities, report)
    return report


def _check_members(paths: BundlePaths, manifest: Dict[str, Any], identities: Sequence[Any],
                   report: VerifyReport) -> None:
    expected = {a["path"]: a for a in manifest.get("artifacts", [])}
    seen = set()
    last = None
    problems: List[str] = []
    try:
        with open(paths.payload, "rb") as source:
            tar = open_tar_stream(source, manifest.get("payload", {}).get("compression", paths.compression),
                                  paths.encrypted, identities)
            for member in iterate_members(tar):
                last = member.name
                if member.name == "manifest.json":
                    inner = io.BytesIO()
                    digest = read_member(tar, member, inner.write)
                    if digest != manifest.get("inner_manifest_sha256"):
                        problems.append("manifest.json inside the payload differs from the detached manifest's record")
                    report.members_checked += 1
                    continue
                entry = expected.get(member.name)
                digest = read_member(tar, member)
                report.members_checked += 1
                if entry is None:
                    problems.append("member %s is not in the manifest" % member.name)
                    continue
                seen.add(member.name)
                if member.isreg():
                    if member.size != entry.get("size") or digest != entry.get("sha256"):
                        problems.append("member %s: sha256 %s size %d, manifest says %s size %s" % (
                            member.name, digest, member.size, entry.get("sha256"), entry.get("size")))
                elif member.issym() and member.linkname != entry.get("target"):
                    problems.append("symlink %s points to %s, manifest says %s" % (member.name, member.linkname,
                                                                                  entry.get("target")))
    except KitError as error:
        report.add("members", False, "payload stream: %s" % error.message)
        return
    except Exception as error:  # zstd, gzip or tar reporting a damaged stream
        report.add("members", False, "payload stream damaged after %d members: %s" % (report.members_checked, error))
        return
    missing = sorted(set(expected) - seen)
    if missing:
        problems.append("%d manifest entries have no member (first: %s)" % (len(missing), missing[0]))
    if last != "manifest.json":
        problems.append("the last member is %s, not manifest.json" % last)
    report.add("members", not problems, "; ".join(problems[:5]) if problems else
               "%d members match the manifest (hash, size, exact set)" % report.members_checked)
