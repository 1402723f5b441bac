"""The runbook's "Emergency Cleanup", made safe.

What may go: old books in bios/ and files in docx/ (default older than 7 days),
rotated logs (`*.log.*`, older than 7 days), old backups (older than 3 days).
What never goes: the newest backup (and its sidecars), a backup marked to keep,
anything in or under an evidence output, anything outside the configured
directories, anything reached through a symlink (symlinks are not followed, in the
configured paths themselves or anywhere below them: a symlinked directory is
refused), a file or tree that changed between plan and deletion.

The app user, who may be the attacker, shapes these directories (DESIGN.md
principle 9). So every path is reached through toolkit.host.hostfs (no symlink in
any component, each name opened relative to its parent's descriptor) and:
- planning is one iterative HostFS walk per directory, with an entry budget and a
  deadline shared by the whole plan; a limit hit is recorded in the plan's skipped
  list, and a bios/ tree not walked completely is not planned;
- a planned tree's inventory (device, inode and type of every entry) is kept, and
  a tree is deleted only when a fresh walk finds exactly that inventory, with the
  same newest modification time (and, after --archive-to, the same size, mtime and
  ctime as when it was archived);
- the archive is a pax tar written member by member from a walk, each regular file
  read through HostFS.open_at and hashed as it is written; a symlink is stored as
  a symlink, never followed; the archive is read back and every member compared
  before anything is deleted;
- deletion is a walk too: names are unlinked relative to their directory's
  descriptor (unlinkat never follows a link), emptied directories removed with
  rmdir relative to their parent's descriptor, deepest first, without recursion and
  with O(1) descriptors; a directory whose device and inode are not the planned
  ones is not entered, and a name that was not planned is left (and said so).
"""
from __future__ import annotations

import fnmatch
import hashlib
import os
import stat
import tarfile
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterator, List, Optional, Set, Tuple

from toolkit import utc
from toolkit.config import Deployment
from toolkit.errors import BadInputError, UsageError, VerificationFailed
from toolkit.host.atomic import AtomicFile, environment_error
from toolkit.host.hashing import sha256_path
from toolkit.host.hostfs import HostFS, Refused, WalkEntry, WalkLimits, WalkStats, reason as _why

BACKUP_PATTERNS = ("*.sql", "*.sql.gz", "*.dump", "*.dump.age", "*.sql.gz.age", "*.tar.gz", "*.tar.zst")
EVIDENCE_MARKERS = ("SHA256SUMS", "*.manifest.json", "*.custody.jsonl", "*.tar.zst.age")
DAY = 86400
DEFAULT_MAX_ENTRIES = 1_000_000  # names walked by one plan, all directories together
DEFAULT_TIME_LIMIT = 600.0  # seconds for one plan
MAX_PROBLEMS = 5  # problems kept per item (the count of the others is given)
CHUNK = 1 << 20
_DIR_FLAGS = (os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
              | os.O_NONBLOCK)
_BLOCK = tarfile.BLOCKSIZE
_RECORD = tarfile.RECORDSIZE


@dataclass
class Candidate:
    path: str
    category: str
    kind: str  # "file" or "dir"
    bytes: int
    newest_mtime: float
    device: int
    inode: int


@dataclass
class Skipped:
    path: str
    reason: str


@dataclass
class _Tree:
    """What a planned directory held: the identity (type, device, inode) of every entry, itself included."""
    identities: Set[int] = field(default_factory=set)
    entries: int = 0


@dataclass
class CleanupPlan:
    candidates: List[Candidate] = field(default_factory=list)
    skipped: List[Skipped] = field(default_factory=list)
    roots: Dict[str, str] = field(default_factory=dict)
    trees: Dict[str, _Tree] = field(default_factory=dict, repr=False, compare=False)  # per "dir" candidate path

    @property
    def total_bytes(self) -> int:
        return sum(c.bytes for c in self.candidates)

    def to_dict(self) -> Dict:
        return {"candidates": [asdict(c) for c in self.candidates], "skipped": [asdict(s) for s in self.skipped],
                "roots": self.roots, "total_bytes": self.total_bytes}


@dataclass
class CleanupResult:
    plan: CleanupPlan
    applied: bool
    deleted: List[str] = field(default_factory=list)
    not_deleted: List[Skipped] = field(default_factory=list)
    archive: Optional[str] = None
    archive_sha256: Optional[str] = None
    archive_members: int = 0
    free_before: Optional[int] = None
    free_after: Optional[int] = None

    def to_dict(self) -> Dict:
        return {"plan": self.plan.to_dict(), "applied": self.applied, "deleted": list(self.deleted),
                "not_deleted": [asdict(s) for s in self.not_deleted], "archive": self.archive,
                "archive_sha256": self.archive_sha256, "archive_members": self.archive_members,
                "free_before": self.free_before, "free_after": self.free_after}


