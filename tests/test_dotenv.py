"""The .env reader: docker compose's rules, and a clear line number for what it cannot parse."""
from __future__ import annotations

import pytest

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
