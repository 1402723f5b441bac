"""Room on the output medium during a capture: a member is stored only when the medium keeps its reserve.

A full USB stick must not cost the bundle: without this, the first write that meets ENOSPC ends the capture and
nothing is kept. With it, what would not fit is a `limit` entry (its size and the free space) and the capture
goes on to write its findings, log and manifest into the reserve (and exits 6: evidence is missing).

Invariants:
- A member is refused when its raw size (an upper bound of what it takes once compressed) plus the reserve (half
  of it for a member under SMALL_MEMBER, so listings still land) plus room for its manifest entry is more than
  the free space: what is written is whole, and the bundle ends.
- The free space is the last statvfs less the raw bytes allowed and not yet handed to the writer when it was
  read (the capture thread counts `consumed`), less what the writer may still hold (`pipeline`: its compressor's
  jobs and the encrypting thread's queue): bytes between the collector and the disk are never free space.
- statvfs is read again after CHECK_BYTES of members or CHECK_SECONDS, and before any refusal: space that
  something else takes meanwhile is seen within that.
- Thread-safe: the collectors' threads ask; one lock.
"""
from __future__ import annotations

import os
import threading
import time
from typing import Optional

CHECK_BYTES = 64 << 20
CHECK_SECONDS = 2.0
SMALL_MEMBER = 1 << 20
MANIFEST_BYTES_PER_MEMBER = 1024  # a member's entry in the inner manifest, generous (compressed it is ~200)


class OutputRoom:
    def __init__(self, out_dir: str, reserve: int) -> None:
        self.out_dir = out_dir
        self.reserve = reserve
        self.members = 0
        self.taken = 0  # raw bytes of the members allowed so far
        self.consumed = 0  # raw bytes the capture thread has handed to the writer (it alone adds to this)
        self.refused = 0
        self.refused_bytes = 0
        self._free = 0  # free bytes at the last statvfs
        self._in_flight_base = 0  # `consumed` at the last statvfs: what was taken past it was not on disk yet
        self._taken_at_check: Optional[int] = None
        self._checked_at = 0.0
        self.pipeline = 0  # raw bytes the writer may hold past `consumed` (compressor, encrypting thread)
        self._lock = threading.Lock()

    def _stat(self) -> None:
        consumed = self.consumed
        try:
            info = os.statvfs(self.out_dir)
            self._free = info.f_bavail * info.f_frsize
        except OSError:
            self._free = 1 << 62  # not readable: the write itself will say what is wrong
        self._in_flight_base = consumed
        self._taken_at_check = self.taken
        self._checked_at = time.monotonic()

    def _free_now(self) -> int:
        """Free bytes at the last statvfs less what was allowed and not yet handed to the writer then, or since
        (raw sizes: compression only leaves more)."""
        return self._free - max(0, self.taken - self._in_flight_base) - self.pipeline

    def _needed(self, size: int) -> int:
        # a small member (a listing, a fact's JSON) may use half the reserve: what was collected stays described
        reserve = self.reserve // 2 if size < SMALL_MEMBER else self.reserve
        return size + reserve + (self.members + 1) * MANIFEST_BYTES_PER_MEMBER

    def fits(self, size: int) -> bool:
        """Whether a member of `size` bytes would fit now (nothing is taken)."""
        with self._lock:
            self._stat()
            return self._free_now() >= self._needed(size)

    def take(self, size: int) -> Optional[str]:
        """None when a member of `size` raw bytes may be written (and it is counted); else why not, in words."""
        with self._lock:
            stale = (self._taken_at_check is None or self.taken - self._taken_at_check >= CHECK_BYTES
                     or time.monotonic() - self._checked_at >= CHECK_SECONDS)
            if stale:
                self._stat()
            if self._free_now() < self._needed(size) and not stale:
                self._stat()  # a refusal is always on a fresh reading
            if self._free_now() < self._needed(size):
                self.refused += 1
                self.refused_bytes += size
                return ("not stored: its %d bytes would leave less than the %d MiB reserve on the output medium "
                        "(%d MiB free)" % (size, self.reserve >> 20, max(0, self._free_now()) >> 20))
            self.members += 1
            self.taken += size
            return None

    def summary(self) -> Optional[str]:
        """One line for the manifest's degraded list when anything was refused, else None."""
        if not self.refused:
            return None
        return ("output medium: %d members (%d bytes raw) not stored, to keep the %d MiB reserve free (each is an "
                "entry in the manifest's errors)" % (self.refused, self.refused_bytes, self.reserve >> 20))
