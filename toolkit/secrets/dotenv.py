"""The BookGen .env file, read as docker compose reads it, kept line by line for round-trip editing.

Supported: comments and blank lines, `export ` prefixes, unquoted values (inline
comments after whitespace + #), single quotes (literal), double quotes (\\n, \\r,
\\t, \\\\, \\", \\$ escapes; may span lines), CRLF endings, a missing final newline,
duplicate keys (the last wins). No variable interpolation is done: values are
what the file says.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from toolkit.errors import BadInputError

KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "\\": "\\", '"': '"', "$": "$", "'": "'"}


class DotEnvError(BadInputError):
    """A line of the .env that cannot be parsed (exit 3, with its line number)."""


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
            raise DotEnvError("%s line %d: not KEY=VALUE" % (name, line_no))
        key = match.group(0)
        rest = body[match.end():]
        spaces = len(rest) - len(rest.lstrip(" \t"))
        rest = rest[spaces:]
        if not rest.startswith("="):
            raise DotEnvError("%s line %d: %s has no '='" % (name, line_no, key))
        value_offset = offset + match.end() + spaces + 1
        after_eq = text[value_offset:line_end].rstrip("\r")
        lead = len(after_eq) - len(after_eq.lstrip(" \t"))
        value_offset += lead
        first = text[value_offset:value_offset + 1]
        start_line = line_no
        if first in ("'", '"'):
            value, close = _quoted(text, value_offset, first, name, line_no)
            line_no += text.count("\n", value_offset, close)
            tail_end = text.find("\n", close)
            tail_end = length if tail_end < 0 else tail_end
            tail = text[close + 1:tail_end].rstrip("\r").strip()
            if tail and not tail.startswith("#"):
                raise DotEnvError("%s line %d: text after the closing quote of %s" % (name, line_no, key))
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


def _quoted(text: str, start: int, quote: str, name: str, line_no: int):
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
    raise DotEnvError("%s line %d: unterminated %s quote" % (name, line_no, quote))


def read(path: str) -> DotEnv:
    try:
        with open(path, "r", encoding="utf-8", newline="") as handle:
            return parse(handle.read(), path)
    except FileNotFoundError:
        raise BadInputError("no .env at %s" % path, hint="give --env-file PATH or --app-dir DIR") from None
    except UnicodeDecodeError:
        raise DotEnvError("%s is not UTF-8 text" % path) from None
    except PermissionError:
        from toolkit.errors import EnvironmentProblem

        raise EnvironmentProblem("cannot read %s: permission denied" % path) from None


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
    """Temp file in the same directory, same mode and owner as `like` (default: path), fsync, rename, fsync dir."""
    import os
    import tempfile

    from toolkit.host.atomic import fsync_directory

    reference = like or path
    info = os.stat(reference) if os.path.exists(reference) else None
    directory = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(prefix=".%s." % os.path.basename(path), dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, info.st_mode & 0o7777 if info else 0o600)
        if info is not None:
            try:
                os.chown(temporary, info.st_uid, info.st_gid)
            except PermissionError:
                pass
        os.replace(temporary, path)
        fsync_directory(directory)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
