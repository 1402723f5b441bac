"""Backup sets: `<db>-<UTC>.dump[.age]` (pg_dump custom format), a `.backup.json` sidecar, SHA256SUMS.

A set is proven, not trusted: by its checksum, by its archive header, by a full read
of every entry (`pg_restore -f /dev/null`; `--list` alone passes a truncated file),
and on demand by a restore into a scratch database compared with the sidecar's row
counts and schema hash.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

from toolkit import utc
from toolkit.db.server import Server, check_tool, quote_ident, quote_literal
from toolkit.errors import BadInputError, EnvironmentProblem, UsageError, VerificationFailed
from toolkit.host.atomic import AtomicFile
from toolkit.host.hashing import sha256_path
from toolkit.host.streams import HashingWriter

SIDECAR_SUFFIX = ".backup.json"
SUMS = "SHA256SUMS"
FORMAT = "bookgen-kit/backup/1"
EXACT_COUNT_LIMIT = 5_000_000  # tables larger than this (by estimate) get the estimate, marked as such
SCHEMA_QUERY = """
SELECT 'column', c.table_schema || '.' || c.table_name, c.column_name || ' ' || c.data_type || ' ' ||
       c.is_nullable || ' ' || coalesce(c.column_default, '')
  FROM information_schema.columns c
 WHERE c.table_schema NOT IN ('pg_catalog', 'information_schema')
UNION ALL
SELECT 'index', schemaname || '.' || tablename, indexdef FROM pg_indexes
 WHERE schemaname NOT IN ('pg_catalog', 'information_schema')
UNION ALL
SELECT 'constraint', n.nspname || '.' || r.relname, con.conname || ' ' || pg_get_constraintdef(con.oid)
  FROM pg_constraint con JOIN pg_class r ON r.oid = con.conrelid JOIN pg_namespace n ON n.oid = r.relnamespace
 WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
"""




def _querier(server, dbname):
    """A function sql -> rows: a Server's query on dbname, or a cursor-holding callable as it is."""
    if callable(server) and not isinstance(server, Server):
        return server
    return lambda sql: server.query(sql, dbname)


def schema_sha256(server, dbname: Optional[str] = None) -> str:
    query = _querier(server, dbname)
    rows = sorted("|".join(v or "" for v in row) for row in query(SCHEMA_QUERY))
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()


def table_counts(server, dbname: Optional[str] = None) -> Dict[str, Dict[str, Any]]:
    query = _querier(server, dbname)
    tables = query("SELECT n.nspname, c.relname, c.reltuples::bigint FROM pg_class c JOIN pg_namespace n "
                          "ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN "
                   "('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%' ORDER BY 1, 2")
    counts = {}
    for schema, name, estimate in tables:
        key = "%s.%s" % (schema, name)
        if int(estimate or 0) > EXACT_COUNT_LIMIT:
            counts[key] = {"rows": int(estimate), "exact": False}
        else:
            rows = query("SELECT count(*) FROM %s.%s" % (quote_ident(schema), quote_ident(name)))
            counts[key] = {"rows": int(rows[0][0]), "exact": True}
    return counts


def compare_with_sidecar(sidecar: Dict[str, Any], counts: Dict[str, Dict[str, Any]], schema: str) -> List[str]:
    problems = []
    if sidecar.get("schema_sha256") and sidecar["schema_sha256"] != schema:
        problems.append("schema hash %s differs from the sidecar's %s" % (schema[:16], sidecar["schema_sha256"][:16]))
    for table, expected in (sidecar.get("tables") or {}).items():
        got = counts.get(table)
        if got is None:
            problems.append("table %s missing" % table)
        elif expected.get("exact") and got["rows"] != expected["rows"]:
            problems.append("table %s has %d rows, the sidecar says %d" % (table, got["rows"], expected["rows"]))
    for table in set(counts) - set(sidecar.get("tables") or {}):
        problems.append("table %s is not in the sidecar" % table)
    return problems


@dataclass
class BackupSet:
    dump: str
    sidecar: str
    directory: str

    @property
    def encrypted(self) -> bool:
        return self.dump.endswith(".age")

    @property
    def kind(self) -> str:
        name = self.dump[: -len(".age")] if self.encrypted else self.dump
        if name.endswith(".dump"):
            return "custom"
        if name.endswith(".sql.gz"):
            return "sql.gz"
        if name.endswith(".sql"):
            return "sql"
        raise BadInputError("not a backup: %s (expected .dump[.age], .sql or .sql.gz)" % self.dump)

    def load_sidecar(self) -> Optional[Dict[str, Any]]:
        try:
            with open(self.sidecar, encoding="utf-8") as handle:
                return json.load(handle)
        except FileNotFoundError:
            return None
        except ValueError:
            raise VerificationFailed("sidecar %s is not valid JSON" % self.sidecar) from None

    def save_sidecar(self, document: Dict[str, Any]) -> None:
        with AtomicFile(self.sidecar, 0o600, overwrite=True) as out:
            out.write(json.dumps(document, indent=2, sort_keys=True).encode() + b"\n")
            out.commit()


