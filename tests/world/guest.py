"""A whole Linux kernel with /proc/kcore, for what this machine's kernel does not offer: Debian's own kernel
(linux-image-amd64's, from the archive) booted by qemu-system-x86_64 under software emulation (TCG: KVM here
is nested and hangs in the kernel's decompressor), with the trixie root of tests/world/roots.py (CPython 3.13)
as its disk.

Recipe (shared/QUALITY.md, "A whole kernel"):
- the kernel .deb: `apt-get download`, checked against the archive's SHA256, unpacked with `dpkg-deb -x`;
- an initramfs made here (cpio newc, gzip): the host's static busybox and exactly the modules the root disk
  needs (virtio_pci, virtio_blk, crc32c_generic, ext4 and their dependencies, ordered from each module's
  .modinfo "depends=": the package has no modules.dep); its /init mounts the root disk, runs the job in a
  chroot and writes the job's exit code, output and files to a second raw disk as a length-prefixed stream;
- the root disk: `mkfs.ext4 -d ROOT` (no mount, the root is never written), attached with snapshot=on;
- the job's files: a second, uncompressed cpio appended to the initramfs at a 4-byte boundary.

Cache (BOOKGEN_KIT_GUEST, default /var/tmp/bookgen-kit-guest): debs/<sha16>/, kernel-<sha16>/,
initramfs-<hash>.cpio.gz, root-<root key>-<stamp hash>.ext4, each made under a temporary name and renamed;
an flock serialises two runs that prepare at once. A run polls the serial console until its deadline and
kills qemu past it: no fixed sleep.
"""
from __future__ import annotations

import fcntl
import gzip
import hashlib
import io
import json
import os
import queue
import re
import shutil
import struct
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

CACHE_ENV = "BOOKGEN_KIT_GUEST"
DEFAULT_CACHE = "/var/tmp/bookgen-kit-guest"
QEMU = "/usr/bin/qemu-system-x86_64"
KERNEL_META = "linux-image-amd64"
WANTED_MODULES = ("virtio_pci", "virtio_blk", "crc32c_generic", "ext4")  # crc32c: ext4's metadata_csum
APT = ("-o", "APT::Sandbox::User=root", "-q")
FREE_MIB = 1024  # room on the root disk for what a job writes (sparse on the host)


class GuestUnavailable(RuntimeError):
    """The guest cannot be prepared or booted here; the message says why."""


def _run(*argv: str, cwd: Optional[str] = None) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, timeout=1800)
    if done.returncode != 0:
        raise GuestUnavailable("%s failed: %s" % (" ".join(argv), done.stderr.strip()[-1000:]))
    return done.stdout