# --------------------------------------------------------------------------- small helpers
def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _identity(info: os.stat_result) -> int:
    """Type, device and inode in one int (a set of a million of them stays small)."""
    return (stat.S_IFMT(info.st_mode) << 128) | (info.st_dev << 64) | info.st_ino


def _facts(info: os.stat_result) -> Tuple[int, int, int]:
    """What changes when an entry's content or metadata does (ctime cannot be set back by its owner)."""
    return info.st_size, info.st_mtime_ns, info.st_ctime_ns


def _close(fd: int) -> None:
    if fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass


def _deadline(seconds: Optional[float]) -> Optional[float]:
    return None if seconds is None else time.monotonic() + seconds


def _past(deadline: Optional[float]) -> bool:
    return deadline is not None and time.monotonic() > deadline


def _evidence_marker(dir_fd: int, deadline: Optional[float]) -> Optional[str]:
    """The name of an evidence marker in an open directory, "" when there is none, None when the directory could
    not be listed to the end (unreadable, or the deadline passed). Names only: nothing is stat'ed or followed."""
    try:
        with os.scandir(dir_fd) as names:  # a dup of dir_fd, rewound when closed: the walk lists it afterwards
            for count, entry in enumerate(names, 1):
                if _matches(entry.name, EVIDENCE_MARKERS):
                    return entry.name
                if count % 4096 == 0 and _past(deadline):
                    return None
    except OSError:
        return None
    return ""


def _limit_text(hit: Dict[str, object]) -> str:
    if hit["limit"] == "entries":
        return ("entry limit (%s names) reached here: the walk stopped, and what it did not reach is not planned"
                % hit["value"])
    if hit["limit"] == "time":
        return "time limit reached here: the walk stopped, and what it did not reach is not planned"
    return "depth limit (%s levels) reached here (%s times): what lies deeper is not planned" % (
        hit["value"], hit["count"])


def _walk(fs: HostFS, logical: str, limits: WalkLimits, stats: WalkStats, descend=None) -> Iterator[WalkEntry]:
    """fs.walk, closed (its descriptor released) as soon as the caller stops, also on an early return."""
    walker = fs.walk(logical, limits, stats, descend)
    try:
        yield from walker
    finally:
        walker.close()


class _Problems:
    """The first few problems met while handling one item, and how many there were."""

    def __init__(self) -> None:
        self.items: List[str] = []
        self.count = 0

    def add(self, text: str) -> None:
        self.count += 1
        if len(self.items) < MAX_PROBLEMS:
            self.items.append(text)

    def __bool__(self) -> bool:
        return self.count > 0

    def text(self) -> str:
        more = self.count - len(self.items)
        return "; ".join(self.items) + ("; and %d more" % more if more > 0 else "")


# --------------------------------------------------------------------------- planning
class _Group:
    """One directory directly in bios/ and what its walk found."""

    def __init__(self, path: str, info: os.stat_result) -> None:
        self.path = path
        self.info = info
        self.tree = _Tree({_identity(info)}, 1)
        self.bytes = info.st_blocks * 512
        self.newest = info.st_mtime
        self.entered = False
        self.limit_mark = 0
        self.limits_met = 0
        self.evidence: Optional[str] = None
        self.error: Optional[str] = None

    def add(self, info: os.stat_result) -> None:
        self.tree.identities.add(_identity(info))
        self.tree.entries += 1
        self.bytes += info.st_blocks * 512
        if info.st_mtime > self.newest:
            self.newest = info.st_mtime


