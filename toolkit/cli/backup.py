"""`backup create|verify|list|prune|keep`, `restore`, and `db check|repair|drop-old`."""
from __future__ import annotations

import sys

import click

from toolkit.cli.common import deployment_options
from toolkit.cli.output import current_output, json_option
from toolkit.cli.prompts import passphrase_source
from toolkit.errors import UsageError, VerificationFailed


def server_options(function):
    function = click.option("--container", metavar="NAME",
                            help="Run pg_dump/pg_restore/psql inside this container (default: bookgen-db when it "
                                 "runs).")(function)
    function = click.option("--dsn", metavar="DSN", help="Use the host's client binaries against this server "
                                                          "(an admin role for restore).")(function)
    return function


def _server(deployment, dsn, container):
    from toolkit.db.server import resolve_server

    return resolve_server(deployment, dsn, container)


def _reader(deployment):
    """What reads a set without restoring it, when no server is named: this host's client binaries (a workstation
    needs no server, no .env); else the deployment's own server (bookgen-db's pg_restore when it runs)."""
    from toolkit.db.server import ClientTools, host_tools
    from toolkit.errors import KitError

    if host_tools("pg_restore"):
        return ClientTools()
    try:
        return _server(deployment, None, None)
    except KitError:
        return ClientTools()  # its refusal names what is missing


def _identities(identity_files, passphrase_file):
    from toolkit.crypto.files import LazyScryptIdentity, load_identities

    ask = passphrase_source(passphrase_file)
    chosen = load_identities(identity_files, ask)
    chosen.append(LazyScryptIdentity(ask))
    return chosen


def _checks_table(out, checks) -> None:
    marks = {True: "[green]ok  [/green]", False: "[red]FAIL[/red]", None: "[yellow]----[/yellow]"}
    for check in checks:
        out.console.print("%s %-14s %s" % (marks[check["ok"]], check["name"], check["detail"]), highlight=False)


@click.group("backup")
def backup_group() -> None:
    """PostgreSQL backup sets: create, verify, list, prune, keep."""


@backup_group.command("create")
@click.option("--database", default="bookgen", show_default=True)
@click.option("--out", "out_dir", metavar="DIR",
              help="Where the set goes (default: the current case's backups/, else APP_DIR/backups).")
@click.option("-r", "--recipient", "recipients", multiple=True, metavar="RECIPIENT", help="Encrypt to age recipients.")
@click.option("-R", "--recipients-file", "recipient_files", multiple=True, metavar="FILE")
@click.option("--salvage", is_flag=True,
              help="The database is damaged: keep every row that can be read (one snapshot, read around bad pages, "
                   "the database unchanged) and list what could not be, in the sidecar.")
@server_options
@deployment_options
@json_option
def create_command(database, out_dir, recipients, recipient_files, salvage, dsn, container, deployment) -> None:
    """pg_dump (custom format) streamed through sha256 (and age) to .partial, renamed; sidecar; SHA256SUMS.
    With --salvage, damaged tables' readable rows go to a .salvage.sql file of the same set."""
    from toolkit.crypto.files import load_recipients
    from toolkit.db.backup import create_backup

    chosen = load_recipients(recipients, recipient_files) if (recipients or recipient_files) else []
    server = _server(deployment, dsn, container)
    out = current_output()
    if not out_dir:
        import os

        from toolkit.case.journal import current_case

        case = current_case(out.case_dir)
        out_dir = os.path.join(case, "backups") if case else None
    result = _with_progress(out, "pg_dump", lambda progress: create_backup(
        server, database, out_dir or deployment.backups_dir, chosen, [str(r) for r in chosen], progress,
        salvage=salvage))
    out.remember(result)
    if out.json:
        out.emit_json(out.document)
    else:
        click.echo("backup %s: %d bytes, sha256 %s, %d tables, %d rows, %.1f s" % (
            result["dump"], result["size"], result["sha256"], result["tables"], result["rows"], result["seconds"]))
        _salvage_lines(result.get("salvage"))


def _salvage_lines(salvage) -> None:
    if salvage is None:
        return
    if not salvage["damaged"]:
        click.echo("salvage: no damage found; the set is complete")
        return
    click.echo("salvage %s: %d rows read from damaged tables; about %d rows lost:" % (
        salvage["file"], salvage["rows_saved"], salvage["rows_lost_estimate"]))
    for line in salvage["damaged"]:
        click.echo("  lost %s" % line)


