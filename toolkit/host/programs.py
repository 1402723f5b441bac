"""Running a host program when nothing else will do: by absolute path from fixed directories, a clean
environment, a timeout, and a record of which binary ran (path and sha256)."""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from typing import List, Optional, Sequence

from toolkit.host.hashing import sha256_path

SYSTEM_DIRS = ("/usr/sbin", "/usr/bin", "/sbin", "/bin", "/usr/local/sbin", "/usr/local/bin")
CLEAN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", "LANG": "C"}


@dataclass
class ProgramRun:
    argv: List[str]
    path: Optional[str]
    sha256: Optional[str]
    returncode: Optional[int]
    stdout: bytes
    stderr: bytes
    error: Optional[str] = None

    def record(self) -> dict:
        return {"argv": self.argv, "path": self.path, "sha256": self.sha256, "returncode": self.returncode,
                "error": self.error}


def find_program(name: str, directories: Sequence[str] = SYSTEM_DIRS) -> Optional[str]:
    """The first executable called name in the fixed system directories; never $PATH."""
    for directory in directories:
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def run_program(name: str, args: Sequence[str], timeout: float = 10.0, input_bytes: Optional[bytes] = None,
                env: Optional[dict] = None) -> ProgramRun:
    path = find_program(name)
    argv = [name] + list(args)
    if path is None:
        return ProgramRun(argv, None, None, None, b"", b"", "not installed (looked in %s)" % ", ".join(SYSTEM_DIRS))
    try:
        digest = sha256_path(os.path.realpath(path))
    except OSError:
        digest = None
    environment = dict(CLEAN_ENV)
    environment.update(env or {})
    try:
        done = subprocess.run([path] + list(args), input=input_bytes, capture_output=True, timeout=timeout,
                              env=environment, stdin=None if input_bytes is not None else subprocess.DEVNULL)
    except subprocess.TimeoutExpired as expired:
        return ProgramRun([path] + list(args), path, digest, None, expired.stdout or b"", expired.stderr or b"",
                          "timed out after %.0f s" % timeout)
    except OSError as error:
        return ProgramRun([path] + list(args), path, digest, None, b"", b"", str(error))
    return ProgramRun([path] + list(args), path, digest, done.returncode, done.stdout, done.stderr)
