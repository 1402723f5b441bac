"""contain, for real: in a namespace only the allowed address reaches SSH; containers pause and come back."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(*argv, check=True):
    return subprocess.run(list(argv), check=check, capture_output=True, text=True)


@pytest.fixture
def topology(tmp_path):
    """target namespace with two links: to the host (10.231.11.0/24, the responder) and to a second namespace
    (10.231.12.0/24, anyone else). A listener on 22 and on 8080 inside the target."""
    tag = uuid.uuid4().hex[:5]
    target, other = "bkt" + tag, "bko" + tag
    links = [("bkh" + tag, "bkx" + tag), ("bky" + tag, "bkz" + tag)]
    processes = []
    try:
        for name in (target, other):
            run("ip", "netns", "add", name)
            run("ip", "-n", name, "link", "set", "lo", "up")
        run("ip", "link", "add", links[0][0], "type", "veth", "peer", "name", links[0][1])
        run("ip", "link", "set", links[0][1], "netns", target)
        run("ip", "addr", "add", "10.231.11.1/24", "dev", links[0][0])
        run("ip", "link", "set", links[0][0], "up")
        run("ip", "-n", target, "addr", "add", "10.231.11.2/24", "dev", links[0][1])
        run("ip", "-n", target, "link", "set", links[0][1], "up")
        run("ip", "-n", target, "link", "add", links[1][0], "type", "veth", "peer", "name", links[1][1])
        run("ip", "-n", target, "link", "set", links[1][1], "netns", other)
        run("ip", "-n", target, "addr", "add", "10.231.12.1/24", "dev", links[1][0])
        run("ip", "-n", target, "link", "set", links[1][0], "up")
        run("ip", "-n", other, "addr", "add", "10.231.12.2/24", "dev", links[1][1])
        run("ip", "-n", other, "link", "set", links[1][1], "up")
        for port in (22, 8080):
            processes.append(subprocess.Popen(
                ["ip", "netns", "exec", target, sys.executable, "-c",
                 "import socket\ns = socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
                 "s.bind(('0.0.0.0', %d))\ns.listen(16)\nprint('listening', flush=True)\n"
                 "while True:\n    c, _ = s.accept()\n    c.close()\n" % port], stdout=subprocess.PIPE, text=True))
        for process in processes:  # each says so once it listens (no fixed wait: a loaded machine starts slowly)
            assert process.stdout.readline().strip() == "listening"
        yield {"target": target, "other": other, "state": tmp_path / "state"}
    finally:
        for process in processes:
            process.kill()
        run("ip", "link", "delete", links[0][0], check=False)
        for name in (target, other):
            run("ip", "netns", "delete", name, check=False)


def from_host(port: int) -> bool:
    try:
        with socket.create_connection(("10.231.11.2", port), timeout=2):
            return True
    except OSError:
        return False


def from_other(namespace: str, port: int) -> bool:
    done = subprocess.run(["ip", "netns", "exec", namespace, sys.executable, "-c",
                           "import socket\nsocket.create_connection(('10.231.12.1', %d), timeout=2).close()" % port],
                          capture_output=True)
    return done.returncode == 0


def kit_in(namespace, *args, env=None):
    environment = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(ROOT), "HOME": "/nonexistent"}
    environment.update(env or {})
    return subprocess.run(["ip", "netns", "exec", namespace, sys.executable, "-m", "toolkit", *args],
                          capture_output=True, text=True, env=environment, timeout=120)


def test_only_the_allowed_address_reaches_ssh_and_release_restores(topology, running_stack):
    target, other = topology["target"], topology["other"]
    env = {"BOOKGEN_KIT_STATE_DIR": str(topology["state"]), "DOCKER_HOST": running_stack.engine.url}
    assert from_host(22) and from_other(other, 22) and from_host(8080)
    worker = running_stack.container("worker")
    pid_before = worker.attrs["State"]["Pid"]
    done = kit_in(target, "--json", "contain", "apply", "--allow-ssh-from", "10.231.11.1/32", "--pause-containers",
                  env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout)
    assert "no capture found" in result["warnings"][0]
    assert set(result["paused"]) == {"bookgen-db", "bookgen-redis", "bookgen-api", "bookgen-worker"}
    try:
        assert from_host(22)  # the responder keeps SSH
        assert not from_other(other, 22)  # anyone else does not
        assert not from_host(8080)  # nor anything but SSH
        worker.reload()
        assert worker.status == "paused"
        again = kit_in(target, "contain", "apply", "--allow-ssh-from", "10.231.11.1/32", env=env)
        assert again.returncode == 2 and "already contained" in again.stderr
    finally:
        released = kit_in(target, "--json", "contain", "release", env=env)
    assert released.returncode == 0, released.stderr
    assert from_other(other, 22) and from_host(8080)
    worker.reload()
    assert worker.status == "running" and worker.attrs["State"]["Pid"] == pid_before  # the same processes
    assert not list(topology["state"].rglob("state.json"))


def test_containment_needs_the_responders_address(topology):
    done = kit_in(topology["target"], "contain", "apply", env={"BOOKGEN_KIT_STATE_DIR": str(topology["state"])})
    assert done.returncode == 2
    bad = kit_in(topology["target"], "contain", "apply", "--allow-ssh-from", "not-an-ip",
                 env={"BOOKGEN_KIT_STATE_DIR": str(topology["state"])})
    assert bad.returncode == 2 and "not an address" in bad.stderr
