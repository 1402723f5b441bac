"""age v1 (C2SP age, age-encryption.org/v1) on cryptography's primitives.

Recipients: MLKEM768-X25519 (age1pq1..., post-quantum, through cryptography's HPKE), X25519 (age1...),
ssh-ed25519 (an OpenSSH public key), scrypt (passphrase); post-quantum and classical recipients are never
mixed in one file. Payload: STREAM of ChaCha20-Poly1305 chunks of 64 KiB. Streaming
both ways in bounded memory: `Encryptor` is a writable sink the archive pipeline
feeds; `Decryptor` yields plaintext chunks, each authenticated before it is
returned. Parsing is strict: every MUST of the spec is an error of its own.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
from dataclasses import dataclass
from typing import BinaryIO, Iterable, Iterator, List, Optional, Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from toolkit.crypto import armor, bech32
from toolkit.crypto.errors import (
    AgeHeaderError,
    AgeMacError,
    AgePayloadError,
    KeyFormatError,
    NoMatchingIdentity,
    PostQuantumUnavailable,
    TruncatedPayload,
)
from toolkit.crypto.sshkeys import SshPublicKey, parse_ssh_public_key

VERSION_LINE = b"age-encryption.org/v1\n"
CHUNK_SIZE = 64 * 1024
TAG_SIZE = 16
ENCRYPTED_CHUNK_SIZE = CHUNK_SIZE + TAG_SIZE
FILE_KEY_SIZE = 16
DEFAULT_SCRYPT_WORK_FACTOR = 18  # as the age CLI
MAX_SCRYPT_WORK_FACTOR = 22  # decryption refuses more (as the age CLI's default limit)
MAX_HEADER_LINE = 64 * 1024
MAX_HEADER_SIZE = 1024 * 1024
ZERO_NONCE = bytes(12)
X25519_INFO = b"age-encryption.org/v1/X25519"
MLKEM768X25519_TYPE = b"mlkem768x25519"
MLKEM768X25519_INFO = b"age-encryption.org/mlkem768x25519"
PQ_ENC_SIZE = 1120  # ML-KEM-768 ciphertext (1088) || X25519 share (32)
PQ_PUBLIC_SIZE = 1216  # ML-KEM-768 encapsulation key (1184) || X25519 public key (32)
SSH_ED25519_INFO = b"age-encryption.org/v1/ssh-ed25519"
SCRYPT_SALT_LABEL = b"age-encryption.org/v1/scrypt"
_B64_CHARS = re.compile(rb"^[A-Za-z0-9+/]*$")
_DECIMAL = re.compile(rb"^[1-9][0-9]*$")


# --------------------------------------------------------------------------- encoding helpers
def b64encode_raw(data: bytes) -> bytes:
    return base64.b64encode(data).rstrip(b"=")


def b64decode_canonical(text: bytes, what: str) -> bytes:
    """Unpadded standard base64, rejecting padding and non-canonical encodings (spec MUST)."""
    if not _B64_CHARS.match(text) or len(text) % 4 == 1:
        raise AgeHeaderError("bad header: %s is not valid unpadded base64" % what)
    decoded = base64.b64decode(text + b"=" * (-len(text) % 4), validate=True)
    if b64encode_raw(decoded) != text:
        raise AgeHeaderError("bad header: %s is non-canonical base64" % what)
    return decoded


def hkdf(ikm: bytes, salt: bytes, info: bytes, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def _aead_seal(key: bytes, plaintext: bytes) -> bytes:
    return ChaCha20Poly1305(key).encrypt(ZERO_NONCE, plaintext, None)


def _aead_open(key: bytes, body: bytes) -> Optional[bytes]:
    try:
        return ChaCha20Poly1305(key).decrypt(ZERO_NONCE, body, None)
    except InvalidTag:
        return None


# --------------------------------------------------------------------------- header
@dataclass
class Stanza:
    type: bytes
    args: List[bytes]  # after the type
    body: bytes

    def encode(self) -> bytes:
        line = b"-> " + b" ".join([self.type] + self.args) + b"\n"
        encoded = b64encode_raw(self.body)
        lines = [encoded[i:i + 64] for i in range(0, len(encoded), 64)]
        if not lines or len(lines[-1]) == 64:
            lines.append(b"")
        return line + b"".join(piece + b"\n" for piece in lines)


@dataclass
class Header:
    stanzas: List[Stanza]
    mac: bytes
    mac_input: bytes  # the header up to and including "---"


def _header_mac(file_key: bytes, mac_input: bytes) -> bytes:
    return hmac.new(hkdf(file_key, b"", b"header"), mac_input, hashlib.sha256).digest()


def encode_header(stanzas: Sequence[Stanza], file_key: bytes) -> bytes:
    mac_input = VERSION_LINE + b"".join(s.encode() for s in stanzas) + b"---"
    return mac_input + b" " + b64encode_raw(_header_mac(file_key, mac_input)) + b"\n"


class _LineReader:
    """Reads header lines from a binary stream, counting what was read, with bounded line length."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.consumed = bytearray()

    def line(self) -> bytes:
        data = self.stream.readline(MAX_HEADER_LINE + 1)
        self.consumed += data
        if len(self.consumed) > MAX_HEADER_SIZE:
            raise AgeHeaderError("bad header: larger than %d bytes" % MAX_HEADER_SIZE)
        if not data:
            raise AgeHeaderError("bad header: the file ends inside the header")
        if not data.endswith(b"\n"):
            if len(data) > MAX_HEADER_LINE:
                raise AgeHeaderError("bad header: a header line is longer than %d bytes" % MAX_HEADER_LINE)
            raise AgeHeaderError("bad header: the file ends inside the header")
        return data


