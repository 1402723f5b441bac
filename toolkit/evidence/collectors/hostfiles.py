"""Files read through the root prefix: logs, persistence places, executables in temporary directories."""
from __future__ import annotations

import glob
import os
import stat
import time
from typing import Iterator, List, Tuple

from toolkit.evidence.collectors.base import CollectionContext, Collector, Emitter

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
TMP_EXEC_CAP = 64 * 1024 * 1024
RECENT_UNIT_DAYS = 30


def accounts(context: CollectionContext) -> Iterator[Tuple[str, str]]:
    """(user, home) for every account in the root's /etc/passwd."""
    try:
        with open(context.host_path("/etc/passwd"), encoding="utf-8", errors="replace") as passwd:
            for line in passwd:
                fields = line.rstrip("\n").split(":")
                if len(fields) >= 6 and fields[5].startswith("/"):
                    yield fields[0], fields[5]
    except OSError:
        return


class LogCollector(Collector):
    name = "logs"
    rank = 60
    profiles = ("triage", "full")
    budget_seconds = 300.0
    description = "BookGen's logs and the system's (auth, syslog, kern, audit, nginx, journal), rotated ones too"

    def run(self, context: CollectionContext, emit: Emitter) -> None:
        for logical in list(context.deployment.log_dirs) + list(SYSTEM_LOGS):
            for candidate in sorted(glob.glob(context.host_path(logical) + "*")):
                relative = os.path.relpath(candidate, context.host_path("/"))
                logical_path = "/" + relative if context.root not in ("", "/") else candidate
                if candidate == context.host_path(logical) or os.path.basename(candidate).startswith(
                        os.path.basename(logical) + "."):
                    emit.tree(candidate, logical_path, context.max_file_size)


class AppBulkCollector(Collector):
    name = "app-data"
    rank = 95
    profiles = ("full",)
    budget_seconds = 1800.0
    description = "BookGen's generated files (bios/, docx/), profile full only"

    def run(self, context: CollectionContext, emit: Emitter) -> None:
        for logical in (context.deployment.bios_dir, context.deployment.docx_dir):
            emit.tree(context.host_path(logical), logical, context.max_file_size)


class PersistenceCollector(Collector):
    name = "persistence"
    rank = 65
    profiles = ("triage", "full")
    budget_seconds = 120.0
    description = "cron, systemd units, rc files, shell rc and histories, authorized_keys, accounts, sudo, sshd, PAM"

    def run(self, context: CollectionContext, emit: Emitter) -> None:
        for logical in PERSISTENCE_PATHS:
            host = context.host_path(logical)
            if os.path.lexists(host):
                emit.tree(host, logical, context.max_file_size)
        cutoff = time.time() - RECENT_UNIT_DAYS * 86400
        for logical_dir in UNIT_DIRS_ELSEWHERE:
            host_dir = context.host_path(logical_dir)
            if not os.path.isdir(host_dir) or os.path.islink(host_dir):
                continue
            for name in sorted(os.listdir(host_dir)):
                path = os.path.join(host_dir, name)
                try:
                    info = os.lstat(path)
                except OSError:
                    continue
                if max(info.st_mtime, info.st_ctime) >= cutoff:
                    emit.path(path, os.path.join(logical_dir, name), context.max_file_size)
        seen_homes = set()
        for user, home in accounts(context):
            if home in seen_homes or home in ("/", "/nonexistent", "/dev/null"):
                continue
            seen_homes.add(home)
            for name in HOME_FILES:
                logical = os.path.join(home, name)
                host = context.host_path(logical)
                if os.path.lexists(host):
                    emit.tree(host, logical, context.max_file_size)
        for logical in ("/etc/crontab", "/etc/cron.d", "/var/spool/cron"):
            self._facts_for(context, emit, logical, "cron")
        for _user, home in accounts(context):
            for name in (".ssh/authorized_keys", ".ssh/authorized_keys2"):
                self._facts_for(context, emit, os.path.join(home, name), "authorized_keys")
        for logical in ("/etc/systemd/system",) + UNIT_DIRS_ELSEWHERE:
            self._facts_for(context, emit, logical, "systemd_unit")

    @staticmethod
    def _facts_for(context: CollectionContext, emit: Emitter, logical: str, kind: str) -> None:
        host = context.host_path(logical)
        paths: List[str] = []
        if os.path.isfile(host) and not os.path.islink(host):
            paths = [host]
        elif os.path.isdir(host) and not os.path.islink(host):
            for current, _dirs, files in os.walk(host, followlinks=False):
                paths += [os.path.join(current, f) for f in files]
        for path in paths:
            try:
                info = os.lstat(path)
            except OSError:
                continue
            logical_path = "/" + os.path.relpath(path, context.host_path("/")) if context.root not in ("", "/") \
                else path
            emit.fact(kind, {"path": logical_path, "mtime": info.st_mtime, "ctime": info.st_ctime},
                      "files" + logical_path)


def _looks_executable(path: str, info: os.stat_result) -> bool:
    if info.st_mode & 0o111:
        return True
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError:
        return False
    return head == b"\x7fELF" or head.startswith(b"#!")


class TmpExecutablesCollector(Collector):
    name = "tmp-executables"
    rank = 40
    profiles = ("triage", "full")
    budget_seconds = 120.0
    description = "regular files with exec bits or ELF/script headers in /tmp, /var/tmp, /dev/shm"

    def run(self, context: CollectionContext, emit: Emitter) -> None:
        for logical_dir in TMP_DIRS:
            host_dir = context.host_path(logical_dir)
            if not os.path.isdir(host_dir):
                continue
            for current, dirs, files in os.walk(host_dir, followlinks=False):
                dirs[:] = [d for d in dirs if not d.startswith("bookgen-kit-")]
                for name in sorted(files):
                    path = os.path.join(current, name)
                    try:
                        info = os.lstat(path)
                    except OSError:
                        continue
                    if not stat.S_ISREG(info.st_mode) or not _looks_executable(path, info):
                        continue
                    logical = os.path.join(logical_dir, os.path.relpath(path, host_dir))
                    emit.path(path, logical, min(context.max_file_size, TMP_EXEC_CAP))
                    emit.fact("tmp_executable", {"path": logical, "mode": "%o" % info.st_mode,
                                                 "suid": bool(info.st_mode & (stat.S_ISUID | stat.S_ISGID)),
                                                 "size": info.st_size, "mtime": info.st_mtime}, "files" + logical)
