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


def _recipients(recipients, recipient_files, use_passphrase, passphrase_file, no_encrypt):
    from toolkit.crypto import age
    from toolkit.crypto.files import load_recipients

    if no_encrypt:
        if recipients or recipient_files or use_passphrase:
            raise UsageError("--no-encrypt cannot be combined with recipients or a passphrase")
        return [], []
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
@click.option("--case", "case_id", default="case", show_default=True, help="Case id (in names and the manifest).")
@click.option("--evidence-id", help="Evidence item id (default: the bundle's name).")
@click.option("--examiner", help="Who collects (default: the login name).")
@click.option("--purpose", help="Why this is collected.")
@click.option("--authority", help="Under whose authority.")
@click.option("--sign-key", metavar="SSHKEY", help="Sign the manifest and the custody entry with this OpenSSH key.")
@click.option("--sign-passphrase-file", metavar="FILE", help="Passphrase of an encrypted --sign-key.")
@click.option("--compression", default="zstd", show_default=True, type=click.Choice(["zstd", "gzip", "none"]))
@click.option("--max-file-size", default="2G", show_default=True, help="Larger files are truncated (recorded).")
@click.option("--root", default="/", show_default=True, help="Treat DIR as the filesystem root (an image, a test).")
@click.option("--allow-same-disk", is_flag=True, help="Allow writing onto the filesystem being collected from.")
@click.option("--docker-root", default="/var/lib/docker", show_default=True,
              help="Docker's data root, read directly when the daemon does not answer.")
@click.option("--expected-port", "expected_ports", multiple=True, type=int,
              help="A port expected to listen (default: 8000 5432 6379 22 80 443); repeatable.")
@click.option("--force", is_flag=True, help="Go on although the space preflight says it may not fit.")
@deployment_options
@json_option
def capture_command(out_dir, recipients, recipient_files, use_passphrase, passphrase_file, no_encrypt, profile,
                    includes, only, skip_collectors, case_id, evidence_id, examiner, purpose, authority, sign_key,
                    sign_passphrase_file, compression, max_file_size, root, allow_same_disk, docker_root,
                    expected_ports, force, deployment) -> None:
    """Collect evidence into one encrypted, hashed bundle with a manifest and a custody log."""
    from toolkit.evidence.capture import CaptureOptions, capture, redacted_command_line

    out = current_output()
    if not out_dir:
        from toolkit.case.journal import current_case

        case = current_case(out.case_dir)
        if case is None:
            raise UsageError("give --out DIR (the responder's medium), or open a case first")
        import os

        out_dir = os.path.join(case, "evidence")
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
                       "seconds": result.seconds, "encrypted": result.encrypted, "findings": result.findings})
    if out.json:
        out.emit_json(out.document)
    else:
        _render_capture(out, result)
    if errors:
        raise PartialFailure("captured, but %d sources could not be read (listed in the manifest's errors)"
                             % len(errors))


def _render_capture(out, result) -> None:
    from rich.table import Table

    console = out.console
    if not result.encrypted:
        console.print("[bold red]WARNING: the payload is NOT encrypted[/bold red]")
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
    table.add_row("time", "%.1f s" % result.seconds)
    console.print(table)
    for error in result.errors:
        if error["kind"] == "error":
            console.print("[yellow]not collected[/yellow] %s: %s" % (error["source"], error["reason"]))
    if result.findings:
        findings = Table(title="findings", title_justify="left")
        for column in ("severity", "finding", "evidence"):
            findings.add_column(column)
        for finding in result.findings:
            findings.add_row(finding["severity"], finding["title"], ", ".join(finding["evidence"]))
        console.print(findings)


@click.command("verify")
@click.argument("bundle")
@click.option("-i", "--identity", "identity_files", multiple=True, metavar="FILE",
              help="With a key, every member is checked against the manifest.")
@click.option("--passphrase-file", metavar="FILE", help="For a passphrase-encrypted bundle.")
@click.option("--allowed-signers", metavar="FILE", help="OpenSSH allowed_signers for the signature and custody.")
@json_option
def verify_command(bundle, identity_files, passphrase_file, allowed_signers) -> None:
    """Verify a bundle: hashes, signature and custody without a key; every member with one. Exit 5 on a mismatch."""
    from toolkit.evidence.verify import verify_bundle

    identities = _identities(identity_files, passphrase_file) if (identity_files or passphrase_file) else []
    report = verify_bundle(bundle, identities, allowed_signers)
    out = current_output()
    out.remember({"bundle": report.bundle, "ok": report.ok, "complete": report.complete,
                       "members_checked": report.members_checked, "intact_members": report.intact_members,
                       "checks": [c.__dict__ for c in report.checks]})
    if out.json:
        out.emit_json(out.document)
    else:
        for check in report.checks:
            out.console.print("%s %-22s %s" % ("[green]ok  [/green]" if check.ok else "[red]FAIL[/red]",
                                               check.name, check.detail))
        if not identities and report.complete:
            out.console.print("members not checked: give -i IDENTITY to decrypt and check every member")
    if not report.ok:
        failed = report.failures()
        raise VerificationFailed("%s: %s" % (failed[0].name, failed[0].detail) if failed else "incomplete bundle")


