"""`restore`: a proven set into a new database, compared with its sidecar, then swapped in by rename.

The live database is never dropped: it is renamed to `<db>_pre_restore_<UTC>` in the
same transaction that renames the restored one to `<db>`, and stays until `db drop-old`.
A run killed before the swap leaves at most a `<db>_restore_<UTC>` database, which the
next run names and drops once the set it restores is proven (never before). A failure after
--stop-services starts them again (unless --keep-stopped) and says each one's state. The new database gets the set's owner, encoding, locale,
grants, settings and comment before the swap, and the comparison covers them. Every
refusal (a set that does not verify, --stop-services without a Docker engine, no room)
comes before the first change.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

from toolkit import utc
from toolkit.db.backup import (
    BackupSet,
    DamagedDatabase,
    Restored,
    compare_restored,
    create_backup,
    database_exists,
    drop_database,
    restore_into,
    verify_backup,
)
from toolkit.db.server import Server, quote_ident, quote_literal
from toolkit.errors import BadInputError, EnvironmentProblem, UsageError, VerificationFailed


@dataclass
class RestorePlan:
    backup: BackupSet
    database: str
    into: Optional[str] = None
    emergency_backup: bool = True
    backups_dir: Optional[str] = None
    stop_services: List[str] = field(default_factory=list)
    migrate: bool = False
    api_container: str = "bookgen-api"
    keep_stopped: bool = False  # on a failure after --stop-services, leave them stopped


@dataclass
class RestoreReport:
    steps: List[Dict[str, Any]] = field(default_factory=list)
    restored_database: Optional[str] = None
    old_database: Optional[str] = None
    emergency_backup: Optional[str] = None
    services: Dict[str, str] = field(default_factory=dict)  # --stop-services: each one's state at the end
    started: float = field(default_factory=time.monotonic)

    def step(self, name: str, detail: str, ok: bool = True) -> None:
        self.steps.append({"step": name, "ok": ok, "detail": detail,
                           "at": utc.iso(),
                           "elapsed": round(time.monotonic() - self.started, 3)})


def leftovers(server: Server, database: str) -> List[str]:
    pattern = database.replace("\\", "\\\\").replace("_", "\\_").replace("%", "\\%") + "\\_restore\\_%"
    return [row[0] for row in server.query("SELECT datname FROM pg_database WHERE datname LIKE %s" %
                                           quote_literal(pattern), server.admin_database)]


def sessions(server: Server, database: str) -> List[Dict[str, Any]]:
    rows = server.query("SELECT pid, usename, application_name, client_addr, state FROM pg_stat_activity "
                        "WHERE datname = %s AND pid <> pg_backend_pid()" % quote_literal(database),
                        server.admin_database)
    return [{"pid": int(r[0]), "user": r[1], "application": r[2], "client": r[3], "state": r[4]} for r in rows]


SWAP_TRIES = 20  # new sessions keep arriving: end them and rename again


def terminate_sessions(server: Server, database: str) -> int:
    rows = server.query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND "
                        "pid <> pg_backend_pid()" % quote_literal(database), server.admin_database)
    return len(rows)


def _services_engine(names: Sequence[str]):
    """The Docker client that can stop these containers, or a refusal naming why (before anything changes)."""
    from toolkit.containers.engine import client, explain
    from toolkit.errors import KitError

    try:
        docker_client = client(timeout=60)
        docker_client.ping()
    except Exception as error:
        reason = error.message if isinstance(error, KitError) else explain(error, 60)
        raise EnvironmentProblem("--stop-services needs the Docker engine, and %s: nothing was changed" % reason,
                                 hint="stop the services another way and run restore without --stop-services")
    missing = []
    for name in names:
        try:
            docker_client.containers.get(name)
        except Exception:
            missing.append(name)
    if missing:
        raise UsageError("--stop-services: no container %s: nothing was changed" % ", ".join(missing))
    return docker_client


def emergency_backup(server: Server, database: str, backups_dir: str) -> Dict[str, Any]:
    """The runbook's "backup current state (even if corrupted)": a plain set, or, when pages cannot be read,
    a salvage set (every readable row, the loss listed)."""
    try:
        return create_backup(server, database, backups_dir, prefix="%s-emergency" % database)
    except DamagedDatabase:
        return create_backup(server, database, backups_dir, prefix="%s-emergency" % database, salvage=True)


def _docker_services(docker_client, names: Sequence[str], action: str) -> List[str]:
    done = []
    for name in names:
        container = docker_client.containers.get(name)
        if action == "stop" and container.status == "running":
            container.stop(timeout=20)
            done.append(name)
        elif action == "start" and container.status != "running":
            container.start()
            done.append(name)
    return done


def restore(server: Server, plan: RestorePlan, identities: Sequence[Any],
            progress: Optional[Callable[[str], None]] = None) -> RestoreReport:
    report = RestoreReport()
    say = progress or (lambda message: None)
    database = plan.database
    target_exists = database_exists(server, database)

    # 1. preflight: the set is proven, and what --stop-services needs is there, before anything changes
    left = leftovers(server, database)
    docker_client = _services_engine(plan.stop_services) if plan.stop_services and not plan.into else None
    say("verifying the set")
    verified = verify_backup(plan.backup, server, identities, restore_test=False)
    failed = [c for c in verified.checks if not c["ok"]]
    if failed:
        report.step("preflight", "%s: %s" % (failed[0]["name"], failed[0]["detail"]), ok=False)
        raise VerificationFailed("the set does not verify (%s: %s): nothing was changed%s" % (
            failed[0]["name"], failed[0]["detail"], " (%s, left by an interrupted restore, kept)" % ", ".join(left)
            if left else ""))
    report.step("preflight", "set verified (%s); server %s reachable; %s" % (
        ", ".join(c["name"] for c in verified.checks), server.description,
        _space_check(server, database if target_exists else None, plan.backup)))

    # 2. the first change: what a killed earlier run left behind (a _restore_ database never swapped in) is dropped
    for name in left:
        drop_database(server, name)
        report.step("cleanup", "dropped %s, left by an interrupted restore" % name)
    if plan.into:
        say("restoring into %s" % plan.into)
        live_owner = _owner(server, database) if target_exists else None
        restored = restore_into(server, plan.backup, plan.into, identities, owner=live_owner)
        report.restored_database = plan.into
        report.step("restore", "restored into the new database %s; stopped there (--into)" % plan.into)
        _compare(server, plan, plan.into, report, restored)
        return report
    if target_exists:
        listed = sessions(server, database)
        report.step("sessions", "%d sessions on %s: %s" % (len(listed), database, ", ".join(
            "%s/%s" % (s["user"], s["application"] or "-") for s in listed[:10]) or "none"))
        owner = _owner(server, database)
        # 3. the runbook's emergency backup of what is there now, "even if corrupted"
        if plan.emergency_backup:
            if not plan.backups_dir:
                raise UsageError("an emergency backup needs a backups directory")
            say("emergency backup of %s" % database)
            emergency = emergency_backup(server, database, plan.backups_dir)
            report.emergency_backup = emergency["dump"]
            report.step("emergency backup", "%s (%d bytes)%s" % (emergency["dump"], emergency["size"],
                                                                _salvage_words(emergency)))
        else:
            report.step("emergency backup", "skipped (--no-emergency-backup)")
    else:
        owner = None
        report.step("sessions", "%s does not exist yet: a plain restore" % database)
    # 4. services and sessions
    stopped: List[str] = []
    if plan.stop_services:
        stopped = _docker_services(docker_client, plan.stop_services, "stop")
        report.step("stop services", "stopped %s" % (", ".join(stopped) or "nothing (not running)"))
    try:
        _replace(server, plan, identities, report, say, database, owner, target_exists)
        # 7. migrations: alembic runs in the api container, so it is started first when it was stopped
        if plan.migrate:
            if plan.api_container in stopped:
                _docker_services(docker_client, [plan.api_container], "start")
                report.step("start services", "started %s for the migration" % plan.api_container)
            _migrate(plan.api_container, report)
    except BaseException as error:
        if stopped:
            _after_failure(docker_client, stopped, plan.keep_stopped, report, error)
        raise
    if stopped:
        started = _docker_services(docker_client, stopped, "start")
        if started:
            report.step("start services", "started %s" % ", ".join(started))
        report.services = _states(docker_client, stopped)
    return report


def _states(docker_client, names: Sequence[str]) -> Dict[str, str]:
    """Each container's state as the engine says it now."""
    states = {}
    for name in names:
        try:
            states[name] = docker_client.containers.get(name).status
        except Exception as error:  # the engine's own words, one line
            states[name] = "unknown (%s)" % str(error).splitlines()[0][:200]
    return states


