"""Containers through the Docker API (each call with a timeout), or, when the daemon does not answer,
straight from /var/lib/docker: and the fallback says so."""
from __future__ import annotations

import base64
import json
import os
import posixpath
import re
import threading
from typing import Any, Dict, Iterator, List, Optional

from toolkit.evidence.collectors.base import CollectionContext, Collector, Emitter
from toolkit.host.hostfs import Refused, WalkStats, reason

TMP_DIRS = ("/tmp/", "/var/tmp/", "/dev/shm/")
LOG_CAP = 16 * 1024 * 1024
DIFF_PROBE_LIMIT = 300
KINDS = {0: "changed", 1: "added", 2: "deleted"}
_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")  # container and layer ids: never a path


def _safe(name: str) -> str:
    return name.strip("/").replace("/", "_") or "container"


def _chunks(stream, cap: int) -> Iterator[bytes]:
    total = 0
    for chunk in stream:
        if total >= cap:
            return
        piece = chunk[: cap - total]
        total += len(piece)
        yield piece


# what each BookGen compose service listens on inside its own network namespace (worker: nothing)
SERVICE_PORTS = {"api": (8000,), "db": (5432,), "redis": (6379,), "worker": ()}


def _ports(mapping: Any) -> List[int]:
    """{"8000/tcp": ...} (ExposedPorts, PortBindings) -> [8000]."""
    ports = set()
    for key in mapping or {}:
        number = str(key).split("/", 1)[0]
        if number.isdigit():
            ports.add(int(number))
    return sorted(ports)


def container_fact(attrs: Dict[str, Any], upper_dir: Optional[str] = None) -> Dict[str, Any]:
    """The facts every rule needs to name a container and judge what runs in it, from `docker inspect`
    or, the daemon hung, its config.v2.json (the same shape, but no GraphDriver)."""
    config = attrs.get("Config") or {}
    state = attrs.get("State") or {}
    graph = (attrs.get("GraphDriver") or {}).get("Data") or {}
    networks = (attrs.get("NetworkSettings") or {}).get("Networks") or {}
    pid = state.get("Pid") or None
    namespace = None
    if pid:
        try:
            namespace = os.readlink("/proc/%d/ns/net" % int(pid))
        except (OSError, ValueError):
            namespace = None
    return {"name": str(attrs.get("Name") or "").strip("/"), "id": attrs.get("Id") or attrs.get("ID"),
            "service": (config.get("Labels") or {}).get("com.docker.compose.service"),
            "image": config.get("Image"), "pid": pid, "created": attrs.get("Created"),
            "started": state.get("StartedAt"), "paused": bool(state.get("Paused")),
            "net_namespace": namespace,
            "addresses": sorted({n.get("IPAddress") for n in networks.values() if n and n.get("IPAddress")}),
            "exposed_ports": _ports(config.get("ExposedPorts")),
            "published_ports": _ports((attrs.get("HostConfig") or {}).get("PortBindings")),
            "merged_dir": graph.get("MergedDir"), "upper_dir": graph.get("UpperDir") or upper_dir}


