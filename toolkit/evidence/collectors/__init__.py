"""Every collector, registered in one list; capture runs them most volatile first."""
from __future__ import annotations

from typing import List, Optional, Sequence

from toolkit.evidence.collectors.base import Collector
from toolkit.evidence.collectors.files import AppConfigCollector, IncludeCollector
from toolkit.evidence.collectors.system import SystemCollector

REGISTRY: List[Collector] = [SystemCollector(), AppConfigCollector(), IncludeCollector()]
PROFILES = ("volatile", "triage", "full")


def select(profile: str, only: Optional[Sequence[str]] = None, skip: Optional[Sequence[str]] = None) -> List[Collector]:
    from toolkit.errors import UsageError

    names = {c.name for c in REGISTRY}
    for name in list(only or []) + list(skip or []):
        if name not in names:
            raise UsageError("unknown collector %r; known: %s" % (name, ", ".join(sorted(names))))
    if profile not in PROFILES:
        raise UsageError("unknown profile %r; known: %s" % (profile, ", ".join(PROFILES)))
    chosen = [c for c in REGISTRY if (profile in c.profiles or c.name == "include")]
    if only:
        chosen = [c for c in REGISTRY if c.name in only]
    if skip:
        chosen = [c for c in chosen if c.name not in skip]
    return sorted(chosen, key=lambda c: c.rank)
