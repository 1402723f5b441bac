"""A bundle's files on disk, and streaming its payload back: age -> zstd|gzip|none -> tar members."""
from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Optional, Sequence

from toolkit.errors import BadInputError, VerificationFailed
from toolkit.host.atomic import PARTIAL_SUFFIX

# Host files are stored under this prefix by their absolute path (schema 3): the layout of fox-it's acquire,
# which dissect.target's loaders open as a target (the decrypted tar, or the directory `extract` made).
ROOTFS = "fs/$rootfs$/"

MANIFEST_SUFFIX = ".manifest.json"


@dataclass
class BundlePaths:
    payload: str
    manifest: str
    signature: str
    custody: str
    sums: str
    partial: str

    @property
    def compression(self) -> str:
        name = self.payload[: -len(".age")] if self.payload.endswith(".age") else self.payload
        return "zstd" if name.endswith(".tar.zst") else "gzip" if name.endswith(".tar.gz") else "none"

    @property
    def encrypted(self) -> bool:
        return self.payload.endswith(".age")


def locate(path: str) -> BundlePaths:
    """From the payload, its manifest, custody log, signature or .partial, the bundle's file names."""
    path = os.path.abspath(path)
    for suffix in (MANIFEST_SUFFIX + ".sig", MANIFEST_SUFFIX, ".custody.jsonl", PARTIAL_SUFFIX):
        if path.endswith(suffix):
            path = path[: -len(suffix)]
            break
    if not (os.path.exists(path) or os.path.exists(path + PARTIAL_SUFFIX) or os.path.exists(path + MANIFEST_SUFFIX)):
        raise BadInputError("no bundle at %s" % path)
    return BundlePaths(payload=path, manifest=path + MANIFEST_SUFFIX, signature=path + MANIFEST_SUFFIX + ".sig",
                       custody=path + ".custody.jsonl", sums=os.path.join(os.path.dirname(path), "SHA256SUMS"),
                       partial=path + PARTIAL_SUFFIX)


def load_manifest(paths: BundlePaths) -> Dict[str, Any]:
    try:
        with open(paths.manifest, "rb") as handle:
            return json.loads(handle.read())
    except FileNotFoundError:
        raise BadInputError("no manifest beside the payload: %s" % paths.manifest) from None
    except ValueError:
        raise VerificationFailed("manifest %s is not valid JSON (altered or truncated)" % paths.manifest) from None


class _ChunkReader(io.RawIOBase):
    """A readable stream over an iterator of byte chunks (the decrypted payload)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buffer = b""

    def readable(self) -> bool:
        return True

    def readinto(self, target) -> int:
        while not self._buffer:
            try:
                self._buffer = next(self._chunks)
            except StopIteration:
                return 0
        size = min(len(target), len(self._buffer))
        target[:size] = self._buffer[:size]
        self._buffer = self._buffer[size:]
        return size


class CountingReader(io.RawIOBase):
    """Counts the bytes read through it (the tar stream's length, which the manifest records as tar_bytes)."""

    def __init__(self, inner) -> None:
        self._inner = inner
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, target) -> int:
        data = self._inner.read(len(target))
        size = len(data)
        target[:size] = data
        self.count += size
        return size

    def drain(self) -> int:
        """Read what follows the tar's end (its padding, or anything appended); the total count."""
        while self.read(1 << 20):
            pass
        return self.count


def _decoded(source, compression: str, encrypted: bool, identities: Sequence[Any]):
    """The payload file object, decrypted and decompressed as it is read: the tar stream."""
    stream = source
    if encrypted:
        from toolkit.crypto import age

        decryptor = age.Decryptor(source, identities)
        stream = io.BufferedReader(_ChunkReader(decryptor.chunks()), buffer_size=1 << 20)
    if compression == "zstd":
        import zstandard

        stream = zstandard.ZstdDecompressor().stream_reader(stream, read_across_frames=True)
    elif compression == "gzip":
        stream = gzip.GzipFile(fileobj=stream, mode="rb")
    return stream


def open_tar_stream(source, compression: str, encrypted: bool, identities: Sequence[Any]):
    """A streaming tarfile over the payload file object (decrypting and decompressing as it goes)."""
    return tarfile.open(fileobj=_decoded(source, compression, encrypted, identities), mode="r|",
                        format=tarfile.PAX_FORMAT)


def open_counted_tar_stream(source, compression: str, encrypted: bool, identities: Sequence[Any]):
    """open_tar_stream(), and the CountingReader under the tarfile (the decompressed bytes read so far)."""
    counter = CountingReader(_decoded(source, compression, encrypted, identities))
    return tarfile.open(fileobj=counter, mode="r|", format=tarfile.PAX_FORMAT), counter


def iterate_members(tar) -> Iterator[tarfile.TarInfo]:
    """Members in order; a stream that stops early raises (age, zstd, gzip or tar errors) as such."""
    while True:
        member = tar.next()
        if member is None:
            return
        yield member


def read_member(tar, member: tarfile.TarInfo, sink=None) -> Optional[str]:
    """sha256 of a regular member's content, streamed to sink when given."""
    import hashlib

    if not member.isreg():
        return None
    digest = hashlib.sha256()
    handle = tar.extractfile(member)
    while True:
        chunk = handle.read(1 << 20)
        if not chunk:
            break
        digest.update(chunk)
        if sink is not None:
            sink(chunk)
    return digest.hexdigest()


def member_kind(member: tarfile.TarInfo) -> str:
    """file, dir, symlink or other: a member's type as the manifest names it."""
    if member.isreg():
        return "file"
    if member.isdir():
        return "dir"
    if member.issym():
        return "symlink"
    return "other"
