"""Sockets from /proc/PID/net/* of every network namespace (no netstat, no ss), mapped to their processes
through socket inodes in /proc/*/fd; interfaces, routes, ARP; the firewall as host programs."""
from __future__ import annotations

import ipaddress
import os
import socket
import struct
from typing import Any, Dict, Iterator, List, Optional, Tuple

from toolkit.evidence.collectors.base import CollectionContext, Collector, Emitter
from toolkit.evidence.collectors.processes import read_text

TCP_STATES = {"01": "ESTABLISHED", "02": "SYN_SENT", "03": "SYN_RECV", "04": "FIN_WAIT1", "05": "FIN_WAIT2",
              "06": "TIME_WAIT", "07": "CLOSE", "08": "CLOSE_WAIT", "09": "LAST_ACK", "0A": "LISTEN",
              "0B": "CLOSING", "0C": "NEW_SYN_RECV"}
INET_TABLES = ("tcp", "tcp6", "udp", "udp6", "raw", "raw6")


def decode_address(text: str) -> Tuple[str, int]:
    """/proc/net hex 'ADDR:PORT' (addresses in host byte order per 32-bit word) -> (ip, port)."""
    address, port = text.split(":")
    raw = bytes.fromhex(address)
    words = b"".join(struct.pack("<I", struct.unpack(">I", raw[i:i + 4])[0]) for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(words)), int(port, 16)


def parse_inet(table: str, text: str) -> List[Dict[str, Any]]:
    sockets = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10:
            continue
        local, remote = decode_address(fields[1]), decode_address(fields[2])
        state = fields[3]
        protocol = table.rstrip("6")
        sockets.append({
            "protocol": table, "local_address": local[0], "local_port": local[1], "remote_address": remote[0],
            "remote_port": remote[1],
            "state": TCP_STATES.get(state, state) if protocol == "tcp" else ("UNCONN" if state == "07" else state),
            "uid": int(fields[7]), "inode": int(fields[9]),
            "listening": (protocol == "tcp" and state == "0A") or (protocol == "udp" and remote[1] == 0 and
                                                                   state == "07"),
        })
    return sockets


def parse_unix(text: str) -> List[Dict[str, Any]]:
    sockets = []
    for line in text.splitlines()[1:]:
        fields = line.split(None, 7)
        if len(fields) < 7:
            continue
        sockets.append({"protocol": "unix", "inode": int(fields[6]), "path": fields[7] if len(fields) > 7 else None,
                        "listening": fields[3] == "00010000"})
    return sockets


def socket_owners() -> Tuple[Dict[int, List[Dict[str, Any]]], Dict[str, str]]:
    """inode -> [{pid, name, fd}] from /proc/*/fd, and one pid per network namespace."""
    owners: Dict[int, List[Dict[str, Any]]] = {}
    namespaces: Dict[str, str] = {}
    for pid in sorted((p for p in os.listdir("/proc") if p.isdigit()), key=int):
        try:
            namespace = os.readlink("/proc/%s/ns/net" % pid)
            namespaces.setdefault(namespace, pid)
        except OSError:
            pass
        try:
            fds = os.listdir("/proc/%s/fd" % pid)
        except OSError:
            continue
        name = (read_text("/proc/%s/comm" % pid) or "").strip()
        for fd in fds:
            try:
                target = os.readlink("/proc/%s/fd/%s" % (pid, fd))
            except OSError:
                continue
            if target.startswith("socket:["):
                owners.setdefault(int(target[8:-1]), []).append({"pid": int(pid), "name": name, "fd": int(fd)})
    return owners, namespaces


def _loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _routes(text: Optional[str]) -> List[Dict[str, Any]]:
    routes = []
    for line in (text or "").splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8:
            continue

        def ip(value: str) -> str:
            return socket.inet_ntoa(struct.pack("<I", int(value, 16)))

        routes.append({"interface": fields[0], "destination": ip(fields[1]), "gateway": ip(fields[2]),
                       "flags": fields[3], "metric": int(fields[6]), "mask": ip(fields[7])})
    return routes


def _arp(text: Optional[str]) -> List[Dict[str, str]]:
    entries = []
    for line in (text or "").splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 6:
            entries.append({"address": fields[0], "hw_address": fields[3], "flags": fields[2], "interface": fields[5]})
    return entries


