"""The zipapp itself: every interpreter, footprint on the host, lazy imports, reproducible builds."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import textwrap
import subprocess
from pathlib import Path

import pytest

from tests.conftest import PYTHON_VERSIONS, build_pyz, interpreter

HEAVY_MODULES = {"docker", "psycopg", "psycopg_binary", "cryptography", "zstandard", "redis", "psutil"}
DEBIAN_PYTHON = "/usr/bin/python3"


def run(argv, env=None, timeout=120, **kwargs):
    base = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
    if env:
        base.update(env)
    return subprocess.run(argv, capture_output=True, text=True, env=base, timeout=timeout, **kwargs)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def self_check(python: str, pyz: Path, *flags: str, env=None) -> dict:
    done = run([python, *flags, str(pyz), "self-check", "--json"], env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


ALL_INTERPRETERS = [pytest.param(v, id="cpython" + v) for v in PYTHON_VERSIONS] + [pytest.param("debian", id="debian")]


@pytest.mark.parametrize("version", ALL_INTERPRETERS)
@pytest.mark.parametrize("flags", [(), ("-I",), ("-S",)], ids=["plain", "-I", "-S"])
def test_every_interpreter_runs_version_and_self_check(pyz, version, flags):
    python = DEBIAN_PYTHON if version == "debian" else interpreter(version)
    done = run([python, *flags, str(pyz), "version", "--json"])
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert len(document["targets"]) == 10
    expected = "cp%s-manylinux_%s" % (run([python, "-c", "import sys;print('%d%d'%sys.version_info[:2])"]).stdout.strip(),
                                       os.uname().machine)
    assert document["current_target"] == expected
    report = self_check(python, pyz, *flags)
    assert report["ok"], [i for i in report["native_imports"] if not i["ok"]]
    modules = {item["module"]: item for item in report["native_imports"]}
    assert modules["psycopg"]["detail"].startswith("psycopg ") and "C implementation" in modules["psycopg"]["detail"]
    assert "OpenSSL" in modules["cryptography"]["detail"]
    assert "C backend" in modules["zstandard"]["detail"]
    assert "cryptography.hazmat.bindings._rust" in modules and "psycopg_binary._psycopg" in modules
    assert report["native_loading"]["mode"] == "memory"
    assert all(entry["origin"].startswith("/proc/self/fd/") for entry in report["native_loading"]["loaded"])
    assert report["interpreter"]["isolated"] and report["interpreter"]["no_site"]  # re-executed as -I -S
    assert report["tool"]["pyz_sha256"] == sha256(pyz)
    assert report["platform"]["target"]["name"] == expected


def test_every_target_has_its_own_locked_wheels(pyz):
    done = run([interpreter("3.11"), "-I", "-S", str(pyz), "version", "--json"])
    targets = {t["name"]: t for t in json.loads(done.stdout)["targets"]}
    assert set(targets) == {"cp%s-manylinux_%s" % (v.replace(".", ""), m)
                            for v in PYTHON_VERSIONS for m in ("x86_64", "aarch64")}
    for target in targets.values():
        assert target["bytecode"] == "pyc"
        assert {"click", "rich", "psutil", "docker", "psycopg", "psycopg_binary", "cryptography", "zstandard",
                "redis"} <= {name.lower() for name in target["dists"]}


def test_importlib_metadata_sees_bundled_distributions(pyz):
    # docker and others ask importlib.metadata for their own version.
    code = ("import sys; sys.path.insert(0, %r); import _bkboot; _bkboot.setup();"
            "import importlib.metadata as m, docker;"
            "print(m.version('docker'), docker.__version__, m.version('psycopg-binary'), m.version('Rich'))") % str(pyz)
    done = run([interpreter("3.12"), "-I", "-S", "-c", code])
    assert done.returncode == 0, done.stderr
    docker_meta, docker_attr, psycopg_binary, rich = done.stdout.split()
    assert docker_meta == docker_attr
    assert re.match(r"^\d+\.\d+", psycopg_binary) and re.match(r"^\d+\.\d+", rich)


def _listing(path: Path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_self_check_leaves_home_and_tmpdir_empty(pyz, tmp_path, mode):
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    tmp.mkdir()
    env = {"HOME": str(home), "TMPDIR": str(tmp)}
    if mode == "disk":
        env["BOOKGEN_EXTRACT"] = "disk"
    shm_before = set(os.listdir("/dev/shm"))
    report = self_check(interpreter("3.11"), pyz, env=env)
    assert report["ok"]
    assert report["native_loading"]["mode"] == mode
    assert _listing(home) == [] and _listing(tmp) == []
    if mode == "disk":
        assert report["native_loading"]["forced_disk"] is True
        dirs = report["native_loading"]["private_dirs"]
        assert dirs and all(d.startswith("/dev/shm/bookgen-kit-") for d in dirs)
        assert report["native_loading"]["private_dirs_left"] == []
        assert not any(os.path.exists(d) for d in dirs)
    assert set(os.listdir("/dev/shm")) - shm_before == set()


def test_disk_mode_falls_back_to_tmpdir_and_cleans_it(pyz, tmp_path):
    """With /dev/shm unwritable (read-only in a private mount namespace), TMPDIR is used and left empty."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    script = "mount -t tmpfs -o ro tmpfs /dev/shm && exec %s %s self-check --json" % (interpreter("3.11"), pyz)
    done = run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
               env={"TMPDIR": str(tmp), "BOOKGEN_EXTRACT": "disk", "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["ok"]
    assert all(d.startswith(str(tmp)) for d in report["native_loading"]["private_dirs"])
    assert _listing(tmp) == []


CREATING_CALLS = re.compile(r"^\d+\s+(openat|open|creat|mkdir|mkdirat|rename|renameat2?|unlink|unlinkat)\((.*)$")


def _created_paths(trace: str):
    """(call, path) for every strace line that creates, renames or removes a file."""
    events = []
    for line in trace.splitlines():
        m = CREATING_CALLS.match(line)
        if not m:
            continue
        call, rest = m.groups()
        if call in ("openat", "open") and "O_CREAT" not in rest:
            continue
        if "= -1" in rest:
            continue
        paths = re.findall(r'"([^"]*)"', rest)
        events.append((call, paths[0] if paths else "?"))
    return events


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_strace_shows_no_file_created_outside_proc_and_private_dir(pyz, tmp_path, mode):
    log = tmp_path / "strace.log"
    env = {"HOME": str(tmp_path), "TMPDIR": str(tmp_path)}
    if mode == "disk":
        env["BOOKGEN_EXTRACT"] = "disk"
    done = run(["strace", "-f", "-qq", "-o", str(log), "-e", "trace=openat,open,creat,mkdir,mkdirat,rename,renameat,"
                "renameat2,unlink,unlinkat", interpreter("3.11"), str(pyz), "self-check", "--json"], env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    events = [e for e in _created_paths(log.read_text()) if e[1] != str(log)]
    private = report["native_loading"]["private_dirs"]
    outside = [e for e in events if not e[1].startswith("/proc/") and not any(e[1].startswith(d) for d in private)]
    assert outside == []
    if mode == "memory":
        assert events == []
    else:
        assert events and all(any(e[1].startswith(d) for d in private) for e in events)


def test_memory_mode_works_with_readonly_home_and_full_tmpdir(pyz, tmp_path):
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    tmp.mkdir()
    python = interpreter("3.11")
    script = (
        "set -e; mount -t tmpfs -o ro,size=1m tmpfs %(home)s; mount -t tmpfs -o size=1m tmpfs %(tmp)s; "
        "dd if=/dev/zero of=%(tmp)s/fill bs=64k 2>/dev/null || true; "
        "exec %(python)s %(pyz)s self-check --json"
    ) % {"home": home, "tmp": tmp, "python": python, "pyz": pyz}
    done = run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
               env={"HOME": str(home), "TMPDIR": str(tmp)})
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] and report["native_loading"]["mode"] == "memory"


