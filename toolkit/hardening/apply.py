"""`harden apply` and `harden rollback`: an undo bundle first, then each check's changes, validated by the tool
that owns them; a failing check is rolled back and apply stops. sshd gets a dead-man switch."""
from __future__ import annotations

import base64
import json
import os
import time
from typing import Any, Dict, List, Optional

from toolkit import utc
from toolkit.errors import BadInputError, EnvironmentProblem, UsageError
from toolkit.hardening.base import Change, HardenContext
from toolkit.host.atomic import make_state_dir, read_state, state_dir, write_state
from toolkit.host.programs import run_program

KEEP_LIMIT = 64 << 20  # a file kept in an undo bundle (configuration: far smaller)

BUNDLES = "/var/lib/bookgen-kit/harden"


def _write(path: str, data: bytes, mode: Optional[int], uid: Optional[int] = None, gid: Optional[int] = None) -> None:
    import tempfile

    from toolkit.host.atomic import fsync_directory

    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=".bookgen-kit.", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, mode if mode is not None else 0o644)
        if uid is not None:
            os.chown(temporary, uid, gid)
        os.replace(temporary, path)
        fsync_directory(directory)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


class Bundle:
    """Every file apply will touch, as it was (bytes, mode, owner, or absent), and the live state around it.

    The bundle is state: its directories and files go through toolkit.host.atomic's state functions (made 0700,
    never through a symlink or a directory others can write). The host files it restores are not state.
    """

    def __init__(self, ctx: HardenContext, directory: str) -> None:
        self.ctx = ctx
        self.directory = directory
        self.manifest_path = os.path.join(directory, "manifest.json")

    @classmethod
    def create(cls, ctx: HardenContext) -> "Bundle":
        base = ctx.path(os.path.join(BUNDLES, utc.stamp()))
        state_dir(os.path.dirname(base), create=True)
        directory, serial = base, 1
        while True:
            try:
                make_state_dir(directory, 0o700)
                break
            except FileExistsError:
                serial += 1
                directory = "%s-%d" % (base, serial)
        bundle = cls(ctx, directory)
        bundle._save({"created": utc.iso(), "root": ctx.root, "files": {},
                      "applied": [], "confirmed": False, "watchdog_pid": None})
        return bundle

    @classmethod
    def open(cls, ctx: HardenContext, path: Optional[str]) -> "Bundle":
        base = ctx.path(BUNDLES)
        if path is None:
            if os.path.lexists(base):
                state_dir(base)
            names = sorted(os.listdir(base), key=lambda n: (n.split("-")[0], int(n.split("-")[1]) if "-" in n
                                                            else 1)) if os.path.isdir(base) else []
            if not names:
                raise UsageError("no undo bundle in %s" % base)
            path = os.path.join(base, names[-1])
        if not os.path.lexists(os.path.join(path, "manifest.json")):  # a planted link is refused when read
            raise BadInputError("not an undo bundle: %s" % path)
        return cls(ctx, path)

    def load(self) -> Dict[str, Any]:
        data = read_state(self.manifest_path, limit=1 << 30, strict=True)
        if data is None:
            raise BadInputError("not an undo bundle: %s (no manifest.json)" % self.directory)
        try:
            return json.loads(data.decode("utf-8"))
        except ValueError:
            raise BadInputError("%s is not an undo bundle manifest (not JSON)" % self.manifest_path) from None

    def _save(self, document: Dict[str, Any]) -> None:
        write_state(self.manifest_path, json.dumps(document, indent=2, sort_keys=True).encode(), 0o600)

    def update(self, **changes) -> None:
        document = self.load()
        document.update(changes)
        self._save(document)

    def keep_file(self, logical: str) -> None:
        document = self.load()
        if logical in document["files"]:
            return
        path = self.ctx.path(logical)
        if os.path.lexists(path):
            info = os.lstat(path)
            data = self.ctx.fs.read_bytes(logical, KEEP_LIMIT)  # a regular file only, never a FIFO; bounded
            if len(data) >= KEEP_LIMIT:
                raise EnvironmentProblem("%s is larger than %d MiB: not kept in the undo bundle, nothing changed"
                                         % (logical, KEEP_LIMIT >> 20))
            document["files"][logical] = {"absent": False, "mode": info.st_mode & 0o7777, "uid": info.st_uid,
                                          "gid": info.st_gid, "data": base64.b64encode(data).decode("ascii")}
        else:
            document["files"][logical] = {"absent": True}
        self._save(document)

    def keep_mode(self, logical: str) -> None:
        document = self.load()
        info = os.lstat(self.ctx.path(logical))
        document.setdefault("modes", {}).setdefault(logical, {"mode": info.st_mode & 0o7777, "uid": info.st_uid,
                                                              "gid": info.st_gid})
        self._save(document)

    def restore_modes(self) -> List[str]:
        restored = []
        for logical, entry in self.load().get("modes", {}).items():
            path = self.ctx.path(logical)
            if os.path.lexists(path):
                os.chown(path, entry["uid"], entry["gid"])
                os.chmod(path, entry["mode"])
                restored.append(logical)
        return restored

    def record_state(self, name: str, program: str, args: List[str]) -> None:
        if not self.ctx.live:
            return
        run = run_program(program, args, timeout=20)
        write_state(os.path.join(self.directory, name),
                    run.stdout if not run.error else ("# %s: %s\n" % (program, run.error)).encode(), 0o600)

    def restore_file(self, logical: str) -> None:
        entry = self.load()["files"].get(logical)
        if entry is None:
            return
        path = self.ctx.path(logical)
        if entry["absent"]:
            if os.path.lexists(path):
                os.unlink(path)
        else:
            _write(path, base64.b64decode(entry["data"]), entry["mode"], entry["uid"], entry["gid"])