@click.command("extract")
@click.argument("bundle")
@click.option("-i", "--identity", "identity_files", multiple=True, metavar="FILE")
@click.option("--passphrase-file", metavar="FILE", help="For a passphrase-encrypted bundle.")
@click.option("--to", "target", required=True, metavar="DIR", help="A new or empty directory.")
@json_option
def extract_command(bundle, identity_files, passphrase_file, target) -> None:
    """Extract a bundle, verifying every member; refuses unsafe members, never overwrites."""
    from toolkit.evidence.extract import extract_bundle

    report = extract_bundle(bundle, _identities(identity_files, passphrase_file), target)
    out = current_output()
    out.remember(report.__dict__)
    if out.json:
        out.emit_json(out.document)
    else:
        out.console.print("extracted %d of %d members into %s" % (len(report.extracted), report.members,
                                                                  report.target))
        for item in report.refused:
            out.console.print("[yellow]refused[/yellow] %s: %s" % (item["member"], item["reason"]))
    if report.refused:
        raise PartialFailure("%d members were refused (listed above)" % len(report.refused))


@click.group("custody")
def custody_group() -> None:
    """The bundle's chain-of-custody log (hash-chained JSON lines)."""


@custody_group.command("add")
@click.argument("bundle")
@click.option("--action", required=True, type=click.Choice(["received", "transferred", "verified", "extracted"]))
@click.option("--actor", required=True)
@click.option("--location", default="")
@click.option("--purpose", default="")
@click.option("--sign-key", metavar="SSHKEY")
@click.option("--sign-passphrase-file", metavar="FILE")
@json_option
def custody_add(bundle, action, actor, location, purpose, sign_key, sign_passphrase_file) -> None:
    """Append an entry recording the payload sha256 this actor sees now."""
    import os

    from toolkit.evidence import custody
    from toolkit.evidence.bundle import locate
    from toolkit.host.hashing import sha256_path as sha256_file

    paths = locate(bundle)
    if not os.path.exists(paths.payload):
        raise VerificationFailed("no complete payload at %s" % paths.payload)
    signer = None
    if sign_key:
        from toolkit.crypto.files import load_signing_key

        signer = load_signing_key(sign_key, passphrase_source(sign_passphrase_file))
    entry = custody.append(paths.custody, {"action": action, "actor": actor, "location": location,
                                           "purpose": purpose, "payload_sha256": sha256_file(paths.payload),
                                           "manifest_sha256": sha256_file(paths.manifest)}, signer=signer)
    out = current_output()
    out.remember(entry)
    if out.json:
        out.emit_json(out.document)
    else:
        click.echo("custody entry %d (%s by %s) added to %s" % (entry["seq"], action, actor, paths.custody))


@custody_group.command("show")
@click.argument("bundle")
@json_option
def custody_show(bundle) -> None:
    """Print the custody log."""
    from toolkit.evidence import custody
    from toolkit.evidence.bundle import locate

    entries = custody.read_log(locate(bundle).custody)
    out = current_output()
    out.remember({"entries": entries})
    if out.json:
        out.emit_json(out.document)
        return
    from rich.table import Table

    table = Table(title="custody", title_justify="left")
    for column in ("seq", "time", "action", "actor", "location", "payload sha256", "signed"):
        table.add_column(column)
    for e in entries:
        table.add_row(str(e["seq"]), e["time"], e["action"], e["actor"], e.get("location", ""),
                      e["payload_sha256"][:16] + "…", e.get("signer", "no"))
    out.console.print(table)


@custody_group.command("verify")
@click.argument("bundle")
@click.option("--allowed-signers", metavar="FILE")
@json_option
def custody_verify(bundle, allowed_signers) -> None:
    """Check the chain, and that every entry saw the payload that is there now."""
    from toolkit.evidence import custody
    from toolkit.evidence.bundle import load_manifest, locate

    paths = locate(bundle)
    allowed = None
    if allowed_signers:
        with open(allowed_signers, encoding="utf-8") as handle:
            allowed = handle.read()
    entries = custody.verify_chain(paths.custody, load_manifest(paths)["payload"]["sha256"], allowed)
    out = current_output()
    out.remember({"ok": True, "entries": len(entries)})
    if out.json:
        out.emit_json(out.document)
    else:
        click.echo("custody chain intact: %d entries, each saw the manifest's payload" % len(entries))
