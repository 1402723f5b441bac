"""The whole-RAM path on a real kernel that offers /proc/kcore (issue 20): Debian's kernel booted under qemu
(tests/world/guest.py, software emulation, 512 MiB), the pyz run inside by the trixie root's CPython 3.13. The
image comes out of the encrypted bundle through age, zstd and tar, is read by volatility3 (banners, which needs no
symbol table), and holds a guest process's random marker at the physical address the guest's own pagemap gives.
Slow (a guest boot under TCG, about a minute in all); it runs in CI all the same."""
from __future__ import annotations

import json
import mmap
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.world import guest as guest_world
from tests.world.roots import TRIXIE, RootUnavailable, debian_roots

assert debian_roots  # a fixture, used by name below

VOL = str(Path(sys.executable).parent / "vol")
AGE = "/usr/bin/age"

# holds 32 random bytes in a bytes object, says where they are (virtual and, through pagemap, physical), waits
# where a process's virtual address is in physical memory, from its pagemap (root reads any process's)
PHYSICAL = r"""
import struct, sys
def physical(pid, address):
    with open("/proc/%d/pagemap" % pid, "rb") as pagemap:
        pagemap.seek(address // 4096 * 8)
        entry, = struct.unpack("<Q", pagemap.read(8))
    return (entry & ((1 << 55) - 1)) * 4096 + address % 4096 if entry >> 63 else None
if __name__ == "__main__":
    print(physical(int(sys.argv[1]), int(sys.argv[2])))
"""

# holds 32 random bytes in a bytes object, locked in RAM (mlockall: no swap, and with THP off and
# compact_unevictable_allowed 0 no migration), says where they are, waits
HOLDER = r"""
import ctypes, json, os, time
from physical import physical
marker = os.urandom(32)
raw = ctypes.string_at(id(marker), 96)
address = id(marker) + raw.find(marker)
ctypes.CDLL(None).mlockall(3)
with open("/job/marker.json.tmp", "w") as out:
    json.dump({"pid": os.getpid(), "hex": marker.hex(), "virtual": address,
               "physical": physical(os.getpid(), address)}, out)
os.rename("/job/marker.json.tmp", "/job/marker.json")
while True:
    time.sleep(3600)
"""

SCRIPT = r"""
echo never > /sys/kernel/mm/transparent_hugepage/enabled
echo 0 > /proc/sys/vm/compact_unevictable_allowed
python3.13 /job/holder.py &
n=0
while [ ! -e /job/marker.json ]; do n=$((n+1)); [ $n -gt 2400 ] && { echo "no marker" >&2; exit 3; }; sleep 0.05; done
uname -r > /job/release
mkdir -p /evidence
python3.13 -I /job/kit.pyz --json capture --out /evidence -r "$(cat /job/recipient)" --only memory --memory \
  --allow-same-disk --case GUEST > /job/capture.json 2> /job/capture.err
echo $? > /job/capture.rc
python3.13 -c 'import json, physical; m = json.load(open("/job/marker.json")); print(physical.physical(m["pid"], m["virtual"]))' > /job/after
for kind in payload:tar.zst.age manifest:tar.zst.age.manifest.json custody:tar.zst.age.custody.jsonl; do
  ln /evidence/*."${kind#*:}" "/job/${kind%%:*}"          # hard links: the disk holds the bundle once
done
ln /evidence/SHA256SUMS /job/sums
"""
OUTPUTS = {"payload": "payload", "manifest": "manifest", "custody": "custody", "sums": "sums"}


@pytest.fixture(scope="module")
def booted(debian_roots):
    try:
        root = debian_roots.get(TRIXIE)
        return guest_world.prepare(root.path, TRIXIE.key)
    except (RootUnavailable, guest_world.GuestUnavailable) as error:
        pytest.fail(str(error), pytrace=False)


def _lime_records(image: Path):
    """(first, last, offset of the data) of each record, read from the format's definition (not our code)."""
    records, offset, size = [], 0, image.stat().st_size
    with open(image, "rb") as handle:
        while offset < size:
            handle.seek(offset)
            magic, version, first, last, _ = struct.unpack("<IIQQ8s", handle.read(32))
            assert magic == 0x4C694D45 and version == 1 and last >= first, offset
            records.append((first, last, offset + 32))
            offset += 32 + last - first + 1
    return records


