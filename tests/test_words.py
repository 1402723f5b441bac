"""Every command, run where things go wrong (no Docker, a database that refuses, files that are not what they
should be, directories that cannot be read), says what happened in words: no Python exception text reaches
a person unless -v asked for it."""
from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.world.bookgen import make_host_tree
from tests.world.services import free_port

ROOT = Path(__file__).resolve().parent.parent
PYTHON_WORDS = ("Errno", "Error(", "Traceback", "Exception(", "object has no attribute", "Connection aborted")


def test_no_command_speaks_python(tmp_path):
    host = make_host_tree(tmp_path / "host")
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(os.urandom(4096))
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "inside").write_text("x")
    directory = tmp_path / "a-directory"
    directory.mkdir()
    missing = tmp_path / "missing"
    closed = "postgresql://postgres@127.0.0.1:%d/postgres" % free_port()
    key = tmp_path / "team.key"
    subprocess.run(["age-keygen", "-o", str(key)], check=True, capture_output=True)
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(ROOT), "HOME": "/nonexistent",
           "DOCKER_HOST": "unix:///nonexistent/docker.sock", "BOOKGEN_KIT_APP_DIR": str(host.app_dir),
           "BOOKGEN_KIT_LOG_DIRS": str(host.log_dir), "BOOKGEN_KIT_HEALTH_URL": "http://127.0.0.1:%d/health" %
           free_port(), "BOOKGEN_KIT_STATE_DIR": str(tmp_path / "state"), "PGPASSWORD": "wrong"}
    calls = [
        ("triage",), ("triage", "--dsn", closed), ("triage", "--container", "bookgen-db"),
        ("jobs", "stuck"), ("jobs", "stuck", "--dsn", closed), ("jobs", "reset", "--yes", "--dsn", closed),
        ("backup", "create", "--dsn", closed), ("backup", "create"), ("backup", "create", "--container", "nope"),
        ("backup", "verify", str(garbage)), ("backup", "verify", str(missing)), ("backup", "verify", str(directory)),
        ("backup", "list", str(missing)), ("backup", "prune", str(garbage)), ("backup", "keep", str(missing)),
        ("restore", str(garbage), "--yes", "--dsn", closed), ("restore", str(missing), "--yes"),
        ("restore", str(garbage), "--into", "x", "--stop-services", "api"),
        ("db", "check", "--dsn", closed), ("db", "check"), ("db", "repair", "--reindex", "--dsn", closed),
        ("db", "drop-old", "bookgen_pre_restore_x", "--yes", "--dsn", closed),
        ("verify", str(garbage)), ("verify", str(missing)), ("verify", str(directory)), ("verify", str(empty)),
        ("extract", str(garbage), "--to", str(tmp_path / "out1")), ("extract", str(missing), "--to",
                                                                       str(tmp_path / "out2")),
        ("custody", "show", str(garbage)), ("custody", "verify", str(missing)),
        ("custody", "add", str(garbage), "--action", "verified"),
        ("decrypt", "-i", str(key), str(garbage)), ("decrypt", "-i", str(garbage), str(garbage)),
        ("decrypt", "-i", str(missing), str(garbage)), ("encrypt", "-r", "age1nope", str(garbage)),
        ("encrypt", "-r", "age1qqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqq", str(missing)),
        ("keygen", "-y", str(garbage)), ("keygen", "-y", str(missing)), ("keygen", "-o", str(directory)),
        ("sign", "-k", str(garbage), str(garbage)), ("sign", "-k", str(missing), str(garbage)),
        ("verify-signature", "--allowed-signers", str(garbage), "--identity", "x", "--signature", str(garbage),
         str(garbage)),
        ("capture", "--out", str(tmp_path / "made-by-capture" / "deep"), "--no-encrypt", "--only", "system"),
        ("capture", "--out", str(garbage), "--no-encrypt", "--only", "system"),
        ("capture", "--root", str(missing), "--out", str(tmp_path / "cap"), "--no-encrypt", "--only", "system"),
        ("rotate", "plan"), ("rotate", "run", "--yes"), ("rotate", "resume"), ("rotate", "rollback"),
        ("rotate", "status"), ("rotate", "plan", "--env-file", str(garbage)),
        ("harden", "check", "--root", str(missing)), ("harden", "plan", "--root", str(garbage)),
        ("harden", "check", "--root", str(locked)),
        ("harden", "rollback", str(missing)), ("harden", "confirm"),
        ("contain", "apply", "--allow-ssh-from", "not-an-address"), ("contain", "release"),
        ("cleanup",), ("cleanup", "--archive-to", str(garbage), "--apply"),
        ("case", "report"), ("case", "note", "x"), ("case", "open", "--id", "X", "--dir", str(garbage)),
        ("case", "verify"), ("--case-dir", str(directory), "case", "report"),
        ("--case-dir", str(locked), "case", "note", "x"),
        ("self-check",), ("version",),
    ]
    os.chmod(locked, 0)

    def run(call):
        done = subprocess.run([sys.executable, "-m", "toolkit", *call], capture_output=True, text=True, env=env,
                              timeout=120, stdin=subprocess.DEVNULL)
        return call, done

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, calls))
    spoken = []
    for call, done in results:
        text = done.stdout + done.stderr
        if any(word in text for word in PYTHON_WORDS) or done.returncode == 1:
            spoken.append("%s -> exit %s: %s" % (" ".join(call), done.returncode, text.strip()[-600:]))
    assert not spoken, "\n\n".join(spoken)
    codes = {call: done.returncode for call, done in results}
    assert codes[("harden", "check", "--root", str(missing))] == 3  # no system there: said, not audited as empty
    assert codes[("rotate", "run", "--yes")] == 4 and codes[("backup", "create")] == 4
    # with -v the traceback of a real failure is there for whoever asked
    verbose = subprocess.run([sys.executable, "-m", "toolkit", "-v", "verify", str(missing)], capture_output=True,
                             text=True, env=env, timeout=60)
    assert verbose.returncode != 0
