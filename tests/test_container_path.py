"""A host with no usable Python but a running Docker engine (issue #14): the README's `docker run` line runs the
pyz with the Python of an image already on the host, in the host's PID, network, UTS and IPC namespaces, with the
host's / read-only as --root. The bundle's volatile part must name the host's processes, not the container's.

The image is made here from the debootstrapped trixie root (its own /usr/bin/python3.13; no host /usr mounted), as
BookGen's api image would bring its own Python. The engine is the test world's real dockerd.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.test_evidence import decrypt_with_standard_tools, team_key
from tests.world.roots import TRIXIE, RootUnavailable, debian_roots

assert debian_roots and team_key  # fixtures, used by name below
IMAGE = "bookgen-kit-test/python-only:trixie"
DOCKER = "/usr/bin/docker"


def readme_command() -> str:
    """The command exactly as the README gives it (between the markers), for the test to run."""
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    start = text.index("<!-- container-command -->")
    block = text[start:text.index("<!-- /container-command -->")]
    body = block.split("```sh", 1)[1].split("```", 1)[0]
    return body.replace("\\\n", " ")


@pytest.fixture(scope="module")
def python_image(debian_roots, docker_engine):
    try:
        root = debian_roots.get(TRIXIE)
    except RootUnavailable as error:
        pytest.fail(str(error), pytrace=False)
    env = dict(os.environ, DOCKER_HOST=docker_engine.url)
    tar = subprocess.Popen(["tar", "-C", str(root.path), "--one-file-system", "-c", "."], stdout=subprocess.PIPE)
    imported = subprocess.run([DOCKER, "import", "-", IMAGE], stdin=tar.stdout, capture_output=True, text=True,
                              env=env, timeout=600)
    tar.stdout.close()
    assert tar.wait(timeout=600) == 0 and imported.returncode == 0, imported.stderr
    yield IMAGE, env


def test_the_readme_container_command_captures_the_host(python_image, pyz, team_key, tmp_path):
    image, env = python_image
    identity, recipient = team_key
    medium = tmp_path / "usb"  # the responder's stick: another filesystem than the host's /
    medium.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4g", "tmpfs", str(medium)], check=True)
    request_cleanup = [lambda: subprocess.run(["umount", "-l", str(medium)], check=False)]
    (medium / "bookgen-kit.pyz").write_bytes(pyz.read_bytes())
    # a process only the host has: the bundle must name it (the container sees the host's PID namespace)
    marker = subprocess.Popen(["/bin/sleep", "3117"], stdin=subprocess.DEVNULL)
    try:
        command = readme_command().replace("/media/usb", str(medium)).replace("IMAGE", image).replace(
            "age1...", recipient)
        done = subprocess.run(["sh", "-c", command], capture_output=True, text=True, env=env, timeout=900)
        assert done.returncode in (0, 6), done.stdout + done.stderr
        bundles = [p for p in (medium / "evidence").iterdir() if p.name.endswith(".age")]
        assert len(bundles) == 1, list((medium / "evidence").iterdir())
        bundle = bundles[0]
        manifest = json.loads(Path(str(bundle) + ".manifest.json").read_text())
        mode = manifest["collection"]["mode"]
        assert mode["kind"] == "container" and mode["image"] == image and "removed" in mode["changes_on_host"]
        assert manifest["tool"]["interpreter"]["version"].startswith("3.13")  # the image's Python, not ours
        with tarfile.open(fileobj=io.BytesIO(decrypt_with_standard_tools(bundle, identity))) as tar:
            processes = json.loads(tar.extractfile("volatile/processes.json").read())["processes"]
        pids = {p["pid"]: p for p in processes}
        assert marker.pid in pids and pids[marker.pid]["cmdline"][:2] == ["/bin/sleep", "3117"]
        assert 1 in pids and pids[1]["name"] != "python3.13"  # PID 1 is the host's init, not the container's
        assert manifest["host"]["hostname"] == os.uname().nodename
        leftovers = subprocess.run([DOCKER, "ps", "-a", "-q", "--filter", "ancestor=%s" % image],
                                   capture_output=True, text=True, env=env, timeout=60).stdout.split()
        assert leftovers == []  # the container was removed, as the manifest says
    finally:
        marker.kill()
        marker.wait()
        for step in request_cleanup:
            step()
