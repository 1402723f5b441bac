"""The collector interface, and the emitter through which a collector hands members to the bundle.

A collector runs on its own thread and only reads; the capture thread writes. They
meet in a bounded queue of events, so memory stays bounded and a collector that
hangs (a dead NFS mount, a FIFO) can be abandoned when its time budget runs out
without leaving the tar malformed.
"""
from __future__ import annotations

import hashlib
import os
import queue
import stat
import tarfile
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

READ_SIZE = 1 << 20
QUEUE_DEPTH = 8
PART_SIZE = 16 * 1024 * 1024  # a stream of unknown length goes in parts of this size (a tar needs sizes first)


@dataclass
class CollectionContext:
    root: str  # filesystem root that file collectors read through ("/" on a live host)
    deployment: Any
    profile: str
    includes: List[str]
    max_file_size: int
    started_at: float = field(default_factory=time.time)
    docker_root: str = "/var/lib/docker"

    def host_path(self, logical: str) -> str:
        """The path on disk of a logical (absolute) path under the root prefix."""
        if self.root in ("", "/"):
            return logical
        return os.path.join(self.root, logical.lstrip("/"))


# -- events -------------------------------------------------------------------------
@dataclass
class MemberStart:
    info: tarfile.TarInfo
    entry: Dict[str, Any]


@dataclass
class Chunk:
    data: bytes
    digest: Any = None  # sha256 of the member so far, computed on the collector's thread


@dataclass
class MemberEnd:
    notes: Dict[str, Any]


@dataclass
class Skip:
    source: str
    reason: str
    kind: str = "error"  # "error" (could not read) or "skip" (left out on purpose)


@dataclass
class LogLine:
    message: str


@dataclass
class Fact:
    """Something a collector saw that findings are computed from (kept in memory, not a member)."""
    kind: str
    data: Any
    evidence: str  # the archive path that holds the evidence


_DONE = object()


def _utc(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(timestamp)) + ".%06dZ" % int((timestamp % 1) * 1e6)


def stat_times(info: os.stat_result) -> Dict[str, str]:
    return {"mtime": _utc(info.st_mtime), "atime": _utc(info.st_atime), "ctime": _utc(info.st_ctime)}


