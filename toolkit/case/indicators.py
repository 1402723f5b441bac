"""The case's indicators as files other tools read: CSV, and a STIX 2.1 bundle of `indicator` objects.

Invariants: ids are uuid5 of the indicator (the same indicator has the same id in every report); patterns
are STIX patterning with string literals escaped as the grammar says (backslash, quote); an indicator STIX has
no standard object for (an SSH key fingerprint) stays in the CSV only (the report says so).
"""
from __future__ import annotations

import csv
import io
import json
import posixpath
import uuid
from typing import Any, Dict, List, Optional

NAMESPACE = uuid.UUID("5b0c6f38-3c1e-4b8e-9f6e-6b8f3f1c2a7d")  # bookgen-kit's, for uuid5 ids
COLUMNS = ("type", "value", "context", "finding", "severity")


def csv_text(rows: List[Dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    return buffer.getvalue()


def _literal(text: str) -> str:
    return "'%s'" % text.replace("\\", "\\\\").replace("'", "\\'")


def pattern(row: Dict[str, Any]) -> Optional[str]:
    value = row["value"]
    if row["type"] == "sha256":
        return "[file:hashes.'SHA-256' = %s]" % _literal(value.lower())
    if row["type"] == "path":
        directory, name = posixpath.split(value)
        return "[file:name = %s AND file:parent_directory_ref.path = %s]" % (_literal(name), _literal(directory or "/"))
    if row["type"] == "ip":
        return "[%s:value = %s]" % ("ipv6-addr" if ":" in value else "ipv4-addr", _literal(value))
    return None


def _timestamp(iso: str) -> str:
    """2026-11-27T14:03:05Z -> 2026-11-27T14:03:05.000Z (STIX's millisecond form)."""
    return iso[:-1] + ".000Z" if iso.endswith("Z") and "." not in iso else iso


def stix_bundle(rows: List[Dict[str, Any]], case_id: str, created: str) -> Dict[str, Any]:
    moment = _timestamp(created)
    identity = {"type": "identity", "spec_version": "2.1", "id": "identity--%s" % uuid.uuid5(NAMESPACE, "bookgen-kit"),
                "created": moment, "modified": moment, "name": "bookgen-kit", "identity_class": "system"}
    objects: List[Dict[str, Any]] = [identity]
    for row in rows:
        text = pattern(row)
        if text is None:  # SSH key fingerprints: in the CSV only
            continue
        objects.append({
            "type": "indicator", "spec_version": "2.1",
            "id": "indicator--%s" % uuid.uuid5(NAMESPACE, "%s:%s" % (row["type"], row["value"])),
            "created": moment, "modified": moment, "created_by_ref": identity["id"],
            "name": "%s %s" % (row["type"], row["value"])[:250], "description": "%s; finding: %s (%s); case %s" % (
                row.get("context") or "", row.get("finding") or "", row.get("severity") or "", case_id),
            "indicator_types": ["malicious-activity"] if row.get("severity") in ("critical", "high") else
            ["anomalous-activity"],
            "pattern": text, "pattern_type": "stix", "pattern_version": "2.1", "valid_from": moment,
            "labels": ["bookgen-kit", "case:%s" % case_id]})
    return {"type": "bundle", "id": "bundle--%s" % uuid.uuid5(NAMESPACE, "%s:%s" % (case_id, created)),
            "objects": objects}


def stix_text(rows: List[Dict[str, Any]], case_id: str, created: str) -> str:
    return json.dumps(stix_bundle(rows, case_id, created), indent=2, sort_keys=True) + "\n"
