"""Backup sets: `<db>-<UTC>.dump[.age]` (pg_dump custom format), a `.backup.json` sidecar, SHA256SUMS; a
salvage set of a damaged database also `<db>-<UTC>.salvage.sql[.age]`, its damaged tables' readable rows.

A set is proven, not trusted: by its checksum, by its archive header, by a full read
of every entry (`pg_restore -f /dev/null`; `--list` alone passes a truncated file),
and on demand by a restore into a scratch database compared with the sidecar's row
counts, schema hash and the database's own properties (owner, grants, settings).

Invariants: the counts are taken in the snapshot pg_dump dumps; a set is both its files or neither (the
dump is removed when its salvage file cannot be written); a dump that cannot read a page is never a set
unless it is a salvage, whose sidecar lists every lost block and row.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from toolkit import utc
from toolkit.db.server import ReadFailed, Server, ToolFailed, check_tool, quote_ident, quote_literal
from toolkit.db.target import _first_line
from toolkit.errors import BadInputError, EnvironmentProblem, KitError, UsageError, VerificationFailed
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


def schema_sha256(server, dbname: Optional[str] = None, not_valid: Sequence[str] = ()) -> str:
    """The hash of columns, indexes and constraints. not_valid: constraints a salvage restore had to add
    NOT VALID (rows they point to were lost): hashed as they were in the set."""
    query = _querier(server, dbname)
    lines = []
    for row in query(SCHEMA_QUERY):
        values = [v or "" for v in row]
        if values[0] == "constraint" and values[2].split(" ", 1)[0] in not_valid and values[2].endswith(" NOT VALID"):
            values[2] = values[2][: -len(" NOT VALID")]
        lines.append("|".join(values))
    return hashlib.sha256("\n".join(sorted(lines)).encode()).hexdigest()


def table_counts(server, dbname: Optional[str] = None, skip: Sequence[str] = ()) -> Dict[str, Dict[str, Any]]:
    """Rows per table, counted from the heap (count(ctid): never through an index, which may be the damaged
    part); tables in skip (salvaged, counted as they were read) are left out."""
    query = _querier(server, dbname)
    tables = query("SELECT n.nspname, c.relname, c.reltuples::bigint FROM pg_class c JOIN pg_namespace n "
                          "ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN "
                   "('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%' ORDER BY 1, 2")
    counts = {}
    for schema, name, estimate in tables:
        key = "%s.%s" % (schema, name)
        if key in skip:
            continue
        if int(estimate or 0) > EXACT_COUNT_LIMIT:
            counts[key] = {"rows": int(estimate), "exact": False}
        else:
            rows = query("SELECT count(ctid) FROM %s.%s" % (quote_ident(schema), quote_ident(name)))
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
        if name.endswith(".tar.zst") and os.path.basename(name).startswith("base-"):
            return "base"
        if name.endswith(".sql.gz"):
            return "sql.gz"
        if name.endswith(".sql"):
            return "sql"
        raise BadInputError("not a backup: %s (expected .dump[.age], .sql, .sql.gz or base-*.tar.zst[.age])" %
                            self.dump)

    @property
    def salvage_name(self) -> str:
        """The one name this set's salvage file can have: beside the dump, `.salvage.sql` for `.dump`."""
        return os.path.basename(self.dump).replace(".dump", ".salvage.sql", 1)

    @property
    def salvage_path(self) -> Optional[str]:
        """The set's salvage file (rows of damaged tables), when its sidecar names one. Only by the set's own
        name: a sidecar edited to name another file (../../etc/passwd) never makes prune or restore touch it."""
        entry = ((self.load_sidecar() or {}).get("salvage") or {}).get("file")
        if not entry or entry.get("file") != self.salvage_name:
            return None
        return os.path.join(self.directory, self.salvage_name)

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


# --------------------------------------------------------------------------- create
class DamagedDatabase(EnvironmentProblem):
    """pg_dump could not read the database: the server's error, the relation and block it names, what next."""


