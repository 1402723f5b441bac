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


Rule = Optional[Callable[[Dict[str, Any]], bool]]
CHECKLISTS: Dict[str, List[tuple]] = {
    "system-down": [
        ("Verify outage confirmed", _command("triage")), ("Check service status", _command("triage")),
        ("Notify stakeholders", None), ("Review recent changes", _command("capture")),
        ("Check system resources", _command("triage")), ("Review error logs", _command("capture")),
        ("Attempt quick restart", None), ("Full restart if needed", None),
        ("Rollback if recent deployment", _command("restore")), ("Verify recovery", None),
        ("Document incident", _command("case report")),
    ],
    "data-loss-prevention": [
        ("Stop all writes immediately", _command("contain apply")), ("Create emergency backup", _emergency_backup),
        ("Assess data integrity", _command("db check")), ("Document corruption extent", _note),
        ("Notify DBA", None), ("Attempt repair", _command("db repair")),
        ("Restore from backup if needed", _command("restore")), ("Verify data consistency", _restore_compared),
        ("Resume operations", None), ("Post-incident review", _command("case report")),
    ],
    "security-breach": [
        ("Isolate system", _command("contain apply")), ("Preserve evidence", _command("capture")),
        ("Notify security team", None), ("Document everything", _note), ("Begin investigation", None),
        ("Change all credentials", _command("rotate run", "rotate resume")),
        ("Rebuild from clean images", None), ("Restore from backup", _command("restore")),
        ("Implement additional security", _command("harden apply")), ("Monitor for reinfection", None),
        ("Notify affected users", None), ("File incident report", _command("case report")),
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
            done_by = next((e for e in entries if rule is not None and rule(e)), None)
            marked = manual.get((name, title)) or manual.get((None, title))
            if done_by:
                items.append({"item": title, "status": "done", "by": _describe(done_by), "seq": done_by["seq"]})
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
    outputs = entry.get("outputs") or []
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
