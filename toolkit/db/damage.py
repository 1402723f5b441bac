"""What a server error says about damage: the relation and block it names, turned into a table's name.

Invariant: nothing here writes to a database; names are looked up through the catalogs of the database the
error came from (pg_filenode_relation), and an error that names no block is still reported, word for word,
as the server's (never a line of ours that quotes data).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, List, Optional

# the ways PostgreSQL says a page cannot be used (bufmgr.c, md.c, checksum failures, amcheck, heap/toast access)
BLOCK_IN_RELATION = re.compile(r"block (\d+) of relation ((?:base|global|pg_tblspc)/[0-9/_A-Za-z]+)")
BLOCK_IN_FILE = re.compile(r"block (\d+) in file \"((?:base|global|pg_tblspc)/[^\"]+)\"")
DAMAGE_WORDS = ("invalid page", "could not read block", "checksum verification failed", "corrupted page",
                "missing chunk number", "unexpected chunk number", "could not access status of transaction",
                "found xmin", "found xmax", "invalid memory alloc request size", "index contains corrupted",
                "uncommitted xmin", "invalid compressed", "compressed pglz data is corrupt",
                "could not open file \"base/", "out of range for relation", "unexpected zero page")


@dataclass
class Damage:
    """One damaged place: a relation (by name when it could be told), a block (None when the error names
    none), and the server's words."""

    relation: Optional[str]
    block: Optional[int]
    error: str
    path: Optional[str] = None

    def record(self) -> dict:
        return {"relation": self.relation, "block": self.block, "error": self.error, "path": self.path}

    def describe(self) -> str:
        where = self.relation or self.path or "an unnamed relation"
        return "%s block %s: %s" % (where, self.block, self.error) if self.block is not None else \
            "%s: %s" % (where, self.error)


def looks_like_damage(error: str) -> bool:
    lowered = error.lower()
    return any(word in lowered for word in DAMAGE_WORDS)


def _filenode_query(path: str) -> Optional[str]:
    """base/16386/16399[.1] -> the SQL that names it; pg_tblspc/<ts>/<ver>/<db>/<node> too."""
    parts = path.split("/")
    node = parts[-1].split(".")[0].split("_")[0]
    if not node.isdigit():
        return None
    tablespace = "0"
    if parts[0] == "pg_tblspc" and len(parts) >= 2 and parts[1].isdigit():
        tablespace = parts[1]
    elif parts[0] == "global":
        tablespace = "(SELECT oid FROM pg_tablespace WHERE spcname = 'pg_global')"
    return ("SELECT n.nspname || '.' || c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.oid = pg_filenode_relation(%s, %s)" % (tablespace, node))


def parse(error: str, query: Optional[Callable[[str], List[List[Optional[str]]]]] = None) -> Damage:
    """The Damage an error names; with query (in the error's database), the relation's name."""
    block: Optional[int] = None
    path: Optional[str] = None
    match = BLOCK_IN_RELATION.search(error) or BLOCK_IN_FILE.search(error)
    if match:
        block, path = int(match.group(1)), match.group(2)
    relation = None
    quoted = re.search(r"(?:relation|index|table) \"([^\"]+)\"", error)
    if quoted:
        relation = quoted.group(1)
    if path and query is not None:
        sql = _filenode_query(path)
        try:
            rows = query(sql) if sql else []
            relation = rows[0][0] if rows and rows[0][0] else relation
        except Exception:  # the name is a courtesy: the path stays in the report
            pass
    return Damage(relation, block, error.strip().splitlines()[0] if error.strip() else error, path)
