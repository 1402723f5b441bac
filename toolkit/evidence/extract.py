"""`extract`: unpack a bundle into a new directory, in one pass, keeping only what the manifest vouches for.

The payload is read once. Directories and symlinks are created as they come;
regular members are written under temporary names in a staging directory that
extract itself makes inside --to (O_CREAT|O_EXCL|O_NOFOLLOW, 0600) and hashed as
they are written. manifest.json, the last member, must match the detached
manifest's inner_manifest_sha256; every member is then checked against its
artifacts (size, sha256, symlink target, none missing, none extra). Only when all
match do the temporary files take their names (link(2) then unlink: never an
overwrite) and the inner manifest is kept as manifest.json. Otherwise everything
this run created is removed and VerificationFailed names the first problems.

An absolute symlink of the host's tree (under fs/$rootfs$/) is created relative
to that tree, as a chroot would see it (the report lists each under `rebased`;
the manifest keeps the host's target); any other absolute symlink is not created
but listed under `recorded`, without alarm (a systemd link is not an attack).
Refused (recorded in the report, the rest goes on, exit 6): absolute names, `..`,
names below a symlink or a file, symlinks that resolve outside
--to (component by component through the links extract made, and again once
every member is in place), hard links, device nodes, FIFOs, members larger than
the per-member limit (sparse or not). setuid, setgid and sticky bits are never
set; files end read-only. A bundle that needs more than the total limit stops the
extraction with nothing kept.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import posixpath
import secrets
import stat
import tarfile
import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

from toolkit.errors import EnvironmentProblem, KitError, UsageError, VerificationFailed
from toolkit.evidence.bundle import ROOTFS, iterate_members, load_manifest, locate, member_kind, open_tar_stream
from toolkit.host.atomic import PARTIAL_SUFFIX, environment_error

GiB = 1024 ** 3
DEFAULT_MAX_BYTES = 64 * GiB  # everything extract may write or read through, in total
DEFAULT_MAX_MEMBER_BYTES = 16 * GiB  # one member's size as its header declares it (sparse or not)
MANIFEST_NAME = "manifest.json"
MANIFEST_READ_LIMIT = 1 * GiB  # the inner manifest is parsed in memory
MAX_LINK_HOPS = 40  # as the kernel's ELOOP limit
CHUNK = 1 << 20
SHOWN_PROBLEMS = 5

_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_NAME_ERRNOS = (errno.ENAMETOOLONG, errno.EINVAL, getattr(errno, "EILSEQ", errno.EINVAL))


@dataclass
class ExtractReport:
    bundle: str
    target: str
    extracted: List[str] = field(default_factory=list)
    refused: List[dict] = field(default_factory=list)
    # absolute links of the host's tree (fs/$rootfs$/...) created relative to that tree: {member, target, created}
    rebased: List[dict] = field(default_factory=list)
    # absolute links elsewhere, kept as the host had them in the report only: {member, target, reason}
    recorded: List[dict] = field(default_factory=list)
    members: int = 0
    bytes_written: int = 0
    limits: Dict[str, int] = field(default_factory=dict)


@dataclass
class _Seen:
    """One member as the stream held it, kept until the inner manifest can judge it."""
    name: str
    kind: str  # file, dir, symlink, other
    size: int
    sha256: Optional[str]  # None: not read (refused over a limit)
    target: Optional[str]


class _Refused(Exception):
    """This member is not created (the reason goes into the report); extraction goes on."""


class _Recorded(_Refused):
    """A link that is what it is on the host, not an attack (an absolute target outside the host's tree:
    /etc/systemd/system/x.wants/y -> /lib/systemd/system/y): not created, listed under `recorded`, no alarm."""


def rebase_in_rootfs(relative: str, target: str) -> Optional[str]:
    """A host's absolute link (fs/$rootfs$/etc/localtime -> /usr/share/zoneinfo/UTC) as the same link relative to
    the host's tree under --to (../usr/share/zoneinfo/UTC), as a chroot sees it; None for any other link.
    `..` cannot climb above the tree's root, as in a chroot. The manifest keeps the target as the host had it."""
    parts = relative.split("/")
    if not target.startswith("/") or parts[:2] != ROOTFS.rstrip("/").split("/") or len(parts) < 3:
        return None
    inside = posixpath.normpath(target).lstrip("/")
    climb = "../" * (len(parts) - 3)
    return (climb + inside) if inside else (climb.rstrip("/") or ".")


