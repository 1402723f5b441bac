"""Run every probe at once, each on its own deadline, and match the result against the runbook's incidents."""
from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional

from toolkit import utc
from toolkit.config import Deployment
from toolkit.errors import describe
from toolkit.triage import probes

TOTAL_BUDGET = 9.0  # seconds; `triage` answers in under 10 s whatever hangs
DISK_CRITICAL_FREE_PERCENT = 10.0
MEMORY_CRITICAL_AVAILABLE_PERCENT = 10.0


@dataclass
class ProbeOutcome:
    name: str
    ok: bool  # the probe itself ran to the end (not: the thing it probes is healthy)
    seconds: float
    result: Optional[Dict[str, Any]] = None
    error: Optional[str] = None


@dataclass
class Incident:
    name: str
    severity: str
    evidence: List[str]
    next_steps: List[str]


@dataclass
class TriageReport:
    generated_at: str
    host: str
    seconds: float
    probes: Dict[str, ProbeOutcome]
    incidents: List[Incident] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        document = asdict(self)
        document["healthy"] = not self.incidents
        return document


def _run_with_deadline(named: Dict[str, Callable[[], Dict[str, Any]]], budget: float) -> Dict[str, ProbeOutcome]:
    outcomes: Dict[str, ProbeOutcome] = {}
    started: Dict[str, float] = {}

    def runner(name: str, probe: Callable[[], Dict[str, Any]]) -> None:
        start = time.monotonic()
        try:
            result = probe()
            outcomes[name] = ProbeOutcome(name, True, round(time.monotonic() - start, 3), result)
        except Exception as error:  # a probe's failure is itself a finding
            message = describe(error)
            outcomes[name] = ProbeOutcome(name, False, round(time.monotonic() - start, 3), None, message)

    threads = []
    for name, probe in named.items():
        started[name] = time.monotonic()
        thread = threading.Thread(target=runner, args=(name, probe), name="probe-" + name, daemon=True)
        thread.start()
        threads.append((name, thread))
    deadline = time.monotonic() + budget
    for name, thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
        if name not in outcomes:  # still hanging: abandoned (daemon thread), reported as such
            outcomes[name] = ProbeOutcome(name, False, round(time.monotonic() - started[name], 3), None,
                                          "no answer within %.0f s (hung)" % budget)
    return outcomes


def run_triage(deployment: Deployment, target_factory: Callable, health_url_explicit: bool = False) -> TriageReport:
    probes.check_health_url(deployment.health_url, health_url_explicit)
    begin = time.monotonic()
    named = {
        "api": lambda: probes.probe_api(deployment.health_url, timeout=3.0),
        "containers": lambda: probes.probe_containers(deployment, timeout=4.0),
        "host": lambda: probes.probe_host(),
        "oom": lambda: probes.recent_oom_kills(),
        "database": lambda: probes.probe_database(target_factory),
        "disk_usage": lambda: probes.probe_disk_usage(deployment, budget=3.0),
    }
    outcomes = _run_with_deadline(named, TOTAL_BUDGET - 0.5)
    report = TriageReport(generated_at=utc.iso(),
                          host=socket.gethostname(), seconds=round(time.monotonic() - begin, 2), probes=outcomes)
    report.incidents = diagnose(outcomes, deployment)
    return report


def _result(outcomes: Dict[str, ProbeOutcome], name: str) -> Optional[Dict[str, Any]]:
    outcome = outcomes.get(name)
    return outcome.result if outcome and outcome.ok else None


