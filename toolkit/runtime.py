"""How this bookgen-kit run was started: from the zipapp or from source, and what the bootstrap did."""
from __future__ import annotations

import os
import sys
from typing import Any, Dict, List, Optional

from toolkit import __version__


def boot_state() -> Optional[Dict[str, Any]]:
    """The zipapp bootstrap's record of this run, or None when running from source."""
    boot = sys.modules.get("_bkboot")
    return getattr(boot, "STATE", None) if boot is not None else None


def build_info() -> Optional[Dict[str, Any]]:
    state = boot_state()
    return state["build"] if state else None


def version() -> str:
    return __version__


def baked_recipients() -> list:
    info = build_info()
    return list(info.get("recipients", [])) if info else []


def target_info() -> Optional[Dict[str, Any]]:
    """The target this run uses (for a CPython newer than the build: the newest one's code, abi3 modules only)."""
    state = boot_state()
    if not state:
        return None
    return state.get("target_info") or state["build"]["targets"].get(state["target"])


def python_range() -> List[str]:
    """The CPython versions this build has targets for, oldest first ([] from source)."""
    info = build_info()
    if not info:
        return []
    return sorted({t["python"] for t in info["targets"].values()}, key=lambda v: tuple(int(p) for p in v.split(".")))


def forward() -> Optional[Dict[str, Any]]:
    """Set when this CPython is newer than the build knows: {"python", "from_target", "from_python", "range"}."""
    state = boot_state()
    return dict(state["forward"]) if state and state.get("forward") else None


def degraded() -> List[Dict[str, Any]]:
    """What this run goes without, each {"component", "effect", "reason"}: e.g. zstandard when the
    target has no wheel of it or the CPython is newer than the build (capture then writes gzip).
    Empty from source and for a target with its full wheel set."""
    state = boot_state()
    return [dict(item) for item in state.get("degraded", [])] if state else []


def is_degraded(component: str) -> bool:
    return any(item["component"] == component for item in degraded())


def interpreter_choice() -> Dict[str, Any]:
    """Which interpreter runs, who chose it (the pyz's shell preamble or the command line), why, what
    else was considered, and how the run is isolated (-I -S, re-executed, or help in the first process)."""
    state = boot_state()
    if state and state.get("interpreter"):
        return dict(state["interpreter"])
    return {"executable": sys.executable, "version": sys.version.split()[0], "implementation": sys.implementation.name,
            "chosen_by": "source", "why": "running from source or a virtualenv", "considered": [],
            "reexecuted": False, "isolated": bool(sys.flags.isolated and sys.flags.no_site), "isolation": None}


def timezone() -> Dict[str, Any]:
    """The host's TZ (None: unset) and the TZ this run uses: UTC0 is set when the host has none, so that
    no zone file (e.g. a FIFO planted as /etc/localtime) is read."""
    state = boot_state()
    if state and state.get("timezone"):
        return dict(state["timezone"])
    return {"host_TZ": os.environ.get("TZ"), "TZ": os.environ.get("TZ"), "set_by_bookgen_kit": False}
