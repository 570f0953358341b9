"""Family 5, in one process: a query cut short in the client never reaches the next query.

A timer signal raises a non-database exception during the server's think time, or halfway
through a reply of 10 MB, on a real connection (tests/support/interrupts.py). The control
is serverhooks with its guard switched off (SERVERHOOKS_CLOSE_INTERRUPTED=0), because plain
Django behaves the same: the next query on that connection fails, or reads the old reply.

PyMySQL and psycopg 3 can be interrupted this way. mysqlclient and psycopg2 (without a wait
callback) run the whole query in C and only see the signal once it is over: nothing is cut.
Under gevent, psycopg2 with psycogreen is interrupted too: see test_faults_gevent.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

from tests.support import dbserver, procs

pytestmark = pytest.mark.core

DRIVERS = [("mysql", "pymysql"), ("postgres", "")]


def cut_query(url: str, cut: str, guard: bool) -> dict[str, Any]:
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "DJANGO_SETTINGS_MODULE": "tests.project.settings",
        "SERVERHOOKS_CLOSE_INTERRUPTED": "1" if guard else "0",
    }
    out = subprocess.run(
        [sys.executable, "-m", "tests.support.interrupts", "--cut", cut],
        cwd=procs.REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout.splitlines()[-1])
    assert result["cut"], "the timer did not interrupt the query"
    return result


@pytest.mark.parametrize("cut", ["think", "reply"])
@pytest.mark.parametrize(("family", "driver"), DRIVERS, ids=["pymysql", "psycopg"])
def test_an_interrupted_query_is_never_handed_on(
    family: str, driver: str, cut: str, fresh_database: Callable[[str], str]
) -> None:
    url = dbserver.django_url(family, fresh_database(family), driver)
    control = cut_query(url, cut, guard=False)
    print(f"control {family}/{driver or 'psycopg'} cut during the {cut}: {control}")
    # Without the guard the next query runs into the old reply: an error, or the wrong answer.
    assert control.get("error") or control.get("answer_right") is False, control
    fixed = cut_query(url, cut, guard=True)
    assert fixed.get("error") is None and fixed["answer_right"] is True, fixed
    assert fixed["session_after"] != fixed["session_before"], "the interrupted session is not reused"
    assert fixed["serverhooks"]["closed_interrupted"] == 1
