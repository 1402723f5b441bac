"""The hardening check interface: id, title, why, weight; check() with its evidence, plan() with exact changes.

Checks read (and later write) through a root prefix, so they audit a mounted image
or a test tree as well as the live host.
"""
from __future__ import annotations

import difflib
import fnmatch
import os
import posixpath
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from toolkit.host.hostfs import HostFS, Refused

PASS, FAIL, NOT_APPLICABLE = "pass", "fail", "not applicable"
CONFIG_READ_LIMIT = 4 << 20


@dataclass
class HardenContext:
    root: str
    deployment: Any
    allowed_ports: List[int] = field(default_factory=lambda: [22, 80, 443])
    packages_dir: Optional[str] = None  # Debian .deb files carried on the medium

    def __post_init__(self) -> None:
        # What a service would read: symlinks resolved, but only inside the root; FIFOs, devices and
        # oversized files refused (toolkit.host.hostfs, DESIGN.md principle 9).
        self.fs = HostFS(self.root or "/", resolve_links=True)

    def path(self, logical: str) -> str:
        """The on-disk path of a logical one (for writes by apply/rollback and for messages)."""
        if self.root in ("", "/"):
            return logical
        return os.path.join(self.root, logical.lstrip("/"))

    def read(self, logical: str) -> Optional[str]:
        return self.fs.read_text(logical, CONFIG_READ_LIMIT, follow=True)

    def exists(self, logical: str) -> bool:
        return self.fs.lexists(logical)

    def lstat(self, logical: str) -> Optional[os.stat_result]:
        try:
            return self.fs.lstat(logical)
        except (OSError, Refused):
            return None

    def glob(self, directory: str, pattern: str) -> List[str]:
        """Logical paths of the names in directory matching a shell pattern, sorted."""
        try:
            names = self.fs.listdir(directory)
        except (OSError, Refused):
            return []
        return [posixpath.join(directory, name) for name in names if fnmatch.fnmatchcase(name, pattern)]

    @property
    def live(self) -> bool:
        return self.root in ("", "/")

    @property
    def docker_present(self) -> bool:
        return any(self.exists(p) for p in ("/usr/bin/dockerd", "/usr/sbin/dockerd", "/var/run/docker.sock",
                                            "/etc/docker"))


@dataclass
class Finding:
    """One failing item, with what was seen and where (file:line, a command's output, a value)."""
    item: str
    evidence: str


@dataclass
class CheckResult:
    id: str
    title: str
    why: str
    weight: int
    status: str
    findings: List[Finding] = field(default_factory=list)
    seen: List[str] = field(default_factory=list)  # what was looked at when it passes


@dataclass
class Change:
    """An exact change apply would make: a file's new content (shown as a diff) or a command."""
    kind: str  # "file" (new content), "mode" (permissions, owner), "package" or "command"
    description: str
    path: Optional[str] = None
    before: Optional[str] = None
    after: Optional[str] = None
    mode: Optional[int] = None
    argv: Optional[List[str]] = None
    touches: List[str] = field(default_factory=list)  # files a command changes (kept in the undo bundle)
    owner: Optional[tuple] = None  # ("user", "group") for kind "mode"
    package: Optional[str] = None  # for kind "package": the Debian package to install from --packages DIR

    def diff(self) -> str:
        if self.kind == "package":
            return "$ dpkg -i <--packages DIR>/%s_*.deb   (offline: never from a network)" % self.package
        if self.kind == "mode":
            return "chmod %04o %s%s" % (self.mode, self.path, "; chown %s:%s %s" % (self.owner + (self.path,))
                                        if self.owner else "")
        if self.kind != "file":
            return "$ " + " ".join(self.argv or [])
        return "".join(difflib.unified_diff((self.before or "").splitlines(True), (self.after or "").splitlines(True),
                                            fromfile="a" + (self.path or ""), tofile="b" + (self.path or "")))

    def to_dict(self) -> Dict[str, Any]:
        return {"kind": self.kind, "description": self.description, "path": self.path, "argv": self.argv,
                "mode": "%04o" % self.mode if self.mode is not None else None, "diff": self.diff()}


class Check:
    id = "?"
    title = "?"
    why = ""
    weight = 1

    def check(self, ctx: HardenContext) -> CheckResult:
        raise NotImplementedError

    def plan(self, ctx: HardenContext) -> List[Change]:
        raise NotImplementedError

    def result(self, status: str, findings: List[Finding] = (), seen: List[str] = ()) -> CheckResult:
        return CheckResult(self.id, self.title, self.why, self.weight, status, list(findings), list(seen))
