"""System facts: who this host is and what its clock says, read from /proc, /sys and /etc."""
from __future__ import annotations

import json
import os
import socket
import time
from typing import Any, Dict, Optional

from toolkit.evidence.collectors.base import CollectionContext, Collector, Emitter

TIME_SYNC_DAEMONS = ("chronyd", "ntpd", "systemd-timesyncd", "openntpd", "timesyncd")


def _read(path: str) -> Optional[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read().strip()
    except OSError:
        return None


def clock_source() -> Dict[str, Any]:
    """What keeps the clock: the time-sync daemons seen running (no network is asked)."""
    running = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            name = _read("/proc/%s/comm" % pid)
            if name in TIME_SYNC_DAEMONS and name not in running:
                running.append(name)
    synchronized = os.path.exists("/run/systemd/timesync/synchronized")
    return {"daemons": sorted(running), "systemd_timesync_synchronized": synchronized,
            "note": "host clock as read; no network time was consulted"}


def system_facts(context: CollectionContext) -> Dict[str, Any]:
    uname = os.uname()
    uptime = _read("/proc/uptime")
    now = time.time()
    return {
        "hostname": socket.gethostname(),
        "machine_id": _read(context.host_path("/etc/machine-id")),
        "boot_id": _read("/proc/sys/kernel/random/boot_id"),
        "kernel": {"sysname": uname.sysname, "release": uname.release, "version": uname.version,
                   "machine": uname.machine},
        "uptime_seconds": float(uptime.split()[0]) if uptime else None,
        "clock_utc": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + ".%06dZ" % int((now % 1) * 1e6),
        "clock_monotonic": time.monotonic(),
        "timezone": time.tzname,
        "clock_source": clock_source(),
        "root": context.root,
    }


class SystemCollector(Collector):
    name = "system"
    rank = 5
    budget_seconds = 10.0
    description = "hostname, machine-id, boot-id, kernel, uptime, UTC clock and its source"

    def run(self, context: CollectionContext, emit: Emitter) -> None:
        facts = system_facts(context)
        emit.generated("volatile/system.json", json.dumps(facts, indent=2, sort_keys=True).encode(),
                       "/proc, uname, /etc/machine-id")
