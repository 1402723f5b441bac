"""The test world itself works: every component is real and answers."""
from __future__ import annotations

import subprocess
import urllib.request


def test_pg_database_has_the_bookgen_schema(pg_database):
    with pg_database.connect() as conn:
        tables = {row[0] for row in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
        assert {"biography_jobs", "chapters", "users", "alembic_version"} <= tables
        assert conn.execute("SELECT count(*) FROM biography_jobs").fetchone()[0] == 30
        owner = conn.execute("SELECT tableowner FROM pg_tables WHERE tablename = 'biography_jobs'").fetchone()[0]
        assert owner == "bookgen"


def test_pg_password_auth_is_real(pg_database):
    import psycopg
    import pytest

    with pytest.raises(psycopg.OperationalError):
        pg_database.cluster.connect(pg_database.name, user="bookgen", password="wrong")


def test_seed_is_deterministic_and_makes_stuck_jobs(pg_database):
    stuck = pg_database.seed(jobs=5, stuck=3, users=2, seed=7)
    assert len(stuck) == 3
    with pg_database.connect() as conn:
        count = conn.execute("SELECT count(*) FROM biography_jobs WHERE status = 'processing' "
                             "AND created_at < now() - interval '1 hour'").fetchone()[0]
    assert count == 3


def test_redis_requires_its_password(redis_server):
    import pytest
    import redis

    assert redis_server.client().ping()
    with pytest.raises(redis.AuthenticationError):
        redis_server.client(password="wrong").ping()


def test_bookgen_stack_is_up(running_stack):
    client = running_stack.client()
    names = {c.name: c for c in client.containers.list(filters={"label": "com.docker.compose.project=bookgen"})}
    assert set(names) == {"bookgen-db", "bookgen-redis", "bookgen-api", "bookgen-worker"}
    assert names["bookgen-api"].labels["com.docker.compose.service"] == "api"
    body = urllib.request.urlopen("http://127.0.0.1:%d/health" % running_stack.api_port, timeout=5).read()
    assert b"healthy" in body
    with running_stack.db_connect() as conn:
        assert conn.execute("SELECT count(*) FROM biography_jobs").fetchone()[0] >= 40  # tests add more
    result = running_stack.container("db").exec_run(["psql", "-U", "bookgen", "-d", "bookgen", "-tAc", "SELECT 1"])
    assert result.exit_code == 0 and result.output.strip() == b"1"


def test_host_tree_has_the_deployment(bookgen_host):
    env = bookgen_host.env_file.read_text()
    for name, value in bookgen_host.secrets.items():
        assert value in env, name
    assert (bookgen_host.app_dir / "docker-compose.yml").exists()
    assert list((bookgen_host.log_dir).glob("*.log"))


def test_netns_is_isolated(netns):
    links = subprocess.run(["ip", "-n", netns, "-o", "link"], capture_output=True, text=True, check=True).stdout
    assert "lo" in links and "eth0" not in links
