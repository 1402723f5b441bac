"""`contain`: the runbook's "Block all external access", keeping the responder's SSH and the evidence.

The cut is one nftables table of our own (`inet bookgen_kit_contain`, at priority -100: after
connection tracking, ahead of every filter table), so release is deleting that table and nothing
else is touched. BookGen's containers are
paused (`docker pause`: their memory stays for a capture; the runbook's `docker-compose down`
would lose it) and unpaused on release.
"""
from __future__ import annotations

import ipaddress
import json
import os
from typing import Any, Dict, List, Optional

from toolkit import utc
from toolkit.errors import EnvironmentProblem, UsageError
from toolkit.host.atomic import read_state, write_state
from toolkit.host.programs import run_program

TABLE = "bookgen_kit_contain"
STATE = "/var/lib/bookgen-kit/contain/state.json"


def ruleset(allow_ssh_from: List[str], ssh_port: int = 22) -> str:
    sources4 = [str(n) for n in allow_ssh_from if ipaddress.ip_network(n, strict=False).version == 4]
    sources6 = [str(n) for n in allow_ssh_from if ipaddress.ip_network(n, strict=False).version == 6]
    allow = []
    if sources4:
        allow.append("    ip saddr { %s } tcp dport %d accept" % (", ".join(sources4), ssh_port))
    if sources6:
        allow.append("    ip6 saddr { %s } tcp dport %d accept" % (", ".join(sources6), ssh_port))
    return "\n".join([
        "table inet %s {" % TABLE,
        "  chain input {",
        "    type filter hook input priority -100; policy drop;",
        "    iif lo accept",
        "    ct state established,related accept",
        *allow,
        "  }",
        "  chain forward {",
        "    type filter hook forward priority -100; policy drop;",
        "  }",
        "  chain output {",
        "    type filter hook output priority -100; policy drop;",
        "    oif lo accept",
        "    ct state established,related accept",
        "  }",
        "}",
        ""])


def _state_path() -> str:
    base = os.environ.get("BOOKGEN_KIT_STATE_DIR")
    return os.path.join(base, "contain", "state.json") if base else STATE


def _load_state() -> Optional[Dict[str, Any]]:
    data = read_state(_state_path(), strict=True)  # decides what release undoes: checked as state
    if data is None:
        return None
    try:
        return json.loads(data)
    except ValueError:
        raise EnvironmentProblem("%s is not valid JSON: containment state unknown" % _state_path()) from None


def _save_state(state: Dict[str, Any]) -> None:
    write_state(_state_path(), json.dumps(state, indent=2, sort_keys=True).encode(), 0o600, create_dir=True)


def contain(allow_ssh_from: List[str], pause_containers: bool, compose_project: str, evidence_dir: Optional[str],
            ssh_port: int = 22) -> Dict[str, Any]:
    if not allow_ssh_from:
        raise UsageError("give --allow-ssh-from CIDR (your own address): containment would lock you out")
    for network in allow_ssh_from:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise UsageError("not an address or network: %s" % network) from None
    if _load_state():
        raise UsageError("the host is already contained", hint="`contain release` first")
    warnings = []
    if not evidence_dir or not any(name.endswith(".manifest.json") for name in os.listdir(evidence_dir)
                                   if os.path.isdir(evidence_dir)):
        warnings.append("no capture found%s: take one before containment changes the host's state" % (
            " in %s" % evidence_dir if evidence_dir else " (give --evidence-dir)"))
    check = run_program("nft", ["-c", "-f", "-"], input_bytes=ruleset(allow_ssh_from, ssh_port).encode())
    if check.error or check.returncode != 0:
        raise EnvironmentProblem("nft refuses the containment rules: %s" % (
            check.error or check.stderr.decode("utf-8", "replace").strip()))
    loaded = run_program("nft", ["-f", "-"], input_bytes=ruleset(allow_ssh_from, ssh_port).encode())
    if loaded.returncode != 0:
        raise EnvironmentProblem("nft could not load the rules: %s" % loaded.stderr.decode("utf-8", "replace"))
    paused: List[str] = []
    state = {"since": utc.iso(), "table": TABLE,
             "allow_ssh_from": allow_ssh_from, "paused": paused, "nft": loaded.record()}
    _save_state(state)
    if pause_containers:
        from toolkit.containers.engine import client

        docker_client = client(timeout=30)
        for container in docker_client.containers.list(filters={"label": "com.docker.compose.project=%s" %
                                                                 compose_project}):
            if container.status == "running":
                container.pause()
                paused.append(container.name)
                _save_state(state)
    return dict(state, warnings=warnings)


def release() -> Dict[str, Any]:
    state = _load_state()
    if state is None:
        raise UsageError("the host is not contained (no %s)" % _state_path())
    unpaused = []
    if state.get("paused"):
        from toolkit.containers.engine import client

        docker_client = client(timeout=30)
        for name in state["paused"]:
            container = docker_client.containers.get(name)
            if container.status == "paused":
                container.unpause()
                unpaused.append(name)
    deleted = run_program("nft", ["delete", "table", "inet", TABLE])
    if deleted.returncode != 0 and b"No such file" not in deleted.stderr:
        raise EnvironmentProblem("nft could not delete table %s: %s" % (TABLE, deleted.stderr.decode(
            "utf-8", "replace").strip()))
    os.unlink(_state_path())
    return {"released": True, "unpaused": unpaused, "since": state["since"]}
