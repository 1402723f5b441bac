"""A whole incident on the real stack, journaled: open -> triage -> capture -> backup -> rotate -> harden plan
-> report; the journal verifies, every command is in it once with its outputs' hashes, no secret anywhere, the
checklists fill themselves, and the HTML report renders in headless Chromium with no network."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.test_contain import topology  # noqa: F401 (a fixture)
from tests.test_harden import default_tree  # noqa: F401 (a fixture)
from tests.world.bookgen import make_host_tree
from toolkit.secrets import dotenv

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture
def medium():
    """The responder's USB stick: its own filesystem."""
    path = Path(tempfile.mkdtemp(prefix="bk-usb-", dir="/tmp"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1g", "tmpfs", str(path)], check=True)
    yield path
    subprocess.run(["umount", "-l", str(path)], check=True)
    path.rmdir()


def test_a_whole_incident(running_stack, medium, tmp_path):
    host = make_host_tree(tmp_path / "host", db_host="db", redis_host="redis",
                          db_password=running_stack.db_password, redis_password=running_stack.redis_password)
    identity = medium / "team.key"
    subprocess.run(["age-keygen", "-o", str(identity)], check=True, capture_output=True)
    recipient = subprocess.run(["age-keygen", "-y", str(identity)], capture_output=True, text=True).stdout.strip()
    case_dir = medium / "INC-2026-042"
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(ROOT), "HOME": "/nonexistent",
           "DOCKER_HOST": running_stack.engine.url, "BOOKGEN_KIT_APP_DIR": str(host.app_dir),
           "BOOKGEN_KIT_LOG_DIRS": str(host.log_dir),
           "BOOKGEN_KIT_HEALTH_URL": "http://127.0.0.1:%d/health" % running_stack.api_port}

    def kit(*args, case=True):
        environment = dict(env, BOOKGEN_KIT_CASE=str(case_dir)) if case else env
        return subprocess.run([sys.executable, "-m", "toolkit", *args], capture_output=True, text=True,
                              env=environment, timeout=600, stdin=subprocess.DEVNULL)

    secrets = dict(host.secrets)
    # something to find: a deleted binary running from /dev/shm on the host, and one in the worker container
    handle, name = tempfile.mkstemp(prefix="bk-implant-", dir="/dev/shm")
    os.close(handle)
    implant = Path(name)
    shutil.copy("/usr/bin/sleep", implant)
    implant.chmod(0o755)
    sleeper = subprocess.Popen([str(implant), "600"])
    implant.unlink()
    worker = running_stack.container("worker")
    # busybox runs the applet its name says; the file goes only once the process runs it (polled, 10 s at most)
    planted = worker.exec_run(["sh", "-c", "cp /bin/busybox /tmp/sleep || exit 1; /tmp/sleep 600 >/dev/null 2>&1 & "
                                           "p=$!; i=0; while [ \"$(readlink /proc/$p/exe)\" != /tmp/sleep ]; do "
                                           "i=$((i+1)); [ $i -gt 200 ] && exit 1; usleep 50000; done; rm /tmp/sleep"])
    assert planted.exit_code == 0
    try:
        on_host = kit("case", "open", "--id", "X", "--dir", str(tmp_path / "x"), case=False)
        assert on_host.returncode == 2 and "host's own disk" in on_host.stderr
        opened = kit("case", "open", "--id", "INC-2026-042", "--dir", str(case_dir), "--title",
                     "Suspicious logins on the BookGen API host", "--examiner", "alice", case=False)
        assert opened.returncode == 0, opened.stderr
        (host.root / "etc" / "cron.d").mkdir(parents=True, exist_ok=True)
        (host.root / "etc" / "cron.d" / "backdoor").write_text("* * * * * root /dev/shm/.x\n")  # a recent change
        steps = [("triage",), ("capture", "-r", recipient, "--root", str(host.root), "--skip", "tmp-executables"),
                 ("backup", "create"), ("rotate", "run", "--yes"),
                 ("harden", "plan", "--root", str(host.root), "--app-dir", "/opt/bookgen"),
                 ("capture", "-r", recipient, "--only", "processes", "--only", "containers")]  # a second look
        for step in steps:
            done = kit(*step)
            assert done.returncode in (0, 6), (step, done.stdout[-2000:], done.stderr)
        for asked in (("rotate", "run", "--help"), ("contain", "apply", "--help"), ("harden", "apply", "--help"),
                      ("keygen", "-y", str(identity))):
            assert kit(*asked).returncode == 0
        assert kit("case", "note", "14:05 notified DBA").returncode == 0
        assert kit("case", "check", "Notify security team", "--note", "phoned the CISO at 14:10").returncode == 0
        reports = []
        for fmt in ("md", "html"):
            done = kit("--json", "case", "report", "--format", fmt)
            assert done.returncode == 0, done.stderr
            reports.append(Path(json.loads(done.stdout)["report"]))
            made = json.loads(done.stdout)
        assert reports[0].parent == case_dir / "reports"

        # the journal: every command once, with its outputs' hashes
        entries = [json.loads(line) for line in (case_dir / "journal.jsonl").read_text().splitlines()]
        names = [e.get("command_name") for e in entries if e["kind"] == "command"]
        assert names == ["triage", "capture", "backup create", "rotate run", "harden plan", "capture", "keygen",
                         "case report", "case report"]  # no --help; reading a key ran, and made nothing:
        assert next(e for e in entries if e.get("command_name") == "keygen")["outputs"] == []
        capture = next(e for e in entries if e.get("command_name") == "capture")
        payload = next(o for o in capture["outputs"] if o["path"].endswith(".tar.zst.age"))
        assert Path(payload["path"]).parent == case_dir / "evidence"  # outputs default into the case
        assert Path(payload["path"]).name.startswith("INC-2026-042-")  # named after the open case, unasked
        assert payload["sha256"] == hashlib.sha256(Path(payload["path"]).read_bytes()).hexdigest()
        backup = next(e for e in entries if e.get("command_name") == "backup create")
        assert any(Path(o["path"]).parent == case_dir / "backups" for o in backup["outputs"])
        rotation = next(e for e in entries if e.get("command_name") == "rotate run")
        assert set(rotation["changes"]["rotated"]) == {"DATABASE_PASSWORD", "REDIS_PASSWORD", "SECRET_KEY"}
        assert all(e["uid"] == 0 and e["host"] for e in entries)
        assert kit("case", "verify").returncode == 0

        # no secret in the journal or the reports: neither the old values nor the rotated ones
        rotated = dotenv.read(str(host.env_file)).values()
        for value in list(secrets.values()) + [rotated["DATABASE_PASSWORD"], rotated["REDIS_PASSWORD"],
                                               rotated["SECRET_KEY"]]:
            for path in [case_dir / "journal.jsonl"] + reports:
                assert value not in path.read_text(), path

        # the checklists fill themselves
        checklist = json.loads(kit("--json", "case", "checklist").stdout)
        breach = {i["item"]: i for i in checklist["security-breach"]}
        assert breach["Preserve evidence"]["status"] == "done" and "capture" in breach["Preserve evidence"]["by"]
        # rotated, but OPENROUTER_API_KEY can only be revoked at its provider: open until checked by hand
        credentials = breach["Change all credentials"]
        assert credentials["status"] == "pending" and "OPENROUTER_API_KEY" in credentials["by"], credentials
        assert "OPENROUTER_API_KEY" in rotation["changes"]["revoke_at_provider"][0]["name"]
        assert breach["Notify security team"]["status"] == "marked"
        assert breach["File incident report"]["status"] == "done"
        assert breach["Isolate system"]["status"] == "pending"
        loss = {i["item"]: i for i in checklist["data-loss-prevention"]}
        assert loss["Create emergency backup"]["status"] == "done"
        down = {i["item"]: i for i in checklist["system-down"]}
        assert down["Verify outage confirmed"]["status"] == "done"
        markdown = reports[0].read_text()
        for section in ("## Timeline", "## Evidence inventory", "## Changes made to the host", "## Findings",
                        "## Checklists", "## Post-incident procedures still open"):
            assert section in markdown
        assert payload["sha256"] in markdown and "14:05 notified DBA" in markdown
        assert "rotate rollback" in markdown  # how to undo the rotation
        state = markdown.split("## State of the host", 1)[1].split("\n## ", 1)[0]
        assert "containment: never applied" in state and "OPENROUTER_API_KEY" in state
        assert "## Collection gaps" in markdown
        tree = markdown.split("## Process tree of the suspicious processes", 1)[1].split("\n## ", 1)[0]
        assert "pid %d" % sleeper.pid in tree and "[container bookgen-worker]" in tree, tree
        assert "### On the host" in markdown and "### On container bookgen-worker" in markdown
        implant_rows = [line for line in markdown.splitlines() if line.startswith("- [high]") and
                        "pid %d " % sleeper.pid in line]
        assert len(implant_rows) == 1, implant_rows  # one row for two captures, which it names
        seen = markdown.split(implant_rows[0], 1)[1].splitlines()[1]
        assert "seen by #3" in seen and ", #7 " in seen, seen
        walk = markdown.split("## Timeline of the captured filesystem", 1)[1].split("\n## ", 1)[0]
        assert "pid %d" % sleeper.pid in walk and "/etc/cron.d/backdoor" in walk, walk

        # the indicators: CSV, and STIX 2.1 that the stix2 library parses (patterns checked)
        import csv

        import stix2

        rows = list(csv.DictReader(open(made["indicators_csv"])))
        sleep_sha256 = hashlib.sha256(Path("/usr/bin/sleep").read_bytes()).hexdigest()
        assert any(r["type"] == "sha256" and r["value"] == sleep_sha256 for r in rows), rows
        bundle = stix2.parse(Path(made["indicators_stix"]).read_text(), allow_custom=False)
        patterns = [o.pattern for o in bundle.objects if o.type == "indicator"]
        assert "[file:hashes.'SHA-256' = '%s']" % sleep_sha256 in patterns
        assert len(patterns) == len([r for r in rows if r["type"] != "ssh-key"])

        # the HTML report: self-contained, and it renders with no network at all
        page = reports[1].read_text()
        assert "http://" not in page and "https://" not in page and "<link" not in page and "<script" not in page
        shot = Path(os.environ.get("BOOKGEN_KIT_TEST_SHOT_DIR", str(tmp_path))) / "report.png"
        profile = tmp_path / "chromium-profile"
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--user-data-dir=%s" % profile, "--window-size=1200,2600"]
        rendered = subprocess.run(["unshare", "-n", CHROMIUM, *flags, "--screenshot=%s" % shot,
                                   "file://%s" % reports[1]], capture_output=True, timeout=120)
        assert shot.exists() and shot.stat().st_size > 20000, rendered.stderr[-2000:]
        dom = subprocess.run(["unshare", "-n", CHROMIUM, *flags, "--dump-dom", "file://%s" % reports[1]],
                             capture_output=True, text=True, timeout=120).stdout
        assert "<title>Incident report: INC-2026-042</title>" in dom and "Evidence inventory" in dom
        assert "Process tree of the suspicious processes" in dom and 'class="boundary"' in dom
        assert '<svg class="timeline"' in dom and 'stroke="#c00"' in dom

        # closing seals it, signed; a flipped byte anywhere in the journal is caught
        key = tmp_path / "id_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        closed = kit("--json", "case", "close", "--sign-key", str(key))
        assert closed.returncode == 0, closed.stderr
        assert json.loads(closed.stdout)["signature"].startswith("-----BEGIN SSH SIGNATURE-----")
        assert kit("case", "verify").returncode == 0
        assert kit("case", "note", "too late").returncode == 2
        journal = case_dir / "journal.jsonl"
        data = bytearray(journal.read_bytes())
        data[len(data) // 3] ^= 0x01
        journal.write_bytes(bytes(data))
        broken = kit("case", "verify")
        assert broken.returncode == 5, broken.stdout + broken.stderr
    finally:
        sleeper.kill()
        sleeper.wait()
        worker.exec_run(["sh", "-c", "kill $(pidof sleep) 2>/dev/null; true"])
        values = dotenv.read(str(host.env_file)).values()
        running_stack.db_password = values["DATABASE_PASSWORD"]
        running_stack.redis_password = values["REDIS_PASSWORD"]


def test_the_journal_records_what_ran_and_the_checklist_what_is_in_force(topology, default_tree, medium, tmp_path):
    """--help, a refused command line and reading a key are not actions; a released containment and a
    rolled-back hardening are not in force; a secret key is named as one, never hashed."""
    case_dir = medium / "INC-2026-043"
    host = default_tree
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(ROOT), "HOME": "/nonexistent",
           "DOCKER_HOST": "unix:///nonexistent.sock", "BOOKGEN_KIT_CASE": str(case_dir),
           "BOOKGEN_KIT_STATE_DIR": str(topology["state"]), "BOOKGEN_KIT_APP_DIR": str(host.app_dir)}

    def kit(*args):
        return subprocess.run([sys.executable, "-m", "toolkit", *args], capture_output=True, text=True, env=env,
                              timeout=300, stdin=subprocess.DEVNULL)

    assert kit("case", "open", "--id", "INC-2026-043", "--dir", str(case_dir), "--examiner", "bob").returncode == 0
    for help_call in (("rotate", "run", "--help"), ("contain", "apply", "--help"), ("harden", "apply", "-h"),
                      ("backup", "create", "--no-such-option"), ("restore", "--no-emergency-backup", "x.dump")):
        assert kit(*help_call).returncode in (0, 2)
    team = medium / "team.key"
    assert kit("keygen", "-o", str(team)).returncode == 0
    assert kit("keygen", "-y", str(team)).returncode == 0
    harden = ("--root", str(host.root), "--app-dir", "/opt/bookgen")
    applied = kit("--json", "harden", "apply", "--yes", *harden)
    assert applied.returncode == 0, applied.stdout + applied.stderr
    contained = subprocess.run(["ip", "netns", "exec", topology["target"], sys.executable, "-m", "toolkit", "contain",
                                "apply", "--allow-ssh-from", "10.231.11.1/32"], capture_output=True, text=True,
                               env=env, timeout=120)
    assert contained.returncode == 0, contained.stderr
    rotated = kit("--json", "rotate", "run", "--only", "SECRET_KEY", "--yes")
    assert rotated.returncode == 0, rotated.stdout + rotated.stderr
    checklist = json.loads(kit("--json", "case", "checklist").stdout)
    breach = {i["item"]: i for i in checklist["security-breach"]}
    assert breach["Isolate system"]["status"] == "done"
    assert breach["Implement additional security"]["status"] == "done"
    credentials = breach["Change all credentials"]  # one secret of three rotated: not done, and it says which
    assert credentials["status"] == "pending" and "not rotated yet: DATABASE_PASSWORD, REDIS_PASSWORD" in \
        credentials["by"], credentials

    released = subprocess.run(["ip", "netns", "exec", topology["target"], sys.executable, "-m", "toolkit", "contain",
                               "release"], capture_output=True, text=True, env=env, timeout=120)
    assert released.returncode == 0, released.stderr
    assert kit("harden", "rollback", json.loads(applied.stdout)["bundle"], *harden).returncode == 0

    entries = [json.loads(line) for line in (case_dir / "journal.jsonl").read_text().splitlines()]
    names = [e["command_name"] for e in entries if e["kind"] == "command"]
    assert names == ["keygen", "keygen", "harden apply", "contain apply", "rotate run", "case checklist",
                     "contain release", "harden rollback"], names
    made, read = [e for e in entries if e.get("command_name") == "keygen"]
    assert made["outputs"] == [{"path": str(team), "kind": "secret key"}]  # named, never hashed
    assert read["outputs"] == []  # reading a key produces nothing

    checklist = json.loads(kit("--json", "case", "checklist").stdout)
    breach = {i["item"]: i for i in checklist["security-breach"]}
    assert breach["Isolate system"]["status"] == "pending"
    assert breach["Implement additional security"]["status"] == "pending"
    assert breach["Change all credentials"]["status"] == "pending"
    report = Path(json.loads(kit("--json", "case", "report", "--format", "md").stdout)["report"]).read_text()
    changes = report.split("## Changes made to the host", 1)[1].split("\n## ", 1)[0]
    assert "--help" not in report and "no-such-option" not in report
    assert changes.count("(undone)") == 2 and "undone by #" in changes and "contain release" in changes
    assert "undo: `bookgen-kit contain release`" not in changes
