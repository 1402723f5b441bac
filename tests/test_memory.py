"""Memory (issue 20): process cores judged by gdb and readelf, the whole-RAM path's refusals and its LiME
format. The whole-RAM image itself is proved on a real kernel booted under qemu: tests/test_memory_guest.py."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.test_collectors import only_environ_denials, out_dir, team_key  # noqa: F401 (fixtures)
from tests.world.services import wait_until

ROOT = Path(__file__).resolve().parent.parent
GDB, READELF = "/usr/bin/gdb", "/usr/bin/readelf"
HOST_PYTHON = "/usr/bin/python3"
# holds a random marker in malloc's heap and its reverse in an anonymous shared mapping; prints both addresses
MARKER_PROGRAM = r"""
import ctypes, mmap, os, sys, time
marker = os.urandom(32)
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
heap = libc.malloc(200)
ctypes.memmove(heap, marker, 32)
anonymous = mmap.mmap(-1, 1 << 20)
anonymous[8192:8192 + 32] = marker[::-1]
anon_address = ctypes.addressof(ctypes.c_char.from_buffer(anonymous)) + 8192
sys.stdout.write("%s %d %d\n" % (marker.hex(), heap, anon_address))
sys.stdout.flush()
sys.stdin.read()
"""


def kit_pyz(pyz: Path, *args, timeout=300):
    return subprocess.run([HOST_PYTHON, "-I", str(pyz), *args], capture_output=True, text=True, timeout=timeout,
                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/nonexistent"},
                          stdin=subprocess.DEVNULL)


class MarkedProcess:
    """A process that holds a known marker, started from a binary that is then deleted (so a finding marks it)."""

    def __init__(self, deleted_binary: bool) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="bk-mem-", dir="/tmp"))
        binary = HOST_PYTHON
        if deleted_binary:
            binary = str(self.directory / "python3")
            shutil.copy2(os.path.realpath(HOST_PYTHON), binary)
        self.process = subprocess.Popen([binary, "-c", MARKER_PROGRAM], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.process.stdout.readline().split()
        assert len(line) == 3, "the marker process did not start"
        self.marker = bytes.fromhex(line[0])
        self.heap, self.anonymous = int(line[1]), int(line[2])
        if deleted_binary:
            os.unlink(binary)
            wait_until(lambda: os.readlink("/proc/%d/exe" % self.pid).endswith(" (deleted)"), 10,
                       "the binary to show as deleted")

    @property
    def pid(self) -> int:
        return self.process.pid

    def state(self) -> str:
        text = Path("/proc/%d/stat" % self.pid).read_text()
        return text[text.rfind(")") + 2:].split()[0]

    def stop(self) -> None:
        self.process.kill()
        self.process.wait(30)
        shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture
def marked():
    process = MarkedProcess(deleted_binary=True)
    yield process
    process.stop()


@pytest.fixture
def plain():
    process = MarkedProcess(deleted_binary=False)
    yield process
    process.stop()


def _capture(pyz, out, recipient, *extra):
    done = kit_pyz(pyz, "--json", "capture", "--out", str(out), "-r", recipient, "--profile", "volatile",
                   "--only", "processes", "--only", "network", "--only", "process-memory", *extra)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert only_environ_denials(result["errors"]), result["errors"]
    return result


def _extract(identity: Path, payload: str, into: Path) -> Path:
    """age | zstd | tar: the standard tools, not ours."""
    plain = subprocess.run(["/usr/bin/age", "-d", "-i", str(identity), payload], capture_output=True, check=True)
    tar_bytes = subprocess.run(["zstd", "-d", "-c"], input=plain.stdout, capture_output=True, check=True).stdout
    into.mkdir()
    subprocess.run(["tar", "-x", "-C", str(into)], input=tar_bytes, check=True)
    return into


def _gdb_bytes(core: Path, address: int, count: int = 32) -> bytes:
    done = subprocess.run([GDB, "-batch", "-nx", "-c", str(core), "-ex", "x/%dxb %#x" % (count, address)],
                          capture_output=True, text=True, timeout=120)
    found = re.findall(r"0x([0-9a-f]{2})\b", "\n".join(line.split(":", 1)[1] for line in done.stdout.splitlines()
                                                        if line.startswith("0x") and ":" in line))
    return bytes(int(h, 16) for h in found)


def _segments(core: Path):
    """(vaddr, filesz, memsz) of each PT_LOAD, as readelf reads them."""
    text = subprocess.run([READELF, "-lW", str(core)], capture_output=True, text=True, check=True).stdout
    return [(int(m.group(1), 16), int(m.group(2), 16), int(m.group(3), 16)) for m in
            re.finditer(r"^\s*LOAD\s+0x[0-9a-f]+\s+(0x[0-9a-f]+)\s+0x[0-9a-f]+\s+(0x[0-9a-f]+)\s+(0x[0-9a-f]+)",
                        text, re.M)]


def test_a_marked_process_core_opens_in_gdb_and_readelf_with_the_marker_where_it_put_it(pyz, marked, out_dir,
                                                                                        team_key, tmp_path):
    identity, recipient = team_key
    result = _capture(pyz, out_dir, recipient)
    found = [f for f in result["findings"] if marked.pid in (f["details"].get("pids") or [])]
    assert [f["id"] for f in found] == ["process-deleted-binary"], found
    cores = found[0]["details"]["memory"]
    assert len(cores) == 1 and cores[0] in found[0]["evidence"]
    tree = _extract(identity, result["payload"], tmp_path / "bundle")
    core = tree / cores[0]
    sidecar = json.loads((tree / (cores[0] + ".json")).read_text())
    assert sidecar["pid"] == marked.pid and sidecar["marked_by"] == ["process-deleted-binary"]
    assert sidecar["freeze"] == {"frozen": False} and marked.state() != "T"

    # readelf: a core file whose LOAD segments cover both addresses with their bytes stored
    header = subprocess.run([READELF, "-h", str(core)], capture_output=True, text=True, check=True).stdout
    assert "CORE (Core file)" in header
    segments = _segments(core)
    for address in (marked.heap, marked.anonymous):
        assert any(start <= address < start + filesz for start, filesz, _ in segments), hex(address)
    heap = [m for m in sidecar["mappings"] if m["path"] == "[heap]"]
    assert heap and int(heap[0]["start"], 16) <= marked.heap < int(heap[0]["end"], 16)
    # the notes: threads' registers, the process, the mapped files
    notes = subprocess.run([READELF, "-nW", str(core)], capture_output=True, text=True, check=True).stdout
    for note in ("NT_PRSTATUS", "NT_PRPSINFO", "NT_AUXV", "NT_FILE"):
        assert note in notes, notes[:2000]

    # gdb: the mapped files by name, and the marker at the address where the process put it
    mappings = subprocess.run([GDB, "-batch", "-nx", "-c", str(core), "-ex", "info proc mappings"],
                              capture_output=True, text=True, timeout=120).stdout
    assert "libc.so.6" in mappings and "python3" in mappings, mappings[-2000:]
    assert _gdb_bytes(core, marked.heap) == marked.marker
    assert _gdb_bytes(core, marked.anonymous) == marked.marker[::-1]
    # every byte the core declares is there: readelf's sizes add up to the file
    assert core.stat().st_size >= max(s[1] for s in segments)
    assert not [g for g in sidecar["gaps"] if g["path"] in ("[heap]", "")], sidecar["gaps"]


def test_freeze_stops_a_named_process_only_for_its_dump(pyz, plain, out_dir, team_key, tmp_path):
    identity, recipient = team_key
    result = _capture(pyz, out_dir, recipient, "--process-memory", str(plain.pid), "--freeze")
    assert not [f for f in result["findings"] if plain.pid in (f["details"].get("pids") or [])]
    tree = _extract(identity, result["payload"], tmp_path / "bundle")
    [core] = [p for p in (tree / "memory" / "processes").iterdir() if p.name.startswith("%d-" % plain.pid)
              and p.name.endswith(".core")]
    sidecar = json.loads(Path(str(core) + ".json").read_text())
    assert sidecar["marked_by"] == ["asked (--process-memory)"]
    freeze = sidecar["freeze"]
    assert freeze["frozen"] and freeze["signal"] == "SIGSTOP" and freeze["signal_after"] == "SIGCONT"
    assert freeze["stopped_at"] <= freeze["continued_at"]
    assert plain.state() in ("S", "R"), "the process was left stopped"
    assert _gdb_bytes(core, plain.heap) == plain.marker
    inner = json.loads((tree / "manifest.json").read_text())
    [entry] = [a for a in inner["artifacts"] if a["path"] == str(core.relative_to(tree))]
    assert entry["pid"] == plain.pid and "frozen with SIGSTOP" in entry["method"]


def test_limits_leave_mappings_out_and_say_so(pyz, plain, out_dir, team_key, tmp_path):
    identity, recipient = team_key
    result = _capture(pyz, out_dir, recipient, "--process-memory", str(plain.pid), "--process-memory-limit", "2M")
    tree = _extract(identity, result["payload"], tmp_path / "bundle")
    [sidecar_path] = (tree / "memory" / "processes").glob("%d-*.core.json" % plain.pid)
    sidecar = json.loads(sidecar_path.read_text())
    assert sidecar["core"]["bytes_stored"] <= 2 << 20
    over = [m for m in sidecar["left_out"] if "per-process limit" in m["reason"]]
    assert over, sidecar["left_out"]
    said = [e for e in result["errors"] if e["source"] == "/proc/%d/mem" % plain.pid and e["kind"] == "limit"]
    assert said and "%d mappings" % len(over) in said[0]["reason"]
    core = Path(str(sidecar_path)[:-len(".json")])
    stored = {start: filesz for start, filesz, _ in _segments(core)}
    for item in over:  # still in the core's address space, with no bytes
        assert stored[int(item["start"], 16)] == 0


def test_bad_process_memory_input_is_one_line_and_a_gone_pid_is_recorded(pyz, out_dir, team_key):
    identity, recipient = team_key
    done = kit_pyz(pyz, "capture", "--out", str(out_dir), "-r", recipient, "--process-memory", "0")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    done = kit_pyz(pyz, "capture", "--out", str(out_dir), "-r", recipient, "--process-memory", "123",
                   "--skip", "process-memory")
    assert done.returncode == 2 and "process-memory" in done.stderr and "Traceback" not in done.stderr
    assert not list(out_dir.iterdir())
    done = kit_pyz(pyz, "capture", "--out", str(out_dir), "-r", recipient, "--process-memory-limit", "0")
    assert done.returncode == 2 and "at least 1M" in done.stderr
    gone = subprocess.Popen(["/bin/true"])
    gone.wait()
    result = _capture(pyz, out_dir, recipient, "--process-memory", str(gone.pid), "--process-memory", "2")
    assert [e for e in result["errors"] if e["source"] == "/proc/%d/mem" % gone.pid and e["kind"] == "skip"]
    # pid 2 (kthreadd) has no user memory: nothing to dump, not a failure
    assert not [e for e in result["errors"] if e["source"] == "/proc/2/mem"]


def test_whole_memory_without_a_source_is_one_line_and_the_capture_goes_on(pyz, out_dir, team_key, tmp_path):
    """This machine's kernel has no /proc/kcore, /dev/crash or /dev/mem (the qemu guest test has them)."""
    if any(os.path.exists(p) for p in ("/proc/kcore", "/dev/crash", "/dev/mem")):
        pytest.fail("this kernel offers physical memory: the refusal path is not what this test can show here")
    identity, recipient = team_key
    done = kit_pyz(pyz, "capture", "--out", str(out_dir), "-r", recipient, "--profile", "volatile", "--only",
                   "system", "--memory")
    assert done.returncode == 0, done.stderr
    said = [line for line in done.stdout.splitlines() if "physical memory" in line]
    assert len(said) == 1 and said[0].startswith("degraded memory: no image of physical memory (/proc/kcore: "
                                                 "absent") and "/dev/mem: absent" in said[0], done.stdout
    payload = [p for p in out_dir.iterdir() if p.name.endswith(".age")]
    manifest = json.loads(Path(str(payload[0]) + ".manifest.json").read_text())
    assert [e for e in manifest["errors"] if e["collector"] == "memory" and e["kind"] == "limited"]
    assert any("physical memory" in d for d in manifest["collection"]["degraded"])
    result = {"payload": str(payload[0])}
    tree = _extract(identity, result["payload"], tmp_path / "bundle")
    assert json.loads((tree / "memory" / "physical.json").read_text())["refused"]
    # what an analyst needs for a symbol table is there all the same
    kernel = tree / "memory" / "kernel"
    assert (kernel / "proc_kallsyms").stat().st_size > 0 and (kernel / "proc_version").read_text().startswith(
        "Linux version")
    assert (kernel / "sys_kernel_btf_vmlinux").read_bytes()[:2] == b"\x9f\xeb"  # BTF magic 0xeb9f, little-endian