def install_package(ctx: HardenContext, package: str) -> Dict[str, Any]:
    """dpkg -i the package's .deb from --packages DIR (the responder's medium); never from a network."""
    import glob

    if not ctx.packages_dir:
        raise EnvironmentProblem("not installed: needs package %s" % package,
                                 hint="give --packages DIR holding %s_*.deb (and what it depends on)" % package)
    debs = sorted(glob.glob(os.path.join(ctx.packages_dir, "%s_*.deb" % package)))
    if not debs:
        raise EnvironmentProblem("not installed: needs package %s, and %s has no %s_*.deb" % (
            package, ctx.packages_dir, package))
    args = (["--root=%s" % ctx.root] if not ctx.live else []) + ["-i", debs[-1]]
    run = run_program("dpkg", args, timeout=600)
    if run.error or run.returncode != 0:
        raise EnvironmentProblem("dpkg could not install %s: %s" % (os.path.basename(debs[-1]), (
            run.error or run.stderr.decode("utf-8", "replace").strip().splitlines()[-1:])))
    return {"package": package, "deb": debs[-1], "binary": run.record()}


def _run_change(ctx: HardenContext, change: Change) -> Dict[str, Any]:
    if change.kind == "package":
        return install_package(ctx, change.package)
    if change.kind == "file":
        data = (change.after or "").encode()
        _write(ctx.path(change.path), data, change.mode)
        return {"file": change.path}
    if change.kind == "mode":
        path = ctx.path(change.path)
        if change.owner:
            import grp
            import pwd

            os.chown(path, pwd.getpwnam(change.owner[0]).pw_uid, grp.getgrnam(change.owner[1]).gr_gid)
        os.chmod(path, change.mode)
        return {"mode": "%04o" % change.mode, "path": change.path}
    if not ctx.live:
        return {"command": change.argv, "skipped": "not the live host (--root)"}
    run = run_program(change.argv[0], change.argv[1:], timeout=120)
    if run.error or run.returncode != 0:
        message = run.error or (run.stderr or run.stdout).decode("utf-8", "replace").strip().splitlines()[-1:]
        raise EnvironmentProblem("%s failed: %s" % (" ".join(change.argv), message))
    return {"command": change.argv, "binary": run.record()}