def parse_header(stream: BinaryIO) -> Header:
    """Read and check the header; the stream is left at the first payload byte."""
    reader = _LineReader(stream)
    first = reader.line()
    if first != VERSION_LINE:
        if first.startswith(b"age-encryption.org/"):
            raise AgeHeaderError("bad header: unsupported version %r" % first.strip().decode("ascii", "replace"))
        raise AgeHeaderError("bad header: not an age file (no age-encryption.org/v1 line)")
    stanzas: List[Stanza] = []
    while True:
        line = reader.line()
        if line.startswith(b"-> "):
            stanzas.append(_parse_stanza(line, reader))
        elif line.startswith(b"---"):
            if not stanzas:
                raise AgeHeaderError("bad header: no recipient stanza")
            if not line.startswith(b"--- ") or len(line) != 4 + 43 + 1:
                raise AgeHeaderError("bad header: malformed MAC line")
            mac = b64decode_canonical(line[4:-1], "the header MAC")
            mac_input = bytes(reader.consumed[: len(reader.consumed) - len(line) + 3])
            return Header(stanzas, mac, mac_input)
        else:
            raise AgeHeaderError("bad header: unexpected line %r" % line[:20].decode("ascii", "replace"))


def _parse_stanza(line: bytes, reader: _LineReader) -> Stanza:
    words = line[3:-1].split(b" ")
    if not words or any(not w or any(c < 0x21 or c > 0x7E for c in w) for w in words):
        raise AgeHeaderError("bad header: malformed stanza arguments")
    encoded = bytearray()
    while True:
        body_line = reader.line()[:-1]
        if len(body_line) > 64:
            raise AgeHeaderError("bad header: stanza body line longer than 64 columns")
        if not _B64_CHARS.match(body_line):
            raise AgeHeaderError("bad header: stanza body is not base64")
        encoded += body_line
        if len(body_line) < 64:
            break
    return Stanza(words[0], words[1:], b64decode_canonical(bytes(encoded), "a stanza body"))


# --------------------------------------------------------------------------- recipients
class Recipient:
    post_quantum = False  # a recipient type safe against a quantum computer (never mixed with one that is not)

    def wrap(self, file_key: bytes) -> Stanza:
        raise NotImplementedError


class Identity:
    def unwrap(self, stanzas: Sequence[Stanza]) -> Optional[bytes]:
        """The file key, or None when no stanza is addressed to this identity."""
        raise NotImplementedError


