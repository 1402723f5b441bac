"""Post-quantum age (issue 21): mlkem768x25519 recipients (age1pq1...) and identities (AGE-SECRET-KEY-PQ-1...),
judged by the real age 1.3 (Debian sid's package, tests/world/age13.py) both ways, armored and binary, with
several recipients; the spec's MUSTs on the stanza; no mixing with classical recipients; capture and a baked-in
PQ recipient; and a clear refusal on the target whose cryptography has no ML-KEM (CPython 3.8)."""
from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import build_pyz, interpreter
from tests.world import age13
from tests.world.roots import SID, RootUnavailable, debian_roots
from toolkit.crypto import age
from toolkit.crypto.errors import AgeHeaderError, NoMatchingIdentity

assert debian_roots  # a fixture, used by name below
ROOT = Path(__file__).resolve().parent.parent
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/nonexistent"}


@pytest.fixture(scope="module")
def reference(debian_roots):
    try:
        return age13.ensure(debian_roots.get(SID).path)
    except (RootUnavailable, age13.AgeUnavailable) as error:
        pytest.fail(str(error), pytrace=False)


def kit(pyz, *args, python=None, stdin=None):
    return subprocess.run([python or interpreter("3.11"), "-I", str(pyz), *args], capture_output=True, env=ENV,
                          timeout=300, input=stdin)


def public_of(key_file: Path) -> str:
    return [line.split(": ")[1] for line in key_file.read_text().splitlines() if "public key" in line][0]