def locate_set(path: str) -> BackupSet:
    path = os.path.abspath(path)
    if path.endswith(SIDECAR_SUFFIX):
        path = path[: -len(SIDECAR_SUFFIX)]
    if not os.path.isfile(path):
        raise BadInputError("no backup at %s" % path)
    return BackupSet(path, path + SIDECAR_SUFFIX, os.path.dirname(path))


def _update_sums(directory: str, name: str, digest: str) -> None:
    from toolkit.evidence.capture import update_sums

    update_sums(directory, {name: digest})


# --------------------------------------------------------------------------- create
def create_backup(server: Server, dbname: str, out_dir: str, recipients: Sequence[Any] = (),
                  recipient_names: Sequence[str] = (), progress: Optional[Callable[[int], None]] = None,
                  prefix: Optional[str] = None) -> Dict[str, Any]:
    import threading

    os.makedirs(out_dir, exist_ok=True)
    started = time.time()
    version = server.server_version()
    tool = server.tool_record("pg_dump")  # a missing or too old pg_dump stops us before any file exists
    snapshot = server.export_snapshot(dbname) if hasattr(server, "export_snapshot") else None
    facts: Dict[str, Any] = {}
    if snapshot is None:
        facts["counts"], facts["schema"] = table_counts(server, dbname), schema_sha256(server, dbname)
        counter = None
    else:
        # counts and schema from the very snapshot pg_dump dumps, computed while it dumps
        def count_in_snapshot() -> None:
            try:
                facts["counts"], facts["schema"] = table_counts(snapshot.query), schema_sha256(snapshot.query)
            except BaseException as error:  # re-raised below
                facts["error"] = error

        counter = threading.Thread(target=count_in_snapshot, daemon=True)
        counter.start()
    base = "%s-%s" % (prefix or dbname, utc.stamp(started))
    suffix = ".dump" + (".age" if recipients else "")
    name, serial = base + suffix, 1
    while os.path.lexists(os.path.join(out_dir, name)) or os.path.lexists(os.path.join(out_dir, name + ".partial")):
        serial += 1
        name = "%s-%d%s" % (base, serial, suffix)
    path = os.path.join(os.path.abspath(out_dir), name)
    with AtomicFile(path, 0o600) as out:
        sink = HashingWriter(out)
        encryptor = None
        if recipients:
            from toolkit.crypto import age

            encryptor = age.Encryptor(sink, list(recipients))
        target = encryptor or sink
        written = [0]

        def deliver(data: bytes) -> None:
            target.write(data)
            written[0] += len(data)
            if progress:
                progress(len(data))

        try:
            args = ["-Fc", "-Z", "6"] + (["--snapshot", snapshot.name] if snapshot else [])
            result = server.run_tool("pg_dump", args, stdout=deliver, dbname=dbname)
            check_tool(result, "pg_dump")
            if encryptor is not None:
                encryptor.close()
            if counter is not None:
                counter.join()
                if "error" in facts:
                    raise facts["error"]
        finally:
            sink.close()
            if snapshot is not None:
                snapshot.close()
        out.commit()
    counts, schema = facts["counts"], facts["schema"]
    sidecar = {
        "format": FORMAT, "database": dbname, "created": utc.iso(started),
        "seconds": round(time.time() - started, 2), "server_version": version,
        "source": {"mode": server.mode, "server": server.description},
        "pg_dump": tool,
        "dump": {"file": name, "size": sink.size, "sha256": sink.hexdigest(), "format": "custom",
                 "uncompressed_stream_bytes": written[0], "encrypted": bool(recipients),
                 "recipients": list(recipient_names)},
        "tables": counts, "schema_sha256": schema, "verified": [], "keep": False,
    }
    backup = BackupSet(path, path + SIDECAR_SUFFIX, os.path.dirname(path))
    backup.save_sidecar(sidecar)
    _update_sums(backup.directory, name, sink.hexdigest())
    return {"dump": path, "sidecar": backup.sidecar, "size": sink.size, "sha256": sink.hexdigest(),
            "tables": len(counts), "rows": sum(c["rows"] for c in counts.values()), "seconds": sidecar["seconds"]}