def _safe_relative(name: str) -> str:
    if not name or name.startswith("/"):
        raise ValueError("absolute name")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise ValueError("name with ..")
    if not parts:
        raise ValueError("empty name")
    return "/".join(parts)


class _Tree:
    """What this run created under --to (relative path -> kind, link target), and how a link there resolves."""

    def __init__(self) -> None:
        self.nodes: Dict[str, Tuple[str, str]] = {}

    def kind(self, relative: str) -> Optional[str]:
        node = self.nodes.get(relative)
        return node[0] if node else None

    def blocking_parent(self, relative: str) -> Optional[str]:
        """The first parent of relative that is not (or will not be) a real directory made by extract."""
        parts = relative.split("/")[:-1]
        for index in range(1, len(parts) + 1):
            prefix = "/".join(parts[:index])
            if self.kind(prefix) in ("file", "link"):
                return prefix
        return None

    def resolve(self, parent: List[str], target: str) -> Tuple[Optional[List[str]], str]:
        """Where a link in directory parent pointing to target lands: its components under --to, or None and why.

        Component by component, as the kernel would: a link made by extract is followed (its target relative to
        the link's own directory, at most MAX_LINK_HOPS links), `..` goes up from the directory actually reached,
        and a component that does not exist (yet), or is a file, is taken lexically.
        """
        if not target:
            return None, "empty symlink target"
        if target.startswith("/"):
            return None, "absolute symlink target %s: not created" % target
        current = list(parent)
        pending = deque(target.split("/"))
        hops = 0
        while pending:
            part = pending.popleft()
            if part in ("", "."):
                continue
            if part == "..":
                if not current:
                    return None, "resolves outside the target directory"
                current.pop()
                continue
            node = self.nodes.get("/".join(current + [part]))
            if node is not None and node[0] == "link":
                hops += 1
                if hops > MAX_LINK_HOPS:
                    return None, "does not resolve within %d symlinks (a loop?)" % MAX_LINK_HOPS
                if node[1].startswith("/"):
                    return None, "resolves through %s, an absolute symlink" % "/".join(current + [part])
                pending.extendleft(reversed(node[1].split("/")))
                continue
            current.append(part)
        return current, ""


class _HashingReader(io.RawIOBase):
    """The payload file as read, hashed on the way (so the whole file can be held to the manifest's sha256)."""

    def __init__(self, raw) -> None:
        self._raw = raw
        self.digest = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, target) -> int:
        data = self._raw.read(len(target))
        if not data:
            return 0
        self.digest.update(data)
        target[:len(data)] = data
        return len(data)

    def drain(self) -> None:
        while True:
            data = self._raw.read(CHUNK)
            if not data:
                return
            self.digest.update(data)


def _stream_errors() -> Tuple[type, ...]:
    kinds: List[type] = [tarfile.TarError, EOFError, zlib.error, OSError, ValueError]
    try:
        import zstandard

        kinds.append(zstandard.ZstdError)
    except ImportError:  # pragma: no cover - zstandard is a dependency
        pass
    return tuple(kinds)


def _write_all(fd: int, data: bytes, what: str) -> None:
    view = memoryview(data)
    try:
        while len(view):
            view = view[os.write(fd, view):]
    except OSError as error:
        raise environment_error(error, "cannot write %s" % what) from None


