"""`bookgen-kit encrypt` and `decrypt`: age files, for a responder whose medium has no age binary."""
from __future__ import annotations

import sys

import click

from toolkit import runtime
from toolkit.cli.output import current_output, json_option
from toolkit.cli.prompts import passphrase_source
from toolkit.errors import UsageError


def _report(result, verb: str) -> None:
    out = current_output()
    document = {"input": result.input, "output": result.output, "bytes_in": result.bytes_in,
                "bytes_out": result.bytes_out, "output_sha256": result.output_sha256}
    if verb == "encrypted":
        document["recipients"] = result.recipients
    out.remember(document)
    if out.json:
        if result.output == "-":
            return  # stdout carries the data itself
        out.emit_json(document)
    elif not out.quiet and result.output != "-":
        click.echo("%s %s -> %s (%d bytes, sha256 %s)" % (verb, result.input, result.output, result.bytes_out,
                                                          result.output_sha256), err=True)


@click.command("encrypt")
@click.option("-r", "--recipient", "recipients", multiple=True, metavar="RECIPIENT",
              help="age1... or an ssh-ed25519 public key (repeatable).")
@click.option("-R", "--recipients-file", "recipient_files", multiple=True, metavar="FILE",
              help="A file of recipients, one per line (repeatable).")
@click.option("-p", "--passphrase", "use_passphrase", is_flag=True, help="Encrypt with a passphrase (scrypt).")
@click.option("--passphrase-file", metavar="FILE", help="Read the passphrase from this file's first line.")
@click.option("-a", "--armor", is_flag=True, help="ASCII armor (PEM) output.")
@click.option("-o", "--output", metavar="OUT", help="Output file (written as OUT.partial, then renamed).")
@click.option("--force", is_flag=True, help="Replace an existing output file.")
@click.argument("input_path", metavar="[IN]", required=False)
@json_option
def encrypt_command(recipients, recipient_files, use_passphrase, passphrase_file, armor, output, force,
                    input_path) -> None:
    """Encrypt IN (default stdin) to age recipients or a passphrase. With no -r/-R/-p, the recipients baked
    into the pyz are used."""
    from toolkit.crypto import age
    from toolkit.crypto.files import encrypt, load_recipients

    use_passphrase = use_passphrase or bool(passphrase_file)
    if use_passphrase and (recipients or recipient_files):
        raise UsageError("a passphrase cannot be combined with recipients (age forbids mixing scrypt)")
    if use_passphrase:
        chosen = [age.ScryptRecipient(passphrase_source(passphrase_file, confirm=True)("Passphrase: "))]
    elif recipients or recipient_files:
        chosen = load_recipients(recipients, recipient_files)
    elif runtime.baked_recipients():
        chosen = load_recipients(runtime.baked_recipients(), [])
    else:
        raise UsageError("no recipients", hint="give -r RECIPIENT, -R FILE or -p")
    if output in (None, "-") and not armor and sys.stdout.isatty():
        raise UsageError("refusing to write binary ciphertext to a terminal", hint="use -o OUT or -a")
    _report(encrypt(input_path, output, chosen, armor, force), "encrypted")


@click.command("decrypt")
@click.option("-i", "--identity", "identities", multiple=True, metavar="FILE",
              help="An age identity file or an OpenSSH ed25519 private key (repeatable).")
@click.option("--passphrase-file", metavar="FILE",
              help="Passphrase for a passphrase-encrypted file or an encrypted SSH key (first line).")
@click.option("-o", "--output", metavar="OUT",
              help="Output file: written as OUT.partial and renamed only after the whole file is verified.")
@click.option("--force", is_flag=True, help="Replace an existing output file.")
@click.argument("input_path", metavar="[IN]", required=False)
@json_option
def decrypt_command(identities, passphrase_file, output, force, input_path) -> None:
    """Decrypt an age file (binary or armored) from IN (default stdin)."""
    from toolkit.crypto.files import LazyScryptIdentity, decrypt, load_identities

    ask = passphrase_source(passphrase_file)
    chosen = load_identities(identities, ask)
    chosen.append(LazyScryptIdentity(ask))
    _report(decrypt(input_path, output, chosen, force), "decrypted")
