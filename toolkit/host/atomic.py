"""Outputs that never look complete unless they are: NAME.partial, fsync, rename, fsync the directory.

And state that root writes on the host (the case pointer and journal, the rotation journal and its .env
copies, hardening undo bundles), checked as OpenSSH's StrictModes checks ~/.ssh: see "State files" below.
"""
from __future__ import annotations

import errno
import os
import stat
from typing import BinaryIO, Optional, Tuple

from toolkit.errors import BadInputError, EnvironmentProblem
from toolkit.host.hostfs import kind_of

PARTIAL_SUFFIX = ".partial"


def fsync_directory(path: str) -> None:
    fd = os.open(path or ".", os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def environment_error(error: OSError, what: str) -> EnvironmentProblem:
    """A KitError for an OSError on output: no space, permission, read-only filesystem."""
    reasons = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
               errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
               errno.EROFS: "read-only filesystem"}
    reason = reasons.get(error.errno, error.strerror or str(error))
    return EnvironmentProblem("%s: %s" % (what, reason))


class AtomicFile:
    """A file written as PATH.partial and renamed to PATH only by commit().

    Refuses to overwrite PATH (or a leftover PATH.partial) unless overwrite=True.
    Leaving the context without commit() removes the partial file.
    """

    def __init__(self, path: str, mode: int = 0o644, overwrite: bool = False, partial: Optional[str] = None,
                 owner: Optional[Tuple[int, int]] = None) -> None:
        self.path = os.path.abspath(path)
        self.partial = os.path.abspath(partial) if partial else self.path + PARTIAL_SUFFIX
        self.mode = mode
        self.overwrite = overwrite
        self.owner = owner  # (uid, gid) given to the file before it is renamed into place
        self.file: Optional[BinaryIO] = None
        self.committed = False

    def __enter__(self) -> "AtomicFile":
        if not self.overwrite and os.path.lexists(self.path):
            raise BadInputError("%s already exists" % self.path, hint="choose another name or remove it first")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        if self.overwrite and os.path.lexists(self.partial):
            os.unlink(self.partial)
        try:
            fd = os.open(self.partial, flags, self.mode)
        except FileExistsError:
            raise BadInputError("%s exists (left by an interrupted run?)" % self.partial,
                                hint="inspect and remove it, then run again") from None
        except OSError as error:
            raise environment_error(error, "cannot create %s" % self.partial) from None
        try:
            if self.owner is not None:
                os.fchown(fd, self.owner[0], self.owner[1])
            os.fchmod(fd, self.mode)  # whatever the umask
        except OSError as error:
            os.close(fd)
            os.unlink(self.partial)
            raise environment_error(error, "cannot set the owner and mode of %s" % self.partial) from None
        self.file = os.fdopen(fd, "wb", buffering=0)  # callers write large blocks; no extra copy
        return self

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        try:
            while len(view):  # an unbuffered write may be partial
                view = view[self.file.write(view):]
        except OSError as error:
            raise environment_error(error, "cannot write %s" % self.partial) from None
        return len(data)

    def commit(self) -> None:
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.partial, self.path)
            fsync_directory(os.path.dirname(self.path))
        except OSError as error:
            raise environment_error(error, "cannot finish %s" % self.path) from None
        self.committed = True

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.committed:
            return
        try:
            if self.file is not None and not self.file.closed:
                self.file.close()
        except OSError:
            pass
        try:
            os.unlink(self.partial)
        except OSError:
            pass


# --------------------------------------------------------------------------- state files
# What bookgen-kit writes on the host as its own state (the case pointer and journal, the rotation journal and
# the .env copies beside the .env, hardening undo bundles) is written by root. Whoever can write a directory on
# the way to such a file can swap in a symlink or a hard link and make root write, append to or chmod a file of
# their choosing (DESIGN.md principle 9). So, as OpenSSH's StrictModes checks ~/.ssh:
#   - the state directory itself is a real directory (never a symlink), owned by root or by us, and writable by
#     its owner only (a root-owned sticky directory such as /tmp is no exception for it);
#   - every ancestor up to / is a real directory too (no symlink in any component: whoever shaped the host may
#     have had root, so a link's owner proves nothing), owned by root or by us and writable by its owner only,
#     unless it is root-owned and sticky (/tmp);
#   - a state file is opened with O_NOFOLLOW every time (writes, appends, reads, and fchmod on that descriptor:
#     never chmod by path), and an existing one must be a regular file with a single link;
#   - a missing state directory is made with mkdir(0700) and examined (lstat) afterwards: a directory of ours.
# A refusal is an EnvironmentProblem (exit 4), not a BadInputError (exit 3): nothing the user gave us is
# malformed; the host's filesystem is in a state we will not write through, and the fix is to the host (remove
# the link, chmod go-w, chown), as with any other permission problem.
#
# This is for state only. Evidence, backups and reports go where the responder says (a FAT medium has 0777
# directories and no symlinks at all): those use AtomicFile directly.

