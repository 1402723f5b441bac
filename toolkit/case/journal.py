"""The case directory and its journal.jsonl: one JSON line per entry, each naming the sha256 of the line before."""
from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
from typing import Any, Dict, List, Optional

from toolkit import utc
from toolkit.host.accounts import user_name
from toolkit.errors import BadInputError, UsageError, VerificationFailed
from toolkit.host.atomic import append_state, check_state_path, read_state, state_dir, write_state

CASE_FILE = "case.json"
JOURNAL = "journal.jsonl"
POINTER = "bookgen-kit.case"  # beside the pyz, on the responder's medium: which case is current
GENESIS = "0" * 64
SUBDIRS = ("evidence", "backups", "reports")
OUTPUT_KEYS = ("payload", "manifest", "custody", "signature", "sums", "dump", "sidecar", "archive", "output",
               "emergency_backup", "bundle", "identity_file", "previous_env", "report", "indicators_csv",
               "indicators_stix")
CHANGE_KEYS = ("old_database", "restored_database", "database", "reset", "deleted", "paused", "unpaused",
               "released", "allow_ssh_from", "restored", "confirmed", "index", "healthy", "state", "bundle",
               "dropped")


def canonical(entry: Dict[str, Any]) -> bytes:
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode("utf-8")


def _pointer_path() -> Optional[str]:
    boot = sys.modules.get("_bkboot")
    archive = getattr(boot, "STATE", {}).get("archive") if boot else None
    return os.path.join(os.path.dirname(archive), POINTER) if archive else None


def current_case(option: Optional[str] = None) -> Optional[str]:
    """--case-dir, else BOOKGEN_KIT_CASE, else the pointer file beside the pyz.

    The pointer decides where every later command journals (and where capture and backup put their outputs):
    it is read as state (its directory checked, never through a symlink), so a planted one is refused.
    """
    for candidate in (option, os.environ.get("BOOKGEN_KIT_CASE")):
        if candidate:
            if not os.path.exists(os.path.join(candidate, CASE_FILE)):
                raise BadInputError("no case at %s (no %s)" % (candidate, CASE_FILE))
            return os.path.abspath(candidate)
    pointer = _pointer_path()
    data = read_state(pointer, limit=4096, strict=True) if pointer else None
    if data is not None:
        directory = data.decode("utf-8", "replace").strip()
        if os.path.isabs(directory) and os.path.exists(os.path.join(directory, CASE_FILE)):
            return directory
    return None


def login() -> Dict[str, Any]:
    """Who acts: our uid and its passwd name, read ourselves (no name-service lookup: that would change the
    atime of the host's /etc/passwd, which the capture records)."""
    return {"uid": os.getuid(), "login": user_name(os.getuid())}


def open_case(case_id: str, directory: str, title: Optional[str], examiner: Optional[str],
              allow_host_disk: bool = False) -> Dict[str, Any]:
    directory = os.path.abspath(directory)
    if os.path.exists(os.path.join(directory, CASE_FILE)):
        raise UsageError("%s already holds a case" % directory)
    existing = directory
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not allow_host_disk and os.stat(existing).st_dev == os.stat("/").st_dev:
        raise UsageError("%s is on the host's own disk: a case belongs on the responder's medium" % directory,
                         hint="give a directory on the USB stick, or --allow-host-disk")
    # every place this writes is checked before anything is made: a refusal leaves no half-opened case
    pointer = _pointer_path()
    if pointer and not os.access(os.path.dirname(pointer), os.W_OK):
        pointer = None  # a read-only medium: the responder exports BOOKGEN_KIT_CASE instead
    if pointer:
        check_state_path(pointer)
    if os.path.lexists(directory):
        state_dir(directory)
        check_state_path(os.path.join(directory, CASE_FILE))
        check_state_path(os.path.join(directory, JOURNAL))
    state_dir(directory, create=True)
    for name in SUBDIRS:
        state_dir(os.path.join(directory, name), create=True)
    case = {"id": case_id, "title": title or case_id, "examiner": examiner or login()["login"],
            "opened": utc.iso(), "host": socket.gethostname(),
            "directory": directory, "closed": None}
    save_case(directory, case)
    pointer_written = None
    if pointer:
        write_state(pointer, (directory + "\n").encode("utf-8"), 0o644)
        pointer_written = pointer
    append(directory, {"kind": "case-open", "case_id": case_id, "title": case["title"],
                       "examiner": case["examiner"]})
    return dict(case, pointer=pointer_written)


