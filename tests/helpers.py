"""Small helpers shared by tests: a terminal for programs that only read passphrases from /dev/tty."""
from __future__ import annotations

import os
import pty
import select
import time
from typing import List, Tuple


def run_with_tty(argv: List[str], answers: List[Tuple[str, str]], timeout: float = 120) -> Tuple[int, str]:
    """Run argv on a new pseudo-terminal; each time the next prompt text appears, type its answer."""
    pid, fd = pty.fork()
    if pid == 0:  # child
        try:
            os.execvp(argv[0], argv)
        finally:
            os._exit(127)
    output = b""
    searched_from = 0
    pending = list(answers)
    deadline = time.monotonic() + timeout
    closed = False
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready and not closed:
            try:
                data = os.read(fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                data = b""
            if not data:
                closed = True
            output += data
        while pending:
            at = output.find(pending[0][0].encode(), searched_from)
            if at < 0:
                break
            searched_from = at + len(pending[0][0])
            os.write(fd, pending[0][1].encode() + b"\n")
            pending.pop(0)
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            try:
                while True:
                    ready, _, _ = select.select([fd], [], [], 0.1)
                    if not ready:
                        break
                    data = os.read(fd, 4096)
                    if not data:
                        break
                    output += data
            except OSError:
                pass
            os.close(fd)
            return os.waitstatus_to_exitcode(status), output.decode("utf-8", "replace")
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    os.close(fd)
    raise TimeoutError("%s did not finish; output so far: %r" % (argv[0], output[-500:]))
