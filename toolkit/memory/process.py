"""One live process's memory as an ELF core file, read from /proc/PID/mem without stopping it (unless asked).

Invariants:
- Only /proc is read: maps, task/TID/syscall, stat, status, auxv, cmdline, mem. No ptrace, so a process that
  watches for a tracer sees none; the registers are what /proc shows (stack and instruction pointer, syscall).
- The core's layout (and so its size) is fixed from /proc/PID/maps before any memory is read. What then cannot
  be read (a page unmapped since, [vvar], the process gone) is stored as zeros and recorded as a gap
  (address, length, reason): the core never claims bytes it did not read.
- Bounded: at most `limit` bytes of memory are stored. Anonymous and writable memory first (what lives only
  in memory), then memfd and deleted files' mappings, then the rest (copies of files on disk); what does not
  fit is a PT_LOAD with no bytes, listed as left out.
- Frozen only when asked: SIGSTOP before maps is read, SIGCONT after the last byte, always (also on error, and
  at exit when a Ctrl-C or SIGTERM ends the kit mid-dump), and not at all for a process that was already stopped.
  Both are recorded with their times.
"""
from __future__ import annotations

import atexit
import os
import platform
import signal
import stat
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Set, Tuple

from toolkit import utc
from toolkit.host.hostfs import kernel_bytes
from toolkit.memory import elfcore

READ_SIZE = 1 << 20
OFFSET_MAX = (1 << 63) - 1  # /proc/PID/mem is read at the address as the file offset (an off_t)


class NotReadable(Exception):
    """The process's memory cannot be read at all (gone, not permitted): the message says why."""


class NoUserMemory(NotReadable):
    """A kernel thread (no user address space), or a process gone: nothing to dump, not a failure."""


@dataclass
class Mapping:
    start: int
    end: int
    permissions: str
    file_offset: int
    inode: int
    path: str  # as maps shows it: "", "[heap]", "/usr/lib/...", "/memfd:x (deleted)"

    @property
    def file_backed(self) -> bool:
        return self.inode != 0 and not self.path.startswith("[")

    @property
    def priority(self) -> int:
        """0: memory only this process has (anonymous, written); 1: memfd and deleted files; 2: copies of files."""
        if not self.file_backed or "w" in self.permissions:
            return 0
        if self.path.startswith("/memfd:") or self.path.endswith(" (deleted)"):
            return 1
        return 2


@dataclass
class Dump:
    """What one process's core holds and how it was made (the core's JSON sidecar)."""
    pid: int
    layout: elfcore.Layout
    mappings: List[Mapping]
    process: elfcore.ProcessInfo
    machine: str
    limit: int
    left_out: List[Dict[str, Any]] = field(default_factory=list)
    gaps: List[Dict[str, Any]] = field(default_factory=list)
    freeze: Dict[str, Any] = field(default_factory=dict)
    bytes_read: int = 0
    started_at: float = 0.0
    ended_at: float = 0.0
    finish: Callable[[], None] = lambda: None  # closes the fd and continues a frozen process (idempotent)

    def record(self) -> Dict[str, Any]:
        return {"pid": self.pid, "name": self.process.name, "cmdline": self.process.arguments,
                "machine": self.machine, "limit_bytes": self.limit, "core": elfcore.summary(self.layout),
                "bytes_read": self.bytes_read, "gaps": self.gaps, "left_out": self.left_out,
                "freeze": self.freeze or {"frozen": False},
                "registers": "stack and instruction pointers and the syscall in progress per thread, from "
                             "/proc/PID/task/TID/syscall; the other registers are zero (no ptrace)",
                "started_at": utc.iso_micro(self.started_at), "ended_at": utc.iso_micro(self.ended_at),
                "mappings": [{"start": "%#x" % m.start, "end": "%#x" % m.end, "permissions": m.permissions,
                              "offset": m.file_offset, "inode": m.inode, "path": m.path} for m in self.mappings]}


def machine() -> str:
    return platform.machine()


def _read(path: str, limit: int = 1 << 20) -> bytes:
    """A /proc file through the one host-path opener: a FIFO or device mounted over it is refused (Refused is an
    OSError), never waited on, so a frozen process is never left stopped by a hung read."""
    return kernel_bytes(path, limit)


def mappings(pid: int) -> List[Mapping]:
    found = []
    for line in _read("/proc/%d/maps" % pid, 64 << 20).decode("utf-8", "surrogateescape").splitlines():
        parts = line.split(None, 5)
        if len(parts) < 5:
            continue
        start, _, end = parts[0].partition("-")
        found.append(Mapping(int(start, 16), int(end, 16), parts[1], int(parts[2], 16), int(parts[4]),
                             parts[5] if len(parts) > 5 else ""))
    return found


