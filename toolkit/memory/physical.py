"""Physical memory, read where the running kernel offers it: /proc/kcore, else /dev/crash, else /dev/mem.

Invariants:
- What is read is the System RAM of /proc/iomem (top-level ranges), never device memory: reading an I/O range
  can change a device's state.
- /proc/kcore is an ELF file whose PT_LOAD headers give each kernel mapping's physical address (p_paddr); a
  physical address is read at the offset of a segment that maps it. /dev/crash and /dev/mem are read at the
  physical address itself.
- A source that is absent or refused is said with the kernel's reason (lockdown, STRICT_DEVMEM, not root); the
  next one is tried. `open_source` raises Unavailable naming every source and why, in one line.
- Reads are whole pages, in address order, never past a range; a page that cannot be read is reported as
  unreadable (address, length, reason), never as data.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Tuple

from toolkit.host.hostfs import kernel_bytes

READ_SIZE = 1 << 20
PAGE = 4096
KCORE, CRASH, MEM = "/proc/kcore", "/dev/crash", "/dev/mem"
NO_PADDR = 0xFFFFFFFFFFFFFFFF


class Unavailable(Exception):
    """No source of physical memory on this kernel; the message gives each one's reason."""


def system_ram(text: str) -> List[Tuple[int, int]]:
    """(first, last) of each top-level "System RAM" range of /proc/iomem's text."""
    ranges = []
    for line in text.splitlines():
        if line.startswith(" ") or ":" not in line:
            continue
        span, _, name = line.partition(":")
        if name.strip() != "System RAM":
            continue
        first, _, last = span.strip().partition("-")
        ranges.append((int(first, 16), int(last, 16)))
    return ranges


def lockdown() -> Optional[str]:
    """The kernel's lockdown mode ("none", "integrity", "confidentiality"), None if it has no lockdown LSM."""
    try:
        text = kernel_bytes("/sys/kernel/security/lockdown", 4096).decode("ascii", "replace")
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


@dataclass
class Source:
    path: str
    fd: int
    segments: List[Tuple[int, int, int]] = field(default_factory=list)  # kcore: (paddr, size, file offset)
    refused: List[str] = field(default_factory=list)  # the sources tried before, and why not

    def offset_of(self, address: int) -> Tuple[Optional[int], int]:
        """(file offset of the physical address, bytes readable from there in one segment) or (None, bytes
        until the next segment starts) when no segment maps it."""
        if self.path != KCORE:
            return address, 1 << 62
        following = 1 << 62
        for start, size, offset in self.segments:
            if start <= address < start + size:
                return offset + address - start, start + size - address
            if start > address:
                following = min(following, start - address)
        return None, following

    def close(self) -> None:
        os.close(self.fd)


def kcore_segments(fd: int) -> List[Tuple[int, int, int]]:
    """(physical address, size, file offset) of each PT_LOAD of /proc/kcore that has a physical address."""
    head = os.pread(fd, 64, 0)
    if head[:4] != b"\x7fELF" or head[4] != 2:
        raise ValueError("not a 64-bit ELF file")
    phoff, = struct.unpack_from("<Q", head, 32)
    phentsize, phnum = struct.unpack_from("<HH", head, 54)
    table = os.pread(fd, phentsize * phnum, phoff)
    found = []
    for index in range(phnum):
        p_type, _, p_offset, _, p_paddr, _, p_memsz, _ = struct.unpack_from("<IIQQQQQQ", table, index * phentsize)
        if p_type == 1 and p_paddr != NO_PADDR and p_memsz:
            found.append((p_paddr, p_memsz, p_offset))
    # the direct map first: it covers the most RAM; the kernel text maps a part of it again
    return sorted(found, key=lambda s: (-s[1], s[0]))


def _why(error: OSError, path: str, locked: Optional[str]) -> str:
    text = error.strerror or str(error)
    if locked in ("integrity", "confidentiality") and getattr(error, "errno", 0) in (1, 13):
        text += " (kernel lockdown: %s)" % locked
    elif os.geteuid() != 0:
        text += " (not root)"
    return "%s: %s" % (path, text)


def open_source(ranges: List[Tuple[int, int]], paths: Tuple[str, ...] = (KCORE, CRASH, MEM)) -> Source:
    """The first source that opens and reads the first page of RAM above 1 MiB (where /dev/mem's
    STRICT_DEVMEM stops a reader)."""
    refused: List[str] = []
    locked = lockdown()
    probe = next((max(first, 1 << 20) for first, last in ranges if last >= (1 << 20)), ranges[0][0] if ranges
                 else 0)
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            refused.append("%s: absent on this kernel" % path)
            continue
        except OSError as error:
            refused.append(_why(error, path, locked))
            continue
        source = Source(path, fd, refused=list(refused))
        try:
            if path == KCORE:
                source.segments = kcore_segments(fd)
                if not source.segments:
                    raise ValueError("no segment with a physical address")
            offset, _ = source.offset_of(probe)
            if offset is None:
                raise ValueError("RAM at %#x is in no segment" % probe)
            if len(os.pread(fd, PAGE, offset)) != PAGE:
                raise ValueError("a short read at %#x" % probe)
        except OSError as error:
            refused.append(_why(error, path, locked) + (" (CONFIG_STRICT_DEVMEM: RAM above 1 MiB is refused)"
                                                        if path == MEM and error.errno == 1 else ""))
            source.close()
            continue
        except (ValueError, struct.error) as error:
            refused.append("%s: %s" % (path, error))
            source.close()
            continue
        return source
    raise Unavailable("; ".join(refused))


def chunks(source: Source, ranges: List[Tuple[int, int]]) -> Iterator[Tuple[int, int, Optional[bytes], str]]:
    """(address, length, bytes or None, why not) over the ranges, in READ_SIZE pieces; a failed piece is retried
    page by page so only the pages that fail are unreadable."""
    for first, last in ranges:
        address = first - first % PAGE
        end = last + 1
        while address < end:
            offset, span = source.offset_of(address)
            size = min(READ_SIZE, end - address, span)
            if size > PAGE:
                size -= size % PAGE  # whole pages; only a range's last piece may be shorter
            if offset is None:
                yield address, size, None, "mapped by no segment of %s" % source.path
                address += size
                continue
            try:
                data = os.pread(source.fd, size, offset)
            except OSError:
                data = b""
            if len(data) == size:
                yield address, size, data, ""
            else:
                for page in range(0, size, PAGE):
                    want = min(PAGE, size - page)
                    try:
                        piece = os.pread(source.fd, want, offset + page)
                        why = "" if len(piece) == want else "short read"
                    except OSError as error:
                        piece, why = b"", error.strerror or str(error)
                    yield address + page, want, (piece if not why else None), why
            address += size
