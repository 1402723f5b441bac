"""Base backups, continuous WAL archiving and point-in-time restore, against a real PostgreSQL cluster of its own
(archive_mode needs a restart, and swap mode stops and starts the whole cluster). The outside judges: age, zstd,
tar and pg_verifybackup for every base backup; the rows themselves for the restore."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import interpreter
from tests.world import bookgen
from tests.world.bookgen import make_host_tree
from tests.world.services import launch, start_cluster, wait_until

ROOT = Path(__file__).resolve().parent.parent
BIN = Path("/usr/lib/postgresql/15/bin")
CHECKSUM = "SELECT md5(coalesce(string_agg(t::text, ',' ORDER BY t::text), '')) FROM %s t"
TABLES = ("users", "biography_jobs", "chapters")


def kit(*args, env=None, timeout=600, runner=None):
    """The kit from the source tree, or `runner` (e.g. an old host Python and the pyz) as a responder runs it."""
    environment = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(ROOT), "HOME": "/nonexistent"}
    environment.update(env or {})
    if runner is not None:
        del environment["PYTHONPATH"]
    return subprocess.run(list(runner or [sys.executable, "-m", "toolkit"]) + list(args), capture_output=True,
                          text=True, env=environment, timeout=timeout, stdin=subprocess.DEVNULL)


class World:
    """A cluster with BookGen's database, archiving into APP_DIR/backups/wal, and a DBA's age key."""

    def __init__(self, tmp_path: Path) -> None:
        self.cluster = start_cluster()
        self.host = make_host_tree(self.cluster.root / "host")  # the server's user reaches it (tmp_path is root's)
        self.env = {"PGPASSWORD": self.cluster.password, "BOOKGEN_KIT_APP_DIR": str(self.host.app_dir),
                    "DOCKER_HOST": "unix:///nonexistent.sock"}
        self.dsn = "postgresql://postgres@127.0.0.1:%d/postgres" % self.cluster.port
        self.archive = self.host.app_dir / "backups" / "wal"
        self.key = tmp_path / "dba.key"
        subprocess.run(["age-keygen", "-o", str(self.key)], check=True, capture_output=True, timeout=60)
        self.recipient = subprocess.run(["age-keygen", "-y", str(self.key)], capture_output=True, text=True,
                                        check=True, timeout=60).stdout.strip()
        with self.cluster.connect() as conn:
            conn.execute("CREATE ROLE bookgen LOGIN PASSWORD 'bookgen-pw'")
            conn.execute("CREATE DATABASE bookgen OWNER bookgen")
        with self.connect() as conn:
            bookgen.load_schema(conn)
            bookgen.seed_rows(conn, jobs=200, users=20, seed=5)

    def connect(self):
        return self.cluster.connect("bookgen")

    def checksums(self) -> dict:
        """Each table's rows, hashed (None: the table does not exist, as after the breach)."""
        with self.connect() as conn:
            present = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
            return {t: conn.execute(CHECKSUM % t).fetchone()[0] if t in present else None for t in TABLES}

    def kit(self, *args, timeout=600, runner=None):
        return kit(*args, env=self.env, timeout=timeout, runner=runner)

    def restart(self) -> None:
        """Stop and start the cluster (archive_mode takes effect), whoever started it last."""
        pidfile = self.cluster.datadir / "postmaster.pid"
        if self.cluster.process is not None and self.cluster.process.poll() is None:
            self.cluster.stop()
        else:
            stop_postmaster(self.cluster.datadir)
        wait_until(lambda: not pidfile.exists(), 60, "the cluster to stop")
        launch(self.cluster)

    def enable_archiving(self) -> None:
        done = self.kit("--json", "backup", "wal", "enable", "--dsn", self.dsn)
        assert done.returncode == 0, done.stdout + done.stderr
        assert json.loads(done.stdout)["restart_needed"] is True
        self.restart()
        done = self.kit("--json", "backup", "wal", "enable", "--dsn", self.dsn)
        assert done.returncode == 0, done.stdout + done.stderr
        proof = json.loads(done.stdout)["proof"]
        assert (self.archive / proof["segment"]).is_file()

    def base(self) -> dict:
        done = self.kit("--json", "backup", "base", "--dsn", self.dsn, "-r", self.recipient)
        assert done.returncode == 0, done.stdout + done.stderr
        return json.loads(done.stdout)

    def commit_time(self) -> str:
        """The server's clock now, after a commit: every row written so far is at or before it."""
        with self.connect() as conn:
            return conn.execute("SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', "
                                "'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')").fetchone()[0]

    def after(self, moment: str) -> None:
        """Until the server's clock is past `moment` (so what is written next is after it)."""
        def past() -> bool:
            with self.connect() as conn:
                return conn.execute("SELECT clock_timestamp() > %s::timestamptz", (moment,)).fetchone()[0]
        wait_until(past, 10, "the server's clock to pass %s" % moment)

    def history_with_a_breach(self, tmp_path: Path):
        """Archiving on, a base backup (judged by the outside tools), a row written, the moment T noted, then the
        breach after T. Returns the base backup, the tables' checksums at T, and T."""
        self.enable_archiving()
        base = self.base()
        judge_base(self.key, base, tmp_path)
        with self.connect() as conn:
            conn.execute("INSERT INTO users (email) VALUES ('before@example.org')")
        expected = self.checksums()
        moment = self.commit_time()
        self.after(moment)
        self.breach()
        return base, expected, moment

    def breach(self) -> None:
        with self.connect() as conn:
            conn.execute("INSERT INTO users (email) VALUES ('late@example.org')")
            conn.execute("UPDATE biography_jobs SET status = 'pwned'")
            conn.execute("DROP TABLE chapters")

    def stop(self) -> None:
        if self.cluster.process is not None and self.cluster.process.poll() is None:
            self.cluster.stop()
        stop_postmaster(self.cluster.datadir)
        for path in self.cluster.datadir.parent.glob(self.cluster.datadir.name + ".*"):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            elif path.exists():
                path.unlink()
        shutil.rmtree(self.cluster.root, ignore_errors=True)


