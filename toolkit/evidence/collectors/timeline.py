"""One walk of the chosen roots into a TSK 3.x bodyfile (mactime reads it), staying on local filesystems;
the same walk notes SUID/SGID files, world-writable files and recent changes under /etc and the app."""
from __future__ import annotations

import ctypes
import json
import os
import posixpath
import stat
import time
from typing import Any, Dict, Iterator, List, Optional, Tuple

from toolkit import utc
from toolkit.evidence.collectors.base import CollectionContext, Collector, Emitter, host_member
from toolkit.host.hostfs import Refused, WalkEntry, WalkStats, atime_before_us

# statfs f_type of filesystems the walk does not enter: pseudo, network and FUSE
SKIPPED_FS = {0x9FA0: "proc", 0x62656572: "sysfs", 0x27E0EB: "cgroup", 0x63677270: "cgroup2", 0x1CD1: "devpts",
              0x6E736673: "nsfs", 0x64626720: "debugfs", 0x74726163: "tracefs", 0x73636673: "securityfs",
              0x6165676C: "pstore", 0xCAFE4A11: "bpf", 0x62656570: "configfs", 0x65735546: "fuse",
              0x65735543: "fusectl", 0x6969: "nfs", 0xFF534D42: "cifs", 0xFE534D42: "smb2", 0x517B: "smb",
              0x564C: "ncp", 0x1373: "devfs", 0x42494E4D: "binfmt_misc", 0x19800202: "mqueue",
              0x958458F6: "hugetlbfs", 0x187: "autofs", 0x73717368: "squashfs"}
RECENT_DAYS = 7
HISTOGRAM_DAYS = 14  # changes per hour over this many days: the case report's timeline plot
AT_SYMLINK_NOFOLLOW = 0x100
STATX_BTIME = 0x800
STATX_ATTR_IMMUTABLE = 0x10
STATX_ATTR_APPEND = 0x20
# executables in these directories belong to a package; one no package owns is worth a look
SYSTEM_BIN_DIRS = ("/bin/", "/sbin/", "/usr/bin/", "/usr/sbin/", "/lib/", "/lib64/", "/usr/lib/", "/usr/lib64/",
                   "/usr/libexec/")
HASH_BUDGET = {"triage": 16 << 30, "full": None}  # bytes of executables hashed after the walk (None: all)
HASH_FILE_LIMIT = 1 << 30  # an executable larger than this is listed, not hashed
COPY_FLAGGED = 1000  # files the walk flags (unpackaged SUID, capabilities, immutable...) copied, at most
COPY_FLAGGED_SIZE = 64 << 20
# container images' files: judged against their image (containers collector), never against the host's packages
IMAGE_STORES = ("/var/lib/docker/", "/var/lib/containers/", "/var/lib/containerd/")
# the lists one walk derives (UAC's ir_triage has a find for each), each stored as timeline/lists/NAME.txt
LISTS = ("suid_sgid", "capabilities", "world_writable", "group_writable", "immutable", "append_only", "hidden",
         "no_owner", "no_group", "unpackaged_system_executables")


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
        self.attributes = 0
        try:
            libc = ctypes.CDLL(None, use_errno=True)  # the libc already loaded: no ldconfig run, no file read
            self._statx = libc.statx
            self._statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint,
                                    ctypes.POINTER(_Statx)]
            self._buffer = _Statx()
        except (OSError, AttributeError):
            self._statx = None
        try:
            libc = ctypes.CDLL(None, use_errno=True)  # the libc already loaded: no ldconfig run, no file read
            self._fstatfs = libc.fstatfs
            self._fstatfs.argtypes = [ctypes.c_int, ctypes.POINTER(_Statfs)]
        except (OSError, AttributeError):
            self._fstatfs = None

    def birth_at(self, dir_fd: int, name: str) -> int:
        """Nanoseconds since the epoch; 0 when not known. Also sets self.attributes (immutable, append-only)."""
        self.attributes = 0
        if self._statx is None:
            return 0
        if self._statx(dir_fd, os.fsencode(name), AT_SYMLINK_NOFOLLOW, STATX_BTIME, ctypes.byref(self._buffer)) != 0:
            return 0
        self.attributes = int(self._buffer.stx_attributes & self._buffer.stx_attributes_mask)
        if not self._buffer.stx_mask & STATX_BTIME:
            return 0
        return int(self._buffer.stx_btime.tv_sec) * 1000000000 + int(self._buffer.stx_btime.tv_nsec)

    def fs_type(self, fd: int) -> Optional[int]:
        if self._fstatfs is None:
            return None
        buffer = _Statfs()
        if self._fstatfs(fd, ctypes.byref(buffer)) != 0:
            return None
        return buffer.f_type & 0xFFFFFFFF


