"""Real Debian roots -- other suites' Pythons, another CPU -- to run the pyz under interpreters this host lacks.

The recipe is shared/QUALITY.md's ("Other hosts' Pythons and CPUs"): `debootstrap --variant=minbase
--include=PACKAGES SUITE ROOT` from Debian's archive, arm64 through qemu-user (binfmt_misc), and the pyz run with
`chroot ROOT /usr/bin/python3.X -I /opt/kit.pyz ...` after /proc and /dev/shm are bind-mounted into the root.

Cache layout (BOOKGEN_KIT_ROOTS, default /var/tmp/bookgen-kit-roots), one entry per key:

    <suite>-<arch>-<hash12>/root        the root debootstrap made; a run never writes to it (see Root.run)
    <suite>-<arch>-<hash12>/COMPLETE    JSON stamp: the key's fields, seconds the build took, debootstrap's
                                        version, the interpreters found; written last, atomically
    <suite>-<arch>-<hash12>/build.log   debootstrap's output (of the last build)
    <suite>-<arch>-<hash12>.lock        flock: shared while a session uses the root, exclusive while it is built
    debs/<suite>-<arch>/                debootstrap --cache-dir: the .debs, so a rebuild downloads nothing again

hash12 is the first 12 hex digits of the sha256 of the canonical JSON of {format, suite, arch, variant, include
(sorted), mirror}: another package list or suite is another entry. An entry without a COMPLETE that names its key is
a half-built root (a killed run): whatever is still mounted under it is unmounted, it is removed with
`rm --one-file-system` (never through a mount) and built again. Two pytest runs do not both build: the builder holds
the entry's lock exclusively and the other waits, then finds the stamp.

Every mount is made inside a private mount namespace (`unshare -m --propagation private`) -- debootstrap's own
/proc and /sys mounts too -- so the mounts end with the namespace's last process, on success, on failure, on a
timeout (the whole process group is killed) and even when pytest itself is killed: nothing stays mounted on the host.

`python -m tests.world.roots` builds (or checks) every root of SPECS ahead of a test run and prints the timings.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

FORMAT = 1
MIRROR = "http://deb.debian.org/debian"
CACHE_ENV = "BOOKGEN_KIT_ROOTS"
DEFAULT_CACHE = "/var/tmp/bookgen-kit-roots"
BUILD_DEADLINE = 45 * 60  # one debootstrap, cold, on a slow mirror; three take 2-5 min here
LOCK_DEADLINE = BUILD_DEADLINE + 5 * 60  # waiting for another run's build
QEMU_NAMES = {"arm64": "aarch64", "armhf": "arm", "ppc64el": "ppc64le", "s390x": "s390x", "riscv64": "riscv64",
              "amd64": "x86_64", "i386": "i386"}
MACHINES = {"amd64": "x86_64", "arm64": "aarch64"}
HELP_INSTALL = "apt-get install debootstrap qemu-user-static binfmt-support (scripts/test installs them)"


class RootUnavailable(RuntimeError):
    """A root cannot be built or used on this machine; the message says why and what to do."""


@dataclass(frozen=True)
class RootSpec:
    suite: str
    arch: str
    packages: Tuple[str, ...]
    variant: str = "minbase"
    mirror: str = MIRROR

    def fields(self) -> dict:
        return {"format": FORMAT, "suite": self.suite, "arch": self.arch, "variant": self.variant,
                "include": sorted(self.packages), "mirror": self.mirror}

    @property
    def key(self) -> str:
        canonical = json.dumps(self.fields(), sort_keys=True, separators=(",", ":")).encode()
        return "%s-%s-%s" % (self.suite, self.arch, hashlib.sha256(canonical).hexdigest()[:12])

    @property
    def pythons(self) -> List[str]:
        """The interpreters the packages install: python3.X -> /usr/bin/python3.X."""
        return ["/usr/bin/" + p for p in self.packages if re.fullmatch(r"python3\.\d+", p)]

    @property
    def machine(self) -> str:
        return MACHINES.get(self.arch, self.arch)

    def __str__(self) -> str:
        return "%s/%s (%s)" % (self.suite, self.arch, ",".join(self.packages))


SID = RootSpec("sid", "amd64", ("python3.14", "python3.15"))
TRIXIE = RootSpec("trixie", "amd64", ("python3.13",))
BOOKWORM_ARM64 = RootSpec("bookworm", "arm64", ("python3.11",))
SPECS = (SID, TRIXIE, BOOKWORM_ARM64)


def default_cache() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


def native_arch() -> str:
    try:
        return subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)


# -- mounts ------------------------------------------------------------------------------------------------------
def _unescape(field_: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field_)


def mounts_under(path: Path, mountinfo: str = "/proc/self/mountinfo") -> List[str]:
    """Mount points at or below path, as the host (this process's namespace) sees them."""
    prefix = os.path.realpath(str(path)).rstrip("/")
    found = []
    with open(mountinfo) as handle:
        for line in handle:
            point = _unescape(line.split()[4])
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return found


def _remove_entry(entry: Path) -> None:
    """Remove a (half-built) entry: unmount what a killed run left mounted in it, then delete, never through a mount."""
    if not os.path.lexists(entry):
        return
    for point in sorted(mounts_under(entry), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)
    left = mounts_under(entry)
    if left:
        raise RootUnavailable("cannot unmount %s; remove %s by hand" % (", ".join(left), entry))
    done = subprocess.run(["rm", "-rf", "--one-file-system", str(entry)], capture_output=True, text=True)
    if done.returncode != 0 or os.path.lexists(entry):
        raise RootUnavailable("cannot remove the half-built root %s: %s" % (entry, done.stderr.strip()))


# -- binfmt ------------------------------------------------------------------------------------------------------
def ensure_binfmt(arch: str) -> str:
    """Make sure the kernel runs ARCH's binaries through qemu-user; returns the binfmt entry's text.

    The entry must have the F flag (qemu opened once, at registration) so that chroot needs no qemu inside the root.
    """
    qemu = QEMU_NAMES.get(arch, arch)
    misc = Path("/proc/sys/fs/binfmt_misc")
    entry = misc / ("qemu-" + qemu)
    if not (misc / "status").exists():
        done = subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(misc)], capture_output=True,
                              text=True)
        if done.returncode != 0 and not (misc / "status").exists():
            raise RootUnavailable("cannot mount binfmt_misc on %s: %s" % (misc, done.stderr.strip()))
    if not entry.exists() or not entry.read_text().startswith("enabled"):
        if not os.path.exists("/usr/sbin/update-binfmts"):
            raise RootUnavailable("no update-binfmts to run %s binaries: %s" % (arch, HELP_INSTALL))
        done = subprocess.run(["update-binfmts", "--enable", "qemu-" + qemu], capture_output=True, text=True)
        if not entry.exists() and os.path.exists("/usr/share/binfmts/qemu-" + qemu):
            # qemu-user-static configured before binfmt-support: its format was never imported
            subprocess.run(["update-binfmts", "--import", "qemu-" + qemu], capture_output=True)
            done = subprocess.run(["update-binfmts", "--enable", "qemu-" + qemu], capture_output=True, text=True)
        if not entry.exists() or not entry.read_text().startswith("enabled"):
            raise RootUnavailable("binfmt_misc has no enabled qemu-%s entry (update-binfmts: %s); %s"
                                  % (qemu, (done.stdout + done.stderr).strip(), HELP_INSTALL))
    text = entry.read_text()
    flags = re.search(r"^flags: *(\S*)", text, re.M)
    if not flags or "F" not in flags.group(1):
        raise RootUnavailable("the qemu-%s binfmt entry lacks the F flag (qemu would have to be inside the root): %s"
                              % (qemu, text))
    return text


