"""Continuous archiving: `backup wal enable` points the server's archive_command at the archive directory and
proves it by archiving one segment; `backup wal status` judges the archive's continuity and the server's
archiver, and warns before a failing archive fills pg_wal's disk.

Why archive_command and not a supervised pg_receivewal: the server itself retries a failed segment and keeps it
in pg_wal until it is archived, so no segment is lost while nothing of ours runs (the kit is on a USB stick, not
a daemon); pg_receivewal would need a service of its own, a replication slot to be as safe, and that slot fills
the disk just as surely when the receiver stops. The price, that a failing archive grows pg_wal, is what
`status` watches.

Invariants:
- enable refuses before any change when the server cannot write the directory (not on this host, or not its
  user's), when wal_level is minimal, or when another archive_command is set (never quoted: it may hold a secret).
- status reads the archive by names only and the server when it answers; it exits 5 on a gap or a failing
  archiver, 0 otherwise (warnings said).
"""
from __future__ import annotations

import os
import time
from typing import Any, Dict, List, Optional

from toolkit.db import wal
from toolkit.db.server import Server
from toolkit.errors import EnvironmentProblem, UsageError

PROVE_SECONDS = 60.0


def _settings(server: Server) -> Dict[str, str]:
    # with archive_mode off, `setting` shows archive_command as "(disabled)" whatever it is: reset_val is the value
    rows = server.query("SELECT name, CASE WHEN name = 'archive_command' AND setting = '(disabled)' THEN reset_val "
                        "ELSE setting END FROM pg_settings WHERE name IN ('archive_mode', 'archive_command', "
                        "'wal_level', 'data_directory', 'wal_segment_size', 'archive_library')")
    return {name: value or "" for name, value in rows}


def enable(server: Server, archive_dir: str, restart: bool = False) -> Dict[str, Any]:
    """Host mode: the server writes archive_dir itself. Container mode: archive_dir must be on a writable mount of
    the container (compose: `- /opt/bookgen/backups/wal:/var/lib/postgresql/wal-archive`), and the command names it
    as the container sees it; --restart restarts the container when archive_mode needs it."""
    settings = _settings(server)
    if settings["wal_level"] == "minimal":
        raise EnvironmentProblem("wal_level is minimal: WAL cannot be archived (set wal_level = replica and restart)")
    archive_dir = os.path.abspath(archive_dir)
    data_directory = settings["data_directory"]
    if server.mode == "container":
        seen_as = server.container_path(archive_dir)
        data_on_host = server.host_path(data_directory)
        if seen_as is None:
            raise UsageError("%s is not on a writable mount of %s: the server could not write there: nothing was "
                             "changed" % (archive_dir, server.description),
                             hint="add a volume to its compose service, e.g. `- %s:/var/lib/postgresql/wal-archive`, "
                                  "and recreate it" % archive_dir)
    elif server.mode == "host":
        seen_as, data_on_host = archive_dir, data_directory
        if not os.path.isdir(data_directory):
            raise EnvironmentProblem("the server's data directory %s is not on this host: its archive_command could "
                                     "not write %s" % (data_directory, archive_dir))
    else:
        raise UsageError("backup wal enable needs the server (--dsn on its host, or --container)")
    try:
        command = wal.archive_command(seen_as)
    except ValueError as error:
        raise UsageError(str(error)) from None
    current = settings.get("archive_command", "")
    if current and current != command:
        raise UsageError("archive_command is already set, to another command (%d characters, not shown): nothing "
                         "was changed" % len(current), hint="clear it (ALTER SYSTEM RESET archive_command) first")
    if settings.get("archive_library"):
        raise UsageError("archive_library is set: archiving is done by a module, not changed here")
    owner = os.stat(data_on_host) if data_on_host and os.path.isdir(data_on_host) else None
    if server.mode == "host":
        blocked = _first_unreachable(os.path.dirname(archive_dir), owner.st_uid, owner.st_gid)
        if blocked:
            raise EnvironmentProblem("the server runs as uid %d, which cannot reach %s (%s is closed to it): nothing "
                                     "was changed" % (owner.st_uid, archive_dir, blocked),
                                     hint="choose an archive directory the server's user can reach (--archive-dir)")
    os.makedirs(archive_dir, mode=0o700, exist_ok=True)
    if owner is not None:
        os.chown(archive_dir, owner.st_uid, owner.st_gid)
    os.chmod(archive_dir, 0o700)
    if server.mode == "container" and not server.can_write(seen_as):
        raise EnvironmentProblem("%s (%s inside %s) is not writable by the server's user there: nothing was "
                                 "changed" % (archive_dir, seen_as, server.description),
                                 hint="chown it to the uid the server runs as in the container")
    changed = []
    if current != command:
        server.query("ALTER SYSTEM SET archive_command = %s" % _literal(command))
        changed.append("archive_command")
    if settings["archive_mode"] == "off":
        server.query("ALTER SYSTEM SET archive_mode = 'on'")
        changed.append("archive_mode")
    server.query("SELECT pg_reload_conf()")
    result: Dict[str, Any] = {"archive": archive_dir, "archive_in_server": seen_as, "changed": changed,
                              "command": command}
    if settings["archive_mode"] == "off":
        if restart and server.mode == "container":
            server.restart()
            _wait_answering(server)
            result["restarted"] = server.description
        else:
            result["restart_needed"] = True
            result["next"] = ("archive_mode takes effect when the server restarts: restart it (%s), then run "
                              "`bookgen-kit backup wal status`" % (
                                  "docker restart %s, or --restart" % server.container_name
                                  if server.mode == "container" else
                                  "systemctl restart postgresql, or pg_ctl restart -D %s" % data_directory))
            return result
    result["proof"] = prove(server, archive_dir)
    return result


