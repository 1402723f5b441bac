"""Physical backups: `backup base` is pg_basebackup's tar (its backup_manifest inside, the WAL it needs fetched
into pg_wal) streamed through sha256 -> zstd -> age into `base-<UTC>.tar.zst[.age]`, with a sidecar and
SHA256SUMS; reading one back is extraction into a directory, which pg_verifybackup judges.

Invariants:
- One pass, nothing in plaintext on disk: the tar goes from pg_basebackup's stdout through zstd and age into
  NAME.partial, renamed only when pg_basebackup succeeded.
- The sidecar's WAL range, timeline and start time come from the backup's own backup_label and backup_manifest,
  read as they stream past (no second read, no trust in a clock of ours).
- Extraction writes regular files and directories only, each inside its directory (a member named with `..`, an
  absolute name, a link or a device is refused, and nothing of the set is left half-extracted as if whole).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import stat
import tarfile
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

from toolkit import utc
from toolkit.db.server import Server, check_tool
from toolkit.errors import BadInputError, EnvironmentProblem, VerificationFailed

BASE_FORMAT = "bookgen-kit/base-backup/1"
BASE_SUFFIX = ".tar.zst"
CAPTURED = ("backup_label", "backup_manifest")
MAX_CAPTURED = 256 << 20  # a manifest lists every file (~200 bytes each): a million files fit


class TarWatcher:
    """Reads a ustar stream as it passes and keeps the content of a few named members (pg_basebackup writes
    plain ustar: names split into prefix and name, no pax records for the members kept here)."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = set(names)
        self.captured: Dict[str, bytes] = {}
        self.members = 0
        self.bytes = 0
        self._header = bytearray()
        self._remaining = 0  # bytes of the current member's data and padding still to pass
        self._data_left = 0  # of which data
        self._keeping: Optional[bytearray] = None
        self._keeping_name = ""
        self.ended = False

    def feed(self, data) -> None:
        view = memoryview(data)
        self.bytes += len(view)
        while len(view):
            if self._remaining:
                take = min(self._remaining, len(view))
                if self._keeping is not None and self._data_left:
                    kept = min(take, self._data_left)
                    self._keeping += view[:kept]
                    self._data_left -= kept
                elif self._data_left:
                    self._data_left -= min(take, self._data_left)
                self._remaining -= take
                view = view[take:]
                if not self._remaining and self._keeping is not None:
                    self.captured[self._keeping_name] = bytes(self._keeping)
                    self._keeping = None
                continue
            take = min(512 - len(self._header), len(view))
            self._header += view[:take]
            view = view[take:]
            if len(self._header) == 512:
                self._start(bytes(self._header))
                self._header = bytearray()

    def _start(self, header: bytes) -> None:
        if header == bytes(512):
            self.ended = True
            return
        name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
        if prefix:
            name = prefix + "/" + name
        size_field = header[124:136]
        if size_field[0] & 0x80:  # base-256 (a member over 8 GiB)
            size = int.from_bytes(size_field[1:], "big")
        else:
            size = int(size_field.split(b"\0", 1)[0].strip() or b"0", 8)
        self.members += 1
        self._data_left = size
        self._remaining = (size + 511) // 512 * 512
        name = name[2:] if name.startswith("./") else name
        if name in self.names and size <= MAX_CAPTURED:
            self._keeping, self._keeping_name = bytearray(), name
            if not size:
                self.captured[name] = b""
                self._keeping = None


class _Compressing:
    """zstd frames into a byte sink (the age encryptor or the file's hashing writer)."""

    def __init__(self, deliver: Callable[[bytes], None]) -> None:
        import zstandard

        self.deliver = deliver
        threads = (os.cpu_count() or 1)
        self._writer = zstandard.ZstdCompressor(level=1, threads=threads, write_checksum=True).stream_writer(
            self, closefd=False, write_return_read=True)

    def write(self, data) -> int:  # called by zstandard with compressed bytes
        self.deliver(bytes(data))
        return len(data)

    def compress(self, data: bytes) -> None:
        self._writer.write(data)

    def close(self) -> None:
        import zstandard

        self._writer.flush(zstandard.FLUSH_FRAME)


