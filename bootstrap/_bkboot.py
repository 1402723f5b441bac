"""The bootstrap of the bookgen-kit zipapp (stdlib only, CPython 3.8+).

It runs before any bundled code and:
- re-executes the interpreter as ``python3 -I -S`` unless it already runs so, so
  that neither the host's site-packages, its .pth files nor PYTHON* variables take
  part in the real run (``--help`` and usage, which need no isolation, run in the
  first process: the host's ``site`` has already run there anyway, and no host
  module that shares a name with a bundled one is used);
- records how the interpreter was chosen (the shell preamble, the command line, a
  re-execution) and the host's TZ (TZ=UTC0 is set when the host has none);
- keeps only the standard library and this archive on ``sys.path``;
- picks the target (CPython version x machine) this host needs, or, for a CPython
  newer than the build knows, runs the newest version's source with only its abi3
  native modules, says so, and records what is unavailable;
- imports the target's pure-Python code from packs (``packs/<top>-<hash>.bin``: per
  top-level package, a marshal'd dict of zlib'd directories of sourceless .pyc);
- loads that target's extension modules and the shared libraries they bundle
  from memory (``memfd_create``), or, when memory loading is refused, from a
  private 0700 directory that exists only while one library is being loaded;
- lets ``importlib.metadata`` see the bundled distributions.
Nothing is written to the host's disks in memory mode, and no cache is ever
read or left.
"""
import marshal
import os
import sys
import zipimport

EXIT_ENVIRONMENT = 4
UTC = "UTC0"  # a POSIX TZ rule: glibc reads no zone file for it
LAUNCH_VARIABLE = "BOOKGEN_KIT_LAUNCH"
HELP_FLAGS = ("-h", "--help", "--version")
# PYTHON* variables that change no code that runs (any other one sends help through the re-execution too).
HARMLESS = frozenset(("PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "PYTHONIOENCODING", "PYTHONUTF8",
                      "PYTHONHASHSEED", "PYTHONCOERCECLOCALE", "PYTHONFAULTHANDLER", "PYTHONNOUSERSITE",
                      "PYTHONINTMAXSTRDIGITS", "PYTHONNODEBUGRANGES", "PYTHONWARNDEFAULTENCODING", "PYTHONSAFEPATH"))
QUIET_FLAGS = ("--json", "-q", "--quiet", "--no-color", "-v", "--verbose", "-vv", "-vvv")

# Everything a caller (self-check) may want to know about how this run was set up.
STATE = {
    "archive": None,
    "build": None,
    "target": None,
    "target_info": None,
    "pyroot": None,
    "mode": None,  # "memory" or "disk", fixed at the first native load
    "forced_disk": False,
    "private_dirs": [],  # directories used in disk mode (each removed right after use)
    "loaded": [],  # [{"name", "kind", "origin", "mode"}]
    "reexec": False,
    "removed_sys_path": [],
    "interpreter": None,  # how the interpreter was chosen and isolated
    "timezone": None,  # the host's TZ and what this run uses
    "forward": None,  # a CPython newer than the build: what it runs instead
    "degraded": [],  # [{"component", "effect", "reason"}]: what this run goes without
    "evicted_modules": [],  # host modules dropped from sys.modules (in-process help only)
}


def _die(message):
    sys.stderr.write("bookgen-kit: error: %s\n" % message)
    sys.exit(EXIT_ENVIRONMENT)


def _archive_path():
    archive = getattr(globals().get("__loader__"), "archive", None)
    if archive and os.path.isfile(archive):
        return os.path.abspath(archive)
    path = os.path.abspath(__file__)
    while path and path != "/" and not os.path.isfile(path):
        path = os.path.dirname(path)
    return path


# --------------------------------------------------------------------------- launch
def _parse_launch(value):
    """BOOKGEN_KIT_LAUNCH as the preamble or a re-executing parent wrote it, if it is for this process."""
    if not value:
        return None
    lines = value.split("\n")
    head = lines[0].split("|")
    if len(head) < 5 or head[0] != str(os.getpid()):
        return None  # inherited from another run: not about this process
    considered = []
    for line in lines[1:]:
        parts = line.split("|")
        if len(parts) == 4:
            considered.append({"name": parts[0], "path": parts[1], "version": parts[2], "verdict": parts[3]})
    return {"by": head[1], "why": head[2], "tz": head[3], "picked": "|".join(head[4:]), "considered": considered}