def _damage_error(server: Server, dbname: str, error: str, out_dir: str) -> DamagedDatabase:
    from toolkit.db import damage

    named = damage.parse(error, lambda sql: server.query(sql, dbname))
    newest = None
    try:
        verified = [s for s in list_backups(out_dir, 1e9)["sets"] if s["verified"] and s["database"] == dbname]
        newest = verified[-1]["dump"] if verified else None
    except BadInputError:
        pass
    hint = ("`bookgen-kit db check --database %s` lists every damaged page; `bookgen-kit backup create --database %s "
            "--salvage` saves every row that can be read, and lists the rest" % (dbname, dbname))
    hint += "; the newest verified set is %s" % newest if newest else "; there is no verified set in %s" % out_dir
    return DamagedDatabase("pg_dump could not read database %s: %s" % (dbname, named.describe()), hint=hint)


def _set_names(out_dir: str, base: str, encrypted: bool) -> Tuple[str, str]:
    """A dump name and a salvage name that neither exist nor are being written."""
    age_suffix = ".age" if encrypted else ""
    serial, stem = 1, base
    while True:
        names = (stem + ".dump" + age_suffix, stem + ".salvage.sql" + age_suffix)
        if not any(os.path.lexists(os.path.join(out_dir, n + extra)) for n in names for extra in ("", ".partial")):
            return names
        serial += 1
        stem = "%s-%d" % (base, serial)


def _write_stream(path: str, recipients: Sequence[Any], produce: Callable[[Callable[[bytes], None]], None],
                  progress: Optional[Callable[[int], None]] = None) -> Dict[str, Any]:
    """produce(write) into path (age-encrypted to recipients when there are any), hashed as it goes; the file
    appears only when produce returned."""
    from toolkit.host.streams import BackgroundWriter

    with AtomicFile(path, 0o600) as out:
        sink = HashingWriter(out)
        encryptor = None
        if recipients:
            from toolkit.crypto import age

            encryptor = age.Encryptor(sink, list(recipients))
        # encryption, hashing and the file's writes on a thread of their own, beside the producer's work
        target = BackgroundWriter(encryptor or sink, name="backup-writer")
        written = [0]

        def deliver(data: bytes) -> None:
            target.write(data)
            written[0] += len(data)
            if progress:
                progress(len(data))

        try:
            try:
                produce(deliver)
            finally:
                target.close()
            if encryptor is not None:
                encryptor.close()
        finally:
            sink.close()
        out.commit()
    return {"file": os.path.basename(path), "size": sink.size, "sha256": sink.hexdigest(),
            "uncompressed_stream_bytes": written[0]}


