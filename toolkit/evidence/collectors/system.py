"""System facts: who this host is and what its clock says, read from /proc, /sys and /etc."""
from __future__ import annotations

import json
import os
import socket
import time
from typing import Any, Dict, Iterator, List, Optional

from toolkit import utc
from toolkit.evidence.collectors.base import CollectionContext, Collector, Emitter, host_member
from toolkit.host.hostfs import Refused, kernel_bytes, reason

TIME_SYNC_DAEMONS = ("chronyd", "ntpd", "systemd-timesyncd", "openntpd", "timesyncd")


def _read(path: str, limit: int = 1 << 20) -> Optional[str]:
    """A kernel file under /proc or /sys (never a host file: those go through context.fs), bounded."""
    try:
        return kernel_bytes(path, limit).decode("utf-8", "replace").strip()
    except OSError:  # Refused too: a FIFO mounted over it is never waited on
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
        "machine_id": (context.fs.read_text("/etc/machine-id", 4096, follow=True) or "").strip() or None,
        "boot_id": _read("/proc/sys/kernel/random/boot_id"),
        "kernel": {"sysname": uname.sysname, "release": uname.release, "version": uname.version,
                   "machine": uname.machine},
        "uptime_seconds": float(uptime.split()[0]) if uptime else None,
        "clock_utc": utc.iso_micro(now),
        "clock_monotonic": time.monotonic(),
        "timezone": time.tzname,
        "clock_source": clock_source(),
        "root": context.root,
    }


UTMP_FORMAT = "<hhi32s4s32s256shhiii4i20s"  # glibc struct utmp: 384 bytes
UTMP_TYPES = {1: "RUN_LVL", 2: "BOOT_TIME", 5: "INIT_PROCESS", 6: "LOGIN_PROCESS", 7: "USER_PROCESS",
              8: "DEAD_PROCESS"}
SECURITY_SYSCTLS = ("kernel/kptr_restrict", "kernel/dmesg_restrict", "kernel/randomize_va_space",
                    "kernel/yama/ptrace_scope", "kernel/modules_disabled", "kernel/kexec_load_disabled",
                    "kernel/unprivileged_bpf_disabled", "kernel/core_pattern", "kernel/tainted",
                    "net/ipv4/ip_forward", "net/ipv4/conf/all/rp_filter", "net/ipv4/conf/all/accept_redirects",
                    "net/ipv4/conf/all/send_redirects", "net/ipv4/tcp_syncookies", "fs/protected_symlinks",
                    "fs/protected_hardlinks", "fs/suid_dumpable", "user/max_user_namespaces", "vm/mmap_min_addr")
TAINT_FLAGS = "PFSRMBUDAWCIOELKXT"
# What names the system to an analyst's tools (dissect.target's os, version, hostname, timezone, users and ips
# plugins; plaso's preprocessors): in every profile, symlinks with what they point to.
IDENTITY_FILES = ("/etc/hostname", "/etc/os-release", "/usr/lib/os-release", "/etc/lsb-release",
                  "/etc/debian_version", "/etc/redhat-release", "/etc/system-release", "/etc/alpine-release",
                  "/etc/timezone", "/etc/localtime", "/etc/machine-id", "/etc/hosts", "/etc/passwd", "/etc/group",
                  "/etc/fstab", "/etc/resolv.conf", "/etc/network/interfaces", "/etc/nsswitch.conf")


def parse_utmp(data: bytes) -> list:
    import struct

    size = struct.calcsize(UTMP_FORMAT)
    records = []
    for offset in range(0, len(data) - size + 1, size):
        fields = struct.unpack_from(UTMP_FORMAT, data, offset)
        kind = fields[0]

        def text(raw: bytes) -> str:
            return raw.split(b"\0", 1)[0].decode("utf-8", "replace")

        records.append({"type": UTMP_TYPES.get(kind, str(kind)), "pid": fields[2], "line": text(fields[3]),
                        "user": text(fields[5]), "host": text(fields[6]), "time": fields[10] + fields[11] / 1e6})
    return records