class Emitter:
    """What a collector calls; every call becomes an event on the queue the capture thread reads."""

    def __init__(self, collector: str, events: "queue.Queue") -> None:
        self.collector = collector
        self.events = events
        self.seen: set = set()

    def _put(self, event) -> None:
        self.events.put(event)

    def log(self, message: str) -> None:
        self._put(LogLine("%s: %s" % (self.collector, message)))

    def skip(self, source: str, reason: str, kind: str = "error") -> None:
        self._put(Skip(source, reason, kind))

    def stream(self, archive_path: str, chunks, method: str) -> int:
        """A stream of unknown length (docker logs, cp, export): one member, or PATH.part0000, .part0001...
        when it is longer than PART_SIZE (`cat PATH.part* > PATH` rebuilds it). Returns the bytes taken."""
        buffer = bytearray()
        part, total = 0, 0
        iterator = iter(chunks)
        finished = False
        while not finished:
            while len(buffer) < PART_SIZE:
                try:
                    buffer += next(iterator)
                except StopIteration:
                    finished = True
                    break
            piece = bytes(buffer[:PART_SIZE])
            del buffer[:PART_SIZE]
            if finished and not buffer and part == 0:
                self.generated(archive_path, piece, method)
            else:
                self.generated("%s.part%04d" % (archive_path, part), piece, method + " (part %d)" % part)
            finished = finished and not buffer
            total += len(piece)
            part += 1
        return total

    def fact(self, kind: str, data: Any, evidence: str) -> None:
        self._put(Fact(kind, data, evidence))

    def json(self, archive_path: str, document: Any, method: str, source: Optional[str] = None) -> None:
        import json

        self.generated(archive_path, json.dumps(document, indent=1, sort_keys=True, default=str).encode(), method,
                       source)

    def program(self, archive_path: str, name: str, args, timeout: float = 10.0) -> Optional[bytes]:
        """A host program's output as a member, recorded as a host program (path, sha256, exit code)."""
        from toolkit.host.programs import run_program

        run = run_program(name, args, timeout)
        if run.error:
            self.skip(" ".join(run.argv), run.error, "skip" if run.path is None else "error")
            return None
        method = "host program %s (sha256 %s), exit %s" % (run.path, run.sha256, run.returncode)
        self.generated(archive_path, run.stdout + (b"\n# stderr:\n" + run.stderr if run.stderr else b""), method,
                       " ".join(run.argv))
        return run.stdout

    def generated(self, archive_path: str, data: bytes, method: str, source: Optional[str] = None) -> None:
        """A member made by the collector itself (JSON of facts, a listing)."""
        info = tarfile.TarInfo(archive_path)
        info.size, info.mode, info.mtime = len(data), 0o444, time.time()
        entry = {"path": archive_path, "type": "generated", "source": source, "collector": self.collector,
                 "method": method, "collected_at": _utc(time.time())}
        self._put(MemberStart(info, entry))
        digest = hashlib.sha256()
        for start in range(0, len(data), READ_SIZE):
            piece = data[start:start + READ_SIZE]
            digest.update(piece)
            self._put(Chunk(piece, digest.copy()))
        self._put(MemberEnd({}))

    def path(self, host_path: str, logical_path: str, max_size: int) -> None:
        """A file, directory or symlink from disk, as it is (never following a symlink)."""
        archive_path = "files/" + logical_path.lstrip("/")
        if archive_path in self.seen:
            return
        self.seen.add(archive_path)
        try:
            info = os.lstat(host_path)
        except FileNotFoundError:
            self.skip(logical_path, "vanished before it could be read")
            return
        except OSError as error:
            self.skip(logical_path, "cannot stat: %s" % error.strerror)
            return
        base = {"path": archive_path, "source": logical_path, "collector": self.collector,
                "mode": "%04o" % stat.S_IMODE(info.st_mode), "uid": info.st_uid, "gid": info.st_gid,
                "inode": info.st_ino, "device": info.st_dev, "source_size": info.st_size,
                "collected_at": _utc(time.time())}
        base.update(stat_times(info))
        member = tarfile.TarInfo(archive_path)
        member.mode, member.uid, member.gid, member.mtime = stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid, \
            info.st_mtime
        member.pax_headers = {"atime": "%.9f" % info.st_atime, "ctime": "%.9f" % info.st_ctime}
        if stat.S_ISLNK(info.st_mode):
            try:
                member.type, member.linkname = tarfile.SYMTYPE, os.readlink(host_path)
            except OSError as error:
                self.skip(logical_path, "cannot read symlink: %s" % error.strerror)
                return
            self._put(MemberStart(member, dict(base, type="symlink", target=member.linkname, method="readlink")))
            self._put(MemberEnd({}))
        elif stat.S_ISDIR(info.st_mode):
            member.type = tarfile.DIRTYPE
            self._put(MemberStart(member, dict(base, type="dir", method="lstat")))
            self._put(MemberEnd({}))
        elif stat.S_ISREG(info.st_mode):
            self._file(host_path, logical_path, member, base, max_size)
        else:
            kind = "fifo" if stat.S_ISFIFO(info.st_mode) else "socket" if stat.S_ISSOCK(info.st_mode) else "device"
            self.skip(logical_path, "%s: not read" % kind, "skip")

    def proc_file(self, source: str, archive_path: str, max_size: int) -> None:
        """A file reached through a /proc magic link (a process's exe), which must be followed."""
        if archive_path in self.seen:
            return
        self.seen.add(archive_path)
        member = tarfile.TarInfo(archive_path)
        member.mode, member.mtime = 0o444, time.time()
        base = {"path": archive_path, "source": source, "collector": self.collector, "collected_at": _utc(time.time())}
        self._file(source, source, member, base, max_size, follow=True)

    def _file(self, host_path: str, logical_path: str, member: tarfile.TarInfo, base: Dict[str, Any],
              max_size: int, follow: bool = False) -> None:
        flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | (0 if follow else os.O_NOFOLLOW)
        method = "read(O_NOATIME)" if follow else "read(O_NOATIME|O_NOFOLLOW)"
        try:
            fd = os.open(host_path, flags | getattr(os, "O_NOATIME", 0))
        except PermissionError:
            try:  # O_NOATIME needs ownership or CAP_FOWNER; the read may then touch atime
                fd = os.open(host_path, flags)
                method = "read(O_NOFOLLOW; atime may change: no O_NOATIME permission)"
            except OSError as error:
                self.skip(logical_path, "cannot open: %s" % error.strerror)
                return
        except FileNotFoundError:
            self.skip(logical_path, "vanished before it could be read")
            return
        except OSError as error:
            self.skip(logical_path, "cannot open: %s" % error.strerror)
            return
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                self.skip(logical_path, "changed into a non-regular file: not read", "skip")
                return
            size = info.st_size
            truncated = size > max_size
            member.size = min(size, max_size)
            entry = dict(base, type="file", method=method, truncated=truncated)
            if truncated:
                entry["truncated_at"] = max_size
            self._put(MemberStart(member, entry))
            remaining, notes = member.size, {}
            digest = hashlib.sha256()
            while remaining:
                try:
                    data = os.read(fd, min(READ_SIZE, remaining))
                except OSError as error:
                    notes["error"] = "read failed after %d bytes: %s" % (member.size - remaining, error.strerror)
                    break
                if not data:
                    notes["changed_during_read"] = "shrank to %d bytes while read" % (member.size - remaining)
                    break
                digest.update(data)
                self._put(Chunk(data, digest.copy()))
                remaining -= len(data)
            after = os.fstat(fd)
            if after.st_size > size and not truncated:
                notes["changed_during_read"] = "grew from %d to %d bytes while read (first %d kept)" % (
                    size, after.st_size, size)
            elif after.st_mtime_ns != info.st_mtime_ns and "changed_during_read" not in notes:
                notes["changed_during_read"] = "modified while read"
            self._put(MemberEnd(notes))
        finally:
            os.close(fd)

    def tree(self, host_path: str, logical_path: str, max_size: int) -> None:
        """A path and, for a directory, everything below it, without following symlinks."""
        self.path(host_path, logical_path, max_size)
        if not os.path.isdir(host_path) or os.path.islink(host_path):
            return
        for directory, dirs, files in os.walk(host_path, followlinks=False, onerror=lambda e: self.skip(
                e.filename, "cannot list: %s" % e.strerror)):
            dirs.sort()
            relative = os.path.relpath(directory, host_path)
            for name in dirs + sorted(files):
                logical = os.path.normpath(os.path.join(logical_path, relative, name))
                self.path(os.path.join(directory, name), logical, max_size)


class Collector:
    """One source of evidence. Lower `rank` is more volatile and runs first (RFC 3227)."""

    name = "collector"
    rank = 100
    profiles: Tuple[str, ...] = ("volatile", "triage", "full")
    budget_seconds = 60.0
    description = ""

    def run(self, context: CollectionContext, emit: Emitter) -> None:
        raise NotImplementedError


def start_collector(collector: Collector, context: CollectionContext):
    """Run the collector on a daemon thread; (events queue, thread)."""
    import threading

    events: "queue.Queue" = queue.Queue(QUEUE_DEPTH)
    emitter = Emitter(collector.name, events)

    def body() -> None:
        try:
            collector.run(context, emitter)
        except Exception as error:  # a collector's crash is recorded, the capture goes on
            events.put(Skip(collector.name, "collector failed: %s: %s" % (type(error).__name__, error)))
        events.put(_DONE)

    thread = threading.Thread(target=body, name="collector-" + collector.name, daemon=True)
    thread.start()
    return events, thread


def is_done(event) -> bool:
    return event is _DONE
