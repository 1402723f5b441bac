"""Salvage: what a damaged database still holds, read around the pages that cannot be read.

Invariants:
- only reads, in the one snapshot pg_dump dumps: the database is never changed and no setting such as
  zero_damaged_pages is touched (a damaged page stays exactly as the responder found it);
- every read is under a savepoint, so a damaged page costs that read and never the snapshot;
- a range of rows reaches the file whole or not at all (read into memory, then written);
- what could not be read is listed: each block with the server's words and an estimate of the rows it
  held, each row of a readable page that could not be read by its ctid.

The file is SQL that psql (and so a DBA by hand) loads: `COPY table (columns) FROM stdin;` blocks in pg_dump's
text format, between a header and an end line whose absence marks a cut file.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from toolkit.db import damage
from toolkit.db.server import ReadFailed, Snapshot, quote_ident, quote_literal

SCAN_CHUNK = 1024  # blocks read per probe while looking for damage
COPY_CHUNK = 256  # blocks of rows held in memory before they are written
HEADER = b"-- bookgen-kit salvage: rows read around damaged pages; what was lost is in the set's sidecar\n" \
         b"SET client_encoding = 'UTF8';\nSET standard_conforming_strings = on;\n"
TRAILER = b"-- end of salvage\n"


@dataclass
class TableSalvage:
    table: str  # schema.name, the sidecar's key
    sql_name: str  # the same, quoted for SQL
    blocks: int
    damaged: List[damage.Damage] = field(default_factory=list)
    lost_rows: List[Dict[str, str]] = field(default_factory=list)  # {"ctid", "error"}
    rows_saved: int = 0
    found_by: str = "scan"

    @property
    def rows_lost_estimate(self) -> int:
        readable = max(self.blocks - len(self.damaged), 1)
        per_block = self.rows_saved / readable if self.rows_saved else 0
        return int(round(per_block * len(self.damaged))) + len(self.lost_rows)

    def record(self) -> Dict[str, object]:
        return {"blocks": self.blocks, "damaged_blocks": [d.record() for d in self.damaged],
                "lost_rows": self.lost_rows, "rows_saved": self.rows_saved,
                "rows_lost_estimate": self.rows_lost_estimate, "found_by": self.found_by}


def user_tables(snapshot: Snapshot) -> List[Tuple[str, str, int]]:
    """(schema.name, its quoted SQL name, blocks) of every table with rows of its own, in the snapshot."""
    rows = snapshot.query(
        "SELECT n.nspname || '.' || c.relname, format('%I.%I', n.nspname, c.relname), "
        "pg_relation_size(c.oid) / current_setting('block_size')::int "
        "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind = 'r' "
        "AND c.relpersistence <> 't' AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
        "AND n.nspname NOT LIKE 'pg\\_toast%' ORDER BY 1")
    return [(key, sql_name, int(blocks)) for key, sql_name, blocks in rows]


def _range(lo: int, hi: Optional[int]) -> str:
    where = "ctid >= '(%d,0)'" % lo
    return where + (" AND ctid < '(%d,0)'" % hi if hi is not None else "")


def find_damage(snapshot: Snapshot, table: str, sql_name: str, blocks: int) -> List[damage.Damage]:
    """Every block of the table that cannot be read, by tid-range reads bisected down to the block."""
    found: List[damage.Damage] = []
    own = {table, _bare(table), snapshot.query("SELECT %s::regclass::text" % quote_literal(sql_name))[0][0], None}

    def probe(lo: int, hi: int, last: bool) -> None:
        try:
            snapshot.attempt("SELECT count(ctid) FROM %s WHERE %s" % (sql_name, _range(lo, None if last else hi)))
            return
        except ReadFailed as error:
            named = damage.parse(str(error), snapshot.query)
        if named.block is not None and lo <= named.block < hi and named.relation in own:
            # a heap scan reads in block order: everything before the named block was read
            named.relation = table
            found.append(named)
            if named.block + 1 < hi or last:
                probe(named.block + 1, max(hi, named.block + 1), last)
            return
        if hi - lo <= 1:
            named.block = lo if named.block is None else named.block
            named.relation = named.relation or table
            found.append(named)
            return
        middle = (lo + hi) // 2
        probe(lo, middle, False)
        probe(middle, hi, last)

    for lo in range(0, max(blocks, 1), SCAN_CHUNK):
        hi = min(lo + SCAN_CHUNK, max(blocks, 1))
        probe(lo, hi, hi >= blocks)
    return found


def _bare(table: str) -> str:
    return table.split(".", 1)[-1]


def copy_columns(snapshot: Snapshot, table: str) -> List[str]:
    return [row[0] for row in snapshot.query(
        "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped "
        "AND attgenerated = '' ORDER BY attnum" % quote_literal(table))]  # table: a quoted SQL name


def salvage_table(snapshot: Snapshot, salvage: TableSalvage, write: Callable[[bytes], None]) -> None:
    """The table's readable rows, in COPY text format, through write(); salvage is filled in."""
    columns = ", ".join(quote_ident(c) for c in copy_columns(snapshot, salvage.sql_name))
    select = "COPY (SELECT %s FROM %s WHERE %%s) TO STDOUT" % (columns, salvage.sql_name)
    write(("COPY %s (%s) FROM stdin;\n" % (salvage.sql_name, columns)).encode())
    bad = {d.block for d in salvage.damaged}

    def copy_range(lo: int, hi: int, last: bool) -> None:
        try:
            data = snapshot.copy_out(select % _range(lo, None if last else hi))
        except ReadFailed as error:
            if hi - lo > 1:
                middle = (lo + hi) // 2
                copy_range(lo, middle, False)
                copy_range(middle, hi, last)
            else:
                copy_block(lo, str(error))
                if last:
                    copy_range(lo + 1, lo + 2, True)
            return
        if data:
            write(data)
            salvage.rows_saved += data.count(b"\n")

    def copy_block(block: int, first_error: str) -> None:
        """One block whose rows cannot all be read: row by row, or the block is lost."""
        try:
            tids = [row[0] for row in snapshot.attempt("SELECT ctid FROM %s WHERE %s" % (
                salvage.sql_name, _range(block, block + 1)))]
        except ReadFailed as error:
            named = damage.parse(str(error), snapshot.query)
            salvage.damaged.append(damage.Damage(salvage.table, block, named.error, named.path))
            return
        for tid in tids:
            try:
                data = snapshot.copy_out(select % ("ctid = %s" % quote_literal(tid)))
            except ReadFailed as error:
                salvage.lost_rows.append({"ctid": tid, "error": str(error)})
                continue
            write(data)
            salvage.rows_saved += data.count(b"\n")

    start = 0
    edge = max(salvage.blocks, 1)
    while start < edge:
        if start in bad:
            start += 1
            continue
        stop = start
        while stop < edge and stop - start < COPY_CHUNK and stop not in bad:
            stop += 1
        copy_range(start, stop, stop >= edge)
        start = stop
    if (edge - 1) in bad:  # rows past the measured end (none in the snapshot: checked, not assumed)
        copy_range(edge, edge + 1, True)
    write(b"\\.\n")


def owning_table(snapshot: Snapshot, relation: str) -> Optional[Tuple[str, str]]:
    """(schema.name, quoted name) of the table a relation belongs to: itself, or the table whose TOAST
    table or index it is."""
    rows = snapshot.query(
        "WITH r AS (SELECT %s::regclass::oid AS oid), o AS (SELECT coalesce("
        "(SELECT t.oid FROM pg_class t, r WHERE t.reltoastrelid = r.oid), "
        "(SELECT i.indrelid FROM pg_index i, r WHERE i.indexrelid = r.oid), (SELECT oid FROM r)) AS oid) "
        "SELECT n.nspname || '.' || c.relname, format('%%I.%%I', n.nspname, c.relname), n.nspname "
        "FROM o JOIN pg_class c ON c.oid = o.oid JOIN pg_namespace n ON n.oid = c.relnamespace" %
        quote_literal(relation))
    if not rows:
        return None
    key, sql_name, schema = rows[0]
    if schema == "pg_toast" and sql_name != relation:  # a TOAST index: its TOAST table's table
        return owning_table(snapshot, sql_name)
    return key, sql_name
