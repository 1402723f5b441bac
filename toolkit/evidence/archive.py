"""The streaming evidence payload: POSIX pax tar -> zstd|gzip|none -> age -> NAME.partial, in one pass.

Nothing is staged: each member's bytes go straight from the source through the
compressor and the encryptor to the output file. The payload's sha256 and size
are computed as it is written (HashingWriter, on its own thread).
"""
from __future__ import annotations

import os
import struct
import tarfile
import zlib
from typing import BinaryIO, Dict, Optional, Sequence

from toolkit.host.streams import MAX_PENDING_BYTES, BackgroundWriter, HashingWriter

BLOCK = 512
RECORD = 20 * BLOCK
COMPRESSIONS = ("zstd", "gzip", "none")
SUFFIXES = {"zstd": ".tar.zst", "gzip": ".tar.gz", "none": ".tar"}


def zstd_available() -> bool:
    """Whether this interpreter loads the bundled zstandard (a newer minor than the build may not)."""
    try:
        import zstandard  # noqa: F401
    except ImportError:
        return False
    return True


ZERO_RUN = 16 << 20  # a run of zeros (an abandoned member's padding) is written as repeats of one block this long


class _Passthrough:
    buffered_bound = 0

    def __init__(self, sink) -> None:
        self.sink = sink

    def write(self, data) -> int:
        return self.sink.write(data)

    def write_zeros(self, count: int) -> None:
        block = bytes(min(count, 1 << 20))
        while count:
            count -= self.sink.write(block[:min(count, len(block))])

    def close(self) -> None:
        pass


class _ZstdWriter:
    """zstd, multithreaded. A run of zeros ends the current frame and is written as whole frames of zeros,
    compressed once: padding a 16 GiB member costs no compression (readers go across frames, as `zstd -d`
    and `tar --zstd` do)."""

    def __init__(self, sink, level: int, threads: int) -> None:
        import zstandard

        self._zstd = zstandard
        self._sink = sink
        self._level = level
        self._zero_frames: Dict[int, bytes] = {}
        if threads < 0:
            # one worker more than cores: a worker waiting for its input never leaves a core idle while the
            # reading, hashing and encrypting threads run (bench/capture_throughput: 0.97x tar|zstd|age, where
            # cores-only workers gave 1.1-1.2x)
            threads = (os.cpu_count() or 1) + 1
        # 4 MiB jobs, each primed with the last 1/64 of the window before it (overlap_log 3; the default,
        # 6, re-reads 1/8): 6-8 % less CPU than 2 MiB jobs with the default overlap, within 0.7 % of their
        # size on BookGen-like logs and on /var/log + /usr/share/doc + /etc (medians of 4 alternating runs)
        # raw bytes that may be inside the compressor and not yet out (jobs in the workers and the one filling)
        self.buffered_bound = (2 * threads + 2) * (4 << 20)
        params = zstandard.ZstdCompressionParameters.from_level(level, threads=threads, job_size=4 << 20,
                                                               overlap_log=3, write_checksum=True)
        self._writer = zstandard.ZstdCompressor(compression_params=params).stream_writer(
            sink, closefd=False, write_return_read=True)

    def write(self, data) -> int:
        return self._writer.write(data)

    def _frame_of_zeros(self, count: int) -> bytes:
        frame = self._zero_frames.get(count)
        if frame is None:
            frame = self._zstd.ZstdCompressor(level=self._level, write_checksum=True).compress(bytes(count))
            if count == ZERO_RUN:
                self._zero_frames[count] = frame
        return frame

    def write_zeros(self, count: int) -> None:
        self._writer.flush(self._zstd.FLUSH_FRAME)
        while count:
            piece = min(count, ZERO_RUN)
            self._sink.write(self._frame_of_zeros(piece))
            count -= piece

    def close(self) -> None:
        self._writer.flush(self._zstd.FLUSH_FRAME)


