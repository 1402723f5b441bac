"""The collector interface, and the emitter through which a collector hands members to the bundle.

A collector runs on its own thread and only reads; the capture thread writes. They
meet in a bounded queue of events, so memory stays bounded and a collector that
hangs (a dead NFS mount, a FIFO) can be abandoned when its time budget runs out
without leaving the tar malformed.
"""
from __future__ import annotations

import hashlib
import os
import posixpath
import queue
import stat
import tarfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Tuple

from toolkit import utc
from toolkit.evidence.bundle import ROOTFS
from toolkit.evidence.room import OutputRoom
from toolkit.host.hostfs import VANISHED, HostFS, atime_before_us, Refused, WalkEntry, WalkLimits, WalkStats, kind_of, reason

READ_SIZE = 4 << 20  # per read and per event: fewer hand-offs between the threads
QUEUE_DEPTH = 8
PART_SIZE = 16 * 1024 * 1024  # a stream of unknown length goes in parts of this size (a tar needs sizes first)


def host_member(logical: str) -> str:
    """The member name of a host path."""
    return ROOTFS + logical.lstrip("/")


@dataclass
class CollectionContext:
    root: str  # filesystem root that file collectors read through ("/" on a live host)
    deployment: Any
    profile: str
    includes: List[str]
    max_file_size: int
    started_at: float = field(default_factory=time.time)
    docker_root: str = "/var/lib/docker"
    own_outputs: frozenset = frozenset()  # (st_dev, st_ino) of our output directory: never collected
    deadline: Optional[float] = None  # time.monotonic() by which the whole capture must end
    # facts the collectors that ran before have emitted, by kind (filled by the capture thread between
    # collectors: a collector reads those of the collectors before it, never its own)
    facts: Dict[str, List[Dict[str, Any]]] = field(default_factory=dict)
    # (st_dev, st_ino) -> sha256 of files already read whole (package verification), for hash_executables
    digests: Dict[Tuple[int, int], str] = field(default_factory=dict)
    process_memory: Tuple[int, ...] = ()  # --process-memory PIDs: dumped whether or not a finding marks them
    freeze: bool = False  # SIGSTOP each process for its dump (--freeze)
    process_memory_limit: int = 1 << 30  # bytes of memory in one core
    process_memory_total: int = 4 << 30  # bytes in all cores together
    room: Optional[OutputRoom] = None  # free space on the output medium: a member that would eat the reserve is not stored
    fs: HostFS = field(init=False)
    _claimed: Dict[str, str] = field(init=False, default_factory=dict)
    _lock: Any = field(init=False, default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.fs = HostFS(self.root)

    def host_path(self, logical: str) -> str:
        """The path on disk of a logical (absolute) path under the root prefix (for messages, not for reads)."""
        if self.root in ("", "/"):
            return logical
        return os.path.join(self.root, logical.lstrip("/"))

    def claim(self, archive_path: str, collector: str) -> Optional[str]:
        """None when archive_path is new (now ours); else the collector that already stored it."""
        with self._lock:
            owner = self._claimed.get(archive_path)
            if owner is None:
                self._claimed[archive_path] = collector
            return owner

    def walk_limits(self, deadline: Optional[float] = None) -> WalkLimits:
        ends = [d for d in (deadline, self.deadline) if d is not None]
        return WalkLimits(deadline=min(ends) if ends else None, exclude=self.own_outputs)


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
    kind: str = "error"  # "error" (should have been read and was not: exit 6), "skip" (left out on purpose),
    # "limited" (the host allows no more: a sandboxed process's environ; recorded, no alarm)


@dataclass
class Reference:
    """A source already stored by another collector: recorded on that member, not stored twice."""
    archive_path: str
    collector: str


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




def stat_times(info: os.stat_result) -> Dict[str, str]:
    """The source's times; the atime as it was before this capture read it (see hostfs.atime_before_us)."""
    return {"mtime": utc.iso_ns(info.st_mtime_ns), "atime": utc.iso_ns(atime_before_us(info)),
            "ctime": utc.iso_ns(info.st_ctime_ns)}


class Abandoned(BaseException):
    """Raised inside a collector's thread once the capture has abandoned it (over budget or deadline)."""


class Emitter:
    """What a collector calls; every call becomes an event on the queue the capture thread reads.

    Host files are read only through context.fs (toolkit.host.hostfs): no symlink followed in any
    component (inside the root under --root), regular files only, bounded reads, iterative walks.
    """

    def __init__(self, collector: str, events: "queue.Queue", context: Optional[CollectionContext] = None) -> None:
        self.collector = collector
        self.events = events
        self.context = context
        self.fs = context.fs if context is not None else HostFS("/")
        self.cancelled = threading.Event()
        self._local_claims: set = set()

    def _put(self, event) -> None:
        while True:
            if self.cancelled.is_set():
                raise Abandoned()
            try:
                self.events.put(event, timeout=0.2)
                return
            except queue.Full:
                continue

    def _claim(self, archive_path: str) -> bool:
        """True when this member is ours to write; otherwise the earlier one is referenced."""
        if self.context is None:
            if archive_path in self._local_claims:
                return False
            self._local_claims.add(archive_path)
            return True
        owner = self.context.claim(archive_path, self.collector)
        if owner is None:
            return True
        if owner != self.collector:
            self._put(Reference(archive_path, self.collector))
        return False

    def log(self, message: str) -> None:
        self._put(LogLine("%s: %s" % (self.collector, message)))

    def skip(self, source: str, reason_text: str, kind: str = "error") -> None:
        self._put(Skip(source, reason_text, kind))

    def has_room(self, size: int) -> bool:
        """Whether a member of `size` raw bytes would fit on the output medium now (nothing is taken)."""
        room = self.context.room if self.context is not None else None
        return room is None or room.fits(size)

    def _no_room(self, source: str, size: int) -> Optional[str]:
        """None when a member of `size` raw bytes may be written; else why not (recorded as an error: evidence
        the medium could not take, so the capture exits 6)."""
        room = self.context.room if self.context is not None else None
        why = room.take(size) if room is not None else None
        if why is not None:
            self.skip(source, why, "error")
        return why

    def degraded(self, component: str, effect: str, reason_text: str) -> None:
        """This collector works in a lesser way than usual (a daemon that does not answer...): said in
        collection.log, in the manifest's collection.degraded, on screen and in the case report."""
        self.log("degraded: %s: %s (%s)" % (component, effect, reason_text))
        self.fact("degraded", {"component": component, "effect": effect, "reason": reason_text}, "collection.log")

    def refusal(self, source: str, error: BaseException, requested: bool = True) -> None:
        """Record why a host path was not read. A symlink met in a component is recorded as "refused"
        (the link itself is collected); anything else that was asked for and not read is an error."""
        text = reason(error)
        if isinstance(error, Refused) and error.link is not None:
            self.skip(source, text, "refused")
            self.file(error.link, 0)  # the link itself, as the symlink it is (once: members are claimed)
        elif isinstance(error, FileNotFoundError):
            self.skip(source, "vanished before it could be read", "error" if requested else "skip")
        else:
            self.skip(source, text, "error" if requested else "skip")

    def stream(self, archive_path: str, chunks: Iterable[bytes], method: str) -> int:
        """A stream of unknown length (docker logs, cp, export): one member, or PATH.part0000, .part0001...
        when it is longer than PART_SIZE (`cat PATH.part* > PATH` rebuilds it). Returns the bytes taken.
        If the source fails midway, what it produced so far is stored before the error goes on."""
        return self.streams(((archive_path, chunk) for chunk in chunks), {archive_path: method})[archive_path]

    def streams(self, pieces: Iterable[Tuple[str, bytes]], methods: Dict[str, str]) -> Dict[str, int]:
        """Several streams made together (one walk writing a bodyfile and a JSON timeline): `pieces` yields
        (member name, bytes). Each name is one member, or NAME.part0000, .part0001... in order when it grows
        past PART_SIZE: the parts of different names interleave in the tar, so memory stays at PART_SIZE a
        name. If the source fails midway, what every name had so far is stored before the error goes on."""
        buffers: Dict[str, bytearray] = {name: bytearray() for name in methods}
        parts: Dict[str, int] = {name: 0 for name in methods}
        totals: Dict[str, int] = {name: 0 for name in methods}
        failure: Optional[BaseException] = None

        def flush(name: str, last: bool) -> None:
            buffer = buffers[name]
            while len(buffer) >= PART_SIZE or (last and (buffer or parts[name] == 0)):
                piece = bytes(buffer[:PART_SIZE])
                del buffer[:PART_SIZE]
                if last and not buffer and parts[name] == 0:
                    self.generated(name, piece, methods[name] + (" (cut short by an error)" if failure else ""))
                else:
                    self.generated("%s.part%04d" % (name, parts[name]), piece,
                                   methods[name] + " (part %d)" % parts[name])
                totals[name] += len(piece)
                parts[name] += 1
                if last and not buffer:
                    return

        iterator = iter(pieces)
        while True:
            try:
                name, data = next(iterator)
            except StopIteration:
                break
            except Abandoned:
                raise
            except Exception as error:  # keep what was produced, then report
                failure = error
                break
            buffers[name] += data
            if len(buffers[name]) >= PART_SIZE:
                flush(name, False)
        for name in methods:
            flush(name, True)
        if failure is not None:
            raise failure
        return totals

    def read(self, logical: str, limit: int, follow: bool = False) -> Optional[bytes]:
        """A host file's first `limit` bytes, read for what it says (not stored as a member): None when it is
        absent or not read. A FIFO, device, link or anything else refused is recorded in the manifest's
        errors, as it is for a member: a read that fails quietly would hide what the attacker planted."""
        try:
            return self.fs.read_bytes(logical, limit, follow)
        except FileNotFoundError:
            return None
        except (OSError, Refused) as error:
            self.refusal(logical, error)
            return None

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

    def generated(self, archive_path: str, data, method: str, source: Optional[str] = None) -> bool:
        """A member made by the collector itself (JSON of facts, a listing, a part of an image): bytes or a
        bytearray the caller never changes again. False when it was not stored (a name already written, or
        no room left on the output medium: both recorded)."""
        if not self._claim(archive_path):
            self.skip(archive_path, "a member of this name was already written: not written twice", "error")
            return False
        view = memoryview(data)  # slices without copies: the queue holds views of the one buffer
        notes = self._sized(archive_path, len(data), (view[start:start + READ_SIZE] for start in
                                                      range(0, len(data), READ_SIZE)), method, source)
        return "not_stored" not in notes

    def sized(self, archive_path: str, size: int, chunks: Iterable[bytes], method: str,
              source: Optional[str] = None, entry: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """A member made by the collector whose size is known before its bytes (an ELF core): exactly `size`
        bytes are stored. Returns the notes recorded on it: a source that gives fewer bytes is padded with
        zeros and one that gives more is cut, and either is said there (and in the manifest); `not_stored` says
        why nothing was (no room left on the output medium)."""
        if not self._claim(archive_path):
            self.skip(archive_path, "a member of this name was already written: not written twice", "error")
            return {"error": "not written"}
        return self._sized(archive_path, size, chunks, method, source, entry)

    def _sized(self, archive_path: str, size: int, chunks: Iterable[bytes], method: str,
               source: Optional[str], entry: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        why = self._no_room(archive_path, size)
        if why is not None:
            return {"not_stored": why}
        info = tarfile.TarInfo(archive_path)
        info.size, info.mode, info.mtime = size, 0o444, time.time()
        base = {"path": archive_path, "type": "generated", "source": source, "collector": self.collector,
                "method": method, "collected_at": utc.iso_micro(time.time())}
        self._put(MemberStart(info, dict(entry or {}, **base)))
        digest = hashlib.sha256()
        remaining, notes = size, {}
        for piece in chunks:
            if len(piece) > remaining:
                notes["error"] = "the source gave more than the %d bytes declared: cut" % size
                piece = piece[:remaining]
            if piece:
                digest.update(piece)
                self._put(Chunk(piece, digest.copy()))
                remaining -= len(piece)
            if not remaining and "error" in notes:
                break
        if remaining:
            notes["error"] = "the source ended %d bytes short of the %d declared: padded with zeros" % (
                remaining, size)
            while remaining:
                piece = bytes(min(READ_SIZE, remaining))
                digest.update(piece)
                self._put(Chunk(piece, digest.copy()))
                remaining -= len(piece)
        self._put(MemberEnd(notes))
        return notes

    # -- host files -----------------------------------------------------------------------------
    def file(self, logical: str, max_size: int, follow: bool = False, missing_ok: bool = True) -> bool:
        """One host path as it is (a file's content, a directory or a symlink as such); True if stored.
        Under --root, `follow` resolves a final symlink inside the root too (the member is then named by
        the path it resolved to, with `via` recording the path asked for)."""
        try:
            dir_fd, name, resolved, info = self.fs.final(logical, follow)
        except FileNotFoundError:
            if not missing_ok:
                self.skip(logical, "does not exist", "error")
            return False
        except Refused as error:
            self._refused_component(logical, error)
            return False
        except OSError as error:
            self.refusal(logical, error)
            return False
        try:
            asked = posixpath.normpath("/" + logical.lstrip("/"))
            stored = self._entry(dir_fd, name, resolved, info, max_size, requested=True,
                                 via=logical if resolved != asked else None)
        finally:
            os.close(dir_fd)
        if resolved != asked:
            self._keep_links_met(asked)
        return stored

    def file_and_targets(self, logical: str, max_size: int, hops: int = 8) -> None:
        """A path as it is and, when it is a symlink, what it points to in turn (resolved inside the root, at
        most `hops` links), so that the link resolves inside the bundle as it did on the host: /etc/localtime ->
        /usr/share/zoneinfo/..., /etc/os-release -> ../usr/lib/os-release."""
        current = posixpath.normpath("/" + logical.lstrip("/"))
        for _ in range(hops):
            self.file(current, max_size)
            try:
                if not stat.S_ISLNK(self.fs.lstat(current).st_mode):
                    return
                target = self.fs.readlink(current)
            except (OSError, Refused):
                return  # absent, or refused (said by file() above)
            current = posixpath.normpath(posixpath.join(posixpath.dirname(current), target))

    def _keep_links_met(self, asked: str) -> None:
        """Under --root a symlink in a component is resolved inside the root (a chroot's view), and the path
        is stored by the name it resolved to. The link itself is evidence (a planted ~/.ssh -> /root/.ssh):
        each one in the components of the path asked for is stored too, as the symlink it is."""
        if not self.fs.in_root:
            return
        parts = [part for part in asked.split("/") if part]
        for end in range(1, len(parts)):
            prefix = "/" + "/".join(parts[:end])
            try:
                is_link = stat.S_ISLNK(self.fs.lstat(prefix).st_mode)
            except (OSError, Refused):
                return
            if is_link:
                self.file(prefix, 0)

    def _refused_component(self, logical: str, error: Refused) -> None:
        """A path not read because of a symlink in a component: the refusal, and the link itself."""
        self.refusal(logical, error)

    def tree(self, logical: str, max_size: int, limits: Optional[WalkLimits] = None) -> WalkStats:
        """A path and, for a directory, everything below it: iterative, no symlink followed, bounded."""
        stats = WalkStats()
        if limits is None and self.context is not None:
            limits = self.context.walk_limits()
        try:
            os.close(self.fs.final(logical)[0])
        except Refused as error:
            self._refused_component(logical, error)
            return stats
        except OSError:
            pass  # absent, or said by the walk below
        asked = posixpath.normpath("/" + logical.lstrip("/"))
        try:
            for entry in self.fs.walk(logical, limits, stats):
                via = asked if entry.depth == 0 and entry.logical != asked else None
                self._entry(entry.dir_fd, entry.name, entry.logical, entry.info, max_size,
                            requested=entry.depth == 0, via=via)
                if via:
                    self._keep_links_met(asked)
        finally:
            self.walk_report(logical, stats)
        return stats

    def walk_report(self, logical: str, stats: WalkStats) -> None:
        """A walk's errors and limits, into the manifest's errors and collection.log."""
        for path, text in stats.errors[:1000]:
            self.skip(path, text, "skip" if VANISHED in text else "error")
        if len(stats.errors) > 1000:
            self.skip(logical, "%d more walk errors not listed" % (len(stats.errors) - 1000), "error")
        for hit in stats.limits_hit:
            self.skip(str(hit["first_path"]), "walk limit reached: %s (%s), %d times; not descended further" % (
                hit["limit"], hit["value"], hit["count"]), "limit")
        for path, text in stats.skipped:
            self.log("%s not entered: %s" % (path, text))

    def entry(self, walk_entry: WalkEntry, max_size: int) -> bool:
        """A name met by a walk (through context.fs.walk), stored as it is; True if stored."""
        return self._entry(walk_entry.dir_fd, walk_entry.name, walk_entry.logical, walk_entry.info, max_size,
                           requested=walk_entry.depth == 0)

    def _entry(self, dir_fd: int, name: str, logical: str, info: os.stat_result, max_size: int,
               requested: bool, via: Optional[str] = None) -> bool:
        archive_path = host_member(logical)
        if not logical.strip("/"):
            return False  # the root itself is not a member
        if not self._claim(archive_path):
            return False
        base = {"path": archive_path, "source": logical, "collector": self.collector,
                "mode": "%04o" % stat.S_IMODE(info.st_mode), "uid": info.st_uid, "gid": info.st_gid,
                "inode": info.st_ino, "device": info.st_dev, "source_size": info.st_size,
                "collected_at": utc.iso_micro(time.time())}
        if via:
            base["via"] = via
        base.update(stat_times(info))
        member = tarfile.TarInfo(archive_path)
        member.mode, member.uid, member.gid, member.mtime = stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid, \
            info.st_mtime
        member.pax_headers = {"atime": "%.9f" % (atime_before_us(info) / 1e9), "ctime": "%.9f" % info.st_ctime}
        if stat.S_ISLNK(info.st_mode):
            try:
                member.type, member.linkname = tarfile.SYMTYPE, os.readlink(name, dir_fd=dir_fd)
            except OSError as error:
                self.refusal(logical, error, requested)
                return False
            self._put(MemberStart(member, dict(base, type="symlink", target=member.linkname, method="readlinkat")))
            self._put(MemberEnd({}))
            return True
        if stat.S_ISDIR(info.st_mode):
            member.type = tarfile.DIRTYPE
            self._put(MemberStart(member, dict(base, type="dir", method="fstatat")))
            self._put(MemberEnd({}))
            return True
        if not stat.S_ISREG(info.st_mode):
            self.skip(logical, "it is a %s: not read" % kind_of(info.st_mode), "error" if requested else "skip")
            return False
        if self._no_room(logical, min(info.st_size, max_size)) is not None:
            return False
        try:
            opened = self.fs.open_at(dir_fd, name, logical)
        except (OSError, Refused) as error:
            self.refusal(logical, error, True)
            return False
        with opened:
            method = "read(O_NOATIME), opened by O_PATH then reopened" if opened.noatime else \
                "read (no O_NOATIME permission: the atime may change), opened by O_PATH then reopened"
            self._read_into(opened.fd, opened.info, member, dict(base, method=method), max_size)
        return True

    def proc_file(self, source: str, archive_path: str, max_size: int) -> None:
        """A file reached through a /proc magic link (a process's exe), which must be followed."""
        if not self._claim(archive_path):
            return
        member = tarfile.TarInfo(archive_path)
        member.mode, member.mtime = 0o444, time.time()
        base = {"path": archive_path, "source": source, "collector": self.collector, "collected_at": utc.iso_micro(time.time()),
                "method": "read through the magic link"}
        try:
            fd = os.open(source, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except OSError as error:
            self.refusal(source, error)
            return
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                self.skip(source, "not a regular file: not read", "error")
                return
            if self._no_room(source, min(info.st_size, max_size)) is not None:
                return
            self._read_into(fd, info, member, base, max_size)
        finally:
            os.close(fd)

    def _read_into(self, fd: int, info: os.stat_result, member: tarfile.TarInfo, base: Dict[str, Any],
                   max_size: int) -> None:
        """Stream at most max_size bytes of an open regular file into one member (its size fixed first)."""
        size = info.st_size
        truncated = size > max_size
        member.size = min(size, max_size)
        entry = dict(base, type="file", truncated=truncated)
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


class Collector:
    """One source of evidence. Lower `rank` is more volatile and runs first (RFC 3227)."""

    name = "collector"
    rank = 100
    profiles: Tuple[str, ...] = ("volatile", "triage", "full")
    budget_seconds = 60.0
    description = ""

    def run(self, context: CollectionContext, emit: Emitter) -> None:
        raise NotImplementedError

    def findings(self, facts: Dict[str, List[Dict[str, Any]]], judging: Any) -> Iterable[Dict[str, Any]]:
        """What this collector's facts mean: the rules live beside the collector that produces the facts.
        judging: toolkit.evidence.findings.Judging (expected ports, the time "recent" counts from)."""
        return ()


def start_collector(collector: Collector, context: CollectionContext):
    """Run the collector on a daemon thread; (events queue, thread, emitter). Setting emitter.cancelled
    makes the collector's next emit raise Abandoned, so an abandoned collector stops and lets go."""
    events: "queue.Queue" = queue.Queue(QUEUE_DEPTH)
    emitter = Emitter(collector.name, events, context)

    def body() -> None:
        try:
            collector.run(context, emitter)
        except Abandoned:
            return
        except Exception as error:  # a collector's crash is recorded, the capture goes on with what it had
            try:
                emitter.skip(collector.name, "collector failed: %s" % reason(error))
            except Abandoned:
                return
        try:
            emitter._put(_DONE)
        except Abandoned:
            return

    thread = threading.Thread(target=body, name="collector-" + collector.name, daemon=True)
    thread.start()
    return events, thread, emitter


def is_done(event) -> bool:
    return event is _DONE
