"""`capture`, `verify`, `extract` and `custody`: the evidence bundle's life."""
from __future__ import annotations

import re
import sys

import click

from toolkit import runtime
from toolkit.cli.common import deployment_options
from toolkit.cli.output import current_output, json_option
from toolkit.cli.prompts import passphrase_source
from toolkit.errors import PartialFailure, UsageError, VerificationFailed

_SIZE = re.compile(r"^(\d+)([KMGT]?)(i?B)?$", re.IGNORECASE)


def parse_size(text: str) -> int:
    match = _SIZE.match(text.strip())
    if not match:
        raise UsageError("not a size: %r (e.g. 500M, 2G)" % text)
    return int(match.group(1)) * 1024 ** " KMGT".index((match.group(2) or " ").upper())


def parse_budgets(items) -> dict:
    budgets = {}
    for item in items:
        name, _, seconds = item.partition("=")
        try:
            value = float(seconds)
        except ValueError:
            value = -1.0
        if not name or value <= 0:
            raise UsageError("--budget wants COLLECTOR=SECONDS with a positive number, e.g. timeline=120")
        budgets[name.strip()] = value
    return budgets


def _recipients(recipients, recipient_files, use_passphrase, passphrase_file, no_encrypt):
    if no_encrypt:  # before importing the crypto: an interpreter newer than the build may lack it
        if recipients or recipient_files or use_passphrase:
            raise UsageError("--no-encrypt cannot be combined with recipients or a passphrase")
        return [], []
    from toolkit.crypto import age
    from toolkit.crypto.files import load_recipients

    if use_passphrase or passphrase_file:
        if recipients or recipient_files:
            raise UsageError("a passphrase cannot be combined with recipients (age forbids mixing scrypt)")
        return [age.ScryptRecipient(passphrase_source(passphrase_file, confirm=True)("Passphrase: "))], ["passphrase"]
    texts = list(recipients)
    chosen = load_recipients(recipients, recipient_files) if (recipients or recipient_files) else []
    if not chosen and runtime.baked_recipients():
        texts = runtime.baked_recipients()
        chosen = load_recipients(texts, [])
    names = [str(r) for r in chosen]
    return chosen, names


def _identities(identity_files, passphrase_file):
    from toolkit.crypto.files import LazyScryptIdentity, load_identities

    ask = passphrase_source(passphrase_file)
    chosen = load_identities(identity_files, ask)
    chosen.append(LazyScryptIdentity(ask))
    return chosen


class _Progress:
    """A rich progress line on a terminal: bytes, members, current collector."""

    def __init__(self, out) -> None:
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(TextColumn("{task.description}"), BarColumn(bar_width=None),
                                  DownloadColumn(), TextColumn("{task.fields[members]} members"),
                                  TimeElapsedColumn(), console=out.err_console, transient=True)
        self._task = self._progress.add_task("capture", total=None, members=0)
        self._members = 0

    def __enter__(self):
        self._progress.__enter__()
        return self

    def __exit__(self, *exc):
        self._progress.__exit__(*exc)

    def __call__(self, nbytes, members, collector) -> None:
        if members:
            self._members += members
        self._progress.update(self._task, advance=nbytes, members=self._members, description=collector or "capture")


@click.command("capture")
@click.option("--out", "out_dir", metavar="DIR",
              help="Where the bundle goes (the responder's medium); default: the current case's evidence/.")
@click.option("-r", "--recipient", "recipients", multiple=True, metavar="RECIPIENT", help="age1... or ssh-ed25519 key.")
@click.option("-R", "--recipients-file", "recipient_files", multiple=True, metavar="FILE")
@click.option("-p", "--passphrase", "use_passphrase", is_flag=True, help="Encrypt with a passphrase instead.")
@click.option("--passphrase-file", metavar="FILE", help="The passphrase (first line) for -p.")
@click.option("--no-encrypt", is_flag=True, help="Write the payload unencrypted (the manifest says so, loudly).")
@click.option("--profile", default="triage", show_default=True, type=click.Choice(["volatile", "triage", "full"]))
@click.option("--include", "includes", multiple=True, metavar="PATH", help="Also collect this path (recursively).")
@click.option("--only", multiple=True, metavar="COLLECTOR", help="Run only these collectors.")
@click.option("--skip", "skip_collectors", multiple=True, metavar="COLLECTOR", help="Do not run these collectors.")
@click.option("--case", "case_id", help="Case id (in names and the manifest; default: the open case's, else "
                                        "\"case\").")
