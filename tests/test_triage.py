"""triage and jobs against the real bookgen stack: healthy, System Down, Worker Crashed, Docker hung, disk full."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.world.bookgen import make_host_tree
from tests.world.docker_world import wait_for_status

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def deployment_env(running_stack, tmp_path):
    """A host tree whose .env points at the stack's db service, and the environment to run the kit with."""
    host = make_host_tree(tmp_path / "host", db_host="db", db_password=running_stack.db_password,
                          redis_password=running_stack.redis_password)
    env = {"DOCKER_HOST": running_stack.engine.url, "BOOKGEN_KIT_APP_DIR": str(host.app_dir),
           "BOOKGEN_KIT_LOG_DIRS": str(host.log_dir),
           "BOOKGEN_KIT_HEALTH_URL": "http://127.0.0.1:%d/health" % running_stack.api_port}
    return host, env


def kit(*args, env=None, timeout=60):
    environment = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(ROOT), "HOME": "/nonexistent"}
    environment.update(env or {})
    return subprocess.run([sys.executable, "-m", "toolkit", *args], capture_output=True, text=True,
                          env=environment, timeout=timeout, stdin=subprocess.DEVNULL)


def triage(env, *extra):
    started = time.monotonic()
    done = kit("--json", "triage", *extra, env=env)
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout), elapsed


def incidents(report):
    return {i["name"]: i for i in report["incidents"]}


def test_triage_healthy_stack(deployment_env):
    host, env = deployment_env
    report, elapsed = triage(env)
    assert elapsed < 10
    assert report["healthy"] is True, report["incidents"]
    probes = report["probes"]
    assert probes["api"]["result"]["status"] == 200 and "healthy" in probes["api"]["result"]["body_excerpt"]
    containers = {c["name"]: c for c in probes["containers"]["result"]["containers"]}
    assert set(containers) == {"bookgen-db", "bookgen-redis", "bookgen-api", "bookgen-worker"}
    assert all(c["running"] for c in containers.values())
    assert containers["bookgen-db"]["memory_bytes"] > 0
    database = probes["database"]["result"]
    assert database["reachable"] and database["mode"] == "host" and database["stuck_jobs"] == 0
    assert database["database"] == "bookgen" and database["size_bytes"] > 0
    assert probes["host"]["result"]["top_processes"]["by_memory"]
    sizes = {Path(d["path"]).name: d for d in probes["disk_usage"]["result"]["directories"]}
    assert sizes["bios"]["files"] == 4 and sizes["docx"]["bytes"] > 0
    # nothing secret in what triage prints
    for value in host.secrets.values():
        assert value not in json.dumps(report)


def test_triage_renders_for_people(deployment_env):
    _, env = deployment_env
    done = kit("--no-color", "triage", env=env)
    assert done.returncode == 0, done.stderr
    assert "no runbook incident matches" in done.stdout and "bookgen-worker" in done.stdout


def test_api_container_stopped_is_system_down(deployment_env, running_stack):
    _, env = deployment_env
    api = running_stack.container("api")
    api.stop(timeout=1)
    report, elapsed = triage(env)
    assert elapsed < 10
    down = incidents(report)["System Down"]
    assert any("bookgen-api is exited" in e for e in down["evidence"])
    assert any("bookgen-kit capture" in step for step in down["next_steps"])