def save_case(directory: str, case: Dict[str, Any]) -> None:
    """case.json, written as state (its directory checked, never through a symlink, atomically)."""
    write_state(os.path.join(directory, CASE_FILE), json.dumps(case, indent=2, sort_keys=True).encode("utf-8"),
                0o644)


def load_case(directory: str) -> Dict[str, Any]:
    path = os.path.join(directory, CASE_FILE)
    data = read_state(path)
    if data is None:
        raise BadInputError("no case at %s (no %s)" % (directory, CASE_FILE))
    try:
        return json.loads(data.decode("utf-8"))
    except ValueError:
        raise BadInputError("%s is not a case file (not JSON)" % path) from None


def _lines(directory: str) -> List[bytes]:
    data = read_state(os.path.join(directory, JOURNAL), limit=1 << 30)
    return data.splitlines() if data is not None else []


def append(directory: str, entry: Dict[str, Any], signer=None) -> Dict[str, Any]:
    """Append an entry chained to the last line (O_APPEND, fsync); signer signs the whole entry (SSHSIG)."""
    lines = _lines(directory)
    case = load_case(directory)
    if case.get("closed") and entry.get("kind") != "case-close":
        raise UsageError("case %s is closed" % case["id"])
    full = {"seq": len(lines) + 1, "prev_sha256": hashlib.sha256(lines[-1]).hexdigest() if lines else GENESIS,
            "time": utc.iso(), "host": socket.gethostname()}
    full.update(login())
    full.update(entry)
    if signer is not None:
        import io

        from toolkit.crypto import sshsig

        full["signature"] = sshsig.sign(signer, io.BytesIO(canonical(full)))
        full["signer"] = signer.public.fingerprint()
    append_state(os.path.join(directory, JOURNAL), canonical(full) + b"\n", 0o644)
    return full


def read(directory: str) -> List[Dict[str, Any]]:
    entries = []
    for number, line in enumerate(_lines(directory), 1):
        try:
            entries.append(json.loads(line))
        except ValueError:
            raise VerificationFailed("journal line %d is not JSON (altered?)" % number) from None
    return entries


def verify(directory: str) -> List[Dict[str, Any]]:
    lines = _lines(directory)
    entries = read(directory)
    for index, entry in enumerate(entries):
        expected = GENESIS if index == 0 else hashlib.sha256(lines[index - 1]).hexdigest()
        if entry.get("seq") != index + 1 or entry.get("prev_sha256") != expected:
            raise VerificationFailed("journal entry %d: the chain is broken (an entry before it was altered, "
                                     "removed or inserted)" % (index + 1))
    if entries and entries[-1].get("kind") == "case-close" and entries[-1].get("signature"):
        from toolkit.crypto import sshsig

        body = {k: v for k, v in entries[-1].items() if k not in ("signature", "signer")}
        import io

        sshsig.check_signature(entries[-1]["signature"], io.BytesIO(canonical(body)))
    return entries


SECRET_KEY_MARKS = (b"AGE-SECRET-KEY-", b"AGE-PLUGIN-", b"-----BEGIN OPENSSH PRIVATE KEY", b"-----BEGIN PRIVATE KEY",
                    b"-----BEGIN RSA PRIVATE KEY", b"-----BEGIN EC PRIVATE KEY", b"-----BEGIN ENCRYPTED PRIVATE KEY")


def _file_facts(path: str) -> Optional[Dict[str, Any]]:
    """What the journal says of a file a command produced: its size and sha256, or, for a secret key, only
    that it is one (a hash of a key is a way to confirm a guess of it, and says nothing a responder needs)."""
    from toolkit.host.hashing import sha256_path

    if not isinstance(path, str) or not os.path.isfile(path):
        return None
    try:
        with open(path, "rb") as handle:
            head = handle.read(4096)
        if any(mark in head for mark in SECRET_KEY_MARKS):
            return {"path": os.path.abspath(path), "kind": "secret key"}
        return {"path": os.path.abspath(path), "kind": "file", "size": os.path.getsize(path),
                "sha256": sha256_path(path)}
    except OSError:
        return None


