"""The WAL archive's own pieces, judged by the real shell and by names: the archive_command never overwrites
(identical again: accepted; different: refused loudly), a segment appears only whole; continuity by names."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

from toolkit.db import wal


def archive(command: str, data_dir: Path, name: str) -> subprocess.CompletedProcess:
    """The command as PostgreSQL runs it: %p relative to the data directory (its working directory), by sh."""
    expanded = command.replace("%f", name).replace("%p", "pg_wal/" + name)
    return subprocess.run(["/bin/sh", "-c", expanded], cwd=data_dir, capture_output=True, text=True, timeout=60)


def test_the_archive_command_never_overwrites(tmp_path):
    data_dir, archive_dir = tmp_path / "data", tmp_path / "arch ive"  # a space in the path, quoted
    (data_dir / "pg_wal").mkdir(parents=True)
    archive_dir.mkdir()
    command = wal.archive_command(str(archive_dir))
    assert len(command.replace("%f", "0" * 40).replace("%p", "pg_wal/" + "0" * 40)) < 1024  # PostgreSQL's buffer
    name = "000000010000000000000003"
    segment = data_dir / "pg_wal" / name
    segment.write_bytes(os.urandom(4096))
    done = archive(command, data_dir, name)
    assert done.returncode == 0, done.stderr
    assert (archive_dir / name).read_bytes() == segment.read_bytes()
    assert sorted(p.name for p in archive_dir.iterdir()) == [name]  # no .partial left
    assert archive(command, data_dir, name).returncode == 0  # the same again (a retry after a crash)
    kept = (archive_dir / name).read_bytes()
    segment.write_bytes(os.urandom(4096))  # another segment under the same name
    refused = archive(command, data_dir, name)
    assert refused.returncode == 1 and "exists and differs" in refused.stderr and "not overwritten" in refused.stderr
    assert (archive_dir / name).read_bytes() == kept


def test_continuity_is_judged_by_names(tmp_path):
    for number in (2, 3, 4, 7, 8):
        (tmp_path / wal.segment_name(1, number)).write_bytes(b"")
    (tmp_path / wal.segment_name(2, 8)).write_bytes(b"")
    (tmp_path / "00000002.history").write_text("1\t0/8000000\tno recovery target specified\n")
    (tmp_path / (wal.segment_name(1, 2) + ".00000028.backup")).write_text("label")
    found = wal.read_archive(str(tmp_path))
    assert found.timelines[1].gaps == [(5, 6)] and found.timelines[1].last == 8
    assert found.first_gap_after(1, 2) == (5, 6) and found.first_gap_after(1, 7) is None
    assert found.histories == [2] and found.stray == []
    assert wal.read_history(str(tmp_path / "00000002.history")) == [(1, "0/8000000", "no recovery target specified")]
    assert wal.segment_of("0/8000028") == 8 and wal.parse_segment(wal.segment_name(3, 600)) == (3, 600)
    assert wal.parse_segment("000000010000000000000100") is None  # 0x100 is past a 16 MiB log's last segment