def taint(value: Optional[str]) -> Dict[str, Any]:
    number = int(value) if value and value.strip().isdigit() else 0
    return {"value": number, "flags": "".join(f for i, f in enumerate(TAINT_FLAGS) if number >> i & 1)}


class SystemCollector(Collector):
    def findings(self, facts: Dict[str, List[Dict[str, Any]]], judging: Any) -> Iterator[Dict[str, Any]]:
        """/etc/ld.so.preload with entries is critical; a tainted kernel is medium."""
        from toolkit.evidence.findings import finding

        for fact in facts.get("ld_so_preload", []):
            entries = [line for line in fact["data"].splitlines() if line.strip() and not line.startswith("#")]
            if entries:
                yield finding("ld-so-preload", "critical", "/etc/ld.so.preload is not empty: %s" % ", ".join(
                    entries), [fact["evidence"]], entries=entries)
        for fact in facts.get("taint", []):
            if fact["data"]["value"]:
                yield finding("kernel-tainted", "medium", "the kernel is tainted (%s, flags %s)" % (
                    fact["data"]["value"], fact["data"]["flags"]), [fact["evidence"]], **fact["data"])

    name = "system"
    rank = 5
    budget_seconds = 20.0
    description = "host identity and clock, logins (utmp, wtmp), kernel modules and taint, mounts, security sysctls"

    def run(self, context: CollectionContext, emit: Emitter) -> None:
        facts = system_facts(context)
        emit.generated("volatile/system.json", json.dumps(facts, indent=2, sort_keys=True).encode(),
                       "/proc, uname, /etc/machine-id")
        if facts["machine_id"] is None:  # system_facts reads it quietly: a FIFO, device or link there is said here
            emit.read("/etc/machine-id", 4096, follow=True)
        for name in IDENTITY_FILES:
            emit.file_and_targets(name, context.max_file_size)
        logins = {}
        utmp = ("/run/utmp",) if context.fs.lexists("/run/utmp") else ("/var/run/utmp",)
        for name in utmp + ("/var/log/wtmp", "/var/log/btmp"):
            try:
                logins[name] = parse_utmp(context.fs.read_bytes(name, 64 << 20, follow=True))
            except FileNotFoundError:
                continue
            except (OSError, Refused) as error:
                emit.refusal(name, error)
        emit.json("volatile/logins.json", logins, "utmp/wtmp/btmp records parsed (glibc struct utmp)")
        for name in ("/var/log/wtmp", "/var/log/btmp"):
            for record in logins.get(name, []):
                emit.fact("login", dict(record, source=name), "volatile/logins.json")
        for name in ("/var/log/wtmp", "/var/log/btmp", "/var/log/lastlog"):
            emit.file(name, context.max_file_size)
        tainted = _read("/proc/sys/kernel/tainted")
        emit.json("volatile/kernel.json", {
            "modules": (_read("/proc/modules") or "").splitlines(), "taint": taint(tainted),
            "cmdline": _read("/proc/cmdline"), "sysctl": {key.replace("/", "."): _read("/proc/sys/" + key)
                                                         for key in SECURITY_SYSCTLS},
        }, "/proc/modules, /proc/sys, /proc/cmdline")
        emit.fact("taint", taint(tainted), "volatile/kernel.json")
        emit.generated("volatile/mountinfo.txt", (_read("/proc/self/mountinfo") or "").encode(), "/proc/self/mountinfo")
        if context.fs.lexists("/etc/ld.so.preload"):
            emit.file("/etc/ld.so.preload", context.max_file_size)
            try:  # under --root a link is read inside the image, as its loader would
                preload = context.fs.read_bytes("/etc/ld.so.preload", 1 << 20, follow=True).decode("utf-8", "replace")
            except (OSError, Refused) as error:  # the loader follows a link we do not: present and unread is a finding
                preload = "(present, not read: %s)" % reason(error)
            emit.fact("ld_so_preload", preload.strip(), host_member("/etc/ld.so.preload"))
