"""Outputs that never look complete unless they are: NAME.partial, fsync, rename, fsync the directory."""
from __future__ import annotations

import errno
import os
from typing import BinaryIO, Optional

from toolkit.errors import BadInputError, EnvironmentProblem

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

    def __init__(self, path: str, mode: int = 0o644, overwrite: bool = False) -> None:
        self.path = os.path.abspath(path)
        self.partial = self.path + PARTIAL_SUFFIX
        self.mode = mode
        self.overwrite = overwrite
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
        os.fchmod(fd, self.mode)  # whatever the umask
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
