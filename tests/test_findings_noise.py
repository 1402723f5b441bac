"""Findings that don't cry wolf: thread churn is not a hidden PID, and one indicator is one finding."""
from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import pytest

from toolkit.evidence import findings
from toolkit.evidence.collectors import processes

ROOT = Path(__file__).resolve().parent.parent

# A process that keeps one idle thread (its TID is printed first) and otherwise creates and joins threads in a
# tight loop; "churning" is printed once the first batch has been joined.
CHURN = r"""
import sys, threading
stop = threading.Event()
keeper = threading.Thread(target=stop.wait, daemon=True)
keeper.start()
print(keeper.native_id, flush=True)
first = True
while True:
    batch = [threading.Thread(target=int) for _ in range(8)]
    for thread in batch:
        thread.start()
    for thread in batch:
        thread.join()
    if first:
        print("churning", flush=True)
        first = False
"""

# One idle extra thread, nothing else.
QUIET = r"""
import threading
stop = threading.Event()
keeper = threading.Thread(target=stop.wait, daemon=True)
keeper.start()
print(keeper.native_id, flush=True)
stop.wait()
"""


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError("timed out waiting for %s" % what)


_UNREAD: Dict[int, bytes] = {}  # pid -> what was read from its stdout past the last line returned


def read_line(process: subprocess.Popen, timeout: float = 60.0) -> str:
    """The process's next line, waited for until the deadline. Read from the pipe's descriptor with our own
    buffer: a buffered readline() may take two lines at once, and a select() after it would wait for the second
    line that is no longer in the pipe."""
    deadline = time.monotonic() + timeout
    fd = process.stdout.fileno()
    buffer = _UNREAD.pop(process.pid, b"")
    while b"\n" not in buffer:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, "no output from pid %d in %.0f s" % (process.pid, timeout)
        data = os.read(fd, 4096)
        assert data, "pid %d closed its output (exit %s)" % (process.pid, process.poll())
        buffer += data
    line, _, _UNREAD[process.pid] = buffer.partition(b"\n")
    return line.decode().strip()


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
    process.wait(timeout=10)
    if process.stdout:
        process.stdout.close()


def start_python(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)


def listing_and_tids(hide: Optional[int] = None) -> Tuple[List[int], Set[int]]:
    """What the collector sees before its probe: the /proc listing and the tasks of every listed process."""
    listed = sorted(p for p in processes._listing() if p != hide)
    tids: Set[int] = set()
    for pid in listed:
        try:
            tids.update(int(t) for t in os.listdir("/proc/%d/task" % pid))
        except OSError:
            pass
    return listed, tids


def capture(out: Path) -> Dict[str, Any]:
    """`capture --only processes` as a responder runs it; returns the --json result and processes.json."""
    environment = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(ROOT), "HOME": "/nonexistent"}
    done = subprocess.run([sys.executable, "-m", "toolkit", "--json", "capture", "--only", "processes",
                           "--no-encrypt", "--compression", "none", "--out", str(out), "--allow-same-disk"],
                          capture_output=True, text=True, env=environment, timeout=300, stdin=subprocess.DEVNULL)
    assert done.returncode in (0, 6), done.stderr  # 6: some /proc/PID/environ was not readable
    result = json.loads(done.stdout)
    assert all(e["source"] == "/proc/PID/environ" for e in result["errors"] if e["kind"] == "error"), result["errors"]
    with tarfile.open(result["payload"]) as tar:
        result["processes.json"] = json.loads(tar.extractfile("volatile/processes.json").read())
    return result


@pytest.fixture
def churn():
    process = start_python(CHURN)
    try:
        keeper = int(read_line(process))
        assert read_line(process) == "churning"
        yield process, keeper
    finally:
        stop(process)


