"""The real age 1.3 (the reference implementation with post-quantum recipients) for interop tests: Debian sid's
`age` package, fetched with apt-get using the sid root's own sources and package lists (tests/world/roots.py; the
lists are copied out first, the root is never written), checked by apt against the archive's hashes and unpacked
with `dpkg-deb -x`.

Cache (BOOKGEN_KIT_AGE13, default /var/tmp/bookgen-kit-age13): <version>/usr/bin/age, age-keygen; made under a
temporary name and renamed. When the lists are too old for the archive (the version is gone), they are updated
in the copy and the download tried once more.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CACHE = "/var/tmp/bookgen-kit-age13"


class AgeUnavailable(RuntimeError):
    pass


@dataclass
class Age13:
    age: str
    keygen: str
    version: str


def _apt(root: Path, lists: Path, work: Path, *args: str) -> subprocess.CompletedProcess:
    options = ["-o", "APT::Sandbox::User=root", "-o", "Dir::State::Lists=%s" % lists,
               "-o", "Dir::Etc::SourceList=%s" % (root / "etc/apt/sources.list"),
               "-o", "Dir::Etc::SourceParts=/nonexistent", "-o", "Dir::State::Status=%s" % (root / "var/lib/dpkg/status"),
               "-o", "Dir::Cache=%s" % (work / "cache"), "-o", "Debug::NoLocking=1"]
    return subprocess.run(["apt-get", "-q", *options, *args], cwd=str(work), capture_output=True, text=True,
                          timeout=600)


def ensure(sid_root: Path, cache: Path = None) -> Age13:
    cache = Path(cache or os.environ.get("BOOKGEN_KIT_AGE13") or DEFAULT_CACHE)
    cache.mkdir(parents=True, exist_ok=True)
    ready = sorted(p for p in cache.iterdir() if (p / "usr/bin/age").exists() and not p.name.startswith("."))
    if not ready:
        with tempfile.TemporaryDirectory(dir=str(cache), prefix=".work-") as scratch:
            work = Path(scratch)
            lists = work / "lists"
            shutil.copytree(str(sid_root / "var/lib/apt/lists"), str(lists), ignore=shutil.ignore_patterns("lock"))
            (lists / "partial").mkdir(exist_ok=True)
            (work / "cache" / "archives" / "partial").mkdir(parents=True)
            done = _apt(sid_root, lists, work, "download", "age")
            if done.returncode != 0:
                _apt(sid_root, lists, work, "update")
                done = _apt(sid_root, lists, work, "download", "age")
            debs = sorted(work.glob("age_*.deb"))
            if done.returncode != 0 or not debs:
                raise AgeUnavailable("apt-get download age (sid) failed: %s" % done.stderr.strip()[-500:])
            version = debs[0].name.split("_")[1]
            unpacked = work / "unpacked"
            subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(unpacked)], check=True, timeout=120)
            os.rename(str(unpacked), str(cache / version))
        ready = [cache / version]
    home = ready[-1]
    version = subprocess.run([str(home / "usr/bin/age"), "--version"], capture_output=True, text=True).stdout.strip()
    if not version.startswith("1.3") and not version.startswith("v1.3"):
        raise AgeUnavailable("sid's age is %s, not 1.3.x" % version)
    return Age13(str(home / "usr/bin/age"), str(home / "usr/bin/age-keygen"), version)