def _wait_answering(server: Server, timeout: float = 120.0) -> None:
    from toolkit.errors import KitError

    deadline = time.monotonic() + timeout
    while True:
        try:
            server.query("SELECT 1")
            return
        except KitError:
            if time.monotonic() > deadline:
                raise EnvironmentProblem("%s does not answer %.0f s after its restart" % (server.description,
                                                                                         timeout)) from None
            time.sleep(0.5)


def _first_unreachable(directory: str, uid: int, gid: int) -> Optional[str]:
    """The first existing directory on the way to `directory` that uid/gid may not search (x), else None."""
    import stat

    path = "/"
    for part in [p for p in directory.split("/") if p]:
        path = os.path.join(path, part)
        try:
            info = os.stat(path)
        except FileNotFoundError:
            return None  # made below, by root, for the server's user
        if not stat.S_ISDIR(info.st_mode):
            return path
        if uid != 0 and not class_bits(info, uid, gid) & 1:
            return path
    return None


def class_bits(info: os.stat_result, uid: int, gid: int) -> int:
    """The rwx bits (0-7) that apply to uid/gid on this file: its owner's, its group's or everyone else's."""
    shift = 6 if info.st_uid == uid else 3 if info.st_gid == gid else 0
    return (info.st_mode >> shift) & 7


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def prove(server: Server, archive_dir: str, timeout: float = PROVE_SECONDS) -> Dict[str, Any]:
    """A restore point (a WAL record), the segment switched, and waited for in the archive."""
    server.query("SELECT pg_create_restore_point('bookgen-kit wal check')")
    name = server.query("SELECT pg_walfile_name(pg_switch_wal())")[0][0]
    started = time.monotonic()
    deadline = started + timeout
    path = os.path.join(archive_dir, name)
    while not os.path.isfile(path):
        if time.monotonic() > deadline:
            failed = server.query("SELECT failed_count, last_failed_wal FROM pg_stat_archiver")[0]
            raise EnvironmentProblem("segment %s was not archived within %.0f s (the archiver failed %s times, last "
                                     "on %s): see the server's log" % (name, timeout, failed[0], failed[1]))
        time.sleep(0.1)
    return {"segment": name, "seconds": round(time.monotonic() - started, 2)}


