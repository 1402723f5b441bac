"""`capture`: collectors -> pax tar -> zstd -> age -> NAME.partial -> rename; then manifest, custody, sums, signature.

Order on disk, each step atomic: the payload (renamed from .partial only once
complete and fsynced), the detached manifest, the custody log's first entry,
SHA256SUMS, and with a signing key the manifest's SSHSIG signature. A run killed
at any point leaves at most a .partial payload, which `verify` calls incomplete.
"""
from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import signal
import socket
import stat
import tarfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

from toolkit import utc
from toolkit.errors import EnvironmentProblem, KitError, UsageError, describe
from toolkit.evidence import archive, custody
from toolkit.evidence.collectors import select
from toolkit.evidence.collectors.base import (
    Chunk,
    CollectionContext,
    Fact,
    LogLine,
    MemberEnd,
    MemberStart,
    Reference,
    Skip,
    is_done,
    start_collector,
)
from toolkit.evidence.room import OutputRoom
from toolkit.host.accounts import login_name
from toolkit.host.atomic import AtomicFile
from toolkit.host.hashing import sha256_path as sha256_file

SCHEMA = custody.SCHEMA_3
RESERVE_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_FILE_SIZE = 2 * 1024 ** 3
SUMS_NAME = "SHA256SUMS"
# The whole capture ends by these (seconds), whatever the host does to slow it: the collectors left are
# recorded as not run, and the bundle is completed with what was collected.
DEADLINES = {"volatile": 600.0, "triage": 1800.0, "full": 6 * 3600.0}


@dataclass
class CaptureOptions:
    out_dir: str
    recipients: Sequence[Any]  # age Recipient objects; empty only with encrypt=False
    recipient_names: List[str]
    encrypt: bool = True
    profile: str = "triage"
    includes: List[str] = field(default_factory=list)
    only: List[str] = field(default_factory=list)
    skip: List[str] = field(default_factory=list)
    case_id: str = "case"
    evidence_id: Optional[str] = None
    examiner: Optional[str] = None
    purpose: Optional[str] = None
    authority: Optional[str] = None
    sign_key: Any = None  # SshPrivateKey
    compression: str = "auto"  # zstd where this interpreter has it, else gzip (recorded as a degradation)
    max_file_size: int = DEFAULT_MAX_FILE_SIZE
    root: str = "/"
    docker_root: str = "/var/lib/docker"
    expected_ports: List[int] = field(default_factory=lambda: [8000, 5432, 6379, 22, 80, 443])
    low_priority: bool = True
    allow_same_disk: bool = False
    force: bool = False
    command_line: List[str] = field(default_factory=list)
    budgets: Dict[str, float] = field(default_factory=dict)  # collector name -> seconds (overrides its own)
    deadline_seconds: Optional[float] = None  # the whole capture; default per profile (DEADLINES)
    memory: bool = False  # image the whole physical memory (the `memory` collector) whatever the profile
    process_memory: List[int] = field(default_factory=list)  # also dump these processes' memory
    freeze: bool = False  # SIGSTOP each process for the duration of its dump
    process_memory_limit: int = 1 << 30
    process_memory_total: int = 4 << 30


@dataclass
class CaptureResult:
    payload: str
    manifest: str
    custody: str
    sums: str
    signature: Optional[str]
    payload_size: int
    payload_sha256: str
    members: int
    artifacts: int
    errors: List[Dict[str, Any]]
    collectors: List[Dict[str, Any]]
    seconds: float
    encrypted: bool
    findings: List[Dict[str, Any]]
    degraded: List[str]  # what ran in a lesser way (manifest: collection.degraded)
    timeline: Optional[Dict[str, Any]] = None  # changes per hour and recent changes (the case report's plot)




def _safe_name(text: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "-_." else "-" for c in text).strip("-.")
    return cleaned or "x"