def _fs_failure(error: OSError, what: str) -> Exception:
    """A name this filesystem cannot hold refuses the member; anything else (no space, permission) stops the run."""
    if error.errno in _NAME_ERRNOS:
        return _Refused("cannot be created here: %s" % (error.strerror or error))
    return environment_error(error, what)


def _stored_bytes(member: tarfile.TarInfo) -> int:
    """The bytes of data the member really occupies in the stream (a sparse member's data regions only)."""
    if member.sparse:
        return sum(size for _offset, size in member.sparse)
    return member.size


def _size_text(count: int) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= scale:
            return "%.1f %s" % (count / scale, unit)
    return "%d bytes" % count


class _Extraction:
    """One run's state: the tree made so far, the staging directory, what to undo if it fails."""

    def __init__(self, root: str, report: ExtractReport, max_bytes: int, max_member_bytes: int) -> None:
        self.root = root
        self.report = report
        self.max_bytes = max_bytes
        self.max_member_bytes = max_member_bytes
        self.tree = _Tree()
        self.created: List[Tuple[str, str]] = []  # (kind, relative): what to undo, in order
        self.links: List[Tuple[str, str]] = []  # (relative, member name), in creation order
        self.pending: List[Tuple[str, str, str]] = []  # (temporary, relative, member name)
        self.temporaries: Set[str] = set()
        self.seen: List[_Seen] = []
        self.charged = 0  # bytes written or read through so far (the total limit)
        self.counter = 0
        self.tar = None
        self.root_fd = os.open(root, _DIR_FLAGS)
        try:
            self.name_max = os.fpathconf(self.root_fd, "PC_NAME_MAX")
        except (OSError, ValueError):
            self.name_max = 255
        self.staging = ".bookgen-kit-extract-%s%s" % (secrets.token_hex(8), PARTIAL_SUFFIX)
        try:
            os.mkdir(self.staging, 0o700, dir_fd=self.root_fd)
            self.staging_fd = os.open(self.staging, _DIR_FLAGS, dir_fd=self.root_fd)
        except OSError as error:
            os.close(self.root_fd)
            raise environment_error(error, "cannot create a staging directory in %s" % root) from None

    # -- directories, never through a symlink ---------------------------------------------------------
    def _open_parent(self, relative: str, create: bool) -> int:
        """An fd on relative's parent directory, each component a real directory (made here when create)."""
        fd = os.dup(self.root_fd)
        parts = relative.split("/")[:-1]
        try:
            for index, part in enumerate(parts):
                prefix = "/".join(parts[:index + 1])
                if self.tree.kind(prefix) in ("file", "link"):
                    raise _Refused("a parent (%s) is not a directory inside the target" % prefix)
                try:
                    try:
                        child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                    except FileNotFoundError:
                        if not create:
                            raise
                        self._mkdir(fd, part, prefix)
                        child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except OSError as error:
                    if error.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise _Refused("a parent (%s) is not a directory inside the target" % prefix) from None
                    raise _fs_failure(error, "cannot create or open the directory %s under %s" % (
                        prefix, self.root)) from None
                os.close(fd)
                fd = child
            return fd
        except BaseException:
            os.close(fd)
            raise

    def _mkdir(self, parent_fd: int, leaf: str, relative: str) -> None:
        os.mkdir(leaf, 0o755, dir_fd=parent_fd)
        self.tree.nodes[relative] = ("dir", "")
        self.created.append(("dir", relative))

    # -- members as they come -------------------------------------------------------------------------
    def directory(self, member: tarfile.TarInfo, relative: str) -> None:
        kind = self.tree.kind(relative)
        if kind == "dir":
            return  # the same directory again: nothing to do
        if kind is not None:
            raise _Refused("already exists: never overwritten")
        if self.tree.blocking_parent(relative):
            raise _Refused("a parent (%s) is not a directory inside the target" % self.tree.blocking_parent(relative))
        fd = self._open_parent(relative, create=True)
        try:
            self._mkdir(fd, relative.split("/")[-1], relative)
        except OSError as error:
            raise _fs_failure(error, "cannot create the directory %s under %s" % (relative, self.root)) from None
        finally:
            os.close(fd)

    def symlink(self, member: tarfile.TarInfo, relative: str) -> None:
        if self.tree.kind(relative) is not None:
            raise _Refused("already exists: never overwritten")
        blocking = self.tree.blocking_parent(relative)
        if blocking:
            raise _Refused("a parent (%s) is not a directory inside the target" % blocking)
        target = member.linkname
        rebased = rebase_in_rootfs(relative, target)
        if rebased is not None:
            target = rebased
        elif target.startswith("/"):
            raise _Recorded("absolute link to %s: recorded, not created (it would point out of --to)" % target)
        resolved, why = self.tree.resolve(relative.split("/")[:-1], target)
        if resolved is None:
            raise _Refused("symlink to %s: %s" % (member.linkname, why))
        fd = self._open_parent(relative, create=True)
        try:
            os.symlink(target, relative.split("/")[-1], dir_fd=fd)
        except OSError as error:
            raise _fs_failure(error, "cannot create the symlink %s under %s" % (relative, self.root)) from None
        finally:
            os.close(fd)
        self.tree.nodes[relative] = ("link", target)
        if rebased is not None:
            self.report.rebased.append({"member": member.name, "target": member.linkname, "created": rebased})
        self.created.append(("link", relative))
        self.links.append((relative, member.name))

    def regular(self, member: tarfile.TarInfo, relative: str) -> Tuple[str, str]:
        """Written under a temporary name (its real name is reserved in the tree); (temporary, sha256)."""
        if self.tree.kind(relative) is not None:
            raise _Refused("already exists: never overwritten")
        blocking = self.tree.blocking_parent(relative)
        if blocking:
            raise _Refused("a parent (%s) is not a directory inside the target" % blocking)
        self.check_member_limit(member)
        fd = self._open_parent(relative, create=True)  # the directories take their shape now
        os.close(fd)
        self.charge(member, member.size)
        self.tree.nodes[relative] = ("file", "")
        temporary, digest, _data = self.write_temporary(member, keep=False)
        self.pending.append((temporary, relative, member.name))
        return temporary, digest

    def check_member_limit(self, member: tarfile.TarInfo) -> None:
        if member.size > self.max_member_bytes:
            raise _Refused("%s%s, over the per-member limit of %s: not written" % (
                "sparse, " if member.sparse else "", _size_text(member.size), _size_text(self.max_member_bytes)))

    def charge(self, member: tarfile.TarInfo, count: int) -> None:
        """Count bytes against the total limit before they are written (or read through); stop when over it."""
        if self.charged + count > self.max_bytes:
            raise EnvironmentProblem(
                "member %s (%s) would take the extraction past --max-bytes %s: stopped, nothing was kept" % (
                    member.name, _size_text(count), _size_text(self.max_bytes)),
                hint="if this bundle is trusted and the disk has room, raise --max-bytes")
        self.charged += count

    def write_temporary(self, member: tarfile.TarInfo, keep: bool) -> Tuple[str, str, Optional[bytes]]:
        self.counter += 1
        temporary = "%08d" % self.counter
        try:
            fd = os.open(temporary, _NEW_FILE_FLAGS, 0o600, dir_fd=self.staging_fd)
        except OSError as error:
            raise environment_error(error, "cannot create a temporary file in %s" % self.staging) from None
        self.temporaries.add(temporary)
        kept = bytearray() if keep else None
        try:
            digest, written = self._copy(member, fd, kept)
            mode = stat.S_IMODE(member.mode) & 0o555  # read-only; never setuid/setgid/sticky
            try:
                os.fchmod(fd, mode or 0o444)
                os.fsync(fd)
            except OSError as error:
                raise environment_error(error, "cannot finish %s" % member.name) from None
            try:
                os.utime(fd, (member.mtime, member.mtime))
            except (OSError, OverflowError, ValueError, TypeError):
                pass  # an absurd mtime is not worth refusing the member for
        finally:
            os.close(fd)
        self.report.bytes_written += written
        return temporary, digest, bytes(kept) if kept is not None else None

    def _copy(self, member: tarfile.TarInfo, fd: Optional[int], kept: Optional[bytearray]) -> Tuple[str, int]:
        """Stream the member's data (to fd when given), hashed; never more than its header declared."""
        digest = hashlib.sha256()
        written = 0
        handle = self.tar.extractfile(member)
        while True:
            chunk = handle.read(CHUNK)
            if not chunk:
                break
            written += len(chunk)
            if written > member.size or written > self.max_member_bytes:
                raise VerificationFailed("member %s yields more data than its header declares: stopped"
                                         % member.name)
            digest.update(chunk)
            if kept is not None:
                kept += chunk
            if fd is not None:
                _write_all(fd, chunk, member.name)
        if written != member.size:
            raise VerificationFailed("member %s ends after %d of its %d bytes" % (member.name, written, member.size))
        return digest.hexdigest(), written

    def read_through(self, member: tarfile.TarInfo) -> Optional[str]:
        """A refused regular member: hashed when within the per-member limit, else skipped unread."""
        if not member.isreg():
            return None
        self.charge(member, _stored_bytes(member))
        if member.size > self.max_member_bytes:
            return None  # the stream skips its stored data when the next header is read
        digest, _written = self._copy(member, None, None)
        return digest

    # -- the end: commit, re-check, or undo -------------------------------------------------------------
    def commit(self) -> None:
        """Every temporary file takes its name (link(2), which never overwrites, then unlink)."""
        for temporary, relative, name in self.pending:
            fd = self._open_parent(relative, create=False)
            try:
                os.link(temporary, relative.split("/")[-1], src_dir_fd=self.staging_fd, dst_dir_fd=fd,
                        follow_symlinks=False)
                self.created.append(("file", relative))
                os.unlink(temporary, dir_fd=self.staging_fd)
                self.temporaries.discard(temporary)
            except OSError as error:
                raise environment_error(error, "cannot give %s its name" % name) from None
            finally:
                os.close(fd)
            self.report.extracted.append(name)
        self.pending = []
        self._remove_staging()
        try:
            os.fsync(self.root_fd)
        except OSError:
            pass

    def recheck_links(self) -> None:
        """With every member in place, each link again: a later link may have changed what an earlier one means."""
        changed = True
        while changed:
            changed = False
            for relative, name in list(self.links):
                target = self.tree.nodes[relative][1]
                resolved, why = self.tree.resolve(relative.split("/")[:-1], target)
                if resolved is not None:
                    real = os.path.realpath(os.path.join(self.root, relative))
                    if not (real == self.root or real.startswith(self.root.rstrip("/") + "/")):
                        resolved, why = None, "resolves to %s, outside the target directory" % real
                if resolved is not None:
                    continue
                fd = self._open_parent(relative, create=False)
                try:
                    os.unlink(relative.split("/")[-1], dir_fd=fd)
                finally:
                    os.close(fd)
                del self.tree.nodes[relative]
                self.links.remove((relative, name))
                if name in self.report.extracted:
                    self.report.extracted.remove(name)
                self.report.refused.append({"member": name, "reason": "symlink to %s: %s once every member is in "
                                                                      "place: removed" % (target, why)})
                changed = True

    def _remove_staging(self) -> None:
        for temporary in sorted(self.temporaries):
            try:
                os.unlink(temporary, dir_fd=self.staging_fd)
            except OSError:
                pass
        self.temporaries.clear()
        try:
            os.close(self.staging_fd)
        except OSError:
            pass
        self.staging_fd = -1
        try:
            os.rmdir(self.staging, dir_fd=self.root_fd)
        except OSError:
            pass

    def undo(self) -> None:
        """Remove everything this run created (best effort): temporaries, then files, links, directories."""
        if self.staging_fd >= 0:
            self._remove_staging()
        for kind, relative in reversed(self.created):
            try:
                fd = self._open_parent(relative, create=False)
            except Exception:  # already gone, or not a directory: nothing of ours to remove there
                continue
            try:
                if kind == "dir":
                    os.rmdir(relative.split("/")[-1], dir_fd=fd)
                else:
                    os.unlink(relative.split("/")[-1], dir_fd=fd)
            except OSError:
                pass
            finally:
                os.close(fd)
        self.created = []
        self.report.extracted = []

    def close(self) -> None:
        for fd in (self.staging_fd, self.root_fd):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.staging_fd = self.root_fd = -1