def test_the_guest_ram_streams_into_the_bundle_and_volatility_reads_it(pyz, booted, tmp_path):
    identity = tmp_path / "team.key"
    subprocess.run(["age-keygen", "-o", str(identity)], check=True, capture_output=True)
    recipient = subprocess.run(["age-keygen", "-y", str(identity)], capture_output=True, text=True).stdout.strip()
    outputs = ["capture.json", "capture.err", "capture.rc", "marker.json", "after", "release", *OUTPUTS]
    result = booted.run(SCRIPT, files={"holder.py": HOLDER.encode(), "physical.py": PHYSICAL.encode(),
                                       "recipient": recipient.encode()},
                        big_files={"kit.pyz": Path(pyz)}, outputs=outputs)
    got = {Path(name).name: data for name, data in result.files.items()}
    assert result.returncode == 0, (result.stderr, result.console[-3000:])
    assert got["capture.rc"].strip() == b"0", got["capture.err"].decode(errors="replace")[-3000:]
    capture = json.loads(got["capture.json"])
    assert not [e for e in capture["errors"] if e["kind"] == "error"], capture["errors"]
    release = got["release"].decode().strip()
    marker = json.loads(got["marker.json"])
    assert marker["physical"], "the guest's pagemap gave no physical address"
    assert int(got["after"]) == marker["physical"], "the marker's page moved during the capture"

    # the standard tools: sha256sum, age, zstd, tar; the parts joined with cat
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    for name, key in OUTPUTS.items():  # each file by the name the capture gave it
        (bundle / Path(capture[key]).name).write_bytes(got[name])
    assert subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=bundle, capture_output=True).returncode == 0
    [payload] = list(bundle.glob("*.age"))
    verified = subprocess.run([sys.executable, str(pyz), "verify", str(payload), "-i", str(identity)],
                              capture_output=True, text=True, timeout=600)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    plain = subprocess.run([AGE, "-d", "-i", str(identity), str(payload)], capture_output=True, check=True).stdout
    tree = tmp_path / "tree"
    tree.mkdir()
    subprocess.run("zstd -d | tar -x -C %s" % tree, shell=True, input=plain, check=True)
    physical = json.loads((tree / "memory" / "physical.json").read_text())
    assert physical["source"] == "/proc/kcore", physical
    assert physical["zero_pages_left_out"] > 0 and physical["bytes_stored"] < physical["ram_bytes"]
    parts = sorted((tree / "memory").glob("physical.lime.part*"))
    assert [p.name for p in parts] == [Path(n).name for n in physical["parts"]]
    image = tmp_path / "physical.lime"
    subprocess.run("cat %s > %s" % (" ".join(str(p) for p in parts), image), shell=True, check=True)

    # volatility3 names the guest's kernel
    banners = subprocess.run([VOL, "-q", "-f", str(image), "banners.Banners"], capture_output=True, text=True,
                             timeout=900)
    assert banners.returncode == 0, banners.stderr[-3000:]
    assert "Linux version %s" % release in banners.stdout, banners.stdout[-3000:]

    # the marker, at the physical address where the guest process holds it
    wanted = bytes.fromhex(marker["hex"])
    holding = [r for r in _lime_records(image) if r[0] <= marker["physical"] <= r[1]]
    assert holding, "no record covers %#x" % marker["physical"]
    first, _, offset = holding[0]
    with open(image, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as view:
        at = offset + marker["physical"] - first
        assert view[at:at + 32] == wanted

    # the symbols' sources came along; the bundle's manifest says how the image was made
    kernel = tree / "memory" / "kernel"
    assert (kernel / "sys_kernel_btf_vmlinux").read_bytes()[:2] == b"\x9f\xeb"
    symbols = (kernel / "proc_kallsyms").read_text().splitlines()
    assert any(line.endswith(" linux_banner") and not line.startswith("0000000000000000") for line in symbols)
    manifest = json.loads((tree / "manifest.json").read_text())
    methods = {a["path"]: a["method"] for a in manifest["artifacts"]}
    assert all(methods[n].startswith("/proc/kcore, System RAM") for n in physical["parts"])
    assert os.path.getsize(image) == sum(p.stat().st_size for p in parts)