def _help_only(args):
    """Whether the command line asks only for the top-level help, usage or --version."""
    rest = [a for a in args if a not in QUIET_FLAGS]
    return not rest or (len(rest) == 1 and rest[0] in HELP_FLAGS)


def _describe_choice(launch):
    version = "%d.%d" % sys.version_info[:2]
    if launch is None:
        return "command line", "the interpreter the command line named (%s)" % (sys.executable or "?")
    if launch["by"] == "preamble":
        if launch["why"] == "BOOKGEN_PYTHON":
            return "preamble", "BOOKGEN_PYTHON named it (%s)" % launch["picked"]
        passed = [c for c in launch["considered"] if c["path"] != launch["picked"]]
        skipped = "; passed over: %s" % ", ".join("%s (%s, %s)" % (c["path"], c["version"], c["verdict"])
                                                  for c in passed) if passed else ""
        if launch["why"] == "partial":
            return "preamble", "the shell preamble found no CPython with a full target in this build; %s is CPython " \
                "%s, whose target goes without something (see degraded)%s" % (launch["picked"], version, skipped)
        if launch["why"] == "newer":
            return "preamble", "the shell preamble found no CPython the build has a target for; %s is CPython %s, " \
                "newer than the build%s" % (launch["picked"], version, skipped)
        return "preamble", "the shell preamble's first CPython with a target in this build: %s (CPython %s)%s" % (
            launch["picked"], version, skipped)
    return "command line", "the interpreter the command line named (%s)" % launch["picked"]


def _launch(args):
    """Decide how this run is isolated: re-execute as -I -S (does not return) or go on in this process."""
    raw = os.environ.pop(LAUNCH_VARIABLE, None)
    launch = _parse_launch(raw)
    earlier = launch
    if launch is not None and launch["by"] == "reexec":
        # A re-executing parent passes on what it knew about its own launch.
        inner = raw.split("\n", 1)[1] if "\n" in raw else ""
        earlier = _parse_launch(inner.replace("\x1f", "\n")) if inner else None
    chosen_by, why = _describe_choice(earlier)
    host_tz = os.environ.get("TZ")
    tz_set_by_launcher = launch is not None and launch["tz"] == "unset"
    if tz_set_by_launcher:
        host_tz = None
    isolated = bool(sys.flags.isolated and sys.flags.no_site)
    record = {
        "executable": sys.executable,
        "version": sys.version.split()[0],
        "implementation": sys.implementation.name,
        "chosen_by": chosen_by,
        "why": why,
        "considered": earlier["considered"] if earlier else [],
        "reexecuted": launch is not None and launch["by"] == "reexec",
        "isolated": isolated,
        "isolation": None,
    }
    STATE["reexec"] = record["reexecuted"]
    if isolated:
        record["isolation"] = "-I -S" + (" (re-executed)" if record["reexecuted"] else "")
    elif os.environ.get("BOOKGEN_KIT_NO_REEXEC") == "1":
        record["isolation"] = "not isolated: BOOKGEN_KIT_NO_REEXEC=1"
    elif _help_only(args) and not [name for name in os.environ if name.startswith("PYTHON") and name not in HARMLESS]:
        record["isolation"] = "not isolated: help and usage run in the first process (the host's site has run)"
    elif not (sys.executable and os.path.isfile(sys.executable)):
        record["isolation"] = "not isolated: no interpreter path to re-execute (sys.executable %r)" % sys.executable
    else:
        env = dict(os.environ)
        tz_state = "unset" if (tz_set_by_launcher or "TZ" not in env) else "set"
        if "TZ" not in env:
            env["TZ"] = UTC
        passed_on = ""
        if earlier is not None and raw:
            passed_on = "\n" + raw.replace("\n", "\x1f")
        env[LAUNCH_VARIABLE] = "%d|reexec|-I -S|%s|%s%s" % (os.getpid(), tz_state, sys.executable, passed_on)
        archive = _archive_path()
        try:
            os.execve(sys.executable, [sys.executable, "-I", "-S", archive] + list(args), env)
        except OSError as error:
            record["isolation"] = "not isolated: re-executing %s failed: %s" % (sys.executable, error.strerror)
    STATE["interpreter"] = record
    tz_set = tz_set_by_launcher
    if "TZ" not in os.environ:
        os.environ["TZ"] = UTC
        import time

        time.tzset()
        tz_set = True
    STATE["timezone"] = {"host_TZ": host_tz, "TZ": os.environ["TZ"], "set_by_bookgen_kit": tz_set}


