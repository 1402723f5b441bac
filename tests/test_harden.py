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
from tests.world.services import wait_until

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


def _digests(root: Path) -> dict:
    import hashlib

    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "var/lib/bookgen-kit" not in str(p)}


def test_apply_then_rollback_restores_every_file_byte_for_byte(default_tree):
    host = default_tree
    before = _digests(host.root)
    applied = kit("--json", "harden", "apply", "--yes", "--root", str(host.root), "--app-dir", "/opt/bookgen",
                  "--confirm-within", "600")
    assert applied.returncode == 0, applied.stdout + applied.stderr
    result = json.loads(applied.stdout)
    assert {a["check"] for a in result["applied"]} >= {"sshd", "sysctl", "fail2ban", "auditd", "docker", "firewall"}
    after = _digests(host.root)
    assert after != before and (host.root / "etc/sysctl.d/90-bookgen-kit.conf").exists()
    assert host.env_file.stat().st_mode & 0o777 == 0o600  # permissions applied directly, also under --root
    results = {c["id"]: c["status"] for c in check(host)["checks"]}
    assert results["sshd"] == results["sysctl"] == results["permissions"] == results["docker"] == "pass"
    bundle = Path(result["bundle"])
    assert bundle.stat().st_mode & 0o777 == 0o700
    rolled = kit("--json", "harden", "rollback", str(bundle), "--root", str(host.root), "--app-dir", "/opt/bookgen")
    assert rolled.returncode == 0, rolled.stderr
    assert _digests(host.root) == before
    assert host.env_file.stat().st_mode & 0o777 == 0o644  # and the modes came back too


def test_sshd_dead_man_switch_restores_the_old_config_unless_confirmed(default_tree):
    import time

    host = default_tree
    original = (host.root / "etc/ssh/sshd_config").read_bytes()
    first = kit("--json", "harden", "apply", "--yes", "--only", "sshd", "--root", str(host.root), "--app-dir",
                "/opt/bookgen", "--confirm-within", "2")
    assert first.returncode == 0, first.stderr
    assert (host.root / "etc/ssh/sshd_config").read_bytes() != original
    deadline = time.time() + 20
    while time.time() < deadline and (host.root / "etc/ssh/sshd_config").read_bytes() != original:
        time.sleep(0.5)
    assert (host.root / "etc/ssh/sshd_config").read_bytes() == original  # it came back by itself
    late = kit("harden", "confirm", json.loads(first.stdout)["bundle"], "--root", str(host.root))
    assert late.returncode == 2 and "too late" in late.stderr
    second = kit("--json", "harden", "apply", "--yes", "--only", "sshd", "--root", str(host.root), "--app-dir",
                 "/opt/bookgen", "--confirm-within", "3")
    assert kit("harden", "confirm", json.loads(second.stdout)["bundle"], "--root", str(host.root)).returncode == 0
    time.sleep(5)
    assert b"PermitRootLogin no" in (host.root / "etc/ssh/sshd_config").read_bytes()  # kept


def test_a_config_sshd_refuses_is_never_applied(default_tree):
    host = default_tree
    config = host.root / "etc/ssh/sshd_config"
    config.write_text(config.read_text() + "NoSuchDirective yes\n")
    before = config.read_bytes()
    done = kit("harden", "apply", "--yes", "--only", "sshd", "--root", str(host.root), "--app-dir", "/opt/bookgen")
    assert done.returncode == 4 and "sshd -t" in done.stderr
    assert config.read_bytes() == before


