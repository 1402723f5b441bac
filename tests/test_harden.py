"""harden check and plan on fake trees: a default one scores low, a hardened one high, every failure names its
evidence; the planned configurations pass the tools that own them (sshd -t, fail2ban-client -t)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.world.bookgen import make_host_tree

ROOT = Path(__file__).resolve().parent.parent
COPIED = ("etc/ssh", "etc/ufw", "etc/default/ufw", "etc/fail2ban", "etc/audit", "etc/sysctl.conf", "etc/sysctl.d")
MARKERS = ("usr/sbin/ufw", "usr/bin/fail2ban-client", "sbin/auditctl", "usr/bin/dockerd")


def kit(*args, env=None):
    environment = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(ROOT), "HOME": "/nonexistent"}
    environment.update(env or {})
    return subprocess.run([sys.executable, "-m", "toolkit", *args], capture_output=True, text=True,
                          env=environment, timeout=60)


@pytest.fixture
def default_tree(tmp_path):
    """This Debian machine's own stock configuration, copied under a fake root, plus a BookGen app."""
    host = make_host_tree(tmp_path / "root")
    root = host.root
    for relative in COPIED:
        source = Path("/") / relative
        target = root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, symlinks=True)
        elif source.exists():
            shutil.copy2(source, target)
    for marker in MARKERS:
        (root / marker).parent.mkdir(parents=True, exist_ok=True)
        (root / marker).write_text("installed\n")
    os.chmod(host.env_file, 0o644)
    compose = host.app_dir / "docker-compose.yml"
    compose.write_text(compose.read_text().replace('      - "127.0.0.1:8000:8000"\n',
                                                   '      - "127.0.0.1:8000:8000"\n      - "5432:5432"\n'))
    return host


def check(host):
    done = kit("--json", "harden", "check", "--root", str(host.root), "--app-dir", "/opt/bookgen")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def plan(host, *only):
    done = kit("--json", "harden", "plan", "--root", str(host.root), "--app-dir", "/opt/bookgen",
               *[a for o in only for a in ("--only", o)])
    assert done.returncode == 0, done.stderr
    return {p["id"]: p["changes"] for p in json.loads(done.stdout)["plans"]}


def test_a_default_tree_scores_low_and_names_its_evidence(default_tree):
    report = check(default_tree)
    assert report["index"] < 40
    results = {c["id"]: c for c in report["checks"]}
    assert all(results[i]["status"] == "fail" for i in ("firewall", "fail2ban", "auditd", "sshd", "sysctl",
                                                        "permissions", "docker"))
    for result in results.values():
        assert result["findings"] and all(f["evidence"] for f in result["findings"])
    sshd = " ".join(f["evidence"] for f in results["sshd"]["findings"])
    assert "PasswordAuthentication yes (default (not set))" in sshd and "/etc/ssh/sshd_config:" in sshd
    assert any("/etc/ufw/ufw.conf ENABLED=no" == f["evidence"] for f in results["firewall"]["findings"])
    assert any("/opt/bookgen/.env is 0644" in f["evidence"] for f in results["permissions"]["findings"])
    assert any(f["evidence"].startswith("/opt/bookgen/docker-compose.yml:") and '"5432:5432"' in f["evidence"]
               for f in results["docker"]["findings"])
    assert not any(f["item"] == "net.ipv4.ip_forward" for f in results["sysctl"]["findings"])  # Docker needs it


def _apply_files(host, plans):
    for changes in plans.values():
        for change in changes:
            if change["kind"] == "file":
                target = host.root / change["path"].lstrip("/")
                target.parent.mkdir(parents=True, exist_ok=True)
                diff_after = _after(change)
                target.write_text(diff_after)


def _after(change):
    """The planned new content, rebuilt from the unified diff the plan shows."""
    lines = change["diff"].splitlines(True)[2:]
    return "".join(line[1:] for line in lines if line.startswith((" ", "+")) and not line.startswith("+++"))


def test_a_hardened_tree_scores_high(default_tree):
    host = default_tree
    plans = plan(host)
    _apply_files(host, plans)
    os.chmod(host.env_file, 0o600)
    os.chmod(host.app_dir / "backups", 0o700)
    (host.root / "etc/ufw/ufw.conf").write_text("ENABLED=yes\nLOGLEVEL=low\n")
    (host.root / "etc/ufw/user.rules").write_text("".join(
        "### tuple ### allow tcp %d 0.0.0.0/0 any 0.0.0.0/0 in\n" % port for port in (22, 80, 443)))
    sysctl = host.root / "etc/sysctl.d/90-bookgen-kit.conf"
    assert sysctl.exists()
    report = check(host)
    results = {c["id"]: c for c in report["checks"]}
    assert report["index"] >= 90, [(c["id"], c["findings"]) for c in report["checks"] if c["status"] == "fail"]
    assert all(r["status"] == "pass" for r in results.values()), results


def test_planned_sshd_config_passes_sshd_t_and_a_broken_one_does_not(default_tree, tmp_path):
    host = default_tree
    change = plan(host, "sshd")["sshd"][0]
    config = tmp_path / "sshd_config"
    config.write_text(_after(change))
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)
    good = subprocess.run(["/usr/sbin/sshd", "-t", "-f", str(config)], capture_output=True, text=True)
    assert good.returncode == 0, good.stderr
    effective = subprocess.run(["/usr/sbin/sshd", "-T", "-f", str(config), "-C", "user=root,host=x,addr=10.0.0.1"],
                               capture_output=True, text=True).stdout
    assert "permitrootlogin no" in effective and "passwordauthentication no" in effective
    assert "maxauthtries 3" in effective and "loglevel VERBOSE" in effective
    broken = tmp_path / "broken"
    broken.write_text(_after(change) + "PermitRootLogin maybe\n")
    assert subprocess.run(["/usr/sbin/sshd", "-t", "-f", str(broken)], capture_output=True).returncode != 0


def test_planned_fail2ban_jail_passes_fail2ban_client_t(default_tree):
    host = default_tree
    _apply_files(host, plan(host, "fail2ban"))
    done = subprocess.run(["/usr/bin/fail2ban-client", "-c", str(host.root / "etc/fail2ban"), "-t"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_planned_sysctls_exist_in_this_kernel(tmp_path):
    """Planned for the live host (plan only reads), every key is one this kernel has."""
    host = make_host_tree(tmp_path / "app")
    done = kit("--json", "harden", "plan", "--only", "sysctl", "--app-dir", str(host.app_dir))
    assert done.returncode == 0, done.stderr
    changes = json.loads(done.stdout)["plans"][0]["changes"]
    if not changes:
        pytest.fail("this machine's sysctls already pass: nothing to plan")
    change = changes[0]
    assert changes[1]["argv"] == ["sysctl", "-e", "-p", "/etc/sysctl.d/90-bookgen-kit.conf"]
    for line in _after(change).splitlines():
        if "=" in line and not line.startswith("#"):
            key = line.split("=")[0].strip()
            assert Path("/proc/sys", key.replace(".", "/")).exists(), key


def test_planned_compose_binds_the_database_to_loopback(default_tree):
    change = plan(default_tree, "docker")["docker"][0]
    assert '-      - "5432:5432"' in change["diff"] and '+      - "127.0.0.1:5432:5432"' in change["diff"]


def test_unknown_check_is_a_usage_error(default_tree):
    done = kit("harden", "check", "--only", "nope", "--root", str(default_tree.root))
    assert done.returncode == 2 and "unknown check" in done.stderr