# --------------------------------------------------------------------------- targets
def _clean_sys_path(archive):
    kept = []
    for entry in sys.path:
        norm = entry.replace("\\", "/")
        if entry == archive or entry.startswith(archive + "/"):
            continue
        if not entry or "site-packages" in norm or "dist-packages" in norm:
            STATE["removed_sys_path"].append(entry)
            continue
        if not (entry.startswith(sys.base_prefix) or entry.startswith(sys.prefix)):
            STATE["removed_sys_path"].append(entry)
            continue
        kept.append(entry)
    sys.path[:] = [archive] + kept


def _machine():
    machine = os.uname().machine.lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def _glibc_version():
    try:
        text = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError, AttributeError):
        return None
    parts = text.split()
    if len(parts) != 2 or parts[0] != "glibc":
        return None
    try:
        return tuple(int(p) for p in parts[1].split(".")[:2])
    except ValueError:
        return None


def _version_tuple(text):
    return tuple(int(p) for p in text.split("."))


def _pythons(build, machine=None):
    return sorted({t["python"] for t in build["targets"].values() if machine is None or t["machine"] == machine},
                  key=_version_tuple)


def _range_text(pythons):
    if not pythons:
        return "no CPython"
    return "CPython %s" % pythons[0] if len(pythons) == 1 else "CPython %s to %s" % (pythons[0], pythons[-1])


def _supported_summary(build):
    machines = sorted({t["machine"] for t in build["targets"].values()})
    glibc = max((t["glibc"] for t in build["targets"].values()), key=_version_tuple)
    return "this build supports CPython %s on Linux %s with glibc >= %s" % (
        ", ".join(_pythons(build)), ", ".join(machines), glibc)


def _hint():
    """Which interpreters on this host would work (a clause for a refusal)."""
    try:
        import _bkfind

        _bkfind.KNOWN = tuple(_pythons(STATE["build"], _machine()) or _pythons(STATE["build"]))
        return "; " + _bkfind.hint(pyz=STATE["archive"], exclude=sys.executable)
    except Exception:  # a hint must never hide the refusal itself
        return ""


def _select_target(build):
    """(name, target info, forward info or None) for this interpreter, or a one-line refusal."""
    impl = sys.implementation.name
    python = "%d.%d" % sys.version_info[:2]
    machine = _machine()
    glibc = _glibc_version()
    here = "%s %s on %s (%s)" % (
        "CPython" if impl == "cpython" else impl,
        python,
        machine,
        "glibc %d.%d" % glibc if glibc else "no glibc: musl or another libc",
    )
    name = "cp%d%d-manylinux_%s" % (sys.version_info[0], sys.version_info[1], machine)
    target = build["targets"].get(name)
    known = _pythons(build, machine)
    if glibc is None or not known:
        _die("unsupported interpreter: %s; %s" % (here, _supported_summary(build)))
    if impl != "cpython":
        _die("unsupported interpreter: %s; %s%s" % (here, _supported_summary(build), _hint()))
    if target is not None:
        if glibc < _version_tuple(target["glibc"])[:2]:
            _die("unsupported interpreter: %s; target %s needs glibc >= %s" % (here, name, target["glibc"]))
        floor = target.get("python_min", target["python"])
        if sys.version_info[:3] < _version_tuple(floor) + (0,) * (3 - len(_version_tuple(floor))):
            _die("unsupported interpreter: CPython %s; target %s needs CPython >= %s%s" % (
                sys.version.split()[0], name, floor, _hint()))
        return name, target, None
    forward = build.get("forward", {}).get(machine)
    if sys.version_info[:2] > _version_tuple(known[-1]) and forward is not None and not forward.get("refused"):
        if glibc < _version_tuple(forward["glibc"])[:2]:
            _die("unsupported interpreter: %s; its code needs glibc >= %s" % (here, forward["glibc"]))
        return forward["from_target"], forward, {
            "python": python, "from_target": forward["from_target"], "from_python": forward["python"],
            "range": _range_text(known)}
    _die("unsupported interpreter: %s; this build runs on %s%s%s" % (
        here, _range_text(known), " (a newer one with a warning)" if forward and not forward.get("refused") else "",
        _hint()))


