"""State that root writes on the host refuses planted symlinks, hard links and directories others can write, as
OpenSSH's StrictModes does (DESIGN.md principle 9): the case pointer beside the pyz, the case directory and its
journal, the rotation journal and the .env copies beside the .env, hardening undo bundles. Real files, real links,
as root, through the CLI with a clean environment; whatever a planted link points at is left exactly as it was."""
from __future__ import annotations

import glob
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import build_pyz
from tests.world.bookgen import make_host_tree

ROOT = Path(__file__).resolve().parent.parent
LINK = "it is a symlink (a planted link would make root write elsewhere)"
NOBODY = 65534
OLD = 1_000_000_000 * 10 ** 9  # 2001-09-09: any write or chmod would move the mtime or the mode


def run(command, env=None, timeout=120):
    environment = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(ROOT), "HOME": "/nonexistent"}
    environment.update(env or {})
    return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def kit(*args, env=None):
    return run([sys.executable, "-m", "toolkit", *args], env=env)


def writable(mode: int) -> str:
    return "it is writable by group or others (mode %04o: whoever can write there can plant a link" % mode


def assert_refused(done, path, reason) -> None:
    """Exit 4 and one line naming the path and why (the frame may add its hint on a line of its own)."""
    assert done.returncode == 4, done.stdout + done.stderr
    lines = done.stderr.splitlines()
    assert lines[0].startswith("bookgen-kit: error: refusing %s: %s" % (path, reason)), done.stderr
    assert len(lines) == 1 or (len(lines) == 2 and lines[1].startswith("bookgen-kit: hint: ")), done.stderr


def assert_refused_json(done, path, reason) -> None:
    assert done.returncode == 4, done.stdout + done.stderr
    error = json.loads(done.stdout)["error"]
    assert error["exit_code"] == 4 and "\n" not in error["message"]
    assert error["message"].startswith("refusing %s: %s" % (path, reason)), error


def snapshot(path: Path):
    """Content, mode, owner and mtime of a file, or of a directory and everything in it (links not followed)."""
    info = os.lstat(path)
    facts = [(str(path), info.st_mode, info.st_uid, info.st_gid, info.st_mtime_ns)]
    if stat.S_ISDIR(info.st_mode):
        for child in sorted(path.iterdir()):
            facts.extend(snapshot(child))
    elif stat.S_ISREG(info.st_mode):
        facts.append(path.read_bytes())
    return facts


def planted_file(tmp_path: Path, name: str = "victim") -> Path:
    """A file of the attacker's choosing (think /etc/shadow): root must not write, append to or chmod it."""
    path = tmp_path / name
    path.write_bytes(b"root:$6$precious:19000:0:99999:7:::\n")
    os.chmod(path, 0o640)
    os.utime(path, ns=(OLD, OLD))
    return path


def planted_dir(tmp_path: Path, name: str = "victim-dir") -> Path:
    path = tmp_path / name
    path.mkdir()
    (path / "cron-job").write_bytes(b"* * * * * root true\n")
    os.utime(path / "cron-job", ns=(OLD, OLD))
    os.chmod(path, 0o755)
    os.utime(path, ns=(OLD, OLD))
    return path


# --------------------------------------------------------------------------- the case directory and its journal
@pytest.fixture
def case(tmp_path):
    medium = tmp_path / "medium"
    medium.mkdir()
    directory = medium / "INC-1"
    done = kit("case", "open", "--id", "INC-1", "--dir", str(directory), "--allow-host-disk")
    assert done.returncode == 0, done.stderr
    for name in ("", "evidence", "backups", "reports"):  # made 0700 and examined
        assert (directory / name).stat().st_mode & 0o7777 == 0o700
    return directory


def note(case_dir, text="14:05 notified DBA", json_output=False):
    return kit(*(["--json"] if json_output else []), "case", "note", text, env={"BOOKGEN_KIT_CASE": str(case_dir)})


