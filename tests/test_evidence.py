"""The evidence bundle: capture -> verify -> extract, judged by age, zstd, tar, sha256sum and ssh-keygen."""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from tests.conftest import interpreter

ROOT = Path(__file__).resolve().parent.parent
AGE = "/usr/bin/age"


def kit(*args, env=None, timeout=300, stdin=subprocess.DEVNULL):
    environment = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(ROOT), "HOME": "/nonexistent"}
    environment.update(env or {})
    return subprocess.run([sys.executable, "-m", "toolkit", *args], capture_output=True, text=True,
                          env=environment, timeout=timeout, stdin=stdin)


@pytest.fixture(scope="module")
def team_key(tmp_path_factory):
    directory = tmp_path_factory.mktemp("team")
    identity = directory / "team.key"
    subprocess.run(["age-keygen", "-o", str(identity)], check=True, capture_output=True)
    recipient = subprocess.run(["age-keygen", "-y", str(identity)], capture_output=True, text=True).stdout.strip()
    return identity, recipient


@pytest.fixture
def out_dir():
    """Output on its own tmpfs: another filesystem than the one collected from, as on a USB stick."""
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="bk-out-", dir="/tmp"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1g", "tmpfs", str(path)], check=True)
    yield path
    subprocess.run(["umount", "-l", str(path)], check=True)
    path.rmdir()


def capture_args(host, out, recipient, *extra):
    """The bundle's mechanics are under test here: the collectors that read the (fake) tree only."""
    return ["capture", "--out", str(out), "-r", recipient, "--root", str(host.root), "--include", "/var/log/bookgen",
            "--only", "system", "--only", "app", "--only", "include",
            "--case", "INC-2026-042", "--examiner", "alice", "--purpose", "test", *extra]


def the_bundle(out: Path) -> Path:
    payloads = [p for p in out.iterdir() if p.name.endswith(".tar.zst.age")]
    assert len(payloads) == 1, list(out.iterdir())
    return payloads[0]


def inner_manifest(bundle: Path, identity: Path) -> dict:
    """The manifest inside the payload (the last tar member), read with age, zstd and tarfile."""
    tar_bytes = decrypt_with_standard_tools(bundle, identity)
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        return json.loads(tar.extractfile("manifest.json").read())


def decrypt_with_standard_tools(bundle: Path, identity: Path) -> bytes:
    age_done = subprocess.run([AGE, "-d", "-i", str(identity), str(bundle)], capture_output=True, check=True)
    return subprocess.run(["zstd", "-d", "-c"], input=age_done.stdout, capture_output=True, check=True).stdout