def test_worker_killed_with_stuck_jobs_is_worker_crashed_and_reset_fixes_exactly_them(deployment_env, running_stack):
    from tests.world.bookgen import seed_rows

    _, env = deployment_env
    with running_stack.db_connect() as conn:
        stuck = seed_rows(conn, jobs=3, stuck=4, users=1, chapters_per_job=0, seed=99)
        before = {row[0]: row[1:] for row in conn.execute(
            "SELECT job_id::text, status, error_message FROM biography_jobs")}
    running_stack.container("worker").kill()
    wait_for_status(running_stack.container("worker"), "exited")
    report, _ = triage(env)
    crashed = incidents(report)["Worker Crashed"]
    assert any("bookgen-worker is exited" in e for e in crashed["evidence"])
    assert any("4 jobs 'processing'" in e for e in crashed["evidence"])

    listed = kit("--json", "jobs", "stuck", env=env)
    assert sorted(j["job_id"] for j in json.loads(listed.stdout)["jobs"]) == sorted(stuck)
    refused = kit("jobs", "reset", env=env)
    assert refused.returncode == 2 and "--yes" in refused.stderr
    dry = kit("--json", "jobs", "reset", "--dry-run", env=env)
    assert json.loads(dry.stdout)["reset"] == []
    done = kit("--json", "jobs", "reset", "--yes", env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["reset"] == sorted(stuck)
    with running_stack.db_connect() as conn:
        after = {row[0]: row[1:] for row in conn.execute(
            "SELECT job_id::text, status, error_message FROM biography_jobs")}
    for job_id, row in after.items():
        if job_id in stuck:
            assert row == ("failed", "Worker crashed - job reset")
        else:
            assert row == before[job_id]


def test_jobs_through_psql_in_the_container(deployment_env, running_stack):
    from tests.world.bookgen import seed_rows

    _, env = deployment_env
    with running_stack.db_connect() as conn:
        stuck = seed_rows(conn, jobs=0, stuck=2, users=1, chapters_per_job=0, seed=5)
    done = kit("--json", "jobs", "stuck", "--container", "bookgen-db", env=env)
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert "container bookgen-db" in document["target"]
    assert set(stuck) <= {j["job_id"] for j in document["jobs"]}
    reset = kit("--json", "jobs", "reset", "--yes", "--container", "bookgen-db", env=env)
    assert set(stuck) <= set(json.loads(reset.stdout)["reset"])
    report, _ = triage(env, "--container", "bookgen-db")
    assert report["probes"]["database"]["result"]["mode"] == "container"


def test_hung_docker_daemon_answers_within_ten_seconds(deployment_env, running_stack):
    _, env = deployment_env
    pid = running_stack.engine.process.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        report, elapsed = triage(env)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert elapsed < 10
    containers = report["probes"]["containers"]
    assert not containers["ok"] or not containers["result"]["reachable"]
    # the database was not tried (its address is Docker's to tell), the API answers: say exactly that
    found = incidents(report)
    assert "Database unreachable" not in found, found
    docker = found["Docker does not answer"]
    assert any(e.startswith("dockerd does not answer within") for e in docker["evidence"]), docker
    assert any("the database was not checked" in e for e in docker["evidence"])
    assert any("the API answers" in e for e in docker["evidence"])
    assert report["probes"]["database"]["result"]["checked"] is False


def test_no_docker_socket_is_said_in_words(deployment_env):
    _, env = deployment_env
    env = dict(env, DOCKER_HOST="unix:///nonexistent/docker.sock")
    done = kit("triage", env=env)
    assert done.returncode == 0, done.stderr
    text = done.stdout + done.stderr
    assert "no Docker socket at /nonexistent/docker.sock" in text
    for python_words in ("Errno", "Error(", "Traceback", "Connection aborted"):
        assert python_words not in text, text


def test_docker_stopped_and_database_given_directly(deployment_env, running_stack):
    _, env = deployment_env
    env = dict(env, DOCKER_HOST="unix:///nonexistent/docker.sock")
    dsn = "postgresql://bookgen@%s:5432/bookgen" % running_stack.ip("db")
    report, elapsed = triage(env, "--dsn", dsn + "?password=" + running_stack.db_password)
    assert elapsed < 10
    assert report["probes"]["containers"]["result"]["reachable"] is False
    assert report["probes"]["database"]["result"]["reachable"] is True


def test_remote_docker_host_is_refused(deployment_env):
    _, env = deployment_env
    done = kit("jobs", "stuck", "--container", "bookgen-db", env=dict(env, DOCKER_HOST="tcp://10.1.2.3:2375"))
    assert done.returncode == 2 and "not a local engine" in done.stderr


def test_dsn_with_a_hostname_is_refused(deployment_env):
    _, env = deployment_env
    done = kit("jobs", "stuck", "--dsn", "postgresql://u:p@db.example.org/bookgen", env=env)
    assert done.returncode == 2 and "resolves no names" in done.stderr


def test_disk_space_critical_on_a_full_tmpfs(tmp_path, running_stack):
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], check=True)
    try:
        host = make_host_tree(mount, db_password=running_stack.db_password)
        stat = os.statvfs(mount)
        fill = int(stat.f_bavail * stat.f_frsize - 0.04 * stat.f_blocks * stat.f_frsize)
        with open(mount / "opt" / "bookgen" / "filler.bin", "wb") as handle:
            handle.write(b"\0" * fill)
        env = {"DOCKER_HOST": running_stack.engine.url, "BOOKGEN_KIT_APP_DIR": str(host.app_dir),
               "BOOKGEN_KIT_LOG_DIRS": str(host.log_dir),
               "BOOKGEN_KIT_HEALTH_URL": "http://127.0.0.1:%d/health" % running_stack.api_port}
        report, _ = triage(env)
        critical = incidents(report)["Disk Space Critical"]
        assert any(str(mount) in e for e in critical["evidence"])
        assert any("bookgen-kit cleanup" in s for s in critical["next_steps"])
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_default_health_url_must_be_loopback(deployment_env):
    _, env = deployment_env
    done = kit("triage", env=dict(env, BOOKGEN_KIT_HEALTH_URL="ftp://127.0.0.1/x"))
    assert done.returncode == 2