def _after_failure(docker_client, stopped: List[str], keep_stopped: bool, report: RestoreReport,
                   error: BaseException) -> None:
    """A restore that failed after --stop-services: the services are started again (unless --keep-stopped),
    and the error and the report say which state each one is in."""
    from toolkit.errors import KitError

    started: Dict[str, str] = {}
    if not keep_stopped:
        for name in stopped:
            try:
                _docker_services(docker_client, [name], "start")
            except Exception as start_error:  # the engine's own words, one line
                started[name] = " (could not be started again: %s)" % str(start_error).splitlines()[0][:200]
    states = {name: state + started.get(name, " (--keep-stopped)" if keep_stopped and state != "running" else
                                       "") for name, state in _states(docker_client, stopped).items()}
    report.services = states
    report.step("services after the failure", "; ".join("%s %s" % item for item in states.items()),
                ok=keep_stopped or all(state.startswith("running") for state in states.values()))
    if isinstance(error, KitError):
        error.message += "; services: " + ", ".join("%s %s" % item for item in states.items())
        error.details = dict(error.details or {}, services=states, steps=report.steps)


def _replace(server: Server, plan: RestorePlan, identities: Sequence[Any], report: RestoreReport,
             say: Callable[[str], None], database: str, owner: Optional[str], target_exists: bool) -> None:
    # 5. restore into a new database, then prove it
    stamp = utc.stamp()
    scratch = "%s_restore_%s" % (database, stamp)
    say("restoring into %s" % scratch)
    restored = restore_into(server, plan.backup, scratch, identities, owner=owner)
    report.step("restore", "restored into %s" % scratch)
    _compare(server, plan, scratch, report, restored)
    # 6. swap, in one transaction; the old database is kept
    if target_exists:
        old = "%s_pre_restore_%s" % (database, stamp)
        # No ALLOW_CONNECTIONS false before the swap: killed in that window, the live database would be left
        # refusing every connection. Sessions are ended and the renames retried instead; the two renames are one
        # transaction, so at every moment the name `database` is a database that accepts connections.
        killed = 0
        for attempt in range(SWAP_TRIES):
            killed += terminate_sessions(server, database)
            try:
                server.transaction(["ALTER DATABASE %s RENAME TO %s" % (quote_ident(database), quote_ident(old)),
                                    "ALTER DATABASE %s RENAME TO %s" % (quote_ident(scratch), quote_ident(database))])
                break
            except BadInputError as error:
                if "being accessed by other users" not in error.message or attempt == SWAP_TRIES - 1:
                    raise
                time.sleep(0.2)
        report.old_database = old
        report.step("swap", "%s is now %s (kept until `db drop-old`); %s is now %s; %d sessions ended" % (
            database, old, scratch, database, killed))
    else:
        server.query("ALTER DATABASE %s RENAME TO %s" % (quote_ident(scratch), quote_ident(database)),
                     server.admin_database)
        report.step("swap", "%s is now %s" % (scratch, database))
    report.restored_database = database