@click.option("--evidence-id", help="Evidence item id (default: the bundle's name).")
@click.option("--examiner", help="Who collects (default: the login name).")
@click.option("--purpose", help="Why this is collected.")
@click.option("--authority", help="Under whose authority.")
@click.option("--sign-key", metavar="SSHKEY", help="Sign the manifest and the custody entry with this OpenSSH key.")
@click.option("--sign-passphrase-file", metavar="FILE", help="Passphrase of an encrypted --sign-key.")
@click.option("--compression", default="auto", show_default=True, type=click.Choice(["auto", "zstd", "gzip", "none"]),
              help="auto: zstd, or gzip (recorded) on an interpreter where zstd does not load.")
@click.option("--max-file-size", default="2G", show_default=True, help="Larger files are truncated (recorded).")
@click.option("--root", default="/", show_default=True, help="Treat DIR as the filesystem root (an image, a test).")
@click.option("--allow-same-disk", is_flag=True, help="Allow writing onto the filesystem being collected from.")
@click.option("--docker-root", default="/var/lib/docker", show_default=True,
              help="Docker's data root, read directly when the daemon does not answer.")
@click.option("--expected-port", "expected_ports", multiple=True, type=int,
              help="A port expected to listen (default: 8000 5432 6379 22 80 443); repeatable.")
@click.option("--force", is_flag=True, help="Go on although the space preflight says it may not fit.")
@click.option("--budget", "budgets", multiple=True, metavar="COLLECTOR=SECONDS",
              help="A collector's time budget (the writer's time included); over it, the collector is abandoned "
                   "and what it produced is kept. Repeatable.")
@click.option("--deadline", "deadline", type=float, metavar="SECONDS",
              help="The whole capture ends by then (default: volatile 600, triage 1800, full 21600); collectors "
                   "not reached are recorded as not run.")
@click.option("--memory", is_flag=True,
              help="Image the whole physical memory first (LiME, in the encrypted bundle); `full` does anyway.")
@click.option("--process-memory", "process_memory", multiple=True, type=int, metavar="PID",
              help="Also dump this process's memory as an ELF core (the findings' processes are dumped anyway).")
@click.option("--freeze", is_flag=True, help="SIGSTOP each process for the duration of its dump, then SIGCONT.")
@click.option("--process-memory-limit", default="1G", show_default=True, metavar="SIZE",
              help="At most this much memory in one process's core (the rest is listed as left out).")
@click.option("--process-memory-total", default="4G", show_default=True, metavar="SIZE",
              help="At most this much in all process cores together.")
