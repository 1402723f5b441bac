"""One probe per part of BookGen. Each returns a plain dict (the JSON shape) or raises; the runner times it."""
from __future__ import annotations

import http.client
import ipaddress
import os
import threading
import time
from typing import Any, Dict, List, Optional
from urllib.parse import urlparse

from toolkit.config import Deployment
from toolkit.errors import UsageError, describe

PSEUDO_FILESYSTEMS = {"proc", "sysfs", "cgroup", "cgroup2", "devpts", "mqueue", "debugfs", "tracefs", "securityfs",
                      "pstore", "bpf", "configfs", "fusectl", "hugetlbfs", "autofs", "binfmt_misc", "rpc_pipefs",
                      "nsfs", "overlay", "squashfs", "efivarfs", "ramfs", "devtmpfs", "selinuxfs"}
BODY_EXCERPT = 200


# --------------------------------------------------------------------------- API health
def check_health_url(url: str, explicit: bool) -> None:
    parsed = urlparse(url)
    if parsed.scheme != "http" or not parsed.hostname:
        raise UsageError("health URL must be http://HOST:PORT/PATH: %s" % url)
    if explicit:
        return
    host = parsed.hostname
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise UsageError("the default health URL must be on loopback: %s" % url, hint="give --health-url to override")


def probe_api(url: str, timeout: float) -> Dict[str, Any]:
    parsed = urlparse(url)
    started = time.monotonic()
    connection = http.client.HTTPConnection(parsed.hostname, parsed.port or 80, timeout=timeout)
    try:
        connection.request("GET", parsed.path or "/", headers={"User-Agent": "bookgen-kit triage"})
        response = connection.getresponse()
        body = response.read(4096)
        latency = time.monotonic() - started
        return {"url": url, "reachable": True, "status": response.status, "ok": 200 <= response.status < 300,
                "latency_ms": round(latency * 1000, 1),
                "body_excerpt": body[:BODY_EXCERPT].decode("utf-8", "replace")}
    except (OSError, http.client.HTTPException) as error:
        return {"url": url, "reachable": False, "status": None, "ok": False,
                "latency_ms": round((time.monotonic() - started) * 1000, 1), "error": describe(error)}
    finally:
        connection.close()


# --------------------------------------------------------------------------- containers
def _cpu_percent(stats: Dict[str, Any]) -> Optional[float]:
    try:
        cpu, pre = stats["cpu_stats"], stats["precpu_stats"]
        delta = cpu["cpu_usage"]["total_usage"] - pre["cpu_usage"]["total_usage"]
        system = cpu["system_cpu_usage"] - pre["system_cpu_usage"]
        cpus = cpu.get("online_cpus") or len(cpu["cpu_usage"].get("percpu_usage") or []) or 1
        return round(delta / system * cpus * 100, 1) if system > 0 else None
    except (KeyError, TypeError):
        return None


def _container_facts(container, take_stats: bool) -> Dict[str, Any]:
    attrs = container.attrs
    state = attrs.get("State", {})
    facts = {
        "name": container.name,
        "service": container.labels.get("com.docker.compose.service"),
        "status": state.get("Status"),
        "running": bool(state.get("Running")),
        "paused": bool(state.get("Paused")),
        "restarting": bool(state.get("Restarting")),
        "health": (state.get("Health") or {}).get("Status"),
        "restart_count": attrs.get("RestartCount", 0),
        "started_at": state.get("StartedAt"),
        "finished_at": state.get("FinishedAt"),
        "exit_code": state.get("ExitCode"),
        "oom_killed": bool(state.get("OOMKilled")),
        "image": attrs.get("Config", {}).get("Image"),
        "memory_bytes": None,
        "memory_limit_bytes": None,
        "cpu_percent": None,
    }
    if take_stats and facts["running"] and not facts["paused"]:
        try:
            stats = container.stats(stream=False)
            memory = stats.get("memory_stats", {})
            usage = memory.get("usage")
            cache = (memory.get("stats") or {}).get("inactive_file", 0)
            facts["memory_bytes"] = usage - cache if usage is not None else None
            facts["memory_limit_bytes"] = memory.get("limit")
            facts["cpu_percent"] = _cpu_percent(stats)
        except Exception as error:  # stats are a bonus; the state above is what matters
            from toolkit.containers.engine import explain

            facts["stats_error"] = explain(error)
    return facts


