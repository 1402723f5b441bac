"""The LiME format (the one volatility3, AVML and LiME's own tools read): records of a 32-byte header
(magic "EMiL" as a little-endian 0x4C694D45, version 1, first and last physical address, 8 reserved bytes)
followed by the bytes of that range.

Invariants:
- Runs of zero pages are left out, as LiME allows (the range is cut into records around them), when they are at
  least MIN_ZERO_RUN pages long; the first zero page after data is kept all the same, so a read that starts in
  data and runs on for up to a page (volatility3 reads a banner's 4 KiB) stays inside a record.
- The image is cut into parts of at most `part_size` bytes at record boundaries (a run longer than a part
  becomes several records): every part is a whole LiME file, and so is their concatenation in order.
- Nothing is kept but the part being filled: memory stays at about one part whatever the RAM size. A full part
  is handed over as it is (a bytearray, not copied) and never touched again.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, List, Optional, Tuple

MAGIC = 0x4C694D45
VERSION = 1
HEADER = struct.Struct("<IIQQ8s")
PAGE = 4096
MAX_LISTED = 10000
MIN_ZERO_RUN = 16  # 64 KiB: shorter runs of zeros stay in the record (a header costs 32 bytes, a hole a lookup)


def header(start: int, end_inclusive: int) -> bytes:
    return HEADER.pack(MAGIC, VERSION, start, end_inclusive, b"\0" * 8)


@dataclass
class Stats:
    records: int = 0
    bytes_stored: int = 0  # memory bytes in the image (headers not counted)
    zero_pages: int = 0  # left out
    unreadable: List[Tuple[int, int, str]] = field(default_factory=list)  # (start, bytes, why), merged runs
    unreadable_bytes: int = 0
    unreadable_unlisted: int = 0  # runs past MAX_LISTED: counted, not listed (memory stays bounded)
    bytes_read: int = 0


class _Writer:
    """Records into parts: one open record at a time, zero pages held back until the next data says whether
    they are a hole (left out) or a short run (kept)."""

    def __init__(self, part_size: int, stats: Stats) -> None:
        self.part_size, self.stats = part_size, stats
        # allocated once a part and filled to `fill`: growing a bytearray by appends reallocates and copies it
        # again and again (a peak of twice the part)
        self.buffer = bytearray(part_size)
        self.fill = 0
        self.run_start: Optional[int] = None  # physical address of the open record
        self.header_at = 0
        self.next_address = 0  # just past the open record's last byte
        self.zeros = 0  # zero pages held back, right after the open record
        self.done: List[memoryview] = []  # full parts, to be yielded

    def close(self) -> None:
        if self.run_start is not None:
            length = self.fill - self.header_at - HEADER.size
            self.buffer[self.header_at:self.header_at + HEADER.size] = header(self.run_start,
                                                                              self.run_start + length - 1)
            self.stats.records += 1
            self.run_start = None

    def hand_over(self) -> None:
        """The part so far, as a view of its buffer (never written again: the next part gets a new one)."""
        if self.fill:
            self.done.append(memoryview(self.buffer)[:self.fill])
            self.buffer = bytearray(self.part_size)
            self.fill = 0

    def _append(self, address: int, data) -> None:
        """Data (whole pages, or a range's last piece) at `address`, cut at part boundaries."""
        view = memoryview(data)
        while view:
            if self.run_start is not None and (address != self.next_address or
                                               self.fill + PAGE > self.part_size):
                self.close()
            if self.run_start is None:
                if self.fill + HEADER.size + PAGE > self.part_size:
                    self.hand_over()
                self.header_at = self.fill
                self.fill += HEADER.size  # written when the record closes
                self.run_start = address
            room = max(PAGE, (self.part_size - self.fill) // PAGE * PAGE)
            piece = view[:room]
            self.buffer[self.fill:self.fill + len(piece)] = piece
            self.fill += len(piece)
            self.stats.bytes_stored += len(piece)
            address += len(piece)
            self.next_address = address
            view = view[len(piece):]

    def settle_zeros(self, followed_by_data: bool) -> None:
        """The zero pages held back: kept when few and data follows; else all but the first (the margin) out."""
        count, self.zeros = self.zeros, 0
        if not count:
            return
        keep = count if (followed_by_data and count < MIN_ZERO_RUN) else 1
        start = self.next_address
        for index in range(keep):
            self._append(start + index * PAGE, bytes(PAGE))
        self.stats.zero_pages += count - keep
        if keep < count:
            self.close()

    def data(self, address: int, data) -> None:
        """Pages of data (no zero page among them, or a range's last piece) at `address`."""
        if not (self.run_start is not None and address == self.next_address + self.zeros * PAGE):
            self.settle_zeros(False)
            self.close()
        self.settle_zeros(True)
        self._append(address, data)

    def zero_pages(self, address: int, count: int) -> None:
        """`count` whole pages of zeros at `address`: held back after data, else left out at once."""
        if self.run_start is not None and address == self.next_address + self.zeros * PAGE:
            self.zeros += count
            return
        self.settle_zeros(False)
        self.close()
        self.stats.zero_pages += count  # no data before them: nothing to extend

    def finish(self) -> None:
        self.settle_zeros(False)
        self.close()
        self.hand_over()


def parts(chunks: Iterable[Tuple[int, int, Optional[bytes], str]], part_size: int, stats: Stats
          ) -> Iterator[memoryview]:
    """chunks: (physical address, length, its bytes or None when unreadable, why not), in address order, whole
    pages. Yields the parts of the image."""
    writer = _Writer(part_size, stats)
    zero_page = bytes(PAGE)
    zero_chunk = bytes(1 << 20)
    for address, length, data, why in chunks:
        if data is None:
            writer.settle_zeros(False)
            writer.close()
            stats.unreadable_bytes += length
            last = stats.unreadable[-1] if stats.unreadable else None
            if last is not None and last[0] + last[1] == address and last[2] == why:
                stats.unreadable[-1] = (last[0], last[1] + length, why)
            elif len(stats.unreadable) < MAX_LISTED:
                stats.unreadable.append((address, length, why))
            else:
                stats.unreadable_unlisted += 1
            continue
        stats.bytes_read += len(data)
        if len(data) % PAGE == 0 and data == zero_chunk[:len(data)]:
            writer.zero_pages(address, len(data) // PAGE)  # all zeros (free memory): one comparison
        elif data.find(zero_page) < 0:
            writer.data(address, data)  # no run of a page of zeros anywhere: no aligned zero page either
        else:
            view = memoryview(data)
            start = 0  # the data pages not yet handed over, [start, offset)
            for offset in range(0, len(data), PAGE):
                if len(data) - offset >= PAGE and view[offset:offset + PAGE] == zero_page:
                    if start < offset:
                        writer.data(address + start, view[start:offset])
                    writer.zero_pages(address + offset, 1)
                    start = offset + PAGE
            if start < len(data):
                writer.data(address + start, view[start:])
        while writer.done:
            yield writer.done.pop(0)
    writer.finish()
    while writer.done:
        yield writer.done.pop(0)


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