def test_firewall_apply_and_rollback_for_real_in_a_network_namespace(netns, tmp_path):
    """ufw in its own namespace (ip netns exec binds /etc/netns/NAME/* over /etc/*): 22 answers, 5432 is
    dropped; after rollback 5432 answers again. Proven by TCP connects across a veth pair."""
    import socket
    import time

    etc = Path("/etc/netns") / netns
    shutil.copytree("/etc/ufw", etc / "ufw", symlinks=True)
    shutil.copytree("/etc/default", etc / "default", symlinks=True)
    outside, inside = "bk%so" % netns[-5:], "bk%si" % netns[-5:]
    subprocess.run(["ip", "link", "add", outside, "type", "veth", "peer", "name", inside], check=True)
    try:
        subprocess.run(["ip", "link", "set", inside, "netns", netns], check=True)
        subprocess.run(["ip", "addr", "add", "10.231.7.1/24", "dev", outside], check=True)
        subprocess.run(["ip", "link", "set", outside, "up"], check=True)
        subprocess.run(["ip", "-n", netns, "addr", "add", "10.231.7.2/24", "dev", inside], check=True)
        subprocess.run(["ip", "-n", netns, "link", "set", inside, "up"], check=True)
        listeners = [subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c",
                                       "import socket, time\ns = socket.socket()\ns.setsockopt(socket.SOL_SOCKET, "
                                       "socket.SO_REUSEADDR, 1)\ns.bind(('0.0.0.0', %d))\ns.listen(16)\n"
                                       "while True:\n    c, _ = s.accept()\n    c.close()\n" % port])
                     for port in (22, 5432, 8080)]
        time.sleep(0.5)

        def reaches(port: int) -> bool:
            try:
                with socket.create_connection(("10.231.7.2", port), timeout=2):
                    return True
            except OSError:
                return False

        assert reaches(22) and reaches(5432)
        app = make_host_tree(tmp_path / "app")
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(ROOT), "HOME": "/nonexistent"}
        applied = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-m", "toolkit", "--json", "harden",
                                  "apply", "--yes", "--only", "firewall", "--app-dir", str(app.app_dir)],
                                 capture_output=True, text=True, env=env, timeout=120)
        assert applied.returncode == 0, applied.stdout + applied.stderr
        bundle = json.loads(applied.stdout)["bundle"]
        assert reaches(22) and not reaches(5432) and not reaches(8080)
        assert (etc / "ufw" / "ufw.conf").read_text().count("ENABLED=yes") == 1
        rolled = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-m", "toolkit", "harden",
                                 "rollback", bundle, "--app-dir", str(app.app_dir)], capture_output=True, text=True,
                                env=env, timeout=120)
        assert rolled.returncode == 0, rolled.stderr
        assert reaches(5432) and reaches(8080)
        for path in (etc / "ufw").rglob("*"):
            original = Path("/etc/ufw") / path.relative_to(etc / "ufw")
            if path.is_file() and original.is_file():
                assert path.read_bytes() == original.read_bytes(), path
        shutil.rmtree(bundle, ignore_errors=True)
    finally:
        for listener in locals().get("listeners", []):
            listener.kill()
        subprocess.run(["ip", "link", "delete", outside], capture_output=True)