def stop_postmaster(datadir: Path) -> None:
    if (datadir / "postmaster.pid").exists():
        subprocess.run([str(BIN / "pg_ctl"), "stop", "-D", str(datadir), "-m", "fast", "-w"], user="postgres",
                       group="postgres", capture_output=True, timeout=120, cwd="/tmp")


@pytest.fixture
def world(tmp_path):
    made = World(tmp_path)
    try:
        yield made
    finally:
        made.stop()


def judge_base(key: Path, base: dict, tmp_path: Path) -> None:
    """age -d | zstd -d | tar -x, then pg_verifybackup: the outside judges, not our code."""
    target = tmp_path / ("judged-%s" % Path(base["base"]).name)
    target.mkdir()
    plain = subprocess.run(["age", "-d", "-i", str(key), base["base"]], capture_output=True, check=True,
                           timeout=300).stdout
    tar = subprocess.run(["zstd", "-d", "-c"], input=plain, capture_output=True, check=True, timeout=300).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=tar, check=True, timeout=300)
    judged = subprocess.run([str(BIN / "pg_verifybackup"), str(target)], capture_output=True, text=True, timeout=300)
    assert judged.returncode == 0 and "successfully verified" in judged.stdout, judged.stdout + judged.stderr
    shutil.rmtree(target)