def _validate_sshd(ctx: HardenContext, change: Change) -> None:
    import tempfile

    if change.kind != "file":
        return
    with tempfile.NamedTemporaryFile("w", suffix=".sshd_config", delete=False) as handle:
        handle.write(change.after or "")
    try:
        os.makedirs("/run/sshd", exist_ok=True)
        run = run_program("sshd", ["-t", "-f", handle.name], timeout=20)
        if run.error or run.returncode != 0:
            raise EnvironmentProblem("the new sshd_config does not pass sshd -t: %s" % (
                run.error or run.stderr.decode("utf-8", "replace").strip()))
    finally:
        os.unlink(handle.name)


def _reload_sshd(ctx: HardenContext) -> Optional[str]:
    """SIGHUP to the listening sshd named by its pid file (never to a session's sshd)."""
    if not ctx.live:
        return None
    try:
        with open("/run/sshd.pid", encoding="ascii") as handle:
            pid = int(handle.read().strip())
        os.kill(pid, 1)
        return "SIGHUP to sshd (pid %d from /run/sshd.pid)" % pid
    except (OSError, ValueError):
        return "no running sshd found through /run/sshd.pid: reload it yourself"


def _remove_our_audit_rules(ctx: HardenContext) -> List[Dict[str, Any]]:
    """Delete exactly the watches we add, whichever are loaded (never -D: other rules stay)."""
    from toolkit.hardening.checks import audit_watches

    listed = run_program("auditctl", ["-l"], timeout=20).stdout.decode("utf-8", "replace")
    removed = []
    for path, permissions, key in audit_watches(ctx):
        if "-w %s " % path in listed and "-k %s" % key in listed:
            removed.append(run_program("auditctl", ["-W", path, "-p", permissions, "-k", key], timeout=20).record())
    return removed


def apply(ctx: HardenContext, checks, confirm_within: int = 300) -> Dict[str, Any]:
    bundle = Bundle.create(ctx)
    plans = [(check, check.plan(ctx)) for check in checks]
    for check, changes in plans:
        for change in changes:
            for path in ([change.path] if change.kind == "file" else []) + list(change.touches):
                if os.path.isfile(ctx.path(path)) or not os.path.lexists(ctx.path(path)):
                    bundle.keep_file(path)
            if change.kind == "mode":
                bundle.keep_mode(change.path)
    bundle.record_state("ufw-status.txt", "ufw", ["status", "verbose"])
    bundle.record_state("iptables-save.txt", "iptables-save", [])
    bundle.record_state("auditctl-l.txt", "auditctl", ["-l"])
    bundle.record_state("sysctl-a.txt", "sysctl", ["-a"])
    applied: List[Dict[str, Any]] = []
    for check, changes in plans:
        if not changes:
            continue
        done = []
        try:
            if check.id == "sshd":
                for change in changes:
                    _validate_sshd(ctx, change)
            if check.id == "auditd" and ctx.live:
                _remove_our_audit_rules(ctx)  # loading twice would fail on "rule exists"
            if changes and changes[0].kind == "package":
                done.append(_run_change(ctx, changes[0]))
                changes = check.plan(ctx)  # installed now: plan the configuration
                for change in changes:
                    for path in ([change.path] if change.kind == "file" else []) + list(change.touches):
                        bundle.keep_file(path)
            for change in changes:
                done.append(_run_change(ctx, change))
            if check.id == "sshd":
                done.append({"reload": _reload_sshd(ctx)})
        except BaseException as error:
            for change in changes:
                for path in ([change.path] if change.kind == "file" else []) + list(change.touches):
                    bundle.restore_file(path)
            bundle.update(applied=applied + [{"check": check.id, "failed": str(error)}])
            raise EnvironmentProblem("harden %s failed and was rolled back: %s" % (
                check.id, getattr(error, "message", str(error))), hint="undo bundle: %s" % bundle.directory) from None
        applied.append({"check": check.id, "changes": done})
        bundle.update(applied=applied)
    result = {"bundle": bundle.directory, "applied": applied}
    if any(item["check"] == "sshd" for item in applied):
        result["watchdog"] = start_watchdog(ctx, bundle, confirm_within)
    return result


