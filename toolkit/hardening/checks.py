"""The hardening checks, one class each, registered in CHECKS."""
from __future__ import annotations

import json
import os
import posixpath
import re
import stat
from typing import Dict, List, Optional, Tuple

from toolkit.hardening.base import FAIL, NOT_APPLICABLE, PASS, Change, Check, CheckResult, Finding, HardenContext
from toolkit.host.hostfs import WalkLimits

APP_WALK_LIMIT = 200000  # entries of the app directory inspected for world-writable files

OUR_PREFIX = "90-bookgen-kit"


# --------------------------------------------------------------------------- sshd
SSHD_WANTED = {"permitrootlogin": "no", "passwordauthentication": "no", "maxauthtries": "3", "logingracetime": "30",
               "x11forwarding": "no", "allowagentforwarding": "no", "allowtcpforwarding": "no", "loglevel": "VERBOSE"}
SSHD_DEFAULTS = {"permitrootlogin": "prohibit-password", "passwordauthentication": "yes", "maxauthtries": "6",
                 "logingracetime": "120", "x11forwarding": "no", "allowagentforwarding": "yes",
                 "allowtcpforwarding": "yes", "loglevel": "INFO"}
SSHD_NAMES = {"permitrootlogin": "PermitRootLogin", "passwordauthentication": "PasswordAuthentication",
              "maxauthtries": "MaxAuthTries", "logingracetime": "LoginGraceTime", "x11forwarding": "X11Forwarding",
              "allowagentforwarding": "AllowAgentForwarding", "allowtcpforwarding": "AllowTcpForwarding",
              "loglevel": "LogLevel"}
SSHD_CONFIG = "/etc/ssh/sshd_config"


def _seconds(text: str) -> int:
    total = 0
    for number, unit in re.findall(r"(\d+)([smhdwSMHDW]?)", text):
        total += int(number) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[unit.lower()]
    return total


def sshd_effective(ctx: HardenContext) -> Dict[str, Tuple[str, str]]:
    """keyword -> (value, where), first occurrence outside Match blocks wins (as sshd reads it)."""
    found: Dict[str, Tuple[str, str]] = {}

    def read(logical: str) -> None:
        text = ctx.read(logical)
        if text is None:
            return
        in_match = False
        for number, line in enumerate(text.splitlines(), 1):
            stripped = line.strip()
            if not stripped or stripped.startswith("#"):
                continue
            parts = stripped.split(None, 1)
            keyword, value = parts[0].lower(), (parts[1] if len(parts) > 1 else "").strip()
            if keyword == "match":
                in_match = True
                continue
            if in_match:
                continue
            if keyword == "include":
                for pattern in value.split():
                    pattern = pattern if pattern.startswith("/") else posixpath.join("/etc/ssh", pattern)
                    directory, name_pattern = posixpath.split(posixpath.normpath(pattern))
                    for path in ctx.glob(directory, name_pattern):
                        read(path)
                continue
            found.setdefault(keyword, (value, "%s:%d" % (logical, number)))

    read(SSHD_CONFIG)
    return found


class SshdCheck(Check):
    id = "sshd"
    title = "sshd: no root login, keys only, few tries, short grace, no forwarding, verbose logs"
    why = "SSH is the way in that stays open; password guessing and forwarding are how it is abused"
    weight = 20

    def check(self, ctx: HardenContext) -> CheckResult:
        if ctx.read(SSHD_CONFIG) is None:
            return self.result(NOT_APPLICABLE, seen=["no %s" % SSHD_CONFIG])
        effective = sshd_effective(ctx)
        findings, seen = [], []
        for keyword, wanted in SSHD_WANTED.items():
            value, where = effective.get(keyword, (SSHD_DEFAULTS[keyword], "default (not set)"))
            if keyword == "maxauthtries":
                ok = value.isdigit() and int(value) <= int(wanted)
            elif keyword == "logingracetime":
                ok = 0 < _seconds(value) <= int(wanted)
            else:
                ok = value.lower() == wanted.lower()
            text = "%s %s (%s)" % (SSHD_NAMES[keyword], value, where)
            (seen if ok else findings).append(text if ok else Finding(SSHD_NAMES[keyword], text))
        return self.result(FAIL if findings else PASS, findings, seen)

    def plan(self, ctx: HardenContext) -> List[Change]:
        before = ctx.read(SSHD_CONFIG)
        if before is None or self.check(ctx).status != FAIL:
            return []
        block = "# bookgen-kit harden: first values win in sshd_config, so these lead\n" + "".join(
            "%s %s\n" % (SSHD_NAMES[k], v) for k, v in SSHD_WANTED.items()) + "# end bookgen-kit harden\n\n"
        return [Change("file", "lead %s with the hardened settings (validated with sshd -t before reload)" %
                       SSHD_CONFIG, SSHD_CONFIG, before, block + before, 0o644)]


