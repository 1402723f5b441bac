"""`extract`: unpack a bundle into a new directory, verifying each member against the manifest as it goes.

Refused: absolute names, `..`, names reached through a symlink, symlinks that
leave the directory, hard links, device nodes, FIFOs; setuid, setgid and sticky
bits are never set. Nothing is overwritten; files end read-only. A member is
written under a temporary name and takes its real name only once its sha256
matches the manifest.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from typing import Any, List, Sequence

from toolkit.errors import UsageError, VerificationFailed
from toolkit.evidence.bundle import iterate_members, load_manifest, locate, open_tar_stream, read_member
from toolkit.host.atomic import environment_error


@dataclass
class ExtractReport:
    bundle: str
    target: str
    extracted: List[str] = field(default_factory=list)
    refused: List[dict] = field(default_factory=list)
    members: int = 0


def _safe_relative(name: str) -> str:
    if not name or name.startswith("/"):
        raise ValueError("absolute name")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts):
        raise ValueError("name with ..")
    return "/".join(parts)


def _ensure_parents(root: str, relative: str) -> str:
    """Create the member's parent directories, each a real directory inside root (never a symlink)."""
    current = root
    for part in relative.split("/")[:-1]:
        current = os.path.join(current, part)
        try:
            info = os.lstat(current)
        except FileNotFoundError:
            os.mkdir(current, 0o755)
            continue
        if not stat.S_ISDIR(info.st_mode):
            raise ValueError("a parent (%s) is not a directory inside the target" % os.path.relpath(current, root))
    return os.path.join(root, relative)


def extract_bundle(path: str, identities: Sequence[Any], target: str) -> ExtractReport:
    paths = locate(path)
    if not os.path.exists(paths.payload):
        raise VerificationFailed("the bundle is incomplete (only %s exists): nothing to extract" % paths.partial)
    manifest = load_manifest(paths)
    expected = {a["path"]: a for a in manifest.get("artifacts", [])}
    if os.path.lexists(target) and (not os.path.isdir(target) or os.listdir(target)):
        raise UsageError("--to %s exists and is not an empty directory: extract never overwrites" % target)
    os.makedirs(target, mode=0o755, exist_ok=True)
    root = os.path.realpath(target)
    report = ExtractReport(bundle=paths.payload, target=root)
    seen = set()
    with open(paths.payload, "rb") as source:
        tar = open_tar_stream(source, manifest.get("payload", {}).get("compression", paths.compression),
                              paths.encrypted, identities)
        for member in iterate_members(tar):
            report.members += 1
            seen.add(member.name)

            def refuse(reason: str) -> None:
                report.refused.append({"member": member.name, "reason": reason})
                read_member(tar, member)  # keep the stream aligned

            try:
                relative = _safe_relative(member.name)
            except ValueError as why:
                refuse("unsafe name (%s)" % why)
                continue
            entry = expected.get(member.name)
            if entry is None and member.name != "manifest.json":
                raise VerificationFailed("member %s is not in the manifest: extraction stopped" % member.name)
            if member.ischr() or member.isblk() or member.isfifo():
                refuse("device or FIFO: not created")
                continue
            if member.islnk():
                refuse("hard link: not created")
                continue
            try:
                destination = _ensure_parents(root, relative)
            except ValueError as why:
                refuse(str(why))
                continue
            except OSError as error:
                raise environment_error(error, "cannot create directories under %s" % root) from None
            if member.mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX):
                report.refused.append({"member": member.name, "reason": "setuid/setgid/sticky bits not set"})
            if member.isdir():
                if not os.path.lexists(destination):
                    os.mkdir(destination, 0o755)
                report.extracted.append(member.name)
                continue
            if os.path.lexists(destination):
                refuse("already exists: never overwritten")
                continue
            if member.issym():
                resolved = os.path.normpath(os.path.join(os.path.dirname(destination), member.linkname))
                if os.path.isabs(member.linkname) or not (resolved == root or resolved.startswith(root + "/")):
                    refuse("symlink to %s leaves the target directory" % member.linkname)
                    continue
                os.symlink(member.linkname, destination)
                report.extracted.append(member.name)
                continue
            if not member.isreg():
                refuse("unsupported member type")
                continue
            _write_member(tar, member, destination, entry)
            report.extracted.append(member.name)
    missing = sorted(set(expected) - seen)
    if missing:
        raise VerificationFailed("the payload ends without %d members of the manifest (first: %s)" % (
            len(missing), missing[0]))
    return report


def _write_member(tar, member, destination: str, entry) -> None:
    temporary = os.path.join(os.path.dirname(destination), ".%s.extracting" % os.path.basename(destination))
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(temporary, flags, 0o600)
    except OSError as error:
        raise environment_error(error, "cannot create %s" % temporary) from None
    try:
        with os.fdopen(fd, "wb") as handle:
            digest = read_member(tar, member, handle.write)
        if entry is not None and (digest != entry.get("sha256") or member.size != entry.get("size")):
            raise VerificationFailed("member %s: sha256 %s, manifest says %s: extraction stopped" % (
                member.name, digest, entry.get("sha256")))
        mode = stat.S_IMODE(member.mode) & 0o555  # read-only; no setuid/setgid/sticky
        os.chmod(temporary, mode or 0o444)
        os.utime(temporary, (member.mtime, member.mtime))
        os.link(temporary, destination)  # fails rather than overwrite
        os.unlink(temporary)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
