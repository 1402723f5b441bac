"""Podman (rootful) on a storage of its own (graphroot and runroot under one temporary directory, named by a
storage.conf that CONTAINERS_STORAGE_CONF points at), with the test busybox image imported."""
from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.world.docker_world import busybox_rootfs

PODMAN = "/usr/bin/podman"
IMAGE = "localhost/bookgen-test/busybox:latest"


@dataclass
class PodmanStore:
    root: Path

    @property
    def storage_conf(self) -> Path:
        return self.root / "storage.conf"

    def podman(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        done = subprocess.run([PODMAN, "--root", str(self.root / "graph"), "--runroot", str(self.root / "run"),
                               *args], capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError("podman %s: %s" % (" ".join(args), done.stderr.strip()))
        return done

    def run(self, name: str, *command: str, labels: dict) -> str:
        """A detached container with no network of its own to configure (its own namespace, loopback only);
        nofile and nproc within this machine's hard limits (podman's defaults are above them)."""
        label_args = [arg for key, value in labels.items() for arg in ("--label", "%s=%s" % (key, value))]
        return self.podman("run", "-d", "--name", name, "--network", "none", "--ulimit", "nofile=1024:1024",
                           "--ulimit", "nproc=1024:1024", *label_args, IMAGE, *command).stdout.strip()

    def stop(self) -> None:
        subprocess.run([PODMAN, "--root", str(self.root / "graph"), "--runroot", str(self.root / "run"), "rm", "-a",
                        "-f", "-t", "0"], capture_output=True, timeout=120)
        subprocess.run(["umount", "-R", "-l", str(self.root / "graph" / "overlay")], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)


def start_podman_store() -> PodmanStore:
    store = PodmanStore(Path(tempfile.mkdtemp(prefix="bkp-", dir="/tmp")))
    store.storage_conf.write_text('[storage]\ndriver = "overlay"\ngraphroot = "%s"\nrunroot = "%s"\n' % (
        store.root / "graph", store.root / "run"))
    try:
        rootfs = store.root / "busybox.tar"
        rootfs.write_bytes(busybox_rootfs())
        store.podman("import", str(rootfs), IMAGE)
    except Exception:
        store.stop()
        raise
    return store