def probe_containers(deployment: Deployment, timeout: float) -> Dict[str, Any]:
    from toolkit.containers.engine import bookgen_containers, client, docker_url, explain

    docker_client = client(timeout=timeout)
    try:
        docker_client.ping()
    except Exception as error:
        return {"engine": docker_url(), "reachable": False, "error": explain(error, timeout), "containers": []}
    found = bookgen_containers(docker_client, deployment.compose_project, list(deployment.containers.values()))
    results: Dict[str, Dict[str, Any]] = {}
    threads = []

    def collect(name, container):
        results[name] = _container_facts(container, take_stats=True)

    for name, container in found.items():
        thread = threading.Thread(target=collect, args=(name, container), daemon=True)
        thread.start()
        threads.append(thread)
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    containers = [results.get(name) or {"name": name, "status": "unknown", "error": "no answer in time"}
                  for name in sorted(found)]
    missing = [name for service, name in sorted(deployment.containers.items())
               if name not in found and not any(c.get("service") == service for c in containers)]
    return {"engine": docker_url(), "reachable": True, "containers": containers, "missing": missing}


# --------------------------------------------------------------------------- host
def _filesystems() -> List[Dict[str, Any]]:
    seen = set()
    result = []
    with open("/proc/self/mounts", encoding="utf-8", errors="replace") as mounts:
        entries = [line.split() for line in mounts]
    for entry in entries:
        if len(entry) < 3:
            continue
        device, mountpoint, fstype = entry[0], entry[1].replace("\\040", " "), entry[2]
        if fstype in PSEUDO_FILESYSTEMS or mountpoint.startswith(("/proc", "/sys", "/run/docker/netns")):
            continue
        try:
            stat = os.statvfs(mountpoint)
            key = os.stat(mountpoint).st_dev
        except OSError:
            continue
        if key in seen or stat.f_blocks == 0:
            continue
        seen.add(key)
        total = stat.f_blocks * stat.f_frsize
        free = stat.f_bavail * stat.f_frsize
        result.append({
            "mountpoint": mountpoint, "device": device, "fstype": fstype, "total_bytes": total,
            "free_bytes": free, "used_percent": round(100.0 * (total - free) / total, 1) if total else 0.0,
            "free_percent": round(100.0 * free / total, 1) if total else 0.0,
            "inodes_total": stat.f_files, "inodes_free": stat.f_favail,
            "inodes_used_percent": round(100.0 * (stat.f_files - stat.f_favail) / stat.f_files, 1)
            if stat.f_files else None,
        })
    return result


