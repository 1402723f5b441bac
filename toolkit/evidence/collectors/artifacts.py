"""The rest of what UAC's ir_triage collects on Linux, read as files through context.fs (and /proc, /sys):
scheduled jobs beyond cron (systemd timers, transient and per-user units, at, anacron), udev, D-Bus,
polkit, XDG autostart, boot (grub, initramfs listing), binfmt_misc, kernel module taint, pinned eBPF
objects, audit rules, SSH client and host files (private keys judged for a passphrase, never copied),
journal files, web server logs, core dumps, the histories of shells and tools, and other container
runtimes' metadata.

Invariants: no host program runs but `auditctl -l` (absolute path, clean environment, timeout, sha256
recorded) when present; a private key's content never enters the bundle (its path, type, fingerprint of the
public half and whether it has a passphrase do); the rules that judge these facts are at the end of this file.
"""
from __future__ import annotations

import base64
import hashlib
import posixpath
import stat
import struct
from typing import Any, Dict, Iterator, List, Optional

from toolkit.evidence.collectors.base import CollectionContext, Collector, Emitter, host_member
from toolkit.evidence.collectors.hostfiles import accounts
from toolkit.host.hostfs import Refused

SYSTEM_TREES = (
    # scheduled and event-driven execution
    "/etc/systemd/system", "/run/systemd/transient", "/run/systemd/system", "/etc/systemd/user",
    "/var/spool/cron/atjobs", "/var/spool/cron/atspool", "/var/spool/at", "/var/spool/anacron", "/etc/anacrontab",
    "/etc/udev/rules.d", "/run/udev/rules.d", "/etc/dbus-1", "/etc/polkit-1", "/etc/xdg/autostart",
    "/etc/modprobe.d", "/etc/modules", "/etc/modules-load.d", "/etc/update-motd.d", "/etc/NetworkManager/dispatcher.d",
    # boot
    "/boot/grub/grub.cfg", "/boot/grub2/grub.cfg", "/etc/default/grub", "/etc/default/grub.d", "/etc/initramfs-tools",
    # audit, SSH
    "/etc/audit", "/etc/ssh/ssh_config", "/etc/ssh/ssh_config.d", "/etc/ssh/sshrc", "/etc/ssh/ssh_known_hosts",
    # logs that are not BookGen's
    "/run/log/journal", "/var/log/apache2", "/var/log/httpd", "/var/log/lastlog", "/var/log/faillog",
    "/var/log/cron", "/var/log/redis", "/var/log/postgresql",
    # other container runtimes' metadata (not their layers)
    "/etc/containers", "/var/lib/containers/storage/overlay-containers/containers.json",
    # virtual machines' definitions (libvirt)
    "/etc/libvirt/qemu", "/var/lib/libvirt/qemu/snapshot", "/etc/libvirt/lxc",
    "/var/lib/containers/storage/overlay-images/images.json", "/etc/containerd", "/run/containerd/containerd.toml",
)
CORE_DUMP_DIRS = ("/var/crash", "/var/lib/systemd/coredump", "/var/lib/apport/coredump")
# jobs that run later and leave little trace elsewhere: each one is a fact, judged below
SCHEDULED = {"at_job": ("/var/spool/cron/atjobs", "/var/spool/at"),
             "transient_unit": ("/run/systemd/transient",)}
CORE_DUMP_CAP = 64 << 20
HOME_TREES = (
    # shell histories (15 shells and their variants) and tool histories
    ".bash_history", ".zsh_history", ".zhistory", ".histfile", ".sh_history", ".ash_history", ".ksh_history",
    ".mksh_history", ".history", ".tcsh_history", ".csh_history", ".local/share/fish/fish_history",
    ".config/fish/fish_history", ".dash_history", ".yash_history", ".python_history", ".psql_history",
    ".rediscli_history", ".mysql_history", ".sqlite_history", ".node_repl_history", ".lesshst", ".viminfo",
    ".wget-hsts", ".ssh/known_hosts", ".ssh/known_hosts2", ".ssh/config", ".ssh/rc", ".config/systemd/user",
    ".config/autostart", ".local/share/containers/storage/overlay-containers/containers.json",
    ".gitconfig", ".git-credentials", ".config/git/config", ".nano_history", ".local/share/nano/search_history",
)
KEY_LIMIT = 1 << 20
# where virtual machine managers keep their machines (what UAC's live_response/vms asks virsh, VBoxManage...)
VM_PLACES = ("/etc/libvirt/qemu", "/etc/libvirt/lxc", "/var/lib/libvirt/qemu", "/var/lib/libvirt/images",
             "/etc/vmware", "/var/lib/vmware", "/etc/xen", "/var/lib/xen", "/var/lib/lxc", "/var/lib/lxd",
             "/var/snap/lxd/common/lxd", "/var/lib/multipass")