def test_auditd_rules_load_catch_a_write_and_only_ours_go_away(tmp_path):
    """The audit subsystem is kernel-wide: a foreign rule with its own key must survive our rollback."""
    import time
    import uuid

    host = make_host_tree(tmp_path / "app")
    foreign_key = "bkfor" + uuid.uuid4().hex[:6]
    foreign = tmp_path / "foreign.txt"
    foreign.write_text("x")
    subprocess.run(["/usr/sbin/auditctl", "-w", str(foreign), "-p", "wa", "-k", foreign_key], check=True)
    log_dir = tmp_path / "audit"
    log_dir.mkdir()
    config = tmp_path / "auditd.conf"
    config.write_text("log_file = %s/audit.log\nlog_format = ENRICHED\nflush = INCREMENTAL_ASYNC\nfreq = 1\n"
                      "max_log_file = 8\nnum_logs = 2\nspace_left = 10\nadmin_space_left = 5\n" % log_dir)
    daemon = subprocess.Popen(["/usr/sbin/auditd", "-n", "-c", str(tmp_path)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    bundle = None
    try:
        def registered() -> bool:  # the kernel sends its records to this auditd (before that: to its own log)
            status = subprocess.run(["/usr/sbin/auditctl", "-s"], capture_output=True, text=True).stdout.split()
            return "pid" in status and status[status.index("pid") + 1] == str(daemon.pid)

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (registered() and (log_dir / "audit.log").exists()):
            assert daemon.poll() is None, "auditd exited"
            time.sleep(0.1)
        assert registered() and (log_dir / "audit.log").exists(), "auditd did not start"
        applied = kit("--json", "harden", "apply", "--yes", "--only", "auditd", "--app-dir", str(host.app_dir))
        assert applied.returncode == 0, applied.stdout + applied.stderr
        bundle = json.loads(applied.stdout)["bundle"]
        listed = subprocess.run(["/usr/sbin/auditctl", "-l"], capture_output=True, text=True).stdout
        assert "-k bookgen_env" in listed and str(host.env_file) in listed and foreign_key in listed
        found, deadline, touched = False, time.monotonic() + 60, 0.0
        while not found and time.monotonic() < deadline:
            if time.monotonic() - touched > 5:  # a write now and then: its record is flushed within freq
                with open(host.env_file, "a") as handle:
                    handle.write("# touched\n")
                touched = time.monotonic()
            search = subprocess.run(["/usr/sbin/ausearch", "-if", str(log_dir / "audit.log"), "-k", "bookgen_env"],
                                    capture_output=True, text=True)
            found = str(host.env_file) in search.stdout
            time.sleep(0.2)
        assert found, "no audit record of the write within 60 s"
        rolled = kit("--json", "harden", "rollback", bundle, "--app-dir", str(host.app_dir))
        assert rolled.returncode == 0, rolled.stderr
        listed = subprocess.run(["/usr/sbin/auditctl", "-l"], capture_output=True, text=True).stdout
        assert "bookgen_" not in listed and foreign_key in listed
        assert not Path("/etc/audit/rules.d/90-bookgen-kit.rules").exists()
    finally:
        subprocess.run(["/usr/sbin/auditctl", "-W", str(foreign), "-p", "wa", "-k", foreign_key], capture_output=True)
        if bundle:
            kit("harden", "rollback", bundle, "--app-dir", str(host.app_dir))  # also when an assertion failed
            shutil.rmtree(bundle, ignore_errors=True)
        daemon.terminate()
        daemon.wait()


def test_fail2ban_jail_bans_and_the_ban_blocks_for_real(netns, tmp_path):
    """fail2ban-server in a namespace, configured by our planned jail (plus test-only log path, polling backend
    and in-memory db): failed logins from the host's address get it banned, and a connection then fails."""
    import socket
    import time

    host = make_host_tree(tmp_path / "root")
    conf = host.root / "etc" / "fail2ban"
    shutil.copytree("/etc/fail2ban", conf)
    for marker in ("usr/bin/fail2ban-client",):
        (host.root / marker).parent.mkdir(parents=True, exist_ok=True)
        (host.root / marker).write_text("installed\n")
    _apply_files(host, plan(host, "fail2ban"))
    log = tmp_path / "auth.log"
    log.write_text("")
    (conf / "jail.d" / "99-test.local").write_text(
        "[sshd]\nbackend = polling\nlogpath = %s\n" % log)
    (conf / "fail2ban.local").write_text("[Definition]\ndbfile = :memory:\nlogtarget = %s\n" % (tmp_path / "f2b.log"))
    outside, inside = "bkf%so" % netns[-4:], "bkf%si" % netns[-4:]
    subprocess.run(["ip", "link", "add", outside, "type", "veth", "peer", "name", inside], check=True)
    server = listener = None
    try:
        subprocess.run(["ip", "link", "set", inside, "netns", netns], check=True)
        subprocess.run(["ip", "addr", "add", "10.231.14.1/24", "dev", outside], check=True)
        subprocess.run(["ip", "link", "set", outside, "up"], check=True)
        subprocess.run(["ip", "-n", netns, "addr", "add", "10.231.14.2/24", "dev", inside], check=True)
        subprocess.run(["ip", "-n", netns, "link", "set", inside, "up"], check=True)
        listener = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c",
                                     "import socket\ns = socket.socket()\ns.bind(('0.0.0.0', 22))\ns.listen(16)\n"
                                     "while True:\n    c, _ = s.accept()\n    c.close()\n"])
        sock = tmp_path / "f2b.sock"
        server = subprocess.Popen(["ip", "netns", "exec", netns, "/usr/bin/fail2ban-server", "-f", "-x", "-c",
                                   str(conf), "-s", str(sock), "-p", str(tmp_path / "f2b.pid")],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def reaches() -> bool:
            try:
                with socket.create_connection(("10.231.14.2", 22), timeout=2):
                    return True
            except OSError:
                return False

        deadline = time.time() + 20
        while time.time() < deadline and not reaches():
            time.sleep(0.3)
        assert reaches()

        def jail_status() -> subprocess.CompletedProcess:
            return subprocess.run(["ip", "netns", "exec", netns, "/usr/bin/fail2ban-client", "-s", str(sock),
                                   "status", "sshd"], capture_output=True, text=True, timeout=30)

        deadline = time.time() + 60  # the jail answers once it is up and watching the log
        while time.time() < deadline and jail_status().returncode != 0:
            time.sleep(0.2)
        assert jail_status().returncode == 0, (tmp_path / "f2b.log").read_text()[-2000:]

        def fail_logins() -> None:
            stamp = time.strftime("%b %d %H:%M:%S")
            with open(log, "a") as handle:
                for attempt in range(8):
                    handle.write("%s testhost sshd[%d]: Failed password for root from 10.231.14.1 port %d ssh2\n"
                                 % (stamp, 4000 + attempt, 50000 + attempt))

        fail_logins()
        banned = False
        deadline, rewritten = time.time() + 90, time.time() + 15
        while time.time() < deadline:
            if "10.231.14.1" in jail_status().stdout:
                banned = True
                break
            if time.time() > rewritten:  # the poller may have positioned itself after our first lines
                fail_logins()
                rewritten = time.time() + 15
            time.sleep(0.3)
        assert banned, (tmp_path / "f2b.log").read_text()[-2000:]
        assert "bantime.increment" in (conf / "jail.d" / "90-bookgen-kit.local").read_text()
        # the ban blocks the address for real: fail2ban lists the ban before its action has run (under load, a
        # while before), so the connection is polled until it fails, within a deadline
        deadline = time.time() + 60
        while time.time() < deadline and reaches():
            time.sleep(0.3)
        assert not reaches(), (tmp_path / "f2b.log").read_text()[-2000:]
    finally:
        if server:
            server.terminate()
            server.wait()
        if listener:
            listener.kill()
        subprocess.run(["ip", "link", "delete", outside], capture_output=True)


def test_docker_published_port_is_filtered_in_docker_user_for_real(netns, tmp_path):
    """As Docker publishes a port (DNAT to a container, FORWARD through DOCKER-USER), from a public source:
    reachable before, dropped after `harden apply --only firewall`, reachable after rollback."""
    import socket
    import uuid

    container = "bkc" + uuid.uuid4().hex[:6]
    etc = Path("/etc/netns") / netns
    shutil.copytree("/etc/ufw", etc / "ufw", symlinks=True)
    shutil.copytree("/etc/default", etc / "default", symlinks=True)
    links = [("bkd%so" % netns[-4:], "bkd%si" % netns[-4:]), ("bke%so" % netns[-4:], "bke%si" % netns[-4:])]

    def ns(*argv, target=netns):
        return subprocess.run(["ip", "netns", "exec", target, *argv], check=True, capture_output=True)

    listener = None
    subprocess.run(["ip", "netns", "add", container], check=True)
    try:
        subprocess.run(["ip", "link", "add", links[0][0], "type", "veth", "peer", "name", links[0][1]], check=True)
        subprocess.run(["ip", "link", "set", links[0][1], "netns", netns], check=True)
        subprocess.run(["ip", "addr", "add", "198.18.50.1/24", "dev", links[0][0]], check=True)
        subprocess.run(["ip", "link", "set", links[0][0], "up"], check=True)
        ns("ip", "addr", "add", "198.18.50.2/24", "dev", links[0][1])
        ns("ip", "link", "set", links[0][1], "up")
        ns("ip", "link", "add", links[1][0], "type", "veth", "peer", "name", links[1][1])
        ns("ip", "link", "set", links[1][1], "netns", container)
        ns("ip", "addr", "add", "172.30.7.1/24", "dev", links[1][0])
        ns("ip", "link", "set", links[1][0], "up")
        ns("ip", "addr", "add", "172.30.7.2/24", "dev", links[1][1], target=container)
        ns("ip", "link", "set", links[1][1], "up", target=container)
        ns("ip", "link", "set", "lo", "up", target=container)
        ns("ip", "route", "add", "default", "via", "172.30.7.1", target=container)
        ns("sysctl", "-w", "net.ipv4.ip_forward=1")
        # what dockerd sets up for `ports: - "5432:5432"`
        ns("iptables", "-t", "nat", "-A", "PREROUTING", "-p", "tcp", "--dport", "5432", "-j", "DNAT",
           "--to-destination", "172.30.7.2:5432")
        ns("iptables", "-N", "DOCKER-USER")
        ns("iptables", "-A", "DOCKER-USER", "-j", "RETURN")
        ns("iptables", "-I", "FORWARD", "-j", "DOCKER-USER")
        ns("iptables", "-A", "FORWARD", "-d", "172.30.7.2", "-p", "tcp", "--dport", "5432", "-j", "ACCEPT")
        ns("iptables", "-A", "FORWARD", "-s", "172.30.7.2", "-j", "ACCEPT")
        listener = subprocess.Popen(["ip", "netns", "exec", container, sys.executable, "-c",
                                     "import socket\ns = socket.socket()\ns.bind(('0.0.0.0', 5432))\ns.listen(16)\n"
                                     "while True:\n    c, _ = s.accept()\n    c.close()\n"])

        def reaches() -> bool:
            try:
                with socket.create_connection(("198.18.50.2", 5432), timeout=2):
                    return True
            except OSError:
                return False

        wait_until(reaches, 60, "the published port before hardening")  # the listener starts under load too
        app = make_host_tree(tmp_path / "app")
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(ROOT), "HOME": "/nonexistent"}
        applied = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-m", "toolkit", "--json", "harden",
                                  "apply", "--yes", "--only", "firewall", "--app-dir", str(app.app_dir)],
                                 capture_output=True, text=True, env=env, timeout=120)
        assert applied.returncode == 0, applied.stdout + applied.stderr
        bundle = json.loads(applied.stdout)["bundle"]
        assert not reaches()  # filtered in DOCKER-USER, which ufw alone does not see
        rolled = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-m", "toolkit", "harden",
                                 "rollback", bundle, "--app-dir", str(app.app_dir)], capture_output=True, text=True,
                                env=env, timeout=120)
        assert rolled.returncode == 0, rolled.stderr
        wait_until(reaches, 30, "the published port after rollback")
        shutil.rmtree(bundle, ignore_errors=True)
    finally:
        if listener:
            listener.kill()
        subprocess.run(["ip", "link", "delete", links[0][0]], capture_output=True)
        subprocess.run(["ip", "netns", "delete", container], capture_output=True)


