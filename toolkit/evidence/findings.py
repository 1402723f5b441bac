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




def containers_by_id(facts: Dict[str, List[Dict[str, Any]]]) -> Dict[str, Dict[str, Any]]:
    """The containers the containers collector saw, by full id."""
    return {fact["data"]["id"]: fact["data"] for fact in facts.get("container", []) if fact["data"].get("id")}


def _container_by_cgroup(process: Dict[str, Any], containers: Dict[str, Dict[str, Any]]) -> str:
    """The id of the container whose cgroup holds the process (containerd: /NAMESPACE/ID; podman: a
    libpod-ID path component); "" if none."""
    for container_id, container in containers.items():
        hint, marker = container.get("cgroup"), container.get("cgroup_marker")
        for line in process.get("cgroup") or []:
            path = line.split(":", 2)[-1]
            if (hint and (path == hint or path.startswith(hint + "/"))) or (marker and marker in path):
                return container_id
    return ""


def containers_by_namespace(facts: Dict[str, List[Dict[str, Any]]]) -> Dict[str, Dict[str, Any]]:
    """The containers by network namespace: each container's own (through its pid), and that of any process
    placed in a container (by its Docker id or its cgroup)."""
    containers = containers_by_id(facts)
    by_namespace = {c["net_namespace"]: c for c in containers.values() if c.get("net_namespace")}
    for process in (fact["data"] for fact in facts.get("process", [])):
        namespace = (process.get("namespaces") or {}).get("net")
        container = containers.get(process.get("container_id") or _container_by_cgroup(process, containers))
        if namespace and container is not None:
            by_namespace.setdefault(namespace, container)
    return by_namespace


def container_details(container: Dict[str, Any]) -> Dict[str, Any]:
    """How a finding names the container it happened in."""
    return {"container": container.get("name"), "container_id": container.get("id"),
            "service": container.get("service"), "image": container.get("image"),
            "runtime": container.get("source") or "docker"}


def in_container(container: Dict[str, Any]) -> str:
    """" in container NAME (service S, image I)" for a title."""
    about = ["service %s" % container["service"]] if container.get("service") else []
    about += ["image %s" % container["image"]] if container.get("image") else []
    runtime = "%s " % container["source"] if container.get("source") not in (None, "docker") else ""
    return " in %scontainer %s%s" % (runtime, container.get("name") or str(container.get("id"))[:12],
                                      " (%s)" % ", ".join(about) if about else "")


def host_path(container: Dict[str, Any], path: str, pid: Optional[int] = None) -> str:
    """Where a path inside a container is on the host: its merged overlay directory, else the process's root."""
    if container.get("merged_dir"):
        return container["merged_dir"].rstrip("/") + path
    return "/proc/%d/root%s" % (pid, path) if pid else ""


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


