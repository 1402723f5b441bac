"""OpenSSH public and private keys: the wire format that age and SSHSIG both hash and tag."""
from __future__ import annotations

import base64
import binascii
import struct
from dataclasses import dataclass
from typing import Optional, Tuple

from toolkit.crypto.errors import KeyFormatError

SUPPORTED_KINDS = ("ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521")


def read_string(data: bytes, offset: int) -> Tuple[bytes, int]:
    if offset + 4 > len(data):
        raise KeyFormatError("truncated SSH wire data")
    (length,) = struct.unpack_from(">I", data, offset)
    end = offset + 4 + length
    if end > len(data):
        raise KeyFormatError("truncated SSH wire data")
    return data[offset + 4:end], end


def ssh_string(value: bytes) -> bytes:
    return struct.pack(">I", len(value)) + value


@dataclass(frozen=True)
class SshPublicKey:
    kind: str
    wire: bytes  # the SSH wire encoding of the key blob
    comment: str = ""

    @property
    def raw(self) -> bytes:
        """For ssh-ed25519: the 32-byte public key."""
        _, offset = read_string(self.wire, 0)
        value, _ = read_string(self.wire, offset)
        return value

    def openssh(self) -> str:
        return "%s %s" % (self.kind, base64.b64encode(self.wire).decode("ascii"))

    def fingerprint(self) -> str:
        import hashlib

        return "SHA256:" + base64.b64encode(hashlib.sha256(self.wire).digest()).decode("ascii").rstrip("=")

    def crypto_key(self):
        from cryptography.hazmat.primitives.serialization import load_ssh_public_key

        try:
            return load_ssh_public_key(self.openssh().encode("ascii"))
        except (ValueError, TypeError) as error:
            raise KeyFormatError("unusable %s key: %s" % (self.kind, error)) from None


def public_key_from_wire(wire: bytes, comment: str = "") -> SshPublicKey:
    kind, offset = read_string(wire, 0)
    name = kind.decode("ascii", "replace")
    if name not in SUPPORTED_KINDS:
        raise KeyFormatError("unsupported SSH key type %s" % name)
    if name == "ssh-ed25519":
        raw, end = read_string(wire, offset)
        if len(raw) != 32 or end != len(wire):
            raise KeyFormatError("malformed ssh-ed25519 key")
    return SshPublicKey(name, wire, comment)


def parse_ssh_public_key(text: str) -> SshPublicKey:
    """An authorized_keys-style line without options: TYPE BASE64 [COMMENT]."""
    parts = text.strip().split(None, 2)
    if len(parts) < 2:
        raise KeyFormatError("not an SSH public key: expected 'TYPE BASE64 [COMMENT]'")
    try:
        wire = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):
        raise KeyFormatError("not an SSH public key: bad base64") from None
    key = public_key_from_wire(wire, parts[2] if len(parts) > 2 else "")
    if key.kind != parts[0]:
        raise KeyFormatError("SSH key type %s does not match its blob (%s)" % (parts[0], key.kind))
    return key


class PassphraseNeeded(KeyFormatError):
    """The private key is encrypted and no passphrase was given."""


@dataclass
class SshPrivateKey:
    kind: str
    key: object  # cryptography private key
    public: SshPublicKey

    @property
    def seed(self) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return self.key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                      serialization.NoEncryption())


def load_ssh_private_key(content: bytes, passphrase: Optional[bytes], name: str = "SSH key") -> SshPrivateKey:
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_ssh_private_key(content, password=passphrase or None)
    except TypeError as error:
        if "encrypted" in str(error).lower() or "password" in str(error).lower():
            raise PassphraseNeeded("%s is encrypted: a passphrase is needed" % name) from None
        raise KeyFormatError("%s: %s" % (name, error)) from None
    except ValueError as error:
        if passphrase:
            raise KeyFormatError("%s: wrong passphrase or corrupt key" % name) from None
        raise KeyFormatError("%s is not a usable OpenSSH private key: %s" % (name, error)) from None
    except Exception as error:  # e.g. bcrypt missing, unsupported cipher
        raise KeyFormatError("%s: %s" % (name, error)) from None
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    public = parse_ssh_public_key(line.decode("ascii"))
    return SshPrivateKey(public.kind, key, public)