# --------------------------------------------------------------------------- reading a set back
def plaintext_chunks(backup: BackupSet, identities: Sequence[Any]) -> Iterator[bytes]:
    """The dump's plaintext (decrypted, and for .sql.gz decompressed), chunk by chunk, each authenticated."""
    handle = open(backup.dump, "rb")
    try:
        if backup.encrypted:
            from toolkit.crypto import age

            if not identities:
                raise UsageError("the set is encrypted: give -i IDENTITY")
            chunks: Iterator[bytes] = age.Decryptor(handle, identities).chunks()
        else:
            chunks = iter(lambda: handle.read(1 << 20), b"")
        if backup.kind == "sql.gz":
            from toolkit.evidence.bundle import _ChunkReader

            reader = gzip.GzipFile(fileobj=io.BufferedReader(_ChunkReader(chunks)))
            try:
                for chunk in iter(lambda: reader.read(1 << 20), b""):
                    yield chunk
            except (OSError, EOFError) as error:
                raise VerificationFailed("%s is not a complete gzip stream: %s" % (backup.dump, error)) from None
        else:
            yield from chunks
    finally:
        handle.close()


def check_header(first: bytes) -> Dict[str, Any]:
    if not first.startswith(b"PGDMP") or len(first) < 11:
        raise VerificationFailed("not a pg_dump custom-format archive (no PGDMP header)")
    major, minor, revision = first[5], first[6], first[7]
    return {"archive_version": "%d.%d.%d" % (major, minor, revision), "int_size": first[8], "off_size": first[9]}


@dataclass
class VerifyResult:
    ok: bool
    checks: List[Dict[str, Any]] = field(default_factory=list)

    def add(self, name: str, ok: bool, detail: str) -> None:
        self.checks.append({"name": name, "ok": ok, "detail": detail})
        self.ok = self.ok and ok


def verify_backup(backup: BackupSet, server: Optional[Server], identities: Sequence[Any] = (),
                  restore_test: bool = False, record: bool = True, scratch_cluster: bool = False) -> VerifyResult:
    from toolkit.errors import KitError

    result = VerifyResult(ok=True)
    sidecar = backup.load_sidecar()
    actual = sha256_path(backup.dump)
    if sidecar:
        expected = sidecar["dump"]["sha256"]
        result.add("checksum", actual == expected, "matches the sidecar" if actual == expected else
                   "sha256 %s, the sidecar says %s" % (actual, expected))
    sums_path = os.path.join(backup.directory, SUMS)
    if os.path.exists(sums_path):
        listed = {}
        with open(sums_path, encoding="utf-8") as handle:
            for line in handle:
                if "  " in line:
                    digest, name = line.rstrip("\n").split("  ", 1)
                    listed[name] = digest
        name = os.path.basename(backup.dump)
        if name in listed:
            result.add("SHA256SUMS", listed[name] == actual, "matches" if listed[name] == actual else "differs")
    if not result.ok:
        return result
    if backup.kind == "custom":
        try:
            stream = plaintext_chunks(backup, identities)
            first = next(stream, b"")
            header = check_header(first)
            result.add("header", True, "PGDMP archive version %s" % header["archive_version"])
            if server is None:
                raise EnvironmentProblem("a server (or host pg_restore) is needed to read the archive")

            def all_chunks():
                yield first
                yield from stream

            read = server.run_tool("pg_restore", ["-f", "/dev/null"], stdin=all_chunks())
            ok = read["exit_code"] == 0
            result.add("full read", ok, "pg_restore read every entry" if ok else "pg_restore: %s" % (
                read["stderr"].strip().splitlines() or ["exit %s" % read["exit_code"]])[-1])
        except KitError as error:
            result.add("archive", False, error.message)
    else:
        try:
            total = sum(len(c) for c in plaintext_chunks(backup, identities))
            result.add("full read", True, "%d bytes of SQL" % total)
        except KitError as error:
            result.add("full read", False, error.message)
    if result.ok and restore_test:
        if server is None:
            raise UsageError("--restore-test needs a server (--dsn, --container) or --scratch-cluster")
        # in a scratch cluster the dump's roles do not exist: restore without owners and grants
        _restore_test(server, backup, sidecar, identities, result, "a throwaway cluster" if scratch_cluster else
                      server.description, portable=scratch_cluster)
    if record and sidecar is not None:
        sidecar.setdefault("verified", []).append({
            "when": utc.iso(), "ok": result.ok,
            "how": [c["name"] for c in result.checks], "restore_test": restore_test,
            "scratch_cluster": scratch_cluster})
        backup.save_sidecar(sidecar)
    return result