@backup_group.command("base")
@click.option("--out", "out_dir", metavar="DIR", help="Where the base backup goes (default: APP_DIR/backups).")
@click.option("-r", "--recipient", "recipients", multiple=True, metavar="RECIPIENT", help="Encrypt to age recipients.")
@click.option("-R", "--recipients-file", "recipient_files", multiple=True, metavar="FILE")
@server_options
@deployment_options
@json_option
def base_command(out_dir, recipients, recipient_files, dsn, container, deployment) -> None:
    """A base backup of the whole cluster (pg_basebackup, its manifest inside, the WAL it needs fetched in),
    streamed through sha256, zstd and age into base-<UTC>.tar.zst[.age]; sidecar; SHA256SUMS."""
    import os

    from toolkit.crypto.files import load_recipients
    from toolkit.db.physical import create_base

    chosen = load_recipients(recipients, recipient_files) if (recipients or recipient_files) else []
    server = _server(deployment, dsn, container)
    out = current_output()
    target = out_dir or deployment.backups_dir
    result = _with_progress(out, "pg_basebackup", lambda progress: create_base(
        server, target, chosen, [str(r) for r in chosen], progress,
        archive_dir=os.path.join(os.path.abspath(target), "wal")))
    out.remember(result)
    if out.json:
        out.emit_json(out.document)
    else:
        click.echo("base backup %s: %d bytes (cluster %d bytes), sha256 %s, WAL %s to %s on timeline %s, %.1f s" % (
            result["base"], result["size"], result["cluster_bytes"], result["sha256"], result["start_lsn"],
            result["end_lsn"], result["timeline"], result["seconds"]))


def _with_progress(out, label: str, work):
    """work(progress) with a byte counter on a terminal (none when piped); its result."""
    if not out.interactive:
        return work(None)
    from rich.progress import DownloadColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn(label), DownloadColumn(), TimeElapsedColumn(), console=out.err_console, transient=True)
    task = bar.add_task(label, total=None)
    bar.start()
    try:
        return work(lambda n: bar.update(task, advance=n))
    finally:
        bar.stop()


@backup_group.group("wal")
def wal_group() -> None:
    """Continuous WAL archiving into the backups directory: enable, status."""


def _archive_dir(archive_dir, deployment) -> str:
    import os

    return os.path.abspath(archive_dir or os.path.join(deployment.backups_dir, "wal"))


@wal_group.command("enable")
@click.option("--archive-dir", metavar="DIR", help="The WAL archive (default: APP_DIR/backups/wal).")
@click.option("--restart", is_flag=True, help="Container mode: restart the container when archive_mode needs it.")
@server_options
@deployment_options
@json_option
def wal_enable_command(archive_dir, restart, dsn, container, deployment) -> None:
    """Point archive_command at the archive (it never overwrites a segment, and fails loudly when one differs),
    archive_mode on; then archive one segment to prove it (or say that a restart is needed first)."""
    from toolkit.db.archiving import enable

    result = enable(_server(deployment, dsn, container), _archive_dir(archive_dir, deployment), restart)
    out = current_output()
    out.remember(result)
    if out.json:
        out.emit_json(out.document)
    elif result.get("restart_needed"):
        click.echo("archive_command set for %s; %s" % (result["archive"], result["next"]))
    else:
        click.echo("archiving into %s works: segment %s archived in %.2f s" % (
            result["archive"], result["proof"]["segment"], result["proof"]["seconds"]))


