"""Processes, read from /proc (no ps): identity, binary (hashed through /proc/PID/exe, so a deleted binary
is still read), environment, open files, mapped libraries, cgroup and namespaces; and hidden PIDs."""
from __future__ import annotations

import hashlib
import os
import time
from typing import Any, Dict, List, Optional

from toolkit.evidence.collectors.base import CollectionContext, Collector, Emitter

NAMESPACES = ("cgroup", "ipc", "mnt", "net", "pid", "time", "user", "uts")
MAX_ENVIRON = 256 * 1024
SUSPICIOUS_DIRS = ("/tmp/", "/var/tmp/", "/dev/shm/")


def read_text(path: str, limit: int = 1 << 20) -> Optional[str]:
    try:
        with open(path, "rb") as handle:
            return handle.read(limit).decode("utf-8", "replace")
    except OSError:
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


class _Denied(Exception):
    pass


def _environ(pid: str) -> Optional[Dict[str, str]]:
    """The environment; {} for kernel threads (ESRCH) and vanished processes; _Denied when refused."""
    try:
        with open("/proc/%s/environ" % pid, "rb") as handle:
            raw = handle.read(MAX_ENVIRON)
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
        "fds": _fds(pid), "maps": _maps(pid), "environ": environment,
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


def hidden_pids(listed: List[int], known_tids: set, limit: int) -> List[int]:
    """PIDs that answer a direct probe of /proc/PID but are missing from the /proc listing (not threads)."""
    listed_set = set(listed)
    hidden = []
    for pid in range(1, limit + 1):
        if pid in listed_set or pid in known_tids:
            continue
        try:
            os.stat("/proc/%d" % pid)
        except OSError:
            continue
        # re-check: a process that was just born appears in the listing now
        if str(pid) in os.listdir("/proc"):
            continue
        hidden.append(pid)
    return hidden


class ProcessCollector(Collector):
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
        pid_max = int((read_text("/proc/sys/kernel/pid_max") or "32768").strip() or 32768)
        limit = min(pid_max, max(32768, 2 * max([int(p) for p in pids] or [1])))
        started = time.monotonic()
        hidden = hidden_pids([int(p) for p in pids], tids, limit)
        document = {"collected_at": time.time(), "processes": records, "hidden_pids": hidden,
                    "hidden_pid_probe": {"range": [1, limit], "pid_max": pid_max,
                                         "seconds": round(time.monotonic() - started, 3)}}
        emit.json("volatile/processes.json", document, "/proc/PID/{status,stat,cmdline,environ,exe,cwd,root,fd,"
                  "maps,cgroup,ns}")
        if denied:
            emit.skip("/proc/PID/environ", "%d processes only partly readable (permission denied: %s)" % (
                denied, ", ".join(str(r["pid"]) for r in records if r["access"] != "full")[:200]))
        for record in records:
            emit.fact("process", {k: record[k] for k in ("pid", "name", "exe", "exe_deleted", "cwd", "cmdline",
                                                         "maps", "container_id")}
                      | {"ld_preload": (record["environ"] or {}).get("LD_PRELOAD"),
                         "is_self": record["pid"] == os.getpid()}, "volatile/processes.json")
        emit.fact("hidden_pids", hidden, "volatile/processes.json")
        for record in records:
            if record["exe_deleted"] or (record["exe"] or "").startswith(SUSPICIOUS_DIRS):
                self._copy_binary(record, emit, context)

    @staticmethod
    def _copy_binary(record: Dict[str, Any], emit: Emitter, context: CollectionContext) -> None:
        """The binary of a suspicious process, read through /proc/PID/exe (works after deletion)."""
        emit.proc_file("/proc/%d/exe" % record["pid"], "volatile/binaries/%d-%s" % (
            record["pid"], os.path.basename(record["exe"] or "exe")), context.max_file_size)