def parse_label(text: str) -> Dict[str, Any]:
    """backup_label: the start LSN and its segment, the checkpoint, the start time and timeline."""
    found: Dict[str, Any] = {}
    match = re.search(r"^START WAL LOCATION: ([0-9A-F]+/[0-9A-F]+) \(file ([0-9A-F]{24})\)", text, re.M)
    if match:
        found["start_lsn"], found["start_segment"] = match.group(1), match.group(2)
    for key, field in (("CHECKPOINT LOCATION", "checkpoint_lsn"), ("START TIME", "start_time"),
                       ("START TIMELINE", "timeline"), ("LABEL", "label")):
        match = re.search(r"^%s: (.*)$" % key, text, re.M)
        if match:
            found[field] = int(match.group(1)) if field == "timeline" else match.group(1).strip()
    return found


def create_base(server: Server, out_dir: str, recipients: Sequence[Any] = (), recipient_names: Sequence[str] = (),
                progress: Optional[Callable[[int], None]] = None, archive_dir: Optional[str] = None
                ) -> Dict[str, Any]:
    """A base backup of the whole cluster, streamed into the backups directory as one encrypted file."""
    from toolkit.db.backup import SIDECAR_SUFFIX, BackupSet, _write_stream
    from toolkit.evidence.capture import update_sums

    os.makedirs(out_dir, exist_ok=True)
    started = time.time()
    version = server.server_version()
    tool = server.tool_record("pg_basebackup")  # missing or too old: refused before any file exists
    identity = server.query("SELECT system_identifier::text, current_setting('wal_segment_size'), "
                            "current_setting('data_directory'), current_setting('archive_mode') "
                            "FROM pg_control_system()")[0]
    stamp = utc.stamp(started)
    name = "base-%s%s%s" % (stamp, BASE_SUFFIX, ".age" if recipients else "")
    serial = 1
    while any(os.path.lexists(os.path.join(out_dir, candidate)) for candidate in (name, name + ".partial")):
        serial += 1
        name = "base-%s-%d%s%s" % (stamp, serial, BASE_SUFFIX, ".age" if recipients else "")
    path = os.path.join(os.path.abspath(out_dir), name)
    watcher = TarWatcher(CAPTURED)
    args = ["-D", "-", "-Ft", "-X", "fetch", "-c", "fast", "--manifest-checksums=SHA256",
            "-l", "bookgen-kit %s" % stamp]

    def produce(deliver: Callable[[bytes], None]) -> None:
        compressing = _Compressing(deliver)

        def take(data: bytes) -> None:
            watcher.feed(data)
            compressing.compress(data)
            if progress:
                progress(len(data))

        check_tool(server.run_tool("pg_basebackup", args, stdout=take), "pg_basebackup")
        compressing.close()
        if not watcher.ended or "backup_manifest" not in watcher.captured or "backup_label" not in watcher.captured:
            raise VerificationFailed("pg_basebackup's output ended without its backup_label, manifest or end "
                                     "of archive: not a set")

    written = _write_stream(path, recipients, produce)
    label = parse_label(watcher.captured["backup_label"].decode("utf-8", "replace"))
    try:
        manifest = json.loads(watcher.captured["backup_manifest"])
        ranges = manifest.get("WAL-Ranges") or []
        files = manifest.get("Files") or []
    except ValueError:
        os.unlink(path)
        raise VerificationFailed("pg_basebackup's backup_manifest is not JSON: not a set") from None
    sidecar = {
        "format": BASE_FORMAT, "kind": "base", "created": utc.iso(started), "ended": utc.iso(),
        "seconds": round(time.time() - started, 2), "server_version": version,
        "source": {"mode": server.mode, "server": server.description, "data_directory": identity[2],
                   "archive_mode": identity[3]},
        "system_identifier": identity[0], "wal_segment_size": int(identity[1]) if identity[1].isdigit() else
        _size_setting(identity[1]),
        "label": label, "wal_ranges": ranges,
        "end_lsn": ranges[-1]["End-LSN"] if ranges else None,
        "cluster": {"files": len(files), "bytes": sum(int(f.get("Size", 0)) for f in files), "tar_bytes": watcher.bytes,
                    "manifest_sha256": hashlib.sha256(watcher.captured["backup_manifest"]).hexdigest()},
        "pg_basebackup": tool, "archive": archive_dir,
        "dump": dict(written, format="pg_basebackup tar, zstd", encrypted=bool(recipients),
                     recipients=list(recipient_names)),
        "verified": [], "keep": False,
    }
    backup = BackupSet(path, path + SIDECAR_SUFFIX, os.path.dirname(path))
    backup.save_sidecar(sidecar)
    update_sums(backup.directory, {name: written["sha256"]})
    return {"base": path, "sidecar": backup.sidecar, "size": written["size"], "sha256": written["sha256"],
            "start_lsn": label.get("start_lsn"), "end_lsn": sidecar["end_lsn"], "timeline": label.get("timeline"),
            "cluster_bytes": sidecar["cluster"]["bytes"], "seconds": sidecar["seconds"]}


