"""The CLI frame: global options, lazy commands, one error path with the documented exit codes."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def kit(*args, env=None, extra_path=None):
    environment = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    environment["PYTHONPATH"] = ":".join([str(ROOT)] + ([str(extra_path)] if extra_path else []))
    if env:
        environment.update(env)
    return subprocess.run([sys.executable, "-m", "toolkit", *args], capture_output=True, text=True,
                          env=environment, timeout=60)


@pytest.fixture
def failing_commands(tmp_path):
    """A module of commands that fail in each documented way, registered through an entry in COMMANDS."""
    module = tmp_path / "kit_test_commands.py"
    module.write_text(textwrap.dedent('''
        import click
        from toolkit import errors

        @click.command()
        @click.argument("kind")
        def fail(kind):
            if kind == "bug":
                raise RuntimeError("a bug with no secret in it")
            cls = {"usage": errors.UsageError, "input": errors.BadInputError, "env": errors.EnvironmentProblem,
                   "verify": errors.VerificationFailed, "partial": errors.PartialFailure}[kind]
            raise cls("it failed as %s" % kind, hint="try the other thing")
    '''))
    runner = tmp_path / "run_kit.py"
    runner.write_text(textwrap.dedent('''
        import sys
        import toolkit.cli as cli
        cli.COMMANDS["fail"] = ("kit_test_commands", "fail", "Fail on purpose.")
        sys.exit(cli.main())
    '''))
    return runner


def run_runner(runner, *args, env=None):
    environment = {"PATH": "/usr/bin:/bin", "PYTHONPATH": "%s:%s" % (ROOT, runner.parent)}
    environment.update(env or {})
    return subprocess.run([sys.executable, str(runner), *args], capture_output=True, text=True, env=environment,
                          timeout=60)


@pytest.mark.parametrize("kind,code", [("usage", 2), ("input", 3), ("env", 4), ("verify", 5), ("partial", 6)])
def test_kit_errors_map_to_exit_codes_with_one_line_and_a_hint(failing_commands, kind, code):
    done = run_runner(failing_commands, "fail", kind)
    assert done.returncode == code
    assert done.stderr == "bookgen-kit: error: it failed as %s\nbookgen-kit: hint: try the other thing\n" % kind
    assert done.stdout == ""


def test_kit_error_with_json_also_prints_a_json_document(failing_commands):
    done = run_runner(failing_commands, "--json", "fail", "verify")
    assert done.returncode == 5
    document = json.loads(done.stdout)
    assert document == {"ok": False, "error": {"kind": "VerificationFailed", "message": "it failed as verify",
                                               "hint": "try the other thing", "exit_code": 5}}


def test_verbose_shows_the_traceback(failing_commands):
    done = run_runner(failing_commands, "-v", "fail", "input")
    assert done.returncode == 3
    assert "Traceback (most recent call last)" in done.stderr
    assert done.stderr.rstrip().endswith("bookgen-kit: hint: try the other thing")


def test_a_bug_is_one_line_and_a_crash_log(failing_commands, tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    done = run_runner(failing_commands, "fail", "bug", env={"BOOKGEN_KIT_CRASH_DIR": str(logs)})
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert lines[0] == "bookgen-kit: error: internal error (RuntimeError): a bug with no secret in it"
    crash = list(logs.iterdir())
    assert len(crash) == 1 and lines[1] == "bookgen-kit: hint: traceback in %s" % crash[0]
    assert "Traceback (most recent call last)" in crash[0].read_text()
    assert crash[0].stat().st_mode & 0o777 == 0o600


def test_unknown_command_is_a_usage_error():
    done = kit("no-such-command")
    assert done.returncode == 2
    assert done.stderr.splitlines()[0] == "bookgen-kit: error: No such command 'no-such-command'."


def test_bad_option_is_a_usage_error():
    done = kit("version", "--bogus")
    assert done.returncode == 2
    first, hint = done.stderr.splitlines()
    assert first.startswith("bookgen-kit: error: No such option") and "--bogus" in first
    assert hint == "bookgen-kit: hint: see `bookgen-kit version --help`"


def test_version_flag_and_command():
    import toolkit

    assert kit("--version").stdout == "bookgen-kit %s\n" % toolkit.__version__
    document = json.loads(kit("version", "--json").stdout)
    assert document["version"] == toolkit.__version__ and document["running_from"] == "source"
    assert json.loads(kit("--json", "version").stdout) == document


def test_help_lists_every_registered_command():
    from toolkit.cli import COMMANDS

    done = kit("--help")
    assert done.returncode == 0
    for name in COMMANDS:
        assert name in done.stdout


def test_no_color_and_NO_COLOR_remove_escape_codes():
    plain = kit("--no-color", "self-check", env={"TERM": "xterm-256color", "FORCE_COLOR": "1"})
    assert "\x1b[" not in plain.stdout
    env_plain = kit("self-check", env={"TERM": "xterm-256color", "FORCE_COLOR": "1", "NO_COLOR": "1"})
    assert "\x1b[" not in env_plain.stdout
    colored = kit("self-check", env={"TERM": "xterm-256color", "FORCE_COLOR": "1"})
    assert "\x1b[" in colored.stdout  # the check above can fail


def test_self_check_from_source_reports_installed_native_code():
    done = kit("self-check", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] and report["native_loading"]["mode"] == "installed"
    assert report["tool"]["running_from"] == "source"


def test_self_check_warns_about_ld_preload_and_python_variables(tmp_path):
    lib = "/usr/lib/x86_64-linux-gnu/libm.so.6" if Path("/usr/lib/x86_64-linux-gnu/libm.so.6").exists() else ""
    done = kit("self-check", "--json", env={"LD_PRELOAD": lib, "PYTHONSTARTUP": "/nonexistent"})
    report = json.loads(done.stdout)
    codes = {w["code"] for w in report["warnings"]}
    assert "env-python" in codes
    if lib:
        assert "env-ld_preload" in codes


def test_self_check_warns_about_a_writable_sys_path_directory(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    done = kit("self-check", "--json", extra_path=shared)
    report = json.loads(done.stdout)
    assert any(w["code"] == "writable-sys-path" and str(shared) in w["message"] for w in report["warnings"])


def test_quiet_is_accepted_everywhere():
    assert kit("-q", "version").returncode == 0


def test_recorded_command_lines_mask_secrets_even_inside_urls():
    from toolkit.evidence.capture import redacted_command_line

    masked = redacted_command_line(["bookgen-kit", "backup", "create", "--dsn",
                                    "postgresql://postgres:hunter2@127.0.0.1:5432/postgres", "--token", "abc",
                                    "password=pw", "redis://:r3dis@10.0.0.1:6379/0", "--out", "/media/usb"])
    assert masked == ["bookgen-kit", "backup", "create", "--dsn", "postgresql://postgres:***@127.0.0.1:5432/postgres",
                      "--token", "***", "password=***", "redis://:***@10.0.0.1:6379/0", "--out", "/media/usb"]
