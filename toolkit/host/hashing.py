"""Hashing helpers for files read from a host we do not trust."""
from __future__ import annotations

import hashlib
import os

CHUNK = 1 << 20


def sha256_path(path: str, follow_symlinks: bool = False) -> str:
    """sha256 of a file's content, read without touching its atime.

    A final symlink is refused unless follow_symlinks (needed for /proc/self/exe,
    which reaches the running binary even when it was deleted or replaced).
    """
    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
    if not follow_symlinks:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    noatime = getattr(os, "O_NOATIME", 0)
    try:
        fd = os.open(path, flags | noatime)
    except PermissionError:
        fd = os.open(path, flags)  # O_NOATIME needs ownership or CAP_FOWNER
    digest = hashlib.sha256()
    try:
        while True:
            chunk = os.read(fd, CHUNK)
            if not chunk:
                break
            digest.update(chunk)
    finally:
        os.close(fd)
    return digest.hexdigest()


def fingerprint(secret: str) -> str:
    """What reports show instead of a secret: the first 8 hex digits of its sha256."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()[:8]