def test_point_in_time_restore_dump_mode(world, tmp_path):
    base, expected, moment = world.history_with_a_breach(tmp_path)
    verified = world.kit("--json", "backup", "verify", base["base"], "-i", str(world.key))
    assert verified.returncode == 0, verified.stdout + verified.stderr
    checks = {c["name"]: c for c in json.loads(verified.stdout)["checks"]}
    assert checks["pg_verifybackup"]["ok"] and "successfully verified" in checks["pg_verifybackup"]["detail"]
    status = world.kit("--json", "backup", "wal", "status", "--dsn", world.dsn)
    assert status.returncode == 0, status.stdout + status.stderr
    done = world.kit("--json", "restore", str(world.host.app_dir / "backups"), "--target-time", moment, "--dsn",
                     world.dsn, "-i", str(world.key), "--yes")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["base"] == base["base"] and report["mode"] == "dump"
    assert world.checksums() == expected
    steps = [s["step"] for s in report["steps"]]
    assert steps.index("preflight") < steps.index("proof") < steps.index("restore")
    assert report["restore"]["old_database"].startswith("bookgen_pre_restore_")
    with world.cluster.connect(report["restore"]["old_database"]) as conn:  # the breached one, kept
        assert conn.execute("SELECT count(*) FROM biography_jobs WHERE status = 'pwned'").fetchone()[0] > 0
    leftovers = list(world.cluster.datadir.parent.glob(world.cluster.datadir.name + ".pitr-*"))
    assert not leftovers
    with world.cluster.connect() as conn:  # the scratch cluster never archived: one timeline in the archive
        assert conn.execute("SELECT failed_count FROM pg_stat_archiver").fetchone()[0] == 0
    assert not list(world.archive.glob("*.history"))


def test_point_in_time_restore_swap_mode(world, tmp_path, pyz):
    """Run as a responder would on an old host: CPython 3.8 and the pyz (the detached swap starts from it)."""
    base, expected, moment = world.history_with_a_breach(tmp_path)
    with world.cluster.connect() as conn:  # configuration set after the base: today's is kept, not the base's
        conn.execute("ALTER SYSTEM SET work_mem = '7MB'")
    oldest = [interpreter("3.8"), "-I", str(pyz)]
    done = world.kit("--json", "restore", base["base"], "--target-time", moment, "--pitr-mode", "swap", "--dsn",
                     world.dsn, "-i", str(world.key), "--yes", runner=oldest)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert world.checksums() == expected
    old = Path(report["old_data_directory"])
    assert old.is_dir() and (old / "PG_VERSION").exists() and old.name.startswith(world.cluster.datadir.name +
                                                                                   ".pre-pitr-")
    # the swapped-in cluster archives again, on a new timeline, into the same archive
    with world.cluster.connect() as conn:
        assert conn.execute("SELECT timeline_id FROM pg_control_checkpoint()").fetchone()[0] == 2
        assert conn.execute("SHOW work_mem").fetchone()[0] == "7MB"
    wait_until(lambda: (world.archive / "00000002.history").exists(), 60, "the new timeline's history archived")
    # life goes on along timeline 2, then a second breach: a restore to a moment on timeline 2 follows it
    with world.connect() as conn:
        conn.execute("INSERT INTO users (email) VALUES ('after-the-first-restore@example.org')")
    second = world.checksums()
    moment2 = world.commit_time()
    world.after(moment2)
    world.breach()
    done = world.kit("--json", "restore", base["base"], "--target-time", moment2, "--pitr-mode", "swap", "--dsn",
                     world.dsn, "-i", str(world.key), "--yes")
    assert done.returncode == 0, done.stdout + done.stderr
    assert world.checksums() == second
    preflight = [s for s in json.loads(done.stdout)["steps"] if s["step"] == "preflight"][0]["detail"]
    assert "timelines 1, 2 " in preflight, preflight
    # and the first moment is still reachable: along timeline 1, which was current then
    done = world.kit("--json", "restore", base["base"], "--target-time", moment, "--dsn", world.dsn, "-i",
                     str(world.key), "--yes")
    assert done.returncode == 0, done.stdout + done.stderr
    assert world.checksums() == expected


def _segments(world: World, count: int) -> list:
    """`count` segments, each with a commit, switched and archived; the commit times in order."""
    times = []
    for number in range(count):
        with world.connect() as conn:
            conn.execute("INSERT INTO users (email) VALUES (%s)", ("seg-%s@example.org" % uuid.uuid4().hex,))
            name = conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()[0]
        times.append(world.commit_time())
        wait_until(lambda: (world.archive / name).is_file(), 60, "segment %s archived" % name)
    return times


