"""A real Docker engine on its own socket and its own bridge, images made by `docker import`, and BookGen's
containers.

The bridge is not docker0: two engines on one machine (two test sessions, or a neighbour's CI job on a shared
kernel) would both put a container at 172.17.0.2 on docker0, and a connection to bookgen-db could reach the
other engine's container. Each engine gets a bridge of its own on a free 10.24x.y.0/24.

No registry is reachable: a busybox image is a rootfs of /usr/bin/busybox and its
applet links; a "hostlike" image is an empty rootfs whose /usr is the host's
(mounted read-only), which runs the host's PostgreSQL and Redis binaries.
"""
from __future__ import annotations

import io
import os
import pwd
import grp
import random
import secrets
import shutil
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

from tests.world import bookgen
from tests.world.services import free_port, init_cluster, postgres_bindir, stop_process, wait_until

BUSYBOX_IMAGE = "bookgen-test/busybox:latest"
IMAGE_TASKS_PY = b"def generate_chapter(job):\n    return job.render()\n"
HOSTLIKE_IMAGE = "bookgen-test/hostlike:latest"
PROJECT = "bookgen"


@dataclass
class DockerEngine:
    root: Path
    socket: Path
    process: subprocess.Popen
    bridge: Optional[str] = None

    @property
    def url(self) -> str:
        return "unix://%s" % self.socket

    def client(self, timeout: int = 30):
        import docker

        return docker.DockerClient(base_url=self.url, timeout=timeout)

    def stop(self) -> None:
        stop_process(self.process, 30)
        subprocess.run(["umount", "-R", str(self.root / "data")], capture_output=True)
        if self.bridge:
            subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)


def private_bridge() -> str:
    """A bridge named bkd<hex> with x.x.x.1/24 on a 10.240-254.y.0/24 no interface of this machine uses."""
    used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, check=True).stdout + \
        subprocess.run(["ip", "-4", "route"], capture_output=True, text=True, check=True).stdout
    for _ in range(100):
        prefix = "10.%d.%d." % (random.randint(240, 254), random.randint(0, 255))
        if prefix not in used:
            break
    else:
        raise RuntimeError("no free 10.24x.y.0/24 for a Docker bridge")
    name = "bkd" + secrets.token_hex(4)
    subprocess.run(["ip", "link", "add", name, "type", "bridge"], check=True, capture_output=True)
    try:
        subprocess.run(["ip", "addr", "add", prefix + "1/24", "dev", name], check=True, capture_output=True)
        subprocess.run(["ip", "link", "set", name, "up"], check=True, capture_output=True)
    except subprocess.CalledProcessError:
        subprocess.run(["ip", "link", "del", name], capture_output=True)
        raise
    return name


def start_docker_engine() -> DockerEngine:
    root = Path(tempfile.mkdtemp(prefix="bkd-", dir="/tmp"))
    socket_path = root / "docker.sock"
    log = open(root / "dockerd.log", "wb")
    bridge = private_bridge()
    process = subprocess.Popen(
        ["/usr/sbin/dockerd", "--iptables=false", "--ip6tables=false", "--storage-driver=overlay2",
         "--bridge", bridge, "--data-root", str(root / "data"), "--exec-root", str(root / "exec"),
         "--pidfile", str(root / "pid"), "-H", "unix://%s" % socket_path],
        stdout=log, stderr=subprocess.STDOUT)
    engine = DockerEngine(root, socket_path, process, bridge)

    def ready() -> bool:
        if process.poll() is not None:
            raise RuntimeError("dockerd exited: %s" % (root / "dockerd.log").read_text()[-2000:])
        return engine.client(timeout=5).ping()

    try:
        wait_until(ready, 60, "dockerd")
        import_images(engine)
    except Exception:
        engine.stop()
        raise
    return engine


