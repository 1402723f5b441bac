#!/usr/bin/env python3
"""Build dist/bookgen-kit.pyz: one zipapp for CPython 3.8-3.15 on manylinux x86_64 and aarch64.

    python3 build.py [--targets host|all|LIST] [--recipient age1...] [--recipients-file F]
                     [--python X.Y=PATH|none]... [-o PATH]
    python3 build.py lock [--targets ...]     refresh locks/<target>.txt from the registry

Each target (CPython version x machine) has its own resolved wheel set, pinned by
sha256 in locks/. The archive holds, per CPython version, the pure-Python tree as
sourceless .pyc compiled by that version's own interpreter (source where no such
interpreter is here), and per target the extension modules and bundled shared
libraries as content-addressed blobs that bootstrap/_bkboot.py loads from memory.
A source tree of the newest version lets a newer CPython than the build knows run
with the abi3 native modules (and a warning). A POSIX shell preamble before the zip
picks the interpreter for `./bookgen-kit.pyz` and `sh bookgen-kit.pyz`.
The same inputs give the same bytes: fixed timestamps, modes and order.
"""
from __future__ import annotations

import argparse
import base64
import glob
import hashlib
import json
import marshal
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent
LOCK_DIR = ROOT / "locks"
WHEEL_CACHE = Path(os.environ.get("BOOKGEN_WHEEL_CACHE") or ROOT / "build" / "wheels")
# Where the pinned wheels come from when this Python has no pip (PEP 691 JSON simple API).
INDEX_URL = os.environ.get("BOOKGEN_INDEX_URL", "https://pypi.org/simple")
DEFAULT_OUTPUT = ROOT / "dist" / "bookgen-kit.pyz"
PYTHONS = ("3.8", "3.9", "3.10", "3.11", "3.12", "3.13", "3.14", "3.15")
MACHINES = ("x86_64", "aarch64")
# The release a version's wheel set is resolved for, where X.Y.0 would hold it back, and
# the lowest release its target accepts: cryptography >= 44 excludes 3.9.0 and 3.9.1.
PYTHON_FLOOR = {"3.9": "3.9.2"}
# Newest first; nothing newer than glibc 2.28 (Debian 10, RHEL 8, Ubuntu 18.10).
MANYLINUX_TAGS = {
    "x86_64": ["manylinux_2_28", "manylinux_2_27", "manylinux_2_26", "manylinux_2_24", "manylinux_2_17",
               "manylinux2014", "manylinux_2_12", "manylinux2010", "manylinux_2_5", "manylinux1"],
    "aarch64": ["manylinux_2_28", "manylinux_2_27", "manylinux_2_26", "manylinux_2_24", "manylinux_2_17",
                "manylinux2014"],
}
LEGACY_GLIBC = {"manylinux1": "2.5", "manylinux2010": "2.12", "manylinux2014": "2.17"}
# Distributions a target may go without when the registry has no wheel for it (and a
# newer CPython than the build goes without when they have no abi3 module): what is lost.
OPTIONAL = {
    "zstandard": "no zstd: capture compresses with gzip (--compression auto); zstd bundles cannot be "
                 "verified or extracted with this interpreter",
    "psycopg-binary": "psycopg uses its pure-Python libpq wrapper on the host's libpq; without a libpq "
                      "on the host, database commands fail",
    "bcrypt": "passphrase-protected OpenSSH keys cannot be opened (sign, decrypt -i)",
    "cffi": "cffi's C backend is missing (cryptography's native module needs it)",
}
# An optional distribution that comes in through an extra: (requirement, extra).
OPTIONAL_VIA_EXTRA = {"psycopg-binary": ("psycopg", "binary")}
# Distributions whose native code only speeds up pure-Python modules of the same wheel: where a
# target's machine has no wheel, the pure-Python part of another machine's wheel is used.
PURE_ONLY = {"backports-zoneinfo": "its C module _czoneinfo only speeds up the pure-Python _zoneinfo "
                                   "(psycopg needs it on CPython 3.8; no aarch64 wheel exists)"}
# What else a newer CPython than the build may go without (its native code needs another's).
EFFECTS = dict(OPTIONAL, cryptography="no age encryption and no SSH signatures: capture runs only with --no-encrypt; "
               "encrypt, decrypt, keygen, sign, verify-signature and the key and signature checks of verify fail")
# The top-level import names of each, which the bootstrap answers with one clear error when missing.
TOPS = {"zstandard": ["zstandard"], "psycopg-binary": ["psycopg_binary"], "bcrypt": ["bcrypt"],
        "cffi": ["_cffi_backend", "cffi"], "cryptography": ["cryptography"]}
# Without these, a newer CPython than the build knows is refused rather than run.
ESSENTIAL_NATIVE = {"psutil"}
# Native code left out on purpose (distribution -> path prefixes, "" for all of it), and why: half of
# zstandard's size is a second copy of libzstd in its cffi backend, which CPython never imports;
# charset-normalizer's are mypyc-compiled copies of modules whose pure-Python source ships too.
EXCLUDED_NATIVE = {
    "zstandard": (["zstandard/_cffi."], "zstandard's cffi backend: CPython imports its C backend (backend_c)"),
    "charset-normalizer": ([""], "mypyc speed-ups of modules whose pure-Python source ships too"),
}
# Distributions replaced inside the archive (see bootstrap/certifi_stub.py).
REPLACED = {"certifi": ("certifi/__init__.py", ROOT / "bootstrap" / "certifi_stub.py")}
SKIPPED_SUFFIXES = (".pyi",)
FIXED_DATE = (1980, 1, 1, 0, 0, 0)
EXT_SUFFIX = re.compile(r"\.(cpython-\d+[a-z]*-[a-z0-9_]+-linux-gnu|abi3t?)?\.so$")
ABI3_SUFFIX = re.compile(r"\.abi3t?\.so$")
BOOT_MODULES = ("_bkboot",)


class BuildError(Exception):
    pass


_STARTED = time.monotonic()


def log(message: str) -> None:
    if os.environ.get("BOOKGEN_BUILD_TIMES"):  # elapsed seconds before each line
        message = "[%6.1fs] %s" % (time.monotonic() - _STARTED, message)
    print(message, file=sys.stderr, flush=True)


def version_key(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("."))


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# --------------------------------------------------------------------------- targets
@dataclass(frozen=True)
class Target:
    python: str
    machine: str

    @property
    def name(self) -> str:
        return "cp%s-manylinux_%s" % (self.python.replace(".", ""), self.machine)

    @property
    def lock_file(self) -> Path:
        return LOCK_DIR / (self.name + ".txt")

    @property
    def python_floor(self) -> str:
        return PYTHON_FLOOR.get(self.python, self.python)

    def pip_platform_args(self) -> list[str]:
        args = []
        for tag in MANYLINUX_TAGS[self.machine]:
            args += ["--platform", "%s_%s" % (tag, self.machine)]
        return args + ["--python-version", self.python_floor, "--implementation", "cp", "--only-binary=:all:"]


ALL_TARGETS = [Target(p, m) for p in PYTHONS for m in MACHINES]


def host_target() -> Target:
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(os.uname().machine.lower(), os.uname().machine.lower())
    return Target("%d.%d" % sys.version_info[:2], machine)


