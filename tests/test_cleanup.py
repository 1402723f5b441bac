"""cleanup: dry run by default; never the newest backup, evidence, symlink targets or anything outside."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DAY = 86400


def kit(*args, env=None):
    environment = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HOME": "/nonexistent"}
    environment.update(env or {})
    return subprocess.run([sys.executable, "-m", "toolkit", *args], capture_output=True, text=True,
                          env=environment, timeout=120)


def age(path: Path, days: float) -> None:
    stamp = time.time() - days * DAY
    os.utime(path, (stamp, stamp), follow_symlinks=False)


def age_tree(path: Path, days: float) -> None:
    for child in sorted(path.rglob("*"), reverse=True):
        age(child, days)
    age(path, days)


@pytest.fixture
def aged_host(bookgen_host, tmp_path):
    app, logs = bookgen_host.app_dir, bookgen_host.log_dir
    books = sorted((app / "bios").iterdir())
    age_tree(books[0], 30)  # old book: goes
    age_tree(books[1], 30)
    age(books[1] / "chapter1.md", 1)  # old book with a fresh chapter: stays
    docx = sorted((app / "docx").iterdir())
    age(docx[0], 20)  # goes
    backups = app / "backups"
    for name in ("bookgen_20261001.sql.gz", "bookgen_20261010.dump", "bookgen_20261010.dump.backup.json",
                 "bookgen_20261020.sql.gz", "bookgen_20261021.sql.gz"):
        (backups / name).write_bytes(os.urandom(1000))
    age(backups / "bookgen_20261001.sql.gz", 50)
    age(backups / "bookgen_20261010.dump", 40)
    age(backups / "bookgen_20261010.dump.backup.json", 40)
    age(backups / "bookgen_20261020.sql.gz", 30)
    (backups / "bookgen_20261020.sql.gz.keep").write_text("pre-breach\n")
    age(backups / "bookgen_20261021.sql.gz", 10)  # newest backup, old as it is: kept
    age(backups / "bookgen_20261101_020000.sql.gz", 60)
    (logs / "api.log.2.gz").write_bytes(b"x" * 500)
    age(logs / "api.log.2.gz", 9)  # goes
    age(logs / "api.log.1", 2)  # too recent
    age(logs / "api.log", 90)  # not rotated: never
    # evidence written beside the app by an earlier capture: never touched
    evidence = app / "docx" / "evidence"
    evidence.mkdir()
    (evidence / "INC-1-host.tar.zst.age").write_bytes(b"payload")
    (evidence / "SHA256SUMS").write_text("x\n")
    age_tree(evidence, 40)
    # a symlink pointing outside the tree: neither followed nor its target touched
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.docx").write_bytes(b"keep me")
    age(outside / "precious.docx", 100)
    os.symlink(outside, app / "bios" / "link-out")
    os.symlink(outside / "precious.docx", app / "docx" / "link.docx")
    env = {"BOOKGEN_KIT_APP_DIR": str(app), "BOOKGEN_KIT_LOG_DIRS": str(logs)}
    return bookgen_host, env, books, docx, outside


def test_dry_run_lists_and_deletes_nothing(aged_host):
    host, env, books, docx, outside = aged_host
    before = sorted(str(p) for p in host.root.rglob("*"))
    done = kit("--json", "cleanup", env=env)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["applied"] is False
    paths = {c["path"] for c in result["plan"]["candidates"]}
    backups = host.app_dir / "backups"
    assert paths == {str(books[0]), str(docx[0]), str(host.log_dir / "api.log.2.gz"),
                     str(backups / "bookgen_20261001.sql.gz"), str(backups / "bookgen_20261010.dump"),
                     str(backups / "bookgen_20261010.dump.backup.json"),
                     str(backups / "bookgen_20261101_020000.sql.gz")}
    reasons = {s["path"]: s["reason"] for s in result["plan"]["skipped"]}
    assert "newest backup" in reasons[str(backups / "bookgen_20261021.sql.gz")]
    assert "marked to keep" in reasons[str(backups / "bookgen_20261020.sql.gz")]
    assert "evidence" in reasons[str(host.app_dir / "docx" / "evidence")]
    assert "symlink" in reasons[str(host.app_dir / "bios" / "link-out")]
    assert result["plan"]["total_bytes"] > 0
    assert sorted(str(p) for p in host.root.rglob("*")) == before


def test_apply_with_archive_then_tar_lists_and_extracts(aged_host, tmp_path):
    host, env, books, docx, outside = aged_host
    archive_dir = tmp_path / "usb"
    original = (books[0] / "chapter1.md").read_bytes()
    done = kit("--json", "cleanup", "--apply", "--archive-to", str(archive_dir), env=env)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert not books[0].exists() and books[1].exists() and not docx[0].exists()
    assert (host.app_dir / "backups" / "bookgen_20261021.sql.gz").exists()
    assert (host.app_dir / "backups" / "bookgen_20261020.sql.gz").exists()
    assert (host.app_dir / "docx" / "evidence" / "SHA256SUMS").exists()
    assert (outside / "precious.docx").read_bytes() == b"keep me"
    assert (host.log_dir / "api.log").exists() and (host.log_dir / "api.log.1").exists()
    archive = Path(result["archive"])
    assert archive.parent == archive_dir and archive.name.endswith(".tar.zst")
    listing = subprocess.run(["tar", "--zstd", "-tf", str(archive)], capture_output=True, text=True, check=True).stdout
    assert str(books[0] / "chapter1.md").lstrip("/") in listing.splitlines()
    extract = tmp_path / "extract"
    extract.mkdir()
    subprocess.run(["tar", "--zstd", "-xf", str(archive), "-C", str(extract)], check=True)
    assert (extract / str(books[0] / "chapter1.md").lstrip("/")).read_bytes() == original
    # space before and after is reported (not compared: other processes share this disk)
    assert isinstance(result["free_before"], int) and isinstance(result["free_after"], int)


def test_apply_without_archive_and_twice_is_idempotent(aged_host):
    host, env, books, _, _ = aged_host
    first = kit("--json", "cleanup", "--apply", env=env)
    assert first.returncode == 0 and len(json.loads(first.stdout)["deleted"]) == 7
    second = kit("--json", "cleanup", "--apply", env=env)
    assert second.returncode == 0 and json.loads(second.stdout)["deleted"] == []


def test_archive_inside_the_cleaned_tree_is_refused(aged_host):
    host, env, _, _, _ = aged_host
    done = kit("cleanup", "--apply", "--archive-to", str(host.app_dir / "docx" / "arch"), env=env)
    assert done.returncode == 2 and "inside" in done.stderr


def test_symlinked_root_is_refused(bookgen_host, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    victim = elsewhere / "important.docx"
    victim.write_bytes(b"x")
    age(victim, 100)
    docx = bookgen_host.app_dir / "docx"
    for child in docx.iterdir():
        child.unlink()
    docx.rmdir()
    os.symlink(elsewhere, docx)
    done = kit("--json", "cleanup", "--apply", env={"BOOKGEN_KIT_APP_DIR": str(bookgen_host.app_dir),
                                                     "BOOKGEN_KIT_LOG_DIRS": str(bookgen_host.log_dir)})
    assert done.returncode == 0, done.stderr
    assert victim.exists()
    assert any("symlink" in s["reason"] for s in json.loads(done.stdout)["plan"]["skipped"])


def test_missing_app_dir_is_bad_input(tmp_path):
    done = kit("cleanup", "--app-dir", str(tmp_path / "nope"))
    assert done.returncode == 3 and "no BookGen directory" in done.stderr


# -- a hostile bios/: deep and wide trees, planted links, swaps between plan and apply --------------------------
DEEP, WIDE = 1500, 20000
OLD = 30  # days: older than every cutoff


def _stamp(days: float) -> float:
    return time.time() - days * DAY


def build_deep(top: Path, levels: int = DEEP, days: float = OLD) -> list:
    """top/d/d/…/d (levels deep) with a file every 100 levels and one at the bottom, built and aged without
    recursion (the test's own interpreter must not recurse either). Returns the directories, top first."""
    paths = [str(top)]
    os.mkdir(paths[0])
    for level in range(levels):
        paths.append(paths[-1] + "/d")
        os.mkdir(paths[-1])
        if level % 100 == 0:
            with open(paths[-1] + "/note.md", "wb") as handle:
                handle.write(b"level %d\n" % level)
    with open(paths[-1] + "/bottom.md", "wb") as handle:
        handle.write(b"the bottom of the well\n")
    stamp = _stamp(days)
    for path in reversed(paths):  # children first: aging a child never touches its parent
        for name in os.listdir(path):
            os.utime(path + "/" + name, (stamp, stamp), follow_symlinks=False)
        os.utime(path, (stamp, stamp), follow_symlinks=False)
    return paths


def build_wide(top: Path, entries: int = WIDE, days: float = OLD) -> None:
    top.mkdir()
    stamp = _stamp(days)
    fd = os.open(str(top), os.O_RDONLY | os.O_DIRECTORY)
    try:
        for index in range(entries):
            name = "page%05d.md" % index
            handle = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=fd)
            os.write(handle, b"%d\n" % index)
            os.close(handle)
            os.utime(name, (stamp, stamp), dir_fd=fd)
    finally:
        os.close(fd)
    os.utime(str(top), (stamp, stamp))