def _add_dir(tar: tarfile.TarFile, name: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode, info.uid, info.gid = mode, uid, gid
    tar.addfile(info)


def _add_file(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    tar.addfile(info, io.BytesIO(data))


def _add_link(tar: tarfile.TarFile, name: str, target: str) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    tar.addfile(info)


def busybox_rootfs() -> bytes:
    buffer = io.BytesIO()
    applets = subprocess.run(["/usr/bin/busybox", "--list"], capture_output=True, text=True, check=True).stdout.split()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for directory in ("bin", "etc", "tmp", "www", "www/api", "www/api/v1", "proc", "sys", "dev"):
            _add_dir(tar, directory, 0o1777 if directory == "tmp" else 0o755)
        _add_file(tar, "bin/busybox", Path("/usr/bin/busybox").read_bytes(), 0o755)
        for applet in applets:
            if applet != "busybox":
                _add_link(tar, "bin/" + applet, "busybox")
        _add_file(tar, "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n")
        _add_file(tar, "etc/group", b"root:x:0:\nnogroup:x:65534:\n")
        _add_file(tar, "www/health", b'{"status": "healthy"}\n')
        _add_file(tar, "www/api/v1/status", b'{"status": "ok", "workers": 1}\n')
        # BookGen's code as the image ships it (a plant may change it: compared with this copy)
        for directory in ("usr", "usr/local", "usr/local/lib", "usr/local/lib/python3.12",
                          "usr/local/lib/python3.12/site-packages", "usr/local/lib/python3.12/site-packages/bookgen"):
            _add_dir(tar, directory)
        _add_file(tar, "usr/local/lib/python3.12/site-packages/bookgen/tasks.py", IMAGE_TASKS_PY)
    return buffer.getvalue()


def hostlike_rootfs() -> bytes:
    buffer = io.BytesIO()
    postgres = pwd.getpwnam("postgres")
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for directory in ("etc", "usr", "var", "var/run", "var/lib", "proc", "sys", "dev", "root", "data"):
            _add_dir(tar, directory)
        _add_dir(tar, "tmp", 0o1777)
        _add_dir(tar, "var/run/postgresql", 0o2775, postgres.pw_uid, postgres.pw_gid)
        _add_dir(tar, "var/lib/postgresql", 0o755, postgres.pw_uid, postgres.pw_gid)
        for link in ("bin", "lib", "lib64", "sbin"):
            _add_link(tar, link, "usr/" + link)
        for name in ("passwd", "group", "nsswitch.conf"):
            if Path("/etc", name).exists():
                _add_file(tar, "etc/" + name, Path("/etc", name).read_bytes())
    return buffer.getvalue()


def import_images(engine: DockerEngine) -> None:
    api = engine.client(timeout=120).api
    for image, rootfs in ((BUSYBOX_IMAGE, busybox_rootfs()), (HOSTLIKE_IMAGE, hostlike_rootfs())):
        repository, tag = image.rsplit(":", 1)
        api.import_image_from_data(rootfs, repository=repository, tag=tag)


def labels(service: str) -> Dict[str, str]:
    return {"com.docker.compose.project": PROJECT, "com.docker.compose.service": service,
            "com.docker.compose.project.working_dir": "/opt/bookgen"}


@dataclass
class BookgenStack:
    engine: DockerEngine
    root: Path
    api_port: int
    db_password: str  # of role bookgen
    superuser_password: str
    redis_password: str
    names: Dict[str, str] = field(default_factory=lambda: {"db": "bookgen-db", "redis": "bookgen-redis",
                                                            "api": "bookgen-api", "worker": "bookgen-worker"})

    def client(self):
        return self.engine.client()

    def container(self, service: str):
        return self.client().containers.get(self.names[service])

    def ip(self, service: str) -> str:
        networks = self.container(service).attrs["NetworkSettings"]["Networks"]
        return next(iter(networks.values()))["IPAddress"]

    def db_connect(self, dbname: str = "bookgen", user: str = "bookgen", password: Optional[str] = None):
        import psycopg

        return psycopg.connect(host=self.ip("db"), port=5432, dbname=dbname, user=user,
                               password=password or (self.db_password if user == "bookgen" else self.superuser_password),
                               connect_timeout=5, autocommit=True)

    def ensure_running(self) -> None:
        """Bring every container back to running (tests stop, kill and pause them). A bookgen-db that does not
        answer is restarted once, so that the next test has its stack; the error says what state it was in."""
        for service in ("db", "redis", "api", "worker"):
            container = self.container(service)
            if container.status == "paused":
                container.unpause()
            elif container.status != "running":
                container.start()
        try:
            wait_until(lambda: self.db_connect().close() is None, 30, "bookgen-db")
        except RuntimeError as error:
            found = "%s\n%s" % (error, self.describe("db"))
            self.container("db").restart(timeout=10)
            try:
                wait_until(lambda: self.db_connect().close() is None, 60, "bookgen-db after a restart")
            except RuntimeError as again:
                found += "\n%s\n%s" % (again, self.describe("db"))
            raise RuntimeError(found) from None

    def describe(self, service: str) -> str:
        """A container's state and the last lines of its log: why a service stopped answering."""
        try:
            container = self.container(service)
            state = container.attrs.get("State", {})
            log = container.logs(tail=40).decode("utf-8", "replace")
        except Exception as error:  # the engine itself is gone
            return "%s: cannot be inspected: %s" % (self.names[service], error)
        facts = ", ".join("%s=%s" % (key, state.get(key)) for key in ("Status", "ExitCode", "OOMKilled", "StartedAt",
                                                                     "FinishedAt", "Error"))
        return "%s: %s\n--- its last log lines ---\n%s" % (self.names[service], facts, log)

    def stop(self) -> None:
        client = self.client()
        for name in self.names.values():
            try:
                client.containers.get(name).remove(force=True)
            except Exception:
                pass
        shutil.rmtree(self.root, ignore_errors=True)


def start_bookgen_stack(engine: DockerEngine) -> BookgenStack:
    root = Path(tempfile.mkdtemp(prefix="bookgen-stack-", dir="/tmp"))
    postgres = pwd.getpwnam("postgres")
    os.chown(root, postgres.pw_uid, postgres.pw_gid)
    superuser_password = secrets.token_urlsafe(18)
    db_password = "bookgen-" + secrets.token_hex(10)
    redis_password = "redis-" + secrets.token_hex(10)
    datadir = root / "pgdata"
    init_cluster(datadir, superuser_password, auth_local="trust", hba_extra="host all all 0.0.0.0/0 scram-sha-256\n")
    wal_archive = root / "wal-archive"  # the compose file's archive volume (`backup wal enable` in container mode)
    wal_archive.mkdir(mode=0o700)
    os.chown(wal_archive, postgres.pw_uid, postgres.pw_gid)
    redis_conf = root / "redis.conf"
    redis_conf.write_text("bind 0.0.0.0\nport 6379\nprotected-mode no\nsave \"\"\nappendonly no\nrequirepass %s\n"
                          % redis_password)
    os.chmod(redis_conf, 0o644)
    client = engine.client()
    api_port = free_port()
    stack = BookgenStack(engine, root, api_port, db_password, superuser_password, redis_password)
    try:
        client.containers.run(
            HOSTLIKE_IMAGE, [str(postgres_bindir() / "postgres"), "-D", "/var/lib/postgresql/data",
                             "-c", "listen_addresses=*", "-c", "fsync=off"],
            name="bookgen-db", user="postgres", detach=True, labels=labels("db"),
            volumes={"/usr": {"bind": "/usr", "mode": "ro"}, str(datadir): {"bind": "/var/lib/postgresql/data",
                                                                             "mode": "rw"},
                     str(wal_archive): {"bind": "/var/lib/postgresql/wal-archive", "mode": "rw"}})
        client.containers.run(HOSTLIKE_IMAGE, ["/usr/bin/redis-server", "/etc/bookgen-redis.conf"],
                              name="bookgen-redis", detach=True, labels=labels("redis"), user="redis"
                              if _has_user("redis") else None,
                              volumes={"/usr": {"bind": "/usr", "mode": "ro"},
                                       str(redis_conf): {"bind": "/etc/bookgen-redis.conf", "mode": "ro"}})
        client.containers.run(BUSYBOX_IMAGE, ["httpd", "-f", "-p", "8000", "-h", "/www"], name="bookgen-api",
                              detach=True, labels=labels("api"), ports={"8000/tcp": ("127.0.0.1", api_port)})
        client.containers.run(BUSYBOX_IMAGE, ["sh", "-c", "while true; do sleep 1; done"], name="bookgen-worker",
                              detach=True, labels=labels("worker"))
        wait_until(lambda: stack.db_connect("postgres", "postgres").close() is None, 30, "bookgen-db")
        with stack.db_connect("postgres", "postgres") as conn:
            conn.execute("CREATE ROLE bookgen LOGIN PASSWORD '%s'" % db_password)
            conn.execute("CREATE DATABASE bookgen OWNER bookgen")
        with stack.db_connect() as conn:
            bookgen.load_schema(conn)
            bookgen.seed_rows(conn, jobs=40)
        import urllib.request

        wait_until(lambda: urllib.request.urlopen("http://127.0.0.1:%d/health" % api_port, timeout=2).status == 200,
                   20, "bookgen-api")
    except Exception:
        stack.stop()
        raise
    return stack


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        grp.getgrnam(name)
        return True
    except KeyError:
        return False


def wait_for_status(container, wanted: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        container.reload()
        if container.status == wanted:
            return
        time.sleep(0.2)
    raise RuntimeError("%s is %s, not %s" % (container.name, container.status, wanted))
