"""How commands talk to the user: rich for people, one JSON document for programs, one-line errors."""
from __future__ import annotations

import json
import os
import sys
import traceback
from typing import Any, Callable, Optional

import click

from toolkit import utc


class Output:
    """The run's output settings (global options), and the rich console built on first use."""

    def __init__(self) -> None:
        self.json = False
        self.quiet = False
        self.no_color = bool(os.environ.get("NO_COLOR"))
        self.verbose = 0
        self.emitted = False  # one JSON document per run: an error after it goes to stderr only
        self.document = None  # the command's result, also without --json (the case journal reads it)
        self.case_dir = None  # --case-dir
        self.ran = False  # a command's own code started (not --help, not a command line click refused)
        self._console = None
        self._err_console = None

    @property
    def console(self):  # rich is imported only by commands that render
        if self._console is None:
            from rich.console import Console

            self._console = Console(color_system=None if self.no_color else "auto", highlight=False, soft_wrap=False)
        return self._console

    @property
    def err_console(self):
        if self._err_console is None:
            from rich.console import Console

            self._err_console = Console(stderr=True, color_system=None if self.no_color else "auto", highlight=False)
        return self._err_console

    @property
    def interactive(self) -> bool:
        """Progress bars only on a terminal, never with --json or --quiet."""
        return not (self.json or self.quiet) and sys.stderr.isatty()

    def remember(self, document: Any) -> None:
        self.document = document

    def emit_json(self, document: Any) -> None:
        sys.stdout.write(json.dumps(document, indent=2, sort_keys=True, default=str) + "\n")
        sys.stdout.flush()
        self.emitted = True


_OUTPUT = Output()


def current_output() -> Output:
    return _OUTPUT


def json_option(function: Callable) -> Callable:
    """--json on a command, the same as the global --json (`bookgen-kit self-check --json`)."""

    def enable(_ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
        if value:
            _OUTPUT.json = True
        return value

    return click.option("--json", "json_output", is_flag=True, expose_value=False, callback=enable,
                        help="Print one JSON document on stdout.")(function)


def report_error(output: Output, kind: str, message: str, hint: Optional[str], exit_code: int,
                 error: Optional[BaseException] = None) -> None:
    if output.verbose and error is not None:
        traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
    sys.stderr.write("bookgen-kit: error: %s\n" % message)
    if hint:
        sys.stderr.write("bookgen-kit: hint: %s\n" % hint)
    if output.json and not output.emitted:
        document = {"ok": False, "error": {"kind": kind, "message": message, "hint": hint, "exit_code": exit_code}}
        details = getattr(error, "details", None)
        if details:
            document["error"]["details"] = details
        output.emit_json(document)


def _crash_log_dir() -> Optional[str]:
    """Where a traceback may go: BOOKGEN_KIT_CRASH_DIR, else beside the pyz (the responder's medium)."""
    configured = os.environ.get("BOOKGEN_KIT_CRASH_DIR")
    if configured:
        return configured
    boot = sys.modules.get("_bkboot")
    archive = getattr(boot, "STATE", {}).get("archive") if boot else None
    if archive and os.access(os.path.dirname(archive), os.W_OK):
        return os.path.dirname(archive)
    return None


def report_bug(output: Output, error: BaseException) -> None:
    from toolkit.errors import EXIT_BUG

    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    where = None
    directory = _crash_log_dir()
    if directory:
        path = os.path.join(directory, "bookgen-kit-crash-%s-%d.log" % (
            utc.stamp(), os.getpid()))
        try:
            from toolkit.errors import KitError
            from toolkit.host.atomic import state_dir

            state_dir(directory)  # beside the pyz: refuse a directory others can write (a planted link there)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w") as log:
                log.write(text)
            where = path
        except (OSError, KitError):
            where = None
    if output.verbose:
        sys.stderr.write(text)
    hint = "traceback in %s" % where if where else "run again with -v for the traceback"
    report_error(output, "bug", "internal error (%s): %s" % (type(error).__name__, error), hint, EXIT_BUG)