def filesystem_of(path: str, filesystems: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    best = None
    real = os.path.realpath(path)
    for fs in filesystems:
        mount = fs["mountpoint"]
        if real == mount or real.startswith(mount.rstrip("/") + "/"):
            if best is None or len(mount) > len(best["mountpoint"]):
                best = fs
    return best


def _top_processes(sample_seconds: float) -> Dict[str, List[Dict[str, Any]]]:
    import psutil

    processes = []
    for process in psutil.process_iter(["pid", "name", "username"]):
        try:
            process.cpu_percent(None)
            processes.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    time.sleep(sample_seconds)
    rows = []
    for process in processes:
        try:
            with process.oneshot():
                rows.append({"pid": process.pid, "name": process.info["name"], "user": process.info["username"],
                             "rss_bytes": process.memory_info().rss, "cpu_percent": process.cpu_percent(None)})
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    by_memory = sorted(rows, key=lambda r: r["rss_bytes"], reverse=True)[:10]
    by_cpu = sorted(rows, key=lambda r: r["cpu_percent"], reverse=True)[:10]
    return {"by_memory": by_memory, "by_cpu": by_cpu}


def probe_host(sample_seconds: float = 0.3) -> Dict[str, Any]:
    import psutil

    memory = psutil.virtual_memory()
    swap = psutil.swap_memory()
    load = os.getloadavg()
    cpu = psutil.cpu_percent(interval=None)
    top = _top_processes(sample_seconds)
    return {
        "load": {"1m": round(load[0], 2), "5m": round(load[1], 2), "15m": round(load[2], 2)},
        "cpu_count": psutil.cpu_count(), "cpu_percent": cpu,
        "memory": {"total_bytes": memory.total, "available_bytes": memory.available,
                   "available_percent": round(100.0 * memory.available / memory.total, 1)},
        "swap": {"total_bytes": swap.total, "used_bytes": swap.used, "used_percent": swap.percent},
        "filesystems": _filesystems(),
        "top_processes": top,
        "uptime_seconds": int(time.time() - psutil.boot_time()),
    }


def recent_oom_kills(window_seconds: int = 86400, kmsg: str = "/dev/kmsg", kern_log: str = "/var/log/kern.log"
                     ) -> Dict[str, Any]:
    """OOM kills from the kernel ring buffer (/dev/kmsg), else kern.log; the source used is named."""
    import psutil

    kills = []
    try:
        fd = os.open(kmsg, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as error:
        fd = None
        kmsg_error = error.strerror
    if fd is not None:
        boot = psutil.boot_time()
        try:
            while True:
                try:
                    record = os.read(fd, 8192).decode("utf-8", "replace")
                except BlockingIOError:
                    break
                except OSError:  # EPIPE: records overwritten while reading; go on
                    continue
                if not record:
                    break
                head, _, message = record.partition(";")
                if "Out of memory" in message or "oom-kill" in message or "Killed process" in message:
                    fields = head.split(",")
                    at = boot + int(fields[2]) / 1e6 if len(fields) > 2 and fields[2].isdigit() else None
                    if at is None or at >= time.time() - window_seconds:
                        kills.append({"time": at, "message": message.strip().splitlines()[0]})
        finally:
            os.close(fd)
        return {"source": kmsg, "kills": kills[-20:]}
    try:
        from toolkit.host.hostfs import open_host_file

        with open_host_file(kern_log) as log:  # never a FIFO or device
            log.seek(0, os.SEEK_END)
            log.seek(max(0, log.tell() - 1024 * 1024))
            for line in log.read().decode("utf-8", "replace").splitlines():
                if "Out of memory" in line or "oom-kill" in line:
                    kills.append({"time": None, "message": line.strip()})
        return {"source": kern_log, "kills": kills[-20:]}
    except OSError:
        return {"source": None, "kills": [], "error": "neither %s (%s) nor %s is readable" % (kmsg, kmsg_error,
                                                                                             kern_log)}


# --------------------------------------------------------------------------- database
def probe_database(target_factory, stuck_after_seconds: int = 3600) -> Dict[str, Any]:
    """target_factory() resolves the target (it may itself fail: Docker hung, .env missing)."""
    from toolkit.db.jobs import count_stuck
    from toolkit.errors import KitError

    from toolkit.db.target import AddressUnknown

    try:
        target = target_factory()
    except AddressUnknown as error:  # the database was not tried: its address is Docker's to tell
        return {"reachable": None, "checked": False, "target": None, "error": error.message}
    except KitError as error:
        return {"reachable": False, "target": None, "error": error.message}
    try:
        facts = target.query("SELECT current_database(), (SELECT count(*) FROM pg_stat_activity WHERE "
                             "datname = current_database()), pg_database_size(current_database()), "
                             "current_setting('server_version')")[0]
    except KitError as error:
        return {"reachable": False, "target": target.description, "mode": target.mode, "error": error.message}
    result = {"reachable": True, "target": target.description, "mode": target.mode, "database": facts[0],
              "connections": int(facts[1]), "size_bytes": int(facts[2]), "server_version": facts[3]}
    try:
        result["stuck_jobs"] = count_stuck(target, stuck_after_seconds)
    except KitError as error:
        result["stuck_jobs"] = None
        result["stuck_jobs_error"] = error.message
    return result


# --------------------------------------------------------------------------- disk hogs
def directory_size(path: str, deadline: float) -> Dict[str, Any]:
    """Allocated bytes and files under path, never following symlinks; partial when the deadline passes."""
    total, files, partial = 0, 0, False
    stack = [path]
    while stack:
        if time.monotonic() > deadline:
            partial = True
            break
        current = stack.pop()
        try:
            with os.scandir(current) as entries:
                for entry in entries:
                    try:
                        info = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    total += info.st_blocks * 512
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
                    else:
                        files += 1
        except OSError:
            continue
    return {"path": path, "exists": os.path.isdir(path), "bytes": total, "files": files, "partial": partial}


def probe_disk_usage(deployment: Deployment, budget: float) -> Dict[str, Any]:
    deadline = time.monotonic() + budget
    paths = [deployment.bios_dir, deployment.docx_dir, deployment.backups_dir] + list(deployment.log_dirs)
    return {"directories": [directory_size(p, deadline) for p in paths]}
