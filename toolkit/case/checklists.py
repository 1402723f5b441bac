"""The runbook's three checklists; an item is done by a journal entry that did it, or marked by hand."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional


def _command(*names: str, exit_ok: bool = True) -> Callable[[Dict[str, Any]], bool]:
    def matches(entry: Dict[str, Any]) -> bool:
        command = entry.get("command_name") or ""
        return entry.get("kind") == "command" and any(command == n or command.startswith(n + " ") for n in names) \
            and (not exit_ok or entry.get("exit_code") in (0, 6))
    return matches


def _note(entry: Dict[str, Any]) -> bool:
    return entry.get("kind") == "note"


def _emergency_backup(entry: Dict[str, Any]) -> bool:
    return _command("backup create", "db repair")(entry) or (
        _command("restore")(entry) and any("emergency" in o["path"] for o in entry.get("outputs", [])))


def _restore_compared(entry: Dict[str, Any]) -> bool:
    return _command("restore")(entry) or (_command("backup verify")(entry) and "--restore-test" in
                                          (entry.get("argv") or []))


# what undoes what: a later successful undo command takes back the most recent effect of its kind still in force
UNDONE_BY = {"contain apply": ("contain release",), "harden apply": ("harden rollback",),
             "rotate run": ("rotate rollback",), "rotate resume": ("rotate rollback",)}


def undone(entries: List[Dict[str, Any]]) -> Dict[int, Dict[str, Any]]:
    """seq of a change -> the journal entry that undid it."""
    done: Dict[int, Dict[str, Any]] = {}
    in_force: List[Dict[str, Any]] = []
    for entry in entries:
        name = entry.get("command_name") or ""
        if entry.get("kind") != "command" or entry.get("exit_code") not in (0, 6):
            continue
        if name in UNDONE_BY:
            in_force.append(entry)
            continue
        for earlier in reversed(in_force):
            if name in UNDONE_BY[earlier["command_name"]]:
                done[earlier["seq"]] = entry
                in_force.remove(earlier)
                break
    return done


def _in_force(*names: str) -> Callable[[List[Dict[str, Any]]], Optional[Dict[str, Any]]]:
    """The latest successful `names` whose effect has not been undone since (containment released, hardening
    rolled back): an item done only while its effect lasts."""
    def rule(entries: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
        taken_back = undone(entries)
        active = [e for e in entries if _command(*names, exit_ok=False)(e) and e.get("exit_code") == 0
                  and e["seq"] not in taken_back]
        return {"entry": active[-1]} if active else None
    return rule


def _credentials(entries: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """A rotation that finished every secret it could, not rolled back; keys only their provider can revoke
    keep the item open (a check by hand closes it) and are named."""
    taken_back = undone(entries)
    finished = [e for e in entries if _command("rotate run", "rotate resume", exit_ok=False)(e)
                and e.get("exit_code") == 0 and (e.get("changes") or {}).get("state") == "finished"
                and e["seq"] not in taken_back]
    if not finished:
        return None
    entry = finished[-1]
    rotated = {name for e in finished for name in ((e.get("changes") or {}).get("rotated") or {})}
    missing = sorted(set((entry.get("changes") or {}).get("rotatable") or []) - rotated)
    if missing:  # a run with --only: the others are still the old values
        return {"entry": entry, "open": "not rotated yet: %s" % ", ".join(missing)}
    provider = (entry.get("changes") or {}).get("revoke_at_provider") or []
    if provider:
        return {"entry": entry, "open": "rotated; still to revoke at their provider: %s" % ", ".join(
            "%s (%s)" % (k.get("name"), k.get("fingerprint")) for k in provider)}
    return {"entry": entry}


def _first(matches: Callable[[Dict[str, Any]], bool]) -> Callable[[List[Dict[str, Any]]], Optional[Dict[str, Any]]]:
    def rule(entries: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
        entry = next((e for e in entries if matches(e)), None)
        return {"entry": entry} if entry else None
    return rule


Rule = Optional[Callable[[List[Dict[str, Any]]], Optional[Dict[str, Any]]]]
CHECKLISTS: Dict[str, List[tuple]] = {
    "system-down": [
        ("Verify outage confirmed", _first(_command("triage"))),
        ("Check service status", _first(_command("triage"))),
        ("Notify stakeholders", None), ("Review recent changes", _first(_command("capture"))),
        ("Check system resources", _first(_command("triage"))), ("Review error logs", _first(_command("capture"))),
        ("Attempt quick restart", None), ("Full restart if needed", None),
        ("Rollback if recent deployment", _first(_command("restore"))), ("Verify recovery", None),
        ("Document incident", _first(_command("case report"))),
    ],
    "data-loss-prevention": [
        ("Stop all writes immediately", _first(_command("contain apply"))),
        ("Create emergency backup", _first(_emergency_backup)),
        ("Assess data integrity", _first(_command("db check"))), ("Document corruption extent", _first(_note)),
        ("Notify DBA", None), ("Attempt repair", _first(_command("db repair"))),
        ("Restore from backup if needed", _first(_command("restore"))),
        ("Verify data consistency", _first(_restore_compared)),
        ("Resume operations", None), ("Post-incident review", _first(_command("case report"))),
    ],
    "security-breach": [
        ("Isolate system", _in_force("contain apply")), ("Preserve evidence", _first(_command("capture"))),
        ("Notify security team", None), ("Document everything", _first(_note)), ("Begin investigation", None),
        ("Change all credentials", _credentials),
        ("Rebuild from clean images", None), ("Restore from backup", _first(_command("restore"))),
        ("Implement additional security", _in_force("harden apply")), ("Monitor for reinfection", None),
        ("Notify affected users", None), ("File incident report", _first(_command("case report"))),
    ],
}
TITLES = {"system-down": "System Down", "data-loss-prevention": "Data Loss Prevention",
          "security-breach": "Security Breach Response"}
POST_INCIDENT = {
    "Immediate (within 1 hour)": ["Verify system fully operational", "Document timeline of events",
                                  "Notify stakeholders of resolution", "Begin preliminary root cause analysis"],
    "Short-term (within 24 hours)": ["Complete incident report", "Identify root cause", "Document lessons learned",
                                     "Plan preventive measures"],
    "Long-term (within 1 week)": ["Implement preventive measures", "Update runbooks and documentation",
                                  "Conduct team post-mortem", "Update monitoring and alerts",
                                  "Test incident response procedures"],
}


def status(entries: List[Dict[str, Any]], names: Optional[List[str]] = None) -> Dict[str, List[Dict[str, Any]]]:
    manual = {}
    for entry in entries:
        if entry.get("kind") == "check":
            manual[(entry.get("checklist"), entry.get("item"))] = entry
    result = {}
    for name in names or list(CHECKLISTS):
        items = []
        for title, rule in CHECKLISTS[name]:
            found = rule(entries) if rule is not None else None
            marked = manual.get((name, title)) or manual.get((None, title))
            if found and not found.get("open"):
                done_by = found["entry"]
                items.append({"item": title, "status": "done", "by": _describe(done_by), "seq": done_by["seq"]})
            elif found and not marked:
                items.append({"item": title, "status": "pending", "by": "%s: %s" % (
                    _describe(found["entry"]), found["open"]), "seq": found["entry"]["seq"]})
            elif marked:
                items.append({"item": title, "status": "marked", "by": marked.get("note") or "marked by hand",
                              "seq": marked["seq"]})
            else:
                items.append({"item": title, "status": "pending", "by": None, "seq": None})
        result[name] = items
    return result


def _describe(entry: Dict[str, Any]) -> str:
    if entry.get("kind") == "note":
        return "note #%d: %s" % (entry["seq"], entry.get("text", "")[:60])
    outputs = [o for o in entry.get("outputs") or [] if o.get("sha256")]
    first = outputs[0] if outputs else None
    return "#%d `%s`%s" % (entry["seq"], entry.get("command_name"), " -> %s (sha256 %s)" % (
        first["path"].rsplit("/", 1)[-1], first["sha256"][:16]) if first else "")


def find_item(title: str) -> Optional[str]:
    """The checklist an item belongs to (the first one that has it)."""
    lowered = title.lower()
    for name, items in CHECKLISTS.items():
        if any(t.lower() == lowered for t, _ in items):
            return name
    return None
