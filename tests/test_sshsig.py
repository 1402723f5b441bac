"""SSHSIG: our signatures verify with `ssh-keygen -Y verify`, theirs with ours; allowed_signers rules."""
from __future__ import annotations

import io
import subprocess

import pytest

from toolkit.crypto import sshsig
from toolkit.crypto.errors import KeyFormatError, SignatureError
from toolkit.crypto.sshkeys import PassphraseNeeded, load_ssh_private_key

NAMESPACE = "bookgen-kit"


def keygen(directory, kind, passphrase=""):
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp(dir=directory)) / ("id_" + kind)
    extra = ["-b", "2048"] if kind == "rsa" else []
    subprocess.run(["ssh-keygen", "-q", "-t", kind, *extra, "-N", passphrase, "-f", str(path)], check=True)
    return path


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    directory = tmp_path_factory.mktemp("sshsig")
    message = directory / "manifest.json"
    message.write_bytes(b'{"evidence": "bundle", "sha256": "00"}\n' * 100)
    return directory, message


def their_sign(key, message, namespace=NAMESPACE):
    signature = message.with_suffix(".theirs.sig")
    signature.unlink(missing_ok=True)
    done = subprocess.run(["ssh-keygen", "-q", "-Y", "sign", "-f", str(key), "-n", namespace],
                          input=message.read_bytes(), capture_output=True, check=True)
    signature.write_bytes(done.stdout)
    return signature.read_text()


def their_verify(allowed, identity, signature_text, message, namespace=NAMESPACE):
    sig = message.with_suffix(".ours.sig")
    sig.write_text(signature_text)
    return subprocess.run(["ssh-keygen", "-Y", "verify", "-f", str(allowed), "-I", identity, "-n", namespace,
                           "-s", str(sig)], input=message.read_bytes(), capture_output=True)


@pytest.mark.parametrize("kind", ["ed25519", "rsa", "ecdsa"])
def test_both_directions(material, kind):
    directory, message = material
    key = keygen(directory, kind)
    allowed = directory / ("allowed_" + kind)
    allowed.write_text("responder@example.org %s\n" % (key.with_suffix(".pub").read_text().strip()))
    # theirs -> ours
    verified = sshsig.verify(their_sign(key, message), io.BytesIO(message.read_bytes()), allowed.read_text(),
                             "responder@example.org")
    assert verified.principal == "responder@example.org"
    # ours -> theirs
    private = load_ssh_private_key(key.read_bytes(), None)
    ours = sshsig.sign(private, io.BytesIO(message.read_bytes()))
    done = their_verify(allowed, "responder@example.org", ours, message)
    assert done.returncode == 0, done.stderr
    assert b"Good \"bookgen-kit\" signature" in done.stdout + done.stderr


def test_encrypted_key_needs_its_passphrase(material):
    directory, message = material
    key = keygen(directory, "ed25519", passphrase="s3cret-phrase")
    with pytest.raises(PassphraseNeeded):
        load_ssh_private_key(key.read_bytes(), None)
    with pytest.raises(KeyFormatError, match="wrong passphrase"):
        load_ssh_private_key(key.read_bytes(), b"wrong")
    private = load_ssh_private_key(key.read_bytes(), b"s3cret-phrase")
    allowed = directory / "allowed_enc"
    allowed.write_text("a@b %s\n" % key.with_suffix(".pub").read_text().strip())
    assert their_verify(allowed, "a@b", sshsig.sign(private, io.BytesIO(message.read_bytes())), message).returncode == 0


def test_tampered_message_and_signature_fail(material):
    directory, message = material
    key = keygen(directory, "ed25519")
    allowed = "x@y %s\n" % key.with_suffix(".pub").read_text().strip()
    signature = sshsig.sign(load_ssh_private_key(key.read_bytes(), None), io.BytesIO(message.read_bytes()))
    with pytest.raises(SignatureError, match="does not verify"):
        sshsig.verify(signature, io.BytesIO(message.read_bytes() + b"x"), allowed, "x@y")
    lines = signature.splitlines()
    body = list(lines[3])
    body[10] = "A" if body[10] != "A" else "B"
    lines[3] = "".join(body)
    with pytest.raises(SignatureError):
        sshsig.verify("\n".join(lines) + "\n", io.BytesIO(message.read_bytes()), allowed, "x@y")


def test_allowed_signers_rules(material):
    directory, message = material
    key = keygen(directory, "ed25519")
    public = key.with_suffix(".pub").read_text().strip()
    signature = sshsig.sign(load_ssh_private_key(key.read_bytes(), None), io.BytesIO(message.read_bytes()))

    def check(allowed, identity="ops@example.org", namespace=NAMESPACE):
        return sshsig.verify(signature, io.BytesIO(message.read_bytes()), allowed, identity, namespace)

    assert check("# comment\n\n*@example.org %s\n" % public).allowed_signers_line == 3
    assert check('ops@example.org namespaces="bookgen-kit,file" %s\n' % public)
    with pytest.raises(SignatureError, match="not allowed"):
        check('ops@example.org namespaces="git" %s\n' % public)
    with pytest.raises(SignatureError, match="not allowed"):
        check("*@example.org,!ops@example.org %s\n" % public)
    with pytest.raises(SignatureError, match="not allowed"):
        check("ops@example.org valid-before=20000101 %s\n" % public)
    with pytest.raises(SignatureError, match="not allowed"):
        check("someone@else %s\n" % public)
    with pytest.raises(SignatureError, match="namespace"):
        check("ops@example.org %s\n" % public, namespace="other")
    # the same rules hold for ssh-keygen, the judge
    allowed = directory / "allowed_rules"
    allowed.write_text('ops@example.org namespaces="git" %s\n' % public)
    assert their_verify(allowed, "ops@example.org", signature, message).returncode != 0


def test_malformed_signature_text():
    with pytest.raises(SignatureError, match="not an armored SSH signature"):
        sshsig.verify("hello", io.BytesIO(b""), "", "x")
