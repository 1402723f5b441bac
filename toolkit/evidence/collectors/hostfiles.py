"""Files read through the host filesystem object (context.fs): logs, persistence places, executables in
temporary directories. Nothing here opens a host path by itself (DESIGN.md principle 9)."""
from __future__ import annotations

import posixpath
import stat
import time
from typing import Any, Dict, Iterator, List, Tuple

from toolkit.evidence.collectors.base import CollectionContext, Collector, Emitter, host_member
from toolkit.host.accounts import accounts as host_accounts
from toolkit.host.hostfs import Refused, WalkEntry, WalkStats

SYSTEM_LOGS = ("/var/log/auth.log", "/var/log/secure", "/var/log/syslog", "/var/log/messages", "/var/log/kern.log",
               "/var/log/audit", "/var/log/nginx", "/var/log/journal", "/var/log/apt/history.log", "/var/log/dpkg.log")
PERSISTENCE_PATHS = ("/etc/crontab", "/etc/cron.d", "/etc/cron.hourly", "/etc/cron.daily", "/etc/cron.weekly",
                     "/etc/cron.monthly", "/var/spool/cron", "/etc/anacrontab", "/etc/systemd/system", "/etc/systemd/user",
                     "/etc/rc.local", "/etc/init.d", "/etc/profile", "/etc/profile.d", "/etc/bash.bashrc",
                     "/etc/environment", "/etc/passwd", "/etc/group", "/etc/shadow", "/etc/gshadow", "/etc/sudoers",
                     "/etc/sudoers.d", "/etc/ssh/sshd_config", "/etc/ssh/sshd_config.d", "/etc/hosts",
                     "/etc/resolv.conf", "/etc/ld.so.preload", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/pam.d",
                     "/etc/security", "/etc/udev/rules.d", "/etc/modules-load.d", "/etc/docker/daemon.json")
UNIT_DIRS_ELSEWHERE = ("/usr/lib/systemd/system", "/lib/systemd/system", "/usr/local/lib/systemd/system",
                       "/run/systemd/system")
HOME_FILES = (".bashrc", ".bash_profile", ".bash_login", ".bash_logout", ".profile", ".zshrc", ".zprofile",
              ".zshenv", ".bash_history", ".zsh_history", ".sh_history", ".python_history", ".mysql_history",
              ".psql_history", ".lesshst", ".viminfo", ".wget-hsts", ".ssh/authorized_keys", ".ssh/authorized_keys2",
              ".ssh/config", ".ssh/known_hosts", ".ssh/rc", ".config/systemd/user", ".config/autostart")
TMP_DIRS = ("/tmp", "/var/tmp", "/dev/shm")
TMP_EXEC_CAP = 64 * 1024 * 1024  # per file
TMP_EXEC_TOTAL_CAP = {"triage": 512 << 20, "full": None}  # all copies together (None: the output's room only)
TMP_EXEC_COUNT_CAP = {"triage": 5000, "full": None}
TMP_EXEC_LISTING = "volatile/tmp-executables.json"
RECENT_UNIT_DAYS = 30


def accounts(context: CollectionContext) -> Iterator[Tuple[str, str]]:
    """(user, home) for every account in the root's /etc/passwd, parsed here (no name-service lookup)."""
    for account in host_accounts(context.fs):
        if account.home.startswith("/"):
            yield account.name, account.home


def _listdir(context: CollectionContext, logical: str) -> List[str]:
    try:
        return context.fs.listdir(logical)
    except (OSError, Refused):
        return []


class LogCollector(Collector):
    name = "logs"
    rank = 60
    profiles = ("triage", "full")
    budget_seconds = 300.0
    description = "BookGen's logs and the system's (auth, syslog, kern, audit, nginx, journal), rotated ones too"

    def run(self, context: CollectionContext, emit: Emitter) -> None:
        for logical in list(context.deployment.log_dirs) + list(SYSTEM_LOGS):
            logical = posixpath.normpath("/" + logical.lstrip("/"))
            parent, base = posixpath.split(logical)
            try:
                names = context.fs.listdir(parent)
            except FileNotFoundError:
                continue
            except (OSError, Refused):  # e.g. /var/log a link on a live host: the path says why, the link is kept
                emit.tree(logical, context.max_file_size)
                continue
            for name in names:
                if name == base or name.startswith(base + "."):
                    emit.tree(posixpath.join(parent, name), context.max_file_size)


class AppBulkCollector(Collector):
    name = "app-data"
    rank = 95
    profiles = ("full",)
    budget_seconds = 1800.0
    description = "BookGen's generated files (bios/, docx/), profile full only"

    def run(self, context: CollectionContext, emit: Emitter) -> None:
        for logical in (context.deployment.bios_dir, context.deployment.docx_dir):
            emit.tree(logical, context.max_file_size)


