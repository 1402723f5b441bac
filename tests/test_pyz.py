"""The zipapp itself: every interpreter, how it picks one, footprint on the host, lazy imports, reproducible builds."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from tests.conftest import build_pyz, interpreter

ROOT = Path(__file__).resolve().parent.parent
HEAVY_MODULES = {"docker", "psycopg", "psycopg_binary", "cryptography", "zstandard", "redis", "psutil"}
DEBIAN_PYTHON = "/usr/bin/python3"
# The CPython versions the pyz has targets for, and those of them with an interpreter on this machine.
BUILD_PYTHONS = ("3.8", "3.9", "3.10", "3.11", "3.12", "3.13", "3.14", "3.15")
HERE_PYTHONS = ("3.8", "3.9", "3.10", "3.11", "3.12", "3.13")
MACHINE = os.uname().machine


def run(argv, env=None, timeout=120, **kwargs):
    base = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
    if env:
        base.update(env)
    base = {k: v for k, v in base.items() if v is not None}
    return subprocess.run(argv, capture_output=True, text=True, env=base, timeout=timeout, **kwargs)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def self_check(python: str, pyz: Path, *flags: str, env=None) -> dict:
    done = run([python, *flags, str(pyz), "self-check", "--json"], env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def target_name(version: str, machine: str = MACHINE) -> str:
    return "cp%s-manylinux_%s" % (version.replace(".", ""), machine)


def bin_dir(path: Path, links: dict) -> Path:
    """A directory holding only the named symlinks to real interpreters (a PATH of its own)."""
    path.mkdir(parents=True, exist_ok=True)
    for name, target in links.items():
        os.symlink(target, path / name)
    return path


def build_info(pyz: Path) -> dict:
    with zipfile.ZipFile(pyz) as archive:
        return json.loads(archive.read("BUILD.json"))


ALL_INTERPRETERS = [pytest.param(v, id="cpython" + v) for v in HERE_PYTHONS] + [pytest.param("debian", id="debian")]


@pytest.mark.parametrize("version", ALL_INTERPRETERS)
@pytest.mark.parametrize("flags", [(), ("-I",), ("-S",)], ids=["plain", "-I", "-S"])
def test_every_interpreter_runs_version_and_self_check(pyz, version, flags):
    python = DEBIAN_PYTHON if version == "debian" else interpreter(version)
    done = run([python, *flags, str(pyz), "version", "--json"])
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert len(document["targets"]) == len(BUILD_PYTHONS) * 2
    assert document["pythons"] == list(BUILD_PYTHONS)
    expected = target_name(run([python, "-c", "import sys;print('%d.%d'%sys.version_info[:2])"]).stdout.strip())
    assert document["current_target"] == expected
    assert document["interpreter"]["chosen_by"] == "command line"
    assert document["interpreter"]["isolation"] == "-I -S (re-executed)"
    assert document["timezone"]["TZ"] == "UTC0" and document["timezone"]["host_TZ"] is None  # run() sets no TZ
    report = self_check(python, pyz, *flags)
    assert report["ok"], [i for i in report["native_imports"] if not i["ok"]]
    assert all(i["ok"] for i in report["native_imports"]) and report["degraded"] == []
    modules = {item["module"]: item for item in report["native_imports"]}
    assert modules["psycopg"]["detail"].startswith("psycopg ") and "C implementation" in modules["psycopg"]["detail"]
    assert "OpenSSL" in modules["cryptography"]["detail"]
    assert "C backend" in modules["zstandard"]["detail"]
    assert "cryptography.hazmat.bindings._rust" in modules and "psycopg_binary._psycopg" in modules
    assert report["native_loading"]["mode"] == "memory"
    assert all(entry["origin"].startswith("/proc/self/fd/") for entry in report["native_loading"]["loaded"])
    assert report["interpreter"]["isolated"] and report["interpreter"]["no_site"]  # re-executed as -I -S
    assert report["interpreter"]["reexecuted"] is True
    assert report["interpreter"]["choice"]["executable"] == python
    assert report["tool"]["pyz_sha256"] == sha256(pyz)
    assert report["platform"]["target"]["name"] == expected


@pytest.mark.parametrize("version", HERE_PYTHONS)
def test_every_interpreter_captures_a_bundle_that_verify_accepts(pyz, tmp_path, version):
    """The main job on each CPython: a key from the pyz's own keygen, a capture, verify with the key."""
    python = interpreter(version)
    kit = [python, "-I", "-S", str(pyz)]
    key, out = tmp_path / "team.key", tmp_path / "evidence"
    assert run(kit + ["keygen", "-o", str(key)]).returncode == 0
    recipient = run(kit + ["keygen", "-y", str(key)]).stdout.strip()
    assert recipient.startswith("age1")
    done = run(kit + ["--json", "capture", "--only", "system", "-r", recipient, "--out", str(out),
                      "--allow-same-disk", "--case", "PY" + version.replace(".", "")], timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    bundles = [p for p in out.iterdir() if p.name.endswith(".tar.zst.age")]
    assert len(bundles) == 1, sorted(p.name for p in out.iterdir())
    verified = run(kit + ["--json", "verify", "-i", str(key), str(bundles[0])], timeout=300)
    assert verified.returncode == 0, verified.stdout[-3000:] + verified.stderr[-3000:]
    assert all(check["ok"] for check in json.loads(verified.stdout)["checks"])


def test_every_target_has_its_own_locked_wheels(pyz):
    done = run([interpreter("3.11"), "-I", "-S", str(pyz), "version", "--json"])
    targets = {t["name"]: t for t in json.loads(done.stdout)["targets"]}
    assert set(targets) == {target_name(v, m) for v in BUILD_PYTHONS for m in ("x86_64", "aarch64")}
    for name, target in targets.items():
        # sourceless .pyc where the version's interpreter is here; source otherwise (pass --python X.Y=PATH)
        assert target["bytecode"] == ("pyc" if target["python"] in HERE_PYTHONS else target["bytecode"])
        assert target["bytecode"] in ("pyc", "source")
        wanted = {"click", "rich", "psutil", "docker", "psycopg", "psycopg_binary", "cryptography", "zstandard", "redis"}
        assert wanted - set(target["unavailable"]) <= {n.lower() for n in target["dists"]}, name
    # Older releases where a target needs them; the registry has no zstandard wheel for 3.15 yet.
    assert targets["cp38-manylinux_x86_64"]["dists"]["click"].startswith("8.1.")
    assert "zstandard" in targets["cp315-manylinux_x86_64"]["unavailable"]


def test_abi3_wheels_are_shared_between_targets():
    """One abi3 wheel per project and version serves every target it runs on (stored once in the pyz)."""
    by_project: dict = {}
    for lock in sorted((ROOT / "locks").glob("*.txt")):
        machine = lock.stem.split("manylinux_")[1]
        for line in lock.read_text().splitlines():
            m = re.search(r"# (\S+?)-(\S+?)-(cp3\d+)-(abi3\S*?)-\S+\.whl$", line)
            if m:
                by_project.setdefault((m.group(1), m.group(2), machine), set()).add(m.group(0))
    assert by_project, "no abi3 wheel in the locks"
    assert all(len(files) == 1 for files in by_project.values()), by_project
    assert {"cryptography", "bcrypt", "psutil"} <= {project for project, _, _ in by_project}


def test_python38_compiles_every_file_and_old_pythons_parse_the_entry_points():
    """Library code stays valid Python 3.8 (compiled by 3.8 itself); what an unsupported interpreter reads first
    (__main__.py, _bkfind.py) stays valid down to 2.7."""
    files = sorted(str(p) for p in list((ROOT / "toolkit").rglob("*.py")) + list((ROOT / "bootstrap").glob("*.py")))
    code = ("import sys\nbad = []\nfor f in sys.argv[1:]:\n    try:\n        compile(open(f, 'rb').read(), f, 'exec')\n"
            "    except SyntaxError as e:\n        bad.append('%s:%s: %s' % (f, e.lineno, e.msg))\nprint('\\n'.join(bad))\n")
    done = run([interpreter("3.8"), "-I", "-S", "-c", code, *files])
    assert done.returncode == 0 and done.stdout.strip() == "", done.stdout + done.stderr
    entry = [str(ROOT / "bootstrap" / "__main__.py"), str(ROOT / "bootstrap" / "_bkfind.py")]
    for version in ("2.7", "3.6", "3.7"):
        done = run([interpreter(version), "-S", "-c", code, *entry])
        assert done.returncode == 0 and done.stdout.strip() == "", (version, done.stdout, done.stderr)


def test_every_toolkit_module_imports_under_python38(pyz):
    """Module-level code (type aliases, decorators, defaults) runs on the oldest target, from the pyz."""
    modules = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts).replace(".__init__", "")
                     for p in (ROOT / "toolkit").rglob("*.py") if p.name != "__main__.py")
    code = ("import importlib, sys; sys.path.insert(0, %r); import _bkboot; _bkboot.setup(); failed = []\n"
            "for name in sys.argv[1:]:\n"
            "    try:\n        importlib.import_module(name)\n"
            "    except Exception as error:\n        failed.append('%%s: %%s: %%s' %% (name, type(error).__name__, error))\n"
            "print('\\n'.join(failed))\n") % str(pyz)
    done = run([interpreter("3.8"), "-I", "-S", "-c", code, *modules], timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "", done.stdout + done.stderr[-3000:]


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


# --------------------------------------------------------------------------- the interpreter the pyz finds itself
def test_shell_preamble_runs_with_only_a_versioned_python_on_path(pyz, tmp_path):
    """No python3 at all: ./kit.pyz and sh kit.pyz find python3.12 (real interpreters, PATH holding nothing else)."""
    path = bin_dir(tmp_path / "bin", {"python3.12": interpreter("3.12")})
    for argv in ([str(pyz)], ["/bin/sh", str(pyz)]):
        done = run(argv + ["self-check", "--json"], env={"PATH": str(path)})
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        assert report["ok"] and report["platform"]["target"]["name"] == target_name("3.12")
        choice = report["interpreter"]["choice"]
        assert choice["chosen_by"] == "preamble" and choice["executable"] == str(path / "python3.12")
        assert choice["isolation"] == "-I -S" and not choice["reexecuted"]
        assert [(c["name"], c["verdict"]) for c in choice["considered"]] == [("python3.12", "target")]
        assert "python3.12" in choice["why"]


def test_shell_preamble_passes_over_a_too_old_python3(pyz, tmp_path):
    """python3 is 3.7 (too old), python3.10 is there: the preamble runs python3.10 and says why."""
    path = bin_dir(tmp_path / "bin", {"python3": interpreter("3.7"), "python3.10": interpreter("3.10")})
    done = run([str(pyz), "version", "--json"], env={"PATH": str(path)})
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert document["current_target"] == target_name("3.10")
    choice = document["interpreter"]
    considered = [(c["name"], c["version"], c["verdict"]) for c in choice["considered"]]
    assert considered == [("python3", "cpython-3.7", "older"), ("python3.10", "cpython-3.10", "target")]
    assert "passed over" in choice["why"] and "3.7" in choice["why"]


def test_shell_preamble_uses_platform_python(pyz, tmp_path):
    """RHEL's /usr/libexec/platform-python (here a real 3.9 mounted there in a private mount namespace)."""
    libexec = tmp_path / "libexec"
    libexec.mkdir()
    os.symlink(interpreter("3.9"), libexec / "platform-python")
    empty = tmp_path / "empty"
    empty.mkdir()
    script = "mount --bind %s /usr/libexec && PATH=%s exec /bin/sh %s version --json" % (libexec, empty, pyz)
    done = run(["unshare", "-m", "--propagation", "private", "/bin/sh", "-c", script], env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert document["current_target"] == target_name("3.9")
    assert document["interpreter"]["executable"] == "/usr/libexec/platform-python"


def test_shell_preamble_without_a_suitable_python_says_what_it_found(pyz, tmp_path):
    path = bin_dir(tmp_path / "bin", {"python3": interpreter("3.7"), "python3.6": interpreter("3.6")})
    done = run([str(pyz), "version"], env={"PATH": str(path)})
    assert done.returncode == 4
    assert done.stderr.count("\n") == 1 and done.stdout == ""
    assert "no suitable interpreter" in done.stderr and "3.8 3.9" in done.stderr
    assert str(path / "python3") in done.stderr and "cpython-3.7: older" in done.stderr


def test_shell_preamble_sets_tz_so_a_fifo_at_etc_localtime_cannot_hang_it(pyz, tmp_path):
    """CPython opens /etc/localtime as it starts; with TZ unset the preamble gives it TZ=UTC0 (no file at all)."""
    fifo = tmp_path / "localtime"
    os.mkfifo(fifo)
    path = bin_dir(tmp_path / "bin", {"python3.11": interpreter("3.11")})
    script = "mount --bind %s /etc/localtime && PATH=%s exec %s version --json" % (fifo, path, pyz)
    done = run(["unshare", "-m", "--propagation", "private", "/bin/sh", "-c", script], env={"TZ": None}, timeout=60)
    assert done.returncode == 0, done.stderr
    zone = json.loads(done.stdout)["timezone"]
    assert zone == {"host_TZ": None, "TZ": "UTC0", "set_by_bookgen_kit": True}
    kept = run([str(pyz), "version", "--json"], env={"PATH": str(path), "TZ": "Europe/Berlin"})
    assert json.loads(kept.stdout)["timezone"] == {"host_TZ": "Europe/Berlin", "TZ": "Europe/Berlin",
                                                   "set_by_bookgen_kit": False}


@pytest.mark.parametrize("version", ["2.7", "3.6", "3.7"])
def test_too_old_interpreter_gets_one_clear_line_naming_one_that_works(pyz, tmp_path, version):
    path = bin_dir(tmp_path / "bin", {"python3.11": interpreter("3.11")})
    done = run([interpreter(version), str(pyz), "version"], env={"PATH": str(path)})
    assert done.returncode == 4
    assert done.stderr.count("\n") == 1
    assert "unsupported interpreter: Python %s" % version in done.stderr and "3.8 to 3.15" in done.stderr
    assert "on this host %s (3.11)" % (path / "python3.11") in done.stderr and "would work" in done.stderr


def test_other_architecture_gets_one_clear_line(tmp_path):
    other = "aarch64" if MACHINE == "x86_64" else "x86_64"
    built = build_pyz(tmp_path / "other.pyz", "--targets", "cp311-manylinux_" + other)
    done = run([interpreter("3.11"), str(built), "version"])
    assert done.returncode == 4
    assert done.stderr.count("\n") == 1
    assert "unsupported interpreter: CPython 3.11 on %s" % MACHINE in done.stderr
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


# --------------------------------------------------------------------------- newer and older than the build
@pytest.fixture(scope="module")
def host_pyz(tmp_path_factory) -> Path:
    """The build for this machine's 3.11 only: 3.12 and 3.13 are newer than it knows."""
    return build_pyz(tmp_path_factory.mktemp("host") / "kit.pyz", "--targets", target_name("3.11"))


@pytest.mark.parametrize("version", ["3.12", "3.13"])
def test_newer_python_than_the_build_runs_degraded_with_a_warning(host_pyz, tmp_path, version):
    """What has abi3 native code (psutil) runs; what has not (zstandard, psycopg's C implementation, cffi and
    so cryptography, whose abi3 module imports cffi's backend) is reported unavailable, and a command that
    needs it is refused in one line that names an interpreter that would work."""
    python = interpreter(version)
    path = bin_dir(tmp_path / "bin", {"python3.11": interpreter("3.11")})
    env = {"PATH": "%s:/usr/bin:/bin" % path}
    done = run([python, str(host_pyz), "self-check", "--json"], env=env)
    assert done.returncode == 0, done.stderr
    warning = [line for line in done.stderr.splitlines() if "warning" in line]
    assert len(warning) == 1
    assert "CPython %s is newer than this build (CPython 3.11)" % version in warning[0]
    assert "zstandard" in warning[0] and "%s (3.11)" % (path / "python3.11") in warning[0]
    report = json.loads(done.stdout)
    assert report["ok"]
    assert report["interpreter"]["forward"]["from_target"] == target_name("3.11")
    degraded = {item["component"]: item for item in report["degraded"]}
    assert set(degraded) == {"zstandard", "psycopg-binary", "cffi", "cryptography"}
    assert "gzip" in degraded["zstandard"]["effect"] and degraded["cryptography"]["reason"] == "it needs cffi"
    imports = {item["module"]: item for item in report["native_imports"]}
    assert imports["psutil"]["ok"] and imports["psutil._psutil_linux"]["ok"] and imports["bcrypt._bcrypt"]["ok"]
    assert not imports["zstandard"]["ok"] and imports["zstandard"]["degraded"]
    assert not imports["cryptography"]["ok"] and imports["cryptography"]["degraded"]
    assert {w["code"] for w in report["warnings"]} >= {"newer-python", "degraded-zstandard", "degraded-cryptography"}
    # Encrypting needs cryptography: refused, exit 4, naming the interpreter that has it.
    kit = [python, "-I", "-S", str(host_pyz)]
    done = run(kit + ["capture", "--only", "system", "-r", "age1" + "q" * 58, "--out", str(tmp_path / "out"),
                      "--allow-same-disk"], env=env)
    assert done.returncode == 4, done.stderr
    errors = [line for line in done.stderr.splitlines() if "warning" not in line]
    assert errors[0].startswith("bookgen-kit: error: cryptography is unavailable with this interpreter")
    assert "%s (3.11)" % (path / "python3.11") in errors[1]
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    # A gzip bundle (made by 3.11) verifies under the newer CPython.
    out = tmp_path / "gzip"
    made = run([interpreter("3.11"), str(host_pyz), "capture", "--only", "system", "--no-encrypt", "--compression",
                "gzip", "--out", str(out), "--allow-same-disk"], timeout=300)
    assert made.returncode == 0, made.stderr[-2000:]
    bundle = next(p for p in out.iterdir() if p.name.endswith(".tar.gz"))
    verified = run(kit + ["--json", "verify", str(bundle)], env=env, timeout=300)
    assert verified.returncode == 0, verified.stdout[-2000:] + verified.stderr[-2000:]


def test_preamble_prefers_a_target_over_a_newer_python3(host_pyz, tmp_path):
    path = bin_dir(tmp_path / "bin", {"python3": interpreter("3.13"), "python3.11": interpreter("3.11")})
    done = run([str(host_pyz), "version", "--json"], env={"PATH": str(path)})
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert document["current_target"] == target_name("3.11") and document["forward"] is None
    assert [c["verdict"] for c in document["interpreter"]["considered"]] == ["newer", "target"]
    only_newer = bin_dir(tmp_path / "newer", {"python3": interpreter("3.13")})
    done = run(["/bin/sh", str(host_pyz), "version", "--json"], env={"PATH": str(only_newer)})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["forward"]["python"] == "3.13" and "newer than this build" in done.stderr


def test_older_python_than_the_build_is_refused_naming_one_that_works(host_pyz, tmp_path):
    path = bin_dir(tmp_path / "bin", {"python3.11": interpreter("3.11")})
    done = run([interpreter("3.10"), str(host_pyz), "version"], env={"PATH": str(path)})
    assert done.returncode == 4 and done.stderr.count("\n") == 1
    assert "unsupported interpreter: Python 3.10" in done.stderr and "needs CPython 3.11 " in done.stderr
    assert "on this host %s (3.11)" % (path / "python3.11") in done.stderr


def test_a_version_without_its_interpreter_ships_source_that_runs(tmp_path):
    """--python 3.12=none: no 3.12 interpreter at build time, so its code ships as source; a real 3.12 runs it."""
    built = build_pyz(tmp_path / "src.pyz", "--targets", target_name("3.12"), "--python", "3.12=none")
    info = build_info(built)
    pyroot = info["targets"][target_name("3.12")]["pyroot"]
    assert info["pyroots"][pyroot]["bytecode"] == "source"
    assert info["forward"][MACHINE]["pyroot"] == pyroot  # a newer CPython shares the same source packs
    assert not any(name.startswith("boot/") for name in zipfile.ZipFile(built).namelist())
    report = self_check(interpreter("3.12"), built)
    assert report["ok"] and report["degraded"] == []


def test_build_compiles_with_an_interpreter_inside_a_chroot(tmp_path):
    """--python X.Y=WRAPPER, the wrapper running `chroot ROOT /usr/bin/python3.11`: sources and bytecode go
    through stdin and stdout, so nothing of the build's paths has to exist inside the root."""
    root = tmp_path / "root"
    for name in ("usr", "tmp", "proc"):
        (root / name).mkdir(parents=True)
    for link in ("bin", "lib", "lib64", "sbin"):
        if os.path.islink("/" + link):
            os.symlink(os.readlink("/" + link), root / link)
    wrapper = tmp_path / "python3.11-in-chroot"
    wrapper.write_text("#!/bin/sh\nexec unshare -m --propagation private /bin/sh -c "
                       "'mount --bind -o ro /usr %s/usr && exec /usr/sbin/chroot %s /usr/bin/python3.11 \"$@\"' sh \"$@\"\n"
                       % (root, root))
    wrapper.chmod(0o755)
    built = build_pyz(tmp_path / "chroot.pyz", "--targets", target_name("3.11"), "--python", "3.11=%s" % wrapper)
    pyroot = build_info(built)["pyroots"]["py/cp311"]
    assert pyroot["bytecode"] == "pyc"
    debian = run(["/usr/bin/python3.11", "-c", "import sys; print(sys.version.split()[0])"]).stdout.strip()
    assert pyroot["compiler"] == "CPython " + debian
    assert self_check(interpreter("3.11"), built)["ok"]


# --------------------------------------------------------------------------- footprint
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


# --------------------------------------------------------------------------- start-up
def _imported_modules(stderr: str):
    return {line.split("|")[-1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


def test_help_imports_none_of_the_heavy_dependencies(pyz):
    done = run([interpreter("3.11"), "-X", "importtime", "-I", "-S", str(pyz), "--help"])
    assert done.returncode == 0 and "self-check" in done.stdout
    imported = _imported_modules(done.stderr)
    assert "click" in imported and "toolkit.cli" in imported  # the probe does see imports
    assert {m.split(".")[0] for m in imported} & HEAVY_MODULES == set()


def test_help_from_source_imports_none_of_the_heavy_dependencies():
    code = ("import sys\nfrom toolkit.cli import main\nrc = main(['--help'])\n"
            "print('MODULES', ' '.join(sorted(sys.modules)))\n")
    done = run([sys.executable, "-c", code], env={"PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    modules = set(done.stdout.split("MODULES", 1)[1].split())
    assert "click" in modules
    assert {m.split(".")[0] for m in modules} & HEAVY_MODULES == set()


def test_help_runs_in_the_first_process_and_everything_else_re_executes(pyz, tmp_path):
    """--help and usage need no isolation (the host's site has run already): no second interpreter start-up.
    Any other command is re-executed as -I -S; a PYTHON* variable sends help through the re-execution too."""
    def execs(*args, env=None):
        log = tmp_path / "execve.log"
        done = run(["strace", "-f", "-qq", "-o", str(log), "-e", "trace=execve", interpreter("3.11"), str(pyz), *args],
                   env=env)
        assert done.returncode in (0, 2), done.stderr[-2000:]  # usage exits 2, as click does from source
        return [line for line in log.read_text().splitlines() if "execve(" in line and "= 0" in line]

    assert len(execs("--help")) == 1
    assert len(execs()) == 1  # usage
    assert len(execs("--version")) == 1
    assert len(execs("version")) == 2
    assert len(execs("--help", env={"PYTHONPATH": str(tmp_path)})) == 2


def test_help_in_the_first_process_uses_no_host_module_of_a_bundled_name(pyz, tmp_path):
    """A host site-packages whose .pth imports its own `click` and installs a meta path finder: --help
    still prints our click's help, from the pyz."""
    site = tmp_path / "site"
    (site / "click").mkdir(parents=True)
    (site / "click" / "__init__.py").write_text("raise SystemExit('host click imported')\n")
    (site / "evil").mkdir()
    (site / "evil" / "__init__.py").write_text(textwrap.dedent("""
        class Finder:
            def find_spec(self, name, path=None, target=None):
                if name.partition('.')[0] in ('click', 'toolkit', 'rich'):
                    raise SystemExit('host finder asked for ' + name)
                return None
    """))
    (site / "zz.pth").write_text("import sys, evil; sys.modules['click'] = evil; sys.meta_path.insert(0, evil.Finder())\n")
    venv = tmp_path / "venv"
    done = run([interpreter("3.11"), "-m", "venv", "--without-pip", str(venv)])
    assert done.returncode == 0, done.stderr
    target = next(venv.glob("lib/python3.*/site-packages"))
    for item in site.iterdir():
        shutil.move(str(item), str(target / item.name))
    done = run([str(venv / "bin" / "python"), str(pyz), "--help"])
    assert done.returncode == 0, done.stderr
    assert "self-check" in done.stdout and "Commands" in done.stdout


# --------------------------------------------------------------------------- the build
def test_build_is_reproducible(pyz, tmp_path):
    again = build_pyz(tmp_path / "again.pyz", "--targets", "all")
    assert sha256(again) == sha256(pyz)


def _readelf(path: Path, *flags: str) -> str:
    done = run(["/usr/bin/readelf", "-W", *flags, str(path)])
    assert done.returncode == 0 and not done.stderr, done.stderr
    return done.stdout


def test_native_code_keeps_every_mapped_byte_and_nothing_the_loader_never_reads(pyz, tmp_path):
    """Each native blob against its wheel's file, judged by readelf: the same program headers,
    dynamic symbols and mapped bytes (but where the section headers are), no DWARF, no .symtab;
    cryptography's and zstandard's stored uncompressed, the rest deflated."""
    entries = {}
    for target in build_info(pyz)["targets"].values():
        for relpath, entry in list(target["native"].items()) + list(target["libs"].items()):
            entries[entry["blob"]] = (entry.get("path", relpath), entry)
    wheels = sorted((ROOT / "build" / "wheels").glob("*.whl"))
    compared = debug_removed = 0
    with zipfile.ZipFile(pyz) as archive:
        for blob, (relpath, entry) in sorted(entries.items()):
            info = archive.getinfo(blob)
            stored = info.compress_type == zipfile.ZIP_STORED
            assert stored == (entry["dist"] in ("cryptography", "zstandard")), (blob, entry["dist"])
            stripped = tmp_path / "stripped.so"
            stripped.write_bytes(archive.read(blob))
            sections = _readelf(stripped, "-S")
            assert ".debug_" not in sections and " .symtab " not in sections, relpath
            original = next((data for wheel in wheels if re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower() == entry["dist"]
                             for data in [_wheel_member(wheel, relpath)]
                             if data is not None and hashlib.sha256(data).hexdigest() == entry["wheel_sha256"]), None)
            assert original is not None, "no wheel holds %s with sha256 %s" % (relpath, entry["wheel_sha256"])
            source = tmp_path / "original.so"
            source.write_bytes(original)
            assert _readelf(stripped, "-l") == _readelf(source, "-l"), relpath
            assert _readelf(stripped, "--dyn-syms", "-d") == _readelf(source, "--dyn-syms", "-d"), relpath
            mapped = max(int(line.split()[1], 16) + int(line.split()[4], 16)
                         for line in _readelf(source, "-l").splitlines() if line.strip().startswith("LOAD"))
            assert _without_section_table(stripped.read_bytes()[:mapped]) == _without_section_table(original[:mapped]), \
                relpath
            debug_removed += ".debug_info" in _readelf(source, "-S")
            compared += 1
    assert compared == len(entries) and debug_removed >= 1


def _without_section_table(elf: bytes) -> bytes:
    """The bytes with the ELF header's e_shoff, e_shnum and e_shstrndx zeroed: where the section
    headers are, which the loader never reads, is all a strip may change in what it maps."""
    return elf[:0x28] + bytes(8) + elf[0x30:0x3C] + bytes(4) + elf[0x40:]


def _wheel_member(wheel: Path, relpath: str):
    with zipfile.ZipFile(wheel) as archive:
        names = [n for n in archive.namelist() if n == relpath or n.endswith("/" + relpath) and ".data/" in n]
        return archive.read(names[0]) if names else None


def test_pyz_is_one_zip_after_a_shell_preamble(pyz):
    head = pyz.read_bytes()[:4096]
    assert head.startswith(b"#!/bin/sh\n") and b"exec \"$bk_pick\" -I -S \"$0\" \"$@\"" in head
    assert stat.S_IMODE(pyz.stat().st_mode) == 0o755
    with zipfile.ZipFile(pyz) as archive:
        assert archive.testzip() is None
        names = archive.namelist()
    assert names[:2] == ["__main__.py", "_bkboot.py"]
    assert {"boot/cp%s/_bkboot.pyc" % v.replace(".", "") for v in HERE_PYTHONS} <= set(names)
    done = run(["sh", "-n", "-c", pyz.read_bytes().split(b"\nexit 4\n")[0].decode()])
    assert done.returncode == 0, done.stderr


def test_recipients_are_baked_in_and_shown_by_version(tmp_path):
    subprocess.run(["age-keygen", "-o", str(tmp_path / "team.key")], check=True, capture_output=True)
    recipient = subprocess.run(["age-keygen", "-y", str(tmp_path / "team.key")], capture_output=True, text=True,
                               check=True).stdout.strip()
    typo = recipient[:-1] + ("q" if recipient[-1] != "q" else "p")  # the bech32 checksum catches it
    refused = run([sys.executable, str(ROOT / "build.py"), "--targets", "host", "--recipient", typo, "-o",
                   str(tmp_path / "typo.pyz")])
    assert refused.returncode == 2 and "not an age recipient" in refused.stderr
    built = build_pyz(tmp_path / "team.pyz", "--targets", "host", "--recipient", recipient)
    done = run([interpreter("%d.%d" % sys.version_info[:2]), str(built), "version", "--json"])
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["recipients"] == [recipient]


def test_build_refuses_a_malformed_recipient(tmp_path):
    done = run([sys.executable, str(ROOT / "build.py"), "--targets", "host",
                "--recipient", "not-a-key", "-o", str(tmp_path / "x.pyz")])
    assert done.returncode == 2
    assert "not an age recipient" in done.stderr
    assert not (tmp_path / "x.pyz").exists()


def test_readme_first_command_needs_only_the_pyz_and_a_python(pyz, tmp_path):
    """The README's first command on a machine without age: PATH holds python3 and mktemp, nothing else."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## On a fresh machine", 1)[1].split("\n## ", 1)[0]
    command = next(line.strip() for line in section.splitlines() if line.startswith("    python3 build.py"))
    assert "age-keygen" not in command
    command = command.replace("python3 build.py && ", "").replace("dist/bookgen-kit.pyz", str(pyz))
    # Only the system collector: what every collector finds on this shared machine is tested elsewhere
    # (a process of someone else's can make the whole-host capture partial, exit 6).
    assert command.count(" capture ") == 1
    command = command.replace(" capture ", " capture --only system --only include ")
    path = bin_dir(tmp_path / "bin", {"python3": interpreter("3.11"), "mktemp": shutil.which("mktemp")})
    done = run(["/bin/sh", "-c", command], env={"PATH": str(path), "TMPDIR": str(tmp_path)}, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


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
