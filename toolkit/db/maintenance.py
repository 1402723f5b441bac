"""`db check` and `db repair`: the runbook's "Assess Damage" and "Attempt Repair", with a backup first."""
from __future__ import annotations

from typing import Any, Dict, List

from toolkit.db.backup import create_backup
from toolkit.db.server import Server, quote_ident, quote_literal
from toolkit.errors import KitError


def check_database(server: Server, database: str, allow_extension: bool = False) -> Dict[str, Any]:
    checks: List[Dict[str, Any]] = []

    def add(name: str, ok: bool, detail: str) -> None:
        checks.append({"name": name, "ok": ok, "detail": detail})

    try:
        version = server.server_version()
        add("reachable", True, "%s, PostgreSQL %s" % (server.description, version))
    except KitError as error:
        add("reachable", False, error.message)
        return {"ok": False, "checks": checks}
    row = server.query("SELECT numbackends, xact_commit, xact_rollback, deadlocks, conflicts, "
                       "coalesce(checksum_failures, 0), temp_files FROM pg_stat_database WHERE datname = %s" %
                       quote_literal(database), server.admin_database)
    if not row:
        add("database", False, "no database %s" % database)
        return {"ok": False, "checks": checks}
    backends, commits, rollbacks, deadlocks, conflicts, checksum_failures, temp_files = row[0]
    add("pg_stat_database", int(checksum_failures) == 0,
        "%s connections, %s commits, %s rollbacks, %s deadlocks, %s conflicts, %s checksum failures, %s temp files" % (
            backends, commits, rollbacks, deadlocks, conflicts, checksum_failures, temp_files))
    installed = server.query("SELECT 1 FROM pg_extension WHERE extname = 'amcheck'", database)
    available = server.query("SELECT 1 FROM pg_available_extensions WHERE name = 'amcheck'", database)
    if not installed and not allow_extension:
        add("amcheck", True, "not run: the amcheck extension is not installed (--yes creates it%s)" % (
            "" if available else "; it is not available on this server either"))
    elif not available:
        add("amcheck", True, "not run: amcheck is not available on this server")
    else:
        if not installed:
            server.query("CREATE EXTENSION IF NOT EXISTS amcheck", database)
        indexes = server.query(
            "SELECT c.oid::regclass::text FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
            "JOIN pg_am a ON a.oid = c.relam JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE a.amname = 'btree' AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
            "AND c.relpersistence <> 't' AND i.indisvalid", database)
        corrupt = []
        for (index,) in indexes:
            try:
                server.query("SELECT bt_index_check(%s::regclass, true)" % quote_literal(index), database)
            except KitError as error:
                corrupt.append("%s: %s" % (index, error.message))
        add("amcheck", not corrupt, "; ".join(corrupt[:5]) if corrupt else
            "%d btree indexes checked (bt_index_check with heapallindexed): no corruption" % len(indexes))
    return {"ok": all(c["ok"] for c in checks), "checks": checks}


def repair_database(server: Server, database: str, backups_dir: str, reindex: bool, vacuum_full: bool
                    ) -> List[Dict[str, str]]:
    steps = []
    emergency = create_backup(server, database, backups_dir, prefix="%s-emergency" % database)
    steps.append({"step": "emergency backup", "detail": emergency["dump"]})
    if reindex:
        server.query("REINDEX DATABASE %s" % quote_ident(database), database)
        steps.append({"step": "reindex", "detail": "REINDEX DATABASE %s done" % database})
    if vacuum_full:
        server.query("VACUUM FULL", database)
        steps.append({"step": "vacuum full", "detail": "VACUUM FULL done"})
    return steps
