"""One walk of the chosen roots into a TSK 3.x bodyfile (mactime reads it), staying on local filesystems;
the same walk notes SUID/SGID files, world-writable files and recent changes under /etc and the app."""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import posixpath
import stat
import time
from typing import Dict, List, Optional

from toolkit.evidence.collectors.base import CollectionContext, Collector, Emitter
from toolkit.host.hostfs import Refused, WalkEntry, WalkStats

TRIAGE_ROOTS = ("/opt/bookgen", "/etc", "/tmp", "/var/tmp", "/dev/shm", "/home", "/root", "/var/log")
# statfs f_type of filesystems the walk does not enter: pseudo, network and FUSE
SKIPPED_FS = {0x9FA0: "proc", 0x62656572: "sysfs", 0x27E0EB: "cgroup", 0x63677270: "cgroup2", 0x1CD1: "devpts",
              0x6E736673: "nsfs", 0x64626720: "debugfs", 0x74726163: "tracefs", 0x73636673: "securityfs",
              0x6165676C: "pstore", 0xCAFE4A11: "bpf", 0x62656570: "configfs", 0x65735546: "fuse",
              0x65735543: "fusectl", 0x6969: "nfs", 0xFF534D42: "cifs", 0xFE534D42: "smb2", 0x517B: "smb",
              0x564C: "ncp", 0x1373: "devfs", 0x42494E4D: "binfmt_misc", 0x19800202: "mqueue",
              0x958458F6: "hugetlbfs", 0x187: "autofs", 0x73717368: "squashfs"}
RECENT_DAYS = 7
AT_SYMLINK_NOFOLLOW = 0x100
STATX_BTIME = 0x800


class _StatxTimestamp(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_int64), ("tv_nsec", ctypes.c_uint32), ("reserved", ctypes.c_int32)]


class _Statx(ctypes.Structure):
    _fields_ = [("stx_mask", ctypes.c_uint32), ("stx_blksize", ctypes.c_uint32), ("stx_attributes", ctypes.c_uint64),
                ("stx_nlink", ctypes.c_uint32), ("stx_uid", ctypes.c_uint32), ("stx_gid", ctypes.c_uint32),
                ("stx_mode", ctypes.c_uint16), ("spare0", ctypes.c_uint16), ("stx_ino", ctypes.c_uint64),
                ("stx_size", ctypes.c_uint64), ("stx_blocks", ctypes.c_uint64),
                ("stx_attributes_mask", ctypes.c_uint64), ("stx_atime", _StatxTimestamp),
                ("stx_btime", _StatxTimestamp), ("stx_ctime", _StatxTimestamp), ("stx_mtime", _StatxTimestamp),
                ("stx_rdev_major", ctypes.c_uint32), ("stx_rdev_minor", ctypes.c_uint32),
                ("stx_dev_major", ctypes.c_uint32), ("stx_dev_minor", ctypes.c_uint32), ("spare2", ctypes.c_uint64 * 14)]


class _Statfs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_long * 15)]


class BirthTimes:
    """crtime from statx(2) where the kernel and filesystem give it (0 where not), and a filesystem's type,
    both asked relative to descriptors the walk already holds."""

    def __init__(self) -> None:
        self._statx = None
        self._fstatfs = None
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            self._statx = libc.statx
            self._statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint,
                                    ctypes.POINTER(_Statx)]
            self._buffer = _Statx()
        except (OSError, AttributeError):
            self._statx = None
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            self._fstatfs = libc.fstatfs
            self._fstatfs.argtypes = [ctypes.c_int, ctypes.POINTER(_Statfs)]
        except (OSError, AttributeError):
            self._fstatfs = None

    def birth_at(self, dir_fd: int, name: str) -> int:
        if self._statx is None:
            return 0
        if self._statx(dir_fd, os.fsencode(name), AT_SYMLINK_NOFOLLOW, STATX_BTIME, ctypes.byref(self._buffer)) != 0:
            return 0
        return int(self._buffer.stx_btime.tv_sec) if self._buffer.stx_mask & STATX_BTIME else 0

    def fs_type(self, fd: int) -> Optional[int]:
        if self._fstatfs is None:
            return None
        buffer = _Statfs()
        if self._fstatfs(fd, ctypes.byref(buffer)) != 0:
            return None
        return buffer.f_type & 0xFFFFFFFF


def escape_name(name: str) -> str:
    """Bodyfile-safe and unambiguous. mactime splits a line on '|' and decodes %XX once in every field, then
    silently drops (or garbles) an entry whose decoded name holds a newline: a name the attacker chooses
    would hide a file from the timeline. So '|' is written %7C (mactime shows '|'), and '%' and the control
    characters are written %25XX: mactime shows them percent-encoded (%25, %0A, %1B), on one line, and no
    two names look alike. Bytes that are not UTF-8 (surrogate escapes) are written as they are."""
    return "".join("%7C" if c == "|" else "%%25%02X" % ord(c) if c == "%" or ord(c) < 0x20 or ord(c) == 0x7F
                   else c for c in name)