# -- running a command in a root ---------------------------------------------------------------------------------
_RUN_SCRIPT = r"""
fail() { echo "tests.world.roots: $*" >&2; exit 125; }
root=$1; shift
mount --bind /proc "$root/proc" || fail "cannot bind /proc into $root"
mount --bind /dev/shm "$root/dev/shm" || fail "cannot bind /dev/shm into $root"
mount -t tmpfs -o mode=1777,size=256m tmpfs "$root/tmp" || fail "cannot mount a tmpfs on $root/tmp"
while [ "$1" != "--" ]; do
  mount --bind "$1" "$root$2" || fail "cannot bind $1 onto $root$2"
  if [ "$3" = ro ]; then mount -o remount,bind,ro "$root$2" || fail "cannot make $root$2 read-only"; fi
  shift 3
done
shift
exec chroot "$root" "$@"
"""
RUN_FAILED = 125  # the mounts or chroot failed: not the command's exit status


class RootRunTimeout(AssertionError):
    pass


def run_isolated(argv: Sequence[str], timeout: float, env: Optional[dict] = None, stdout=None, stderr=None,
                 text: bool = True, pass_fds: Sequence[int] = ()) -> subprocess.CompletedProcess:
    """argv in its own process group; on timeout the whole group is killed (nothing of it keeps running)."""
    capture = stdout is None
    process = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE if capture else stdout,
                               stderr=subprocess.PIPE if capture else stderr,
                               env=env, text=text, start_new_session=True, pass_fds=tuple(pass_fds))
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        raise RootRunTimeout("%s: still running after %.0f s, killed\n--- stdout\n%s\n--- stderr\n%s"
                             % (" ".join(argv), timeout, (out or "")[-3000:], (err or "")[-3000:]))
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return subprocess.CompletedProcess(list(argv), process.returncode, out, err)