@pytest.mark.parametrize("armored", [False, True], ids=["binary", "armored"])
def test_both_ways_with_the_real_age(pyz, reference, tmp_path, armored):
    plain = os.urandom(200000)
    (tmp_path / "plain").write_bytes(plain)
    ours_key, theirs_key = tmp_path / "ours.key", tmp_path / "theirs.key"
    made = kit(pyz, "--json", "keygen", "--pq", "-o", str(ours_key))
    assert made.returncode == 0, made.stderr
    ours = json.loads(made.stdout)["recipient"]
    assert ours.startswith("age1pq1") and ours_key.read_text().count("AGE-SECRET-KEY-PQ-1") == 1
    # their age-keygen -y agrees on our key's recipient; ours on theirs
    assert subprocess.run([reference.keygen, "-y", str(ours_key)], capture_output=True, text=True).stdout.strip() \
        == ours
    subprocess.run([reference.keygen, "-pq", "-o", str(theirs_key)], check=True, capture_output=True)
    theirs = public_of(theirs_key)
    assert kit(pyz, "keygen", "-y", str(theirs_key)).stdout.decode().strip() == theirs
    flag = ["-a"] if armored else []

    # their encrypt (to both keys) -> our decrypt with ours; our encrypt (to both) -> their decrypt with theirs
    subprocess.run([reference.age, *flag, "-r", ours, "-r", theirs, "-o", str(tmp_path / "theirs.age"),
                    str(tmp_path / "plain")], check=True)
    done = kit(pyz, "decrypt", "-i", str(ours_key), "-o", str(tmp_path / "a"), str(tmp_path / "theirs.age"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "a").read_bytes() == plain
    done = kit(pyz, "encrypt", *flag, "-r", theirs, "-r", ours, "-o", str(tmp_path / "ours.age"),
               str(tmp_path / "plain"))
    assert done.returncode == 0, done.stderr
    header = (tmp_path / "ours.age").read_bytes()[:200]
    assert (b"-----BEGIN AGE ENCRYPTED FILE-----" in header) == armored
    for key in (theirs_key, ours_key):
        opened = subprocess.run([reference.age, "-d", "-i", str(key), str(tmp_path / "ours.age")], capture_output=True)
        assert opened.returncode == 0 and opened.stdout == plain, opened.stderr
    if not armored:
        stanzas = age.parse_header(io.BytesIO((tmp_path / "ours.age").read_bytes())).stanzas
        assert [s.type for s in stanzas] == [b"mlkem768x25519"] * 2 and all(len(s.body) == 32 for s in stanzas)


def test_no_mixing_with_classical_recipients(pyz, reference, tmp_path):
    subprocess.run([reference.keygen, "-pq", "-o", str(tmp_path / "pq.key")], check=True, capture_output=True)
    subprocess.run([reference.keygen, "-o", str(tmp_path / "x.key")], check=True, capture_output=True)
    (tmp_path / "plain").write_bytes(b"evidence")
    done = kit(pyz, "encrypt", "-r", public_of(tmp_path / "pq.key"), "-r", public_of(tmp_path / "x.key"),
               "-o", str(tmp_path / "mixed.age"), str(tmp_path / "plain"))
    assert done.returncode == 3 and b"cannot be mixed" in done.stderr and len(done.stderr.splitlines()) == 1
    assert not list(tmp_path.glob("mixed.age*"))
    # as the reference refuses it
    theirs = subprocess.run([reference.age, "-r", public_of(tmp_path / "pq.key"), "-r", public_of(tmp_path / "x.key"),
                             str(tmp_path / "plain")], capture_output=True)
    assert theirs.returncode != 0
    refused = subprocess.run([sys.executable, str(ROOT / "build.py"), "--targets", "host", "--recipient",
                              public_of(tmp_path / "pq.key"), "--recipient", public_of(tmp_path / "x.key"), "-o",
                              str(tmp_path / "mixed.pyz")], capture_output=True, text=True)
    assert refused.returncode == 2 and "cannot be mixed" in refused.stderr and not (tmp_path / "mixed.pyz").exists()


def _stanza(identity: age.MlKem768X25519Identity, file_key: bytes) -> age.Stanza:
    return identity.recipient().wrap(file_key)


def _file(stanzas, file_key: bytes) -> bytes:
    return age.encode_header(stanzas, file_key) + bytes(16)


def test_the_stanza_musts(tmp_path):
    """The spec's MUSTs, each a header failure of its own; a stanza for another key is "not for me"."""
    identity, other = age.MlKem768X25519Identity.generate(), age.MlKem768X25519Identity.generate()
    key = os.urandom(16)
    good = _stanza(identity, key)
    assert identity.unwrap([good]) == key and other.unwrap([good]) is None
    enc = base64.b64decode(good.args[0] + b"=" * (-len(good.args[0]) % 4))
    cases = {
        "low-order share": age.Stanza(good.type, [age.b64encode_raw(enc[:-32] + bytes(32))], good.body),
        "extra argument": age.Stanza(good.type, good.args + [b"x"], good.body),
        "short enc": age.Stanza(good.type, [age.b64encode_raw(enc[:-1])], good.body),
        "long body": age.Stanza(good.type, good.args, good.body + b"\0"),
        "non-canonical enc": age.Stanza(good.type, [good.args[0][:-1] + bytes([good.args[0][-1] ^ 1])], good.body),
    }
    for name, stanza in cases.items():
        with pytest.raises(AgeHeaderError):
            identity.unwrap([stanza])
            pytest.fail(name)
    # a classical identity ignores the stanza: no matching identity, not a header failure
    with pytest.raises(NoMatchingIdentity):
        age.Decryptor(io.BytesIO(_file([good], key)), [age.X25519Identity.generate()])


def test_capture_to_a_baked_in_pq_recipient(reference, tmp_path):
    subprocess.run([reference.keygen, "-pq", "-o", str(tmp_path / "team.key")], check=True, capture_output=True)
    recipient = public_of(tmp_path / "team.key")
    built = build_pyz(tmp_path / "team.pyz", "--targets", "host", "--recipient", recipient)
    assert json.loads(kit(built, "version", "--json", python=sys.executable).stdout)["recipients"] == [recipient]
    out = tmp_path / "out"
    out.mkdir()
    done = kit(built, "--json", "capture", "--out", str(out), "--only", "system", "--allow-same-disk",
               python=sys.executable)
    assert done.returncode == 0, done.stderr
    payload = json.loads(done.stdout)["payload"]
    stanzas = age.parse_header(open(payload, "rb")).stanzas
    assert [s.type for s in stanzas] == [b"mlkem768x25519"]
    tar = subprocess.run([reference.age, "-d", "-i", str(tmp_path / "team.key"), payload], capture_output=True)
    assert tar.returncode == 0
    listed = subprocess.run(["tar", "--zstd", "-t"], input=tar.stdout, capture_output=True, check=True).stdout
    assert b"manifest.json" in listed
    verified = kit(built, "verify", payload, "-i", str(tmp_path / "team.key"), python=sys.executable)
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_the_target_without_ml_kem_refuses_clearly(pyz, tmp_path):
    """CPython 3.8's cryptography (46) has no ML-KEM: PQ is refused in one line (exit 4), nothing written, never a
    classical recipient instead; a key file holding a PQ key still opens classical files there."""
    python38 = interpreter("3.8")
    pq = age.MlKem768X25519Identity.generate()
    classical = age.X25519Identity.generate()
    (tmp_path / "keys").write_text("%s\n%s\n" % (pq, classical))
    (tmp_path / "plain").write_bytes(b"evidence")
    for args in (["keygen", "--pq", "-o", str(tmp_path / "new.key")],
                 ["encrypt", "-r", str(pq.recipient()), "-o", str(tmp_path / "x.age"), str(tmp_path / "plain")]):
        done = kit(pyz, *args, python=python38)
        assert done.returncode == 4 and b"Python 3.9 or newer" in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "new.key").exists() and not list(tmp_path.glob("x.age*"))
    blob = io.BytesIO()
    encryptor = age.Encryptor(blob, [classical.recipient()])
    encryptor.write(b"classical")
    encryptor.close()
    (tmp_path / "c.age").write_bytes(blob.getvalue())
    done = kit(pyz, "decrypt", "-i", str(tmp_path / "keys"), str(tmp_path / "c.age"), python=python38)
    assert done.returncode == 0 and done.stdout == b"classical", done.stderr
