"""Real PostgreSQL and Redis servers for the tests, started in the foreground and reaped by us.

Recipes from shared/QUALITY.md: initdb refuses root, so the cluster belongs to the
`postgres` user; the server runs as a child we terminate and wait for (PID 1 here
does not reap orphans).
"""
from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def postgres_bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(p.split("/")[4]))
    if not found:
        raise RuntimeError("no PostgreSQL server under /usr/lib/postgresql (apt-get install postgresql)")
    return Path(found[-1]).parent


def wait_until(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    last: Optional[BaseException] = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception as error:  # not ready yet
            last = error
        time.sleep(0.1)
    raise RuntimeError("%s not ready after %.0f s: %s" % (what, timeout, last))


def make_private_dir(prefix: str, owner: str = "postgres") -> Path:
    """A directory under /tmp that the service user can reach (pytest's tmp dirs are root-only)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    entry = pwd.getpwnam(owner)
    os.chown(path, entry.pw_uid, entry.pw_gid)
    return path


def init_cluster(datadir: Path, password: str, auth_local: str = "scram-sha-256", hba_extra: str = "") -> None:
    """initdb with scram-sha-256 password auth (local sockets: auth_local), as the postgres user."""
    bindir = postgres_bindir()
    entry = pwd.getpwnam("postgres")
    pwfile = datadir.parent / ("%s.pw" % datadir.name)
    pwfile.write_text(password + "\n")
    os.chown(pwfile, entry.pw_uid, entry.pw_gid)
    os.chmod(pwfile, 0o600)
    datadir.mkdir(mode=0o700)
    os.chown(datadir, entry.pw_uid, entry.pw_gid)
    subprocess.run([str(bindir / "initdb"), "-D", str(datadir), "-U", "postgres", "--auth-host=scram-sha-256",
                    "--auth-local=%s" % auth_local,
                    "--pwfile", str(pwfile), "-E", "UTF8", "--locale", "C.UTF-8", "--no-sync"],
                   user="postgres", group="postgres", check=True, capture_output=True, cwd="/tmp")
    pwfile.unlink()
    if hba_extra:
        with open(datadir / "pg_hba.conf", "a") as hba:
            hba.write(hba_extra)


@dataclass
class PgCluster:
    root: Path
    datadir: Path
    sockdir: Path
    port: int
    password: str  # of the superuser `postgres`
    process: Optional[subprocess.Popen]
    bindir: Path

    def conninfo(self, dbname: str = "postgres", user: str = "postgres", password: Optional[str] = None) -> str:
        from psycopg.conninfo import make_conninfo

        return make_conninfo(host="127.0.0.1", port=self.port, dbname=dbname, user=user,
                             password=self.password if password is None else password, connect_timeout=5)

    def connect(self, dbname: str = "postgres", **kwargs):
        import psycopg

        return psycopg.connect(self.conninfo(dbname, **kwargs), autocommit=True)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, 20)


def stop_process(process: subprocess.Popen, grace: float) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds; reaped either way."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def start_cluster() -> PgCluster:
    root = make_private_dir("bookgen-pg-")
    sockdir = root / "sock"
    sockdir.mkdir()
    entry = pwd.getpwnam("postgres")
    os.chown(sockdir, entry.pw_uid, entry.pw_gid)
    password = secrets.token_urlsafe(18)
    datadir = root / "data"
    init_cluster(datadir, password)
    cluster = PgCluster(root, datadir, sockdir, free_port(), password, None, postgres_bindir())
    launch(cluster)
    return cluster


def launch(cluster: PgCluster) -> None:
    """Start (or start again, after stop()) the cluster's server and wait until it answers."""
    process = subprocess.Popen(
        [str(cluster.bindir / "postgres"), "-D", str(cluster.datadir), "-p", str(cluster.port), "-k",
         str(cluster.sockdir), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "full_page_writes=off",
         "-c", "synchronous_commit=off", "-c", "max_connections=60"],
        user="postgres", group="postgres", stdout=subprocess.DEVNULL,
        stderr=open(cluster.root / "server.log", "ab"), cwd="/tmp")
    cluster.process = process

    def ready() -> bool:
        if process.poll() is not None:
            raise RuntimeError("postgres exited: %s" % (cluster.root / "server.log").read_text()[-2000:])
        with cluster.connect():
            return True

    try:
        wait_until(ready, 30, "PostgreSQL")
    except Exception:
        cluster.stop()
        raise


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


@dataclass
class RedisServer:
    root: Path
    port: int
    socket_path: Path
    password: str
    config: Path
    process: subprocess.Popen

    def client(self, password: Optional[str] = None):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password if password is None else password,
                           socket_timeout=5)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_redis() -> RedisServer:
    root = Path(tempfile.mkdtemp(prefix="bookgen-redis-", dir="/tmp"))
    port = free_port()
    password = secrets.token_urlsafe(18)
    config = root / "redis.conf"
    socket_path = root / "redis.sock"
    # The password sits in a config file, not in argv, so that argv-leak tests see only our tool.
    config.write_text("bind 127.0.0.1\nport %d\nunixsocket %s\nunixsocketperm 700\nsave \"\"\nappendonly no\n"
                      "requirepass %s\ndir %s\n" % (port, socket_path, password, root))
    os.chmod(config, 0o600)
    process = subprocess.Popen(["/usr/bin/redis-server", str(config)], stdout=open(root / "redis.log", "wb"),
                               stderr=subprocess.STDOUT)
    server = RedisServer(root, port, socket_path, password, config, process)
    try:
        wait_until(lambda: server.client().ping(), 20, "Redis")
    except Exception:
        server.stop()
        raise
    return server
