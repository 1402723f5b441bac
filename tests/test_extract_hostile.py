"""`extract` against hostile bundles: chained symlinks, sparse and decompression bombs, members that do not match
the manifest inside the payload, and that manifest not matching the detached one. Every bundle is crafted with
tarfile (a pax tar, manifest.json last) and a detached manifest, as capture writes them; the CLI runs as a
subprocess with a clean environment and its exit code is the verdict."""
from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
SCHEMA_1 = "bookgen-kit/evidence-manifest/1"
SCHEMA_2 = "bookgen-kit/evidence-manifest/2"

Member = Tuple[tarfile.TarInfo, Optional[bytes], Optional[Dict[str, Any]]]


def kit(*args, timeout=300):
    environment = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(ROOT), "HOME": "/nonexistent"}
    return subprocess.run([sys.executable, "-m", "toolkit", *args], capture_output=True, text=True,
                          env=environment, timeout=timeout, stdin=subprocess.DEVNULL)


def extract(payload: Path, target: Path, *extra: str):
    done = kit("--json", "extract", str(payload), "--to", str(target), *extra)
    report = json.loads(done.stdout) if done.stdout.strip() else None
    return done, report


# -- crafting bundles -----------------------------------------------------------------------------------
def regular(name: str, data: bytes = b"data", mode: int = 0o644) -> Member:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    return info, data, None


def directory(name: str) -> Member:
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, 0o755
    return info, None, None


def symlink(name: str, target: str) -> Member:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info, None, None


def _zeros_and_region_sha256(size: int, offset: int, region: bytes) -> str:
    digest = hashlib.sha256()
    zeros = bytes(MiB)
    for start, end in ((0, offset), (offset + len(region), size)):
        left = end - start
        while left > 0:
            piece = min(left, MiB)
            digest.update(zeros[:piece])
            left -= piece
        if start == 0:
            digest.update(region)
    return digest.hexdigest()


def sparse(name: str, size: int, variant: str, region: bytes = b"the end\n") -> Member:
    """A GNU sparse member (pax format 1.0 or 0.1): `size` bytes, only `region` (at the end) stored."""
    offset = size - len(region)
    info = tarfile.TarInfo("GNUSparseFile.0/" + name)
    info.mode = 0o644
    if variant == "pax-1.0":
        info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": name,
                            "GNU.sparse.realsize": str(size)}
        data = ("1\n%d\n%d\n" % (offset, len(region))).encode().ljust(512, b"\0") + region
    else:
        info.pax_headers = {"GNU.sparse.map": "%d,%d" % (offset, len(region)), "GNU.sparse.size": str(size),
                            "GNU.sparse.name": name}
        data = region
    info.size = len(data)
    entry = {"path": name, "type": "file", "size": size, "sha256": _zeros_and_region_sha256(size, offset, region)}
    return info, data, entry


def _entry(info: tarfile.TarInfo, data: Optional[bytes]) -> Dict[str, Any]:
    if info.isreg():
        return {"path": info.name, "type": "file", "size": info.size, "sha256": hashlib.sha256(data).hexdigest()}
    if info.isdir():
        return {"path": info.name, "type": "dir", "size": 0}
    if info.issym():
        return {"path": info.name, "type": "symlink", "size": 0, "target": info.linkname}
    return {"path": info.name, "type": "other", "size": 0}


