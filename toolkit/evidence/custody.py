"""The chain-of-custody log: JSON lines, each naming the sha256 of the line before it.

Entry: seq, prev_sha256 (64 zeros for the first), time (UTC), action, actor,
location, purpose, payload_sha256 (the payload the actor saw), manifest_sha256,
and optionally an SSHSIG signature (namespace bookgen-kit) of the entry without
its signature field. Appending rewrites the log atomically.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import time
from typing import Any, Dict, List, Optional

from toolkit.errors import BadInputError, VerificationFailed
from toolkit.host.atomic import AtomicFile

ACTIONS = ("collected", "transferred", "received", "verified", "extracted")
GENESIS = "0" * 64
SIGNATURE_NAMESPACE = "bookgen-kit"


def canonical(entry: Dict[str, Any]) -> bytes:
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def read_log(path: str) -> List[Dict[str, Any]]:
    try:
        with open(path, "rb") as handle:
            lines = handle.read().splitlines()
    except FileNotFoundError:
        raise BadInputError("no custody log at %s" % path) from None
    entries = []
    for number, line in enumerate(lines, 1):
        try:
            entries.append(json.loads(line))
        except ValueError:
            raise VerificationFailed("custody log %s line %d is not JSON (altered?)" % (path, number)) from None
    return entries


def _line_hashes(path: str) -> List[str]:
    with open(path, "rb") as handle:
        return [hashlib.sha256(line).hexdigest() for line in handle.read().splitlines()]


def make_entry(previous: Optional[str], seq: int, action: str, actor: str, location: str, purpose: str,
               payload_sha256: str, manifest_sha256: str, signer=None) -> Dict[str, Any]:
    if action not in ACTIONS:
        raise BadInputError("custody action must be one of %s" % ", ".join(ACTIONS))
    entry = {"seq": seq, "prev_sha256": previous or GENESIS,
             "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "action": action, "actor": actor,
             "location": location, "purpose": purpose, "payload_sha256": payload_sha256,
             "manifest_sha256": manifest_sha256}
    if signer is not None:
        from toolkit.crypto import sshsig

        entry["signature"] = sshsig.sign(signer, io.BytesIO(canonical(entry)), SIGNATURE_NAMESPACE)
        entry["signer"] = signer.public.fingerprint()
    return entry


def append(path: str, entry_args: Dict[str, Any], signer=None) -> Dict[str, Any]:
    """Add an entry chained to the last one; the whole log is rewritten atomically."""
    existing = b""
    previous, seq = None, 1
    if os.path.exists(path):
        verify_chain(path)
        with open(path, "rb") as handle:
            existing = handle.read()
        hashes = _line_hashes(path)
        previous, seq = hashes[-1], len(hashes) + 1
    entry = make_entry(previous, seq, signer=signer, **entry_args)
    with AtomicFile(path, 0o644, overwrite=True) as out:
        out.write(existing + canonical(entry) + b"\n")
        out.commit()
    return entry


def verify_chain(path: str, payload_sha256: Optional[str] = None, allowed_signers: Optional[str] = None
                 ) -> List[Dict[str, Any]]:
    """Check seq, the hash chain, the payload hash each entry saw, and entry signatures; the entries."""
    entries = read_log(path)
    hashes = _line_hashes(path)
    if not entries:
        raise VerificationFailed("custody log %s is empty" % path)
    for index, entry in enumerate(entries):
        where = "custody log %s entry %d" % (path, index + 1)
        if entry.get("seq") != index + 1:
            raise VerificationFailed("%s: sequence number %r, expected %d" % (where, entry.get("seq"), index + 1))
        expected = GENESIS if index == 0 else hashes[index - 1]
        if entry.get("prev_sha256") != expected:
            raise VerificationFailed("%s: the chain is broken (previous entry altered or removed)" % where)
        if payload_sha256 and entry.get("payload_sha256") != payload_sha256:
            raise VerificationFailed("%s: it saw payload %s, not %s" % (where, entry.get("payload_sha256"),
                                                                      payload_sha256))
        if "signature" in entry:
            _verify_entry_signature(entry, where, allowed_signers)
    return entries


def _verify_entry_signature(entry: Dict[str, Any], where: str, allowed_signers: Optional[str]) -> None:
    from toolkit.crypto import sshsig
    from toolkit.crypto.errors import SignatureError

    unsigned = {k: v for k, v in entry.items() if k not in ("signature", "signer")}
    try:
        sshsig.check_signature(entry["signature"], io.BytesIO(canonical(unsigned)), SIGNATURE_NAMESPACE)
        if allowed_signers is not None:
            sshsig.verify(entry["signature"], io.BytesIO(canonical(unsigned)), allowed_signers, entry.get("actor", ""),
                          SIGNATURE_NAMESPACE)
    except SignatureError as error:
        raise VerificationFailed("%s: signature: %s" % (where, error.message)) from None
