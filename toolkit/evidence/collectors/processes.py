"""Processes, read from /proc (no ps): identity, binary (hashed through /proc/PID/exe, so a deleted binary
is still read), environment, open files, mapped libraries, cgroup and namespaces; and hidden PIDs."""
from __future__ import annotations

import hashlib
import os
import stat
import time
from collections import deque
from typing import Any, Dict, List, Optional, Tuple

from toolkit.evidence.collectors.base import CollectionContext, Collector, Emitter
from toolkit.host.hostfs import kernel_bytes

NAMESPACES = ("cgroup", "ipc", "mnt", "net", "pid", "time", "user", "uts")
MAX_ENVIRON = 256 * 1024
SUSPICIOUS_DIRS = ("/tmp/", "/var/tmp/", "/dev/shm/")


def read_text(path: str, limit: int = 1 << 20) -> Optional[str]:
    """A /proc file's text; None when absent, unreadable or refused (a FIFO mounted over it is never waited on)."""
    try:
        return kernel_bytes(path, limit).decode("utf-8", "replace")
    except OSError:  # Refused too
        return None


def _readlink(path: str) -> Optional[str]:
    try:
        return os.readlink(path)
    except OSError:
        return None


def _status(pid: str) -> Dict[str, str]:
    fields = {}
    for line in (read_text("/proc/%s/status" % pid) or "").splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def _start_time(pid: str, boot: float, ticks: int) -> Optional[float]:
    text = read_text("/proc/%s/stat" % pid)
    if not text:
        return None
    fields = text[text.rfind(")") + 2:].split()
    try:
        return boot + int(fields[19]) / ticks
    except (IndexError, ValueError):
        return None


