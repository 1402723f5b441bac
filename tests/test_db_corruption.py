"""The runbook's "Database Corruption" drill on a real PostgreSQL cluster: pages damaged while it was stopped,
then check, salvage backup, restore and repair, judged through the server's own catalogs and pg_restore."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.test_backup import kit
from tests.world import drill
from tests.world.bookgen import make_host_tree
from tests.world.services import start_cluster

JOBS = 30000
HEAP_BLOCKS = [40, 171]  # of biography_jobs
TOAST_BLOCK = 5  # of manuscripts' TOAST table: the heap scan cannot see it, pg_dump and the row reads do
PG_RESTORE = "/usr/lib/postgresql/15/bin/pg_restore"


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    """A cluster of its own with two drill databases, damaged the same way while it was stopped: two heap
    pages of biography_jobs, a page of its status index, and a page of chapters' primary key (a table whose
    heap is whole). Also what the damaged pages held, read before the damage."""
    cluster = start_cluster()
    try:
        with cluster.connect() as conn:
            conn.execute("CREATE ROLE bookgen LOGIN PASSWORD '%s'" % cluster.password)
        lost, totals = {}, {}
        for name in ("drill", "drill_repair"):
            drill.build(cluster, name, JOBS)
            lost[name] = drill.ids_in_blocks(cluster, name, HEAP_BLOCKS)
            with cluster.connect(name) as conn:
                totals[name] = conn.execute("SELECT count(*) FROM biography_jobs").fetchone()[0]
        assert all(len(ids) > 100 for ids in lost.values())
        files = {name: {"biography_jobs": HEAP_BLOCKS, "biography_jobs_status": [3], "chapters_pkey": [4],
                        drill.toast_of(cluster, name, "manuscripts"): [TOAST_BLOCK]}
                 for name in ("drill", "drill_repair")}
        drill.damage_cluster(cluster, files)
        host = make_host_tree(tmp_path_factory.mktemp("drill") / "host")
        env = {"PGPASSWORD": cluster.password, "BOOKGEN_KIT_APP_DIR": str(host.app_dir),
               "DOCKER_HOST": "unix:///nonexistent.sock"}
        dsn = "postgresql://postgres@127.0.0.1:%d/postgres" % cluster.port
        yield cluster, dsn, env, host, lost, totals
    finally:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)


def places(report) -> set:
    return {(d["relation"], d["kind"], d["block"]) for d in report["damage"]}


def test_db_check_names_every_damaged_relation_and_block_and_never_says_ok_unchecked(damaged):
    cluster, dsn, env, host, lost, totals = damaged
    unchecked = kit("--json", "db", "check", "--database", "drill", "--dsn", dsn, env=env)
    assert unchecked.returncode == 6, unchecked.stdout + unchecked.stderr
    report = json.loads(unchecked.stdout)
    assert report["status"] == "not checked" and not report["ok"]
    assert any(c["name"] == "amcheck" and c["ok"] is None and "not checked" in c["detail"] for c in report["checks"])
    reachable = [c for c in report["checks"] if c["name"] == "reachable"][0]
    assert "/drill" in reachable["detail"] and "/postgres" not in reachable["detail"]  # the database asked about

    checked = kit("--json", "db", "check", "--database", "drill", "--dsn", dsn, "--yes", env=env)
    assert checked.returncode == 5, checked.stdout + checked.stderr
    report = json.loads(checked.stdout)
    assert report["status"] == "damaged"
    found = places(report)
    assert {("public.biography_jobs", "heap", b) for b in HEAP_BLOCKS} <= found
    assert ("public.biography_jobs_status", "index", 3) in found and ("public.chapters_pkey", "index", 4) in found
    toast = [d for d in report["damage"] if d["relation"].startswith("pg_toast.")]
    assert [(d["kind"], d["block"]) for d in toast] == [("heap", TOAST_BLOCK)]
    # heap damage is the table's, not reported again under each index of the table
    assert not [d for d in report["damage"] if d["relation"] == "public.biography_jobs_pkey"]
    assert all("invalid page" in d["error"] for d in report["damage"])
    assert "damaged places in drill (listed above)" in checked.stderr


def test_a_dump_that_cannot_read_names_the_cause_and_leaves_nothing(damaged):
    cluster, dsn, env, host, lost, totals = damaged
    out = host.app_dir / "plain-attempt"
    done = kit("backup", "create", "--database", "drill", "--dsn", dsn, "--out", str(out), env=env)
    assert done.returncode == 4, done.stderr
    first = done.stderr.splitlines()[0]
    assert re.search(r"could not read database drill: public\.biography_jobs block 40: invalid page in block 40 "
                     r"of relation base/\d+/\d+$", first), first
    assert "--salvage" in done.stderr and "db check" in done.stderr and "Traceback" not in done.stderr
    assert "SET TRANSACTION SNAPSHOT" not in done.stderr
    assert not list(out.iterdir())  # no .partial, no dump, no sidecar


def test_salvage_set_keeps_every_readable_row_lists_the_loss_and_restores(damaged, tmp_path):
    cluster, dsn, env, host, lost, totals = damaged
    created = kit("--json", "backup", "create", "--database", "drill", "--dsn", dsn, "--salvage", env=env)
    assert created.returncode == 0, created.stdout + created.stderr
    result = json.loads(created.stdout)
    sidecar = json.loads(Path(result["sidecar"]).read_text())
    salvage = sidecar["salvage"]
    table = salvage["tables"]["public.biography_jobs"]
    assert [d["block"] for d in table["damaged_blocks"]] == HEAP_BLOCKS
    assert all(d["relation"] == "public.biography_jobs" for d in table["damaged_blocks"])
    assert table["rows_saved"] == totals["drill"] - len(lost["drill"])
    assert abs(table["rows_lost_estimate"] - len(lost["drill"])) <= 0.1 * len(lost["drill"])
    assert sorted(salvage["tables"]) == ["public.biography_jobs", "public.manuscripts"]  # index damage costs none
    manuscripts = salvage["tables"]["public.manuscripts"]
    assert manuscripts["found_by"].startswith("pg_dump: pg_toast.") and "block %d" % TOAST_BLOCK in \
        manuscripts["found_by"]
    assert 1 <= len(manuscripts["lost_rows"]) <= 3 and manuscripts["damaged_blocks"] == []
    assert manuscripts["rows_saved"] + len(manuscripts["lost_rows"]) == drill.MANUSCRIPTS
    assert all("invalid page in block %d" % TOAST_BLOCK in r["error"] for r in manuscripts["lost_rows"])
    assert sidecar["tables"]["public.biography_jobs"]["rows"] == table["rows_saved"]
    # the outside judges: sha256sum over both files, pg_restore reads the dump, the salvage file is SQL
    sums = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=Path(result["dump"]).parent, capture_output=True,
                          text=True)
    salvage_file = Path(result["salvage"]["file"])
    assert "%s: OK" % salvage_file.name in sums.stdout and "%s: OK" % Path(result["dump"]).name in sums.stdout
    assert subprocess.run([PG_RESTORE, "--list", result["dump"]], capture_output=True).returncode == 0
    assert salvage_file.read_bytes().endswith(b"\\.\n-- end of salvage\n")
    with cluster.connect("drill") as conn:  # the live database was not changed: the damage is still there
        assert conn.execute("SELECT count(*) FROM pg_settings WHERE name = 'zero_damaged_pages' "
                            "AND setting = 'off'").fetchone()[0] == 1

    verified = kit("--json", "backup", "verify", result["dump"], "--restore-test", "--dsn", dsn, env=env)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    checks = {c["name"]: c for c in json.loads(verified.stdout)["checks"]}
    assert checks["salvage file"]["ok"] and "chapters_job_id_fkey" in checks["restore test"]["detail"]

    # restored over the damaged database: the emergency backup of the damaged one is itself a salvage
    restored = kit("--json", "restore", result["dump"], "--database", "drill", "--dsn", dsn, "--yes", env=env)
    assert restored.returncode == 0, restored.stdout + restored.stderr
    report = json.loads(restored.stdout)
    steps = {s["step"]: s for s in report["steps"]}
    assert "a salvage" in steps["emergency backup"]["detail"] and "block 40" in steps["emergency backup"]["detail"]
    assert "chapters_job_id_fkey" in steps["compare"]["detail"]
    with cluster.connect("drill") as conn:
        jobs = {str(r[0]) for r in conn.execute("SELECT job_id FROM biography_jobs")}
        assert len(jobs) == totals["drill"] - len(lost["drill"]) and not jobs & set(lost["drill"])
        assert conn.execute("SELECT count(*) FROM chapters").fetchone()[0] == totals["drill"]  # every healthy row
        assert conn.execute("SELECT count(*) FROM manuscripts WHERE length(body) = 6400").fetchone()[0] == \
            manuscripts["rows_saved"]
        assert conn.execute("SELECT last_value FROM invoice_numbers").fetchone()[0] == 4242
        assert conn.execute("SELECT count(*) FROM failed_jobs").fetchone()[0] > 0
        assert conn.execute("SELECT count(*) FROM pg_largeobject_metadata").fetchone()[0] == 5
        assert conn.execute("SELECT count(*) FROM covers WHERE pgp_sym_decrypt(secret, 'drill') = job_id::text"
                            ).fetchone()[0] == 5
        assert {r[0] for r in conn.execute("SELECT extname FROM pg_extension")} >= {"pgcrypto", "pg_trgm"}
        assert conn.execute("SELECT convalidated FROM pg_constraint WHERE conname = 'chapters_job_id_fkey'"
                            ).fetchone()[0] is False
        assert conn.execute("SELECT has_table_privilege('readonly', 'biography_jobs', 'SELECT')").fetchone()[0]
    with cluster.connect() as conn:
        assert conn.execute("SELECT has_database_privilege('public', 'drill', 'CONNECT')").fetchone()[0] is False
        assert conn.execute("SELECT has_database_privilege('readonly', 'drill', 'CONNECT')").fetchone()[0] is True
    checked = kit("--json", "db", "check", "--database", "drill", "--dsn", dsn, "--yes", env=env)
    assert checked.returncode == 0, checked.stdout  # the restored database is whole
    assert kit("db", "drop-old", report["old_database"], "--yes", "--dsn", dsn, env=env).returncode == 0


def test_encrypted_salvage_set_opens_with_age_and_restores_in_a_throwaway_cluster(damaged, tmp_path):
    cluster, dsn, env, host, lost, totals = damaged
    key = tmp_path / "dba.key"
    subprocess.run(["age-keygen", "-o", str(key)], check=True, capture_output=True)
    recipient = subprocess.run(["age-keygen", "-y", str(key)], capture_output=True, text=True).stdout.strip()
    out = tmp_path / "sets"
    created = kit("--json", "backup", "create", "--database", "drill_repair", "--dsn", dsn, "--salvage", "-r",
                  recipient, "--out", str(out), env=env)
    assert created.returncode == 0, created.stdout + created.stderr
    salvage_file = Path(json.loads(created.stdout)["salvage"]["file"])
    assert salvage_file.name.endswith(".salvage.sql.age")
    plain = subprocess.run(["age", "-d", "-i", str(key), str(salvage_file)], capture_output=True, check=True).stdout
    assert plain.startswith(b"-- bookgen-kit salvage") and plain.endswith(b"-- end of salvage\n")
    verified = kit("--json", "backup", "verify", json.loads(created.stdout)["dump"], "-i", str(key),
                   "--restore-test", "--scratch-cluster", env=env)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    second = json.loads(kit("--json", "backup", "create", "--database", "drill_repair", "--dsn", dsn, "--salvage",
                            "--out", str(out), env=env).stdout)
    listed = json.loads(kit("--json", "backup", "list", str(out), env=env).stdout)
    assert [s["dump"] for s in listed["sets"]] == [json.loads(created.stdout)["dump"], second["dump"]]
    os.utime(second["dump"], (time.time() - 3 * 86400,) * 2)
    plan = json.loads(kit("--json", "backup", "prune", str(out), "--keep-last", "0", "--keep-days", "0", "--apply",
                          env=env).stdout)
    assert plan["deleted"] == [second["dump"]]  # the verified one is kept
    assert not Path(second["salvage"]["file"]).exists() and salvage_file.exists()  # a set goes with its salvage
    # a sidecar edited to name another file as its salvage file: refused by verify, never touched by prune
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    sidecar_path = Path(json.loads(created.stdout)["sidecar"])
    sidecar = json.loads(sidecar_path.read_text())
    sidecar["salvage"]["file"]["file"] = "../precious.txt"
    sidecar_path.write_text(json.dumps(sidecar))
    tampered = kit("--json", "backup", "verify", json.loads(created.stdout)["dump"], "-i", str(key), "--dsn", dsn,
                   env=env)
    assert tampered.returncode == 5 and "not this set's salvage file" in tampered.stdout, tampered.stdout
    os.utime(json.loads(created.stdout)["dump"], (time.time() - 3 * 86400,) * 2)
    kit("backup", "prune", str(out), "--keep-last", "0", "--keep-days", "0", "--apply", env=env)
    assert precious.read_text() == "keep me"


def test_repair_reindexes_what_it_can_after_a_salvage_backup(damaged):
    cluster, dsn, env, host, lost, totals = damaged
    repaired = kit("--json", "db", "repair", "--reindex", "--database", "drill_repair", "--dsn", dsn, env=env)
    assert repaired.returncode == 6, repaired.stdout + repaired.stderr  # biography_jobs' indexes cannot be rebuilt
    steps = {s["step"]: s for s in json.loads(repaired.stdout)["steps"]}
    assert "a salvage" in steps["emergency backup"]["detail"]
    assert Path(steps["emergency backup"]["detail"].split(";")[0]).exists()
    assert "public.biography_jobs_status: invalid page in block" in steps["reindex"]["detail"]
    checked = json.loads(kit("--json", "db", "check", "--database", "drill_repair", "--dsn", dsn, "--yes",
                             env=env).stdout)
    found = places(checked)
    assert not [p for p in found if p[0] == "public.chapters_pkey"]  # only its index was damaged: rebuilt, clean
    assert {("public.biography_jobs", "heap", b) for b in HEAP_BLOCKS} <= found  # the heap damage stays, reported


DATABASE_STATE = """
SELECT json_build_object(
  'owner', pg_get_userbyid(d.datdba), 'comment', shobj_description(d.oid, 'pg_database'),
  'limit', d.datconnlimit, 'public_connect', has_database_privilege('public', d.datname, 'CONNECT'),
  'public_temp', has_database_privilege('public', d.datname, 'TEMPORARY'),
  'readonly_connect', has_database_privilege('readonly', d.datname, 'CONNECT'),
  'settings', (SELECT json_agg(json_build_array(s.setrole <> 0, s.setconfig) ORDER BY s.setrole)
               FROM pg_db_role_setting s WHERE s.setdatabase = d.oid))
