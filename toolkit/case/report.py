"""The post-incident report, from the journal alone: Markdown, or one self-contained HTML file that prints well."""
from __future__ import annotations

import html
import os
from typing import Any, Dict

from toolkit import utc
from toolkit.case import checklists, journal

UNDO = {
    "restore": "the previous database is kept as {old}: `bookgen-kit db drop-old {old} --yes` once the restore is "
               "accepted; to go back, restore the emergency backup",
    "rotate run": "before finish `bookgen-kit rotate rollback`; after it, the previous .env is kept beside the "
                  "current one (.env.previous-UTC) and the old credentials are burned: rotate again instead",
    "harden apply": "`bookgen-kit harden rollback {bundle}`",
    "contain apply": "`bookgen-kit contain release`",
    "jobs reset": "the jobs stay failed; they can be queued again from BookGen",
    "cleanup": "deleted files come back only from the --archive-to archive: `tar --zstd -xf ARCHIVE -C /`",
    "db repair": "the emergency backup taken first: `bookgen-kit restore SET`",
}


def _command_entries(entries):
    return [e for e in entries if e.get("kind") == "command"]


def gather(directory: str) -> Dict[str, Any]:
    from toolkit.errors import KitError
    from toolkit.evidence import custody

    case = journal.load_case(directory)
    entries = journal.verify(directory)
    commands = _command_entries(entries)
    evidence = []
    for entry in commands:
        if entry.get("command_name") != "capture":
            continue
        for output in entry.get("outputs", []):
            if output["path"].endswith((".tar.zst.age", ".tar.gz.age", ".tar.age", ".tar.zst", ".tar.gz", ".tar")):
                status = "no custody log"
                custody_path = output["path"] + ".custody.jsonl"
                if os.path.exists(custody_path):
                    try:
                        chain = custody.verify_chain(custody_path, output["sha256"])
                        status = "intact, %d entries (last: %s by %s)" % (len(chain), chain[-1]["action"],
                                                                          chain[-1]["actor"])
                    except KitError as error:
                        status = "BROKEN: %s" % error.message
                evidence.append({"path": output["path"], "sha256": output["sha256"], "size": output["size"],
                                 "custody": status, "seq": entry["seq"],
                                 "degraded": (entry.get("changes") or {}).get("degraded") or []})
    changes = []
    taken_back = checklists.undone(entries)
    for entry in commands:
        name = entry.get("command_name") or ""
        key = next((k for k in UNDO if name == k or name.startswith(k + " ")), None)
        if key is None or entry.get("exit_code") not in (0, 6):
            continue
        found = entry.get("changes", {})
        bundle = found.get("bundle") or "BUNDLE"
        undo = UNDO[key].format(old=found.get("old_database") or "<db>_pre_restore_<UTC>", bundle=bundle)
        by = taken_back.get(entry["seq"])
        changes.append({"seq": entry["seq"], "command": " ".join(entry.get("argv", [])), "what": found,
                        "in_force": by is None,
                        "undo": undo if by is None else "undone by #%d `%s` at %s" % (
                            by["seq"], " ".join(by.get("argv", [])), by.get("ended") or by.get("time"))})
    incidents = []
    for entry in commands:
        for name in (entry.get("changes") or {}).get("incidents", []):
            incidents.append({"name": name, "seq": entry["seq"], "time": entry["time"]})
    manual = {(e.get("item")) for e in entries if e.get("kind") == "check"}
    post = {phase: [{"item": item, "done": item in manual} for item in items]
            for phase, items in checklists.POST_INCIDENT.items()}
    from toolkit.case import analysis

    grouped = analysis.grouped_findings(entries)
    return {"case": case, "entries": entries, "commands": commands, "evidence": evidence, "changes": changes,
            "findings": grouped, "incidents": incidents, "checklists": checklists.status(entries),
            "post_incident": post, "generated": utc.iso(), "state": analysis.host_state(entries),
            "gaps": analysis.capture_gaps(entries), "tree": analysis.process_tree(grouped),
            "indicators": analysis.indicators(grouped), "timeline": analysis.timeline(entries, grouped)}


