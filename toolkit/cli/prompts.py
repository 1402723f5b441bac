"""Passphrases: from a file given by path, or asked on the terminal without echo; never from argv."""
from __future__ import annotations

import os
from typing import Optional

from toolkit.errors import BadInputError, UsageError


def _terminal_available() -> bool:
    try:
        fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
    except OSError:
        return False
    os.close(fd)
    return True


def read_passphrase_file(path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            data = handle.read(65536)
    except OSError as error:
        raise BadInputError("cannot read passphrase file %s: %s" % (path, error.strerror)) from None
    first = data.split(b"\n", 1)[0].rstrip(b"\r")
    if not first:
        raise BadInputError("passphrase file %s is empty" % path)
    return first


def passphrase_source(passphrase_file: Optional[str], confirm: bool = False):
    """A callable prompt -> passphrase bytes, asked at most once."""
    cache = {}

    def ask(prompt: str) -> bytes:
        if "value" in cache:
            return cache["value"]
        if passphrase_file:
            value = read_passphrase_file(passphrase_file)
        else:
            if not _terminal_available():
                raise UsageError("a passphrase is needed and there is no terminal to ask on",
                                 hint="give --passphrase-file FILE")
            import getpass

            value = getpass.getpass(prompt).encode("utf-8")
            if confirm and getpass.getpass("Confirm passphrase: ").encode("utf-8") != value:
                raise UsageError("the passphrases do not match")
            if not value:
                raise UsageError("an empty passphrase")
        cache["value"] = value
        return value

    return ask