FROM pg_database d WHERE d.datname = %s
"""


def database_state(cluster, name):
    with cluster.connect() as conn:
        state = conn.execute(DATABASE_STATE, (name,)).fetchone()[0]
    state["settings"] = [[role, sorted(config)] for role, config in state["settings"] or []]
    return state


def test_restore_gives_back_grants_settings_owner_and_comment(damaged):
    cluster, dsn, env, host, lost, totals = damaged
    drill.build(cluster, "state", 200)
    with cluster.connect() as conn:
        conn.execute("DO $$BEGIN CREATE ROLE ops LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END$$")
        conn.execute("ALTER DATABASE state OWNER TO ops")
    before = database_state(cluster, "state")
    assert before["owner"] == "ops" and before["public_connect"] is False and before["readonly_connect"] is True
    assert [True, ["default_transaction_read_only=on"]] in before["settings"]
    created = json.loads(kit("--json", "backup", "create", "--database", "state", "--dsn", dsn, env=env).stdout)
    sidecar = json.loads(Path(created["sidecar"]).read_text())
    assert re.fullmatch(r"\d+\.\d+", sidecar["pg_dump"]["version"]), sidecar["pg_dump"]["version"]
    assert sidecar["database_properties"]["owner"] == "ops"

    # --into: a new database with the set's owner and everything else, the live one untouched
    into = kit("--json", "restore", created["dump"], "--database", "state", "--into", "state_copy", "--dsn", dsn,
               env=env)
    assert into.returncode == 0, into.stdout + into.stderr
    assert database_state(cluster, "state_copy") == before

    with cluster.connect() as conn:  # the live database drifts: all of it must come back
        conn.execute("GRANT CONNECT, TEMPORARY ON DATABASE state TO PUBLIC")
        conn.execute("ALTER DATABASE state RESET ALL")
        conn.execute("ALTER ROLE readonly IN DATABASE state RESET ALL")
        conn.execute("ALTER DATABASE state OWNER TO bookgen")
        conn.execute("COMMENT ON DATABASE state IS 'changed'")
        conn.execute("ALTER DATABASE state CONNECTION LIMIT -1")
    restored = kit("--json", "restore", created["dump"], "--database", "state", "--dsn", dsn, "--yes", env=env)
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert database_state(cluster, "state") == before
    compare = [s for s in json.loads(restored.stdout)["steps"] if s["step"] == "compare"][0]
    assert "grants, settings" in compare["detail"]

    # a property that cannot be given back fails the comparison; the live database stays as it is
    with cluster.connect() as conn:
        conn.execute("CREATE ROLE auditor")
        conn.execute("ALTER ROLE auditor IN DATABASE state SET work_mem = '1MB'")
    second = json.loads(kit("--json", "backup", "create", "--database", "state", "--dsn", dsn, env=env).stdout)
    with cluster.connect() as conn:
        conn.execute("ALTER ROLE auditor IN DATABASE state RESET ALL")
        conn.execute("DROP ROLE auditor")
        names = sorted(r[0] for r in conn.execute("SELECT datname FROM pg_database"))
    refused = kit("restore", second["dump"], "--database", "state", "--dsn", dsn, "--yes", env=env)
    assert refused.returncode == 5, refused.stdout + refused.stderr
    assert "role auditor" in refused.stderr and "live database is untouched" in refused.stderr
    with cluster.connect() as conn:
        assert sorted(r[0] for r in conn.execute("SELECT datname FROM pg_database")) == names
    assert database_state(cluster, "state") == before


def test_stop_services_without_docker_refuses_before_anything_changes(damaged):
    cluster, dsn, env, host, lost, totals = damaged
    drill.build(cluster, "services", 50)
    created = json.loads(kit("--json", "backup", "create", "--database", "services", "--dsn", dsn, env=env).stdout)
    with cluster.connect() as conn:
        names = sorted(r[0] for r in conn.execute("SELECT datname FROM pg_database"))
    backups = sorted(p.name for p in (host.app_dir / "backups").iterdir())
    done = kit("restore", created["dump"], "--database", "services", "--dsn", dsn, "--yes", "--stop-services",
               "api,worker", env=env)
    assert done.returncode == 4, done.stdout + done.stderr
    assert "--stop-services needs the Docker engine" in done.stderr and "nothing was changed" in done.stderr
    assert "Traceback" not in done.stderr and not list(Path(env["BOOKGEN_KIT_APP_DIR"]).rglob("crash*"))
    with cluster.connect() as conn:
        assert sorted(r[0] for r in conn.execute("SELECT datname FROM pg_database")) == names
    assert sorted(p.name for p in (host.app_dir / "backups").iterdir()) == backups  # no emergency backup either


class StackCluster:
    """The bookgen-db container's cluster, seen the way tests.world.drill sees a cluster."""

    def __init__(self, stack) -> None:
        self.stack = stack
        self.datadir = stack.root / "pgdata"

    def connect(self, dbname: str = "postgres"):
        return self.stack.db_connect(dbname, "postgres")

    def stop(self) -> None:
        container = self.stack.container("db")
        container.kill(signal="SIGINT")  # a fast shutdown: a checkpoint, then exit
        container.wait(timeout=60)

    def start(self) -> None:
        self.stack.ensure_running()


