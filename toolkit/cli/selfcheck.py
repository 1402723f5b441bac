"""`bookgen-kit self-check`: what a responder checks before trusting the run."""
from __future__ import annotations

import click

from toolkit.cli.output import current_output, json_option
from toolkit.errors import EXIT_ENVIRONMENT, EXIT_OK
from toolkit.host.selfcheck import run_self_check


@click.command("self-check")
@json_option
def self_check_command() -> int:
    """Check what this run trusts: pyz, interpreter, native code, environment.

    Exits 0 when every bundled native module imports (warnings do not fail it),
    4 when one does not.
    """
    output = current_output()
    report = run_self_check()
    code = EXIT_OK if report.ok else EXIT_ENVIRONMENT
    output.remember(report.to_dict())
    if output.json:
        output.emit_json(output.document)
        return code
    _render(output, report)
    return code


def _render(output, report) -> None:
    from rich.table import Table

    console = output.console
    facts = Table(show_header=False, title="bookgen-kit self-check", title_justify="left")
    facts.add_column(style="bold")
    facts.add_column(overflow="fold")
    tool, interp, plat, loading = report.tool, report.interpreter, report.platform, report.native_loading
    facts.add_row("version", "%s (build %s, from %s)" % (tool["version"], tool["build_id"] or "-", tool["running_from"]))
    if tool["pyz_path"]:
        facts.add_row("pyz", tool["pyz_path"])
        facts.add_row("pyz sha256", tool["pyz_sha256"] or "unreadable")
    facts.add_row("interpreter", "%s %s  %s" % (interp["implementation"], interp["version"], interp["exe"] or interp["executable"]))
    facts.add_row("interpreter sha256", interp["sha256"] or "unreadable")
    facts.add_row("flags", "isolated=%s no_site=%s re-executed=%s" % (interp["isolated"], interp["no_site"], interp["reexecuted"]))
    choice = interp.get("choice") or {}
    if choice:
        facts.add_row("chosen by", "%s: %s" % (choice.get("chosen_by"), choice.get("why")))
    zone = interp.get("timezone") or {}
    if zone:
        facts.add_row("timezone", "TZ=%s%s" % (zone.get("TZ"), " (set by bookgen-kit: the host has no TZ)"
                                               if zone.get("set_by_bookgen_kit") else " (the host's)"))
    facts.add_row("platform", "%s %s %s, %s" % (plat["system"], plat["kernel"], plat["machine"], plat["libc"] or "no glibc"))
    facts.add_row("target", plat["target"]["name"] if plat["target"] else "- (not a pyz)")
    facts.add_row("native code", "%s%s" % (loading["mode"], " (forced by BOOKGEN_EXTRACT=disk)" if loading.get("forced_disk") else ""))
    if loading.get("private_dirs"):
        facts.add_row("private dirs", ", ".join(loading["private_dirs"]) + (
            "  LEFT BEHIND: " + ", ".join(loading["private_dirs_left"]) if loading.get("private_dirs_left") else "  (removed)"))
    for item in report.degraded:
        facts.add_row("unavailable", "%s: %s" % (item["component"], item["effect"]))
    console.print(facts)

    imports = Table(title="native imports", title_justify="left")
    imports.add_column("module")
    imports.add_column("result")
    imports.add_column("detail", overflow="fold")
    for item in report.native_imports:
        result = "[green]ok[/green]" if item.ok else "[yellow]unavailable[/yellow]" if item.degraded else "[red]FAILED[/red]"
        imports.add_row(item.module, result, item.detail or item.error)
    console.print(imports)

    if output.verbose:
        libs = Table(title="host objects mapped into this process", title_justify="left")
        libs.add_column("path", overflow="fold")
        libs.add_column("sha256")
        for lib in report.host_libraries:
            libs.add_row(lib["path"], lib["sha256"] or "unreadable")
        console.print(libs)
    if report.warnings:
        for warning in report.warnings:
            console.print("[yellow]warning[/yellow] %s: %s" % (warning.code, warning.message))
    else:
        console.print("[green]no environment warnings[/green]")
    console.print("[green]ok[/green]: every native module imports" if report.ok else
                  "[red]FAILED[/red]: a native module does not import; do not trust this run")