def outputs_of(document: Any) -> List[Dict[str, Any]]:
    found: Dict[str, Dict[str, Any]] = {}

    def walk(value: Any, key: Optional[str] = None) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, k)
        elif isinstance(value, list):
            for item in value[:200]:
                walk(item, key)
        elif key in OUTPUT_KEYS:
            facts = _file_facts(value)
            if facts:
                found[facts["path"]] = facts

    walk(document)
    return sorted(found.values(), key=lambda f: f["path"])


def changes_of(document: Any) -> Dict[str, Any]:
    """What the command changed or decided, from its result (no secrets: results carry fingerprints only)."""
    if not isinstance(document, dict):
        return {}
    changes = {k: document[k] for k in CHANGE_KEYS if k in document}
    if isinstance(document.get("secrets"), dict):  # a rotation: fingerprints only
        changes["rotated"] = {name: {"new_fingerprint": entry.get("new_fingerprint"), "state": entry.get("state")}
                              for name, entry in document["secrets"].items()}
    if isinstance(document.get("rotatable"), list) and "secrets" in document:
        changes["rotatable"] = [str(name) for name in document["rotatable"]]
    if isinstance(document.get("revoke_at_provider"), list) and "secrets" in document:
        changes["revoke_at_provider"] = [{"name": k.get("name"), "fingerprint": k.get("fingerprint")}
                                         for k in document["revoke_at_provider"] if isinstance(k, dict)]
    if isinstance(document.get("findings"), list):
        changes["findings"] = [_finding_summary(f) for f in document["findings"][:100] if isinstance(f, dict)]
    if isinstance(document.get("timeline"), dict):  # a capture's walk: changes per hour, recent changes
        timeline = document["timeline"]
        changes["timeline"] = {"changes_per_hour": timeline.get("changes_per_hour") or {},
                               "until": timeline.get("until"), "days": timeline.get("days"),
                               "recent_changes": (timeline.get("recent_changes") or [])[:40]}
    if isinstance(document.get("collectors"), list):  # a capture: what it could not do
        changes["gaps"] = [{"collector": c.get("name"), "status": c.get("status"), "errors": c.get("errors")}
                           for c in document["collectors"] if isinstance(c, dict) and
                           (c.get("status") != "ok" or c.get("errors"))]
        changes["unread"] = [{"collector": e.get("collector"), "source": e.get("source"),
                              "reason": str(e.get("reason"))[:300]} for e in document.get("errors") or []
                             if isinstance(e, dict) and e.get("kind") == "error"][:50]
    if isinstance(document.get("degraded"), list) and document["degraded"]:
        changes["degraded"] = [str(line)[:500] for line in document["degraded"][:20]]
    if isinstance(document.get("incidents"), list):
        changes["incidents"] = [i.get("name") for i in document["incidents"] if isinstance(i, dict)]
    if isinstance(document.get("plans"), list):
        changes["planned"] = {p["id"]: len(p.get("changes", [])) for p in document["plans"] if isinstance(p, dict)}
    return changes


FINDING_DETAILS = ("container", "container_id", "service", "image", "runtime", "pids", "names", "exe", "sha256",
                   "path_in_container", "host_path", "paths", "path", "remote", "remote_port", "port", "address",
                   "fingerprint", "fingerprints", "user", "ancestry")


def _finding_summary(finding: Dict[str, Any]) -> Dict[str, Any]:
    """A finding as the journal keeps it: enough for the report's grouping, process tree and indicators
    (the bundle itself is encrypted), bounded."""
    details = finding.get("details") if isinstance(finding.get("details"), dict) else {}
    kept = {k: details[k] for k in FINDING_DETAILS if k in details}
    for key in ("pids", "paths", "sha256", "fingerprints", "names"):
        if isinstance(kept.get(key), list):
            kept[key] = kept[key][:20]
    return {"id": finding.get("id"), "severity": finding.get("severity"), "title": finding.get("title"),
            "evidence": list(finding.get("evidence") or [])[:20], "details": kept}


def redact(argv: List[str]) -> List[str]:
    from toolkit.evidence.capture import redacted_command_line

    return redacted_command_line(argv)