# --------------------------------------------------------------------------- the archive
class _BundledFiles:
    """Reads members of the archive without the zipfile module (zipimport is loaded anyway)."""

    def __init__(self, archive):
        self.archive = archive
        self._reader = zipimport.zipimporter(archive)

    def read(self, member):
        return self._reader.get_data(self.archive + "/" + member)


def _make_extension_loader():
    import importlib.machinery

    class _ExtensionLoader(importlib.machinery.ExtensionFileLoader):
        """An ExtensionFileLoader that lets the bootstrap clean up after dlopen."""

        def __init__(self, name, path, after_load):
            super().__init__(name, path)
            self._after_load = after_load

        def create_module(self, spec):
            try:
                return super().create_module(spec)
            finally:
                self._after_load()

    return _ExtensionLoader


class _NativeLoader:
    """Loads the target's extension modules and bundled libraries, from memory or a private dir."""

    def __init__(self, files, target):
        self._files = files
        self._modules = target["native"]
        self._libs = target["libs"]
        self._loaded_libs = {}
        self._keep = []  # memfds and ctypes handles live as long as the process
        self._current_dir = None
        self._loader_class = None

    # -- placing one file where dlopen can reach it -------------------------------
    def _mode(self):
        if STATE["mode"] is None:
            forced = os.environ.get("BOOKGEN_EXTRACT", "").lower() == "disk"
            STATE["forced_disk"] = forced
            usable = hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd")
            STATE["mode"] = "disk" if forced or not usable else "memory"
            if STATE["mode"] == "disk":
                _install_signal_cleanup()
        return STATE["mode"]

    def _place_in_memory(self, relpath, data):
        fd = os.memfd_create("bookgen-kit:" + os.path.basename(relpath), os.MFD_CLOEXEC)
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        self._keep.append(fd)  # never closed: glibc matches loaded objects by path
        return "/proc/self/fd/%d" % fd, lambda: None

    def _place_on_disk(self, relpath, data):
        import tempfile

        directory = None
        for base in ("/dev/shm", os.environ.get("TMPDIR"), "/tmp", "/var/tmp"):
            if not base or not os.path.isdir(base):
                continue
            try:
                directory = tempfile.mkdtemp(prefix="bookgen-kit-", dir=base)  # 0700
                break
            except OSError:
                continue
        if directory is None:
            raise ImportError("bookgen-kit: no writable private directory for native code")
        STATE["private_dirs"].append(directory)
        _CLEANUP_DIRS.add(directory)
        path = os.path.join(directory, os.path.basename(relpath))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o700)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
        finally:
            os.close(fd)

        def remove():
            _remove_dir(directory)

        return path, remove

    def _place(self, relpath, blob):
        data = self._files.read(blob)
        if self._mode() == "memory":
            try:
                return self._place_in_memory(relpath, data)
            except OSError:
                STATE["mode"] = "disk"
                _install_signal_cleanup()
        return self._place_on_disk(relpath, data)

    # -- shared libraries ----------------------------------------------------------
    def _load_lib(self, relpath):
        if relpath in self._loaded_libs:
            return
        import ctypes

        info = self._libs[relpath]
        for dep in info["deps"]:
            self._load_lib(dep)
        path, done = self._place(relpath, info["blob"])
        try:
            handle = ctypes.CDLL(path)
        except OSError:
            done()
            if STATE["mode"] != "memory":
                raise
            STATE["mode"] = "disk"  # e.g. vm.memfd_noexec: retry from a private directory
            _install_signal_cleanup()
            path, done = self._place_on_disk(relpath, self._files.read(info["blob"]))
            try:
                handle = ctypes.CDLL(path)
            finally:
                done()
        else:
            done()
        self._keep.append(handle)
        self._loaded_libs[relpath] = path
        STATE["loaded"].append({"name": relpath, "kind": "library", "origin": path, "mode": STATE["mode"]})

    # -- the meta path finder protocol -----------------------------------------------
    def find_spec(self, fullname, path=None, target=None):
        info = self._modules.get(fullname)
        if info is None:
            return None
        import importlib.util

        if self._loader_class is None:
            self._loader_class = _make_extension_loader()
        for dep in info["deps"]:
            self._load_lib(dep)
        origin, done = self._place(info["path"], info["blob"])
        STATE["loaded"].append({"name": fullname, "kind": "extension", "origin": origin, "mode": STATE["mode"]})
        loader = self._loader_class(fullname, origin, done)
        return importlib.util.spec_from_file_location(fullname, origin, loader=loader)

    def invalidate_caches(self):
        pass