def diagnose(outcomes: Dict[str, ProbeOutcome], deployment: Deployment) -> List[Incident]:
    """The runbook's incidents that the evidence matches, each with what to run next."""
    incidents: List[Incident] = []
    api = _result(outcomes, "api")
    containers = _result(outcomes, "containers")
    database = _result(outcomes, "database")
    host = _result(outcomes, "host")
    oom = _result(outcomes, "oom")
    by_service: Dict[str, Dict[str, Any]] = {}
    if containers and containers.get("reachable"):
        for container in containers["containers"]:
            service = container.get("service") or next(
                (s for s, n in deployment.containers.items() if n == container["name"]), None)
            if service:
                by_service[service] = container

    # System Down: the API does not answer.
    if api is None or not api.get("ok"):
        evidence = []
        if api is None:
            evidence.append("API probe failed: %s" % outcomes["api"].error)
        elif not api.get("reachable"):
            evidence.append("GET %s: %s" % (api["url"], api.get("error")))
        else:
            evidence.append("GET %s answered HTTP %s" % (api["url"], api["status"]))
        api_container = by_service.get("api")
        if api_container and not api_container["running"]:
            evidence.append("container %s is %s (exit code %s)" % (api_container["name"], api_container["status"],
                                                                  api_container["exit_code"]))
        if containers is not None and not containers.get("reachable"):
            evidence.append(containers.get("error", "Docker does not answer"))
        elif outcomes["containers"].error:
            evidence.append("Docker: %s" % outcomes["containers"].error)
        docker_hung = containers is not None and not containers.get("reachable")
        incidents.append(Incident("System Down", "critical", evidence, [
            "bookgen-kit capture --out /media/usb   (before restarting, if a compromise is possible)",
            ("systemctl restart docker, then " if docker_hung else "") +
            "docker compose -f %s/docker-compose.yml restart   (runbook: quick restart)" % deployment.app_dir]))

    # Docker does not answer: what depends on it was not seen, and its own commands would hang too.
    if containers is not None and not containers.get("reachable"):
        evidence = [containers.get("error", "dockerd does not answer")]
        if database and database.get("checked") is False:
            evidence.append("the database was not checked: %s" % database.get("error"))
        if api and api.get("ok"):
            evidence.append("the API answers (GET %s: HTTP %s): the containers run without dockerd" % (
                api["url"], api["status"]))
        incidents.append(Incident("Docker does not answer", "high", evidence, [
            "systemctl status docker containerd   (a hung dockerd: docker commands would hang too)",
            "bookgen-kit triage --dsn postgresql://USER@ADDRESS/bookgen   (the database without Docker)",
            "bookgen-kit capture --out /media/usb   (reads Docker's data root when the daemon does not answer)"]))

    # Database unreachable (tried and failed; not when it could not be tried).
    if database is None or database.get("reachable") is False:
        reason = outcomes["database"].error if database is None else database.get("error")
        evidence = ["database: %s" % reason]
        db_container = by_service.get("db")
        if db_container and not db_container["running"]:
            evidence.append("container %s is %s (exit code %s, OOM killed: %s)" % (
                db_container["name"], db_container["status"], db_container["exit_code"], db_container["oom_killed"]))
        incidents.append(Incident("Database unreachable", "critical", evidence, [
            "docker logs --tail 100 %s" % deployment.containers["db"],
            "bookgen-kit triage --container %s   (psql inside the container)" % deployment.containers["db"]]))

    # Worker Crashed: the worker is not running, or jobs are stuck.
    worker = by_service.get("worker")
    evidence = []
    if worker is not None and (not worker["running"] or worker["restarting"]):
        evidence.append("container %s is %s (exit code %s, restarts %s, OOM killed: %s)" % (
            worker["name"], worker["status"], worker["exit_code"], worker["restart_count"], worker["oom_killed"]))
    elif containers and containers.get("reachable") and deployment.containers["worker"] in containers.get("missing", []):
        evidence.append("no %s container" % deployment.containers["worker"])
    if database and database.get("stuck_jobs"):
        evidence.append("%d jobs 'processing' for more than 1 hour" % database["stuck_jobs"])
    if evidence:
        incidents.append(Incident("Worker Crashed", "high", evidence, [
            "bookgen-kit jobs stuck", "bookgen-kit jobs reset   (marks them failed, as the runbook does)",
            "docker compose -f %s/docker-compose.yml restart worker" % deployment.app_dir]))

    # Disk Space Critical: < 10% free where BookGen keeps its data.
    if host:
        filesystems = host["filesystems"]
        watched = {deployment.app_dir, "/"} | set(deployment.log_dirs)
        critical = {}
        for path in watched:
            fs = probes.filesystem_of(path, filesystems) if os.path.exists(path) else None
            if fs and (fs["free_percent"] < DISK_CRITICAL_FREE_PERCENT or
                       (fs["inodes_used_percent"] or 0) > 100 - DISK_CRITICAL_FREE_PERCENT):
                critical[fs["mountpoint"]] = fs
        if critical:
            incidents.append(Incident("Disk Space Critical", "high", [
                "%s: %.1f%% free (%d MiB), inodes %s%% used" % (m, fs["free_percent"], fs["free_bytes"] // 1048576,
                                                               fs["inodes_used_percent"])
                for m, fs in sorted(critical.items())],
                ["bookgen-kit cleanup   (dry run: what would go, how much it frees)",
                 "bookgen-kit cleanup --apply --archive-to /media/usb/archive"]))

    # Memory Exhausted.
    evidence = []
    if host:
        memory = host["memory"]
        if memory["available_percent"] < MEMORY_CRITICAL_AVAILABLE_PERCENT:
            evidence.append("%.1f%% of memory available" % memory["available_percent"])
        if host["swap"]["total_bytes"] and host["swap"]["used_percent"] > 50:
            evidence.append("swap %.0f%% used" % host["swap"]["used_percent"])
    if oom and oom.get("kills"):
        evidence.append("%d OOM kills in the last 24 h (%s)" % (len(oom["kills"]), oom["source"]))
    for container in by_service.values():
        if container.get("oom_killed"):
            evidence.append("container %s was OOM killed" % container["name"])
    if evidence:
        top = host["top_processes"]["by_memory"][:3] if host else []
        incidents.append(Incident("Memory Exhausted", "high", evidence + [
            "largest: " + ", ".join("%s (pid %d, %d MiB)" % (p["name"], p["pid"], p["rss_bytes"] // 1048576)
                                    for p in top)] if top else evidence,
            ["docker compose -f %s/docker-compose.yml stop worker   (runbook: stop non-critical services)"
             % deployment.app_dir]))
    return incidents
