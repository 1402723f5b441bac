"""A detached process of the kit's own code: it outlives the kit (its own session, no terminal, no pipes), for
work that must finish even when the kit is killed (a dead-man switch, a data directory swap).

Invariant: the child runs the same code as the parent (from the pyz through its bootstrap, else from the source
tree and the parent's own path, where its dependencies are), with -I -S: no environment, no site directory.
A lock the parent holds can be handed over (pass_fds): the child then holds it for as long as it lives.
"""
from __future__ import annotations

import os
import subprocess
import sys


def spawn(call: str, pass_fds: tuple = ()) -> subprocess.Popen:
    """Run `call` (Python statements, e.g. "from toolkit.x import f; f(1)") in a detached interpreter."""
    boot = sys.modules.get("_bkboot")
    if boot is not None:  # from the pyz: its bootstrap sets up the bundled code again
        prefix = "import sys; sys.path.insert(0, %r); import _bkboot; _bkboot.setup(); " % boot.STATE["archive"]
    else:  # from a source tree: this interpreter's path (the tree, and where its dependencies are installed)
        import toolkit

        path = [os.path.dirname(os.path.dirname(toolkit.__file__))] + [p for p in sys.path if p]
        prefix = "import sys; sys.path[:0] = %r; " % path
    return subprocess.Popen([sys.executable, "-I", "-S", "-c", prefix + call], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            pass_fds=pass_fds)
