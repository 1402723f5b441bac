"""The package database read as files: dpkg's status and md5sums, `dpkg -V` without running dpkg.

Invariants: nothing here runs a host program or opens a host path by itself (every read goes through
context.fs, O_NOATIME, bounded); a file is judged only against the md5 its own package recorded; the facts
this collector emits are judged by the rules at the end of this file (findings), not elsewhere.
"""
from __future__ import annotations

import hashlib
import posixpath
import stat
import time
from typing import Any, Dict, Iterator, List, Optional, Tuple

from toolkit.evidence.collectors.base import CollectionContext, Collector, Emitter, host_member
from toolkit.host.hostfs import Refused

DPKG = "/var/lib/dpkg"
STATUS_LIMIT = 256 << 20
MD5SUMS_LIMIT = 64 << 20
VERIFY_FILE_LIMIT = 512 << 20  # a packaged file larger than this is not read (recorded as such)
READ_CHUNK = 1 << 20
MERGED_TOPS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
# in triage, what dpkg -V would say that matters for an intrusion: code, units, PAM and the loader's config
LIBRARY_DIRS = ("/lib/", "/usr/lib/", "/lib64/", "/usr/lib64/", "/lib32/", "/usr/lib32/", "/usr/libexec/")
UNIT_SUFFIXES = (".service", ".timer", ".socket", ".path", ".mount", ".target")


def parse_status(text: str) -> List[Dict[str, Any]]:
    """dpkg's status file: one dict per stanza (Package, Version, Architecture, Status, Conffiles)."""
    packages: List[Dict[str, Any]] = []
    current: Dict[str, Any] = {}
    key: Optional[str] = None
    for line in text.split("\n") + [""]:
        if not line.strip():
            if current.get("Package"):
                packages.append(current)
            current, key = {}, None
            continue
        if line[0] in " \t" and key:
            if key == "Conffiles":
                current.setdefault("conffiles", []).append(line.split())
            continue
        key, _, value = line.partition(":")
        if key in ("Package", "Version", "Architecture", "Status", "Source"):
            current[key] = value.strip()
    return packages


def parse_diversions(text: str) -> Dict[str, Tuple[str, str]]:
    """dpkg's diversions file, three lines each (from, to, diverting package; ":" for a local one):
    {from: (to, diverting package)}. A package's file at `from` lives at `to`, unless it is the diverter's."""
    lines = text.split("\n")
    found = {}
    for start in range(0, len(lines) - 2, 3):
        source, target, package = lines[start:start + 3]
        if source.startswith("/") and target.startswith("/"):
            found[source] = (target, package)
    return found


def installed(package: Dict[str, Any]) -> bool:
    return package.get("Status", "").split()[-1:] == ["installed"]


class PackageIndex:
    """Which package owns a path, and the md5 it recorded (md5sums and conffiles)."""

    def __init__(self) -> None:
        self.owner: Dict[str, Tuple[str, Optional[str], bool]] = {}  # path -> (package, md5, is_conffile)

    def add(self, path: str, package: str, md5: Optional[str], conffile: bool = False) -> None:
        self.owner[path] = (package, md5, conffile)

    def lookup(self, path: str, aliases: Dict[str, str]) -> Optional[Tuple[str, Optional[str], bool]]:
        found = self.owner.get(path)
        if found is None:
            for real, alias in aliases.items():  # merged /usr: dpkg may say /bin/ls for /usr/bin/ls, or the reverse
                if path.startswith(real):
                    found = self.owner.get(alias + path[len(real):])
                elif path.startswith(alias):
                    found = self.owner.get(real + path[len(alias):])
                if found is not None:
                    break
        return found


def merged_aliases(context: CollectionContext) -> Dict[str, str]:
    """{"/usr/bin/": "/bin/", ...} for each top directory that is a link into /usr (a merged /usr)."""
    aliases = {}
    for top in MERGED_TOPS:
        try:
            if stat.S_ISLNK(context.fs.lstat("/" + top).st_mode):
                target = posixpath.normpath(posixpath.join("/", context.fs.readlink("/" + top)))
                aliases[target.rstrip("/") + "/"] = "/" + top + "/"
        except (OSError, Refused):
            continue
    return aliases


