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


def explain(error: BaseException, timeout: Optional[float] = None) -> str:
    """What a failed call to the Docker engine means, in words (never a Python exception's text): the one
    wording of "dockerd does not answer" for every command."""
    import socket as socket_module

    url = os.environ.get("DOCKER_HOST") or DEFAULT_SOCKET
    chain, seen = [], error
    while seen is not None and len(chain) < 8:  # requests wraps urllib3 wraps the socket's own error
        chain.append(seen)
        nested = [a for a in getattr(seen, "args", ()) if isinstance(a, BaseException)]
        seen = seen.__cause__ or seen.__context__ or (nested[0] if nested else None)
        reason = getattr(chain[-1], "reason", None)
        if isinstance(reason, BaseException) and seen is None:
            seen = reason
    names = " ".join(type(e).__name__ for e in chain) + " " + " ".join(str(e) for e in chain)
    waited = " within %.0f s" % timeout if timeout else ""
    if any(isinstance(e, (socket_module.timeout, TimeoutError)) for e in chain) or "Timeout" in names or \
            "timed out" in names:
        return "dockerd does not answer%s (at %s)" % (waited, url)
    if any(isinstance(e, FileNotFoundError) for e in chain) or "No such file" in names:
        return "no Docker socket at %s (dockerd is not running?)" % url.replace("unix://", "")
    if any(isinstance(e, ConnectionRefusedError) for e in chain) or "Connection refused" in names:
        return "dockerd refuses connections at %s (not running?)" % url
    if any(isinstance(e, PermissionError) for e in chain) or "Permission denied" in names:
        return "no permission to use the Docker socket at %s (root or the docker group needed)" % url
    if type(error).__name__ == "NotFound":
        return "dockerd: %s" % (getattr(error, "explanation", None) or "not found")
    if type(error).__name__ == "APIError":
        return "dockerd refused: %s" % (getattr(error, "explanation", None) or "an API error")
    if any(isinstance(e, (ConnectionError, OSError)) for e in chain) or "Connection" in names:
        return "the connection to dockerd at %s broke off" % url
    text = str(error).strip().splitlines()
    return "Docker: %s" % (text[0] if text and "(" not in text[0] else type(error).__name__)


def client(timeout: float = 5.0):
    """A DockerClient for the local engine; every request times out after `timeout` seconds."""
    import docker

    try:
        return docker.DockerClient(base_url=docker_url(), timeout=timeout, version="1.41")
    except docker.errors.DockerException as error:
        raise EnvironmentProblem(explain(error, timeout)) from None


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
    """The IP address of a container, found by name or by compose service name; an engine that does not
    answer is an EnvironmentProblem in words."""
    try:
        candidates = docker_client.containers.list(
            filters={"label": ["com.docker.compose.project=%s" % project,
                               "com.docker.compose.service=%s" % name_or_service]})
    except Exception as error:
        raise EnvironmentProblem("the address of %r is Docker's to tell, and %s" % (
            name_or_service, explain(error))) from None
    if not candidates:
        try:
            candidates = [docker_client.containers.get(name_or_service)]
        except Exception:
            return None
    for network in candidates[0].attrs.get("NetworkSettings", {}).get("Networks", {}).values():
        if network.get("IPAddress"):
            return network["IPAddress"]
    return None
