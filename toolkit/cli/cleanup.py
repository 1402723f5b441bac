"""`bookgen-kit cleanup`: free disk space the runbook's way, without its risks."""
from __future__ import annotations

import click

from toolkit.cli.common import deployment_options
from toolkit.cli.output import current_output, json_option
from toolkit.errors import PartialFailure


def _mib(value) -> str:
    return "-" if value is None else "%.1f MiB" % (value / 1048576)


@click.command("cleanup")
@click.option("--days", default=7, show_default=True, help="Age of bios/ and docx/ entries that may go.")
@click.option("--log-days", default=7, show_default=True, help="Age of rotated logs (*.log.*) that may go.")
@click.option("--backup-days", default=3, show_default=True, help="Age of backups that may go (never the newest).")
@click.option("--apply", "apply_changes", is_flag=True, help="Delete (default: dry run).")
@click.option("--archive-to", metavar="DIR", help="First write a tar.zst of what goes, verify it, then delete.")
@deployment_options
@json_option
def cleanup_command(days, log_days, backup_days, apply_changes, archive_to, deployment) -> None:
    """List (dry run) or delete old generated files, rotated logs and old backups."""
    from toolkit.host.cleanup import apply_cleanup, check_days, dry_run, plan_cleanup

    check_days(days=days, log_days=log_days, backup_days=backup_days)
    plan = plan_cleanup(deployment, days, log_days, backup_days)
    result = apply_cleanup(plan, deployment, archive_to) if apply_changes else dry_run(plan, deployment)
    out = current_output()
    out.remember(result.to_dict())
    if out.json:
        out.emit_json(out.document)
    else:
        _render(out, result)
    if result.not_deleted:
        raise PartialFailure("%d of %d items were not deleted (listed above)" % (
            len(result.not_deleted), len(plan.candidates)))


def _render(out, result) -> None:
    from rich.table import Table

    console = out.console
    table = Table(title="%s: %d items, %s" % ("deleted" if result.applied else "would delete (dry run)",
                                             len(result.plan.candidates), _mib(result.plan.total_bytes)),
                  title_justify="left")
    for column in ("category", "path", "size", "age (days)"):
        table.add_column(column)
    import time

    for c in result.plan.candidates:
        table.add_row(c.category, c.path + ("/" if c.kind == "dir" else ""), _mib(c.bytes),
                      "%.0f" % ((time.time() - c.newest_mtime) / 86400))
    console.print(table)
    for skipped in result.plan.skipped:
        console.print("[dim]kept[/dim] %s: %s" % (skipped.path, skipped.reason))
    for item in result.not_deleted:
        console.print("[yellow]not deleted[/yellow] %s: %s" % (item.path, item.reason))
    if result.archive:
        console.print("archive %s (%d members, verified), sha256 %s" % (result.archive, result.archive_members,
                                                                       result.archive_sha256))
    console.print("free space: %s before, %s after" % (_mib(result.free_before), _mib(result.free_after)))
    if not result.applied and result.plan.candidates:
        console.print("dry run: add --apply to delete (and --archive-to DIR to keep a copy)")
