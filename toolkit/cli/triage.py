"""`bookgen-kit triage`: what is wrong right now, in under 10 seconds."""
from __future__ import annotations

import click

from toolkit.cli.common import database_options, deployment_options, target_factory
from toolkit.cli.output import current_output, json_option


def _mib(value) -> str:
    return "-" if value is None else "%d MiB" % (value // 1048576)


@click.command("triage")
@click.option("--health-url", metavar="URL", help="API health URL (default http://127.0.0.1:8000/health).")
@deployment_options
@database_options
@json_option
def triage_command(deployment, database_choice) -> None:
    """Check the API, containers, host, database and disk, and name the runbook incidents that match."""
    import os

    from toolkit.triage.run import run_triage

    explicit = bool(os.environ.get("BOOKGEN_KIT_HEALTH_URL")) or deployment.health_url != "http://127.0.0.1:8000/health"
    report = run_triage(deployment, target_factory(deployment, database_choice), health_url_explicit=explicit)
    out = current_output()
    out.remember(report.to_dict())
    if out.json:
        out.emit_json(out.document)
        return
    _render(out, report)


def _render(out, report) -> None:
    from rich.panel import Panel
    from rich.table import Table

    console = out.console
    if report.incidents:
        for incident in report.incidents:
            body = "\n".join(["[bold]evidence[/bold]"] + ["  - " + e for e in incident.evidence] +
                             ["[bold]next[/bold]"] + ["  $ " + s for s in incident.next_steps])
            console.print(Panel(body, title="[red]%s[/red] (%s)" % (incident.name, incident.severity),
                                title_align="left"))
    else:
        console.print(Panel("no runbook incident matches", title="[green]healthy[/green]", title_align="left"))
    probes = report.probes

    def failed(name):
        outcome = probes[name]
        if not outcome.ok:
            console.print("[yellow]%s probe: %s[/yellow]" % (name, outcome.error))
            return True
        return False

    if not failed("api"):
        api = probes["api"].result
        state = "HTTP %s in %s ms" % (api["status"], api["latency_ms"]) if api["reachable"] else api.get("error")
        console.print("[bold]API[/bold] %s: %s" % (api["url"], state))
    if not failed("containers"):
        result = probes["containers"].result
        if not result["reachable"]:
            console.print("[red]Docker[/red]: %s" % result["error"])
        else:
            table = Table(title="containers (%s)" % result["engine"], title_justify="left")
            for column in ("name", "status", "health", "restarts", "exit", "OOM", "memory", "cpu %"):
                table.add_column(column)
            for c in result["containers"]:
                table.add_row(c["name"], str(c.get("status")), str(c.get("health") or "-"),
                              str(c.get("restart_count", "-")), str(c.get("exit_code", "-")),
                              "yes" if c.get("oom_killed") else "no", _mib(c.get("memory_bytes")),
                              "-" if c.get("cpu_percent") is None else str(c["cpu_percent"]))
            for name in result.get("missing", []):
                table.add_row(name, "[red]missing[/red]", "-", "-", "-", "-", "-", "-")
            console.print(table)
    if not failed("host"):
        host = probes["host"].result
        console.print("[bold]host[/bold] load %(1m)s %(5m)s %(15m)s" % host["load"] +
                      ", memory %.1f%% available, swap %s%% used" % (host["memory"]["available_percent"],
                                                                    host["swap"]["used_percent"]))
        table = Table(title="filesystems", title_justify="left")
        for column in ("mount", "type", "used %", "free", "inodes used %"):
            table.add_column(column)
        for fs in host["filesystems"]:
            table.add_row(fs["mountpoint"], fs["fstype"], str(fs["used_percent"]), _mib(fs["free_bytes"]),
                          str(fs["inodes_used_percent"]))
        console.print(table)
        if out.verbose:
            for key, title in (("by_memory", "top processes by memory"), ("by_cpu", "top processes by CPU")):
                table = Table(title=title, title_justify="left")
                for column in ("pid", "name", "user", "rss", "cpu %"):
                    table.add_column(column)
                for p in host["top_processes"][key]:
                    table.add_row(str(p["pid"]), p["name"], str(p["user"]), _mib(p["rss_bytes"]), str(p["cpu_percent"]))
                console.print(table)
    if not failed("database"):
        db = probes["database"].result
        if db["reachable"]:
            console.print("[bold]database[/bold] %s (%s): %d connections, %s, PostgreSQL %s, %s stuck jobs" % (
                db["target"], db["mode"], db["connections"], _mib(db["size_bytes"]), db["server_version"],
                db.get("stuck_jobs")))
        else:
            console.print("[red]database[/red]: %s" % db["error"])
    if not failed("disk_usage"):
        table = Table(title="BookGen directories", title_justify="left")
        for column in ("path", "size", "files"):
            table.add_column(column)
        for d in probes["disk_usage"].result["directories"]:
            table.add_row(d["path"], _mib(d["bytes"]) + (" (partial)" if d["partial"] else "") if d["exists"]
                          else "absent", str(d["files"]))
        console.print(table)
    console.print("triage took %.1f s" % report.seconds)