def _check_body(stanza: Stanza, kind: str) -> None:
    if len(stanza.body) != 32:
        raise AgeHeaderError("bad header: %s stanza body is %d bytes, not 32" % (kind, len(stanza.body)))


def _x25519(secret: bytes, public: bytes) -> bytes:
    try:
        return X25519PrivateKey.from_private_bytes(secret).exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:  # cryptography refuses an all-zero shared secret
        raise AgeHeaderError("bad header: X25519 shared secret is all zero") from None


# --------------------------------------------------------------------------- MLKEM768-X25519 (post-quantum)
def _hpke():
    """cryptography's HPKE and ML-KEM, or a clear refusal where this interpreter's build lacks them (never a
    quiet fall back to a classical recipient)."""
    try:
        from cryptography.hazmat.primitives import hpke
        from cryptography.hazmat.primitives.asymmetric import mlkem

        suite = hpke.Suite(hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.CHACHA20_POLY1305)
    except (ImportError, AttributeError):
        import cryptography

        raise PostQuantumUnavailable(
            "post-quantum age (mlkem768x25519) needs ML-KEM and HPKE, which cryptography %s on this Python "
            "lacks: run the kit with a host Python 3.9 or newer" % cryptography.__version__) from None
    return hpke, mlkem, suite


def _pq_public(hpke, mlkem, public: bytes):
    try:
        return hpke.MLKEM768X25519PublicKey(mlkem.MLKEM768PublicKey.from_public_bytes(public[:1184]),
                                            X25519PublicKey.from_public_bytes(public[1184:]))
    except ValueError:
        raise KeyFormatError("not a valid ML-KEM-768 + X25519 public key") from None


class MlKem768X25519Recipient(Recipient):
    """age1pq1...: ML-KEM-768 and X25519 through HPKE (the X-Wing KEM of filippo.io/hpke-pq)."""
    post_quantum = True

    def __init__(self, public: bytes) -> None:
        if len(public) != PQ_PUBLIC_SIZE:
            raise KeyFormatError("an ML-KEM-768 + X25519 recipient is %d bytes" % PQ_PUBLIC_SIZE)
        self.public = public

    @classmethod
    def parse(cls, text: str) -> "MlKem768X25519Recipient":
        try:
            hrp, data = bech32.decode(text)
        except bech32.Bech32Error as error:
            raise KeyFormatError("malformed age recipient: %s" % error) from None
        if hrp != "age1pq" or len(data) != PQ_PUBLIC_SIZE:
            raise KeyFormatError("not an age post-quantum recipient (age1pq1...)")
        recipient = cls(data)
        recipient.check()
        return recipient

    def check(self) -> None:
        """A key that can be encrypted to: a valid ML-KEM-768 key and an X25519 key of full order (where this
        interpreter has ML-KEM; where it has not, using the recipient is refused anyway)."""
        try:
            hpke, mlkem, _ = _hpke()
        except PostQuantumUnavailable:
            return
        _pq_public(hpke, mlkem, self.public)
        try:
            X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(self.public[1184:]))
        except ValueError:
            raise KeyFormatError("not a usable age post-quantum recipient: its X25519 key is of low order") from None

    def __str__(self) -> str:
        return bech32.encode("age1pq", self.public)

    def wrap(self, file_key: bytes) -> Stanza:
        hpke, mlkem, suite = _hpke()
        self.check()
        sealed = suite.encrypt(file_key, _pq_public(hpke, mlkem, self.public), info=MLKEM768X25519_INFO)
        enc, body = sealed[:PQ_ENC_SIZE], sealed[PQ_ENC_SIZE:]
        return Stanza(MLKEM768X25519_TYPE, [b64encode_raw(enc)], body)


