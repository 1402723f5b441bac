"""The case directory and its journal.jsonl: one JSON line per entry, each naming the sha256 of the line before."""
from __future__ import annotations

import getpass
import hashlib
import json
import os
import socket
import sys
import time
from typing import Any, Dict, List, Optional

from toolkit.errors import BadInputError, UsageError, VerificationFailed

CASE_FILE = "case.json"
JOURNAL = "journal.jsonl"
POINTER = "bookgen-kit.case"  # beside the pyz, on the responder's medium: which case is current
GENESIS = "0" * 64
SUBDIRS = ("evidence", "backups", "reports")
OUTPUT_KEYS = ("payload", "manifest", "custody", "signature", "sums", "dump", "sidecar", "archive", "output",
               "emergency_backup", "bundle", "identity_file", "previous_env", "report")
CHANGE_KEYS = ("old_database", "restored_database", "database", "reset", "deleted", "paused", "unpaused",
               "released", "allow_ssh_from", "restored", "confirmed", "index", "healthy", "state", "bundle")


def canonical(entry: Dict[str, Any]) -> bytes:
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode("utf-8")


def _pointer_path() -> Optional[str]:
    boot = sys.modules.get("_bkboot")
    archive = getattr(boot, "STATE", {}).get("archive") if boot else None
    return os.path.join(os.path.dirname(archive), POINTER) if archive else None


def current_case(option: Optional[str] = None) -> Optional[str]:
    """--case-dir, else BOOKGEN_KIT_CASE, else the pointer file beside the pyz."""
    for candidate in (option, os.environ.get("BOOKGEN_KIT_CASE")):
        if candidate:
            if not os.path.exists(os.path.join(candidate, CASE_FILE)):
                raise BadInputError("no case at %s (no %s)" % (candidate, CASE_FILE))
            return os.path.abspath(candidate)
    pointer = _pointer_path()
    if pointer and os.path.exists(pointer):
        with open(pointer, encoding="utf-8") as handle:
            directory = handle.read().strip()
        if os.path.exists(os.path.join(directory, CASE_FILE)):
            return directory
    return None


def login() -> Dict[str, Any]:
    try:
        name = getpass.getuser()
    except Exception:  # no passwd entry
        name = None
    return {"uid": os.getuid(), "login": name}


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
    os.makedirs(directory, exist_ok=True)
    for name in SUBDIRS:
        os.makedirs(os.path.join(directory, name), exist_ok=True)
    case = {"id": case_id, "title": title or case_id, "examiner": examiner or login()["login"],
            "opened": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host": socket.gethostname(),
            "directory": directory, "closed": None}
    with open(os.path.join(directory, CASE_FILE), "w", encoding="utf-8") as handle:
        json.dump(case, handle, indent=2, sort_keys=True)
    pointer = _pointer_path()
    pointer_written = None
    if pointer and os.access(os.path.dirname(pointer), os.W_OK):
        with open(pointer, "w", encoding="utf-8") as handle:
            handle.write(directory + "\n")
        pointer_written = pointer
    append(directory, {"kind": "case-open", "case_id": case_id, "title": case["title"],
                       "examiner": case["examiner"]})
    return dict(case, pointer=pointer_written)


def load_case(directory: str) -> Dict[str, Any]:
    with open(os.path.join(directory, CASE_FILE), encoding="utf-8") as handle:
        return json.load(handle)


def _lines(directory: str) -> List[bytes]:
    path = os.path.join(directory, JOURNAL)
    if not os.path.exists(path):
        return []
    with open(path, "rb") as handle:
        return handle.read().splitlines()


def append(directory: str, entry: Dict[str, Any], signer=None) -> Dict[str, Any]:
    """Append an entry chained to the last line (O_APPEND, fsync); signer signs the whole entry (SSHSIG)."""
    lines = _lines(directory)
    case = load_case(directory)
    if case.get("closed") and entry.get("kind") != "case-close":
        raise UsageError("case %s is closed" % case["id"])
    full = {"seq": len(lines) + 1, "prev_sha256": hashlib.sha256(lines[-1]).hexdigest() if lines else GENESIS,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host": socket.gethostname()}
    full.update(login())
    full.update(entry)
    if signer is not None:
        import io

        from toolkit.crypto import sshsig

        full["signature"] = sshsig.sign(signer, io.BytesIO(canonical(full)))
        full["signer"] = signer.public.fingerprint()
    fd = os.open(os.path.join(directory, JOURNAL), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, canonical(full) + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
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


def _file_facts(path: str) -> Optional[Dict[str, Any]]:
    from toolkit.host.hashing import sha256_path

    if not isinstance(path, str) or not os.path.isfile(path):
        return None
    try:
        return {"path": os.path.abspath(path), "size": os.path.getsize(path), "sha256": sha256_path(path)}
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
    if isinstance(document.get("findings"), list):
        changes["findings"] = [{"id": f.get("id"), "severity": f.get("severity"), "title": f.get("title")}
                               for f in document["findings"][:100] if isinstance(f, dict)]
    if isinstance(document.get("incidents"), list):
        changes["incidents"] = [i.get("name") for i in document["incidents"] if isinstance(i, dict)]
    if isinstance(document.get("plans"), list):
        changes["planned"] = {p["id"]: len(p.get("changes", [])) for p in document["plans"] if isinstance(p, dict)}
    return changes


def redact(argv: List[str]) -> List[str]:
    from toolkit.evidence.capture import redacted_command_line

    return redacted_command_line(argv)