def _space_check(server: Server, database: Optional[str], backup: BackupSet) -> str:
    """Room for a second copy beside the live one, where the data directory can be seen (else said so)."""
    import os

    needed = int(server.query("SELECT pg_database_size(%s)" % quote_literal(database), server.admin_database)[0][0]) \
        if database else os.path.getsize(backup.dump) * 4
    free = None
    try:
        data_dir = server.query("SHOW data_directory", server.admin_database)[0][0]
    except Exception:  # not a superuser: the data directory is not ours to see
        data_dir = None
    if data_dir and getattr(server, "mode", "") == "container":
        code, out, _err = server.exec_argv(["df", "-Pk", data_dir])
        lines = out.decode("utf-8", "replace").splitlines()
        if code == 0 and len(lines) > 1:
            free = int(lines[1].split()[3]) * 1024
    elif data_dir and os.path.isdir(data_dir):
        info = os.statvfs(data_dir)
        free = info.f_bavail * info.f_frsize
    if free is None:
        return "free space on the server not visible from here (need about %d MiB)" % (needed // 1048576)
    if free < needed * 1.1:
        raise EnvironmentProblem("not enough space for the restored copy: about %d MiB needed, %d MiB free on %s" % (
            needed // 1048576, free // 1048576, data_dir))
    return "%d MiB free for a copy of about %d MiB" % (free // 1048576, needed // 1048576)


def _owner(server: Server, database: str) -> str:
    return server.query("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s" %
                        quote_literal(database), server.admin_database)[0][0]


def _salvage_words(result: Dict[str, Any]) -> str:
    salvage = result.get("salvage")
    if not salvage:
        return ""
    return "; a salvage: %d rows of damaged tables read, about %d lost (%s)" % (
        salvage["rows_saved"], salvage["rows_lost_estimate"], "; ".join(salvage["damaged"][:5]))


def _compare(server: Server, plan: RestorePlan, dbname: str, report: RestoreReport, restored: Restored) -> None:
    """The restored database against the set's sidecar; on any difference it is dropped, the live one untouched."""
    sidecar = plan.backup.load_sidecar()
    if not sidecar:
        report.step("compare", "no sidecar (a plain SQL set): row counts and schema not compared")
        return
    problems = compare_restored(server, dbname, sidecar, restored)
    if problems:
        report.step("compare", "; ".join(problems[:5]), ok=False)
        drop_database(server, dbname)
        raise VerificationFailed("the restored database differs from the set's sidecar (%s); it was dropped and "
                                 "the live database is untouched" % problems[0])
    said = "%d tables: row counts and schema hash match the sidecar" % len(sidecar.get("tables") or {})
    if restored.properties_applied:
        said += "; owner, grants, settings, comment and extension versions match"
    elif "database_properties" not in sidecar:
        said += "; the set predates database properties (grants, settings): not compared"
    if restored.not_valid:
        said += "; added NOT VALID, as rows they point to were lost: %s" % ", ".join(restored.not_valid)
    report.step("compare", said)


def _migrate(api_container: str, report: RestoreReport) -> None:
    from toolkit.containers.engine import client

    container = client(timeout=600).containers.get(api_container)
    result = container.exec_run(["alembic", "upgrade", "head"], demux=True)
    ok = result.exit_code == 0
    output = b"".join(part or b"" for part in result.output).decode("utf-8", "replace").strip().splitlines()
    report.step("migrate", "alembic upgrade head in %s: exit %s %s" % (api_container, result.exit_code,
                                                                     output[-1] if output else ""), ok=ok)
    if not ok:
        raise EnvironmentProblem("alembic upgrade head failed in %s (the restored database is in place)" %
                                 api_container)


def drop_old(server: Server, name: str) -> None:
    if "_pre_restore_" not in name:
        raise UsageError("db drop-old only drops a _pre_restore_ database, not %s" % name)
    if not database_exists(server, name):
        raise UsageError("no database %s" % name)
    drop_database(server, name)
