"""What looks wrong, computed from what was collected (never a second look at the host).

The rules live beside the collectors whose facts they read (each collector's `findings(facts, judging)`);
this module runs them, merges the same finding reached twice, and holds what rules share: the finding's
shape, grouping one indicator over many processes, and address and title helpers."""
from __future__ import annotations

import ipaddress
import json
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

DEFAULT_EXPECTED_PORTS = (8000, 5432, 6379, 22, 80, 443)
SUSPICIOUS_DIRS = ("/tmp/", "/var/tmp/", "/dev/shm/")
RECENT_DAYS = 7
MAX_TITLE_PIDS = 5  # a title names this many pids, then "and N more"


def finding(finding_id: str, severity: str, title: str, evidence: Sequence[str], **details) -> Dict[str, Any]:
    """One finding, as every rule yields it."""
    return {"id": finding_id, "severity": severity, "title": title, "evidence": sorted(set(evidence)),
            "details": details}




def public_address(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return not (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified
                or ip.is_reserved)


def _group(entries: List[Tuple[Dict[str, Any], Set[Tuple[str, str]]]]) -> List[List[Dict[str, Any]]]:
    """Facts that share any indicator key (an exe path, a sha256, a library, an LD_PRELOAD value) in one group,
    transitively; groups in the order of their first fact."""
    parent = list(range(len(entries)))

    def root(index: int) -> int:
        while parent[index] != index:
            parent[index] = parent[parent[index]]
            index = parent[index]
        return index

    owner: Dict[Tuple[str, str], int] = {}
    for index, (_, keys) in enumerate(entries):
        for key in sorted(keys):
            if key in owner:
                parent[root(index)] = root(owner[key])
            else:
                owner[key] = index
    groups: Dict[int, List[Dict[str, Any]]] = {}
    for index, (fact, _) in enumerate(entries):
        groups.setdefault(root(index), []).append(fact)
    return list(groups.values())


def first(values: Sequence[Any], count: int = 3) -> str:
    shown = ", ".join(str(v) for v in values[:count])
    return shown + (" and %d more" % (len(values) - count) if len(values) > count else "")


def _process_finding(finding_id: str, group: List[Dict[str, Any]]) -> Dict[str, Any]:
    """One finding for one indicator, listing every process that shows it.

    details: pids (sorted), pid (the first of them), names; and per kind exe/exes/sha256 (binaries), paths
    (memfd code, deleted libraries) or ld_preload. The title names the count and the first few pids.
    """
    by_pid = {fact["data"]["pid"]: fact for fact in group}
    pids = sorted(by_pid)
    processes = [by_pid[pid]["data"] for pid in pids]
    names = sorted({str(p.get("name")) for p in processes})
    one = len(pids) == 1
    if one:
        who = "pid %d (%s)" % (pids[0], processes[0].get("name"))
    else:
        who = "%d processes (pids %s; %s)" % (len(pids), first(pids, MAX_TITLE_PIDS), first(names))
    evidence = [fact["evidence"] for fact in group]
    details: Dict[str, Any] = {"pids": pids, "pid": pids[0], "names": names}
    exes = sorted({p.get("exe") or "" for p in processes} - {""})
    details_binary = dict(details, exe=exes[0] if exes else "", exes=exes,
                          sha256=sorted({p["exe_sha256"] for p in processes if p.get("exe_sha256")}))
    if finding_id == "process-deleted-binary":
        title = "%s %s a deleted binary: %s" % (who, "runs" if one else "run", first(exes))
        copies = sorted({p["binary_member"] for p in processes if p.get("binary_member")})
        return finding(finding_id, "high", title, evidence + (copies or ["volatile/binaries/"]), **details_binary)
    if finding_id == "process-from-tmp":
        title = "%s %s from %s" % (who, "runs" if one else "run", first(exes))
        return finding(finding_id, "high", title, evidence, **details_binary)
    if finding_id == "process-memfd-code":
        paths = sorted({m["path"] for p in processes for m in p.get("maps") or []
                        if m.get("memfd") and m.get("executable")})
        title = "%s %s code from memfd: %s" % (who, "executes" if one else "execute", first(paths))
        return finding(finding_id, "high", title, evidence, paths=paths, **details)
    if finding_id == "process-deleted-library":
        paths = sorted({m["path"] for p in processes for m in p.get("maps") or []
                        if m.get("deleted") and m.get("executable") and m["path"] != (p.get("exe") or "")})
        title = "%s %s deleted libraries: %s" % (who, "maps" if one else "map", first(paths))
        return finding(finding_id, "medium", title, evidence, paths=paths, **details)
    if finding_id == "process-ld-preload":
        value = processes[0]["ld_preload"]
        title = "%s %s LD_PRELOAD=%s" % (who, "has" if one else "have", value)
        return finding(finding_id, "high", title, evidence, ld_preload=value, **details)
    raise ValueError("not a process finding: %s" % finding_id)


def _dedup(findings: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The same finding reached twice (two facts for one thing) once, with the evidence of both; two findings
    are the same only when id, title and every detail agree, so distinct indicators never merge."""
    unique: Dict[Tuple[str, str, str], Dict[str, Any]] = {}
    for finding in findings:
        key = (finding["id"], finding["title"], json.dumps(finding["details"], sort_keys=True, default=str))
        if key in unique:
            kept = unique[key]
            kept["evidence"] = sorted(set(kept["evidence"]) | set(finding["evidence"]))
        else:
            unique[key] = finding
    order = {"critical": 0, "high": 1, "medium": 2, "low": 3}
    return sorted(unique.values(), key=lambda f: (order.get(f["severity"], 9), f["id"], f["title"]))


@dataclass
class Judging:
    """What the rules need besides the facts."""
    expected_ports: Sequence[int] = DEFAULT_EXPECTED_PORTS
    now: float = 0.0

    @property
    def recent(self) -> float:
        return self.now - RECENT_DAYS * 86400


def compute(facts: Dict[str, List[Dict[str, Any]]], expected_ports: Sequence[int] = DEFAULT_EXPECTED_PORTS,
            now: Optional[float] = None) -> List[Dict[str, Any]]:
    """facts: kind -> [{"data": ..., "evidence": archive path}] as the collectors emitted them. Every rule lives
    beside the collector whose facts it reads (its `findings`); here they are run and merged."""
    from toolkit.evidence.collectors import REGISTRY

    judging = Judging(expected_ports, time.time() if now is None else now)
    findings: List[Dict[str, Any]] = []
    for collector in REGISTRY:
        findings.extend(collector.findings(facts, judging))
    return _dedup(findings)


def process_indicators(facts: Dict[str, List[Dict[str, Any]]]) -> List[Dict[str, Any]]:
    """One finding per indicator (a deleted or /tmp binary, memfd code, a deleted library, an LD_PRELOAD value),
    listing every process that shows it."""
    indicators: Dict[str, List[Tuple[Dict[str, Any], Set[Tuple[str, str]]]]] = {}
    for fact in facts.get("process", []):
        process = fact["data"]
        exe = process.get("exe") or ""
        binary = {("exe", exe)} if exe else set()
        if process.get("exe_sha256"):
            binary.add(("sha256", process["exe_sha256"]))
        if process.get("exe_deleted"):
            indicators.setdefault("process-deleted-binary", []).append((fact, binary))
        if exe.startswith(SUSPICIOUS_DIRS) or exe.startswith("/memfd:"):
            indicators.setdefault("process-from-tmp", []).append((fact, binary))
        memfd_exec = [m["path"] for m in process.get("maps") or [] if m.get("memfd") and m.get("executable")]
        deleted_libs = [m["path"] for m in process.get("maps") or []
                        if m.get("deleted") and m.get("executable") and m["path"] != exe]
        if memfd_exec and not process.get("is_self"):
            keys = {("memfd", path) for path in memfd_exec}
            if exe.startswith("/memfd:") and process.get("exe_sha256"):
                keys.add(("sha256", process["exe_sha256"]))
            indicators.setdefault("process-memfd-code", []).append((fact, keys))
        if deleted_libs and not process.get("is_self"):
            indicators.setdefault("process-deleted-library", []).append((fact, {("library", p) for p in deleted_libs}))
        if process.get("ld_preload"):
            indicators.setdefault("process-ld-preload", []).append((fact, {("ld_preload", process["ld_preload"])}))
    found = []
    for finding_id, entries in sorted(indicators.items()):
        for group in _group(entries):
            found.append(_process_finding(finding_id, group))
    return found