def test_a_gap_in_the_archive_is_found_and_a_restore_past_it_refused(world, tmp_path):
    world.enable_archiving()
    base = world.base()
    times = _segments(world, 4)
    segments = sorted(p.name for p in world.archive.iterdir() if len(p.name) == 24)
    missing = segments[-2]
    (world.archive / missing).unlink()
    status = world.kit("--json", "backup", "wal", "status", "--dsn", world.dsn)
    assert status.returncode == 5, status.stdout + status.stderr
    problems = json.loads(status.stdout)["problems"]
    assert any(missing in p and "gap" in p for p in problems), problems
    databases_before = world.checksums()
    done = world.kit("--json", "restore", base["base"], "--target-time", times[-1], "--dsn", world.dsn, "-i",
                     str(world.key), "--yes")
    assert done.returncode == 5, done.stdout + done.stderr
    message = json.loads(done.stdout)["error"]["message"]
    assert "cannot be reached" in message and missing in message and "last reachable commit is at 20" in message
    assert world.checksums() == databases_before
    assert not list(world.cluster.datadir.parent.glob(world.cluster.datadir.name + ".pitr-*"))


@pytest.mark.parametrize("mode", ["dump", "swap"])
def test_sigkill_during_a_point_in_time_restore_leaves_the_live_cluster_serving(world, mode, tmp_path):
    """Killed anywhere from the preflight to the swap: the live cluster serves (in swap mode after the detached
    swap finishes), with the breached rows or the restored ones, never half; a rerun converges."""
    base, expected, moment = world.history_with_a_breach(tmp_path)
    breached = world.checksums()
    environment = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(ROOT), "HOME": "/nonexistent"}
    environment.update(world.env)
    argv = [sys.executable, "-m", "toolkit", "restore", base["base"], "--target-time", moment, "--pitr-mode", mode,
            "--dsn", world.dsn, "-i", str(world.key), "--yes"]
    rng = random.Random(11)
    for attempt in range(5):
        process = subprocess.Popen(argv, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.5, 6.0))  # a kill point, not a wait: anywhere from preflight to the swap
        process.send_signal(signal.SIGKILL)
        process.wait()
        serving = []
        wait_until(lambda: serving.append(world.checksums()) or True, 120, "the live cluster to serve")
        assert serving[-1] in (breached, expected), serving[-1]
    done = world.kit("--json", "restore", base["base"], "--target-time", moment, "--pitr-mode", mode, "--dsn",
                     world.dsn, "-i", str(world.key), "--yes")
    assert done.returncode == 0, done.stdout + done.stderr
    assert world.checksums() == expected
    assert not list(world.cluster.datadir.parent.glob(world.cluster.datadir.name + ".pitr-*"))
    from toolkit.db.pitr import _run_prefix

    # the killed runs' socket directories too (the cluster's lock file stays)
    assert not [p for p in Path("/tmp").glob(_run_prefix(str(world.cluster.datadir)) + "*") if p.is_dir()]
    with world.cluster.connect() as conn:
        names = [r[0] for r in conn.execute("SELECT datname FROM pg_database")]
    assert not [n for n in names if "_restore_" in n and "_pre_restore_" not in n]


def test_prune_keeps_every_wal_segment_a_kept_base_needs(world, tmp_path):
    """Two base backups with WAL between: pruning the older (a month old) deletes the segments before the newer
    one's start and no other; a point-in-time restore from the newer still works after."""
    world.enable_archiving()
    older = world.base()
    _segments(world, 2)
    newer = world.base()
    sidecar = json.loads(Path(newer["sidecar"]).read_text())
    start = sidecar["label"]["start_segment"]
    _segments(world, 1)
    month_ago = time.time() - 30 * 86400
    for path in (older["base"], older["sidecar"]):
        os.utime(path, (month_ago, month_ago))
    before = sorted(p.name for p in world.archive.iterdir())
    plan = world.kit("--json", "backup", "prune", "--keep-last", "1", "--keep-days", "7", "--apply")
    assert plan.returncode == 0, plan.stdout + plan.stderr
    result = json.loads(plan.stdout)
    assert result["deleted"] == [older["base"]] and not Path(older["base"]).exists()
    after = sorted(p.name for p in world.archive.iterdir())
    gone = set(before) - set(after)
    assert gone and all(name[:24] < start for name in gone), (gone, start)
    assert all(name[:24] >= start or name.endswith(".history") for name in after if len(name) >= 24), after
    with world.connect() as conn:
        conn.execute("INSERT INTO users (email) VALUES ('after-prune@example.org')")
    expected = world.checksums()
    moment = world.commit_time()
    world.after(moment)
    world.breach()
    done = world.kit("--json", "restore", str(world.host.app_dir / "backups"), "--target-time", moment, "--dsn",
                     world.dsn, "-i", str(world.key), "--yes")
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout)["base"] == newer["base"] and world.checksums() == expected