def test_a_missing_package_installs_from_the_packages_dir_with_dpkg(tmp_path):
    """Offline: ufw comes from a .deb on the medium (one built here with dpkg-deb), installed with the real dpkg
    into the audited tree; without --packages the plan only says which package is needed."""
    host = make_host_tree(tmp_path / "root")
    (host.root / "usr/bin").mkdir(parents=True)
    (host.root / "usr/bin/dockerd").write_text("installed\n")  # Docker runs here: DOCKER-USER must be filtered
    dpkg_db = host.root / "var/lib/dpkg"
    for directory in ("info", "updates", "triggers"):
        (dpkg_db / directory).mkdir(parents=True)
    (dpkg_db / "status").write_text("")
    (dpkg_db / "available").write_text("")
    package = tmp_path / "pkg"
    (package / "DEBIAN").mkdir(parents=True)
    (package / "DEBIAN" / "control").write_text(
        "Package: ufw\nVersion: 0.0-bookgen-test\nArchitecture: all\nMaintainer: tests <t@example.org>\n"
        "Description: a stand-in ufw package built by the test\n")
    for path, content in (("usr/sbin/ufw", "#!/bin/sh\nexit 0\n"), ("etc/ufw/ufw.conf", "ENABLED=no\n"),
                          ("etc/ufw/after.rules", "*filter\nCOMMIT\n"),
                          ("etc/default/ufw", 'DEFAULT_INPUT_POLICY="DROP"\n')):
        (package / path).parent.mkdir(parents=True, exist_ok=True)
        (package / path).write_text(content)
    (package / "usr/sbin/ufw").chmod(0o755)
    debs = tmp_path / "debs"
    debs.mkdir()
    subprocess.run(["dpkg-deb", "--build", str(package), str(debs / "ufw_0.0-bookgen-test_all.deb")], check=True,
                   capture_output=True)
    planned = plan(host, "firewall")["firewall"]
    assert planned[0]["kind"] == "package" and "ufw" in planned[0]["diff"]
    missing = kit("harden", "apply", "--yes", "--only", "firewall", "--root", str(host.root), "--app-dir",
                  "/opt/bookgen")
    assert missing.returncode == 4 and "needs package ufw" in missing.stderr
    done = kit("--json", "harden", "apply", "--yes", "--only", "firewall", "--root", str(host.root), "--app-dir",
               "/opt/bookgen", "--packages", str(debs))
    assert done.returncode == 0, done.stdout + done.stderr
    assert (host.root / "usr/sbin/ufw").exists()
    assert "Package: ufw\nStatus: install ok installed" in (dpkg_db / "status").read_text()
    installed = json.loads(done.stdout)["applied"][0]["changes"][0]
    assert installed["package"] == "ufw" and installed["binary"]["path"].endswith("/dpkg")
    assert "bookgen-kit DOCKER-USER" in (host.root / "etc/ufw/after.rules").read_text()
