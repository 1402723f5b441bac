"""The one error hierarchy of bookgen-kit, mapped to the exit codes in DESIGN.md."""
from __future__ import annotations

from typing import Optional

EXIT_OK = 0
EXIT_BUG = 1
EXIT_USAGE = 2
EXIT_BAD_INPUT = 3
EXIT_ENVIRONMENT = 4
EXIT_VERIFICATION = 5
EXIT_PARTIAL = 6


class KitError(Exception):
    """An expected failure: reported as one line (plus a hint) with a distinct exit code."""

    exit_code = EXIT_BUG

    def __init__(self, message: str, hint: Optional[str] = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class UsageError(KitError):
    exit_code = EXIT_USAGE


class BadInputError(KitError):
    """Unreadable, malformed input, or the wrong key."""

    exit_code = EXIT_BAD_INPUT


class EnvironmentProblem(KitError):
    """Permission denied, a service unreachable, no space, a missing host program."""

    exit_code = EXIT_ENVIRONMENT


class VerificationFailed(KitError):
    """A hash, a signature or a chain that does not match."""

    exit_code = EXIT_VERIFICATION


class PartialFailure(KitError):
    """The work was done, but some parts of it failed (listed in the message)."""

    exit_code = EXIT_PARTIAL