def escape_name(name: str) -> str:
    """A path as a bodyfile field: valid UTF-8 (plaso stops reading a bodyfile at its first line that is not),
    one line, 11 fields, and unambiguous once mactime has decoded its %XX (once, in every field):
    - a byte that is not UTF-8 is %XX: mactime gives the byte back, as the name has it;
    - '|' is %7C: mactime shows '|', and no name adds a field;
    - '%' and every character that is not printable (control characters, DEL, C1, line and paragraph
      separators) are %25XX, a byte of their UTF-8 at a time: mactime shows them percent-encoded (%25, %0A,
      %1B) on one line. Decoded to a raw newline, mactime would drop the entry from its timeline."""
    if name.isprintable() and "|" not in name and "%" not in name:
        return name  # the common case (a byte that is not UTF-8 is never printable)
    out = []
    for char in name:
        code = ord(char)
        if 0xDC80 <= code <= 0xDCFF:  # os.fsdecode's stand-in for a byte that is not UTF-8
            out.append("%%%02X" % (code - 0xDC00))
        elif char == "|":
            out.append("%7C")
        elif char == "%" or not char.isprintable():
            out.extend("%%25%02X" % byte for byte in char.encode("utf-8"))
        else:
            out.append(char)
    return "".join(out)


def _capabilities(dir_fd: int, name: str) -> str:
    """The file capabilities (security.capability) of a name in an open directory, as hex; "" when none."""
    try:
        value = os.getxattr("/proc/self/fd/%d/%s" % (dir_fd, name), "security.capability", follow_symlinks=False)
    except OSError:
        return ""
    return value.hex()


def mode_string(mode: int) -> str:
    kinds = {stat.S_IFDIR: "d", stat.S_IFREG: "r", stat.S_IFLNK: "l", stat.S_IFCHR: "c", stat.S_IFBLK: "b",
             stat.S_IFIFO: "p", stat.S_IFSOCK: "s"}
    kind = kinds.get(stat.S_IFMT(mode), "-")
    return "%s/%s%s" % (kind, kind, stat.filemode(mode)[1:])


# (letter in mactime's "macb", Timesketch/plaso timestamp_desc)
TIME_KINDS = (("m", "Content Modification Time"), ("a", "Last Access Time"), ("c", "Metadata Modification Time"),
              ("b", "Creation Time"))
BODYFILE = "timeline/bodyfile.txt"
JSONL = "timeline/timeline.jsonl"
KIND_NAMES = {"d": "directory", "r": "file", "l": "symlink", "c": "character device", "b": "block device",
              "p": "FIFO", "s": "socket", "-": "other"}


EVENT_LINE = ('{"data_type": "bookgen-kit:fs:stat", "datetime": "%s", "gid": %d, "inode": %d, "macb": "%s", '
              '"message": %s, "mode": "%s", "path": %s, "size": %d, "timestamp": %d, "timestamp_desc": "%s", "uid": %d}')


# for each set of kinds that share one time (a 4-bit mask, m=1 a=2 c=4 b=8): mactime's "macb" and the description
_SHARED = {mask: ("".join(letter if mask >> i & 1 else "." for i, (letter, _) in enumerate(TIME_KINDS)),
                  "; ".join(desc for i, (_, desc) in enumerate(TIME_KINDS) if mask >> i & 1)) for mask in range(1, 16)}


