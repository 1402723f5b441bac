"""OpenSSH SSHSIG detached signatures (PROTOCOL.sshsig), checked the way `ssh-keygen -Y verify` does.

Signing: Ed25519 OpenSSH keys (and RSA/ECDSA ones, which cryptography signs as
cheaply). Verifying: Ed25519, RSA (rsa-sha2-256/512) and ECDSA P-256/384/521,
against an OpenSSH allowed_signers file (principals with patterns, the
namespaces= and valid-after=/valid-before= options; cert-authority lines are
certificates, which this kit does not accept).
"""
from __future__ import annotations

import base64
import binascii
import fnmatch
import hashlib
import re
import time
from dataclasses import dataclass
from typing import BinaryIO, List, Optional

from toolkit.crypto.errors import KeyFormatError, SignatureError
from toolkit.crypto.sshkeys import (
    SshPrivateKey,
    SshPublicKey,
    parse_ssh_public_key,
    public_key_from_wire,
    read_string,
    ssh_string,
)

MAGIC = b"SSHSIG"
VERSION = 1
DEFAULT_NAMESPACE = "bookgen-kit"
BEGIN = "-----BEGIN SSH SIGNATURE-----"
END = "-----END SSH SIGNATURE-----"


def _message_hash(stream: BinaryIO, algorithm: str) -> bytes:
    digest = hashlib.new(algorithm)
    for chunk in iter(lambda: stream.read(1 << 20), b""):
        digest.update(chunk)
    return digest.digest()


def _signed_data(namespace: str, algorithm: str, message_hash: bytes) -> bytes:
    return MAGIC + ssh_string(namespace.encode()) + ssh_string(b"") + ssh_string(algorithm.encode()) + \
        ssh_string(message_hash)


def _armor(blob: bytes) -> str:
    encoded = base64.b64encode(blob).decode("ascii")
    return BEGIN + "\n" + "\n".join(encoded[i:i + 70] for i in range(0, len(encoded), 70)) + "\n" + END + "\n"


