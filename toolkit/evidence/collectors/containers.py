"""Containers through the Docker API (each call with a timeout), or, when the daemon does not answer,
straight from /var/lib/docker: and the fallback says so."""
from __future__ import annotations

import base64
import json
import os
import posixpath
import re
import stat
import threading
from typing import Any, Dict, Iterator, List, Optional

from toolkit.evidence.collectors.base import CollectionContext, Collector, Emitter, host_member
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


# where a change inside a container brings the attacker back or runs code there: (prefix or exact path, kind)
PERSISTENCE_PLACES = (("/etc/crontab", "cron"), ("/etc/cron.", "cron"), ("/var/spool/cron/", "cron"),
                      ("/etc/anacrontab", "cron"), ("/etc/systemd/", "systemd"), ("/lib/systemd/system/", "systemd"),
                      ("/usr/lib/systemd/system/", "systemd"), ("/etc/rc.local", "rc file"), ("/etc/init.d/", "rc file"),
                      ("/etc/rc.d/", "rc file"), ("/etc/update-motd.d/", "rc file"),
                      ("/etc/profile", "shell profile"), ("/etc/profile.d/", "shell profile"),
                      ("/etc/bash.bashrc", "shell profile"), ("/etc/zsh/", "shell profile"),
                      ("/etc/environment", "shell profile"), ("/etc/ld.so.preload", "ld.so.preload"),
                      ("/etc/ld.so.conf", "ld.so config"), ("/etc/ld.so.conf.d/", "ld.so config"),
                      ("/etc/sudoers", "sudoers"), ("/etc/sudoers.d/", "sudoers"), ("/etc/passwd", "accounts"),
                      ("/etc/shadow", "accounts"), ("/etc/group", "accounts"), ("/etc/gshadow", "accounts"),
                      ("/etc/ssh/", "sshd"), ("/etc/pam.d/", "PAM"), ("/etc/security/", "PAM"))
HOME_PERSISTENCE = {".bashrc": "shell profile", ".profile": "shell profile", ".bash_profile": "shell profile",
                    ".bash_login": "shell profile", ".zshrc": "shell profile", "authorized_keys": "authorized_keys",
                    "authorized_keys2": "authorized_keys", "rc": "ssh rc"}
CODE_SUFFIXES = (".py", ".pyc", ".so", ".pth")
# files the engine itself writes into every container (Docker, Podman): never the attacker's
DOCKER_MANAGED = ("/etc/hostname", "/etc/hosts", "/etc/resolv.conf", "/.dockerenv", "/run/.containerenv")
PERSISTENCE_COPY_CAP = 16 * 1024 * 1024


def tampering_kind(path: str, working_dir: str = "") -> Optional[str]:
    """What a changed or added file inside a container is, when it is persistence or code: a kind, else None."""
    for place, kind in PERSISTENCE_PLACES:
        if path == place or (place.endswith(("/", ".")) and path.startswith(place)) or path.startswith(place + "/"):
            return kind
    parts = path.split("/")
    if len(parts) >= 3 and (parts[1] in ("root", "home") or path.startswith("/var/lib/")):
        kind = HOME_PERSISTENCE.get(parts[-1])
        if kind and (parts[-1] not in ("rc", "authorized_keys", "authorized_keys2") or parts[-2] == ".ssh"):
            return kind
    if path.endswith(CODE_SUFFIXES) and ("/site-packages/" in path or "/dist-packages/" in path or (
            working_dir not in ("", "/") and path.startswith(working_dir.rstrip("/") + "/"))):
        return "application code"
    return None


def file_digest(context: CollectionContext, logical: str) -> Optional[str]:
    """sha256 of a host file (the host filesystem object's); None when absent, refused or over 1 GiB."""
    try:
        if context.fs.lstat(logical).st_size > 1 << 30:
            return None
        return context.fs.sha256(logical)
    except (OSError, Refused):
        return None