@deployment_options
@json_option
def capture_command(out_dir, recipients, recipient_files, use_passphrase, passphrase_file, no_encrypt, profile,
                    includes, only, skip_collectors, case_id, evidence_id, examiner, purpose, authority, sign_key,
                    sign_passphrase_file, compression, max_file_size, root, allow_same_disk, docker_root,
                    expected_ports, force, budgets, deadline, memory, process_memory, freeze, process_memory_limit,
                    process_memory_total, deployment) -> None:
    """Collect evidence into one encrypted, hashed bundle with a manifest and a custody log."""
    from toolkit.evidence.capture import CaptureOptions, capture, redacted_command_line

    import os

    from toolkit.case.journal import current_case, load_case

    out = current_output()
    case = current_case(out.case_dir)
    if case is not None:
        opened = load_case(case)
        if case_id and case_id != opened["id"]:
            raise UsageError("--case %s is not the open case %s" % (case_id, opened["id"]),
                             hint="leave --case out under an open case, or give --case-dir of that case")
        case_id = opened["id"]
        examiner = examiner or opened.get("examiner")
    if not out_dir:
        if case is None:
            raise UsageError("give --out DIR (the responder's medium), or open a case first")
        out_dir = os.path.join(case, "evidence")
    case_id = case_id or "case"
    chosen, names = _recipients(recipients, recipient_files, use_passphrase, passphrase_file, no_encrypt)
    if not chosen and not no_encrypt:
        raise UsageError("no recipients: capture refuses to write plaintext evidence",
                         hint="give -r/-R/-p, build the pyz with --recipient, or --no-encrypt explicitly")
    signer = None
    if sign_key:
        from toolkit.crypto.files import load_signing_key

        signer = load_signing_key(sign_key, passphrase_source(sign_passphrase_file))
    options = CaptureOptions(out_dir=out_dir, recipients=chosen, recipient_names=names, encrypt=not no_encrypt,
                             profile=profile, includes=list(includes), only=list(only), skip=list(skip_collectors),
                             case_id=case_id, evidence_id=evidence_id, examiner=examiner, purpose=purpose,
                             authority=authority, sign_key=signer, compression=compression,
                             max_file_size=parse_size(max_file_size), root=root, allow_same_disk=allow_same_disk,
                             force=force, command_line=redacted_command_line(sys.argv), docker_root=docker_root)
    if expected_ports:
        options.expected_ports = list(expected_ports)
    if any(pid <= 0 for pid in process_memory):
        raise UsageError("--process-memory takes a process id (a positive number)")
    options.memory, options.process_memory, options.freeze = memory, list(process_memory), freeze
    options.process_memory_limit = parse_size(process_memory_limit)
    options.process_memory_total = parse_size(process_memory_total)
    if min(options.process_memory_limit, options.process_memory_total) < 1 << 20:
        raise UsageError("--process-memory-limit and --process-memory-total must be at least 1M")
    options.budgets = parse_budgets(budgets)
    if deadline is not None:
        if deadline <= 0:
            raise UsageError("--deadline must be a positive number of seconds")
        options.deadline_seconds = deadline
    if out.interactive:
        with _Progress(out) as progress:
            result = capture(options, deployment, progress)
    else:
        result = capture(options, deployment)
    errors = [e for e in result.errors if e["kind"] == "error"]
    out.remember({"payload": result.payload, "manifest": result.manifest, "custody": result.custody,
                       "sums": result.sums, "signature": result.signature, "payload_size": result.payload_size,
                       "payload_sha256": result.payload_sha256, "members": result.members,
                       "artifacts": result.artifacts, "errors": result.errors, "collectors": result.collectors,
                       "seconds": result.seconds, "encrypted": result.encrypted, "findings": result.findings,
                       "degraded": result.degraded, "timeline": result.timeline})
    if out.json:
        out.emit_json(out.document)
    else:
        _render_capture(out, result)
    if errors:
        raise PartialFailure("captured, but %d sources could not be read (listed in the manifest's errors)"
                             % len(errors))


def _render_capture(out, result) -> None:
    from rich.markup import escape
    from rich.table import Table

    console = out.console
    if not result.encrypted:
        console.print("[bold red]WARNING: the payload is NOT encrypted[/bold red]")
    for line in result.degraded:
        console.print("[yellow]degraded[/yellow] %s" % escape(line), soft_wrap=True)  # one line, grep-able
    table = Table(show_header=False, title="evidence bundle", title_justify="left")
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    table.add_row("payload", result.payload)
    table.add_row("size", "%d bytes" % result.payload_size)
    table.add_row("sha256", result.payload_sha256)
    table.add_row("members", "%d (%d artifacts)" % (result.members, result.artifacts))
    table.add_row("manifest", result.manifest)
    table.add_row("custody", result.custody)
    if result.signature:
        table.add_row("signature", result.signature)
    table.add_row("errors", str(len([e for e in result.errors if e["kind"] == "error"])))
    quiet = [e for e in result.errors if e["kind"] != "error"]
    if quiet:
        table.add_row("noted", "%d left out on purpose or limited by the host (the manifest's errors list "
                               "each, with kind skip or limited)" % len(quiet))
    table.add_row("time", "%.1f s" % result.seconds)
    console.print(table)
    for error in result.errors:
        if error["kind"] == "error":
            console.print("[yellow]not collected[/yellow] %s: %s" % (escape(str(error["source"])),
                                                                    escape(str(error["reason"]))))
    if result.findings:
        findings = Table(title="findings", title_justify="left")
        for column in ("severity", "finding", "evidence"):
            findings.add_column(column)
        for finding in result.findings:
            findings.add_row(finding["severity"], escape(finding["title"]), escape(", ".join(finding["evidence"])))
        console.print(findings)


