"""The package databases read as files: dpkg's status and md5sums, rpm's sqlite headers; `dpkg -V` and
`rpm -Va` (file digests) without running either.

Invariants: nothing here runs a host program or opens a host path by itself (every read goes through
context.fs, O_NOATIME, bounded); the one thing written is the rpm database's copy for SQLite, in a private
0700 directory removed at once; a file is judged only against the digest its own package recorded; the facts
this collector emits are judged by the rules at the end of this file (findings), not elsewhere.
"""
from __future__ import annotations

import hashlib
import os
import posixpath
import stat
import struct
import threading
import time
from typing import Any, Dict, Iterator, List, Optional, Tuple

from toolkit.evidence.collectors.base import CollectionContext, Collector, Emitter, host_member
from toolkit.host.hostfs import Refused

DPKG = "/var/lib/dpkg"
STATUS_LIMIT = 256 << 20
MD5SUMS_LIMIT = 64 << 20
VERIFY_FILE_LIMIT = 512 << 20  # a packaged file larger than this is not read (recorded as such)
READ_CHUNK = 1 << 20
RPM_DATABASES = ("/var/lib/rpm/rpmdb.sqlite", "/usr/lib/sysimage/rpm/rpmdb.sqlite")
RPMDB_LIMIT = 1 << 30
RPMFILE_CONFIG = 1
RPM_DIGEST_ALGOS = {1: "md5", 2: "sha1", 8: "sha256", 9: "sha384", 10: "sha512", 11: "sha224"}
RPMTAG = {"name": 1000, "version": 1001, "release": 1002, "arch": 1022, "filedigests": 1035, "fileflags": 1037,
          "dirindexes": 1116, "basenames": 1117, "dirnames": 1118, "digestalgo": 5011}
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


def parse_rpm_header(blob: bytes) -> Dict[str, Any]:
    """One rpm header as the database stores it (index count, data length, 16-byte index entries, data):
    name, version, release, arch, and files as (path, digest hex, flags, algorithm)."""
    if len(blob) < 8:
        raise ValueError("rpm header shorter than 8 bytes")
    count, length = struct.unpack(">II", blob[:8])
    store = blob[8 + 16 * count:]
    if len(store) < length or count > 100000:
        raise ValueError("rpm header truncated")
    wanted = {tag: key for key, tag in RPMTAG.items()}
    values: Dict[str, Any] = {}
    for i in range(count):
        tag, kind, offset, items = struct.unpack(">iiii", blob[8 + 16 * i:24 + 16 * i])
        key = wanted.get(tag)
        if key is None or not 0 <= offset < len(store):
            continue
        if kind == 6:  # string
            values[key] = store[offset:store.index(b"\0", offset)].decode("utf-8", "replace")
        elif kind == 8:  # string array
            strings, at = [], offset
            for _ in range(items):
                end = store.index(b"\0", at)
                strings.append(store[at:end].decode("utf-8", "surrogateescape"))
                at = end + 1
            values[key] = strings
        elif kind == 4:  # int32
            values[key] = list(struct.unpack(">%di" % items, store[offset:offset + 4 * items]))
    header = {key: values.get(key) for key in ("name", "version", "release", "arch")}
    basenames, dirnames = values.get("basenames") or [], values.get("dirnames") or []
    indexes, digests = values.get("dirindexes") or [], values.get("filedigests") or []
    flags = values.get("fileflags") or [0] * len(basenames)
    algo = RPM_DIGEST_ALGOS.get((values.get("digestalgo") or [1])[0], "md5")
    files = []
    for i, base in enumerate(basenames):
        if i < len(indexes) and indexes[i] < len(dirnames):
            files.append((dirnames[indexes[i]] + base, digests[i] if i < len(digests) else None,
                          flags[i] if i < len(flags) else 0, algo))
    header["files"] = files
    return header