class _Unavailable:
    """Answers an import of what this run goes without with one clear error: an ImportError (so that
    fallbacks such as psycopg's pure-Python libpq wrapper or gzip instead of zstd still work) that the
    CLI reports as one line with exit code 4 (toolkit.errors.EnvironmentProblem) and a hint."""

    def __init__(self, degraded):
        self._tops = {top: item for item in degraded for top in item.get("tops", [])}

    def find_spec(self, fullname, path=None, target=None):
        item = self._tops.get(fullname.partition(".")[0])
        if item is None:
            return None
        raise _unavailable_error(fullname, item)

    def invalidate_caches(self):
        pass


def _unavailable_error(fullname, item):
    forward = STATE.get("forward")
    if forward:
        why = "CPython %s is newer than this build (%s) and %s" % (forward["python"], forward["range"], item["reason"])
    else:
        why = "%s, on %s" % (item["reason"], STATE.get("target"))
    message = "%s is unavailable with this interpreter (%s): %s" % (item["component"], why, item["effect"])
    hint = _hint().lstrip("; ") or None
    try:
        from toolkit.errors import EnvironmentProblem
    except Exception:  # embedding without toolkit: a plain ImportError
        error = ImportError(message)
    else:
        error = type("ComponentUnavailable", (EnvironmentProblem, ImportError), {})(message, hint)
    error.name = fullname
    return error


class _Pack:
    """One top-level package's files: {directory: zlib(marshal {path: bytes})}, inflated per directory."""

    def __init__(self, data):
        self._chunks = marshal.loads(data)
        self._open = {}

    def directory(self, name):
        files = self._open.get(name)
        if files is None:
            chunk = self._chunks.get(name)
            if chunk is None:
                return None
            import zlib

            files = marshal.loads(zlib.decompress(chunk))
            self._open[name] = files
        return files

    def get(self, rel):
        files = self.directory(rel.rsplit("/", 1)[0] if "/" in rel else "")
        return None if files is None else files.get(rel)

    def has_directory(self, rel):
        return any(name == rel or name.startswith(rel + "/") for name in self._chunks)

    def directories(self):
        return sorted(self._chunks)

    def names(self):
        for name in self.directories():
            for rel in self.directory(name):
                yield rel