def create_backup(server: Server, dbname: str, out_dir: str, recipients: Sequence[Any] = (),
                  recipient_names: Sequence[str] = (), progress: Optional[Callable[[int], None]] = None,
                  prefix: Optional[str] = None, salvage: bool = False) -> Dict[str, Any]:
    """A set of dbname. A dump that cannot read every row stops with the server's error (DamagedDatabase);
    with salvage, the set keeps every row that can be read and the sidecar lists what could not."""
    import threading

    from toolkit.db import properties

    os.makedirs(out_dir, exist_ok=True)
    started = time.time()
    version = server.server_version()
    tool = server.tool_record("pg_dump")  # a missing or too old pg_dump stops us before any file exists
    database_properties = properties.read(server, dbname)
    snapshot = server.export_snapshot(dbname)
    base = "%s-%s" % (prefix or dbname, utc.stamp(started))
    name, salvage_name = _set_names(out_dir, base, bool(recipients))
    path = os.path.join(os.path.abspath(out_dir), name)
    facts: Dict[str, Any] = {}
    salvaged: Dict[str, Any] = {}
    salvage_file: Optional[Dict[str, Any]] = None
    try:
        if salvage:
            from toolkit.db import salvage as salvaging

            tables = salvaging.user_tables(snapshot)
            for key, sql_name, blocks in tables:
                found = salvaging.find_damage(snapshot, key, sql_name, blocks)
                if found:
                    salvaged[key] = salvaging.TableSalvage(key, sql_name, blocks, found)
        counter = None
        if not salvage:
            # counts and schema from the very snapshot pg_dump dumps, computed while it dumps
            def count_in_snapshot() -> None:
                try:
                    facts["counts"], facts["schema"] = table_counts(snapshot.query), schema_sha256(snapshot.query)
                except BaseException as error:  # re-raised below
                    facts["error"] = error

            counter = threading.Thread(target=count_in_snapshot, daemon=True)
            counter.start()
        while True:
            excluded = sorted(salvaged)
            args = ["-Fc", "-Z", "6", "--snapshot", snapshot.name] + [
                "--exclude-table-data=%s" % salvaged[key].sql_name for key in excluded]

            def dump(write: Callable[[bytes], None]) -> None:
                check_tool(server.run_tool("pg_dump", args, stdout=write, dbname=dbname), "pg_dump")

            try:
                dumped = _write_stream(path, recipients, dump, progress)
                break
            except ToolFailed as error:
                if counter is not None:
                    counter.join()
                    if "error" in facts:  # the count read the damage first, and pg_dump lost its snapshot
                        raise _damage_error(server, dbname, _first_line(facts["error"]), out_dir) from None
                from toolkit.db import damage

                if not error.server_error or not damage.looks_like_damage(error.server_error):
                    raise
                if not salvage:
                    raise _damage_error(server, dbname, error.server_error, out_dir) from None
                # damage the heap scan could not see (a TOAST page): the table it belongs to is salvaged too
                named = damage.parse(error.server_error, snapshot.query)
                owner = salvaging.owning_table(snapshot, named.relation) if named.relation else None
                if owner is None or owner[0] in salvaged:
                    raise _damage_error(server, dbname, error.server_error, out_dir) from None
                key = owner[0]
                salvaged[key] = salvaging.TableSalvage(key, owner[1], int(snapshot.query(
                    "SELECT pg_relation_size(%s::regclass) / current_setting('block_size')::int" %
                    quote_literal(owner[1]))[0][0]), [], found_by="pg_dump: %s" % named.describe())
        if counter is not None:
            counter.join()
            if "error" in facts:
                if isinstance(facts["error"], KitError) and not isinstance(facts["error"], ReadFailed):
                    raise facts["error"]
                raise _damage_error(server, dbname, _first_line(facts["error"]), out_dir) from None
        if salvage:
            facts["counts"] = table_counts(snapshot.attempt, skip=list(salvaged))
            facts["schema"] = schema_sha256(snapshot.query)
            if salvaged:
                salvage_path = os.path.join(os.path.abspath(out_dir), salvage_name)

                def write_salvage(write: Callable[[bytes], None]) -> None:
                    write(salvaging.HEADER)
                    for key in sorted(salvaged):
                        salvaging.salvage_table(snapshot, salvaged[key], write)
                    write(salvaging.TRAILER)

                try:
                    salvage_file = _write_stream(salvage_path, recipients, write_salvage)
                except BaseException:
                    os.unlink(path)  # a set is both files or neither
                    raise
                for key, table in salvaged.items():
                    facts["counts"][key] = {"rows": table.rows_saved, "exact": True, "salvaged": True}
    finally:
        snapshot.close()
    counts, schema = facts["counts"], facts["schema"]
    sidecar = {
        "format": FORMAT, "database": dbname, "created": utc.iso(started),
        "seconds": round(time.time() - started, 2), "server_version": version,
        "source": {"mode": server.mode, "server": server.description},
        "pg_dump": tool,
        "dump": dict(dumped, format="custom", encrypted=bool(recipients), recipients=list(recipient_names)),
        "database_properties": database_properties,
        "tables": counts, "schema_sha256": schema, "verified": [], "keep": False,
    }
    if salvage:
        sidecar["salvage"] = {
            "file": dict(salvage_file, encrypted=bool(recipients)) if salvage_file else None,
            "tables": {key: table.record() for key, table in sorted(salvaged.items())},
            "rows_saved": sum(t.rows_saved for t in salvaged.values()),
            "rows_lost_estimate": sum(t.rows_lost_estimate for t in salvaged.values()),
            "how": "tid-range reads in pg_dump's snapshot, bisected down to the block and the row; "
                   "the live database unchanged"}
    backup = BackupSet(path, path + SIDECAR_SUFFIX, os.path.dirname(path))
    backup.save_sidecar(sidecar)
    sums = {name: dumped["sha256"]}
    if salvage_file:
        sums[salvage_file["file"]] = salvage_file["sha256"]
    from toolkit.evidence.capture import update_sums

    update_sums(backup.directory, sums)
    result = {"dump": path, "sidecar": backup.sidecar, "size": dumped["size"], "sha256": dumped["sha256"],
              "tables": len(counts), "rows": sum(c["rows"] for c in counts.values()), "seconds": sidecar["seconds"]}
    if salvage:
        result["salvage"] = {"file": os.path.join(backup.directory, salvage_file["file"]) if salvage_file else None,
                             "damaged": [d.describe() for t in salvaged.values() for d in t.damaged] +
                                        ["%s row %s: %s" % (t.table, r["ctid"], r["error"]) for t in salvaged.values()
                                         for r in t.lost_rows],
                             "rows_saved": sidecar["salvage"]["rows_saved"],
                             "rows_lost_estimate": sidecar["salvage"]["rows_lost_estimate"]}
    return result


