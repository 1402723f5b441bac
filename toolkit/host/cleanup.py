"""The runbook's "Emergency Cleanup", made safe.

What may go: old books in bios/ and files in docx/ (default older than 7 days),
rotated logs (`*.log.*`, older than 7 days), old backups (older than 3 days).
What never goes: the newest backup (and its sidecars), a backup marked to keep,
anything in or under an evidence output, anything outside the configured
directories, anything reached through a symlink (symlinks are not followed, and a
symlinked root is refused), a file that changed between plan and deletion.
"""
from __future__ import annotations

import fnmatch
import hashlib
import os
import shutil
import stat
import tarfile
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

from toolkit.config import Deployment
from toolkit.errors import BadInputError, UsageError, VerificationFailed
from toolkit.host.atomic import AtomicFile, environment_error
from toolkit.host.hashing import sha256_path

BACKUP_PATTERNS = ("*.sql", "*.sql.gz", "*.dump", "*.dump.age", "*.sql.gz.age", "*.tar.gz", "*.tar.zst")
EVIDENCE_MARKERS = ("SHA256SUMS", "*.manifest.json", "*.custody.jsonl", "*.tar.zst.age")
DAY = 86400


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
class CleanupPlan:
    candidates: List[Candidate] = field(default_factory=list)
    skipped: List[Skipped] = field(default_factory=list)
    roots: Dict[str, str] = field(default_factory=dict)

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
        document = asdict(self)
        document["plan"] = self.plan.to_dict()
        return document


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _is_evidence_dir(path: str) -> bool:
    try:
        return any(_matches(name, EVIDENCE_MARKERS) for name in os.listdir(path))
    except OSError:
        return False


def _tree(path: str) -> Tuple[int, float]:
    """Allocated bytes and newest mtime of a directory tree, without following symlinks."""
    info = os.lstat(path)
    total, newest = info.st_blocks * 512, info.st_mtime
    for directory, dirs, files in os.walk(path, followlinks=False):
        for name in dirs + files:
            try:
                entry = os.lstat(os.path.join(directory, name))
            except OSError:
                continue
            total += entry.st_blocks * 512
            newest = max(newest, entry.st_mtime)
    return total, newest


class _Planner:
    def __init__(self, now: float) -> None:
        self.now = now
        self.plan = CleanupPlan()

    def root(self, category: str, path: str) -> Optional[str]:
        if not os.path.lexists(path):
            return None
        if os.path.islink(path):
            self.plan.skipped.append(Skipped(path, "the %s directory is a symlink: not followed" % category))
            return None
        if not os.path.isdir(path):
            self.plan.skipped.append(Skipped(path, "not a directory"))
            return None
        self.plan.roots[category] = path
        return path

    def add(self, category: str, path: str, info: os.stat_result, kind: str, size: int, newest: float) -> None:
        self.plan.candidates.append(Candidate(path, category, kind, size, newest, info.st_dev, info.st_ino))

    def walk_files(self, category: str, root: str, cutoff: float, patterns=None, recursive: bool = True,
                   exclude: Tuple[str, ...] = ()) -> None:
        for directory, dirs, files in os.walk(root, followlinks=False):
            if _is_evidence_dir(directory):
                self.plan.skipped.append(Skipped(directory, "holds evidence (SHA256SUMS or a manifest): left alone"))
                dirs[:] = []
                continue
            for name in list(dirs):
                if os.path.islink(os.path.join(directory, name)):
                    self.plan.skipped.append(Skipped(os.path.join(directory, name), "symlink: not followed"))
            for name in sorted(files):
                path = os.path.join(directory, name)
                if path in exclude:
                    continue
                if patterns and not _matches(name, patterns):
                    continue
                if _matches(name, EVIDENCE_MARKERS):
                    self.plan.skipped.append(Skipped(path, "evidence file: left alone"))
                    continue
                info = os.lstat(path)
                if stat.S_ISLNK(info.st_mode):
                    self.plan.skipped.append(Skipped(path, "symlink: not followed"))
                    continue
                if not stat.S_ISREG(info.st_mode):
                    continue
                if info.st_mtime < cutoff:
                    self.add(category, path, info, "file", info.st_blocks * 512, info.st_mtime)
            if not recursive:
                dirs[:] = []


def plan_cleanup(deployment: Deployment, days: int = 7, log_days: int = 7, backup_days: int = 3,
                 now: Optional[float] = None) -> CleanupPlan:
    now = time.time() if now is None else now
    if not os.path.isdir(deployment.app_dir):
        raise BadInputError("no BookGen directory at %s" % deployment.app_dir, hint="give --app-dir DIR")
    planner = _Planner(now)
    bios = planner.root("bios", deployment.bios_dir)
    if bios:
        cutoff = now - days * DAY
        for name in sorted(os.listdir(bios)):
            path = os.path.join(bios, name)
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                planner.plan.skipped.append(Skipped(path, "symlink: not followed"))
            elif stat.S_ISDIR(info.st_mode):
                if _is_evidence_dir(path):
                    planner.plan.skipped.append(Skipped(path, "holds evidence: left alone"))
                    continue
                size, newest = _tree(path)
                if newest < cutoff:  # nothing inside changed recently either
                    planner.add("bios", path, info, "dir", size, newest)
            elif stat.S_ISREG(info.st_mode) and info.st_mtime < cutoff:
                planner.add("bios", path, info, "file", info.st_blocks * 512, info.st_mtime)
    docx = planner.root("docx", deployment.docx_dir)
    if docx:
        planner.walk_files("docx", docx, now - days * DAY)
    for index, log_dir in enumerate(deployment.log_dirs):
        logs = planner.root("logs" if index == 0 else "logs%d" % index, log_dir)
        if logs:
            planner.walk_files("logs", logs, now - log_days * DAY, patterns=("*.log.*",))
    backups = planner.root("backups", deployment.backups_dir)
    if backups:
        protected = _protected_backups(backups)
        for path, reason in protected.items():
            planner.plan.skipped.append(Skipped(path, reason))
        planner.walk_files("backups", backups, now - backup_days * DAY, recursive=False,
                           exclude=tuple(protected))
    return planner.plan