def read_rpmdb(context: CollectionContext, database: str) -> List[Dict[str, Any]]:
    """Every header of an rpm sqlite database. SQLite needs a file (and its -wal): the two are read O_NOATIME
    into a private directory (0700, /dev/shm when it exists), opened read-only there, and removed."""
    import shutil
    import sqlite3
    import tempfile

    directory = tempfile.mkdtemp(prefix="bookgen-kit-rpmdb-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        for suffix in ("", "-wal"):
            try:
                data = context.fs.read_bytes(database + suffix, RPMDB_LIMIT)
            except FileNotFoundError:
                continue
            with open(os.path.join(directory, "rpmdb.sqlite" + suffix), "wb") as handle:
                handle.write(data)
        connection = sqlite3.connect(os.path.join(directory, "rpmdb.sqlite"))
        try:
            rows = connection.execute("SELECT blob FROM Packages").fetchall()
        except sqlite3.Error as error:
            raise ValueError("not an rpm database: %s" % error) from None
        finally:
            connection.close()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return [parse_rpm_header(bytes(row[0])) for row in rows]


def installed(package: Dict[str, Any]) -> bool:
    return package.get("Status", "").split()[-1:] == ["installed"]


class PackageIndex:
    """Which package owns a path, and the md5 it recorded (md5sums and conffiles)."""

    def __init__(self) -> None:
        # path -> (package, digest (hex), is_conffile, digest algorithm)
        self.owner: Dict[str, Tuple[str, Optional[str], bool, str]] = {}

    def add(self, path: str, package: str, digest: Optional[str], conffile: bool = False, algo: str = "md5") -> None:
        self.owner[path] = (package, digest, conffile, algo)

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

    def findings(self, facts: Dict[str, List[Dict[str, Any]]], judging: Any) -> Iterator[Dict[str, Any]]:
        return findings(facts)

    def run(self, context: CollectionContext, emit: Emitter) -> None:
        index = PackageIndex()
        counts = {"dpkg": self._dpkg(context, emit, index), "rpm": self._rpm(context, emit, index)}
        if not any(count is not None for count in counts.values()):
            emit.skip(DPKG + "/status", "no package database on this host (dpkg, rpm)", "skip")
            return
        aliases = merged_aliases(context)
        started = time.monotonic()
        report = self._verify(context, index, aliases, emit)
        emit.log("package verify: %s; %d owned paths, %d files compared in %.1f s: %d modified, %d missing" % (
            ", ".join("%s %d packages" % (k, v) for k, v in counts.items() if v is not None), len(index.owner),
            report["checked"], time.monotonic() - started, len(report["modified"]), len(report["missing"])))
        emit.json("packages/verify.json", report, "digest of each packaged file (read O_NOATIME) against what its "
                                                  "package recorded (dpkg md5sums and conffiles, rpm file digests)")
        emit.fact("package_index", {"owner": {path: owner[0] for path, owner in index.owner.items()},
                                    "aliases": aliases, "verified_ok": report.pop("_ok")}, "packages/verify.json")
        for problem in report["modified"]:
            emit.fact("package_modified", problem, "packages/verify.json")

    @staticmethod
    def _dpkg(context: CollectionContext, emit: Emitter, index: "PackageIndex") -> Optional[int]:
        """dpkg's database into the index; the number of installed packages, None when there is none."""
        fs = context.fs
        try:
            status_text = fs.read_bytes(DPKG + "/status", STATUS_LIMIT).decode("utf-8", "replace")
        except FileNotFoundError:
            return None
        except (OSError, Refused) as error:
            emit.refusal(DPKG + "/status", error)
            return None
        emit.file(DPKG + "/status", STATUS_LIMIT)
        packages = [p for p in parse_status(status_text) if installed(p)]
        emit.json("packages/dpkg.json", {"database": DPKG, "installed": [
            {"package": p["Package"], "version": p.get("Version"), "architecture": p.get("Architecture")}
            for p in packages]}, "parsed from %s/status" % DPKG)
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
        return len(packages)

    @staticmethod
    def _rpm(context: CollectionContext, emit: Emitter, index: "PackageIndex") -> Optional[int]:
        """rpm's sqlite database (rpm 4.16+) into the index: each header's files with their digests."""
        for database in RPM_DATABASES:
            if context.fs.lexists(database):
                break
        else:
            return None
        emit.file(database, RPMDB_LIMIT)
        emit.file(database + "-wal", RPMDB_LIMIT)
        try:
            headers = read_rpmdb(context, database)
        except (OSError, Refused, ValueError) as error:
            emit.skip(database, "the rpm database could not be read: %s" % error, "error")
            return None
        installed_list = []
        for header in headers:
            name = header.get("name") or "?"
            installed_list.append({"package": name, "version": header.get("version"),
                                   "release": header.get("release"), "architecture": header.get("arch")})
            for path, digest, flags, algo in header.get("files", []):
                if digest and path not in index.owner:
                    index.add(path, name, digest, conffile=bool(flags & RPMFILE_CONFIG), algo=algo)
        emit.json("packages/rpm.json", {"database": database, "installed": installed_list},
                  "headers of %s, parsed (read-only copy in a private directory, removed after)" % database)
        return len(headers)

    @staticmethod
    def _verify(context: CollectionContext, index: PackageIndex, aliases: Dict[str, str],
                emit: Emitter) -> Dict[str, Any]:
        full = context.profile == "full"
        report: Dict[str, Any] = {"scope": "every packaged file" if full else
                                  "executables, libraries, units and everything under /etc",
                                  "owned_paths": len(index.owner), "checked": 0, "modified": [], "missing": [],
                                  "not_read": [], "_ok": []}
        by_directory: Dict[str, List[Tuple[str, str]]] = {}  # real parent -> [(name, path in the database)]
        for path in index.owner:
            if index.owner[path][1] in (None, "newconffile"):
                continue
            real = path
            for target, alias in aliases.items():
                if path.startswith(alias):
                    real = target + path[len(alias):]
            parent, name = posixpath.split(real)
            by_directory.setdefault(parent, []).append((name, path))
        lock = threading.Lock()

        def directory(parent: str) -> None:  # each directory opened once, its names stat'ed relative to it
            try:
                dir_fd = context.fs.open_dir(parent)
            except FileNotFoundError:
                with lock:
                    for name, path in by_directory[parent]:
                        if index.owner[path][2] or full:
                            report["missing"].append({"path": path, "package": index.owner[path][0]})
                return
            except (OSError, Refused) as error:  # e.g. a link in the way on a live host: said, not judged
                with lock:
                    report["not_read"].append({"path": parent, "package": None, "reason": str(error),
                                               "files": len(by_directory[parent])})
                return
            try:
                for name, path in sorted(by_directory[parent]):
                    if emit.cancelled.is_set():  # abandoned (budget, deadline): the workers stop too
                        return
                    PackagesCollector._check(context, report, lock, index, dir_fd, parent, name, path, full)
            finally:
                os.close(dir_fd)

        # hashing dominates and hashlib lets go of the GIL: one worker per core, directory by directory
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
            for _ in pool.map(directory, sorted(by_directory)):
                pass
        if emit.cancelled.is_set():
            emit.log("package verification stopped: the collector was abandoned")
        report["modified"].sort(key=lambda m: m["path"])
        report["missing"].sort(key=lambda m: m["path"])
        for problem in report["modified"]:  # members are written from this thread only
            emit.file(problem["path"], context.max_file_size)  # the modified file itself is evidence
        return report

    @staticmethod
    def _check(context: CollectionContext, report: Dict[str, Any], lock: Any, index: "PackageIndex",
               dir_fd: int, parent: str, name: str, path: str, full: bool) -> None:
        package, expected, conffile, algo = index.owner[path]
        real = posixpath.join(parent, name)
        try:
            info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            if conffile or full:
                with lock:
                    report["missing"].append({"path": path, "package": package})
            return
        except OSError:
            return
        if not stat.S_ISREG(info.st_mode) or not (full or in_triage_scope(real, info.st_mode, conffile)):
            return
        if info.st_size > VERIFY_FILE_LIMIT:
            with lock:
                report["not_read"].append({"path": real, "package": package, "reason": "larger than %d bytes" %
                                           VERIFY_FILE_LIMIT})
            return
        actual = _digest(context, dir_fd, name, real, algo, info.st_mode & 0o111 != 0)
        with lock:
            if actual is None:
                report["not_read"].append({"path": real, "package": package, "reason": "unreadable"})
                return
            report["checked"] += 1
            if actual == expected:
                report["_ok"].append(real)
                return
            report["modified"].append({"path": real, "package": package, "expected_digest": expected,
                                       "digest": actual, "algorithm": algo, "conffile": conffile,
                                       "mode": "%o" % info.st_mode, "mtime": info.st_mtime,
                                       "evidence": host_member(real)})


def _digest(context: CollectionContext, dir_fd: int, name: str, logical: str, algo: str,
            executable: bool) -> Optional[str]:
    """The digest the package recorded, of a name in an open directory. An executable's sha256 is taken in the
    same read and kept in context.digests, so that the timeline's hash_executables does not read it again."""
    digest = hashlib.new(algo)  # what the package recorded (dpkg: md5); used for nothing but this comparison
    sha256 = hashlib.sha256() if executable and algo != "sha256" else None
    try:
        with context.fs.open_at(dir_fd, name, logical) as opened:
            while True:
                piece = opened.read(READ_CHUNK)
                if not piece:
                    break
                digest.update(piece)
                if sha256 is not None:
                    sha256.update(piece)
            identity = (opened.info.st_dev, opened.info.st_ino)
    except (OSError, Refused):
        return None
    if executable:
        context.digests[identity] = (sha256 or digest).hexdigest()
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
        yield finding("package-file-modified", "high", "%s %s differs from package %s (%s %s, the package says "
                      "%s)" % (kind, data["path"], data["package"], data["algorithm"], data["digest"],
                               data["expected_digest"]),
                      [data["evidence"], "packages/verify.json"], path=data["path"], package=data["package"],
                      digest=data["digest"], expected_digest=data["expected_digest"])
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