# --------------------------------------------------------------------------- reading a set back
def plaintext_chunks(backup: BackupSet, identities: Sequence[Any], salvage: bool = False) -> Iterator[bytes]:
    """The dump's plaintext (decrypted, and for .sql.gz decompressed), chunk by chunk, each authenticated;
    with salvage, the set's salvage file instead."""
    if salvage:
        path = backup.salvage_path
        if path is None:
            raise VerificationFailed("the set has no salvage file")
        yield from _file_chunks(path, path.endswith(".age"), identities)
        return
    chunks = _file_chunks(backup.dump, backup.encrypted, identities)
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


def _file_chunks(path: str, encrypted: bool, identities: Sequence[Any]) -> Iterator[bytes]:
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        raise VerificationFailed("%s is missing" % path) from None
    try:
        if encrypted:
            from toolkit.crypto import age

            if not identities:
                raise UsageError("the set is encrypted: give -i IDENTITY")
            chunks: Iterator[bytes] = age.Decryptor(handle, identities).chunks()
        else:
            chunks = iter(lambda: handle.read(1 << 20), b"")
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
                  restore_test: bool = False, record: bool = True, scratch_cluster: bool = False,
                  scratch_dir: Optional[str] = None) -> VerifyResult:
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
    if backup.kind == "base":
        if restore_test:
            raise UsageError("a base backup is proven by pg_verifybackup, not --restore-test (restore --target-time "
                             "restores one)")
        _verify_base(backup, sidecar, identities, result, scratch_dir)
    elif backup.kind == "custom":
        try:
            stream = plaintext_chunks(backup, identities)
            first = next(stream, b"")
            header = check_header(first)
            result.add("header", True, "PGDMP archive version %s" % header["archive_version"])
            if server is None:
                raise EnvironmentProblem("pg_restore is needed to read the archive (this host's, or a server's)")

            def all_chunks():
                yield first
                yield from stream

            read = server.run_tool("pg_restore", ["-f", "/dev/null"], stdin=all_chunks())
            ok = read["exit_code"] == 0
            said = " ".join(str(read["tool"][key]) for key in ("version", "path", "inside_container")
                            if read["tool"].get(key))
            result.add("full read", ok, "pg_restore (%s) read every entry" % said if ok else "pg_restore: %s" % (
                read["stderr"].strip().splitlines() or ["exit %s" % read["exit_code"]])[-1])
        except EnvironmentProblem:
            raise  # nothing to read it with (exit 4): not a verdict on the set
        except KitError as error:
            result.add("archive", False, error.message)
    else:
        try:
            total = sum(len(c) for c in plaintext_chunks(backup, identities))
            result.add("full read", True, "%d bytes of SQL" % total)
        except KitError as error:
            result.add("full read", False, error.message)
    salvage_entry = ((sidecar or {}).get("salvage") or {}).get("file")
    if salvage_entry:
        _verify_salvage_file(backup, salvage_entry, identities, result)
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


