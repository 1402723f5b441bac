"""Accounts read from the passwd file ourselves, through the host filesystem object.

No name-service lookup (pwd, getpass, NSS modules): those open host files without O_NOATIME (changing
the atime we record), block on a planted FIFO, and may load modules named by the host's nsswitch.conf.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator, Optional

from toolkit.host.hostfs import HostFS

PASSWD_LIMIT = 16 << 20


@dataclass
class Account:
    name: str
    uid: int
    gid: int
    home: str
    shell: str


def accounts(fs: HostFS, path: str = "/etc/passwd") -> Iterator[Account]:
    """Every well-formed line of the passwd file (malformed ones are skipped, never echoed)."""
    text = fs.read_text(path, PASSWD_LIMIT, follow=True) or ""
    for line in text.splitlines():
        fields = line.split(":")
        if len(fields) < 7 or not fields[2].isdigit() or not fields[3].isdigit():
            continue
        yield Account(fields[0], int(fields[2]), int(fields[3]), fields[5], fields[6])


def group_ids(fs: HostFS, path: str = "/etc/group") -> Iterator[int]:
    """The gid of every well-formed line of the group file."""
    text = fs.read_text(path, PASSWD_LIMIT, follow=True) or ""
    for line in text.splitlines():
        fields = line.split(":")
        if len(fields) >= 3 and fields[2].isdigit():
            yield int(fields[2])


def user_name(uid: int, fs: Optional[HostFS] = None) -> Optional[str]:
    for account in accounts(fs or HostFS("/")):
        if account.uid == uid:
            return account.name
    return None


def login_name() -> str:
    """Who runs this (the responder on the machine we run on): the passwd name of our uid, or "uid N"."""
    return user_name(os.getuid()) or "uid %d" % os.getuid()