def _capabilities() -> Dict[str, Any]:
    facts = {"uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid()}
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith(("CapEff:", "CapPrm:", "NoNewPrivs:", "Seccomp:")):
                    key, value = line.split(":", 1)
                    facts[key.lower()] = value.strip()
    except OSError:
        pass
    return facts


def _source_devices(options: CaptureOptions, deployment) -> Dict[str, int]:
    roots = {options.root: options.root}
    context = CollectionContext(options.root, deployment, options.profile, options.includes, options.max_file_size)
    roots[deployment.app_dir] = context.host_path(deployment.app_dir)
    for include in options.includes:
        roots[include] = context.host_path(os.path.abspath(include) if options.root in ("", "/") else include)
    devices = {}
    for logical, path in roots.items():
        try:
            devices[logical] = os.stat(path).st_dev
        except OSError:
            continue
    return devices


def _estimate_bytes(fs, logicals: Sequence[str], max_file_size: int, budget: float = 5.0) -> int:
    """Upper bound of what the sources add (each file capped at max_file_size), within a time budget."""
    from toolkit.host.hostfs import WalkLimits

    limits = WalkLimits(deadline=time.monotonic() + budget)
    total = 0
    for logical in logicals:
        for entry in fs.walk(logical, limits):
            if stat.S_ISREG(entry.info.st_mode):
                total += min(entry.info.st_size, max_file_size)
    return total


def preflight(options: CaptureOptions, deployment) -> Dict[str, Any]:
    """Refuse to write onto the collected filesystem, or without room for the bundle (unless told to)."""
    try:
        os.makedirs(options.out_dir, exist_ok=True)
    except FileExistsError:
        raise UsageError("--out %s is a file, not a directory" % options.out_dir) from None
    except OSError as error:
        raise EnvironmentProblem("cannot make the output directory %s: %s" % (options.out_dir, describe(error))
                                 ) from None
    out_device = os.stat(options.out_dir).st_dev
    same = [logical for logical, device in _source_devices(options, deployment).items() if device == out_device]
    if same and not options.allow_same_disk:
        raise UsageError("refusing to write the bundle onto the filesystem being collected from (%s is on the same "
                         "filesystem as %s)" % (options.out_dir, ", ".join(sorted(same))),
                         hint="write to the responder's medium, or add --allow-same-disk")
    context = CollectionContext(options.root, deployment, options.profile, options.includes, options.max_file_size)
    sources = [os.path.abspath(i) if options.root in ("", "/") else i for i in options.includes]
    estimate = _estimate_bytes(context.fs, sources, options.max_file_size) + 4 * 1024 * 1024  # includes, plus generated members and app config
    space = os.statvfs(options.out_dir)
    free = space.f_bavail * space.f_frsize
    needed = estimate + RESERVE_BYTES
    if free < needed and not options.force:
        raise EnvironmentProblem("not enough space on %s: the bundle may need up to %d MiB (+%d MiB reserve), "
                                 "%d MiB free" % (options.out_dir, estimate // 1048576, RESERVE_BYTES // 1048576,
                                                  free // 1048576),
                                 hint="use a larger medium, fewer --include paths, or --force")
    return {"estimated_bytes": estimate, "free_bytes": free, "same_filesystem_as": same}


def _member_info(name: str, data: bytes) -> tarfile.TarInfo:
    """A read-only generated member, stamped now (add_bytes sets the size)."""
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o444, time.time()
    return info


class _Recorder:
    """Consumes one collector's events into the payload and the manifest, within its time budget."""

    def __init__(self, writer: archive.PayloadWriter, progress: Optional[Callable]) -> None:
        self.writer = writer
        self.progress = progress
        self.artifacts: List[Dict[str, Any]] = []
        self.errors: List[Dict[str, Any]] = []
        self.log: List[str] = []
        self.facts: Dict[str, List[Dict[str, Any]]] = {}
        self.room: Optional[OutputRoom] = None  # told how many bytes went to the writer
        self.by_path: Dict[str, Dict[str, Any]] = {}
        self.bytes = 0

    def note(self, message: str) -> None:
        """A line of collection.log: what the host named (paths) is escaped, so no name can forge a line."""
        self.log.append("%s %s" % (utc.iso(), one_line(message)))

    def run(self, collector, context: CollectionContext, budget: float) -> Dict[str, Any]:
        """Consume the collector's events until it is done or its budget (which includes the time the writer
        takes) runs out; the deadline is checked before every event, so a slow writer cannot stretch it."""
        started = time.monotonic()
        deadline = started + budget
        self.room = context.room
        if context.deadline is not None:
            deadline = min(deadline, context.deadline)
        events, _thread, emitter = start_collector(collector, context)
        self.note("collector %s started (budget %.0f s)" % (collector.name, budget))
        stats = {"name": collector.name, "rank": collector.rank, "items": 0, "bytes": 0, "errors": 0,
                 "status": "ok", "budget_seconds": round(budget, 3)}
        current = None  # (entry, hash, info)
        while True:
            remaining = deadline - time.monotonic()
            event = None
            if remaining > 0:
                try:
                    event = events.get(timeout=min(remaining, 0.5))
                except queue.Empty:
                    continue
            if event is None:
                emitter.cancelled.set()
                why = "its time budget of %.0f s" % budget if context.deadline is None or \
                    started + budget <= context.deadline else "the capture's deadline"
                stats["status"] = "abandoned"
                self.note("collector %s abandoned: %s ran out" % (collector.name, why))
                if current is not None:
                    self._finish(current, {"error": "abandoned: %s ran out while this was read" % why}, stats)
                self.errors.append({"collector": collector.name, "source": None, "kind": "error",
                                    "reason": "abandoned after %.1f s: %s ran out; what it had produced is kept" % (
                                        time.monotonic() - started, why)})
                stats["errors"] += 1
                break
            if is_done(event):
                break
            if isinstance(event, MemberStart):
                self.writer.add_header(event.info)
                current = [event.entry, hashlib.sha256(), event.info]
            elif isinstance(event, Chunk):
                self.writer.write_data(event.data)
                current[1] = event.digest  # hashed on the collector's thread, in parallel
                self.bytes += len(event.data)
                if self.room is not None:
                    self.room.consumed += len(event.data)
                stats["bytes"] += len(event.data)
                if self.progress:
                    self.progress(len(event.data), None, collector.name)
            elif isinstance(event, MemberEnd):
                self._finish(current, event.notes, stats)
                current = None
            elif isinstance(event, Reference):
                entry = self.by_path.get(event.archive_path)
                if entry is not None:
                    also = entry.setdefault("also_collected_by", [])
                    if event.collector not in also:
                        also.append(event.collector)
            elif isinstance(event, Skip):
                self.errors.append({"collector": collector.name, "source": event.source, "reason": event.reason,
                                    "kind": event.kind})
                if event.kind == "error":
                    stats["errors"] += 1
                self.note("%s: %s: %s" % (collector.name, event.source, event.reason))
            elif isinstance(event, LogLine):
                self.note(event.message)
            elif isinstance(event, Fact):
                self.facts.setdefault(event.kind, []).append({"data": event.data, "evidence": event.evidence})
        stats["seconds"] = round(time.monotonic() - started, 3)
        self.note("collector %s %s in %.2f s: %d items, %d bytes, %d errors" % (
            collector.name, stats["status"], stats["seconds"], stats["items"], stats["bytes"], stats["errors"]))
        return stats

    def _finish(self, current, notes: Dict[str, Any], stats: Dict[str, Any]) -> None:
        entry, digest, info = current
        padded = self.writer.remaining
        if padded:
            zeros = bytes(min(padded, 1 << 20))
            left = padded
            while left:
                piece = zeros[:min(left, len(zeros))]
                digest.update(piece)
                left -= len(piece)
            self.writer.pad_remaining()
            if self.room is not None:
                self.room.consumed += padded
            notes = dict(notes)
            notes.setdefault("padded_with_zeros", padded)
        self.writer.end_member()
        entry["size"] = info.size if info.isreg() else 0
        if info.isreg():
            entry["sha256"] = digest.hexdigest()
        entry.setdefault("error", None)
        entry.update(notes)
        if notes.get("error"):
            stats["errors"] += 1
            self.errors.append({"collector": entry.get("collector"), "source": entry.get("source"),
                                "reason": notes["error"], "kind": "error"})
        if notes.get("changed_during_read"):
            self.errors.append({"collector": entry.get("collector"), "source": entry.get("source"),
                                "reason": notes["changed_during_read"], "kind": "changed"})
        self.artifacts.append(entry)
        self.by_path[entry["path"]] = entry
        stats["items"] += 1
        if self.progress:
            self.progress(0, 1, entry.get("collector"))


def bundle_base_name(options: CaptureOptions, started: float) -> str:
    stamp = utc.stamp(started)
    name = "%s-%s-%s%s" % (_safe_name(options.case_id), _safe_name(socket.gethostname()), stamp,
                           archive.SUFFIXES[options.compression])
    return name + (".age" if options.encrypt else "")


def _environment_findings(tool: Dict[str, Any]) -> List[Dict[str, Any]]:
    from toolkit.evidence.findings import finding
    from toolkit.host.selfcheck import environment_warnings

    severity = {"ld-so-preload": "high", "env-ld_preload": "high", "env-ld_audit": "high",
                "env-ld_library_path": "medium", "writable-sys-path": "medium"}
    return [dict(finding("collector-environment-" + w.code, severity.get(w.code, "low"), w.message,
                         ["manifest.json#tool"]), source="the capture's own environment")
            for w in environment_warnings(tool)]


def update_sums(out_dir: str, files: Dict[str, str]) -> str:
    """SHA256SUMS in the output directory: these files' lines replaced or added, the others kept."""
    path = os.path.join(out_dir, SUMS_NAME)
    lines: Dict[str, str] = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as existing:
            for line in existing:
                if "  " in line:
                    digest, name = line.rstrip("\n").split("  ", 1)
                    lines[name] = digest
    lines.update({name: digest for name, digest in files.items()})
    with AtomicFile(path, 0o644, overwrite=True) as out:
        out.write("".join("%s  %s\n" % (lines[name], name) for name in sorted(lines)).encode("utf-8"))
        out.commit()
    return path


def capture(options: CaptureOptions, deployment, progress: Optional[Callable] = None) -> CaptureResult:
    from toolkit.host.selfcheck import interpreter_facts, tool_facts

    if not options.encrypt and options.recipients:
        raise UsageError("--no-encrypt with recipients makes no sense")
    if options.encrypt and not options.recipients:
        raise UsageError("no recipients: capture refuses to write plaintext evidence",
                         hint="give -r/-R/-p, bake recipients into the pyz, or --no-encrypt explicitly")
    from toolkit import runtime

    degraded = ["%s: %s (%s)" % (item.get("component"), item.get("effect"), item.get("reason"))
                for item in runtime.degraded()]
    if options.compression == "auto":
        options.compression = "zstd" if archive.zstd_available() else "gzip"
        if options.compression == "gzip":
            degraded.append("zstd: the zstandard module does not load on this interpreter; the payload is gzip")
    elif options.compression == "zstd" and not archive.zstd_available():
        raise EnvironmentProblem("--compression zstd: the zstandard module does not load on this interpreter",
                                 hint="use --compression gzip, or a host Python within the build's range "
                                      "(bookgen-kit self-check names them)")
    if options.compression not in archive.COMPRESSIONS:
        raise UsageError("--compression must be one of %s" % ", ".join(archive.COMPRESSIONS))
    if options.root not in ("", "/") and not os.path.isdir(options.root):
        raise UsageError("--root %s is not a directory" % options.root)
    collectors = select(options.profile, options.only, options.skip, ("memory",) if options.memory else ())
    names = [c.name for c in collectors]
    if options.memory and "memory" not in names:
        raise UsageError("--memory given but the memory collector is skipped")
    if (options.process_memory or options.freeze) and "process-memory" not in names:
        raise UsageError("--process-memory/--freeze given but the process-memory collector does not run",
                         hint="leave it in --only, or out of --skip")
    if options.includes and "include" not in [c.name for c in collectors]:
        raise UsageError("--include given but the include collector is skipped")
    started = time.time()
    flight = preflight(options, deployment)
    unknown = sorted(set(options.budgets) - {c.name for c in collectors})
    if unknown:
        raise UsageError("--budget names collectors that do not run: %s" % ", ".join(unknown))
    deadline_seconds = options.deadline_seconds or DEADLINES.get(options.profile, DEADLINES["triage"])
    out_info = os.stat(options.out_dir)
    context = CollectionContext(options.root, deployment, options.profile, options.includes, options.max_file_size,
                                started, options.docker_root, own_outputs=frozenset({(out_info.st_dev,
                                                                                      out_info.st_ino)}),
                                deadline=time.monotonic() + deadline_seconds,
                                process_memory=tuple(options.process_memory), freeze=options.freeze,
                                process_memory_limit=options.process_memory_limit,
                                process_memory_total=options.process_memory_total,
                                room=OutputRoom(options.out_dir, RESERVE_BYTES))
    if options.low_priority:
        lower_priority()
    if options.freeze and threading.current_thread() is threading.main_thread():
        # a SIGTERM or SIGHUP mid-dump becomes an exit, so the frozen process is continued at exit (atexit in
        # toolkit.memory.process); Ctrl-C already ends through an exception
        for number in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(number, _exit_on_signal)
    name = bundle_base_name(options, started)
    payload_path = os.path.join(os.path.abspath(options.out_dir), name)
    tool = tool_facts()
    interpreter = interpreter_facts()
    with AtomicFile(payload_path, 0o644) as out:
        writer = archive.PayloadWriter(out, list(options.recipients) if options.encrypt else [],
                                       options.compression)
        recorder = _Recorder(writer, progress)
        context.room.pipeline = writer.buffered_bound
        context.facts = recorder.facts  # what earlier collectors saw, for the timeline's events
        recorder.note("capture started: profile %s, root %s, output %s" % (options.profile, options.root,
                                                                          payload_path))
        collector_stats = []
        try:
            for collector in collectors:
                if time.monotonic() >= context.deadline:
                    recorder.errors.append({"collector": collector.name, "source": None, "kind": "error",
                                            "reason": "not run: the capture's deadline of %.0f s had passed" %
                                            deadline_seconds})
                    collector_stats.append({"name": collector.name, "rank": collector.rank, "status": "not run",
                                            "items": 0, "bytes": 0, "errors": 1, "seconds": 0})
                    continue
                budget = options.budgets.get(collector.name, collector.budget_seconds)
                collector_stats.append(recorder.run(collector, context, budget))
            from toolkit.evidence.findings import compute

            degraded += ["%s: %s (%s)" % (d["data"]["component"], d["data"]["effect"], d["data"]["reason"])
                         for d in recorder.facts.get("degraded", [])]
            if context.room.summary():
                degraded.append(context.room.summary())
                recorder.note("degraded: " + context.room.summary())
            findings = _environment_findings(tool) + compute(recorder.facts, options.expected_ports)
            recorder.note("findings: %d" % len(findings))
            recorder.note("capture ended")
            for member_name, data in (("findings.json", json.dumps({"findings": findings}, indent=2,
                                                                   sort_keys=True).encode()),
                                      ("collection.log", ("\n".join(recorder.log) + "\n").encode())):
                writer.add_bytes(_member_info(member_name, data), data)
                recorder.artifacts.append({"path": member_name, "type": "generated", "source": None,
                                           "collector": "capture", "method": "generated", "size": len(data),
                                           "sha256": hashlib.sha256(data).hexdigest(), "error": None,
                                           "collected_at": utc.iso()})
            ended = time.time()
            manifest = {
                "schema": SCHEMA,
                "tool": dict(tool, interpreter=interpreter, platform={"system": os.uname().sysname,
                                                                      "machine": os.uname().machine,
                                                                      "kernel": os.uname().release}),
                "case": {"case_id": options.case_id, "evidence_id": options.evidence_id or name.split(".")[0],
                         "examiner": options.examiner, "purpose": options.purpose, "authority": options.authority},
                "host": _host_facts(context),
                "collection": {
                    "started_utc": utc.iso(started), "ended_utc": utc.iso(ended), "seconds": round(ended - started, 3),
                    "profile": options.profile, "root": options.root, "command_line": options.command_line,
                    "identity": _capabilities(), "preflight": flight,
                    "degraded": degraded,
                    "mode": run_mode(options.root),
                    "limits": {"max_file_size": options.max_file_size, "compression": options.compression,
                               "deadline_seconds": deadline_seconds},
                    "collectors": collector_stats,
                },
                "artifacts": recorder.artifacts,
                "errors": recorder.errors,
                "encryption": {"encrypted": True, "format": "age-encryption.org/v1",
                               "recipients": options.recipient_names} if options.encrypt else
                {"encrypted": False, "WARNING": "THIS BUNDLE IS NOT ENCRYPTED: it holds secrets in plaintext"},
                "findings_count": len(findings),
            }
            # compact: the C encoder (indent= uses the pure-Python one, slow with 200,000 artifacts)
            inner = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
            writer.add_bytes(_member_info("manifest.json", b""), inner)
            payload = writer.close()
        except BaseException:
            writer.abort()
            raise
        out.commit()
    made: List[str] = []  # this run's files beside the payload: all of them, or none (a medium that fills)
    try:
        manifest = detached_manifest(manifest, hashlib.sha256(inner).hexdigest())
        manifest["payload"] = {"file": name, "size": payload["size"], "sha256": payload["sha256"],
                               "container": "POSIX pax tar", "compression": options.compression,
                               "encrypted": options.encrypt, "tar_bytes": payload["tar_bytes"],
                               "members": writer.members}
        manifest_path = payload_path + ".manifest.json"
        with AtomicFile(manifest_path, 0o644) as out:
            out.write(json.dumps(manifest, indent=2, sort_keys=True).encode() + b"\n")
            out.commit()
        made.append(manifest_path)
        manifest_sha256 = sha256_file(manifest_path)
        custody_path = payload_path + ".custody.jsonl"
        if not os.path.lexists(custody_path):
            made.append(custody_path)  # ours from its first byte
        custody.append(custody_path, {"action": "collected", "actor": options.examiner or login_name(),
                                      "location": socket.gethostname(), "purpose": options.purpose or "",
                                      "payload_sha256": payload["sha256"], "manifest_sha256": manifest_sha256},
                       signer=options.sign_key)
        sums = update_sums(options.out_dir, {os.path.basename(payload_path): payload["sha256"],
                                             os.path.basename(manifest_path): manifest_sha256})
        signature_path = None
        if options.sign_key is not None:
            from toolkit.crypto import sshsig

            with open(manifest_path, "rb") as manifest_file:
                text = sshsig.sign(options.sign_key, manifest_file, sshsig.DEFAULT_NAMESPACE)
            signature_path = manifest_path + ".sig"
            with AtomicFile(signature_path, 0o644) as out:
                out.write(text.encode("ascii"))
                out.commit()
            made.append(signature_path)
    except (KitError, OSError):
        _remove_partial_bundle(options.out_dir, [payload_path] + made)
        raise

    return CaptureResult(payload_path, manifest_path, custody_path, sums, signature_path, payload["size"],
                         payload["sha256"], writer.members, len(recorder.artifacts), recorder.errors,
                         collector_stats, round(time.time() - started, 2), options.encrypt, findings, degraded,
                         (recorder.facts.get("timeline_summary") or [{}])[0].get("data"))


def _remove_partial_bundle(out_dir: str, paths: List[str]) -> None:
    """A bundle that could not be finished (its manifest, custody log or SHA256SUMS not written): this run's files
    go, and their SHA256SUMS lines, so nothing is left that looks like a bundle. Best effort: the error that
    stopped it is what the user sees."""
    for path in paths:
        try:
            os.unlink(path)
        except OSError:
            pass
    names = {os.path.basename(path) for path in paths}
    sums = os.path.join(out_dir, SUMS_NAME)
    try:
        with open(sums, encoding="utf-8") as handle:
            kept = [line for line in handle if line.rstrip("\n").split("  ", 1)[-1] not in names]
        with AtomicFile(sums, 0o644, overwrite=True) as out:
            out.write("".join(kept).encode("utf-8"))
            out.commit()
    except (OSError, KitError):
        pass


CONTAINER_MODE_ENV = "BOOKGEN_KIT_CONTAINER_MODE"


def run_mode(root: str) -> Dict[str, Any]:
    """How this capture ran: on the host itself, or (a host with no usable Python) inside a container of an
    image already on the host, sharing its PID, network and UTS namespaces, with its / read-only as --root.
    The documented `docker run` line sets BOOKGEN_KIT_CONTAINER_MODE to the image it used."""
    image = os.environ.get(CONTAINER_MODE_ENV)
    if not image:
        return {"kind": "host"}
    return {"kind": "container", "image": image, "root": root,
            "changes_on_host": "one container created from %s and removed when the capture ended (docker run "
                               "--rm); the host's / was mounted read-only" % image,
            "namespaces_shared_with_host": ["pid", "network", "uts", "ipc"]}


def one_line(text: str) -> str:
    """Text on one printable line: control characters and undecodable bytes as \\xNN escapes, backslash doubled."""
    if text.isprintable() and "\\" not in text:
        return text
    out = []
    for char in text:
        if char == "\\":
            out.append("\\\\")
        elif char.isprintable():
            out.append(char)
        else:
            code = ord(char)
            out.append("\\x%02x" % (code - 0xDC00) if 0xDC80 <= code <= 0xDCFF else
                       "\\x%02x" % code if code < 0x100 else "\\u%04x" % code)
    return "".join(out)


def detached_manifest(inner: Dict[str, Any], inner_sha256: str) -> Dict[str, Any]:
    """What travels unencrypted: the inner manifest without its per-file entries (their hashes are an oracle
    for short secrets), committing to the inner manifest by its sha256 (the payload is added by the caller)."""
    detached = {key: value for key, value in inner.items() if key != "artifacts"}
    detached["artifacts_count"] = len(inner.get("artifacts", []))
    detached["inner_manifest_sha256"] = inner_sha256
    return detached


def _host_facts(context: CollectionContext) -> Dict[str, Any]:
    from toolkit.evidence.collectors.system import system_facts

    return system_facts(context)


def _exit_on_signal(number: int, frame) -> None:
    raise SystemExit(128 + number)


def lower_priority() -> None:
    """Capture yields to the host's own work: nice 10 and the idle I/O class (best effort)."""
    try:
        os.nice(10)
    except OSError:
        pass
    try:
        import ctypes
        import platform

        number = {"x86_64": 251, "aarch64": 30}.get(platform.machine())
        if number:
            ioprio_class_idle, who_process = 3, 1
            ctypes.CDLL(None, use_errno=True).syscall(number, who_process, 0, ioprio_class_idle << 13)
    except (OSError, AttributeError):
        pass


def redacted_command_line(argv: Sequence[str]) -> List[str]:
    """argv as run; bookgen-kit takes no secret in argv, but values of secret-looking options are masked anyway."""
    masked, hide_next = [], False
    for arg in argv:
        if hide_next:
            masked.append("***")
            hide_next = False
            continue
        lowered = arg.lower()
        if any(word in lowered for word in ("password", "passphrase=", "secret", "token")) and "=" in arg:
            masked.append(arg.split("=", 1)[0] + "=***")
        else:
            masked.append(_URL_PASSWORD.sub(r"\1***@", arg))  # postgresql://user:PASSWORD@host
            hide_next = lowered in ("--password", "--secret", "--token")
    return masked


_URL_PASSWORD = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)[^@\s]+@")