def parse_targets(spec: str) -> list[Target]:
    if spec == "all":
        return list(ALL_TARGETS)
    if spec == "host":
        return [host_target()]
    by_name = {t.name: t for t in ALL_TARGETS}
    chosen = []
    for item in spec.split(","):
        item = item.strip()
        if item not in by_name:
            raise BuildError("unknown target %r; known: host, all, %s" % (item, ", ".join(by_name)))
        chosen.append(by_name[item])
    return chosen


# --------------------------------------------------------------------------- locks
@dataclass
class Pin:
    name: str
    version: str
    sha256: str
    filename: str


@dataclass
class Lock:
    pins: list[Pin]
    unavailable: list[str]  # canonical names of OPTIONAL distributions the target goes without
    python_min: str
    pure_only: list[str] = field(default_factory=list)  # PURE_ONLY distributions from another machine's wheel


@dataclass(frozen=True)
class WheelTags:
    name: str
    version: str
    pythons: tuple[str, ...]
    abis: tuple[str, ...]
    platforms: tuple[str, ...]

    @property
    def abi3(self) -> bool:
        return "abi3" in self.abis

    @property
    def abi3_floor(self) -> tuple[int, int]:
        floors = [(int(p[2]), int(p[3:])) for p in self.pythons if re.fullmatch(r"cp3\d+", p)]
        return min(floors) if floors else (3, 0)


def wheel_tags(filename: str) -> WheelTags:
    parts = filename[: -len(".whl")].split("-")
    if len(parts) == 6:  # a build tag
        parts = parts[:2] + parts[3:]
    name, version, python, abi, platform = parts
    return WheelTags(name, version, tuple(python.split(".")), tuple(abi.split(".")), tuple(platform.split(".")))


def wheel_name_version(filename: str) -> tuple[str, str]:
    tags = wheel_tags(filename)
    return tags.name, tags.version


def read_lock(target: Target) -> Lock:
    if not target.lock_file.exists():
        raise BuildError("no lock for %s: run `python3 build.py lock --targets %s`" % (target.name, target.name))
    pins, unavailable, python_min, pure_only = [], [], target.python_floor, []
    for line in target.lock_file.read_text().splitlines():
        line = line.strip()
        m = re.match(r"^#\s*pure-only:\s*([A-Za-z0-9_.\-]+)", line)
        if m:
            pure_only.append(canonical(m.group(1)))
            continue
        m = re.match(r"^#\s*unavailable:\s*([A-Za-z0-9_.\-]+)", line)
        if m:
            unavailable.append(canonical(m.group(1)))
            continue
        m = re.match(r"^#\s*python:\s*>=\s*(\d+\.\d+(?:\.\d+)?)", line)
        if m:
            python_min = m.group(1)
            continue
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+) --hash=sha256:([0-9a-f]{64})\s+#\s+(\S+\.whl)$", line)
        if not m:
            raise BuildError("%s: malformed line: %s" % (target.lock_file, line))
        pins.append(Pin(m.group(1), m.group(2), m.group(3), m.group(4)))
    return Lock(pins, unavailable, python_min, pure_only)


def project_dependencies() -> list[str]:
    import tomllib

    with open(ROOT / "pyproject.toml", "rb") as f:
        return list(tomllib.load(f)["project"]["dependencies"])


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _requirement_name(requirement: str) -> str:
    return canonical(re.match(r"\s*([A-Za-z0-9_.\-]+)", requirement).group(1))


def _without(requirements: list[str], missing: str) -> list[str]:
    """The requirements with an OPTIONAL distribution taken out (or the extra that pulls it in)."""
    if missing in OPTIONAL_VIA_EXTRA:
        parent, extra = OPTIONAL_VIA_EXTRA[missing]
        out = []
        for req in requirements:
            if _requirement_name(req) == parent:
                req = re.sub(r"\[([^\]]*)\]", lambda m: "[%s]" % ",".join(
                    e for e in m.group(1).split(",") if e.strip() != extra) if m.group(1).strip() != extra else "", req)
            out.append(req)
        return out
    return [req for req in requirements if _requirement_name(req) != missing]


def marker_environment(target: Target) -> dict[str, str]:
    """PEP 508 marker variables of the target (pip evaluates markers for the interpreter running pip)."""
    return {"python_version": target.python, "python_full_version": target.python_floor + ".0" * (
        2 - target.python_floor.count(".")), "implementation_name": "cpython", "implementation_version":
        target.python_floor, "platform_python_implementation": "CPython", "sys_platform": "linux",
        "platform_system": "Linux", "platform_machine": target.machine, "os_name": "posix",
        "platform_release": "", "platform_version": "", "extra": ""}


def unmet_requirements(target: Target, wheels: list[Path], requirements: list[str]) -> list[str]:
    """Requirements of the resolved wheels that hold on the target but were not resolved (markers
    such as python_version < "3.9" that pip evaluated for its own interpreter)."""
    try:
        from packaging.requirements import Requirement
    except ImportError:
        from pip._vendor.packaging.requirements import Requirement
    environment = marker_environment(target)
    resolved = {canonical(wheel_name_version(w.name)[0]) for w in wheels}
    extras: dict[str, set[str]] = {}
    for text in requirements:
        req = Requirement(text)
        extras.setdefault(canonical(req.name), set()).update(req.extras)
    missing = []
    for wheel in wheels:
        dist = canonical(wheel_name_version(wheel.name)[0])
        with zipfile.ZipFile(wheel) as archive:
            metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
            text = archive.read(metadata).decode("utf-8", "replace").split("\n\n", 1)[0]
        for line in re.findall(r"^Requires-Dist:\s*(.+)$", text, re.M):
            req = Requirement(line.strip())
            holds = req.marker is None or any(req.marker.evaluate(dict(environment, extra=extra))
                                              for extra in [""] + sorted(extras.get(dist, ())))
            if holds and canonical(req.name) not in resolved:
                req.marker = None
                missing.append(str(req))
    return sorted(set(missing))


def _download_for_another_machine(target: Target, requirement: str, into: Path) -> bool:
    for machine in MACHINES:
        if machine == target.machine:
            continue
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
               "-d", str(into), *Target(target.python, machine).pip_platform_args(), requirement]
        if subprocess.run(cmd, capture_output=True, text=True).returncode == 0:
            return True
    return False


def resolve(target: Target, requirements: list[str], into: Path) -> tuple[list[str], list[str]]:
    """pip resolves the target's wheel set into `into`; returns the OPTIONAL distributions left out
    and the PURE_ONLY ones taken from another machine's wheel."""
    unavailable: list[str] = []
    pure_only: list[str] = []
    elsewhere = into.with_name(into.name + "-pure-only")
    shutil.rmtree(elsewhere, ignore_errors=True)
    elsewhere.mkdir(parents=True)
    while True:
        shutil.rmtree(into, ignore_errors=True)
        into.mkdir(parents=True)
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
               "-d", str(into), *target.pip_platform_args(), *requirements]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode == 0:
            missing = unmet_requirements(target, sorted(into.glob("*.whl")) + sorted(elsewhere.glob("*.whl")),
                                         requirements)
            if not missing:
                for wheel in elsewhere.glob("*.whl"):
                    shutil.move(str(wheel), into / wheel.name)
                return unavailable, pure_only
            log("  %s: also needs %s (a marker pip evaluated for CPython %d.%d)" % (
                target.name, ", ".join(missing), *sys.version_info[:2]))
            requirements = requirements + missing
            continue
        m = re.search(r"No matching distribution found for ([A-Za-z0-9_.\-]+)", run.stderr)
        missing = canonical(m.group(1)) if m else None
        if missing in OPTIONAL and missing not in unavailable:
            log("  %s: no wheel of %s: the target goes without it (%s)" % (target.name, missing, OPTIONAL[missing]))
            unavailable.append(missing)
            requirements = _without(requirements, missing)
            continue
        if missing in PURE_ONLY and missing not in pure_only:
            wanted = [r for r in requirements if _requirement_name(r) == missing] or [missing]
            if _download_for_another_machine(target, wanted[0], elsewhere):
                log("  %s: no wheel of %s for %s: its pure-Python part from another machine's wheel (%s)" % (
                    target.name, missing, target.machine, PURE_ONLY[missing]))
                pure_only.append(missing)
                requirements = [r for r in requirements if _requirement_name(r) != missing]
                continue
        raise BuildError("pip could not resolve %s:\n%s" % (target.name, run.stderr[-4000:]))


