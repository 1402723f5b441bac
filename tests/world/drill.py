"""The DBA's corruption drill: a BookGen database with every kind of object a restore must give back, and
pages damaged the way a failing disk damages them (cluster stopped, bytes overwritten, cluster started)."""
from __future__ import annotations

import os
from typing import Callable, Dict, List

from tests.world import bookgen
from tests.world.services import PgCluster, launch

BLOCK = 8192
EXTRA_SCHEMA = """
CREATE EXTENSION pgcrypto;
CREATE EXTENSION pg_trgm;
CREATE INDEX biography_jobs_character_trgm ON biography_jobs USING gin (character gin_trgm_ops);
CREATE SEQUENCE invoice_numbers START 1000;
SELECT setval('invoice_numbers', 4242);
CREATE VIEW failed_jobs AS SELECT job_id, error_message FROM biography_jobs WHERE status = 'failed';
CREATE TABLE covers (job_id uuid PRIMARY KEY REFERENCES biography_jobs(job_id), image oid NOT NULL,
                     secret bytea NOT NULL);
CREATE TABLE manuscripts (id integer PRIMARY KEY, body text NOT NULL);
ALTER TABLE manuscripts ALTER body SET STORAGE EXTERNAL;
INSERT INTO manuscripts SELECT i, (SELECT string_agg(md5(i::text || ':' || n), '') FROM generate_series(1, 200) n)
  FROM generate_series(1, 40) i;
"""
MANUSCRIPTS = 40


def build(cluster: PgCluster, name: str, jobs: int) -> Dict[str, object]:
    """The drill database `name`, owned by bookgen, with its database-level state; returns what it holds."""
    with cluster.connect() as conn:
        conn.execute("DO $$BEGIN CREATE ROLE readonly LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END$$")
        conn.execute('CREATE DATABASE "%s" OWNER bookgen' % name)
    with cluster.connect(name) as conn:
        bookgen.load_schema(conn)
        conn.execute(EXTRA_SCHEMA)
        bookgen.seed_rows(conn, jobs=jobs, users=200, chapters_per_job=1, seed=7)
        conn.execute("INSERT INTO covers SELECT job_id, lo_from_bytea(0, convert_to(character, 'UTF8')), "
                     "pgp_sym_encrypt(job_id::text, 'drill') FROM biography_jobs ORDER BY job_id LIMIT 5")
        conn.execute("ALTER TABLE users OWNER TO bookgen")
        conn.execute("GRANT SELECT ON ALL TABLES IN SCHEMA public TO readonly")
        conn.execute("ANALYZE")
    with cluster.connect() as conn:
        conn.execute('REVOKE CONNECT, TEMPORARY ON DATABASE "%s" FROM PUBLIC' % name)
        conn.execute('GRANT CONNECT ON DATABASE "%s" TO readonly, bookgen' % name)
        conn.execute('ALTER DATABASE "%s" SET work_mem = \'12MB\'' % name)
        conn.execute('ALTER DATABASE "%s" SET search_path = public, "$user"' % name)
        conn.execute('ALTER ROLE readonly IN DATABASE "%s" SET default_transaction_read_only = on' % name)
        conn.execute('ALTER DATABASE "%s" CONNECTION LIMIT 40' % name)
        conn.execute('COMMENT ON DATABASE "%s" IS \'BookGen production (drill)\'' % name)
    return {"jobs": jobs}


def relation_file(cluster, database: str, relation: str) -> str:
    with cluster.connect(database) as conn:
        path = conn.execute("SELECT pg_relation_filepath(%s::regclass)", (relation,)).fetchone()[0]
    return os.path.join(str(cluster.datadir), path)


def toast_of(cluster, database: str, table: str) -> str:
    with cluster.connect(database) as conn:
        return conn.execute("SELECT reltoastrelid::regclass::text FROM pg_class WHERE oid = %s::regclass",
                            (table,)).fetchone()[0]


def blocks_of(cluster, database: str, relation: str) -> int:
    with cluster.connect(database) as conn:
        return conn.execute("SELECT pg_relation_size(%s::regclass) / 8192", (relation,)).fetchone()[0]


def ids_in_blocks(cluster, database: str, blocks: List[int]) -> List[str]:
    """The job ids on these heap blocks of biography_jobs (what damaging them will lose)."""
    with cluster.connect(database) as conn:
        return sorted(str(row[0]) for row in conn.execute(
            "SELECT job_id FROM biography_jobs WHERE %s" % " OR ".join(
                "(ctid >= '(%d,0)' AND ctid < '(%d,0)')" % (b, b + 1) for b in blocks)))


def damage_many(cluster, pages: Dict[str, Dict[str, List[int]]], stop: Callable[[], None],
                start: Callable[[], None]) -> None:
    """{database: {relation: [block, ...]}}: stop the server, overwrite the start of each page (its header and
    line pointers) with bytes no page has, start it again."""
    files = [(relation_file(cluster, database, relation), blocks) for database, relations in pages.items()
             for relation, blocks in relations.items()]
    stop()
    for path, blocks in files:
        with open(path, "r+b") as handle:
            for block in blocks:
                handle.seek(block * BLOCK)
                handle.write(b"\xde\xad\xbe\xef" * 64)
    start()


def damage_cluster(cluster: PgCluster, pages: Dict[str, Dict[str, List[int]]]) -> None:
    damage_many(cluster, pages, cluster.stop, lambda: launch(cluster))
