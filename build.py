#!/usr/bin/env python3
"""Build dist/bookgen-kit.pyz: one zipapp for CPython 3.9-3.13 on manylinux x86_64 and aarch64.

    python3 build.py [--targets host|all|LIST] [--recipient age1...] [--recipients-file F] [-o PATH]
    python3 build.py lock [--targets ...]     refresh locks/<target>.txt from the registry

Each target (CPython version x machine) has its own resolved wheel set, pinned by
sha256 in locks/. The archive holds, per CPython version, the pure-Python tree as
sourceless .pyc compiled by that version's own interpreter (source where that
interpreter is missing), and per target the extension modules and bundled shared
libraries as content-addressed blobs that bootstrap/_bkboot.py loads from memory.
The same inputs give the same bytes: fixed timestamps, modes and order.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent
LOCK_DIR = ROOT / "locks"
WHEEL_CACHE = ROOT / "build" / "wheels"
DEFAULT_OUTPUT = ROOT / "dist" / "bookgen-kit.pyz"
PYTHONS = ("3.9", "3.10", "3.11", "3.12", "3.13")
MACHINES = ("x86_64", "aarch64")
# Newest first; nothing newer than glibc 2.28 (Debian 10, RHEL 8, Ubuntu 18.10).
MANYLINUX_TAGS = {
    "x86_64": ["manylinux_2_28", "manylinux_2_27", "manylinux_2_26", "manylinux_2_24", "manylinux_2_17",
               "manylinux2014", "manylinux_2_12", "manylinux2010", "manylinux_2_5", "manylinux1"],
    "aarch64": ["manylinux_2_28", "manylinux_2_27", "manylinux_2_26", "manylinux_2_24", "manylinux_2_17",
                "manylinux2014"],
}
LEGACY_GLIBC = {"manylinux1": "2.5", "manylinux2010": "2.12", "manylinux2014": "2.17"}
# Distributions replaced inside the archive (see bootstrap/certifi_stub.py).
REPLACED = {"certifi": ("certifi/__init__.py", ROOT / "bootstrap" / "certifi_stub.py")}
SKIPPED_SUFFIXES = (".pyi",)
FIXED_DATE = (1980, 1, 1, 0, 0, 0)
EXT_SUFFIX = re.compile(r"\.(cpython-\d+[a-z]*-[a-z0-9_]+-linux-gnu|abi3)?\.so$")


class BuildError(Exception):
    pass


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


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

    def pip_platform_args(self) -> list[str]:
        args = []
        for tag in MANYLINUX_TAGS[self.machine]:
            args += ["--platform", "%s_%s" % (tag, self.machine)]
        return args + ["--python-version", self.python, "--implementation", "cp", "--only-binary=:all:"]


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


def wheel_name_version(filename: str) -> tuple[str, str]:
    parts = filename[: -len(".whl")].split("-")
    return parts[0], parts[1]


def read_lock(target: Target) -> list[Pin]:
    if not target.lock_file.exists():
        raise BuildError("no lock for %s: run `python3 build.py lock --targets %s`" % (target.name, target.name))
    pins = []
    for line in target.lock_file.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+) --hash=sha256:([0-9a-f]{64})\s+#\s+(\S+\.whl)$", line)
        if not m:
            raise BuildError("%s: malformed line: %s" % (target.lock_file, line))
        pins.append(Pin(m.group(1), m.group(2), m.group(3), m.group(4)))
    return pins


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


def lock(targets: list[Target]) -> None:
    LOCK_DIR.mkdir(exist_ok=True)
    WHEEL_CACHE.mkdir(parents=True, exist_ok=True)
    requirements = project_dependencies()
    for target in targets:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                   "-d", tmp, *target.pip_platform_args(), *requirements]
            log("resolving %s" % target.name)
            run = subprocess.run(cmd, capture_output=True, text=True)
            if run.returncode != 0:
                raise BuildError("pip could not resolve %s:\n%s" % (target.name, run.stderr[-4000:]))
            lines = ["# bookgen-kit wheel lock for %s (CPython %s, manylinux %s)." % (
                target.name, target.python, target.machine),
                "# Refresh with: python3 build.py lock --targets %s" % target.name]
            for wheel in sorted(Path(tmp).glob("*.whl"), key=lambda p: p.name.lower()):
                name, version = wheel_name_version(wheel.name)
                digest = sha256_file(wheel)
                lines.append("%s==%s --hash=sha256:%s  # %s" % (name, version, digest, wheel.name))
                if not (WHEEL_CACHE / wheel.name).exists():
                    shutil.copyfile(wheel, WHEEL_CACHE / wheel.name)
            target.lock_file.write_text("\n".join(lines) + "\n")
            log("  wrote %s (%d wheels)" % (target.lock_file.relative_to(ROOT), len(lines) - 2))


def fetch(target: Target, pins: list[Pin]) -> dict[str, Path]:
    """Every pinned wheel in the cache, hash-checked; download only what is missing."""
    WHEEL_CACHE.mkdir(parents=True, exist_ok=True)
    missing = [p for p in pins if not (WHEEL_CACHE / p.filename).exists()]
    if missing:
        with tempfile.TemporaryDirectory() as tmp:
            req = Path(tmp) / "req.txt"
            req.write_text("".join("%s==%s --hash=sha256:%s\n" % (p.name, p.version, p.sha256) for p in missing))
            out = Path(tmp) / "out"
            cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
                   "--require-hashes", "-d", str(out), *target.pip_platform_args(), "-r", str(req)]
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


# --------------------------------------------------------------------------- wheels
@dataclass
class TargetContent:
    target: Target
    pure: dict[str, bytes] = field(default_factory=dict)  # path inside the pyroot -> bytes
    native: dict[str, bytes] = field(default_factory=dict)  # path as in site-packages -> bytes
    dists: list[str] = field(default_factory=list)
    glibc: str = "2.5"


def wheel_glibc(filename: str, machine: str) -> str:
    """The lowest glibc any of the wheel's platform tags promises to run on."""
    best = None
    for tag in filename[: -len(".whl")].split("-")[-1].split("."):
        tag = tag[: -len("_" + machine)] if tag.endswith("_" + machine) else tag
        if tag in LEGACY_GLIBC:
            version = LEGACY_GLIBC[tag]
        else:
            m = re.match(r"manylinux_(\d+)_(\d+)$", tag)
            if not m:
                continue
            version = "%s.%s" % m.groups()
        if best is None or tuple(map(int, version.split("."))) < tuple(map(int, best.split("."))):
            best = version
    return best or "2.5"


