"""The one error hierarchy of bookgen-kit, mapped to the exit codes in DESIGN.md."""
from __future__ import annotations

from typing import Any, Dict, Optional

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

    def __init__(self, message: str, hint: Optional[str] = None, details: Optional[Dict[str, Any]] = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.details = details  # what --json adds to the error (e.g. each service's state after a failed restore)


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


def describe(error: BaseException) -> str:
    """An error in words for a person: a KitError's message, an OSError's reason and path (never the
    `[Errno 2]` form or a wrapped exception's repr)."""
    if isinstance(error, KitError):
        return error.message
    reason = getattr(error, "reason", None)  # urllib's URLError wraps the socket's own error
    if isinstance(reason, BaseException) and reason is not error:
        return describe(reason)
    if isinstance(error, OSError) and error.strerror:
        where = error.filename if isinstance(error.filename, str) else None
        return "%s%s" % (error.strerror.lower(), ": %s" % where if where else "")
    text = str(error).strip().splitlines()
    first = text[0] if text else ""
    if not first or "Errno" in first or "Error(" in first or first.startswith("("):
        return "failed (%s)" % type(error).__name__
    return first