class _Planner:
    def __init__(self, fs: HostFS, now: float, max_entries: Optional[int], deadline: Optional[float]) -> None:
        self.fs = fs
        self.now = now
        self.max_entries = max_entries
        self.deadline = deadline
        self.used = 0  # names walked so far, all walks together
        self.plan = CleanupPlan()
        self.seen: Set[int] = set()  # identities of candidates: nothing planned twice

    # -- shared ---------------------------------------------------------------------------------
    def root(self, category: str, path: str) -> Optional[str]:
        path = os.path.abspath(path)
        try:
            info = self.fs.lstat(path)
        except FileNotFoundError:
            return None
        except (OSError, Refused) as error:
            self.plan.skipped.append(Skipped(path, "the %s directory is not used: %s" % (category, _why(error))))
            return None
        if stat.S_ISLNK(info.st_mode):
            self.plan.skipped.append(Skipped(path, "the %s directory is a symlink: not followed" % category))
            return None
        if not stat.S_ISDIR(info.st_mode):
            self.plan.skipped.append(Skipped(path, "not a directory"))
            return None
        self.plan.roots[category] = path
        return path

    def limits(self) -> WalkLimits:
        left = None if self.max_entries is None else max(0, self.max_entries - self.used)
        return WalkLimits(max_entries=left, deadline=self.deadline)

    def out_of_time(self, root: str) -> bool:
        if _past(self.deadline):
            self.plan.skipped.append(Skipped(root, "time limit reached before it was walked: nothing planned there"))
            return True
        return False

    def absorb(self, stats: WalkStats) -> None:
        """A walk's refusals, errors and limits, into the plan's skipped list."""
        self.used += stats.entries
        for path, why in stats.skipped:
            self.plan.skipped.append(Skipped(path, why))
        for path, why in stats.errors:
            self.plan.skipped.append(Skipped(path, "not read: %s" % why))
        for hit in stats.limits_hit:
            self.plan.skipped.append(Skipped(str(hit["first_path"]), _limit_text(hit)))

    def evidence_check(self, child_fd: int) -> Tuple[Optional[str], bool]:
        """(a reason not to enter a directory, whether that reason is evidence found in it)."""
        marker = _evidence_marker(child_fd, self.deadline)
        if marker:
            return "holds evidence (%s; SHA256SUMS or a manifest): left alone" % marker, True
        if marker is None:
            return "could not be checked for evidence (unreadable, or the time limit): not walked", False
        return None, False

    def add(self, category: str, path: str, info: os.stat_result, kind: str, size: int, newest: float,
            tree: Optional[_Tree] = None) -> None:
        identity = _identity(info)
        if identity in self.seen:
            return
        self.seen.add(identity)
        self.plan.candidates.append(Candidate(path, category, kind, size, newest, info.st_dev, info.st_ino))
        if tree is not None:
            self.plan.trees[path] = tree

    # -- bios/: whole books -----------------------------------------------------------------------
    def bios(self, root: str, cutoff: float) -> None:
        if self.out_of_time(root):
            return
        stats = WalkStats()
        groups: Dict[str, _Group] = {}
        state: Dict[str, Optional[_Group]] = {"current": None}

        def limit_count() -> int:
            return sum(int(hit["count"]) for hit in stats.limits_hit)  # type: ignore[call-overload]

        def close_current() -> None:
            current = state["current"]
            if current is not None:
                current.limits_met = limit_count() - current.limit_mark
                state["current"] = None

        def descend(entry: WalkEntry, child_fd: int) -> Optional[str]:
            if entry.depth == 1:
                close_current()
                group = groups.get(entry.name)
                if group is None or (group.info.st_dev, group.info.st_ino) != (entry.info.st_dev, entry.info.st_ino):
                    return "replaced while bios/ was walked: not planned"
                group.entered, group.limit_mark = True, limit_count()
                state["current"] = group
            why, evidence = self.evidence_check(child_fd)
            group = state["current"]
            if why and entry.depth >= 1 and group is not None:
                if evidence:
                    group.evidence = entry.logical
                elif group.error is None:
                    group.error = "%s: %s" % (entry.logical, why)
            return why

        for entry in _walk(self.fs, root, self.limits(), stats, descend):
            mode = entry.info.st_mode
            if entry.depth == 0:
                continue
            if entry.depth > 1:
                current = state["current"]
                if current is not None:
                    current.add(entry.info)
                continue
            if stat.S_ISLNK(mode):
                self.plan.skipped.append(Skipped(entry.logical, "symlink: not followed"))
            elif stat.S_ISDIR(mode):
                groups[entry.name] = _Group(entry.logical, entry.info)
            elif stat.S_ISREG(mode):
                if _matches(entry.name, EVIDENCE_MARKERS):
                    self.plan.skipped.append(Skipped(entry.logical, "evidence file: left alone"))
                elif entry.info.st_mtime < cutoff:
                    self.add("bios", entry.logical, entry.info, "file", entry.info.st_blocks * 512,
                             entry.info.st_mtime)
        close_current()
        stopped = any(hit["limit"] in ("entries", "time") for hit in stats.limits_hit)
        for path, why in stats.errors:  # an error inside a book leaves that book unplanned
            name = path[len(root.rstrip("/")) + 1:].split("/", 1)[0]
            if name in groups and groups[name].error is None:
                groups[name].error = "%s: %s" % (path, why)
        self.absorb(stats)
        for name in sorted(groups):
            group = groups[name]
            if group.evidence is not None:
                if group.evidence != group.path:  # the walk recorded the directory itself already
                    self.plan.skipped.append(Skipped(group.path, "holds evidence (at %s): left alone" % group.evidence))
                continue
            if group.error is not None:
                self.plan.skipped.append(Skipped(group.path, "not walked completely (%s): not planned" % group.error))
            elif not group.entered:
                self.plan.skipped.append(Skipped(group.path, "not walked (%s): not planned" % (
                    "a walk limit was reached first" if stopped else "it could not be entered")))
            elif group.limits_met:
                self.plan.skipped.append(Skipped(group.path, "not walked completely (a walk limit was reached "
                                                             "inside it): not planned"))
            elif group.newest < cutoff:  # nothing inside changed recently either
                self.add("bios", group.path, group.info, "dir", group.bytes, group.newest, group.tree)

    # -- docx/, logs, backups: single files -------------------------------------------------------
    def files(self, category: str, root: str, cutoff: float, patterns=None) -> None:
        if self.out_of_time(root):
            return
        stats = WalkStats()

        def descend(entry: WalkEntry, child_fd: int) -> Optional[str]:
            return self.evidence_check(child_fd)[0]

        for entry in _walk(self.fs, root, self.limits(), stats, descend):
            if entry.depth == 0:
                continue
            why = self._file_rule(entry, patterns)
            if why:
                self.plan.skipped.append(Skipped(entry.logical, why))
            elif why is None and entry.info.st_mtime < cutoff:
                self.add(category, entry.logical, entry.info, "file", entry.info.st_blocks * 512, entry.info.st_mtime)
        self.absorb(stats)

    @staticmethod
    def _file_rule(entry: WalkEntry, patterns) -> Optional[str]:
        """None: a regular file that may go (by age); "": not for us, silently; else why it is kept."""
        mode = entry.info.st_mode
        if stat.S_ISDIR(mode):
            return ""
        if patterns and not _matches(entry.name, patterns):
            return ""
        if stat.S_ISLNK(mode):
            return "symlink: not followed"
        if _matches(entry.name, EVIDENCE_MARKERS):
            return "evidence file: left alone"
        if not stat.S_ISREG(mode):
            return ""
        return None

    def backups(self, root: str, cutoff: float) -> None:
        """Only what lies directly in backups/; never the newest backup or one marked to keep."""
        if self.out_of_time(root):
            return
        stats = WalkStats()
        entries: List[WalkEntry] = []

        def descend(entry: WalkEntry, child_fd: int) -> Optional[str]:
            if entry.depth >= 1:
                return "a directory in backups/: only backups directly in it are cleaned"
            return self.evidence_check(child_fd)[0]

        for entry in _walk(self.fs, root, self.limits(), stats, descend):
            if entry.depth == 1:
                entries.append(WalkEntry(entry.logical, entry.name, entry.info, 1, -1))
        complete = not stats.errors and not stats.limits_hit
        entered = not any(path == root for path, _ in stats.skipped)
        self.absorb(stats)
        if not entered:
            return
        if not complete:  # an unseen .keep or newer backup: nothing can be told apart
            self.plan.skipped.append(Skipped(root, "not listed completely: no backup is planned"))
            return
        protected = _protected_backups([(e.name, e.info) for e in entries])
        for entry in entries:
            if entry.name in protected:
                self.plan.skipped.append(Skipped(entry.logical, protected[entry.name]))
                continue
            why = self._file_rule(entry, None)
            if why:
                self.plan.skipped.append(Skipped(entry.logical, why))
            elif why is None and entry.info.st_mtime < cutoff:
                self.add("backups", entry.logical, entry.info, "file", entry.info.st_blocks * 512,
                         entry.info.st_mtime)