class MlKem768X25519Identity(Identity):
    """AGE-SECRET-KEY-PQ-1...: a 32-byte seed, expanded with SHAKE256 to the ML-KEM-768 seed and the X25519 key."""

    def __init__(self, seed: bytes) -> None:
        if len(seed) != 32:
            raise KeyFormatError("a post-quantum age identity is 32 bytes")
        self.seed = seed
        self._keys = None  # expanded when first needed: a key file that also holds classical keys still opens
        # classical files on an interpreter without ML-KEM

    def _expanded(self):
        """(HPKE private key, X25519 private key, public key bytes), from the seed (filippo.io/hpke-pq)."""
        if self._keys is None:
            hpke, mlkem, _ = _hpke()
            expanded = hashlib.shake_256(self.seed).digest(96)
            x25519 = X25519PrivateKey.from_private_bytes(expanded[64:])
            kem = mlkem.MLKEM768PrivateKey.from_seed_bytes(expanded[:64])
            self._keys = (hpke.MLKEM768X25519PrivateKey(kem, x25519), x25519,
                          kem.public_key().public_bytes_raw() + x25519.public_key().public_bytes_raw())
        return self._keys

    @property
    def public(self) -> bytes:
        return self._expanded()[2]

    @classmethod
    def generate(cls) -> "MlKem768X25519Identity":
        return cls(os.urandom(32))

    @classmethod
    def parse(cls, text: str) -> "MlKem768X25519Identity":
        try:
            hrp, data = bech32.decode(text)
        except bech32.Bech32Error as error:
            raise KeyFormatError("malformed age identity: %s" % error) from None
        if hrp != "age-secret-key-pq-" or len(data) != 32:
            raise KeyFormatError("not an age post-quantum identity (AGE-SECRET-KEY-PQ-1...)")
        return cls(data)

    def __str__(self) -> str:
        return bech32.encode("AGE-SECRET-KEY-PQ-", self.seed)

    def recipient(self) -> MlKem768X25519Recipient:
        return MlKem768X25519Recipient(self.public)

    def unwrap(self, stanzas: Sequence[Stanza]) -> Optional[bytes]:
        for stanza in stanzas:
            if stanza.type != MLKEM768X25519_TYPE:
                continue
            _, _, suite = _hpke()
            private, x25519, _ = self._expanded()
            if len(stanza.args) != 1:
                raise AgeHeaderError("bad header: mlkem768x25519 stanza has %d arguments, not 2" % (
                    len(stanza.args) + 1))
            enc = b64decode_canonical(stanza.args[0], "the mlkem768x25519 encapsulated key")
            if len(enc) != PQ_ENC_SIZE:
                raise AgeHeaderError("bad header: mlkem768x25519 encapsulated key is %d bytes, not %d" % (
                    len(enc), PQ_ENC_SIZE))
            _check_body(stanza, "mlkem768x25519")
            _x25519(x25519.private_bytes_raw(), enc[-32:])  # a low-order share is a header failure
            try:
                return suite.decrypt(enc + stanza.body, private, info=MLKEM768X25519_INFO)
            except (InvalidTag, ValueError):
                continue  # not for this identity
        return None


class X25519Recipient(Recipient):
    def __init__(self, public: bytes) -> None:
        if len(public) != 32:
            raise KeyFormatError("an X25519 recipient is 32 bytes")
        self.public = public

    @classmethod
    def parse(cls, text: str) -> "X25519Recipient":
        try:
            hrp, data = bech32.decode(text)
        except bech32.Bech32Error as error:
            raise KeyFormatError("malformed age recipient: %s" % error) from None
        if hrp != "age" or len(data) != 32:
            raise KeyFormatError("not an age X25519 recipient (age1...)")
        return cls(data)

    def __str__(self) -> str:
        return bech32.encode("age", self.public)

    def wrap(self, file_key: bytes) -> Stanza:
        ephemeral = os.urandom(32)
        share = X25519PrivateKey.from_private_bytes(ephemeral).public_key().public_bytes_raw()
        key = hkdf(_x25519(ephemeral, self.public), share + self.public, X25519_INFO)
        return Stanza(b"X25519", [b64encode_raw(share)], _aead_seal(key, file_key))


