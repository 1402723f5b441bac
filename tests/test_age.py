"""age v1: interop with the real age CLI both ways, and every MUST of the spec as its own test."""
from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import run_with_tty
from toolkit.crypto import age, armor
from toolkit.crypto.errors import (
    AgeArmorError,
    AgeHeaderError,
    AgeMacError,
    AgePayloadError,
    KeyFormatError,
    NoMatchingIdentity,
    TruncatedPayload,
)

SIZES = [0, 1, 65535, 65536, 65537, 3 * 65536, 5 * 1024 * 1024]
AGE = "/usr/bin/age"
AGE_KEYGEN = "/usr/bin/age-keygen"


def payload(size: int) -> bytes:
    return os.urandom(size)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """An age identity made by age-keygen, and an OpenSSH ed25519 key made by ssh-keygen."""
    directory = tmp_path_factory.mktemp("keys")
    identity = directory / "age.key"
    subprocess.run([AGE_KEYGEN, "-o", str(identity)], check=True, capture_output=True)
    recipient = subprocess.run([AGE_KEYGEN, "-y", str(identity)], check=True, capture_output=True,
                               text=True).stdout.strip()
    ssh_key = directory / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(ssh_key)], check=True)
    return {"identity": identity, "recipient": recipient, "ssh_key": ssh_key,
            "ssh_pub": (directory / "id_ed25519.pub").read_text().strip(), "dir": directory}


def ours_encrypt(data: bytes, recipients, armored=False) -> bytes:
    sink = io.BytesIO()
    encryptor = age.Encryptor(sink, recipients, armored)
    for start in range(0, len(data), 100_000):  # writes that straddle chunk boundaries
        encryptor.write(data[start:start + 100_000])
    encryptor.close()
    return sink.getvalue()


def ours_decrypt(blob: bytes, identities) -> bytes:
    out = io.BytesIO()
    age.Decryptor(io.BytesIO(blob), identities).copy_to(out)
    return out.getvalue()


