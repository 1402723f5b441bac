"""`bookgen-kit version`: tool version, build id, recipients baked in, and the targets inside the pyz."""
from __future__ import annotations

import click

from toolkit import runtime
from toolkit.cli.output import current_output, json_option


def version_document() -> dict:
    build = runtime.build_info()
    state = runtime.boot_state()
    targets = []
    if build:
        for name in sorted(build["targets"]):
            target = build["targets"][name]
            pyroot = build["pyroots"][target["pyroot"]]
            targets.append({"name": name, "python": target["python"], "machine": target["machine"],
                            "glibc": target["glibc"], "bytecode": pyroot["bytecode"],
                            "dists": target["dists"], "unavailable": [u["component"] for u in target.get("unavailable", [])]})
    return {
        "name": "bookgen-kit",
        "version": runtime.version(),
        "build_id": build["build_id"] if build else None,
        "running_from": "pyz" if build else "source",
        "current_target": state["target"] if state else None,
        "recipients": runtime.baked_recipients(),
        "targets": targets,
        "pythons": runtime.python_range(),
        "interpreter": runtime.interpreter_choice(),
        "timezone": runtime.timezone(),
        "forward": runtime.forward(),
        "degraded": runtime.degraded(),
    }


@click.command("version")
@json_option
def version_command() -> None:
    """Show the version, build id, baked-in recipients and the targets inside the pyz."""
    output = current_output()
    document = version_document()
    output.remember(document)
    if output.json:
        output.emit_json(output.document)
        return
    console = output.console
    console.print("bookgen-kit [bold]%s[/bold]  build %s  (%s)" % (
        document["version"], document["build_id"] or "-", document["running_from"]))
    choice = document["interpreter"]
    console.print("interpreter: %s %s (%s; %s)" % (choice["implementation"], choice["version"], choice["executable"],
                                                  choice["isolation"] or "not a pyz run"))
    if document["forward"]:
        console.print("[yellow]newer than this build[/yellow] (%s): unavailable: %s" % (
            document["forward"]["range"], ", ".join(d["component"] for d in document["degraded"]) or "nothing"))
    if document["recipients"]:
        console.print("baked-in recipients: " + ", ".join(document["recipients"]))
    else:
        console.print("baked-in recipients: none (capture needs -r/-R)")
    if document["targets"]:
        from rich.table import Table

        table = Table(title="targets in this pyz", title_justify="left")
        for column in ("target", "python", "machine", "glibc >=", "bytecode"):
            table.add_column(column)
        for target in document["targets"]:
            mark = " *" if target["name"] == document["current_target"] else ""
            table.add_row(target["name"] + mark, target["python"], target["machine"], target["glibc"],
                          target["bytecode"])
        console.print(table)