def count_tree(top: Path) -> int:
    """Entries under top (itself included), without recursion."""
    total, pending = 0, [str(top)]
    while pending:
        path = pending.pop()
        total += 1
        if os.path.isdir(path) and not os.path.islink(path):
            pending += [path + "/" + name for name in os.listdir(path)]
    return total


def snapshot(directory: str) -> dict:
    """Names, inodes, sizes and times of a directory's entries (a planted link's target: never touched)."""
    found = {}
    for name in sorted(os.listdir(directory)):
        info = os.lstat(os.path.join(directory, name))
        found[name] = (info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
    info = os.lstat(directory)
    found["."] = (info.st_ino, info.st_mtime_ns, info.st_ctime_ns)
    return found


def remove_tree(path: Path) -> None:
    """GNU rm removes a tree of any depth (shutil.rmtree recurses on 3.9-3.11, pytest's own cleanup too)."""
    if os.path.lexists(str(path)):
        subprocess.run(["rm", "-rf", "--one-file-system", "--", str(path)], timeout=300, check=False)


@pytest.fixture
def deep_tmp(tmp_path):
    """tmp_path, emptied at the end without recursion (deep trees would break pytest's later cleanup)."""
    yield tmp_path
    for child in list(tmp_path.iterdir()):
        remove_tree(child)


def deployment_env(host) -> dict:
    return {"BOOKGEN_KIT_APP_DIR": str(host.app_dir), "BOOKGEN_KIT_LOG_DIRS": str(host.log_dir)}


@pytest.fixture
def big_bios(deep_tmp, bookgen_host):
    """bios/ with a 1,500-level-deep old tree and a 20,000-entry wide old one (the fixture's books are fresh)."""
    bios = bookgen_host.app_dir / "bios"
    started = time.monotonic()
    build_deep(bios / "deep-old")
    build_wide(bios / "wide-old")
    return bookgen_host, bios, time.monotonic() - started


DRIVER = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
from toolkit.config import Deployment
from toolkit.host import cleanup
try:
    import zstandard  # noqa: F401
    archive = sys.argv[4]
except ImportError:
    archive = None
sys.setrecursionlimit(200)  # nothing may recurse with the depth of the tree
deployment = Deployment(app_dir=sys.argv[2], log_dirs=[sys.argv[3]])
started = time.monotonic()
plan = cleanup.plan_cleanup(deployment)
planned = time.monotonic()
result = cleanup.apply_cleanup(plan, deployment, archive)
done = time.monotonic()
print(json.dumps({"python": list(sys.version_info[:2]), "archive": result.archive,
                  "archive_members": result.archive_members, "deleted": result.deleted,
                  "not_deleted": [[s.path, s.reason] for s in result.not_deleted],
                  "candidates": [[c.path, c.kind] for c in plan.candidates],
                  "skipped": [[s.path, s.reason] for s in plan.skipped],
                  "seconds": {"plan": planned - started, "apply": done - planned}}))
"""


def venv_python() -> str:
    return str(ROOT / ".venv" / "bin" / "python")


@pytest.mark.parametrize("version", ["3.9", "3.10", "3.11", "venv"])
def test_deep_and_wide_trees_are_planned_archived_and_deleted_without_recursion(version, big_bios, tmp_path):
    """os.walk, tarfile.add and shutil.rmtree recurse on 3.9-3.11 (RecursionError at ~1,000 levels): cleanup's
    library runs as it is under each interpreter, with a recursion limit of 200. The pyenv interpreters have no
    zstandard: they plan and delete; the venv's 3.11 also archives (the CLI test below does too)."""
    from tests.conftest import interpreter

    host, bios, _built = big_bios
    python = venv_python() if version == "venv" else interpreter(version)
    flags = ["-I"] if version == "venv" else ["-I", "-S"]
    archive_dir = tmp_path / "usb"
    done = subprocess.run([python, *flags, "-c", DRIVER, str(ROOT), str(host.app_dir), str(host.log_dir),
                           str(archive_dir)], capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 0 and "RecursionError" not in done.stderr, done.stderr[-3000:]
    report = json.loads(done.stdout)
    if version != "venv":
        assert report["python"] == [int(p) for p in version.split(".")]
    assert sorted(report["candidates"]) == [[str(bios / "deep-old"), "dir"], [str(bios / "wide-old"), "dir"]]
    assert not [s for s in report["skipped"] if "limit" in s[1] or "not read" in s[1]], report["skipped"]
    assert sorted(report["deleted"]) == [str(bios / "deep-old"), str(bios / "wide-old")]
    assert report["not_deleted"] == []
    assert not (bios / "deep-old").exists() and not (bios / "wide-old").exists()
    assert len(list(bios.iterdir())) == 4  # the fixture's fresh books stay
    if version == "venv":
        members = 1 + DEEP + DEEP // 100 + 1 + 1 + WIDE  # deep-old, its dirs, notes, bottom; wide-old, pages
        assert report["archive_members"] == members
    else:
        assert report["archive"] is None
    print("\n%s: plan %.2fs, apply %.2fs" % (version, report["seconds"]["plan"], report["seconds"]["apply"]))


@pytest.fixture(scope="module")
def older_pythons_pyz(pyz) -> Path:
    """The session's zipapp (every target): the CLI, with zstandard, under the interpreters whose os.walk,
    tarfile.add and shutil.rmtree recurse."""
    return pyz


@pytest.mark.parametrize("version", ["3.9", "3.10", "3.11"])
def test_the_zipapp_archives_and_deletes_deep_and_wide_trees_on_older_pythons(version, older_pythons_pyz, big_bios,
                                                                                tmp_path):
    from tests.conftest import interpreter

    host, bios, _ = big_bios
    environment = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", **deployment_env(host)}
    started = time.monotonic()
    done = subprocess.run([interpreter(version), "-I", "-S", str(older_pythons_pyz), "--json", "cleanup", "--apply",
                           "--archive-to", str(tmp_path / "usb")], capture_output=True, text=True,
                          env=environment, timeout=300)
    took = time.monotonic() - started
    assert done.returncode == 0 and "RecursionError" not in done.stderr, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert sorted(result["deleted"]) == [str(bios / "deep-old"), str(bios / "wide-old")]
    assert not (bios / "deep-old").exists() and not (bios / "wide-old").exists()
    listing = subprocess.run(["tar", "--zstd", "-tf", result["archive"]], capture_output=True, text=True,
                             check=True).stdout.splitlines()
    assert len(listing) == result["archive_members"] == 1 + DEEP + DEEP // 100 + 1 + 1 + WIDE
    print("\npyz under %s: plan+archive+verify+delete %.1fs" % (version, took))


def test_cli_archives_deep_and_wide_trees_member_by_member(big_bios, tmp_path):
    host, bios, built = big_bios
    deepest = str(bios / "deep-old") + "/d" * DEEP + "/bottom.md"
    archive_dir = tmp_path / "usb"
    started = time.monotonic()
    done = kit("--json", "cleanup", "--apply", "--archive-to", str(archive_dir), env=deployment_env(host))
    took = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert sorted(result["deleted"]) == [str(bios / "deep-old"), str(bios / "wide-old")]
    assert not (bios / "deep-old").exists() and not (bios / "wide-old").exists()
    archive = Path(result["archive"])
    listing = subprocess.run(["tar", "--zstd", "-tf", str(archive)], capture_output=True, text=True,
                             check=True).stdout.splitlines()
    assert len(listing) == result["archive_members"] == 1 + DEEP + DEEP // 100 + 1 + 1 + WIDE
    assert deepest.lstrip("/") in listing and str(bios / "wide-old" / "page19999.md").lstrip("/") in listing
    # GNU tar extracts the deepest file as it was
    extract = tmp_path / "extract"
    extract.mkdir()
    subprocess.run(["tar", "--zstd", "-xf", str(archive), "-C", str(extract),
                    deepest.lstrip("/")], check=True)
    with open(str(extract) + deepest, "rb") as handle:
        assert handle.read() == b"the bottom of the well\n"
    print("\nbuilt in %.1fs; cli plan+archive+verify+delete %.1fs" % (built, took))


def test_entry_and_time_limits_are_recorded_and_nothing_half_walked_is_planned(big_bios):
    from toolkit.config import Deployment
    from toolkit.host.cleanup import apply_cleanup, plan_cleanup

    host, bios, _ = big_bios
    deployment = Deployment(app_dir=str(host.app_dir), log_dirs=[str(host.log_dir)])
    plan = plan_cleanup(deployment, max_entries=5000)
    reasons = [(s.path, s.reason) for s in plan.skipped]
    assert any("entry limit (5000 names)" in why for _, why in reasons), reasons
    assert str(bios / "wide-old") not in {c.path for c in plan.candidates}
    assert any(path == str(bios / "wide-old") and "not walked" in why for path, why in reasons), reasons
    result = apply_cleanup(plan, deployment)
    assert (bios / "wide-old" / "page19999.md").exists() and count_tree(bios / "wide-old") == WIDE + 1
    assert set(result.deleted) <= {str(bios / "deep-old")}

    timed = plan_cleanup(deployment, time_limit=0)
    assert any("time limit" in s.reason for s in timed.skipped), [(s.path, s.reason) for s in timed.skipped]
    assert str(bios / "wide-old") not in {c.path for c in timed.candidates}


def test_planted_links_to_etc_are_never_followed(bookgen_host, tmp_path):
    """bios/etc-link -> /etc, and an old book whose subdirectory is a link to /etc (a parent symlink of every
    path below it): the links are kept (top level) or archived and removed as links; /etc is untouched."""
    bios = bookgen_host.app_dir / "bios"
    before = snapshot("/etc")
    os.symlink("/etc", bios / "etc-link")
    age(bios / "etc-link", 100)
    book = bios / "old-book"
    book.mkdir()
    (book / "chapter1.md").write_bytes(b"chapter one\n")
    os.link(book / "chapter1.md", book / "chapter1-again.md")  # a hard link: one member, one LNKTYPE
    os.symlink("/etc", book / "chapters")
    os.symlink("/etc/passwd", book / "passwd")
    age_tree(book, 40)
    done = kit("--json", "cleanup", env=deployment_env(bookgen_host))
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)["plan"]
    assert {c["path"] for c in plan["candidates"]} == {str(book)}
    reasons = {s["path"]: s["reason"] for s in plan["skipped"]}
    assert "symlink" in reasons[str(bios / "etc-link")]
    archive_dir = tmp_path / "usb"
    done = kit("--json", "cleanup", "--apply", "--archive-to", str(archive_dir), env=deployment_env(bookgen_host))
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["deleted"] == [str(book)] and not book.exists()
    assert os.path.islink(bios / "etc-link") and os.readlink(bios / "etc-link") == "/etc"
    assert snapshot("/etc") == before
    listing = subprocess.run(["tar", "--zstd", "-tvf", result["archive"]], capture_output=True, text=True,
                             check=True).stdout.splitlines()
    assert len(listing) == 5, listing  # the book, chapter1.md, its hard link, two symlinks
    assert any(line.startswith("l") and line.endswith("chapters -> /etc") for line in listing), listing
    assert any(line.startswith("h") and "chapter1" in line and " link to " in line for line in listing), listing
    assert not [line for line in listing if "/chapters/" in line or line.endswith("passwd") and
                not line.startswith("l")]


def test_a_configured_directory_under_a_symlinked_parent_is_refused(bookgen_host, tmp_path):
    """Nothing is reached through a symlink in any component of a configured path: the app dir (exit 3) and a
    log directory (skipped, its rotated logs left)."""
    rotated = bookgen_host.log_dir / "api.log.7"
    rotated.write_bytes(b"old")
    age(rotated, 30)
    alias = tmp_path / "alias"
    os.symlink(bookgen_host.root / "var", alias)
    env = {"BOOKGEN_KIT_APP_DIR": str(bookgen_host.app_dir),
           "BOOKGEN_KIT_LOG_DIRS": str(alias / "log" / "bookgen")}
    done = kit("--json", "cleanup", "--apply", env=env)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert rotated.exists() and result["deleted"] == []
    assert any("symlink" in s["reason"] and s["path"] == str(alias / "log" / "bookgen")
               for s in result["plan"]["skipped"]), result["plan"]["skipped"]
    app_alias = tmp_path / "app-alias"
    os.symlink(bookgen_host.root / "opt", app_alias)
    book = bookgen_host.app_dir / "bios" / "Ada_Lovelace"
    age_tree(book, 40)
    done = kit("cleanup", "--apply", env={"BOOKGEN_KIT_APP_DIR": str(app_alias / "bookgen"),
                                          "BOOKGEN_KIT_LOG_DIRS": str(bookgen_host.log_dir)})
    assert done.returncode == 3 and "symlink" in done.stderr, done.stderr
    assert book.exists()


def _swap_for_link(directory: Path, target: Path, days: float) -> Path:
    """Move a directory aside and put a symlink to target in its place, times set back so that the tree's
    newest mtime is what it was (the attacker owns the tree and can utime it)."""
    parent_times = os.stat(directory.parent)
    aside = directory.parent.parent / ("moved-" + directory.name)
    os.rename(directory, aside)
    os.symlink(target, directory)
    age(directory, days)
    os.utime(directory.parent, ns=(parent_times.st_atime_ns, parent_times.st_mtime_ns))
    os.utime(aside.parent, ns=(parent_times.st_atime_ns, parent_times.st_mtime_ns))
    return aside


@pytest.fixture
def swap_world(deep_tmp, bookgen_host, tmp_path):
    bios = bookgen_host.app_dir / "bios"
    paths = build_deep(bios / "deep-old", levels=300)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.md").write_bytes(b"keep me\n")
    age_tree(outside, 100)
    from toolkit.config import Deployment

    deployment = Deployment(app_dir=str(bookgen_host.app_dir), log_dirs=[str(bookgen_host.log_dir)])
    return bookgen_host, bios, paths, outside, deployment


@pytest.mark.parametrize("archive", [False, True])
def test_a_subtree_swapped_for_a_symlink_after_planning_is_left(swap_world, tmp_path, archive):
    from toolkit.host.cleanup import apply_cleanup, plan_cleanup

    host, bios, paths, outside, deployment = swap_world
    plan = plan_cleanup(deployment)
    assert [c.path for c in plan.candidates] == [paths[0]]
    before = snapshot(str(outside))
    swapped = Path(paths[150])
    aside = _swap_for_link(swapped, outside, OLD)
    result = apply_cleanup(plan, deployment, str(tmp_path / "usb") if archive else None)
    assert result.deleted == [] and len(result.not_deleted) == 1
    why = result.not_deleted[0].reason
    assert "changed since it was planned" in why or "not archived as planned" in why, why
    assert "device/inode differ" in why or "appeared or was replaced" in why, why
    assert snapshot(str(outside)) == before
    assert os.path.islink(str(swapped)) and (aside / "d" / "d").is_dir()
    assert os.path.exists(paths[101] + "/note.md")  # nothing of the tree went
    if archive:
        listing = subprocess.run(["tar", "--zstd", "-tf", result.archive], capture_output=True, text=True,
                                 check=True).stdout
        assert "precious" not in listing


def test_the_deletion_walk_itself_neither_enters_nor_removes_what_was_not_planned(swap_world):
    """Past the check (a swap in the moment between the check and the deletion walk): the walk unlinks only
    planned names, enters only planned directories (device and inode), and says what it left."""
    from toolkit.host.cleanup import _remove_tree, plan_cleanup
    from toolkit.host.hostfs import HostFS

    host, bios, paths, outside, deployment = swap_world
    side = Path(paths[10]) / "side"
    (side / "inner").mkdir(parents=True)
    (side / "inner" / "page.md").write_bytes(b"planned\n")
    (side / "page.md").write_bytes(b"planned\n")
    age_tree(side, OLD)
    age(Path(paths[10]), OLD)
    plan = plan_cleanup(deployment)
    candidate = plan.candidates[0]
    before = snapshot(str(outside))
    _swap_for_link(Path(paths[150]), outside, OLD)  # a link where a planned directory was
    os.rename(side / "inner", side / "inner.old")
    (side / "inner").mkdir()  # another directory under the planned name: not the planned device/inode
    (side / "inner" / "planted.md").write_bytes(b"x")
    problems = _remove_tree(HostFS("/"), candidate, plan.trees[candidate.path], None)
    text = problems.text()
    assert "side/inner appeared or was replaced" in text and "d/d appeared or was replaced" in text, text
    assert snapshot(str(outside)) == before
    assert os.path.islink(paths[150])  # the planted link itself is not planned: left too
    assert (side / "inner" / "planted.md").exists()  # the other directory was not entered
    assert not (side / "page.md").exists() and not (side / "inner.old" / "page.md").exists()  # planned: gone
    assert not os.path.exists(paths[101] + "/note.md")  # planned files above the swap went
    assert os.path.exists(paths[149]) and not os.path.exists(paths[0] + "/d/note.md")


def test_a_file_changed_after_it_was_archived_is_not_deleted(swap_world, tmp_path, monkeypatch):
    from toolkit.host import cleanup

    host, bios, paths, outside, deployment = swap_world
    plan = cleanup.plan_cleanup(deployment)
    original = cleanup._verify_archive

    def verify_then_write(path, expected):
        count = original(path, expected)
        with open(paths[-1] + "/bottom.md", "ab") as handle:  # the app writes after the archive was read
            handle.write(b"more\n")
        age(Path(paths[-1] + "/bottom.md"), OLD)
        return count

    monkeypatch.setattr(cleanup, "_verify_archive", verify_then_write)
    result = cleanup.apply_cleanup(plan, deployment, str(tmp_path / "usb"))
    assert result.deleted == [] and "changed after it was archived" in result.not_deleted[0].reason
    assert os.path.exists(paths[-1] + "/bottom.md")


def test_evidence_deep_inside_an_old_book_keeps_the_book(bookgen_host):
    from toolkit.config import Deployment
    from toolkit.host.cleanup import plan_cleanup

    bios = bookgen_host.app_dir / "bios"
    book = bios / "old-with-evidence"
    (book / "a" / "case").mkdir(parents=True)
    (book / "a" / "case" / "SHA256SUMS").write_text("x\n")
    (book / "chapter1.md").write_text("old\n")
    age_tree(book, 40)
    deployment = Deployment(app_dir=str(bookgen_host.app_dir), log_dirs=[str(bookgen_host.log_dir)])
    plan = plan_cleanup(deployment)
    assert plan.candidates == []
    reasons = {s.path: s.reason for s in plan.skipped}
    assert "evidence" in reasons[str(book)] and "evidence" in reasons[str(book / "a" / "case")]
    # a marker directly in bios/ makes bios/ itself an evidence output, as for docx/: nothing in it goes
    (bios / "SHA256SUMS").write_text("x\n")
    age_tree(bios, 40)
    plan = plan_cleanup(deployment)
    assert plan.candidates == []
    assert "evidence" in {s.path: s.reason for s in plan.skipped}[str(bios)]