@wal_group.command("status")
@click.option("--archive-dir", metavar="DIR", help="The WAL archive (default: APP_DIR/backups/wal).")
@click.option("--no-server", is_flag=True, help="Judge the archive alone (a copy on a workstation).")
@server_options
@deployment_options
@json_option
def wal_status_command(archive_dir, no_server, dsn, container, deployment) -> None:
    """The archive's continuity (timelines, gaps, the newest segment and its age) and the server's archiver
    (failures, segments waiting, pg_wal against its free space). Exit 5 on a gap or a failing archiver."""
    from toolkit.db.archiving import status

    server = None if no_server else _server(deployment, dsn, container)
    result = status(_archive_dir(archive_dir, deployment), server)
    out = current_output()
    out.remember(result)
    if out.json:
        out.emit_json(out.document)
    else:
        archive = result["archive"]
        for line in archive["timelines"]:
            click.echo("timeline %d: %s to %s, %d segments, %d gaps" % (line["timeline"], line["first"], line["last"],
                                                                       line["segments"], len(line["gaps"])))
        if archive["newest"]:
            click.echo("newest: %s, %.0f s old" % (archive["newest"], archive["newest_age_seconds"]))
        live = result["server"]
        if live:
            click.echo("server: archive_mode %s, %d archived, %d failed (last %s), %d waiting, pg_wal %d MiB" % (
                live["archive_mode"], live["archived_count"], live["failed_count"], live["last_failed"] or "-",
                live["waiting_to_archive"], live["pg_wal_bytes"] >> 20))
        for warning in result["warnings"]:
            click.echo("warning: %s" % warning)
        for problem in result["problems"]:
            click.echo("PROBLEM: %s" % problem)
    if result["problems"]:
        raise VerificationFailed(result["problems"][0])


@backup_group.command("verify")
@click.argument("set_path", metavar="SET")
@click.option("-i", "--identity", "identity_files", multiple=True, metavar="FILE")
@click.option("--passphrase-file", metavar="FILE")
@click.option("--restore-test", is_flag=True, help="Also restore into a scratch database and compare (dropped after).")
@click.option("--scratch-cluster", is_flag=True,
              help="Do the restore test in a throwaway cluster in a temp dir (host server binaries needed).")
@click.option("--scratch", "scratch_dir", metavar="DIR",
              help="Where a base backup is extracted for pg_verifybackup (default: the temp directory).")
@server_options
@deployment_options
@json_option
def verify_command(set_path, identity_files, passphrase_file, restore_test, scratch_cluster, scratch_dir, dsn,
                   container, deployment) -> None:
    """Checksum, archive header, a full read of every entry (this host's pg_restore: no server, no .env needed);
    with --restore-test, a scratch restore compared with the sidecar. Exit 5 when the set does not hold."""
    from toolkit.db.backup import locate_set, verify_backup

    backup = locate_set(set_path)
    if scratch_cluster and not restore_test:
        raise UsageError("--scratch-cluster goes with --restore-test")
    identities = _identities(identity_files, passphrase_file)
    if scratch_cluster:
        from toolkit.db.scratch import ScratchCluster

        with ScratchCluster() as scratch_server:
            result = verify_backup(backup, scratch_server, identities, True, scratch_cluster=True)
    else:
        if backup.kind == "base":
            reader = None  # extracted and judged by this host's pg_verifybackup: no server
        elif restore_test or dsn or container:
            reader = _server(deployment, dsn, container)
        else:
            reader = _reader(deployment)
        result = verify_backup(backup, reader, identities, restore_test, scratch_dir=scratch_dir)
    out = current_output()
    out.remember({"set": backup.dump, "ok": result.ok, "checks": result.checks})
    if out.json:
        out.emit_json(out.document)
    else:
        _checks_table(out, result.checks)
    if not result.ok:
        failed = [c for c in result.checks if not c["ok"]][0]
        raise VerificationFailed("%s: %s" % (failed["name"], failed["detail"]))


@backup_group.command("list")
@click.argument("directory", required=False)
@click.option("--max-age", default=24.0, show_default=True, help="Warn when the newest set is older (hours).")
@server_options
@deployment_options
@json_option
def list_command(directory, max_age, dsn, container, deployment) -> None:
    """Sets in DIR (default APP_DIR/backups): age, size, verified, kept; old _pre_restore_ databases too."""
    from toolkit.db.backup import list_backups
    from toolkit.errors import KitError

    listing = list_backups(directory or deployment.backups_dir, max_age)
    try:
        server = _server(deployment, dsn, container)
        listing["pre_restore_databases"] = [r[0] for r in server.query(
            "SELECT datname FROM pg_database WHERE datname LIKE '%\\_pre\\_restore\\_%' ORDER BY 1",
            server.admin_database)]
    except KitError as error:
        listing["pre_restore_databases"] = None
        listing["server_note"] = "old databases not listed: %s" % error.message
    out = current_output()
    out.remember(listing)
    if out.json:
        out.emit_json(out.document)
        return
    from rich.table import Table

    table = Table(title=listing["directory"], title_justify="left")
    for column in ("set", "kind", "size", "age (h)", "verified", "keep"):
        table.add_column(column)
    for s in listing["sets"]:
        table.add_row(s["dump"].rsplit("/", 1)[-1], s["kind"], "%d" % s["size"], str(s["age_hours"]),
                      s["verified"] or "no", "yes" if s["keep"] else "")
    out.console.print(table)
    for name in listing.get("pre_restore_databases") or []:
        out.console.print("kept by a restore: database %s (`bookgen-kit db drop-old %s --yes`)" % (name, name))
    if listing["warning"]:
        out.console.print("[yellow]warning[/yellow] %s" % listing["warning"])


