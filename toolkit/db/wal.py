"""The WAL archive: segment names, the archive's continuity, and the archive_command that fills it.

Segments are named TTTTTTTTXXXXXXXXYYYYYYYY (timeline, then the segment number split at 4 GiB); a timeline's
history file is TTTTTTTT.history. The archive is one flat directory, as PostgreSQL's own docs describe and as
pgBackRest and Barman keep theirs per timeline.

Invariants:
- The archive_command never overwrites: a segment already archived is accepted again only when identical (the
  server retries after a crash), and a different one fails loudly (a line in the server log, the segment kept
  in pg_wal until someone looks). A segment appears under its name only whole (copied to a dot-name, flushed,
  renamed).
- Continuity is judged from names only (`backup wal status`); what a segment holds is read by pg_waldump when
  a time must be named (the last commit before a gap).
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

SEGMENT = re.compile(r"^([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{8})$")
HISTORY = re.compile(r"^([0-9A-F]{8})\.history$")
DEFAULT_SEGMENT_SIZE = 16 << 20


def segment_name(timeline: int, number: int, segment_size: int = DEFAULT_SEGMENT_SIZE) -> str:
    per_id = 0x100000000 // segment_size
    return "%08X%08X%08X" % (timeline, number // per_id, number % per_id)


def parse_segment(name: str, segment_size: int = DEFAULT_SEGMENT_SIZE) -> Optional[Tuple[int, int]]:
    """(timeline, segment number) of a segment's name, else None."""
    match = SEGMENT.match(name)
    if not match:
        return None
    per_id = 0x100000000 // segment_size
    high, low = int(match.group(2), 16), int(match.group(3), 16)
    if low >= per_id:
        return None
    return int(match.group(1), 16), high * per_id + low


def lsn_to_int(lsn: str) -> int:
    high, low = lsn.split("/")
    return (int(high, 16) << 32) | int(low, 16)


def segment_of(lsn: str, segment_size: int = DEFAULT_SEGMENT_SIZE) -> int:
    return lsn_to_int(lsn) // segment_size


@dataclass
class Timeline:
    timeline: int
    first: int
    last: int
    count: int
    gaps: List[Tuple[int, int]] = field(default_factory=list)  # (first missing, last missing) segment numbers


@dataclass
class Archive:
    directory: str
    segment_size: int
    timelines: Dict[int, Timeline]
    histories: List[int]
    newest_name: Optional[str]
    newest_mtime: Optional[float]
    stray: List[str]  # names in the directory that are neither segments nor history files (a .tmp left by a kill)

    def has(self, timeline: int, number: int) -> bool:
        return os.path.isfile(os.path.join(self.directory, segment_name(timeline, number, self.segment_size)))

    def first_gap_after(self, timeline: int, number: int) -> Optional[Tuple[int, int]]:
        """The first gap at or after segment `number` of this timeline, or None when it is continuous to its
        newest segment."""
        line = self.timelines.get(timeline)
        if line is None:
            return None
        for gap in line.gaps:
            if gap[1] >= number:
                return gap
        return None

    def record(self) -> Dict[str, Any]:
        size = self.segment_size
        return {
            "directory": self.directory, "segment_size": size,
            "timelines": [{"timeline": t.timeline, "first": segment_name(t.timeline, t.first, size),
                           "last": segment_name(t.timeline, t.last, size), "segments": t.count,
                           "gaps": [{"from": segment_name(t.timeline, a, size), "to": segment_name(t.timeline, b, size),
                                     "missing": b - a + 1} for a, b in t.gaps]}
                          for t in sorted(self.timelines.values(), key=lambda t: t.timeline)],
            "history_files": ["%08X.history" % t for t in self.histories],
            "newest": self.newest_name,
            "newest_age_seconds": None if self.newest_mtime is None else round(time.time() - self.newest_mtime, 1),
            "stray": self.stray,
        }


def read_archive(directory: str, segment_size: int = DEFAULT_SEGMENT_SIZE) -> Archive:
    """What the archive holds, by name: per timeline its first and last segment and every gap between."""
    numbers: Dict[int, List[int]] = {}
    histories: List[int] = []
    stray: List[str] = []
    newest: Tuple[Optional[str], Optional[float]] = (None, None)
    with os.scandir(directory) as entries:
        for entry in entries:
            parsed = parse_segment(entry.name, segment_size)
            if parsed is not None and entry.is_file(follow_symlinks=False):
                numbers.setdefault(parsed[0], []).append(parsed[1])
                mtime = entry.stat(follow_symlinks=False).st_mtime
                if newest[1] is None or mtime > newest[1] or (mtime == newest[1] and entry.name > (newest[0] or "")):
                    newest = (entry.name, mtime)
                continue
            history = HISTORY.match(entry.name)
            if history:
                histories.append(int(history.group(1), 16))
            elif not (parse_segment(entry.name[:24], segment_size) and (entry.name.endswith(".backup") or
                                                                        entry.name[24:] == ".partial")):
                stray.append(entry.name)  # a backup history file or a timeline's last partial segment is ours
    timelines = {}
    for timeline, found in numbers.items():
        found.sort()
        gaps = [(a + 1, b - 1) for a, b in zip(found, found[1:]) if b - a > 1]
        timelines[timeline] = Timeline(timeline, found[0], found[-1], len(found), gaps)
    return Archive(directory, segment_size, timelines, sorted(histories), newest[0], newest[1], sorted(stray))


def archive_command(directory: str) -> str:
    """The archive_command for an archive directory as the server sees it (%p is relative to the data
    directory, the server's working directory). Each placeholder appears once: PostgreSQL expands the command
    into a buffer of 1,024 bytes and cuts what is longer (a cut command is a shell syntax error on every try)."""
    if "'" in directory or "%" in directory or len(directory) > 600:
        raise ValueError("an archive directory with ' or %, or longer than 600 characters, cannot be put in an "
                         "archive_command")
    return ("d='%s' f=%%f p=%%p; if test -e \"$d/$f\"; then cmp -s \"$p\" \"$d/$f\" || { echo \"bookgen-kit archive: "
            "$d/$f exists and differs from $p: not overwritten\" >&2; exit 1; }; else cp \"$p\" \"$d/.$f.partial\" && "
            "sync \"$d/.$f.partial\" && mv \"$d/.$f.partial\" \"$d/$f\" && sync \"$d\"; fi" % directory)


def read_history(path: str) -> List[Tuple[int, str, str]]:
    """A timeline history file: (parent timeline, the LSN where the next one begins, why), oldest first."""
    entries = []
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            fields = line.strip().split("\t")
            if len(fields) >= 2 and fields[0].isdigit() and "/" in fields[1]:
                entries.append((int(fields[0]), fields[1], fields[2] if len(fields) > 2 else ""))
    return entries


def last_commit(waldump: Callable[[List[str]], str], segment_paths: Iterable[str],
                end_lsn: Optional[str] = None) -> Optional[str]:
    """The time of the last COMMIT record in these segments (read newest first; before end_lsn when given), as
    pg_waldump prints it (UTC), or None when none holds a commit. `waldump` runs pg_waldump with these arguments
    (the last, a segment's path on this host) and returns what it printed."""
    for path in segment_paths:
        printed = waldump(["--rmgr=Transaction"] + (["--end=%s" % end_lsn] if end_lsn else []) + [path])
        found = re.findall(r"desc: COMMIT (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)? \w+)", printed)
        if found:
            return found[-1]
    return None