def _sha256(path: Union[str, Path]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _atomic_dir(final: Path, build) -> Path:
    if final.is_dir():
        return final
    temporary = Path(tempfile.mkdtemp(dir=str(final.parent), prefix=".tmp-"))
    try:
        build(temporary)
        os.rename(temporary, final)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return final


# -- the archive ----------------------------------------------------------------------------------------------
def _apt_fields(package: str) -> Dict[str, str]:
    def show() -> Dict[str, str]:
        fields: Dict[str, str] = {}
        for line in _run("apt-cache", "show", "--no-all-versions", package).splitlines():
            match = re.match(r"^([A-Za-z0-9-]+): (.*)$", line)
            if match and match.group(1) not in fields:
                fields[match.group(1)] = match.group(2)
        return fields

    try:
        return show()
    except GuestUnavailable:
        _run("apt-get", *APT, "update")
        return show()


def _deb(cache: Path, package: str) -> Tuple[Path, Dict[str, str]]:
    fields = _apt_fields(package)
    directory = cache / "debs" / fields["SHA256"][:16]
    directory.mkdir(parents=True, exist_ok=True)
    debs = sorted(directory.glob("*.deb"))
    if not debs:
        _run("apt-get", *APT, "download", "%s=%s" % (package, fields["Version"]), cwd=str(directory))
        debs = sorted(directory.glob("*.deb"))
        if not debs or _sha256(debs[0]) != fields["SHA256"]:
            for deb in debs:
                deb.unlink()
            raise GuestUnavailable("%s: the download does not match the archive's SHA256" % package)
    return debs[0], fields


@dataclass
class Kernel:
    package: str
    version: str
    release: str  # uname -r
    vmlinuz: Path
    modules: Path


def _kernel(cache: Path) -> Kernel:
    depends = _apt_fields(KERNEL_META)["Depends"]
    match = re.search(r"(linux-image-[0-9][^ ,]*-amd64)", depends)
    if not match:
        raise GuestUnavailable("%s depends on no linux-image: %s" % (KERNEL_META, depends))
    deb, fields = _deb(cache, os.environ.get("BOOKGEN_KIT_GUEST_KERNEL") or match.group(1))
    unpacked = _atomic_dir(cache / ("kernel-" + fields["SHA256"][:16]),
                           lambda into: _run("dpkg-deb", "-x", str(deb), str(into)))
    [vmlinuz] = list((unpacked / "boot").glob("vmlinuz-*"))
    release = vmlinuz.name[len("vmlinuz-"):]
    return Kernel(fields["Package"], fields["Version"], release, vmlinuz, unpacked / "lib" / "modules" / release)


# -- modules ----------------------------------------------------------------------------------------------------
def _section(data: bytes, wanted: bytes) -> Optional[bytes]:
    shoff, = struct.unpack_from("<Q", data, 0x28)
    entsize, count, names_index = struct.unpack_from("<HHH", data, 0x3A)

    def header(index: int):
        return struct.unpack_from("<IIQQQQIIQQ", data, shoff + index * entsize)

    names = header(names_index)[4]
    for index in range(count):
        entry = header(index)
        name = data[names + entry[0]:data.index(b"\0", names + entry[0])]
        if name == wanted:
            return data[entry[4]:entry[4] + entry[5]]
    return None


def _modules(directory: Path, wanted: Sequence[str]) -> List[Tuple[str, bytes]]:
    """(name, module bytes) in load order, dependencies first."""
    index = {}
    for path in (directory / "kernel").rglob("*.ko*"):
        match = re.match(r"^(.*)\.ko(\.xz)?$", path.name)
        if match:
            index[match.group(1).replace("-", "_")] = path
    builtin = set()
    if (directory / "modules.builtin").exists():
        builtin = {os.path.basename(line.strip()).split(".ko")[0].replace("-", "_")
                   for line in (directory / "modules.builtin").read_text().splitlines()}
    order: List[Tuple[str, bytes]] = []
    seen: set = set()

    def visit(name: str, stack: Tuple[str, ...] = ()) -> None:
        name = name.replace("-", "_")
        if name in seen or name in builtin:
            return
        if name in stack or name not in index:
            raise GuestUnavailable("module %s: %s" % (name, "a cycle" if name in stack else "not in the package"))
        data = index[name].read_bytes()
        if index[name].name.endswith(".xz"):
            import lzma

            data = lzma.decompress(data)
        info = dict(item.decode(errors="replace").split("=", 1) for item in
                    (_section(data, b".modinfo") or b"").split(b"\0") if b"=" in item)
        for dependency in filter(None, info.get("depends", "").split(",")):
            visit(dependency, stack + (name,))
        seen.add(name)
        order.append((name, data))

    for name in wanted:
        visit(name)
    return order


# -- cpio newc ---------------------------------------------------------------------------------------------------
class Cpio:
    def __init__(self) -> None:
        self.buffer = io.BytesIO()
        self.inode = 1000

    def _header(self, name: str, mode: int, size: int, links: int = 1, rdev: Tuple[int, int] = (0, 0)) -> None:
        encoded = name.encode() + b"\0"
        self.inode += 1
        fields = [self.inode, mode, 0, 0, links, 0, size, 0, 0, rdev[0], rdev[1], len(encoded), 0]
        self.buffer.write(b"070701" + b"".join(b"%08X" % value for value in fields) + encoded)
        self._pad()

    def _pad(self) -> None:
        self.buffer.write(b"\0" * (-self.buffer.tell() % 4))

    def directory(self, name: str) -> None:
        self._header(name, 0o040755, 0, links=2)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._header(name, 0o100000 | mode, len(data))
        self.buffer.write(data)
        self._pad()

    def symlink(self, name: str, target: str) -> None:
        self._header(name, 0o120777, len(target.encode()))
        self.buffer.write(target.encode())
        self._pad()

    def device(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._header(name, 0o020000 | mode, 0, rdev=(major, minor))

    def finish(self) -> bytes:
        self._header("TRAILER!!!", 0, 0)
        self.buffer.write(b"\0" * (-self.buffer.tell() % 512))
        return self.buffer.getvalue()


def _static(path: str) -> bool:
    with open(path, "rb") as handle:
        data = handle.read(1 << 16)
    phoff, = struct.unpack_from("<Q", data, 0x20)
    entsize, count = struct.unpack_from("<HH", data, 0x36)
    return all(struct.unpack_from("<I", data, phoff + i * entsize)[0] != 3 for i in range(count))  # PT_INTERP


INIT = r"""#!/bin/sh
export PATH=/bin
fail() { echo "@@GP-FAIL@@ $*"; sync; poweroff -f; exit 1; }
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /etc/gp-modules); do insmod "/lib/modules/$m" || fail "insmod $m"; done
n=0
while [ ! -b /dev/vda ] || [ ! -b /dev/vdb ]; do
  n=$((n+1)); [ $n -gt 3000 ] && fail "virtio disks did not appear"
  usleep 10000
done
R=/newroot
mkdir -p $R
mount -t ext4 -o rw /dev/vda $R || fail "mount root"
mount -t proc proc $R/proc
mount -t sysfs sysfs $R/sys
mount -t securityfs securityfs $R/sys/kernel/security 2>/dev/null
mount -t devtmpfs devtmpfs $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts devpts $R/dev/pts
mount -t tmpfs tmpfs $R/dev/shm
mount -t tmpfs tmpfs $R/run
rm -rf $R/job && cp -a /gp/job $R/job || fail "copy job"
while read -r disk size name; do                 # big files come on their own disks (not through RAM)
  n=0
  while [ ! -b "/dev/$disk" ]; do n=$((n+1)); [ $n -gt 3000 ] && fail "no /dev/$disk"; usleep 10000; done
  head -c "$size" "/dev/$disk" > "$R/job/$name" || fail "copy $name"
done < /gp/disks
mkdir -p /out
echo "@@GP-CMD-START@@ uptime=$(cut -d' ' -f1 /proc/uptime)"
chroot $R /usr/bin/env -i PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin HOME=/root LANG=C.UTF-8 \
  /bin/sh -c 'cd /job && exec /bin/sh /job/.gp-cmd' </dev/null >/out/stdout 2>/out/stderr
rc=$?
echo "@@GP-CMD-END@@ rc=$rc uptime=$(cut -d' ' -f1 /proc/uptime)"
emit() {
  if [ -f "$3" ]; then printf 'GP %s %d %d\n' "$1" "$2" "$(stat -c %s "$3")"; cat "$3"
  else printf 'GP missing %d 0\n' "$2"; fi
}
{
  printf 'GP rc %d 0\n' "$rc"
  emit stdout 0 /out/stdout
  emit stderr 0 /out/stderr
  i=0
  while read -r p; do emit file $i "$R$p"; i=$((i+1)); done < /gp/outputs
  printf 'GP end 0 0\n'
} > /dev/vdb || echo "@@GP-FAIL@@ writing /dev/vdb failed"
sync
echo "@@GP-DONE@@"
poweroff -f
"""


def _initramfs(cache: Path, kernel: Kernel) -> Path:
    busybox = "/bin/busybox"
    if not (os.path.exists(busybox) and _static(busybox)):
        raise GuestUnavailable("a static /bin/busybox is needed (apt-get install busybox-static)")
    modules = _modules(kernel.modules, WANTED_MODULES)
    digest = hashlib.sha256(INIT.encode() + _sha256(busybox).encode())
    for name, data in modules:
        digest.update(name.encode() + hashlib.sha256(data).digest())
    path = cache / ("initramfs-%s.cpio.gz" % digest.hexdigest()[:16])
    if path.exists():
        return path
    archive = Cpio()
    for name in ("bin", "dev", "proc", "sys", "etc", "lib", "lib/modules", "newroot", "gp"):
        archive.directory(name)
    archive.device("dev/console", 5, 1)
    archive.device("dev/null", 1, 3, 0o666)
    archive.file("bin/busybox", Path(busybox).read_bytes(), 0o755)
    for applet in _run(busybox, "--list").split():
        if applet != "busybox":
            archive.symlink("bin/" + applet, "busybox")
    for name, data in modules:
        archive.file("lib/modules/%s.ko" % name, data)
    archive.file("etc/gp-modules", "".join("%s.ko\n" % name for name, _ in modules).encode())
    archive.file("init", INIT.encode(), 0o755)
    temporary = path.with_name(path.name + ".%d.tmp" % os.getpid())
    temporary.write_bytes(gzip.compress(archive.finish(), 6, mtime=0))
    os.rename(temporary, path)
    return path


def _root_disk(cache: Path, root: Path, key: str) -> Path:
    """The root as an ext4 image, made once per root build (its COMPLETE stamp names the build)."""
    stamp = hashlib.sha256((root.parent / "COMPLETE").read_bytes()).hexdigest()[:12]
    path = cache / ("root-%s-%s-%d.ext4" % (key, stamp, FREE_MIB))
    if path.exists():
        return path
    used = sum(os.lstat(os.path.join(directory, name)).st_blocks * 512
               for directory, _, names in os.walk(root) for name in names)
    size_mib = int(used * 1.2 / 2 ** 20) + 64 + FREE_MIB
    temporary = path.with_name(path.name + ".%d.tmp" % os.getpid())
    _run("mkfs.ext4", "-q", "-F", "-L", "guestroot", "-b", "4096", "-d", str(root), str(temporary),
         "%dM" % size_mib)
    _run("e2fsck", "-fn", str(temporary))
    os.rename(temporary, path)
    return path


# -- a run -------------------------------------------------------------------------------------------------------
@dataclass
class Result:
    returncode: int
    stdout: bytes
    stderr: bytes
    files: Dict[str, Optional[bytes]]
    console: str
    seconds: float
    timings: Dict[str, float] = field(default_factory=dict)


def _read_output_disk(path: Path) -> dict:
    found: dict = {"files": {}}
    with open(path, "rb") as handle:
        while True:
            line = handle.readline(200)
            match = re.match(rb"^GP (\w+) (\d+) (\d+)\n$", line)
            if not match:
                raise GuestUnavailable("the guest's output disk is malformed at %d: %r" % (handle.tell(), line[:80]))
            kind, index, size = match.group(1).decode(), int(match.group(2)), int(match.group(3))
            if kind == "end":
                return found
            if kind == "rc":
                found["rc"] = index
                continue
            data = handle.read(size) if kind != "missing" else None
            if data is not None and len(data) != size:
                raise GuestUnavailable("the guest's output disk is truncated")
            if kind in ("file", "missing"):
                found["files"][index] = data
            else:
                found[kind] = data


@dataclass
class Guest:
    kernel: Kernel
    initramfs: Path
    root_disk: Path
    memory: str = "512M"

    def run(self, script: str, files: Optional[Dict[str, bytes]] = None, outputs: Sequence[str] = (),
            timeout: float = 900, output_mib: int = 1024, big_files: Optional[Dict[str, Path]] = None) -> Result:
        """`script` (sh) run as root in the guest, in /job (which holds `files`, and `big_files` copied from
        a disk each, so that they never sit in the guest's RAM); `outputs`: guest paths to bring back
        (absolute, or relative to /job)."""
        outputs = [o if o.startswith("/") else "/job/" + o for o in outputs]
        big = sorted((big_files or {}).items())
        job = Cpio()
        job.directory("gp")
        job.directory("gp/job")
        job.file("gp/job/.gp-cmd", script.encode(), 0o755)
        for name, content in (files or {}).items():
            parts = name.strip("/").split("/")
            for end in range(1, len(parts)):
                job.directory("gp/job/" + "/".join(parts[:end]))
            job.file("gp/job/" + "/".join(parts), content, 0o755)
        job.file("gp/outputs", "".join(o + "\n" for o in outputs).encode())
        job.file("gp/disks", "".join("vd%s %d %s\n" % (chr(ord("c") + i), os.path.getsize(path), name)
                                     for i, (name, path) in enumerate(big)).encode())
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="bk-guest-") as work:
            initrd = Path(work) / "initrd"
            with open(initrd, "wb") as out, open(self.initramfs, "rb") as base:
                shutil.copyfileobj(base, out)
                out.write(b"\0" * (-out.tell() % 4))  # an uncompressed cpio after a gzip one: 4-byte aligned
                out.write(job.finish())
            output_disk = Path(work) / "out.img"
            with open(output_disk, "wb") as out:
                out.truncate(output_mib << 20)
            disks = []
            for index, (name, path) in enumerate(big):
                padded = Path(work) / ("big%d.img" % index)
                with open(path, "rb") as source, open(padded, "wb") as out:
                    shutil.copyfileobj(source, out)
                    out.truncate(out.tell() + (-out.tell() % 512))
                disks += ["-drive", "file=%s,format=raw,if=virtio,readonly=on" % padded]
            argv = [QEMU, "-accel", "tcg", "-m", self.memory, "-nographic", "-no-reboot", "-cpu", "max",
                    "-kernel", str(self.kernel.vmlinuz), "-initrd", str(initrd),
                    "-append", "console=ttyS0 panic=-1 quiet loglevel=4",
                    "-drive", "file=%s,format=raw,if=virtio,snapshot=on" % self.root_disk,
                    "-drive", "file=%s,format=raw,if=virtio" % output_disk, *disks, "-nic", "none"]
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, env=dict(os.environ, TMPDIR=work))
            lines: "queue.Queue" = queue.Queue()

            def reader() -> None:
                for raw in process.stdout:
                    lines.put(raw.decode(errors="replace").rstrip("\r\n"))
                lines.put(None)

            threading.Thread(target=reader, daemon=True).start()
            console: List[str] = []
            marks: Dict[str, float] = {}
            deadline = started + timeout
            while True:
                try:
                    line = lines.get(timeout=max(0.05, deadline - time.monotonic()))
                except queue.Empty:
                    line = ""
                if time.monotonic() > deadline:
                    process.kill()
                    process.wait()
                    raise GuestUnavailable("the guest did not finish in %.0f s:\n%s" % (timeout,
                                                                                     "\n".join(console[-40:])))
                if line is None:
                    break
                console.append(line)
                mark = re.search(r"@@GP-([A-Z-]+)@@", line)
                if mark:
                    marks.setdefault(mark.group(1), round(time.monotonic() - started, 3))
            process.wait()
            text = "\n".join(console)
            if "FAIL" in marks or "DONE" not in marks:
                raise GuestUnavailable("the guest failed (qemu exit %s):\n%s" % (process.returncode, text[-4000:]))
            found = _read_output_disk(output_disk)
        return Result(found["rc"], found.get("stdout", b""), found.get("stderr", b""),
                      {o: found["files"].get(i) for i, o in enumerate(outputs)}, text,
                      time.monotonic() - started, marks)


def prepare(root: Path, root_key: str, cache: Optional[Path] = None) -> Guest:
    """The kernel, the initramfs and the root disk, from the cache or made now (serialised by an flock)."""
    if not os.access(QEMU, os.X_OK):
        raise GuestUnavailable("%s is missing (apt-get install qemu-system-x86; scripts/test installs it)" % QEMU)
    cache = Path(cache or os.environ.get(CACHE_ENV) or DEFAULT_CACHE)
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        kernel = _kernel(cache)
        return Guest(kernel, _initramfs(cache, kernel), _root_disk(cache, root, root_key))


def describe(guest: Guest) -> str:
    return json.dumps({"kernel": "%s %s" % (guest.kernel.package, guest.kernel.version),
                       "release": guest.kernel.release, "root_disk": str(guest.root_disk)})