# --------------------------------------------------------------------------- sysctl
SYSCTL_WANTED = {
    "kernel.kptr_restrict": "2", "kernel.dmesg_restrict": "1", "kernel.randomize_va_space": "2",
    "kernel.yama.ptrace_scope": "1", "fs.protected_hardlinks": "1", "fs.protected_symlinks": "1",
    "fs.suid_dumpable": "0", "net.ipv4.conf.all.rp_filter": "1", "net.ipv4.conf.default.rp_filter": "1",
    "net.ipv4.conf.all.accept_redirects": "0", "net.ipv4.conf.default.accept_redirects": "0",
    "net.ipv4.conf.all.secure_redirects": "0", "net.ipv4.conf.all.send_redirects": "0",
    "net.ipv4.conf.default.send_redirects": "0", "net.ipv4.conf.all.accept_source_route": "0",
    "net.ipv4.conf.all.log_martians": "1", "net.ipv4.icmp_echo_ignore_broadcasts": "1",
    "net.ipv4.tcp_syncookies": "1", "net.ipv6.conf.all.accept_redirects": "0",
    "net.ipv6.conf.default.accept_redirects": "0", "net.ipv4.ip_forward": "0",
}
SYSCTL_FILE = "/etc/sysctl.d/%s.conf" % OUR_PREFIX


def configured_sysctls(ctx: HardenContext) -> Dict[str, Tuple[str, str]]:
    values: Dict[str, Tuple[str, str]] = {}
    files = ["/etc/sysctl.conf"] + ctx.glob("/etc/sysctl.d", "*.conf")
    for logical in files:
        for number, line in enumerate((ctx.read(logical) or "").splitlines(), 1):
            line = line.strip()
            if "=" in line and not line.startswith(("#", ";")):
                key, value = (part.strip() for part in line.lstrip("-").split("=", 1))
                values[key.replace("/", ".")] = (value, "%s:%d" % (logical, number))
    return values


class SysctlCheck(Check):
    id = "sysctl"
    title = "kernel and network sysctls (the dev-sec set)"
    why = "kernel pointers, ptrace, redirects and spoofed sources are what local and network attacks lean on"
    weight = 15

    def wanted(self, ctx: HardenContext) -> Dict[str, str]:
        wanted = dict(SYSCTL_WANTED)
        if ctx.docker_present:
            wanted.pop("net.ipv4.ip_forward")  # turning forwarding off breaks every container's network
        return wanted

    def check(self, ctx: HardenContext) -> CheckResult:
        findings, seen = [], []
        configured = configured_sysctls(ctx)
        for key, wanted in self.wanted(ctx).items():
            if ctx.live:
                path = "/proc/sys/" + key.replace(".", "/")
                try:
                    with open(path, encoding="ascii") as handle:
                        value, where = handle.read().strip(), path
                except OSError:
                    continue  # not in this kernel
            else:
                value, where = configured.get(key, ("(kernel default)", "not configured"))
            if value == wanted:
                seen.append("%s = %s (%s)" % (key, value, where))
            else:
                findings.append(Finding(key, "%s = %s, want %s (%s)" % (key, value, wanted, where)))
        return self.result(FAIL if findings else PASS, findings, seen)

    def plan(self, ctx: HardenContext) -> List[Change]:
        if self.check(ctx).status != FAIL:
            return []
        wanted = self.wanted(ctx)
        if ctx.live:  # only what this kernel has (no Yama, no IPv6...): sysctl -p stops at an unknown key
            wanted = {k: v for k, v in wanted.items() if os.path.exists("/proc/sys/" + k.replace(".", "/"))}
        content = "# written by bookgen-kit harden\n" + "".join("%s = %s\n" % kv for kv in wanted.items())
        return [Change("file", "the hardened sysctls, loaded at boot", SYSCTL_FILE, ctx.read(SYSCTL_FILE) or "",
                       content, 0o644),
                Change("command", "load them now (-e: a key this kernel lacks is skipped, not fatal)",
                       argv=["sysctl", "-e", "-p", SYSCTL_FILE])]


