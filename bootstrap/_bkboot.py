"""The bootstrap of the bookgen-kit zipapp (stdlib only, CPython 3.9+).

It runs before any bundled code and:
- (``__main__.py`` has already re-executed the interpreter as ``python3 -I -S``,
  so that neither the host's site-packages, its .pth files nor PYTHON* variables
  take part in the run);
- keeps only the standard library and this archive on ``sys.path``;
- picks the target (CPython version x machine) this host needs from BUILD.json
  and imports its pure-Python code from packs (``py/cpXY/<top-level>.bin``: one
  marshal'd dict of sourceless .pyc per top-level package, read on first import);
- loads that target's extension modules and the shared libraries they bundle
  from memory (``memfd_create``), or, when memory loading is refused, from a
  private 0700 directory that exists only while one library is being loaded;
- lets ``importlib.metadata`` see the bundled distributions.
Nothing is written to the host's disks in memory mode, and no cache is ever
read or left.
"""
import atexit
import importlib.machinery
import importlib.util
import json
import marshal
import os
import signal
import sys
import zipimport

EXIT_ENVIRONMENT = 4

# Everything a caller (self-check) may want to know about how this run was set up.
STATE = {
    "archive": None,
    "build": None,
    "target": None,
    "pyroot": None,
    "mode": None,  # "memory" or "disk", fixed at the first native load
    "forced_disk": False,
    "private_dirs": [],  # directories used in disk mode (each removed right after use)
    "loaded": [],  # [{"name", "kind", "origin", "mode"}]
    "reexec": False,
    "removed_sys_path": [],
}


def _die(message):
    sys.stderr.write("bookgen-kit: error: %s\n" % message)
    sys.exit(EXIT_ENVIRONMENT)


def _archive_path():
    return os.path.dirname(os.path.abspath(__file__))


def _clean_sys_path(archive):
    kept = []
    for entry in sys.path:
        norm = entry.replace("\\", "/")
        if entry == archive:
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


def _supported_summary(build):
    pythons = sorted({t["python"] for t in build["targets"].values()}, key=_version_tuple)
    machines = sorted({t["machine"] for t in build["targets"].values()})
    glibc = max((t["glibc"] for t in build["targets"].values()), key=_version_tuple)
    return "this build supports CPython %s on Linux %s with glibc >= %s" % (
        ", ".join(pythons),
        ", ".join(machines),
        glibc,
    )


def _select_target(build):
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
    if impl != "cpython" or glibc is None or target is None:
        _die("unsupported interpreter: %s; %s" % (here, _supported_summary(build)))
    if glibc < _version_tuple(target["glibc"])[:2]:
        _die("unsupported interpreter: %s; target %s needs glibc >= %s" % (here, name, target["glibc"]))
    return name, target


class _BundledFiles:
    """Reads members of the archive without the zipfile module (zipimport is loaded anyway)."""

    def __init__(self, archive):
        self.archive = archive
        self._reader = zipimport.zipimporter(archive)

    def read(self, member):
        return self._reader.get_data(self.archive + "/" + member)


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


class _NativeLoader:
    """Loads the target's extension modules and bundled libraries, from memory or a private dir."""

    def __init__(self, files, target):
        self._files = files
        self._modules = target["native"]
        self._libs = target["libs"]
        self._loaded_libs = {}
        self._keep = []  # memfds and ctypes handles live as long as the process
        self._current_dir = None

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
        for dep in info["deps"]:
            self._load_lib(dep)
        origin, done = self._place(info["path"], info["blob"])
        STATE["loaded"].append({"name": fullname, "kind": "extension", "origin": origin, "mode": STATE["mode"]})
        loader = _ExtensionLoader(fullname, origin, done)
        return importlib.util.spec_from_file_location(fullname, origin, loader=loader)

    def invalidate_caches(self):
        pass


class _BundledTree:
    """Imports the pure-Python code of the target's pyroot from its packs, without zipimport."""

    def __init__(self, files, pyroot, info):
        self._files = files
        self._pyroot = pyroot
        self._tops = set(info["packs"])
        self._packs = {}
        self._magic = importlib.util.MAGIC_NUMBER

    def pack(self, top):
        pack = self._packs.get(top)
        if pack is None:
            pack = marshal.loads(self._files.read("%s/%s.bin" % (self._pyroot, top)))
            self._packs[top] = pack
        return pack

    def _location(self, rel):
        return "%s/%s/%s" % (self._files.archive, self._pyroot, rel)

    def find_spec(self, fullname, path=None, target=None):
        top = fullname.partition(".")[0]
        if top not in self._tops:
            return None
        pack = self.pack(top)
        rel = fullname.replace(".", "/")
        for candidate, is_package in ((rel + "/__init__.pyc", True), (rel + "/__init__.py", True),
                                      (rel + ".pyc", False), (rel + ".py", False)):
            if candidate in pack:
                spec = importlib.machinery.ModuleSpec(fullname, self, origin=self._location(candidate),
                                                      is_package=is_package)
                spec.has_location = True
                spec.loader_state = candidate
                if is_package:
                    spec.submodule_search_locations = [self._location(rel)]
                return spec
        prefix = rel + "/"
        if any(name.startswith(prefix) for name in pack):  # a namespace package
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
        data = self.pack(spec.name.partition(".")[0])[spec.loader_state]
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
            pack = self.pack(rel.split("/")[0].split(".")[0]) if rel.split("/")[0].split(".")[0] in self._tops else {}
            if rel in pack:
                return pack[rel]
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
                data = overlay.get(rel, metadata_pack.get(rel))
                return None if data is None else data.decode("utf-8")

            def locate_file(self, path):
                return pathlib.PurePosixPath(location(str(path)))

        wanted = getattr(context, "name", None)
        wanted = self._normalize(wanted) if wanted else None
        dist_infos = sorted({rel.split("/")[0] for rel in metadata_pack})
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
    return json.loads(_BundledFiles(archive).read("BUILD.json").decode("utf-8"))


def setup():
    """Everything but running the CLI: target, sys.path, importers."""
    archive = _archive_path()
    STATE["archive"] = archive
    STATE["reexec"] = os.environ.pop("BOOKGEN_KIT_REEXEC", None) == "1"
    sys.dont_write_bytecode = True
    build = read_build_info(archive)
    STATE["build"] = build
    name, target = _select_target(build)
    STATE["target"] = name
    pyroot = target["pyroot"]
    STATE["pyroot"] = pyroot
    _clean_sys_path(archive)
    files = _BundledFiles(archive)
    tree = _BundledTree(files, pyroot, build["pyroots"][pyroot])
    sys.meta_path.insert(0, _NativeLoader(files, target))
    # Bundled code wins over anything planted beside the host's stdlib; after builtins and frozen.
    position = next((i for i, f in enumerate(sys.meta_path) if f is importlib.machinery.PathFinder), len(sys.meta_path))
    sys.meta_path.insert(position, tree)
    sys.meta_path.append(_BundledDistributions(files, tree, target.get("metadata_overlay")))


def main():
    setup()
    from toolkit.cli import main as cli_main

    return cli_main()
