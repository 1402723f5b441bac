"""BookGen in miniature: its schema and rows, its host tree, and its containers."""
from __future__ import annotations

import os
import random
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Dict, List

SCHEMA = """
CREATE TABLE users (
    id serial PRIMARY KEY,
    email text NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE biography_jobs (
    job_id uuid PRIMARY KEY,
    character text NOT NULL,
    status text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz,
    error_message text,
    user_id integer REFERENCES users(id)
);
CREATE INDEX biography_jobs_status ON biography_jobs (status, created_at);
CREATE TABLE chapters (
    id serial PRIMARY KEY,
    job_id uuid NOT NULL REFERENCES biography_jobs(job_id),
    number integer NOT NULL,
    title text NOT NULL,
    body text NOT NULL
);
CREATE TABLE alembic_version (version_num varchar(32) PRIMARY KEY);
INSERT INTO alembic_version VALUES ('4f2a9c1e7b3d');
"""

CHARACTERS = ["Ada Lovelace", "Marie Curie", "Nikola Tesla", "Hypatia", "Alan Turing", "Grace Hopper",
              "Emmy Noether", "Srinivasa Ramanujan", "Rosalind Franklin", "Katherine Johnson"]


def load_schema(conn) -> None:
    with conn.cursor() as cur:
        cur.execute(SCHEMA)


def seed_rows(conn, jobs: int = 50, stuck: int = 0, users: int = 10, chapters_per_job: int = 2,
              seed: int = 1) -> List[str]:
    """Deterministic rows: `jobs` finished or queued jobs, plus `stuck` ones 'processing' for 2-5 hours.

    Returns the job ids of the stuck jobs. COPY keeps 10^5-10^6 rows quick for benchmarks.
    """
    rng = random.Random(seed)
    now = datetime.now(timezone.utc)
    stuck_ids = []
    with conn.cursor() as cur:
        cur.execute("SELECT coalesce(max(id), 0) FROM users")
        offset = cur.fetchone()[0]
        with cur.copy("COPY users (email, created_at) FROM STDIN") as copy:
            for i in range(users):
                copy.write_row(("user%d@example.org" % (offset + i), now - timedelta(days=rng.randint(1, 400))))
        cur.execute("SELECT id FROM users ORDER BY id")  # not min..max: ids have gaps (a rolled-back insert, a
        user_ids = [row[0] for row in cur.fetchall()]     # sequence that jumped after a point-in-time restore)
        with cur.copy("COPY biography_jobs (job_id, character, status, created_at, updated_at, error_message, "
                      "user_id) FROM STDIN") as copy:
            for i in range(jobs + stuck):
                job_id = uuid.UUID(int=rng.getrandbits(128), version=4)
                if i < stuck:
                    status, created = "processing", now - timedelta(hours=rng.uniform(2, 5))
                    stuck_ids.append(str(job_id))
                else:
                    status = rng.choice(["completed", "completed", "completed", "failed", "queued"])
                    created = now - timedelta(minutes=rng.randint(1, 60 * 24 * 30))
                error = "LLM timeout" if status == "failed" else None
                copy.write_row((job_id, rng.choice(CHARACTERS), status, created, created, error,
                                rng.choice(user_ids)))
        if chapters_per_job:
            cur.execute("INSERT INTO chapters (job_id, number, title, body) "
                        "SELECT j.job_id, n, 'Chapter ' || n, repeat(md5(j.job_id::text || n), 8) "
                        "FROM biography_jobs j, generate_series(1, %s) n", (chapters_per_job,))
    return stuck_ids


ENV_TEMPLATE = """# BookGen configuration
DATABASE_URL=postgresql://bookgen:{db_password}@{db_host}:{db_port}/bookgen
DATABASE_PASSWORD={db_password}
POSTGRES_PASSWORD={db_password}
REDIS_PASSWORD="{redis_password}"
REDIS_URL=redis://:{redis_password}@{redis_host}:{redis_port}/0
SECRET_KEY='{secret_key}'
OPENROUTER_API_KEY={openrouter_key}
BATCH_SIZE_CHAPTERS=4
BATCH_SIZE_SPECIAL_SECTIONS=2
MAX_CONCURRENT_JOBS=3
export LOG_LEVEL=info  # inline comment
"""