def _protected_backups(entries: List[Tuple[str, os.stat_result]]) -> Dict[str, str]:
    """The newest backup and its sidecars; every backup marked with a .keep file (by name, in backups/)."""
    backups = [(info.st_mtime, name) for name, info in entries
               if stat.S_ISREG(info.st_mode) and _matches(name, BACKUP_PATTERNS)]
    names = [name for name, _ in entries]
    protected: Dict[str, str] = {}
    if backups:
        newest = max(backups)[1]
        for name in names:
            if name == newest or name.startswith(newest + "."):
                protected[name] = "the newest backup (or its sidecar): always kept"
    kept = [name[: -len(".keep")] for name in names if name.endswith(".keep")]
    if kept:
        for name in names:
            for stem in kept:
                if name == stem or name.startswith(stem + "."):
                    protected[name] = "marked to keep (%s.keep)" % stem
    return protected


def plan_cleanup(deployment: Deployment, days: int = 7, log_days: int = 7, backup_days: int = 3,
                 now: Optional[float] = None, max_entries: Optional[int] = DEFAULT_MAX_ENTRIES,
                 time_limit: Optional[float] = DEFAULT_TIME_LIMIT) -> CleanupPlan:
    """What may go. max_entries and time_limit bound all the walks of this plan together; a limit hit is
    recorded in plan.skipped, and what was not walked completely is not planned."""
    now = time.time() if now is None else now
    fs = HostFS("/")
    app_dir = os.path.abspath(deployment.app_dir)
    try:
        info = fs.lstat(app_dir)
    except FileNotFoundError:
        raise BadInputError("no BookGen directory at %s" % app_dir, hint="give --app-dir DIR") from None
    except (OSError, Refused) as error:
        raise BadInputError("the BookGen directory %s is not used: %s" % (app_dir, _why(error)),
                            hint="give --app-dir as the real path (symlinks are not followed)") from None
    if stat.S_ISLNK(info.st_mode):
        raise BadInputError("the BookGen directory %s is a symlink: not followed" % app_dir,
                            hint="give --app-dir the directory it points to")
    if not stat.S_ISDIR(info.st_mode):
        raise BadInputError("no BookGen directory at %s" % app_dir, hint="give --app-dir DIR")
    planner = _Planner(fs, now, max_entries, _deadline(time_limit))
    bios = planner.root("bios", deployment.bios_dir)
    if bios:
        planner.bios(bios, now - days * DAY)
    docx = planner.root("docx", deployment.docx_dir)
    if docx:
        planner.files("docx", docx, now - days * DAY)
    for index, log_dir in enumerate(deployment.log_dirs):
        logs = planner.root("logs" if index == 0 else "logs%d" % index, log_dir)
        if logs:
            planner.files("logs", logs, now - log_days * DAY, patterns=("*.log.*",))
    backups = planner.root("backups", deployment.backups_dir)
    if backups:
        planner.backups(backups, now - backup_days * DAY)
    return planner.plan


