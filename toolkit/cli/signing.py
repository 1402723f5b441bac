"""`bookgen-kit sign` and `verify-signature`: OpenSSH SSHSIG signatures (ssh-keygen -Y compatible)."""
from __future__ import annotations

import click

from toolkit.cli.output import current_output, json_option
from toolkit.cli.prompts import passphrase_source
from toolkit.crypto.sshsig import DEFAULT_NAMESPACE


@click.command("sign")
@click.option("-k", "--key", "key_path", required=True, metavar="SSH_KEY", help="OpenSSH private key.")
@click.option("-n", "--namespace", default=DEFAULT_NAMESPACE, show_default=True)
@click.option("-o", "--output", metavar="SIG", help="Signature file (default FILE.sig).")
@click.option("--passphrase-file", metavar="FILE", help="Passphrase of an encrypted key (first line).")
@click.option("--force", is_flag=True, help="Replace an existing signature file.")
@click.argument("path", metavar="FILE")
@json_option
def sign_command(key_path, namespace, output, passphrase_file, force, path) -> None:
    """Write a detached SSHSIG signature of FILE (verify with `ssh-keygen -Y verify`)."""
    from toolkit.crypto.files import load_signing_key, sign_file

    key = load_signing_key(key_path, passphrase_source(passphrase_file))
    written = sign_file(key, path, output, namespace, force)
    out = current_output()
    document = {"file": path, "signature": written, "key": key.public.fingerprint(), "namespace": namespace}
    out.remember(document)
    if out.json:
        out.emit_json(out.document)
    elif not out.quiet:
        click.echo("signed %s with %s -> %s" % (path, document["key"], written))


@click.command("verify-signature")
@click.option("--allowed-signers", required=True, metavar="FILE", help="OpenSSH allowed_signers file.")
@click.option("-I", "--identity", required=True, metavar="PRINCIPAL", help="Who must have signed.")
@click.option("-n", "--namespace", default=DEFAULT_NAMESPACE, show_default=True)
@click.option("-s", "--signature", metavar="SIG", help="Signature file (default FILE.sig).")
@click.argument("path", metavar="FILE")
@json_option
def verify_signature_command(allowed_signers, identity, namespace, signature, path) -> None:
    """Check FILE's SSHSIG signature as `ssh-keygen -Y verify` does; exit 5 when it does not hold."""
    from toolkit.crypto.files import verify_file

    verified = verify_file(path, signature, allowed_signers, identity, namespace)
    out = current_output()
    document = {"file": path, "ok": True, "principal": verified.principal, "key": verified.key_fingerprint,
                "namespace": verified.namespace, "allowed_signers_line": verified.allowed_signers_line}
    out.remember(document)
    if out.json:
        out.emit_json(out.document)
    elif not out.quiet:
        click.echo('Good "%s" signature for %s with key %s' % (namespace, identity, verified.key_fingerprint))
