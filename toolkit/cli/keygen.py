"""`bookgen-kit keygen`: a new age identity, or the recipients of an identity file."""
from __future__ import annotations


import click

from toolkit import utc
from toolkit.cli.output import current_output, json_option
from toolkit.errors import UsageError


@click.command("keygen")
@click.option("-o", "--output", "output", metavar="FILE", help="Write a new identity here (0600; never overwritten).")
@click.option("-y", "identity_file", metavar="FILE", help="Print the recipients of this identity file.")
@click.option("--pq", "post_quantum", is_flag=True,
              help="A post-quantum identity (ML-KEM-768 + X25519: age1pq1..., as age-keygen -pq).")
@json_option
def keygen_command(output, identity_file, post_quantum) -> None:
    """Make a new age identity (written 0600 to -o FILE) and print its recipient; -y FILE prints the recipients
    of an existing identity file. The secret key is never printed."""
    from toolkit.crypto import age
    from toolkit.crypto.files import load_identities, write_new_identity

    out = current_output()
    if output and identity_file:
        raise UsageError("-o and -y do not go together")
    if post_quantum and identity_file:
        raise UsageError("--pq makes a new identity: it does not go with -y (which reads both kinds)")
    if identity_file:
        recipients = age.recipients_of(load_identities([identity_file], None))
        out.remember({"read_identity": identity_file, "recipients": recipients})  # an input, not an output
        if out.json:
            out.emit_json(out.document)
        else:
            for recipient in recipients:
                click.echo(recipient)
        return
    if not output:
        raise UsageError("keygen writes the secret key only to a file", hint="give -o FILE")
    identity = write_new_identity(output, utc.iso(), post_quantum)
    recipient = str(identity.recipient())
    out.remember({"identity_file": output, "recipient": recipient, "post_quantum": post_quantum})
    if out.json:
        out.emit_json(out.document)
        return
    if not out.quiet:
        click.echo("identity written to %s (mode 0600)" % output, err=True)
    click.echo(recipient)
