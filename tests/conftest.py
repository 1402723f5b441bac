"""Shared fixtures: the built zipapp, interpreters, and the rule that CI skips nothing."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytest_plugins = ["tests.world.plugin"]
PYTHON_VERSIONS = ("3.9", "3.10", "3.11", "3.12", "3.13")


def interpreter(version: str) -> str:
    """The real binary of CPython X.Y on this machine (pyenv's, not its bash shim)."""
    import glob

    found = sorted(glob.glob("/root/.pyenv/versions/%s.*/bin/python%s" % (version, version)))
    if found:
        return found[-1]
    for candidate in ("/usr/bin/python" + version, "/usr/local/bin/python" + version):
        if os.access(candidate, os.X_OK):
            return candidate
    pytest.skip("CPython %s is not installed on this machine" % version)


def build_pyz(output: Path, *extra: str) -> Path:
    cmd = [sys.executable, str(ROOT / "build.py"), "-o", str(output), *extra]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return output


@pytest.fixture(scope="session")
def pyz(tmp_path_factory) -> Path:
    """The full zipapp (16 targets), built once per test session (BOOKGEN_KIT_TEST_PYZ reuses one)."""
    given = os.environ.get("BOOKGEN_KIT_TEST_PYZ")
    if given:
        return Path(given).resolve()
    return build_pyz(tmp_path_factory.mktemp("pyz") / "bookgen-kit.pyz", "--targets", "all")


def pytest_sessionfinish(session, exitstatus):
    """On CI every test must run: a skip there is a failure (QUALITY.md)."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter else 0
    if os.environ.get("CI") and skipped:
        reporter.write_line("CI: %d test(s) skipped; every test must run on CI" % skipped, red=True)
        session.exitstatus = 1