@backup_group.command("prune")
@click.argument("directory", required=False)
@click.option("--keep-last", default=7, show_default=True)
@click.option("--keep-days", default=14.0, show_default=True)
@click.option("--apply", "apply_changes", is_flag=True, help="Delete (default: dry run).")
@deployment_options
@json_option
def prune_command(directory, keep_last, keep_days, apply_changes, deployment) -> None:
    """Old sets beyond --keep-last and --keep-days; never the newest verified set or a kept one. The WAL archive
    follows the base backups kept: nothing a kept base needs goes, nothing older stays."""
    from toolkit.db.backup import apply_prune, plan_prune

    plan = plan_prune(directory or deployment.backups_dir, keep_last, keep_days)
    deleted = apply_prune(plan) if apply_changes else []
    out = current_output()
    out.remember(dict(plan, applied=apply_changes, deleted=deleted))
    if out.json:
        out.emit_json(out.document)
        return
    for path in plan["delete"]:
        click.echo("%s %s" % ("deleted" if apply_changes else "would delete", path))
    if plan["wal_delete"]:
        click.echo("%s %d WAL files before the oldest kept base backup (%s to %s)" % (
            "deleted" if apply_changes else "would delete", len(plan["wal_delete"]), plan["wal_delete"][0],
            plan["wal_delete"][-1]))
    if plan["wal_note"]:
        click.echo(plan["wal_note"])
    click.echo("kept %d sets" % len(plan["keep"]))


@backup_group.command("keep")
@click.argument("set_path", metavar="SET")
@click.option("--release", is_flag=True, help="Remove the mark.")
@json_option
def keep_command(set_path, release) -> None:
    """Mark a set so that prune and cleanup never delete it."""
    from toolkit.db.backup import locate_set, mark_keep

    backup = locate_set(set_path)
    mark_keep(backup, not release)
    out = current_output()
    out.remember({"set": backup.dump, "keep": not release})
    if out.json:
        out.emit_json(out.document)
    else:
        click.echo("%s %s" % ("released" if release else "kept", backup.dump))


@click.command("restore")
@click.argument("set_path", metavar="SET")
@click.option("--database", default="bookgen", show_default=True)
@click.option("-i", "--identity", "identity_files", multiple=True, metavar="FILE")
@click.option("--passphrase-file", metavar="FILE")
@click.option("--into", metavar="NAME", help="Restore into this new database and stop there.")
@click.option("--stop-services", metavar="LIST", help="Containers to stop during the swap, e.g. api,worker.")
@click.option("--keep-stopped", is_flag=True,
              help="If the restore fails after --stop-services, leave them stopped (default: start them again).")
@click.option("--migrate", is_flag=True, help="Run `alembic upgrade head` in the api container afterwards.")
@click.option("--no-emergency-backup", is_flag=True, help="Skip the backup of the current database (needs --yes).")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--target-time", metavar="TIME", help="Point in time (base backup + WAL archive), e.g. 2026-11-28T03:50Z.")
@click.option("--target-lsn", metavar="LSN", help="Point-in-time restore to this WAL position.")
@click.option("--target-name", metavar="NAME", help="Point-in-time restore to this restore point.")
@click.option("--target-xid", metavar="XID", help="Point-in-time restore to the commit of this transaction.")
@click.option("--pitr-mode", type=click.Choice(["dump", "swap"]), default="dump", show_default=True,
              help="dump: the database as of the target restored into the live cluster; swap: the whole cluster "
                   "replaced (the old data directory kept).")