def _member_entries(artifacts: Any, origin: str) -> Dict[str, List[Dict[str, Any]]]:
    """Manifest entries that have a member of their own, by path (a path may repeat: matched in order)."""
    if not isinstance(artifacts, list):
        raise VerificationFailed("the %s has no list of artifacts: nothing to check the members against" % origin)
    entries: Dict[str, List[Dict[str, Any]]] = {}
    for entry in artifacts:
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise VerificationFailed("the %s has a malformed artifact entry" % origin)
        if entry.get("type") == "reference":
            continue  # refers to another member's content; no member of its own
        entries.setdefault(entry["path"], []).append(entry)
    return entries


def _judge(seen: Sequence[_Seen], artifacts: Any, origin: str) -> List[str]:
    """Every member against the artifacts: present, same type, size, sha256, symlink target; none missing."""
    entries = _member_entries(artifacts, origin)
    used: Dict[str, int] = {}
    problems: List[str] = []
    for item in seen:
        index = used.get(item.name, 0)
        used[item.name] = index + 1
        candidates = entries.get(item.name, [])
        if index >= len(candidates):
            problems.append("member %s is not in the %s" % (item.name, origin) if not candidates else
                            "member %s appears more often than the %s lists it" % (item.name, origin))
            continue
        entry = candidates[index]
        declared = entry.get("type")
        if item.kind == "file":
            if declared in ("dir", "symlink") or "sha256" not in entry:
                problems.append("member %s is a regular file, the %s says %s" % (item.name, origin, declared))
            elif item.size != entry.get("size"):
                problems.append("member %s: %d bytes, the %s says %s" % (item.name, item.size, origin,
                                                                         entry.get("size")))
            elif item.sha256 is not None and item.sha256 != entry.get("sha256"):
                problems.append("member %s: sha256 %s, the %s says %s" % (item.name, item.sha256, origin,
                                                                          entry.get("sha256")))
        elif item.kind == "symlink":
            if declared in ("file", "generated", "dir") or item.target != entry.get("target"):
                problems.append("symlink %s points to %s, the %s says %s" % (item.name, item.target, origin,
                                                                            entry.get("target", declared)))
        elif declared in ("file", "generated", "symlink", "dir") and declared != item.kind:
            problems.append("member %s is a %s, the %s says %s" % (item.name, item.kind, origin, declared))
    missing = sorted(path for path, listed in entries.items() if used.get(path, 0) < len(listed))
    if missing:
        problems.append("%d entries of the %s have no member (first: %s)" % (len(missing), origin, missing[0]))
    return problems


