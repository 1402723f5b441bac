"""Point-in-time restore: a base backup and the WAL archive replayed, in a scratch cluster beside the live one,
to the moment asked for (`--target-time`, `--target-lsn`, `--target-name`, `--target-xid`); proven there; then
dumped into the live cluster through restore's own swap (mode `dump`, the default) or swapped in whole (mode
`swap`: both clusters stopped, the data directories renamed, the old one kept).

Invariants:
- Every refusal comes before the first write: the base's checksum and system identifier, the archive's
  continuity from the base to the target (a gap names the last reachable commit), room beside the live data
  directory, the tools.
- The scratch cluster never archives (archive_mode=off on its command line, over whatever its copied
  configuration says), listens on a private socket only, and is stopped and removed at the end or by the next run.
  In container mode it runs in a container of the live one's image with no network, the archive and every other
  mount of the live container read-only, and the live data directory not mounted at all.
- The live cluster is untouched until the scratch cluster has paused at the target and its proof passed; in
  `swap` mode the stop-rename-start is done by a detached process that finishes it (or puts the old data
  directory back) even when the kit is killed: at every moment one of the two runs, or is being started.
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

from toolkit import utc
from toolkit.db import physical, wal
from toolkit.db.backup import BackupSet, locate_set, schema_sha256, table_counts
from toolkit.db.server import HostServer, Server, host_tools
from toolkit.db.target import ConnectionParams
from toolkit.errors import BadInputError, EnvironmentProblem, UsageError, VerificationFailed
from toolkit.host.hashing import sha256_path

TARGET_KINDS = ("time", "lsn", "name", "xid")
CONTROL_SETTINGS = {"max_connections setting": "max_connections",
                    "max_worker_processes setting": "max_worker_processes",
                    "max_wal_senders setting": "max_wal_senders",
                    "max_prepared_xacts setting": "max_prepared_transactions",
                    "max_locks_per_xact setting": "max_locks_per_transaction"}
SCRATCH_MARK = ".pitr-"
# kept from the live data directory when the swapped-in one replaces it (RHEL keeps them there; Debian in /etc)
CONFIG_FILES = ("postgresql.conf", "pg_hba.conf", "pg_ident.conf", "postgresql.auto.conf")
OLD_MARK = ".pre-pitr-"
# container mode: where the scratch container sees its data directory, its socket and the archive (read-only)
DATA_INSIDE = "/var/lib/bookgen-kit-pitr/data"
RUN_INSIDE = "/var/run/bookgen-kit-pitr"
ARCHIVE_INSIDE = "/var/lib/bookgen-kit-pitr/archive"
SCRATCH_LABEL = "bookgen-kit.pitr-of"  # its value: the live data directory on this host


@dataclass
class PitrPlan:
    base: BackupSet
    target_kind: str
    target: str
    archive_dir: str
    database: str = "bookgen"
    mode: str = "dump"  # or "swap"
    backups_dir: Optional[str] = None
    timeout: float = 3600.0


@dataclass
class PitrReport:
    steps: List[Dict[str, Any]] = field(default_factory=list)
    reached: Dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    old_data_directory: Optional[str] = None
    restore: Optional[Dict[str, Any]] = None

    def step(self, name: str, detail: str, ok: bool = True) -> None:
        self.steps.append({"step": name, "ok": ok, "detail": detail, "at": utc.iso(),
                           "elapsed": round(time.monotonic() - self.started, 3)})


def choose_base(path: str, target_kind: str, target: str) -> BackupSet:
    """SET itself when it is a base backup; a directory: its newest base backup that ended before a time target
    (the newest for other targets)."""
    if not os.path.isdir(path):
        chosen = locate_set(path)
        if chosen.kind != "base":
            raise UsageError("--target-%s needs a base backup (base-*.tar.zst[.age]), not %s" % (target_kind, path))
        return chosen
    bases = []
    for candidate in sorted(glob.glob(os.path.join(path, "base-*.tar.zst*"))):
        if candidate.endswith((".partial", ".backup.json")):
            continue
        sidecar = locate_set(candidate).load_sidecar() or {}
        if sidecar.get("format") == physical.BASE_FORMAT:
            bases.append((sidecar.get("ended") or "", candidate))
    bases.sort(key=lambda b: parse_time(b[0]) if b[0] else parse_time("1970-01-01T00:00:00Z"))
    if target_kind == "time":
        wanted = parse_time(target)
        bases = [b for b in bases if b[0] and parse_time(b[0]) <= wanted]
    if not bases:
        raise BadInputError("no base backup in %s%s" % (path, " ended before %s" % target if target_kind == "time"
                                                         else ""), hint="`bookgen-kit backup base` makes one")
    return locate_set(bases[-1][1])


def parse_time(target: str):
    """A --target-time (or a time we wrote) as an aware UTC datetime, microseconds kept; refuses what is not a
    time with a zone (a time without one is read by the server in its own zone: ambiguous)."""
    from datetime import datetime, timezone

    text = target.strip()
    if text.endswith(" UTC"):
        text = text[:-4] + "+00:00"
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    if "T" not in text:
        text = text.replace(" ", "T", 1)
    zone = re.search(r"([+-])(\d\d):?(\d\d)?$", text)  # +00, +0530, +05:30 -> +HH:MM (3.8 takes only that)
    if zone and re.search(r"T\d\d:\d\d", text[:zone.start()]):
        text = text[:zone.start()] + "%s%s:%s" % (zone.group(1), zone.group(2), zone.group(3) or "00")
    match = re.match(r"^(.*T\d\d:\d\d:\d\d)(\.\d+)?([+-]\d\d:?\d\d)?$", text)
    if match and match.group(2):  # fromisoformat before 3.11 takes 3 or 6 fraction digits only
        text = match.group(1) + (match.group(2) + "000000")[:7] + (match.group(3) or "")
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError("--target-time %r is not a time (use e.g. 2026-11-28T03:50:00Z)" % target) from None
    if parsed.tzinfo is None:
        raise UsageError("--target-time %r has no zone: add Z or +00:00" % target)
    return parsed.astimezone(timezone.utc)


def iso(moment) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --------------------------------------------------------------------------- preflight
def preflight(server: Server, plan: PitrPlan, identities: Sequence[Any], report: PitrReport) -> Dict[str, Any]:
    """Everything that can refuse, before anything is written. Returns what the steps need."""
    if plan.mode not in ("dump", "swap"):
        raise UsageError("--pitr-mode is dump or swap, not %r" % plan.mode)
    if plan.target_kind == "time":
        parse_time(plan.target)
    elif plan.target_kind == "lsn" and not re.match(r"^[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}$", plan.target):
        raise UsageError("--target-lsn %r is not an LSN (e.g. 0/3000A28)" % plan.target)
    elif plan.target_kind == "xid" and not re.match(r"^\d{1,20}$", plan.target):
        raise UsageError("--target-xid %r is not a transaction id (digits)" % plan.target)
    elif plan.target_kind == "name" and not 0 < len(plan.target.encode()) < 64:
        raise UsageError("--target-name must be a restore point's name (1 to 63 bytes)")
    if "'" in plan.archive_dir or "%" in plan.archive_dir:
        raise UsageError("an archive directory with ' or % cannot be put in a restore_command")
    sidecar = plan.base.load_sidecar()
    if not sidecar or sidecar.get("format") != physical.BASE_FORMAT:
        raise BadInputError("%s has no base backup sidecar: its WAL range is unknown" % plan.base.dump)
    actual = sha256_path(plan.base.dump)
    if actual != sidecar["dump"]["sha256"]:
        raise VerificationFailed("%s: sha256 %s, the sidecar says %s: nothing was changed" % (
            plan.base.dump, actual, sidecar["dump"]["sha256"]))
    if plan.base.encrypted and not identities:
        raise UsageError("the base backup is encrypted: give -i IDENTITY")
    live = server.query("SELECT system_identifier::text, current_setting('data_directory'), "
                        "current_setting('server_version_num'), current_setting('archive_mode'), "
                        "(SELECT rolname FROM pg_roles WHERE oid = 10) FROM pg_control_system()")[0]
    live_settings = {name: value for name, value in server.query(
        "SELECT name, setting FROM pg_settings WHERE name IN (%s)" % ", ".join(
            "'%s'" % name for name in CONTROL_SETTINGS.values()))}
    if live[0] != sidecar["system_identifier"]:
        raise BadInputError("the base backup is of another cluster (system identifier %s, the server's is %s)" % (
            sidecar["system_identifier"], live[0]))
    data_directory = live[1] if server.mode == "host" else server.host_path(live[1])
    if not data_directory or not os.path.isdir(data_directory):
        raise EnvironmentProblem("the server's data directory %s is not on this host%s: the scratch cluster goes "
                                 "beside it" % (live[1], "" if server.mode == "host" else
                                                " (no bind or volume mount of %s holds it)" % server.description))
    if os.geteuid() != 0:
        raise EnvironmentProblem("point-in-time restore writes a data directory for the server's user: run as root")
    major = int(live[2]) // 10000
    bindir = _bindir(major) if server.mode == "host" else _container_bindir(server)
    owner = os.stat(data_directory)
    if plan.mode == "swap" and owner.st_dev != os.stat(os.path.dirname(data_directory.rstrip("/"))).st_dev:
        raise EnvironmentProblem("%s is a mount point of its own: swap mode renames it, which its filesystem refuses "
                                 "(use --pitr-mode dump): nothing was changed" % data_directory)
    segment_size = int(sidecar["wal_segment_size"])
    timeline = int(sidecar["label"]["timeline"])
    start = wal.parse_segment(sidecar["label"]["start_segment"], segment_size)[1]
    if not os.path.isdir(plan.archive_dir):
        raise BadInputError("no WAL archive at %s" % plan.archive_dir)
    switched_at = _switch_and_wait(server, plan.archive_dir, report) if live[3] != "off" else None
    archive = wal.read_archive(plan.archive_dir, segment_size)
    path = plan_path(archive, timeline, start, _waldump(server, major, bindir), plan, switched_at)
    if plan.target_kind == "time" and parse_time(plan.target) < parse_time(sidecar["ended"]):
        raise UsageError("--target-time %s is before the base backup ended (%s): choose an older base backup" % (
            iso(parse_time(plan.target)), sidecar["ended"]))
    needed = int(sidecar["cluster"]["bytes"]) + path["segments"] * segment_size
    physical.scratch_room(os.path.dirname(data_directory.rstrip("/")), needed)
    report.step("preflight", "base %s (sha256 matches, cluster %s); WAL from %s along timeline%s %s continuous "
                "(last commit %s)%s; %s MiB free beside %s" % (
                    os.path.basename(plan.base.dump), sidecar["system_identifier"], sidecar["label"]["start_segment"],
                    "s" if len(path["timelines"]) > 1 else "", ", ".join(map(str, path["timelines"])),
                    path["last_commit"], "; replayed to its end (no commit after the target)" if
                    path["to_end"] else "", physical.free_bytes(os.path.dirname(data_directory.rstrip("/"))) >> 20,
                    data_directory))
    from toolkit.db.archiving import _first_unreachable

    # in container mode the archive is mounted into the scratch container: only the directory itself must open
    blocked = _first_unreachable(plan.archive_dir, owner.st_uid, owner.st_gid) if server.mode == "host" else \
        None if _readable_by(plan.archive_dir, owner.st_uid, owner.st_gid) else plan.archive_dir
    if blocked:
        raise EnvironmentProblem("the server's user (uid %d) cannot reach the archive %s (%s is closed to it): "
                                 "nothing was changed" % (owner.st_uid, plan.archive_dir, blocked))
    image = server.image_id() if server.mode == "container" else None
    return {"superuser": live[4], "live_settings": live_settings, "image": image, "data_inside": live[1],
            "sidecar": sidecar, "data_directory": data_directory.rstrip("/"), "bindir": bindir,
            "owner": (owner.st_uid, owner.st_gid), "last_commit": path["last_commit"], "timeline": path["timeline"],
            "to_end": path["to_end"]}


def plan_path(archive: wal.Archive, base_timeline: int, start: int, waldump: Callable[[List[str]], str],
              plan: PitrPlan, switched_at: Optional[Any]) -> Dict[str, Any]:
    """Which timeline to recover along, and whether the archive holds every segment to the target.

    The path is the newest timeline's ancestry from the base's timeline (what `latest` follows). For a time target
    it ends on the timeline that was current then: the last one that began (the last commit on its parent before
    the switch) before the target. Each timeline's segments must be there from where the path enters it (the
    switch segment is read from the child) to where it leaves it, or for the last one to its newest segment.
    A target later than the last commit on the path is reached by replaying to the end only when the archive is
    known to hold everything up to then (the live server's segment was switched and archived after the target)."""
    size = archive.segment_size
    latest = max([base_timeline] + [t for t in archive.histories])
    chain: List[List[Any]] = [[base_timeline, None]]  # [timeline, the LSN where the next one begins]
    if latest != base_timeline:
        history = wal.read_history(os.path.join(archive.directory, "%08X.history" % latest))
        ancestry = [entry[0] for entry in history] + [latest]
        if base_timeline in ancestry:
            index = ancestry.index(base_timeline)
            chain = [[entry[0], entry[1], entry[2]] for entry in history[index:]] + [[latest, None]]
    chosen = len(chain) - 1
    if plan.target_kind == "time":
        wanted = parse_time(plan.target)
        began = None
        for position in range(1, len(chain)):
            parent = chain[position - 1]
            # no commit on the parent before the switch: the child began no earlier than the parent did
            began = _switch_time(archive, waldump, parent[0], parent[1], parent[2] if len(parent) > 2 else "") or \
                began
            if began is not None and began >= wanted:
                chosen = position - 1
                break
    chain = chain[:chosen + 1]
    segments, first = 0, start
    names: List[str] = []
    for position, link in enumerate(chain):
        timeline, leaves = link[0], link[1] if position < len(chain) - 1 else None
        line = archive.timelines.get(timeline)
        last = wal.segment_of(leaves, size) - 1 if leaves else (line.last if line else first - 1)
        for number in range(first, last + 1):
            if not archive.has(timeline, number):
                raise VerificationFailed(_unreachable(plan, "the archive has no segment %s (a gap)" % wal.segment_name(
                    timeline, number, size), _last_commit_before(archive, waldump, names)))
            names.append(wal.segment_name(timeline, number, size))
        segments += max(0, last - first + 1)
        first = wal.segment_of(leaves, size) if leaves else last + 1
    if not names:
        raise VerificationFailed("the WAL archive %s does not hold segment %s, where the base backup starts: no "
                                 "restore from it is possible" % (archive.directory, wal.segment_name(
                                     base_timeline, start, size)))
    last_commit = _last_commit_before(archive, waldump, names)
    to_end = False
    if plan.target_kind == "time":
        wanted = parse_time(plan.target)
        if last_commit is None or wanted > parse_time(last_commit):
            if chosen == len(chain) - 1 and switched_at is not None and switched_at >= wanted and \
                    chain[-1][0] == latest:
                to_end = True  # nothing was committed between the last commit and the target
            else:
                raise VerificationFailed(_unreachable(plan, "the newest archived segment is %s" % names[-1],
                                                      last_commit))
    elif plan.target_kind == "lsn" and wal.segment_of(plan.target, size) > wal.parse_segment(names[-1], size)[1]:
        raise VerificationFailed(_unreachable(plan, "the newest archived segment is %s" % names[-1], last_commit))
    return {"timeline": chain[-1][0], "timelines": [link[0] for link in chain], "segments": segments,
            "last_commit": last_commit, "to_end": to_end}


def _last_commit_before(archive: wal.Archive, waldump: Callable[[List[str]], str],
                        names: List[str]) -> Optional[str]:
    """The last commit in the newest of these segments that holds one (at most 64 read), as ISO 8601 UTC."""
    found = wal.last_commit(waldump, [os.path.join(archive.directory, name) for name in reversed(names[-64:])])
    return iso(parse_time(found)) if found else None


def _switch_time(archive: wal.Archive, waldump: Callable[[List[str]], str], parent: int, lsn: str,
                 reason: str):
    """When the timeline after `parent` began: the last commit on the parent before the switch LSN."""
    number = wal.segment_of(lsn, archive.segment_size)
    paths = [os.path.join(archive.directory, wal.segment_name(parent, n, archive.segment_size))
             for n in range(number, max(-1, number - 64), -1)]
    found = wal.last_commit(waldump, [p for p in paths if os.path.isfile(p)], end_lsn=lsn)
    if found:
        return parse_time(found)
    match = re.search(r"before (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?[+-]\d\d(?::?\d\d)?)", reason)
    return parse_time(match.group(1)) if match else None


def _unreachable(plan: PitrPlan, where: str, last_commit: Optional[str]) -> str:
    return "--target-%s %s cannot be reached: %s, and the last reachable commit is at %s: nothing was changed" % (
        plan.target_kind, plan.target, where, last_commit or "(none)")


def _readable_by(directory: str, uid: int, gid: int) -> bool:
    """Whether uid/gid may list and search this directory (its own mode bits; root may)."""
    from toolkit.db.archiving import class_bits

    return uid == 0 or class_bits(os.stat(directory), uid, gid) & 5 == 5


def _container_bindir(server: Server) -> str:
    """Where the live container's server binaries are (the server says; the scratch cluster runs the same)."""
    rows = server.query("SELECT setting FROM pg_config WHERE name = 'BINDIR'")
    if not rows or not rows[0][0]:
        raise EnvironmentProblem("%s does not say where its binaries are (pg_config)" % server.description)
    return rows[0][0]


def _waldump(server: Server, major: int, bindir: str) -> Callable[[List[str]], str]:
    """pg_waldump of the server's major: the host's when it has one, else the live container's own, reading
    the archive through the container's mount of it. Returns a runner: its arguments, the last a host path."""
    env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C", "TZ": "UTC"}
    host = [tool.path for tool in host_tools("pg_waldump") if tool.major == major]
    if server.mode == "host" or host:
        binary = os.path.join(bindir, "pg_waldump") if server.mode == "host" else host[0]

        def run_here(args: List[str]) -> str:
            return subprocess.run([binary] + args, capture_output=True, text=True, timeout=60, env=env).stdout
        return run_here

    def run_inside(args: List[str]) -> str:
        inside = server.container_path(args[-1])
        if inside is None:
            raise EnvironmentProblem("%s is on no mount of %s: its pg_waldump cannot read it" % (
                args[-1], server.description))
        code, out, _ = server.exec_argv([os.path.join(bindir, "pg_waldump")] + args[:-1] + [inside], env)
        return out.decode("utf-8", "replace")
    return run_inside


def _bindir(major: int) -> str:
    for tool in host_tools("pg_ctl"):
        if tool.major == major:
            return os.path.dirname(tool.path)
    raise EnvironmentProblem("no PostgreSQL %d server binaries on this host (pg_ctl, postgres)" % major,
                             hint="install postgresql-%d" % major)


def _switch_and_wait(server: Server, archive_dir: str, report: PitrReport, timeout: float = 120.0):
    """Close the live server's current segment and wait until it is in the archive: the archive then holds every
    commit up to the time returned (the server's clock at the switch), or None when it was not archived."""
    row = server.query("SELECT pg_walfile_name(pg_switch_wal()), to_char(clock_timestamp() AT TIME ZONE 'UTC', "
                       "'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')")[0]
    name = row[0]
    deadline = time.monotonic() + timeout
    while not os.path.isfile(os.path.join(archive_dir, name)):
        if time.monotonic() > deadline:
            report.step("switch wal", "segment %s was not archived within %.0f s: the archive ends before it" % (
                name, timeout), ok=False)
            return None
        time.sleep(0.2)
    report.step("switch wal", "the live server's current segment %s is archived" % name)
    return parse_time(row[1])


def as_user(uid: int, gid: int) -> Callable[[], None]:
    """A preexec_fn that runs the child as uid/gid with no supplementary groups (subprocess's user= and group=
    are 3.9+; the kit runs on 3.8)."""
    def drop() -> None:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    return drop


# --------------------------------------------------------------------------- the scratch cluster
@dataclass
class Scratch:
    directory: str
    run_dir: str
    port: int
    process: Optional[subprocess.Popen]
    owner: tuple
    bindir: str
    superuser: str = "postgres"
    container: Any = None  # container mode: the scratch container (its postgres is PID 1), else None

    def server(self, dbname: str = "postgres") -> Server:
        if self.container is not None:
            from toolkit.db.server import ContainerServer

            return ContainerServer(self.container.name, user=self.superuser, dbname=dbname, socket_dir=RUN_INSIDE)
        return HostServer(ConnectionParams(host=self.run_dir, port=self.port, dbname=dbname, user=self.superuser,
                                           password=None))

    def log_tail(self, lines: int = 5) -> List[str]:
        """The server's last lines that say something (FATAL, PANIC, ERROR, LOG)."""
        try:
            if self.container is not None:
                text = self.container.logs(tail=2000).decode("utf-8", "replace").splitlines()
            else:
                with open(os.path.join(self.run_dir, "server.log"), encoding="utf-8", errors="replace") as handle:
                    text = handle.read().splitlines()
        except Exception:  # the log is gone, or the engine
            return []
        return [line for line in text if re.search(r"(FATAL|PANIC|ERROR|LOG):", line)][-lines:]

    def exit_code(self) -> Optional[int]:
        """None while the server runs, else how it ended."""
        if self.container is not None:
            self.container.reload()
            state = self.container.attrs.get("State") or {}
            return None if state.get("Running") else int(state.get("ExitCode") or 0)
        return self.process.poll() if self.process is not None else 0

    def recovery_state(self) -> Optional[tuple]:
        """(in recovery, replay pause state) once it answers, else None."""
        if self.container is not None:
            try:
                row = self.server().query("SELECT pg_is_in_recovery(), CASE WHEN pg_is_in_recovery() THEN "
                                          "pg_get_wal_replay_pause_state() END")[0]
            except Exception:  # still starting, not yet consistent, or just ended (the engine's 409): the caller
                return None  # looks at how it ended next
            return row[0] in ("t", "true", "True"), row[1]
        import psycopg

        try:
            with psycopg.connect(host=self.run_dir, port=self.port, user=self.superuser, dbname="postgres",
                                 connect_timeout=5, autocommit=True) as conn:
                return conn.execute("SELECT pg_is_in_recovery(), CASE WHEN pg_is_in_recovery() THEN "
                                    "pg_get_wal_replay_pause_state() END").fetchone()
        except psycopg.OperationalError:
            return None

    def stop(self) -> None:
        """Fast shutdown (SIGINT), then SIGKILL after a grace; the process reaped, the container removed."""
        if self.container is not None:
            _remove_scratch_container(self.container)
            self.container = None
            return
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _remove_scratch_container(container: Any) -> None:
    try:
        container.reload()
        if container.status == "running":
            container.kill(signal="SIGINT")  # fast shutdown
            try:
                container.wait(timeout=60)
            except Exception:  # still running after the grace: removed by force below
                pass
        container.remove(v=True, force=True)  # and its anonymous volumes (an image's VOLUME)
    except Exception as error:
        if "No such container" not in str(error) and "404" not in str(error):
            raise EnvironmentProblem("the scratch container %s could not be removed: %s" % (
                container.name, str(error).splitlines()[0][:200])) from None


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def clean_leftovers(data_directory: str, report: PitrReport) -> None:
    """A killed run's scratch directories beside the live one: their postmaster stopped, then removed."""
    for path in sorted(glob.glob(data_directory + SCRATCH_MARK + "*")):
        if not os.path.isdir(path):
            continue
        _stop_postmaster(path)
        physical.remove_tree(path)
        report.step("cleanup", "removed %s, left by an interrupted point-in-time restore" % path)
    # a killed run's socket directory in the temp directory: only this cluster's (its name says which), whose
    # postmaster is gone (a restore of another cluster keeps its own)
    for path in sorted(glob.glob(os.path.join(tempfile.gettempdir(), _run_prefix(data_directory) + "*"))):
        if os.path.isdir(path) and not os.path.islink(path) and not _socket_in_use(path):
            physical.remove_tree(path)


def _run_prefix(data_directory: str) -> str:
    """The scratch cluster's socket directory's name: which live cluster it is for."""
    import hashlib

    return "bookgen-kit-pitr-run-%s-" % hashlib.sha256(data_directory.encode()).hexdigest()[:12]


def _socket_in_use(run_dir: str) -> bool:
    """Whether a postmaster still holds a socket there (its lock file names a live process)."""
    from toolkit.host.hostfs import kernel_bytes, read_host_file

    for lock in glob.glob(os.path.join(run_dir, ".s.PGSQL.*.lock")):
        try:
            pid = int(read_host_file(lock, 64, follow=False).split(b"\n", 1)[0])
            if run_dir.encode() in kernel_bytes("/proc/%d/cmdline" % pid):  # a container's PID 1 is another here
                return True
        except (OSError, ValueError):
            continue
    return False


def _stop_postmaster(directory: str) -> None:
    """The postmaster of this data directory (postmaster.pid, checked against /proc), stopped fast."""
    try:
        with open(os.path.join(directory, "postmaster.pid")) as handle:
            pid = int(handle.readline().strip())
    except (OSError, ValueError):
        return
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as handle:
            if directory.encode() not in handle.read():
                return
        os.kill(pid, signal.SIGINT)
    except OSError:
        return
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and os.path.exists("/proc/%d" % pid):
        time.sleep(0.1)
    if os.path.exists("/proc/%d" % pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _control_settings(bindir: str, directory: str) -> Dict[str, str]:
    done = subprocess.run([os.path.join(bindir, "pg_controldata"), directory], capture_output=True, text=True,
                          timeout=60, env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"})
    return _parse_control(done.stdout)


def _control_settings_inside(server: Server, facts: Dict[str, Any], directory: str) -> Dict[str, str]:
    """pg_control's settings of the extracted base, read by the live image's own pg_controldata."""
    mounts = _inherited_mounts(server, facts) + [_mount(directory, DATA_INSIDE, read_only=True)]
    container = _create(server, "pg_controldata", [DATA_INSIDE], facts, mounts)
    try:
        container.start()
        _wait_container(container, 120)
        printed = container.logs(stdout=True, stderr=False).decode("utf-8", "replace")
    except Exception as error:
        raise _engine_problem(error, "pg_controldata in a container of %s's image" % server.container_name)
    finally:
        _remove_scratch_container(container)
    return _parse_control(printed)


def _parse_control(printed: str) -> Dict[str, str]:
    """The max_* settings pg_controldata printed (its C-locale labels)."""
    settings = {}
    for line in printed.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in CONTROL_SETTINGS:
            settings[CONTROL_SETTINGS[key.strip()]] = value.strip()
    return settings


def _mount(source: str, target: str, read_only: bool) -> Any:
    from docker.types import Mount

    return Mount(target, source, type="bind", read_only=read_only)


def _create(server: Server, program: str, argv: List[str], facts: Dict[str, Any], mounts: List[Any],
            name: Optional[str] = None) -> Any:
    """A container of the live one's image running its `program`, as the data directory's owner, without a
    network, its log kept by the engine (json-file, whatever the daemon's default driver), labelled for cleanup."""
    from docker.types import LogConfig

    try:
        return server.engine().containers.create(
            facts["image"], argv, entrypoint=[os.path.join(facts["bindir"], program)], name=name,
            user="%d:%d" % facts["owner"], network_mode="none", labels={SCRATCH_LABEL: facts["data_directory"]},
            mounts=mounts, environment={"LC_ALL": "C"}, log_config=LogConfig(type=LogConfig.types.JSON))
    except Exception as error:
        raise _engine_problem(error, "a container of %s's image for %s" % (server.container_name, program))


def _engine_problem(error: BaseException, what: str) -> Exception:
    """The engine's refusal in one line (a KitError as it is)."""
    from toolkit.errors import KitError

    if isinstance(error, KitError):
        return error
    return EnvironmentProblem("%s: %s: nothing was changed in the live cluster" % (
        what, (str(error).splitlines() or [type(error).__name__])[0][:300]))


def _run_scratch_container(server: Server, plan: PitrPlan, facts: Dict[str, Any], directory: str, run_dir: str,
                           settings: Dict[str, str]) -> Any:
    """The scratch cluster in a container of the live one's image: its postgres as PID 1, as the data directory's
    owner, with no network; the extracted base, a socket directory and the archive (read-only) mounted."""
    argv = ["-D", DATA_INSIDE]
    for key, value in settings.items():
        argv += ["-c", "%s=%s" % (key, value)]
    mounts = _inherited_mounts(server, facts) + [_mount(directory, DATA_INSIDE, read_only=False),
                                                 _mount(run_dir, RUN_INSIDE, read_only=False),
                                                 _mount(plan.archive_dir, ARCHIVE_INSIDE, read_only=True)]
    container = _create(server, "postgres", argv, facts, mounts, name="bookgen-kit-pitr-%s" % utc.stamp().lower())
    try:
        container.start()
    except Exception as error:
        _remove_scratch_container(container)
        raise _engine_problem(error, "the scratch container %s" % container.name)
    return container


def _inherited_mounts(server: Server, facts: Dict[str, Any]) -> List[Any]:
    """The live container's mounts other than its data directory, read-only: what its image leaves to them (its
    binaries, configuration, extensions) is there for the scratch cluster too, which can write to none of them.
    A mount that holds the live data directory (inside, or on this host) is left out."""
    data, data_here = facts["data_inside"].rstrip("/"), facts["data_directory"].rstrip("/")
    ours = (DATA_INSIDE, RUN_INSIDE, ARCHIVE_INSIDE)
    mounts = []
    for mount in server.mounts():
        source = (mount.get("Source") or "").rstrip("/") or "/"
        inside = (mount.get("Destination") or "").rstrip("/")
        if not mount.get("Source") or not inside or inside == data or data.startswith(inside + "/") or \
                inside.startswith(data + "/") or data_here == source or \
                data_here.startswith(source + "/") or \
                any(inside == o or o.startswith(inside + "/") for o in ours):
            continue
        mounts.append(_mount(source, inside, read_only=True))
    return mounts


def remove_scratch_containers(server: Server, data_directory: str, report: PitrReport) -> None:
    """A killed run's scratch containers (container mode), removed before their directories are."""
    if server.mode != "container":
        return
    for container in server.engine().containers.list(all=True, filters={"label": "%s=%s" % (SCRATCH_LABEL,
                                                                                           data_directory)}):
        _remove_scratch_container(container)
        report.step("cleanup", "removed container %s, left by an interrupted point-in-time restore" % container.name)


def start_scratch(server: Server, plan: PitrPlan, facts: Dict[str, Any], identities: Sequence[Any],
                  report: PitrReport, say: Callable[[str], None]) -> Scratch:
    """The base extracted beside the live data directory and started as the scratch cluster; on any failure both
    its directories are removed (they sit on the live cluster's filesystem)."""
    from toolkit.host.atomic import environment_error

    directory = facts["data_directory"] + SCRATCH_MARK + utc.stamp()
    run_dir = tempfile.mkdtemp(prefix=_run_prefix(facts["data_directory"]))
    try:
        return _start_scratch(server, plan, facts, identities, report, say, directory, run_dir)
    except BaseException as error:
        if facts["image"] is not None:
            try:
                remove_scratch_containers(server, facts["data_directory"], PitrReport())
            except Exception:  # the engine is gone: the next run removes it
                pass
        physical.remove_tree(directory)
        physical.remove_tree(run_dir)
        if isinstance(error, OSError):
            raise environment_error(error, "the scratch cluster at %s" % directory) from None
        raise


def _start_scratch(server: Server, plan: PitrPlan, facts: Dict[str, Any], identities: Sequence[Any],
                   report: PitrReport, say: Callable[[str], None], directory: str, run_dir: str) -> Scratch:
    from toolkit.db.backup import _file_chunks

    os.chown(run_dir, *facts["owner"])
    say("extracting %s into %s" % (os.path.basename(plan.base.dump), directory))
    counts = physical.extract(physical.tar_chunks(_file_chunks(plan.base.dump, plan.base.encrypted, identities)),
                              directory, facts["owner"])
    problems = physical.check_manifest(directory, counts["digests"])
    if problems:
        physical.remove_tree(directory)
        raise VerificationFailed("the base backup does not match its manifest (%s%s): nothing was changed" % (
            problems[0], " and %d more" % (len(problems) - 1) if len(problems) > 1 else ""))
    report.step("base", "%s extracted (%d files, %d bytes), each file's SHA-256 and size as its backup_manifest "
                "lists them (checked as written)" % (directory, counts["files"], counts["bytes"]))
    for name in ("postgresql.conf", "recovery.signal"):
        path = os.path.join(directory, name)
        if not os.path.exists(path):
            with open(path, "w") as handle:
                handle.write("" if name == "recovery.signal" else "# written by bookgen-kit for a scratch cluster\n")
            os.chown(path, *facts["owner"])
            os.chmod(path, 0o600)
    hba = os.path.join(run_dir, "pg_hba.conf")
    with open(hba, "w") as handle:
        handle.write("local all all trust\n")  # the socket is in a 0700 directory of the server's user
    os.chown(hba, *facts["owner"])
    inside = facts["image"] is not None  # container mode: the live container's image runs it, without a network
    port = 5432 if inside else _free_port()
    settings = {"port": str(port), "listen_addresses": "", "unix_socket_directories": RUN_INSIDE if inside else
                run_dir, "hba_file": os.path.join(RUN_INSIDE, "pg_hba.conf") if inside else hba,
                "archive_mode": "off", "archive_command": "", "logging_collector": "off", "hot_standby": "on",
                "restore_command": "cp '%s/%%f' '%%p'" % (ARCHIVE_INSIDE if inside else plan.archive_dir),
                "recovery_target_timeline": str(facts["timeline"])}
    if not facts["to_end"]:
        settings.update({"recovery_target_%s" % plan.target_kind: iso(parse_time(plan.target)).replace("Z", "+00")
                         if plan.target_kind == "time" else plan.target, "recovery_target_action": "pause",
                         "recovery_target_inclusive": "on"})
    control = _control_settings_inside(server, facts, directory) if inside else _control_settings(facts["bindir"],
                                                                                                 directory)
    for name, value in control.items():
        # hot standby pauses when a setting is below the primary's: the larger of the base's and today's
        live = facts["live_settings"].get(name, "0")
        settings[name] = str(max(int(value), int(live))) if value.isdigit() and live.isdigit() else value
    settings["max_logical_replication_workers"] = "0"  # its subscriptions must not consume the publisher's slots
    if inside:
        container = _run_scratch_container(server, plan, facts, directory, run_dir, settings)
        scratch = Scratch(directory, run_dir, port, None, facts["owner"], facts["bindir"], facts["superuser"],
                          container)
        report.step("scratch cluster", "started in container %s from %s's image (no network, archive_mode off, "
                    "the archive read-only), replaying along timeline %s to %s" % (
                        container.name, server.container_name, facts["timeline"], "the end of the archive" if
                        facts["to_end"] else "%s %s" % (plan.target_kind, plan.target)))
        return scratch
    argv = [os.path.join(facts["bindir"], "postgres"), "-D", directory]
    for key, value in settings.items():
        argv += ["-c", "%s=%s" % (key, value)]
    log = open(os.path.join(run_dir, "server.log"), "ab")
    try:
        process = subprocess.Popen(argv, preexec_fn=as_user(*facts["owner"]), stdin=subprocess.DEVNULL,
                                   stdout=log, stderr=log, cwd="/", start_new_session=True,
                                   env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"})
    finally:
        log.close()
    scratch = Scratch(directory, run_dir, port, process, facts["owner"], facts["bindir"], facts["superuser"])
    report.step("scratch cluster", "started on a private socket (port %d, archive_mode off), replaying along "
                "timeline %s to %s" % (port, facts["timeline"], "the end of the archive" if facts["to_end"] else
                                       "%s %s" % (plan.target_kind, plan.target)))
    return scratch


def wait_paused(scratch: Scratch, plan: PitrPlan, report: PitrReport, say: Callable[[str], None],
                to_end: bool = False) -> None:
    """Until the scratch cluster has paused at the target (or, replaying to the end, ended its recovery);
    refused with the server's own words when recovery ends before the target."""
    say("replaying WAL to the target")
    deadline = time.monotonic() + plan.timeout
    while True:
        ended = scratch.exit_code()
        if ended is not None:
            said = scratch.log_tail(50)
            worst = [line for line in said if re.search(r"(FATAL|PANIC):", line)] or said
            why = re.split(r"(?:FATAL|PANIC|ERROR|LOG):\s*", worst[-1], 1)[-1].strip() if worst else \
                "exit %s" % ended
            raise VerificationFailed("the scratch cluster stopped before reaching the target: %s: nothing was changed"
                                     % why)
        state = scratch.recovery_state()
        if state is not None:
            if state[0] and state[1] == "paused":
                if any("pausing at the end of recovery" in line for line in scratch.log_tail(200)):
                    return
                said = [line for line in scratch.log_tail(200) if "insufficient" in line or "paused" in line]
                raise VerificationFailed("the scratch cluster paused before the target (%s): nothing was changed"
                                         % (said[-1].split(":  ", 1)[-1] if said else "not at the target"))
            if to_end and not state[0]:
                return
            if not state[0]:
                raise VerificationFailed("the scratch cluster ended its recovery without pausing at the target: "
                                         "nothing was changed")
        if time.monotonic() > deadline:
            raise EnvironmentProblem("the scratch cluster did not reach the target within %.0f s" % plan.timeout)
        time.sleep(0.2)


def prove(scratch: Scratch, plan: PitrPlan, facts: Dict[str, Any], report: PitrReport) -> Dict[str, Any]:
    """What the scratch cluster holds at the target: the time reached, the database's row counts and schema."""
    server = scratch.server()
    row = server.query("SELECT pg_last_xact_replay_timestamp() AT TIME ZONE 'UTC', pg_last_wal_replay_lsn()::text")[0]
    databases = [r[0] for r in server.query("SELECT datname FROM pg_database WHERE NOT datistemplate")]
    if plan.database not in databases:
        raise VerificationFailed("database %s does not exist at the target (the databases there: %s): nothing was "
                                 "changed" % (plan.database, ", ".join(sorted(databases))))
    counts = table_counts(server, plan.database)
    schema = schema_sha256(server, plan.database)
    reached = {"last_replayed_commit_utc": row[0], "lsn": row[1], "tables": counts, "schema_sha256": schema}
    if plan.target_kind == "time" and row[0]:
        wanted = parse_time(plan.target)
        if parse_time(row[0] + "+00:00") > wanted:
            raise VerificationFailed("the scratch cluster replayed past the target (%s > %s): nothing was changed" % (
                row[0], wanted))
    report.reached = reached
    report.step("proof", "paused at %s (last commit replayed %s UTC); %s: %d tables, %d rows, schema %s" % (
        row[1], row[0], plan.database, len(counts), sum(c["rows"] for c in counts.values()), schema[:16]))
    return reached


def promote(scratch: Scratch, timeout: float = 120.0) -> None:
    server = scratch.server()
    if server.query("SELECT pg_is_in_recovery()")[0][0] not in ("True", "true", "t"):
        return  # replayed to the end: it promoted itself
    server.query("SELECT pg_wal_replay_resume()")
    deadline = time.monotonic() + timeout
    while server.query("SELECT pg_is_in_recovery()")[0][0] in ("True", "true", "t"):
        if time.monotonic() > deadline:
            raise EnvironmentProblem("the scratch cluster did not end its recovery within %.0f s" % timeout)
        time.sleep(0.2)


# --------------------------------------------------------------------------- the whole
def pitr_restore(connect: Callable[[], Server], plan: PitrPlan, identities: Sequence[Any],
                 recipients: Sequence[Any] = (), progress: Optional[Callable[[str], None]] = None,
                 stop_services: Sequence[str] = (), keep_stopped: bool = False) -> PitrReport:
    """`connect` finds the live server: only after a killed run's swap is finished (until then it may be down, and
    in container mode a stopped bookgen-db cannot even be resolved)."""
    say = progress or (lambda message: None)
    report = PitrReport()
    with _exclusive(plan.backups_dir):
        finished = resume_swap(plan.backups_dir)  # a killed run's swap: finished before anything else
        if finished:
            report.step("cleanup", "an earlier run's swap ended: %s" % finished)
        server = connect()
        facts = preflight(server, plan, identities, report)
        # one per cluster too (two backups directories may point at one): its lock in the temp directory
        with _exclusive(None, os.path.join(tempfile.gettempdir(), _run_prefix(facts["data_directory"]) + "lock")):
            return _pitr_locked(server, plan, facts, identities, recipients, report, say, stop_services,
                                keep_stopped)


def _pitr_locked(server: Server, plan: PitrPlan, facts: Dict[str, Any], identities: Sequence[Any],
                 recipients: Sequence[Any], report: PitrReport, say: Callable[[str], None],
                 stop_services: Sequence[str], keep_stopped: bool) -> PitrReport:
    remove_scratch_containers(server, facts["data_directory"], report)  # the first change: after every refusal
    clean_leftovers(facts["data_directory"], report)
    scratch = start_scratch(server, plan, facts, identities, report, say)
    handed_over = False
    try:
        wait_paused(scratch, plan, report, say, facts["to_end"])
        reached = prove(scratch, plan, facts, report)
        promote(scratch)
        report.step("promote", "the scratch cluster ended its recovery at the target (it does not archive)")
        if plan.mode == "dump":
            _dump_into_live(server, scratch, plan, identities, recipients, report, say, stop_services,
                            keep_stopped)
            return report
        server.query("CHECKPOINT")  # the live cluster's shutdown checkpoint is then short: less downtime
        scratch.stop()
        scratch.process = None
        _archive_history_later(scratch.directory, facts["owner"])
        handed_over = True  # from here the detached swap owns the scratch directory: never removed here
        _swap(server, scratch, plan, facts, reached, report, say)
        return report
    finally:
        scratch.stop()
        if not handed_over and os.path.isdir(scratch.directory):
            physical.remove_tree(scratch.directory)
        physical.remove_tree(scratch.run_dir)


class _exclusive:
    """One point-in-time restore at a time per backups directory, or per `path` (flock on that file, never through
    a symlink, released by the kernel when the kit dies)."""

    def __init__(self, backups_dir: Optional[str], path: Optional[str] = None) -> None:
        self.path = path or (os.path.join(backups_dir, ".bookgen-kit-pitr-lock") if backups_dir else None)
        self.fd: Optional[int] = None

    def __enter__(self) -> "_exclusive":
        import fcntl

        if self.path is None:
            return self
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.fd = _open_lock(self.path)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            self.fd = None
            raise EnvironmentProblem("another point-in-time restore is running (%s is locked)" % self.path)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.fd is not None:
            os.close(self.fd)


def _dump_into_live(server: Server, scratch: Scratch, plan: PitrPlan, identities: Sequence[Any],
                    recipients: Sequence[Any], report: PitrReport, say: Callable[[str], None],
                    stop_services: Sequence[str], keep_stopped: bool) -> None:
    """The database as of the target, as a set (counts from pg_dump's own snapshot), through restore's
    emergency-backup, compare and swap-by-rename into the live cluster."""
    from toolkit.db.backup import create_backup
    from toolkit.db.restore import RestorePlan, restore

    say("dumping %s as of the target" % plan.database)
    made = create_backup(scratch.server(plan.database), plan.database, plan.backups_dir, recipients,
                         [str(r) for r in recipients], prefix="%s-pitr" % plan.database)
    counts = json.loads(open(made["sidecar"]).read())["tables"]
    if {k: v["rows"] for k, v in counts.items()} != {k: v["rows"] for k, v in report.reached["tables"].items()}:
        raise VerificationFailed("the dump of the scratch cluster does not hold the rows proven at the target: "
                                 "nothing was changed")
    report.step("dump", "%s (%d bytes): the database as of the target" % (made["dump"], made["size"]))
    restored = restore(server, RestorePlan(backup=locate_set(made["dump"]), database=plan.database,
                                           backups_dir=plan.backups_dir, stop_services=list(stop_services),
                                           keep_stopped=keep_stopped), identities, say)
    report.restore = {"steps": restored.steps, "old_database": restored.old_database,
                      "emergency_backup": restored.emergency_backup}
    report.step("restore", "%s restored into the live cluster; the one it replaced is %s" % (
        plan.database, restored.old_database or "(none: it did not exist)"))


# --------------------------------------------------------------------------- swap mode
def _swap(server: Server, scratch: Scratch, plan: PitrPlan, facts: Dict[str, Any], reached: Dict[str, Any],
          report: PitrReport, say: Callable[[str], None]) -> None:
    """Stop the live cluster, rename its data directory aside, the scratch one into its place, start it: done by
    a detached process with a journal, so a killed kit leaves it finished (or rolled back), never half."""
    live = facts["data_directory"]
    old = live + OLD_MARK + utc.stamp()
    journal = live + SCRATCH_MARK + "swap.json"
    with open(os.path.join(live, "postmaster.opts")) as handle:
        opts = handle.read().strip()
    document = {"live": live, "old": old, "new": scratch.directory, "opts": opts, "owner": list(facts["owner"]),
                "bindir": facts["bindir"], "state": "planned", "log": live + OLD_MARK.rstrip("-") + ".log"}
    if server.mode == "container":  # the container is stopped and started; its data mount's source is renamed
        from toolkit.containers.engine import docker_url

        document.update(container=server.container_name, docker_url=docker_url())
    held = _swap_lock(journal, wait=0)  # before the journal exists; the helper inherits it and holds it to its end
    try:
        _run_swap(journal, document, plan, held, say)
    finally:
        os.close(held)
    document = _read_journal(journal)
    pointer = _pointer(plan.backups_dir)
    if document.get("state") not in ("started", "rolled back"):  # its process died, or its rollback failed
        raise EnvironmentProblem("the swap ended in state %r (%s); its journal %s is kept: run the restore again, "
                                 "and it finishes the swap or puts %s back first" % (
                                     document.get("state"), document.get("error") or "its process died", journal,
                                     live))
    _end_swap(journal, pointer, document)
    if document.get("state") != "started":
        raise EnvironmentProblem("the swap failed (%s) and was rolled back: the live cluster runs from %s as before" %
                                 (document.get("error"), live))
    report.old_data_directory = old
    report.step("swap", "the live cluster was stopped, %s renamed to %s (kept), the cluster as of the target moved "
                "into %s and started" % (live, old, live))
    deadline = time.monotonic() + 120
    while True:
        try:
            counts = table_counts(server, plan.database)
            break
        except Exception:
            if time.monotonic() > deadline:
                raise EnvironmentProblem("the swapped-in cluster does not answer within 120 s (it runs from %s; the "
                                         "old data directory is %s)" % (live, old)) from None
            time.sleep(0.5)
    if counts != reached["tables"] or schema_sha256(server, plan.database) != reached["schema_sha256"]:
        raise VerificationFailed("the swapped-in cluster does not hold what was proven at the target (the old data "
                                 "directory is %s)" % old)
    report.step("compare", "the live cluster now holds the rows and schema proven at the target")


def _run_swap(journal: str, document: Dict[str, Any], plan: PitrPlan, held: int,
              say: Callable[[str], None]) -> None:
    """The journal and the pointer to it written (under the swap's lock), the detached swap spawned with that lock,
    and waited for."""
    from toolkit.host.atomic import AtomicFile
    from toolkit.host.detached import spawn

    _write_journal(journal, document)
    pointer = _pointer(plan.backups_dir)
    if pointer:  # found by the next run before it asks the server anything (the server may be down)
        with AtomicFile(pointer, 0o600, overwrite=True) as out:
            out.write(journal.encode())
            out.commit()
    say("swapping the data directories (the live cluster is stopped for this)")
    helper = spawn("from toolkit.db.pitr import swap_body; swap_body(%r)" % journal, pass_fds=(held,))
    deadline = time.monotonic() + plan.timeout
    while helper.poll() is None:
        if time.monotonic() > deadline:
            raise EnvironmentProblem("the swap did not end within %.0f s (journal %s)" % (plan.timeout, journal))
        time.sleep(0.2)


def _archive_history_later(directory: str, owner: tuple) -> None:
    """The scratch cluster promoted with archive_mode off, so its new timeline's history file was never marked
    for archiving: marked now, the swapped-in cluster archives it first (a later restore follows the timeline)."""
    status = os.path.join(directory, "pg_wal", "archive_status")
    for name in os.listdir(os.path.join(directory, "pg_wal")):
        if wal.HISTORY.match(name) and not any(os.path.exists(os.path.join(status, name + suffix))
                                               for suffix in (".ready", ".done")):
            path = os.path.join(status, name + ".ready")
            with open(path, "w"):
                pass
            os.chown(path, *owner)


def _write_journal(path: str, document: Dict[str, Any]) -> None:
    from toolkit.host.atomic import AtomicFile

    with AtomicFile(path, 0o600, overwrite=True) as out:
        out.write(json.dumps(document, indent=1).encode())
        out.commit()


def _read_journal(path: str) -> Dict[str, Any]:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _postmaster_argv(opts: str) -> List[str]:
    import shlex

    return shlex.split(opts)


def swap_body(journal: str, roll_back: bool = False) -> None:
    """The detached swap: each step recorded when done; run again it goes on from where it stopped. Every step is
    checked (the live cluster really stopped, the new one really accepts connections); on any failure the old data
    directory goes back into place and the old cluster is started. A directory is never renamed under a running
    server. "rolled back" is recorded only once the old cluster is back and ready; else "rollback failed", which
    the next run takes up again. In container mode the container's restart policy is "no" while the swap runs
    (the engine must not start it between the steps), then what it was."""
    document = _read_journal(journal)
    live, old, new = document["live"], document["old"], document["new"]
    uid, gid = document["owner"]
    document["pid"] = os.getpid()
    _write_journal(journal, document)
    environment = {"PATH": "/usr/bin:/bin", "LC_ALL": "C"}

    def record(state: str, **extra: Any) -> None:
        document.update(extra, state=state)
        _write_journal(journal, document)

    def start() -> subprocess.Popen:
        log = open(document["log"], "ab")
        try:
            return subprocess.Popen(_postmaster_argv(document["opts"]), preexec_fn=as_user(uid, gid),
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd="/",
                                    start_new_session=True, env=environment)
        finally:
            log.close()

    def pid_file_ready() -> bool:
        try:
            with open(os.path.join(live, "postmaster.pid")) as handle:
                lines = handle.read().splitlines()
            return len(lines) > 7 and lines[7].strip() == "ready"
        except OSError:
            return False

    try:
        container = _swap_container(document)
    except Exception as error:  # the engine does not answer: nothing done yet is left as it is, for the next run
        if document["state"] == "planned":
            record("rolled back", error="the Docker engine: %s" % str(error).splitlines()[0][:300])
        raise

    def running() -> bool:
        if container is not None:
            container.reload()
            return container.status in ("running", "restarting", "paused")
        return _postmaster_running(live)

    def stop() -> None:
        """The server running from `live` stopped fast, else killed; raises when it still runs."""
        said = "not running"
        if container is not None:
            if running():
                container.kill(signal="SIGINT")  # PostgreSQL's fast shutdown, whatever the image's STOPSIGNAL
                said = "docker kill -s INT"
                _wait_container(container, 120)
            if running():
                container.kill()  # SIGKILL: a directory is never renamed under a running server
                said += ", then SIGKILL"
                _wait_container(container, 60)
        elif _postmaster_running(live):
            done = subprocess.run([os.path.join(document["bindir"], "pg_ctl"), "stop", "-D", live, "-m", "fast",
                                   "-w", "-t", "120"], preexec_fn=as_user(uid, gid), capture_output=True,
                                  timeout=180, cwd="/", env=environment)
            said = "pg_ctl exit %d" % done.returncode
            if _postmaster_running(live):
                _stop_postmaster(live)  # SIGINT, then SIGKILL after a grace
        if running():
            raise RuntimeError("the live cluster did not stop (%s)" % said)

    def start_ready(timeout: float = 300.0) -> bool:
        """Started from `live` and `ready` in its postmaster.pid; False if it exits or the time runs out."""
        process = None
        if container is None:
            process = start()
        else:
            container.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (process.poll() is not None) if process is not None else not running():
                return False
            if pid_file_ready():
                return True
            time.sleep(0.1)
        return False

    def policy(restore: bool) -> None:
        if container is None:
            return
        if not restore and "restart_policy" not in document:
            record(document["state"], restart_policy=(container.attrs.get("HostConfig") or {}).get(
                "RestartPolicy") or {"Name": "no"})
            container.update(restart_policy={"Name": "no"})
        elif restore and "restart_policy" in document:
            container.update(restart_policy=document["restart_policy"])

    def undo(why: str) -> None:
        ok, said = False, why
        try:
            if os.path.isdir(old):
                stop()
                if os.path.isdir(live):
                    os.rename(live, new if not os.path.exists(new) else new + ".failed")
                os.rename(old, live)
            ok = (running() and pid_file_ready()) or start_ready()
            policy(restore=True)
        except BaseException as again:  # recorded below; the next run tries again
            said += "; the rollback: %s" % (str(again).splitlines()[0][:200] if str(again) else
                                            type(again).__name__)
        record("rolled back" if ok else "rollback failed", error=said[:400])

    if roll_back or document["state"] == "rollback failed":
        undo(document.get("error") or "an earlier run's swap was not finished")
        return
    try:
        if document["state"] == "planned":
            policy(restore=False)
            stop()
            record("stopped")
        if document["state"] == "stopped":
            if not os.path.isfile(os.path.join(new, "PG_VERSION")):
                raise RuntimeError("the cluster as of the target is not at %s" % new)
            if running():
                raise RuntimeError("the live cluster runs again (restarted by whom?)")
            if os.path.isdir(live) and not os.path.exists(old):
                os.rename(live, old)
            record("moved aside")
        if document["state"] == "moved aside":
            if os.path.exists(new):
                if os.path.exists(live):
                    raise RuntimeError("%s exists again while the cluster was stopped (made by the engine?)" % live)
                if not os.path.isfile(os.path.join(new, "PG_VERSION")):
                    raise RuntimeError("the cluster as of the target is not at %s" % new)
                with open(os.path.join(old, "postmaster.opts")) as source, \
                        open(os.path.join(new, "postmaster.opts"), "w") as target:
                    target.write(source.read())
                os.chown(os.path.join(new, "postmaster.opts"), uid, gid)
                for name in ("recovery.signal", "standby.signal", "backup_manifest"):
                    if os.path.exists(os.path.join(new, name)):
                        os.unlink(os.path.join(new, name))
                for name in CONFIG_FILES:  # configuration is not data: today's, where it lives in the directory
                    if os.path.isfile(os.path.join(old, name)):
                        shutil.copy2(os.path.join(old, name), os.path.join(new, name))
                        os.chown(os.path.join(new, name), uid, gid)
                os.rename(new, live)
            elif not os.path.isfile(os.path.join(live, "PG_VERSION")):
                raise RuntimeError("the cluster as of the target is neither at %s nor at %s" % (new, live))
            record("moved in")
        if document["state"] == "moved in":
            if not (running() and pid_file_ready()) and not start_ready():
                raise RuntimeError("the cluster as of the target did not start (its log: %s)" % (
                    "docker logs %s" % container.name if container is not None else document["log"]))
            policy(restore=True)
            record("started")
    except BaseException as error:  # the old data directory back in place, the old cluster started
        undo(str(error).splitlines()[0][:300] if str(error) else type(error).__name__)


def _wait_container(container: Any, timeout: float) -> None:
    try:
        container.wait(timeout=timeout)
    except Exception:  # still running after the time: the caller checks
        pass


def _swap_container(document: Dict[str, Any]) -> Any:
    """Container mode's live container (from the journal), or None in host mode."""
    if not document.get("container"):
        return None
    import docker

    return docker.DockerClient(base_url=document["docker_url"], timeout=180, version="1.41").containers.get(
        document["container"])


def _postmaster_running(directory: str) -> bool:
    try:
        with open(os.path.join(directory, "postmaster.pid")) as handle:
            pid = int(handle.readline().strip())
        with open("/proc/%d/cmdline" % pid, "rb") as handle:
            return b"postgres" in handle.read()
    except (OSError, ValueError):
        return False


def _pointer(backups_dir: Optional[str]) -> Optional[str]:
    return os.path.join(backups_dir, ".bookgen-kit-pitr-swap") if backups_dir else None


def resume_swap(backups_dir: Optional[str]) -> Optional[str]:
    """A swap a killed run left (its pointer in the backups directory names the journal), before anything else and
    whether or not the server answers: a swap never started is dropped (nothing was moved), one under way is
    waited for while its detached process lives, then finished (or rolled back) here. The state it ended in."""
    pointer = _pointer(backups_dir)
    if pointer is None or not os.path.exists(pointer):
        return None
    with open(pointer, encoding="utf-8") as handle:
        journal = handle.read().strip()
    if not os.path.exists(journal):
        os.unlink(pointer)
        return None
    held = _swap_lock(journal, wait=600)  # its detached process, while it lives, holds this lock
    try:
        # planned: nothing was moved, but the server may have been stopped: it is started if it is not running
        swap_body(journal, roll_back=_read_journal(journal).get("state") == "planned")
        document = _read_journal(journal)
        if document.get("state") not in ("started", "rolled back"):
            raise EnvironmentProblem("an earlier run's swap could not be finished nor rolled back (%s); its journal "
                                     "%s is kept" % (document.get("error"), journal))
        _end_swap(journal, pointer, document)
    finally:
        os.close(held)
    return "%s%s" % (document.get("state"), " (%s)" % document["error"] if document.get("error") else "")


def _end_swap(journal: str, pointer: Optional[str], document: Dict[str, Any]) -> None:
    """A swap that ended (started, or rolled back and checked): its journal, lock and pointer removed, and after a
    rollback the cluster as of the target too (a whole cluster on the live filesystem)."""
    if document.get("state") == "rolled back":
        for path in (document["new"], document["new"] + ".failed"):
            if os.path.isdir(path):
                physical.remove_tree(path)
    os.unlink(journal)
    _unlink_quietly(journal + ".lock")
    if pointer:
        _unlink_quietly(pointer)


def _open_lock(path: str) -> int:
    """A lock file opened for flock; a planted symlink (or anything but a file we can open) is refused in words."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o600)
    except OSError as error:
        raise EnvironmentProblem("the lock file %s cannot be opened (%s): nothing was changed" % (
            path, error.strerror or error)) from None


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _swap_lock(journal: str, wait: float) -> int:
    """The swap's lock (flock on `<journal>.lock`): taken by the kit before it spawns the swap's process, which
    inherits it, so it is held from before that process exists until it ends; a later run waits for it."""
    import fcntl

    fd = _open_lock(journal + ".lock")
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except OSError:
            if time.monotonic() > deadline:
                os.close(fd)
                raise EnvironmentProblem("an earlier run's swap (journal %s) is still under way after %.0f s" % (
                    journal, wait)) from None
            time.sleep(0.2)