# --------------------------------------------------------------------------- the archive
class _TarStream:
    """A POSIX pax tar written member by member (headers from TarInfo.tobuf; no name-service lookups)."""

    def __init__(self, out, where: str) -> None:
        self.out = out
        self.where = where
        self.offset = 0
        self.members = 0

    def write(self, data: bytes) -> None:
        try:
            self.out.write(data)
        except OSError as error:
            raise environment_error(error, "cannot write the archive in %s" % self.where) from None
        self.offset += len(data)

    def header(self, info: tarfile.TarInfo) -> None:
        self.write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        self.members += 1

    def pad(self) -> None:
        remainder = self.offset % _BLOCK
        if remainder:
            self.write(b"\0" * (_BLOCK - remainder))

    def finish(self) -> None:
        self.write(b"\0" * (2 * _BLOCK))
        remainder = self.offset % _RECORD
        if remainder:
            self.write(b"\0" * (_RECORD - remainder))


class _Archiver:
    """Writes each candidate from a walk of it and remembers what a later check and the read-back compare."""

    def __init__(self, fs: HostFS, tar: _TarStream, deadline: Optional[float]) -> None:
        self.fs = fs
        self.tar = tar
        self.deadline = deadline
        self.expected: Dict[str, Tuple] = {}  # member name -> what reading the archive back must find
        self.first_name: Dict[Tuple[int, int], str] = {}  # hard links: (dev, ino) -> first member name
        self.facts: Dict[str, Dict[int, Tuple[int, int, int]]] = {}  # candidate path -> identity -> facts
        self.problems: Dict[str, str] = {}  # candidate path -> why it must not be deleted

    def candidate(self, candidate: Candidate, tree: Optional[_Tree]) -> None:
        problems = _Problems()
        facts: Dict[int, Tuple[int, int, int]] = {}
        expected_entries = tree.entries if tree is not None else 1
        stats = WalkStats()
        count = 0
        for entry in _walk(self.fs, candidate.path, WalkLimits(max_entries=expected_entries + 1,
                                                               deadline=self.deadline), stats):
            identity = _identity(entry.info)
            if entry.depth == 0:
                why = _root_mismatch(candidate, entry.info)
                if why:
                    problems.add(why)
                    break
            elif tree is None or identity not in tree.identities:
                problems.add("%s appeared or was replaced since it was planned" % entry.logical)
                break
            count += 1
            why = self.member(entry)
            if why:
                problems.add(why)
                break
            facts[identity] = _facts(entry.info)
        for path, why in stats.errors:
            problems.add("%s: %s" % (path, why))
        for hit in stats.limits_hit:
            problems.add("more entries than were planned, or the time limit" if hit["limit"] != "depth"
                         else "deeper than the walk limit")
        if not problems and count != expected_entries:
            problems.add("%d entries where %d were planned" % (count, expected_entries))
        if problems:
            self.problems[candidate.path] = problems.text()
        else:
            self.facts[candidate.path] = facts

    def member(self, entry: WalkEntry) -> Optional[str]:
        """Write one member; a reason when the entry changed under us (the archive is still valid)."""
        info = entry.info
        mode = info.st_mode
        name = entry.logical.lstrip("/")
        member = tarfile.TarInfo(name)
        member.mode = stat.S_IMODE(mode)
        member.uid, member.gid = info.st_uid, info.st_gid
        member.uname = member.gname = ""
        member.mtime = info.st_mtime
        if stat.S_ISREG(mode):
            key = (info.st_dev, info.st_ino)
            if info.st_nlink > 1 and key in self.first_name:
                member.type, member.linkname = tarfile.LNKTYPE, self.first_name[key]
                self.tar.header(member)
                self.expected[name] = ("hardlink", member.linkname)
                return None
            why = self._regular(entry, member)
            if why is None and info.st_nlink > 1:
                self.first_name[key] = name
            return why
        if stat.S_ISDIR(mode):
            member.type = tarfile.DIRTYPE
            self.expected[name] = ("dir",)
        elif stat.S_ISLNK(mode):
            try:
                member.linkname = os.readlink(entry.name, dir_fd=entry.dir_fd)
            except OSError as error:
                return "%s: %s" % (entry.logical, _why(error))
            member.type = tarfile.SYMTYPE
            self.expected[name] = ("symlink", member.linkname)
        elif stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            member.type = tarfile.FIFOTYPE if stat.S_ISFIFO(mode) else \
                tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE
            if not stat.S_ISFIFO(mode):
                member.devmajor, member.devminor = os.major(info.st_rdev), os.minor(info.st_rdev)
            self.expected[name] = ("special", member.type)
        else:
            return None  # a socket: tar has no member for it (nothing to keep)
        self.tar.header(member)
        return None

    def _regular(self, entry: WalkEntry, member: tarfile.TarInfo) -> Optional[str]:
        try:
            opened = self.fs.open_at(entry.dir_fd, entry.name, entry.logical)
        except (OSError, Refused) as error:
            return "%s: %s" % (entry.logical, _why(error))
        try:
            before = opened.info
            if (before.st_dev, before.st_ino) != (entry.info.st_dev, entry.info.st_ino) or \
                    _facts(before) != _facts(entry.info):
                return "%s changed while it was archived" % entry.logical
            member.type, member.size = tarfile.REGTYPE, before.st_size
            self.tar.header(member)
            digest, left, problem = hashlib.sha256(), before.st_size, None
            while left > 0:
                try:
                    data = os.read(opened.fd, min(CHUNK, left))
                except OSError as error:
                    data, problem = b"", "%s: %s" % (entry.logical, _why(error))
                if not data:
                    problem = problem or "%s shrank while it was archived" % entry.logical
                    break
                digest.update(data)
                self.tar.write(data)
                left -= len(data)
            if left > 0:  # it shrank: the member keeps its stated size, zero-filled, and the file is kept
                self.tar.write(b"\0" * left)
            self.tar.pad()
            self.expected[member.name] = ("file", member.size, None if problem else digest.hexdigest())
            if problem:
                return problem
            if _facts(os.fstat(opened.fd)) != _facts(before):
                return "%s changed while it was archived" % entry.logical
            return None
        finally:
            opened.close()