class _GzipWriter:
    """One gzip member (RFC 1952) around a raw deflate stream. A run of zeros is a full flush (byte-aligned,
    no reference back past it) then one block of deflated zeros, compressed once and repeated: padding an
    abandoned member costs a CRC over its zeros, not their compression (12 s per GiB before)."""
    buffered_bound = 1 << 20  # deflate's window and pending block, generously

    def __init__(self, sink, level: int) -> None:
        self._sink = sink
        self._level = level
        self._deflate = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)
        self._crc = 0
        self._size = 0
        self._zero_block: Optional[bytes] = None
        xfl = b"\x02" if level == 9 else b"\x04" if level == 1 else b"\x00"
        sink.write(b"\x1f\x8b\x08\x00" + struct.pack("<I", 0) + xfl + b"\xff")  # no name, mtime 0, OS unknown

    def write(self, data) -> int:
        self._crc = zlib.crc32(data, self._crc)
        self._size += len(data)
        out = self._deflate.compress(data)
        if out:
            self._sink.write(out)
        return len(data)

    def _deflated_zeros(self, count: int) -> bytes:
        if count == ZERO_RUN and self._zero_block is not None:
            return self._zero_block
        alone = zlib.compressobj(self._level, zlib.DEFLATED, -zlib.MAX_WBITS)
        block = alone.compress(bytes(count)) + alone.flush(zlib.Z_FULL_FLUSH)
        if count == ZERO_RUN:
            self._zero_block = block
        return block

    def write_zeros(self, count: int) -> None:
        self._sink.write(self._deflate.flush(zlib.Z_FULL_FLUSH))
        zeros = bytes(min(count, ZERO_RUN))
        while count:
            piece = min(count, ZERO_RUN)
            self._crc = zlib.crc32(zeros[:piece] if piece < len(zeros) else zeros, self._crc)
            self._size += piece
            self._sink.write(self._deflated_zeros(piece))
            count -= piece

    def close(self) -> None:
        self._sink.write(self._deflate.flush(zlib.Z_FINISH))
        self._sink.write(struct.pack("<II", self._crc & 0xFFFFFFFF, self._size & 0xFFFFFFFF))


def compressor(kind: str, sink, level: Optional[int] = None, threads: int = -1):
    if kind == "zstd":
        return _ZstdWriter(sink, level or 3, threads)
    if kind == "gzip":
        return _GzipWriter(sink, level or 6)
    if kind == "none":
        return _Passthrough(sink)
    raise ValueError("unknown compression %s" % kind)


class PayloadWriter:
    """Writes tar members into the compressed, encrypted payload.

    Use add_header() then write_data() (exactly the header's size in total) then
    end_member(); or add_bytes() for a whole in-memory member. close() ends the
    archive (two zero blocks, padded to a record) and flushes every layer.
    """

    def __init__(self, sink: BinaryIO, recipients: Sequence, compression: str = "zstd", armored: bool = False,
                 threads: int = -1) -> None:
        from toolkit.crypto import age

        self.hashing = HashingWriter(sink)
        self._encryptor = age.Encryptor(self.hashing, recipients, armored) if recipients else None
        # encryption on its own thread: it runs while the compressor's caller waits for its workers
        self._encrypting = BackgroundWriter(self._encryptor, name="encrypting-writer") if self._encryptor else None
        self._compressor = compressor(compression, self._encrypting or self.hashing, threads=threads)
        # raw bytes written here that may not have reached the sink yet: the compressor's, then the encrypting
        # thread's queue (an upper bound, for what a full medium still has to take: toolkit.evidence.room)
        self.buffered_bound = self._compressor.buffered_bound + (MAX_PENDING_BYTES if self._encrypting else 0)
        self._remaining = 0
        self._member_size = 0
        self._written = 0  # uncompressed tar bytes
        self.members = 0

    def _emit(self, data) -> None:
        self._compressor.write(data)
        self._written += len(data)

    def add_header(self, info: tarfile.TarInfo) -> None:
        if self._remaining:
            raise ValueError("previous member not finished")
        self._emit(info.tobuf(format=tarfile.PAX_FORMAT, encoding="utf-8", errors="surrogateescape"))
        self._remaining = info.size if info.isreg() else 0
        self._member_size = self._remaining
        self.members += 1

    def write_data(self, data) -> None:
        if len(data) > self._remaining:
            raise ValueError("more data than the member's header says")
        self._emit(data)
        self._remaining -= len(data)

    @property
    def remaining(self) -> int:
        return self._remaining

    def pad_remaining(self) -> int:
        """Fill a member that came up short with zeros (the tar must stay well-formed); bytes padded."""
        padded = self._remaining
        if padded:
            self._compressor.write_zeros(padded)
            self._written += padded
            self._remaining = 0
        return padded

    def end_member(self) -> None:
        if self._remaining:
            raise ValueError("member ended %d bytes short" % self._remaining)
        tail = self._member_size % BLOCK
        if tail:
            self._emit(bytes(BLOCK - tail))
        self._member_size = 0

    def add_bytes(self, info: tarfile.TarInfo, data: bytes) -> None:
        info.size = len(data)
        self.add_header(info)
        if data:
            self.write_data(data)
        self.end_member()

    def close(self) -> Dict[str, object]:
        """End the archive and every layer; the payload's size and sha256 as written."""
        self._emit(bytes(2 * BLOCK))
        tail = self._written % RECORD
        if tail:
            self._emit(bytes(RECORD - tail))
        self._compressor.close()
        if self._encryptor is not None:
            self._encrypting.close()
            self._encryptor.close()
        self.hashing.close()
        return {"size": self.hashing.size, "sha256": self.hashing.hexdigest(), "tar_bytes": self._written}

    def abort(self) -> None:
        for stage in (self._encrypting, self.hashing):
            try:
                if stage is not None:
                    stage.close()
            except Exception:
                pass
