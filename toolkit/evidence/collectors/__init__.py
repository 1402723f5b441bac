"""Every collector, registered in one list; capture runs them most volatile first."""
from __future__ import annotations

from typing import List, Optional, Sequence

from toolkit.evidence.collectors.artifacts import ArtifactsCollector
from toolkit.evidence.collectors.base import Collector
from toolkit.evidence.collectors.containers import ContainerCollector
from toolkit.evidence.collectors.files import AppConfigCollector, IncludeCollector
from toolkit.evidence.collectors.hostfiles import (
    AppBulkCollector,
    LogCollector,
    PersistenceCollector,
    StagingCollector,
    TmpExecutablesCollector,
)
from toolkit.evidence.collectors.memory import PhysicalMemoryCollector, ProcessMemoryCollector
from toolkit.evidence.collectors.network import NetworkCollector
from toolkit.evidence.collectors.packages import PackagesCollector
from toolkit.evidence.collectors.processes import ProcessCollector
from toolkit.evidence.collectors.system import SystemCollector
from toolkit.evidence.collectors.timeline import TimelineCollector

# Most volatile first (RFC 3227): physical memory, processes and sockets, the marked processes' memory,
# containers, temporary files, logs and configuration, the timeline.
REGISTRY: List[Collector] = [PhysicalMemoryCollector(), SystemCollector(), ProcessCollector(), NetworkCollector(),
                             ProcessMemoryCollector(), ContainerCollector(),
                             TmpExecutablesCollector(), StagingCollector(), LogCollector(), AppConfigCollector(), PersistenceCollector(),
                             ArtifactsCollector(), IncludeCollector(), PackagesCollector(), TimelineCollector(), AppBulkCollector()]
PROFILES = ("volatile", "triage", "full")


def select(profile: str, only: Optional[Sequence[str]] = None, skip: Optional[Sequence[str]] = None,
           add: Sequence[str] = ()) -> List[Collector]:
    """The collectors a capture runs, most volatile first: the profile's (or `only`), less `skip`, plus `add`
    (--memory adds `memory` to any profile)."""
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
    chosen += [c for c in REGISTRY if c.name in add and c not in chosen]
    if skip:
        chosen = [c for c in chosen if c.name not in skip]
    return sorted(chosen, key=lambda c: c.rank)
