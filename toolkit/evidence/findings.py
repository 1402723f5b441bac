"""What looks wrong, computed from what was collected (never a second look at the host)."""
from __future__ import annotations

import ipaddress
import time
from typing import Any, Dict, List, Sequence

DEFAULT_EXPECTED_PORTS = (8000, 5432, 6379, 22, 80, 443)
SUSPICIOUS_DIRS = ("/tmp/", "/var/tmp/", "/dev/shm/")
RECENT_DAYS = 7


def _finding(finding_id: str, severity: str, title: str, evidence: Sequence[str], **details) -> Dict[str, Any]:
    return {"id": finding_id, "severity": severity, "title": title, "evidence": sorted(set(evidence)),
            "details": details}


def _public(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return not (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified
                or ip.is_reserved)


def compute(facts: Dict[str, List[Dict[str, Any]]], expected_ports: Sequence[int] = DEFAULT_EXPECTED_PORTS,
            now: float = None) -> List[Dict[str, Any]]:
    """facts: kind -> [{"data": ..., "evidence": archive path}] as the collectors emitted them."""
    now = time.time() if now is None else now
    recent = now - RECENT_DAYS * 86400
    findings: List[Dict[str, Any]] = []
    processes = {f["data"]["pid"]: f for f in facts.get("process", [])}

    for fact in facts.get("process", []):
        process = fact["data"]
        exe = process.get("exe") or ""
        label = "pid %d (%s)" % (process["pid"], process.get("name"))
        if process.get("exe_deleted"):
            findings.append(_finding("process-deleted-binary", "high", "%s runs a deleted binary: %s" % (label, exe),
                                     [fact["evidence"], "volatile/binaries/"], pid=process["pid"], exe=exe))
        if exe.startswith(SUSPICIOUS_DIRS) or exe.startswith("/memfd:"):
            findings.append(_finding("process-from-tmp", "high", "%s runs from %s" % (label, exe),
                                     [fact["evidence"]], pid=process["pid"], exe=exe))
        memfd_exec = [m["path"] for m in process.get("maps") or [] if m.get("memfd") and m.get("executable")]
        deleted_libs = [m["path"] for m in process.get("maps") or []
                        if m.get("deleted") and m.get("executable") and m["path"] != exe]
        if memfd_exec and not process.get("is_self"):
            findings.append(_finding("process-memfd-code", "high", "%s executes code from memfd: %s" % (
                label, ", ".join(memfd_exec[:3])), [fact["evidence"]], pid=process["pid"]))
        if deleted_libs and not process.get("is_self"):
            findings.append(_finding("process-deleted-library", "medium", "%s maps deleted libraries: %s" % (
                label, ", ".join(deleted_libs[:3])), [fact["evidence"]], pid=process["pid"]))
        if process.get("ld_preload"):
            findings.append(_finding("process-ld-preload", "high", "%s has LD_PRELOAD=%s" % (
                label, process["ld_preload"]), [fact["evidence"]], pid=process["pid"]))

    for fact in facts.get("hidden_pids", []):
        if fact["data"]:
            findings.append(_finding("hidden-pids", "critical", "PIDs answer at /proc/PID but are hidden from the "
                                     "listing: %s" % ", ".join(map(str, fact["data"][:20])), [fact["evidence"]],
                                     pids=fact["data"]))

    for fact in facts.get("ld_so_preload", []):
        entries = [line for line in fact["data"].splitlines() if line.strip() and not line.startswith("#")]
        if entries:
            findings.append(_finding("ld-so-preload", "critical", "/etc/ld.so.preload is not empty: %s" % ", ".join(
                entries), [fact["evidence"]], entries=entries))

    for fact in facts.get("listener", []):
        sock = fact["data"]
        if sock["local_port"] in expected_ports or not sock.get("host_namespace", True):
            continue
        owners = sock.get("processes") or []
        who = ", ".join("pid %d (%s)" % (o["pid"], o["name"]) for o in owners) or "no visible process"
        findings.append(_finding("unexpected-listener", "medium", "%s listening on %s:%d not in the expected set, "
                                 "by %s" % (sock["protocol"], sock["local_address"], sock["local_port"], who),
                                 [fact["evidence"]], port=sock["local_port"], address=sock["local_address"],
                                 pids=[o["pid"] for o in owners]))

    container_pids = {}
    for fact in facts.get("container", []):
        data = fact["data"]
        if data.get("new_executables"):
            findings.append(_finding("container-new-executables", "high", "container %s has new executables: %s" % (
                data["name"], ", ".join(data["new_executables"][:5])), [fact["evidence"]],
                container=data["name"], paths=data["new_executables"]))
        if data.get("service") in ("db", "worker"):
            container_pids[data["id"]] = data
    for fact in facts.get("connection", []):
        sock = fact["data"]
        if not _public(sock["remote_address"]):
            continue
        for owner in sock.get("processes") or []:
            process = processes.get(owner["pid"], {}).get("data", {})
            container = container_pids.get(process.get("container_id") or "")
            if container:
                findings.append(_finding("container-outbound", "high", "container %s (%s) connects to %s:%d" % (
                    container["name"], container["service"], sock["remote_address"], sock["remote_port"]),
                    [fact["evidence"]], container=container["name"], remote=sock["remote_address"]))

    for kind, title in (("authorized_keys", "authorized_keys changed"), ("cron", "cron job changed"),
                        ("systemd_unit", "systemd unit changed")):
        for fact in facts.get(kind, []):
            data = fact["data"]
            if max(data["mtime"], data["ctime"]) >= recent:
                findings.append(_finding("recent-" + kind.replace("_", "-"), "high" if kind == "authorized_keys"
                                         else "medium", "%s in the last %d days: %s" % (title, RECENT_DAYS,
                                                                                        data["path"]),
                                         [fact["evidence"]], path=data["path"], mtime=data["mtime"]))

    for fact in facts.get("taint", []):
        if fact["data"]["value"]:
            findings.append(_finding("kernel-tainted", "medium", "the kernel is tainted (%s, flags %s)" % (
                fact["data"]["value"], fact["data"]["flags"]), [fact["evidence"]], **fact["data"]))

    for fact in facts.get("suid", []):
        if fact["data"]["path"].startswith(SUSPICIOUS_DIRS):
            findings.append(_finding("suid-in-tmp", "critical", "SUID/SGID file in a temporary directory: %s" % (
                fact["data"]["path"]), [fact["evidence"]], path=fact["data"]["path"]))
    for fact in facts.get("tmp_executable", []):
        if fact["data"].get("suid"):
            findings.append(_finding("suid-in-tmp", "critical", "SUID/SGID file in a temporary directory: %s" % (
                fact["data"]["path"]), [fact["evidence"]], path=fact["data"]["path"]))

    unique = {}
    for finding in findings:
        key = (finding["id"], finding["title"])
        unique.setdefault(key, finding)
    order = {"critical": 0, "high": 1, "medium": 2, "low": 3}
    return sorted(unique.values(), key=lambda f: (order.get(f["severity"], 9), f["id"], f["title"]))
