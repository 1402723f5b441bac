"""The runbook's stuck jobs: 'processing' for longer than a limit, and resetting them to 'failed'."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List

from toolkit.db.target import Target, quote_interval_seconds
from toolkit.errors import UsageError

RESET_MESSAGE = "Worker crashed - job reset"  # exactly as the runbook writes it
_DURATION = re.compile(r"^(\d+)\s*([smhd])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int:
    """'90m', '1h', '2d' -> seconds."""
    match = _DURATION.match(text.strip().lower())
    if not match or int(match.group(1)) <= 0:
        raise UsageError("not a duration: %r (use e.g. 30m, 1h, 2d)" % text)
    return int(match.group(1)) * _UNIT_SECONDS[match.group(2)]


@dataclass
class StuckJob:
    job_id: str
    character: str
    status: str
    created_at: str
    age_seconds: int


def _where(older_than_seconds: int) -> str:
    return "status = 'processing' AND created_at < now() - %s" % quote_interval_seconds(older_than_seconds)


def stuck_jobs(target: Target, older_than_seconds: int) -> List[StuckJob]:
    rows = target.query(
        "SELECT job_id, character, status, created_at, floor(extract(epoch FROM now() - created_at))::bigint "
        "FROM biography_jobs WHERE %s ORDER BY created_at" % _where(older_than_seconds))
    return [StuckJob(r[0], r[1], r[2], r[3], int(r[4])) for r in rows]


def count_stuck(target: Target, older_than_seconds: int) -> int:
    return int(target.query("SELECT count(*) FROM biography_jobs WHERE %s" % _where(older_than_seconds))[0][0])


def reset_stuck(target: Target, older_than_seconds: int) -> List[str]:
    """Mark the stuck jobs failed in one statement (one transaction); the ids actually changed."""
    rows = target.query(
        "UPDATE biography_jobs SET status = 'failed', error_message = '%s' WHERE %s "
        "RETURNING job_id" % (RESET_MESSAGE, _where(older_than_seconds)))
    return sorted(r[0] for r in rows)