@click.command("verify")
@click.argument("bundle")
@click.option("-i", "--identity", "identity_files", multiple=True, metavar="FILE",
              help="With a key, every member and the manifest inside the payload are checked against the detached "
                   "manifest.")
@click.option("--passphrase-file", metavar="FILE", help="For a passphrase-encrypted bundle.")
@click.option("--allowed-signers", metavar="FILE",
              help="OpenSSH allowed_signers: the manifest must then be signed by an allowed principal, and every "
                   "custody entry by a key allowed for its actor.")
@click.option("--custody-head", metavar="SHA256",
              help="The custody chain head recorded at the last transfer: the chain must end there.")
@json_option
def verify_command(bundle, identity_files, passphrase_file, allowed_signers, custody_head) -> None:
    """Verify a bundle: hashes, signature and custody without a key; every member with one. Exit 5 on a mismatch.

    Every failure is reported, not just the first; the notes say what was NOT proven."""
    from toolkit.evidence.verify import verify_bundle

    identities = _identities(identity_files, passphrase_file) if (identity_files or passphrase_file) else []
    report = verify_bundle(bundle, identities, allowed_signers, custody_head)
    out = current_output()
    out.remember({"bundle": report.bundle, "ok": report.ok, "complete": report.complete, "schema": report.schema,
                  "members_checked": report.members_checked, "intact_members": report.intact_members,
                  "content_checked": report.content_checked, "authorship_checked": report.authorship_checked,
                  "custody_head": report.custody_head, "notes": report.notes,
                  "checks": [c.__dict__ for c in report.checks]})
    if out.json:
        out.emit_json(out.document)
    else:
        from rich.markup import escape

        for check in report.checks:
            out.console.print("%s %-24s %s" % ("[green]ok  [/green]" if check.ok else "[red]FAIL[/red]",
                                               escape(check.name), escape(check.detail)))
        for note in report.notes:
            out.console.print("[yellow]note[/yellow] %s" % escape(note))
    if not report.ok:
        failed = report.failures()
        if not failed:
            raise VerificationFailed("incomplete bundle")
        raise VerificationFailed("%d check%s failed: %s" % (len(failed), "" if len(failed) == 1 else "s",
                                                            "; ".join("%s: %s" % (c.name, c.detail)
                                                                      for c in failed)))


@click.command("extract")
@click.argument("bundle")
@click.option("-i", "--identity", "identity_files", multiple=True, metavar="FILE")
@click.option("--passphrase-file", metavar="FILE", help="For a passphrase-encrypted bundle.")
@click.option("--to", "target", required=True, metavar="DIR", help="A new or empty directory.")
@click.option("--max-bytes", default="64G", show_default=True, metavar="SIZE",
              help="Stop (keeping nothing) when the bundle needs more than this in total (sparse files count "
                   "their full size).")
@click.option("--max-member-bytes", default="16G", show_default=True, metavar="SIZE",
              help="Refuse (skip, recorded) a member larger than this, sparse or not.")