class X25519Identity(Identity):
    def __init__(self, secret: bytes) -> None:
        if len(secret) != 32:
            raise KeyFormatError("an X25519 identity is 32 bytes")
        self.secret = secret
        self.public = X25519PrivateKey.from_private_bytes(secret).public_key().public_bytes_raw()

    @classmethod
    def generate(cls) -> "X25519Identity":
        return cls(os.urandom(32))

    @classmethod
    def parse(cls, text: str) -> "X25519Identity":
        try:
            hrp, data = bech32.decode(text)
        except bech32.Bech32Error as error:
            raise KeyFormatError("malformed age identity: %s" % error) from None
        if hrp != "age-secret-key-" or len(data) != 32:
            raise KeyFormatError("not an age X25519 identity (AGE-SECRET-KEY-1...)")
        return cls(data)

    def __str__(self) -> str:
        return bech32.encode("AGE-SECRET-KEY-", self.secret)

    def recipient(self) -> X25519Recipient:
        return X25519Recipient(self.public)

    def unwrap(self, stanzas: Sequence[Stanza]) -> Optional[bytes]:
        for stanza in stanzas:
            if stanza.type != b"X25519":
                continue
            if len(stanza.args) != 1:
                raise AgeHeaderError("bad header: X25519 stanza has %d arguments, not 2" % (len(stanza.args) + 1))
            share = b64decode_canonical(stanza.args[0], "the X25519 ephemeral share")
            if len(share) != 32:
                raise AgeHeaderError("bad header: X25519 ephemeral share is not 32 bytes")
            _check_body(stanza, "X25519")
            key = hkdf(_x25519(self.secret, share), share + self.public, X25519_INFO)
            file_key = _aead_open(key, stanza.body)
            if file_key is not None:
                return file_key
        return None


class ScryptRecipient(Recipient):
    def __init__(self, passphrase: bytes, work_factor: int = DEFAULT_SCRYPT_WORK_FACTOR) -> None:
        if not passphrase:
            raise KeyFormatError("an empty passphrase")
        self.passphrase = passphrase
        self.work_factor = work_factor

    def wrap(self, file_key: bytes) -> Stanza:
        salt = os.urandom(16)
        key = _scrypt(self.passphrase, salt, self.work_factor)
        return Stanza(b"scrypt", [b64encode_raw(salt), str(self.work_factor).encode()], _aead_seal(key, file_key))


def _scrypt(passphrase: bytes, salt: bytes, work_factor: int) -> bytes:
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

    return Scrypt(salt=SCRYPT_SALT_LABEL + salt, length=32, n=1 << work_factor, r=8, p=1).derive(passphrase)


class ScryptIdentity(Identity):
    def __init__(self, passphrase: bytes, max_work_factor: int = MAX_SCRYPT_WORK_FACTOR) -> None:
        self.passphrase = passphrase
        self.max_work_factor = max_work_factor

    def unwrap(self, stanzas: Sequence[Stanza]) -> Optional[bytes]:
        for stanza in stanzas:
            if stanza.type != b"scrypt":
                continue
            if len(stanza.args) != 2:
                raise AgeHeaderError("bad header: scrypt stanza has %d arguments, not 3" % (len(stanza.args) + 1))
            salt = b64decode_canonical(stanza.args[0], "the scrypt salt")
            if len(salt) != 16:
                raise AgeHeaderError("bad header: scrypt salt is not 16 bytes")
            if not _DECIMAL.match(stanza.args[1]):
                raise AgeHeaderError("bad header: scrypt work factor is not a decimal without leading zeros")
            work_factor = int(stanza.args[1])
            if work_factor > self.max_work_factor:
                raise AgeHeaderError("bad header: scrypt work factor 2^%d exceeds the limit 2^%d"
                                     % (work_factor, self.max_work_factor))
            _check_body(stanza, "scrypt")
            file_key = _aead_open(_scrypt(self.passphrase, salt, work_factor), stanza.body)
            if file_key is None:
                raise NoMatchingIdentity("no matching identity: wrong passphrase")
            return file_key
        return None


# --------------------------------------------------------------------------- ssh-ed25519
_P = 2 ** 255 - 19