def test_case_journal_refuses_a_planted_symlink_a_hard_link_and_a_fifo(case, tmp_path):
    assert note(case).returncode == 0  # the control: a real journal takes the note
    victim = planted_file(tmp_path)
    before = snapshot(victim)
    journal = case / "journal.jsonl"
    journal.unlink()
    journal.symlink_to(victim)
    assert_refused(note(case), journal, LINK)
    assert_refused_json(note(case, json_output=True), journal, LINK)
    # every other command journals through the same check: it still does its work, and says why it was not recorded
    other = kit("version", env={"BOOKGEN_KIT_CASE": str(case)})
    assert other.returncode == 0
    assert "not recorded in the case journal: refusing %s: %s" % (journal, LINK) in other.stderr
    assert snapshot(victim) == before

    journal.unlink()
    os.link(victim, journal)
    assert_refused(note(case), journal, "it has 2 hard links")
    assert snapshot(victim) == before

    journal.unlink()
    os.mkfifo(journal)
    assert_refused(note(case), journal, "it is not a regular file (a FIFO)")  # and it did not hang


def test_case_directory_that_is_a_symlink_is_refused(case, tmp_path):
    link = tmp_path / "INC-1-link"
    link.symlink_to(case)
    before = snapshot(case)
    assert_refused(note(link), link, LINK)
    assert snapshot(case) == before

    victim = planted_dir(tmp_path)
    before = snapshot(victim)
    planted = case.parent / "INC-2"
    planted.symlink_to(victim)
    done = kit("--json", "case", "open", "--id", "INC-2", "--dir", str(planted), "--allow-host-disk")
    assert_refused_json(done, planted, LINK)
    assert snapshot(victim) == before


def test_a_symlink_anywhere_on_the_way_is_refused(case, tmp_path):
    """No symlink in any component (principle 9): whoever shaped the host may have had root, so root owning a link
    proves nothing."""
    via = tmp_path / "via"
    via.symlink_to(case.parent)
    before = snapshot(case)
    assert_refused(note(via / case.name), via, LINK)
    assert snapshot(case) == before


def test_case_open_refuses_planted_state_files_before_making_anything(tmp_path):
    medium = tmp_path / "medium"
    medium.mkdir()
    directory = medium / "INC-3"
    directory.mkdir(mode=0o700)
    nowhere = tmp_path / "made-by-root"
    (directory / "case.json").symlink_to(nowhere)  # dangling: root would create it
    done = kit("case", "open", "--id", "INC-3", "--dir", str(directory), "--allow-host-disk")
    assert_refused(done, directory / "case.json", LINK)
    assert not os.path.lexists(nowhere)

    (directory / "case.json").unlink()
    victim = planted_file(tmp_path)
    before = snapshot(victim)
    (directory / "journal.jsonl").symlink_to(victim)
    done = kit("case", "open", "--id", "INC-3", "--dir", str(directory), "--allow-host-disk")
    assert_refused(done, directory / "journal.jsonl", LINK)
    assert sorted(os.listdir(directory)) == ["journal.jsonl"]  # no case.json, no subdirectories: nothing half-made
    assert snapshot(victim) == before


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o1777], ids=["0777", "0770", "1777"])
def test_case_directory_writable_by_others_is_refused(case, mode):
    journal = case / "journal.jsonl"
    before = snapshot(journal)
    os.chmod(case, mode)  # sticky or not: the directory the state lives in gets no exception
    assert_refused(note(case), case, writable(mode))
    assert_refused_json(note(case, json_output=True), case, writable(mode))
    assert snapshot(journal) == before


def test_ancestors_sticky_root_is_accepted_open_or_foreign_is_not(tmp_path):
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)  # as /tmp, or a tmpfs medium
    directory = sticky / "INC-4"
    opened = kit("case", "open", "--id", "INC-4", "--dir", str(directory), "--allow-host-disk")
    assert opened.returncode == 0, opened.stderr
    assert note(directory).returncode == 0
    before = snapshot(directory)

    os.chmod(sticky, 0o777)  # not sticky: anyone may rename INC-4 away and plant a link in its place
    assert_refused(note(directory), sticky, writable(0o777))
    os.chown(sticky, NOBODY, NOBODY)
    for mode in (0o1777, 0o755):  # sticky but not root's, or not writable but someone else's
        os.chmod(sticky, mode)
        assert_refused(note(directory), sticky, "it is owned by uid %d, neither root nor us" % NOBODY)
    assert snapshot(directory) == before


# --------------------------------------------------------------------------- the case pointer beside the pyz
@pytest.fixture(scope="module")
def host_pyz(tmp_path_factory) -> Path:
    """A one-target zipapp of this source tree: the pointer exists only when running from a pyz."""
    return build_pyz(tmp_path_factory.mktemp("pyz") / "bookgen-kit.pyz", "--targets", "host")