@json_option
def extract_command(bundle, identity_files, passphrase_file, target, max_bytes, max_member_bytes) -> None:
    """Extract a bundle, verifying every member; refuses unsafe members, never overwrites."""
    from toolkit.evidence.extract import extract_bundle

    limits = {"max_bytes": parse_size(max_bytes), "max_member_bytes": parse_size(max_member_bytes)}
    if not all(limits.values()):
        raise UsageError("--max-bytes and --max-member-bytes must be more than 0")
    report = extract_bundle(bundle, _identities(identity_files, passphrase_file), target, **limits)
    out = current_output()
    out.remember(report.__dict__)
    if out.json:
        out.emit_json(out.document)
    else:
        from rich.markup import escape

        out.console.print("extracted %d of %d members into %s" % (len(report.extracted), report.members,
                                                                  escape(report.target)))
        if report.rebased:
            out.console.print("%d absolute links of the host's tree made relative to it (fs/$rootfs$), as a "
                              "chroot sees them: `rebased` in --json" % len(report.rebased))
        if report.recorded:
            out.console.print("%d other absolute links recorded, not created (they would point out of the target; "
                              "`recorded` in --json)" % len(report.recorded))
        for item in report.refused:  # member names come from the bundle: never markup
            out.console.print("[yellow]refused[/yellow] %s: %s" % (escape(item["member"]), escape(item["reason"])))
    if report.refused:
        raise PartialFailure("%d members were refused (listed above)" % len(report.refused))


@click.group("custody")
def custody_group() -> None:
    """The bundle's chain-of-custody log (hash-chained JSON lines, anchored in the payload and manifest).

    Record the chain head that `custody add` and `custody show` print after every transfer; `custody verify
    --head` then detects a chain cut short or extended."""


@custody_group.command("add")
@click.argument("bundle")
@click.option("--action", required=True, type=click.Choice(["received", "transferred", "verified", "extracted"]))
@click.option("--actor", required=True)
@click.option("--location", default="")
@click.option("--purpose", default="")
@click.option("--sign-key", metavar="SSHKEY", help="Sign the entry (and so the chain up to it) with this key.")
@click.option("--sign-passphrase-file", metavar="FILE")
@json_option
def custody_add(bundle, action, actor, location, purpose, sign_key, sign_passphrase_file) -> None:
    """Append an entry recording the payload and manifest sha256 this actor sees now; prints the new head."""
    import os

    from toolkit.errors import BadInputError
    from toolkit.evidence import custody
    from toolkit.evidence.bundle import load_manifest, locate
    from toolkit.host.hashing import sha256_path as sha256_file

    paths = locate(bundle)
    if not os.path.exists(paths.payload):
        raise VerificationFailed("no complete payload at %s" % paths.payload)
    if not os.path.exists(paths.custody):
        raise BadInputError("no custody log at %s: the chain begins at capture and cannot be started later"
                            % paths.custody)
    manifest = load_manifest(paths)
    schema = manifest.get("schema") if isinstance(manifest, dict) else None
    schema = schema if isinstance(schema, str) else ""
    signer = None
    if sign_key:
        from toolkit.crypto.files import load_signing_key

        signer = load_signing_key(sign_key, passphrase_source(sign_passphrase_file))
    entry = custody.append(paths.custody, {"action": action, "actor": actor, "location": location,
                                           "purpose": purpose, "payload_sha256": sha256_file(paths.payload),
                                           "manifest_sha256": sha256_file(paths.manifest)},
                           signer=signer, schema=schema)
    head = custody.chain_head(paths.custody)
    out = current_output()
    out.remember(dict(entry, head=head, custody=paths.custody))
    if out.json:
        out.emit_json(out.document)
    else:
        click.echo("custody entry %d (%s by %s%s) added to %s" % (entry["seq"], action, actor,
                                                                  ", signed" if signer else "", paths.custody))
        click.echo("chain head: %s" % head)
        click.echo("record it: a chain cut short or extended no longer ends at it "
                   "(custody verify --head %s)" % head)