# --------------------------------------------------------------------------- permissions
class PermissionsCheck(Check):
    id = "permissions"
    title = ".env 0600, backups 0700, docker.sock 0660 root:docker, nothing world-writable in the app"
    why = "the .env and the backups hold every secret and all the data; docker.sock is root on the host"
    weight = 15

    def check(self, ctx: HardenContext) -> CheckResult:
        findings, seen = [], []
        for logical, wanted in ((ctx.deployment.env_path, 0o600), (ctx.deployment.backups_dir, 0o700)):
            info = ctx.lstat(logical)
            if info is None:
                continue
            mode = stat.S_IMODE(info.st_mode)
            if mode & ~wanted:
                findings.append(Finding(logical, "%s is %04o, want %04o" % (logical, mode, wanted)))
            else:
                seen.append("%s %04o" % (logical, mode))
        info = ctx.lstat("/run/docker.sock") or ctx.lstat("/var/run/docker.sock")
        if info is not None and stat.S_ISSOCK(info.st_mode):
            mode = stat.S_IMODE(info.st_mode)
            if mode & 0o007:
                findings.append(Finding("docker.sock", "/var/run/docker.sock is %04o: others can use it" % mode))
            else:
                seen.append("/var/run/docker.sock %04o" % mode)
        for entry in ctx.fs.walk(ctx.deployment.app_dir, WalkLimits(max_entries=APP_WALK_LIMIT)):
            info, logical = entry.info, entry.logical
            if entry.depth > 0:
                if info.st_mode & stat.S_IWOTH and not stat.S_ISLNK(info.st_mode):
                    findings.append(Finding(logical, "%s is world-writable (%04o)" % (logical,
                                                                                    stat.S_IMODE(info.st_mode))))
        return self.result(FAIL if findings else PASS, findings, seen)

    def plan(self, ctx: HardenContext) -> List[Change]:
        changes = []
        for finding in self.check(ctx).findings:
            if finding.item == ctx.deployment.env_path:
                changes.append(Change("mode", "the .env for its owner only", finding.item, mode=0o600,
                                      touches=[finding.item]))
            elif finding.item == ctx.deployment.backups_dir:
                changes.append(Change("mode", "backups for their owner only", finding.item, mode=0o700))
            elif finding.item == "docker.sock":
                changes.append(Change("mode", "docker.sock root:docker 0660", "/var/run/docker.sock", mode=0o660,
                                      owner=("root", "docker")))
            else:
                info = ctx.lstat(finding.item)
                if info is None:
                    continue
                changes.append(Change("mode", "not world-writable", finding.item, mode=stat.S_IMODE(info.st_mode) & ~0o002,
                                      touches=[finding.item] if stat.S_ISREG(info.st_mode) else []))
        return changes


# --------------------------------------------------------------------------- docker
PUBLISHED = re.compile(r"""^(\s*-\s*["']?)(?:(0\.0\.0\.0|\[::\]|::):)?(\d+)(:(5432|6379)(?:/tcp)?["']?\s*)$""")