def status(archive_dir: str, server: Optional[Server], segment_size: Optional[int] = None) -> Dict[str, Any]:
    """The archive's continuity, and the server's archiver and pg_wal when it answers."""
    if not os.path.isdir(archive_dir):
        raise UsageError("no WAL archive at %s" % archive_dir, hint="`bookgen-kit backup wal enable` makes one")
    problems: List[str] = []
    warnings: List[str] = []
    live: Dict[str, Any] = {}
    if server is not None:
        live = _server_side(server, archive_dir, problems, warnings)
        segment_size = segment_size or live.get("wal_segment_size")
    archive = wal.read_archive(archive_dir, segment_size or wal.DEFAULT_SEGMENT_SIZE)
    record = archive.record()
    for line in record["timelines"]:
        for gap in line["gaps"]:
            problems.append("gap: %s to %s missing (%d segments): no restore can go past the segment before it" % (
                gap["from"], gap["to"], gap["missing"]))
    if not record["timelines"]:
        warnings.append("the archive holds no segment yet")
    stray = [name for name in record["stray"] if not name.startswith(".")]
    if stray:
        warnings.append("%d names that are not WAL segments: %s" % (len(stray), ", ".join(stray[:5])))
    return {"archive": record, "server": live, "problems": problems, "warnings": warnings, "ok": not problems}


def _ours(command: str, archive_dir: str) -> bool:
    try:
        return command == wal.archive_command(os.path.abspath(archive_dir))
    except ValueError:
        return False


def _server_side(server: Server, archive_dir: str, problems: List[str], warnings: List[str]) -> Dict[str, Any]:
    settings = _settings(server)
    archiver = server.query("SELECT archived_count, last_archived_wal, last_archived_time, failed_count, "
                            "last_failed_wal, last_failed_time, last_failed_time > coalesce(last_archived_time, "
                            "'-infinity') FROM pg_stat_archiver")[0]
    current = server.query("SELECT pg_walfile_name(pg_current_wal_lsn()), (SELECT coalesce(sum(size), 0) FROM "
                           "pg_ls_waldir()), (SELECT count(*) FROM pg_ls_archive_statusdir() WHERE name LIKE "
                           "'%.ready')")[0]
    live: Dict[str, Any] = {
        "archive_mode": settings["archive_mode"],
        "archive_command_ours": _ours(settings["archive_command"], archive_dir if server.mode != "container" else
                                      server.container_path(archive_dir) or archive_dir),
        "current_segment": current[0], "pg_wal_bytes": int(current[1]), "waiting_to_archive": int(current[2]),
        "archived_count": int(archiver[0]), "last_archived": archiver[1], "last_archived_time": archiver[2],
        "failed_count": int(archiver[3]), "last_failed": archiver[4], "last_failed_time": archiver[5],
        "wal_segment_size": int(settings["wal_segment_size"]) if settings["wal_segment_size"].isdigit() else None,
    }
    if settings["archive_mode"] == "off":
        problems.append("archive_mode is off: nothing is archived")
    elif not live["archive_command_ours"]:
        warnings.append("archive_command is not the one `backup wal enable` sets for %s" % archive_dir)
    pg_wal = os.path.join(settings["data_directory"], "pg_wal")
    if server.mode == "container":
        pg_wal = server.host_path(pg_wal) or ""
    free = None
    if pg_wal and os.path.isdir(pg_wal):
        info = os.statvfs(pg_wal)
        free = info.f_bavail * info.f_frsize
        live["pg_wal_free_bytes"] = free
    if archiver[6] in ("True", "true", "t"):
        problems.append("the archiver is failing since %s (%d failures, last on %s): pg_wal keeps every segment "
                        "until it succeeds: %d MiB now, %d segments waiting%s" % (
                            archiver[5], live["failed_count"], archiver[4], live["pg_wal_bytes"] >> 20,
                            live["waiting_to_archive"], ", %d MiB free on its filesystem" % (free >> 20)
                            if free is not None else ""))
        if free is not None and free < max(4 * live["pg_wal_bytes"], 1 << 30):
            problems.append("pg_wal will fill its disk soon: %d MiB free, pg_wal %d MiB and growing" % (
                free >> 20, live["pg_wal_bytes"] >> 20))
    elif live["waiting_to_archive"] > 2:
        warnings.append("%d segments wait to be archived" % live["waiting_to_archive"])
    return live