def make_bundle(out: Path, members: Sequence[Member], schema: int = 2,
                edit_inner: Optional[Callable[[List[Dict[str, Any]]], None]] = None,
                edit_detached: Optional[Callable[[Dict[str, Any]], None]] = None,
                after_manifest: Sequence[Member] = (), with_manifest: bool = True) -> Path:
    """An unencrypted bundle (payload .tar.zst, detached manifest, SHA256SUMS) listing its members truthfully
    unless edit_inner / edit_detached change what the manifests say."""
    import zstandard

    out.mkdir(parents=True, exist_ok=True)
    raw = io.BytesIO()
    artifacts = []
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data, entry in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
            artifacts.append(entry if entry is not None else _entry(info, data))
        listed = [dict(a) for a in artifacts]
        if edit_inner:
            edit_inner(listed)
        inner = json.dumps({"schema": SCHEMA_1 if schema == 1 else SCHEMA_2, "artifacts": listed},
                           indent=2, sort_keys=True).encode()
        if with_manifest:
            info = tarfile.TarInfo("manifest.json")
            info.size, info.mode = len(inner), 0o444
            tar.addfile(info, io.BytesIO(inner))
        for info, data, _entry_ in after_manifest:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    payload = out / "case-host-20260101T000000Z.tar.zst"
    payload.write_bytes(zstandard.ZstdCompressor().compress(raw.getvalue()))
    digest = hashlib.sha256(payload.read_bytes()).hexdigest()
    detached: Dict[str, Any] = {
        "schema": SCHEMA_1 if schema == 1 else SCHEMA_2, "inner_manifest_sha256": hashlib.sha256(inner).hexdigest(),
        "payload": {"file": payload.name, "sha256": digest, "size": payload.stat().st_size, "compression": "zstd",
                    "encrypted": False}}
    if schema == 1:
        detached["artifacts"] = [dict(a) for a in listed]
    else:
        detached["artifacts_count"] = len(listed)
    if edit_detached:
        edit_detached(detached)
    manifest = Path(str(payload) + ".manifest.json")
    manifest.write_text(json.dumps(detached, indent=2, sort_keys=True))
    (out / "SHA256SUMS").write_text("%s  %s\n%s  %s\n" % (
        digest, payload.name, hashlib.sha256(manifest.read_bytes()).hexdigest(), manifest.name))
    return payload


def files_under(path: Path) -> List[Path]:
    return [p for p in path.rglob("*")] if path.exists() else []


def assert_everything_inside(target: Path) -> None:
    root = os.path.realpath(target)
    for path in target.rglob("*"):
        real = os.path.realpath(path)
        assert real == root or real.startswith(root + "/"), (path, real)


def assert_nothing_kept(target: Path) -> None:
    """After a failure: no file at all (not even a temporary one), whatever the members were."""
    assert files_under(target) == [], [str(p) for p in files_under(target)]


# -- chained symlinks -----------------------------------------------------------------------------------
CHAINS = {
    # b goes up from a, which is '.': from the root, `..` leaves it
    "dot-then-up": ([symlink("a", "."), symlink("b", "a/../..")], {"b"}, {"a"}),
    # y -> x/up/..: x is sub, sub/up is '..' (the root), and one more `..` leaves it; each link alone is innocent
    "through-two-links": ([directory("sub"), symlink("x", "sub"), symlink("sub/up", ".."),
                           symlink("y", "x/up/..")], {"y"}, {"x", "sub/up"}),
    "deep-dots": ([symlink("l", "."), symlink("m", "l/l/l/l/../..")], {"m"}, {"l"}),
    # d made first is harmless (c does not exist: lexically d is x); c -> '.' made later turns d into ../x
    "later-link-changes-an-earlier-one": ([symlink("d", "c/../x"), symlink("c", ".")], {"d"}, {"c"}),
    # a escapes once c exists; e resolved through a, so without a it goes up from the root too
    "removal-cascades": ([directory("k"), directory("k/l"), symlink("a", "c/../k/l"), symlink("e", "a/../.."),
                          symlink("c", ".")], {"a", "e"}, {"c"}),
    # q -> p is harmless when made (p -> q, q not there yet); once both exist they loop: p goes, q then stays
    "loop": ([symlink("p", "q"), symlink("q", "p")], {"p"}, {"q"}),
    "up-from-a-subdirectory": ([directory("s"), symlink("s/t", "../../outside")], {"s/t"}, set()),
}