class DockerCheck(Check):
    id = "docker"
    title = "Docker: no unauthenticated TCP socket; PostgreSQL and Redis not published on all addresses"
    why = "an open Docker API is root for anyone who reaches it; a published database port is the data"
    weight = 20

    def _compose_files(self, ctx: HardenContext) -> List[str]:
        app = ctx.deployment.app_dir
        return sorted(ctx.glob(app, "docker-compose*.y*ml") + ctx.glob(app, "compose*.y*ml"))

    def check(self, ctx: HardenContext) -> CheckResult:
        if not ctx.docker_present and not self._compose_files(ctx):
            return self.result(NOT_APPLICABLE, seen=["no Docker"])
        findings, seen = [], []
        daemon = ctx.read("/etc/docker/daemon.json")
        if daemon:
            try:
                settings = json.loads(daemon)
            except ValueError:
                settings = {}
                findings.append(Finding("daemon.json", "/etc/docker/daemon.json is not valid JSON"))
            hosts, tls = settings.get("hosts", []), settings.get("tlsverify") is True
            for host in hosts:
                if host.startswith("tcp://") and not tls:
                    findings.append(Finding("daemon.json", "/etc/docker/daemon.json hosts %s without tlsverify" % host))
        for unit in ["/lib/systemd/system/docker.service", "/usr/lib/systemd/system/docker.service"] + \
                ctx.glob("/etc/systemd/system/docker.service.d", "*.conf"):
            for number, line in enumerate((ctx.read(unit) or "").splitlines(), 1):
                if line.strip().startswith("ExecStart") and re.search(r"(-H|--host)[= ]tcp://", line) and \
                        "--tlsverify" not in line:
                    findings.append(Finding("docker.service", "%s:%d %s" % (unit, number, line.strip())))
        for compose in self._compose_files(ctx):
            for number, line in enumerate((ctx.read(compose) or "").splitlines(), 1):
                if PUBLISHED.match(line):
                    findings.append(Finding("published-port", "%s:%d %s" % (compose, number, line.strip())))
            seen.append("%s read" % compose)
        return self.result(FAIL if findings else PASS, findings, seen)

    def plan(self, ctx: HardenContext) -> List[Change]:
        changes = []
        for compose in self._compose_files(ctx):
            before = ctx.read(compose) or ""
            lines = before.splitlines(True)
            changed = False
            for index, line in enumerate(lines):
                match = PUBLISHED.match(line.rstrip("\n"))
                if match:
                    lines[index] = "%s127.0.0.1:%s%s\n" % (match.group(1), match.group(3), match.group(4).rstrip())
                    changed = True
            if changed:
                changes.append(Change("file", "publish PostgreSQL and Redis on loopback only", compose, before,
                                      "".join(lines)))
        return changes


# --------------------------------------------------------------------------- firewall (ufw)
UFW_STATE_FILES = ("/etc/ufw/ufw.conf", "/etc/ufw/user.rules", "/etc/ufw/user6.rules", "/etc/default/ufw")
AFTER_RULES_BLOCK = """
# BEGIN bookgen-kit DOCKER-USER
*filter
:DOCKER-USER - [0:0]
-A DOCKER-USER -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN
-A DOCKER-USER -i lo -j RETURN
-A DOCKER-USER -s 10.0.0.0/8 -j RETURN
-A DOCKER-USER -s 172.16.0.0/12 -j RETURN
-A DOCKER-USER -s 192.168.0.0/16 -j RETURN
-A DOCKER-USER -p tcp -m multiport --dports 5432,6379 -j DROP
-A DOCKER-USER -j RETURN
COMMIT
# END bookgen-kit DOCKER-USER
"""