def in_triage_scope(path: str, mode: int, conffile: bool) -> bool:
    """Triage verifies what an intruder replaces: executables, libraries, units, conffiles (all of /etc)."""
    if conffile or path.startswith("/etc/"):
        return True
    if mode & 0o111:
        return True
    if path.endswith(UNIT_SUFFIXES):
        return True
    return path.startswith(LIBRARY_DIRS) and ".so" in posixpath.basename(path)


class PackagesCollector(Collector):
    name = "packages"
    rank = 70
    profiles = ("triage", "full")
    budget_seconds = 600.0
    description = "installed packages (dpkg status, read as a file) and `dpkg -V` of executables, libraries, " \
                  "units and conffiles (full: every packaged file), without running dpkg"

    def findings(self, facts: Dict[str, List[Dict[str, Any]]]) -> Iterator[Dict[str, Any]]:
        return findings(facts)

    def run(self, context: CollectionContext, emit: Emitter) -> None:
        fs = context.fs
        try:
            status_text = fs.read_bytes(DPKG + "/status", STATUS_LIMIT).decode("utf-8", "replace")
        except FileNotFoundError:
            emit.skip(DPKG + "/status", "no dpkg database on this host", "skip")
            return
        except (OSError, Refused) as error:
            emit.refusal(DPKG + "/status", error)
            return
        emit.file(DPKG + "/status", STATUS_LIMIT)
        packages = [p for p in parse_status(status_text) if installed(p)]
        emit.json("packages/dpkg.json", {"database": DPKG, "installed": [
            {"package": p["Package"], "version": p.get("Version"), "architecture": p.get("Architecture")}
            for p in packages]}, "parsed from %s/status" % DPKG)
        index = PackageIndex()
        names = {p["Package"] for p in packages}
        for package in packages:
            for fields in package.get("conffiles", []):
                if len(fields) >= 2 and fields[0].startswith("/"):
                    index.add(fields[0], package["Package"], fields[1], conffile=True)
        try:
            listing = fs.listdir(DPKG + "/info")
        except (OSError, Refused) as error:
            emit.refusal(DPKG + "/info", error)
            listing = []
        diversions = parse_diversions((emit.read(DPKG + "/diversions", MD5SUMS_LIMIT) or b"").decode(
            "utf-8", "surrogateescape"))
        for entry in sorted(listing):
            if not entry.endswith(".md5sums"):
                continue
            package = entry[:-len(".md5sums")].split(":")[0]
            if package not in names:
                continue
            data = emit.read(DPKG + "/info/" + entry, MD5SUMS_LIMIT)
            for line in (data or b"").decode("utf-8", "surrogateescape").splitlines():
                md5, _, relative = line.partition("  ")
                if len(md5) == 32 and relative:
                    path = "/" + relative.lstrip("/")
                    diverted = diversions.get(path)
                    if diverted is not None and diverted[1] != package:  # dpkg put this package's file elsewhere
                        path = diverted[0]
                    if path not in index.owner:  # a conffile's own md5 (from status) wins
                        index.add(path, package, md5)
        aliases = merged_aliases(context)
        started = time.monotonic()
        report = self._verify(context, index, aliases, emit)
        emit.log("dpkg verify: %d packages, %d owned paths, %d files compared in %.1f s: %d modified, %d missing" % (
            len(packages), len(index.owner), report["checked"], time.monotonic() - started, len(report["modified"]),
            len(report["missing"])))
        emit.json("packages/verify.json", report, "md5 of each packaged file (read O_NOATIME) against its "
                                                  "package's md5sums or conffiles")
        emit.fact("package_index", {"owner": {path: owner[0] for path, owner in index.owner.items()},
                                    "aliases": aliases, "verified_ok": report.pop("_ok")}, "packages/verify.json")
        for problem in report["modified"]:
            emit.fact("package_modified", problem, "packages/verify.json")

    @staticmethod
    def _verify(context: CollectionContext, index: PackageIndex, aliases: Dict[str, str],
                emit: Emitter) -> Dict[str, Any]:
        full = context.profile == "full"
        report: Dict[str, Any] = {"scope": "every packaged file" if full else
                                  "executables, libraries, units and everything under /etc",
                                  "owned_paths": len(index.owner), "checked": 0, "modified": [], "missing": [],
                                  "not_read": [], "_ok": []}
        for path in sorted(index.owner):
            package, md5, conffile = index.owner[path]
            if md5 is None or md5 == "newconffile":
                continue
            real = path
            for target, alias in aliases.items():
                if path.startswith(alias):
                    real = target + path[len(alias):]
            try:
                info = context.fs.lstat(real)
            except FileNotFoundError:
                if conffile or full:
                    report["missing"].append({"path": path, "package": package})
                continue
            except (OSError, Refused):
                continue
            if not stat.S_ISREG(info.st_mode) or not (full or in_triage_scope(real, info.st_mode, conffile)):
                continue
            if info.st_size > VERIFY_FILE_LIMIT:
                report["not_read"].append({"path": real, "package": package, "reason": "larger than %d bytes" %
                                           VERIFY_FILE_LIMIT})
                continue
            actual = _md5(context, real)
            if actual is None:
                report["not_read"].append({"path": real, "package": package, "reason": "unreadable"})
                continue
            report["checked"] += 1
            if actual == md5:
                report["_ok"].append(real)
                continue
            report["modified"].append({"path": real, "package": package, "expected_md5": md5, "md5": actual,
                                       "conffile": conffile, "mode": "%o" % info.st_mode, "mtime": info.st_mtime,
                                       "evidence": host_member(real)})
            emit.file(real, context.max_file_size)  # the modified file itself is evidence
        return report