@pytest.mark.parametrize("shape", sorted(CHAINS))
def test_chained_symlinks_never_resolve_outside(tmp_path, shape):
    members, refused_links, kept_links = CHAINS[shape]
    outside = tmp_path / "outside"
    outside.mkdir()
    payload = make_bundle(tmp_path / "bundle", list(members) + [regular("ok.txt", b"fine")])
    target = tmp_path / "work" / "target"
    target.parent.mkdir()
    done, report = extract(payload, target)
    assert done.returncode == 6, done.stdout + done.stderr
    refused = {r["member"] for r in report["refused"]}
    assert refused == refused_links, report["refused"]
    for name in refused_links:
        assert not os.path.lexists(target / name)
    for name in kept_links:
        assert (target / name).is_symlink() and name in report["extracted"]
    assert (target / "ok.txt").read_bytes() == b"fine"
    assert_everything_inside(target)
    assert list(outside.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == [
        "bundle", "outside", "work"]


def test_an_absolute_link_is_recorded_not_created_and_raises_no_alarm(tmp_path):
    """/etc/systemd/system/x.wants/y -> /lib/systemd/system/y is how a host is, not an attack: no exit 6."""
    payload = make_bundle(tmp_path / "bundle", [directory("persistence"), symlink("persistence/sshd.service",
                                                                                   "/lib/systemd/system/ssh.service"),
                                                symlink("abs", "/etc"), symlink("via-abs", "abs/passwd"),
                                                regular("ok.txt", b"fine")])
    target = tmp_path / "target"
    done, report = extract(payload, target)
    assert done.returncode == 0, done.stdout + done.stderr
    assert report["refused"] == []
    assert {(r["member"], r["target"]) for r in report["recorded"]} == {
        ("persistence/sshd.service", "/lib/systemd/system/ssh.service"), ("abs", "/etc")}
    assert not os.path.lexists(target / "abs") and not os.path.lexists(target / "persistence/sshd.service")
    assert (target / "via-abs").is_symlink()  # it points to abs/passwd, inside, which is not there
    assert_everything_inside(target)


def test_a_later_link_that_changes_an_earlier_one_is_named_with_its_reason(tmp_path):
    payload = make_bundle(tmp_path / "bundle", [symlink("d", "c/../x"), symlink("c", ".")])
    done, report = extract(payload, tmp_path / "target")
    assert done.returncode == 6
    (item,) = report["refused"]
    assert item["member"] == "d" and "once every member is in place" in item["reason"]
    assert "outside" in item["reason"]
    assert "refused" in done.stderr or "refused" in done.stdout  # the one-line error says why the exit is 6


def test_nothing_is_written_through_a_link_extract_made(tmp_path):
    """A link that stays inside still never carries a member below it: the member is refused, not redirected."""
    payload = make_bundle(tmp_path / "bundle", [directory("real"), symlink("alias", "real"),
                                                regular("alias/planted.txt", b"x"), regular("real/kept.txt", b"y")])
    done, report = extract(payload, tmp_path / "target")
    assert done.returncode == 6
    assert {r["member"] for r in report["refused"]} == {"alias/planted.txt"}
    assert not (tmp_path / "target" / "real" / "planted.txt").exists()
    assert (tmp_path / "target" / "real" / "kept.txt").read_bytes() == b"y"


# -- sparse and decompression bombs ---------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["pax-1.0", "pax-0.1"])
def test_a_tiny_bundle_with_a_256_mib_sparse_member_is_refused_under_the_member_limit(tmp_path, variant):
    big = sparse("big.bin", 256 * MiB, variant)
    payload = make_bundle(tmp_path / "bundle", [big, regular("ok.txt", b"fine")])
    assert payload.stat().st_size < 2048  # the bundle was 579 bytes
    with tarfile.open(fileobj=io.BytesIO(_decompressed(payload)), mode="r|") as tar:
        first = tar.next()
        assert first.name == "big.bin" and first.size == 256 * MiB and first.sparse  # tarfile sees it as sparse
    target = tmp_path / "target"
    done, report = extract(payload, target, "--max-member-bytes", "16M")
    assert done.returncode == 6, done.stdout + done.stderr
    (item,) = report["refused"]
    assert item["member"] == "big.bin" and "sparse" in item["reason"] and "per-member limit" in item["reason"]
    assert not (target / "big.bin").exists() and (target / "ok.txt").read_bytes() == b"fine"
    assert sum(p.stat().st_size for p in target.rglob("*") if p.is_file()) < MiB
    assert report["bytes_written"] < MiB


def test_a_small_sparse_member_within_the_limits_is_extracted_and_verified(tmp_path):
    member = sparse("holes.bin", 3 * MiB, "pax-1.0", region=b"tail")
    payload = make_bundle(tmp_path / "bundle", [member])
    target = tmp_path / "target"
    done, _report = extract(payload, target)
    assert done.returncode == 0, done.stdout + done.stderr
    data = (target / "holes.bin").read_bytes()
    assert len(data) == 3 * MiB and data.endswith(b"tail") and not data[:-4].strip(b"\0")


def test_a_sparse_member_counts_its_full_size_against_the_total(tmp_path):
    payload = make_bundle(tmp_path / "bundle", [sparse("big.bin", 256 * MiB, "pax-1.0"), regular("ok.txt")])
    target = tmp_path / "target"
    done, _report = extract(payload, target, "--max-bytes", "64M")
    assert done.returncode == 4, done.stdout + done.stderr
    assert "--max-bytes" in done.stderr and "big.bin" in done.stderr
    assert not target.exists()


def _decompressed(payload: Path) -> bytes:
    import zstandard

    return zstandard.ZstdDecompressor().stream_reader(io.BytesIO(payload.read_bytes())).read()


def test_a_zstd_bomb_over_max_bytes_stops_the_extraction_with_nothing_kept(tmp_path):
    payload = make_bundle(tmp_path / "bundle", [regular("first.txt", b"kept until the bomb"),
                                                regular("zeros.bin", bytes(64 * MiB)), regular("after.txt")])
    assert payload.stat().st_size < 64 * 1024  # 64 MiB of zeros compress to almost nothing
    target = tmp_path / "target"
    done, report = extract(payload, target, "--max-bytes", "16M")
    assert done.returncode == 4, done.stdout + done.stderr
    assert "zeros.bin" in done.stderr and "--max-bytes" in done.stderr and "Traceback" not in done.stderr
    assert not target.exists()  # extract made it, and took it away again: nothing looks extracted


def test_several_members_each_under_the_member_limit_still_meet_the_total(tmp_path):
    payload = make_bundle(tmp_path / "bundle", [regular("z%d.bin" % i, bytes(8 * MiB)) for i in range(4)])
    target = tmp_path / "target"
    target.mkdir()  # given empty: kept, and left empty
    done, _report = extract(payload, target, "--max-bytes", "20M", "--max-member-bytes", "10M")
    assert done.returncode == 4, done.stdout + done.stderr
    assert "z2.bin" in done.stderr
    assert target.is_dir()
    assert_nothing_kept(target)


def test_a_bomb_member_over_the_member_limit_is_refused_and_the_rest_extracted(tmp_path):
    payload = make_bundle(tmp_path / "bundle", [regular("zeros.bin", bytes(64 * MiB)), regular("after.txt", b"a")])
    target = tmp_path / "target"
    done, report = extract(payload, target, "--max-member-bytes", "16M")
    assert done.returncode == 6, done.stdout + done.stderr
    assert [r["member"] for r in report["refused"]] == ["zeros.bin"]
    assert not (target / "zeros.bin").exists() and (target / "after.txt").read_bytes() == b"a"


# -- the manifests ----------------------------------------------------------------------------------------
def _wrong_sha(artifacts):
    next(a for a in artifacts if a["path"] == "a/b/c.txt")["sha256"] = "0" * 64


def _wrong_size(artifacts):
    next(a for a in artifacts if a["path"] == "a/b/c.txt")["size"] += 1


def _wrong_target(artifacts):
    next(a for a in artifacts if a["path"] == "a/link")["target"] = "elsewhere"


def _missing_member(artifacts):
    artifacts.append({"path": "a/never-written.txt", "type": "file", "size": 1, "sha256": "1" * 64})


def _extra_member(artifacts):
    artifacts[:] = [a for a in artifacts if a["path"] != "a/b/c.txt"]


@pytest.mark.parametrize("tamper,named", [(_wrong_sha, "a/b/c.txt"), (_wrong_size, "a/b/c.txt"),
                                          (_wrong_target, "a/link"), (_missing_member, "a/never-written.txt"),
                                          (_extra_member, "a/b/c.txt")])
def test_a_member_that_does_not_match_the_inner_manifest_leaves_nothing_behind(tmp_path, tamper, named):
    members = [directory("a"), regular("a/first.txt", b"written before the bad one"), symlink("a/link", "first.txt"),
               regular("a/b/c.txt", b"the member the manifest disagrees with"), regular("z.txt", b"after it")]
    payload = make_bundle(tmp_path / "bundle", members, edit_inner=tamper)
    target = tmp_path / "target"
    done, report = extract(payload, target)
    assert done.returncode == 5, done.stdout + done.stderr
    assert named in done.stderr and "nothing was kept" in done.stderr
    assert report["ok"] is False and report["error"]["exit_code"] == 5 and "extracted" not in report
    assert not target.exists()
    assert_nothing_kept(target)


def test_a_mismatch_in_a_given_empty_directory_leaves_it_empty(tmp_path):
    payload = make_bundle(tmp_path / "bundle", [regular("d/e/f.txt", b"x")], edit_inner=lambda a: a[0].update(
        sha256="f" * 64))
    target = tmp_path / "target"
    target.mkdir()
    done, _report = extract(payload, target)
    assert done.returncode == 5
    assert target.is_dir() and list(target.iterdir()) == []  # no member, no temporary, no staging directory


def test_an_inner_manifest_that_is_not_the_one_recorded_is_refused(tmp_path):
    payload = make_bundle(tmp_path / "bundle", [regular("ok.txt", b"fine")],
                          edit_detached=lambda d: d.update(inner_manifest_sha256="ab" * 32))
    target = tmp_path / "target"
    done, _report = extract(payload, target)
    assert done.returncode == 5, done.stdout + done.stderr
    assert "inner_manifest_sha256" in done.stderr
    assert not target.exists()


def test_a_member_after_the_manifest_is_refused(tmp_path):
    payload = make_bundle(tmp_path / "bundle", [regular("ok.txt", b"fine")],
                          after_manifest=[regular("late.txt", b"smuggled")])
    done, _report = extract(payload, tmp_path / "target")
    assert done.returncode == 5 and "late.txt" in done.stderr and "last member" in done.stderr
    assert not (tmp_path / "target").exists()


def test_a_payload_without_the_inner_manifest_is_refused(tmp_path):
    payload = make_bundle(tmp_path / "bundle", [regular("ok.txt", b"fine")], with_manifest=False)
    done, _report = extract(payload, tmp_path / "target")
    assert done.returncode == 5 and "manifest.json" in done.stderr
    assert not (tmp_path / "target").exists()


def test_a_payload_that_is_not_the_one_recorded_is_refused(tmp_path):
    payload = make_bundle(tmp_path / "bundle", [regular("ok.txt", b"fine")],
                          edit_detached=lambda d: d["payload"].update(sha256="cd" * 32))
    done, _report = extract(payload, tmp_path / "target")
    assert done.returncode == 5 and "payload sha256" in done.stderr
    assert not (tmp_path / "target").exists()


def test_a_truncated_payload_keeps_nothing(tmp_path):
    payload = make_bundle(tmp_path / "bundle", [regular("a.bin", os.urandom(300000)), regular("b.txt", b"b")])
    data = payload.read_bytes()
    payload.write_bytes(data[: len(data) // 2])
    done, _report = extract(payload, tmp_path / "target")
    assert done.returncode == 5, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "target").exists()


def test_names_the_filesystem_cannot_hold_are_refused_not_fatal(tmp_path):
    long_name = "n" * 300
    payload = make_bundle(tmp_path / "bundle", [regular(long_name, b"leaf"), regular(long_name + "/f.txt", b"dir"),
                                                regular("ok.txt", b"fine")])
    target = tmp_path / "target"
    done, report = extract(payload, target)
    assert done.returncode == 6, done.stdout + done.stderr
    assert {r["member"] for r in report["refused"]} == {long_name, long_name + "/f.txt"}
    assert (target / "ok.txt").read_bytes() == b"fine"


def test_a_schema_2_bundle_with_reference_entries_extracts(tmp_path):
    members = [directory("files"), regular("files/a.txt", b"alpha", 0o4755), symlink("files/to-a", "a.txt"),
               regular("files/sub/b.txt", b"beta")]

    def add_reference(artifacts):
        artifacts.append({"path": "files/a.txt", "type": "reference", "collector": "other", "size": 5})

    payload = make_bundle(tmp_path / "bundle", members, edit_inner=add_reference)
    target = tmp_path / "target"
    done, report = extract(payload, target)
    assert done.returncode == 6, done.stdout + done.stderr  # only for the setuid bit it did not set
    assert [r["member"] for r in report["refused"]] == ["files/a.txt"]
    assert "setuid" in report["refused"][0]["reason"]
    a = target / "files" / "a.txt"
    assert a.read_bytes() == b"alpha" and not a.stat().st_mode & 0o7222
    assert os.readlink(target / "files" / "to-a") == "a.txt"
    assert (target / "files" / "sub" / "b.txt").read_bytes() == b"beta"
    inner = (target / "manifest.json").read_bytes()
    detached = json.loads(Path(str(payload) + ".manifest.json").read_text())
    assert hashlib.sha256(inner).hexdigest() == detached["inner_manifest_sha256"]
    assert sorted(p.name for p in target.iterdir()) == ["files", "manifest.json"]  # no staging left


def test_a_schema_1_bundle_still_extracts(tmp_path):
    members = [directory("files"), regular("files/x.txt", b"one"), symlink("files/y", "x.txt"),
               regular("collection.log", b"log\n", 0o444)]
    payload = make_bundle(tmp_path / "bundle", members, schema=1)
    assert "artifacts" in json.loads(Path(str(payload) + ".manifest.json").read_text())
    target = tmp_path / "target"
    done, report = extract(payload, target)
    assert done.returncode == 0, done.stdout + done.stderr
    assert report["refused"] == [] and report["members"] == 5
    assert (target / "files" / "x.txt").read_bytes() == b"one"
    assert not stat.S_IMODE((target / "files" / "x.txt").stat().st_mode) & 0o222
    assert (target / "manifest.json").exists()


def test_a_schema_1_bundle_whose_detached_artifacts_disagree_is_refused(tmp_path):
    def tamper(detached):
        next(a for a in detached["artifacts"] if a["path"] == "files/x.txt")["sha256"] = "0" * 64

    payload = make_bundle(tmp_path / "bundle", [regular("files/x.txt", b"one")], schema=1, edit_detached=tamper)
    done, _report = extract(payload, tmp_path / "target")
    assert done.returncode == 5 and "files/x.txt" in done.stderr and "detached manifest" in done.stderr
    assert not (tmp_path / "target").exists()


def test_absolute_links_of_the_host_tree_are_made_relative_to_it(tmp_path):
    """Under fs/$rootfs$/ (schema 3) an absolute link means the host's root: it is created relative to the tree,
    as a chroot sees it, and `..` cannot climb out of it. Anywhere else an absolute link is recorded, not made."""
    root = "fs/$rootfs$/"
    members = [regular(root + "usr/share/zoneinfo/Europe/Amsterdam", b"TZif2"),
               symlink(root + "etc/localtime", "/usr/share/zoneinfo/Europe/Amsterdam"),
               regular(root + "usr/lib/os-release", b"ID=debian\n"),
               symlink(root + "etc/os-release", "../usr/lib/os-release"),
               symlink(root + "etc/systemd/system/multi-user.target.wants/evil.service", "/../../../etc/evil.service"),
               regular(root + "etc/evil.service", b"[Service]\n"),
               symlink(root + "root-link", "/"),
               symlink("volatile/escape", "/etc/passwd")]
    payload = make_bundle(tmp_path / "bundle", members)
    target = tmp_path / "target"
    done, report = extract(payload, target)
    assert done.returncode == 0, done.stdout + done.stderr  # volatile/escape is recorded, without alarm
    assert report["refused"] == [] and [r["member"] for r in report["recorded"]] == ["volatile/escape"]
    assert not os.path.lexists(target / "volatile/escape")
    tree = target / "fs" / "$rootfs$"
    assert os.readlink(tree / "etc/localtime") == "../usr/share/zoneinfo/Europe/Amsterdam"
    assert (tree / "etc/localtime").read_bytes() == b"TZif2"
    assert os.readlink(tree / "etc/os-release") == "../usr/lib/os-release"  # relative links as they were
    wants = tree / "etc/systemd/system/multi-user.target.wants/evil.service"
    assert os.readlink(wants) == "../../../../etc/evil.service" and wants.read_bytes() == b"[Service]\n"
    assert os.readlink(tree / "root-link") == "."
    assert {r["member"]: r["target"] for r in report["rebased"]} == {
        root + "etc/localtime": "/usr/share/zoneinfo/Europe/Amsterdam",
        root + "etc/systemd/system/multi-user.target.wants/evil.service": "/../../../etc/evil.service",
        root + "root-link": "/"}
    inner = json.loads((target / "manifest.json").read_text())  # the manifest keeps the host's targets
    assert {a["path"]: a.get("target") for a in inner["artifacts"]}[root + "etc/localtime"] == \
        "/usr/share/zoneinfo/Europe/Amsterdam"
    assert_everything_inside(target)


# -- a real capture ---------------------------------------------------------------------------------------
def test_a_bundle_from_the_real_capture_extracts_with_exit_0(tmp_path):
    root = tmp_path / "root"
    (root / "x" / "sub").mkdir(parents=True)
    (root / "x" / "a.txt").write_text("hello\n")
    (root / "x" / "sub" / "b.bin").write_bytes(os.urandom(70000))
    os.symlink("a.txt", root / "x" / "link")
    os.symlink("../sub", root / "x" / "sub" / "again")
    out = tmp_path / "out"
    out.mkdir()
    captured = kit("--json", "capture", "--no-encrypt", "--root", str(root), "--only", "include", "--include", "/x",
                   "--allow-same-disk", "--out", str(out))
    assert captured.returncode == 0, captured.stderr
    payload = Path(json.loads(captured.stdout)["payload"])
    target = tmp_path / "target"
    done, report = extract(payload, target)
    assert done.returncode == 0, done.stdout + done.stderr
    assert report["refused"] == []
    files = target / "fs" / "$rootfs$" / "x"
    assert (files / "a.txt").read_text() == "hello\n"
    assert (files / "sub" / "b.bin").read_bytes() == (root / "x" / "sub" / "b.bin").read_bytes()
    assert os.readlink(files / "link") == "a.txt" and os.readlink(files / "sub" / "again") == "../sub"
    assert not (files / "a.txt").stat().st_mode & 0o222
    detached = json.loads(Path(str(payload) + ".manifest.json").read_text())
    assert hashlib.sha256((target / "manifest.json").read_bytes()).hexdigest() == detached["inner_manifest_sha256"]
    assert not any(p.name.endswith(".partial") for p in target.iterdir())
    assert_everything_inside(target)
    # the same bundle, once more into the same directory: never an overwrite
    again = kit("extract", str(payload), "--to", str(target))
    assert again.returncode == 2 and (files / "a.txt").read_text() == "hello\n"