def mode_string(mode: int) -> str:
    kinds = {stat.S_IFDIR: "d", stat.S_IFREG: "r", stat.S_IFLNK: "l", stat.S_IFCHR: "c", stat.S_IFBLK: "b",
             stat.S_IFIFO: "p", stat.S_IFSOCK: "s"}
    kind = kinds.get(stat.S_IFMT(mode), "-")
    return "%s/%s%s" % (kind, kind, stat.filemode(mode)[1:])


class TimelineCollector(Collector):
    name = "timeline"
    rank = 90
    profiles = ("triage", "full")
    budget_seconds = 600.0
    description = "bodyfile (TSK 3.x) of the triage roots (full: /), local filesystems only; SUID/SGID, " \
                  "world-writable and recently changed files from the same walk"

    def run(self, context: CollectionContext, emit: Emitter) -> None:
        roots = ["/"] if context.profile == "full" else list(TRIAGE_ROOTS)
        if context.deployment.app_dir not in roots and context.profile != "full":
            roots.insert(0, context.deployment.app_dir)
        state = {"entries": 0, "crtime": False, "skipped_mounts": [], "walks": [],
                 "notable": {"suid_sgid": [], "world_writable": [], "recent_changes": []}}
        try:
            emit.stream("timeline/bodyfile.txt", self._walk(context, roots, state, emit),
                        "iterative walk (fstatat + statx crtime) through the host filesystem object, "
                        "local filesystems only")
        finally:  # even when the walk failed midway, what it saw is kept and said
            emit.json("timeline/notable.json", dict(state["notable"], roots=roots,
                                                    skipped_mounts=state["skipped_mounts"],
                                                    crtime_available=state["crtime"], entries=state["entries"],
                                                    walks=state["walks"]),
                      "the timeline walk")
            for entry in state["notable"]["suid_sgid"]:
                emit.fact("suid", entry, "timeline/notable.json")

    @staticmethod
    def _walk(context: CollectionContext, roots: List[str], state: Dict, emit: Emitter):
        births = BirthTimes()
        recent = time.time() - RECENT_DAYS * 86400
        watch = ("/etc/", context.deployment.app_dir.rstrip("/") + "/")
        notable = state["notable"]
        walked: List[str] = []

        def line(entry: WalkEntry) -> str:
            info, logical = entry.info, entry.logical
            birth = births.birth_at(entry.dir_fd, entry.name) if entry.dir_fd >= 0 else 0
            if birth:
                state["crtime"] = True
            mode = info.st_mode
            if stat.S_ISREG(mode) and mode & (stat.S_ISUID | stat.S_ISGID):
                notable["suid_sgid"].append({"path": logical, "mode": "%o" % mode, "uid": info.st_uid})
            if mode & stat.S_IWOTH and not stat.S_ISLNK(mode) and not (stat.S_ISDIR(mode) and mode & stat.S_ISVTX):
                notable["world_writable"].append({"path": logical, "mode": "%o" % mode})
            if stat.S_ISREG(mode) and max(info.st_mtime, info.st_ctime) >= recent and logical.startswith(watch):
                notable["recent_changes"].append({"path": logical, "mtime": info.st_mtime, "ctime": info.st_ctime})
            state["entries"] += 1
            return "0|%s|%d|%s|%d|%d|%d|%d|%d|%d|%d\n" % (
                escape_name(logical), info.st_ino, mode_string(mode), info.st_uid, info.st_gid, info.st_size,
                int(info.st_atime), int(info.st_mtime), int(info.st_ctime), birth)

        for logical_root in roots:
            logical_root = posixpath.normpath("/" + logical_root.lstrip("/"))
            if any(logical_root == done or logical_root.startswith(done.rstrip("/") + "/") for done in walked):
                continue
            try:
                root_info = context.fs.lstat(logical_root)
            except (OSError, Refused):
                continue
            if not stat.S_ISDIR(root_info.st_mode):
                continue
            walked.append(logical_root)
            root_device = root_info.st_dev

            def descend(entry: WalkEntry, child_fd: int) -> Optional[str]:
                if entry.logical in ("/proc", "/sys"):
                    return "pseudo filesystem"
                if entry.info.st_dev != root_device:
                    kind = births.fs_type(child_fd)
                    if kind in SKIPPED_FS:
                        state["skipped_mounts"].append({"path": entry.logical, "fstype": SKIPPED_FS[kind]})
                        return "a %s mount" % SKIPPED_FS[kind]
                return None

            stats = WalkStats()
            batch: List[str] = []
            failure: Optional[Exception] = None
            try:
                for entry in context.fs.walk(logical_root, context.walk_limits(), stats, descend):
                    batch.append(line(entry))
                    if len(batch) >= 2000:
                        yield "".join(batch).encode("utf-8", "surrogateescape")
                        batch = []
            except Exception as error:  # keep the lines already made, then let the failure be recorded
                failure = error
            if batch:
                yield "".join(batch).encode("utf-8", "surrogateescape")
            state["walks"].append({"root": logical_root, "entries": stats.entries,
                                   "directories": stats.directories, "limits_hit": stats.limits_hit,
                                   "errors": len(stats.errors)})
            emit.walk_report(logical_root, stats)
            if failure is not None:
                raise failure
