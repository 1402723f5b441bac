"""`bookgen-kit jobs stuck` and `jobs reset`: the runbook's Worker Crashed steps."""
from __future__ import annotations

import sys

import click

from toolkit.cli.common import database_options, deployment_options, target_factory
from toolkit.cli.output import current_output, json_option
from toolkit.errors import UsageError


@click.group("jobs")
def jobs_group() -> None:
    """Stuck jobs: 'processing' for longer than --older-than (default 1h)."""


def _jobs_table(out, jobs, title):
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for column in ("job id", "character", "status", "age"):
        table.add_column(column)
    for job in jobs:
        table.add_row(job.job_id, job.character, job.status, "%dh%02dm" % (job.age_seconds // 3600,
                                                                          job.age_seconds % 3600 // 60))
    out.console.print(table)


@jobs_group.command("stuck")
@click.option("--older-than", default="1h", show_default=True, help="Age limit: 30m, 1h, 2d.")
@deployment_options
@database_options
@json_option
def stuck_command(older_than, deployment, database_choice) -> None:
    """List jobs stuck in 'processing'."""
    from toolkit.db.jobs import parse_duration, stuck_jobs

    seconds = parse_duration(older_than)
    target = target_factory(deployment, database_choice)()
    jobs = stuck_jobs(target, seconds)
    out = current_output()
    out.remember({"target": target.description, "older_than_seconds": seconds,
                       "jobs": [job.__dict__ for job in jobs]})
    if out.json:
        out.emit_json(out.document)
        return
    _jobs_table(out, jobs, "%d stuck jobs in %s (processing for more than %s)" % (len(jobs), target.description,
                                                                                 older_than))


@jobs_group.command("reset")
@click.option("--older-than", default="1h", show_default=True, help="Age limit: 30m, 1h, 2d.")
@click.option("--dry-run", is_flag=True, help="Show what would change; change nothing.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@deployment_options
@database_options
@json_option
def reset_command(older_than, dry_run, yes, deployment, database_choice) -> None:
    """Mark stuck jobs failed with error_message 'Worker crashed - job reset', in one transaction."""
    from toolkit.db.jobs import RESET_MESSAGE, parse_duration, reset_stuck, stuck_jobs

    seconds = parse_duration(older_than)
    target = target_factory(deployment, database_choice)()
    out = current_output()
    jobs = stuck_jobs(target, seconds)
    document = {"target": target.description, "older_than_seconds": seconds, "dry_run": dry_run,
                "stuck": [job.job_id for job in jobs], "reset": []}
    if not out.json:
        _jobs_table(out, jobs, "%d stuck jobs in %s" % (len(jobs), target.description))
    if dry_run or not jobs:
        out.remember(document)
        if out.json:
            out.emit_json(out.document)
        elif not jobs:
            click.echo("nothing to reset")
        else:
            click.echo("dry run: %d jobs would be set to failed ('%s')" % (len(jobs), RESET_MESSAGE))
        return
    if not yes:
        if not sys.stdin.isatty():
            raise UsageError("reset changes the database and no terminal can confirm it", hint="add --yes")
        click.confirm("Set these %d jobs to failed?" % len(jobs), abort=True, err=True)
    changed = reset_stuck(target, seconds)
    document["reset"] = changed
    out.remember(document)
    if out.json:
        out.emit_json(out.document)
        return
    click.echo("reset %d jobs: %s" % (len(changed), " ".join(changed)))
