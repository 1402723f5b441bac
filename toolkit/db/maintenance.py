"""`db check` and `db repair`: the runbook's "Assess Damage" and "Attempt Repair", with a backup first.

Invariants:
- check reads only; it creates the amcheck extension only when told to (--yes), and without amcheck it
  says "not checked" (a partial result), never "ok";
- every table (heap, TOAST, materialized view) is checked by verify_heapam and every btree index by
  bt_index_check, each reported by relation and block; a page that cannot even be read stops neither the
  relation's check (it goes on after that block) nor the database's;
- an index is checked against its table (heapallindexed) only when that table's heap is clean, so heap
  damage is reported under the table, not under each of its indexes;
- repair backs up first (a salvage when pages cannot be read), unless told not to.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

from toolkit.db import damage
from toolkit.db.server import ReadFailed, Server, quote_literal
from toolkit.errors import KitError

QUALIFIED = "(SELECT n.nspname || '.' || c.relname FROM pg_namespace n WHERE n.oid = c.relnamespace)"
HEAPS = ("SELECT c.oid, %s, pg_relation_size(c.oid) / current_setting('block_size')::int "
         "FROM pg_class c WHERE c.relkind IN ('r', 'm', 't') AND c.relpersistence <> 't' "
         "AND (c.relkind <> 'm' OR c.relispopulated) ORDER BY 2" % QUALIFIED)
BTREES = ("SELECT c.oid, %s, i.indrelid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
          "JOIN pg_am a ON a.oid = c.relam WHERE a.amname = 'btree' AND c.relpersistence <> 't' AND i.indisready "
          "AND i.indisvalid ORDER BY 2" % QUALIFIED)
Query = Callable[[str], List[List[Optional[str]]]]
OTHER_INDEXES = ("SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am a "
                 "ON a.oid = c.relam WHERE a.amname <> 'btree'")


def check_heap(query: Query, oid: str, name: str, blocks: int) -> List[Dict[str, Any]]:
    """verify_heapam over the whole relation: its findings, and each block it could not read at all."""
    found: List[Dict[str, Any]] = []
    start = 0
    while start < max(blocks, 1):
        try:
            rows = query("SELECT blkno, offnum, attnum, msg FROM verify_heapam(%s::oid::regclass, "
                         "on_error_stop => false, check_toast => true, skip => 'none', startblock => %d)"
                         % (quote_literal(oid), start) if blocks else
                         "SELECT blkno, offnum, attnum, msg FROM verify_heapam(%s::oid::regclass)" % quote_literal(oid))
        except ReadFailed as error:
            named = damage.parse(error.message, query)
            found.append({"relation": name, "kind": "heap", "block": named.block, "offset": None,
                          "error": named.error})
            if named.block is None or named.block < start:
                break
            start = named.block + 1
            continue
        for block, offset, attribute, message in rows:
            found.append({"relation": name, "kind": "heap", "block": int(block) if block is not None else None,
                          "offset": int(offset) if offset is not None else None, "error": message})
        break
    return found


def check_btree(query: Query, oid: str, name: str, with_heap: bool) -> Optional[Dict[str, Any]]:
    try:
        query("SELECT bt_index_check(%s::oid::regclass, %s)" % (quote_literal(oid), "true" if with_heap else "false"))
        return None
    except ReadFailed as error:
        named = damage.parse(error.message, query)
        return {"relation": name, "kind": "index", "block": named.block, "offset": None, "error": named.error}


def _find(items: List[Any], check: Callable[[List[Any]], None]) -> List[Any]:
    """The items whose check fails: the whole list in one statement, halves of a failing list in turn."""
    if not items:
        return []
    try:
        check(items)
        return []
    except ReadFailed:
        if len(items) == 1:
            return items
        middle = len(items) // 2
        return _find(items[:middle], check) + _find(items[middle:], check)


def _oids(items: List[Any]) -> str:
    return ", ".join(quote_literal(item[0]) + "::oid" for item in items)


def _amcheck(query: Query) -> Tuple[List[Dict[str, Any]], str]:
    """One statement checks every heap (and one every index); only the relations in a statement that fails
    (a page that cannot be read at all) are checked one by one."""
    heaps = query(HEAPS)
    damaged: List[Dict[str, Any]] = []

    def heaps_at_once(items: List[Any]) -> None:
        for name, block, offset, message in query(
                "SELECT %s, v.blkno, v.offnum, v.msg FROM pg_class c, verify_heapam(c.oid, check_toast => true) v "
                "WHERE c.oid IN (%s)" % (QUALIFIED, _oids(items))):
            damaged.append({"relation": name, "kind": "heap", "block": int(block) if block is not None else None,
                            "offset": int(offset) if offset is not None else None, "error": message})

    for oid, name, blocks in _find(heaps, heaps_at_once):
        damaged += check_heap(query, oid, name, int(blocks))
    oids = {name: oid for oid, name, _b in heaps}
    dirty_tables = {oids.get(d["relation"]) for d in damaged}
    indexes = query(BTREES)

    def indexes_at_once(items: List[Any]) -> None:
        query("SELECT bool_and(bt_index_check(c.oid, i.indrelid::text NOT IN (%s))) FROM pg_class c "
              "JOIN pg_index i ON i.indexrelid = c.oid WHERE c.oid IN (%s)" % (
                  ", ".join(quote_literal(t) for t in sorted(t for t in dirty_tables if t)) or "''", _oids(items)))

    for oid, name, table in _find(indexes, indexes_at_once):
        problem = check_btree(query, oid, name, table not in dirty_tables)
        if problem:
            damaged.append(problem)
    others = int(query(OTHER_INDEXES)[0][0])
    said = "%d heaps (verify_heapam, with TOAST) and %d btree indexes (bt_index_check)" % (len(heaps), len(indexes))
    if others:
        said += "; %d indexes of other kinds (GIN, GiST, BRIN, hash) amcheck cannot check" % others
    return damaged, said


def check_database(server: Server, database: str, allow_extension: bool = False) -> Dict[str, Any]:
    """checks: [{name, ok (True, False, or None: not checked), detail}]; damage: every damaged place."""
    checks: List[Dict[str, Any]] = []

    def add(name: str, ok: Optional[bool], detail: str) -> None:
        checks.append({"name": name, "ok": ok, "detail": detail})

    def verdict(damage_found: List[Dict[str, Any]]) -> Dict[str, Any]:
        failed = [c for c in checks if c["ok"] is False]
        unchecked = [c for c in checks if c["ok"] is None]
        return {"ok": not failed and not unchecked, "status": "damaged" if failed else (
            "not checked" if unchecked else "ok"), "database": database, "checks": checks, "damage": damage_found}

    try:
        version = server.server_version()
        add("reachable", True, "database %s on %s, PostgreSQL %s" % (database, server.description_of(database),
                                                                    version))
    except KitError as error:
        add("reachable", False, error.message)
        return verdict([])
    row = server.query("SELECT numbackends, xact_commit, xact_rollback, deadlocks, conflicts, "
                       "coalesce(checksum_failures, 0), temp_files FROM pg_stat_database WHERE datname = %s" %
                       quote_literal(database), server.admin_database)
    if not row:
        add("database", False, "no database %s" % database)
        return verdict([])
    backends, commits, rollbacks, deadlocks, conflicts, checksum_failures, temp_files = row[0]
    add("pg_stat_database", int(checksum_failures) == 0,
        "%s connections, %s commits, %s rollbacks, %s deadlocks, %s conflicts, %s checksum failures, %s temp files" % (
            backends, commits, rollbacks, deadlocks, conflicts, checksum_failures, temp_files))
    installed = server.query("SELECT 1 FROM pg_extension WHERE extname = 'amcheck'", database)
    available = server.query("SELECT 1 FROM pg_available_extensions WHERE name = 'amcheck'", database)
    if not available:
        add("amcheck", None, "not checked: amcheck is not available on this server (postgresql-contrib)")
        return verdict([])
    if not installed and not allow_extension:
        add("amcheck", None, "not checked: the amcheck extension is not installed in %s (--yes creates it, "
                             "which changes the database)" % database)
        return verdict([])
    if not installed:
        server.query("CREATE EXTENSION IF NOT EXISTS amcheck", database)
    session = server.session(database)
    try:
        damaged, said = _amcheck(session.query)
    finally:
        session.close()
    heap = [d for d in damaged if d["kind"] == "heap"]
    index = [d for d in damaged if d["kind"] == "index"]
    add("heap", not heap, "; ".join(_place(d) for d in heap[:10]) + (" (and %d more)" % (len(heap) - 10)
                                                                      if len(heap) > 10 else "") if heap else
        "no damage")
    add("indexes", not index, "; ".join(_place(d) for d in index[:10]) if index else "no damage")
    add("amcheck", True, said)
    return verdict(damaged)


def _place(found: Dict[str, Any]) -> str:
    where = found["relation"]
    if found["block"] is not None:
        where += " block %d" % found["block"]
    if found.get("offset") is not None:
        where += " item %d" % found["offset"]
    return "%s: %s" % (where, found["error"])


def reindex_each(server: Server, database: str) -> Tuple[List[str], List[str]]:
    """REINDEX INDEX, one index at a time (the runbook's REINDEX DATABASE stops at the first index whose table
    has a damaged page; the others are still rebuilt)."""
    rebuilt, failed = [], []
    session = server.session(database)
    try:
        for name, sql_name in session.query(
                "SELECT n.nspname || '.' || c.relname, format('%I.%I', n.nspname, c.relname) FROM pg_index i "
                "JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname <> 'pg_catalog' AND n.nspname NOT LIKE 'pg\\_temp%' AND c.relpersistence <> 't' "
                "ORDER BY 1"):
            try:
                session.query("REINDEX INDEX %s" % sql_name)
                rebuilt.append(name)
            except ReadFailed as error:
                failed.append("%s: %s" % (name, error.message))
    finally:
        session.close()
    return rebuilt, failed


def repair_database(server: Server, database: str, backups_dir: str, reindex: bool, vacuum_full: bool,
                    emergency_backup: bool = True) -> List[Dict[str, str]]:
    from toolkit.db.restore import emergency_backup as back_up

    steps = []
    if emergency_backup:
        emergency = back_up(server, database, backups_dir)
        salvage = emergency.get("salvage")
        steps.append({"step": "emergency backup", "detail": emergency["dump"] + (
            "; a salvage: about %d rows lost (%s)" % (salvage["rows_lost_estimate"], "; ".join(
                salvage["damaged"][:5])) if salvage else "")})
    else:
        steps.append({"step": "emergency backup", "detail": "skipped (--no-emergency-backup)"})
    if reindex:
        rebuilt, failed = reindex_each(server, database)
        steps.append({"step": "reindex", "ok": not failed, "detail": "%d indexes rebuilt%s" % (len(rebuilt), (
            "; not rebuilt (their table cannot be read: restore it from a set): " + "; ".join(failed)) if failed
            else "")})
    if vacuum_full:
        server.query("VACUUM FULL", database)
        steps.append({"step": "vacuum full", "detail": "VACUUM FULL done"})
    return steps