def from_pyz(pyz: Path, *args):
    return run([sys.executable, str(pyz), *args], timeout=300)


def test_case_pointer_is_written_beside_the_pyz_and_a_planted_one_is_refused(host_pyz, tmp_path):
    stick = tmp_path / "stick"
    stick.mkdir()
    pyz = Path(shutil.copy(host_pyz, stick / "bookgen-kit.pyz"))
    pointer = stick / "bookgen-kit.case"
    opened = from_pyz(pyz, "case", "open", "--id", "P", "--dir", str(tmp_path / "cases" / "P"), "--allow-host-disk")
    assert opened.returncode == 0, opened.stderr
    assert pointer.read_text() == "%s\n" % (tmp_path / "cases" / "P")
    assert stat.S_ISREG(os.lstat(pointer).st_mode) and pointer.stat().st_mode & 0o777 == 0o644
    assert from_pyz(pyz, "case", "note", "via the pointer").returncode == 0

    victim = planted_file(tmp_path)
    before = snapshot(victim)
    pointer.unlink()
    pointer.symlink_to(victim)
    assert_refused(from_pyz(pyz, "case", "note", "x"), pointer, LINK)  # read: it decides where we write next
    done = from_pyz(pyz, "case", "open", "--id", "Q", "--dir", str(tmp_path / "cases" / "Q"), "--allow-host-disk")
    assert_refused(done, pointer, LINK)
    assert not (tmp_path / "cases" / "Q").exists()  # refused before the case was made
    assert snapshot(victim) == before

    pointer.unlink()
    os.link(victim, pointer)
    done = from_pyz(pyz, "case", "open", "--id", "Q", "--dir", str(tmp_path / "cases" / "Q"), "--allow-host-disk")
    assert_refused(done, pointer, "it has 2 hard links")
    assert snapshot(victim) == before


@pytest.mark.parametrize("kind", ["world-writable", "sticky", "symlink"])
def test_case_pointer_directory_that_others_control_is_refused(host_pyz, tmp_path, kind):
    stick = tmp_path / "stick"
    stick.mkdir()
    shutil.copy(host_pyz, stick / "bookgen-kit.pyz")
    if kind == "symlink":
        where = tmp_path / "stick-link"
        where.symlink_to(stick)
        reason = LINK
    else:
        where = stick
        mode = 0o777 if kind == "world-writable" else 0o1777
        os.chmod(stick, mode)
        reason = writable(mode)
    done = from_pyz(where / "bookgen-kit.pyz", "case", "open", "--id", "P", "--dir", str(tmp_path / "cases" / "P"),
                    "--allow-host-disk")
    assert_refused(done, where, reason)
    assert not (tmp_path / "cases").exists() and not os.path.lexists(stick / "bookgen-kit.case")


# --------------------------------------------------------------------------- the rotation journal and .env copies
@pytest.fixture
def app(tmp_path):
    """A BookGen app directory: SECRET_KEY rotates with no service at all, so no stack is needed here."""
    host = make_host_tree(tmp_path / "host")
    return host, {"BOOKGEN_KIT_APP_DIR": str(host.app_dir)}


def rotate(env, *args):
    return kit(*args, "rotate", "run", "--yes", "--only", "SECRET_KEY", env=env)


def test_rotation_state_is_made_private(app):
    host, env = app
    done = rotate(env)
    assert done.returncode == 0, done.stderr
    state = host.app_dir / ".bookgen-kit"
    assert state.stat().st_mode & 0o7777 == 0o700 and (state / "rotation").stat().st_mode & 0o7777 == 0o700
    runs = list((state / "rotation").iterdir())
    assert len(runs) == 1 and runs[0].stat().st_mode & 0o777 == 0o600 and runs[0].name.endswith(".json")
    previous = list(host.app_dir.glob(".env.previous-*"))
    assert len(previous) == 1 and previous[0].stat().st_mode & 0o777 == 0o600
    assert not (host.app_dir / ".env.pending").exists()
    assert not list(host.app_dir.glob("*.partial")) and not list(host.app_dir.glob(".*.partial"))


