"""pytest fixtures of the test world. Slow ones are session-scoped; every one cleans up, also on failure."""
from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.world import bookgen
from tests.world.containerd_world import start_containerd
from tests.world.docker_world import start_bookgen_stack, start_docker_engine
from tests.world.podman_world import start_podman_store
from tests.world.services import start_cluster, start_redis


def _require_root(what: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("%s needs root" % what)


@pytest.fixture(scope="session")
def pg_cluster():
    _require_root("an ephemeral PostgreSQL cluster (initdb as postgres)")
    cluster = start_cluster()
    try:
        with cluster.connect() as conn:
            conn.execute("CREATE ROLE bookgen LOGIN PASSWORD '%s'" % cluster.password)  # same as superuser's
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)


class PgDatabase:
    def __init__(self, cluster, name: str) -> None:
        self.cluster = cluster
        self.name = name
        self.user = "bookgen"
        self.password = cluster.password

    def connect(self, **kwargs):
        return self.cluster.connect(self.name, user=self.user, password=self.password, **kwargs)

    def conninfo(self) -> str:
        return self.cluster.conninfo(self.name, user=self.user, password=self.password)

    def seed(self, **kwargs):
        with self.connect() as conn:
            return bookgen.seed_rows(conn, **kwargs)


@pytest.fixture
def pg_database(pg_cluster):
    """A fresh database owned by role bookgen, with BookGen's schema and a few rows."""
    name = "t_" + uuid.uuid4().hex[:10]
    with pg_cluster.connect() as conn:
        conn.execute('CREATE DATABASE "%s" OWNER bookgen' % name)
    database = PgDatabase(pg_cluster, name)
    try:
        with database.connect() as conn:
            bookgen.load_schema(conn)
        database.seed(jobs=30)
        yield database
    finally:
        with pg_cluster.connect() as conn:
            conn.execute('DROP DATABASE IF EXISTS "%s" WITH (FORCE)' % name)


@pytest.fixture(scope="session")
def redis_server():
    server = start_redis()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.root, ignore_errors=True)


@pytest.fixture(scope="session")
def docker_engine():
    _require_root("a Docker engine")
    engine = start_docker_engine()
    try:
        yield engine
    finally:
        engine.stop()


@pytest.fixture(scope="session")
def containerd_engine():
    """A containerd of its own, with the busybox image: containers Docker does not know."""
    _require_root("a containerd")
    engine = start_containerd()
    try:
        yield engine
    finally:
        engine.stop()


@pytest.fixture(scope="session")
def podman_store():
    """Rootful podman on a storage of its own, with the busybox image."""
    _require_root("podman")
    store = start_podman_store()
    try:
        yield store
    finally:
        store.stop()


@pytest.fixture(scope="session")
def bookgen_stack(docker_engine):
    stack = start_bookgen_stack(docker_engine)
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture
def running_stack(bookgen_stack):
    """The stack, every container running before and after the test."""
    bookgen_stack.ensure_running()
    yield bookgen_stack
    print(bookgen_stack.describe("db"))  # pytest shows it with a failure: what the database said meanwhile
    bookgen_stack.ensure_running()


@pytest.fixture
def bookgen_host(tmp_path):
    return bookgen.make_host_tree(tmp_path / "host")


@pytest.fixture
def netns():
    """A network namespace with its own /etc/netns/NAME (ufw reads /etc/ufw from there)."""
    _require_root("a network namespace")
    name = "bk" + uuid.uuid4().hex[:8]
    subprocess.run(["ip", "netns", "add", name], check=True)
    etc = Path("/etc/netns") / name
    etc.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], capture_output=True)
        shutil.rmtree(etc, ignore_errors=True)