def _ed25519_to_x25519_public(ed_public: bytes) -> bytes:
    """The Montgomery u-coordinate of an Ed25519 point: u = (1 + y) / (1 - y) mod p."""
    y = int.from_bytes(ed_public, "little") & ((1 << 255) - 1)
    if y >= _P or (1 - y) % _P == 0:
        raise KeyFormatError("invalid ssh-ed25519 public key")
    u = (1 + y) * pow((1 - y) % _P, _P - 2, _P) % _P
    return u.to_bytes(32, "little")


def _ssh_tag(wire: bytes) -> bytes:
    return hashlib.sha256(wire).digest()[:4]


class SshEd25519Recipient(Recipient):
    def __init__(self, key: SshPublicKey) -> None:
        if key.kind != "ssh-ed25519":
            raise KeyFormatError("only ssh-ed25519 SSH keys can be age recipients here")
        self.key = key
        self.x25519_public = _ed25519_to_x25519_public(key.raw)

    @classmethod
    def parse(cls, text: str) -> "SshEd25519Recipient":
        return cls(parse_ssh_public_key(text))

    def __str__(self) -> str:
        return self.key.openssh()

    def wrap(self, file_key: bytes) -> Stanza:
        ephemeral = os.urandom(32)
        share = X25519PrivateKey.from_private_bytes(ephemeral).public_key().public_bytes_raw()
        shared = _x25519(ephemeral, self.x25519_public)
        tweak = hkdf(b"", self.key.wire, SSH_ED25519_INFO)  # empty ikm, the key as salt (as age does)
        shared = _x25519(tweak, shared)
        key = hkdf(shared, share + self.x25519_public, SSH_ED25519_INFO)
        return Stanza(b"ssh-ed25519", [b64encode_raw(_ssh_tag(self.key.wire)), b64encode_raw(share)],
                      _aead_seal(key, file_key))


class SshEd25519Identity(Identity):
    def __init__(self, private_seed: bytes, public: SshPublicKey) -> None:
        self.public = public
        digest = hashlib.sha512(private_seed).digest()
        self.x25519_secret = digest[:32]  # clamped by X25519 itself
        self.x25519_public = _ed25519_to_x25519_public(public.raw)

    def unwrap(self, stanzas: Sequence[Stanza]) -> Optional[bytes]:
        for stanza in stanzas:
            if stanza.type != b"ssh-ed25519":
                continue
            if len(stanza.args) != 2:
                raise AgeHeaderError("bad header: ssh-ed25519 stanza has %d arguments, not 3" % (len(stanza.args) + 1))
            tag = b64decode_canonical(stanza.args[0], "the ssh-ed25519 tag")
            share = b64decode_canonical(stanza.args[1], "the ssh-ed25519 ephemeral share")
            if len(tag) != 4 or len(share) != 32:
                raise AgeHeaderError("bad header: malformed ssh-ed25519 stanza")
            _check_body(stanza, "ssh-ed25519")
            if tag != _ssh_tag(self.public.wire):
                continue
            shared = _x25519(self.x25519_secret, share)
            shared = _x25519(hkdf(b"", self.public.wire, SSH_ED25519_INFO), shared)
            key = hkdf(shared, share + self.x25519_public, SSH_ED25519_INFO)
            file_key = _aead_open(key, stanza.body)
            if file_key is not None:
                return file_key
        return None


# --------------------------------------------------------------------------- payload
def _chunk_nonce(counter: int, last: bool) -> bytes:
    return counter.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


