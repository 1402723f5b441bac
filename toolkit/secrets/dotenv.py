"""The BookGen .env file, read as docker compose reads it, kept line by line for round-trip editing.

Supported: comments and blank lines, `export ` prefixes, unquoted values (inline
comments after whitespace + #), single quotes (literal), double quotes (\\n, \\r,
\\t, \\\\, \\", \\$ escapes; may span lines), CRLF endings, a missing final newline,
duplicate keys (the last wins). No variable interpolation is done: values are
what the file says.

A line it cannot parse is reported by the file's path, its line number and, when the line has the shape
KEY=... with a plain name (letters, digits, _), that key: never any part of a value and never the line
itself (a line without '=' may be a secret pasted on its own).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from toolkit.errors import BadInputError
from toolkit.host.hostfs import read_host_file

KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
PLAIN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # a key shown in an error; anything else could be a value
_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "\\": "\\", '"': '"', "$": "$", "'": "'"}


class DotEnvError(BadInputError):
    """A line of the .env that cannot be parsed (exit 3, with its line number; never its text)."""


def _error(name: str, line_no: int, problem: str, key: Optional[str] = None) -> DotEnvError:
    """ "FILE line N: problem", or "FILE line N, key K: problem" when K is a plain name (never a value)."""
    shown = ", key %s" % key if key is not None and PLAIN_NAME.fullmatch(key) else ""
    return DotEnvError("%s line %d%s: %s" % (name, line_no, shown, problem))


@dataclass
class Entry:
    key: str
    value: str
    quote: str  # "", "'" or '"'
    line: int  # 1-based number of the line where the entry starts
    start: int  # offset of the value token (quotes included) in the file text
    end: int


@dataclass
class DotEnv:
    text: str
    entries: List[Entry] = field(default_factory=list)

    def values(self) -> Dict[str, str]:
        result: Dict[str, str] = {}
        for entry in self.entries:
            result[entry.key] = entry.value  # the last one wins, as in docker compose
        return result

    def get(self, key: str) -> Optional[str]:
        return self.values().get(key)

    def last_entry(self, key: str) -> Optional[Entry]:
        found = None
        for entry in self.entries:
            if entry.key == key:
                found = entry
        return found


def parse(text: str, name: str = ".env") -> DotEnv:
    env = DotEnv(text)
    pos, line_no, length = 0, 1, len(text)
    while pos < length:
        line_end = text.find("\n", pos)
        line_end = length if line_end < 0 else line_end
        line = text[pos:line_end].rstrip("\r")
        stripped = line.lstrip()
        if not stripped or stripped.startswith("#"):
            pos, line_no = line_end + 1, line_no + 1
            continue
        offset = pos + (len(line) - len(stripped))
        body = stripped
        if body.startswith("export ") or body.startswith("export\t"):
            trimmed = body[len("export"):].lstrip()
            offset += len(body) - len(trimmed)
            body = trimmed
        match = KEY.match(body)
        if not match:
            raise _error(name, line_no, "not KEY=VALUE")
        key = match.group(0)
        rest = body[match.end():]
        spaces = len(rest) - len(rest.lstrip(" \t"))
        rest = rest[spaces:]
        if not rest.startswith("="):
            raise _error(name, line_no, "not KEY=VALUE")  # no '=': what looks like a key may be a pasted secret
        value_offset = offset + match.end() + spaces + 1
        after_eq = text[value_offset:line_end].rstrip("\r")
        lead = len(after_eq) - len(after_eq.lstrip(" \t"))
        value_offset += lead
        first = text[value_offset:value_offset + 1]
        start_line = line_no
        if first in ("'", '"'):
            value, close = _quoted(text, value_offset, first, name, line_no, key)
            line_no += text.count("\n", value_offset, close)
            tail_end = text.find("\n", close)
            tail_end = length if tail_end < 0 else tail_end
            tail = text[close + 1:tail_end].rstrip("\r").strip()
            if tail and not tail.startswith("#"):
                raise _error(name, line_no, "text after the closing quote", key)
            env.entries.append(Entry(key, value, first, start_line, value_offset, close + 1))
            pos, line_no = tail_end + 1, line_no + 1
            continue
        raw = text[value_offset:line_end].rstrip("\r")
        comment = re.search(r"[ \t]#", raw)
        token = raw[: comment.start()] if comment else raw
        token = token.rstrip(" \t")
        env.entries.append(Entry(key, token, "", start_line, value_offset, value_offset + len(token)))
        pos, line_no = line_end + 1, line_no + 1
    return env


def _quoted(text: str, start: int, quote: str, name: str, line_no: int, key: str):
    out, i = [], start + 1
    while i < len(text):
        char = text[i]
        if char == quote:
            return "".join(out), i
        if quote == '"' and char == "\\" and i + 1 < len(text):
            nxt = text[i + 1]
            out.append(_ESCAPES.get(nxt, "\\" + nxt))
            i += 2
            continue
        if char == "\n" and quote == "'":
            break
        out.append(char)
        i += 1
    raise _error(name, line_no, "unterminated %s quote" % ("single" if quote == "'" else "double"), key)


ENV_READ_LIMIT = 4 << 20


def read(path: str) -> DotEnv:
    from toolkit.errors import EnvironmentProblem

    try:
        data = read_host_file(path, ENV_READ_LIMIT)  # never a FIFO or device; bounded
    except FileNotFoundError:
        raise BadInputError("no .env at %s" % path, hint="give --env-file PATH or --app-dir DIR") from None
    except PermissionError:
        raise EnvironmentProblem("cannot read %s: permission denied" % path) from None
    except OSError as error:
        raise EnvironmentProblem("cannot read %s: %s" % (path, error.strerror or "error %s" % error.errno)) from None
    if len(data) >= ENV_READ_LIMIT:
        raise BadInputError("%s is larger than %d MiB: not a .env" % (path, ENV_READ_LIMIT >> 20))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:  # its position only: the bytes around it may be a value
        raise _error(path, data.count(b"\n", 0, error.start) + 1, "not UTF-8 text") from None
    return parse(text, path)


def with_values(env: DotEnv, changes: Dict[str, str]) -> str:
    """The file's text with the last occurrence of each key given a new value, in its own quoting style.

    Everything else stays byte for byte. A key not in the file is appended as KEY=value.
    New values must be plain (letters, digits, - _ . : / @ %): they need no escaping in any style.
    """
    for key, value in changes.items():
        if not re.fullmatch(r"[A-Za-z0-9_.:/@%+=-]*", value):
            raise ValueError("value for %s has characters that would need quoting rules" % key)
    edits = []
    missing = []
    for key, value in changes.items():
        entry = env.last_entry(key)
        if entry is None:
            missing.append((key, value))
            continue
        token = "%s%s%s" % (entry.quote, value, entry.quote)
        edits.append((entry.start, entry.end, token))
    text = env.text
    for start, end, token in sorted(edits, reverse=True):
        text = text[:start] + token + text[end:]
    if missing:
        newline = "\r\n" if "\r\n" in text else "\n"
        if text and not text.endswith("\n"):
            text += newline
        text += "".join("%s=%s%s" % (k, v, newline) for k, v in missing)
    return text


def write_atomically(path: str, text: str, like: Optional[str] = None) -> None:
    """Replace PATH atomically (AtomicFile: a partial file, fsync, rename, fsync the directory) with the mode and,
    as root, the owner of `like` (default: PATH itself; 0600 when neither exists). Mode and owner are set on the
    descriptor, never by path. The rename replaces a symlink at PATH, it never writes through one."""
    import os

    from toolkit.host.atomic import PARTIAL_SUFFIX, AtomicFile

    reference = like or path
    info = os.stat(reference) if os.path.exists(reference) else None
    owner = (info.st_uid, info.st_gid) if info is not None and os.geteuid() == 0 else None
    path = os.path.abspath(path)
    partial = os.path.join(os.path.dirname(path), ".%s.%d-%s%s" % (os.path.basename(path), os.getpid(),
                                                                     os.urandom(4).hex(), PARTIAL_SUFFIX))
    with AtomicFile(path, info.st_mode & 0o7777 if info else 0o600, overwrite=True, partial=partial,
                    owner=owner) as out:
        out.write(text.encode("utf-8"))
        out.commit()