class PersistenceCollector(Collector):
    def findings(self, facts: Dict[str, List[Dict[str, Any]]], judging: Any) -> Iterator[Dict[str, Any]]:
        """authorized_keys (high), a cron job or a systemd unit (medium) changed in the last days, unless the
        file matches its package (a routine upgrade touches hundreds of units)."""
        from toolkit.evidence.collectors import packages
        from toolkit.evidence.findings import RECENT_DAYS, finding

        pristine = packages.verified_ok(facts)
        for kind, title in (("authorized_keys", "authorized_keys changed"), ("cron", "cron job changed"),
                            ("systemd_unit", "systemd unit changed")):
            for fact in facts.get(kind, []):
                data = fact["data"]
                if data["path"] in pristine or max(data["mtime"], data["ctime"]) < judging.recent:
                    continue
                yield finding("recent-" + kind.replace("_", "-"), "high" if kind == "authorized_keys" else "medium",
                              "%s in the last %d days: %s" % (title, RECENT_DAYS, data["path"]), [fact["evidence"]],
                              path=data["path"], mtime=data["mtime"])

    name = "persistence"
    rank = 65
    profiles = ("triage", "full")
    budget_seconds = 120.0
    description = "cron, systemd units, rc files, shell rc and histories, authorized_keys, accounts, sudo, sshd, PAM"

    def run(self, context: CollectionContext, emit: Emitter) -> None:
        fs = context.fs
        for logical in PERSISTENCE_PATHS:
            emit.tree(logical, context.max_file_size)
        cutoff = time.time() - RECENT_UNIT_DAYS * 86400
        for logical_dir in UNIT_DIRS_ELSEWHERE:
            if not fs.is_dir(logical_dir):
                continue
            for name in _listdir(context, logical_dir):
                path = posixpath.join(logical_dir, name)
                try:
                    info = fs.lstat(path)
                except (OSError, Refused):
                    continue
                if max(info.st_mtime, info.st_ctime) >= cutoff:
                    emit.file(path, context.max_file_size)
        seen_homes = set()
        homes = [home for _user, home in accounts(context)]
        for home in homes:
            if home in seen_homes or home in ("/", "/nonexistent", "/dev/null"):
                continue
            seen_homes.add(home)
            for name in HOME_FILES:
                emit.tree(posixpath.join(home, name), context.max_file_size)
        for logical in ("/etc/crontab", "/etc/cron.d", "/var/spool/cron"):
            self._facts_for(context, emit, logical, "cron")
        for home in sorted(seen_homes):
            for name in (".ssh/authorized_keys", ".ssh/authorized_keys2"):
                self._facts_for(context, emit, posixpath.join(home, name), "authorized_keys")
        for logical in ("/etc/systemd/system",) + UNIT_DIRS_ELSEWHERE:
            self._facts_for(context, emit, logical, "systemd_unit")

    @staticmethod
    def _facts_for(context: CollectionContext, emit: Emitter, logical: str, kind: str) -> None:
        for entry in context.fs.walk(logical, context.walk_limits()):
            if stat.S_ISREG(entry.info.st_mode):
                emit.fact(kind, {"path": entry.logical, "mtime": entry.info.st_mtime, "ctime": entry.info.st_ctime},
                          host_member(entry.logical))


def looks_executable(context: CollectionContext, entry: WalkEntry) -> bool:
    """Exec bits, or an ELF or #! header (read through the walk's directory, O_NOATIME)."""
    if entry.info.st_mode & 0o111:
        return True
    try:
        with context.fs.open_at(entry.dir_fd, entry.name, entry.logical) as opened:
            head = opened.read(4)
    except (OSError, Refused):
        return False
    return head == b"\x7fELF" or head.startswith(b"#!")