def file_event_lines(path: str, info: os.stat_result, birth_ns: int, mode: str = "") -> List[str]:
    """Timesketch events of one walked name, as JSON lines: one per distinct timestamp, naming every kind that
    has it. Formatted directly (the walk makes millions): only the path needs JSON escaping."""
    masks: Dict[int, int] = {}
    for bit, value in ((1, info.st_mtime_ns), (2, atime_before_us(info)), (4, info.st_ctime_ns), (8, birth_ns)):
        if value > 0:
            masks[value] = masks.get(value, 0) | bit
    mode = mode or mode_string(info.st_mode)
    quoted = json.dumps(path, ensure_ascii=False)
    before = '"%s %s [' % (KIND_NAMES.get(mode[0], "other"), quoted[1:-1])  # the path is never a format
    after = '] %d bytes, %s, uid %d gid %d"' % (info.st_size, stat.filemode(info.st_mode), info.st_uid, info.st_gid)
    lines = []
    for value in sorted(masks):
        macb, descs = _SHARED[masks[value]]
        lines.append(EVENT_LINE % (utc.iso_ns(value), info.st_gid, info.st_ino, macb, before + macb + after, mode,
                                   quoted, info.st_size, value // 1000, descs, info.st_uid))
    return lines


def _event(moment: float, desc: str, message: str, data_type: str, evidence: str, **fields: Any) -> Dict[str, Any]:
    ns = int(round(moment * 1e6)) * 1000
    return dict(fields, message=message, datetime=utc.iso_ns(ns), timestamp=ns // 1000, timestamp_desc=desc,
                data_type=data_type, evidence=evidence)


def _docker_time(text: Any) -> Optional[float]:
    """Docker's RFC 3339 times (nanoseconds, Z or an offset) as epoch seconds; None for its zero time."""
    import calendar
    import re

    match = re.match(r"^(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$",
                     str(text or ""))
    if not match or match.group(1) == "0001":
        return None
    parts = [int(match.group(i)) for i in range(1, 7)]
    moment = calendar.timegm(tuple(parts) + (0, 0, 0)) + float("0." + (match.group(7) or "0"))
    zone = match.group(8)
    if zone != "Z":
        sign = 1 if zone[0] == "+" else -1
        moment -= sign * (int(zone[1:3]) * 3600 + int(zone[4:6]) * 60)
    return moment


LOGIN_KINDS = {"USER_PROCESS": ("Login Time", "login"), "DEAD_PROCESS": ("Logout Time", "logout"),
               "BOOT_TIME": ("Boot Time", "boot"), "RUN_LVL": ("Runlevel Change Time", "runlevel change")}


def stated_events(facts: Dict[str, List[Dict[str, Any]]]) -> Iterator[Dict[str, Any]]:
    """The events other collectors saw before the timeline ran: logins (wtmp, btmp), process starts, containers."""
    for fact in facts.get("login", []):
        record = fact["data"]
        failed = record.get("source", "").endswith("btmp")
        desc, verb = ("Failed Login Time", "failed login") if failed else \
            LOGIN_KINDS.get(record.get("type"), ("Event Time", str(record.get("type")).lower()))
        if not record.get("time"):
            continue
        message = "%s %s on %s from %s (%s)" % (verb, record.get("user") or "-", record.get("line") or "-",
                                               record.get("host") or "local", record.get("source"))
        yield _event(record["time"], desc, message, "bookgen-kit:login", fact["evidence"],
                     user=record.get("user"), line=record.get("line"), host=record.get("host"),
                     pid=record.get("pid"), source_file=record.get("source"))
    for fact in facts.get("process", []):
        record = fact["data"]
        if not record.get("start_time"):
            continue
        command = " ".join(record.get("cmdline") or []) or record.get("name") or "?"
        yield _event(record["start_time"], "Process Start Time",
                     "process %s started: %s (exe %s)" % (record.get("pid"), command[:500], record.get("exe")),
                     "bookgen-kit:process", fact["evidence"], pid=record.get("pid"), exe=record.get("exe"),
                     container_id=record.get("container_id"))
    for fact in facts.get("container", []):
        record = fact["data"]
        for key, desc, verb in (("created", "Container Creation Time", "created"),
                                ("started", "Container Start Time", "started")):
            moment = _docker_time(record.get(key))
            if moment is not None:
                yield _event(moment, desc, "container %s (%s, image %s) %s" % (
                    record.get("name"), str(record.get("id"))[:12], record.get("image"), verb),
                    "bookgen-kit:container", fact["evidence"], container=record.get("name"),
                    container_id=record.get("id"))


class TimelineCollector(Collector):
    name = "timeline"
    rank = 90
    profiles = ("triage", "full")
    budget_seconds = 600.0
    description = "bodyfile (TSK 3.x) of the triage roots (full: /), local filesystems only; SUID/SGID, " \
                  "world-writable and recently changed files from the same walk"

    def findings(self, facts: Dict[str, List[Dict[str, Any]]], judging: Any) -> Iterator[Dict[str, Any]]:
        return walk_findings(facts)

    def run(self, context: CollectionContext, emit: Emitter) -> None:
        roots = ["/"]  # the whole filesystem, local filesystems only (pseudo, network and FUSE mounts recorded)
        state = {"entries": 0, "events": 0, "stated_events": 0, "crtime": False, "skipped_mounts": [], "walks": [],
                 "notable": {"suid_sgid": [], "world_writable": [], "recent_changes": []},
                 "lists": {name: [] for name in LISTS}, "started": time.monotonic()}
        try:
            emit.streams(self._walk(context, roots, state, emit), {
                BODYFILE: "iterative walk (fstatat + statx crtime) through the host filesystem object, local "
                          "filesystems only: TSK 3.x bodyfile, names %XX-escaped",
                JSONL: "the same walk as Timesketch JSONL (one event per distinct time of each name), then the "
                       "logins, process starts and containers the earlier collectors saw"})
        finally:  # even when the walk failed midway, what it saw is kept and said
            emit.log("walk: %d names in %.1f s (bodyfile, timeline.jsonl, %s)" % (
                state["entries"], time.monotonic() - state["started"], ", ".join(LISTS)))
            self._hash_executables(context, emit, state.get("executables", []))
            for name, rows in sorted(state["lists"].items()):
                emit.generated("timeline/lists/%s.txt" % name, "".join(rows).encode("utf-8"),
                               "from the timeline walk: path<TAB>mode<TAB>uid<TAB>gid<TAB>detail, paths %XX-escaped "
                               "as in the bodyfile")
            emit.json("timeline/notable.json", dict(state["notable"], roots=roots,
                                                    lists={k: len(v) for k, v in state["lists"].items()},
                                                    skipped_mounts=state["skipped_mounts"],
                                                    crtime_available=state["crtime"], entries=state["entries"],
                                                    events=state["events"], stated_events=state["stated_events"],
                                                    walks=state["walks"]),
                      "the timeline walk")
            for entry in state["notable"]["suid_sgid"]:
                emit.fact("suid", entry, "timeline/notable.json")
            recent = sorted(state["notable"]["recent_changes"], key=lambda r: -max(r["mtime"], r["ctime"]))
            emit.fact("timeline_summary", {
                "bucket_seconds": 3600, "days": HISTOGRAM_DAYS, "until": time.time(),
                "changes_per_hour": {str(k): v for k, v in sorted(state.get("histogram", {}).items())},
                "recent_changes": recent[:40], "entries": state["entries"]}, BODYFILE)
            copied = set()
            for kind in ("capabilities", "immutable", "append_only", "unpackaged_system_executables", "no_owner",
                         "suid_sgid"):
                for row in state["facts"].get(kind, []) if "facts" in state else []:
                    logical = row.pop("logical")
                    if logical not in copied and len(copied) < COPY_FLAGGED:  # the flagged file itself
                        copied.add(logical)
                        emit.file(logical, min(context.max_file_size, COPY_FLAGGED_SIZE))
                    row["evidence"] = host_member(logical)
                    emit.fact("walk_" + kind, row, "timeline/lists/%s.txt" % kind)

    @staticmethod
    def _hash_executables(context: CollectionContext, emit: Emitter, executables: List[Any]) -> None:
        """sha256 of every executable the walk met (UAC's hash_executables), in `sha256sum -c` form, each inode
        once, within the profile's byte budget (what was left unhashed is said)."""
        started = time.monotonic()
        budget = HASH_BUDGET.get(context.profile)
        done: Dict[Tuple[int, int], str] = dict(context.digests)  # read whole already (package verification)
        rows, hashed, skipped = [], 0, 0
        for logical, device, inode, size in executables:
            digest = done.get((device, inode))
            if digest is None:
                if size > HASH_FILE_LIMIT or (budget is not None and hashed + size > budget):
                    skipped += 1
                    continue
                try:
                    digest = done[(device, inode)] = context.fs.sha256(logical)
                except (OSError, Refused):
                    skipped += 1
                    continue
                hashed += size
            rows.append("%s  %s\n" % (digest, escape_name(logical)))
        emit.generated("timeline/lists/executables.sha256", "".join(rows).encode("utf-8"),
                       "sha256 of every executable regular file the walk met (read O_NOATIME); paths %XX-escaped")
        emit.log("hash_executables: %d files, %d bytes in %.1f s; %d not hashed (over %s)" % (
            len(rows), hashed, time.monotonic() - started, skipped,
            "the %d-byte budget or 1 GiB a file" % budget if budget else "1 GiB a file"))
        if skipped:
            emit.skip("executables", "%d executables not hashed (the profile's hashing budget or 1 GiB a file)" %
                      skipped, "limit")

    @staticmethod
    def _walk(context: CollectionContext, roots: List[str], state: Dict, emit: Emitter):
        births = BirthTimes()
        recent = time.time() - RECENT_DAYS * 86400
        histogram_since = time.time() - HISTOGRAM_DAYS * 86400
        histogram = state.setdefault("histogram", {})
        watch = ("/etc/", context.deployment.app_dir.rstrip("/") + "/")
        notable = state["notable"]
        lists = state["lists"]
        facts: Dict[str, List[Dict[str, Any]]] = state.setdefault("facts", {})
        walked: List[str] = []
        events: List[str] = []
        from toolkit.host.accounts import accounts as host_accounts, group_ids

        known_uids = {account.uid for account in host_accounts(context.fs)}
        known_gids = set(group_ids(context.fs))
        index = (context.facts.get("package_index") or [{}])[0].get("data") or {}
        owner, aliases = index.get("owner"), index.get("aliases") or {}

        def packaged(logical: str) -> bool:
            if logical in owner:
                return True
            for real, alias in aliases.items():
                if logical.startswith(real) and (alias + logical[len(real):]) in owner:
                    return True
            return False

        def listed(kind: str, path: str, info: os.stat_result, detail: str = "", fact: bool = False) -> None:
            lists[kind].append("%s\t%o\t%d\t%d\t%s\n" % (path, info.st_mode, info.st_uid, info.st_gid, detail))
            if fact:
                facts.setdefault(kind, []).append({"path": path, "logical": current[0], "mode": "%o" % info.st_mode,
                                                   "uid": info.st_uid, "detail": detail})

        current = [""]
        executables = state.setdefault("executables", [])

        def flush(batch: List[str]):
            yield BODYFILE, "".join(batch).encode("utf-8")
            yield JSONL, ("\n".join(events) + "\n").encode("utf-8") if events else b""
            del events[:]

        def line(entry: WalkEntry) -> str:
            info, logical = entry.info, entry.logical
            birth = births.birth_at(entry.dir_fd, entry.name) if entry.dir_fd >= 0 else 0
            if birth:
                state["crtime"] = True
            path = escape_name(logical)
            current[0] = logical
            mode = info.st_mode
            regular = stat.S_ISREG(mode)
            if regular and mode & (stat.S_ISUID | stat.S_ISGID):
                listed("suid_sgid", path, info, fact=owner is not None and not logical.startswith(
                    IMAGE_STORES + ("/tmp/", "/var/tmp/", "/dev/shm/")) and not packaged(logical))
            if regular and mode & 0o111 and entry.dir_fd >= 0:
                executables.append((logical, info.st_dev, info.st_ino, info.st_size))
                capabilities = _capabilities(entry.dir_fd, entry.name)
                if capabilities:  # judged when no package owns it (a package's postinst sets its own)
                    listed("capabilities", path, info, capabilities, fact=owner is None or (
                        not packaged(logical) and not logical.startswith(IMAGE_STORES)))
                if owner is not None and logical.startswith(SYSTEM_BIN_DIRS) and not packaged(logical) and \
                        not logical.startswith(IMAGE_STORES):
                    listed("unpackaged_system_executables", path, info, fact=True)
            if not stat.S_ISLNK(mode):
                if mode & stat.S_IWOTH and not (stat.S_ISDIR(mode) and mode & stat.S_ISVTX):
                    listed("world_writable", path, info)
                if mode & stat.S_IWGRP:
                    listed("group_writable", path, info)
            if births.attributes & STATX_ATTR_IMMUTABLE:
                listed("immutable", path, info, fact=True)
            if births.attributes & STATX_ATTR_APPEND:
                listed("append_only", path, info, fact=True)
            if entry.name.startswith("."):
                listed("hidden", path, info)
            if known_uids and info.st_uid not in known_uids:
                listed("no_owner", path, info, fact=regular and bool(mode & 0o111))
            if known_gids and info.st_gid not in known_gids:
                listed("no_group", path, info)
            tsk_mode = mode_string(mode)
            made = file_event_lines(path, info, birth, tsk_mode)
            events.extend(made)
            state["events"] += len(made)
            mode = info.st_mode
            if stat.S_ISREG(mode) and mode & (stat.S_ISUID | stat.S_ISGID):
                notable["suid_sgid"].append({"path": logical, "mode": "%o" % mode, "uid": info.st_uid})
            if mode & stat.S_IWOTH and not stat.S_ISLNK(mode) and not (stat.S_ISDIR(mode) and mode & stat.S_ISVTX):
                notable["world_writable"].append({"path": logical, "mode": "%o" % mode})
            changed = max(info.st_mtime, info.st_ctime)
            if changed >= histogram_since:  # the report's plot: changes per hour, the last HISTOGRAM_DAYS
                hour = int(changed // 3600 * 3600)
                histogram[hour] = histogram.get(hour, 0) + 1
            if stat.S_ISREG(mode) and changed >= recent and logical.startswith(watch):
                notable["recent_changes"].append({"path": logical, "mtime": info.st_mtime, "ctime": info.st_ctime})
            state["entries"] += 1
            return "0|%s|%d|%s|%d|%d|%d|%d|%d|%d|%d\n" % (
                path, info.st_ino, tsk_mode, info.st_uid, info.st_gid, info.st_size,
                atime_before_us(info) // 1000000000, int(info.st_mtime), int(info.st_ctime), birth // 1000000000)

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
                        yield from flush(batch)
                        batch = []
            except Exception as error:  # keep the lines already made, then let the failure be recorded
                failure = error
            if batch:
                yield from flush(batch)
            state["walks"].append({"root": logical_root, "entries": stats.entries,
                                   "directories": stats.directories, "limits_hit": stats.limits_hit,
                                   "errors": len(stats.errors)})
            emit.walk_report(logical_root, stats)
            if failure is not None:
                raise failure
        for event in stated_events(context.facts):
            state["stated_events"] += 1
            # ASCII: a command line or user name the attacker chose may hold bytes that are not UTF-8
            yield JSONL, (json.dumps(event, sort_keys=True) + "\n").encode("ascii")


# -- what the walk's facts mean ---------------------------------------------------------------------------------
def walk_findings(facts: Dict[str, List[Dict[str, Any]]]) -> Iterator[Dict[str, Any]]:
    """One finding per kind of indicator, listing every path that shows it (never one row per file)."""
    from toolkit.evidence.findings import finding

    def paths(kind: str) -> List[Dict[str, Any]]:
        return [fact["data"] for fact in facts.get("walk_" + kind, [])]

    def shown(rows: List[Dict[str, Any]]) -> str:
        names = [row["path"] for row in rows]
        return ", ".join(names[:5]) + (" and %d more" % (len(names) - 5) if len(names) > 5 else "")

    unpackaged_caps = paths("capabilities")
    if unpackaged_caps:
        yield finding("capabilities-unpackaged", "high", "%d executables with file capabilities that no package "
                      "owns: %s" % (len(unpackaged_caps), shown(unpackaged_caps)), ["timeline/lists/capabilities.txt"]
                      + [row["evidence"] for row in unpackaged_caps[:COPY_FLAGGED]],
                      paths=[row["path"] for row in unpackaged_caps])
    for kind, severity, what in (("suid_sgid", "high", "SUID/SGID files that no package owns (outside temporary "
                                  "directories and container images)"),
                                 ("unpackaged_system_executables", "medium", "executables in system directories "
                                  "that no package owns"),
                                 ("immutable", "medium", "immutable files (chattr +i: they resist removal)"),
                                 ("append_only", "low", "append-only files (chattr +a)"),
                                 ("no_owner", "medium", "executables whose owner is in no passwd entry")):
        rows = paths(kind)
        if rows:
            yield finding("walk-" + kind.replace("_", "-"), severity, "%d %s: %s" % (len(rows), what, shown(rows)),
                          ["timeline/lists/%s.txt" % kind] + [row["evidence"] for row in rows[:COPY_FLAGGED]],
                          paths=[row["path"] for row in rows])