def _root_mismatch(candidate: Candidate, info: os.stat_result) -> Optional[str]:
    if (info.st_dev, info.st_ino) != (candidate.device, candidate.inode):
        return "replaced since it was planned (device/inode differ)"
    if candidate.kind == "dir" and not stat.S_ISDIR(info.st_mode):
        return "no longer a directory"
    if candidate.kind == "file" and not stat.S_ISREG(info.st_mode):
        return "no longer a regular file"
    return None


def _write_archive(fs: HostFS, plan: CleanupPlan, archive_dir: str,
                   deadline: Optional[float]) -> Tuple[str, str, int, _Archiver]:
    """tar.zst of every candidate (member names: absolute paths without the leading /), read back and verified."""
    import zstandard

    os.makedirs(archive_dir, exist_ok=True)
    name = "bookgen-cleanup-%s.tar.zst" % utc.stamp()
    with AtomicFile(os.path.join(archive_dir, name), 0o600) as out:
        writer = zstandard.ZstdCompressor(level=3).stream_writer(out, closefd=False)
        tar = _TarStream(writer, archive_dir)
        archiver = _Archiver(fs, tar, deadline)
        for candidate in plan.candidates:
            if _past(deadline):
                archiver.problems[candidate.path] = "time limit reached before it was archived"
                continue
            archiver.candidate(candidate, plan.trees.get(candidate.path) if candidate.kind == "dir" else None)
        tar.finish()
        try:
            writer.flush(zstandard.FLUSH_FRAME)
        except OSError as error:
            raise environment_error(error, "cannot write the archive in %s" % archive_dir) from None
        out.commit()
    members = _verify_archive(out.path, archiver.expected)
    return out.path, sha256_path(out.path), members, archiver


def _verify_archive(path: str, expected: Dict[str, Tuple]) -> int:
    """Read the archive back: every member written must be there, as it was read from the host."""
    import zstandard

    seen: Dict[str, Tuple] = {}
    count = 0
    with open(path, "rb") as raw:
        reader = zstandard.ZstdDecompressor().stream_reader(raw)
        with tarfile.open(fileobj=reader, mode="r|", encoding="utf-8", errors="surrogateescape") as tar:
            while True:
                member = tar.next()
                if member is None:
                    break
                count += 1
                if member.isreg():
                    digest = hashlib.sha256()
                    handle = tar.extractfile(member)
                    for chunk in iter(lambda: handle.read(CHUNK), b""):
                        digest.update(chunk)
                    facts: Tuple = ("file", member.size, digest.hexdigest())
                elif member.islnk():
                    facts = ("hardlink", member.linkname)
                elif member.issym():
                    facts = ("symlink", member.linkname)
                elif member.isdir():
                    facts = ("dir",)
                else:
                    facts = ("special", member.type)
                seen[member.name] = facts
                del tar.members[:]  # a stream: nothing is looked up again, so keep memory flat
    wrong = [name for name, facts in expected.items()  # a file that changed as it was read is not compared
             if not (facts[0] == "file" and facts[2] is None) and seen.get(name) != facts]
    if wrong:
        raise VerificationFailed("the cleanup archive %s does not hold %d entries as they were read (first: %s); "
                                 "nothing was deleted" % (path, len(wrong), wrong[0]))
    return count