class _BundledTree:
    """Imports the pure-Python code of the target's pyroot from its packs, without zipimport."""

    def __init__(self, files, pyroot, info):
        import importlib.util

        self._files = files
        self._pyroot = pyroot
        self._members = dict(info["packs"])
        self._packs = {}
        self._magic = importlib.util.MAGIC_NUMBER

    @property
    def tops(self):
        return set(self._members)

    def pack(self, top):
        pack = self._packs.get(top)
        if pack is None:
            pack = _Pack(self._files.read(self._members[top]))
            self._packs[top] = pack
        return pack

    def _location(self, rel):
        return "%s/%s/%s" % (self._files.archive, self._pyroot, rel)

    def find_spec(self, fullname, path=None, target=None):
        top = fullname.partition(".")[0]
        if top not in self._members:
            return None
        import importlib.machinery

        pack = self.pack(top)
        rel = fullname.replace(".", "/")
        for candidate, is_package in ((rel + "/__init__.pyc", True), (rel + "/__init__.py", True),
                                      (rel + ".pyc", False), (rel + ".py", False)):
            if pack.get(candidate) is not None:
                spec = importlib.machinery.ModuleSpec(fullname, self, origin=self._location(candidate),
                                                      is_package=is_package)
                spec.has_location = True
                spec.loader_state = candidate
                if is_package:
                    spec.submodule_search_locations = [self._location(rel)]
                return spec
        if pack.has_directory(rel):  # a namespace package
            spec = importlib.machinery.ModuleSpec(fullname, None, is_package=True)
            spec.submodule_search_locations = [self._location(rel)]
            return spec
        return None

    def invalidate_caches(self):
        pass

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        spec = module.__spec__
        data = self.pack(spec.name.partition(".")[0]).get(spec.loader_state)
        if spec.loader_state.endswith(".pyc"):
            if data[:4] != self._magic:
                raise ImportError("bookgen-kit: %s was compiled for another Python version" % spec.name)
            code = marshal.loads(memoryview(data)[16:])
        else:
            code = compile(data, spec.origin, "exec", dont_inherit=True)
        exec(code, module.__dict__)

    def get_data(self, path):
        prefix = "%s/%s/" % (self._files.archive, self._pyroot)
        if path.startswith(prefix):
            rel = path[len(prefix):]
            top = rel.split("/")[0].split(".")[0]
            if top in self._members:
                data = self.pack(top).get(rel)
                if data is not None:
                    return data
        raise OSError("no bundled file %s" % path)

    def is_package(self, fullname):
        spec = self.find_spec(fullname)
        return bool(spec and spec.submodule_search_locations is not None)

    def get_source(self, fullname):
        return None


class _BundledDistributions:
    """A meta path entry that only answers importlib.metadata's find_distributions."""

    def __init__(self, files, tree, overlay):
        self._files = files
        self._tree = tree
        self._overlay = overlay  # per-target dist-info files (WHEEL, RECORD, SBOMs), or None

    def find_spec(self, fullname, path=None, target=None):
        return None

    def invalidate_caches(self):
        pass

    @staticmethod
    def _normalize(name):
        import re

        return re.sub(r"[-_.]+", "-", name).lower()

    def find_distributions(self, context=None):
        import importlib.metadata as metadata
        import pathlib

        metadata_pack = self._tree.pack("_metadata")
        overlay = marshal.loads(self._files.read(self._overlay)) if self._overlay else {}
        location = self._tree._location

        class BundledDistribution(metadata.Distribution):
            def __init__(self, dist_info):
                self._dist_info = dist_info

            def read_text(self, filename):
                rel = "%s/%s" % (self._dist_info, filename)
                data = overlay.get(rel)
                if data is None:
                    data = metadata_pack.get(rel)
                return None if data is None else data.decode("utf-8")

            def locate_file(self, path):
                return pathlib.PurePosixPath(location(str(path)))

        wanted = getattr(context, "name", None)
        wanted = self._normalize(wanted) if wanted else None
        dist_infos = sorted({name.split("/")[0] for name in metadata_pack.directories()})
        for dist_info in dist_infos:
            name = dist_info[: -len(".dist-info")].rsplit("-", 1)[0]
            if wanted is None or self._normalize(name) == wanted:
                yield BundledDistribution(dist_info)


_CLEANUP_DIRS = set()
_SIGNALS_INSTALLED = False


def _remove_dir(directory):
    try:
        for name in os.listdir(directory):
            os.unlink(os.path.join(directory, name))
        os.rmdir(directory)
    except OSError:
        pass
    _CLEANUP_DIRS.discard(directory)


def _cleanup():
    for directory in list(_CLEANUP_DIRS):
        _remove_dir(directory)


