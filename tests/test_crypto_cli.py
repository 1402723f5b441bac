"""keygen, encrypt, decrypt, sign and verify-signature as a responder runs them (from the pyz)."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import interpreter

AGE = "/usr/bin/age"
PASSPHRASE = "bookgen kit test passphrase 7d1f"


@pytest.fixture
def kit(pyz):
    python = interpreter("3.11")

    def run(*args, stdin=None, cwd=None, env=None):
        environment = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"}
        environment.update(env or {})
        return subprocess.run([python, "-I", "-S", str(pyz), *args], input=stdin, capture_output=True,
                              cwd=cwd, env=environment, timeout=600)

    return run


def test_keygen_writes_0600_refuses_to_overwrite_and_prints_only_the_recipient(kit, tmp_path):
    identity = tmp_path / "team.key"
    done = kit("keygen", "-o", str(identity))
    assert done.returncode == 0, done.stderr
    recipient = done.stdout.decode().strip()
    assert recipient.startswith("age1")
    assert stat.S_IMODE(identity.stat().st_mode) == 0o600
    secret = [line for line in identity.read_text().splitlines() if line.startswith("AGE-SECRET-KEY-1")][0]
    assert secret.encode() not in done.stdout + done.stderr
    assert subprocess.run(["age-keygen", "-y", str(identity)], capture_output=True, text=True).stdout.strip() == recipient
    again = kit("keygen", "-o", str(identity))
    assert again.returncode == 3 and b"already exists" in again.stderr
    assert kit("keygen", "-y", str(identity)).stdout.decode().strip() == recipient
    assert kit("keygen").returncode == 2


def test_encrypt_decrypt_roundtrip_and_age_interop(kit, tmp_path):
    identity = tmp_path / "id.key"
    recipient = kit("keygen", "-o", str(identity)).stdout.decode().strip()
    plain = tmp_path / "evidence.bin"
    plain.write_bytes(os.urandom(300_000))
    sealed = tmp_path / "evidence.bin.age"
    done = kit("--json", "encrypt", "-r", recipient, "-o", str(sealed), str(plain))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["output_sha256"] == __import__("hashlib").sha256(sealed.read_bytes()).hexdigest()
    assert subprocess.run([AGE, "-d", "-i", str(identity), str(sealed)], capture_output=True).stdout == plain.read_bytes()
    back = tmp_path / "back.bin"
    assert kit("decrypt", "-i", str(identity), "-o", str(back), str(sealed)).returncode == 0
    assert back.read_bytes() == plain.read_bytes()
    assert stat.S_IMODE(back.stat().st_mode) == 0o600
    armored = kit("encrypt", "-a", "-r", recipient, str(plain))
    assert armored.stdout.startswith(b"-----BEGIN AGE ENCRYPTED FILE-----")
    assert kit("decrypt", "-i", str(identity), stdin=armored.stdout).stdout == plain.read_bytes()


def test_decrypt_failures_leave_no_output(kit, tmp_path):
    identity = tmp_path / "id.key"
    recipient = kit("keygen", "-o", str(identity)).stdout.decode().strip()
    other = tmp_path / "other.key"
    kit("keygen", "-o", str(other))
    plain = tmp_path / "p"
    plain.write_bytes(os.urandom(200_000))
    sealed = tmp_path / "p.age"
    kit("encrypt", "-r", recipient, "-o", str(sealed), str(plain))
    out = tmp_path / "out"

    wrong_key = kit("decrypt", "-i", str(other), "-o", str(out), str(sealed))
    assert wrong_key.returncode == 3 and b"no matching identity" in wrong_key.stderr

    tampered = tmp_path / "tampered.age"
    blob = bytearray(sealed.read_bytes())
    blob[-1000] ^= 0x40
    tampered.write_bytes(bytes(blob))
    bad = kit("decrypt", "-i", str(identity), "-o", str(out), str(tampered))
    assert bad.returncode == 5 and b"fails authentication" in bad.stderr

    truncated = tmp_path / "truncated.age"
    truncated.write_bytes(sealed.read_bytes()[: len(sealed.read_bytes()) - (len(sealed.read_bytes()) - 200) % 65552 - 1])
    cut = kit("decrypt", "-i", str(identity), "-o", str(out), str(truncated))
    assert cut.returncode == 5

    garbage = tmp_path / "garbage.age"
    garbage.write_bytes(b"not an age file at all\n")
    assert kit("decrypt", "-i", str(identity), "-o", str(out), str(garbage)).returncode == 3
    assert kit("decrypt", "-i", str(tmp_path / "missing.key"), str(sealed)).returncode == 3
    assert not out.exists() and not Path(str(out) + ".partial").exists()
    for done in (wrong_key, bad, cut):
        assert len(done.stderr.decode().strip().splitlines()) == 1  # one line, no traceback


def test_passphrase_file_roundtrip_with_age_and_no_secret_in_argv(kit, tmp_path):
    from tests.helpers import run_with_tty

    passfile = tmp_path / "pass"
    passfile.write_text(PASSPHRASE + "\n")
    plain = tmp_path / "p"
    plain.write_bytes(os.urandom(70_000))
    sealed = tmp_path / "p.age"

    seen = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            for pid in os.listdir("/proc"):
                if pid.isdigit():
                    try:
                        seen.append(Path("/proc", pid, "cmdline").read_bytes())
                    except OSError:
                        pass
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        done = kit("encrypt", "--passphrase-file", str(passfile), "-o", str(sealed), str(plain))
    finally:
        stop.set()
        watcher.join()
    assert done.returncode == 0, done.stderr
    assert seen and not any(PASSPHRASE.encode() in cmdline for cmdline in seen)
    assert PASSPHRASE.encode() not in done.stdout + done.stderr
    back = tmp_path / "back"
    code, output = run_with_tty([AGE, "-d", "-o", str(back), str(sealed)], [("Enter passphrase", PASSPHRASE)])
    assert code == 0, output
    assert back.read_bytes() == plain.read_bytes()
    mine = tmp_path / "mine"
    assert kit("decrypt", "--passphrase-file", str(passfile), "-o", str(mine), str(sealed)).returncode == 0
    assert mine.read_bytes() == plain.read_bytes()
    nope = kit("decrypt", "-o", str(tmp_path / "nope"), str(sealed), stdin=b"")
    assert nope.returncode == 2 and b"no terminal" in nope.stderr


def test_sign_and_verify_signature_commands_with_ssh_keygen(kit, tmp_path):
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", PASSPHRASE, "-f", str(key)], check=True)
    passfile = tmp_path / "pass"
    passfile.write_text(PASSPHRASE + "\n")
    document = tmp_path / "manifest.json"
    document.write_text('{"case": "INC-2026-042"}\n')
    done = kit("sign", "-k", str(key), "--passphrase-file", str(passfile), str(document))
    assert done.returncode == 0, done.stderr
    allowed = tmp_path / "allowed_signers"
    allowed.write_text("ir-lead@example.org %s\n" % key.with_suffix(".pub").read_text().strip())
    judge = subprocess.run(["ssh-keygen", "-Y", "verify", "-f", str(allowed), "-I", "ir-lead@example.org", "-n",
                            "bookgen-kit", "-s", str(document) + ".sig"], stdin=document.open("rb"),
                           capture_output=True)
    assert judge.returncode == 0, judge.stderr
    ok = kit("--json", "verify-signature", "--allowed-signers", str(allowed), "-I", "ir-lead@example.org",
             str(document))
    assert ok.returncode == 0 and json.loads(ok.stdout)["ok"] is True
    document.write_text('{"case": "INC-2026-043"}\n')
    tampered = kit("verify-signature", "--allowed-signers", str(allowed), "-I", "ir-lead@example.org", str(document))
    assert tampered.returncode == 5
    assert kit("sign", "-k", str(key), "--passphrase-file", str(passfile), str(document)).returncode == 3  # .sig exists


@pytest.mark.parametrize("direction", ["encrypt", "decrypt"])
def test_one_gib_stays_under_64_mib_peak_rss(pyz, tmp_path, direction):
    python = interpreter("3.11")
    big = tmp_path / "big"
    with open(big, "wb") as handle:
        handle.truncate(1 << 30)  # sparse: reads as 1 GiB of zeros
    identity = tmp_path / "id.key"
    subprocess.run(["age-keygen", "-o", str(identity)], check=True, capture_output=True)
    recipient = subprocess.run(["age-keygen", "-y", str(identity)], capture_output=True, text=True).stdout.strip()
    if direction == "encrypt":
        args = ["encrypt", "-r", recipient, str(big)]  # ciphertext to stdout, which is /dev/null here
    else:
        sealed = tmp_path / "big.age"
        subprocess.run([AGE, "-r", recipient, "-o", str(sealed), str(big)], check=True)
        big.unlink()
        args = ["decrypt", "-i", str(identity), str(sealed)]
    report = tmp_path / "rss"
    done = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(report), python, "-I", "-S", str(pyz), "-q", *args],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=600)
    assert done.returncode == 0, done.stderr
    peak_kib = int(report.read_text().split()[-1])
    assert 0 < peak_kib <= 64 * 1024, "peak RSS %d KiB" % peak_kib