class NetworkCollector(Collector):
    def findings(self, facts: Dict[str, List[Dict[str, Any]]], judging: Any) -> Iterator[Dict[str, Any]]:
        """A listener outside the expected ports (host namespace) is medium. In a container's own namespace, a
        listener on a port its compose service does not serve (api 8000, db 5432, redis 6379, worker none; any
        other container: the ports its image exposes or it publishes) is high for BookGen's services, medium for
        others. A public connection from the db or worker container is high, and so is one from the api to
        anything but BookGen's db and redis containers. Each names the container (reads the container facts)."""
        from toolkit.evidence.collectors.containers import SERVICE_PORTS
        from toolkit.evidence.findings import (container_details, containers_by_namespace, finding, in_container,
                                               public_address)

        containers = [f["data"] for f in facts.get("container", [])]
        by_namespace = containers_by_namespace(facts)
        for fact in facts.get("listener", []):
            sock = fact["data"]
            owners = sock.get("processes") or []
            who = ", ".join("pid %d (%s)" % (o["pid"], o["name"]) for o in owners) or "no visible process"
            if sock.get("host_namespace", True):
                if sock["local_port"] in judging.expected_ports:
                    continue
                yield finding("unexpected-listener", "medium", "%s listening on %s:%d not in the expected set, by "
                              "%s" % (sock["protocol"], sock["local_address"], sock["local_port"], who),
                              [fact["evidence"]], port=sock["local_port"], address=sock["local_address"],
                              pids=[o["pid"] for o in owners])
                continue
            container = by_namespace.get(sock.get("namespace"))
            if container is None:
                continue  # a namespace of no container the collector saw: listed in network.json, not judged
            bookgen = container.get("service") in SERVICE_PORTS
            expected = SERVICE_PORTS[container["service"]] if bookgen else \
                set(container.get("exposed_ports") or []) | set(container.get("published_ports") or [])
            if sock["local_port"] in expected:
                continue
            yield finding("container-unexpected-listener", "high" if bookgen else "medium",
                          "%s listening on %s:%d%s, not a port it serves, by %s" % (
                              sock["protocol"], sock["local_address"], sock["local_port"], in_container(container),
                              who), [fact["evidence"]], port=sock["local_port"], address=sock["local_address"],
                          protocol=sock["protocol"], pids=[o["pid"] for o in owners], expected=sorted(expected),
                          **container_details(container))
        bookgen_addresses = {a for c in containers if c.get("service") in ("db", "redis") for a in c.get("addresses")
                             or []}
        listening = {(f["data"].get("namespace"), f["data"]["local_port"]) for f in facts.get("listener", [])}
        for fact in facts.get("connection", []):
            sock = fact["data"]
            container = by_namespace.get(sock.get("namespace"))
            if container is None or (sock.get("namespace"), sock["local_port"]) in listening:
                continue  # not in a container, or a connection to one of its listeners (inbound)
            service, remote = container.get("service"), sock["remote_address"]
            if service in ("db", "worker") and public_address(remote):
                why = "a public address"
            elif service == "api" and remote not in bookgen_addresses and not _loopback(remote):
                why = "neither BookGen's db nor its redis"
            else:
                continue
            yield finding("container-outbound", "high", "%s connects to %s:%d (%s)" % (
                in_container(container).strip(), remote, sock["remote_port"], why), [fact["evidence"]],
                remote=remote, remote_port=sock["remote_port"], pids=[o["pid"] for o in sock.get("processes") or []],
                **container_details(container))

    name = "network"
    rank = 20
    budget_seconds = 60.0
    description = "sockets per network namespace with their processes, interfaces, routes, ARP, firewall rules"

    def run(self, context: CollectionContext, emit: Emitter) -> None:
        import psutil

        owners, namespaces = socket_owners()
        per_namespace = []
        for namespace, pid in sorted(namespaces.items()):
            base = "/proc/%s/net/" % pid
            sockets: List[Dict[str, Any]] = []
            for table in INET_TABLES:
                text = read_text(base + table, 64 << 20)
                if text:
                    sockets += parse_inet(table, text)
            unix_text = read_text(base + "unix", 64 << 20)
            if unix_text:
                sockets += parse_unix(unix_text)
            for entry in sockets:
                entry["processes"] = owners.get(entry["inode"], [])
            per_namespace.append({
                "namespace": namespace, "via_pid": int(pid), "sockets": sockets,
                "routes": _routes(read_text(base + "route")),
                "routes6": (read_text(base + "ipv6_route") or "").splitlines(),
                "arp": _arp(read_text(base + "arp")),
            })
        interfaces = {name: [{"family": str(a.family), "address": a.address, "netmask": a.netmask}
                             for a in addresses] for name, addresses in psutil.net_if_addrs().items()}
        own_namespace = os.readlink("/proc/self/ns/net")
        emit.json("volatile/network.json", {"own_namespace": own_namespace, "namespaces": per_namespace,
                                            "interfaces": interfaces},
                  "/proc/PID/net/{tcp,tcp6,udp,udp6,raw,raw6,unix,route,ipv6_route,arp} per namespace, "
                  "socket inodes from /proc/PID/fd, getifaddrs")
        for entry in per_namespace:
            for sock in entry["sockets"]:
                if sock.get("listening") and sock["protocol"] != "unix":
                    emit.fact("listener", dict(sock, namespace=entry["namespace"],
                                               host_namespace=entry["namespace"] == own_namespace),
                              "volatile/network.json")
                elif sock.get("state") == "ESTABLISHED":
                    emit.fact("connection", dict(sock, namespace=entry["namespace"]), "volatile/network.json")
        emit.program("volatile/firewall-nft.txt", "nft", ["list", "ruleset"])
        emit.program("volatile/firewall-iptables.txt", "iptables-save", [])
        emit.program("volatile/neighbours.txt", "ip", ["neigh", "show"])