def start_watchdog(ctx: HardenContext, bundle: Bundle, seconds: int) -> Dict[str, Any]:
    """A detached process that restores the old sshd_config unless `harden confirm` runs in time."""
    from toolkit.host.detached import spawn

    process = spawn("from toolkit.hardening.apply import watchdog; watchdog(%r, %r, %d)" % (
        ctx.root, bundle.directory, seconds))
    bundle.update(watchdog_pid=process.pid, confirm_by=time.time() + seconds)
    return {"pid": process.pid, "seconds": seconds,
            "note": "run `bookgen-kit harden confirm` within %d s, or the old sshd_config comes back" % seconds}


def watchdog(root: str, directory: str, seconds: int) -> None:
    """The dead-man switch's body (a detached process): wait, then put the old sshd_config back."""
    from toolkit.config import deployment

    ctx = HardenContext(root=root, deployment=deployment())
    bundle = Bundle(ctx, directory)
    deadline = time.time() + seconds
    while time.time() < deadline:
        if bundle.load().get("confirmed"):
            return
        time.sleep(1)
    if bundle.load().get("confirmed"):
        return
    bundle.restore_file("/etc/ssh/sshd_config")
    _reload_sshd(ctx)
    bundle.update(reverted_sshd=utc.iso())


def confirm(ctx: HardenContext, path: Optional[str]) -> Dict[str, Any]:
    bundle = Bundle.open(ctx, path)
    document = bundle.load()
    if document.get("reverted_sshd"):
        raise UsageError("too late: the dead-man switch restored the old sshd_config at %s" % document["reverted_sshd"])
    bundle.update(confirmed=True)
    pid = document.get("watchdog_pid")
    if pid:
        try:
            os.kill(pid, 15)
        except OSError:
            pass
    return {"bundle": bundle.directory, "confirmed": True}


def rollback(ctx: HardenContext, path: Optional[str]) -> Dict[str, Any]:
    bundle = Bundle.open(ctx, path)
    document = bundle.load()
    bundle.update(confirmed=True)  # a rollback supersedes the dead-man switch
    for logical in document["files"]:
        bundle.restore_file(logical)
    bundle.restore_modes()
    reloaded = []
    if ctx.live:
        applied = {item["check"] for item in document.get("applied", [])}
        if "firewall" in applied:
            enabled = "ENABLED=yes" in (ctx.read("/etc/ufw/ufw.conf") or "")
            run = run_program("ufw", ["--force", "enable"] if enabled else ["--force", "disable"], timeout=60)
            reloaded.append(run.record())
            # ufw does not own DOCKER-USER: take our rules out of it one by one (Docker's own stay)
            from toolkit.hardening.checks import AFTER_RULES_BLOCK

            for line in reversed(AFTER_RULES_BLOCK.splitlines()):
                if line.startswith("-A DOCKER-USER ") and line != "-A DOCKER-USER -j RETURN":
                    reloaded.append(run_program("iptables", ["-D"] + line.split()[1:], timeout=20).record())
        if "sshd" in applied:
            reloaded.append({"sshd": _reload_sshd(ctx)})
        if "fail2ban" in applied:
            reloaded.append(run_program("fail2ban-client", ["reload"], timeout=60).record())
        if "auditd" in applied:
            reloaded += _remove_our_audit_rules(ctx)
    return {"bundle": bundle.directory, "restored": sorted(document["files"]), "reloaded": reloaded}