def unpack_target(target: Target, wheels: dict[str, Path]) -> TargetContent:
    content = TargetContent(target)
    for name in sorted(wheels):
        path = wheels[name]
        if re.sub(r"[-_.]+", "-", name).lower() in REPLACED:
            relpath, source = REPLACED[re.sub(r"[-_.]+", "-", name).lower()]
            content.pure[relpath] = source.read_bytes()
            continue
        is_native_wheel = not path.name.endswith("-none-any.whl")
        if is_native_wheel:
            glibc = wheel_glibc(path.name, target.machine)
            if tuple(map(int, glibc.split("."))) > tuple(map(int, content.glibc.split("."))):
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
                    content.native[relpath] = data
                else:
                    content.pure[relpath] = data
    content.dists.sort()
    return content


def native_manifest(content: TargetContent, blobs: dict[str, bytes]) -> tuple[dict, dict]:
    """Describe a target's extension modules and bundled libraries, storing each file once as a blob."""
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
        soname, needed = facts[relpath]
        deps = sorted({sonames[n] for n in needed if n in sonames and sonames[n] != relpath})
        entry = {"blob": "native/" + digest, "sha256": digest, "size": len(data), "deps": deps}
        if ".libs/" in relpath or not EXT_SUFFIX.search(relpath):
            libs[relpath] = dict(entry, soname=soname)
        else:
            module = EXT_SUFFIX.sub("", relpath).replace("/", ".")
            modules[module] = dict(entry, path=relpath)
    return modules, libs


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
COMPILE_SCRIPT = r"""
import json, os, py_compile, sys
request = json.load(sys.stdin)
failed = []
for rel in request["files"]:
    src = os.path.join(request["src"], rel)
    dst = os.path.join(request["out"], rel + "c")
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    try:
        py_compile.compile(src, cfile=dst, dfile=request["dfile"] + "/" + rel, doraise=True,
                           invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
    except py_compile.PyCompileError:
        failed.append(rel)
json.dump({"failed": failed, "version": sys.version.split()[0]}, sys.stdout)
"""