class FirewallCheck(Check):
    id = "firewall"
    title = "ufw: enabled, default deny incoming, only ssh/http/https; Docker ports filtered in DOCKER-USER"
    why = "the runbook's 'Block all external access' and 'ufw default deny incoming'; ufw alone does not see " \
          "ports Docker publishes"
    weight = 20

    def check(self, ctx: HardenContext) -> CheckResult:
        if not (ctx.exists("/usr/sbin/ufw") or ctx.exists("/etc/ufw")):
            return self.result(FAIL, [Finding("ufw", "not installed: needs package ufw")])
        findings, seen = [], []
        enabled = re.search(r"^ENABLED=(\w+)", ctx.read("/etc/ufw/ufw.conf") or "", re.M)
        if not enabled or enabled.group(1) != "yes":
            findings.append(Finding("enabled", "/etc/ufw/ufw.conf ENABLED=%s" % (enabled.group(1) if enabled else
                                                                                "(missing)")))
        policy = re.search(r'^DEFAULT_INPUT_POLICY="?(\w+)', ctx.read("/etc/default/ufw") or "", re.M)
        if not policy or policy.group(1) not in ("DROP", "REJECT"):
            findings.append(Finding("default", "/etc/default/ufw DEFAULT_INPUT_POLICY=%s" % (
                policy.group(1) if policy else "(missing)")))
        user_rules = ctx.read("/etc/ufw/user.rules") or ""
        for port in ctx.allowed_ports:
            if not re.search(r"^### tuple ### allow (tcp|any) %d " % port, user_rules, re.M):
                findings.append(Finding("allow %d" % port, "no 'allow %d' rule in /etc/ufw/user.rules" % port))
        for port in (5432, 6379):
            if re.search(r"^### tuple ### allow (tcp|any) %d 0\.0\.0\.0/0 any 0\.0\.0\.0/0 in" % port, user_rules,
                         re.M):
                findings.append(Finding("open %d" % port, "/etc/ufw/user.rules allows %d from anywhere" % port))
        if ctx.docker_present and "bookgen-kit DOCKER-USER" not in (ctx.read("/etc/ufw/after.rules") or ""):
            findings.append(Finding("DOCKER-USER", "/etc/ufw/after.rules has no DOCKER-USER filter: published "
                                                   "container ports bypass ufw"))
        if not findings:
            seen.append("ufw enabled, default deny, ssh/http/https allowed")
        return self.result(FAIL if findings else PASS, findings, seen)

    def plan(self, ctx: HardenContext) -> List[Change]:
        result = self.check(ctx)
        if result.status != FAIL:
            return []
        items = {f.item for f in result.findings}
        if "ufw" in items:
            return [Change("package", "install ufw from --packages DIR", package="ufw")]
        touches = list(UFW_STATE_FILES)
        changes = [Change("command", "deny incoming by default", argv=["ufw", "default", "deny", "incoming"],
                          touches=touches)]
        changes += [Change("command", "allow %d/tcp" % port, argv=["ufw", "allow", "%d/tcp" % port], touches=touches)
                    for port in ctx.allowed_ports]
        if "DOCKER-USER" in items:
            before = ctx.read("/etc/ufw/after.rules") or ""
            changes.append(Change("file", "filter Docker-published PostgreSQL/Redis ports in DOCKER-USER",
                                  "/etc/ufw/after.rules", before, before.rstrip("\n") + "\n" + AFTER_RULES_BLOCK,
                                  0o640))
        changes.append(Change("command", "check the rules first, then enable", argv=["ufw", "--dry-run", "enable"]))
        changes.append(Change("command", "enable", argv=["ufw", "--force", "enable"], touches=touches))
        return changes


# --------------------------------------------------------------------------- fail2ban
JAIL_FILE = "/etc/fail2ban/jail.d/%s.local" % OUR_PREFIX


def _jail_text(ctx: HardenContext) -> str:
    texts = [ctx.read("/etc/fail2ban/jail.local") or ""]
    for path in ctx.glob("/etc/fail2ban/jail.d", "*"):
        texts.append(ctx.read(path) or "")
    return "\n".join(texts)


class Fail2banCheck(Check):
    id = "fail2ban"
    title = "fail2ban: an sshd jail on this host's sshd log source, with incremental bans"
    why = "password guessing never stops on its own; bans that grow make it pointless"
    weight = 10

    def backend(self, ctx: HardenContext) -> str:
        return "auto" if ctx.exists("/var/log/auth.log") or ctx.exists("/var/log/secure") else "systemd"

    def check(self, ctx: HardenContext) -> CheckResult:
        if not (ctx.exists("/usr/bin/fail2ban-client") or ctx.exists("/etc/fail2ban")):
            return self.result(FAIL, [Finding("fail2ban", "not installed: needs package fail2ban")])
        text = _jail_text(ctx)
        findings = []
        sshd_section = re.search(r"^\[sshd\](.*?)(?=^\[|\Z)", text, re.M | re.S)
        if not sshd_section or not re.search(r"^\s*enabled\s*=\s*(true|yes|1)\s*$", sshd_section.group(1),
                                             re.M | re.I):
            findings.append(Finding("sshd jail", "no enabled [sshd] jail in jail.local or jail.d/"))
        if not re.search(r"^\s*bantime\.increment\s*=\s*(true|yes|1)\s*$", text, re.M | re.I):
            findings.append(Finding("bantime.increment", "bans do not grow (bantime.increment not true)"))
        return self.result(FAIL if findings else PASS, findings, ["jail.local and jail.d/ read"])

    def plan(self, ctx: HardenContext) -> List[Change]:
        result = self.check(ctx)
        if result.status != FAIL:
            return []
        if any(f.item == "fail2ban" for f in result.findings):
            return [Change("package", "install fail2ban from --packages DIR", package="fail2ban")]
        content = ("# written by bookgen-kit harden\n[DEFAULT]\nbantime = 1h\nbantime.increment = true\n"
                   "bantime.maxtime = 1w\nfindtime = 10m\nmaxretry = 5\n\n[sshd]\nenabled = true\nbackend = %s\n"
                   % self.backend(ctx))
        return [Change("file", "an sshd jail with incremental bans", JAIL_FILE, ctx.read(JAIL_FILE) or "", content,
                       0o644),
                Change("command", "validate before reload", argv=["fail2ban-client", "-t"]),
                Change("command", "reload", argv=["fail2ban-client", "reload"])]


