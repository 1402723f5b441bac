"""The one way bookgen-kit reads a host path: the host is the adversary (DESIGN.md principle 9).

Invariants:
- Every component of a path is opened relative to its parent's descriptor. On a live host (root "/")
  no symlink is followed in any component: a planted `~/.ssh -> /root/.ssh` is refused, never read as
  the user's. Under `--root IMAGE` symlinks are resolved *inside* the root, as a chroot would (an
  absolute target starts again at the root, `..` never climbs above it), so nothing outside the image
  is ever reached.
- A file is first opened with O_PATH (no device driver's open runs, no FIFO blocks), `fstat`ed, and
  only a regular file is reopened for reading — non-blocking, with O_NOATIME where permitted.
- Reads are bounded by a stated number of bytes; nothing reads "until EOF".
- Walks are iterative (no recursion over attacker-shaped depth), hold O(1) descriptors (the walk
  climbs back with `..` and checks the device and inode it expects), and stop at stated depth, entry
  and time limits, which are recorded when hit.
- A refusal raises `Refused` (a hostile or unexpected object); a missing path raises
  FileNotFoundError. Callers record refusals in the manifest; nothing here hangs or crashes.
"""
from __future__ import annotations

import errno
import os
import posixpath
import stat
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import BinaryIO, Callable, Dict, Iterator, List, Optional, Tuple

O_PATH = getattr(os, "O_PATH", 0o10000000)
O_NOATIME = getattr(os, "O_NOATIME", 0)
O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
MAX_SYMLINK_HOPS = 40
DEFAULT_READ_LIMIT = 1 << 20
DEFAULT_MAX_DEPTH = 4096
VANISHED = "vanished while it was read"


# (st_dev, st_ino) -> st_atime_ns before this process first read it without O_NOATIME. The kernel refuses
# O_NOATIME to a process that neither owns the file nor has CAP_FOWNER (a normal user reading /etc/passwd):
# the read may then move the atime, so what the timeline and the manifest record is the atime from before.
_ATIMES_BEFORE_US: Dict[Tuple[int, int], int] = {}
_ATIMES_LOCK = threading.Lock()


def _plain_read_of(fd: int) -> None:
    """Called after opening without O_NOATIME and before any read (an open moves no atime; a read may)."""
    info = os.fstat(fd)
    with _ATIMES_LOCK:
        _ATIMES_BEFORE_US.setdefault((info.st_dev, info.st_ino), info.st_atime_ns)


def atime_before_us(info: os.stat_result) -> int:
    """The atime (ns) of what `info` describes as it was before this process read it."""
    return _ATIMES_BEFORE_US.get((info.st_dev, info.st_ino), info.st_atime_ns)


class Refused(OSError):
    """A path we will not read as asked: a symlink in a component, a FIFO, a device, a loop. An OSError, so
    that code which treats an unreadable file as unreadable keeps doing so; its strerror is the reason."""

    def __init__(self, path: str, reason: str, link: Optional[str] = None) -> None:
        super().__init__(errno.EPERM, reason, path)
        self.path = path
        self.reason = reason
        self.link = link  # the symlink met in a component (live host), which can be collected as a link