def _verify_base(backup: BackupSet, sidecar: Optional[Dict[str, Any]], identities: Sequence[Any],
                 result: VerifyResult, scratch_dir: Optional[str]) -> None:
    """A base backup: decrypted and extracted into a scratch directory, judged by pg_verifybackup (every file
    against the manifest's SHA-256, and the WAL it needs), then removed."""
    import tempfile

    from toolkit.db import physical

    where = scratch_dir or tempfile.gettempdir()
    needed = int(((sidecar or {}).get("cluster") or {}).get("bytes") or os.path.getsize(backup.dump) * 4)
    physical.scratch_room(where, needed)
    directory = tempfile.mkdtemp(prefix="bookgen-kit-verify-", dir=where)
    os.rmdir(directory)  # extract() makes it, 0700
    try:
        try:
            counts = physical.extract(physical.tar_chunks(_file_chunks(backup.dump, backup.encrypted, identities)),
                                      directory)
        except VerificationFailed as error:
            result.add("extract", False, error.message)
            return
        except (OSError, EOFError) as error:
            result.add("extract", False, "the base backup does not decompress to its end: %s" % error)
            return
        result.add("extract", True, "%d files, %d bytes%s" % (counts["files"], counts["bytes"], " (decrypted)" if
                                                              backup.encrypted else ""))
        problems = physical.check_manifest(directory, counts["digests"])
        result.add("manifest", not problems, "every file's size and SHA-256 as backup_manifest lists them" if not
                   problems else "; ".join(problems[:3]))
        version = str((sidecar or {}).get("server_version") or "")
        judged = physical.verify_extracted(directory, int(version.split(".")[0]) if version[:2].isdigit() else None)
        result.add("pg_verifybackup", judged["ok"], "%s (%s %s)" % (judged["detail"], judged["tool"]["path"],
                                                                   judged["tool"]["version"]))
    finally:
        physical.remove_tree(directory)


def _verify_salvage_file(backup: BackupSet, entry: Dict[str, Any], identities: Sequence[Any],
                         result: VerifyResult) -> None:
    """The salvage file: its checksum against the sidecar, and a full read that ends with the end line."""
    from toolkit.db.salvage import HEADER, TRAILER

    if entry.get("file") != backup.salvage_name:
        result.add("salvage file", False, "the sidecar names %r, not this set's salvage file %s" % (
            entry.get("file"), backup.salvage_name))
        return
    path = os.path.join(backup.directory, backup.salvage_name)
    if not os.path.isfile(path):
        result.add("salvage file", False, "%s is missing" % path)
        return
    actual = sha256_path(path)
    if actual != entry["sha256"]:
        result.add("salvage file", False, "sha256 %s, the sidecar says %s" % (actual, entry["sha256"]))
        return
    try:
        first, last, size = b"", b"", 0
        for chunk in plaintext_chunks(backup, identities, salvage=True):
            first = first or chunk[: len(HEADER)]
            last = (last + chunk)[-len(TRAILER):]
            size += len(chunk)
        whole = first.startswith(HEADER[:40]) and last == TRAILER
        result.add("salvage file", whole, "%s: %d bytes of rows read around damaged pages, whole" % (
            entry["file"], size) if whole else "%s is cut short (no end line)" % entry["file"])
    except KitError as error:
        result.add("salvage file", False, error.message)


def _restore_test(server: Server, backup: BackupSet, sidecar, identities, result: VerifyResult, where: str,
                  portable: bool = False) -> None:
    from toolkit.errors import KitError

    scratch = "bookgen_kit_scratch_%s" % uuid.uuid4().hex[:10]
    try:
        restored = restore_into(server, backup, scratch, identities, owner=None, portable=portable)
        problems = compare_restored(server, scratch, sidecar, restored) if sidecar else []
        result.add("restore test", not problems, "; ".join(problems[:5]) if problems else
                   "restored into a scratch database on %s: %d tables, row counts and schema hash match%s%s" % (
                       where, len(sidecar.get("tables") or {}) if sidecar else 0,
                       ", and the database's grants, settings and owner" if restored.properties_applied else "",
                       "; added NOT VALID (rows they point to were lost): %s" % ", ".join(restored.not_valid)
                       if restored.not_valid else ""))
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