@pytest.fixture
def out_dir():
    path = Path(tempfile.mkdtemp(prefix="bk-noise-out-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


# -- hidden PIDs ----------------------------------------------------------------------------------------------
def test_thread_churn_is_not_a_hidden_pid(churn):
    process, keeper = churn
    assert keeper != process.pid and os.path.exists("/proc/%d/task/%d" % (process.pid, keeper))
    for _ in range(5):  # each probe scans the whole PID range while the threads come and go
        listed, tids = listing_and_tids()
        assert process.pid in listed
        tids.discard(keeper)  # as if the thread had been born after the task directories were read
        limit, _ = processes.probe_range(listed)
        probe = processes.probe_hidden_pids(listed, tids, limit)
        assert probe["hidden"] == [], probe["checks"]
        assert probe["checks"] == []
        assert keeper not in probe["hidden"]
        assert probe["dismissed"].get("thread of a visible process", 0) >= 1  # the keeper, re-checked
        assert process.poll() is None  # still churning: it covered the whole probe
    listed, tids = listing_and_tids()
    assert processes.hidden_pids(listed, tids, processes.probe_range(listed)[0]) == []  # the short form agrees


def test_capture_under_thread_churn_reports_no_hidden_pid(churn, out_dir):
    process, _ = churn
    result = capture(out_dir)
    assert process.poll() is None
    document = result["processes.json"]
    assert document["hidden_pids"] == [] and document["hidden_pid_checks"] == []
    probe = document["hidden_pid_probe"]
    assert probe["tries"] == 3 and probe["range"][0] == 1 and "dismissed" in probe and "candidates" in probe
    assert not [f for f in result["findings"] if f["id"] == "hidden-pids"]


def test_a_truly_hidden_process_is_reported_with_its_checks(monkeypatch):
    """The positive control: a real process kept out of the listing (as a rootkit would) is still reported."""
    sleeper = subprocess.Popen(["sleep", "300"], stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: processes._status(str(sleeper.pid)).get("Name") == "sleep", "sleep to exec")
        real_listing = processes._listing
        monkeypatch.setattr(processes, "_listing", lambda: real_listing() - {sleeper.pid})
        listed, tids = listing_and_tids(hide=sleeper.pid)
        probe = processes.probe_hidden_pids(listed, tids, processes.probe_range(listed)[0])
        assert probe["hidden"] == [sleeper.pid]
        check = probe["checks"][0]
        assert (check["pid"], check["name"], check["tgid"], check["ppid"]) == (sleeper.pid, "sleep", sleeper.pid,
                                                                               os.getpid())
        assert len(check["probes"]) == 3 and check["checks"] and check["cmdline"] == ["sleep", "300"]
        assert check["probes"][-1]["at"] - check["probes"][0]["at"] >= 0.09  # re-probed ~100 ms apart
    finally:
        stop(sleeper)


def test_a_thread_of_a_hidden_process_reports_the_process_not_the_thread(monkeypatch):
    quiet = start_python(QUIET)
    try:
        keeper = int(read_line(quiet))
        listed, tids = listing_and_tids()  # the scan skips the process itself: only its thread is a candidate
        assert quiet.pid in listed and keeper in tids
        tids.discard(keeper)
        real_listing = processes._listing
        monkeypatch.setattr(processes, "_listing", lambda: real_listing() - {quiet.pid})  # the re-check's view
        probe = processes.probe_hidden_pids(listed, tids, processes.probe_range(listed)[0])
        assert probe["hidden"] == [quiet.pid] and keeper not in probe["hidden"]
        assert probe["checks"][0]["found_through_thread"] == keeper
        assert probe["dismissed"]["thread of a hidden thread-group leader"] == 1
    finally:
        stop(quiet)


# -- one indicator, one finding -------------------------------------------------------------------------------
def test_five_processes_of_one_deleted_tmp_binary_are_one_finding(out_dir):
    handle, name = tempfile.mkstemp(prefix="bk-noise-sleep-", dir="/dev/shm")
    os.close(handle)
    binary = Path(name)
    started: List[subprocess.Popen] = []
    try:
        shutil.copy("/bin/sleep", binary)
        with open(binary, "ab") as tail:  # a sha256 of its own: no other test's copy of sleep joins the group
            tail.write(os.urandom(32))
        binary.chmod(0o755)
        for _ in range(5):
            started.append(subprocess.Popen([str(binary), "300"], stdin=subprocess.DEVNULL))
        pids = sorted(p.pid for p in started)
        wait_for(lambda: all(processes._readlink("/proc/%d/exe" % pid) == str(binary) for pid in pids),
                 "the five to exec")
        binary.unlink()
        result = capture(out_dir)
        assert all(p.poll() is None for p in started)
        # a deleted binary from a temporary directory is one indicator: one finding, not one per way to see it
        mine = [f for f in result["findings"] if f["id"].startswith("process-") and
                set(f["details"].get("pids", ())) & set(pids)]
        assert [f["id"] for f in mine] == ["process-deleted-binary"], mine
        for finding in mine:
            assert "a deleted binary from a temporary directory" in finding["title"]
            assert finding["details"]["pids"] == pids and finding["details"]["pid"] == pids[0]
            assert finding["details"]["exes"] == [str(binary)] and len(finding["details"]["sha256"]) == 1
            assert finding["severity"] == "high" and finding["title"].startswith("5 processes (pids %s" % ", ".join(
                map(str, pids)))
            assert "volatile/processes.json" in finding["evidence"]
        deleted = next(f for f in result["findings"] if f["id"] == "process-deleted-binary" and
                       set(f["details"]["pids"]) & set(pids))
        copies = [e for e in deleted["evidence"] if e.startswith("volatile/binaries/")]
        assert len(copies) == 1 and copies[0] != "volatile/binaries/", deleted["evidence"]  # stored once, not 5 times
        assert not [f for f in result["findings"] if f["id"] == "hidden-pids"]
    finally:
        for process in started:
            stop(process)
        if binary.exists():
            binary.unlink()


def _process_fact(pid: int, **data) -> Dict[str, Any]:
    base = {"pid": pid, "name": "app", "exe": "/usr/bin/app", "exe_deleted": False, "exe_sha256": "a" * 64,
            "cwd": "/", "cmdline": ["app"], "maps": [], "container_id": None, "ld_preload": None, "is_self": False}
    base.update(data)
    return {"data": base, "evidence": "volatile/processes.json"}


def test_one_ld_preload_value_on_three_pids_is_one_finding():
    facts = {"process": [_process_fact(pid, ld_preload="/tmp/libx.so") for pid in (303, 101, 202)]
             + [_process_fact(404, ld_preload="/tmp/liby.so"), _process_fact(505)]}
    result = [f for f in findings.compute(facts) if f["id"] == "process-ld-preload"]
    assert len(result) == 2
    shared = next(f for f in result if f["details"]["ld_preload"] == "/tmp/libx.so")
    assert shared["details"]["pids"] == [101, 202, 303] and shared["details"]["pid"] == 101
    assert shared["title"] == "3 processes (pids 101, 202, 303; app) have LD_PRELOAD=/tmp/libx.so"
    assert shared["severity"] == "high" and shared["evidence"] == ["volatile/processes.json"]
    single = next(f for f in result if f["details"]["ld_preload"] == "/tmp/liby.so")
    assert single["details"]["pids"] == [404] and single["title"] == "pid 404 (app) has LD_PRELOAD=/tmp/liby.so"
    assert findings.compute(facts) == findings.compute(facts)  # stable


def test_binaries_group_by_path_or_sha256_and_distinct_ones_stay_apart():
    memfd = [{"path": "/memfd:x", "deleted": True, "memfd": True, "executable": True}]
    facts = {"process": [
        _process_fact(10, exe="/dev/shm/a", exe_deleted=True, exe_sha256="1" * 64),
        _process_fact(11, exe="/tmp/b", exe_deleted=True, exe_sha256="1" * 64),  # the same binary, copied
        _process_fact(12, exe="/dev/shm/a", exe_deleted=True, exe_sha256=None),  # same path, not hashed
        _process_fact(20, exe="/dev/shm/c", exe_deleted=True, exe_sha256="2" * 64),  # another binary
    ] + [_process_fact(pid, name="memfd:x", exe="/memfd:x", exe_deleted=True, exe_sha256="3" * 64, maps=memfd)
         for pid in range(30, 35)]}
    result = findings.compute(facts)
    deleted = {tuple(f["details"]["pids"]): f for f in result if f["id"] == "process-deleted-binary"}
    assert set(deleted) == {(10, 11, 12), (20,)}
    assert deleted[(10, 11, 12)]["details"]["exes"] == ["/dev/shm/a", "/tmp/b"]
    assert deleted[(10, 11, 12)]["evidence"] == ["volatile/binaries/", "volatile/processes.json"]
    # code run from a memfd is one finding for the five, with the binary's copy: not also deleted, not also tmp
    memfd_findings = [f for f in result if 30 in f["details"].get("pids", ())]
    assert [f["id"] for f in memfd_findings] == ["process-memfd-code"], memfd_findings
    memfd = memfd_findings[0]
    assert memfd["details"]["pids"] == [30, 31, 32, 33, 34] and memfd["details"]["sha256"] == ["3" * 64]
    assert memfd["title"] == "5 processes (pids 30, 31, 32, 33, 34; memfd:x) execute code from memfd: /memfd:x"
    assert "volatile/binaries/" in memfd["evidence"]
    assert not [f for f in result if f["id"] == "process-from-tmp"]
    many = findings.compute({"process": [_process_fact(pid, ld_preload="/x.so") for pid in range(1, 9)]})
    assert many[0]["title"].startswith("8 processes (pids 1, 2, 3, 4, 5 and 3 more; app)")


def test_the_final_dedup_merges_duplicates_only():
    executables = ["/tmp/e%d" % i for i in range(5)]
    facts = {
        # two containers' worth of facts whose titles agree (the title names the first five paths only)
        "container": [{"data": {"name": "c", "id": "1", "new_executables": executables + ["/tmp/extra1"]},
                       "evidence": "containers/c/a.json"},
                      {"data": {"name": "c", "id": "1", "new_executables": executables + ["/tmp/extra2"]},
                       "evidence": "containers/c/b.json"}],
        # one SUID file reached through two facts: one finding, both evidence paths
        "suid": [{"data": {"path": "/tmp/s"}, "evidence": "files/suid.json"}],
        "tmp_executable": [{"data": {"path": "/tmp/s", "suid": True}, "evidence": "files/tmp.json"}],
    }
    result = findings.compute(facts)
    assert len([f for f in result if f["id"] == "container-new-executables"]) == 2
    suid = [f for f in result if f["id"] == "suid-in-tmp"]
    assert len(suid) == 1 and suid[0]["evidence"] == ["files/suid.json", "files/tmp.json"]


def test_outbound_connections_are_judged_by_the_container_they_leave():
    """The api may reach BookGen's db and redis only; db and worker nothing public; a connection to a container's
    own listener is inbound, never judged."""
    def container(name, service, namespace, addresses):
        return {"data": {"name": name, "id": name + "-id", "service": service, "image": "img",
                         "net_namespace": namespace, "addresses": addresses}, "evidence": "containers/%s/diff.json" % name}

    def connection(namespace, local_port, remote, remote_port):
        return {"data": {"protocol": "tcp", "local_address": "172.18.0.9", "local_port": local_port,
                         "remote_address": remote, "remote_port": remote_port, "state": "ESTABLISHED",
                         "namespace": namespace, "processes": [{"pid": 7, "name": "x", "fd": 3}]},
                "evidence": "volatile/network.json"}

    facts = {
        "container": [container("bookgen-api", "api", "net:[1]", ["172.18.0.4"]),
                      container("bookgen-db", "db", "net:[2]", ["172.18.0.2"]),
                      container("bookgen-redis", "redis", "net:[3]", ["172.18.0.3"]),
                      container("bookgen-worker", "worker", "net:[4]", ["172.18.0.5"])],
        "listener": [{"data": {"protocol": "tcp", "local_address": "0.0.0.0", "local_port": 8000, "namespace": "net:[1]",
                               "host_namespace": False, "processes": []}, "evidence": "volatile/network.json"}],
        "connection": [connection("net:[1]", 40000, "172.18.0.2", 5432),  # api -> db: its job
                       connection("net:[1]", 40001, "172.18.0.3", 6379),  # api -> redis: its job
                       connection("net:[1]", 8000, "172.18.0.1", 51000),  # a client of the api: inbound
                       connection("net:[1]", 40002, "10.9.9.9", 443),  # api -> elsewhere
                       connection("net:[4]", 40003, "172.18.0.2", 5432),  # worker -> db
                       connection("net:[4]", 40004, "93.184.216.34", 443),  # worker -> the internet
                       connection("net:[2]", 5432, "172.18.0.5", 40003)],  # the db's side of it: inbound
    }
    result = [f for f in findings.compute(facts) if f["id"] == "container-outbound"]
    assert sorted((f["details"]["container"], f["details"]["remote"]) for f in result) == [
        ("bookgen-api", "10.9.9.9"), ("bookgen-worker", "93.184.216.34")]
    api = next(f for f in result if f["details"]["container"] == "bookgen-api")
    assert api["severity"] == "high" and api["details"]["service"] == "api" and api["details"]["remote_port"] == 443
    assert api["title"] == "in container bookgen-api (service api, image img) connects to 10.9.9.9:443 (neither " \
                           "BookGen's db nor its redis)"


def test_what_a_changed_file_in_a_container_is():
    """The places whose change inside a container brings the attacker back, or runs code there."""
    from toolkit.evidence.collectors.containers import tampering_kind

    expected = {
        "/etc/cron.d/x": "cron", "/etc/crontab": "cron", "/etc/cron.daily/x": "cron", "/var/spool/cron/crontabs/root":
        "cron", "/etc/systemd/system/x.service": "systemd", "/usr/lib/systemd/system/x.service": "systemd",
        "/etc/rc.local": "rc file", "/etc/init.d/x": "rc file", "/etc/update-motd.d/00-x": "rc file",
        "/etc/profile": "shell profile", "/etc/profile.d/x.sh": "shell profile", "/etc/bash.bashrc": "shell profile",
        "/root/.bashrc": "shell profile", "/home/app/.profile": "shell profile",
        "/root/.ssh/authorized_keys": "authorized_keys", "/home/app/.ssh/authorized_keys2": "authorized_keys",
        "/root/.ssh/rc": "ssh rc", "/etc/ld.so.preload": "ld.so.preload", "/etc/ld.so.conf.d/x.conf": "ld.so config",
        "/etc/sudoers.d/x": "sudoers", "/etc/passwd": "accounts", "/etc/shadow": "accounts",
        "/etc/ssh/sshd_config": "sshd", "/etc/pam.d/common-auth": "PAM",
        "/usr/local/lib/python3.12/site-packages/bookgen/tasks.py": "application code",
        "/usr/lib/python3/dist-packages/evil.pth": "application code", "/app/main.py": "application code",
    }
    for path, kind in expected.items():
        assert tampering_kind(path, "/app") == kind, path
    for path in ("/tmp/x.py", "/etc/passwd-", "/etc/profiles", "/root/rc", "/var/log/app.log", "/app/data.json",
                 "/srv/main.py", "/etc/hostname"):
        assert tampering_kind(path, "/app") is None, path
    assert tampering_kind("/main.py", "/") is None  # a WorkingDir of / is not the application's code