class Encryptor:
    """A writable sink: age header now, then the STREAM payload as data arrives.

    Memory stays at about two chunks whatever is written. close() writes the
    final chunk (and the armor's end line) but does not close the sink.
    """

    def __init__(self, sink: BinaryIO, recipients: Sequence[Recipient], armored: bool = False) -> None:
        if not recipients:
            raise KeyFormatError("no recipients")
        if any(isinstance(r, ScryptRecipient) for r in recipients) and len(recipients) > 1:
            raise KeyFormatError("a passphrase (scrypt) cannot be combined with other recipients")
        if len({r.post_quantum for r in recipients}) > 1:  # as age 1.3 refuses: the file would be only as safe
            raise KeyFormatError("post-quantum (age1pq1...) and classical recipients cannot be mixed: the file "
                                 "would be open to a quantum computer through the classical ones")
        self._out = armor.ArmorWriter(sink) if armored else sink
        self._armored = armored
        file_key = os.urandom(FILE_KEY_SIZE)
        self._out.write(encode_header([r.wrap(file_key) for r in recipients], file_key))
        nonce = os.urandom(16)
        self._out.write(nonce)
        self._aead = ChaCha20Poly1305(hkdf(file_key, nonce, b"payload"))
        self._buffer = bytearray()
        self._counter = 0
        self._closed = False
        self.plaintext_bytes = 0

    def write(self, data) -> int:
        """Buffer up to one chunk; a full chunk is sealed only once more data shows it is not the last."""
        if self._closed:
            raise ValueError("write to a closed age encryptor")
        view = memoryview(data).cast("B")
        size = len(view)
        self.plaintext_bytes += size
        while len(view):
            if len(self._buffer) == CHUNK_SIZE:
                self._seal(self._buffer, last=False)
                self._buffer = bytearray()
            if not self._buffer and len(view) > CHUNK_SIZE:
                self._seal(view[:CHUNK_SIZE], last=False)
                view = view[CHUNK_SIZE:]
                continue
            take = min(len(view), CHUNK_SIZE - len(self._buffer))
            self._buffer += view[:take]
            view = view[take:]
        return size

    def _seal(self, chunk, last: bool) -> None:
        self._out.write(self._aead.encrypt(_chunk_nonce(self._counter, last), chunk, None))
        self._counter += 1

    def close(self) -> None:
        if self._closed:
            return
        self._seal(self._buffer, last=True)
        self._buffer = bytearray()
        self._closed = True
        if self._armored:
            self._out.close()

    def __enter__(self) -> "Encryptor":
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()


class Decryptor:
    """Reads an age file (binary or armored): header checked at once, payload chunk by chunk."""

    def __init__(self, source: BinaryIO, identities: Sequence[Identity]) -> None:
        self._in = armor.open_maybe_armored(source)
        self.header = parse_header(self._in)
        stanzas = self.header.stanzas
        if any(s.type == b"scrypt" for s in stanzas) and len(stanzas) != 1:
            raise AgeHeaderError("bad header: an scrypt stanza must be the only stanza")
        file_key = None
        for identity in identities:
            file_key = identity.unwrap(stanzas)
            if file_key is not None:
                break
        if file_key is None:
            kinds = ", ".join(sorted({s.type.decode("ascii", "replace") for s in stanzas}))
            raise NoMatchingIdentity("no matching identity: none of the given keys opens this file (stanzas: %s)" % kinds)
        if not hmac.compare_digest(_header_mac(file_key, self.header.mac_input), self.header.mac):
            raise AgeMacError("bad MAC: the age header was altered")
        nonce = _read_exactly(self._in, 16)
        if len(nonce) < 16:  # the nonce belongs to the header's framing: a header failure (CCTV stream_no_nonce)
            raise AgeHeaderError("bad header: the file ends before the 16-byte payload nonce (%d bytes)" % len(nonce))
        self._aead = ChaCha20Poly1305(hkdf(file_key, nonce, b"payload"))
        self.plaintext_bytes = 0

    def chunks(self) -> Iterator[bytes]:
        """Plaintext chunks, each released as soon as it is authenticated (as age does).

        Iterate to the end: only the final chunk proves the end of the file, and an
        error about what follows a chunk (truncation, data after the final chunk) is
        raised on the next step, after the authenticated plaintext before it.
        """
        counter = 0
        while True:
            data = _read_exactly(self._in, ENCRYPTED_CHUNK_SIZE)
            if not data:
                if counter == 0:
                    raise TruncatedPayload("truncated payload: no chunk after the nonce")
                raise TruncatedPayload("truncated payload: the file ends after chunk %d, before the final chunk"
                                       % (counter - 1))
            if len(data) < TAG_SIZE:
                raise TruncatedPayload("truncated payload: chunk %d is shorter than its tag" % counter)
            if len(data) == ENCRYPTED_CHUNK_SIZE:
                plaintext = self._try_open(data, counter, last=False)
                if plaintext is not None:
                    self.plaintext_bytes += len(plaintext)
                    yield plaintext
                    counter += 1
                    continue
                plaintext = self._try_open(data, counter, last=True)  # a full final chunk
            else:
                plaintext = self._try_open(data, counter, last=True)
                if plaintext is None and self._try_open(data, counter, last=False) is not None:
                    raise TruncatedPayload("truncated payload: chunk %d is short but not the final chunk" % counter)
            if plaintext is None:
                raise AgePayloadError("bad payload: chunk %d fails authentication" % counter)
            if not plaintext and counter > 0:
                raise AgePayloadError("bad payload: empty final chunk after chunk %d" % (counter - 1))
            self.plaintext_bytes += len(plaintext)
            yield plaintext
            if _read_exactly(self._in, 1):
                raise AgePayloadError("bad payload: data follows the final chunk")
            return

    def _try_open(self, data: bytes, counter: int, last: bool) -> Optional[bytes]:
        try:
            return self._aead.decrypt(_chunk_nonce(counter, last), data, None)
        except InvalidTag:
            return None

    def copy_to(self, sink: BinaryIO) -> int:
        for chunk in self.chunks():
            sink.write(chunk)
        return self.plaintext_bytes