def _restore_test(server: Server, backup: BackupSet, sidecar, identities, result: VerifyResult, where: str,
                  portable: bool = False) -> None:
    from toolkit.errors import KitError

    scratch = "bookgen_kit_scratch_%s" % uuid.uuid4().hex[:10]
    try:
        restore_into(server, backup, scratch, identities, owner=None, portable=portable)
        counts, schema = table_counts(server, scratch), schema_sha256(server, scratch)
        problems = compare_with_sidecar(sidecar or {}, counts, schema) if sidecar else []
        result.add("restore test", not problems, "; ".join(problems[:5]) if problems else
                   "restored into a scratch database on %s: %d tables, row counts and schema hash match" % (
                       where, len(counts)))
    except KitError as error:
        result.add("restore test", False, error.message)
    finally:
        try:
            drop_database(server, scratch)
        except KitError:
            pass


# --------------------------------------------------------------------------- databases
def database_exists(server: Server, name: str) -> bool:
    return bool(server.query("SELECT 1 FROM pg_database WHERE datname = %s" % quote_literal(name),
                             server.admin_database))


def drop_database(server: Server, name: str) -> None:
    if database_exists(server, name):
        server.query("DROP DATABASE IF EXISTS %s WITH (FORCE)" % quote_ident(name), server.admin_database)


def restore_into(server: Server, backup: BackupSet, dbname: str, identities: Sequence[Any],
                 owner: Optional[str], portable: bool = False) -> None:
    """Create dbname (which must not exist) and restore the set into it; on any failure it is dropped."""
    if database_exists(server, dbname):
        raise UsageError("database %s already exists: restore never writes into an existing database" % dbname)
    server.query("CREATE DATABASE %s%s TEMPLATE template0" % (
        quote_ident(dbname), " OWNER %s" % quote_ident(owner) if owner else ""), server.admin_database)
    try:
        chunks = plaintext_chunks(backup, identities)
        if backup.kind == "custom":
            args = ["--exit-on-error"] + (["--no-owner", "--no-acl"] if portable else [])
            done = server.run_tool("pg_restore", args, stdin=chunks, dbname=dbname)
            check_tool(done, "pg_restore")
        else:
            done = server.run_tool("psql", ["-X", "-q", "-v", "ON_ERROR_STOP=1", "-f", "-"], stdin=chunks,
                                   dbname=dbname)
            check_tool(done, "psql")
    except BaseException:
        drop_database(server, dbname)
        raise


def list_backups(directory: str, max_age_hours: float = 24.0) -> Dict[str, Any]:
    if not os.path.isdir(directory):
        raise BadInputError("no backup directory at %s" % directory)
    sets = []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if not os.path.isfile(path) or name.endswith((SIDECAR_SUFFIX, ".partial", ".keep")) or name == SUMS:
            continue
        try:
            backup = locate_set(path)
            kind = backup.kind
        except BadInputError:
            continue
        sidecar = backup.load_sidecar() or {}
        verified = [v for v in sidecar.get("verified", []) if v.get("ok")]
        info = os.stat(path)
        sets.append({"dump": path, "kind": kind, "size": info.st_size, "mtime": info.st_mtime,
                     "age_hours": round((time.time() - info.st_mtime) / 3600, 1), "database": sidecar.get("database"),
                     "encrypted": backup.encrypted, "sidecar": bool(sidecar),
                     "verified": verified[-1]["when"] if verified else None,
                     "keep": bool(sidecar.get("keep")) or os.path.exists(path + ".keep")})
    sets.sort(key=lambda s: s["mtime"])
    newest = sets[-1] if sets else None
    warning = None
    if newest is None:
        warning = "no backups in %s" % directory
    elif newest["age_hours"] > max_age_hours:
        warning = "the newest backup is %.1f hours old (more than %.0f)" % (newest["age_hours"], max_age_hours)
    return {"directory": directory, "sets": sets, "warning": warning}


def plan_prune(directory: str, keep_last: int, keep_days: float) -> Dict[str, Any]:
    listing = list_backups(directory, max_age_hours=1e9)
    sets = listing["sets"]
    verified = [s for s in sets if s["verified"]]
    protected = set()
    if verified:
        protected.add(verified[-1]["dump"])
    protected.update(s["dump"] for s in sets[-keep_last:] if keep_last > 0)
    protected.update(s["dump"] for s in sets if s["age_hours"] <= keep_days * 24 or s["keep"])
    doomed = [s for s in sets if s["dump"] not in protected]
    return {"keep": [s["dump"] for s in sets if s["dump"] in protected], "delete": [s["dump"] for s in doomed]}


def apply_prune(plan: Dict[str, Any]) -> List[str]:
    deleted = []
    for dump in plan["delete"]:
        for path in (dump, dump + SIDECAR_SUFFIX):
            if os.path.exists(path):
                os.unlink(path)
        deleted.append(dump)
    return deleted


def mark_keep(backup: BackupSet, keep: bool = True) -> None:
    sidecar = backup.load_sidecar() or {"format": FORMAT, "dump": {"file": os.path.basename(backup.dump)}}
    sidecar["keep"] = keep
    backup.save_sidecar(sidecar)