def _protected_backups(backups: str) -> Dict[str, str]:
    """The newest backup and its sidecars; every backup marked with a .keep file."""
    entries = []
    for name in os.listdir(backups):
        path = os.path.join(backups, name)
        try:
            info = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISREG(info.st_mode) and _matches(name, BACKUP_PATTERNS):
            entries.append((info.st_mtime, name))
    protected: Dict[str, str] = {}
    names = os.listdir(backups)
    if entries:
        newest = max(entries)[1]
        for name in names:
            if name == newest or name.startswith(newest + "."):
                protected[os.path.join(backups, name)] = "the newest backup (or its sidecar): always kept"
    for name in names:
        if name.endswith(".keep"):
            kept = name[: -len(".keep")]
            for other in names:
                if other == kept or other.startswith(kept + "."):
                    protected[os.path.join(backups, other)] = "marked to keep (%s)" % name
    return protected


def _free_bytes(path: str) -> Optional[int]:
    try:
        info = os.statvfs(path)
        return info.f_bavail * info.f_frsize
    except OSError:
        return None


def _write_archive(plan: CleanupPlan, archive_dir: str) -> Tuple[str, str, int]:
    """tar.zst of every candidate (paths as absolute names without the leading /), then verified by re-reading."""
    import zstandard

    os.makedirs(archive_dir, exist_ok=True)
    name = "bookgen-cleanup-%s.tar.zst" % time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    expected: Dict[str, Tuple[int, str]] = {}
    for candidate in plan.candidates:
        paths = [candidate.path]
        if candidate.kind == "dir":
            for directory, dirs, files in os.walk(candidate.path, followlinks=False):
                paths += [os.path.join(directory, f) for f in files]
        for path in paths:
            info = os.lstat(path)
            if stat.S_ISREG(info.st_mode):
                expected[path.lstrip("/")] = (info.st_size, sha256_path(path))
    with AtomicFile(os.path.join(archive_dir, name), 0o600) as out:
        compressor = zstandard.ZstdCompressor(level=3)
        writer = compressor.stream_writer(out, closefd=False)
        try:
            with tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                for candidate in plan.candidates:
                    tar.add(candidate.path, arcname=candidate.path.lstrip("/"), recursive=True)
            writer.flush(zstandard.FLUSH_FRAME)
        except OSError as error:
            raise environment_error(error, "cannot write the archive in %s" % archive_dir) from None
        out.commit()
    members = _verify_archive(out.path, expected)
    return out.path, sha256_path(out.path), members


def _verify_archive(path: str, expected: Dict[str, Tuple[int, str]]) -> int:
    import zstandard

    seen = {}
    with open(path, "rb") as raw:
        reader = zstandard.ZstdDecompressor().stream_reader(raw)
        with tarfile.open(fileobj=reader, mode="r|") as tar:
            count = 0
            for member in tar:
                count += 1
                if member.isreg():
                    digest = hashlib.sha256()
                    handle = tar.extractfile(member)
                    for chunk in iter(lambda: handle.read(1 << 20), b""):
                        digest.update(chunk)
                    seen[member.name] = (member.size, digest.hexdigest())
    missing = [name for name, facts in expected.items() if seen.get(name) != facts]
    if missing:
        raise VerificationFailed("the cleanup archive %s does not hold %d files as they are on disk (first: %s); "
                                 "nothing was deleted" % (path, len(missing), missing[0]))
    return count


def _unchanged(candidate: Candidate) -> bool:
    try:
        info = os.lstat(candidate.path)
    except OSError:
        return False
    if (info.st_dev, info.st_ino) != (candidate.device, candidate.inode):
        return False
    if candidate.kind == "file":
        return stat.S_ISREG(info.st_mode) and info.st_mtime == candidate.newest_mtime
    return stat.S_ISDIR(info.st_mode) and _tree(candidate.path)[1] == candidate.newest_mtime


def apply_cleanup(plan: CleanupPlan, deployment: Deployment, archive_to: Optional[str] = None) -> CleanupResult:
    result = CleanupResult(plan=plan, applied=True, free_before=_free_bytes(deployment.app_dir))
    if archive_to:
        real_archive = os.path.realpath(archive_to)
        for root in plan.roots.values():
            real_root = os.path.realpath(root)
            if real_archive == real_root or real_archive.startswith(real_root + "/"):
                raise UsageError("--archive-to %s is inside %s, which is being cleaned" % (archive_to, root))
        if plan.candidates:
            result.archive, result.archive_sha256, result.archive_members = _write_archive(plan, archive_to)
    for candidate in plan.candidates:
        if not _unchanged(candidate):
            result.not_deleted.append(Skipped(candidate.path, "changed since it was planned: left alone"))
            continue
        try:
            if candidate.kind == "dir":
                shutil.rmtree(candidate.path)
            else:
                os.unlink(candidate.path)
            result.deleted.append(candidate.path)
        except OSError as error:
            result.not_deleted.append(Skipped(candidate.path, "could not delete: %s" % error.strerror))
    result.free_after = _free_bytes(deployment.app_dir)
    return result


def dry_run(plan: CleanupPlan, deployment: Deployment) -> CleanupResult:
    free = _free_bytes(deployment.app_dir)
    return CleanupResult(plan=plan, applied=False, free_before=free, free_after=free)


def check_days(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise BadInputError("--%s must be at least 1 (day)" % name.replace("_", "-"))