COMPOSE = """services:
  db:
    image: postgres:15
    container_name: bookgen-db
    environment:
      POSTGRES_USER: bookgen
      POSTGRES_PASSWORD: ${POSTGRES_PASSWORD}
    volumes:
      - pgdata:/var/lib/postgresql/data
  redis:
    image: redis:7
    container_name: bookgen-redis
    command: redis-server --requirepass ${REDIS_PASSWORD}
  api:
    build: .
    container_name: bookgen-api
    env_file: .env
    ports:
      - "127.0.0.1:8000:8000"
  worker:
    build: .
    container_name: bookgen-worker
    env_file: .env
    command: celery -A src.worker worker
volumes:
  pgdata:
"""


@dataclass
class BookgenHost:
    root: Path
    app_dir: Path
    env_file: Path
    log_dir: Path
    secrets: Dict[str, str] = field(default_factory=dict)

    def path(self, absolute: str) -> Path:
        return self.root / absolute.lstrip("/")


def make_host_tree(root: Path, db_host: str = "db", db_port: int = 5432, redis_host: str = "redis",
                   redis_port: int = 6379, db_password: str = None, redis_password: str = None) -> BookgenHost:
    """An /opt/bookgen deployment and /var/log/bookgen under root, with known secret values."""
    import secrets as random_secrets

    values = {
        "db_password": db_password or "dbpw-" + random_secrets.token_hex(12),
        "redis_password": redis_password or "redispw-" + random_secrets.token_hex(12),
        "secret_key": random_secrets.token_hex(32),
        "openrouter_key": "sk-or-v1-" + random_secrets.token_hex(24),
    }
    app = root / "opt" / "bookgen"
    for sub in ("bios", "docx", "backups", "src"):
        (app / sub).mkdir(parents=True, exist_ok=True)
    env_file = app / ".env"
    env_file.write_text(ENV_TEMPLATE.format(db_host=db_host, db_port=db_port, redis_host=redis_host,
                                            redis_port=redis_port, **values))
    os.chmod(env_file, 0o600)
    (app / "docker-compose.yml").write_text(COMPOSE)
    now = datetime.now(timezone.utc)
    for i, character in enumerate(CHARACTERS[:4]):
        book = app / "bios" / character.replace(" ", "_")
        book.mkdir()
        (book / "chapter1.md").write_text("# %s\n\nOnce upon a time...\n" % character)
        (app / "docx" / ("%s.docx" % character.replace(" ", "_"))).write_bytes(os.urandom(2048))
    (app / "backups" / "bookgen_20261101_020000.sql.gz").write_bytes(os.urandom(4096))
    logs = root / "var" / "log" / "bookgen"
    logs.mkdir(parents=True)
    lines = []
    for minute in range(50):
        stamp = (now - timedelta(minutes=50 - minute)).strftime("%Y-%m-%d %H:%M:%S")
        lines.append("%s INFO api: GET /health 200 3ms" % stamp)
        if minute % 10 == 0:
            lines.append("%s INFO worker: job %s started" % (stamp, uuid.uuid4()))
    (logs / "api.log").write_text("\n".join(lines) + "\n")
    (logs / "worker.log").write_text("%s ERROR worker: LLM timeout after 120s\n" % now.strftime("%Y-%m-%d %H:%M:%S"))
    (logs / "api.log.1").write_text("old rotated log\n")
    (logs / "deploy.log").write_text("deployed 1a2b3c4\n")
    return BookgenHost(root=root, app_dir=app, env_file=env_file, log_dir=logs,
                       secrets={"DATABASE_PASSWORD": values["db_password"], "REDIS_PASSWORD": values["redis_password"],
                                "SECRET_KEY": values["secret_key"], "OPENROUTER_API_KEY": values["openrouter_key"]})