def test_a_restore_point_is_a_target(world, tmp_path):
    """--target-name: the restore point the DBA set before a risky change."""
    world.enable_archiving()
    base = world.base()
    with world.connect() as conn:
        conn.execute("INSERT INTO users (email) VALUES ('before-the-change@example.org')")
        conn.execute("SELECT pg_create_restore_point('before-migration-42')")
    expected = world.checksums()
    world.breach()
    breached = world.checksums()
    argv = ["--json", "restore", base["base"], "--target-name", "before-migration-42", "--dsn", world.dsn, "-i",
            str(world.key), "--yes"]
    # the host is the adversary: the cluster's lock in /tmp planted as a symlink is refused, nothing made through it
    from toolkit.db.pitr import _run_prefix

    planted, aimed = Path("/tmp") / (_run_prefix(str(world.cluster.datadir)) + "lock"), tmp_path / "made-through-it"
    planted.unlink(missing_ok=True)
    planted.symlink_to(aimed)
    try:
        refused = world.kit(*argv)
        assert refused.returncode == 4 and "lock file" in refused.stderr, refused.stdout + refused.stderr
        assert not aimed.exists() and world.checksums() == breached
    finally:
        planted.unlink()
    done = world.kit(*argv)
    assert done.returncode == 0, done.stdout + done.stderr
    assert world.checksums() == expected


