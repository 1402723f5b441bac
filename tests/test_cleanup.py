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