def run_in_root(root: Path, argv: Sequence[str], binds: Iterable[Tuple[Path, str, str]] = (), timeout: float = 600,
                env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """`chroot root argv...` in a private mount namespace holding: /proc and /dev/shm bound from the host, a fresh
    tmpfs on /tmp, and each (host_dir, inside_dir, "ro"|"rw") of binds. inside_dir must already be a directory of the
    root (/mnt, /opt, /srv): the cached root is never written to. Exit status 125 means the mounts failed."""
    argv = [str(a) for a in argv]
    command = ["unshare", "-m", "--propagation", "private", "/bin/sh", "-c", _RUN_SCRIPT, "sh", str(root)]
    for host, inside, mode in binds:
        if mode not in ("ro", "rw"):
            raise ValueError(mode)
        if not inside.startswith("/") or not (Path(str(root) + inside)).is_dir():
            raise ValueError("%s is not a directory of the root %s" % (inside, root))
        command += [str(host), inside, mode]
    command += ["--", *argv]
    base = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/root", "TMPDIR": "/tmp"}
    base.update(env or {})
    return run_isolated(command, timeout, env=base)


# -- building ----------------------------------------------------------------------------------------------------
def _tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def debootstrap_root(spec: RootSpec, target: Path, log: Path, debs: Path, deadline: float,
                     lock_fd: Optional[int] = None) -> dict:
    """debootstrap spec into target (inside a private mount namespace); returns facts for the stamp.

    debootstrap inherits lock_fd, the entry's exclusive lock: should this process die (pytest killed), the lock is
    held until debootstrap ends too, so that no other run removes or rebuilds the entry under its feet."""
    if os.geteuid() != 0:
        raise RootUnavailable("debootstrap and chroot need root")
    if not os.path.exists("/usr/sbin/debootstrap"):
        raise RootUnavailable("debootstrap is not installed: " + HELP_INSTALL)
    if spec.arch != native_arch():
        ensure_binfmt(spec.arch)
    debs.mkdir(parents=True, exist_ok=True)
    argv = ["unshare", "-m", "--propagation", "private", "debootstrap", "--arch=" + spec.arch,
            "--variant=" + spec.variant, "--include=" + ",".join(spec.packages), "--cache-dir=" + str(debs),
            spec.suite, str(target), spec.mirror]
    with open(log, "w") as handle:
        handle.write("$ %s\n" % " ".join(argv))
        handle.flush()
        try:
            done = run_isolated(argv, deadline, stdout=handle, stderr=subprocess.STDOUT,
                                pass_fds=() if lock_fd is None else (lock_fd,))
        except RootRunTimeout:
            raise RootUnavailable("debootstrap of %s took longer than %.0f s (log %s):\n%s"
                                  % (spec, deadline, log, _tail(log)))
    if done.returncode != 0:
        raise RootUnavailable("debootstrap of %s failed with exit %d (is %s reachable? do the packages exist in %s?)"
                              " -- log %s:\n%s" % (spec, done.returncode, spec.mirror, spec.suite, log, _tail(log)))
    versions = {}
    for python in spec.pythons:
        ran = run_in_root(target, [python, "-I", "-c", "import sys, platform; print(sys.version.split()[0], "
                                   "platform.machine())"], timeout=300)
        if ran.returncode != 0:
            raise RootUnavailable("%s does not run in the new %s root: %s" % (python, spec, ran.stderr[-2000:]))
        version, machine = ran.stdout.split()
        if machine != spec.machine:
            raise RootUnavailable("%s in the %s root reports machine %s, not %s" % (python, spec, machine,
                                                                                      spec.machine))
        versions[python] = version
    deb = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "debootstrap"], capture_output=True, text=True)
    return {"interpreters": versions, "debootstrap": deb.stdout.strip()}