def wheel_glibc(filename: str, machine: str) -> str:
    """The lowest glibc any of the wheel's platform tags promises to run on."""
    best = None
    for tag in wheel_tags(filename).platforms:
        tag = tag[: -len("_" + machine)] if tag.endswith("_" + machine) else tag
        if tag in LEGACY_GLIBC:
            version = LEGACY_GLIBC[tag]
        else:
            m = re.match(r"manylinux_(\d+)_(\d+)$", tag)
            if not m:
                continue
            version = "%s.%s" % m.groups()
        if best is None or version_key(version) < version_key(best):
            best = version
    return best or "2.5"


def target_glibc(target: Target, pins: list[Pin]) -> str:
    floors = [wheel_glibc(p.filename, target.machine) for p in pins
              if not p.filename.endswith("-none-any.whl") and target.machine in p.filename]
    return max(floors, key=version_key) if floors else "2.5"


def share_abi3(target: Target, pins: list[Pin], pool: dict[tuple, dict[str, Pin]]) -> list[Pin]:
    """Use one abi3 wheel per (project, version, machine): the lowest abi3 tag any target resolved
    that still runs on this target, so its native code is stored once, not once per tag."""
    glibc = target_glibc(target, pins)
    out = []
    for pin in pins:
        tags = wheel_tags(pin.filename)
        if tags.abi3:
            candidates = [other for other in pool.get((canonical(pin.name), pin.version, target.machine), {}).values()
                          if wheel_tags(other.filename).abi3_floor <= version_key(target.python)
                          and version_key(wheel_glibc(other.filename, target.machine)) <= version_key(glibc)]
            if candidates:
                best = min(candidates, key=lambda p: (wheel_tags(p.filename).abi3_floor,
                                                      version_key(wheel_glibc(p.filename, target.machine)), p.filename))
                pin = best
        out.append(pin)
    return out


def _add_to_pool(pool: dict[tuple, dict[str, Pin]], target: Target, pins: list[Pin]) -> None:
    for pin in pins:
        if wheel_tags(pin.filename).abi3:
            pool.setdefault((canonical(pin.name), pin.version, target.machine), {})[pin.filename] = pin


def lock(targets: list[Target]) -> None:
    LOCK_DIR.mkdir(exist_ok=True)
    WHEEL_CACHE.mkdir(parents=True, exist_ok=True)
    requirements = project_dependencies()
    resolved: dict[Target, tuple[list[Pin], list[str], list[str]]] = {}
    pool: dict[tuple, dict[str, Pin]] = {}
    for other in ALL_TARGETS:  # the targets not refreshed now still share their abi3 wheels
        if other not in targets and other.lock_file.exists():
            _add_to_pool(pool, other, read_lock(other).pins)
    with tempfile.TemporaryDirectory() as tmp:
        for target in targets:
            log("resolving %s (CPython %s)" % (target.name, target.python_floor))
            into = Path(tmp, target.name)
            unavailable, pure_only = resolve(target, requirements, into)
            pins = []
            for wheel in sorted(into.glob("*.whl"), key=lambda p: p.name.lower()):
                name, version = wheel_name_version(wheel.name)
                pins.append(Pin(name, version, sha256_file(wheel), wheel.name))
                if not (WHEEL_CACHE / wheel.name).exists():
                    shutil.copyfile(wheel, WHEEL_CACHE / wheel.name)
            resolved[target] = (pins, unavailable, pure_only)
            _add_to_pool(pool, target, pins)
    for target, (pins, unavailable, pure_only) in resolved.items():
        pins = share_abi3(target, pins, pool)
        lines = ["# bookgen-kit wheel lock for %s (CPython %s, manylinux %s)." % (
            target.name, target.python, target.machine),
            "# Refresh with: python3 build.py lock (all targets together: they share abi3 wheels)",
            "# python: >=%s" % target.python_floor]
        for name in unavailable:
            lines.append("# unavailable: %s  (no wheel for this target)" % name)
        for name in pure_only:
            lines.append("# pure-only: %s  (no wheel for %s: the pure-Python part of another machine's wheel)" % (
                name, target.machine))
        for pin in sorted(pins, key=lambda p: p.filename.lower()):
            lines.append("%s==%s --hash=sha256:%s  # %s" % (pin.name, pin.version, pin.sha256, pin.filename))
        target.lock_file.write_text("\n".join(lines) + "\n")
        log("  wrote %s (%d wheels%s)" % (target.lock_file.relative_to(ROOT), len(pins),
                                          ", without " + ", ".join(unavailable) if unavailable else ""))


def _have_pip() -> bool:
    import importlib.util

    return importlib.util.find_spec("pip") is not None