class ContainerCollector(Collector):
    def findings(self, facts: Dict[str, List[Dict[str, Any]]], judging: Any) -> Iterator[Dict[str, Any]]:
        """New executables in a container's writable layer are high."""
        from toolkit.evidence.findings import finding

        for fact in facts.get("container", []):
            data = fact["data"]
            if data.get("new_executables"):
                yield finding("container-new-executables", "high", "container %s has new executables: %s" % (
                    data["name"], ", ".join(data["new_executables"][:5])), [fact["evidence"]],
                    container=data["name"], paths=data["new_executables"])

    name = "containers"
    rank = 30
    budget_seconds = 120.0
    description = "every container: inspect, top, stats, diff, logs (capped), new files in tmp dirs and new executables"

    def run(self, context: CollectionContext, emit: Emitter) -> None:
        from toolkit.containers.engine import client, docker_url

        try:
            docker_client = client(timeout=5)
            docker_client.ping()
        except Exception as error:
            emit.log("Docker does not answer at %s (%s): falling back to reading the data root" % (
                "DOCKER_HOST", error))
            self._fallback(context, emit, str(error))
            return
        containers = docker_client.containers.list(all=True)
        summary = []
        for container in containers:
            base = "containers/%s/" % _safe(container.name)
            attrs = container.attrs
            emit.json(base + "inspect.json", attrs, "docker API: GET /containers/{id}/json (%s)" % docker_url())
            if attrs.get("State", {}).get("Running"):  # paused too (after `contain`): top and stats still answer
                try:
                    emit.json(base + "top.json", container.top(ps_args="-eo pid,ppid,user,args"), "docker API: top")
                except Exception as error:
                    emit.skip(base + "top.json", "docker top: %s" % error)
                try:
                    emit.json(base + "stats.json", self._stats(container), "docker API: one stats sample")
                except Exception as error:
                    emit.skip(base + "stats.json", "docker stats: %s" % error)
            try:
                diff = container.diff() or []
            except Exception as error:
                diff = []
                emit.skip(base + "diff.json", "docker diff: %s" % error)
            emit.json(base + "diff.json", [{"path": d["Path"], "kind": KINDS.get(d["Kind"], d["Kind"])} for d in diff],
                      "docker API: GET /containers/{id}/changes")
            new_executables = []
            if context.profile != "volatile":
                self._logs(container, base, emit)
                new_executables = self._copy_new_files(docker_client, container, diff, base, emit)
                if context.profile == "full":
                    self._export(container, base, emit)
            summary.append({"name": container.name, "id": container.id, "image": attrs.get("Config", {}).get("Image"),
                            "state": attrs.get("State", {}).get("Status"), "new_executables": new_executables})
            emit.fact("container", dict(container_fact(attrs), new_executables=new_executables), base + "diff.json")
        emit.json("containers/index.json", {"source": "docker API", "engine": docker_url(), "containers": summary},
                  "docker API")

    @staticmethod
    def _stats(container) -> Dict[str, Any]:
        result: Dict[str, Any] = {}

        def sample():
            result["stats"] = container.stats(stream=False)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        thread.join(5)
        if "stats" not in result:
            raise TimeoutError("no stats sample within 5 s")
        return result["stats"]

    @staticmethod
    def _logs(container, base: str, emit: Emitter) -> None:
        try:
            stream = container.logs(stdout=True, stderr=True, timestamps=True, stream=True, follow=False)
            emit.stream(base + "logs.txt", _chunks(stream, LOG_CAP),
                        "docker API: logs with timestamps, first %d bytes at most (cap)" % LOG_CAP)
        except Exception as error:
            emit.skip(base + "logs.txt", "docker logs: %s" % error)

    def _copy_new_files(self, docker_client, container, diff, base: str, emit: Emitter) -> List[str]:
        new_executables = []
        probed = 0
        for change in diff:
            if change["Kind"] not in (0, 1):
                continue
            path = change["Path"]
            in_tmp = path.startswith(TMP_DIRS)
            if not in_tmp and probed >= DIFF_PROBE_LIMIT:
                continue
            probed += 1
            info = self._path_stat(docker_client, container, path)
            if info is None:
                continue
            mode = info.get("mode", 0)
            # Go's FileMode type bits: Dir, Symlink, Device, NamedPipe, Socket, CharDevice, Irregular
            is_regular = not mode & ((1 << 31) | (1 << 27) | (1 << 26) | (1 << 25) | (1 << 24) | (1 << 21) | (1 << 19))
            executable = is_regular and bool(mode & 0o111)
            if executable:
                new_executables.append(path)
            if is_regular and (in_tmp or executable):
                try:
                    stream, _stat = container.get_archive(path)
                    emit.stream(base + "files" + path + ".tar", stream,
                                "docker API: GET /containers/{id}/archive (a tar of the file)")
                except Exception as error:
                    emit.skip(base + "files" + path, "docker cp: %s" % error)
        return new_executables

    @staticmethod
    def _path_stat(docker_client, container, path: str) -> Optional[Dict[str, Any]]:
        try:
            url = docker_client.api._url("/containers/{0}/archive", container.id)
            response = docker_client.api.head(url, params={"path": path}, timeout=5)
            header = response.headers.get("X-Docker-Container-Path-Stat")
            return json.loads(base64.b64decode(header)) if header else None
        except Exception:
            return None

    @staticmethod
    def _export(container, base: str, emit: Emitter) -> None:
        try:
            emit.stream(base + "export.tar", container.export(), "docker API: GET /containers/{id}/export")
        except Exception as error:
            emit.skip(base + "export.tar", "docker export: %s" % error)

    def _fallback(self, context: CollectionContext, emit: Emitter, reason_text: str) -> None:
        fs = context.fs
        root = posixpath.normpath("/" + context.docker_root.lstrip("/"))  # not "//...": paths are cut by length
        directory = root + "/containers"
        try:
            ids = fs.listdir(directory)
        except (OSError, Refused) as error:
            absent = isinstance(error, FileNotFoundError) and not fs.lexists("/run/docker.sock") and \
                not fs.lexists("/var/run/docker.sock")
            emit.skip(directory, "no Docker on this host (no daemon, no data root)" if absent else
                      "Docker does not answer and its data root is not readable: %s" % reason(error),
                      "skip" if absent else "error")
            emit.json("containers/index.json", {"source": "none", "fallback": True, "reason": reason_text,
                                                "containers": []}, "nothing readable")
            return
        summary = []
        for container_id in ids:
            if not _ID.match(container_id):
                emit.skip(directory + "/" + container_id, "not a container id: not read", "skip")
                continue
            folder = directory + "/" + container_id
            config = {}
            try:
                config = json.loads(fs.read_bytes(folder + "/config.v2.json", 16 << 20))
            except (OSError, Refused, ValueError):
                pass
            name = _safe(config.get("Name", container_id[:12]))
            base = "containers/%s/" % name
            for file_name in ("config.v2.json", "hostconfig.json", container_id + "-json.log"):
                emit.file(folder + "/" + file_name, min(context.max_file_size, LOG_CAP) if file_name.endswith(".log")
                          else context.max_file_size)
            upper = self._upper_dir(emit, root, container_id)
            listing = []
            if upper and fs.is_dir(upper):
                stats = WalkStats()
                try:
                    for entry in fs.walk(upper, context.walk_limits(), stats):
                        if entry.depth == 0:
                            continue
                        info = entry.info
                        listing.append({"path": entry.logical[len(upper):], "mode": "%o" % info.st_mode,
                                        "size": info.st_size, "mtime": info.st_mtime})
                finally:
                    emit.walk_report(upper, stats)
            emit.json(base + "upperdir.json", {"upper_dir": upper, "entries": listing},
                      "fallback: walk of the overlay2 upper directory (daemon not answering)")
            new_executables = [e["path"] for e in listing if int(e["mode"], 8) & 0o111 and
                               int(e["mode"], 8) & 0o170000 == 0o100000]
            summary.append({"name": config.get("Name", "").strip("/"), "id": container_id,
                            "state": (config.get("State") or {}).get("Running"), "new_executables": new_executables})
            emit.fact("container", dict(container_fact(dict(config, ID=container_id), upper),
                                        new_executables=new_executables), base + "upperdir.json")
        emit.json("containers/index.json", {"source": root, "fallback": True, "reason": reason_text,
                                            "containers": summary},
                  "fallback: files under the Docker data root, read directly")

    @staticmethod
    def _upper_dir(emit: Emitter, root: str, container_id: str) -> Optional[str]:
        mount_id_file = root + "/image/overlay2/layerdb/mounts/%s/mount-id" % container_id
        text = (emit.read(mount_id_file, 4096) or b"").decode("utf-8", "replace").strip()
        if not _ID.match(text):
            return None
        return root + "/overlay2/" + text + "/diff"