@custody_group.command("show")
@click.argument("bundle")
@json_option
def custody_show(bundle) -> None:
    """Print the custody log and its head (the sha256 of the last entry's line)."""
    from toolkit.evidence import custody
    from toolkit.evidence.bundle import locate

    path = locate(bundle).custody
    entries = custody.read_log(path)
    head = custody.chain_head(path)
    out = current_output()
    out.remember({"entries": entries, "head": head})
    if out.json:
        out.emit_json(out.document)
        return
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="custody", title_justify="left")
    for column in ("seq", "time", "action", "actor", "location", "payload sha256", "signed"):
        table.add_column(column)
    for e in entries:
        table.add_row(escape(str(e.get("seq"))), escape(str(e.get("time"))), escape(str(e.get("action"))),
                      escape(str(e.get("actor"))), escape(str(e.get("location", ""))),
                      escape(str(e.get("payload_sha256", ""))[:16]) + "…", escape(str(e.get("signer", "no"))))
    out.console.print(table)
    out.console.print("chain head: %s (not verified here: use custody verify)" % head)


@custody_group.command("verify")
@click.argument("bundle")
@click.option("--allowed-signers", metavar="FILE",
              help="Every entry must then be signed by a key allowed for its actor (namespace bookgen-kit).")
@click.option("--head", metavar="SHA256", help="The chain head recorded at the last transfer: the chain must end there.")
@json_option
def custody_verify(bundle, allowed_signers, head) -> None:
    """Check the chain: its anchor in this payload and manifest, every link, that every entry saw the payload and
    manifest there now, signatures; with --head, that it ends where recorded. Every problem is reported."""
    import os

    from toolkit.errors import BadInputError
    from toolkit.evidence import custody
    from toolkit.evidence.bundle import load_manifest, locate
    from toolkit.host.hashing import sha256_path as sha256_file

    paths = locate(bundle)
    if head is not None:
        head = custody.normalize_head(head)
    allowed = None
    if allowed_signers:
        try:
            with open(allowed_signers, encoding="utf-8") as handle:
                allowed = handle.read()
        except OSError as error:
            raise BadInputError("cannot read allowed signers %s: %s" % (allowed_signers, error.strerror)) from None
    manifest = load_manifest(paths)
    schema = manifest.get("schema") if isinstance(manifest, dict) else None
    schema = schema if isinstance(schema, str) else ""
    notes = []
    if os.path.exists(paths.payload):
        payload_sha256 = sha256_file(paths.payload)
    else:
        payload = manifest.get("payload") if isinstance(manifest, dict) else None
        payload_sha256 = payload.get("sha256") if isinstance(payload, dict) else None
        notes.append("the payload is not here: entries checked against the sha256 the manifest records")
    if not os.path.exists(paths.custody):
        raise BadInputError("no custody log at %s" % paths.custody)
    chain = custody.check_chain(paths.custody, payload_sha256, sha256_file(paths.manifest), schema, allowed, head,
                                discover=False)
    notes += chain.notes
    if allowed is None:
        notes.append("authorship UNPROVEN: signatures were checked only against the keys they carry "
                     "(give --allowed-signers)")
    if head is None:
        notes.append("truncation not checked: give --head with the head recorded at the last transfer")
    out = current_output()
    out.remember({"ok": chain.ok, "entries": len(chain.entries), "signed_entries": chain.signed_entries,
                  "head": chain.head, "schema": schema, "notes": notes,
                  "problems": [p.__dict__ for p in chain.problems]})
    if out.json:
        out.emit_json(out.document)
    else:
        for problem in chain.problems:
            click.echo("FAIL %s: %s" % (problem.name, problem.detail))
        if chain.ok:
            click.echo("custody chain intact: %d entries (%d signed), %s, each saw this payload and manifest%s" % (
                len(chain.entries), chain.signed_entries,
                "starting from zeros (schema 1)" if chain.legacy else "anchored in this payload and manifest",
                "; ends at the recorded head" if head else ""))
        click.echo("chain head: %s" % chain.head)
        for note in notes:
            click.echo("note: %s" % note)
    if not chain.ok:
        raise VerificationFailed("custody chain: %d problem%s: %s" % (
            len(chain.problems), "" if len(chain.problems) == 1 else "s",
            "; ".join("%s: %s" % (p.name, p.detail) for p in chain.problems)))
