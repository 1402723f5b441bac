"""`bookgen-kit harden check` and `harden plan`: audit the host (or an image via --root) and show exact changes."""
from __future__ import annotations

import click

from toolkit.cli.common import deployment_options
from toolkit.cli.output import current_output, json_option


def _context(root, deployment, allow_ports, packages_dir=None):
    import os

    from toolkit.errors import BadInputError
    from toolkit.hardening.base import HardenContext

    if not os.path.isdir(root):
        raise BadInputError("--root %s is not a directory: there is no system there to audit" % root)

    return HardenContext(root=root, deployment=deployment, allowed_ports=list(allow_ports) or [22, 80, 443],
                         packages_dir=packages_dir)


@click.group("harden")
def harden_group() -> None:
    """Audit the host's hardening and show the exact changes that would fix it."""


@harden_group.command("check")
@click.option("--root", default="/", show_default=True, help="Audit this tree as / (a mounted image).")
@click.option("--only", multiple=True, metavar="ID")
@click.option("--allow-port", "allow_ports", multiple=True, type=int, help="Ports to allow in (default 22 80 443).")
@deployment_options
@json_option
def check_command(root, only, allow_ports, deployment) -> None:
    """Every check with its result, the evidence behind it, and a hardening index (0-100)."""
    from toolkit.hardening.checks import hardening_index, select

    ctx = _context(root, deployment, allow_ports)
    results = [check.check(ctx) for check in select(list(only))]
    index = hardening_index(results)
    out = current_output()
    out.remember({"root": root, "index": index, "checks": [
            {"id": r.id, "title": r.title, "why": r.why, "weight": r.weight, "status": r.status,
             "findings": [f.__dict__ for f in r.findings], "seen": r.seen} for r in results]})
    if out.json:
        out.emit_json(out.document)
        return
    from rich.table import Table

    table = Table(title="hardening of %s: index %d/100" % (root, index), title_justify="left")
    for column in ("check", "result", "evidence"):
        table.add_column(column, overflow="fold")
    for r in results:
        color = {"pass": "green", "fail": "red"}.get(r.status, "dim")
        table.add_row(r.id, "[%s]%s[/%s]" % (color, r.status, color),
                      "\n".join(f.evidence for f in r.findings) or "; ".join(r.seen))
    out.console.print(table)


@harden_group.command("plan")
@click.option("--root", default="/", show_default=True)
@click.option("--only", multiple=True, metavar="ID")
@click.option("--allow-port", "allow_ports", multiple=True, type=int)
@deployment_options
@json_option
def plan_command(root, only, allow_ports, deployment) -> None:
    """The exact file diffs and commands that would bring each failing check to pass."""
    from toolkit.hardening.checks import select

    ctx = _context(root, deployment, allow_ports)
    plans = [{"id": check.id, "changes": [c.to_dict() for c in check.plan(ctx)]} for check in select(list(only))]
    out = current_output()
    out.remember({"root": root, "plans": plans})
    if out.json:
        out.emit_json(out.document)
        return
    for plan in plans:
        if not plan["changes"]:
            continue
        out.console.print("[bold]%s[/bold]" % plan["id"])
        for change in plan["changes"]:
            click.echo("# " + change["description"])
            click.echo(change["diff"])


@harden_group.command("apply")
@click.option("--root", default="/", show_default=True)
@click.option("--only", multiple=True, metavar="ID")
@click.option("--allow-port", "allow_ports", multiple=True, type=int)
@click.option("--confirm-within", default=300, show_default=True,
              help="Seconds to run `harden confirm` before the old sshd_config comes back by itself.")
@click.option("--packages", "packages_dir", metavar="DIR",
              help="Debian .deb files (on the medium) to install a missing ufw, fail2ban or auditd from.")
@click.option("--yes", is_flag=True)
@deployment_options
@json_option
def apply_command(root, only, allow_ports, confirm_within, packages_dir, yes, deployment) -> None:
    """Write an undo bundle, then apply each plan, validated; a failing check is rolled back and apply stops."""
    import sys

    from toolkit.errors import UsageError
    from toolkit.hardening.apply import apply
    from toolkit.hardening.checks import select

    if not yes:
        if not sys.stdin.isatty():
            raise UsageError("apply changes the host and no terminal can confirm it", hint="add --yes")
        click.confirm("Apply the hardening plan to %s?" % root, abort=True, err=True)
    result = apply(_context(root, deployment, allow_ports, packages_dir), select(list(only)), confirm_within)
    out = current_output()
    out.remember(result)
    if out.json:
        out.emit_json(out.document)
        return
    for item in result["applied"]:
        click.echo("applied %s (%d changes)" % (item["check"], len(item["changes"])))
    click.echo("undo bundle: %s" % result["bundle"])
    if result.get("watchdog"):
        click.echo(result["watchdog"]["note"])


@harden_group.command("confirm")
@click.argument("bundle", required=False)
@click.option("--root", default="/", show_default=True)
@deployment_options
@json_option
def confirm_command(bundle, root, deployment) -> None:
    """Keep the new sshd_config: stop the dead-man switch."""
    from toolkit.hardening.apply import confirm

    result = confirm(_context(root, deployment, ()), bundle)
    out = current_output()
    out.remember(result)
    if out.json:
        out.emit_json(out.document)
    else:
        click.echo("confirmed: %s" % result["bundle"])


@harden_group.command("rollback")
@click.argument("bundle", required=False)
@click.option("--root", default="/", show_default=True)
@deployment_options
@json_option
def rollback_command(bundle, root, deployment) -> None:
    """Restore every file of an undo bundle (default: the newest) byte for byte, and reload."""
    from toolkit.hardening.apply import rollback

    result = rollback(_context(root, deployment, ()), bundle)
    out = current_output()
    out.remember(result)
    if out.json:
        out.emit_json(out.document)
    else:
        click.echo("restored %d files from %s" % (len(result["restored"]), result["bundle"]))