def _size_setting(text: str) -> int:
    match = re.match(r"^(\d+)\s*(kB|MB|GB)?$", text.strip())
    if not match:
        raise BadInputError("wal_segment_size %r is not a size" % text)
    return int(match.group(1)) * {None: 1, "kB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}[match.group(2)]


class _Prefetch(io.RawIOBase):
    """Reads `stream` ahead on a thread (decryption and decompression there), hands the blocks over in order:
    the extracting thread writes while the next blocks are decoded. A failure there is raised here."""

    def __init__(self, stream, block: int = 1 << 20, depth: int = 8) -> None:
        import queue
        import threading

        self._queue: "queue.Queue" = queue.Queue(depth)
        self._buffer = b""
        self._done = False

        def run() -> None:
            try:
                while True:
                    data = stream.read(block)
                    self._queue.put(data)
                    if not data:
                        return
            except BaseException as error:  # raised on the reading side
                self._queue.put(error)

        self._thread = threading.Thread(target=run, daemon=True, name="base-backup-decode")
        self._thread.start()

    def readable(self) -> bool:
        return True

    def readinto(self, target) -> int:
        while not self._buffer:
            if self._done:
                return 0
            item = self._queue.get()
            if isinstance(item, BaseException):
                self._done = True
                raise item
            if not item:
                self._done = True
                return 0
            self._buffer = item
        size = min(len(target), len(self._buffer))
        target[:size] = self._buffer[:size]
        self._buffer = self._buffer[size:]
        return size


def tar_chunks(chunks: Iterator[bytes]) -> io.BufferedReader:
    """The plaintext tar of a base set's decrypted chunks (zstd decompressed, on a thread of its own), as a
    readable stream."""
    import zstandard

    from toolkit.evidence.bundle import _ChunkReader

    raw = io.BufferedReader(_ChunkReader(chunks), 1 << 20)
    decoded = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
    return io.BufferedReader(_Prefetch(decoded), 1 << 20)


# what pg_verifybackup does not hold against the manifest (its own list)
NOT_IN_MANIFEST = ("backup_manifest", "postgresql.auto.conf", "standby.signal", "recovery.signal")


def extract(stream, directory: str, owner: Optional[tuple] = None) -> Dict[str, Any]:
    """Every member of the tar stream into `directory` (which must be new): regular files and directories only,
    each inside it, files 0600 and directories 0700, owned by `owner` (uid, gid) when given. Each file's SHA-256
    is taken as it is written (`digests`). No fsync per file: PostgreSQL syncs the whole data directory when its
    recovery starts."""
    os.makedirs(directory, mode=0o700)
    root = os.path.realpath(directory)
    counts: Dict[str, Any] = {"files": 0, "directories": 0, "bytes": 0, "digests": {}}
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                name = os.path.normpath(member.name)
                target = os.path.join(root, name)
                if name.startswith(("/", "..")) or os.path.isabs(member.name) or \
                        not os.path.realpath(os.path.dirname(target) if name != "." else target).startswith(root):
                    raise VerificationFailed("the base backup names %r, outside its directory: refused" %
                                             member.name)
                if member.isdir():
                    if name != ".":
                        os.makedirs(target, mode=0o700, exist_ok=True)
                        counts["directories"] += 1
                    continue
                if not member.isreg():
                    raise VerificationFailed("the base backup holds %r, a %s: refused (only files and directories)"
                                             % (member.name, "link" if member.issym() or member.islnk() else
                                                "special file"))
                os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
                source = tar.extractfile(member)
                digest = hashlib.sha256()
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
                with os.fdopen(fd, "wb", buffering=0) as out:
                    while True:
                        data = source.read(1 << 20)
                        if not data:
                            break
                        digest.update(data)
                        out.write(data)
                os.utime(target, (member.mtime, member.mtime))
                counts["digests"][name] = (member.size, digest.hexdigest())
                counts["files"] += 1
                counts["bytes"] += member.size
    except tarfile.TarError as error:
        raise VerificationFailed("the base backup's tar does not read to its end: %s" % error) from None
    if owner is not None:
        for current, directories, files in os.walk(root):
            for entry in [current] + [os.path.join(current, f) for f in files]:
                os.lchown(entry, owner[0], owner[1])
    os.chmod(root, stat.S_IRWXU)
    return counts


def check_manifest(directory: str, digests: Dict[str, tuple]) -> List[str]:
    """What pg_verifybackup checks of the files, from the digests taken while extracting: the manifest's own
    checksum, every file it lists there with its size and SHA-256, nothing there it does not list (pg_wal and
    the files PostgreSQL itself writes aside). The WAL is read by the recovery that follows. Problems, in words."""
    try:
        with open(os.path.join(directory, "backup_manifest"), "rb") as handle:
            text = handle.read()
        manifest = json.loads(text)
    except (OSError, ValueError) as error:
        return ["backup_manifest: %s" % error]
    problems = []
    cut = text.rfind(b'"Manifest-Checksum"')
    if cut < 0 or hashlib.sha256(text[:cut]).hexdigest() != manifest.get("Manifest-Checksum"):
        problems.append("backup_manifest: its own checksum does not match")
    listed = {}
    for entry in manifest.get("Files") or []:
        path = entry.get("Path") or ""
        if path.startswith("pg_wal/"):
            continue
        listed[path] = entry
        found = digests.get(os.path.normpath(path))
        if found is None:
            problems.append("%s: in the manifest, not in the backup" % path)
        elif found[0] != int(entry.get("Size", -1)):
            problems.append("%s: %d bytes, the manifest says %s" % (path, found[0], entry.get("Size")))
        elif entry.get("Checksum-Algorithm") == "SHA256" and found[1] != entry.get("Checksum"):
            problems.append("%s: SHA-256 does not match the manifest" % path)
        elif entry.get("Checksum-Algorithm") not in ("SHA256", None):
            problems.append("%s: checksum algorithm %s, not SHA256" % (path, entry.get("Checksum-Algorithm")))
    for path in digests:
        if path not in listed and not path.startswith("pg_wal/") and path not in NOT_IN_MANIFEST:
            problems.append("%s: in the backup, not in the manifest" % path)
    return problems


def verify_extracted(directory: str, major: Optional[int] = None) -> Dict[str, Any]:
    """pg_verifybackup on an extracted base backup: every file against the manifest and its checksum, and the WAL
    the backup needs, parsed by the pg_waldump beside it, which reads only its own major's WAL: this host's
    pg_verifybackup of the backup's major, else its newest with --no-parse-wal (said in the detail)."""
    from toolkit.db.server import ClientTools

    tools = ClientTools(major)
    args = [directory]
    if major is not None and tools.tool("pg_verifybackup").major != major:
        args = ["--no-parse-wal", directory]
    said: List[bytes] = []
    done = tools.run_tool("pg_verifybackup", args, stdout=said.append)
    lines = [line for line in (b"".join(said).decode("utf-8", "replace") + done["stderr"]).splitlines() if line]
    detail = lines[-1] if lines else "exit %s" % done["exit_code"]
    if args[0] == "--no-parse-wal":
        detail += " (WAL not parsed: no pg_verifybackup %d on this host)" % major
    return {"ok": done["exit_code"] == 0, "detail": detail, "tool": done["tool"]}


def free_bytes(directory: str) -> int:
    info = os.statvfs(directory)
    return info.f_bavail * info.f_frsize


def scratch_room(directory: str, needed: int) -> None:
    """Refuse, before anything is written, when `directory` cannot take `needed` bytes and a margin."""
    free = free_bytes(directory)
    if free < needed + (256 << 20):
        raise EnvironmentProblem("%s has %d MiB free; the base backup needs %d MiB there (+256 MiB margin)" % (
            directory, free >> 20, needed >> 20), hint="choose another directory with --scratch DIR")


def remove_tree(path: str) -> None:
    if os.path.lexists(path):
        shutil.rmtree(path, ignore_errors=True)