def test_round_trip_from_the_pyz_judged_by_standard_tools(pyz, bookgen_host, out_dir, team_key, tmp_path):
    identity, recipient = team_key
    python = interpreter("3.11")
    done = subprocess.run([python, "-I", "-S", str(pyz), "--json", *capture_args(bookgen_host, out_dir, recipient)],
                          capture_output=True, text=True, timeout=300, env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    bundle = the_bundle(out_dir)
    assert bundle.name.startswith("INC-2026-042-") and result["payload"] == str(bundle)

    # sha256sum -c, age | zstd | tar
    sums = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=out_dir, capture_output=True, text=True)
    assert sums.returncode == 0 and sums.stdout.count(": OK") == 2
    tar_bytes = decrypt_with_standard_tools(bundle, identity)
    extracted = tmp_path / "by-tar"
    extracted.mkdir()
    subprocess.run(["tar", "-x", "-C", str(extracted)], input=tar_bytes, check=True)
    manifest = json.loads(Path(str(bundle) + ".manifest.json").read_text())
    names = [m.name for m in tarfile.open(fileobj=io.BytesIO(tar_bytes))]
    assert names[-1] == "manifest.json"
    assert "fs/$rootfs$/opt/bookgen/.env" in names and "fs/$rootfs$/var/log/bookgen/api.log" in names
    inner = json.loads((extracted / "manifest.json").read_text())
    assert "artifacts" not in manifest and manifest["artifacts_count"] == len(inner["artifacts"])
    detached_text = Path(str(bundle) + ".manifest.json").read_text()
    for artifact in inner["artifacts"]:  # no per-file hash travels unencrypted (an oracle for short secrets)
        if artifact.get("sha256"):
            assert artifact["sha256"] not in detached_text, artifact["path"]
    for key in set(manifest) & set(inner):
        assert manifest[key] == inner[key], key
    for artifact in inner["artifacts"]:
        if artifact.get("sha256"):
            out = subprocess.run(["sha256sum", str(extracted / artifact["path"])], capture_output=True, text=True)
            assert out.stdout.split()[0] == artifact["sha256"], artifact["path"]
    assert hashlib.sha256((extracted / "manifest.json").read_bytes()).hexdigest() == manifest["inner_manifest_sha256"]
    assert manifest["payload"]["sha256"] == hashlib.sha256(bundle.read_bytes()).hexdigest()
    assert manifest["tool"]["pyz_sha256"] == hashlib.sha256(pyz.read_bytes()).hexdigest()
    assert manifest["host"]["boot_id"] and manifest["collection"]["collectors"]
    assert manifest["case"]["examiner"] == "alice"
    env_entry = next(a for a in inner["artifacts"] if a["path"] == "fs/$rootfs$/opt/bookgen/.env")
    assert env_entry["mode"] == "0600" and env_entry["method"].startswith("read(O_NOATIME")

    # our verify, both ways, and extract
    assert kit("verify", str(bundle)).returncode == 0
    with_key = kit("--json", "verify", "-i", str(identity), str(bundle))
    assert with_key.returncode == 0, with_key.stdout + with_key.stderr
    assert json.loads(with_key.stdout)["members_checked"] == len(names)
    target = tmp_path / "by-kit"
    done = kit("extract", "-i", str(identity), str(bundle), "--to", str(target))
    assert done.returncode == 0, done.stderr
    extracted_env = target / "fs" / "$rootfs$" / "opt" / "bookgen" / ".env"
    assert extracted_env.read_bytes() == bookgen_host.env_file.read_bytes()
    assert extracted_env.stat().st_mode & 0o222 == 0  # read-only
    custody = [json.loads(line) for line in Path(str(bundle) + ".custody.jsonl").read_text().splitlines()]
    assert custody[0]["action"] == "collected" and custody[0]["payload_sha256"] == manifest["payload"]["sha256"]


def test_no_plaintext_secret_anywhere(bookgen_host, out_dir, team_key, tmp_path):
    _, recipient = team_key
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    done = kit(*capture_args(bookgen_host, out_dir, recipient), env={"TMPDIR": str(tmp)})
    assert done.returncode == 0, done.stderr
    for secret in bookgen_host.secrets.values():
        assert secret not in done.stdout + done.stderr
        for directory in (out_dir, tmp):
            for path in directory.rglob("*"):
                if path.is_file():
                    assert secret.encode() not in path.read_bytes(), path
    assert list(tmp.iterdir()) == []


def test_collected_files_keep_their_atime(bookgen_host, out_dir, team_key):
    _, recipient = team_key
    log = bookgen_host.log_dir / "api.log"
    old = time.time() - 30 * 86400
    os.utime(log, (old, os.stat(log).st_mtime))  # atime older than mtime: a plain read would update it
    before = os.stat(log).st_atime_ns
    assert kit(*capture_args(bookgen_host, out_dir, recipient)).returncode == 0
    assert os.stat(log).st_atime_ns == before


def test_symlinks_fifos_and_big_sparse_files(bookgen_host, out_dir, team_key, tmp_path):
    identity, recipient = team_key
    logs = bookgen_host.log_dir
    os.symlink("/etc/shadow", logs / "shadow-link")
    os.mkfifo(logs / "pipe")
    with open(logs / "sparse.img", "wb") as handle:
        handle.truncate(10 * 1024 ** 4)  # 10 TiB, sparse
    done = kit("--json", *capture_args(bookgen_host, out_dir, recipient, "--max-file-size", "1M"), timeout=60)
    assert done.returncode == 0, done.stderr
    manifest = json.loads(Path(json.loads(done.stdout)["manifest"]).read_text())
    artifacts = {a["path"]: a for a in inner_manifest(Path(json.loads(done.stdout)["payload"]), identity)["artifacts"]}
    link = artifacts["fs/$rootfs$/var/log/bookgen/shadow-link"]
    assert link["type"] == "symlink" and link["target"] == "/etc/shadow"
    sparse = artifacts["fs/$rootfs$/var/log/bookgen/sparse.img"]
    assert sparse["truncated"] is True and sparse["size"] == 1024 * 1024 and sparse["source_size"] == 10 * 1024 ** 4
    assert any(e["source"] == "/var/log/bookgen/pipe" and "fifo" in e["reason"].lower() for e in manifest["errors"])
    assert kit("verify", "-i", str(identity), json.loads(done.stdout)["payload"]).returncode == 0


