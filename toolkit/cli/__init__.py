"""The bookgen-kit command line: a root group whose commands are imported only when invoked.

Commands only parse options, call the library and render. Every failure reaches
the user as one line on stderr (``bookgen-kit: error: ...`` and a hint) with the
exit code of its KitError class; a bug adds a traceback to a crash log.
"""
from __future__ import annotations

import sys
from typing import Dict, List, Optional, Tuple

import click

from toolkit import utc
from toolkit import __version__
from toolkit.cli.output import Output, current_output, report_bug, report_error
from toolkit.errors import EXIT_BUG, EXIT_USAGE, KitError

# name -> (module, attribute, one-line help). The help lives here so that
# `bookgen-kit --help` lists every command without importing any of them.
COMMANDS: Dict[str, Tuple[str, str, str]] = {
    "version": ("toolkit.cli.version", "version_command",
                "Show the version, build id, baked-in recipients and the targets inside the pyz."),
    "self-check": ("toolkit.cli.selfcheck", "self_check_command",
                   "Check what this run trusts: pyz, interpreter, native code, environment."),
    "keygen": ("toolkit.cli.keygen", "keygen_command",
               "Make an age identity (-o FILE, 0600) or print an identity file's recipients (-y FILE)."),
    "encrypt": ("toolkit.cli.crypt", "encrypt_command", "Encrypt a file to age recipients or a passphrase."),
    "decrypt": ("toolkit.cli.crypt", "decrypt_command", "Decrypt an age file (binary or armored)."),
    "sign": ("toolkit.cli.signing", "sign_command", "Sign a file with an OpenSSH key (SSHSIG)."),
    "verify-signature": ("toolkit.cli.signing", "verify_signature_command",
                         "Verify an SSHSIG signature against an allowed_signers file."),
    "triage": ("toolkit.cli.triage", "triage_command",
               "What is wrong right now: API, containers, host, database, disk; matching runbook incidents."),
    "jobs": ("toolkit.cli.jobs", "jobs_group", "Stuck jobs: list them (stuck) or mark them failed (reset)."),
    "cleanup": ("toolkit.cli.cleanup", "cleanup_command",
                "The runbook's disk cleanup, made safe: dry run by default, archive before delete."),
    "capture": ("toolkit.cli.evidence", "capture_command",
                "Collect evidence into one encrypted, hashed bundle with a manifest and a custody log."),
    "verify": ("toolkit.cli.evidence", "verify_command",
               "Verify a bundle: hashes, signature, custody; with a key, every member."),
    "extract": ("toolkit.cli.evidence", "extract_command", "Extract a bundle safely, verifying every member."),
    "custody": ("toolkit.cli.evidence", "custody_group", "The bundle's chain of custody: add, show, verify."),
    "backup": ("toolkit.cli.backup", "backup_group", "PostgreSQL backup sets: create, verify, list, prune, keep."),
    "restore": ("toolkit.cli.backup", "restore_command",
                "Restore a proven set into a new database, compare it, swap it in by rename."),
    "db": ("toolkit.cli.backup", "db_group", "Database check, repair, and drop-old."),
    "harden": ("toolkit.cli.harden", "harden_group",
               "Audit the host's hardening (index 0-100, evidence) and show the exact changes that fix it."),
    "contain": ("toolkit.cli.contain", "contain_group",
                "Cut the host off except the responder's SSH, and pause BookGen's containers; release undoes it."),
    "case": ("toolkit.cli.case", "case_group",
             "The incident case: a journal of every command, the runbook's checklists, the report."),
    "rotate": ("toolkit.cli.rotate", "rotate_group",
               "Rotate the .env's credentials on the live services, journaled: plan, run, resume, rollback."),
}


class LazyGroup(click.Group):
    """A group that imports a command's module only when that command runs."""

    def list_commands(self, ctx: click.Context) -> List[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> Optional[click.Command]:
        entry = COMMANDS.get(cmd_name)
        if entry is None:
            return None
        import importlib

        module_name, attribute, _ = entry
        return _marking_runs(getattr(importlib.import_module(module_name), attribute))

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def _marking_runs(command: click.Command) -> click.Command:
    """Each command's own callback notes, before it starts, that a command really ran: the journal records
    that, and not a `--help` or an option click refused while parsing (neither reaches a callback)."""
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            _marking_runs(sub)
        return command
    callback = command.callback
    if callback is None or getattr(callback, "_marks_runs", False):
        return command

    def running(*args, **kwargs):
        current_output().ran = True
        return callback(*args, **kwargs)

    running._marks_runs = True  # type: ignore[attr-defined]
    command.callback = running
    return command


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    click.echo("bookgen-kit %s" % __version__)
    ctx.exit(0)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--json", "json_output", is_flag=True, help="Print one JSON document on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="Print only results and errors.")
