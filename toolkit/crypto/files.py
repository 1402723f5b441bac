"""Encrypting, decrypting and signing files and streams, with outputs that are atomic or absent."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import BinaryIO, Callable, List, Optional, Sequence

from toolkit.crypto import age, sshsig
from toolkit.crypto.sshkeys import PassphraseNeeded, SshPrivateKey, load_ssh_private_key
from toolkit.errors import BadInputError
from toolkit.host.atomic import AtomicFile, environment_error
from toolkit.host.streams import HashingWriter

READ_SIZE = 1 << 20
PassphraseSource = Callable[[str], bytes]  # prompt text -> passphrase


@dataclass
class CryptResult:
    input: str
    output: str
    bytes_in: int
    bytes_out: int
    output_sha256: str
    recipients: List[str] = field(default_factory=list)


def read_file(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        raise BadInputError("%s not found: %s" % (what, path)) from None
    except IsADirectoryError:
        raise BadInputError("%s is a directory: %s" % (what, path)) from None
    except OSError as error:
        raise environment_error(error, "cannot read %s %s" % (what, path)) from None


def open_input(path: Optional[str]) -> BinaryIO:
    if path in (None, "-"):
        return sys.stdin.buffer
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise BadInputError("input not found: %s" % path) from None
    except IsADirectoryError:
        raise BadInputError("input is a directory: %s" % path) from None
    except OSError as error:
        raise environment_error(error, "cannot read %s" % path) from None


def load_recipients(recipients: Sequence[str], recipient_files: Sequence[str]) -> List[age.Recipient]:
    parsed = [age.parse_recipient(text) for text in recipients]
    for path in recipient_files:
        parsed += age.parse_recipients_file(read_file(path, "recipients file").decode("utf-8", "replace"), path)
    return parsed


def load_identities(paths: Sequence[str], passphrase: Optional[PassphraseSource]) -> List[age.Identity]:
    identities: List[age.Identity] = []
    for path in paths:
        content = read_file(path, "identity file")
        try:
            identities += age.parse_identity_file(content, path)
        except PassphraseNeeded:
            if passphrase is None:
                raise
            identities += age.parse_identity_file(content, path, passphrase("Passphrase for %s: " % path))
    return identities


def _pump(source: BinaryIO, sink) -> int:
    total = 0
    while True:
        try:
            data = source.read(READ_SIZE)
        except OSError as error:
            raise environment_error(error, "cannot read the input") from None
        if not data:
            return total
        total += len(data)
        sink.write(data)


def encrypt(input_path: Optional[str], output_path: Optional[str], recipients: Sequence[age.Recipient],
            armored: bool = False, overwrite: bool = False) -> CryptResult:
    """Encrypt input (a path or stdin) to output (a path, written atomically, or stdout)."""
    source = open_input(input_path)
    names = [str(r) if not isinstance(r, age.ScryptRecipient) else "scrypt passphrase" for r in recipients]
    if output_path in (None, "-"):
        sink = HashingWriter(sys.stdout.buffer)
        try:
            encryptor = age.Encryptor(sink, recipients, armored)
            size = _pump(source, encryptor)
            encryptor.close()
        finally:
            sink.close()
        sys.stdout.buffer.flush()
        return CryptResult(input_path or "-", "-", size, sink.size, sink.hexdigest(), names)
    with AtomicFile(output_path, 0o644, overwrite) as out:
        sink = HashingWriter(out)
        try:
            encryptor = age.Encryptor(sink, recipients, armored)
            size = _pump(source, encryptor)
            encryptor.close()
        finally:
            sink.close()
        out.commit()
    return CryptResult(input_path or "-", out.path, size, sink.size, sink.hexdigest(), names)


class LazyScryptIdentity(age.Identity):
    """Asks for the passphrase only when the file turns out to be passphrase-encrypted."""

    def __init__(self, passphrase: PassphraseSource) -> None:
        self._passphrase = passphrase

    def unwrap(self, stanzas):
        if not any(s.type == b"scrypt" for s in stanzas):
            return None
        return age.ScryptIdentity(self._passphrase("Passphrase: ")).unwrap(stanzas)


def decrypt(input_path: Optional[str], output_path: Optional[str], identities: Sequence[age.Identity],
            overwrite: bool = False) -> CryptResult:
    """Decrypt to output; a file output gets its final name only once the final chunk is verified."""
    source = open_input(input_path)
    decryptor = age.Decryptor(source, identities)
    if output_path in (None, "-"):
        sink = HashingWriter(sys.stdout.buffer)
        try:
            decryptor.copy_to(sink)
        finally:
            sink.close()
        sys.stdout.buffer.flush()
        return CryptResult(input_path or "-", "-", 0, sink.size, sink.hexdigest())
    with AtomicFile(output_path, 0o600, overwrite) as out:
        sink = HashingWriter(out)
        try:
            decryptor.copy_to(sink)
        finally:
            sink.close()
        out.commit()
    return CryptResult(input_path or "-", out.path, 0, sink.size, sink.hexdigest())


def load_signing_key(path: str, passphrase: Optional[PassphraseSource]) -> SshPrivateKey:
    content = read_file(path, "SSH private key")
    try:
        return load_ssh_private_key(content, None, path)
    except PassphraseNeeded:
        if passphrase is None:
            raise
        return load_ssh_private_key(content, passphrase("Passphrase for %s: " % path), path)


def sign_file(key: SshPrivateKey, path: str, signature_path: Optional[str], namespace: str,
              overwrite: bool = False) -> str:
    with open_input(path) as source:
        text = sshsig.sign(key, source, namespace)
    target = signature_path or path + ".sig"
    with AtomicFile(target, 0o644, overwrite) as out:
        out.write(text.encode("ascii"))
        out.commit()
    return out.path


def verify_file(path: str, signature_path: Optional[str], allowed_signers_path: str, identity: str,
                namespace: str) -> sshsig.VerifiedSignature:
    signature = read_file(signature_path or path + ".sig", "signature").decode("ascii", "replace")
    allowed = read_file(allowed_signers_path, "allowed signers file").decode("utf-8", "replace")
    with open_input(path) as source:
        return sshsig.verify(signature, source, allowed, identity, namespace)


def write_new_identity(path: str, created: str, post_quantum: bool = False):
    """A new X25519 identity, or with post_quantum an ML-KEM-768 + X25519 one (refused, before anything is
    written, where this interpreter's cryptography lacks ML-KEM)."""
    identity = age.MlKem768X25519Identity.generate() if post_quantum else age.X25519Identity.generate()
    with AtomicFile(path, 0o600) as out:
        out.write(age.identity_file_text(identity, created).encode("ascii"))
        out.commit()
    return identity