@dataclass
class Restored:
    """What a restore into a new database had to say: constraints added NOT VALID because the rows they point
    to were lost (a salvage set), and database properties it could not give back."""

    not_valid: List[str] = field(default_factory=list)
    property_problems: List[str] = field(default_factory=list)
    properties_applied: bool = False


ENTRY = re.compile(r"\n--\n-- (?:Name|Data for Name): ")
FK_CONSTRAINT = re.compile(r"ADD CONSTRAINT (\"(?:[^\"]|\"\")+\"|\S+) FOREIGN KEY")


def restore_into(server: Server, backup: BackupSet, dbname: str, identities: Sequence[Any],
                 owner: Optional[str], portable: bool = False) -> Restored:
    """Create dbname (which must not exist) with the set's owner, encoding and locale, restore the set into
    it (a salvage set: its rows of damaged tables between the schema and the indexes), and give back the
    database's grants, settings and comment. On any failure dbname is dropped."""
    from toolkit.db import properties

    if database_exists(server, dbname):
        raise UsageError("database %s already exists: restore never writes into an existing database" % dbname)
    sidecar = backup.load_sidecar() or {}
    recorded = None if portable else sidecar.get("database_properties")
    if recorded and server.query("SELECT 1 FROM pg_roles WHERE rolname = %s" % quote_literal(recorded["owner"]),
                                 server.admin_database):
        owner = recorded["owner"]
    server.query("CREATE DATABASE %s TEMPLATE template0%s" % (quote_ident(dbname), properties.create_options(
        recorded, owner)), server.admin_database)
    restored = Restored()
    try:
        if backup.kind == "custom":
            args = ["--exit-on-error"] + (["--no-owner", "--no-acl"] if portable else [])
            if backup.salvage_path:
                restored.not_valid = _restore_salvage_set(server, backup, dbname, identities, args)
            else:
                done = server.run_tool("pg_restore", args, stdin=plaintext_chunks(backup, identities), dbname=dbname)
                check_tool(done, "pg_restore")
        else:
            _psql(server, dbname, plaintext_chunks(backup, identities))
        if recorded:
            restored.property_problems = properties.apply(server, dbname, recorded)
            restored.properties_applied = True
    except BaseException:
        drop_database(server, dbname)
        raise
    return restored


def _psql(server: Server, dbname: str, chunks: Iterable[bytes]) -> None:
    done = server.run_tool("psql", ["-X", "-q", "-v", "ON_ERROR_STOP=1", "-f", "-"], stdin=chunks, dbname=dbname)
    check_tool(done, "psql")


def _restore_salvage_set(server: Server, backup: BackupSet, dbname: str, identities: Sequence[Any],
                         args: List[str]) -> List[str]:
    """Schema, then the salvaged rows, then the rest of the data, then indexes and constraints; a foreign key
    that no longer holds (it points to lost rows) is added NOT VALID, and named."""
    def section(name: str) -> None:
        done = server.run_tool("pg_restore", args + ["--section=%s" % name], dbname=dbname,
                               stdin=plaintext_chunks(backup, identities))
        check_tool(done, "pg_restore --section=%s" % name)

    section("pre-data")
    _psql(server, dbname, plaintext_chunks(backup, identities, salvage=True))
    section("data")
    script: List[bytes] = []
    done = server.run_tool("pg_restore", [a for a in args if a != "--exit-on-error"] + [
        "--section=post-data", "-f", "-"], stdin=plaintext_chunks(backup, identities), stdout=script.append)
    check_tool(done, "pg_restore --section=post-data")
    parts = ENTRY.split(b"".join(script).decode("utf-8"))
    preamble, entries = parts[0], ["\n--\n-- Name: " + part for part in parts[1:]]
    foreign_keys = [e for e in entries if "; Type: FK CONSTRAINT;" in e.split("\n", 3)[2]]
    rest = [e for e in entries if e not in foreign_keys]
    _psql(server, dbname, [(preamble + "".join(rest)).encode("utf-8")])
    not_valid = []
    for entry in foreign_keys:
        try:
            _psql(server, dbname, [(preamble + entry).encode("utf-8")])
        except ToolFailed:
            statement = entry.rstrip()
            if not statement.endswith(";"):
                raise
            _psql(server, dbname, [(preamble + statement[:-1] + " NOT VALID;\n").encode("utf-8")])
            match = FK_CONSTRAINT.search(entry)
            name = match.group(1) if match else "?"
            not_valid.append(name[1:-1].replace('""', '"') if name.startswith('"') else name)
    return not_valid