def _process_finding(finding_id: str, group: List[Dict[str, Any]],
                     containers: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """One finding for one indicator, listing every process that shows it.

    details: pids (sorted), pid (the first of them), names; and per kind exe/exes/sha256 (binaries), paths
    (memfd code, deleted libraries) or ld_preload. The title names the count and the first few pids. When the
    processes run in one container: its name, id, compose service and image, the title says so, and a binary's
    path is given as the container sees it (exe, path_in_container) and where it is on the host (host_path).
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
    ids = sorted({p.get("container_id") or _container_by_cgroup(p, containers) for p in processes})
    container = containers.get(ids[0]) if len(ids) == 1 and ids[0] else None
    where = ""
    if container is not None:
        details.update(container_details(container))
        where = in_container(container)
    elif len(ids) > 1 or ids[0]:
        details["container_ids"] = [i for i in ids if i]  # some or all in containers the collector did not see
    details_binary = dict(details, exe=exes[0] if exes else "", exes=exes,
                          sha256=sorted({p["exe_sha256"] for p in processes if p.get("exe_sha256")}))
    if container is not None and exes:
        details_binary.update(path_in_container=exes[0], host_path=host_path(container, exes[0], pids[0]))
    who += where
    if finding_id == "process-deleted-binary":
        from_tmp = [e for e in exes if e.startswith(SUSPICIOUS_DIRS)]
        title = "%s %s a deleted binary%s: %s" % (who, "runs" if one else "run", " from a temporary directory"
                                                  if from_tmp else "", first(exes))
        copies = sorted({p["binary_member"] for p in processes if p.get("binary_member")})
        return finding(finding_id, "high", title, evidence + (copies or ["volatile/binaries/"]), **details_binary)
    if finding_id == "process-from-tmp":
        title = "%s %s from %s" % (who, "runs" if one else "run", first(exes))
        return finding(finding_id, "high", title, evidence, **details_binary)
    if finding_id == "process-memfd-code":
        memfd_exes = [e for e in exes if e.startswith("/memfd:")]
        paths = sorted({m["path"] for p in processes for m in p.get("maps") or []
                        if m.get("memfd") and m.get("executable")} | set(memfd_exes))
        title = "%s %s code from memfd: %s" % (who, "executes" if one else "execute", first(paths))
        if memfd_exes:  # the binary itself is a memfd: its copy is the evidence
            copies = sorted({p["binary_member"] for p in processes if p.get("binary_member")})
            return finding(finding_id, "high", title, evidence + (copies or ["volatile/binaries/"]), paths=paths,
                           **details_binary)
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
    return _with_cores(_dedup(findings), facts)


def _with_cores(findings: List[Dict[str, Any]], facts: Dict[str, List[Dict[str, Any]]]) -> List[Dict[str, Any]]:
    """A finding that names processes whose memory was dumped lists their cores in its evidence and details."""
    cores = {fact["data"]["pid"]: fact["data"]["member"] for fact in facts.get("process_core", [])}
    for item in findings:
        details = item["details"]
        pids = list(details.get("pids") or []) + ([details["pid"]] if details.get("pid") else [])
        members = sorted({cores[pid] for pid in pids if pid in cores})
        if members:
            details["memory"] = members
            item["evidence"] = sorted(set(item["evidence"]) | set(members))
    return findings


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
        # where the binary came from is one indicator, said once: code from a memfd, else a deleted binary
        # (from a temporary directory or not), else a binary in a temporary directory
        memfd_exe = exe.startswith("/memfd:")
        if process.get("exe_deleted") and not memfd_exe:
            indicators.setdefault("process-deleted-binary", []).append((fact, binary))
        elif exe.startswith(SUSPICIOUS_DIRS) and not memfd_exe:
            indicators.setdefault("process-from-tmp", []).append((fact, binary))
        memfd_exec = [m["path"] for m in process.get("maps") or [] if m.get("memfd") and m.get("executable")]
        if memfd_exe and exe not in memfd_exec:
            memfd_exec.append(exe)
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
    containers = containers_by_id(facts)
    everyone = {fact["data"]["pid"]: fact["data"] for fact in facts.get("process", [])}
    for finding_id, entries in sorted(indicators.items()):
        for group in _group(entries):
            made = _process_finding(finding_id, group, containers)
            made["details"]["ancestry"] = {pid: ancestry(pid, everyone, containers)
                                           for pid in made["details"]["pids"][:10]}
            found.append(made)
    return found


MAX_ANCESTRY = 64


def ancestry(pid: int, everyone: Dict[int, Dict[str, Any]], containers: Dict[str, Dict[str, Any]]
             ) -> List[Dict[str, Any]]:
    """The process and its parents up to PID 1 (or the first one gone), each with its name, exe and the
    container it runs in (None on the host): what the report draws as a process tree."""
    chain: List[Dict[str, Any]] = []
    seen: Set[int] = set()
    current: Optional[int] = pid
    while current and current not in seen and len(chain) < MAX_ANCESTRY:
        seen.add(current)
        process = everyone.get(current)
        if process is None:
            chain.append({"pid": current, "name": None, "exe": None, "container": None, "gone": True})
            break
        container_id = process.get("container_id") or _container_by_cgroup(process, containers)
        container = containers.get(container_id) if container_id else None
        chain.append({"pid": current, "name": process.get("name"), "exe": process.get("exe"),
                      "container": (container or {}).get("name") or (container_id[:12] if container_id else None),
                      "start_time": process.get("start_time")})
        current = process.get("ppid")
    return chain