def test_refusals(bookgen_host, out_dir, team_key, tmp_path):
    _, recipient = team_key
    no_recipient = kit("capture", "--out", str(out_dir), "--root", str(bookgen_host.root))
    assert no_recipient.returncode == 2 and "refuses to write plaintext" in no_recipient.stderr
    same_disk = kit("capture", "--out", str(tmp_path / "same"), "-r", recipient, "--root", str(bookgen_host.root))
    assert same_disk.returncode == 2 and "same filesystem" in same_disk.stderr
    plain = kit("--json", "capture", "--out", str(out_dir), "--no-encrypt", "--root", str(bookgen_host.root),
                "--only", "system", "--only", "app")
    assert plain.returncode == 0, plain.stderr
    manifest = json.loads(Path(json.loads(plain.stdout)["manifest"]).read_text())
    assert manifest["encryption"]["encrypted"] is False and "NOT ENCRYPTED" in manifest["encryption"]["WARNING"]
    assert json.loads(plain.stdout)["payload"].endswith(".tar.zst")


def test_signed_manifest_and_custody(bookgen_host, out_dir, team_key, tmp_path):
    identity, recipient = team_key
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    allowed = tmp_path / "allowed_signers"
    allowed.write_text("alice %s\n" % key.with_suffix(".pub").read_text().strip())
    done = kit("--json", *capture_args(bookgen_host, out_dir, recipient, "--sign-key", str(key)))
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    manifest = Path(result["manifest"])
    judge = subprocess.run(["ssh-keygen", "-Y", "verify", "-f", str(allowed), "-I", "alice", "-n", "bookgen-kit",
                            "-s", result["signature"]], stdin=manifest.open("rb"), capture_output=True)
    assert judge.returncode == 0, judge.stderr
    verified = kit("--json", "verify", "--allowed-signers", str(allowed), result["payload"])
    assert verified.returncode == 0, verified.stdout
    checks = {c["name"]: c for c in json.loads(verified.stdout)["checks"]}
    assert "allowed as alice" in checks["signature"]["detail"]
    # custody: an unsigned entry by bob breaks the rule "every entry signed by its actor" of --allowed-signers
    added = kit("custody", "add", result["payload"], "--action", "received", "--actor", "bob", "--location", "lab")
    assert added.returncode == 0, added.stderr
    shown = json.loads(kit("--json", "custody", "show", result["payload"]).stdout)
    assert [e["action"] for e in shown["entries"]] == ["collected", "received"] and "signature" in shown["entries"][0]
    unsigned = kit("custody", "verify", result["payload"], "--allowed-signers", str(allowed))
    assert unsigned.returncode == 5 and "bob" in unsigned.stderr
    assert kit("custody", "verify", result["payload"], "--head", shown["head"]).returncode == 0
    # ... and a signed one by bob, whose key the team allows, holds
    second = kit("--json", *[a if a != "INC-2026-042" else "INC-2026-043" for a in  # another bundle name
                             capture_args(bookgen_host, out_dir, recipient, "--sign-key", str(key))])
    assert second.returncode == 0, second.stderr
    result = json.loads(second.stdout)
    bob = tmp_path / "bob_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(bob)], check=True)
    allowed.write_text(allowed.read_text() + "bob %s\n" % bob.with_suffix(".pub").read_text().strip())
    added = kit("custody", "add", result["payload"], "--action", "received", "--actor", "bob", "--location", "lab",
                "--sign-key", str(bob))
    assert added.returncode == 0, added.stderr
    assert kit("custody", "verify", result["payload"], "--allowed-signers", str(allowed)).returncode == 0