def test_container_mode_salvage_check_and_restore(running_stack, tmp_path):
    """The same drill where BookGen runs it: the cluster in bookgen-db, the kit through the Docker exec API
    (the snapshot is held by one psql session in the container)."""
    cluster = StackCluster(running_stack)
    host = make_host_tree(tmp_path / "host")
    env = {"DOCKER_HOST": running_stack.engine.url, "BOOKGEN_KIT_APP_DIR": str(host.app_dir)}
    try:
        drill.build(cluster, "drillc", 12000)
        lost = drill.ids_in_blocks(cluster, "drillc", [20])
        with cluster.connect("drillc") as conn:
            total = conn.execute("SELECT count(*) FROM biography_jobs").fetchone()[0]
        drill.damage_many(cluster, {"drillc": {"biography_jobs": [20], "chapters_pkey": [2]}}, cluster.stop,
                          cluster.start)
        checked = kit("--json", "db", "check", "--database", "drillc", "--yes", env=env)
        assert checked.returncode == 5, checked.stdout + checked.stderr
        found = places(json.loads(checked.stdout))
        assert ("public.biography_jobs", "heap", 20) in found and ("public.chapters_pkey", "index", 2) in found

        plain = kit("backup", "create", "--database", "drillc", env=env)
        assert plain.returncode == 4 and "public.biography_jobs block 20: invalid page" in plain.stderr, plain.stderr
        created = kit("--json", "backup", "create", "--database", "drillc", "--salvage", env=env)
        assert created.returncode == 0, created.stdout + created.stderr
        result = json.loads(created.stdout)
        sidecar = json.loads(Path(result["sidecar"]).read_text())
        assert sidecar["source"]["mode"] == "container"
        table = sidecar["salvage"]["tables"]["public.biography_jobs"]
        assert [d["block"] for d in table["damaged_blocks"]] == [20]
        assert table["rows_saved"] == total - len(lost)

        restored = kit("--json", "restore", result["dump"], "--database", "drillc", "--into", "drillc_restored",
                       env=env)
        assert restored.returncode == 0, restored.stdout + restored.stderr
        with cluster.connect("drillc_restored") as conn:
            ids = {str(r[0]) for r in conn.execute("SELECT job_id FROM biography_jobs")}
            assert len(ids) == total - len(lost) and not ids & set(lost)
            assert conn.execute("SELECT count(*) FROM chapters").fetchone()[0] == total
        with cluster.connect() as conn:
            assert conn.execute("SELECT has_database_privilege('public', 'drillc_restored', 'CONNECT')"
                                ).fetchone()[0] is False
    finally:
        with cluster.connect() as conn:
            for name in ("drillc", "drillc_restored"):
                conn.execute('DROP DATABASE IF EXISTS "%s" WITH (FORCE)' % name)
