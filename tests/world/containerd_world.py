"""A real containerd of its own (its own root, state and socket; CRI off), with the test busybox image
imported from a Docker archive made here, for containers that Docker does not know."""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import List

from tests.world.docker_world import busybox_rootfs
from tests.world.services import stop_process, wait_until

CTR = "/usr/bin/ctr"
IMAGE = "docker.io/bookgen-test/busybox:latest"
NAMESPACE = "bk"


@dataclass
class Containerd:
    root: Path
    process: subprocess.Popen

    @property
    def socket(self) -> Path:
        return self.root / "containerd.sock"

    def ctr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        done = subprocess.run([CTR, "-a", str(self.socket), "-n", NAMESPACE, *args], capture_output=True, text=True,
                              timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError("ctr %s: %s" % (" ".join(args), done.stderr.strip()))
        return done

    def task_pid(self, container: str) -> int:
        for line in self.ctr("tasks", "ls").stdout.splitlines()[1:]:
            fields = line.split()
            if fields and fields[0] == container:
                return int(fields[1])
        raise RuntimeError("no task %s" % container)

    def remove(self, containers: List[str]) -> None:
        for name in containers:
            subprocess.run([CTR, "-a", str(self.socket), "-n", NAMESPACE, "tasks", "kill", "-s", "KILL", name],
                           capture_output=True, timeout=30)
            wait_until(lambda: subprocess.run([CTR, "-a", str(self.socket), "-n", NAMESPACE, "tasks", "delete", name],
                                              capture_output=True, timeout=30).returncode == 0 or
                       name not in self.ctr("tasks", "ls").stdout, 20, "task %s deleted" % name)
            subprocess.run([CTR, "-a", str(self.socket), "-n", NAMESPACE, "containers", "rm", name],
                           capture_output=True, timeout=30)

    def stop(self) -> None:
        stop_process(self.process, 30)
        subprocess.run(["umount", "-R", "-l", str(self.root / "state")], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)


def docker_archive(rootfs: bytes, tag: str) -> bytes:
    """`docker save`'s format, made here: manifest.json, the image config and one layer."""
    diff_id = hashlib.sha256(rootfs).hexdigest()
    config = json.dumps({"architecture": {"x86_64": "amd64", "aarch64": "arm64"}.get(
        subprocess.run(["uname", "-m"], capture_output=True, text=True).stdout.strip(), "amd64"), "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + diff_id]},
        "config": {"Cmd": ["sh"], "Env": ["PATH=/bin"]}}).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    manifest = json.dumps([{"Config": config_name, "RepoTags": [tag], "Layers": [diff_id + "/layer.tar"]}]).encode()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in ((config_name, config), (diff_id + "/layer.tar", rootfs), ("manifest.json", manifest)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def start_containerd() -> Containerd:
    root = Path(tempfile.mkdtemp(prefix="bkc-", dir="/tmp"))
    (root / "config.toml").write_text(
        'version = 2\nroot = "%s"\nstate = "%s"\ndisabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
        '[grpc]\n  address = "%s"\n' % (root / "root", root / "state", root / "containerd.sock"))
    log = open(root / "containerd.log", "wb")
    process = subprocess.Popen(["/usr/bin/containerd", "--config", str(root / "config.toml")], stdout=log,
                               stderr=subprocess.STDOUT)
    engine = Containerd(root, process)

    def ready() -> bool:
        if process.poll() is not None:
            raise RuntimeError("containerd exited: %s" % (root / "containerd.log").read_text()[-2000:])
        return engine.socket.exists() and subprocess.run([CTR, "-a", str(engine.socket), "version"],
                                                         capture_output=True, timeout=10).returncode == 0

    try:
        wait_until(ready, 60, "containerd")
        archive = root / "image.tar"
        archive.write_bytes(docker_archive(busybox_rootfs(), "bookgen-test/busybox:latest"))
        engine.ctr("images", "import", str(archive), timeout=120)
    except Exception:
        engine.stop()
        raise
    return engine