def _read_exactly(stream: BinaryIO, size: int) -> bytes:
    parts, remaining = [], size
    while remaining:
        data = stream.read(remaining)
        if not data:
            break
        parts.append(data)
        remaining -= len(data)
    return b"".join(parts)


# --------------------------------------------------------------------------- key files
def parse_recipient(text: str) -> Recipient:
    text = text.strip()
    if text.lower().startswith("age1pq1"):
        return MlKem768X25519Recipient.parse(text)
    if text.startswith("age1"):
        return X25519Recipient.parse(text)
    if text.startswith("ssh-"):
        return SshEd25519Recipient.parse(text)
    raise KeyFormatError("not a recipient: expected age1... or ssh-ed25519 ... (got %r)" % text[:16])


def parse_recipients_file(content: str, name: str = "recipients file") -> List[Recipient]:
    recipients = []
    for number, line in enumerate(content.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            recipients.append(parse_recipient(line))
        except KeyFormatError as error:
            raise KeyFormatError("%s line %d: %s" % (name, number, error.message)) from None
    if not recipients:
        raise KeyFormatError("%s holds no recipient" % name)
    return recipients


def parse_identity_file(content: bytes, name: str = "identity file", ssh_passphrase=None) -> List[Identity]:
    """age identity files (comments, several keys) or an OpenSSH ed25519 private key."""
    from toolkit.crypto.sshkeys import load_ssh_private_key

    if content.lstrip().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----"):
        private = load_ssh_private_key(content, ssh_passphrase, name)
        if private.kind != "ssh-ed25519":
            raise KeyFormatError("%s: only ssh-ed25519 keys can decrypt age files here" % name)
        return [SshEd25519Identity(private.seed, private.public)]
    identities: List[Identity] = []
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError:
        raise KeyFormatError("%s is not a text identity file" % name) from None
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            identities.append(MlKem768X25519Identity.parse(line) if line.upper().startswith("AGE-SECRET-KEY-PQ-")
                              else X25519Identity.parse(line))
        except KeyFormatError as error:
            raise KeyFormatError("%s line %d: %s" % (name, number, error.message)) from None
    if not identities:
        raise KeyFormatError("%s holds no identity" % name)
    return identities


def identity_file_text(identity, created: str) -> str:
    """An identity file as age-keygen writes it (X25519Identity or MlKem768X25519Identity)."""
    return "# created: %s\n# public key: %s\n%s\n" % (created, identity.recipient(), identity)


def recipients_of(identities: Iterable[Identity]) -> List[str]:
    out = []
    for identity in identities:
        if isinstance(identity, (X25519Identity, MlKem768X25519Identity)):
            out.append(str(identity.recipient()))
        elif isinstance(identity, SshEd25519Identity):
            out.append(identity.public.openssh())
    return out
