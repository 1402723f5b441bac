"""The one UTC formatter: every time the kit writes (manifests, journals, names, timelines) is UTC, ISO 8601.

Invariant: no function here reads the host's timezone files (time.gmtime only), so formatting a time never
touches /etc/localtime's atime, and the same moment always prints the same.
"""
from __future__ import annotations

import time
from typing import Optional


def iso(moment: Optional[float] = None) -> str:
    """2026-11-27T14:03:05Z (seconds)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if moment is None else moment))


def iso_micro(moment: Optional[float] = None) -> str:
    """2026-11-27T14:03:05.123456Z (microseconds)."""
    moment = time.time() if moment is None else moment
    return iso_ns(int(round(moment * 1e6)) * 1000)


def iso_ns(nanoseconds: int) -> str:
    """A time given in nanoseconds since the epoch (os.stat's st_*_ns), to the microsecond."""
    seconds, rest = divmod(nanoseconds, 1000000000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + ".%06dZ" % (rest // 1000)


def stamp(moment: Optional[float] = None) -> str:
    """20261127T140305Z: for file and bundle names."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if moment is None else moment))
