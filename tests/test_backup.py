"""backup, verify and restore against the real PostgreSQL cluster and the real bookgen-db container."""
from __future__ import annotations

import gzip
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.world.bookgen import make_host_tree

ROOT = Path(__file__).resolve().parent.parent
CHECKSUM = "SELECT md5(coalesce(string_agg(t::text, ',' ORDER BY t::text), '')) FROM %s t"
TABLES = ("users", "biography_jobs", "chapters", "alembic_version")


def kit(*args, env=None, timeout=300):
    environment = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(ROOT), "HOME": "/nonexistent"}
    environment.update(env or {})
    return subprocess.run([sys.executable, "-m", "toolkit", *args], capture_output=True, text=True,
                          env=environment, timeout=timeout, stdin=subprocess.DEVNULL)


def checksums(connect) -> dict:
    with connect() as conn:
        return {t: conn.execute(CHECKSUM % t).fetchone()[0] for t in TABLES}


def databases(connect) -> list:
    with connect() as conn:
        return sorted(r[0] for r in conn.execute("SELECT datname FROM pg_database"))


@pytest.fixture
def host_setup(pg_database, tmp_path):
    """The database of a test, its admin DSN (password only in PGPASSWORD) and a BookGen tree for backups."""
    cluster = pg_database.cluster
    host = make_host_tree(tmp_path / "host")
    env = {"PGPASSWORD": cluster.password, "BOOKGEN_KIT_APP_DIR": str(host.app_dir),
           "DOCKER_HOST": "unix:///nonexistent.sock"}
    dsn = "postgresql://postgres@127.0.0.1:%d/postgres" % cluster.port
    pg_database.seed(jobs=500, stuck=3, users=20, seed=3)
    return pg_database, dsn, env, host


class ArgvWatcher:
    """Every command line on the machine while a command runs (to prove no password is in one)."""

    def __init__(self) -> None:
        self.seen = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in os.listdir("/proc"):
                if pid.isdigit():
                    try:
                        self.seen.append(Path("/proc", pid, "cmdline").read_bytes())
                    except OSError:
                        pass
            time.sleep(0.005)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def test_host_mode_backup_verify_restore_with_swap(host_setup):
    database, dsn, env, host = host_setup
    before = checksums(database.connect)
    with ArgvWatcher() as watcher:
        created = kit("--json", "backup", "create", "--database", database.name, "--dsn", dsn, env=env)
    assert created.returncode == 0, created.stderr
    assert any(b"pg_dump" in cmdline for cmdline in watcher.seen)  # the watcher saw the child
    assert not any(database.cluster.password.encode() in cmdline for cmdline in watcher.seen)
    assert database.cluster.password not in created.stdout + created.stderr
    result = json.loads(created.stdout)
    dump = Path(result["dump"])
    assert dump.parent == host.app_dir / "backups" and dump.read_bytes()[:5] == b"PGDMP"
    sidecar = json.loads(Path(result["sidecar"]).read_text())
    assert sidecar["tables"]["public.biography_jobs"] == {"rows": 533, "exact": True}  # 30 from the fixture, 503 seeded
    assert sidecar["pg_dump"]["path"].startswith("/usr/lib/postgresql/") and sidecar["pg_dump"]["sha256"]
    listing = subprocess.run(["/usr/lib/postgresql/15/bin/pg_restore", "--list", str(dump)], capture_output=True)
    assert listing.returncode == 0 and b"biography_jobs" in listing.stdout  # the outside judge reads it
    sums = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=dump.parent, capture_output=True, text=True)
    assert dump.name + ": OK" in sums.stdout

    verified = kit("--json", "backup", "verify", str(dump), "--dsn", dsn, env=env)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    tested = kit("--json", "backup", "verify", str(dump), "--restore-test", "--dsn", dsn, env=env)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert any(c["name"] == "restore test" and c["ok"] for c in json.loads(tested.stdout)["checks"])
    assert not [d for d in databases(database.cluster.connect) if "scratch" in d]

    with database.connect() as conn:  # the live database moves on after the backup
        conn.execute("DELETE FROM chapters")
    restored = kit("--json", "restore", str(dump), "--database", database.name, "--dsn", dsn, "--yes", env=env)
    assert restored.returncode == 0, restored.stdout + restored.stderr
    report = json.loads(restored.stdout)
    assert checksums(database.connect) == before
    old = report["old_database"]
    assert old.startswith(database.name + "_pre_restore_") and old in databases(database.cluster.connect)
    assert Path(report["emergency_backup"]).exists()
    with database.cluster.connect(old) as conn:
        assert conn.execute("SELECT count(*) FROM chapters").fetchone()[0] == 0  # the pre-restore state, kept
    listed = json.loads(kit("--json", "backup", "list", "--dsn", dsn, env=env).stdout)
    assert any(s["verified"] for s in listed["sets"])
    assert old in listed["pre_restore_databases"]
    assert kit("db", "drop-old", old, "--yes", "--dsn", dsn, env=env).returncode == 0
    assert old not in databases(database.cluster.connect)
    assert kit("db", "drop-old", database.name, "--yes", "--dsn", dsn, env=env).returncode == 2