@click.option("--archive-dir", metavar="DIR", help="The WAL archive (default: the base backup's, else "
                                                   "APP_DIR/backups/wal).")
@server_options
@deployment_options
@json_option
def restore_command(set_path, database, identity_files, passphrase_file, into, stop_services, keep_stopped, migrate,
                    no_emergency_backup, yes, target_time, target_lsn, target_name, target_xid, pitr_mode,
                    archive_dir, dsn, container, deployment) -> None:
    """Verify the set, back up the live database, restore into a new one, compare, swap by rename. With a
    --target-*, SET is a base backup (or the directory of them): point-in-time restore."""
    from toolkit.db.backup import locate_set
    from toolkit.db.restore import RestorePlan, restore

    if no_emergency_backup and not yes:
        raise UsageError("--no-emergency-backup needs --yes")
    if keep_stopped and not stop_services:
        raise UsageError("--keep-stopped goes with --stop-services")
    names = {"api": deployment.containers["api"], "worker": deployment.containers["worker"]}
    services = [names.get(s.strip(), s.strip()) for s in (stop_services or "").split(",") if s.strip()]
    targets = [(kind, value) for kind, value in (("time", target_time), ("lsn", target_lsn), ("name", target_name),
                                                  ("xid", target_xid)) if value]
    if len(targets) > 1:
        raise UsageError("give one --target-*, not %d" % len(targets))
    if targets:
        if into or migrate or no_emergency_backup:
            raise UsageError("--into, --migrate and --no-emergency-backup do not go with a point-in-time restore")
        _pitr(set_path, targets[0], database, pitr_mode, archive_dir, identity_files, passphrase_file, services,
              keep_stopped, yes, dsn, container, deployment)
        return
    backup = locate_set(set_path)
    server = _server(deployment, dsn, container)
    out = current_output()
    if not into and not yes:
        if not sys.stdin.isatty():
            raise UsageError("restore replaces database %s and no terminal can confirm it" % database,
                             hint="add --yes")
        click.confirm("Restore %s over database %s (the current one is kept, renamed)?" % (backup.dump, database),
                      abort=True, err=True)
    plan = RestorePlan(backup=backup, database=database, into=into, emergency_backup=not no_emergency_backup,
                       backups_dir=deployment.backups_dir, stop_services=services, migrate=migrate,
                       api_container=names["api"], keep_stopped=keep_stopped)
    say = (lambda message: out.err_console.print("[dim]%s[/dim]" % message)) if out.interactive else None
    report = restore(server, plan, _identities(identity_files, passphrase_file), say)
    out.remember({"ok": True, "steps": report.steps, "database": report.restored_database,
                       "old_database": report.old_database, "emergency_backup": report.emergency_backup,
                       "services": report.services})
    if out.json:
        out.emit_json(out.document)
    else:
        _checks_table(out, [{"name": s["step"], "ok": s["ok"], "detail": s["detail"]} for s in report.steps])


def _pitr(set_path, target, database, mode, archive_dir, identity_files, passphrase_file, services, keep_stopped, yes,
          dsn, container, deployment) -> None:
    import os

    from toolkit.crypto.age import parse_recipient
    from toolkit.db.pitr import PitrPlan, choose_base, pitr_restore

    base = choose_base(set_path, target[0], target[1])
    sidecar = base.load_sidecar() or {}
    archive = os.path.abspath(archive_dir or sidecar.get("archive") or os.path.join(deployment.backups_dir, "wal"))
    out = current_output()
    what = "database %s" % database if mode == "dump" else "the whole cluster (its data directory is kept)"
    if not yes:
        if not sys.stdin.isatty():
            raise UsageError("restore replaces %s and no terminal can confirm it" % what, hint="add --yes")
        click.confirm("Restore %s as of %s %s from %s?" % (what, target[0], target[1], base.dump), abort=True,
                      err=True)
    # the dump of the database as of the target is encrypted like the base backup it comes from
    recipients = [parse_recipient(text) for text in (sidecar.get("dump") or {}).get("recipients") or []]
    plan = PitrPlan(base=base, target_kind=target[0], target=target[1], archive_dir=archive, database=database,
                    mode=mode, backups_dir=deployment.backups_dir)
    say = (lambda message: out.err_console.print("[dim]%s[/dim]" % message)) if out.interactive else None
    report = pitr_restore(lambda: _server(deployment, dsn, container), plan, _identities(identity_files,
                                                                                          passphrase_file),
                          recipients, say, services, keep_stopped)
    out.remember({"ok": True, "base": base.dump, "archive": archive, "target": {target[0]: target[1]}, "mode": mode,
                  "steps": report.steps, "reached": report.reached, "restore": report.restore,
                  "old_data_directory": report.old_data_directory})
    if out.json:
        out.emit_json(out.document)
    else:
        _checks_table(out, [{"name": s["step"], "ok": s["ok"], "detail": s["detail"]} for s in report.steps])