def find_interpreter(python: str, overrides: dict[str, str]) -> str | None:
    if python in overrides:
        return overrides[python]
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


def compile_tree(python: str, interpreter: str | None, pyroot: str, files: dict[str, bytes]) -> tuple[dict[str, bytes], dict]:
    """Turn every .py of a pyroot into sourceless .pyc with the version's own interpreter."""
    sources = sorted(rel for rel in files if rel.endswith(".py"))
    if interpreter is None:
        return dict(files), {"bytecode": "source", "compiler": None}
    out_files = {rel: data for rel, data in files.items() if not rel.endswith(".py")}
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp, "src"), Path(tmp, "out")
        for rel in sources:
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            (src / rel).write_bytes(files[rel])
        env = {"PYTHONHASHSEED": "0", "PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"}
        request = json.dumps({"src": str(src), "out": str(out), "files": sources, "dfile": "bookgen-kit.pyz/" + pyroot})
        run = subprocess.run([interpreter, "-S", "-s", "-B", "-c", COMPILE_SCRIPT], input=request,
                             capture_output=True, text=True, env=env)
        if run.returncode != 0:
            raise BuildError("compiling with %s failed:\n%s" % (interpreter, run.stderr[-4000:]))
        result = json.loads(run.stdout)
        failed = set(result["failed"])
        for rel in sources:
            if rel in failed:
                out_files[rel] = files[rel]  # kept as source: it does not compile on this version
            else:
                out_files[rel + "c"] = (out / (rel + "c")).read_bytes()
    return out_files, {"bytecode": "pyc", "compiler": "CPython " + result["version"],
                       "kept_as_source": sorted(failed)}


METADATA_PACK = "_metadata"


def pack_files(files: dict[str, bytes]) -> bytes:
    """A pack: one marshal'd dict {path: bytes}, sorted, read whole by the bootstrap."""
    import marshal

    return marshal.dumps({rel: files[rel] for rel in sorted(files)}, 4)


def pack_tree(files: dict[str, bytes]) -> dict[str, bytes]:
    """Split a pyroot into one pack per top-level import name, plus one for all .dist-info.

    Importing `click` then reads and inflates only click's pack: the archive has
    a few hundred members instead of thousands, which is what zipimport's
    directory read and the start-up time pay for.
    """
    groups: dict[str, dict[str, bytes]] = {}
    for rel, data in files.items():
        first = rel.split("/")[0]
        if first.endswith(".dist-info"):
            top = METADATA_PACK
        elif "/" in rel:
            top = first
        else:
            top = first.split(".")[0]
        groups.setdefault(top, {})[rel] = data
    return {top: pack_files(group) for top, group in groups.items()}


# --------------------------------------------------------------------------- the archive
def toolkit_sources() -> dict[str, bytes]:
    files = {}
    for path in sorted((ROOT / "toolkit").rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and not path.name.endswith(".pyc"):
            files[path.relative_to(ROOT).as_posix()] = path.read_bytes()
    return files


def read_recipients(args: argparse.Namespace) -> list[str]:
    recipients = list(args.recipient or [])
    for path in args.recipients_file or []:
        for line in Path(path).read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                recipients.append(line)
    for r in recipients:
        ok = re.fullmatch(r"age1[02-9ac-hj-np-z]{58}", r) or re.match(r"^ssh-(ed25519|rsa) AAAA[0-9A-Za-z+/=]+( .*)?$", r)
        if not ok:
            raise BuildError("not an age recipient (age1... or ssh-ed25519/ssh-rsa): %r" % r[:40])
    return recipients


def zip_entry(name: str, mode: int = 0o644) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=FIXED_DATE)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = (0o100000 | mode) << 16
    info.create_system = 3
    return info