SSH_KEY_DIRS = ("/etc/ssh",)


def private_key_facts(data: bytes) -> Optional[Dict[str, Any]]:
    """Whether a file is an SSH/PEM private key, its type, and whether a passphrase protects it."""
    text = data.decode("ascii", "replace")
    if "-----BEGIN OPENSSH PRIVATE KEY-----" in text:
        body = text.split("-----BEGIN OPENSSH PRIVATE KEY-----", 1)[1].split("-----END", 1)[0]
        try:
            blob = base64.b64decode("".join(body.split()))
        except ValueError:
            return {"format": "openssh", "passphrase": None, "error": "not base64"}
        if not blob.startswith(b"openssh-key-v1\0"):
            return {"format": "openssh", "passphrase": None, "error": "not openssh-key-v1"}
        offset = len(b"openssh-key-v1\0")
        fields = []
        for _ in range(3):  # ciphername, kdfname, kdfoptions
            if offset + 4 > len(blob):
                return {"format": "openssh", "passphrase": None, "error": "truncated"}
            (length,) = struct.unpack(">I", blob[offset:offset + 4])
            fields.append(blob[offset + 4:offset + 4 + length])
            offset += 4 + length
        offset += 4  # number of keys
        public = b""
        if offset + 4 <= len(blob):
            (length,) = struct.unpack(">I", blob[offset:offset + 4])
            public = blob[offset + 4:offset + 4 + length]
        key_type = public[4:4 + struct.unpack(">I", public[:4])[0]].decode("ascii", "replace") if len(public) > 4 \
            else None
        return {"format": "openssh", "type": key_type, "cipher": fields[0].decode("ascii", "replace"),
                "passphrase": fields[0] != b"none",
                "public_sha256": base64.b64encode(hashlib.sha256(public).digest()).decode().rstrip("=")
                if public else None}
    for kind in ("RSA", "DSA", "EC", ""):
        begin = "-----BEGIN %sPRIVATE KEY-----" % (kind + " " if kind else "")
        if begin in text:
            return {"format": "pem", "type": kind.lower() or "pkcs8",
                    "passphrase": "Proc-Type: 4,ENCRYPTED" in text, "public_sha256": None}
    if "-----BEGIN ENCRYPTED PRIVATE KEY-----" in text:
        return {"format": "pem", "type": "pkcs8", "passphrase": True, "public_sha256": None}
    return None