@click.option("--no-color", is_flag=True, help="No colour (also when NO_COLOR is set).")
@click.option("--verbose", "-v", count=True, help="More detail; tracebacks on errors.")
@click.option("--case-dir", metavar="DIR", help="The current incident case (else BOOKGEN_KIT_CASE, else the "
                                                 "pointer beside the pyz).")
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Print the version and exit.")
@click.pass_context
def cli(ctx: click.Context, json_output: bool, quiet: bool, no_color: bool, verbose: int,
        case_dir: Optional[str]) -> None:
    """bookgen-kit: offline forensics and recovery for BookGen hosts."""
    output = current_output()
    output.case_dir = case_dir
    output.json = output.json or json_output
    output.quiet = quiet
    output.no_color = output.no_color or no_color
    output.verbose = verbose
    ctx.obj = output


GLOBAL_FLAGS = {"--json", "-q", "--quiet", "--no-color", "-v", "--verbose", "-vv", "-vvv"}
GROUPS = {"backup", "jobs", "custody", "rotate", "harden", "contain", "db", "case"}
SELF_JOURNALING = {"case open", "case note", "case check", "case close"}


def command_name(args: List[str]) -> str:
    words, skip = [], False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg == "--case-dir":
            skip = True
            continue
        if arg.startswith("--case-dir=") or arg in GLOBAL_FLAGS:
            continue
        if arg.startswith("-"):
            if words:
                break
            continue
        words.append(arg)
        if len(words) == 2 or words[0] not in GROUPS:
            break
    return " ".join(words)


def _journal(args: List[str], code: int, started: float) -> None:
    """One entry in the current case's journal for this command: done here, once, for every command."""
    name = command_name(args)
    output = current_output()
    if not name or name in SELF_JOURNALING or not output.ran or code == EXIT_USAGE:
        return  # help, a refused command line, or a usage refusal: nothing was done
    try:
        from toolkit.case import journal

        directory = journal.current_case(output.case_dir)
        if directory is None or (name.startswith("case ") and journal.load_case(directory).get("closed")):
            return
        journal.append(directory, {
            "kind": "command", "command_name": name, "argv": journal.redact(["bookgen-kit"] + args),
            "started": utc.iso(started),
            "ended": utc.iso(), "exit_code": code,
            "outputs": journal.outputs_of(output.document), "changes": journal.changes_of(output.document)})
    except Exception as error:  # the journal must never change what the command did
        sys.stderr.write("bookgen-kit: warning: not recorded in the case journal: %s\n" % error)


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the console script and the zipapp; returns the exit code."""
    import time

    args = list(sys.argv[1:] if argv is None else argv)
    started = time.time()
    code = _run(args)
    _journal(args, code, started)
    return code


def _run(args: List[str]) -> int:
    output = current_output()
    output.verbose = sum(1 for a in args if a in ("-v", "--verbose") or (a.startswith("-v") and set(a[1:]) == {"v"}))
    output.json = "--json" in args
    try:
        result = cli.main(args=args, prog_name="bookgen-kit", standalone_mode=False)
    except click.exceptions.Exit as done:
        return done.exit_code
    except click.exceptions.Abort as error:
        if isinstance(error.__context__, KeyboardInterrupt):  # click turns ^C into Abort
            click.echo("bookgen-kit: interrupted", err=True)
            return 130
        click.echo("bookgen-kit: aborted", err=True)
        return EXIT_USAGE
    except click.ClickException as error:
        context = getattr(error, "ctx", None)
        command = context.command_path if context is not None else "bookgen-kit"
        report_error(output, "usage", error.format_message(), "see `%s --help`" % command, EXIT_USAGE)
        return EXIT_USAGE
    except KitError as error:
        report_error(output, type(error).__name__, error.message, error.hint, error.exit_code, error)
        return error.exit_code
    except KeyboardInterrupt:
        click.echo("bookgen-kit: interrupted", err=True)
        return 130
    except Exception as error:  # a bug: one line for the user, the traceback in a crash log
        report_bug(output, error)
        return EXIT_BUG
    return result if isinstance(result, int) else 0


__all__ = ["cli", "main", "Output", "COMMANDS"]