def test_damaged_sets_fail_verify_and_restore_refuses(host_setup, tmp_path):
    database, dsn, env, host = host_setup
    dump = Path(json.loads(kit("--json", "backup", "create", "--database", database.name, "--dsn", dsn,
                               env=env).stdout)["dump"])
    before, names = checksums(database.connect), databases(database.cluster.connect)
    truncated = tmp_path / "truncated.dump"
    truncated.write_bytes(dump.read_bytes()[: dump.stat().st_size * 2 // 3])
    flipped = tmp_path / "flipped.dump"
    data = bytearray(dump.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    for damaged in (truncated, flipped):
        done = kit("backup", "verify", str(damaged), "--dsn", dsn, env=env)
        assert done.returncode == 5, (damaged.name, done.stdout, done.stderr)
        refused = kit("restore", str(damaged), "--database", database.name, "--dsn", dsn, "--yes", env=env)
        assert refused.returncode == 5, refused.stderr
        assert "nothing was changed" in refused.stderr
    # with the sidecar beside it, a flipped byte is caught by the checksum before any read
    (dump.parent / "copy.dump").write_bytes(bytes(data))
    (dump.parent / "copy.dump.backup.json").write_text(Path(str(dump) + ".backup.json").read_text())
    checksum = kit("--json", "backup", "verify", str(dump.parent / "copy.dump"), "--dsn", dsn, env=env)
    assert checksum.returncode == 5 and json.loads(checksum.stdout)["checks"][0]["name"] == "checksum"
    assert checksums(database.connect) == before and databases(database.cluster.connect) == names


def test_sigkill_during_restore_leaves_the_live_database_intact(host_setup):
    database, dsn, env, host = host_setup
    database.seed(jobs=20000, users=50, chapters_per_job=3, seed=9)  # a restore that takes a moment
    dump = Path(json.loads(kit("--json", "backup", "create", "--database", database.name, "--dsn", dsn,
                               env=env).stdout)["dump"])
    before = checksums(database.connect)
    environment = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HOME": "/nonexistent"}
    environment.update(env)
    rng = random.Random(7)
    for attempt in range(4):
        process = subprocess.Popen([sys.executable, "-m", "toolkit", "restore", str(dump), "--database",
                                    database.name, "--dsn", dsn, "--yes", "--no-emergency-backup"],
                                   env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3, 2.0))
        process.send_signal(signal.SIGKILL)
        process.wait()
        names = databases(database.cluster.connect)
        assert database.name in names  # never without the live database
        live = checksums(database.connect)
        assert live == before
        for name in names:
            if name.startswith(database.name + "_restore_"):
                assert name.startswith(database.name + "_restore_2")  # named as such
        for name in [n for n in names if "_pre_restore_" in n]:
            kit("db", "drop-old", name, "--yes", "--dsn", dsn, env=env)
    done = kit("--json", "restore", str(dump), "--database", database.name, "--dsn", dsn, "--yes",
               "--no-emergency-backup", env=env)
    assert done.returncode == 0, done.stderr
    assert not [n for n in databases(database.cluster.connect) if "_restore_" in n and "_pre_" not in n]
    assert checksums(database.connect) == before


def test_encrypted_set_round_trips_and_refuses_the_wrong_key(host_setup, tmp_path):
    database, dsn, env, host = host_setup
    key, other = tmp_path / "dba.key", tmp_path / "other.key"
    for path in (key, other):
        subprocess.run(["age-keygen", "-o", str(path)], check=True, capture_output=True)
    recipient = subprocess.run(["age-keygen", "-y", str(key)], capture_output=True, text=True).stdout.strip()
    created = kit("--json", "backup", "create", "--database", database.name, "--dsn", dsn, "-r", recipient, env=env)
    assert created.returncode == 0, created.stderr
    dump = Path(json.loads(created.stdout)["dump"])
    assert dump.name.endswith(".dump.age")
    plain = subprocess.run(["age", "-d", "-i", str(key), str(dump)], capture_output=True, check=True).stdout
    assert plain[:5] == b"PGDMP"
    assert kit("backup", "verify", str(dump), "-i", str(key), "--restore-test", "--dsn", dsn, env=env).returncode == 0
    wrong = kit("backup", "verify", str(dump), "-i", str(other), "--dsn", dsn, env=env)
    assert wrong.returncode == 5 and "no matching identity" in wrong.stdout + wrong.stderr
    into = kit("--json", "restore", str(dump), "-i", str(key), "--into", database.name + "_copy", "--dsn", dsn,
               env=env)
    assert into.returncode == 0, into.stderr
    with database.cluster.connect(database.name + "_copy") as conn:
        assert conn.execute("SELECT count(*) FROM biography_jobs").fetchone()[0] == 533


def test_a_post_quantum_backup_round_trips(host_setup, tmp_path):
    """The DBA's key may be post-quantum (age1pq1...): the set is encrypted to it alone, verify and restore open it."""
    from toolkit.crypto import age

    database, dsn, env, host = host_setup
    key = tmp_path / "dba-pq.key"
    made = kit("--json", "keygen", "--pq", "-o", str(key), env=env)
    assert made.returncode == 0, made.stderr
    recipient = json.loads(made.stdout)["recipient"]
    created = kit("--json", "backup", "create", "--database", database.name, "--dsn", dsn, "-r", recipient, env=env)
    assert created.returncode == 0, created.stderr
    dump = Path(json.loads(created.stdout)["dump"])
    with open(dump, "rb") as handle:
        assert [s.type for s in age.parse_header(handle).stanzas] == [b"mlkem768x25519"]
    assert kit("backup", "verify", str(dump), "-i", str(key), "--restore-test", "--dsn", dsn, env=env).returncode == 0
    into = kit("--json", "restore", str(dump), "-i", str(key), "--into", database.name + "_pq", "--dsn", dsn,
               env=env)
    assert into.returncode == 0, into.stderr
    with database.cluster.connect(database.name + "_pq") as conn:
        assert conn.execute("SELECT count(*) FROM biography_jobs").fetchone()[0] == 533


def test_sql_gz_backup_restores_through_psql(host_setup):
    database, dsn, env, host = host_setup
    before = checksums(database.connect)
    sql = subprocess.run(["/usr/lib/postgresql/15/bin/pg_dump", "-h", "127.0.0.1", "-p", str(database.cluster.port),
                          "-U", "postgres", database.name], capture_output=True, check=True,
                         env={"PGPASSWORD": database.cluster.password}).stdout
    path = host.app_dir / "backups" / "bookgen_20261125_020000.sql.gz"
    path.write_bytes(gzip.compress(sql))
    done = kit("--json", "restore", str(path), "--database", database.name, "--dsn", dsn, "--yes", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert checksums(database.connect) == before
    assert any("_pre_restore_" in n for n in databases(database.cluster.connect))


def test_a_pg_dump_older_than_the_server_is_refused(host_setup, tmp_path):
    """FAKE: no older PostgreSQL client can be installed here, so a script answers --version as pg_dump 12 does."""
    database, dsn, env, host = host_setup
    fake = tmp_path / "pg12" / "bin"
    fake.mkdir(parents=True)
    script = fake / "pg_dump"
    script.write_text("#!/bin/sh\necho 'pg_dump (PostgreSQL) 12.18'\n")
    script.chmod(0o755)
    env = dict(env, BOOKGEN_KIT_PG_BIN=str(fake))
    done = kit("backup", "create", "--database", database.name, "--dsn", dsn, env=env)
    assert done.returncode == 0  # the newer host pg_dump 15 is chosen over the old one
    # with only the old one in reach, the kit refuses and says which version it needs
    env = dict(env, BOOKGEN_KIT_PG_BIN=str(fake), BOOKGEN_KIT_PG_BIN_ONLY="1")
    done = kit("backup", "create", "--database", database.name, "--dsn", dsn, env=env)
    assert done.returncode == 4
    assert "pg_dump 15 or newer is needed" in done.stderr and "12.18" in done.stderr


def test_list_prune_keep_and_db_check(host_setup):
    database, dsn, env, host = host_setup
    (host.app_dir / "backups" / "bookgen_20261101_020000.sql.gz").unlink()  # only this test's sets
    dumps = []
    for _ in range(3):
        dumps.append(json.loads(kit("--json", "backup", "create", "--database", database.name, "--dsn", dsn,
                                    env=env).stdout)["dump"])
        time.sleep(1.1)
    for age_days, dump in zip((32, 31, 30), dumps):
        stamp = time.time() - age_days * 86400
        os.utime(dump, (stamp, stamp))
    assert kit("backup", "keep", dumps[0], env=env).returncode == 0
    plan = json.loads(kit("--json", "backup", "prune", "--keep-last", "1", "--keep-days", "7", env=env).stdout)
    assert dumps[0] in plan["keep"] and dumps[-1] in plan["keep"] and plan["delete"] == [dumps[1]]
    assert Path(dumps[1]).exists()
    applied = json.loads(kit("--json", "backup", "prune", "--keep-last", "1", "--keep-days", "7", "--apply",
                             env=env).stdout)
    assert applied["deleted"] == [dumps[1]] and not Path(dumps[1]).exists()
    listed = json.loads(kit("--json", "backup", "list", "--max-age", "1", env=env).stdout)
    assert "hours old" in listed["warning"] or listed["warning"] is None
    checked = kit("--json", "db", "check", "--database", database.name, "--dsn", dsn, "--yes", env=env)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    report = json.loads(checked.stdout)
    assert report["status"] == "ok" and report["damage"] == []
    assert [c["detail"] for c in report["checks"] if c["name"] in ("heap", "indexes")] == ["no damage"] * 2


def test_container_mode_round_trip(running_stack, tmp_path):
    host = make_host_tree(tmp_path / "host")
    env = {"DOCKER_HOST": running_stack.engine.url, "BOOKGEN_KIT_APP_DIR": str(host.app_dir)}

    def connect():
        return running_stack.db_connect()

    before = checksums(connect)
    with ArgvWatcher() as watcher:
        created = kit("--json", "backup", "create", env=env)  # bookgen-db runs: the container's own pg_dump
    assert created.returncode == 0, created.stderr
    assert not any(running_stack.db_password.encode() in c or running_stack.superuser_password.encode() in c
                   for c in watcher.seen)
    result = json.loads(created.stdout)
    sidecar = json.loads(Path(result["sidecar"]).read_text())
    assert sidecar["source"]["mode"] == "container" and sidecar["pg_dump"]["inside_container"] == "bookgen-db"
    dump = result["dump"]
    assert kit("backup", "verify", dump, "--restore-test", env=env).returncode == 0
    with connect() as conn:
        conn.execute("UPDATE biography_jobs SET status = 'tampered'")
    restored = kit("--json", "restore", dump, "--yes", "--stop-services", "api,worker", env=env)
    assert restored.returncode == 0, restored.stdout + restored.stderr
    report = json.loads(restored.stdout)
    assert checksums(connect) == before
    assert running_stack.container("api").status == "running" and running_stack.container("worker").status == \
        "running"
    steps = [s["step"] for s in report["steps"]]
    assert steps.index("stop services") < steps.index("swap") < steps.index("start services")
    assert kit("db", "drop-old", report["old_database"], "--yes", env=env).returncode == 0


def test_restore_test_in_a_scratch_cluster_and_repair(host_setup):
    database, dsn, env, host = host_setup
    dump = json.loads(kit("--json", "backup", "create", "--database", database.name, "--dsn", dsn, env=env).stdout)
    done = kit("--json", "backup", "verify", dump["dump"], "--restore-test", "--scratch-cluster", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    checks = {c["name"]: c for c in json.loads(done.stdout)["checks"]}
    assert checks["restore test"]["ok"] and "throwaway cluster" in checks["restore test"]["detail"]
    assert not [p for p in Path("/tmp").glob("bookgen-kit-scratch-*")]  # removed
    sidecar = json.loads(Path(dump["sidecar"]).read_text())
    assert sidecar["verified"][-1]["scratch_cluster"] is True
    repaired = kit("--json", "db", "repair", "--reindex", "--database", database.name, "--dsn", dsn, env=env)
    assert repaired.returncode == 0, repaired.stderr
    steps = json.loads(repaired.stdout)["steps"]
    assert steps[0]["step"] == "emergency backup" and Path(steps[0]["detail"]).exists()
    assert steps[1]["step"] == "reindex"


def test_restore_migrate_runs_alembic_in_the_api_container(running_stack, tmp_path):
    """FAKE: BookGen's api image (with alembic) cannot be built here; the busybox api container gets an
    `alembic` script that records its arguments, so the exec the restore runs is real."""
    host = make_host_tree(tmp_path / "host")
    env = {"DOCKER_HOST": running_stack.engine.url, "BOOKGEN_KIT_APP_DIR": str(host.app_dir)}
    api = running_stack.container("api")
    script = "#!/bin/sh\necho \"$@\" > /tmp/alembic-ran\necho INFO upgrade done\n"
    written = api.exec_run(["sh", "-c", "printf '%s' > /bin/alembic && chmod 755 /bin/alembic" %
                            script.replace("\n", "\\n")])
    assert written.exit_code == 0
    dump = json.loads(kit("--json", "backup", "create", env=env).stdout)["dump"]
    try:
        done = kit("--json", "restore", dump, "--yes", "--migrate", "--no-emergency-backup", env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        steps = {s["step"]: s for s in json.loads(done.stdout)["steps"]}
        assert steps["migrate"]["ok"] and "upgrade head" in steps["migrate"]["detail"]
        assert api.exec_run(["cat", "/tmp/alembic-ran"]).output.strip() == b"upgrade head"
        kit("db", "drop-old", json.loads(done.stdout)["old_database"], "--yes", env=env)
    finally:
        api.exec_run(["rm", "-f", "/bin/alembic", "/tmp/alembic-ran"])


NO_SERVER = {"BOOKGEN_KIT_APP_DIR": "/nonexistent/bookgen", "DOCKER_HOST": "unix:///nonexistent.sock"}


def test_verify_on_a_workstation_needs_no_server_nor_env(host_setup, tmp_path):
    """A set copied to a workstation (no .env, no Docker, no --dsn): checksums, age decryption with the key
    given, a full read with this host's pg_restore; a flipped byte fails (5); no key for an encrypted set is one
    line, never a pass."""
    database, dsn, env, host = host_setup
    identity = tmp_path / "dba.key"
    subprocess.run(["age-keygen", "-o", str(identity)], check=True, capture_output=True, timeout=60)
    recipient = subprocess.run(["age-keygen", "-y", str(identity)], capture_output=True, text=True,
                               check=True, timeout=60).stdout.strip()
    plain = json.loads(kit("--json", "backup", "create", "--database", database.name, "--dsn", dsn,
                           env=env).stdout)["dump"]
    sealed = json.loads(kit("--json", "backup", "create", "--database", database.name, "--dsn", dsn, "-r",
                            recipient, env=env).stdout)["dump"]
    workstation = tmp_path / "workstation"
    workstation.mkdir()
    for path in (plain, sealed):
        for name in (Path(path).name, Path(path).name + ".backup.json"):
            (workstation / name).write_bytes((Path(path).parent / name).read_bytes())
    for name, extra in ((Path(plain).name, []), (Path(sealed).name, ["-i", str(identity)])):
        done = kit("--json", "backup", "verify", str(workstation / name), *extra, env=NO_SERVER)
        assert done.returncode == 0, done.stdout + done.stderr
        checks = {c["name"]: c for c in json.loads(done.stdout)["checks"]}
        assert checks["checksum"]["ok"] and "/usr/lib/postgresql/" in checks["full read"]["detail"]
    keyless = kit("backup", "verify", str(workstation / Path(sealed).name), env=NO_SERVER)
    assert keyless.returncode not in (0, 1) and "Traceback" not in keyless.stderr
    assert len([line for line in keyless.stderr.splitlines() if line.startswith("bookgen-kit: error:")]) == 1
    data = bytearray((workstation / Path(plain).name).read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped = workstation / "flipped.dump"
    flipped.write_bytes(bytes(data))  # no sidecar: only the full read can find it
    done = kit("--json", "backup", "verify", str(flipped), env=NO_SERVER)
    assert done.returncode == 5, done.stdout + done.stderr


def test_restore_drops_leftovers_only_once_the_set_is_proven(host_setup, tmp_path):
    database, dsn, env, host = host_setup
    dump = Path(json.loads(kit("--json", "backup", "create", "--database", database.name, "--dsn", dsn,
                               env=env).stdout)["dump"])
    leftover = database.name + "_restore_20200101T000000Z"  # what a killed run leaves
    with database.cluster.connect() as conn:
        conn.autocommit = True
        conn.execute('CREATE DATABASE "%s"' % leftover)
    truncated = tmp_path / "truncated.dump"
    truncated.write_bytes(dump.read_bytes()[: dump.stat().st_size // 2])
    refused = kit("restore", str(truncated), "--database", database.name, "--dsn", dsn, "--yes", env=env)
    assert refused.returncode == 5 and "nothing was changed" in refused.stderr, refused.stderr
    assert leftover in refused.stderr and leftover in databases(database.cluster.connect)
    done = kit("--json", "restore", str(dump), "--database", database.name, "--dsn", dsn, "--yes",
               "--no-emergency-backup", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    steps = [s["step"] for s in json.loads(done.stdout)["steps"]]
    assert steps.index("preflight") < steps.index("cleanup") < steps.index("restore")
    assert leftover not in databases(database.cluster.connect)
    kit("db", "drop-old", json.loads(done.stdout)["old_database"], "--yes", "--dsn", dsn, env=env)


def test_a_restore_that_fails_after_stop_services_starts_them_again(running_stack, tmp_path):
    """The comparison fails after api and worker were stopped (the sidecar promises a row the set does not
    hold): both are started again and the error says so; then a migration that fails with --keep-stopped
    leaves the worker stopped, and says so. FAKE: the api image's alembic is a busybox script (see above)."""
    host = make_host_tree(tmp_path / "host")
    env = {"DOCKER_HOST": running_stack.engine.url, "BOOKGEN_KIT_APP_DIR": str(host.app_dir)}
    api, worker = running_stack.container("api"), running_stack.container("worker")

    def connect():
        return running_stack.db_connect()

    created = json.loads(kit("--json", "backup", "create", env=env).stdout)
    before = checksums(connect)
    sidecar_path = Path(created["sidecar"])
    honest = sidecar_path.read_text()
    sidecar = json.loads(honest)
    sidecar["tables"]["public.users"]["rows"] += 1
    sidecar_path.write_text(json.dumps(sidecar))
    try:
        done = kit("--json", "restore", created["dump"], "--yes", "--stop-services", "api,worker",
                   "--no-emergency-backup", env=env)
        assert done.returncode == 5, done.stdout + done.stderr
        error = json.loads(done.stdout)["error"]
        assert error["details"]["services"] == {api.name: "running", worker.name: "running"}, error
        assert "services: %s running, %s running" % (api.name, worker.name) in done.stderr
        assert running_stack.container("api").status == running_stack.container("worker").status == "running"
        assert checksums(connect) == before
        sidecar_path.write_text(honest)
        failing = "#!/bin/sh\necho ERROR revision not found >&2\nexit 1\n"  # printf's format: no quotes in it
        assert api.exec_run(["sh", "-c", "printf '%s' > /bin/alembic && chmod 755 /bin/alembic" %
                             failing.replace("\n", "\\n")]).exit_code == 0
        done = kit("--json", "restore", created["dump"], "--yes", "--stop-services", "api,worker", "--migrate",
                   "--keep-stopped", "--no-emergency-backup", env=env)
        assert done.returncode == 4, done.stdout + done.stderr
        details = json.loads(done.stdout)["error"]["details"]
        assert details["services"] == {api.name: "running", worker.name: "exited (--keep-stopped)"}, details
        assert running_stack.container("worker").status == "exited"
        assert [s["step"] for s in details["steps"]][-2:] == ["migrate", "services after the failure"]
        old = [s for s in details["steps"] if s["step"] == "swap"][0]["detail"].split(" is now ")[1].split()[0]
        kit("db", "drop-old", old, "--yes", env=env)
    finally:
        sidecar_path.write_text(honest)
        running_stack.container("api").exec_run(["rm", "-f", "/bin/alembic"])
        if running_stack.container("worker").status != "running":
            running_stack.container("worker").start()


def test_an_interrupted_container_mode_dump_leaves_no_pg_dump_behind(running_stack, tmp_path):
    """pg_dump runs inside bookgen-db through the exec API, which has no kill call: interrupted, the kit signals
    the exec's process itself. A session holds a lock pg_dump waits for, so the interrupt comes mid-dump."""
    from tests.world.services import wait_until

    host = make_host_tree(tmp_path / "host")
    environment = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(ROOT), "HOME": "/nonexistent",
                   "DOCKER_HOST": running_stack.engine.url, "BOOKGEN_KIT_APP_DIR": str(host.app_dir)}
    db = running_stack.container("db")

    def ours_in_container():  # pg_dump, and psql holding its snapshot
        return [row[-1] for row in db.top(ps_args="-eo pid,args")["Processes"] if "/bin/pg_dump " in row[-1] or
                "/bin/psql " in row[-1]]

    def dump_waits(conn):
        assert process.poll() is None, process.communicate()
        return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'bookgen-kit' AND "
                            "wait_event_type = 'Lock' AND query LIKE 'LOCK TABLE%'").fetchone()[0] > 0

    with running_stack.db_connect() as locker, running_stack.db_connect(user="postgres") as watcher:
        locker.execute("BEGIN")
        locker.execute("LOCK TABLE chapters IN ACCESS EXCLUSIVE MODE")
        # ^C's default action, even when this run's own SIGINT is ignored (started in the background by a shell)
        process = subprocess.Popen([sys.executable, "-X", "faulthandler", "-m", "toolkit", "backup", "create"],
                                   env=environment, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            wait_until(lambda: dump_waits(watcher), 120, "pg_dump waiting for the lock")
            assert any("/bin/pg_dump " in command for command in ours_in_container())
            process.send_signal(signal.SIGINT)
            # promptly: the snapshot's psql is in a count waiting on the same lock, and is killed, not waited for
            try:
                _, stderr = process.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                process.send_signal(signal.SIGABRT)  # faulthandler: where each thread waits
                raise AssertionError("the kit did not end within 20 s of ^C:\n%s" % process.communicate()[1].decode(
                    "utf-8", "replace")[-6000:]) from None
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        assert process.returncode == 130, stderr
        # gone while the lock is still held: not a dump that went on to finish once the lock was released
        wait_until(lambda: not ours_in_container(), 30, "pg_dump and psql gone from bookgen-db")
        locker.execute("ROLLBACK")
    assert not list((host.app_dir / "backups").glob("*.dump")), "an interrupted dump left a set that looks whole"