def _download_from_index(pins: list[Pin]) -> None:
    """The pinned files themselves from the index's JSON simple API, for a Python without pip."""
    import urllib.request

    for pin in pins:
        request = urllib.request.Request("%s/%s/" % (INDEX_URL.rstrip("/"), canonical(pin.name)),
                                         headers={"Accept": "application/vnd.pypi.simple.v1+json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            files = json.load(response)["files"]
        entry = next((f for f in files if f["filename"] == pin.filename), None)
        if entry is None or entry.get("hashes", {}).get("sha256") != pin.sha256:
            raise BuildError("%s: the index has no %s with the locked sha256" % (INDEX_URL, pin.filename))
        partial = WHEEL_CACHE / (pin.filename + ".partial")
        digest = hashlib.sha256()
        with urllib.request.urlopen(entry["url"], timeout=300) as response, open(partial, "wb") as out:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != pin.sha256:
            partial.unlink()
            raise BuildError("%s: downloaded bytes do not match the locked sha256" % pin.filename)
        os.replace(partial, WHEEL_CACHE / pin.filename)


def fetch(target: Target, pins: list[Pin]) -> dict[str, Path]:
    """Every pinned wheel in the cache, hash-checked; download only what is missing (with pip, or
    straight from the index when this Python has no pip)."""
    WHEEL_CACHE.mkdir(parents=True, exist_ok=True)
    missing = [p for p in pins if not (WHEEL_CACHE / p.filename).exists()]
    if missing and not _have_pip():
        log("downloading %d wheels for %s from %s (no pip here)" % (len(missing), target.name, INDEX_URL))
        _download_from_index(missing)
        missing = []
    other = [m for m in MACHINES if m != target.machine]
    groups: dict[Target, list[Pin]] = {}
    for pin in missing:  # a pure-only pin is another machine's wheel
        machine = next((m for m in other if m in pin.filename and target.machine not in pin.filename), target.machine)
        groups.setdefault(Target(target.python, machine), []).append(pin)
    for platform, missing in sorted(groups.items(), key=lambda item: item[0].machine):
        with tempfile.TemporaryDirectory() as tmp:
            req = Path(tmp) / "req.txt"
            req.write_text("".join("%s==%s --hash=sha256:%s\n" % (p.name, p.version, p.sha256) for p in missing))
            out = Path(tmp) / "out"
            cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
                   "--require-hashes", "-d", str(out), *platform.pip_platform_args(), "-r", str(req)]
            log("downloading %d wheels for %s" % (len(missing), target.name))
            run = subprocess.run(cmd, capture_output=True, text=True)
            if run.returncode != 0:
                raise BuildError("pip could not download the locked wheels of %s:\n%s" % (target.name, run.stderr[-4000:]))
            for wheel in out.glob("*.whl"):
                shutil.move(str(wheel), WHEEL_CACHE / wheel.name)
    paths = {}
    for pin in pins:
        path = WHEEL_CACHE / pin.filename
        if not path.exists():
            raise BuildError("%s: pip did not deliver %s" % (target.name, pin.filename))
        if sha256_file(path) != pin.sha256:
            raise BuildError("%s: %s does not match its locked sha256" % (target.name, pin.filename))
        paths[pin.name] = path
    return paths


# --------------------------------------------------------------------------- ELF
def elf_dynamic(data: bytes) -> tuple[str | None, list[str]]:
    """(SONAME, NEEDED) of a 64-bit little-endian ELF shared object."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise BuildError("not a 64-bit little-endian ELF object")
    e_phoff, = struct.unpack_from("<Q", data, 0x20)
    e_phentsize, e_phnum = struct.unpack_from("<HH", data, 0x36)
    loads, dynamic = [], None
    for i in range(e_phnum):
        p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz = struct.unpack_from("<IIQQQQ", data, e_phoff + i * e_phentsize)
        if p_type == 1:
            loads.append((p_vaddr, p_offset, p_filesz))
        elif p_type == 2:
            dynamic = (p_offset, p_filesz)
    if dynamic is None:
        return None, []

    def to_offset(vaddr: int) -> int:
        for start, offset, size in loads:
            if start <= vaddr < start + size:
                return offset + vaddr - start
        raise BuildError("ELF address outside every loaded segment")

    entries, strtab = [], None
    for pos in range(dynamic[0], dynamic[0] + dynamic[1], 16):
        tag, value = struct.unpack_from("<qQ", data, pos)
        if tag == 0:
            break
        if tag == 5:
            strtab = to_offset(value)
        entries.append((tag, value))
    if strtab is None:
        return None, []

    def string(offset: int) -> str:
        end = data.index(b"\0", strtab + offset)
        return data[strtab + offset:end].decode()

    soname = next((string(v) for t, v in entries if t == 14), None)
    return soname, [string(v) for t, v in entries if t == 1]


SHF_ALLOC, SHF_INFO_LINK, SHT_RELA, SHT_NOBITS, SHT_REL = 0x2, 0x40, 4, 8, 9


def elf_strip(data: bytes) -> bytes:
    """The shared object without the sections the loader never reads (DWARF, .symtab, .strtab,
    .comment, non-allocated notes), as `strip --strip-unneeded` leaves it; every byte the loader
    maps stays at its offset. zstandard's wheel ships 10.6 MiB of DWARF in an 11.6 MiB module, and
    each startup inflates it. Anything unusual (not 64-bit little-endian, a dropped section before
    the end of the mapped bytes, a kept section linking to a dropped one) returns `data` unchanged."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return data
    e_phoff, e_shoff = struct.unpack_from("<QQ", data, 0x20)
    e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx = struct.unpack_from("<HHHHH", data, 0x36)
    if not e_shoff or e_shentsize != 64 or not 0 < e_shstrndx < e_shnum or e_shoff + e_shnum * 64 > len(data):
        return data
    sections = [list(struct.unpack_from("<IIQQQQIIQQ", data, e_shoff + i * 64)) for i in range(e_shnum)]
    # name, type, flags, addr, offset, size, link, info, addralign, entsize
    kept = [i for i, s in enumerate(sections) if i == 0 or s[2] & SHF_ALLOC or i == e_shstrndx]
    if len(kept) == e_shnum:
        return data
    mapped_end = e_phoff + e_phnum * e_phentsize
    for i in range(e_phnum):
        p_offset, = struct.unpack_from("<Q", data, e_phoff + i * e_phentsize + 8)
        p_filesz, = struct.unpack_from("<Q", data, e_phoff + i * e_phentsize + 32)
        mapped_end = max(mapped_end, p_offset + p_filesz)
    for i in kept[1:]:
        if i != e_shstrndx and sections[i][1] != SHT_NOBITS:
            mapped_end = max(mapped_end, sections[i][4] + sections[i][5])
    kept_set = set(kept)
    dropped = [sections[i] for i in range(e_shnum) if i not in kept_set]
    if any(s[1] != SHT_NOBITS and s[5] and s[4] < mapped_end for s in dropped):
        return data
    new_index = {old: new for new, old in enumerate(kept)}
    for i in kept[1:]:
        section = sections[i]
        if section[6]:
            if section[6] not in new_index:
                return data
            section[6] = new_index[section[6]]
        if section[7] and (section[2] & SHF_INFO_LINK or section[1] in (SHT_REL, SHT_RELA)):
            if section[7] not in new_index:
                return data
            section[7] = new_index[section[7]]
    out = bytearray(data[:mapped_end])
    names = sections[e_shstrndx]
    names_bytes = data[names[4]:names[4] + names[5]]
    names[4] = len(out)
    out += names_bytes
    out += b"\0" * (-len(out) % 8)
    section_headers_at = len(out)
    for i in kept:
        out += struct.pack("<IIQQQQIIQQ", *sections[i])
    struct.pack_into("<Q", out, 0x28, section_headers_at)
    struct.pack_into("<HH", out, 0x3C, len(kept), new_index[e_shstrndx])
    return bytes(out)


# --------------------------------------------------------------------------- wheels
@dataclass
class TargetContent:
    target: Target
    lock: Lock
    pure: dict[str, bytes] = field(default_factory=dict)  # path inside the pyroot -> bytes
    native: dict[str, bytes] = field(default_factory=dict)  # path as in site-packages -> bytes
    native_dist: dict[str, str] = field(default_factory=dict)  # native path -> canonical distribution name
    native_wheel_sha256: dict[str, str] = field(default_factory=dict)  # native path -> sha256 before elf_strip
    dists: list[str] = field(default_factory=list)
    glibc: str = "2.5"


def unpack_target(target: Target, lock_: Lock, wheels: dict[str, Path]) -> TargetContent:
    content = TargetContent(target, lock_)
    for name in sorted(wheels):
        path = wheels[name]
        pure_only = canonical(name) in lock_.pure_only
        if canonical(name) in REPLACED:
            relpath, source = REPLACED[canonical(name)]
            content.pure[relpath] = source.read_bytes()
            continue
        is_native_wheel = not path.name.endswith("-none-any.whl") and not pure_only
        if is_native_wheel:
            glibc = wheel_glibc(path.name, target.machine)
            if version_key(glibc) > version_key(content.glibc):
                content.glibc = glibc
        with zipfile.ZipFile(path) as wheel:
            for info in wheel.infolist():
                if info.is_dir():
                    continue
                relpath = info.filename
                parts = relpath.split("/")
                if parts[0].endswith(".data"):
                    if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                        continue
                    relpath = "/".join(parts[2:])
                if "__pycache__" in relpath.split("/") or relpath.endswith(SKIPPED_SUFFIXES):
                    continue
                if relpath.split("/")[0].endswith(".dist-info") and relpath.split("/")[0] not in content.dists:
                    content.dists.append(relpath.split("/")[0])
                data = wheel.read(info)
                if relpath.endswith(".so") or ".so." in os.path.basename(relpath):
                    if pure_only:
                        continue
                    prefixes = EXCLUDED_NATIVE.get(canonical(name), ([], ""))[0]
                    if any(relpath.startswith(prefix) for prefix in prefixes):
                        continue
                    content.native[relpath] = elf_strip(data)
                    content.native_wheel_sha256[relpath] = hashlib.sha256(data).hexdigest()
                    content.native_dist[relpath] = canonical(name)
                else:
                    content.pure[relpath] = data
    content.dists.sort()
    return content


def native_manifest(content: TargetContent, blobs: dict[str, bytes], stored: set[str]) -> tuple[dict, dict]:
    """Describe a target's extension modules and bundled libraries, storing each file once as a blob
    (named in `stored` when it goes into the zip uncompressed: STORED_NATIVE_DISTS)."""
    sonames, facts = {}, {}
    for relpath, data in content.native.items():
        soname, needed = elf_dynamic(data)
        facts[relpath] = (soname, needed)
        is_lib = ".libs/" in relpath or not EXT_SUFFIX.search(relpath)
        if is_lib:
            sonames[soname or os.path.basename(relpath)] = relpath
            sonames[os.path.basename(relpath)] = relpath
    modules, libs = {}, {}
    for relpath in sorted(content.native):
        data = content.native[relpath]
        digest = hashlib.sha256(data).hexdigest()
        blobs["native/" + digest] = data
        if content.native_dist[relpath] in STORED_NATIVE_DISTS:
            stored.add("native/" + digest)
        soname, needed = facts[relpath]
        deps = sorted({sonames[n] for n in needed if n in sonames and sonames[n] != relpath})
        entry = {"blob": "native/" + digest, "sha256": digest, "size": len(data), "deps": deps,
                 "dist": content.native_dist[relpath], "wheel_sha256": content.native_wheel_sha256[relpath]}
        if ".libs/" in relpath or not EXT_SUFFIX.search(relpath):
            libs[relpath] = dict(entry, soname=soname)
        else:
            module = EXT_SUFFIX.sub("", relpath).replace("/", ".")
            modules[module] = dict(entry, path=relpath, abi3=bool(ABI3_SUFFIX.search(relpath)))
    return modules, libs


def requirements_of(pure: dict[str, bytes]) -> dict[str, set[str]]:
    """{distribution: the distributions it always requires (no extras)}, from the bundled METADATA."""
    out: dict[str, set[str]] = {}
    for rel, data in pure.items():
        parts = rel.split("/")
        if len(parts) != 2 or not parts[0].endswith(".dist-info") or parts[1] != "METADATA":
            continue
        text = data.decode("utf-8", "replace").split("\n\n", 1)[0]
        name = canonical(re.search(r"^Name:\s*(\S+)", text, re.M).group(1))
        out[name] = {canonical(m.group(1)) for m in re.finditer(r"^Requires-Dist:\s*([A-Za-z0-9_.\-]+)([^\n]*)$", text, re.M)
                     if "extra ==" not in m.group(2).replace("extra==", "extra ==")}
    return out


def forward_natives(modules: dict, libs: dict, pure: dict[str, bytes]) -> tuple[dict, dict, list[dict]]:
    """What a newer CPython than the build can load of a target's native code: its abi3 modules
    (and the libraries they need). The rest is dropped; a dropped module whose pure-Python twin
    ships is only slower (mypyc's helper modules go with it), any other makes its distribution
    unavailable, and so is every distribution with native code that requires an unavailable one
    (cryptography's abi3 module imports cffi's _cffi_backend, which has no abi3 build)."""
    lost_modules: dict[str, list[str]] = {}
    for name, info in sorted(modules.items()):
        twin = info["path"].split(".")[0] + ".py"
        if info["abi3"] or twin in pure or name.endswith("__mypyc"):
            continue
        lost_modules.setdefault(info["dist"], []).append(name)
    native_dists = {info["dist"] for info in modules.values()}
    requires = requirements_of(pure)
    lost = set(lost_modules)
    changed = True
    while changed:
        changed = False
        for dist in sorted(native_dists - lost):
            if requires.get(dist, set()) & lost:
                lost.add(dist)
                changed = True
    kept = {name: info for name, info in modules.items() if info["abi3"] and info["dist"] not in lost}
    needed: set[str] = set()
    todo = [dep for info in kept.values() for dep in info["deps"]]
    while todo:
        lib = todo.pop()
        if lib not in needed:
            needed.add(lib)
            todo.extend(libs[lib]["deps"])
    unavailable = []
    for dist in sorted(lost):
        names = sorted(name for name, info in modules.items() if info["dist"] == dist)
        reason = "no abi3 build of its native code" if dist in lost_modules else "it needs %s" % ", ".join(
            sorted(requires.get(dist, set()) & lost))
        tops = sorted(set(TOPS.get(dist, [])) | {name.partition(".")[0] for name in names})
        unavailable.append({"component": dist, "effect": EFFECTS.get(dist, "native modules %s are unavailable" % (
            ", ".join(names))), "modules": names, "tops": tops, "reason": reason})
    return kept, {lib: libs[lib] for lib in sorted(needed)}, unavailable


def split_pyroots(python: str, group: list[TargetContent]) -> tuple[list, dict[str, dict[str, bytes]]]:
    """One pure-Python tree per CPython version, shared by its machines.

    Files that differ between machines are allowed only inside .dist-info (WHEEL,
    RECORD and SBOMs name the platform); each target keeps its own copy of those
    in an overlay that the bootstrap's metadata finder reads first. Anything else
    that differs gives each target a tree of its own.
    """
    first = group[0]
    differing = {rel for c in group for rel in set(c.pure) | set(first.pure) if c.pure.get(rel) != first.pure.get(rel)}
    same_dists = all(c.dists == first.dists for c in group)
    if not same_dists or any(not rel.split("/")[0].endswith(".dist-info") for rel in differing):
        return [("py/" + c.target.name, [c]) for c in group], {}
    shared = {rel: data for rel, data in first.pure.items() if rel not in differing}
    overlays = {c.target.name: {rel: c.pure[rel] for rel in differing if rel in c.pure} for c in group}
    for c in group:
        c.pure = shared
    return [("py/cp" + python.replace(".", ""), group)], {name: files for name, files in overlays.items() if files}


# --------------------------------------------------------------------------- bytecode
# Runs under the target's own interpreter, which may live in a chroot (`--python
# 3.14=WRAPPER`, WRAPPER running `chroot ROOT /usr/bin/python3.14 "$@"`): sources come in
# on stdin and bytecode goes out on stdout, so no path is shared with the build.
COMPILE_SCRIPT = r"""
import base64, json, os, py_compile, shutil, sys, tempfile
request = json.loads(sys.stdin.read())
tmp = tempfile.mkdtemp()
out, failed = {}, []
try:
    for index, rel in enumerate(request["files"]):
        src = os.path.join(tmp, "%d.py" % index)
        dst = src + "c"
        with open(src, "wb") as f:
            f.write(base64.b64decode(request["files"][rel]))
        try:
            py_compile.compile(src, cfile=dst, dfile=request["dfile"] + "/" + rel, doraise=True,
                               invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
        except py_compile.PyCompileError:
            failed.append(rel)
            continue
        with open(dst, "rb") as f:
            out[rel] = base64.b64encode(f.read()).decode()
finally:
    shutil.rmtree(tmp)
sys.stdout.write(json.dumps({"out": out, "failed": failed, "version": sys.version.split()[0]}))
"""


def find_interpreter(python: str, overrides: dict[str, str]) -> str | None:
    if python in overrides:
        given = overrides[python]
        if given.lower() in ("none", ""):
            return None
        probe = subprocess.run([given, "-S", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                               capture_output=True, text=True)
        if probe.returncode != 0 or probe.stdout.strip() != python:
            raise BuildError("--python %s=%s: that is not CPython %s (%s)" % (
                python, given, python, (probe.stdout.strip() or probe.stderr.strip())[-200:]))
        return given
    home = os.path.expanduser("~")
    candidates = sorted(glob.glob("%s/.pyenv/versions/%s.*/bin/python%s" % (home, python, python)),
                        key=lambda p: [int(x) for x in re.findall(r"\d+", p.split("/versions/")[1].split("/")[0])],
                        reverse=True)
    candidates += ["/usr/bin/python" + python, "/usr/local/bin/python" + python]
    found = shutil.which("python" + python)
    if found:
        candidates.append(found)
    for candidate in candidates:
        if not os.access(candidate, os.X_OK):
            continue
        probe = subprocess.run([candidate, "-S", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                               capture_output=True, text=True)
        if probe.returncode == 0 and probe.stdout.strip() == python:
            return candidate
    return None


def compile_sources(interpreter: str, dfile: str, sources: dict[str, bytes]) -> tuple[dict[str, bytes], list[str], str]:
    """Sourceless .pyc (unchecked hash) of every source, compiled by `interpreter` under PYTHONHASHSEED=0."""
    # No column tables in 3.11+ bytecode (a third of its size; tracebacks keep their line numbers).
    env = {"PYTHONHASHSEED": "0", "PYTHONNODEBUGRANGES": "1", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
           "LC_ALL": "C.UTF-8"}
    request = json.dumps({"dfile": dfile, "files": {rel: base64.b64encode(sources[rel]).decode()
                                                   for rel in sorted(sources)}})
    # Not -E: PYTHONHASHSEED=0 must reach it (the order of set and frozenset constants in the bytecode).
    run = subprocess.run([interpreter, "-S", "-s", "-B", "-c", COMPILE_SCRIPT], input=request,
                         capture_output=True, text=True, env=env)
    if run.returncode != 0:
        raise BuildError("compiling with %s failed:\n%s" % (interpreter, run.stderr[-4000:]))
    result = json.loads(run.stdout)
    return ({rel: base64.b64decode(data) for rel, data in result["out"].items()}, sorted(result["failed"]),
            result["version"])


def compile_tree(interpreter: str | None, pyroot: str, files: dict[str, bytes], own: set[str]) -> tuple[dict[str, bytes], dict]:
    """Turn every .py of a pyroot into sourceless .pyc with the version's own interpreter.

    A dependency's file that does not compile on this version stays source (it may be
    for another version); one of our own (`own`) is a build error.
    """
    if interpreter is None:
        return dict(files), {"bytecode": "source", "compiler": None, "kept_as_source": []}
    sources = {rel: data for rel, data in files.items() if rel.endswith(".py")}
    compiled, failed, version = compile_sources(interpreter, "bookgen-kit.pyz/" + pyroot, sources)
    ours = sorted(set(failed) & own)
    if ours:
        raise BuildError("CPython %s (%s) cannot compile our own code: %s" % (version, interpreter, ", ".join(ours)))
    out_files = {rel: data for rel, data in files.items() if not rel.endswith(".py")}
    for rel in sources:
        if rel in compiled:
            out_files[rel + "c"] = compiled[rel]
        else:
            out_files[rel] = files[rel]  # kept as source: it does not compile on this version
    return out_files, {"bytecode": "pyc", "compiler": "CPython " + version, "kept_as_source": failed}


METADATA_PACK = "_metadata"


def pack_tree(files: dict[str, bytes]) -> dict[str, bytes]:
    """Split a pyroot into one pack per top-level import name, plus one for all .dist-info.

    A pack is one marshal'd dict {directory: zlib(marshal'd dict {path: bytes})}, stored
    in the zip without compression: importing `click` reads click's pack and inflates
    only the directories it imports from (`toolkit --help` inflates toolkit/ and
    toolkit/cli/, not toolkit/evidence/). The archive keeps a few hundred members
    instead of thousands, which is what zipimport's directory read pays for.
    """
    groups: dict[str, dict[str, dict[str, bytes]]] = {}
    for rel, data in files.items():
        first = rel.split("/")[0]
        if first.endswith(".dist-info"):
            top = METADATA_PACK
        elif "/" in rel:
            top = first
        else:
            top = first.split(".")[0]
        directory = rel.rsplit("/", 1)[0] if "/" in rel else ""
        groups.setdefault(top, {}).setdefault(directory, {})[rel] = data
    packs = {}
    for top, directories in groups.items():
        chunks = {d: zlib.compress(marshal.dumps({rel: directories[d][rel] for rel in sorted(directories[d])}, 4), 9)
                  for d in sorted(directories)}
        packs[top] = marshal.dumps(chunks, 4)
    return packs


# --------------------------------------------------------------------------- the archive
def toolkit_sources() -> dict[str, bytes]:
    files = {}
    for path in sorted((ROOT / "toolkit").rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and not path.name.endswith(".pyc"):
            files[path.relative_to(ROOT).as_posix()] = path.read_bytes()
    return files


def _bech32_checks(text: str) -> bool:
    """The recipient's bech32 checksum holds (the kit's own codec, pure Python), and a post-quantum one is a key
    that can be encrypted to (a typo or a low-order X25519 half would make every capture fail at its start)."""
    sys.path.insert(0, str(ROOT))
    try:
        from toolkit.crypto import bech32

        try:
            bech32.decode(text)
        except ValueError:
            return False
        try:  # the key itself, where this interpreter has cryptography (the venv has; a bare python3 may not)
            from toolkit.crypto import age
        except ImportError:
            return True
        try:
            age.parse_recipient(text)
        except age.KeyFormatError:
            return False
        return True
    finally:
        sys.path.remove(str(ROOT))


def read_recipients(args: argparse.Namespace) -> list[str]:
    recipients = list(args.recipient or [])
    for path in args.recipients_file or []:
        for line in Path(path).read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                recipients.append(line)
    for r in recipients:
        ok = re.fullmatch(r"age1[02-9ac-hj-np-z]{58}", r) or re.match(r"^ssh-(ed25519|rsa) AAAA[0-9A-Za-z+/=]+( .*)?$", r) \
            or re.fullmatch(r"age1pq1[02-9ac-hj-np-z]{1952}", r)  # ML-KEM-768 + X25519: 1216 bytes
        if ok and r.startswith("age1"):
            ok = _bech32_checks(r)
        if not ok:
            raise BuildError("not an age recipient (age1..., age1pq1... or ssh-ed25519/ssh-rsa): %r" % r[:40])
    if len({r.startswith("age1pq1") for r in recipients}) > 1:  # capture would refuse them, as age 1.3 does
        raise BuildError("post-quantum (age1pq1...) and classical recipients cannot be mixed: the evidence would "
                         "be open to a quantum computer through the classical ones")
    return recipients


STORED_PREFIXES = ("packs/", "BOOT.bin")
# Native code every capture, verify, encrypt and decrypt loads before its first byte of work: stored
# uncompressed, its memfd is filled straight from the archive instead of inflating 12 MiB on one core
# (cryptography's module, about 60 ms of a capture's start); about 36 MiB more for all targets.
STORED_NATIVE_DISTS = frozenset(("cryptography", "zstandard"))


def preamble(pythons: list[str], partial: list[str], version: str, build_id: str) -> bytes:
    """The POSIX shell script before the zip: picks the interpreter for ./kit.pyz and sh kit.pyz."""
    template = (ROOT / "bootstrap" / "preamble.sh").read_text()
    newest_first = sorted(pythons, key=version_key, reverse=True)
    text = (template.replace("@VERSION@", version).replace("@BUILD_ID@", build_id)
            .replace("@PARTIAL@", " ".join(sorted(partial, key=version_key)) or "none")
            .replace("@KNOWN@", " ".join(sorted(pythons, key=version_key)))
            .replace("@CANDIDATES@", " ".join("python" + p for p in newest_first))
            .replace("@MIN_MINOR@", str(min(version_key(p)[1] for p in pythons)))
            .replace("@MAX_MINOR@", str(max(version_key(p)[1] for p in pythons))))
    left = re.search(r"@[A-Z_]+@", text)
    if left:
        raise BuildError("preamble.sh: unreplaced placeholder %s" % left.group(0))
    data = text.encode()
    if b"\0" in data or not data.startswith(b"#!/bin/sh\n"):
        raise BuildError("preamble.sh must be a plain #!/bin/sh script")
    return data


def templated_main(pythons: list[str]) -> bytes:
    """__main__.py with the build's lowest CPython filled in (the one check that runs under any Python)."""
    text = (ROOT / "bootstrap" / "__main__.py").read_text()
    low = version_key(min(pythons, key=version_key))
    marker = "MINIMUM = (3, 8)  # filled in by build.py"
    if marker not in text:
        raise BuildError("bootstrap/__main__.py lost its MINIMUM marker")
    return text.replace(marker, "MINIMUM = (%d, %d)  # filled in by build.py" % low).encode()


def templated_find(pythons: list[str]) -> bytes:
    text = (ROOT / "bootstrap" / "_bkfind.py").read_text()
    marker = 'KNOWN = ("3.8", "3.9", "3.10", "3.11", "3.12", "3.13", "3.14", "3.15")  # filled in by build.py'
    if marker not in text:
        raise BuildError("bootstrap/_bkfind.py lost its KNOWN marker")
    known = "KNOWN = (%s,)  # filled in by build.py" % ", ".join('"%s"' % p for p in sorted(pythons, key=version_key))
    return text.replace(marker, known).encode()


def build(targets: list[Target], recipients: list[str], output: Path, python_overrides: dict[str, str]) -> Path:
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("_toolkit_version", ROOT / "toolkit" / "__init__.py")
    version_module = module_from_spec(spec)
    spec.loader.exec_module(version_module)
    version = version_module.__version__

    contents = []
    for target in targets:
        lock_ = read_lock(target)
        contents.append(unpack_target(target, lock_, fetch(target, lock_.pins)))

    members: dict[str, bytes] = {}
    blobs: dict[str, bytes] = {}
    stored_blobs: set[str] = set()
    targets_info, pyroots_info, forward_info = {}, {}, {}
    toolkit = toolkit_sources()
    boot_sources = {"%s.py" % m: (ROOT / "bootstrap" / ("%s.py" % m)).read_bytes() for m in BOOT_MODULES}
    own = set(toolkit) | set(boot_sources)
    by_python: dict[str, list[TargetContent]] = {}
    for content in contents:
        by_python.setdefault(content.target.python, []).append(content)
    pythons = sorted(by_python, key=version_key)
    newest = pythons[-1]

    def add_pack_members(pyroot: str, packs: dict[str, bytes]) -> dict[str, str]:
        names = {}
        for top, pack in sorted(packs.items()):
            name = "packs/%s-%s.bin" % (top, hashlib.sha256(pack).hexdigest()[:20])
            members[name] = pack  # the same bytes in two pyroots are stored once
            names[top] = name
        return names

    interpreters = {python: find_interpreter(python, python_overrides) for python in pythons}
    jobs = []
    for python in pythons:
        roots, overlays = split_pyroots(python, by_python[python])
        if interpreters[python] is None:
            log("warning: no CPython %s here: its code ships as source (pass --python %s=PATH for .pyc)" % (python, python))
        for pyroot, members_of in roots:
            jobs.append((python, pyroot, members_of, overlays))

    def compile_job(job):
        python, pyroot, members_of, _ = job
        files = dict(members_of[0].pure)
        files.update(toolkit)
        log("compiling %s (%d files) with %s" % (pyroot, len(files), interpreters[python] or "nothing: source"))
        compiled, facts = compile_tree(interpreters[python], pyroot, files, own)
        boot = {}
        if interpreters[python] is not None:
            out, failed, _ = compile_sources(interpreters[python], "bookgen-kit.pyz", boot_sources)
            if failed:
                raise BuildError("CPython %s cannot compile the bootstrap: %s" % (python, ", ".join(failed)))
            boot = out
        return compiled, facts, boot, pack_tree(compiled)

    with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        results = list(pool.map(compile_job, jobs))

    for job, (compiled, facts, boot, packs) in zip(jobs, results):
        python, pyroot, members_of, overlays = job
        boot_member = None
        for rel, data in boot.items():
            boot_member = "boot/cp%s/%sc" % (python.replace(".", ""), rel)
            members[boot_member] = data
        pyroots_info[pyroot] = dict(facts, python=python, dists=members_of[0].dists, files=len(compiled),
                                    packs=add_pack_members(pyroot, packs), boot=boot_member)
        for content in members_of:
            modules, libs = native_manifest(content, blobs, stored_blobs)
            overlay = dict(overlays.get(content.target.name, {}))
            if overlay:
                members["meta/%s.bin" % content.target.name] = marshal.dumps({rel: overlay[rel] for rel in sorted(overlay)}, 4)
            unavailable = [{"component": name, "effect": OPTIONAL[name], "reason": "no wheel for this target",
                            "modules": [], "tops": TOPS.get(name, [name.replace("-", "_")])}
                           for name in content.lock.unavailable]
            targets_info[content.target.name] = {
                "python": python, "python_min": content.lock.python_min, "machine": content.target.machine,
                "glibc": content.glibc, "pyroot": pyroot, "native": modules, "libs": libs,
                "metadata_overlay": "meta/%s.bin" % content.target.name if overlay else None,
                "lock_sha256": sha256_file(content.target.lock_file),
                "dists": {Path(d).name[: -len(".dist-info")].rsplit("-", 1)[0]:
                          Path(d).name[: -len(".dist-info")].rsplit("-", 1)[1] for d in content.dists},
                "unavailable": unavailable,
            }
            if python == newest:
                # A newer CPython than the build knows runs this target's code from source with
                # its abi3 modules only.
                source_root = pyroot if facts["bytecode"] == "source" else "py/src-" + pyroot.split("/", 1)[1]
                if source_root not in pyroots_info:
                    files = dict(members_of[0].pure)
                    files.update(toolkit)
                    pyroots_info[source_root] = {"bytecode": "source", "compiler": None, "kept_as_source": [],
                                                 "python": python, "dists": members_of[0].dists, "files": len(files),
                                                 "packs": add_pack_members(source_root, pack_tree(files)), "boot": None}
                kept, kept_libs, lost = forward_natives(modules, libs, members_of[0].pure)
                essential_lost = [u["component"] for u in lost if u["component"] in ESSENTIAL_NATIVE]
                forward_info[content.target.machine] = {
                    "from_target": content.target.name, "python": python, "pyroot": source_root,
                    "glibc": content.glibc, "native": kept, "libs": kept_libs,
                    "metadata_overlay": targets_info[content.target.name]["metadata_overlay"],
                    "unavailable": lost + [u for u in unavailable if u["component"] not in {x["component"] for x in lost}],
                    "refused": essential_lost,
                }
    log("packed %d members" % (len(members) + len(blobs)))
    members.update(blobs)
    members["__main__.py"] = templated_main(pythons)
    members["_bkboot.py"] = boot_sources["_bkboot.py"]
    members["_bkfind.py"] = templated_find(pythons)

    digest = hashlib.sha256()
    for name in sorted(members):
        digest.update(name.encode() + b"\0" + hashlib.sha256(members[name]).digest())
    digest.update(json.dumps([recipients, targets_info, pyroots_info, forward_info], sort_keys=True).encode())
    build_id = digest.hexdigest()[:16]
    build_info = {
        "format": 2, "name": "bookgen-kit", "version": version, "build_id": build_id,
        "recipients": recipients, "pythons": pythons, "targets": targets_info, "pyroots": pyroots_info,
        "forward": forward_info,
        "excluded_native": {dist: why for dist, (_, why) in sorted(EXCLUDED_NATIVE.items())},
    }
    members["BUILD.json"] = json.dumps(build_info, sort_keys=True, indent=1).encode()
    # The same document for the bootstrap, which reads it without importing json.
    members["BOOT.bin"] = marshal.dumps(json.loads(members["BUILD.json"]), 4)

    partial_pythons = sorted({t["python"] for t in targets_info.values() if t["unavailable"]}, key=version_key)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")
    order = ["__main__.py", "_bkboot.py", "BOOT.bin", "BUILD.json", "_bkfind.py"]
    order += sorted(n for n in members if n not in order)
    compressed = _deflate_all({n: members[n] for n in order if not n.startswith(STORED_PREFIXES) and n not in stored_blobs})
    log("deflated")
    with open(partial, "wb") as raw:
        raw.write(preamble(pythons, partial_pythons, version, build_id))
        _write_zip(raw, [(n, members[n], compressed.get(n)) for n in order])
        raw.flush()
        os.fsync(raw.fileno())
    os.chmod(partial, 0o755)
    os.replace(partial, output)
    log("wrote %s: %d targets, %.1f MiB, sha256 %s" % (
        output, len(targets_info), output.stat().st_size / 1048576, sha256_file(output)))
    return output


def _deflate_all(members: dict[str, bytes]) -> dict[str, bytes]:
    """Raw deflate of every member, on all cores (zlib releases the GIL): level 6 for native code,
    where 9 takes four times as long for 0.6 % less, level 9 for the rest."""
    def deflate(name: str) -> bytes:
        compressor = zlib.compressobj(6 if name.startswith("native/") else 9, zlib.DEFLATED, -15)
        return compressor.compress(members[name]) + compressor.flush()

    names = sorted(members, key=lambda n: (-len(members[n]), n))
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return dict(zip(names, pool.map(deflate, names)))


def _write_zip(raw, entries: list[tuple[str, bytes, bytes | None]]) -> None:
    """A plain zip (no zip64: every member and the whole archive stay under 4 GiB), written after
    the preamble; offsets are relative to the start of the zip, as zipimport and zipfile expect
    of an archive with a prefix. `deflated` is the raw deflate stream, or None for stored."""
    start = raw.tell()
    dos_time, dos_date = 0, (FIXED_DATE[0] - 1980) << 9 | FIXED_DATE[1] << 5 | FIXED_DATE[2]
    central = []
    for name, data, deflated in entries:
        encoded = name.encode("ascii")
        method, payload = (8, deflated) if deflated is not None else (0, data)
        crc = zlib.crc32(data) & 0xFFFFFFFF
        offset = raw.tell() - start
        if max(offset, len(payload), len(data)) >= 0xFFFFFFFF:
            raise BuildError("%s: too large for a zip without zip64" % name)
        raw.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, dos_time, dos_date, crc,
                              len(payload), len(data), len(encoded), 0))
        raw.write(encoded)
        raw.write(payload)
        attributes = (0o100000 | 0o644) << 16
        central.append(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, (3 << 8) | 20, 20, 0, method, dos_time, dos_date,
                                   crc, len(payload), len(data), len(encoded), 0, 0, 0, 0, attributes, offset) + encoded)
    directory_offset = raw.tell() - start
    directory = b"".join(central)
    raw.write(directory)
    raw.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(central), len(central), len(directory),
                          directory_offset, 0))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", nargs="?", default="build", choices=["build", "lock"])
    parser.add_argument("--targets", default="all", help="host, all, or a comma list such as cp311-manylinux_x86_64")
    parser.add_argument("--recipient", action="append", help="age recipient baked in for capture (repeatable)")
    parser.add_argument("--recipients-file", action="append", help="file of age recipients, one per line")
    parser.add_argument("--python", action="append", default=[], metavar="X.Y=PATH",
                        help="interpreter that compiles the .pyc of CPython X.Y (a wrapper running it in a chroot "
                             "works); PATH 'none' ships that version's code as source")
    parser.add_argument("-o", "--output", default=str(DEFAULT_OUTPUT))
    args = parser.parse_args(argv)
    try:
        targets = parse_targets(args.targets)
        if args.command == "lock":
            lock(targets)
            return 0
        overrides = {}
        for item in args.python:
            if "=" not in item or not re.fullmatch(r"3\.\d+", item.split("=", 1)[0]):
                raise BuildError("--python wants X.Y=PATH, not %r" % item)
            python, path = item.split("=", 1)
            overrides[python] = path
        build(targets, read_recipients(args), Path(args.output).resolve(), overrides)
        return 0
    except BuildError as error:
        log("build.py: error: %s" % error)
        return 2


if __name__ == "__main__":
    sys.exit(main())