def _entry_text(entry: Dict[str, Any]) -> str:
    kind = entry.get("kind")
    if kind == "command":
        outputs = ", ".join("%s (%s)" % (o["path"].rsplit("/", 1)[-1], "sha256 %s" % o["sha256"][:16] if
                                         o.get("sha256") else o.get("kind", "file"))
                            for o in entry.get("outputs", []))
        return "`%s` exit %s%s" % (" ".join(entry.get("argv", [])), entry.get("exit_code"),
                                   " -> " + outputs if outputs else "")
    if kind == "note":
        return "note: %s" % entry.get("text", "")
    if kind == "check":
        return "checked by hand: %s (%s)" % (entry.get("item"), entry.get("note") or "")
    return kind or "?"


def _tree_lines(nodes, depth: int = 0):
    lines = []
    for node in nodes:
        label = "%s %s (pid %d%s)" % ("**" if node["findings"] else "", node.get("name") or "?", node["pid"],
                                      ", %s" % node["exe"] if node.get("exe") else "")
        if node["findings"]:
            label += "**: " + "; ".join(node["findings"])
        boundary = " [container %s]" % node["container"] if node.get("boundary") and node.get("container") else (
            " [host]" if node.get("boundary") else "")
        lines.append("%s- %s%s" % ("  " * depth, label.strip(), boundary))
        lines += _tree_lines(node["children"], depth + 1)
    return lines


def markdown(data: Dict[str, Any]) -> str:
    case = data["case"]
    lines = ["# Incident report: %s" % case["id"], "", "%s" % case["title"], "",
             "## Summary", "",
             "- Case: %s, examiner %s, opened %s%s" % (case["id"], case["examiner"], case["opened"],
                                                       ", closed %s" % case["closed"] if case.get("closed") else ""),
             "- Journal: %d entries, chain intact; %d commands, %d notes" % (
                 len(data["entries"]), len(data["commands"]),
                 sum(1 for e in data["entries"] if e.get("kind") == "note")),
             "- Incidents seen by triage: %s" % (", ".join(sorted({i["name"] for i in data["incidents"]})) or "none"),
             "- Evidence bundles: %d; findings: %d; changes to the host: %d" % (
                 len(data["evidence"]), len(data["findings"]), len(data["changes"])),
             "", "## State of the host, as bookgen-kit's commands left it", ""]
    lines += ["- %s: %s%s" % (x["what"], x["state"], " (#%d)" % x["since"] if x["since"] else "") for x in data["state"]]
    lines += ["", "## Collection gaps", ""]
    for gap in data["gaps"]:
        lines.append("- #%d %s: %s" % (gap["seq"], (gap["bundle"] or "?").rsplit("/", 1)[-1],
                                        "; ".join(gap["gaps"]) if gap["gaps"] else "complete"))
    if not data["gaps"]:
        lines.append("- no capture")
    lines += ["", "## Timeline", ""]
    for entry in data["entries"]:
        lines.append("- %s #%d %s: %s" % (entry["time"], entry["seq"], entry.get("login") or entry.get("uid"),
                                          _entry_text(entry)))
    lines += ["", "## Evidence inventory", ""]
    lines += ["- %s  \n  sha256 `%s`, %d bytes, custody: %s%s" % (
        e["path"], e["sha256"], e["size"], e["custody"],
        "".join("  \n  **degraded:** %s" % line for line in e.get("degraded") or []))
        for e in data["evidence"]] or ["- none"]
    lines += ["", "## Changes made to the host, and how to undo each", ""]
    lines += ["- #%d `%s`%s: %s  \n  %s: %s" % (c["seq"], c["command"], "" if c["in_force"] else " (undone)", ", ".join(
        "%s=%s" % (k, v) for k, v in sorted(c["what"].items()) if k not in ("findings",))[:400],
        "undo" if c["in_force"] else "no longer in force", c["undo"])
        for c in data["changes"]] or ["- none"]
    lines += ["", "## Findings, by where they are (each once, with the captures that saw it)", ""]
    place = None
    for f in data["findings"]:
        if f["place"] != place:
            place = f["place"]
            lines += ["", "### On %s" % place, ""]
        lines.append("- [%s] %s  \n  evidence: %s; seen by %s" % (
            f["severity"], f["title"], ", ".join("`%s`" % e for e in f.get("evidence") or []) or "-",
            ", ".join("#%d %s" % (s["seq"], (s["bundle"] or "").rsplit("/", 1)[-1]) for s in f["seen_by"])))
    if not data["findings"]:
        lines.append("- none")
    lines += ["", "## Process tree of the suspicious processes", ""]
    lines += _tree_lines(data["tree"]) or ["- none"]
    plotted = data["timeline"]
    lines += ["", "## Timeline of the captured filesystem", ""]
    if plotted and plotted["svg"]:
        lines += ["Capture #%d's walk; the plot is in the HTML report. The suspicious processes started:" %
                  plotted["seq"], ""]
        lines += ["%d. %s %s" % (m["number"], utc.iso(m["time"]), m["label"]) for m in plotted["marks"]] or ["- -"]
        lines += ["", "Notable events%s:" % (" near those starts" if plotted["near"] else " (the latest changes)"), ""]
        lines += ["- %s `%s`" % (utc.iso(max(c["mtime"], c["ctime"])), c["path"]) for c in plotted["events"]] or \
            ["- none"]
    else:
        lines.append("No capture walked the filesystem (the timeline collector did not run).")
    lines += ["", "## Indicators", "", "| type | value | context | finding |", "|---|---|---|---|"]
    lines += ["| %s | `%s` | %s | %s |" % (i["type"], i["value"], i["context"], i["finding"].replace("|", "/"))
              for i in data["indicators"]] or ["| - | - | - | - |"]
    lines += ["", "Also as CSV and as a STIX 2.1 bundle beside this report (SSH key fingerprints: CSV only)."]
    lines += ["", "## Checklists", ""]
    for name, items in data["checklists"].items():
        lines += ["### %s" % checklists.TITLES[name], ""]
        lines += ["- [%s] %s%s" % ("x" if i["status"] != "pending" else " ", i["item"],
                                   " (%s)" % i["by"] if i["by"] else "") for i in items]
        lines.append("")
    lines += ["## Post-incident procedures still open", ""]
    for phase, items in data["post_incident"].items():
        lines += ["### %s" % phase, ""] + ["- [%s] %s" % ("x" if i["done"] else " ", i["item"]) for i in items] + [""]
    lines.append("Generated %s by bookgen-kit from the case journal." % data["generated"])
    return "\n".join(lines) + "\n"


CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:2em auto;max-width:60em;color:#111;
line-height:1.4}
h1{font-size:1.7em;border-bottom:3px solid #222;padding-bottom:.2em}h2{font-size:1.25em;margin-top:1.6em;
border-bottom:1px solid #999}h3{font-size:1.05em}table{border-collapse:collapse;width:100%;font-size:.85em}
td,th{border:1px solid #bbb;padding:.25em .4em;vertical-align:top;text-align:left}th{background:#eee}
code{font-family:Menlo,Consolas,monospace;font-size:.9em;word-break:break-all}.done{color:#070}.pending{color:#a00}
.sev-critical,.sev-high{color:#a00;font-weight:bold}
ul.tree{list-style:none;padding-left:1.2em;border-left:1px dotted #999}ul.tree li{margin:.2em 0}
.boundary{background:#225;color:#fff;padding:0 .4em;border-radius:.2em;font-size:.8em}.pid{color:#555}@media print{body{margin:0;max-width:none}h2{page-break-after:avoid}
tr{page-break-inside:avoid}}
"""


def _e(text: Any) -> str:
    return html.escape(str(text))


def _tree_html(nodes) -> str:
    items = []
    for node in nodes:
        label = "%s <span class=\"pid\">pid %d</span>%s" % (_e(node.get("name") or "?"), node["pid"], (
            " <code>%s</code>" % _e(node["exe"])) if node.get("exe") else "")
        if node.get("boundary"):
            label = "<span class=\"boundary\">%s</span> %s" % (
                _e("container %s" % node["container"] if node.get("container") else "host"), label)
        if node["findings"]:
            label = "<strong class=\"sev-high\">%s</strong><br><small>%s</small>" % (
                label, _e("; ".join(node["findings"])))
        items.append("<li>%s%s</li>" % (label, _tree_html(node["children"]) if node["children"] else ""))
    return "<ul class=\"tree\">%s</ul>" % "".join(items)


def html_report(data: Dict[str, Any]) -> str:
    """Sections in the order a lead acts on them: what is true now, what was found and where, then the record."""
    case = data["case"]
    head = ["<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
            "<title>Incident report: %s</title><style>%s</style></head><body>" % (_e(case["id"]), CSS),
            "<h1>Incident report: %s</h1><p>%s</p>" % (_e(case["id"]), _e(case["title"])),
            "<h2>Summary</h2><table><tr><th>Case</th><td>%s</td></tr><tr><th>Examiner</th><td>%s</td></tr>"
            "<tr><th>Opened</th><td>%s</td></tr><tr><th>Closed</th><td>%s</td></tr>"
            "<tr><th>Journal</th><td>%d entries, chain intact</td></tr><tr><th>Incidents seen</th><td>%s</td></tr>"
            "<tr><th>Evidence / findings / changes</th><td>%d / %d / %d</td></tr></table>" % (
                _e(case["id"]), _e(case["examiner"]), _e(case["opened"]), _e(case.get("closed") or "open"),
                len(data["entries"]), _e(", ".join(sorted({i["name"] for i in data["incidents"]})) or "none"),
                len(data["evidence"]), len(data["findings"]), len(data["changes"]))]
    state = ["<h2>State of the host, as bookgen-kit's commands left it</h2><table>"]
    state += ["<tr><th>%s</th><td>%s%s</td></tr>" % (_e(x["what"]), _e(x["state"]), " (#%d)" % x["since"]
                                                    if x["since"] else "") for x in data["state"]]
    state.append("</table>")
    findings = ["<h2>Findings, by where they are</h2><table><tr><th>where</th><th>severity</th><th>finding</th>"
                "<th>evidence</th><th>seen by</th></tr>"]
    findings += ["<tr><td>%s</td><td class=\"sev-%s\">%s</td><td>%s</td><td>%s</td><td>%s</td></tr>" % (
        _e(f["place"]), _e(f["severity"]), _e(f["severity"]), _e(f["title"]),
        "<br>".join("<code>%s</code>" % _e(e) for e in f.get("evidence") or []),
        "<br>".join("#%d %s" % (s["seq"], _e((s["bundle"] or "").rsplit("/", 1)[-1])) for s in f["seen_by"]))
        for f in data["findings"]] or ["<tr><td colspan=5>none</td></tr>"]
    findings.append("</table>")
    tree = ["<h2>Process tree of the suspicious processes</h2>",
            _tree_html(data["tree"]) if data["tree"] else "<p>none</p>"]
    plotted = data["timeline"]
    walk = ["<h2>Timeline of the captured filesystem</h2>"]
    if plotted and plotted["svg"]:
        walk.append("<p>File changes per hour from capture #%d's walk (its bodyfile is in the bundle, for mactime "
                    "and plaso).</p>%s" % (plotted["seq"], plotted["svg"]))
        walk += ["<ol>"] + ["<li>%s %s</li>" % (_e(utc.iso(m["time"])), _e(m["label"])) for m in plotted["marks"]] + \
            ["</ol>"]
        walk.append("<h3>Notable events%s</h3><table><tr><th>changed (UTC)</th><th>path</th></tr>" % (
            " near the suspicious processes' starts" if plotted["near"] else ": the latest changes under /etc and "
                                                                             "the app"))
        walk += ["<tr><td>%s</td><td><code>%s</code></td></tr>" % (
            _e(utc.iso(max(c["mtime"], c["ctime"]))), _e(c["path"])) for c in plotted["events"]] or \
            ["<tr><td colspan=2>none</td></tr>"]
        walk.append("</table>")
    else:
        walk.append("<p>No capture walked the filesystem (the timeline collector did not run).</p>")
    found = ["<h2>Indicators</h2><p>Also as CSV and as a STIX 2.1 bundle beside this report (SSH key fingerprints: "
             "CSV only).</p><table><tr><th>type</th><th>value</th><th>context</th><th>finding</th></tr>"]
    found += ["<tr><td>%s</td><td><code>%s</code></td><td>%s</td><td>%s</td></tr>" % (
        _e(i["type"]), _e(i["value"]), _e(i["context"]), _e(i["finding"])) for i in data["indicators"]] or \
        ["<tr><td colspan=4>none</td></tr>"]
    found.append("</table>")
    gaps = ["<h2>Collection gaps</h2><table><tr><th>#</th><th>bundle</th><th>what it could not do</th></tr>"]
    gaps += ["<tr><td>%d</td><td><code>%s</code></td><td>%s</td></tr>" % (
        g["seq"], _e((g["bundle"] or "?").rsplit("/", 1)[-1]), "<br>".join(_e(x) for x in g["gaps"]) or "complete")
        for g in data["gaps"]] or ["<tr><td colspan=3>no capture</td></tr>"]
    gaps.append("</table>")
    changes = ["<h2>Changes made to the host</h2><table><tr><th>#</th><th>command</th><th>in force</th>"
               "<th>how to undo</th></tr>"]
    changes += ["<tr><td>%d</td><td><code>%s</code></td><td>%s</td><td>%s</td></tr>" % (
        c["seq"], _e(c["command"]), "yes" if c["in_force"] else "no (undone)", _e(c["undo"]))
        for c in data["changes"]] or ["<tr><td colspan=4>none</td></tr>"]
    changes.append("</table>")
    checks = ["<h2>Checklists</h2>"]
    for name, items in data["checklists"].items():
        checks.append("<h3>%s</h3><table><tr><th>item</th><th>status</th><th>by</th></tr>" %
                      _e(checklists.TITLES[name]))
        checks += ["<tr><td>%s</td><td class=\"%s\">%s</td><td>%s</td></tr>" % (
            _e(i["item"]), "pending" if i["status"] == "pending" else "done", _e(i["status"]), _e(i["by"] or ""))
            for i in items]
        checks.append("</table>")
    evidence = ["<h2>Evidence inventory</h2><table><tr><th>bundle</th><th>sha256</th><th>bytes</th><th>custody</th>"
                "</tr>"]
    evidence += ["<tr><td><code>%s</code></td><td><code>%s</code></td><td>%d</td><td>%s%s</td></tr>" % (
        _e(e["path"]), _e(e["sha256"]), e["size"], _e(e["custody"]),
        "".join("<br><strong>degraded:</strong> %s" % _e(line) for line in e.get("degraded") or []))
        for e in data["evidence"]] or ["<tr><td colspan=4>none</td></tr>"]
    evidence.append("</table>")
    timeline = ["<h2>Timeline</h2><table><tr><th>#</th><th>time (UTC)</th><th>who</th><th>what</th></tr>"]
    timeline += ["<tr><td>%d</td><td>%s</td><td>%s</td><td>%s</td></tr>" % (
        e["seq"], _e(e["time"]), _e(e.get("login") or e.get("uid")), _e(_entry_text(e))) for e in data["entries"]]
    timeline.append("</table>")
    post = ["<h2>Post-incident procedures still open</h2>"]
    for phase, items in data["post_incident"].items():
        post.append("<h3>%s</h3><ul>%s</ul>" % (_e(phase), "".join(
            "<li>%s %s</li>" % ("&#9745;" if i["done"] else "&#9744;", _e(i["item"])) for i in items)))
    tail = ["<p><small>Generated %s by bookgen-kit from the case journal.</small></p></body></html>" %
            _e(data["generated"])]
    out = head + state + findings + tree + walk + found + gaps + changes + checks + evidence + timeline + post + tail
    return "\n".join(out) + "\n"


def write_report(directory: str, fmt: str) -> Dict[str, Any]:
    from toolkit.host.atomic import AtomicFile

    from toolkit.case import indicators

    data = gather(directory)
    stamp = utc.stamp()
    files = {"report": ("report-%s.%s" % (stamp, fmt), markdown(data) if fmt == "md" else html_report(data)),
             "indicators_csv": ("indicators-%s.csv" % stamp, indicators.csv_text(data["indicators"])),
             "indicators_stix": ("indicators-%s.stix.json" % stamp, indicators.stix_text(
                 data["indicators"], data["case"]["id"], data["generated"]))}
    written = {}
    for key, (name, text) in files.items():
        path = os.path.join(directory, "reports", name)
        with AtomicFile(path, 0o644, overwrite=True) as out:
            out.write(text.encode("utf-8"))
            out.commit()
        written[key] = path
    return dict(written, format=fmt, entries=len(data["entries"]), evidence=len(data["evidence"]),
                changes=len(data["changes"]), findings=len(data["findings"]), indicators=len(data["indicators"]))
