"""rotate against the real bookgen stack: new passwords work, old ones fail, every kill recoverable."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
import redis

from tests.test_backup import ArgvWatcher
from tests.world.bookgen import make_host_tree
from toolkit.secrets import dotenv
from toolkit.secrets.rotators import url_password

ROOT = Path(__file__).resolve().parent.parent


def kit(*args, env=None, timeout=120):
    environment = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(ROOT), "HOME": "/nonexistent"}
    environment.update(env or {})
    return subprocess.run([sys.executable, "-m", "toolkit", *args], capture_output=True, text=True,
                          env=environment, timeout=timeout, stdin=subprocess.DEVNULL)


def db_works(stack, password) -> bool:
    try:
        with psycopg.connect(host=stack.ip("db"), port=5432, dbname="bookgen", user="bookgen", password=password,
                             connect_timeout=5):
            return True
    except psycopg.OperationalError:
        return False


def redis_works(stack, password) -> bool:
    try:
        return bool(redis.Redis(host=stack.ip("redis"), port=6379, password=password, socket_timeout=5).ping())
    except (redis.AuthenticationError, redis.ResponseError):
        return False


@pytest.fixture
def rotation_host(running_stack, tmp_path):
    host = make_host_tree(tmp_path / "host", db_host="db", redis_host="redis",
                          db_password=running_stack.db_password, redis_password=running_stack.redis_password)
    env = {"DOCKER_HOST": running_stack.engine.url, "BOOKGEN_KIT_APP_DIR": str(host.app_dir)}
    yield host, env
    # whatever the test did, the stack keeps working credentials for the tests after it
    candidates = []
    for path in (host.env_file, host.app_dir / ".env.pending"):
        try:
            candidates.append(dotenv.read(str(path)).values())
        except dotenv.BadInputError:
            continue
    for candidate in candidates:
        if candidate.get("DATABASE_PASSWORD") and db_works(running_stack, candidate["DATABASE_PASSWORD"]):
            running_stack.db_password = candidate["DATABASE_PASSWORD"]
        if candidate.get("REDIS_PASSWORD") and redis_works(running_stack, candidate["REDIS_PASSWORD"]):
            running_stack.redis_password = candidate["REDIS_PASSWORD"]


def consistent(stack, host) -> None:
    """Each service accepts the value in the .env, or in .env.pending."""
    files = [host.env_file] + ([Path(str(host.env_file) + ".pending")]
                               if Path(str(host.env_file) + ".pending").exists() else [])
    candidates = [dotenv.read(str(f)).values() for f in files]
    assert any(db_works(stack, c["DATABASE_PASSWORD"]) for c in candidates), "no file works for PostgreSQL"
    assert any(redis_works(stack, c["REDIS_PASSWORD"]) for c in candidates), "no file works for Redis"


@pytest.mark.parametrize("mode", ["host", "container"])
def test_full_rotation(rotation_host, running_stack, mode):
    host, env = rotation_host
    old = dict(host.secrets)
    extra = ["--container", "bookgen-db"] if mode == "container" else []
    plan = kit("--json", "rotate", "plan", env=env)
    assert plan.returncode == 0, plan.stderr
    planned = json.loads(plan.stdout)
    assert {r["name"] for r in planned["rotate"]} == {"DATABASE_PASSWORD", "REDIS_PASSWORD", "SECRET_KEY"}
    assert [p["name"] for p in planned["revoke_at_provider"]] == ["OPENROUTER_API_KEY"]
    with ArgvWatcher() as watcher:
        done = kit("--json", "rotate", "run", "--yes", *extra, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    new = dotenv.read(str(host.env_file)).values()
    assert not db_works(running_stack, old["DATABASE_PASSWORD"]) and db_works(running_stack, new["DATABASE_PASSWORD"])
    assert not redis_works(running_stack, old["REDIS_PASSWORD"]) and redis_works(running_stack, new["REDIS_PASSWORD"])
    assert url_password(new["DATABASE_URL"]) == new["DATABASE_PASSWORD"] == new["POSTGRES_PASSWORD"]
    assert url_password(new["REDIS_URL"]) == new["REDIS_PASSWORD"]
    assert len(new["SECRET_KEY"]) == 64 and new["SECRET_KEY"] != old["SECRET_KEY"]
    assert new["OPENROUTER_API_KEY"] == old["OPENROUTER_API_KEY"]
    assert not Path(str(host.env_file) + ".pending").exists()
    previous = list(host.app_dir.glob(".env.previous-*"))
    assert len(previous) == 1 and previous[0].stat().st_mode & 0o777 == 0o600
    assert host.env_file.stat().st_mode & 0o777 == 0o600
    journal_dir = host.app_dir / ".bookgen-kit" / "rotation"
    assert journal_dir.stat().st_mode & 0o777 == 0o700
    journal = "".join(p.read_text() for p in journal_dir.iterdir())
    for value in list(old.values()) + [new["DATABASE_PASSWORD"], new["REDIS_PASSWORD"], new["SECRET_KEY"]]:
        assert value not in done.stdout + done.stderr
        assert value not in journal
        assert not any(value.encode() in cmdline for cmdline in watcher.seen)
    status = json.loads(kit("--json", "rotate", "status", env=env).stdout)
    assert status["runs"][-1]["state"] == "finished"


EDGE_ENV = (
    "# edge cases\r\n"
    "export DATABASE_URL='postgresql://bookgen:{db}@db:5432/bookgen'\r\n"
    "DATABASE_PASSWORD=\"{db}\" # quoted, with a comment\r\n"
    "REDIS_PASSWORD=stale\r\n"
    "REDIS_PASSWORD={redis}\r\n"
    "ESCAPED=\"a \\\"b\\\" $c\"\r\n"
    "SECRET_KEY={secret}"
)


def test_env_edge_cases_round_trip_byte_for_byte(tmp_path):
    text = EDGE_ENV.format(db="olddb", redis="oldredis", secret="oldsecret")
    env = dotenv.parse(text)
    changed = dotenv.with_values(env, {"DATABASE_PASSWORD": "NEWdb1", "REDIS_PASSWORD": "NEWredis2",
                                       "SECRET_KEY": "NEWsecret3", "DATABASE_URL":
                                           "postgresql://bookgen:NEWdb1@db:5432/bookgen"})
    assert changed == EDGE_ENV.format(db="NEWdb1", redis="oldredis", secret="NEWsecret3").replace(
        "REDIS_PASSWORD=oldredis", "REDIS_PASSWORD=NEWredis2")
    assert "REDIS_PASSWORD=stale" in changed  # only the last duplicate, the one compose uses, changes
    assert dotenv.parse(changed).values()["ESCAPED"] == 'a "b" $c'


def test_unparseable_env_stops_before_any_service(rotation_host, running_stack):
    host, env = rotation_host
    host.env_file.write_text(host.env_file.read_text() + "this is not a line\n")
    done = kit("rotate", "run", "--yes", env=env)
    assert done.returncode == 3 and "line" in done.stderr
    assert db_works(running_stack, host.secrets["DATABASE_PASSWORD"])
    assert not Path(str(host.env_file) + ".pending").exists()


KILL_POINTS = ["create", "set:DATABASE_PASSWORD", "set:REDIS_PASSWORD", "test:DATABASE_PASSWORD",
               "test:REDIS_PASSWORD", "finish-env"]


@pytest.mark.parametrize("point", KILL_POINTS)
@pytest.mark.parametrize("recovery", ["resume", "rollback"])
def test_sigkill_between_steps_is_recoverable(rotation_host, running_stack, point, recovery):
    host, env = rotation_host
    killed = kit("rotate", "run", "--yes", "--only", "DATABASE_PASSWORD", "--only", "REDIS_PASSWORD",
                 env=dict(env, BOOKGEN_KIT_FAULT="after:" + point))
    assert killed.returncode == -9
    consistent(running_stack, host)
    done = kit("--json", "rotate", recovery, env=env)
    if recovery == "rollback" and point == "finish-env":
        assert done.returncode == 2  # the .env already has the new values: resume finishes instead
        done = kit("--json", "rotate", "resume", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not Path(str(host.env_file) + ".pending").exists()
    final = dotenv.read(str(host.env_file)).values()
    assert db_works(running_stack, final["DATABASE_PASSWORD"])
    assert redis_works(running_stack, final["REDIS_PASSWORD"])
    state = json.loads(kit("--json", "rotate", "status", env=env).stdout)["runs"][-1]["state"]
    assert state in ("finished", "rolled_back")


def test_postgres_stopped_during_test_then_resume(rotation_host, running_stack):
    host, env = rotation_host
    killed = kit("rotate", "run", "--yes", "--only", "DATABASE_PASSWORD",
                 env=dict(env, BOOKGEN_KIT_FAULT="after:set:DATABASE_PASSWORD"))
    assert killed.returncode == -9
    # the role already has the new password (set ran): the stack's own helpers must use it now
    running_stack.db_password = dotenv.read(str(host.env_file) + ".pending").values()["DATABASE_PASSWORD"]
    running_stack.container("db").stop(timeout=5)
    try:
        failed = kit("rotate", "resume", env=env)
        assert failed.returncode == 4  # the database (or its container) does not answer: nothing changes
        assert failed.stderr.startswith("bookgen-kit: error: ") and len(failed.stderr.splitlines()) <= 2
        consistent_files = [host.env_file, Path(str(host.env_file) + ".pending")]
        assert all(p.exists() for p in consistent_files)
    finally:
        running_stack.container("db").start()
        running_stack.ensure_running()
    done = kit("rotate", "resume", env=env)
    assert done.returncode == 0, done.stderr
    assert db_works(running_stack, dotenv.read(str(host.env_file)).values()["DATABASE_PASSWORD"])


def test_recreate_without_compose_prints_the_exact_command(rotation_host, running_stack):
    host, env = rotation_host
    done = kit("--json", "rotate", "run", "--yes", "--only", "SECRET_KEY", "--recreate", env=env)
    assert done.returncode == 0, done.stderr
    recreate = json.loads(done.stdout)["recreate"]
    has_compose = subprocess.run(["/usr/bin/docker", "compose", "version"], capture_output=True).returncode == 0 \
        if os.path.exists("/usr/bin/docker") else False
    if not has_compose:
        assert "--force-recreate" in recreate["command"]
