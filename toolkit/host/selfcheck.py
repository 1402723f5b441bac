"""What a responder checks before trusting a bookgen-kit run on a host it does not trust."""
from __future__ import annotations

import importlib
import os
import stat
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional

from toolkit import runtime
from toolkit.host.hashing import sha256_path

SUSPECT_VARIABLES = ("LD_PRELOAD", "LD_LIBRARY_PATH", "LD_AUDIT", "LD_DEBUG", "LD_PROFILE")
LD_SO_PRELOAD = "/etc/ld.so.preload"


@dataclass
class EnvWarning:
    code: str
    message: str


@dataclass
class NativeImport:
    module: str
    ok: bool
    detail: str = ""
    error: str = ""
    degraded: bool = False  # known to be unavailable for this interpreter (see SelfCheckReport.degraded)


@dataclass
class SelfCheckReport:
    tool: Dict[str, Any]
    interpreter: Dict[str, Any]
    platform: Dict[str, Any]
    native_loading: Dict[str, Any]
    host_libraries: List[Dict[str, Any]]
    native_imports: List[NativeImport]
    warnings: List[EnvWarning] = field(default_factory=list)
    degraded: List[Dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every bundled native module imports, except those the build knows this interpreter goes without."""
        return all(item.ok or item.degraded for item in self.native_imports)

    def to_dict(self) -> Dict[str, Any]:
        document = asdict(self)
        document["ok"] = self.ok
        return document


def _safe_sha256(path: str, follow_symlinks: bool = False) -> Optional[str]:
    try:
        return sha256_path(path, follow_symlinks=follow_symlinks)
    except OSError:
        return None


def _glibc() -> Optional[str]:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION")
    except (ValueError, OSError):
        return None


def tool_facts() -> Dict[str, Any]:
    state = runtime.boot_state()
    build = runtime.build_info()
    facts: Dict[str, Any] = {
        "name": "bookgen-kit",
        "version": runtime.version(),
        "running_from": "pyz" if state else "source",
        "build_id": build["build_id"] if build else None,
        "pyz_path": state["archive"] if state else None,
        "pyz_sha256": _safe_sha256(state["archive"]) if state else None,
        "package_path": os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        "baked_recipients": runtime.baked_recipients(),
    }
    return facts


def interpreter_facts() -> Dict[str, Any]:
    try:
        exe_target = os.readlink("/proc/self/exe")
    except OSError:
        exe_target = None
    return {
        "executable": sys.executable,
        "exe": exe_target,
        "exe_deleted": bool(exe_target and exe_target.endswith(" (deleted)")),
        "sha256": _safe_sha256("/proc/self/exe", follow_symlinks=True),
        "implementation": sys.implementation.name,
        "version": sys.version.split()[0],
        "isolated": bool(sys.flags.isolated),
        "no_site": bool(sys.flags.no_site),
        "reexecuted": bool((runtime.boot_state() or {}).get("reexec")),
        "prefix": sys.prefix,
        "choice": runtime.interpreter_choice(),
        "timezone": runtime.timezone(),
        "build_pythons": runtime.python_range(),
        "forward": runtime.forward(),
    }


def _platform_facts() -> Dict[str, Any]:
    uname = os.uname()
    state = runtime.boot_state()
    target = None
    info = runtime.target_info()
    if state and info:
        target = {"name": state["target"], "python": info["python"], "machine": state["build"]["targets"].get(
                  state["target"], {}).get("machine", uname.machine), "glibc": info["glibc"], "pyroot": info["pyroot"],
                  "forward": runtime.forward() is not None}
    glibc = _glibc()
    tag = None
    if glibc and glibc.startswith("glibc "):
        tag = "manylinux_%s_%s" % (glibc.split()[1].replace(".", "_"), uname.machine)
    return {"system": uname.sysname, "kernel": uname.release, "machine": uname.machine, "libc": glibc,
            "platform_tag": tag, "target": target}


def _mapped_objects() -> List[str]:
    """File-backed shared objects mapped into this process (what the host lends us)."""
    paths = []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                parts = line.split(None, 5)
                if len(parts) < 6:
                    continue
                path = parts[5].strip()
                if path.startswith("/") and not path.startswith(("/proc/", "/dev/", "/memfd:")) and path not in paths:
                    paths.append(path)
    except OSError:
        pass
    return paths


def _host_libraries() -> List[Dict[str, Any]]:
    return [{"path": path, "sha256": _safe_sha256(path.replace(" (deleted)", ""))} for path in _mapped_objects()]


def _native_loading_facts() -> Dict[str, Any]:
    state = runtime.boot_state()
    if not state:
        return {"mode": "installed", "private_dirs": [], "loaded": [],
                "note": "running from source or a virtualenv: native code comes from site-packages"}
    return {"mode": state["mode"] or "none loaded yet", "forced_disk": state["forced_disk"],
            "private_dirs": list(state["private_dirs"]),
            "private_dirs_left": [d for d in state["private_dirs"] if os.path.exists(d)],
            "loaded": list(state["loaded"])}


def _check_psutil() -> str:
    import psutil

    return "psutil %s, %d processes visible" % (psutil.__version__, len(psutil.pids()))


def _check_cryptography() -> str:
    import cryptography
    from cryptography.hazmat.bindings._rust import openssl as rust_openssl

    return "cryptography %s, %s" % (cryptography.__version__, rust_openssl.openssl_version_text())


def _check_psycopg() -> str:
    import psycopg

    if psycopg.pq.__impl__ != "binary":
        raise ImportError("psycopg uses its %s implementation, not the bundled C one" % psycopg.pq.__impl__)
    version = psycopg.pq.version()
    return "psycopg %s, C implementation, libpq %d.%d" % (psycopg.__version__, version // 10000, version % 100)


def _check_zstandard() -> str:
    import zstandard

    if zstandard.backend != "cext":
        raise ImportError("zstandard uses its %s backend, not the C extension" % zstandard.backend)
    sample = b"bookgen-kit self-check " * 64
    if zstandard.ZstdDecompressor().decompress(zstandard.ZstdCompressor().compress(sample)) != sample:
        raise ImportError("zstandard round trip failed")
    return "zstandard %s, C backend, libzstd %s" % (zstandard.__version__, zstandard.ZSTD_VERSION)


# The component of runtime.degraded() each primary check depends on.
PRIMARY_COMPONENTS = {"psutil": "psutil", "cryptography": "cryptography", "psycopg": "psycopg-binary",
                      "zstandard": "zstandard"}

PRIMARY_CHECKS: Dict[str, Callable[[], str]] = {
    "psutil": _check_psutil,
    "cryptography": _check_cryptography,
    "psycopg": _check_psycopg,
    "zstandard": _check_zstandard,
}


def _run_import(name: str, check: Callable[[], str]) -> NativeImport:
    try:
        return NativeImport(module=name, ok=True, detail=check())
    except Exception as error:  # any failure to import native code is the finding itself
        return NativeImport(module=name, ok=False, error="%s: %s" % (type(error).__name__, error))


def _native_imports() -> List[NativeImport]:
    missing = {item["component"] for item in runtime.degraded()}
    results = []
    for name, check in PRIMARY_CHECKS.items():
        result = _run_import(name, check)
        result.degraded = PRIMARY_COMPONENTS[name] in missing
        results.append(result)
    info = runtime.target_info()
    if info:
        for module in sorted(info["native"]):
            result = _run_import(module, lambda m=module: "loaded from %s" % (
                getattr(importlib.import_module(m), "__file__", "?")))
            result.degraded = info["native"][module].get("dist") in missing
            results.append(result)
    return results


def _writable_by_others(path: str) -> Optional[str]:
    try:
        info = os.stat(path)
    except OSError:
        return None
    if info.st_uid not in (0, os.getuid()):
        return "owned by uid %d" % info.st_uid
    if info.st_mode & stat.S_IWOTH and not (stat.S_ISDIR(info.st_mode) and info.st_mode & stat.S_ISVTX):
        return "world-writable"
    if info.st_mode & stat.S_IWGRP and info.st_gid != 0:
        return "group-writable (gid %d)" % info.st_gid
    return None


def environment_warnings(tool: Dict[str, Any]) -> List[EnvWarning]:
    warnings: List[EnvWarning] = []
    for name in SUSPECT_VARIABLES:
        if os.environ.get(name):
            warnings.append(EnvWarning("env-" + name.lower(), "%s is set: %s" % (name, os.environ[name])))
    python_vars = sorted(name for name in os.environ if name.startswith("PYTHON"))
    if python_vars:
        warnings.append(EnvWarning("env-python", "PYTHON* variables are set (ignored under -I): %s" % ", ".join(python_vars)))
    try:
        from toolkit.host.hostfs import read_host_file

        text = read_host_file(LD_SO_PRELOAD, 1 << 20).decode("utf-8", "replace")  # never a FIFO; bounded
        entries = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        if entries:
            warnings.append(EnvWarning("ld-so-preload", "%s is not empty: %s" % (LD_SO_PRELOAD, ", ".join(entries))))
    except FileNotFoundError:
        pass
    except OSError as error:
        warnings.append(EnvWarning("ld-so-preload", "%s could not be read: %s" % (LD_SO_PRELOAD, error.strerror)))
    checked = set()
    for entry in sys.path:
        candidates = [entry]
        if tool["pyz_path"] and entry.startswith(tool["pyz_path"]):
            candidates = [tool["pyz_path"], os.path.dirname(tool["pyz_path"])]
        for candidate in candidates:
            if not candidate or candidate in checked or not os.path.exists(candidate):
                continue
            checked.add(candidate)
            why = _writable_by_others(candidate)
            if why:
                warnings.append(EnvWarning("writable-sys-path", "%s on sys.path is %s" % (candidate, why)))
    if not (sys.flags.isolated and sys.flags.no_site):
        warnings.append(EnvWarning("not-isolated", "the interpreter runs without -I -S: site-packages and .pth files took part"))
    newer = runtime.forward()
    if newer:
        warnings.append(EnvWarning("newer-python", "CPython %s is newer than this build (%s): the %s code runs from "
                                   "source with its abi3 native modules only" % (
                                       newer["python"], newer["range"], newer["from_python"])))
    for item in runtime.degraded():
        warnings.append(EnvWarning("degraded-" + item["component"], "%s unavailable (%s): %s" % (
            item["component"], item.get("reason", ""), item["effect"])))
    return warnings


def run_self_check() -> SelfCheckReport:
    tool = tool_facts()
    native_imports = _native_imports()  # before the loading facts, so they show what was loaded
    return SelfCheckReport(
        tool=tool,
        interpreter=interpreter_facts(),
        platform=_platform_facts(),
        native_loading=_native_loading_facts(),
        host_libraries=_host_libraries(),
        native_imports=native_imports,
        warnings=environment_warnings(tool),
        degraded=runtime.degraded(),
    )
