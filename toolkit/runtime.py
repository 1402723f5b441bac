"""How this bookgen-kit run was started: from the zipapp or from source, and what the bootstrap did."""
from __future__ import annotations

import sys
from typing import Any, Dict, Optional

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