def extract_bundle(path: str, identities: Sequence[Any], target: str, max_bytes: int = DEFAULT_MAX_BYTES,
                   max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> ExtractReport:
    """Extract the bundle at path into target (new or empty); the report lists what was extracted and refused.

    Raises VerificationFailed (a member, the inner manifest or the payload does not match), EnvironmentProblem
    (no space, permission, or the bundle needs more than max_bytes), with nothing of this run left behind.
    """
    if max_bytes <= 0 or max_member_bytes <= 0:
        raise UsageError("the extraction limits must be positive")
    paths = locate(path)
    if not os.path.exists(paths.payload):
        raise VerificationFailed("the bundle is incomplete (only %s exists): nothing to extract" % paths.partial)
    manifest = load_manifest(paths)
    if not isinstance(manifest, dict):
        raise VerificationFailed("manifest %s is not a JSON object" % paths.manifest)
    inner_sha256 = manifest.get("inner_manifest_sha256")
    if not isinstance(inner_sha256, str):
        raise VerificationFailed("the detached manifest records no inner_manifest_sha256: nothing to verify against")
    payload_info = manifest.get("payload") if isinstance(manifest.get("payload"), dict) else {}
    if os.path.lexists(target) and (not os.path.isdir(target) or os.listdir(target)):
        raise UsageError("--to %s exists and is not an empty directory: extract never overwrites" % target)
    made_target = not os.path.lexists(target)
    try:
        os.makedirs(target, mode=0o755, exist_ok=True)
    except OSError as error:
        raise environment_error(error, "cannot create %s" % target) from None
    root = os.path.realpath(target)
    report = ExtractReport(bundle=paths.payload, target=root,
                           limits={"max_bytes": max_bytes, "max_member_bytes": max_member_bytes})
    try:
        run = _Extraction(root, report, max_bytes, max_member_bytes)
    except BaseException:
        if made_target:
            _remove_empty(root)
        raise
    try:
        _extract(run, paths, manifest, identities, inner_sha256, payload_info)
    except KitError:
        run.undo()
        run.close()
        if made_target:
            _remove_empty(root)
        raise
    except _stream_errors() as error:
        run.undo()
        run.close()
        if made_target:
            _remove_empty(root)
        raise VerificationFailed("the payload stream is damaged after %d members (%s): nothing was kept" % (
            report.members, error)) from None
    except BaseException:
        run.undo()
        run.close()
        if made_target:
            _remove_empty(root)
        raise
    run.close()
    return report


def _remove_empty(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass


def _extract(run: _Extraction, paths, manifest: Dict[str, Any], identities: Sequence[Any], inner_sha256: str,
             payload_info: Dict[str, Any]) -> None:
    report = run.report
    inner: Optional[Dict[str, Any]] = None
    manifest_temporary: Optional[str] = None
    with open(paths.payload, "rb") as raw:
        hashing = _HashingReader(raw)
        source = io.BufferedReader(hashing, buffer_size=CHUNK)
        run.tar = open_tar_stream(source, payload_info.get("compression", paths.compression), paths.encrypted,
                                  identities)
        for member in iterate_members(run.tar):
            report.members += 1
            if inner is not None:
                raise VerificationFailed("member %s follows %s, which must be the last member" % (
                    member.name, MANIFEST_NAME))
            try:
                relative = _safe_relative(member.name)
            except ValueError:
                relative = None
            if relative == MANIFEST_NAME:
                inner, manifest_temporary = _inner_manifest(run, member, inner_sha256)
                continue
            item = _Seen(member.name, member_kind(member), member.size if member.isreg() else 0, None,
                         member.linkname if member.issym() else None)
            run.seen.append(item)
            try:
                item.sha256 = _one_member(run, member, relative)
            except _Recorded as why:
                report.recorded.append({"member": member.name, "target": member.linkname, "reason": str(why)})
                item.sha256 = run.read_through(member)
            except _Refused as why:
                report.refused.append({"member": member.name, "reason": str(why)})
                item.sha256 = run.read_through(member)  # keeps the stream aligned, and checkable
        hashing.drain()  # the whole file, for the manifest's payload sha256
    if inner is None:
        raise VerificationFailed("the payload ends without %s (its last member): nothing can be verified, "
                                 "nothing was kept" % MANIFEST_NAME)
    problems = _judge(run.seen, inner.get("artifacts"), "inner manifest")
    if isinstance(manifest.get("artifacts"), list):  # schema 1: the detached manifest lists them too
        problems += _judge(run.seen, manifest["artifacts"], "detached manifest")
    actual = hashing.digest.hexdigest()
    if actual != payload_info.get("sha256"):
        problems.append("payload sha256 %s, the detached manifest says %s" % (actual, payload_info.get("sha256")))
    if problems:
        raise VerificationFailed("%d problem%s, nothing was kept: %s%s" % (
            len(problems), "" if len(problems) == 1 else "s", "; ".join(problems[:SHOWN_PROBLEMS]),
            "; ..." if len(problems) > SHOWN_PROBLEMS else ""))
    run.pending.append((manifest_temporary, MANIFEST_NAME, MANIFEST_NAME))
    run.commit()
    run.recheck_links()


def _one_member(run: _Extraction, member: tarfile.TarInfo, relative: Optional[str]) -> Optional[str]:
    """Create one member (or raise _Refused); the sha256 of a regular member's data."""
    report = run.report
    if relative is None:
        try:
            _safe_relative(member.name)
        except ValueError as why:
            raise _Refused("unsafe name (%s)" % why) from None
    if relative.split("/")[0] == run.staging:
        raise _Refused("collides with extract's staging directory")
    if member.ischr() or member.isblk() or member.isfifo():
        raise _Refused("device or FIFO: not created")
    if member.islnk():
        raise _Refused("hard link: not created")
    too_long = [part for part in relative.split("/") if len(os.fsencode(part)) > run.name_max]
    if too_long:
        raise _Refused("a name longer than this filesystem allows (%d bytes)" % run.name_max)
    special = bool(member.mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX))
    digest = None
    if member.isdir():
        run.directory(member, relative)
        report.extracted.append(member.name)
    elif member.issym():
        run.symlink(member, relative)
        report.extracted.append(member.name)
        special = False  # a symlink has no mode of its own
    elif member.isreg():
        _temporary, digest = run.regular(member, relative)  # report.extracted gets it at commit
    else:
        raise _Refused("unsupported member type")
    if special:
        report.refused.append({"member": member.name, "reason": "setuid/setgid/sticky bits not set"})
    return digest


def _inner_manifest(run: _Extraction, member: tarfile.TarInfo, inner_sha256: str) -> Tuple[Dict[str, Any], str]:
    """The last member: it must be the manifest the detached one records; kept to be written as manifest.json."""
    if not member.isreg():
        raise VerificationFailed("%s in the payload is not a regular file" % MANIFEST_NAME)
    limit = min(run.max_member_bytes, MANIFEST_READ_LIMIT)
    if member.size > limit:
        raise VerificationFailed("%s in the payload is %s, more than extract reads (%s)" % (
            MANIFEST_NAME, _size_text(member.size), _size_text(limit)))
    if run.tree.kind(MANIFEST_NAME) is not None:
        raise VerificationFailed("an earlier member already took the name %s" % MANIFEST_NAME)
    run.charge(member, member.size)
    temporary, digest, data = run.write_temporary(member, keep=True)
    if digest != inner_sha256:
        raise VerificationFailed("%s in the payload (sha256 %s) is not the one the detached manifest records "
                                 "(inner_manifest_sha256 %s): nothing was kept" % (MANIFEST_NAME, digest,
                                                                                    inner_sha256))
    try:
        inner = json.loads(data or b"")
    except ValueError:
        raise VerificationFailed("%s in the payload is not valid JSON" % MANIFEST_NAME) from None
    if not isinstance(inner, dict):
        raise VerificationFailed("%s in the payload is not a JSON object" % MANIFEST_NAME)
    run.tree.nodes[MANIFEST_NAME] = ("file", "")
    return inner, temporary