@pytest.mark.parametrize("part", ["payload", "manifest", "custody", "signature"])
def test_tamper_is_named(bookgen_host, out_dir, team_key, tmp_path, part):
    identity, recipient = team_key
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    result = json.loads(kit("--json", *capture_args(bookgen_host, out_dir, recipient, "--sign-key",
                                                    str(key))).stdout)
    target = {"payload": result["payload"], "manifest": result["manifest"], "custody": result["custody"],
              "signature": result["signature"]}[part]
    data = bytearray(Path(target).read_bytes())
    if part == "manifest":
        position = data.index(b'"sha256"') + 12
    elif part == "custody":
        position = data.index(b'"actor"') + 9
    else:
        position = len(data) // 2
    data[position] ^= 0x01
    Path(target).write_bytes(bytes(data))
    done = kit("--json", "verify", "-i", str(identity), result["payload"])
    assert done.returncode == 5, done.stdout + done.stderr
    failed = [c["name"] for c in json.loads(done.stdout)["checks"] if not c["ok"]]
    expected = {"payload": "payload sha256", "manifest": "SHA256SUMS", "custody": "custody",
                "signature": "signature"}[part]
    assert any(name.startswith(expected) for name in failed), failed


def test_enospc_leaves_no_complete_bundle_and_the_source_untouched(bookgen_host, team_key, tmp_path):
    _, recipient = team_key
    big = bookgen_host.log_dir / "big.log"
    big.write_bytes(os.urandom(20 * 1024 * 1024))
    before = hashlib.sha256(big.read_bytes()).hexdigest()
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(small)], check=True)
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(tiny)], check=True)
    try:
        refused = kit(*capture_args(bookgen_host, small, recipient))
        assert refused.returncode == 4 and "not enough space" in refused.stderr
        # told to go on: what the medium cannot take is left out (each an error), the bundle is whole (exit 6)
        forced = kit("--json", *capture_args(bookgen_host, small, recipient, "--force"))
        assert forced.returncode == 6, forced.stderr
        result = json.loads(forced.stdout)
        assert any(e["source"] == "/var/log/bookgen/big.log" and "reserve on the output medium" in e["reason"]
                   for e in result["errors"]), result["errors"]
        assert any(d.startswith("output medium: ") for d in result["degraded"]), result["degraded"]
        assert kit("verify", result["payload"]).returncode == 0
        # a medium that cannot take even the manifest: ENOSPC is one line, exit 4, no file that looks complete
        full = kit(*capture_args(bookgen_host, tiny, recipient, "--force"))
        assert full.returncode == 4, full.stderr
        assert full.stderr.startswith("bookgen-kit: error: ") and "no space left" in full.stderr
        assert "Traceback" not in full.stderr
        assert [p for p in tiny.iterdir() if not p.name.endswith(".partial")] == []
    finally:
        subprocess.run(["umount", str(small)], check=True)
        subprocess.run(["umount", str(tiny)], check=True)
    assert hashlib.sha256(big.read_bytes()).hexdigest() == before