# --------------------------------------------------------------------------- deleting
def _check(fs: HostFS, candidate: Candidate, tree: Optional[_Tree], facts: Optional[Dict[int, Tuple[int, int, int]]],
           deadline: Optional[float]) -> Optional[str]:
    """Why the candidate is not as planned (and, after an archive, as archived); None when it is."""
    expected = tree.entries if tree is not None else 1
    stats = WalkStats()
    count, newest = 0, None
    for entry in _walk(fs, candidate.path, WalkLimits(max_entries=expected + 1, deadline=deadline), stats):
        identity = _identity(entry.info)
        if entry.depth == 0:
            why = _root_mismatch(candidate, entry.info)
            if why:
                return why
        elif tree is None or identity not in tree.identities:
            return "%s appeared or was replaced since it was planned (device/inode differ)" % entry.logical
        if facts is not None and facts.get(identity) != _facts(entry.info):
            return "%s changed after it was archived" % entry.logical
        count += 1
        newest = entry.info.st_mtime if newest is None else max(newest, entry.info.st_mtime)
    if stats.errors:
        return "%s: %s" % stats.errors[0]
    if stats.limits_hit:
        return "more entries than were planned, or the time limit" if stats.limits_hit[0]["limit"] != "depth" \
            else "deeper than the walk limit"
    if count == 0:
        return "vanished since it was planned"
    if count != expected:
        return "%d entries where %d were planned" % (count, expected)
    if newest != candidate.newest_mtime:
        return "modified since it was planned"
    return None


def _remove_chain(parent_fd: int, chain: List[Tuple[str, Tuple[int, int], str]]) -> Optional[str]:
    """rmdir a chain of emptied directories, deepest first: chain[0] is in parent_fd, chain[i+1] in chain[i].

    O(1) descriptors: down by name (device and inode checked at every step), back up by "..", checked too."""
    if not chain:
        return None
    current, owned = parent_fd, False
    try:
        for name, identity, logical in chain[:-1]:
            child = os.open(name, _DIR_FLAGS, dir_fd=current)
            info = os.fstat(child)
            if (info.st_dev, info.st_ino) != identity:
                _close(child)
                return "%s was moved while it was deleted: left" % logical
            if owned:
                _close(current)
            current, owned = child, True
        for index in range(len(chain) - 1, -1, -1):
            name, _unused, logical = chain[index]
            try:
                os.rmdir(name, dir_fd=current)
            except FileNotFoundError:
                pass
            except OSError as error:
                return "%s not removed: %s" % (logical, _why(error))
            if index == 0:
                break
            if index == 1:
                if owned:
                    _close(current)
                current, owned = parent_fd, False
                continue
            up = os.open("..", _DIR_FLAGS, dir_fd=current)
            info = os.fstat(up)
            if (info.st_dev, info.st_ino) != chain[index - 2][1]:
                _close(up)
                return "%s was moved while it was deleted: left" % chain[index - 2][2]
            if owned:
                _close(current)
            current, owned = up, True
        return None
    except OSError as error:
        return "%s: %s" % (chain[0][2], _why(error))
    finally:
        if owned:
            _close(current)


def _remove_tree(fs: HostFS, candidate: Candidate, tree: _Tree, deadline: Optional[float]) -> _Problems:
    """Delete a planned directory: a walk that unlinks every planned non-directory where it lists it, and
    removes each directory once the walk has left it (when it enters the next sibling, or at the end)."""
    problems = _Problems()
    stack: List[Tuple[str, Tuple[int, int], str]] = []  # the directories the walk is in, by depth

    def descend(entry: WalkEntry, child_fd: int) -> Optional[str]:
        if entry.depth > 0:  # the walk left every directory deeper than this one: remove them
            finished = stack[entry.depth:]
            del stack[entry.depth:]
            why = _remove_chain(entry.dir_fd, finished)
            if why:
                problems.add(why)
            if _identity(entry.info) not in tree.identities:
                problems.add("%s appeared or was replaced since it was planned (device/inode differ): left"
                             % entry.logical)
                return "not planned: left"
        elif (entry.info.st_dev, entry.info.st_ino) != (candidate.device, candidate.inode):
            problems.add("replaced since it was planned (device/inode differ)")
            return "replaced since it was planned"
        stack.append((entry.name, (entry.info.st_dev, entry.info.st_ino), entry.logical))
        return None

    stats = WalkStats()
    for entry in _walk(fs, candidate.path, WalkLimits(max_entries=tree.entries + 1024, deadline=deadline), stats,
                       descend):
        if entry.depth == 0 or stat.S_ISDIR(entry.info.st_mode):
            continue
        if _identity(entry.info) not in tree.identities:
            problems.add("%s appeared or was replaced since it was planned: left" % entry.logical)
            continue
        try:
            os.unlink(entry.name, dir_fd=entry.dir_fd)  # unlinkat: a symlink itself goes, never its target
        except FileNotFoundError:
            pass
        except OSError as error:
            problems.add("%s not removed: %s" % (entry.logical, _why(error)))
    for path, why in stats.errors:
        problems.add("%s: %s" % (path, why))
    for hit in stats.limits_hit:
        problems.add("%s limit reached at %s: the rest is left" % (hit["limit"], hit["first_path"]))
    if stack:  # the last chain, from the candidate itself down
        try:
            parent_fd, _name, _resolved, info = fs.final(candidate.path)
        except FileNotFoundError:
            return problems
        except (OSError, Refused) as error:
            problems.add("%s: %s" % (candidate.path, _why(error)))
            return problems
        try:
            if (info.st_dev, info.st_ino) != stack[0][1]:
                problems.add("replaced while it was deleted: left")
            else:
                why = _remove_chain(parent_fd, stack)
                if why:
                    problems.add(why)
        finally:
            _close(parent_fd)
    return problems