STATE_READ_LIMIT = 64 * 1024 * 1024
_OPEN_FLAGS = (getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
               | getattr(os, "O_NOCTTY", 0))
_WHY_LINK = "a planted link would make root write elsewhere"
_HINT_LINK = "give the real path, or remove the link (where it points is evidence: note it first)"
_HINT_WRITABLE = ("make it writable by its owner only (chmod go-w, after finding out who changed it; a FAT medium: "
                  "mount it with umask=077), or keep bookgen-kit's state elsewhere")
_HINT_OWNER = "chown it to root (after finding out why it is not), or keep bookgen-kit's state elsewhere"


class UnsafeStatePath(EnvironmentProblem):
    """A state file or directory that root will not write through: named, with the reason (exit 4)."""

    def __init__(self, path: str, reason: str, hint: Optional[str] = None) -> None:
        super().__init__("refusing %s: %s" % (printable(path), reason), hint=hint)
        self.path = path
        self.reason = reason


def printable(path: str) -> str:
    """A path on one line: characters that are not printable (newlines planted in a name) escaped."""
    if path.isprintable():
        return path
    return "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode("ascii")
                   for c in path)




def _trusted(uid: int) -> bool:
    return uid == 0 or uid == os.geteuid()


def _check_directory(path: str, info: os.stat_result, own: bool) -> None:
    """own: the directory the state lives in (no sticky exception); else an ancestor of it."""
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafeStatePath(path, "it is not a directory (a %s)" % kind_of(info.st_mode))
    if not _trusted(info.st_uid):
        raise UnsafeStatePath(path, "it is owned by uid %d, neither root nor us (its owner could plant a link for "
                                    "root to follow)" % info.st_uid, hint=_HINT_OWNER)
    if info.st_mode & 0o022:
        if own or info.st_uid != 0 or not info.st_mode & stat.S_ISVTX:
            raise UnsafeStatePath(path, "it is writable by group or others (mode %04o: whoever can write there can "
                                        "plant a link for root to follow)" % (info.st_mode & 0o7777),
                                  hint=_HINT_WRITABLE)


def _check_file(path: str, info: os.stat_result) -> None:
    if stat.S_ISLNK(info.st_mode):
        raise UnsafeStatePath(path, "it is a symlink (%s)" % _WHY_LINK, hint=_HINT_LINK)
    if not stat.S_ISREG(info.st_mode):
        raise UnsafeStatePath(path, "it is not a regular file (a %s)" % kind_of(info.st_mode), hint="remove it")
    if info.st_nlink > 1:
        raise UnsafeStatePath(path, "it has %d hard links (a planted link would make root write to another file)"
                              % info.st_nlink, hint="remove this name (the file stays under its other names)")


def _open_nofollow(path: str, flags: int, mode: int = 0o600) -> int:
    try:
        return os.open(path, flags | _OPEN_FLAGS, mode)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise UnsafeStatePath(path, "it is a symlink (%s)" % _WHY_LINK, hint=_HINT_LINK) from None
        if error.errno == errno.ENXIO:  # a FIFO with no reader, a socket
            raise UnsafeStatePath(path, "it is not a regular file", hint="remove it") from None
        raise environment_error(error, "cannot open %s" % printable(path)) from None