def _install_signal_cleanup():
    global _SIGNALS_INSTALLED
    if _SIGNALS_INSTALLED:
        return
    _SIGNALS_INSTALLED = True
    import atexit
    import signal

    atexit.register(_cleanup)

    def on_signal(signum, frame):
        _cleanup()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    for signum in (signal.SIGTERM, signal.SIGHUP):
        try:
            if signal.getsignal(signum) in (signal.SIG_DFL, None):
                signal.signal(signum, on_signal)
        except (ValueError, OSError):
            pass
    # SIGINT raises KeyboardInterrupt, which unwinds through atexit.


def read_build_info(archive=None):
    archive = archive or STATE["archive"] or _archive_path()
    return marshal.loads(_BundledFiles(archive).read("BOOT.bin"))


def _evict_host_modules(archive, bundled):
    """Drop host modules (imported by the host's site, before us) that share a name with bundled code."""
    for name in sorted(sys.modules):
        if name.partition(".")[0] not in bundled:
            continue
        module = sys.modules[name]
        origin = getattr(module, "__file__", None) or ""
        if origin.startswith(archive + "/"):
            continue
        del sys.modules[name]
        STATE["evicted_modules"].append({"name": name, "origin": origin or None})


def _warn_forward(forward, degraded):
    missing = ", ".join(item["component"] for item in degraded) or "nothing"
    sys.stderr.write(
        "bookgen-kit: warning: CPython %s is newer than this build (%s): running the %s code from source with "
        "its abi3 native modules only; unavailable: %s (self-check shows what that means)%s\n" % (
            forward["python"], forward["range"], forward["from_python"], missing, _hint()))


def setup():
    """Everything but running the CLI: target, sys.path, importers."""
    archive = _archive_path()
    STATE["archive"] = archive
    sys.dont_write_bytecode = True
    build = read_build_info(archive)
    STATE["build"] = build
    if STATE["interpreter"] is None:  # setup() called directly (tests, embedding)
        STATE["interpreter"] = {"executable": sys.executable, "version": sys.version.split()[0],
                                "implementation": sys.implementation.name, "chosen_by": "embedding",
                                "why": "setup() was called by the program that runs", "considered": [],
                                "reexecuted": False, "isolated": bool(sys.flags.isolated and sys.flags.no_site),
                                "isolation": None}
    name, target, forward = _select_target(build)
    STATE["target"] = name
    STATE["target_info"] = target
    STATE["forward"] = forward
    STATE["degraded"] = [dict(item) for item in target.get("unavailable", [])]
    pyroot = target["pyroot"]
    STATE["pyroot"] = pyroot
    _clean_sys_path(archive)
    files = _BundledFiles(archive)
    tree = _BundledTree(files, pyroot, build["pyroots"][pyroot])
    import importlib.machinery

    if not (sys.flags.isolated and sys.flags.no_site):
        _evict_host_modules(archive, tree.tops | {m.partition(".")[0] for m in target["native"]})
        standard = (importlib.machinery.BuiltinImporter, importlib.machinery.FrozenImporter,
                    importlib.machinery.PathFinder)
        for finder in list(sys.meta_path):  # finders a host .pth installed take no part either
            if finder not in standard:
                sys.meta_path.remove(finder)
                STATE["evicted_modules"].append({"name": "meta_path: %r" % (finder,), "origin": None})
    sys.meta_path.insert(0, _NativeLoader(files, target))
    if STATE["degraded"]:
        sys.meta_path.insert(0, _Unavailable(STATE["degraded"]))

    # Bundled code wins over anything planted beside the host's stdlib; after builtins and frozen.
    position = next((i for i, f in enumerate(sys.meta_path) if f is importlib.machinery.PathFinder), len(sys.meta_path))
    sys.meta_path.insert(position, tree)
    sys.meta_path.append(_BundledDistributions(files, tree, target.get("metadata_overlay")))
    if forward is not None:
        _warn_forward(forward, STATE["degraded"])


def main(argv=None):
    args = list(sys.argv[1:] if argv is None else argv)
    _launch(args)
    setup()
    from toolkit.cli import main as cli_main

    return cli_main()