def _imported_modules(stderr: str):
    return {line.split("|")[-1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


def test_help_imports_none_of_the_heavy_dependencies(pyz):
    done = run([interpreter("3.11"), "-X", "importtime", "-I", "-S", str(pyz), "--help"])
    assert done.returncode == 0 and "self-check" in done.stdout
    imported = _imported_modules(done.stderr)
    assert "click" in imported and "toolkit.cli" in imported  # the probe does see imports
    assert {m.split(".")[0] for m in imported} & HEAVY_MODULES == set()


def test_help_from_source_imports_none_of_the_heavy_dependencies():
    import sys

    code = ("import sys\nfrom toolkit.cli import main\nrc = main(['--help'])\n"
            "print('MODULES', ' '.join(sorted(sys.modules)))\n")
    done = run([sys.executable, "-c", code], env={"PYTHONPATH": str(Path(__file__).parent.parent)})
    assert done.returncode == 0, done.stderr
    modules = set(done.stdout.split("MODULES", 1)[1].split())
    assert "click" in modules
    assert {m.split(".")[0] for m in modules} & HEAVY_MODULES == set()


@pytest.mark.parametrize("version", ["3.8"])
def test_too_old_interpreter_gets_one_clear_line(pyz, version):
    done = run([interpreter(version), str(pyz), "version"])
    assert done.returncode == 4
    assert done.stderr.strip().count("\n") == 0
    assert "unsupported interpreter: Python 3.8" in done.stderr and "3.9 to 3.13" in done.stderr


def test_other_architecture_gets_one_clear_line(tmp_path):
    other = "aarch64" if os.uname().machine == "x86_64" else "x86_64"
    built = build_pyz(tmp_path / "other.pyz", "--targets", "cp311-manylinux_" + other)
    done = run([interpreter("3.11"), str(built), "version"])
    assert done.returncode == 4
    assert done.stderr.count("\n") == 1
    assert "unsupported interpreter: CPython 3.11 on %s" % os.uname().machine in done.stderr
    assert "supports CPython 3.11 on Linux %s" % other in done.stderr


def test_musl_gets_one_clear_line(pyz):
    """FAKE: no musl interpreter exists on this machine, so os.confstr is made to answer as musl's does."""
    code = ("import os, sys; sys.path.insert(0, %r); import _bkboot\n"
            "def musl(name): raise ValueError('unrecognized configuration name')\n"
            "os.confstr = musl\n"
            "_bkboot._select_target(_bkboot.read_build_info(%r))\n") % (str(pyz), str(pyz))
    done = run([interpreter("3.11"), "-I", "-S", "-c", code])
    assert done.returncode == 4
    assert done.stderr.count("\n") == 1
    assert "no glibc: musl or another libc" in done.stderr and "glibc >= 2.28" in done.stderr


def test_build_is_reproducible(pyz, tmp_path):
    again = build_pyz(tmp_path / "again.pyz", "--targets", "all")
    assert sha256(again) == sha256(pyz)


def test_recipients_are_baked_in_and_shown_by_version(tmp_path):
    recipient = "age1" + "q" * 58
    built = build_pyz(tmp_path / "team.pyz", "--targets", "host", "--recipient", recipient)
    done = run([interpreter("%d.%d" % __import__("sys").version_info[:2]), str(built), "version", "--json"])
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["recipients"] == [recipient]


def test_build_refuses_a_malformed_recipient(tmp_path):
    import sys

    done = run([sys.executable, str(Path(__file__).parent.parent / "build.py"), "--targets", "host",
                "--recipient", "not-a-key", "-o", str(tmp_path / "x.pyz")])
    assert done.returncode == 2
    assert "not an age recipient" in done.stderr
    assert not (tmp_path / "x.pyz").exists()


def test_no_bytecode_cache_is_written_anywhere(pyz, tmp_path):
    copy = tmp_path / "stick" / "bookgen-kit.pyz"
    copy.parent.mkdir()
    shutil.copy(pyz, copy)
    self_check(interpreter("3.13"), copy, env={"HOME": str(tmp_path)})
    assert sorted(os.listdir(copy.parent)) == ["bookgen-kit.pyz"]
    assert not list(tmp_path.rglob("__pycache__"))


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP", "SIGINT"])
def test_disk_mode_private_dir_is_removed_on_signals(pyz, tmp_path, signame):
    code = textwrap.dedent("""
        import os, signal, sys, time
        # as in a terminal session (a CI runner may start us with SIGHUP/SIGINT ignored)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.path.insert(0, %r)
        import _bkboot
        _bkboot.setup()
        loader = sys.meta_path[0]
        loader._mode()
        path, done = loader._place_on_disk("libexample.so", b"not really a library")
        print(path, flush=True)
        os.kill(os.getpid(), signal.%s)
        time.sleep(10)
    """) % (str(pyz), signame)
    done = run([interpreter("3.11"), "-I", "-S", "-c", code], env={"BOOKGEN_EXTRACT": "disk", "TMPDIR": str(tmp_path)})
    placed = done.stdout.strip()
    assert placed.startswith("/dev/shm/bookgen-kit-")
    assert done.returncode != 0  # killed by the signal (or KeyboardInterrupt for SIGINT)
    assert not os.path.exists(os.path.dirname(placed))


def test_self_check_warns_about_a_non_empty_ld_so_preload(pyz, tmp_path):
    """/etc/ld.so.preload is planted only inside a private mount namespace, over a copy of /etc."""
    etc = tmp_path / "etc"
    shutil.copytree("/etc", etc, symlinks=True, ignore_dangling_symlinks=True)
    lib = next(p for p in ("/usr/lib/x86_64-linux-gnu/libm.so.6", "/usr/lib/aarch64-linux-gnu/libm.so.6")
               if os.path.exists(p))
    (etc / "ld.so.preload").write_text(lib + "\n")
    script = "mount --bind %s /etc && exec %s -I -S %s self-check --json" % (etc, interpreter("3.11"), pyz)
    done = run(["unshare", "-m", "--propagation", "private", "sh", "-c", script])
    assert done.returncode == 0, done.stderr
    warnings = {w["code"]: w["message"] for w in json.loads(done.stdout)["warnings"]}
    assert lib in warnings["ld-so-preload"]