def compare_restored(server: Server, dbname: str, sidecar: Dict[str, Any], restored: Restored) -> List[str]:
    """Every way the restored database differs from the set: rows, schema, and (when the set recorded them
    and they were applied) the database's own properties."""
    from toolkit.db import properties

    counts = table_counts(server, dbname)
    problems = compare_with_sidecar(sidecar, counts, schema_sha256(server, dbname, restored.not_valid))
    problems += restored.property_problems
    if restored.properties_applied:
        problems += properties.compare(sidecar["database_properties"], properties.read(server, dbname))
    return problems


def list_backups(directory: str, max_age_hours: float = 24.0) -> Dict[str, Any]:
    if not os.path.isdir(directory):
        raise BadInputError("no backup directory at %s" % directory)
    sets = []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if not os.path.isfile(path) or name.endswith((SIDECAR_SUFFIX, ".partial", ".keep")) or name == SUMS or \
                ".salvage.sql" in name:  # a salvage file is part of its set, not a set
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
    plan = {"keep": [s["dump"] for s in sets if s["dump"] in protected], "delete": [s["dump"] for s in doomed]}
    plan.update(_plan_wal(directory, [s for s in sets if s["kind"] == "base" and s["dump"] in protected]))
    return plan


def _plan_wal(directory: str, kept_bases: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The WAL archive (DIR/wal) follows the base backups kept: every segment from the oldest kept base's start
    stays (each base needs its WAL from its start onwards for a point-in-time restore); what is older goes. With no
    base kept, or one whose start is unknown, nothing in the archive is touched. History files always stay."""
    from toolkit.db import wal

    archive_dir = os.path.join(directory, "wal")
    result: Dict[str, Any] = {"wal_directory": archive_dir if os.path.isdir(archive_dir) else None,
                              "wal_delete": [], "wal_note": None}
    if result["wal_directory"] is None:
        return result
    starts = []
    for entry in kept_bases:
        sidecar = locate_set(entry["dump"]).load_sidecar() or {}
        size = sidecar.get("wal_segment_size")
        parsed = wal.parse_segment((sidecar.get("label") or {}).get("start_segment") or "", int(size)) if size else None
        if parsed is None:
            result["wal_note"] = "the base backup %s does not say where its WAL starts: the archive is kept whole" % (
                entry["dump"])
            return result
        starts.append((parsed[1], int(size)))
    if not starts:
        result["wal_note"] = "no base backup is kept: the WAL archive is kept whole"
        return result
    oldest, size = min(starts)
    for name in sorted(os.listdir(archive_dir)):
        parsed = wal.parse_segment(name[:24], size)
        suffix = name[24:]
        if parsed is None or not (suffix == "" or suffix.endswith(".backup") or suffix == ".partial"):
            continue  # history files, and anything that is not ours to judge
        if parsed[1] < oldest:
            result["wal_delete"].append(name)
    result["wal_note"] = "WAL kept from segment %s on (the oldest kept base backup's start)" % wal.segment_name(
        1, oldest, size)[8:]
    return result


def apply_prune(plan: Dict[str, Any]) -> List[str]:
    deleted = []
    for name in plan.get("wal_delete") or []:
        path = os.path.join(plan["wal_directory"], name)
        if os.path.exists(path):
            os.unlink(path)
    for dump in plan["delete"]:
        salvage = locate_set(dump).salvage_path if os.path.exists(dump) else None
        for path in (dump, salvage, dump + SIDECAR_SUFFIX):
            if path is None:
                continue
            if os.path.exists(path):
                os.unlink(path)
        deleted.append(dump)
    return deleted


def mark_keep(backup: BackupSet, keep: bool = True) -> None:
    sidecar = backup.load_sidecar() or {"format": FORMAT, "dump": {"file": os.path.basename(backup.dump)}}
    sidecar["keep"] = keep
    backup.save_sidecar(sidecar)