def _hash_exe(pid: str, cache: Dict[tuple, Optional[str]]) -> Optional[str]:
    path = "/proc/%s/exe" % pid
    try:
        info = os.stat(path)
    except OSError:
        return None
    key = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
    if key not in cache:
        digest = hashlib.sha256()
        try:
            with open(path, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
            cache[key] = digest.hexdigest()
        except OSError:
            cache[key] = None
    return cache[key]


def _maps(pid: str) -> List[Dict[str, Any]]:
    seen: Dict[str, Dict[str, Any]] = {}
    for line in (read_text("/proc/%s/maps" % pid, 8 << 20) or "").splitlines():
        parts = line.split(None, 5)
        if len(parts) < 6:
            continue
        path = parts[5]
        if not (path.startswith("/") or path.startswith("/memfd:")):
            continue
        entry = seen.setdefault(path, {"path": path.replace(" (deleted)", ""), "deleted": path.endswith("(deleted)"),
                                       "memfd": path.startswith("/memfd:"), "executable": False})
        if "x" in parts[1]:
            entry["executable"] = True
    return list(seen.values())


def _fds(pid: str) -> List[Dict[str, str]]:
    directory = "/proc/%s/fd" % pid
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    result = []
    for name in sorted(names, key=lambda n: int(n) if n.isdigit() else 0):
        target = _readlink(os.path.join(directory, name))
        if target is not None:
            result.append({"fd": name, "target": target})
    return result


def _children(pid: str) -> List[int]:
    """Every thread's children (/proc/PID/task/TID/children)."""
    found: List[int] = []
    try:
        tasks = os.listdir("/proc/%s/task" % pid)
    except OSError:
        return found
    for task in tasks:
        text = read_text("/proc/%s/task/%s/children" % (pid, task)) or ""
        found.extend(int(child) for child in text.split() if child.isdigit())
    return sorted(set(found))


def unix_sockets() -> Dict[str, str]:
    """inode -> path (or "" for an unnamed socket; "@name" abstract) from /proc/net/unix."""
    found: Dict[str, str] = {}
    for line in (read_text("/proc/net/unix") or "").splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 7:
            found[fields[6]] = fields[7] if len(fields) > 7 else ""
    return found


FD_COPY_CAP = 64 << 20  # a memfd or deleted file still open: its content, up to this much


class _Denied(Exception):
    pass


def _environ(pid: str) -> Optional[Dict[str, str]]:
    """The environment; {} for kernel threads (ESRCH) and vanished processes; _Denied when refused."""
    try:
        raw = kernel_bytes("/proc/%s/environ" % pid, MAX_ENVIRON)
    except PermissionError:
        raise _Denied() from None
    except OSError:
        return {}
    environment = {}
    for item in raw.split(b"\0"):
        if b"=" in item:
            key, _, value = item.partition(b"=")
            environment[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
    return environment


def process_record(pid: str, boot: float, ticks: int, exe_cache) -> Optional[Dict[str, Any]]:
    status = _status(pid)
    if not status:
        return None
    exe = _readlink("/proc/%s/exe" % pid)
    cmdline = read_text("/proc/%s/cmdline" % pid)
    try:
        environment = _environ(pid)
    except _Denied:
        environment = None
    record = {
        "pid": int(pid), "ppid": int(status.get("PPid", "0") or 0), "name": status.get("Name"),
        "state": status.get("State"), "uids": status.get("Uid", "").split(), "gids": status.get("Gid", "").split(),
        "threads": int(status.get("Threads", "0") or 0), "vm_rss_kb": status.get("VmRSS"),
        "cmdline": cmdline.split("\0")[:-1] if cmdline else [],
        "exe": exe.replace(" (deleted)", "") if exe else None, "exe_deleted": bool(exe and exe.endswith(" (deleted)")),
        "exe_sha256": _hash_exe(pid, exe_cache) if exe else None,
        "cwd": _readlink("/proc/%s/cwd" % pid), "root": _readlink("/proc/%s/root" % pid),
        "start_time": _start_time(pid, boot, ticks), "nice": None,
        "cgroup": (read_text("/proc/%s/cgroup" % pid) or "").strip().splitlines(),
        "namespaces": {ns: _readlink("/proc/%s/ns/%s" % (pid, ns)) for ns in NAMESPACES},
        "fds": _fds(pid), "maps": _maps(pid), "environ": environment, "children": _children(pid),
        "stack": (read_text("/proc/%s/stack" % pid) or "").splitlines() or None,
        "access": "full" if environment is not None else "partial (permission denied)",
    }
    stat_text = read_text("/proc/%s/stat" % pid)
    if stat_text:
        fields = stat_text[stat_text.rfind(")") + 2:].split()
        if len(fields) > 16:
            record["nice"] = int(fields[16])
    return record


def container_of(record: Dict[str, Any]) -> Optional[str]:
    """The Docker container id a process belongs to, from its cgroup path."""
    for line in record.get("cgroup", []):
        for marker in ("/docker/", "docker-"):
            if marker in line:
                tail = line.split(marker, 1)[1]
                candidate = tail[:64]
                if len(candidate) == 64 and all(c in "0123456789abcdef" for c in candidate):
                    return candidate
    return None


HIDDEN_PID_TRIES = 3  # a candidate must survive this many probes...
HIDDEN_PID_INTERVAL = 0.05  # ...this far apart (3 tries: ~100 ms), before it is reported
HIDDEN_PID_MAX_ROUNDS = 8  # rounds in all, so a thread's hidden thread-group leader can still be probed 3 times


def _listing() -> set:
    """The PIDs the /proc listing shows right now."""
    try:
        return {int(name) for name in os.listdir("/proc") if name.isdigit()}
    except OSError:
        return set()


def _task_owners(visible: set) -> Dict[int, int]:
    """TID -> PID for every task of every visible process (a thread of a visible process is never hidden)."""
    owners: Dict[int, int] = {}
    for pid in visible:
        try:
            names = os.listdir("/proc/%d/task" % pid)
        except OSError:
            continue
        for name in names:
            if name.isdigit():
                owners.setdefault(int(name), pid)
    return owners


def _answers(pid: int) -> bool:
    try:
        os.stat("/proc/%d" % pid)
    except OSError:
        return False
    return True


def _start_ticks(pid: int) -> Optional[int]:
    """Field 22 of /proc/PID/stat: tells a PID that was reused from the task first probed."""
    text = read_text("/proc/%d/stat" % pid)
    if not text:
        return None
    fields = text[text.rfind(")") + 2:].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def _as_int(value: Optional[str]) -> Optional[int]:
    try:
        return int(value or "")
    except ValueError:
        return None


def probe_range(listed: List[int]) -> Tuple[int, int]:
    """(limit, pid_max): the hidden-PID scan covers 1..limit, twice the highest listed PID but at least 32768,
    never past pid_max (which may be 4194304: the scan's cost is one stat per PID in the range)."""
    pid_max = int((read_text("/proc/sys/kernel/pid_max") or "32768").strip() or 32768)
    return min(pid_max, max(32768, 2 * max(listed or [1]))), pid_max


def probe_hidden_pids(listed: List[int], known_tids: set, limit: int, tries: int = HIDDEN_PID_TRIES,
                      interval: float = HIDDEN_PID_INTERVAL) -> Dict[str, Any]:
    """PIDs that answer a direct probe of /proc/PID but are missing from the /proc listing, re-checked.

    The scan of 1..limit costs one stat per PID not already known. Every candidate it finds is then re-checked,
    all candidates together, in rounds `interval` apart (at most HIDDEN_PID_MAX_ROUNDS, no long sleeps): each
    round re-lists /proc and the task directories of every visible process once, and reads each candidate's
    /proc/PID/status and stat. A candidate is dismissed when it is gone, its PID was reused, it now shows in the
    listing (born after it), or it is a thread (status Tgid != PID) of a visible process (also when found in a
    visible process's /proc/PID/task). A thread whose thread-group leader is not visible is not reported
    itself: the leader becomes the candidate. What survives `tries` rounds is reported, with its evidence.

    Returns {"hidden": [pid, ...], "checks": [evidence per hidden pid], "candidates": n, "dismissed": {why: n},
    "rounds": n}.
    """
    listed_set = set(listed)
    candidates = [pid for pid in range(1, limit + 1)
                  if pid not in listed_set and pid not in known_tids and _answers(pid)]
    tracked: Dict[int, Dict[str, Any]] = {}
    pending: List[int] = list(candidates)
    for pid in candidates:
        tracked[pid] = {"pid": pid, "probes": []}
    dismissed: Dict[str, int] = {}
    confirmed: List[int] = []
    started = time.monotonic()
    rounds = 0

    def dismiss(pid: int, why: str) -> None:
        dismissed[why] = dismissed.get(why, 0) + 1
        tracked.pop(pid, None)

    while pending and rounds < HIDDEN_PID_MAX_ROUNDS:
        if rounds:
            time.sleep(interval)
        rounds += 1
        visible = _listing()
        owners = _task_owners(visible)
        queue = deque(sorted(pending))
        pending = []
        while queue:
            pid = queue.popleft()
            entry = tracked.get(pid)
            if entry is None:
                continue
            status = _status(str(pid))
            start = _start_ticks(pid)
            if not status or start is None:
                dismiss(pid, "gone")
                continue
            if entry.setdefault("start_ticks", start) != start:
                dismiss(pid, "pid reused")
                continue
            if pid in visible:
                dismiss(pid, "listed on re-list")
                continue
            tgid, ppid = _as_int(status.get("Tgid")), _as_int(status.get("PPid"))
            if pid in owners:
                dismiss(pid, "thread of a visible process")
                continue
            if tgid is not None and tgid != pid:
                if tgid in visible:
                    dismiss(pid, "thread of a visible process")
                    continue
                dismiss(pid, "thread of a hidden thread-group leader")
                if tgid not in tracked and tgid not in confirmed and _answers(tgid):
                    tracked[tgid] = {"pid": tgid, "probes": [], "found_through_thread": pid}
                    queue.append(tgid)
                continue
            entry.update(name=status.get("Name"), tgid=tgid, ppid=ppid, state=status.get("State"),
                         uids=status.get("Uid", "").split())
            entry["probes"].append({"at": round(time.monotonic() - started, 3), "answers": True,
                                    "status_tgid": tgid, "start_ticks": start, "in_listing": False,
                                    "in_visible_task_dir": False, "listing_size": len(visible)})
            if len(entry["probes"]) >= tries:
                confirmed.append(pid)
            else:
                pending.append(pid)
    for pid in pending:  # out of rounds before `tries` probes: not confirmed, so not reported
        dismiss(pid, "not re-probed enough times")
    checks = []
    for pid in sorted(confirmed):
        entry = tracked[pid]
        exe = _readlink("/proc/%d/exe" % pid)
        cmdline = read_text("/proc/%d/cmdline" % pid, 4096)
        entry.update(exe=exe, cmdline=cmdline.split("\0")[:-1] if cmdline else [], checks=[
            "answers a direct stat of /proc/%d" % pid,
            "status Tgid == PID (a process, not a thread)",
            "not in the task directory of any visible process",
            "missing from a fresh /proc listing on each of %d probes %.0f ms apart" % (tries, interval * 1000),
            "same start time on every probe (the PID was not reused)"])
        checks.append(entry)
    return {"hidden": sorted(confirmed), "checks": checks, "candidates": len(candidates), "dismissed": dismissed,
            "rounds": rounds}


def hidden_pids(listed: List[int], known_tids: set, limit: int) -> List[int]:
    """PIDs that answer a direct probe of /proc/PID but are missing from the /proc listing, re-checked (not
    threads, not churn): see probe_hidden_pids."""
    return probe_hidden_pids(listed, known_tids, limit)["hidden"]


class ProcessCollector(Collector):
    def findings(self, facts: Dict[str, List[Dict[str, Any]]], judging: Any) -> List[Dict[str, Any]]:
        """One finding per indicator over every process that shows it; hidden PIDs (rechecked when seen)."""
        from toolkit.evidence.findings import finding, process_indicators

        found = process_indicators(facts)
        for fact in facts.get("hidden_pids", []):
            if fact["data"]:
                found.append(finding("hidden-pids", "critical", "PIDs answer at /proc/PID but are hidden from the "
                                     "listing: %s" % ", ".join(map(str, fact["data"][:20])), [fact["evidence"]],
                                     pids=fact["data"]))
        return found

    name = "processes"
    rank = 10
    budget_seconds = 60.0
    description = "every process from /proc: binary (sha256, deleted?), environment, fds, maps, cgroup, namespaces"

    def run(self, context: CollectionContext, emit: Emitter) -> None:
        import psutil

        boot, ticks = psutil.boot_time(), os.sysconf("SC_CLK_TCK")
        pids = sorted((p for p in os.listdir("/proc") if p.isdigit()), key=int)
        exe_cache: Dict[tuple, Optional[str]] = {}
        records, denied = [], 0
        tids = set()
        for pid in pids:
            record = process_record(pid, boot, ticks, exe_cache)
            if record is None:
                continue
            record["container_id"] = container_of(record)
            if record["access"] != "full":
                denied += 1
            records.append(record)
            try:
                tids.update(int(t) for t in os.listdir("/proc/%s/task" % pid))
            except OSError:
                pass
        limit, pid_max = probe_range([int(p) for p in pids])
        started = time.monotonic()
        probe = probe_hidden_pids([int(p) for p in pids], tids, limit)
        hidden = probe["hidden"]
        sockets = unix_sockets()
        for record in records:  # a unix socket an fd holds, by the path it is bound to
            for fd in record.get("fds") or []:
                if fd["target"].startswith("socket:[") and fd["target"][8:-1] in sockets:
                    fd["unix"] = sockets[fd["target"][8:-1]]
        document = {"collected_at": time.time(), "processes": records, "hidden_pids": hidden,
                    "hidden_pid_checks": probe["checks"],
                    "hidden_pid_probe": {"range": [1, limit], "pid_max": pid_max,
                                         "seconds": round(time.monotonic() - started, 3),
                                         "candidates": probe["candidates"], "dismissed": probe["dismissed"],
                                         "rounds": probe["rounds"], "tries": HIDDEN_PID_TRIES,
                                         "interval_seconds": HIDDEN_PID_INTERVAL}}
        emit.json("volatile/processes.json", document, "/proc/PID/{status,stat,cmdline,environ,exe,cwd,root,fd,"
                  "maps,cgroup,ns}")
        if denied:
            # the kernel's ptrace rules (another user namespace, a sandbox) keep some environ from every reader:
            # a limit of the host, recorded, not a source the collector failed to read
            emit.skip("/proc/PID/environ", "%d processes only partly readable (permission denied: %s)" % (
                denied, ", ".join(str(r["pid"]) for r in records if r["access"] != "full")[:200]), "limited")
        for record in records:
            if record["exe_deleted"] or (record["exe"] or "").startswith(SUSPICIOUS_DIRS):
                record["binary_member"] = binary_member(record)
        for record in records:
            fact = {k: record.get(k) for k in ("pid", "ppid", "name", "exe", "exe_deleted", "exe_sha256", "cwd",
                                               "cmdline",
                                               "maps", "container_id", "binary_member", "start_time", "uids",
                                               "cgroup", "namespaces")}
            fact.update(ld_preload=(record["environ"] or {}).get("LD_PRELOAD"), is_self=record["pid"] == os.getpid())
            emit.fact("process", fact, "volatile/processes.json")
        emit.fact("hidden_pids", hidden, "volatile/processes.json")
        for record in records:
            if record.get("binary_member"):  # one copy per binary, however many processes run it
                emit.proc_file("/proc/%d/exe" % record["pid"], record["binary_member"], context.max_file_size)
        self._fd_contents(records, emit, context)
        self._mount_namespaces(records, emit)

    @staticmethod
    def _fd_contents(records: List[Dict[str, Any]], emit: Emitter, context: CollectionContext) -> None:
        """What a process holds open that no path reaches any more: memfds and deleted files, copied through
        /proc/PID/fd/N (each distinct object once, named by pid and fd)."""
        seen = set()
        for record in records:
            if record["pid"] == os.getpid():
                continue
            for fd in record.get("fds") or []:
                target = fd["target"]
                if not (target.startswith("/memfd:") or target.endswith(" (deleted)")):
                    continue
                source = "/proc/%d/fd/%s" % (record["pid"], fd["fd"])
                try:
                    info = os.stat(source)
                except OSError:
                    continue
                if (info.st_dev, info.st_ino) in seen or not stat.S_ISREG(info.st_mode):
                    continue
                seen.add((info.st_dev, info.st_ino))
                fd["copied_as"] = "volatile/fd-contents/%d-fd%s" % (record["pid"], fd["fd"])
                emit.proc_file(source, fd["copied_as"], min(context.max_file_size, FD_COPY_CAP))
                emit.fact("open_hidden_file", {"pid": record["pid"], "fd": fd["fd"], "target": target,
                                               "name": record.get("name"), "size": info.st_size},
                          fd["copied_as"])

    @staticmethod
    def _mount_namespaces(records: List[Dict[str, Any]], emit: Emitter) -> None:
        """Each mount namespace's mount table once (a process in a container sees other mounts)."""
        done = set()
        for record in records:
            namespace = (record.get("namespaces") or {}).get("mnt")
            if not namespace or namespace in done:
                continue
            text = read_text("/proc/%d/mountinfo" % record["pid"])
            if text is None:
                continue
            done.add(namespace)
            number = "".join(c for c in namespace if c.isdigit()) or str(record["pid"])
            emit.generated("volatile/mountinfo/mnt-%s.txt" % number, text.encode("utf-8", "replace"),
                           "/proc/%d/mountinfo (first process seen in %s)" % (record["pid"], namespace))


def binary_member(record: Dict[str, Any]) -> str:
    """Where the binary of a suspicious process is stored: named by its sha256, so it is stored once."""
    name = os.path.basename(record.get("exe") or "exe") or "exe"
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:64]
    key = record.get("exe_sha256") or "pid%d" % record["pid"]
    return "volatile/binaries/%s-%s" % (key[:16], safe)