def _md5(context: CollectionContext, logical: str) -> Optional[str]:
    digest = hashlib.md5()  # what dpkg recorded; never used for anything but this comparison
    try:
        with context.fs.open_file(logical) as opened:
            while True:
                piece = opened.read(READ_CHUNK)
                if not piece:
                    break
                digest.update(piece)
    except (OSError, Refused):
        return None
    return digest.hexdigest()


# -- what these facts mean ------------------------------------------------------------------------------------
def findings(facts: Dict[str, List[Dict[str, Any]]]) -> Iterator[Dict[str, Any]]:
    """A packaged executable, library or unit that differs from its package is high (a replaced binary); a
    changed conffile is an administrator's edit until shown otherwise, listed once as low."""
    from toolkit.evidence.findings import finding

    code, conffiles = [], []
    for fact in facts.get("package_modified", []):
        data = fact["data"]
        (conffiles if data["conffile"] else code).append(data)
    for data in code:
        kind = "library" if ".so" in posixpath.basename(data["path"]) else \
            "unit" if data["path"].endswith(UNIT_SUFFIXES) else "executable" if int(data["mode"], 8) & 0o111 \
            else "file"
        yield finding("package-file-modified", "high", "%s %s differs from package %s (md5 %s, the package says "
                      "%s)" % (kind, data["path"], data["package"], data["md5"], data["expected_md5"]),
                      [data["evidence"], "packages/verify.json"], path=data["path"], package=data["package"],
                      md5=data["md5"], expected_md5=data["expected_md5"])
    if conffiles:
        yield finding("package-conffiles-changed", "low", "%d configuration files differ from their packages' "
                      "(administrators' edits, or not): %s" % (len(conffiles), ", ".join(
                          d["path"] for d in conffiles[:5]) + (" ..." if len(conffiles) > 5 else "")),
                      ["packages/verify.json"], paths=[d["path"] for d in conffiles])


def verified_ok(facts: Dict[str, List[Dict[str, Any]]]) -> set:
    """Paths whose content matches their package (for other rules: a pristine file is not suspicious by age)."""
    found = set()
    for fact in facts.get("package_index", []):
        found.update(fact["data"]["verified_ok"])
    return found