def test_container_mode_base_backup_is_judged_by_pg_verifybackup(running_stack, tmp_path):
    """bookgen-db runs: its own pg_basebackup over its local socket, streamed out through sha256, zstd and age."""
    host = make_host_tree(tmp_path / "host")
    env = {"DOCKER_HOST": running_stack.engine.url, "BOOKGEN_KIT_APP_DIR": str(host.app_dir)}
    key = tmp_path / "dba.key"
    subprocess.run(["age-keygen", "-o", str(key)], check=True, capture_output=True, timeout=60)
    recipient = subprocess.run(["age-keygen", "-y", str(key)], capture_output=True, text=True, check=True,
                               timeout=60).stdout.strip()
    done = kit("--json", "backup", "base", "-r", recipient, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    base = json.loads(done.stdout)
    sidecar = json.loads(Path(base["sidecar"]).read_text())
    assert sidecar["source"]["mode"] == "container" and sidecar["pg_basebackup"]["path"].endswith("pg_basebackup")
    judge_base(key, base, tmp_path)
    verified = kit("--json", "backup", "verify", base["base"], "-i", str(key), env={"DOCKER_HOST": "unix:///none"})
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_container_mode_wal_archiving(running_stack, tmp_path):
    """bookgen-db with the compose file's archive volume: enable (restarting the container for archive_mode),
    the proof segment on the host, status clean; a directory on no mount of the container is refused unchanged."""
    host = make_host_tree(tmp_path / "host")
    env = {"DOCKER_HOST": running_stack.engine.url, "BOOKGEN_KIT_APP_DIR": str(host.app_dir)}
    archive = running_stack.root / "wal-archive"
    refused = kit("backup", "wal", "enable", "--archive-dir", str(tmp_path / "elsewhere"), env=env)
    assert refused.returncode == 2 and "not on a writable mount" in refused.stderr, refused.stderr
    db = running_stack.container("db")
    try:
        done = kit("--json", "backup", "wal", "enable", "--archive-dir", str(archive), "--restart", env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        result = json.loads(done.stdout)
        assert result["archive_in_server"] == "/var/lib/postgresql/wal-archive" and result["restarted"]
        assert (archive / result["proof"]["segment"]).is_file()
        status = kit("--json", "backup", "wal", "status", "--archive-dir", str(archive), env=env)
        assert status.returncode == 0, status.stdout + status.stderr
        live = json.loads(status.stdout)["server"]
        assert live["archive_command_ours"] and live["failed_count"] == 0 and live["pg_wal_free_bytes"] > 0
    finally:
        db.exec_run(["psql", "-U", "postgres", "-c", "ALTER SYSTEM RESET archive_command", "-c",
                     "ALTER SYSTEM RESET archive_mode"], user="postgres")
        db.restart(timeout=30)
        wait_until(lambda: running_stack.db_connect("postgres", "postgres").close() is None, 60, "bookgen-db")


def test_container_mode_point_in_time_restore(running_stack, tmp_path, monkeypatch):
    """bookgen-db in container mode: archiving on (the compose file's archive volume), a base backup by its own
    pg_basebackup, rows, T, the breach; `restore --target-time T` replays in a scratch container of bookgen-db's
    image (no network, the archive read-only) and dumps the database as of T into bookgen-db. Exactly the rows
    of T; no scratch container or directory is left. Then swap mode: bookgen-db stopped, its data directory
    replaced by the cluster as of T, started, the old directory kept."""
    host = make_host_tree(tmp_path / "host")
    env = {"DOCKER_HOST": running_stack.engine.url, "BOOKGEN_KIT_APP_DIR": str(host.app_dir)}
    archive = running_stack.root / "wal-archive"
    key = tmp_path / "dba.key"
    subprocess.run(["age-keygen", "-o", str(key)], check=True, capture_output=True, timeout=60)
    recipient = subprocess.run(["age-keygen", "-y", str(key)], capture_output=True, text=True, check=True,
                               timeout=60).stdout.strip()
    db = running_stack.container("db")

    def checksums() -> dict:
        with running_stack.db_connect() as conn:
            present = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
            return {t: conn.execute(CHECKSUM % t).fetchone()[0] if t in present else None for t in TABLES}

    try:
        done = kit("--json", "backup", "wal", "enable", "--archive-dir", str(archive), "--restart", env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        done = kit("--json", "backup", "base", "-r", recipient, env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        base = json.loads(done.stdout)
        assert_waldump_inside_reads_as_the_hosts(running_stack, archive, monkeypatch)
        with running_stack.db_connect() as conn:
            conn.execute("INSERT INTO users (email) VALUES ('before-container@example.org')")
            expected = checksums()
            moment = conn.execute("SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', "
                                  "'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')").fetchone()[0]
            wait_until(lambda: conn.execute("SELECT clock_timestamp() > %s::timestamptz", (moment,)).fetchone()[0],
                       10, "the server's clock to pass T")
            conn.execute("INSERT INTO users (email) VALUES ('late-container@example.org')")
            conn.execute("UPDATE biography_jobs SET status = 'pwned'")
            conn.execute("DROP TABLE chapters")
        assert checksums() != expected
        argv = ["--json", "restore", base["base"], "--target-time", moment, "-i", str(key), "--archive-dir",
                str(archive), "--yes"]
        client = running_stack.client()
        breached = checksums()
        # SIGKILL while the scratch container replays: bookgen-db serves as it was, and the rerun cleans up
        environment = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(ROOT), "HOME": "/nonexistent"}
        killed = subprocess.Popen([sys.executable, "-m", "toolkit"] + argv, env=dict(environment, **env),
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_until(lambda: [c for c in client.containers.list(filters={"label": "bookgen-kit.pitr-of"})
                                if c.name.startswith("bookgen-kit-pitr-")], 120, "the scratch cluster's container")
        finally:
            killed.kill()
            killed.wait()
        assert checksums() == breached
        done = kit(*argv, env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        report = json.loads(done.stdout)
        assert checksums() == expected
        steps = {s["step"]: s["detail"] for s in report["steps"]}
        assert "from bookgen-db's image" in steps["scratch cluster"], steps
        cleaned = [s["detail"] for s in report["steps"] if s["step"] == "cleanup"]
        assert any("removed container bookgen-kit-pitr-" in line for line in cleaned), report["steps"]
        assert not client.containers.list(all=True, filters={"label": "bookgen-kit.pitr-of"})
        assert not list(running_stack.root.glob("pgdata.pitr-*"))
        old = report["restore"]["old_database"]
        assert kit("db", "drop-old", old, "--yes", env=env).returncode == 0
        # swap mode: bookgen-db stopped, its data mount's directory renamed aside (kept), the one as of T in its place
        with running_stack.db_connect() as conn:
            conn.execute("UPDATE biography_jobs SET status = 'pwned-again'")
        db.update(restart_policy={"Name": "always"})  # compose's `restart: always`: "no" during the swap, then back
        swapped = kit(*(argv + ["--pitr-mode", "swap"]), env=env)
        assert swapped.returncode == 0, swapped.stdout + swapped.stderr
        assert checksums() == expected
        assert running_stack.container("db").attrs["HostConfig"]["RestartPolicy"]["Name"] == "always"
        kept = json.loads(swapped.stdout)["old_data_directory"]
        assert Path(kept).parent == running_stack.root and (Path(kept) / "PG_VERSION").is_file()
        assert running_stack.container("db").status == "running"
        assert not client.containers.list(all=True, filters={"label": "bookgen-kit.pitr-of"})
        # SIGKILL once the swap's journal is written: the detached swap (or the next run) finishes it
        with running_stack.db_connect() as conn:
            conn.execute("UPDATE biography_jobs SET status = 'pwned-a-third-time'")
        breached = checksums()
        journal = running_stack.root / "pgdata.pitr-swap.json"
        killed = subprocess.Popen([sys.executable, "-m", "toolkit"] + argv + ["--pitr-mode", "swap"],
                                  env=dict(environment, **env), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            wait_until(journal.exists, 120, "the swap's journal")
        finally:
            killed.kill()
            killed.wait()

        def serving():
            try:
                return checksums()
            except Exception:  # stopped for the swap, or starting
                return None
        wait_until(lambda: serving() in (breached, expected), 120, "bookgen-db serving, breached or as of T")
        rerun = kit(*argv, env=env)
        assert rerun.returncode == 0, rerun.stdout + rerun.stderr
        assert checksums() == expected
        assert not journal.exists() and running_stack.container("db").status == "running"
        assert not Path(str(journal) + ".lock").exists()
        old = json.loads(rerun.stdout)["restore"]["old_database"]
        assert kit("db", "drop-old", old, "--yes", env=env).returncode == 0
    finally:
        db.update(restart_policy={"Name": "no"})
        for path in running_stack.root.glob("pgdata.pre-pitr-*"):
            shutil.rmtree(path, ignore_errors=True)
        db.exec_run(["psql", "-U", "postgres", "-c", "ALTER SYSTEM RESET archive_command", "-c",
                     "ALTER SYSTEM RESET archive_mode"], user="postgres")
        db.restart(timeout=30)
        wait_until(lambda: running_stack.db_connect("postgres", "postgres").close() is None, 60, "bookgen-db")


def assert_waldump_inside_reads_as_the_hosts(running_stack, archive: Path, monkeypatch) -> None:
    """FAKE: this host has pg_waldump 15, as bookgen-db does; a host without one is made by hiding the host's
    tools from the kit, so the runner is bookgen-db's own pg_waldump reading the archive through its mount."""
    from toolkit.db import pitr, wal
    from toolkit.db.server import ContainerServer

    monkeypatch.setenv("DOCKER_HOST", running_stack.engine.url)
    server = ContainerServer("bookgen-db")
    bindir = pitr._container_bindir(server)
    with running_stack.db_connect() as conn:
        conn.execute("INSERT INTO users (email) VALUES ('waldump-probe@example.org')")
    with running_stack.db_connect(user="postgres") as conn:
        name = conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()[0]
    wait_until(lambda: (archive / name).is_file(), 60, "segment %s archived" % name)
    segments = [str(archive / name)]
    on_host = wal.last_commit(pitr._waldump(server, 15, bindir), segments)
    monkeypatch.setattr(pitr, "host_tools", lambda name: [])
    inside = wal.last_commit(pitr._waldump(server, 15, bindir), segments)
    assert on_host and inside == on_host, (on_host, inside)


def test_a_base_backup_rewritten_to_match_its_checksums_is_caught_by_its_manifest(world, tmp_path):
    """An unencrypted base backup whose tar was changed (a data file's bytes) and whose sidecar sha256 was
    rewritten to match: backup verify fails on the manifest (and pg_verifybackup agrees), the PITR refuses
    before the live cluster is touched."""
    import io
    import tarfile

    world.enable_archiving()
    done = world.kit("--json", "backup", "base", "--dsn", world.dsn)
    assert done.returncode == 0, done.stdout + done.stderr
    base = json.loads(done.stdout)
    tar = subprocess.run(["zstd", "-d", "-c", base["base"]], capture_output=True, check=True, timeout=300).stdout
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(tar)) as source, tarfile.open(fileobj=out, mode="w",
                                                                       format=tarfile.USTAR_FORMAT) as target:
        for member in source:
            data = source.extractfile(member).read() if member.isreg() else None
            if member.name == "PG_VERSION":
                data = b"14\n"  # the same size, another cluster's version
            target.addfile(member, io.BytesIO(data) if data is not None else None)
    forged = subprocess.run(["zstd", "-3", "-c"], input=out.getvalue(), capture_output=True, check=True,
                            timeout=300).stdout
    Path(base["base"]).write_bytes(forged)
    sidecar = json.loads(Path(base["sidecar"]).read_text())
    forged_sha256 = __import__("hashlib").sha256(forged).hexdigest()
    sidecar["dump"]["sha256"] = forged_sha256
    Path(base["sidecar"]).write_text(json.dumps(sidecar))
    sums = Path(base["base"]).parent / "SHA256SUMS"
    sums.write_text("".join("%s  %s\n" % (forged_sha256, line.split("  ", 1)[1].strip()) if line.endswith(
        Path(base["base"]).name + "\n") else line for line in sums.read_text().splitlines(True)))
    verified = world.kit("--json", "backup", "verify", base["base"])
    assert verified.returncode == 5, verified.stdout + verified.stderr
    checks = {c["name"]: c for c in json.loads(verified.stdout)["checks"]}
    assert not checks["manifest"]["ok"] and "PG_VERSION" in checks["manifest"]["detail"]
    assert not checks["pg_verifybackup"]["ok"]
    before = world.checksums()
    moment = world.commit_time()
    world.after(moment)
    world.breach()
    breached = world.checksums()
    refused = world.kit("--json", "restore", base["base"], "--target-time", moment, "--dsn", world.dsn, "--yes")
    assert refused.returncode == 5, refused.stdout + refused.stderr
    assert "does not match its manifest (PG_VERSION" in json.loads(refused.stdout)["error"]["message"]
    assert world.checksums() == breached != before


def test_a_failing_archiver_is_a_problem_named_by_status(world):
    """The archive directory taken away from the server's user: the archiver fails, the segment stays in
    pg_wal, and `backup wal status` says so (exit 5) with pg_wal's size against its free space; given back, the
    archiver catches up and status is clean."""
    world.enable_archiving()
    os.chown(world.archive, 0, 0)  # root's now, 0700: the server's user cannot write it
    try:
        with world.connect() as conn:
            conn.execute("INSERT INTO users (email) VALUES ('while-failing@example.org')")
            name = conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()[0]

        def failing() -> bool:
            with world.cluster.connect() as conn:
                return conn.execute("SELECT failed_count > 0 FROM pg_stat_archiver").fetchone()[0]
        wait_until(failing, 60, "the archiver to fail")
        status = world.kit("--json", "backup", "wal", "status", "--dsn", world.dsn)
        assert status.returncode == 5, status.stdout + status.stderr
        problems = json.loads(status.stdout)["problems"]
        assert any("archiver is failing" in p and "MiB free on its filesystem" in p for p in problems), problems
        assert not (world.archive / name).exists()
    finally:
        os.chown(world.archive, world.cluster.datadir.stat().st_uid, world.cluster.datadir.stat().st_gid)
    wait_until(lambda: (world.archive / name).is_file(), 120, "the archiver to catch up")
    wait_until(lambda: world.kit("backup", "wal", "status", "--dsn", world.dsn).returncode == 0, 60,
               "status to be clean")