def test_lime_parts_from_a_file_standing_in_for_dev_mem(tmp_path):
    """A fake: a regular file read the way /dev/mem is (at the physical address), since this kernel has no
    /dev/mem. Each part is a whole LiME file; zero pages are left out; the records put every byte back."""
    sys.path.insert(0, str(ROOT))
    from toolkit.memory import lime, physical

    page = 4096
    size = 64 * page
    memory = bytearray(size)
    for index in (1, 2, 3, 10, 11, 40, 41, 42, 43, 44, 63):
        memory[index * page:(index + 1) * page] = bytes([index]) * page
    fake = tmp_path / "dev-mem-stand-in"
    fake.write_bytes(bytes(memory))
    ranges = [(page, 20 * page - 1), (32 * page, 64 * page - 1 - 100)]  # the last range ends inside a page
    source = physical.open_source(ranges, (str(fake),))
    stats = lime.Stats()
    parts = list(lime.parts(physical.chunks(source, ranges), 3 * page, stats))
    source.close()
    assert len(parts) > 1 and all(len(p) <= 3 * page for p in parts)
    rebuilt = bytearray(size)
    seen = 0
    covered = set()
    for part in parts:
        for first, last, offset in lime.records(lambda at, p=part: p[at:at + 32], len(part)):
            rebuilt[first:last + 1] = part[offset:offset + last - first + 1]
            seen += last - first + 1
            covered.update(range(first // page, last // page + 1))
    # the page after data is always in the image (a 4 KiB read past a banner stays inside a record); the long
    # runs of zeros are not
    assert {2, 3, 4, 11, 12, 44, 45}.issubset(covered) and not covered & {15, 19, 33, 50, 60}
    assert {5, 6, 7, 8, 9}.issubset(covered), "a short run of zeros between data stays in its record"
    expected = bytearray(size)
    for first, last in ranges:
        expected[first:last + 1] = memory[first:last + 1]
    assert rebuilt == expected
    assert seen == stats.bytes_stored and stats.zero_pages > 0


def test_a_fifo_mounted_over_maps_is_refused_and_the_frozen_process_is_continued(pyz, plain, out_dir, team_key,
                                                                                 tmp_path):
    """The host is the adversary: a FIFO bind-mounted over /proc/PID/maps (in a private mount namespace, so
    only the kit sees it) would hang a plain open() with the process stopped. It is refused and recorded."""
    identity, recipient = team_key
    fifo = tmp_path / "maps"
    os.mkfifo(fifo)
    argv = [HOST_PYTHON, "-I", str(pyz), "--json", "capture", "--out", str(out_dir), "-r", recipient, "--profile",
            "volatile", "--only", "processes", "--only", "process-memory", "--process-memory", str(plain.pid),
            "--freeze"]
    done = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                           'mount --bind "$1" "/proc/$2/maps" && shift 2 && exec "$@"', "sh", str(fifo),
                           str(plain.pid), *argv], capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/nonexistent"},
                          stdin=subprocess.DEVNULL)
    assert done.returncode in (0, 6), done.stderr
    result = json.loads(done.stdout)
    refused = [e for e in result["errors"] if e["source"] == "/proc/%d/mem" % plain.pid]
    assert refused and "fifo" in refused[0]["reason"].lower(), result["errors"]
    assert plain.state() in ("S", "R"), "the process was left stopped"
    # nothing waited on the FIFO: no collector was abandoned at its budget
    assert [c["status"] for c in result["collectors"]] == ["ok", "ok"], result["collectors"]


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_capture_ended_mid_dump_continues_the_frozen_process(pyz, out_dir, team_key, signal_number):
    """The responder's Ctrl-C, or a SIGTERM from a timeout, while a big process is frozen for its dump: the kit
    ends, leaves no bundle, and the process runs again."""
    identity, recipient = team_key
    big = subprocess.Popen([HOST_PYTHON, "-c", "import sys, time\nb = bytearray(1536 << 20)\n"
                            "for i in range(0, len(b), 4096): b[i] = 1\nprint('ready', flush=True)\ntime.sleep(600)"],
                           stdout=subprocess.PIPE, text=True)
    try:
        assert big.stdout.readline().strip() == "ready"
        state = lambda: Path("/proc/%d/stat" % big.pid).read_text().rsplit(")", 1)[1].split()[0]  # noqa: E731
        kit = subprocess.Popen([HOST_PYTHON, "-I", str(pyz), "capture", "--out", str(out_dir), "-r", recipient,
                                "--only", "process-memory", "--process-memory", str(big.pid), "--freeze",
                                "--process-memory-limit", "2G"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/nonexistent"},
                               # Ctrl-C's default action, even when this run was started with SIGINT ignored
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        wait_until(lambda: state() == "T", 60, "the kit to freeze the process")
        kit.send_signal(signal_number)
        kit.wait(60)
        assert kit.returncode != 0
        wait_until(lambda: state() in ("S", "R"), 10, "the process to run again")
        assert not [p for p in out_dir.iterdir() if p.name.endswith(".age")]
    finally:
        big.kill()
        big.wait(30)