def _threads(pid: int) -> List[elfcore.Thread]:
    threads = []
    try:
        tids = sorted(int(t) for t in os.listdir("/proc/%d/task" % pid) if t.isdigit())
    except OSError:
        tids = [pid]
    for tid in tids:
        thread = elfcore.Thread(tid)
        try:
            fields = _read("/proc/%d/task/%d/syscall" % (pid, tid), 4096).decode().split()
        except (OSError, UnicodeDecodeError):
            fields = []
        if len(fields) >= 3 and fields[0] != "running":
            thread.sp, thread.pc = int(fields[-2], 16), int(fields[-1], 16)
            if fields[0] != "-1" and len(fields) >= 9:
                thread.syscall = int(fields[0])
                thread.arguments = [int(value, 16) for value in fields[1:7]]
        threads.append(thread)
    return threads


def process_info(pid: int) -> elfcore.ProcessInfo:
    stat_text = _read("/proc/%d/stat" % pid).decode("utf-8", "replace")
    name = stat_text[stat_text.find("(") + 1:stat_text.rfind(")")]
    rest = stat_text[stat_text.rfind(")") + 2:].split()
    status = {}
    for line in _read("/proc/%d/status" % pid).decode("utf-8", "replace").splitlines():
        key, _, value = line.partition(":")
        status[key] = value.split()
    try:
        auxv = _read("/proc/%d/auxv" % pid)
    except OSError:
        auxv = b""
    try:
        arguments = _read("/proc/%d/cmdline" % pid, 4096).rstrip(b"\0").replace(b"\0", b" ").decode(
            "utf-8", "replace")
    except OSError:
        arguments = ""
    return elfcore.ProcessInfo(pid=pid, ppid=int(rest[1]), pgrp=int(rest[2]), sid=int(rest[3]),
                               uid=int((status.get("Uid") or ["0"])[0]), gid=int((status.get("Gid") or ["0"])[0]),
                               state=rest[0], nice=int(rest[16]), flags=int(rest[6]), name=name, arguments=arguments,
                               threads=_threads(pid), auxv=auxv)


def plan(pid: int, limit: int, page_size: int
         ) -> Tuple[elfcore.Layout, List[Mapping], List[Dict[str, Any]], elfcore.ProcessInfo]:
    """The core's layout: which mappings are stored (within `limit`, most valuable first) and which are not."""
    found = mappings(pid)
    left_out: List[Dict[str, Any]] = []
    budget = limit
    stored: Dict[int, int] = {}
    for mapping in sorted(found, key=lambda m: (m.priority, m.start)):
        size = mapping.end - mapping.start
        why = None
        if "r" not in mapping.permissions:
            why = "not readable (%s)" % mapping.permissions
        elif mapping.path == "[vvar]" or mapping.path.startswith("[vvar"):
            why = "the kernel's vvar page (not readable through /proc/PID/mem)"
        elif mapping.end - 1 > OFFSET_MAX:
            why = "above the address /proc/PID/mem can be read at"
        elif size > budget:
            why = "over the per-process limit of %d bytes" % limit
        if why:
            left_out.append({"start": "%#x" % mapping.start, "end": "%#x" % mapping.end, "path": mapping.path,
                             "bytes": size, "reason": why})
            continue
        stored[mapping.start] = size
        budget -= size
    segments = [elfcore.Segment(m.start, m.end, elfcore.flags_of(m.permissions), stored.get(m.start, 0),
                                m.path.replace(" (deleted)", "") if m.file_backed else "", m.file_offset)
                for m in found]
    info = process_info(pid)
    return elfcore.layout(machine(), info, segments, page_size), found, left_out, info


def _state(pid: int) -> str:
    text = _read("/proc/%d/stat" % pid).decode("utf-8", "replace")
    return text[text.rfind(")") + 2:].split()[0]


def _reader(fd: int, segment: elfcore.Segment, gaps: List[Dict[str, Any]], page_size: int,
            counted: List[int]) -> Iterator[bytes]:
    """The segment's stored bytes, exactly file_size of them: zeros where the read fails, each run a gap."""
    address, end = segment.start, segment.start + segment.file_size
    failed_at: Optional[int] = None
    failure = ""

    def close_gap(until: int) -> None:
        nonlocal failed_at
        if failed_at is not None:
            gaps.append({"start": "%#x" % failed_at, "bytes": until - failed_at, "reason": failure,
                         "path": segment.path})
            failed_at = None

    while address < end:
        size = min(READ_SIZE, end - address)
        try:
            data = os.pread(fd, size, address)
        except OSError:
            data = b""
        if len(data) == size:
            close_gap(address)
            counted[0] += size
            yield data
            address += size
            continue
        # a short or failed read: page by page, so only what is unreadable becomes zeros
        chunk = bytearray()
        for page in range(address, address + size, page_size):
            want = min(page_size, address + size - page)
            try:
                piece = os.pread(fd, want, page)
                error = "read returned %d of %d bytes" % (len(piece), want) if len(piece) != want else ""
            except OSError as failed:
                piece, error = b"", failed.strerror or str(failed)
            if error:
                if failed_at is None:
                    failed_at, failure = page, error
                chunk += b"\0" * want
            else:
                close_gap(page)
                counted[0] += want
                chunk += piece
        yield bytes(chunk)
        address += size
    close_gap(end)