def test_rotation_refuses_a_planted_pending_file(app, tmp_path):
    host, env = app
    env_before = snapshot(host.env_file)
    victim = planted_file(tmp_path)
    before = snapshot(victim)
    pending = host.app_dir / ".env.pending"
    pending.symlink_to(victim)
    assert_refused(rotate(env), pending, LINK)
    assert_refused_json(rotate(env, "--json"), pending, LINK)
    pending.unlink()
    os.link(victim, pending)
    assert_refused(rotate(env), pending, "it has 2 hard links")
    assert snapshot(victim) == before and snapshot(host.env_file) == env_before
    assert not list((host.app_dir / ".bookgen-kit" / "rotation").iterdir())  # refused before the run was journaled


def test_rotation_refuses_a_planted_previous_copy_and_resumes_once_it_is_gone(app, tmp_path):
    host, env = app
    old = host.env_file.read_text()
    victim = planted_file(tmp_path)
    before = snapshot(victim)
    now = time.time()
    for second in range(-2, 180):  # every name the copy of the old .env can take in the next three minutes
        name = ".env.previous-" + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now + second))
        (host.app_dir / name).symlink_to(victim)
    done = rotate(env)
    assert done.returncode == 4, done.stderr
    assert done.stderr.startswith("bookgen-kit: error: refusing %s/.env.previous-" % host.app_dir), done.stderr
    assert (": %s" % LINK) in done.stderr.splitlines()[0]
    assert snapshot(victim) == before and host.env_file.read_text() == old  # the .env did not change either
    for link in glob.glob(str(host.app_dir / ".env.previous-*")):
        assert os.path.islink(link)
        os.unlink(link)
    resumed = kit("--json", "rotate", "resume", env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["state"] == "finished" and host.env_file.read_text() != old
    assert snapshot(victim) == before


@pytest.mark.parametrize("where", [".bookgen-kit", ".bookgen-kit/rotation"])
def test_rotation_journal_directory_that_is_a_symlink_is_refused(app, tmp_path, where):
    host, env = app
    victim = planted_dir(tmp_path)
    before = snapshot(victim)
    link = host.app_dir / where
    link.parent.mkdir(mode=0o700, exist_ok=True)
    link.symlink_to(victim)
    assert_refused(rotate(env), link, LINK)
    if where.endswith("rotation"):  # read too: the journal decides what resume and rollback do
        assert_refused_json(kit("--json", "rotate", "plan", env=env), link, LINK)
        assert_refused(kit("rotate", "resume", env=env), link, LINK)
    assert snapshot(victim) == before
    assert not (host.app_dir / ".env.pending").exists()


def test_rotation_journal_file_that_is_a_symlink_is_refused(app, tmp_path):
    host, env = app
    assert rotate(env).returncode == 0
    lure = tmp_path / "lure.json"  # an "interrupted run" that would make resume set values on the services
    lure.write_text(json.dumps({"id": "x", "created": "9999", "state": "created", "secrets": {}, "events": []}))
    os.utime(lure, ns=(OLD, OLD))
    before = snapshot(lure)
    link = host.app_dir / ".bookgen-kit" / "rotation" / "99999999T000000Z-planted.json"
    link.symlink_to(lure)
    assert_refused(kit("rotate", "resume", env=env), link, LINK)
    assert_refused(rotate(env), link, LINK)
    assert snapshot(lure) == before


@pytest.mark.parametrize("where,change", [("app", 0o777), ("app", 0o1777), ("app", "owner"),
                                          ("rotation", 0o770), ("rotation", 0o757)], ids=lambda v: (
    "%04o" % v if isinstance(v, int) else v))
def test_rotation_directory_that_others_can_write_is_refused(app, where, change):
    host, env = app
    if where == "rotation":
        assert rotate(env).returncode == 0
        directory = host.app_dir / ".bookgen-kit" / "rotation"
    else:
        directory = host.app_dir
    env_before = snapshot(host.env_file)
    if change == "owner":
        os.chown(directory, NOBODY, NOBODY)
        reason = "it is owned by uid %d, neither root nor us" % NOBODY
    else:
        os.chmod(directory, change)
        reason = writable(change)
    assert_refused(rotate(env), directory, reason)
    assert_refused_json(rotate(env, "--json"), directory, reason)
    assert snapshot(host.env_file) == env_before and not (host.app_dir / ".env.pending").exists()
    if where == "app":
        assert not (host.app_dir / ".bookgen-kit").exists()  # nothing made in it before the refusal


# --------------------------------------------------------------------------- hardening undo bundles
BUNDLES = "var/lib/bookgen-kit/harden"


@pytest.fixture
def tree(tmp_path):
    """A host tree for `harden apply --root`: the sysctl check writes one file and runs nothing (not live)."""
    return make_host_tree(tmp_path / "root").root


def harden(root, *args):
    return kit("--json", "harden", *args, "--root", str(root), "--app-dir", "/opt/bookgen")


def apply(root):
    return harden(root, "apply", "--yes", "--only", "sysctl")


def test_undo_bundles_are_made_private_and_roll_back(tree):
    done = apply(tree)
    assert done.returncode == 0, done.stderr
    bundle = Path(json.loads(done.stdout)["bundle"])
    assert bundle.parent == tree / BUNDLES
    for directory in (tree / "var/lib/bookgen-kit", tree / BUNDLES, bundle):
        assert directory.stat().st_mode & 0o7777 == 0o700
    assert (bundle / "manifest.json").stat().st_mode & 0o777 == 0o600
    assert sorted(os.listdir(bundle)) == ["manifest.json"]
    rolled = harden(tree, "rollback", str(bundle))
    assert rolled.returncode == 0, rolled.stderr
    assert not (tree / "etc/sysctl.d/90-bookgen-kit.conf").exists()


@pytest.mark.parametrize("where", [BUNDLES, "var/lib/bookgen-kit"])
def test_undo_bundle_directory_that_is_a_symlink_is_refused(tree, tmp_path, where):
    victim = planted_dir(tmp_path)
    before = snapshot(victim)
    link = tree / where
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(victim)
    assert_refused_json(apply(tree), link, LINK)
    assert snapshot(victim) == before
    assert not (tree / "etc/sysctl.d/90-bookgen-kit.conf").exists()  # nothing applied without an undo bundle


def test_undo_bundle_that_is_a_symlink_or_holds_a_planted_manifest_is_refused(tree, tmp_path):
    done = apply(tree)
    assert done.returncode == 0, done.stderr
    bundle = Path(json.loads(done.stdout)["bundle"])
    via = tmp_path / "bundle-link"
    via.symlink_to(bundle)
    assert_refused_json(harden(tree, "confirm", str(via)), via, LINK)

    victim = planted_file(tmp_path)
    victim.write_bytes((bundle / "manifest.json").read_bytes())  # a manifest rollback would happily "restore"
    os.utime(victim, ns=(OLD, OLD))
    before = snapshot(victim)
    manifest = bundle / "manifest.json"
    manifest.unlink()
    manifest.symlink_to(victim)
    assert_refused_json(harden(tree, "confirm", str(bundle)), manifest, LINK)
    assert_refused_json(harden(tree, "rollback", str(bundle)), manifest, LINK)
    manifest.unlink()
    os.link(victim, manifest)
    assert_refused_json(harden(tree, "rollback", str(bundle)), manifest, "it has 2 hard links")
    assert snapshot(victim) == before
    assert (tree / "etc/sysctl.d/90-bookgen-kit.conf").exists()  # nothing was rolled back from a planted manifest


@pytest.mark.parametrize("where,change", [(BUNDLES, 0o777), (BUNDLES, 0o1777), (BUNDLES, "owner"),
                                          ("var/lib/bookgen-kit", 0o775), ("var/lib", 0o777)], ids=lambda v: (
    "%04o" % v if isinstance(v, int) else v))
def test_undo_bundle_directory_that_others_can_write_is_refused(tree, where, change):
    directory = tree / where
    directory.mkdir(parents=True, exist_ok=True)
    if change == "owner":
        os.chown(directory, NOBODY, NOBODY)
        reason = "it is owned by uid %d, neither root nor us" % NOBODY
    else:
        os.chmod(directory, change)
        reason = writable(change)
    assert_refused_json(apply(tree), directory, reason)
    assert not (tree / BUNDLES).exists() or os.listdir(tree / BUNDLES) == []
    assert not (tree / "etc/sysctl.d/90-bookgen-kit.conf").exists()


def test_a_sticky_root_ancestor_of_the_bundles_is_accepted(tree):
    os.chmod(tree / "var", 0o1777)
    done = apply(tree)
    assert done.returncode == 0, done.stderr
