"""A docker SDK client that only talks to a local engine and never waits without a limit."""
from __future__ import annotations

import os
from typing import List, Optional
from urllib.parse import urlparse

from toolkit.errors import EnvironmentProblem, UsageError

DEFAULT_SOCKET = "unix:///var/run/docker.sock"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


def docker_url() -> str:
    """DOCKER_HOST when it names a local engine (unix socket or loopback TCP), else the default socket."""
    url = os.environ.get("DOCKER_HOST") or DEFAULT_SOCKET
    parsed = urlparse(url)
    if parsed.scheme == "unix":
        return url
    if parsed.scheme in ("tcp", "http") and parsed.hostname in LOOPBACK_HOSTS:
        return url
    raise UsageError("DOCKER_HOST=%s is not a local engine; bookgen-kit only talks to this host's Docker" % url,
                     hint="unset DOCKER_HOST or point it at unix:///var/run/docker.sock")


def client(timeout: float = 5.0):
    """A DockerClient for the local engine; every request times out after `timeout` seconds."""
    import docker

    try:
        return docker.DockerClient(base_url=docker_url(), timeout=timeout, version="1.41")
    except docker.errors.DockerException as error:
        raise EnvironmentProblem("Docker is not reachable at %s: %s" % (docker_url(), error)) from None


def bookgen_containers(docker_client, project: str, names: List[str]):
    """Every container of the compose project, running or not, plus any named one outside it."""
    found = {c.name: c for c in docker_client.containers.list(all=True,
                                                              filters={"label": "com.docker.compose.project=%s" % project})}
    for name in names:
        if name not in found:
            try:
                found[name] = docker_client.containers.get(name)
            except Exception:  # docker.errors.NotFound; absent containers are reported by the caller
                pass
    return found


def container_address(docker_client, name_or_service: str, project: str) -> Optional[str]:
    """The IP address of a container, found by name or by compose service name."""
    candidates = docker_client.containers.list(
        filters={"label": ["com.docker.compose.project=%s" % project,
                           "com.docker.compose.service=%s" % name_or_service]})
    if not candidates:
        try:
            candidates = [docker_client.containers.get(name_or_service)]
        except Exception:
            return None
    for network in candidates[0].attrs.get("NetworkSettings", {}).get("Networks", {}).values():
        if network.get("IPAddress"):
            return network["IPAddress"]
    return None