def dump(pid: int, limit: int, freeze: bool = False) -> Tuple[Dump, Iterator[bytes]]:
    """The core's plan (sized) and the iterator of its bytes. Raises NotReadable when the process is gone or its
    memory not permitted. The iterator fills dump.gaps, bytes_read and freeze as it goes; it resumes a frozen
    process when it ends or fails, and the caller calls dump.finish() in any case (a stream never started)."""
    page_size = os.sysconf("SC_PAGE_SIZE")
    frozen: Dict[str, Any] = {}
    try:
        fd = os.open("/proc/%d/mem" % pid, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise NotReadable("pid %d is gone" % pid)
    except ProcessLookupError:  # ESRCH: a kernel thread (no mm) on recent kernels, or gone
        raise NoUserMemory("pid %d has no user memory (a kernel thread) or is gone" % pid)
    except OSError as error:
        raise NotReadable("%s%s" % (error.strerror, _ptrace_hint()))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise NotReadable("not the kernel's file (something is mounted over it): not read")
    try:
        if freeze:
            state = _state(pid)
            if state in ("T", "t"):
                frozen = {"frozen": False, "reason": "already stopped (state %s): left as found" % state}
            else:
                _FROZEN.add(pid)  # continued at exit, whatever ends the kit (see resume_all)
                os.kill(pid, signal.SIGSTOP)
                frozen = {"frozen": True, "signal": "SIGSTOP", "stopped_at": utc.iso_micro(time.time())}
                if not _wait_stopped(pid):
                    frozen["confirmed"] = False
                    frozen["note"] = "SIGSTOP sent, but the process was not seen stopped within 2 s (state %s): " \
                                     "it may have run during the dump" % _state(pid)
        core_layout, found, left_out, info = plan(pid, limit, page_size)
    except FileNotFoundError:
        _resume(pid, frozen)
        os.close(fd)
        raise NotReadable("pid %d exited before its memory was read" % pid)
    except (OSError, ValueError) as error:
        _resume(pid, frozen)
        os.close(fd)
        raise NotReadable("pid %d: %s" % (pid, getattr(error, "strerror", None) or error))
    result = Dump(pid, core_layout, found, info, machine(), limit, left_out,
                  freeze=frozen, started_at=time.time())

    counted = [0]
    open_fd = [fd]

    def finish() -> None:
        """Close /proc/PID/mem and continue a frozen process: once, whether the stream ran, ended or not."""
        if open_fd:
            os.close(open_fd.pop())
            result.bytes_read = counted[0]
            result.ended_at = time.time()
            _resume(pid, frozen)

    def stream() -> Iterator[bytes]:
        try:
            yield core_layout.head
            for segment in core_layout.segments:
                if segment.file_size:
                    yield from _reader(fd, segment, result.gaps, page_size, counted)
        finally:
            finish()

    result.finish = finish
    return result, stream()


def _wait_stopped(pid: int, seconds: float = 2.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if _state(pid) in ("T", "t"):
            return True
        time.sleep(0.005)
    return False


def _resume(pid: int, frozen: Dict[str, Any]) -> None:
    if frozen.get("frozen") and "continued_at" not in frozen:
        try:
            os.kill(pid, signal.SIGCONT)
            frozen["continued_at"] = utc.iso_micro(time.time())
            frozen["signal_after"] = "SIGCONT"
        except ProcessLookupError:
            frozen["continued_at"] = None
            frozen["note"] = "exited while stopped"
        _FROZEN.discard(pid)


def resume_all() -> List[int]:
    """SIGCONT every process this kit stopped and has not continued yet: run at interpreter exit (atexit), so a
    Ctrl-C or a SIGTERM (capture turns it into an exit) never leaves one stopped. Only SIGKILL of the kit can."""
    continued = []
    for pid in sorted(_FROZEN):
        try:
            os.kill(pid, signal.SIGCONT)
            continued.append(pid)
        except ProcessLookupError:
            pass
        _FROZEN.discard(pid)
    return continued


_FROZEN: Set[int] = set()
atexit.register(resume_all)


def _ptrace_hint() -> str:
    try:
        scope = _read("/proc/sys/kernel/yama/ptrace_scope", 16).strip().decode()
    except OSError:
        return ""
    if scope == "3":
        return " (kernel.yama.ptrace_scope is 3: no process may read another's memory until reboot)"
    return ""