def build(targets: list[Target], recipients: list[str], output: Path, python_overrides: dict[str, str]) -> Path:
    from importlib.util import spec_from_file_location, module_from_spec

    spec = spec_from_file_location("_toolkit_version", ROOT / "toolkit" / "__init__.py")
    version_module = module_from_spec(spec)
    spec.loader.exec_module(version_module)
    version = version_module.__version__

    contents = []
    for target in targets:
        pins = read_lock(target)
        contents.append(unpack_target(target, fetch(target, pins)))

    members: dict[str, bytes] = {}
    blobs: dict[str, bytes] = {}
    targets_info, pyroots_info = {}, {}
    toolkit = toolkit_sources()
    by_python: dict[str, list[TargetContent]] = {}
    for content in contents:
        by_python.setdefault(content.target.python, []).append(content)
    for python in sorted(by_python, key=lambda v: tuple(map(int, v.split(".")))):
        group = by_python[python]
        roots, overlays = split_pyroots(python, group)
        interpreter = find_interpreter(python, python_overrides)
        if interpreter is None:
            log("warning: no CPython %s here: its code ships as source" % python)
        for pyroot, members_of in roots:
            files = dict(members_of[0].pure)
            files.update(toolkit)
            log("compiling %s (%d files) with %s" % (pyroot, len(files), interpreter or "nothing: source"))
            compiled, facts = compile_tree(python, interpreter, pyroot, files)
            packs = pack_tree(compiled)
            for top, pack in packs.items():
                members["%s/%s.bin" % (pyroot, top)] = pack
            pyroots_info[pyroot] = dict(facts, python=python, dists=members_of[0].dists, files=len(compiled),
                                        packs=sorted(top for top in packs if top != METADATA_PACK))
            for content in members_of:
                modules, libs = native_manifest(content, blobs)
                overlay = {rel: data for rel, data in overlays.get(content.target.name, {}).items()}
                if overlay:
                    members["meta/%s.bin" % content.target.name] = pack_files(overlay)
                targets_info[content.target.name] = {
                    "python": python, "machine": content.target.machine, "glibc": content.glibc,
                    "pyroot": pyroot, "native": modules, "libs": libs,
                    "metadata_overlay": "meta/%s.bin" % content.target.name if overlay else None,
                    "lock_sha256": sha256_file(content.target.lock_file),
                    "dists": {Path(d).name[: -len(".dist-info")].rsplit("-", 1)[0]:
                              Path(d).name[: -len(".dist-info")].rsplit("-", 1)[1] for d in content.dists},
                }
    members.update(blobs)
    members["__main__.py"] = (ROOT / "bootstrap" / "__main__.py").read_bytes()
    members["_bkboot.py"] = (ROOT / "bootstrap" / "_bkboot.py").read_bytes()

    digest = hashlib.sha256()
    for name in sorted(members):
        digest.update(name.encode() + b"\0" + hashlib.sha256(members[name]).digest())
    digest.update(json.dumps([recipients, targets_info, pyroots_info], sort_keys=True).encode())
    build_info = {
        "format": 1, "name": "bookgen-kit", "version": version, "build_id": digest.hexdigest()[:16],
        "recipients": recipients, "targets": targets_info, "pyroots": pyroots_info,
    }
    members["BUILD.json"] = json.dumps(build_info, sort_keys=True, indent=1).encode()

    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")
    order = ["__main__.py", "_bkboot.py", "BUILD.json"]
    order += sorted(n for n in members if n not in order)
    with open(partial, "wb") as raw:
        raw.write(b"#!/usr/bin/env python3\n")
        with zipfile.ZipFile(raw, "w") as archive:
            for name in order:
                archive.writestr(zip_entry(name), members[name], compresslevel=9)
        raw.flush()
        os.fsync(raw.fileno())
    os.chmod(partial, 0o755)
    os.replace(partial, output)
    log("wrote %s: %d targets, %.1f MiB, sha256 %s" % (
        output, len(targets_info), output.stat().st_size / 1048576, sha256_file(output)))
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", nargs="?", default="build", choices=["build", "lock"])
    parser.add_argument("--targets", default="all", help="host, all, or a comma list such as cp311-manylinux_x86_64")
    parser.add_argument("--recipient", action="append", help="age recipient baked in for capture (repeatable)")
    parser.add_argument("--recipients-file", action="append", help="file of age recipients, one per line")
    parser.add_argument("--python", action="append", default=[], metavar="X.Y=PATH",
                        help="interpreter that compiles the .pyc of CPython X.Y")
    parser.add_argument("-o", "--output", default=str(DEFAULT_OUTPUT))
    args = parser.parse_args(argv)
    try:
        targets = parse_targets(args.targets)
        if args.command == "lock":
            lock(targets)
            return 0
        overrides = dict(item.split("=", 1) for item in args.python)
        build(targets, read_recipients(args), Path(args.output).resolve(), overrides)
        return 0
    except BuildError as error:
        log("build.py: error: %s" % error)
        return 2


if __name__ == "__main__":
    sys.exit(main())
