"""The .env reader: docker compose's rules, and a clear line number for what it cannot parse."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.world.bookgen import make_host_tree
from toolkit.secrets import dotenv

SAMPLE = (
    "# BookGen\n"
    "\n"
    "export DATABASE_PASSWORD=plain # inline comment\n"
    "SECRET_KEY='single # not a comment'\r\n"
    'REDIS_PASSWORD="dq \\"quoted\\" \\n line"\n'
    "EMPTY=\n"
    "URL=postgresql://u:p%40ss@db:5432/bookgen#frag\n"
    "MULTI=\"first\nsecond\"\n"
    "DATABASE_PASSWORD=last-wins"
)


def test_values_follow_compose_rules():
    values = dotenv.parse(SAMPLE).values()
    assert values == {
        "DATABASE_PASSWORD": "last-wins",
        "SECRET_KEY": "single # not a comment",
        "REDIS_PASSWORD": 'dq "quoted" \n line',
        "EMPTY": "",
        "URL": "postgresql://u:p%40ss@db:5432/bookgen#frag",
        "MULTI": "first\nsecond",
    }


def test_entries_know_where_their_value_is():
    env = dotenv.parse(SAMPLE)
    for entry in env.entries:
        token = SAMPLE[entry.start:entry.end]
        if entry.quote:
            assert token[0] == token[-1] == entry.quote
        else:
            assert token == entry.value
    assert env.last_entry("DATABASE_PASSWORD").line == 10  # MULTI spans lines 8 and 9


@pytest.mark.parametrize("text,line", [("GOOD=1\nnot a line\n", 2), ("A='unterminated\n", 1),
                                       ('A="x" trailing\n', 1), ("1BAD=x\n", 1), ("KEY\n", 1)])
def test_unparseable_lines_name_their_number(text, line):
    with pytest.raises(dotenv.DotEnvError, match="line %d" % line) as raised:
        dotenv.parse(text)
    assert raised.value.exit_code == 3


# --------------------------------------------------------------------------- errors never carry a value
SECRET = "sk-or-v1-" + "7f3a9c" * 8  # starts like a name: a bare secret line matches the key pattern
MALFORMED = [
    # (text, line, key named in the error or None, what is wrong)
    ("GOOD=1\n%s\n" % SECRET, 2, None, "not KEY=VALUE"),  # a secret pasted on a line of its own
    ("export %s\n" % SECRET, 1, None, "not KEY=VALUE"),
    ("DATABASE_PASSWORD %s\n" % SECRET, 1, None, "not KEY=VALUE"),  # no '=': the first word may be a value too
    ("p@%s=x\n" % SECRET, 1, None, "not KEY=VALUE"),
    ("9%s=x\n" % SECRET, 1, None, "not KEY=VALUE"),
    ("A=1\nDATABASE_PASSWORD='%s\nB=2\n" % SECRET, 2, "DATABASE_PASSWORD", "unterminated single quote"),
    ('REDIS_PASSWORD="%s\nB=2\n' % SECRET, 1, "REDIS_PASSWORD", "unterminated double quote"),
    ('SECRET_KEY="%s" %s\n' % (SECRET, SECRET), 1, "SECRET_KEY", "text after the closing quote"),
    ("SECRET_KEY='a\nb' %s\n" % SECRET, 1, "SECRET_KEY", "unterminated single quote"),  # no multi-line ''
    ('SECRET_KEY="a\n%s" %s\n' % (SECRET, SECRET), 2, "SECRET_KEY", "text after the closing quote"),
    ("%s='x\n" % SECRET, 1, None, "unterminated single quote"),  # a "key" with - and . is not shown: a value?
]


MALFORMED_IDS = ["bare-secret", "export-bare-secret", "no-equals", "odd-character-in-key", "key-starts-with-digit",
                 "unterminated-single", "unterminated-double", "text-after-quote", "single-quote-spans-no-line",
                 "text-after-multiline-quote", "key-not-a-plain-name"]
CLI_CASES = [0, 2, 5, 7, 10]


def expected_error(path, line, key, problem) -> str:
    return "%s line %d%s: %s" % (path, line, ", key %s" % key if key else "", problem)


@pytest.mark.parametrize("text,line,key,problem", MALFORMED, ids=MALFORMED_IDS)
def test_parse_errors_name_file_line_and_key_never_a_value(text, line, key, problem):
    with pytest.raises(dotenv.DotEnvError) as raised:
        dotenv.parse(text, "/opt/bookgen/.env")
    assert raised.value.message == expected_error("/opt/bookgen/.env", line, key, problem)
    assert SECRET[9:] not in str(raised.value) and "7f3a9c" not in str(raised.value)
    assert raised.value.exit_code == 3


def test_undecodable_bytes_are_placed_by_line_without_their_neighbours(tmp_path):
    path = tmp_path / ".env"
    path.write_bytes(b"A=1\nDATABASE_PASSWORD=" + SECRET.encode() + b"\xff\xfe\n")
    with pytest.raises(dotenv.DotEnvError) as raised:
        dotenv.read(str(path))
    assert raised.value.message == "%s line 2: not UTF-8 text" % path


# through the CLI: stderr and --json of commands that read the .env (no service is needed to reach the error)
ROOT = Path(__file__).resolve().parent.parent


def kit(*args, env):
    environment = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(ROOT), "HOME": "/nonexistent"}
    environment.update(env)
    return subprocess.run([sys.executable, "-m", "toolkit", *args], capture_output=True, text=True,
                          env=environment, timeout=120, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("text,line,key,problem", [MALFORMED[i] for i in CLI_CASES],
                         ids=[MALFORMED_IDS[i] for i in CLI_CASES])
def test_cli_reports_malformed_env_lines_without_the_secret(tmp_path, text, line, key, problem):
    host = make_host_tree(tmp_path / "host")
    good = host.env_file.read_text()
    host.env_file.write_text(good + text)
    line += len(good.splitlines())
    expected = expected_error(host.env_file, line, key, problem)
    env = {"BOOKGEN_KIT_APP_DIR": str(host.app_dir), "DOCKER_HOST": "unix://%s/no-docker.sock" % tmp_path,
           "BOOKGEN_KIT_HEALTH_URL": "http://127.0.0.1:9/health"}
    secrets = [SECRET, SECRET[9:], "7f3a9c"] + list(host.secrets.values())

    plain = kit("rotate", "plan", env=env)
    assert plain.returncode == 3
    assert plain.stderr.splitlines()[0] == "bookgen-kit: error: " + expected
    as_json = kit("--json", "rotate", "plan", env=env)
    assert as_json.returncode == 3
    assert json.loads(as_json.stdout)["error"]["message"] == expected
    triage = kit("--json", "triage", env=env)  # triage goes on: its database probe reports the error
    database = json.loads(triage.stdout)["probes"]["database"]["result"]
    assert database["reachable"] is False and database["error"] == expected
    for done in (plain, as_json, triage):
        for value in secrets:
            assert value not in done.stdout + done.stderr