def test_sigkill_at_random_moments_never_leaves_a_bundle_that_verifies(bookgen_host, team_key, tmp_path):
    """20 kills during a capture of ~200 MiB: a payload without .partial verifies only if the capture finished."""
    identity, recipient = team_key
    data = bookgen_host.root / "data"
    data.mkdir()
    for index in range(4):
        (data / ("blob%d.bin" % index)).write_bytes(os.urandom(50 * 1024 * 1024))
    rng = random.Random(20261126)
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="bk-kill-", dir="/tmp"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4g", "tmpfs", str(base)], check=True)
    environment = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HOME": "/nonexistent"}
    outcomes = {"partial": 0, "finished": 0, "before_output": 0}
    try:
        for run in range(20):
            out = base / ("run%d" % run)
            process = subprocess.Popen([sys.executable, "-m", "toolkit", "capture", "--out", str(out), "-r",
                                        recipient, "--root", str(bookgen_host.root), "--include", "/data",
                                        "--only", "system", "--only", "include"],
                                       env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(rng.uniform(0.2, 2.5))
            process.send_signal(signal.SIGKILL)
            process.wait()
            files = sorted(out.iterdir()) if out.exists() else []
            payloads = [p for p in files if p.name.endswith(".tar.zst.age")]
            partials = [p for p in files if p.name.endswith(".partial") and ".tar.zst.age" in p.name]
            for partial in partials:
                checked = kit("--json", "verify", "-i", str(identity), str(partial))
                assert checked.returncode == 5
                assert json.loads(checked.stdout)["complete"] is False
                outcomes["partial"] += 1
            for payload in payloads:
                verified = kit("verify", str(payload)).returncode == 0
                sums = (out / "SHA256SUMS").read_text() if (out / "SHA256SUMS").exists() else ""
                finished = payload.name in sums and Path(str(payload) + ".custody.jsonl").exists()
                assert verified == finished, (run, [p.name for p in files])
                outcomes["finished" if finished else "partial"] += 1
            if not payloads and not partials:
                outcomes["before_output"] += 1
    finally:
        subprocess.run(["umount", str(base)], check=True)
        base.rmdir()
    assert outcomes["partial"] > 0  # the kills did land mid-capture


def test_partial_bundle_reports_its_intact_members(bookgen_host, out_dir, team_key):
    identity, recipient = team_key
    (bookgen_host.log_dir / "zz-late.log").write_bytes(os.urandom(1024 * 1024))  # many age chunks
    result = json.loads(kit("--json", *capture_args(bookgen_host, out_dir, recipient)).stdout)
    payload = Path(result["payload"])
    data = payload.read_bytes()
    partial = Path(str(payload) + ".partial")
    partial.write_bytes(data[: len(data) * 2 // 3])
    payload.unlink()
    done = kit("--json", "verify", "-i", str(identity), str(partial))
    assert done.returncode == 5
    report = json.loads(done.stdout)
    assert report["complete"] is False and report["intact_members"] >= 1


def test_a_hung_collector_is_abandoned_and_recorded(bookgen_host, out_dir, team_key, monkeypatch):
    """FAKE: a source that never answers (a dead NFS server) cannot exist here; a collector that sleeps stands in."""
    from toolkit.config import deployment
    from toolkit.crypto import age
    from toolkit.evidence import collectors
    from toolkit.evidence.capture import CaptureOptions, capture
    from toolkit.evidence.collectors.base import Collector

    class Hung(Collector):
        name = "hung"
        rank = 50
        budget_seconds = 1.0

        def run(self, context, emit):
            emit.generated("volatile/before-hang.txt", b"partial work", "test")
            time.sleep(30)

    monkeypatch.setattr(collectors, "REGISTRY", collectors.REGISTRY + [Hung()])
    _, recipient = team_key
    options = CaptureOptions(out_dir=str(out_dir), recipients=[age.parse_recipient(recipient)],
                             recipient_names=[recipient], root=str(bookgen_host.root))
    started = time.monotonic()
    result = capture(options, deployment(app_dir="/opt/bookgen"))
    assert time.monotonic() - started < 15
    stats = {c["name"]: c for c in result.collectors}
    assert stats["hung"]["status"] == "abandoned" and stats["app"]["status"] == "ok"
    assert any("abandoned" in e["reason"] for e in result.errors)
    assert kit("verify", result.payload).returncode == 0


def _hostile_bundle(out: Path, recipient: str, members):
    """A bundle whose manifest truthfully lists hostile members (so only extract's own rules stop them)."""
    import zstandard

    from toolkit.crypto import age
    from toolkit.evidence.capture import update_sums

    raw = io.BytesIO()
    artifacts = []
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
            entry = {"path": info.name, "type": "file" if info.isreg() else "other", "size": info.size}
            if info.isreg():
                entry["sha256"] = hashlib.sha256(data).hexdigest()
            if info.issym():
                entry["target"] = info.linkname
            artifacts.append(entry)
        inner = json.dumps({"artifacts": artifacts}).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(inner)
        tar.addfile(info, io.BytesIO(inner))
    compressed = zstandard.ZstdCompressor().compress(raw.getvalue())
    payload = out / "hostile-host-20260101T000000Z.tar.zst.age"
    with open(payload, "wb") as handle:
        encryptor = age.Encryptor(handle, [age.parse_recipient(recipient)])
        encryptor.write(compressed)
        encryptor.close()
    digest = hashlib.sha256(payload.read_bytes()).hexdigest()
    manifest = {"artifacts": artifacts, "inner_manifest_sha256": hashlib.sha256(inner).hexdigest(),
                "payload": {"sha256": digest, "size": payload.stat().st_size, "compression": "zstd"}}
    Path(str(payload) + ".manifest.json").write_text(json.dumps(manifest))
    update_sums(str(out), {payload.name: digest})
    return payload


def test_hostile_members_are_refused_and_nothing_lands_outside(team_key, tmp_path):
    identity, recipient = team_key
    outside = tmp_path / "outside"
    outside.mkdir()

    def regular(name, data=b"evil", mode=0o644):
        info = tarfile.TarInfo(name)
        info.size, info.mode = len(data), mode
        return info, data

    def special(name, kind, linkname=""):
        info = tarfile.TarInfo(name)
        info.type, info.linkname = kind, linkname
        return info, None

    members = [regular("../escape.txt"), regular("/tmp/absolute.txt"), regular("a/../../up.txt"),
               special("link", tarfile.SYMTYPE, str(outside)), regular("link/through-link.txt"),
               special("rel-link", tarfile.SYMTYPE, "../../outside"),
               special("dev-null", tarfile.CHRTYPE), special("fifo", tarfile.FIFOTYPE),
               special("hard", tarfile.LNKTYPE, "/etc/passwd"),
               regular("suid-shell", b"#!/bin/sh\n", 0o4755), regular("ok.txt", b"fine")]
    payload = _hostile_bundle(tmp_path, recipient, members)
    target = tmp_path / "target"
    done = kit("--json", "extract", "-i", str(identity), str(payload), "--to", str(target))
    assert done.returncode == 6, done.stdout + done.stderr
    report = json.loads(done.stdout)
    refused = {r["member"] for r in report["refused"]}
    assert {"../escape.txt", "/tmp/absolute.txt", "a/../../up.txt", "rel-link", "dev-null", "fifo",
            "hard", "suid-shell"} <= refused
    assert [r["member"] for r in report["recorded"]] == ["link"]  # an absolute link: recorded, never made
    # the escaping symlink was not made, so the file below its name lands in a real directory inside the target
    assert not (target / "link").is_symlink() and (target / "link" / "through-link.txt").read_bytes() == b"evil"
    assert list(outside.iterdir()) == []
    assert not (tmp_path / "escape.txt").exists() and not Path("/tmp/absolute.txt").exists()
    assert (target / "ok.txt").read_bytes() == b"fine"
    shell = target / "suid-shell"
    assert shell.exists() and not shell.stat().st_mode & 0o6000
    for path in target.rglob("*"):
        assert os.path.realpath(path).startswith(str(target.resolve()))


def test_extract_never_overwrites_and_stops_on_a_tampered_member(bookgen_host, out_dir, team_key, tmp_path):
    identity, recipient = team_key
    result = json.loads(kit("--json", *capture_args(bookgen_host, out_dir, recipient)).stdout)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("mine")
    refused = kit("extract", "-i", str(identity), result["payload"], "--to", str(busy))
    assert refused.returncode == 2 and (busy / "x").read_text() == "mine"
    # someone holding only the team's PUBLIC key swaps the .env inside and re-encrypts, fixing every outer hash
    import zstandard

    from toolkit.crypto import age
    from toolkit.evidence.capture import update_sums

    payload = Path(result["payload"])
    tar_bytes = decrypt_with_standard_tools(payload, identity)
    rebuilt = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as source, \
            tarfile.open(fileobj=rebuilt, mode="w", format=tarfile.PAX_FORMAT) as forged:
        for member in source:
            data = source.extractfile(member).read() if member.isreg() else None
            if member.name == "fs/$rootfs$/opt/bookgen/.env":
                data = b"DATABASE_PASSWORD=attacker\n"
                member.size = len(data)
            forged.addfile(member, io.BytesIO(data) if data is not None else None)
    with open(payload, "wb") as handle:
        encryptor = age.Encryptor(handle, [age.parse_recipient(recipient)])
        encryptor.write(zstandard.ZstdCompressor().compress(rebuilt.getvalue()))
        encryptor.close()
    manifest_path = Path(result["manifest"])
    manifest = json.loads(manifest_path.read_text())
    manifest["payload"]["sha256"] = hashlib.sha256(payload.read_bytes()).hexdigest()
    manifest["payload"]["size"] = payload.stat().st_size
    manifest_path.write_text(json.dumps(manifest))
    update_sums(str(out_dir), {payload.name: manifest["payload"]["sha256"],
                               manifest_path.name: hashlib.sha256(manifest_path.read_bytes()).hexdigest()})
    done = kit("extract", "-i", str(identity), result["payload"], "--to", str(tmp_path / "t2"))
    assert done.returncode == 5 and "fs/$rootfs$/opt/bookgen/.env" in done.stderr
    assert not (tmp_path / "t2" / "fs" / "$rootfs$" / "opt" / "bookgen" / ".env").exists()
    assert not [p for p in (tmp_path / "t2").rglob("*") if p.is_file() and p.name != "manifest.json"]


@pytest.mark.parametrize("compression,suffix,decompress", [("gzip", ".tar.gz.age", ["gzip", "-d", "-c"]),
                                                           ("none", ".tar.age", ["cat"])])
def test_other_compressions_open_with_standard_tools(bookgen_host, out_dir, team_key, compression, suffix,
                                                      decompress):
    identity, recipient = team_key
    done = kit("--json", *capture_args(bookgen_host, out_dir, recipient, "--compression", compression))
    assert done.returncode == 0, done.stderr
    payload = Path(json.loads(done.stdout)["payload"])
    assert payload.name.endswith(suffix)
    plain = subprocess.run([AGE, "-d", "-i", str(identity), str(payload)], capture_output=True, check=True).stdout
    tar_bytes = subprocess.run(decompress, input=plain, capture_output=True, check=True).stdout
    names = subprocess.run(["tar", "-t"], input=tar_bytes, capture_output=True, check=True).stdout.decode().split()
    assert names[-1] == "manifest.json" and "fs/$rootfs$/opt/bookgen/.env" in names
    assert kit("verify", "-i", str(identity), str(payload)).returncode == 0


def test_a_file_that_vanishes_is_recorded(bookgen_host, out_dir, team_key):
    _, recipient = team_key
    link = bookgen_host.log_dir / "dangling"
    os.symlink(bookgen_host.log_dir / "gone.log", link)  # a symlink is kept as a symlink, never followed
    done = kit("--json", *capture_args(bookgen_host, out_dir, recipient, "--include", "/var/log/bookgen/missing.log"))
    assert done.returncode == 6
    errors = json.loads(done.stdout)["errors"]
    assert any(e["source"] == "/var/log/bookgen/missing.log" and "does not exist" in e["reason"] for e in errors)


def test_without_zstd_capture_degrades_to_gzip_and_says_so(bookgen_host, out_dir, team_key, monkeypatch):
    """FAKE: no interpreter here lacks a zstandard wheel (a minor newer than the build would); the module's
    absence is simulated by toolkit.evidence.archive.zstd_available answering False."""
    from toolkit.config import deployment
    from toolkit.crypto import age
    from toolkit.errors import EnvironmentProblem
    from toolkit.evidence import archive
    from toolkit.evidence.capture import CaptureOptions, capture

    identity, recipient = team_key
    monkeypatch.setattr(archive, "zstd_available", lambda: False)
    options = CaptureOptions(out_dir=str(out_dir), recipients=[age.parse_recipient(recipient)],
                             recipient_names=[recipient], root=str(bookgen_host.root), only=["system", "app"])
    result = capture(options, deployment(app_dir="/opt/bookgen"))
    assert result.payload.endswith(".tar.gz.age")
    manifest = json.loads(Path(result.manifest).read_text())
    assert manifest["payload"]["compression"] == "gzip"
    assert any("zstd" in item for item in manifest["collection"]["degraded"])
    assert kit("verify", "-i", str(identity), result.payload).returncode == 0
    explicit = CaptureOptions(out_dir=str(out_dir), recipients=[age.parse_recipient(recipient)],
                              recipient_names=[recipient], root=str(bookgen_host.root), only=["system"],
                              compression="zstd")
    with pytest.raises(EnvironmentProblem):
        capture(explicit, deployment(app_dir="/opt/bookgen"))