Builder = Callable[..., dict]  # (spec, target, log, debs, deadline, lock_fd=...) -> facts for the stamp


def _write_atomic(path: Path, data: bytes) -> None:
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)
    directory = os.open(str(path.parent), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _flock(handle, mode: int, deadline: float, what: str) -> None:
    end = time.monotonic() + deadline
    while True:
        try:
            fcntl.flock(handle.fileno(), mode | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > end:
                raise RootUnavailable("%s: the lock %s is still held by another run after %.0f s"
                                      % (what, handle.name, deadline))
            time.sleep(0.5)


@dataclass
class Root:
    """A complete root of the cache, held (shared lock) until release()."""
    spec: RootSpec
    path: Path
    stamp: dict
    built_now: bool
    seconds: float  # this session: building, or finding it in the cache
    lock: object = field(repr=False, default=None)

    def run(self, argv: Sequence[str], binds: Iterable[Tuple[Path, str, str]] = (), timeout: float = 600,
            env: Optional[dict] = None) -> subprocess.CompletedProcess:
        if self.spec.arch != native_arch():
            ensure_binfmt(self.spec.arch)  # after a reboot the cached root is there, binfmt_misc may not be
        return run_in_root(self.path, argv, binds, timeout, env)

    def describe(self) -> str:
        how = ("built in %.0f s" % self.seconds) if self.built_now else (
            "from the cache in %.1f s (built %s in %.0f s)" % (self.seconds, self.stamp.get("built_at", "?"),
                                                                self.stamp.get("seconds", 0)))
        return "debian root %s %s: %s" % (self.spec, self.spec.key, how)

    def release(self) -> None:
        if self.lock is not None:
            self.lock.close()
            self.lock = None


class RootCache:
    def __init__(self, base: Optional[Path] = None, builder: Builder = debootstrap_root,
                 deadline: float = BUILD_DEADLINE, lock_deadline: float = LOCK_DEADLINE) -> None:
        self.base = Path(base) if base else default_cache()
        self.builder = builder
        self.deadline = deadline
        self.lock_deadline = lock_deadline

    def entry(self, spec: RootSpec) -> Path:
        return self.base / spec.key

    def stamp(self, spec: RootSpec) -> Optional[dict]:
        """The COMPLETE stamp if the entry is a finished build of exactly this spec, else None."""
        entry = self.entry(spec)
        try:
            stamp = json.loads((entry / "COMPLETE").read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(stamp, dict) or stamp.get("key") != spec.key or stamp.get("fields") != spec.fields():
            return None
        if not (entry / "root").is_dir() or not all((entry / "root" / p.lstrip("/")).exists() for p in spec.pythons):
            return None
        return stamp

    def ensure(self, spec: RootSpec) -> Root:
        """The root of spec, from the cache or built now; the caller holds it (shared) until Root.release()."""
        started = time.monotonic()
        self.base.mkdir(parents=True, exist_ok=True)
        lock = open(self.base / (spec.key + ".lock"), "a+")
        try:
            _flock(lock, fcntl.LOCK_SH, self.lock_deadline, str(spec))
            stamp = self.stamp(spec)
            built = False
            if stamp is None:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
                _flock(lock, fcntl.LOCK_EX, self.lock_deadline, str(spec))
                stamp = self.stamp(spec)  # another run may have built it while we waited
                if stamp is None:
                    stamp = self._build(spec, lock.fileno())
                    built = True
                fcntl.flock(lock.fileno(), fcntl.LOCK_SH)  # others may use it now; nobody rebuilds a complete root
        except BaseException:
            lock.close()
            raise
        return Root(spec, self.entry(spec) / "root", stamp, built, time.monotonic() - started, lock)

    def _build(self, spec: RootSpec, lock_fd: int) -> dict:
        entry = self.entry(spec)
        _remove_entry(entry)  # a half-built root of a killed run, or an entry of an older format
        entry.mkdir(parents=True)
        started = time.monotonic()
        facts = self.builder(spec, entry / "root", entry / "build.log", self.base / "debs" /
                             ("%s-%s" % (spec.suite, spec.arch)), self.deadline, lock_fd=lock_fd)
        stamp = {"key": spec.key, "fields": spec.fields(), "seconds": round(time.monotonic() - started, 1),
                 "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **(facts or {})}
        _write_atomic(entry / "COMPLETE", (json.dumps(stamp, indent=1, sort_keys=True) + "\n").encode())
        return stamp


class Roots:
    """The session's roots, built in parallel in the background; get() waits for one."""

    def __init__(self, cache: RootCache, specs: Sequence[RootSpec] = SPECS, report: Callable[[str], None] = print):
        self.cache = cache
        self.report = report
        self._pool = ThreadPoolExecutor(max_workers=max(1, len(specs)), thread_name_prefix="debootstrap")
        self._futures: Dict[RootSpec, Future] = {s: self._pool.submit(cache.ensure, s) for s in specs}
        self._reported = set()

    def get(self, spec: RootSpec) -> Root:
        try:
            root = self._futures[spec].result(timeout=self.cache.lock_deadline + self.cache.deadline)
        except Exception as error:
            raise RootUnavailable("the Debian root %s (%s) is not available on this machine: %s"
                                  % (spec, spec.key, error)) from error
        if spec not in self._reported:
            self._reported.add(spec)
            self.report(root.describe())
        return root

    def close(self) -> None:
        self._pool.shutdown(wait=True)  # a build in progress finishes (and stamps) rather than leaving half a root
        for future in self._futures.values():
            if future.done() and future.exception() is None:
                future.result().release()


# -- pytest ------------------------------------------------------------------------------------------------------
try:
    import pytest
except ImportError:  # python -m tests.world.roots without pytest
    pytest = None

if pytest is not None:
    @pytest.fixture(scope="session")
    def debian_roots(request):
        """Every root of SPECS from the cache, or debootstrapped now, in parallel (started when first requested;
        request this fixture before `pyz` so that the builds overlap the pyz's). Timings go to the terminal."""
        reporter = request.config.pluginmanager.get_plugin("terminalreporter")
        capture = request.config.pluginmanager.get_plugin("capturemanager")

        def report(line: str) -> None:  # on the terminal, not in a test's captured output
            if reporter is None or capture is None:
                print(line, file=sys.stderr)
                return
            with capture.global_and_fixture_disabled():
                reporter.write_line("\n" + line)

        if os.geteuid() != 0:
            pytest.fail("Debian roots need root (debootstrap, mount, chroot); run the tests as root", pytrace=False)
        roots = Roots(RootCache(), SPECS, report)
        try:
            yield roots
        finally:
            roots.close()


def main(argv: Sequence[str]) -> int:
    """Build (or find) every root of SPECS now, in parallel, and print where and how long."""
    roots = Roots(RootCache(), SPECS, print)
    status = 0
    try:
        for spec in SPECS:
            try:
                root = roots.get(spec)
                print("  %s  %s" % (root.path, json.dumps(root.stamp.get("interpreters", {}))))
            except RootUnavailable as error:
                print(error, file=sys.stderr)
                status = 1
    finally:
        roots.close()
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