def sign(key: SshPrivateKey, stream: BinaryIO, namespace: str = DEFAULT_NAMESPACE, algorithm: str = "sha512") -> str:
    """The armored SSHSIG signature of the stream's content."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils

    data = _signed_data(namespace, algorithm, _message_hash(stream, algorithm))
    private = key.key
    if isinstance(private, ed25519.Ed25519PrivateKey):
        signature = ssh_string(b"ssh-ed25519") + ssh_string(private.sign(data))
    elif isinstance(private, rsa.RSAPrivateKey):
        signature = ssh_string(b"rsa-sha2-512") + ssh_string(private.sign(data, padding.PKCS1v15(), hashes.SHA512()))
    elif isinstance(private, ec.EllipticCurvePrivateKey):
        curve_hash = {256: hashes.SHA256(), 384: hashes.SHA384(), 521: hashes.SHA512()}[private.curve.key_size]
        r, s = utils.decode_dss_signature(private.sign(data, ec.ECDSA(curve_hash)))
        signature = ssh_string(key.kind.encode()) + ssh_string(_mpint(r) + _mpint(s))
    else:
        raise KeyFormatError("cannot sign with a %s key" % key.kind)
    blob = MAGIC + VERSION.to_bytes(4, "big") + ssh_string(key.public.wire) + ssh_string(namespace.encode()) + \
        ssh_string(b"") + ssh_string(algorithm.encode()) + ssh_string(signature)
    return _armor(blob)


def _mpint(value: int) -> bytes:
    raw = value.to_bytes((value.bit_length() + 8) // 8, "big") if value else b""
    return ssh_string(raw)


@dataclass
class ParsedSignature:
    public: SshPublicKey
    namespace: str
    algorithm: str
    signature: bytes


def parse_signature(text: str) -> ParsedSignature:
    lines = [line.strip() for line in text.strip().splitlines()]
    if len(lines) < 3 or lines[0] != BEGIN or lines[-1] != END:
        raise SignatureError("bad signature: not an armored SSH signature")
    try:
        blob = base64.b64decode("".join(lines[1:-1]), validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError("bad signature: invalid base64") from None
    if not blob.startswith(MAGIC) or len(blob) < 10:
        raise SignatureError("bad signature: no SSHSIG preamble")
    if int.from_bytes(blob[6:10], "big") != VERSION:
        raise SignatureError("bad signature: unsupported SSHSIG version")
    try:
        wire, offset = read_string(blob, 10)
        namespace, offset = read_string(blob, offset)
        _reserved, offset = read_string(blob, offset)
        algorithm, offset = read_string(blob, offset)
        signature, offset = read_string(blob, offset)
        public = public_key_from_wire(wire)
    except KeyFormatError as error:
        raise SignatureError("bad signature: %s" % error.message) from None
    if offset != len(blob):
        raise SignatureError("bad signature: trailing data")
    if algorithm not in (b"sha256", b"sha512"):
        raise SignatureError("bad signature: unsupported hash %s" % algorithm.decode("ascii", "replace"))
    return ParsedSignature(public, namespace.decode("utf-8", "replace"), algorithm.decode(), signature)


def _verify_raw(public: SshPublicKey, signature: bytes, data: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding, utils

    try:
        kind, offset = read_string(signature, 0)
        raw, offset = read_string(signature, offset)
    except KeyFormatError:
        return False
    if offset != len(signature):
        return False
    key = public.crypto_key()
    try:
        if public.kind == "ssh-ed25519" and kind == b"ssh-ed25519":
            key.verify(raw, data)
        elif public.kind == "ssh-rsa" and kind in (b"rsa-sha2-256", b"rsa-sha2-512"):
            key.verify(raw, data, padding.PKCS1v15(), hashes.SHA256() if kind == b"rsa-sha2-256" else hashes.SHA512())
        elif public.kind.startswith("ecdsa-sha2-") and kind.decode() == public.kind:
            r, pos = read_string(raw, 0)
            s, pos = read_string(raw, pos)
            curve_hash = {"nistp256": hashes.SHA256(), "nistp384": hashes.SHA384(),
                          "nistp521": hashes.SHA512()}[public.kind.rsplit("-", 1)[1]]
            der = utils.encode_dss_signature(int.from_bytes(r, "big"), int.from_bytes(s, "big"))
            key.verify(der, data, ec.ECDSA(curve_hash))
        else:
            return False
    except (InvalidSignature, KeyFormatError):
        return False
    return True


# --------------------------------------------------------------------------- allowed_signers
@dataclass
class AllowedSigner:
    principals: List[str]
    key: SshPublicKey
    namespaces: Optional[List[str]]
    valid_after: Optional[float]
    valid_before: Optional[float]
    line: int


def _match_list(value: str, patterns: List[str]) -> bool:
    """OpenSSH pattern-list semantics: any positive match, and no negated (!) match."""
    matched = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        if fnmatch.fnmatchcase(value, pattern[1:] if negated else pattern):
            if negated:
                return False
            matched = True
    return matched


def _parse_time(text: str) -> float:
    m = re.fullmatch(r"(\d{8})(\d{4})?(\d{2})?(Z)?", text)
    if not m:
        raise KeyFormatError("bad time %r" % text)
    stamp = m.group(1) + (m.group(2) or "0000") + (m.group(3) or "00")
    parsed = time.strptime(stamp, "%Y%m%d%H%M%S")
    import calendar

    return float(calendar.timegm(parsed)) if m.group(4) else time.mktime(parsed)


def _split_options(text: str) -> List[str]:
    options, current, quoted = [], "", False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char == "," and not quoted:
            options.append(current)
            current = ""
        else:
            current += char
    options.append(current)
    return options


def parse_allowed_signers(content: str) -> List[AllowedSigner]:
    signers = []
    for number, raw in enumerate(content.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r'^(\S+)\s+(.*)$', line)
        if not match:
            raise KeyFormatError("allowed_signers line %d: no key" % number)
        principals, rest = match.group(1).split(","), match.group(2)
        namespaces = valid_after = valid_before = None
        cert_authority = False
        first = re.match(r'^((?:[^\s"]|"[^"]*")+)\s+(.*)$', rest)
        if first and not first.group(1).startswith(("ssh-", "ecdsa-", "sk-")):
            for option in _split_options(first.group(1)):
                name, _, value = option.partition("=")
                value = value.strip('"')
                if name.lower() == "namespaces":
                    namespaces = value.split(",")
                elif name.lower() == "valid-after":
                    valid_after = _parse_time(value)
                elif name.lower() == "valid-before":
                    valid_before = _parse_time(value)
                elif name.lower() == "cert-authority":
                    cert_authority = True
            rest = first.group(2)
        if cert_authority:
            continue
        try:
            key = parse_ssh_public_key(rest)
        except KeyFormatError as error:
            raise KeyFormatError("allowed_signers line %d: %s" % (number, error.message)) from None
        signers.append(AllowedSigner(principals, key, namespaces, valid_after, valid_before, number))
    return signers


@dataclass
class VerifiedSignature:
    principal: str
    key_fingerprint: str
    namespace: str
    allowed_signers_line: int


def check_signature(signature_text: str, stream: BinaryIO, namespace: str = DEFAULT_NAMESPACE) -> ParsedSignature:
    """The signature holds for the data under its own key (who may sign is verify()'s question)."""
    parsed = parse_signature(signature_text)
    if parsed.namespace != namespace:
        raise SignatureError("signature namespace %r does not match %r" % (parsed.namespace, namespace))
    message_hash = _message_hash(stream, parsed.algorithm)
    if not _verify_raw(parsed.public, parsed.signature, _signed_data(namespace, parsed.algorithm, message_hash)):
        raise SignatureError("signature does not verify: the data or the signature was altered")
    return parsed


def verify(signature_text: str, stream: BinaryIO, allowed_signers: str, identity: str,
           namespace: str = DEFAULT_NAMESPACE) -> VerifiedSignature:
    """As `ssh-keygen -Y verify -f allowed_signers -I identity -n namespace -s sig < message`."""
    parsed = check_signature(signature_text, stream, namespace)
    now = time.time()
    for signer in parse_allowed_signers(allowed_signers):
        if signer.key.wire != parsed.public.wire or not _match_list(identity, signer.principals):
            continue
        if signer.namespaces is not None and not _match_list(namespace, signer.namespaces):
            continue
        if signer.valid_after is not None and now < signer.valid_after:
            continue
        if signer.valid_before is not None and now > signer.valid_before:
            continue
        return VerifiedSignature(identity, parsed.public.fingerprint(), namespace, signer.line)
    raise SignatureError("signature by %s is valid, but that key is not allowed for %r in the allowed signers"
                         % (parsed.public.fingerprint(), identity))


def allowed_principals(key: SshPublicKey, allowed_signers: str, namespace: str = DEFAULT_NAMESPACE) -> List[str]:
    """The principal patterns under which allowed_signers accepts this key for the namespace now."""
    now = time.time()
    found = []
    for signer in parse_allowed_signers(allowed_signers):
        if signer.key.wire != key.wire:
            continue
        if signer.namespaces is not None and not _match_list(namespace, signer.namespaces):
            continue
        if (signer.valid_after is not None and now < signer.valid_after) or \
                (signer.valid_before is not None and now > signer.valid_before):
            continue
        found += [p for p in signer.principals if not p.startswith("!")]
    return found