def _remove_file(fs: HostFS, candidate: Candidate) -> Optional[str]:
    try:
        parent_fd, name, _resolved, info = fs.final(candidate.path)
    except FileNotFoundError:
        return None
    except (OSError, Refused) as error:
        return _why(error)
    try:
        why = _root_mismatch(candidate, info)
        if why:
            return why
        os.unlink(name, dir_fd=parent_fd)
        return None
    except FileNotFoundError:
        return None
    except OSError as error:
        return _why(error)
    finally:
        _close(parent_fd)


def _free_bytes(fs: HostFS, path: str) -> Optional[int]:
    try:
        fd = fs.open_dir(os.path.abspath(path))
    except (OSError, Refused):
        return None
    try:
        info = os.fstatvfs(fd)
        return info.f_bavail * info.f_frsize
    except OSError:
        return None
    finally:
        _close(fd)


def apply_cleanup(plan: CleanupPlan, deployment: Deployment, archive_to: Optional[str] = None,
                  time_limit: Optional[float] = None) -> CleanupResult:
    """Archive (when asked) and verify, then delete what is still as planned. time_limit (seconds, default
    none: the work is bounded by the plan) leaves what it did not reach, listed in not_deleted."""
    fs = HostFS("/")
    deadline = _deadline(time_limit)
    result = CleanupResult(plan=plan, applied=True, free_before=_free_bytes(fs, deployment.app_dir))
    archiver: Optional[_Archiver] = None
    if archive_to:
        real_archive = os.path.realpath(archive_to)
        for root in plan.roots.values():
            real_root = os.path.realpath(root)
            if real_archive == real_root or real_archive.startswith(real_root + "/"):
                raise UsageError("--archive-to %s is inside %s, which is being cleaned" % (archive_to, root))
        if plan.candidates:
            result.archive, result.archive_sha256, result.archive_members, archiver = _write_archive(
                fs, plan, archive_to, deadline)
    for candidate in plan.candidates:
        tree = plan.trees.get(candidate.path) if candidate.kind == "dir" else None
        facts = None
        if archiver is not None:
            if candidate.path in archiver.problems:
                result.not_deleted.append(Skipped(candidate.path, "not archived as planned (%s): left alone"
                                                  % archiver.problems[candidate.path]))
                continue
            facts = archiver.facts.get(candidate.path)
        if candidate.kind == "dir" and tree is None:
            result.not_deleted.append(Skipped(candidate.path, "no inventory of it was planned: left alone"))
            continue
        if _past(deadline):
            result.not_deleted.append(Skipped(candidate.path, "time limit reached before it was deleted"))
            continue
        why = _check(fs, candidate, tree, facts, deadline)
        if why:
            result.not_deleted.append(Skipped(candidate.path, "changed since it was planned: left alone (%s)" % why))
            continue
        if candidate.kind == "dir":
            problems = _remove_tree(fs, candidate, tree, deadline)  # type: ignore[arg-type]
            if problems:
                result.not_deleted.append(Skipped(candidate.path, "partly deleted: %s" % problems.text()))
                continue
        else:
            failed = _remove_file(fs, candidate)
            if failed:
                result.not_deleted.append(Skipped(candidate.path, "could not delete: %s" % failed))
                continue
        result.deleted.append(candidate.path)
    result.free_after = _free_bytes(fs, deployment.app_dir)
    return result


def dry_run(plan: CleanupPlan, deployment: Deployment) -> CleanupResult:
    free = _free_bytes(HostFS("/"), deployment.app_dir)
    return CleanupResult(plan=plan, applied=False, free_before=free, free_after=free)


def check_days(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise BadInputError("--%s must be at least 1 (day)" % name.replace("_", "-"))
