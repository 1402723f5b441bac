"""What the case's journal says beyond its entries: the host's state as our commands left it, each capture's
gaps, the findings of every capture grouped by where they are and counted once, the suspicious processes'
tree, and the indicators an analyst can take elsewhere.

Invariants: from the journal alone (the bundles are encrypted and need not be at hand); nothing here reads
the host; a finding seen by several captures is one row naming each capture.
"""
from __future__ import annotations

import ipaddress
from typing import Any, Dict, List, Optional, Tuple

from toolkit.case import checklists


def _commands(entries: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    return [e for e in entries if e.get("kind") == "command"]


def host_state(entries: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """[{what, state, since}]: containment, hardening, rotation and kept databases, as the journal knows them."""
    taken_back = checklists.undone(entries)
    commands = [e for e in _commands(entries) if e.get("exit_code") in (0, 6)]

    def latest(*names: str) -> Optional[Dict[str, Any]]:
        found = [e for e in commands if e.get("command_name") in names]
        return found[-1] if found else None

    state = []
    contained = latest("contain apply")
    if contained and contained["seq"] not in taken_back:
        state.append({"what": "containment", "state": "in force: only SSH from %s gets in" % (
            (contained.get("changes") or {}).get("allow_ssh_from") or "the responder"), "since": contained["seq"]})
    else:
        state.append({"what": "containment", "state": "released by #%d" % taken_back[contained["seq"]]["seq"]
                      if contained else "never applied", "since": contained["seq"] if contained else None})
    bundles = [e for e in commands if e.get("command_name") == "harden apply" and e["seq"] not in taken_back]
    state.append({"what": "hardening", "state": "in force: undo bundle %s" % ", ".join(
        str((e.get("changes") or {}).get("bundle")) for e in bundles) if bundles else "none in force",
        "since": bundles[-1]["seq"] if bundles else None})
    rotation = latest("rotate run", "rotate resume", "rotate rollback")
    if rotation:
        changes = rotation.get("changes") or {}
        provider = ", ".join(k.get("name", "?") for k in changes.get("revoke_at_provider") or [])
        state.append({"what": "credentials", "state": "rotation %s%s" % (changes.get("state") or "?", (
            "; still to revoke at their provider: %s" % provider) if provider else ""), "since": rotation["seq"]})
    else:
        state.append({"what": "credentials", "state": "not rotated", "since": None})
    dropped = {(e.get("changes") or {}).get("dropped") for e in commands if e.get("command_name") == "db drop-old"}
    for entry in commands:
        old = (entry.get("changes") or {}).get("old_database")
        if entry.get("command_name") == "restore" and old and old not in dropped:
            state.append({"what": "database", "state": "the pre-restore database %s is kept" % old,
                          "since": entry["seq"]})
    return state


def capture_gaps(entries: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per capture: its bundle, and what it could not do (collectors failed, abandoned or not run; sources it
    should have read; the ways it ran degraded)."""
    gaps = []
    for entry in _commands(entries):
        if entry.get("command_name") != "capture":
            continue
        changes = entry.get("changes") or {}
        bundle = next((o["path"] for o in entry.get("outputs") or [] if ".tar" in o["path"]), None)
        lines = ["collector %s: %s%s" % (g["collector"], g["status"], ", %s errors" % g["errors"] if g.get("errors")
                                         else "") for g in changes.get("gaps") or []]
        lines += ["not read: %s (%s): %s" % (u["source"], u["collector"], u["reason"])
                  for u in changes.get("unread") or []]
        lines += ["degraded: %s" % line for line in changes.get("degraded") or []]
        gaps.append({"seq": entry["seq"], "bundle": bundle, "exit_code": entry.get("exit_code"), "gaps": lines})
    return gaps


def _place(finding: Dict[str, Any]) -> str:
    details = finding.get("details") or {}
    if details.get("container"):
        return "container %s%s" % (details["container"], " (service %s, image %s)" % (
            details.get("service"), details.get("image")) if details.get("service") else "")
    return "the host"


def grouped_findings(entries: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Findings of every capture, one row per indicator (the same id, place and title across captures),
    sorted by place then severity; each names the captures (journal seq and bundle) that saw it."""
    order = {"critical": 0, "high": 1, "medium": 2, "low": 3, "info": 4}
    rows: Dict[Tuple[str, str, str], Dict[str, Any]] = {}
    for entry in _commands(entries):
        bundle = next((o["path"] for o in entry.get("outputs") or [] if ".tar" in o["path"]), None)
        for finding in (entry.get("changes") or {}).get("findings") or []:
            key = (_place(finding), str(finding.get("id")), str(finding.get("title")))
            row = rows.setdefault(key, dict(finding, place=key[0], seen_by=[]))
            row["seen_by"].append({"seq": entry["seq"], "bundle": bundle})
    return sorted(rows.values(), key=lambda r: (r["place"] != "the host", r["place"],
                                                order.get(r.get("severity"), 9), r.get("title") or ""))


def process_tree(findings: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The suspicious processes with their parents up to PID 1, merged into one forest: nodes {pid, name, exe,
    container, findings, children}; a node whose container differs from its parent's marks a boundary."""
    nodes: Dict[int, Dict[str, Any]] = {}
    parent_of: Dict[int, int] = {}
    for finding in findings:
        for chain in ((finding.get("details") or {}).get("ancestry") or {}).values():
            for index, link in enumerate(chain):
                pid = int(link["pid"])
                node = nodes.setdefault(pid, {"pid": pid, "name": link.get("name"), "exe": link.get("exe"),
                                              "container": link.get("container"), "findings": [], "children": []})
                named = link.get("container")
                if named and (not node["container"] or _is_short_id(node["container"])) and not _is_short_id(named):
                    node["container"] = named  # a capture that knew the container's name says it best
                if index == 0 and finding.get("title") not in node["findings"]:
                    node["findings"].append(finding.get("title"))
                if index + 1 < len(chain):
                    parent_of[pid] = int(chain[index + 1]["pid"])
    roots = []
    for pid in sorted(nodes):
        node = nodes[pid]
        parent = nodes.get(parent_of.get(pid, -1))
        if parent is None:
            roots.append(node)
        else:
            parent["children"].append(node)
        node["boundary"] = parent is not None and parent.get("container") != node.get("container")
    return roots


def _is_short_id(text: str) -> bool:
    return len(text) == 12 and all(c in "0123456789abcdef" for c in text)


def _ip(value: Any) -> Optional[str]:
    try:
        return str(ipaddress.ip_address(str(value)))
    except ValueError:
        return None


def indicators(findings: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """[{type, value, context, finding}]: sha256 hashes, file paths, network addresses and key fingerprints
    the findings name, each once."""
    seen: Dict[Tuple[str, str], Dict[str, Any]] = {}

    def add(kind: str, value: Any, context: str, finding: Dict[str, Any]) -> None:
        if value in (None, ""):
            return
        seen.setdefault((kind, str(value)), {"type": kind, "value": str(value), "context": context,
                                             "finding": finding.get("title"), "severity": finding.get("severity")})

    for finding in findings:
        details = finding.get("details") or {}
        digests = details.get("sha256")
        for digest in digests if isinstance(digests, list) else [digests]:
            add("sha256", digest, "binary %s" % (details.get("exe") or ""), finding)
        for key in ("exe", "host_path", "path_in_container", "path"):
            if isinstance(details.get(key), str) and details[key].startswith("/") and \
                    not details[key].startswith("/memfd:"):
                add("path", details[key], key.replace("_", " ") + (" in %s" % details["container"] if key ==
                                                                   "path_in_container" else ""), finding)
        for path in details.get("paths") or []:
            if isinstance(path, str) and path.startswith("/") and not path.startswith("/memfd:"):
                add("path", path, "file", finding)
        for key in ("remote", "address"):
            address = _ip(details.get(key))
            if address and not (ipaddress.ip_address(address).is_unspecified or
                                ipaddress.ip_address(address).is_loopback):
                add("ip", address, "%s%s" % (key, ":%s" % details.get("remote_port") if key == "remote" and
                                              details.get("remote_port") else ""), finding)
        for fingerprint in details.get("fingerprints") or ([details["fingerprint"]] if details.get("fingerprint")
                                                           else []):
            add("ssh-key", fingerprint, "key fingerprint", finding)
    return sorted(seen.values(), key=lambda i: (i["type"], i["value"]))


NEAR_SECONDS = 86400  # recent changes this close to a suspicious process's start are notable


def timeline(entries: List[Dict[str, Any]], findings: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """The newest capture's walk as a plot (changes per hour), the suspicious processes' starts marked on it,
    and the notable events: files under /etc and the app changed near those starts (else the latest ones)."""
    from toolkit.case import plot

    walked = [e for e in _commands(entries) if (e.get("changes") or {}).get("timeline")]
    if not walked:
        return None
    summary = walked[-1]["changes"]["timeline"]
    marks = []
    for finding in findings:
        for chain in ((finding.get("details") or {}).get("ancestry") or {}).values():
            if chain and chain[0].get("start_time"):
                marks.append({"time": float(chain[0]["start_time"]), "label": "pid %s %s started: %s" % (
                    chain[0].get("pid"), chain[0].get("name") or "", finding.get("title"))})
    marks.sort(key=lambda m: m["time"])
    for number, mark in enumerate(marks, 1):
        mark["number"] = number
    changes = summary.get("recent_changes") or []
    near = [c for c in changes if any(abs(max(c["mtime"], c["ctime"]) - m["time"]) <= NEAR_SECONDS for m in marks)]
    events = sorted(near or changes[:15], key=lambda c: max(c["mtime"], c["ctime"]))
    drawn = plot.svg(summary.get("changes_per_hour") or {}, float(summary.get("until") or 0),
                     int(summary.get("days") or 14), marks)
    return {"svg": drawn, "marks": marks, "events": events, "seq": walked[-1]["seq"], "near": bool(near)}