def against_image(context: CollectionContext, upper: Optional[str], lowers: List[str], path: str) -> Dict[str, Any]:
    """The file as the container has it (its upper layer holds the whole file once changed) against the file as
    its image has it (the first lower layer, top down, that has the name: a whiteout or any other non-regular
    file there means the image has no such file). sha256 and differs_from_image: None where not readable."""
    current = file_digest(context, upper.rstrip("/") + path) if upper else None
    image = None
    for lower in lowers:
        name = lower.rstrip("/") + path
        if context.fs.lexists(name):
            image = file_digest(context, name)
            break
        if context.fs.lexists(posixpath.dirname(name) + "/.wh." + posixpath.basename(name)):
            break
    return {"sha256": current, "image_sha256": image,
            "differs_from_image": None if current is None or image is None else current != image}


def mount_destinations(attrs: Dict[str, Any]) -> List[str]:
    """Where the container has mounts (inspect's Mounts, config.v2.json's MountPoints): the placeholders Docker
    creates for them in the writable layer are Docker's, not the attacker's."""
    destinations = [m.get("Destination") for m in attrs.get("Mounts") or [] if isinstance(m, dict)]
    destinations += [m.get("Destination") for m in (attrs.get("MountPoints") or {}).values() if isinstance(m, dict)]
    return sorted({d for d in destinations if d})


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
            "merged_dir": graph.get("MergedDir") or (upper_dir[:-len("/diff")] + "/merged" if upper_dir and
                                                     upper_dir.endswith("/diff") and pid else None),
            "upper_dir": graph.get("UpperDir") or upper_dir}