@click.group("db")
def db_group() -> None:
    """Database checks and repairs, and dropping databases kept by restore."""


@db_group.command("drop-old")
@click.argument("name")
@click.option("--yes", is_flag=True, required=True, help="Required: this drops a database.")
@server_options
@deployment_options
@json_option
def drop_old_command(name, yes, dsn, container, deployment) -> None:
    """Drop a <db>_pre_restore_<UTC> database kept by restore."""
    from toolkit.db.restore import drop_old

    drop_old(_server(deployment, dsn, container), name)
    out = current_output()
    out.remember({"dropped": name})
    if out.json:
        out.emit_json(out.document)
    else:
        click.echo("dropped %s" % name)


@db_group.command("check")
@click.option("--database", default="bookgen", show_default=True)
@click.option("--yes", is_flag=True, help="Allow creating the amcheck extension (it changes the database).")
@server_options
@deployment_options
@json_option
def check_command(database, yes, dsn, container, deployment) -> None:
    """Reachability, pg_stat_database (deadlocks, checksum failures, conflicts), and amcheck: every table
    (verify_heapam) and btree index (bt_index_check) by relation and block. Exit 5 on damage, 6 when amcheck
    could not run (not installed and no --yes, or not available)."""
    from toolkit.db.maintenance import check_database
    from toolkit.errors import PartialFailure

    report = check_database(_server(deployment, dsn, container), database, allow_extension=yes)
    out = current_output()
    out.remember(report)
    if out.json:
        out.emit_json(out.document)
    else:
        _checks_table(out, report["checks"])
    failed = [c for c in report["checks"] if c["ok"] is False]
    if failed:
        raise VerificationFailed("%s: %s" % (failed[0]["name"], failed[0]["detail"]) if len(report["damage"]) < 2 else
                                 "%d damaged places in %s (listed above)" % (len(report["damage"]), database))
    unchecked = [c for c in report["checks"] if c["ok"] is None]
    if unchecked:
        raise PartialFailure("database %s was not checked for corruption: %s" % (database, unchecked[0]["detail"]))


@db_group.command("repair")
@click.option("--database", default="bookgen", show_default=True)
@click.option("--reindex", is_flag=True, help="REINDEX DATABASE.")
@click.option("--vacuum-full", is_flag=True, help="VACUUM FULL (locks every table in turn).")
@click.option("--no-emergency-backup", is_flag=True, help="Skip the backup before the repair (needs --yes).")
@click.option("--yes", is_flag=True, help="Confirm --no-emergency-backup.")
@server_options
@deployment_options
@json_option
def repair_command(database, reindex, vacuum_full, no_emergency_backup, yes, dsn, container, deployment) -> None:
    """The runbook's repair, after an emergency backup (a salvage set when pages cannot be read)."""
    from toolkit.db.maintenance import repair_database

    if not (reindex or vacuum_full):
        raise UsageError("say what to do: --reindex and/or --vacuum-full")
    if no_emergency_backup and not yes:
        raise UsageError("--no-emergency-backup needs --yes")
    steps = repair_database(_server(deployment, dsn, container), database, deployment.backups_dir, reindex,
                            vacuum_full, emergency_backup=not no_emergency_backup)
    out = current_output()
    out.remember({"steps": steps})
    if out.json:
        out.emit_json(out.document)
    else:
        _checks_table(out, [{"name": s["step"], "ok": s.get("ok", True), "detail": s["detail"]} for s in steps])
    failed = [s for s in steps if s.get("ok") is False]
    if failed:
        from toolkit.errors import PartialFailure

        raise PartialFailure("%s: %s" % (failed[0]["step"], failed[0]["detail"]))