def their_decrypt(blob: bytes, *args: str) -> bytes:
    done = subprocess.run([AGE, "-d", *args], input=blob, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def their_encrypt(data: bytes, *args: str) -> bytes:
    done = subprocess.run([AGE, *args], input=data, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


# --------------------------------------------------------------------------- interop
@pytest.mark.parametrize("armored", [False, True], ids=["binary", "armored"])
@pytest.mark.parametrize("size", SIZES)
def test_x25519_ours_to_age(keys, size, armored):
    data = payload(size)
    blob = ours_encrypt(data, [age.parse_recipient(keys["recipient"])], armored)
    assert blob.startswith(b"-----BEGIN AGE ENCRYPTED FILE-----\n" if armored else b"age-encryption.org/v1\n")
    assert their_decrypt(blob, "-i", str(keys["identity"])) == data


@pytest.mark.parametrize("armored", [False, True], ids=["binary", "armored"])
@pytest.mark.parametrize("size", SIZES)
def test_x25519_age_to_ours(keys, size, armored):
    data = payload(size)
    blob = their_encrypt(data, "-r", keys["recipient"], *(["-a"] if armored else []))
    identities = age.parse_identity_file(keys["identity"].read_bytes())
    assert ours_decrypt(blob, identities) == data


@pytest.mark.parametrize("size", SIZES)
def test_ssh_ed25519_both_ways(keys, size):
    data = payload(size)
    blob = ours_encrypt(data, [age.parse_recipient(keys["ssh_pub"])])
    assert b"\n-> ssh-ed25519 " in blob
    assert their_decrypt(blob, "-i", str(keys["ssh_key"])) == data
    theirs = their_encrypt(data, "-R", str(keys["ssh_key"]) + ".pub")
    assert ours_decrypt(theirs, age.parse_identity_file(keys["ssh_key"].read_bytes())) == data


@pytest.mark.parametrize("armored", [False, True], ids=["binary", "armored"])
@pytest.mark.parametrize("size", [0, 65536, 65537])
def test_scrypt_both_ways_through_a_terminal(tmp_path, size, armored):
    data = payload(size)
    passphrase = "correct horse battery staple"
    source = tmp_path / "plain"
    source.write_bytes(data)
    # age asks for passphrases on /dev/tty only: drive it through a pty.
    theirs = tmp_path / "theirs.age"
    code, output = run_with_tty([AGE, "-p", *(["-a"] if armored else []), "-o", str(theirs), str(source)],
                                [("Enter passphrase", passphrase), ("Confirm passphrase", passphrase)])
    assert code == 0, output
    assert ours_decrypt(theirs.read_bytes(), [age.ScryptIdentity(passphrase.encode())]) == data
    ours = tmp_path / "ours.age"
    ours.write_bytes(ours_encrypt(data, [age.ScryptRecipient(passphrase.encode())], armored))
    back = tmp_path / "back"
    code, output = run_with_tty([AGE, "-d", "-o", str(back), str(ours)], [("Enter passphrase", passphrase)])
    assert code == 0, output
    # age opens its output lazily: an empty plaintext leaves no file.
    assert (back.read_bytes() if back.exists() or size else b"") == data


def test_several_recipients_each_can_decrypt(keys, tmp_path):
    second = tmp_path / "second.key"
    subprocess.run([AGE_KEYGEN, "-o", str(second)], check=True, capture_output=True)
    second_recipient = subprocess.run([AGE_KEYGEN, "-y", str(second)], capture_output=True, text=True).stdout.strip()
    data = payload(70000)
    blob = ours_encrypt(data, [age.parse_recipient(r) for r in (keys["recipient"], second_recipient, keys["ssh_pub"])])
    for key in (keys["identity"], second, keys["ssh_key"]):
        assert their_decrypt(blob, "-i", str(key)) == data
    theirs = their_encrypt(data, "-r", keys["recipient"], "-r", second_recipient, "-R", str(keys["ssh_key"]) + ".pub")
    for key in (second, keys["ssh_key"]):
        assert ours_decrypt(theirs, age.parse_identity_file(key.read_bytes())) == data


def test_keys_roundtrip_with_age_keygen(keys, tmp_path):
    ours = age.X25519Identity.generate()
    path = tmp_path / "ours.key"
    path.write_text(age.identity_file_text(ours, "2026-01-01T00:00:00Z"))
    from_age = subprocess.run([AGE_KEYGEN, "-y", str(path)], capture_output=True, text=True, check=True).stdout.strip()
    assert from_age == str(ours.recipient())
    theirs = age.parse_identity_file(keys["identity"].read_bytes())[0]
    assert str(theirs.recipient()) == keys["recipient"]
    assert str(theirs) == [line for line in keys["identity"].read_text().splitlines() if line.startswith("AGE-")][0]
    lower = str(theirs).lower()
    assert str(age.X25519Identity.parse(lower)) == str(theirs)  # one case throughout is fine either way


def test_identity_file_with_comments_and_several_keys(keys):
    other = age.X25519Identity.generate()
    content = b"# team keys\n\n" + keys["identity"].read_bytes() + b"\n# second\n" + str(other).encode() + b"\n"
    identities = age.parse_identity_file(content)
    assert len(identities) == 2
    blob = ours_encrypt(b"x", [other.recipient()])
    assert ours_decrypt(blob, identities) == b"x"


def test_mixed_case_and_bad_checksum_keys_are_refused(keys):
    recipient = keys["recipient"]
    with pytest.raises(KeyFormatError):
        age.parse_recipient(recipient[:10] + recipient[10:].upper())
    with pytest.raises(KeyFormatError):
        age.parse_recipient(recipient[:-1] + ("q" if recipient[-1] != "q" else "p"))
    with pytest.raises(KeyFormatError):
        age.parse_identity_file(b"AGE-SECRET-KEY-1NOTAKEY\n")


# --------------------------------------------------------------------------- strict parsing
@pytest.fixture
def victim():
    identity = age.X25519Identity.generate()
    return identity


def craft(stanzas, file_key, chunks, nonce=None):
    """A file assembled by hand: header from stanzas, then the given (plaintext, last) chunks."""
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    nonce = nonce or os.urandom(16)
    aead = ChaCha20Poly1305(age.hkdf(file_key, nonce, b"payload"))
    body = b"".join(aead.encrypt(age._chunk_nonce(i, last), data, None) for i, (data, last) in enumerate(chunks))
    return age.encode_header(stanzas, file_key) + nonce + body


def stanza_for(identity, file_key):
    return identity.recipient().wrap(file_key)


def expect(error_class, blob, identities, match=None):
    with pytest.raises(error_class, match=match):
        ours_decrypt(blob, identities)


def test_crafted_file_is_valid_baseline(victim):
    key = os.urandom(16)
    blob = craft([stanza_for(victim, key)], key, [(b"a" * 65536, False), (b"b", True)])
    assert ours_decrypt(blob, [victim]) == b"a" * 65536 + b"b"


def test_non_canonical_base64_argument(victim):
    key = os.urandom(16)
    stanza = stanza_for(victim, key)
    share = stanza.args[0]
    last = share[-1:]
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    stanza.args[0] = share[:-1] + alphabet[alphabet.index(last) ^ 1:alphabet.index(last) ^ 1 + 1]  # unused bits set
    expect(AgeHeaderError, craft([stanza], key, [(b"x", True)]), [victim], "non-canonical")


def test_padded_base64_body(victim):
    key = os.urandom(16)
    header = craft([stanza_for(victim, key)], key, [(b"x", True)])
    lines = header.split(b"\n")
    lines[2] = lines[2] + b"="
    expect(AgeHeaderError, b"\n".join(lines), [victim])


def test_wrong_stanza_argument_count(victim):
    key = os.urandom(16)
    stanza = stanza_for(victim, key)
    stanza.args.append(b"extra")
    expect(AgeHeaderError, craft([stanza], key, [(b"x", True)]), [victim], "arguments")


def test_bad_body_length(victim):
    key = os.urandom(16)
    stanza = stanza_for(victim, key)
    stanza.body = stanza.body[:31]
    expect(AgeHeaderError, craft([stanza], key, [(b"x", True)]), [victim], "not 32")


def test_zero_x25519_shared_secret(victim):
    key = os.urandom(16)
    stanza = age.Stanza(b"X25519", [age.b64encode_raw(bytes(32))], os.urandom(32))  # a low-order point
    expect(AgeHeaderError, craft([stanza], key, [(b"x", True)]), [victim], "all zero")


def test_header_mac_mismatch(victim):
    key = os.urandom(16)
    blob = bytearray(craft([stanza_for(victim, key)], key, [(b"x", True)]))
    mac_at = blob.index(b"\n--- ") + 5
    blob[mac_at] = ord("A") if blob[mac_at] != ord("A") else ord("B")
    expect(AgeMacError, bytes(blob), [victim], "bad MAC")


def test_altered_stanza_is_caught_by_the_mac(victim):
    key = os.urandom(16)
    other = age.X25519Identity.generate()
    good = craft([stanza_for(victim, key)], key, [(b"x", True)])
    header_end = good.index(b"\n--- ")
    extra = stanza_for(other, key).encode()
    forged = good[:header_end + 1] + extra + good[header_end + 1:]  # a stanza slipped in, MAC unchanged
    expect(AgeMacError, forged, [victim])


def test_missing_final_chunk(victim):
    key = os.urandom(16)
    blob = craft([stanza_for(victim, key)], key, [(b"a" * 65536, False), (b"b" * 65536, False)])
    expect(TruncatedPayload, blob, [victim], "before the final chunk")


def test_empty_final_chunk_after_data(victim):
    key = os.urandom(16)
    blob = craft([stanza_for(victim, key)], key, [(b"a" * 65536, False), (b"", True)])
    expect(AgePayloadError, blob, [victim], "empty final chunk")


def test_empty_payload_is_one_empty_final_chunk(victim):
    key = os.urandom(16)
    assert ours_decrypt(craft([stanza_for(victim, key)], key, [(b"", True)]), [victim]) == b""


def test_trailing_data_after_final_chunk(victim):
    key = os.urandom(16)
    blob = craft([stanza_for(victim, key)], key, [(b"a" * 65536, True)]) + b"garbage"
    expect(AgePayloadError, blob, [victim], "data follows the final chunk")
    short = craft([stanza_for(victim, key)], key, [(b"a" * 10, True)]) + os.urandom(65536 + 16 - 26)
    with pytest.raises(AgePayloadError):
        ours_decrypt(short, [victim])


def test_truncated_inside_the_header(victim):
    key = os.urandom(16)
    blob = craft([stanza_for(victim, key)], key, [(b"x", True)])
    expect(AgeHeaderError, blob[:30], [victim], "ends inside the header")


def header_length(blob: bytes) -> int:
    return blob.index(b"\n--- ") + 5 + 43 + 1


@pytest.mark.parametrize("nonce_bytes", [0, 7, 15], ids=["no-nonce", "7-byte-nonce", "15-byte-nonce"])
def test_missing_or_short_nonce_is_a_header_failure(victim, nonce_bytes):
    """CCTV stream_no_nonce / stream_short_nonce: a header failure (exit 3), not a payload one."""
    key = os.urandom(16)
    blob = craft([stanza_for(victim, key)], key, [(b"x", True)])
    cut = blob[:header_length(blob) + nonce_bytes]
    with pytest.raises(AgeHeaderError, match="nonce") as caught:
        ours_decrypt(cut, [victim])
    assert not isinstance(caught.value, (AgePayloadError, TruncatedPayload))
    assert caught.value.exit_code == 3


def released_then_error(blob, identities):
    """The plaintext chunks() hands out before it raises, and the error it raises."""
    released = []
    with pytest.raises((AgePayloadError, TruncatedPayload)) as caught:
        for chunk in age.Decryptor(io.BytesIO(blob), identities).chunks():
            released.append(chunk)
    return b"".join(released), caught.value


def test_authenticated_chunks_are_released_before_a_truncation(victim):
    """CCTV stream_no_final_full: a full chunk that authenticates as non-final is released, then EOF fails."""
    key = os.urandom(16)
    first, second = os.urandom(65536), os.urandom(65536)
    blob = craft([stanza_for(victim, key)], key, [(first, False), (second, False)])
    released, error = released_then_error(blob[:header_length(blob) + 16 + 65536 + 16], [victim])
    assert released == first and isinstance(error, TruncatedPayload)
    released, error = released_then_error(blob, [victim])
    assert released == first + second and isinstance(error, TruncatedPayload)


@pytest.mark.parametrize("trailing", [b"g", os.urandom(100), None], ids=["short", "long", "second-final-chunk"])
def test_final_chunk_is_released_before_trailing_data_fails(victim, trailing):
    """CCTV stream_trailing_garbage_* / stream_two_final_chunks: the final chunk's plaintext is released."""
    key = os.urandom(16)
    final = os.urandom(65536)
    if trailing is None:
        blob = craft([stanza_for(victim, key)], key, [(final, True), (b"again", True)])
    else:
        blob = craft([stanza_for(victim, key)], key, [(final, True)]) + trailing
    released, error = released_then_error(blob, [victim])
    assert released == final
    assert isinstance(error, AgePayloadError) and "data follows the final chunk" in error.message


def test_truncated_inside_a_chunk(victim):
    key = os.urandom(16)
    blob = craft([stanza_for(victim, key)], key, [(b"a" * 65536, False), (b"b" * 100, True)])
    with pytest.raises((AgePayloadError, TruncatedPayload)):
        ours_decrypt(blob[:-50], [victim])


def test_flipped_payload_byte(victim):
    key = os.urandom(16)
    blob = bytearray(craft([stanza_for(victim, key)], key, [(b"a" * 65536, False), (b"b" * 100, True)]))
    blob[-200] ^= 1
    expect(AgePayloadError, bytes(blob), [victim], "fails authentication")


def test_scrypt_stanza_beside_another(victim):
    key = os.urandom(16)
    scrypt = age.ScryptRecipient(b"pw", work_factor=10).wrap(key)
    blob = craft([stanza_for(victim, key), scrypt], key, [(b"x", True)])
    expect(AgeHeaderError, blob, [victim], "only stanza")
    with pytest.raises(KeyFormatError):
        age.Encryptor(io.BytesIO(), [victim.recipient(), age.ScryptRecipient(b"pw")])


@pytest.mark.parametrize("work_factor,message", [(b"018", "leading zeros"), (b"30", "exceeds the limit"),
                                                 (b"x", "leading zeros")])
def test_scrypt_work_factor_rules(work_factor, message):
    key = os.urandom(16)
    stanza = age.ScryptRecipient(b"pw", work_factor=10).wrap(key)
    stanza.args[1] = work_factor
    expect(AgeHeaderError, craft([stanza], key, [(b"x", True)]), [age.ScryptIdentity(b"pw")], message)


def test_wrong_passphrase_and_wrong_key(victim):
    key = os.urandom(16)
    blob = craft([age.ScryptRecipient(b"right", work_factor=10).wrap(key)], key, [(b"x", True)])
    expect(NoMatchingIdentity, blob, [age.ScryptIdentity(b"wrong")], "wrong passphrase")
    blob = craft([stanza_for(victim, key)], key, [(b"x", True)])
    expect(NoMatchingIdentity, blob, [age.X25519Identity.generate()], "no matching identity")


def test_body_line_longer_than_64_columns(victim):
    key = os.urandom(16)
    stanza = stanza_for(victim, key)
    stanza.body = os.urandom(64)  # 86 base64 chars: a full line then a short one
    text = craft([stanza], key, [(b"x", True)])
    lines = text.split(b"\n")
    joined = lines[2] + lines[3]
    broken = b"\n".join(lines[:2] + [joined] + lines[4:])
    expect(AgeHeaderError, broken, [victim], "longer than 64")


def test_unknown_version_and_not_age():
    expect(AgeHeaderError, b"age-encryption.org/v2\n-> X\n\n--- x\n", [], "unsupported version")
    expect(AgeHeaderError, b"hello world\n", [], "not an age file")


def test_stanza_with_empty_argument(victim):
    key = os.urandom(16)
    blob = craft([stanza_for(victim, key)], key, [(b"x", True)])
    broken = blob.replace(b"-> X25519 ", b"-> X25519  ", 1)
    expect(AgeHeaderError, broken, [victim], "malformed stanza arguments")


def test_unknown_stanzas_are_ignored(victim):
    key = os.urandom(16)
    unknown = age.Stanza(b"example.com/enigma", [b"arg"], os.urandom(40))
    blob = craft([unknown, stanza_for(victim, key)], key, [(b"ok", True)])
    assert ours_decrypt(blob, [victim]) == b"ok"


# --------------------------------------------------------------------------- armor
def armored_blob(victim, data=b"armored"):
    return ours_encrypt(data, [victim.recipient()], armored=True)


def test_armor_tolerates_surrounding_whitespace_and_crlf(victim):
    blob = armored_blob(victim)
    assert ours_decrypt(b"\n  \t\n" + blob + b"\n\n  ", [victim]) == b"armored"
    assert ours_decrypt(blob.replace(b"\n", b"\r\n"), [victim]) == b"armored"


def test_armor_without_final_newline_decrypts(victim):
    """CCTV armor_no_eol: the END line may be the file's last bytes (the age CLI accepts it)."""
    blob = armored_blob(victim)
    assert blob.endswith(armor.END + b"\n")
    assert ours_decrypt(blob[:-1], [victim]) == b"armored"
    crlf = blob.replace(b"\n", b"\r\n")
    assert ours_decrypt(crlf[:-2], [victim]) == b"armored"
    assert ours_decrypt(crlf[:-1], [victim]) == b"armored"  # CR but no LF: age accepts it too
    assert ours_decrypt(b"\n \n" + blob[:-1], [victim]) == b"armored"


def test_armor_still_needs_a_whole_end_line(victim):
    blob = armored_blob(victim)[:-1]
    for cut in (blob[:-1], blob[:-len(armor.END)], blob[:-len(armor.END) - 1], blob + b" ", blob + b"junk"):
        expect(AgeArmorError, cut, [victim], "ends before the END line")
    expect(AgeArmorError, blob + b"\njunk", [victim], "after the END")


@pytest.mark.parametrize("begin", [b"-----BEGIN age ENCRYPTED FILE-----", b"-----BEGIN AGE ENCRYPTED MESSAGE-----",
                                   b"----- BEGIN AGE ENCRYPTED FILE -----", armor.BEGIN + b"\r\r",
                                   armor.BEGIN + b" "])
def test_armor_with_a_wrong_begin_line_is_an_armor_failure(victim, begin):
    """CCTV armor_lowercase / armor_wrong_type / armor_whitespace_begin: armor errors, not header ones."""
    blob = armored_blob(victim)
    expect(AgeArmorError, begin + blob[len(armor.BEGIN):], [victim], "BEGIN")
    with pytest.raises(AgeArmorError):
        armor.ArmorReader(io.BytesIO(b"garbage\n" + blob))


def test_armor_errors_are_header_failures_for_the_exit_code(victim):
    with pytest.raises(AgeHeaderError) as caught:
        ours_decrypt(armored_blob(victim) + b"junk\n", [victim])
    assert isinstance(caught.value, AgeArmorError) and caught.value.exit_code == 3


def test_armor_rejects_data_after_the_end(victim):
    expect(AgeHeaderError, armored_blob(victim) + b"junk\n", [victim], "after the END")


def test_armor_rejects_bad_line_lengths(victim):
    blob = armored_blob(victim, os.urandom(200))
    lines = blob.split(b"\n")
    lines[1] = lines[1] + lines[2][:4]
    lines[2] = lines[2][4:]
    expect(AgeHeaderError, b"\n".join(lines), [victim], "columns")


def test_armor_rejects_non_canonical_padding(victim):
    for extra in range(3):  # the header's length varies; one of three sizes needs padding
        lines = armored_blob(victim, os.urandom(100 + extra)).split(b"\n")
        last = lines[-3]
        if last.endswith(b"="):
            break
    assert last.endswith(b"=")
    stripped = last.rstrip(b"=")
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    ch = stripped[-1:]
    tweaked = stripped[:-1] + alphabet[alphabet.index(ch) ^ 1:alphabet.index(ch) ^ 1 + 1] + last[len(stripped):]
    lines[-3] = tweaked
    expect(AgeHeaderError, b"\n".join(lines), [victim])


def test_armor_writer_wraps_at_64_columns(victim):
    blob = armored_blob(victim, os.urandom(1000))
    lines = blob.decode().splitlines()
    assert lines[0] == armor.BEGIN.decode() and lines[-1] == armor.END.decode()
    assert all(len(line) == 64 for line in lines[1:-2]) and 0 < len(lines[-2]) <= 64
    base64.b64decode("".join(lines[1:-1]), validate=True)


def test_encryptor_memory_is_bounded_by_chunks(victim):
    class CountingSink:
        def __init__(self):
            self.largest = 0

        def write(self, data):
            self.largest = max(self.largest, len(data))

    sink = CountingSink()
    encryptor = age.Encryptor(sink, [victim.recipient()])
    block = bytes(4 * 1024 * 1024)
    for _ in range(4):
        encryptor.write(block)
    encryptor.close()
    assert encryptor.plaintext_bytes == 16 * 1024 * 1024
    assert sink.largest <= age.ENCRYPTED_CHUNK_SIZE


def test_ssh_recipient_file_and_identity_from_path(keys, tmp_path):
    recipients = tmp_path / "recipients"
    recipients.write_text("# team\n%s\n%s\n" % (keys["recipient"], keys["ssh_pub"]))
    parsed = age.parse_recipients_file(recipients.read_text())
    assert [type(r).__name__ for r in parsed] == ["X25519Recipient", "SshEd25519Recipient"]
    with pytest.raises(KeyFormatError, match="line 2"):
        age.parse_recipients_file("# c\nnot-a-key\n")
    assert Path(keys["ssh_key"]).exists()


# --------------------------------------------------------------------------- through the CLI
ROOT = Path(__file__).resolve().parent.parent


def kit_decrypt(tmp_path, identity, blob: bytes):
    """`python -m toolkit decrypt -i KEY -o OUT IN` on blob: (exit code, stderr, output file)."""
    key_file = tmp_path / "victim.key"
    key_file.write_text(age.identity_file_text(identity, "2026-01-01T00:00:00Z"))
    source = tmp_path / "in.age"
    source.write_bytes(blob)
    out = tmp_path / "out"
    environment = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "toolkit", "decrypt", "-i", str(key_file), "-o", str(out),
                           str(source)], capture_output=True, text=True, env=environment, timeout=120)
    return done.returncode, done.stderr, out


@pytest.mark.parametrize("nonce_bytes", [0, 15], ids=["no-nonce", "short-nonce"])
def test_cli_missing_or_short_nonce_exits_3(victim, tmp_path, nonce_bytes):
    key = os.urandom(16)
    blob = craft([stanza_for(victim, key)], key, [(b"x", True)])
    code, stderr, out = kit_decrypt(tmp_path, victim, blob[:header_length(blob) + nonce_bytes])
    assert code == 3, stderr
    assert "nonce" in stderr and not out.exists()


def test_cli_missing_final_chunk_still_exits_5(victim, tmp_path):
    key = os.urandom(16)
    blob = craft([stanza_for(victim, key)], key, [(b"a" * 65536, False)])
    code, stderr, out = kit_decrypt(tmp_path, victim, blob)
    assert code == 5, stderr
    assert not out.exists()


def test_cli_decrypts_armor_without_final_newline(victim, tmp_path):
    blob = armored_blob(victim, b"no final newline")[:-1]
    code, stderr, out = kit_decrypt(tmp_path, victim, blob)
    assert code == 0, stderr
    assert out.read_bytes() == b"no final newline"