class TmpExecutablesCollector(Collector):
    def findings(self, facts: Dict[str, List[Dict[str, Any]]], judging: Any) -> Iterator[Dict[str, Any]]:
        """SUID/SGID files in a temporary directory (from this collector and from the timeline's walk): one
        critical finding listing every path (a whole chroot left in /var/tmp is one thing)."""
        from toolkit.evidence.findings import SUSPICIOUS_DIRS, finding, first

        paths: Dict[str, set] = {}
        for fact in facts.get("suid", []):
            if fact["data"]["path"].startswith(SUSPICIOUS_DIRS):
                paths.setdefault(fact["data"]["path"], set()).add(fact["evidence"])
        for fact in facts.get("tmp_executable", []):
            if fact["data"].get("suid"):
                paths.setdefault(fact["data"]["path"], set()).add(fact["evidence"])
        if paths:
            names = sorted(paths)
            yield finding("suid-in-tmp", "critical", "%d SUID/SGID files in temporary directories: %s" % (
                len(names), first(names, 5)), set().union(*paths.values()), paths=names)

    name = "tmp-executables"
    rank = 40
    profiles = ("triage", "full")
    budget_seconds = 120.0
    description = "regular files with exec bits or ELF/script headers in /tmp, /var/tmp, /dev/shm, the most " \
                  "recently changed first (64 MiB a file; triage: 512 MiB and 5,000 files in all), and a listing " \
                  "of every one (our own output is known by device and inode, never by name)"

    def run(self, context: CollectionContext, emit: Emitter) -> None:
        found: List[Dict[str, Any]] = []
        for logical_dir in TMP_DIRS:
            stats = WalkStats()
            try:
                for entry in context.fs.walk(logical_dir, context.walk_limits(), stats):
                    info = entry.info
                    if not stat.S_ISREG(info.st_mode) or not looks_executable(context, entry):
                        continue
                    found.append({"path": entry.logical, "mode": "%o" % info.st_mode, "uid": info.st_uid,
                                  "suid": bool(info.st_mode & (stat.S_ISUID | stat.S_ISGID)),
                                  "size": info.st_size, "mtime": info.st_mtime, "ctime": info.st_ctime,
                                  "copied": False})
            finally:
                emit.walk_report(logical_dir, stats)
        per_file = min(context.max_file_size, TMP_EXEC_CAP)
        total_cap = TMP_EXEC_TOTAL_CAP.get(context.profile)
        count_cap = TMP_EXEC_COUNT_CAP.get(context.profile)
        copied, files, over = 0, 0, 0
        # the most recently changed first (ctime, which `touch -d` cannot set back), then the smallest: a flood of
        # planted executables, or a whole chroot left in /var/tmp, cannot push the newest ones out of the cap
        for row in sorted(found, key=lambda r: (-max(r["mtime"], r["ctime"]), r["size"], r["path"])):
            take = min(row["size"], per_file)
            if (total_cap is not None and copied + take > total_cap) or (count_cap is not None and files >= count_cap):
                over += 1
            elif emit.file(row["path"], per_file):
                copied += take
                files += 1
                row["copied"] = True
            emit.fact("tmp_executable", {key: row[key] for key in ("path", "mode", "suid", "size", "mtime",
                                                                   "copied")},
                      host_member(row["path"]) if row["copied"] else TMP_EXEC_LISTING)
        if over:
            emit.skip("/tmp, /var/tmp, /dev/shm", "%d executables not copied: the copies reached the profile's cap "
                      "(%s bytes, %s files; listed in %s)" % (over, total_cap, count_cap, TMP_EXEC_LISTING), "limit")
        emit.json(TMP_EXEC_LISTING, {"per_file_cap": per_file, "total_cap": total_cap, "count_cap": count_cap,
                                     "copied_bytes": copied, "copied_files": files, "entries": found},
                  "every executable found in the temporary directories (fstatat, and the first 4 bytes)")


STAGING_FILE_CAP = {"triage": 16 << 20, "full": None}  # per file (None: --max-file-size)
STAGING_TOTAL_CAP = {"triage": 256 << 20, "full": None}  # all copies together (None: no cap)
STAGING_COUNT_CAP = {"triage": 10000, "full": None}  # files copied (each is a member and a manifest entry)


class StagingCollector(Collector):
    """Staging areas in full: every file an intruder may have left in /tmp, /var/tmp and /dev/shm (scripts without
    the x bit, archives of stolen data), not only executables (tmp-executables, run before, has those)."""

    name = "staging"
    rank = 42
    profiles = ("triage", "full")
    budget_seconds = 300.0
    description = "every regular file in /tmp, /var/tmp, /dev/shm, the most recently changed first (triage: " \
                  "16 MiB a file, 256 MiB and 10,000 files in all; full: --max-file-size), and a listing of every name"

    def run(self, context: CollectionContext, emit: Emitter) -> None:
        per_file = STAGING_FILE_CAP.get(context.profile) or context.max_file_size
        per_file = min(per_file, context.max_file_size)
        total_cap = STAGING_TOTAL_CAP.get(context.profile)
        count_cap = STAGING_COUNT_CAP.get(context.profile)
        copied, files, listing, over = 0, 0, [], 0
        for logical_dir in TMP_DIRS:
            stats = WalkStats()
            try:
                for entry in context.fs.walk(logical_dir, context.walk_limits(), stats):
                    info = entry.info
                    listing.append({"path": entry.logical, "mode": "%o" % info.st_mode, "uid": info.st_uid,
                                    "size": info.st_size, "mtime": info.st_mtime, "ctime": info.st_ctime,
                                    "changed": max(info.st_mtime, info.st_ctime),
                                    "regular": stat.S_ISREG(info.st_mode),
                                    "copied": False})
            finally:
                emit.walk_report(logical_dir, stats)
        # the most recently changed first (ctime, which `touch -d` cannot set back), then the smallest: within the
        # cap, what was left during the incident comes before months of leftovers, whatever the directory order
        regular = [r for r in listing if r["regular"]]
        for row in sorted(regular, key=lambda r: (-r["changed"], r["size"], r["path"])):
            take = min(row["size"], per_file)
            if (total_cap is not None and copied + take > total_cap) or (count_cap is not None and files >= count_cap):
                over += 1
                continue
            if emit.file(row["path"], per_file):
                copied += take
                files += 1
                row["copied"] = True
        for row in listing:
            del row["regular"], row["changed"]
        if over:
            emit.skip("/tmp, /var/tmp, /dev/shm", "%d files not copied: the staging copies reached the profile's cap "
                      "(%s bytes, %s files; listed in volatile/staging.json)" % (over, total_cap, count_cap), "limit")
        emit.json("volatile/staging.json", {"per_file_cap": per_file, "total_cap": total_cap, "copied_bytes": copied,
                                            "entries": listing}, "listing of the staging areas (fstatat)")