def kind_of(mode: int) -> str:
    for test, name in ((stat.S_ISREG, "regular file"), (stat.S_ISDIR, "directory"), (stat.S_ISLNK, "symlink"),
                       (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "unknown file type"


def _close(fd: Optional[int]) -> None:
    if fd is not None and fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass


def _split(logical: str) -> List[str]:
    """Components of an absolute logical path, '..' taken lexically (it never climbs above the root)."""
    return [part for part in posixpath.normpath("/" + logical).split("/") if part not in ("", ".")]


def _split_target(target: str) -> List[str]:
    """Components of a symlink's target, '..' kept (resolved against the directories actually reached)."""
    return [part for part in target.split("/") if part not in ("", ".")]


@dataclass
class Opened:
    """A regular file opened for reading: close() it (or use `with`)."""
    fd: int
    info: os.stat_result
    logical: str  # the path it was reached by, resolved (under --root, after in-root symlinks)
    noatime: bool  # False when the kernel refused O_NOATIME (not the owner, no CAP_FOWNER): atime may change

    def read(self, limit: int) -> bytes:
        """At most `limit` bytes from the current offset."""
        pieces, left = [], limit
        while left > 0:
            data = os.read(self.fd, min(left, 1 << 20))
            if not data:
                break
            pieces.append(data)
            left -= len(data)
        return b"".join(pieces)

    def close(self) -> None:
        _close(self.fd)
        self.fd = -1

    def __enter__(self) -> "Opened":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class WalkEntry:
    """One name met by a walk. `dir_fd` is the parent directory's descriptor, valid only while the
    entry is being handled (use it with open_at / statx at)."""
    logical: str
    name: str
    info: os.stat_result
    depth: int
    dir_fd: int


@dataclass
class WalkStats:
    entries: int = 0
    directories: int = 0
    limits_hit: List[Dict[str, object]] = field(default_factory=list)
    errors: List[Tuple[str, str]] = field(default_factory=list)  # (logical path, reason)
    skipped: List[Tuple[str, str]] = field(default_factory=list)  # (logical path, reason) not descended on purpose

    def limit(self, kind: str, path: str, value: object) -> None:
        for hit in self.limits_hit:
            if hit["limit"] == kind:
                hit["count"] = int(hit["count"]) + 1  # type: ignore[call-overload]
                return
        self.limits_hit.append({"limit": kind, "value": value, "first_path": path, "count": 1})


@dataclass
class WalkLimits:
    max_depth: int = DEFAULT_MAX_DEPTH
    max_entries: Optional[int] = None
    deadline: Optional[float] = None  # time.monotonic() value
    exclude: frozenset = frozenset()  # (st_dev, st_ino) of directories never entered (our own outputs)


class HostFS:
    """Reads of one filesystem tree: the live host (root "/") or an image under a root directory."""

    def __init__(self, root: str = "/", resolve_links: Optional[bool] = None) -> None:
        """resolve_links: resolve symlinks (inside the root, as a chroot would) rather than refuse them.
        Default: only under a root other than "/" (collection on a live host follows no link, so a planted
        `~/.ssh -> /root/.ssh` cannot pass root's files off as a user's). Readers of configuration, which
        must see what the service sees (hardening checks), resolve on a live host too."""
        self.root = os.path.abspath(root or "/")
        self.in_root = self.root != "/" if resolve_links is None else resolve_links
        self._proc_reopen = os.path.isdir("/proc/self/fd")

    # -- resolving ------------------------------------------------------------------------------
    def _open_root(self) -> int:
        return os.open(self.root, O_PATH | O_DIRECTORY | O_CLOEXEC)

    def _parent(self, logical: str) -> Tuple[int, str, str]:
        """(descriptor of the parent directory, final name, resolved logical parent). The caller closes it."""
        parts = _split(logical)
        if not parts:
            raise Refused(logical or "/", "the root itself has no parent")
        fd, resolved = self._resolve(parts[:-1], logical)
        return fd, parts[-1], "/" + "/".join(resolved)

    def _resolve(self, parts: List[str], original: str) -> Tuple[int, List[str]]:
        """Open the directory named by parts (components relative to the root), per the rules above."""
        stack: List[Tuple[int, str]] = []  # (fd, name) below the root
        root_fd = self._open_root()
        pending = list(parts)
        hops = 0
        try:
            while pending:
                part = pending.pop(0)
                current = stack[-1][0] if stack else root_fd
                if part == "..":
                    if not self.in_root:
                        raise Refused(original, "'..' in a host path")
                    if stack:
                        _close(stack.pop()[0])
                    continue
                try:
                    fd = os.open(part, O_PATH | os.O_NOFOLLOW | O_CLOEXEC, dir_fd=current)
                except OSError as error:
                    if error.errno == errno.ENOENT:
                        raise FileNotFoundError(errno.ENOENT, "no such file or directory", original) from None
                    raise
                info = os.fstat(fd)
                if stat.S_ISDIR(info.st_mode):
                    stack.append((fd, part))
                    continue
                if not stat.S_ISLNK(info.st_mode):
                    _close(fd)
                    raise Refused(original, "component %s is a %s, not a directory" % (
                        "/" + "/".join([n for _, n in stack] + [part]), kind_of(info.st_mode)))
                _close(fd)
                where = "/" + "/".join([n for _, n in stack] + [part])
                if not self.in_root:
                    target = self._readlink_at(current, part)
                    raise Refused(original, "component %s is a symlink (to %s): not followed on a live host" % (
                        where, target), link=where)
                hops += 1
                if hops > MAX_SYMLINK_HOPS:
                    raise Refused(original, "too many symlinks (a loop?)")
                target = self._readlink_at(current, part)
                if target.startswith("/"):
                    for descriptor, _ in stack:
                        _close(descriptor)
                    stack = []
                pending = _split_target(target) + pending
            fd = os.dup(stack[-1][0]) if stack else os.dup(root_fd)
            return fd, [name for _, name in stack]
        finally:
            for descriptor, _ in stack:
                _close(descriptor)
            _close(root_fd)

    @staticmethod
    def _readlink_at(dir_fd: int, name: str) -> str:
        return os.readlink(name, dir_fd=dir_fd)

    def final(self, logical: str, follow: bool = False) -> Tuple[int, str, str, os.stat_result]:
        """(parent fd, name, resolved logical path, lstat) of the last component. With follow (only under
        --root), a final symlink is resolved inside the root as well. The caller closes the fd."""
        hops = 0
        while True:
            dir_fd, name, parent = self._parent(logical)
            try:
                info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except BaseException:
                _close(dir_fd)
                raise
            resolved = (parent.rstrip("/") + "/" + name) if name != ".." else parent
            if not (follow and self.in_root and stat.S_ISLNK(info.st_mode)):
                return dir_fd, name, resolved, info
            target = self._readlink_at(dir_fd, name)
            _close(dir_fd)
            hops += 1
            if hops > MAX_SYMLINK_HOPS:
                raise Refused(logical, "too many symlinks (a loop?)")
            logical = target if target.startswith("/") else parent.rstrip("/") + "/" + target

    # -- single paths -----------------------------------------------------------------------------
    def lstat(self, logical: str) -> os.stat_result:
        if not _split(logical):  # the root itself (a directory by construction)
            return os.stat(self.root)
        dir_fd, _name, _resolved, info = self.final(logical)
        _close(dir_fd)
        return info

    def lexists(self, logical: str) -> bool:
        try:
            self.lstat(logical)
            return True
        except (OSError, Refused):
            return False

    def is_dir(self, logical: str) -> bool:
        try:
            return stat.S_ISDIR(self.lstat(logical).st_mode)
        except (OSError, Refused):
            return False

    def readlink(self, logical: str) -> str:
        dir_fd, name, _resolved, _info = self.final(logical)
        try:
            return self._readlink_at(dir_fd, name)
        finally:
            _close(dir_fd)

    def open_at(self, dir_fd: int, name: str, logical: str) -> Opened:
        """Open a regular file `name` in an open directory for reading (never a FIFO, device or link)."""
        try:
            path_fd = os.open(name, O_PATH | os.O_NOFOLLOW | O_CLOEXEC, dir_fd=dir_fd)
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise Refused(logical, "it is a symlink: not followed") from None
            raise
        try:
            info = os.fstat(path_fd)
            if not stat.S_ISREG(info.st_mode):
                raise Refused(logical, "it is a %s: not read" % kind_of(info.st_mode))
            flags = os.O_RDONLY | os.O_NONBLOCK | O_CLOEXEC
            where = ("/proc/self/fd/%d" % path_fd, None) if self._proc_reopen else (name, dir_fd)
            noatime = True
            try:
                fd = os.open(where[0], flags | O_NOATIME, dir_fd=where[1]) if where[1] is not None else \
                    os.open(where[0], flags | O_NOATIME)
            except PermissionError:  # O_NOATIME needs ownership or CAP_FOWNER
                noatime = False
                fd = os.open(where[0], flags, dir_fd=where[1]) if where[1] is not None else os.open(where[0], flags)
                _plain_read_of(fd)
            reopened = os.fstat(fd)
            if (reopened.st_dev, reopened.st_ino) != (info.st_dev, info.st_ino) or not stat.S_ISREG(reopened.st_mode):
                _close(fd)
                raise Refused(logical, "replaced while it was opened")
            return Opened(fd, reopened, logical, noatime and bool(O_NOATIME))
        finally:
            _close(path_fd)

    def open_file(self, logical: str, follow: bool = False) -> Opened:
        dir_fd, name, resolved, info = self.final(logical, follow)
        try:
            if stat.S_ISLNK(info.st_mode):
                raise Refused(logical, "it is a symlink (to %s): not followed" % self._readlink_at(dir_fd, name))
            return self.open_at(dir_fd, name, resolved)
        finally:
            _close(dir_fd)

    def sha256(self, logical: str, follow: bool = False) -> str:
        """sha256 of a regular file's whole content, read as open_file reads. Raises OSError or Refused."""
        import hashlib

        digest = hashlib.sha256()
        with self.open_file(logical, follow) as opened:
            while True:
                piece = opened.read(1 << 20)
                if not piece:
                    return digest.hexdigest()
                digest.update(piece)

    def read_bytes(self, logical: str, limit: int = DEFAULT_READ_LIMIT, follow: bool = False) -> bytes:
        with self.open_file(logical, follow) as opened:
            return opened.read(limit)

    def read_text(self, logical: str, limit: int = DEFAULT_READ_LIMIT, follow: bool = False) -> Optional[str]:
        """The file's text (UTF-8, errors replaced), or None when it is absent, unreadable or refused."""
        try:
            return self.read_bytes(logical, limit, follow).decode("utf-8", "replace")
        except (OSError, Refused):
            return None

    def open_dir(self, logical: str) -> int:
        """A readable descriptor of the directory (the caller closes it)."""
        parts = _split(logical)
        if not parts:
            try:
                return os.open(self.root, os.O_RDONLY | O_DIRECTORY | O_CLOEXEC | O_NOATIME)
            except PermissionError:
                fd = os.open(self.root, os.O_RDONLY | O_DIRECTORY | O_CLOEXEC)
                _plain_read_of(fd)
                return fd
        dir_fd, name, _resolved, info = self.final(logical)
        try:
            if not stat.S_ISDIR(info.st_mode):
                raise Refused(logical, "it is a %s, not a directory" % kind_of(info.st_mode))
            return self._open_dir_at(dir_fd, name, info)
        finally:
            _close(dir_fd)

    @staticmethod
    def _open_dir_at(dir_fd: int, name: str, expected: Optional[os.stat_result] = None) -> int:
        flags = os.O_RDONLY | O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | O_CLOEXEC
        try:
            fd = os.open(name, flags | O_NOATIME, dir_fd=dir_fd)
        except PermissionError:
            fd = os.open(name, flags, dir_fd=dir_fd)
            _plain_read_of(fd)
        if expected is not None:
            info = os.fstat(fd)
            if (info.st_dev, info.st_ino) != (expected.st_dev, expected.st_ino):
                _close(fd)
                raise Refused(name, "replaced while it was opened")
        return fd

    def listdir(self, logical: str) -> List[str]:
        fd = self.open_dir(logical)
        try:
            with os.scandir(fd) as entries:
                return sorted(entry.name for entry in entries)
        finally:
            _close(fd)

    # -- walking --------------------------------------------------------------------------------
    def walk(self, logical_root: str, limits: Optional[WalkLimits] = None, stats: Optional[WalkStats] = None,
             descend: Optional[Callable[[WalkEntry, int], Optional[str]]] = None) -> Iterator[WalkEntry]:
        """Every name under logical_root (itself first), never following a symlink, iteratively.

        descend(entry, child_fd) may return a reason not to enter a directory (recorded in stats.skipped).
        """
        limits = limits or WalkLimits()
        stats = stats if stats is not None else WalkStats()
        logical_root = "/" + "/".join(_split(logical_root))
        try:
            if _split(logical_root):
                parent_fd, name, resolved, info = self.final(logical_root)
            else:
                parent_fd, name, resolved, info = os.open(self.root, O_PATH | O_CLOEXEC), ".", "/", os.stat(self.root)
        except FileNotFoundError:
            return
        except (OSError, Refused) as error:
            stats.errors.append((logical_root, _reason(error)))
            return
        try:
            stats.entries += 1
            yield WalkEntry(resolved, name, info, 0, parent_fd)
            if not stat.S_ISDIR(info.st_mode):
                return
            try:
                top = self._open_dir_at(parent_fd, name, info)
            except (OSError, Refused) as error:
                stats.errors.append((resolved, "cannot open the directory: %s" % _reason(error)))
                return
        finally:
            _close(parent_fd)
        if descend is not None:
            reason = descend(WalkEntry(resolved, name, info, 0, -1), top)
            if reason:
                stats.skipped.append((resolved, reason))
                _close(top)
                return
        yield from self._walk_from(top, resolved, info, limits, stats, descend)

    def _walk_from(self, top: int, logical: str, info: os.stat_result, limits: WalkLimits, stats: WalkStats,
                   descend) -> Iterator[WalkEntry]:
        # frames: [logical path, (dev, ino), pending subdirectory names]; only the current directory is open
        frames: List[list] = []
        current_fd = top
        current = [logical, (info.st_dev, info.st_ino), None]
        stopped = False
        try:
            while True:
                if current[2] is None:  # list the directory once, yielding as it goes
                    subdirs: "deque[Tuple[str, Tuple[int, int]]]" = deque()
                    stats.directories += 1
                    try:
                        with os.scandir(current_fd) as entries:
                            for entry in entries:
                                if limits.max_entries is not None and stats.entries >= limits.max_entries:
                                    stats.limit("entries", current[0], limits.max_entries)
                                    stopped = True
                                    break
                                if limits.deadline is not None and stats.entries % 256 == 0 and \
                                        time.monotonic() > limits.deadline:
                                    stats.limit("time", current[0], "deadline")
                                    stopped = True
                                    break
                                path = current[0].rstrip("/") + "/" + entry.name
                                try:
                                    entry_info = entry.stat(follow_symlinks=False)
                                except OSError as error:
                                    stats.errors.append((path, "cannot stat: %s" % _reason(error)))
                                    continue
                                stats.entries += 1
                                yield WalkEntry(path, entry.name, entry_info, len(frames) + 1, current_fd)
                                if stat.S_ISDIR(entry_info.st_mode):
                                    subdirs.append((entry.name, (entry_info.st_dev, entry_info.st_ino)))
                    except OSError as error:
                        stats.errors.append((current[0], "cannot list: %s" % _reason(error)))
                    if stopped:
                        return
                    if len(frames) + 1 > limits.max_depth and subdirs:
                        stats.limit("depth", current[0], limits.max_depth)
                        subdirs = deque()
                    current[2] = subdirs
                if current[2]:
                    name, identity = current[2].popleft()
                    path = current[0].rstrip("/") + "/" + name
                    if identity in limits.exclude:
                        stats.skipped.append((path, "bookgen-kit's own output"))
                        continue
                    try:
                        child = self._open_dir_at(current_fd, name)
                        child_info = os.fstat(child)
                    except (OSError, Refused) as error:
                        stats.errors.append((path, "cannot open the directory: %s" % _reason(error)))
                        continue
                    if (child_info.st_dev, child_info.st_ino) != identity:
                        _close(child)
                        stats.errors.append((path, "replaced by another directory during the walk: not entered"))
                        continue
                    if descend is not None:
                        reason = descend(WalkEntry(path, name, child_info, len(frames) + 1, current_fd), child)
                        if reason:
                            _close(child)
                            stats.skipped.append((path, reason))
                            continue
                    frames.append(current)
                    _close(current_fd)
                    current_fd, current = child, [path, identity, None]
                    continue
                # this directory is done: climb back to the parent, checking it is the one we left
                if not frames:
                    return
                parent = frames.pop()
                try:
                    up = os.open("..", os.O_RDONLY | O_DIRECTORY | os.O_NOFOLLOW | O_CLOEXEC, dir_fd=current_fd)
                    up_info = os.fstat(up)
                except OSError:
                    up, up_info = -1, None
                _close(current_fd)
                current_fd = up
                if up_info is None or (up_info.st_dev, up_info.st_ino) != parent[1]:
                    _close(up)
                    current_fd = -1
                    try:  # moved under us: reopen by path and check again
                        current_fd = self.open_dir(parent[0])
                        again = os.fstat(current_fd)
                        if (again.st_dev, again.st_ino) != parent[1]:
                            raise Refused(parent[0], "moved during the walk")
                    except (OSError, Refused) as error:
                        _close(current_fd)
                        current_fd = -1
                        stats.errors.append((parent[0], "left unfinished: %s" % _reason(error)))
                        return
                current = parent
        finally:
            _close(current_fd)


_LIVE: Optional["HostFS"] = None


def kernel_bytes(path: str, limit: int = DEFAULT_READ_LIMIT) -> bytes:
    """A file of the running kernel (/proc, /sys), whatever --root says, through the same opener as every host
    path: a FIFO or device that root mounted over it is refused (Refused), never opened or waited on."""
    global _LIVE
    if _LIVE is None:
        _LIVE = HostFS("/")
    return _LIVE.read_bytes(path, limit)


def _reason(error: BaseException) -> str:
    if isinstance(error, Refused):
        return error.reason
    if isinstance(error, FileNotFoundError):
        return VANISHED
    if isinstance(error, OSError):
        return error.strerror or str(error)
    return str(error)


def reason(error: BaseException) -> str:
    """One line saying why a host path could not be read (no Python exception text)."""
    return _reason(error)


def open_host_file(path: str, follow: bool = True) -> BinaryIO:
    """A regular file of this host opened for reading, as a binary file object: never a FIFO, device or
    socket; with follow, symlinks resolved as the kernel would (a configuration file read as its service
    reads it), otherwise none followed. Raises FileNotFoundError or Refused (an OSError)."""
    opened = HostFS("/", resolve_links=follow).open_file(os.path.abspath(path), follow=follow)
    return os.fdopen(opened.fd, "rb")


def read_host_file(path: str, limit: int, follow: bool = True) -> bytes:
    """At most limit bytes of a regular file of this host (see open_host_file)."""
    with open_host_file(path, follow) as handle:
        return handle.read(limit)
