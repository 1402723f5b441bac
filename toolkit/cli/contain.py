"""`bookgen-kit contain apply|release`: cut the host off except the responder's SSH; pause BookGen's containers."""
from __future__ import annotations

import click

from toolkit.cli.common import deployment_options
from toolkit.cli.output import current_output, json_option


@click.group("contain")
def contain_group() -> None:
    """Isolate the host (runbook: "Block all external access") without losing the evidence."""


@contain_group.command("apply")
@click.option("--allow-ssh-from", "allow", multiple=True, required=True, metavar="CIDR",
              help="The responder's address or network: SSH from here stays open.")
@click.option("--ssh-port", default=22, show_default=True)
@click.option("--pause-containers", is_flag=True, help="docker pause BookGen's containers (memory kept).")
@click.option("--evidence-dir", metavar="DIR", help="Where the capture went (a warning when there is none).")
@deployment_options
@json_option
def apply_command(allow, ssh_port, pause_containers, evidence_dir, deployment) -> None:
    """Drop every packet in, out and through, but loopback, established flows and SSH from --allow-ssh-from."""
    from toolkit.hardening.contain import contain

    result = contain(list(allow), pause_containers, deployment.compose_project, evidence_dir, ssh_port)
    out = current_output()
    out.remember(result)
    if out.json:
        out.emit_json(out.document)
        return
    for warning in result["warnings"]:
        out.console.print("[yellow]warning[/yellow] %s" % warning)
    click.echo("contained since %s: SSH only from %s; paused: %s" % (result["since"], ", ".join(result["allow_ssh_from"]),
                                                                     ", ".join(result["paused"]) or "nothing"))


@contain_group.command("release")
@json_option
def release_command() -> None:
    """Undo containment: unpause what was paused, delete our nftables table."""
    from toolkit.hardening.contain import release

    result = release()
    out = current_output()
    out.remember(result)
    if out.json:
        out.emit_json(out.document)
    else:
        click.echo("released; unpaused: %s" % (", ".join(result["unpaused"]) or "nothing"))
