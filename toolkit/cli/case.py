"""`bookgen-kit case`: open, note, check, checklist, close, report, show, verify."""
from __future__ import annotations

import click

from toolkit import utc
from toolkit.cli.output import current_output, json_option
from toolkit.errors import UsageError


def _case_dir() -> str:
    from toolkit.case.journal import current_case

    directory = current_case(current_output().case_dir)
    if directory is None:
        raise UsageError("no current case", hint="`bookgen-kit case open --id ID --dir DIR`, or --case-dir / "
                                                 "BOOKGEN_KIT_CASE")
    return directory


@click.group("case")
def case_group() -> None:
    """The incident case: every command journaled, the runbook's checklists, the post-incident report."""


@case_group.command("open")
@click.option("--id", "case_id", required=True)
@click.option("--dir", "directory", required=True, metavar="DIR", help="On the responder's medium.")
@click.option("--title")
@click.option("--examiner")
@click.option("--allow-host-disk", is_flag=True, help="Allow a case directory on the host's own root filesystem.")
@json_option
def open_command(case_id, directory, title, examiner, allow_host_disk) -> None:
    """Create the case directory (evidence/, backups/, reports/, journal.jsonl) and make it current."""
    from toolkit.case.journal import open_case

    case = open_case(case_id, directory, title, examiner, allow_host_disk)
    out = current_output()
    out.remember(case)
    if out.json:
        out.emit_json(out.document)
        return
    click.echo("case %s opened in %s" % (case_id, case["directory"]))
    click.echo("current for later commands: %s" % ("pointer %s" % case["pointer"] if case["pointer"] else
                                                   "export BOOKGEN_KIT_CASE=%s" % case["directory"]))


@case_group.command("note")
@click.argument("text")
@json_option
def note_command(text) -> None:
    """Add a free-text entry ("14:05 notified DBA")."""
    from toolkit.case.journal import append

    entry = append(_case_dir(), {"kind": "note", "text": text})
    out = current_output()
    out.remember(entry)
    if out.json:
        out.emit_json(out.document)
    else:
        click.echo("note #%d added" % entry["seq"])


@case_group.command("check")
@click.argument("item")
@click.option("--note", default="")
@json_option
def check_command(item, note) -> None:
    """Mark a checklist item (or a post-incident procedure) as done by hand."""
    from toolkit.case.checklists import POST_INCIDENT, find_item
    from toolkit.case.journal import append

    checklist = find_item(item)
    known = checklist or any(item == i for items in POST_INCIDENT.values() for i in items)
    if not known:
        raise UsageError("no checklist item called %r" % item, hint="`bookgen-kit case checklist` lists them")
    entry = append(_case_dir(), {"kind": "check", "item": item, "checklist": checklist, "note": note})
    out = current_output()
    out.remember(entry)
    if out.json:
        out.emit_json(out.document)
    else:
        click.echo("marked #%d: %s" % (entry["seq"], item))


@case_group.command("checklist")
@click.argument("name", required=False, type=click.Choice(["system-down", "data-loss-prevention",
                                                           "security-breach"]))
@json_option
def checklist_command(name) -> None:
    """Each item: done (by which journal entry), marked by hand, or pending."""
    from toolkit.case import checklists, journal

    status = checklists.status(journal.read(_case_dir()), [name] if name else None)
    out = current_output()
    out.remember(status)
    if out.json:
        out.emit_json(out.document)
        return
    for key, items in status.items():
        out.console.print("[bold]%s[/bold]" % checklists.TITLES[key])
        for item in items:
            mark = {"done": "[green]done   [/green]", "marked": "[green]marked [/green]"}.get(item["status"],
                                                                                          "[red]pending[/red]")
            out.console.print("  %s %s%s" % (mark, item["item"], "  <- %s" % item["by"] if item["by"] else ""))


@case_group.command("close")
@click.option("--sign-key", metavar="SSHKEY", help="Sign the closing entry (SSHSIG) with this key.")
@click.option("--sign-passphrase-file", metavar="FILE")
@json_option
def close_command(sign_key, sign_passphrase_file) -> None:
    """Seal the journal with a final entry (signed with --sign-key)."""
    import hashlib

    from toolkit.case import journal

    directory = _case_dir()
    case = journal.load_case(directory)
    if case.get("closed"):
        raise UsageError("case %s is already closed" % case["id"])
    lines = journal._lines(directory)
    entry = {"kind": "case-close", "journal_sha256": hashlib.sha256(b"\n".join(lines) + b"\n").hexdigest()}
    key = None
    if sign_key:
        from toolkit.cli.prompts import passphrase_source
        from toolkit.crypto.files import load_signing_key

        key = load_signing_key(sign_key, passphrase_source(sign_passphrase_file))
    case["closed"] = utc.iso()
    journal.save_case(directory, case)
    written = journal.append(directory, entry, signer=key)
    out = current_output()
    out.remember(written)
    if out.json:
        out.emit_json(out.document)
    else:
        click.echo("case %s closed (entry #%d)%s" % (case["id"], written["seq"], ", signed" if sign_key else ""))


@case_group.command("report")
@click.option("--format", "fmt", default="md", show_default=True, type=click.Choice(["md", "html"]))
@json_option
def report_command(fmt) -> None:
    """Write the post-incident report into the case's reports/."""
    from toolkit.case.report import write_report

    result = write_report(_case_dir(), fmt)
    out = current_output()
    out.remember(result)
    if out.json:
        out.emit_json(out.document)
    else:
        click.echo("report %s (%d journal entries)" % (result["report"], result["entries"]))


@case_group.command("verify")
@json_option
def verify_command() -> None:
    """Check the journal's hash chain (and the closing signature). Exit 5 when broken."""
    from toolkit.case import journal

    entries = journal.verify(_case_dir())
    out = current_output()
    out.remember({"ok": True, "entries": len(entries)})
    if out.json:
        out.emit_json(out.document)
    else:
        click.echo("journal intact: %d entries" % len(entries))