class ArtifactsCollector(Collector):
    name = "artifacts"
    rank = 68
    profiles = ("triage", "full")
    budget_seconds = 300.0
    description = "timers, transient and per-user units, at, anacron, udev, D-Bus, polkit, XDG autostart, grub, " \
                  "binfmt_misc, module taint, pinned eBPF, audit rules, SSH keys (judged, not copied), journal, " \
                  "web server logs, core dumps, shell and tool histories, podman and containerd metadata"

    def findings(self, facts: Dict[str, List[Dict[str, Any]]], judging: Any) -> Iterator[Dict[str, Any]]:
        return artifact_findings(facts)

    def run(self, context: CollectionContext, emit: Emitter) -> None:
        fs = context.fs
        for logical in SYSTEM_TREES:
            emit.tree(logical, context.max_file_size)
        for logical in CORE_DUMP_DIRS:
            emit.tree(logical, min(context.max_file_size, CORE_DUMP_CAP))
            for entry in fs.walk(logical, context.walk_limits()):
                if stat.S_ISREG(entry.info.st_mode):
                    emit.fact("core_dump", {"path": entry.logical, "size": entry.info.st_size,
                                            "mtime": entry.info.st_mtime}, host_member(entry.logical))
        for kind, directories in SCHEDULED.items():
            for directory in directories:
                for entry in fs.walk(directory, context.walk_limits()):
                    if stat.S_ISREG(entry.info.st_mode) and not entry.name.startswith("."):
                        emit.fact(kind, {"path": entry.logical, "mtime": entry.info.st_mtime},
                                  host_member(entry.logical))
        homes = sorted({home for _user, home in accounts(context) if home not in ("/", "/nonexistent", "/dev/null")})
        for home in homes:
            for name in HOME_TREES:
                emit.tree(posixpath.join(home, name), context.max_file_size)
        self._boot(context, emit)
        self._kernel(context, emit)
        self._hardware_and_storage(emit)
        self._virtual_machines(context, emit, homes)
        self._keys(context, emit, homes)
        emit.program("volatile/audit-rules.txt", "auditctl", ["-l"])

    @staticmethod
    def _boot(context: CollectionContext, emit: Emitter) -> None:
        """/boot as a listing (kernels and initramfs are large: their hashes come from the timeline's lists)."""
        rows = []
        for entry in context.fs.walk("/boot", context.walk_limits()):
            info = entry.info
            rows.append({"path": entry.logical, "mode": "%o" % info.st_mode, "size": info.st_size,
                         "mtime": info.st_mtime, "ctime": info.st_ctime})
        emit.json("volatile/boot.json", rows, "listing of /boot (fstatat)")

    @staticmethod
    def _virtual_machines(context: CollectionContext, emit: Emitter, homes: List[str]) -> None:
        """Which VM managers keep machines here, and each definition they keep (libvirt XML, .vbox, .vmx),
        listed; libvirt's definitions are copied by SYSTEM_TREES, the others here (small files only)."""
        places = list(VM_PLACES) + [posixpath.join(h, name) for h in homes
                                    for name in ("VirtualBox VMs", "vmware", ".config/libvirt/qemu")]
        found = []
        for place in places:
            for entry in context.fs.walk(place, context.walk_limits()):
                if stat.S_ISREG(entry.info.st_mode) and entry.name.endswith((".xml", ".vbox", ".vmx", ".conf")):
                    found.append({"path": entry.logical, "size": entry.info.st_size, "mtime": entry.info.st_mtime})
                    emit.file(entry.logical, min(context.max_file_size, 1 << 20))
        emit.json("volatile/vms.json", {"places": places, "definitions": found},
                  "VM managers' definition files under their usual places (none: no VM manager keeps one here)")

    @staticmethod
    def _hardware_and_storage(emit: Emitter) -> None:
        """What lscpu, lsblk, dmidecode and df would say, from /proc and /sys of the running kernel."""
        from toolkit.host.hostfs import read_host_file

        def text(path: str, limit: int = 1 << 20) -> Optional[str]:
            try:
                return read_host_file(path, limit).decode("utf-8", "replace").strip()
            except (OSError, Refused):
                return None

        live = HostFSLive()
        dmi = {name: text("/sys/class/dmi/id/" + name) for name in live.listdir("/sys/class/dmi/id")
               if name in ("sys_vendor", "product_name", "product_version", "board_vendor", "board_name",
                           "bios_vendor", "bios_version", "bios_date", "chassis_type")}
        blocks = {}
        for name in live.listdir("/sys/block"):
            blocks[name] = {"size_sectors": text("/sys/block/%s/size" % name), "removable":
                            text("/sys/block/%s/removable" % name), "model": text("/sys/block/%s/device/model" % name),
                            "partitions": [p for p in live.listdir("/sys/block/" + name) if p.startswith(name)]}
        emit.json("volatile/hardware.json", {"cpuinfo": text("/proc/cpuinfo", 4 << 20), "meminfo": text("/proc/meminfo"),
                                             "dmi": dmi, "pci_devices": live.listdir("/sys/bus/pci/devices"),
                                             "usb_devices": live.listdir("/sys/bus/usb/devices")},
                  "/proc/cpuinfo, /proc/meminfo, /sys/class/dmi/id, /sys/bus (running kernel)")
        emit.json("volatile/storage.json", {"partitions": text("/proc/partitions"), "block_devices": blocks,
                                            "mounts": text("/proc/self/mountinfo", 4 << 20),
                                            "swaps": text("/proc/swaps"), "mdstat": text("/proc/mdstat")},
                  "/proc/partitions, /sys/block, /proc/self/mountinfo, /proc/swaps (running kernel)")

    @staticmethod
    def _kernel(context: CollectionContext, emit: Emitter) -> None:
        """binfmt_misc handlers, each module's taint, pinned eBPF objects: read from /proc and /sys."""
        from toolkit.host.hostfs import read_host_file

        def text(path: str) -> Optional[str]:
            try:
                return read_host_file(path, 1 << 20).decode("utf-8", "replace")
            except (OSError, Refused):
                return None

        live = HostFSLive()
        binfmt = {}
        for name in live.listdir("/proc/sys/fs/binfmt_misc"):
            if name not in ("register",):
                binfmt[name] = text("/proc/sys/fs/binfmt_misc/" + name)
        modules = {}
        for name in live.listdir("/sys/module"):
            taint = text("/sys/module/%s/taint" % name)
            if taint and taint.strip():
                modules[name] = taint.strip()
        pinned = []
        for entry in live.walk("/sys/fs/bpf"):
            pinned.append({"path": entry.logical, "mode": "%o" % entry.info.st_mode, "uid": entry.info.st_uid,
                           "mtime": entry.info.st_mtime})
        emit.json("volatile/kernel-extensions.json", {"binfmt_misc": binfmt, "tainted_modules": modules,
                                                      "bpf_pinned": pinned},
                  "/proc/sys/fs/binfmt_misc, /sys/module/*/taint, /sys/fs/bpf (from the running kernel)")
        for name, rule in binfmt.items():
            if name != "status":
                emit.fact("binfmt_misc", {"name": name, "rule": rule}, "volatile/kernel-extensions.json")
        for row in pinned:
            emit.fact("bpf_pinned", row, "volatile/kernel-extensions.json")
        for name, taint in modules.items():
            emit.fact("module_taint", {"module": name, "taint": taint}, "volatile/kernel-extensions.json")

    @staticmethod
    def _keys(context: CollectionContext, emit: Emitter, homes: List[str]) -> None:
        """Private keys in ~/.ssh and /etc/ssh: their type and passphrase, never their content."""
        places = [posixpath.join(home, ".ssh") for home in homes] + list(SSH_KEY_DIRS)
        rows = []
        for directory in places:
            for entry in context.fs.walk(directory, context.walk_limits()):
                if not stat.S_ISREG(entry.info.st_mode) or entry.info.st_size > KEY_LIMIT or \
                        entry.name.endswith(".pub"):
                    continue
                try:
                    with context.fs.open_at(entry.dir_fd, entry.name, entry.logical) as opened:
                        head = opened.read(KEY_LIMIT)
                except (OSError, Refused):
                    continue
                facts = private_key_facts(head)
                if facts is None:
                    continue
                row = dict(facts, path=entry.logical, mode="%o" % entry.info.st_mode, uid=entry.info.st_uid,
                           host_key=directory == "/etc/ssh")
                rows.append(row)
                emit.fact("private_key", row, "volatile/ssh-private-keys.json")
        emit.json("volatile/ssh-private-keys.json", rows, "each private key read to tell its type and whether a "
                  "passphrase protects it; the key itself is not stored")