def _new_directory(path: str, mode: int) -> os.stat_result:
    """mkdir, then make sure what is there now is a directory of ours, with exactly `mode`."""
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        return os.lstat(path)  # made meanwhile by root or us (nobody else can write the parent): examined as found
    except OSError as error:
        raise environment_error(error, "cannot create %s" % printable(path)) from None
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise UnsafeStatePath(path, "after mkdir it is not a directory of ours (a %s owned by uid %d)"
                              % (kind_of(info.st_mode), info.st_uid))
    fd = _open_nofollow(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fchmod(fd, mode)  # exactly `mode`, whatever the umask
        return os.fstat(fd)
    finally:
        os.close(fd)


def state_dir(directory: str, create: bool = False, mode: int = 0o700) -> str:
    """DIRECTORY as an absolute path, once it and every ancestor up to / pass the checks above.

    No component may be a symlink: whoever shaped the host may have had root, so a link's owner proves nothing
    (DESIGN.md principle 9: no symlink in any component); give the real path. With create=True, missing
    components are made with mkdir(mode) and examined. Raises UnsafeStatePath (exit 4) naming the first
    component that fails, or EnvironmentProblem when one is missing.
    """
    path = os.path.abspath(directory)
    names = [name for name in path.split("/") if name]
    try:
        _check_directory("/", os.lstat("/"), own=not names)
    except OSError as error:
        raise environment_error(error, "cannot examine /") from None
    current = "/"
    for index, name in enumerate(names):
        own = index == len(names) - 1
        current = os.path.join(current, name)
        try:
            info = os.lstat(current)
        except FileNotFoundError:
            if not create:
                raise EnvironmentProblem("%s does not exist" % printable(current)) from None
            info = _new_directory(current, mode)
        except OSError as error:
            raise environment_error(error, "cannot examine %s" % printable(current)) from None
        if stat.S_ISLNK(info.st_mode):
            raise UnsafeStatePath(current, "it is a symlink (%s)" % _WHY_LINK, hint=_HINT_LINK)
        _check_directory(current, info, own)
    return path


def check_state_file(path: str) -> Optional[os.stat_result]:
    """lstat of an existing state file that passes (regular, one link), None when there is none."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as error:
        raise environment_error(error, "cannot examine %s" % printable(path)) from None
    _check_file(path, info)
    return info


def check_state_path(path: str, create_dir: bool = False) -> str:
    """The absolute path, once its directory (state_dir) and the file, if it exists, pass: a preflight."""
    path = os.path.abspath(path)
    state_dir(os.path.dirname(path), create=create_dir)
    check_state_file(path)
    return path


def make_state_dir(path: str, mode: int = 0o700) -> str:
    """mkdir PATH (FileExistsError when something is there: choose another name) in a checked parent."""
    path = os.path.abspath(path)
    state_dir(os.path.dirname(path))
    os.mkdir(path, mode)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise UnsafeStatePath(path, "after mkdir it is not a directory of ours (a %s owned by uid %d)"
                              % (kind_of(info.st_mode), info.st_uid))
    chmod_state(path, mode)
    return path


def write_state(path: str, data: bytes, mode: int = 0o600, owner: Optional[Tuple[int, int]] = None,
                create_dir: bool = False) -> str:
    """Replace a state file atomically (AtomicFile, a partial name of its own: writers never share one)."""
    path = check_state_path(path, create_dir)
    partial = "%s.%d-%s%s" % (path, os.getpid(), os.urandom(4).hex(), PARTIAL_SUFFIX)
    with AtomicFile(path, mode, overwrite=True, partial=partial, owner=owner) as out:
        out.write(data)
        out.commit()
    return path


def append_state(path: str, data: bytes, mode: int = 0o644, create_dir: bool = False) -> str:
    """Append to a state file (O_APPEND, created with `mode` if missing), then fsync."""
    path = check_state_path(path, create_dir)
    fd = _open_nofollow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, mode)
    try:
        _check_file(path, os.fstat(fd))  # what was opened, not what was examined before
        view = memoryview(data).cast("B")
        while len(view):
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except OSError as error:
        raise environment_error(error, "cannot append to %s" % printable(path)) from None
    finally:
        os.close(fd)
    return path


def read_state(path: str, limit: int = STATE_READ_LIMIT, strict: bool = False) -> Optional[bytes]:
    """A state file's bytes (None when there is none), never through a symlink, never a FIFO or device.

    strict=True also checks its directory and its links, as for a write: for state whose content decides what
    root does next (the new values of a rotation).
    """
    path = os.path.abspath(path)
    if not os.path.lexists(path):
        return None
    if strict:
        check_state_path(path)
    fd = _open_nofollow(path, os.O_RDONLY)
    try:
        info = os.fstat(fd)
        if strict:
            _check_file(path, info)
        elif not stat.S_ISREG(info.st_mode):
            raise UnsafeStatePath(path, "it is not a regular file (a %s)" % kind_of(info.st_mode), hint="remove it")
        chunks, size = [], 0
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            size += len(chunk)
            if size > limit:
                raise BadInputError("%s is larger than %d bytes: not a file bookgen-kit wrote" % (
                    printable(path), limit))
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as error:
        raise environment_error(error, "cannot read %s" % printable(path)) from None
    finally:
        os.close(fd)


def chmod_state(path: str, mode: int) -> None:
    """fchmod on a descriptor opened with O_NOFOLLOW (a state file or directory, checked as above)."""
    path = os.path.abspath(path)
    state_dir(os.path.dirname(path))
    fd = _open_nofollow(path, os.O_RDONLY)
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            _check_directory(path, info, own=True)
        else:
            _check_file(path, info)
        os.fchmod(fd, mode)
    except OSError as error:
        raise environment_error(error, "cannot change the mode of %s" % printable(path)) from None
    finally:
        os.close(fd)
