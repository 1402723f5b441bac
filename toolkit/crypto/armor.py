"""age's ASCII armor: strict PEM (RFC 7468) with the label AGE ENCRYPTED FILE.

Writing: 64-column lines of padded base64. Reading: only whitespace is tolerated
before and after the block (and CRLF line endings; the END line may be the
file's last bytes, without a line ending); lines of exactly 64 columns but the
last, padding only at the end, canonical base64.
"""
from __future__ import annotations

import base64
import binascii
from typing import BinaryIO

from toolkit.crypto.errors import AgeArmorError

BEGIN = b"-----BEGIN AGE ENCRYPTED FILE-----"
END = b"-----END AGE ENCRYPTED FILE-----"
_WHITESPACE = b" \t\r\n"
_LINE_BYTES = 48  # 64 base64 columns


class ArmorWriter:
    """Wraps a binary sink; close() writes the last line and the END line (the sink stays open)."""

    def __init__(self, sink: BinaryIO) -> None:
        self._sink = sink
        self._pending = bytearray()
        self._sink.write(BEGIN + b"\n")

    def write(self, data) -> int:
        self._pending += data
        whole = len(self._pending) - len(self._pending) % _LINE_BYTES
        if whole:
            chunk = bytes(self._pending[:whole])
            del self._pending[:whole]
            encoded = base64.b64encode(chunk)
            self._sink.write(b"".join(encoded[i:i + 64] + b"\n" for i in range(0, len(encoded), 64)))
        return len(data)

    def close(self) -> None:
        if self._pending:
            self._sink.write(base64.b64encode(bytes(self._pending)) + b"\n")
            self._pending = bytearray()
        self._sink.write(END + b"\n")


class _Prefixed:
    """A stream that yields some already-read bytes before the rest of the source."""

    def __init__(self, prefix: bytes, source: BinaryIO) -> None:
        self._prefix = prefix
        self._source = source

    def read(self, size: int = -1) -> bytes:
        if self._prefix:
            if size < 0:
                data, self._prefix = self._prefix + self._source.read(), b""
                return data
            data, self._prefix = self._prefix[:size], self._prefix[size:]
            return data
        return self._source.read(size)

    def readline(self, limit: int = -1) -> bytes:
        if self._prefix:
            cut = self._prefix.find(b"\n")
            end = len(self._prefix) if cut < 0 else cut + 1
            if 0 <= limit < end:
                end = limit
            data, self._prefix = self._prefix[:end], self._prefix[end:]
            if data.endswith(b"\n") or (0 <= limit <= len(data)):
                return data
            return data + self._source.readline(-1 if limit < 0 else limit - len(data))
        return self._source.readline(limit)


class ArmorReader:
    """Decodes an armored age file while it is read: read() and readline() on the binary content."""

    def __init__(self, source) -> None:
        self._source = source
        self._buffer = bytearray()
        self._done = False
        self._short_seen = False
        first = self._line()
        while first.strip(_WHITESPACE) == b"" and first:
            first = self._line()
        if first not in (BEGIN + b"\n", BEGIN + b"\r\n"):
            raise AgeArmorError("bad armor: no -----BEGIN AGE ENCRYPTED FILE----- line")

    def _line(self) -> bytes:
        line = self._source.readline(128)
        if len(line) >= 128 and not line.endswith(b"\n"):
            raise AgeArmorError("bad armor: a line longer than 64 columns")
        return line

    def _fill(self) -> None:
        if self._done:
            return
        line = self._line()
        if not line:
            raise AgeArmorError("bad armor: the file ends before the END line")
        if line.endswith(b"\n"):
            text = line[:-2] if line.endswith(b"\r\n") else line[:-1]
        elif line in (END, END + b"\r"):
            text = END  # the file's last line, the END line, may lack its line ending (as age accepts)
        else:
            raise AgeArmorError("bad armor: the file ends before the END line")
        if text == END:
            self._done = True
            rest = self._source.read(4096)
            while rest:
                if rest.strip(_WHITESPACE):
                    raise AgeArmorError("bad armor: data after the END line")
                rest = self._source.read(4096)
            return
        if self._short_seen:
            raise AgeArmorError("bad armor: a line after the short last line")
        if len(text) > 64 or not text:
            raise AgeArmorError("bad armor: a line of %d columns (64 expected)" % len(text))
        if len(text) < 64:
            self._short_seen = True
        elif b"=" in text:
            self._short_seen = True  # padding ends the data
        try:
            decoded = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise AgeArmorError("bad armor: a line that is not base64") from None
        if base64.b64encode(decoded) != text:
            raise AgeArmorError("bad armor: non-canonical base64")
        self._buffer += decoded

    def read(self, size: int = -1) -> bytes:
        while (size < 0 or len(self._buffer) < size) and not self._done:
            self._fill()
        if size < 0:
            size = len(self._buffer)
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    def readline(self, limit: int = -1) -> bytes:
        while True:
            cut = self._buffer.find(b"\n")
            if cut >= 0 and (limit < 0 or cut < limit):
                return self.read(cut + 1)
            if (0 <= limit <= len(self._buffer)) or self._done:
                return self.read(limit if limit >= 0 else len(self._buffer))
            self._fill()


def open_maybe_armored(source: BinaryIO):
    """The binary age stream of source, decoding armor when the file is armored."""
    head = b""
    while len(head) < 1024 * 1024:
        more = source.read(64)
        if not more:
            break
        head += more
        stripped = head.lstrip(_WHITESPACE)
        if stripped and (not stripped.startswith(b"-") or len(stripped) >= len(BEGIN)):
            break
    if head.lstrip(_WHITESPACE).startswith(b"-----"):
        # A binary age file starts with its version line: anything like a PEM line is armor (good or bad).
        return ArmorReader(_Prefixed(head, source))
    return _Prefixed(head, source)