class HostFSLive:
    """/proc and /sys of the running kernel (under --root too: they describe the kernel, not the image)."""

    def __init__(self) -> None:
        from toolkit.host.hostfs import HostFS

        self.fs = HostFS("/")

    def listdir(self, logical: str) -> List[str]:
        try:
            return sorted(self.fs.listdir(logical))
        except (OSError, Refused):
            return []

    def walk(self, logical: str):
        try:
            yield from self.fs.walk(logical)
        except (OSError, Refused):
            return


# -- what these facts mean ------------------------------------------------------------------------------------
def artifact_findings(facts: Dict[str, List[Dict[str, Any]]]) -> Iterator[Dict[str, Any]]:
    from toolkit.evidence.findings import finding

    keys = [f for f in facts.get("private_key", []) if f["data"].get("passphrase") is False
            and not f["data"].get("host_key")]
    if keys:
        paths = [f["data"]["path"] for f in keys]
        yield finding("ssh-key-without-passphrase", "medium", "%d SSH private keys with no passphrase: %s" % (
            len(paths), ", ".join(paths[:5]) + (" ..." if len(paths) > 5 else "")),
            ["volatile/ssh-private-keys.json"], paths=paths)
    for kind, severity, what in (("at_job", "medium", "at jobs queued"),
                                 ("transient_unit", "medium", "transient systemd units (made at run time, e.g. by "
                                  "systemd-run: timers that leave no file in /etc)")):
        rows = [f["data"]["path"] for f in facts.get(kind, [])]
        if rows:
            yield finding(kind.replace("_", "-") + "s", severity, "%d %s: %s" % (len(rows), what, ", ".join(rows[:5])),
                          [host_member(p) for p in rows], paths=rows)
    dumps = [f["data"] for f in facts.get("core_dump", [])]
    if dumps:
        yield finding("core-dumps", "low", "%d core dumps (a crashed process's memory: exploitation attempts "
                      "crash things): %s" % (len(dumps), ", ".join(d["path"] for d in dumps[:5])),
                      [host_member(d["path"]) for d in dumps], paths=[d["path"] for d in dumps])
    pinned = [f["data"] for f in facts.get("bpf_pinned", []) if stat.S_ISREG(int(f["data"]["mode"], 8))]
    if pinned:
        yield finding("bpf-pinned", "medium", "%d eBPF objects pinned under /sys/fs/bpf: %s" % (
            len(pinned), ", ".join(p["path"] for p in pinned[:5])), ["volatile/kernel-extensions.json"],
            paths=[p["path"] for p in pinned])
    tainted = [f["data"] for f in facts.get("module_taint", [])]
    if tainted:
        yield finding("modules-tainted", "medium", "kernel modules that taint the kernel: %s" % ", ".join(
            "%s (%s)" % (t["module"], t["taint"]) for t in tainted[:10]), ["volatile/kernel-extensions.json"],
            modules=[t["module"] for t in tainted])
