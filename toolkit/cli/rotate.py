"""`bookgen-kit rotate plan|run|resume|rollback|status`: credentials after a breach."""
from __future__ import annotations

import sys

import click

from toolkit.cli.common import deployment_options
from toolkit.cli.output import current_output, json_option
from toolkit.errors import UsageError


def rotation_options(function):
    function = click.option("--admin-dsn", metavar="DSN",
                            help="Admin connection for ALTER ROLE (password from PGPASSWORD).")(function)
    function = click.option("--container", "db_container", metavar="NAME",
                            help="Change the role's password via psql as postgres in this container.")(function)
    return function


def _options(deployment, only=(), db_container=None, admin_dsn=None):
    from toolkit.secrets.rotation import RotationOptions

    return RotationOptions(env_file=deployment.env_path, app_dir=deployment.app_dir, only=list(only),
                           db_container=db_container, admin_dsn=admin_dsn,
                           compose_project=deployment.compose_project)


def _render(document) -> None:
    out = current_output()
    out.remember(document)
    if out.json:
        out.emit_json(out.document)
        return
    from rich.table import Table

    table = Table(title="rotation %s: %s" % (document["id"], document["state"]), title_justify="left")
    for column in ("secret", "state", "old", "new", "how"):
        table.add_column(column, overflow="fold")
    for name, entry in document["secrets"].items():
        table.add_row(name, entry["state"], entry["old_fingerprint"], entry["new_fingerprint"], entry["method"] or "")
    out.console.print(table)
    for name, entry in document["secrets"].items():
        if entry.get("warning"):
            out.console.print("[yellow]note[/yellow] %s: %s" % (name, entry["warning"]))
    for item in document.get("revoke_at_provider") or []:  # last, so that they are the last thing read
        out.console.print("[yellow]not rotated[/yellow] %s (fingerprint %s): revoke it at its provider" % (
            item["name"], item["fingerprint"]))
    if document.get("revoke_at_provider"):
        out.console.print(document["provider_note"])


@click.group("rotate")
def rotate_group() -> None:
    """Rotate the .env's secrets on the live services: create, set, test, finish; journaled."""


@rotate_group.command("plan")
@click.option("--only", multiple=True, metavar="NAME")
@deployment_options
@json_option
def plan_command(only, deployment) -> None:
    """What would change, with fingerprints (never values)."""
    from toolkit.secrets.rotation import plan

    document = plan(_options(deployment, only))
    out = current_output()
    out.remember(document)
    if out.json:
        out.emit_json(out.document)
        return
    for item in document["rotate"]:
        click.echo("rotate %-18s on %s (keys %s; current %s)%s" % (
            item["name"], item["service"], ", ".join(item["keys"]), item["current_fingerprint"],
            "; note: " + item["warning"] if item["warning"] else ""))
    for item in document["revoke_at_provider"]:
        click.echo("revoke at the provider: %s (fingerprint %s)" % (item["name"], item["fingerprint"]))
    if document["revoke_at_provider"]:
        click.echo(document["note"])


@rotate_group.command("run")
@click.option("--only", multiple=True, metavar="NAME", help="DATABASE_PASSWORD, REDIS_PASSWORD, SECRET_KEY.")
@click.option("--yes", is_flag=True)
@click.option("--recreate", is_flag=True, help="Afterwards, recreate api and worker so they read the new .env.")
@rotation_options
@deployment_options
@json_option
def run_command(only, yes, recreate, db_container, admin_dsn, deployment) -> None:
    """Rotate now."""
    from toolkit.secrets.rotation import recreate_command, outcome_notes, run

    if not yes:
        if not sys.stdin.isatty():
            raise UsageError("rotation changes live credentials and no terminal can confirm it", hint="add --yes")
        click.confirm("Rotate the secrets of %s on the live services?" % deployment.env_path, abort=True, err=True)
    options = _options(deployment, only, db_container, admin_dsn)
    document = dict(run(options), **outcome_notes(options))
    document["recreate"] = recreate_command(deployment.app_dir) if recreate else {
        "ran": False, "note": "containers read the .env only when created: recreate api and worker "
                              "(`--recreate`, or docker compose up -d --force-recreate api worker); a restart is "
                              "not enough"}
    _render(document)
    out = current_output()
    if not out.json:
        click.echo(document["recreate"].get("note") or "recreated: %s" % document["recreate"]["command"])


@rotate_group.command("resume")
@rotation_options
@deployment_options
@json_option
def resume_command(db_container, admin_dsn, deployment) -> None:
    """Continue an interrupted rotation from its recorded state."""
    from toolkit.secrets.rotation import outcome_notes, resume

    options = _options(deployment, (), db_container, admin_dsn)
    _render(dict(resume(options), **outcome_notes(options)))


@rotate_group.command("rollback")
@rotation_options
@deployment_options
@json_option
def rollback_command(db_container, admin_dsn, deployment) -> None:
    """Before finish: put the old values back on the services and drop .env.pending."""
    from toolkit.secrets.rotation import outcome_notes, rollback

    options = _options(deployment, (), db_container, admin_dsn)
    _render(dict(rollback(options), **outcome_notes(options)))


@rotate_group.command("status")
@deployment_options
@json_option
def status_command(deployment) -> None:
    """The rotation journal."""
    from toolkit.secrets.rotation import Journal

    runs = Journal(deployment.app_dir).runs()
    out = current_output()
    out.remember({"runs": runs})
    if out.json:
        out.emit_json(out.document)
        return
    if not runs:
        click.echo("no rotations recorded")
    for document in runs:
        _render(document)