class ContainerCollector(Collector):
    def findings(self, facts: Dict[str, List[Dict[str, Any]]], judging: Any) -> Iterator[Dict[str, Any]]:
        """New executables in a container's writable layer, persistence there and changed application code are
        high, each one finding per container naming it; a persistence file is not also a new executable."""
        from toolkit.evidence.findings import container_details, finding, first, in_container

        for fact in facts.get("container", []):
            data = fact["data"]
            tampered = data.get("tampering") or []
            judged = {row["path"] for row in tampered}  # an executable cron script is persistence, said once
            new_executables = [path for path in data.get("new_executables") or [] if path not in judged]
            if new_executables:
                layer = data.get("upper_dir") or data.get("merged_dir")
                yield finding("container-new-executables", "high", "new executables%s: %s" % (
                    in_container(data), first(new_executables, 5)), [fact["evidence"]], paths=new_executables,
                    host_paths=[layer.rstrip("/") + path for path in new_executables] if layer else [],
                    **container_details(data))
            for finding_id, wanted in (("container-persistence", lambda k: k != "application code"),
                                       ("container-code-changed", lambda k: k == "application code")):
                rows = [row for row in tampered if wanted(row["kind"])]
                if not rows:
                    continue
                what = "persistence" if finding_id == "container-persistence" else "changed application code"
                title = "%s%s: %s" % (what, in_container(data), first(["%s %s (%s)" % (
                    row["change"], row["path"], row["kind"]) for row in rows]))
                yield finding(finding_id, "high", title, [fact["evidence"]] + [row["copy"] for row in rows
                                                                                if row.get("copy")],
                              paths=[row["path"] for row in rows], kinds=sorted({row["kind"] for row in rows}),
                              changes=rows, **container_details(data))

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
                docker_url(), error))
            emit.degraded("docker", "containers read from the data root %s: no processes (top), stats, logs or "
                          "diff through the API" % context.docker_root, "the daemon does not answer: %s" % error)
            seen = self._fallback(context, emit, str(error))
            self._containerd(emit, seen)
            self._podman(context, emit)
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
            new_executables, tampering = [], []
            if context.profile != "volatile":
                self._logs(container, base, emit)
                new_executables, tampering = self._copy_new_files(context, docker_client, container, diff, base,
                                                                  emit)
                if context.profile == "full":
                    self._export(container, base, emit)
            summary.append({"name": container.name, "id": container.id, "image": attrs.get("Config", {}).get("Image"),
                            "state": attrs.get("State", {}).get("Status"), "new_executables": new_executables})
            emit.fact("container", dict(container_fact(attrs), new_executables=new_executables, tampering=tampering),
                      base + "diff.json")
        emit.json("containers/index.json", {"source": "docker API", "engine": docker_url(), "containers": summary},
                  "docker API")
        self._containerd(emit, {container.id for container in containers})
        self._podman(context, emit)

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

    def _copy_new_files(self, context: CollectionContext, docker_client, container, diff, base: str, emit: Emitter):
        """New executables, files in tmp dirs, persistence and changed code in the writable layer, copied
        through the API; (new executables, tampering rows). A changed file is compared with its image's copy
        in the lower layers on the host: one that still matches it is no tampering."""
        new_executables, tampering = [], []
        probed = 0
        managed = set(DOCKER_MANAGED) | set(mount_destinations(container.attrs))
        working_dir = (container.attrs.get("Config") or {}).get("WorkingDir") or ""
        graph = (container.attrs.get("GraphDriver") or {}).get("Data") or {}
        upper, lowers = graph.get("UpperDir"), [d for d in (graph.get("LowerDir") or "").split(":") if d]
        for change in diff:
            if change["Kind"] not in (0, 1):
                continue
            path = change["Path"]
            if path in managed:
                continue
            in_tmp = path.startswith(TMP_DIRS)
            kind = tampering_kind(path, working_dir)
            if not in_tmp and kind is None and probed >= DIFF_PROBE_LIMIT:
                continue
            probed += 1
            info = self._path_stat(docker_client, container, path)
            if info is None:
                continue
            mode = info.get("mode", 0)
            # Go's FileMode type bits: Dir, Symlink, Device, NamedPipe, Socket, CharDevice, Irregular
            is_regular = not mode & ((1 << 31) | (1 << 27) | (1 << 26) | (1 << 25) | (1 << 24) | (1 << 21) | (1 << 19))
            executable = is_regular and bool(mode & 0o111)
            changed = change["Kind"] == 0
            comparison = against_image(context, upper, lowers, path) if is_regular and (kind or (
                executable and changed)) else {}
            if comparison.get("differs_from_image") is False and not in_tmp:
                kind, executable = None, False  # rewritten with the image's own content: not tampering
            if executable:
                new_executables.append(path)
            copy = None
            if is_regular and kind and not (in_tmp or executable) and info.get("size", 0) > PERSISTENCE_COPY_CAP:
                emit.skip(base + "files" + path, "%d bytes, over the %d-byte cap for a persistence file: not copied"
                          % (info.get("size", 0), PERSISTENCE_COPY_CAP), "limit")
            elif is_regular and (in_tmp or executable or kind):
                try:
                    stream, _stat = container.get_archive(path)
                    copy = base + "files" + path + ".tar"
                    emit.stream(copy, stream, "docker API: GET /containers/{id}/archive (a tar of the file)")
                except Exception as error:
                    copy = None
                    emit.skip(base + "files" + path, "docker cp: %s" % error)
            if is_regular and kind:
                tampering.append(dict(comparison, path=path, kind=kind, change=KINDS.get(change["Kind"]), copy=copy,
                                      host_path=upper.rstrip("/") + path if upper else None))
        return new_executables, tampering

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
            return set()
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
            new_executables, tampering = self._judge_upper(context, emit, base, upper, self._lower_dirs(emit, upper),
                                                           config, "the data root (daemon not answering)")
            summary.append({"name": config.get("Name", "").strip("/"), "id": container_id,
                            "state": (config.get("State") or {}).get("Running"), "new_executables": new_executables})
            emit.fact("container", dict(container_fact(dict(config, ID=container_id), upper),
                                        new_executables=new_executables, tampering=tampering), base + "upperdir.json")
        emit.json("containers/index.json", {"source": root, "fallback": True, "reason": reason_text,
                                            "containers": summary},
                  "fallback: files under the Docker data root, read directly")
        return {entry["id"] for entry in summary}

    @staticmethod
    def _judge_upper(context: CollectionContext, emit: Emitter, base: str, upper: Optional[str], lowers: List[str],
                     attrs: Dict[str, Any], how: str):
        """A container's writable layer read from the host: listed (upperdir.json), its new executables and its
        persistence and changed code (copied), each compared with the image's copy in the lower layers;
        Docker's and Podman's own files and mount placeholders are not judged. (new executables, tampering)."""
        fs = context.fs
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
        emit.json(base + "upperdir.json", {"upper_dir": upper, "lower_dirs": lowers, "entries": listing},
                  "walk of the container's upper (writable) directory, from %s" % how)
        managed = set(DOCKER_MANAGED) | set(mount_destinations(attrs))
        working_dir = (attrs.get("Config") or {}).get("WorkingDir") or ""
        new_executables, tampering = [], []
        for entry in listing:
            mode = int(entry["mode"], 8)
            if mode & 0o170000 != 0o100000 or entry["path"] in managed:
                continue
            kind = tampering_kind(entry["path"], working_dir)
            if not kind and not mode & 0o111:
                continue
            comparison = against_image(context, upper, lowers, entry["path"])
            if comparison.get("differs_from_image") is False:
                continue  # rewritten with the image's own content: not tampering, nothing new
            if mode & 0o111:
                new_executables.append(entry["path"])
            if not kind:
                continue
            stored = emit.file(upper + entry["path"], min(context.max_file_size, PERSISTENCE_COPY_CAP))
            tampering.append(dict(comparison, path=entry["path"], kind=kind, change="changed or added",
                                  copy=host_member(upper + entry["path"]) if stored else None,
                                  host_path=upper + entry["path"]))
        return new_executables, tampering

    def _podman(self, context: CollectionContext, emit: Emitter) -> None:
        """Podman's (rootful) containers, through `podman` as a recorded host program: `ps -a` and `inspect`
        (Docker's shape), the writable layer judged from the host as with Docker's data root. The storage is
        podman's default, or the graphroot and runroot of the file CONTAINERS_STORAGE_CONF names."""
        flags: List[str] = []
        conf = os.environ.get("CONTAINERS_STORAGE_CONF")
        if conf:
            text = context.fs.read_text(conf, 1 << 20) or ""
            for key, flag in (("graphroot", "--root"), ("runroot", "--runroot")):
                match = re.search(r'^\s*%s\s*=\s*"([^"\n]+)"' % key, text, re.M)
                if match:
                    flags += [flag, match.group(1)]
        if not flags and not context.fs.is_dir("/var/lib/containers/storage"):
            emit.log("no podman storage at /var/lib/containers/storage: podman not read")
            return
        listed = emit.program("containers/podman/ps.json", "podman", flags + ["ps", "-a", "--format", "json"],
                              timeout=30)
        try:
            rows = json.loads(listed or b"[]") or []
        except ValueError:
            rows = []
        for row in rows if isinstance(rows, list) else []:
            container_id = str(row.get("Id") or "")
            if not _ID.match(container_id):
                continue
            name = _safe(str((row.get("Names") or [container_id[:12]])[0]))
            base = "containers/podman/%s/" % name
            raw = emit.program(base + "inspect.json", "podman", flags + ["inspect", container_id], timeout=30)
            try:
                attrs = (json.loads(raw or b"[]") or [{}])[0]
            except (ValueError, IndexError, KeyError):
                attrs = {}
            if not isinstance(attrs, dict) or not attrs:
                continue
            graph = (attrs.get("GraphDriver") or {}).get("Data") or {}
            lowers = [d for d in (graph.get("LowerDir") or "").split(":") if d]
            new_executables, tampering = [], []
            if context.profile != "volatile":
                new_executables, tampering = self._judge_upper(context, emit, base, graph.get("UpperDir"), lowers,
                                                               attrs, "podman inspect's GraphDriver")
            fact = container_fact(attrs)
            fact.update(source="podman", new_executables=new_executables, tampering=tampering,
                        cgroup_marker="libpod-" + container_id)
            emit.fact("container", fact, base + "inspect.json")

    @staticmethod
    def _containerd(emit: Emitter, docker_ids: set) -> None:
        """containerd's own containers (nerdctl, k8s, ctr; Docker's, in its "moby" namespace, are known already),
        through `ctr` against CONTAINERD_ADDRESS (else /run/containerd/containerd.sock): each namespace's
        containers (info as JSON) and tasks, as the same container facts the Docker source gives."""
        address = os.environ.get("CONTAINERD_ADDRESS") or "/run/containerd/containerd.sock"
        try:
            if not stat.S_ISSOCK(os.stat(address).st_mode):
                raise OSError("not a socket")
        except OSError:
            emit.log("no containerd socket at %s: containerd not read" % address)
            return
        base = ["-a", address]
        listed = emit.program("containers/containerd/namespaces.txt", "ctr", base + ["namespaces", "ls", "-q"])
        for namespace in (listed or b"").decode("utf-8", "replace").split():
            if not _ID.match(namespace):
                continue
            folder = "containers/containerd/%s/" % namespace
            tasks = {}
            for line in (emit.program(folder + "tasks.txt", "ctr", base + ["-n", namespace, "tasks", "ls"]) or b""
                         ).decode("utf-8", "replace").splitlines()[1:]:
                fields = line.split()
                if len(fields) >= 3 and fields[1].isdigit():
                    tasks[fields[0]] = (int(fields[1]), fields[2])
            ids = (emit.program(folder + "containers.txt", "ctr", base + ["-n", namespace, "containers", "ls", "-q"])
                   or b"").decode("utf-8", "replace").split()
            for container_id in ids:
                if not _ID.match(container_id) or container_id in docker_ids:
                    continue
                raw = emit.program(folder + _safe(container_id) + "/info.json", "ctr",
                                   base + ["-n", namespace, "containers", "info", container_id])
                try:
                    info = json.loads(raw or b"{}")
                except ValueError:
                    info = {}
                labels = info.get("Labels") or {}
                pid, status = tasks.get(container_id, (None, None))
                name = labels.get("nerdctl/name") or labels.get("io.kubernetes.container.name") or container_id
                attrs = {"Id": container_id, "Name": name, "Created": info.get("CreatedAt"),
                         "Config": {"Labels": labels, "Image": info.get("Image")},
                         "State": {"Pid": pid, "Paused": status == "PAUSED", "StartedAt": None}}
                fact = container_fact(attrs)
                fact.update(source="containerd", namespace=namespace, status=status, new_executables=[], tampering=[],
                            cgroup="/%s/%s" % (namespace, container_id),
                            merged_dir="/proc/%d/root" % pid if pid else None)
                emit.fact("container", fact, folder + _safe(container_id) + "/info.json")

    @staticmethod
    def _lower_dirs(emit: Emitter, upper: Optional[str]) -> List[str]:
        """overlay2's layer directories under a container's layer, top down, from its `lower` file
        ("l/SHORTID:l/SHORTID...", links under overlay2/l to each layer's diff directory), resolved by reading
        each link (never followed: the data root is the host's)."""
        if not upper:
            return []
        layer = posixpath.dirname(upper)
        overlay = posixpath.dirname(layer)
        text = (emit.read(layer + "/lower", 1 << 20) or b"").decode("utf-8", "replace").strip()
        lowers = []
        for short in text.split(":") if text else []:
            if not re.match(r"^l/[A-Za-z0-9]{1,64}$", short):
                continue
            try:
                target = emit.fs.readlink(overlay + "/" + short)  # "../LAYERID/diff"
            except (OSError, Refused):
                continue
            match = re.match(r"^\.\./([A-Za-z0-9_-]{1,128})/diff$", target)
            if match:
                lowers.append(overlay + "/" + match.group(1) + "/diff")
        return lowers

    @staticmethod
    def _upper_dir(emit: Emitter, root: str, container_id: str) -> Optional[str]:
        mount_id_file = root + "/image/overlay2/layerdb/mounts/%s/mount-id" % container_id
        text = (emit.read(mount_id_file, 4096) or b"").decode("utf-8", "replace").strip()
        if not _ID.match(text):
            return None
        return root + "/overlay2/" + text + "/diff"