# --------------------------------------------------------------------------- auditd
AUDIT_FILE = "/etc/audit/rules.d/%s.rules" % OUR_PREFIX


def audit_watches(ctx: HardenContext) -> List[Tuple[str, str, str]]:
    """(path, permissions, key): our watches, never -D and never -e 2."""
    watches = [(ctx.deployment.env_path, "rwa", "bookgen_env"), ("/var/run/docker.sock", "rwa", "bookgen_docker"),
               ("/usr/bin/docker", "x", "bookgen_docker"), ("/usr/bin/dockerd", "x", "bookgen_docker"),
               ("/etc/passwd", "wa", "bookgen_identity"), ("/etc/shadow", "wa", "bookgen_identity"),
               ("/etc/group", "wa", "bookgen_identity"), ("/etc/sudoers", "wa", "bookgen_identity"),
               ("/etc/sudoers.d", "wa", "bookgen_identity"), ("/etc/ssh/sshd_config", "wa", "bookgen_sshd"),
               ("/root/.ssh", "wa", "bookgen_authkeys"), ("/etc/crontab", "wa", "bookgen_cron"),
               ("/etc/cron.d", "wa", "bookgen_cron"), ("/var/spool/cron", "wa", "bookgen_cron"),
               ("/etc/systemd/system", "wa", "bookgen_systemd")]
    return [w for w in watches if ctx.exists(w[0])]


class AuditdCheck(Check):
    id = "auditd"
    title = "auditd: our own rules watch the .env, Docker, accounts, sudo, sshd, keys, cron and units"
    why = "after a breach the question is who touched what; only an audit trail answers it"
    weight = 10

    def check(self, ctx: HardenContext) -> CheckResult:
        if not (ctx.exists("/sbin/auditctl") or ctx.exists("/usr/sbin/auditctl")):
            return self.result(FAIL, [Finding("auditd", "not installed: needs package auditd")])
        present = ctx.read(AUDIT_FILE) or ""
        missing = [w for w in audit_watches(ctx) if "-w %s -p %s -k %s" % w not in present]
        findings = [Finding(w[0], "no watch on %s (key %s) in %s" % (w[0], w[2], AUDIT_FILE)) for w in missing]
        return self.result(FAIL if findings else PASS, findings, ["%s read" % AUDIT_FILE])

    def plan(self, ctx: HardenContext) -> List[Change]:
        result = self.check(ctx)
        if result.status != FAIL:
            return []
        if any(f.item == "auditd" for f in result.findings):
            return [Change("package", "install auditd from --packages DIR", package="auditd")]
        content = "# written by bookgen-kit harden (no -D, no -e 2: other rules stay, rules stay changeable)\n" + \
            "".join("-w %s -p %s -k %s\n" % w for w in audit_watches(ctx))
        return [Change("file", "our audit watches", AUDIT_FILE, ctx.read(AUDIT_FILE) or "", content, 0o640),
                Change("command", "load only our file (augenrules would replay the distribution's -D too)",
                       argv=["auditctl", "-R", AUDIT_FILE])]


CHECKS: List[Check] = [FirewallCheck(), Fail2banCheck(), AuditdCheck(), SshdCheck(), SysctlCheck(),
                       PermissionsCheck(), DockerCheck()]


def select(only: Optional[List[str]] = None) -> List[Check]:
    from toolkit.errors import UsageError

    known = {c.id for c in CHECKS}
    for name in only or []:
        if name not in known:
            raise UsageError("unknown check %r; known: %s" % (name, ", ".join(sorted(known))))
    return [c for c in CHECKS if not only or c.id in only]


def hardening_index(results: List[CheckResult]) -> int:
    """0-100: the weight of the checks that pass over the weight of those that apply (as Lynis weighs)."""
    applicable = [r for r in results if r.status != NOT_APPLICABLE]
    total = sum(r.weight for r in applicable)
    return round(100 * sum(r.weight for r in applicable if r.status == PASS) / total) if total else 100
