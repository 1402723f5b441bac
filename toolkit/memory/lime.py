"""The LiME format (the one volatility3, AVML and LiME's own tools read): records of a 32-byte header
(magic "EMiL" as a little-endian 0x4C694D45, version 1, first and last physical address, 8 reserved bytes)
followed by the bytes of that range.

Invariants:
- Pages of zeros are left out, as LiME allows: a range is cut into records of its non-zero runs.
- The image is cut into parts of at most `part_size` bytes at record boundaries (a run longer than a part
  becomes several records): every part is a whole LiME file, and so is their concatenation in order.
- Nothing is kept but the part being filled: memory stays at about one part whatever the RAM size.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, List, Optional, Tuple

MAGIC = 0x4C694D45
VERSION = 1
HEADER = struct.Struct("<IIQQ8s")
PAGE = 4096


def header(start: int, end_inclusive: int) -> bytes:
    return HEADER.pack(MAGIC, VERSION, start, end_inclusive, b"\0" * 8)


@dataclass
class Stats:
    records: int = 0
    bytes_stored: int = 0  # memory bytes in the image (headers not counted)
    zero_pages: int = 0
    unreadable: List[Tuple[int, int, str]] = field(default_factory=list)  # (start, bytes, why), merged runs
    bytes_read: int = 0


class _Part:
    def __init__(self) -> None:
        self.buffer = bytearray()
        self.run_start: Optional[int] = None  # the physical address the open record starts at
        self.run_header_at = 0  # where the open record's header is in the buffer
        self.next_address = 0


def parts(chunks: Iterable[Tuple[int, int, Optional[bytes], str]], part_size: int, stats: Stats) -> Iterator[bytes]:
    """chunks: (physical address, length, its bytes or None when unreadable, why not), in address order, whole
    pages. Yields the parts of the image."""
    part = _Part()
    zero_page = bytes(PAGE)

    def close_record() -> None:
        if part.run_start is not None:
            length = len(part.buffer) - part.run_header_at - HEADER.size
            part.buffer[part.run_header_at:part.run_header_at + HEADER.size] = header(
                part.run_start, part.run_start + length - 1)
            stats.records += 1
            part.run_start = None

    for address, length, data, why in chunks:
        if data is None:
            close_record()
            last = stats.unreadable[-1] if stats.unreadable else None
            if last is not None and last[0] + last[1] == address and last[2] == why:
                stats.unreadable[-1] = (last[0], last[1] + length, why)
            else:
                stats.unreadable.append((address, length, why))
            continue
        stats.bytes_read += len(data)
        view = memoryview(data)
        for offset in range(0, len(data), PAGE):
            page = view[offset:offset + PAGE]
            page_address = address + offset
            if page == zero_page[:len(page)]:
                stats.zero_pages += 1
                close_record()
                continue
            if part.run_start is not None and page_address != part.next_address:
                close_record()
            if part.run_start is None:
                if len(part.buffer) + HEADER.size + PAGE > part_size and part.buffer:
                    yield bytes(part.buffer)
                    part.buffer = bytearray()
                part.run_header_at = len(part.buffer)
                part.buffer += bytes(HEADER.size)
                part.run_start = page_address
            part.buffer += page
            stats.bytes_stored += len(page)
            part.next_address = page_address + len(page)
            if len(part.buffer) + PAGE > part_size:
                close_record()
                yield bytes(part.buffer)
                part.buffer = bytearray()
    close_record()
    if part.buffer:
        yield bytes(part.buffer)


def records(read: Callable[[int], bytes], size: int) -> Iterator[Tuple[int, int, int]]:
    """(first address, last address, offset of the data) of each record of an image `read(offset, n)` reads;
    ValueError at the first header that is not LiME's."""
    offset = 0
    while offset < size:
        raw = read(offset)
        if len(raw) < HEADER.size:
            raise ValueError("truncated LiME header at offset %d" % offset)
        magic, version, start, end, _ = HEADER.unpack(raw[:HEADER.size])
        if magic != MAGIC or version != VERSION or end < start:
            raise ValueError("not a LiME record at offset %d" % offset)
        yield start, end, offset + HEADER.size
        offset += HEADER.size + end - start + 1
