"""Hostile hosts (DESIGN.md principle 9): the host we capture from was shaped by someone with root to stop us,
fill us up, mislead us or make us collect what they want.

Each class of attack is built for real, several instances at once, mostly in a host tree read with --root and,
where the class is about the live host, on this machine in unique temporary paths (and, for /root and
/etc/passwd, only inside a private mount namespace, so nothing the machine's other users see changes). Every
test asserts that capture ends within its deadline with a complete payload that `verify -i` accepts, that what
was reachable is still collected, and that every refusal is listed in the detached manifest's errors.
Artifacts are read from the inner manifest (the payload's last member), decrypted with age and zstd.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import re
import shlex
import socket
import stat
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from tests.conftest import interpreter
from tests.world.bookgen import make_host_tree

ROOT = Path(__file__).resolve().parent.parent
AGE = "/usr/bin/age"
DEADLINE = 90  # seconds: told to capture with --deadline; the subprocess is killed (test fails) at TIMEOUT
TIMEOUT = DEADLINE + 60
TIB = 1024 ** 4
ZERO = os.makedev(1, 5)  # the numbers of /dev/zero: a device that reads forever
LOOP = os.makedev(7, 200)  # a block device (a loop device that need not exist)
HOSTILE_KINDS = ("fifo", "socket", "chardev", "blockdev", "zero_link", "self_link")
LINK_KINDS = ("zero_link", "self_link")
ELF = b"\x7fELF\x02\x01\x01" + bytes(9)


# In a private mount namespace the checkout (and its .venv) is also reached at SOURCE_SEEN: the setups there
# mount over /tmp, /var or /root, where a checkout (a CI clone under /tmp) may live.
SOURCE_SEEN = "/mnt/bk-hostile-source"


def kit(*args, env=None, timeout=TIMEOUT, argv_prefix=()):
    source, python = str(ROOT), sys.executable
    if argv_prefix:
        source = SOURCE_SEEN
        if os.path.abspath(python).startswith(str(ROOT) + "/"):
            python = SOURCE_SEEN + os.path.abspath(python)[len(str(ROOT)):]
    environment = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": source, "HOME": "/nonexistent"}
    environment.update(env or {})
    return subprocess.run([*argv_prefix, python, "-m", "toolkit", *args], capture_output=True, text=True,
                          env=environment, timeout=timeout, stdin=subprocess.DEVNULL)


def remove_tree(path) -> None:
    """GNU rm, which removes a tree of any depth (shutil.rmtree, and so pytest's own cleanup, recurses per level
    and fails on a deep one). The deep trees here are on tmpfs mounts anyway, gone when unmounted."""
    if os.path.lexists(str(path)):
        subprocess.run(["rm", "-rf", "--one-file-system", "--", str(path)], timeout=300, check=False)


def mount_tmpfs(path: Path, size: str, inodes: Optional[str] = None) -> None:
    path.mkdir(parents=True, exist_ok=True)
    options = "size=%s" % size + (",nr_inodes=%s" % inodes if inodes else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True, timeout=30)


def unmount(path: Path) -> None:
    if subprocess.run(["umount", str(path)], capture_output=True, timeout=60).returncode != 0:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=60)


# -- fixtures -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def team_key(tmp_path_factory):
    directory = tmp_path_factory.mktemp("team")
    identity = directory / "team.key"
    subprocess.run(["age-keygen", "-o", str(identity)], check=True, capture_output=True, timeout=60)
    recipient = subprocess.run(["age-keygen", "-y", str(identity)], capture_output=True, text=True,
                               timeout=60).stdout.strip()
    return identity, recipient


@pytest.fixture
def out_dir():
    """Output on its own tmpfs, as on the responder's USB stick (a tmpfs only uses the memory written to it)."""
    path = Path(tempfile.mkdtemp(prefix="bk-hostile-out-", dir="/tmp"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4g", "tmpfs", str(path)], check=True, timeout=30)
    try:
        yield path
    finally:
        unmount(path)
        path.rmdir()


@pytest.fixture
def mounts(host):
    """mount(path, size, inodes) of a tmpfs in the host tree, unmounted at the end (before the tree is removed:
    fixtures are torn down in the reverse order of their setup)."""
    made: List[Path] = []

    def mount(path: Path, size: str, inodes: Optional[str] = None) -> Path:
        mount_tmpfs(path, size, inodes)
        made.append(path)
        return path

    try:
        yield mount
    finally:
        for path in reversed(made):
            unmount(path)


@pytest.fixture
def host(tmp_path):
    """A BookGen host tree read with --root (the image), with an ordinary user `u` and root's own home."""
    tree = make_host_tree(tmp_path / "host")
    put(tree.root, "/etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nu:x:1000:1000:u:/home/u:/bin/sh\n")
    put(tree.root, "/etc/hostname", b"image-host\n")
    put(tree.root, "/home/u/.profile", b"# u's profile\n")
    put(tree.root, "/root/.profile", b"# root's profile in the image\n")
    try:
        yield tree
    finally:
        remove_tree(tree.root)  # deep trees included (pytest's own cleanup would recurse into them)


@pytest.fixture
def live_dir():
    """A unique directory in the live host's /tmp (what tmp-executables and the timeline walk), removed after."""
    path = Path(tempfile.mkdtemp(prefix="bk-hostile-live-", dir="/tmp"))
    try:
        yield path
    finally:
        remove_tree(path)


def put(root: Path, logical: str, data: bytes = b"", mode: int = 0o644) -> Path:
    path = root / logical.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, mode)
    return path


def plant(path: Path, kind: str) -> None:
    """A hostile object where a regular file is expected."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink() or path.exists():
        path.unlink()
    if kind == "fifo":
        os.mkfifo(str(path))
    elif kind == "socket":  # bound in a short directory (sun_path is 108 bytes), then renamed into place
        short = Path(tempfile.mkdtemp(prefix="bks-", dir="/tmp"))
        try:
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            server.bind(str(short / "s"))
            server.close()
            os.rename(str(short / "s"), str(path))
        finally:
            short.rmdir()
    elif kind == "chardev":
        os.mknod(str(path), stat.S_IFCHR | 0o666, ZERO)
    elif kind == "blockdev":
        os.mknod(str(path), stat.S_IFBLK | 0o660, LOOP)
    elif kind == "zero_link":
        os.symlink("/dev/zero", str(path))
    elif kind == "self_link":
        os.symlink(path.name, str(path))
    else:
        raise ValueError(kind)


def deep_tree(base: Path, depth: int, leaf: bytes, leaf_name: str = "leaf", mode: int = 0o644) -> None:
    """`depth` nested directories `d` under base and a file at the bottom, made relative to descriptors (the
    path is far longer than PATH_MAX)."""
    base.mkdir(parents=True, exist_ok=True)
    fd = os.open(str(base), os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        out = os.open(leaf_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode, dir_fd=fd)
        os.write(out, leaf)
        os.fchmod(out, mode)
        os.close(out)
    finally:
        os.close(fd)


# -- capture and its judges -----------------------------------------------------------------------------
class Capture:
    """One finished capture: its --json result, the detached manifest, the payload's tar and inner manifest."""

    def __init__(self, done, identity: Path, seen_as=None) -> None:
        self.done = done
        self.result = json.loads(done.stdout)
        inside, outside = seen_as or ("", "")  # a capture run in a mount namespace names its paths as it saw them
        self.payload = Path(outside + self.result["payload"][len(inside):])
        self.manifest = json.loads(Path(outside + self.result["manifest"][len(inside):]).read_text())
        age = subprocess.run([AGE, "-d", "-i", str(identity), str(self.payload)], capture_output=True, check=True,
                             timeout=TIMEOUT)
        compression = self.manifest["payload"]["compression"]
        if compression == "gzip":
            self.tar_bytes = gzip.decompress(age.stdout)
        else:
            self.tar_bytes = subprocess.run(["zstd", "-d", "-c"], input=age.stdout, capture_output=True, check=True,
                                            timeout=TIMEOUT).stdout
        self._tar = None  # Python's tarfile takes ~25 s over 200,000 pax members: opened only when needed
        self.inner = json.loads(self._gnu_tar("manifest.json"))
        self.artifacts = {a["path"]: a for a in self.inner["artifacts"]}
        self.errors = self.manifest["errors"]
        self.collectors = {c["name"]: c for c in self.manifest["collection"]["collectors"]}

    def _gnu_tar(self, name: str) -> bytes:
        done = subprocess.run(["tar", "-xO", "--no-wildcards", "-f", "-", "--", os.fsencode(name)],
                              input=self.tar_bytes, capture_output=True, timeout=TIMEOUT)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    def _open(self) -> tarfile.TarFile:
        if self._tar is None:
            self._tar = tarfile.open(fileobj=io.BytesIO(self.tar_bytes))
            self._members = self._tar.getmembers()
            self._by_name = {m.name: m for m in self._members}
        return self._tar

    @property
    def members(self) -> Dict[str, tarfile.TarInfo]:
        self._open()
        return self._by_name

    @property
    def names(self) -> List[str]:
        self._open()
        return [m.name for m in self._members]

    def data(self, name: str) -> bytes:
        if self._tar is None:
            return self._gnu_tar(name)
        return self._tar.extractfile(self.members[name]).read()

    def bodyfile(self) -> bytes:
        """timeline/bodyfile.txt, or its parts in order (a long one is stored as .part0000, .part0001...)."""
        if "timeline/bodyfile.txt" in self.artifacts:
            return self.data("timeline/bodyfile.txt")
        parts = sorted(n for n in self.artifacts if n.startswith("timeline/bodyfile.txt.part"))
        assert parts, "no bodyfile in the payload"
        return b"".join(self.data(n) for n in parts)

    def errors_naming(self, path: str) -> List[Dict]:
        return [e for e in self.errors if e.get("source") == path or path in (e.get("reason") or "")]

    def log(self) -> str:
        return self.data("collection.log").decode("utf-8", "replace")


def capture(root, out: Path, team_key, *args, codes=(0, 6), timeout=TIMEOUT, argv_prefix=(),
            deadline: Optional[float] = DEADLINE, seen_as=None, env=None) -> Capture:
    identity, recipient = team_key
    extra = ["--deadline", str(deadline)] if deadline else []
    started = time.monotonic()
    done = kit("--json", "capture", "--out", str(out), "-r", recipient, "--root", str(root), "--case", "hostile",
               "--examiner", "tester", "--purpose", "hostile host test", *extra, *args, timeout=timeout,
               argv_prefix=argv_prefix, env=env)
    elapsed = time.monotonic() - started
    assert done.returncode in codes, "exit %d after %.1f s: %s" % (done.returncode, elapsed, done.stderr[-3000:])
    assert "Traceback" not in done.stderr
    result = Capture(done, identity, seen_as)
    assert result.manifest["artifacts_count"] == len(result.artifacts)
    # verify -i: the payload's hash, every member against the inner manifest (exact set, hash, size, type),
    # the manifest the last member, the two manifests agreeing
    verified = kit("--json", "verify", "-i", str(identity), str(result.payload))
    assert verified.returncode == 0, verified.stdout[-3000:] + verified.stderr[-2000:]
    errors = [e for e in result.errors if e["kind"] == "error"]
    assert done.returncode == (6 if errors else 0), errors
    return result


def decode_field(field: bytes) -> bytes:
    """A bodyfile name as mactime decodes it (%XX, once)."""
    return re.sub(rb"%([0-9A-Fa-f]{2})", lambda m: bytes([int(m.group(1), 16)]), field)


def mactime_rows(bodyfile: bytes, tmp: Path) -> List[bytes]:
    """The file names of `mactime -b FILE -d` (TSK), which must read the bodyfile without a complaint."""
    path = tmp / ("bodyfile-%s.txt" % uuid.uuid4().hex[:8])
    path.write_bytes(bodyfile)
    done = subprocess.run(["mactime", "-b", str(path), "-d"], capture_output=True, timeout=TIMEOUT)
    path.unlink()
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr[-2000:]
    rows = done.stdout.split(b"\n")[1:]
    return [row[row.index(b',"') + 2:-1] for row in rows if row.endswith(b'"') and b',"' in row]


# -- 1. a FIFO, socket, device or link to /dev/zero where capture reads unconditionally -------------------
CONTAINER_ID = "0f" * 32
DOCKER = "/var/lib/docker/containers/%s/" % CONTAINER_ID
UNCONDITIONAL = ("/etc/machine-id", "/run/utmp", "/var/log/wtmp", "/var/log/btmp", "/var/log/lastlog",
                 "/etc/ld.so.preload", "/opt/bookgen/.env", "/var/log/bookgen/api.log", "/var/log/bookgen/api.log.1",
                 "/var/log/auth.log", "/var/log/syslog", "/home/u/.bash_history", "/home/u/.ssh/authorized_keys",
                 "/root/.bash_history", "/etc/crontab", "/etc/sudoers", "/etc/ssh/sshd_config",
                 "/etc/systemd/system/backdoor.service", "/data/included.log", "/tmp/dropper", "/var/tmp/dropper",
                 "/dev/shm/dropper", DOCKER + "config.v2.json", DOCKER + CONTAINER_ID + "-json.log",
                 "/var/lib/docker/image/overlay2/layerdb/mounts/%s/mount-id" % CONTAINER_ID)
ONLY_FILES = ("--only", "system", "--only", "containers", "--only", "tmp-executables", "--only", "logs", "--only",
              "app", "--only", "persistence", "--only", "include", "--only", "timeline")
NO_DOCKER = {"DOCKER_HOST": "unix:///nonexistent/docker.sock"}  # the containers collector reads the data root


def _image_dev_zero(root: Path) -> None:
    """The image's own /dev/zero, so that a link to /dev/zero resolved inside --root meets a device too."""
    dev = root / "dev"
    dev.mkdir(exist_ok=True)
    if not (dev / "zero").exists():
        os.mknod(str(dev / "zero"), stat.S_IFCHR | 0o666, ZERO)


def _assert_refused(result: Capture, root: Path, logical: str, kind: str) -> None:
    """The hostile object at `logical` was neither read nor hung on: refused (named in the errors), or, for a
    link, kept as the link it is."""
    archive = "fs/$rootfs$" + logical
    stored = result.artifacts.get(archive)
    assert stored is None or stored["type"] == "symlink", (logical, stored)
    if kind in LINK_KINDS and stored is not None:
        assert result.members[archive].issym() and stored["target"] == os.readlink(str(root / logical[1:]))
        return
    named = result.errors_naming(logical)
    assert named, "%s (%s) is in no error: %s" % (logical, kind, [e for e in result.errors if e["kind"] != "limit"])


@pytest.mark.parametrize("kind", HOSTILE_KINDS)
def test_hostile_objects_where_capture_reads_unconditionally(kind, host, out_dir, team_key, tmp_path):
    _image_dev_zero(host.root)
    put(host.root, "/home/u/.bashrc", b"# u's own rc: still collected\n")
    put(host.root, "/tmp/real-dropper", b"#!/bin/sh\necho still collected\n", 0o755)
    for logical in UNCONDITIONAL:
        plant(host.root / logical[1:], kind)
    put(host.root, DOCKER + "hostconfig.json", b"{}")
    result = capture(host.root, out_dir, team_key, *ONLY_FILES, "--include", "/data/included.log", codes=(6,),
                     env=NO_DOCKER)
    for logical in UNCONDITIONAL:
        if logical.startswith(("/tmp/", "/var/tmp/", "/dev/shm/")):
            continue  # not an executable: tmp-executables passes it by (the timeline lists it, below)
        _assert_refused(result, host.root, logical, kind)
    # nothing was read from a device or through a link: no member holds a byte of /dev/zero's
    assert "fs/$rootfs$/dev/zero" not in result.artifacts
    for artifact in result.artifacts.values():
        if artifact.get("type") == "file" and artifact["path"].startswith("fs/$rootfs$/"):
            assert artifact["source"] not in UNCONDITIONAL, artifact
            assert not artifact.get("via") or artifact["via"] not in UNCONDITIONAL, artifact
    assert result.manifest["payload"]["tar_bytes"] < 64 * 1024 * 1024
    assert result.manifest["host"]["machine_id"] is None
    findings = json.loads(result.data("findings.json"))["findings"]  # a preload file we cannot read is a finding
    assert any(f["id"] == "ld-so-preload" and "not read" in f["title"] for f in findings), findings
    # what is reachable is still collected: the ordinary files next to the hostile ones
    for name in ("fs/$rootfs$/var/log/bookgen/worker.log", "fs/$rootfs$/var/log/bookgen/deploy.log", "fs/$rootfs$/etc/passwd",
                 "fs/$rootfs$/home/u/.bashrc", "fs/$rootfs$/home/u/.profile", "fs/$rootfs$/opt/bookgen/docker-compose.yml",
                 "fs/$rootfs$/tmp/real-dropper", "fs/$rootfs$" + DOCKER + "hostconfig.json"):
        assert result.artifacts[name]["type"] == "file" and result.artifacts[name]["sha256"], name
    assert all(c["status"] == "ok" for c in result.collectors.values()), result.collectors
    lines = {decode_field(line.split(b"|")[1]) for line in result.bodyfile().splitlines()}
    for logical in UNCONDITIONAL:
        if logical.startswith(("/etc/", "/tmp/", "/var/tmp/", "/dev/shm/", "/home/", "/root/", "/var/log/")):
            assert logical.encode() in lines, logical  # the timeline lists it, as what it is


@pytest.mark.parametrize("kind", HOSTILE_KINDS)
def test_a_hostile_passwd_file(kind, host, out_dir, team_key):
    """/etc/passwd is read to find the homes; a FIFO, device or link there must not stop the rest."""
    _image_dev_zero(host.root)
    put(host.root, "/etc/crontab", b"* * * * * root /tmp/x\n")
    plant(host.root / "etc/passwd", kind)
    result = capture(host.root, out_dir, team_key, "--only", "system", "--only", "persistence", codes=(0, 6))
    _assert_refused(result, host.root, "/etc/passwd", kind)
    assert result.data("fs/$rootfs$/etc/crontab") == b"* * * * * root /tmp/x\n"  # the rest still collected
    assert all(c["status"] == "ok" for c in result.collectors.values())


# -- 2. deep trees: no recursion, what is reachable delivered, the depth limit recorded -------------------
DEPTHS = (1100, 5000)


def _deep_fixture(base: Path, what: str) -> Dict[int, str]:
    """A 1,100- and a 5,000-level tree under base (base/deepN/d/.../d/leaf.sh), each ending in an executable
    script; their leaf paths."""
    leaves = {}
    for depth in DEPTHS:
        top = base / ("deep%d" % depth)
        deep_tree(top, depth, b"#!/bin/sh\necho %s at depth %d\n" % (what.encode(), depth), "leaf.sh", 0o755)
        leaves[depth] = str(top) + "/d" * depth + "/leaf.sh"
    return leaves


def test_deep_trees_under_root(host, mounts, out_dir, team_key, tmp_path):
    """In /tmp, in the log directory and in a container's upper directory (read from the Docker data root when
    the daemon does not answer). The trees are on tmpfs mounts (made and removed in no time on a busy disk)."""
    tmp_leaves = {d: p[len(str(host.root)):] for d, p in _deep_fixture(mounts(host.root / "tmp", "64m"),
                                                                       "tmp").items()}
    log_leaves = {d: p[len(str(host.root)):] for d, p in _deep_fixture(mounts(host.log_dir / "deep", "64m"),
                                                                       "log").items()}
    put(host.root, DOCKER + "config.v2.json", b'{"Name": "/bookgen-worker"}')
    put(host.root, "/var/lib/docker/image/overlay2/layerdb/mounts/%s/mount-id" % CONTAINER_ID, b"upper1")
    upper = mounts(host.root / "var/lib/docker/overlay2/upper1/diff", "64m")
    put(upper, "/tmp/implant", ELF, 0o755)
    upper_leaves = {d: p[len(str(upper)):] for d, p in _deep_fixture(upper, "container").items()}
    result = capture(host.root, out_dir, team_key, "--only", "containers", "--only", "tmp-executables", "--only",
                     "logs", "--only", "timeline", codes=(0,), env=NO_DOCKER)
    listing = {e["path"] for e in json.loads(result.data("containers/bookgen-worker/upperdir.json"))["entries"]}
    assert "/tmp/implant" in listing and upper_leaves[1100] in listing and upper_leaves[5000] not in listing
    index = json.loads(result.data("containers/index.json"))
    assert index["source"] == "/var/lib/docker" and index["fallback"] is True
    assert set(index["containers"][0]["new_executables"]) == {"/tmp/implant", upper_leaves[1100]}
    # reachable (within the depth limit): collected by tmp-executables and logs, listed by the timeline
    for leaves, collector in ((tmp_leaves, "tmp-executables"), (log_leaves, "logs")):
        shallow = result.artifacts["fs/$rootfs$" + leaves[1100]]
        assert shallow["collector"] == collector and shallow["type"] == "file", shallow
        assert result.data("fs/$rootfs$" + leaves[1100]).startswith(b"#!/bin/sh")
        assert "fs/$rootfs$" + leaves[5000] not in result.artifacts
    lines = result.bodyfile().splitlines()
    names = {line.split(b"|")[1] for line in lines}
    assert tmp_leaves[1100].encode() in names and log_leaves[1100].encode() in names
    assert tmp_leaves[5000].encode() not in names
    # the depth limit is recorded, by every collector that met it
    for collector in ("containers", "tmp-executables", "logs", "timeline"):
        hits = [e for e in result.errors if e["collector"] == collector and e["kind"] == "limit"]
        assert hits and all("depth" in e["reason"] for e in hits), (collector, hits)
    notable = json.loads(result.data("timeline/notable.json"))
    assert any(hit["limit"] == "depth" for walk in notable["walks"] for hit in walk["limits_hit"])
    assert all(c["status"] == "ok" for c in result.collectors.values())
    rows = mactime_rows(result.bodyfile(), tmp_path)
    assert tmp_leaves[1100].encode() in rows and log_leaves[1100].encode() in rows


WALKER = r"""
import json, sys
from toolkit.host.hostfs import HostFS, WalkStats
root, top = sys.argv[1], sys.argv[2]
sys.setrecursionlimit(80)  # a walk that recursed per level could not go 1,100 deep, let alone 5,000
stats, deepest, leaves = WalkStats(), 0, []
for entry in HostFS(root).walk(top, None, stats):
    deepest = max(deepest, entry.depth)
    if entry.name == "leaf.sh":
        leaves.append(entry.depth)
print(json.dumps({"python": list(sys.version_info[:2]), "entries": stats.entries, "deepest": deepest,
                  "leaves": leaves, "limits": [h["limit"] for h in stats.limits_hit], "errors": stats.errors}))
"""


@pytest.fixture(scope="module")
def deep_trees():
    """(image root, live directory): 1,100- and 5,000-level trees in the image's /tmp and in the live /tmp."""
    base = Path(tempfile.mkdtemp(prefix="bk-hostile-deep-", dir="/tmp"))
    mount_tmpfs(base, "64m")
    try:
        _deep_fixture(base / "image" / "tmp", "image")
        _deep_fixture(base / "live", "live")
        yield base / "image", base / "live"
    finally:
        unmount(base)
        base.rmdir()


@pytest.mark.parametrize("version", ["3.9", "3.10", "3.11"])
def test_the_walker_never_recurses_on_older_pythons(version, deep_trees):
    """hostfs is stdlib-only: its walk runs under each interpreter as it is, with a tiny recursion limit."""
    python = interpreter(version)
    image, live = deep_trees
    for root, top in ((str(image), "/tmp"), ("/", str(live))):
        code = "import sys; sys.path.insert(0, %r); exec(%r)" % (str(ROOT), WALKER)
        done = subprocess.run([python, "-I", "-S", "-c", code, root, top], capture_output=True, text=True,
                              timeout=TIMEOUT, env={"PATH": "/usr/bin:/bin"})
        assert done.returncode == 0 and "RecursionError" not in done.stderr, done.stderr[-3000:]
        report = json.loads(done.stdout)
        assert report["python"] == [int(p) for p in version.split(".")]
        assert report["leaves"] == [1102] and report["limits"] == ["depth"] and not report["errors"], report
        assert report["deepest"] == 4097


# -- 3. a wide directory of 200,000 entries ------------------------------------------------------------------
WIDE = 200_000


def _wide(directory: Path, count: int) -> None:
    fd = os.open(str(directory), os.O_RDONLY | os.O_DIRECTORY)
    try:
        for index in range(count):
            os.mknod("f%06d" % index, stat.S_IFREG | 0o644, dir_fd=fd)
    finally:
        os.close(fd)


def test_wide_directories_of_200k_entries(host, mounts, out_dir, team_key):
    """200,000 names in /tmp (empty decoys around one implant) and 200,000 in the log directory (every one a
    log to collect), each on a tmpfs: everything is collected or listed, within a generous deadline."""
    tmp_wide = mounts(host.root / "tmp" / "wide", "256m", "400k")
    log_wide = mounts(host.log_dir / "wide", "256m", "400k")
    _wide(tmp_wide, WIDE)
    _wide(log_wide, WIDE)
    put(tmp_wide, "/zz-implant", ELF + b"payload", 0o644)  # found by its header among 200,000 decoys
    put(host.root, "/tmp/beside", b"#!/bin/sh\necho beside\n", 0o755)
    put(log_wide, "/zz-real.log", b"the one log with content\n")
    result = capture(host.root, out_dir, team_key, "--only", "tmp-executables", "--only", "logs", "--only",
                     "timeline", codes=(0,), deadline=600, timeout=900)
    assert result.data("fs/$rootfs$/tmp/wide/zz-implant") == ELF + b"payload"
    assert result.artifacts["fs/$rootfs$/tmp/beside"]["collector"] == "tmp-executables"
    assert not [n for n in result.artifacts if n.startswith("fs/$rootfs$/tmp/wide/f")]  # decoys are not executables
    logs = [n for n in result.artifacts if n.startswith("fs/$rootfs$/var/log/bookgen/wide/")]
    assert len(logs) == WIDE + 1 and result.data("fs/$rootfs$/var/log/bookgen/wide/zz-real.log").startswith(b"the one")
    body = result.bodyfile()
    assert body.count(b"\n0|/tmp/wide/") == WIDE + 1 and body.count(b"\n0|/var/log/bookgen/wide/") == WIDE + 1
    assert all(c["status"] == "ok" for c in result.collectors.values()), result.collectors
    assert not [e for e in result.errors if e["kind"] in ("error", "limit")]


# -- 4. symlinks in a parent component -----------------------------------------------------------------------
def _private_root_setup(work: Path, canary: str) -> str:
    """Shell lines for a private mount namespace: /root becomes a tmpfs whose .ssh holds `canary` as root's
    authorized_keys, every other entry of the real /root bound back (the interpreter may live there)."""
    real = work / "real-root"
    real.mkdir()
    q = shlex.quote
    lines = ["mount --bind /root %s" % q(str(real)), "mount -t tmpfs -o mode=0700 tmpfs /root"]
    for name in sorted(os.listdir("/root")):
        if name == ".ssh":
            continue
        source = real / name
        target = "/root/" + name
        if os.path.islink("/root/" + name):
            lines.append("ln -s %s %s" % (q(os.readlink("/root/" + name)), q(target)))
        elif os.path.isdir("/root/" + name):
            lines += ["mkdir %s" % q(target), "mount --bind %s %s" % (q(str(source)), q(target))]
        else:
            lines += [": > %s" % q(target), "mount --bind %s %s" % (q(str(source)), q(target))]
    lines += ["mkdir -m 700 /root/.ssh", "printf '%%s\\n' %s > /root/.ssh/authorized_keys" % q(canary),
              "mkdir -p /root/.config", "printf 'ANALYST CONFIG %%s\\n' %s > /root/.config/analyst.conf" % q(canary)]
    return "\n".join(lines)


def in_private_mounts(setup: str):
    """argv prefix: run the command in its own mount namespace after `setup` (gone when it exits)."""
    expose = "mount -t tmpfs bk-hostile-source /mnt\nmkdir %s\nmount --rbind %s %s\n" % (
        shlex.quote(SOURCE_SEEN), shlex.quote(str(ROOT)), shlex.quote(SOURCE_SEEN))
    return ("unshare", "--mount", "--propagation", "private", "--", "sh", "-ec", expose + setup + '\nexec "$@"', "sh")


def test_parent_symlinks_on_the_live_host(live_dir, out_dir, team_key):
    """~u/.ssh -> /root/.ssh on a live host: root's keys must not be collected as u's; the link is kept and
    a "refused" error names it. Likewise a home that is a link to /root, /var/log a link to elsewhere, and the
    app directory's parent a link. /etc/passwd, /root and /var are replaced in a private mount namespace only."""
    canary = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA-analyst-root-" + uuid.uuid4().hex
    homes = live_dir / "home"
    u_home, v_home = homes / "u", homes / "v"
    u_home.mkdir(parents=True)
    (u_home / ".bash_history").write_text("u's own history\n")
    os.symlink("/root/.ssh", str(u_home / ".ssh"))
    os.symlink("/root/.config", str(u_home / ".config"))
    os.symlink("/root", str(v_home))  # a whole home that is a link to /root
    os.symlink("/root", str(live_dir / "srv"))  # the app directory's parent: /root
    app_dir = live_dir / "srv" / "bookgen"
    host_before = (os.path.exists("/root/.ssh"), Path("/etc/passwd").read_bytes())
    passwd = live_dir / "passwd"
    passwd.write_text("u:x:1000:1000:u:%s:/bin/sh\nv:x:1001:1001:v:%s:/bin/sh\n" % (u_home, v_home))
    setup = "mount --bind %s /etc/passwd\n" % shlex.quote(str(passwd)) + _private_root_setup(live_dir, canary)
    # and /var/log itself a link (to logs elsewhere): /var is a fresh tmpfs in the namespace
    setup += "\nmount -t tmpfs tmpfs /var\nmkdir -p /var/elsewhere/bookgen\nln -s /var/elsewhere /var/log\n" \
             "printf 'LOG BEHIND A LINK\\n' > /var/elsewhere/bookgen/api.log"
    included = str(u_home / ".ssh" / "authorized_keys")
    result = capture("/", out_dir, team_key, "--only", "logs", "--only", "app", "--only", "persistence", "--only",
                     "include", "--include", included, argv_prefix=in_private_mounts(setup),
                     env={"BOOKGEN_KIT_APP_DIR": str(app_dir)})
    assert canary.encode() not in result.tar_bytes
    assert b"ANALYST CONFIG" not in result.tar_bytes
    assert b"LOG BEHIND A LINK" not in result.tar_bytes
    for link, target in ((u_home / ".ssh", "/root/.ssh"), (u_home / ".config", "/root/.config"), (v_home, "/root"),
                         ("/var/log", "/var/elsewhere"), (live_dir / "srv", "/root")):
        member = result.members["fs/$rootfs$" + str(link)]
        assert member.issym() and member.linkname == target
        assert result.artifacts["fs/$rootfs$" + str(link)]["type"] == "symlink"
    under = [n for n in result.names if n.startswith(("fs/$rootfs$%s/" % (u_home / ".ssh"), "fs/$rootfs$%s/" % (u_home / ".config"),
                                                      "fs/$rootfs$%s/" % v_home))]
    assert under == [], under
    assert result.data("fs/$rootfs$%s/.bash_history" % u_home) == b"u's own history\n"
    refused = [e for e in result.errors if e["kind"] == "refused"]
    for source, link in ((included, u_home / ".ssh"), (str(u_home / ".ssh" / "authorized_keys"), u_home / ".ssh"),
                         (str(v_home / ".bash_history"), v_home), ("/var/log/bookgen", "/var/log"),
                         (str(app_dir), live_dir / "srv")):
        assert any(e["source"] == source and str(link) in e["reason"] for e in refused), (source, refused)
    assert {e["collector"] for e in refused} == {"logs", "app", "persistence", "include"}
    assert (os.path.exists("/root/.ssh"), Path("/etc/passwd").read_bytes()) == host_before  # only in the namespace


def test_parent_symlinks_under_root_resolve_inside_the_image(host, live_dir, out_dir, team_key):
    """Under --root, absolute and climbing links resolve inside the image as a chroot would: never to the
    analyst's own /root or /etc (which here hold canaries, in a private mount namespace)."""
    canary = "ssh-ed25519 AAAA-analyst-" + uuid.uuid4().hex
    image = host.root
    put(image, "/root/.ssh/authorized_keys", b"ssh-ed25519 AAAA-image-root\n", 0o600)
    put(image, "/etc/os-release", b"NAME=image-os\n")
    put(image, "/etc/issue", b"image-os \\n \\l\n")
    put(image, "/etc/machine-id", b"0123456789abcdef0123456789abcdef\n")
    os.symlink("/root/.ssh", str(image / "home/u/.ssh"))  # absolute: the image's /root
    (image / "home/w").mkdir(parents=True)
    os.symlink("../../../../../../../../../../root/.ssh", str(image / "home/w/.ssh"))  # climbs: stops at the root
    put(image, "/etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nu:x:1000:1000::/home/u:/bin/sh\n"
                              b"w:x:1001:1001::/home/w:/bin/sh\n")
    os.rename(str(host.log_dir), str(image / "var/log/bookgen-real"))
    os.symlink("/etc", str(image / "var/log/bookgen"))  # the log dir is a link to /etc
    os.symlink("/etc/machine-id", str(image / "var/lib-machine-id"))
    result = capture(image, out_dir, team_key, "--only", "system", "--only", "logs", "--only", "persistence",
                     "--only", "include", "--include", "/var/log/bookgen/issue", "--include",
                     "/home/w/.ssh/authorized_keys", "--include", "/var/lib-machine-id",
                     argv_prefix=in_private_mounts(_private_root_setup(live_dir, canary)))
    assert canary.encode() not in result.tar_bytes and b"ANALYST CONFIG" not in result.tar_bytes
    real_os_release = Path("/etc/os-release").read_bytes()
    assert real_os_release not in result.tar_bytes
    assert result.data("fs/$rootfs$/root/.ssh/authorized_keys") == b"ssh-ed25519 AAAA-image-root\n"
    assert result.data("fs/$rootfs$/etc/os-release") == b"NAME=image-os\n"  # the image's identity, by system
    assert result.artifacts["fs/$rootfs$/etc/os-release"]["collector"] == "system"
    assert result.data("fs/$rootfs$/etc/issue") == b"image-os \\n \\l\n"
    entry = result.artifacts["fs/$rootfs$/etc/issue"]
    assert entry["collector"] == "include" and entry["via"] == "/var/log/bookgen/issue", entry
    for link in ("fs/$rootfs$/home/u/.ssh", "fs/$rootfs$/home/w/.ssh", "fs/$rootfs$/var/log/bookgen",
                 "fs/$rootfs$/var/lib-machine-id"):
        assert result.members[link].issym(), link  # each link met is kept, as the link it is
    assert not [n for n in result.names if n.startswith(("fs/$rootfs$/home/u/.ssh/", "fs/$rootfs$/home/w/.ssh/"))]
    assert result.manifest["host"]["machine_id"] == "0123456789abcdef0123456789abcdef"
    assert not [e for e in result.errors if e["kind"] == "refused"]  # nothing refused: all of it is in the image


# -- 5. names with newlines, '|', '%' and bytes that are not UTF-8 ---------------------------------------------
HOSTILE_NAMES = (b"new\nline.log", b"pipe|name.log", b"bad\xff\xfeutf8.log", b"pct%7Cname.log", b"cr\rname.log",
                 b"\xc3(\nmix|%0A.log", b"esc\x1b[2Jname.log", b"trailing-newline\n", b"fake|0|1|r-r|0|0|0|0|0|0|0")


def test_hostile_names_survive_members_bodyfile_and_mactime(host, out_dir, team_key, tmp_path):
    logs = os.fsencode(str(host.log_dir))
    tmp = os.fsencode(str(host.root / "tmp"))
    os.makedirs(tmp, exist_ok=True)
    odd_dir = b"dir\n|\xff"
    os.makedirs(os.path.join(logs, odd_dir))
    expected = {}
    for name in HOSTILE_NAMES:
        for directory, body, mode in ((logs, b"log line of ", 0o644), (tmp, b"#!/bin/sh\n# ", 0o755),
                                      (os.path.join(logs, odd_dir), b"nested ", 0o644)):
            path = os.path.join(directory, name)
            with open(path, "wb") as handle:
                handle.write(body + name + b"\n")
            os.chmod(path, mode)
            logical = path[len(os.fsencode(str(host.root))):]
            expected[logical] = body + name + b"\n"
    result = capture(host.root, out_dir, team_key, "--only", "tmp-executables", "--only", "logs", "--only",
                     "timeline", codes=(0,))
    members = {os.fsencode(n): n for n in result.names}
    for logical, content in expected.items():
        name = members.get(b"fs/$rootfs$" + logical)
        assert name is not None, logical
        assert result.data(name) == content
        assert result.artifacts[name]["source"] == os.fsdecode(logical)
    # bodyfile: one line per entry, 11 '|'-separated fields, the name escaped so mactime reads it back
    result.bodyfile().decode("utf-8")  # valid UTF-8 whatever the names: plaso stops at the first line that is not
    lines = result.bodyfile().split(b"\n")
    assert lines[-1] == b""
    fields = [line.split(b"|") for line in lines[:-1]]
    assert all(len(f) == 11 for f in fields)
    shown = {decode_field(f[1]) for f in fields}
    rows = set(mactime_rows(result.bodyfile(), tmp_path))
    for logical in expected:
        display = re.sub(rb"[\x00-\x1f\x7f%]", lambda m: b"%%%02X" % m.group(0)[0], logical)
        assert display in shown, logical  # mactime's decoding shows control characters and '%' percent-encoded
        assert display in rows, logical  # ...and the entry is in mactime's timeline (a raw newline would drop it)
    assert rows == shown  # every entry of the bodyfile is in mactime's timeline, none garbled
    # extract writes every name back exactly
    target = tmp_path / "extracted"
    done = kit("--json", "extract", "-i", str(team_key[0]), str(result.payload), "--to", str(target))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    for logical, content in expected.items():
        assert Path(os.fsdecode(os.fsencode(str(target)) + b"/fs/$rootfs$" + logical)).read_bytes() == content


def test_a_name_cannot_forge_a_line_of_collection_log(host, out_dir, team_key):
    forged = "2099-01-01T00:00:00Z FORGED: capture ended cleanly"
    os.mkfifo(str(host.log_dir / ("x\n" + forged)))  # refused (a FIFO): its name goes to collection.log
    result = capture(host.root, out_dir, team_key, "--only", "logs", codes=(0,))
    assert any(e["source"] == "/var/log/bookgen/x\n" + forged for e in result.errors)  # exact in the manifest
    assert not [line for line in result.log().splitlines() if line.startswith("2099-")]


# -- 6. a huge sparse file, a file that grows while read ---------------------------------------------------------
SPARSE = ("/var/log/bookgen/huge.log", "/var/log/lastlog", "/var/log/wtmp", "/home/u/.bash_history",
          "/opt/bookgen/.env", "/tmp/huge-dropper", "/data/huge.img", "/var/log/auth.log", "/etc/passwd",
          DOCKER + CONTAINER_ID + "-json.log")


def test_huge_sparse_files_are_truncated_and_recorded(host, out_dir, team_key):
    heads = {}
    for logical in SPARSE:
        path = host.root / logical[1:]
        heads[logical] = path.read_bytes() if path.exists() else b"#!/bin/sh\n"  # what it says stays readable
        put(host.root, logical, heads[logical], 0o755 if logical.startswith("/tmp/") else 0o644)
        with open(str(path), "r+b") as handle:
            handle.truncate(10 * TIB)
    result = capture(host.root, out_dir, team_key, *ONLY_FILES, "--include", "/data/huge.img", "--max-file-size",
                     "8M", codes=(0,), env=NO_DOCKER)
    for logical in SPARSE:
        entry = result.artifacts["fs/$rootfs$" + logical]
        assert entry["truncated"] is True and entry["size"] == 8 * 1024 * 1024, entry
        assert entry["source_size"] == 10 * TIB and entry["truncated_at"] == 8 * 1024 * 1024
        assert result.data("fs/$rootfs$" + logical).startswith(heads[logical])
    assert result.manifest["payload"]["tar_bytes"] < 512 * 1024 * 1024
    assert all(c["status"] == "ok" for c in result.collectors.values())


class Appender(threading.Thread):
    """A writer appending to a log for as long as the test runs (bounded in rate and in total)."""

    def __init__(self, path: Path, limit: int) -> None:
        super().__init__(daemon=True)
        self.path, self.limit, self.stop, self.appended = path, limit, threading.Event(), 0

    def run(self) -> None:
        line = b"x" * 4095 + b"\n"
        with open(str(self.path), "ab", buffering=0) as handle:
            while not self.stop.is_set() and self.appended < self.limit:
                handle.write(line * 16)
                self.appended += len(line) * 16
                self.stop.wait(0.002)


def test_a_file_that_grows_while_read(host, mounts, out_dir, team_key):
    logs = host.log_dir
    growing = mounts(logs / "busy", "1g") / "growing.log"
    growing.write_bytes(os.urandom(1 << 20) * 96)  # 96 MiB: the read takes a while
    writer = Appender(growing, 768 << 20)
    writer.start()
    try:
        result = capture(host.root, out_dir, team_key, "--only", "logs", "--only", "include", "--include",
                         "/var/log/bookgen/busy/growing.log", codes=(0,))
    finally:
        writer.stop.set()
        writer.join(30)
    entry = result.artifacts["fs/$rootfs$/var/log/bookgen/busy/growing.log"]
    assert writer.appended > 0
    assert "grew from" in entry["changed_during_read"] and entry["size"] >= 96 << 20, entry
    assert entry["also_collected_by"] == ["include"]
    assert any(e["kind"] == "changed" and e["source"] == "/var/log/bookgen/busy/growing.log" for e in result.errors)
    with open(str(growing), "rb") as handle:
        assert result.data("fs/$rootfs$/var/log/bookgen/busy/growing.log")[: 1 << 20] == handle.read(1 << 20)


# -- 7. (and 2. on the live host) the live /tmp: implants named like us, deep trees, our own output ----------------
def test_the_live_tmp_implants_named_like_us_deep_trees_and_our_own_output(live_dir, team_key):
    """A live-host capture (--root /). Nothing is excluded by a name the attacker can choose: an implant in
    /tmp/bookgen-kit-*/ is collected. Our own output directory, on the same filesystem (--allow-same-disk), is
    known by device and inode and is not collected. Deep trees in /tmp: the reachable leaf is collected, the
    depth limit recorded. So that the run depends on nothing else on this machine, its /tmp is live_dir
    (bind-mounted, on the same disk) and /var/tmp and /dev/shm are empty, in a private mount namespace."""
    token = uuid.uuid4().hex[:10]
    lair, out = "/tmp/bookgen-kit-%s" % token, "/tmp/bookgen-kit-out-%s" % token  # as the capture sees them
    implants = {lair + "/implant": ELF + b"implant", lair + "/.hidden.sh": b"#!/bin/sh\necho hidden\n",
                lair + "/hostile-vm-20260101T000000Z.tar.zst.age.partial": ELF + b"partial",
                "/tmp/bk-hostile-out-decoy/x": ELF + b"decoy"}
    deep = live_dir / "deep"  # a tmpfs: a busy disk makes and removes 12,000 directories slowly
    mount_tmpfs(deep, "64m")
    try:
        for path, data in implants.items():
            put(live_dir, path[len("/tmp"):], data)
        leaves = {depth: "/tmp" + leaf[len(str(live_dir)):] for depth, leaf in _deep_fixture(deep, "live").items()}
        put(live_dir, out[len("/tmp"):] + "/bookgen-kit.pyz", b"#!/usr/bin/env python3\n# our tool, on the medium\n",
            0o755)
        setup = "mount --rbind %s /tmp\nmount -t tmpfs tmpfs /var/tmp\nmount -t tmpfs tmpfs /dev/shm" % shlex.quote(
            str(live_dir))
        result = capture("/", out, team_key, "--only", "tmp-executables", "--allow-same-disk",
                         argv_prefix=in_private_mounts(setup), seen_as=("/tmp", str(live_dir)))
    finally:
        unmount(deep)
    for path, data in implants.items():
        assert result.data("fs/$rootfs$" + path) == data, path
        assert result.artifacts["fs/$rootfs$" + path]["collector"] == "tmp-executables"
    assert not [n for n in result.names if n.startswith("fs/$rootfs$%s/" % out)]
    assert "%s not entered: bookgen-kit's own output" % out in result.log()
    assert result.manifest["collection"]["preflight"]["same_filesystem_as"] == ["/"]
    assert result.data("fs/$rootfs$" + leaves[1100]).startswith(b"#!/bin/sh")
    assert "fs/$rootfs$" + leaves[5000] not in result.artifacts
    limits = [e for e in result.errors if e["kind"] == "limit"]
    assert len(limits) == 1 and "depth (4096)" in limits[0]["reason"]
    assert limits[0]["source"].startswith("/tmp/deep/deep5000/d/d/")
    assert result.collectors["tmp-executables"]["status"] == "ok"


# -- 8. budgets and the deadline hold whatever the writer's speed -------------------------------------------------
BIG = 256 << 20


def _incompressible(path: Path, size: int) -> None:
    """`size` bytes gzip cannot shrink (a random block far longer than deflate's 32 KiB window, repeated)."""
    block = os.urandom(32 << 20)
    with open(str(path), "wb") as handle:
        for _ in range(size // len(block)):
            handle.write(block)


def _assert_abandoned_early(result: Capture, name: str, size: int, why: str) -> None:
    stats = result.collectors[name]
    assert stats["status"] == "abandoned" and stats["bytes"] < size, stats  # zlib cannot deflate 128 MB/s
    # at the rate it achieved in the time it was given, the whole read would have taken size / rate: it was
    # stopped far sooner (what it still takes is the zero padding of the member the tar header announced)
    allowed = min(stats["budget_seconds"], result.manifest["collection"]["limits"]["deadline_seconds"])
    rate = max(stats["bytes"], 1) / allowed
    assert stats["seconds"] < (size / rate) / 2, stats
    assert any(e["collector"] == name and "abandoned" in e["reason"] and why in e["reason"] for e in result.errors)
    entry = result.artifacts.get("fs/$rootfs$/data/big.bin")  # absent only if abandoned before its first byte
    assert entry is None or ("abandoned" in entry["error"] and entry["padded_with_zeros"] > 0), entry


def test_a_collector_budget_holds_against_a_slow_writer(host, mounts, out_dir, team_key):
    _incompressible(mounts(host.root / "data", "512m") / "big.bin", BIG)
    result = capture(host.root, out_dir, team_key, "--only", "system", "--only", "include", "--only", "timeline",
                     "--include", "/data/big.bin", "--compression", "gzip", "--budget", "include=1", codes=(6,))
    _assert_abandoned_early(result, "include", BIG, "its time budget")
    assert result.collectors["system"]["status"] == "ok" and result.collectors["timeline"]["status"] == "ok"
    assert result.collectors["include"]["budget_seconds"] == 1
    assert "timeline/notable.json" in result.artifacts


def test_the_capture_deadline_holds_against_a_slow_writer(host, mounts, out_dir, team_key):
    _incompressible(mounts(host.root / "data", "512m") / "big.bin", BIG)
    result = capture(host.root, out_dir, team_key, "--only", "include", "--only", "timeline", "--include",
                     "/data/big.bin", "--compression", "gzip", codes=(6,), deadline=2)
    _assert_abandoned_early(result, "include", BIG, "the capture's deadline")
    assert result.collectors["timeline"]["status"] == "not run"
    assert any(e["collector"] == "timeline" and "deadline" in e["reason"] for e in result.errors)
    assert result.manifest["collection"]["limits"]["deadline_seconds"] == 2


@pytest.mark.parametrize("compression,decompress", [("gzip", ["gzip", "-d", "-c"]), ("zstd", ["zstd", "-d", "-c"]),
                                                     ("none", ["cat"])])
def test_an_abandoned_member_is_padded_as_the_standard_tools_read_it(tmp_path, compression, decompress):
    """The zeros that fill an abandoned member (its header announced a size the source never delivered) go in as
    whole blocks (gzip) or frames (zstd) of zeros compressed once, not through the compressor: padding costs a
    CRC, not a compression (bench/abandon_padding). gzip, zstd and tar must still read the stream as one."""
    from toolkit.evidence.archive import ZERO_RUN, PayloadWriter

    size, kept = 2 * ZERO_RUN + 12345, 3 * 1048576 + 7
    head = os.urandom(kept)
    path = tmp_path / "payload"
    with open(str(path), "wb") as sink:
        writer = PayloadWriter(sink, [], compression)
        info = tarfile.TarInfo("fs/$rootfs$/data/big.bin")
        info.size = size
        writer.add_header(info)
        writer.write_data(head)
        assert writer.pad_remaining() == size - kept
        writer.end_member()
        writer.add_bytes(tarfile.TarInfo("after"), b"the next member")
        writer.close()
    if compression != "none":
        assert path.stat().st_size < kept + 2 * 1048576  # the zeros took (almost) no room
    plain = subprocess.run(decompress + [str(path)], capture_output=True, check=True, timeout=TIMEOUT).stdout
    listed = subprocess.run(["tar", "-tvf", "-"], input=plain, capture_output=True, check=True).stdout.decode()
    assert "fs/$rootfs$/data/big.bin" in listed and "after" in listed
    data = subprocess.run(["tar", "-xOf", "-", "fs/$rootfs$/data/big.bin"], input=plain, capture_output=True,
                          check=True).stdout
    assert len(data) == size and data[:kept] == head and data[kept:] == bytes(size - kept)
    assert subprocess.run(["tar", "-xOf", "-", "after"], input=plain, capture_output=True,
                          check=True).stdout == b"the next member"


# -- 9. a file collected by two collectors is one member --------------------------------------------------------------
def test_a_file_collected_twice_is_one_member(host, out_dir, team_key, tmp_path):
    put(host.root, "/tmp/dropper.sh", b"#!/bin/sh\necho dropped\n", 0o755)
    os.symlink("bookgen", str(host.root / "var/log/linked"))  # a second way to the same log, inside the image
    result = capture(host.root, out_dir, team_key, "--only", "tmp-executables", "--only", "logs", "--only", "app",
                     "--only", "persistence", "--only", "include", "--include", "/var/log/bookgen", "--include",
                     "/var/log/bookgen/api.log", "--include", "/var/log/linked/worker.log", "--include",
                     "/opt/bookgen/.env", "--include", "/tmp/dropper.sh", "--include", "/etc/passwd", codes=(0,))
    for name, first in (("fs/$rootfs$/var/log/bookgen/api.log", "logs"), ("fs/$rootfs$/var/log/bookgen/worker.log", "logs"),
                        ("fs/$rootfs$/opt/bookgen/.env", "app"), ("fs/$rootfs$/tmp/dropper.sh", "tmp-executables"),
                        ("fs/$rootfs$/etc/passwd", "persistence")):
        assert result.names.count(name) == 1, name
        entry = result.artifacts[name]
        assert entry["collector"] == first and entry["also_collected_by"] == ["include"], entry
        assert len([a for a in result.inner["artifacts"] if a["path"] == name]) == 1
    assert result.data("fs/$rootfs$/opt/bookgen/.env") == host.env_file.read_bytes()
    target = tmp_path / "extracted"
    done = kit("--json", "extract", "-i", str(team_key[0]), str(result.payload), "--to", str(target))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert (target / "fs/$rootfs$/var/log/bookgen/api.log").read_bytes() == (host.log_dir / "api.log").read_bytes()
    assert (target / "fs/$rootfs$/tmp/dropper.sh").read_bytes() == b"#!/bin/sh\necho dropped\n"


# -- 10. an attacker fills /tmp with executables: the responder's medium fills, the bundle is whole --------------------
def test_a_medium_that_fills_ends_in_a_whole_bundle(host, team_key, tmp_path):
    """/tmp holds 384 MiB of random executables and the output medium is a 256 MiB tmpfs (the preflight, which
    counts --include only, lets it start): what would eat the reserve is an error entry each, the newest file is
    stored first, the capture writes its findings and manifest, exits 6 and verifies; the medium keeps room."""
    small = tmp_path / "small-medium"
    mount_tmpfs(small, "256m")
    try:
        for number in range(24):
            put(host.root, "/tmp/flood/f%02d" % number, ELF + os.urandom(16 << 20), 0o755)
        put(host.root, "/tmp/dropper", b"#!/bin/sh\necho newest\n", 0o755)  # changed last: copied first
        result = capture(host.root, small, team_key, "--only", "tmp-executables", "--only", "staging", codes=(6,))
        limits = [e for e in result.errors if e["kind"] == "error" and "reserve on the output medium" in e["reason"]]
        assert limits and all(e["source"].startswith("/tmp/flood/") for e in limits), result.errors
        stored = [n for n in result.artifacts if n.startswith("fs/$rootfs$/tmp/flood/")]
        assert 1 <= len(stored) < 24 and len(stored) + len(limits) >= 24
        assert result.data("fs/$rootfs$/tmp/dropper") == b"#!/bin/sh\necho newest\n"
        degraded = result.manifest["collection"]["degraded"]
        assert any(d.startswith("output medium: %d members" % len(limits)) for d in degraded), degraded
        listing = json.loads(result.data("volatile/tmp-executables.json"))
        assert len(listing["entries"]) == 25 and sum(e["copied"] for e in listing["entries"]) == len(stored) + 1
        space = os.statvfs(str(small))
        assert space.f_bavail * space.f_frsize >= 16 << 20  # the reserve less what the manifest took
    finally:
        unmount(small)
