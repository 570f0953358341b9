"""Issue 20, finding 1: the cursor guard closes only what must be closed, and never silently.

Each arm runs every case of tests/support/guardcases.py in one process, against a real server
through each driver. The control is the guard as it was (tests/support/guard_control.py):
plain Django cannot lose these writes, serverhooks could. Before the fix, a row written inside
atomic() was lost, with no error, whenever the code caught an exception that a query raised
before anything was sent: an execute_wrapper's refusal, a parameter the driver could not adapt.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support import dbserver, procs

pytestmark = pytest.mark.core

# (family, driver): every driver serverhooks supports. The signal cuts mysqlclient's query
# between sending it and reading its rows (the handler runs once the C call returns);
# psycopg2 without a wait callback runs the whole query in C, so nothing is ever cut there.
DRIVERS = [("mysql", "pymysql"), ("mysql", ""), ("postgres", ""), ("postgres", "psycopg2"), ("sqlite", "")]
DRIVER_IDS = ["pymysql", "mysqlclient", "psycopg", "psycopg2", "sqlite"]
CUT_MID_QUERY = {"pymysql", "mysqlclient", "psycopg"}
CUT_MID_COMMIT = {"pymysql", "psycopg"}  # the case stops these right after COMMIT went out
REFUSES_PARAMETERS = {"pymysql", "mysqlclient", "psycopg", "psycopg2"}


def run_cases(url: str, **env: str) -> dict[str, dict[str, Any]]:
    full_env = {**os.environ, "DATABASE_URL": url, "DJANGO_SETTINGS_MODULE": "tests.project.settings", **env}
    procs.create_schema(full_env)
    out = subprocess.run(
        [sys.executable, "-m", "tests.support.guardcases"],
        cwd=procs.REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    results: dict[str, dict[str, Any]] = json.loads(out.stdout.splitlines()[-1])
    return results


@pytest.fixture(params=DRIVERS, ids=DRIVER_IDS)
def driver_url(request: pytest.FixtureRequest, fresh_database: Callable[[str], str], tmp_path: Path) -> tuple[str, str]:
    family, driver = request.param
    name = driver or {"mysql": "mysqlclient", "postgres": "psycopg", "sqlite": "sqlite"}[family]
    if family == "sqlite":
        return name, f"sqlite:///{tmp_path}/guard.sqlite3"
    return name, dbserver.django_url(family, fresh_database(family), driver)


def test_the_guard_keeps_what_plain_django_keeps_and_fails_loudly_otherwise(driver_url: tuple[str, str]) -> None:
    driver, url = driver_url
    fixed = run_cases(url)
    control = run_cases(url, GUARD_CONTROL="1")
    print(f"{driver} fixed: {json.dumps(fixed, indent=1)}\n{driver} control: {json.dumps(control, indent=1)}")

    # Refused before sending, caught: the row is committed, as plain Django commits it.
    assert fixed["caught_refusal_inside_atomic"] == {"error": None, "rows": 1, "closed_interrupted": 0}
    assert fixed["skip_bad_rows"]["rows"] == 4 and fixed["skip_bad_rows"]["error"] is None
    # The same after an error reply was read (PyMySQL counts it as a whole reply); as in plain
    # Django, PostgreSQL alone has aborted the transaction at the error.
    after_error = fixed["refused_after_a_caught_database_error"]
    rows_as_plain_django = 0 if driver in ("psycopg", "psycopg2") else 1
    assert after_error == {"error": None, "rows": rows_as_plain_django, "closed_interrupted": 0}, after_error
    # The guard as it was: the connection closed under the transaction and the write lost, in
    # silence (or, with mysqlclient, an OperationalError 2006 where plain Django commits).
    assert (control["caught_refusal_inside_atomic"]["rows"], control["skip_bad_rows"]["rows"]) == (0, 0)
    assert control["caught_refusal_inside_atomic"]["closed_interrupted"] == 1

    if driver in REFUSES_PARAMETERS:
        adaptation = fixed["caught_adaptation_error_inside_atomic"]
        assert adaptation["raised"] in ("TypeError", "ValueError", "UnicodeEncodeError"), adaptation
        assert (adaptation["error"], adaptation["rows"], adaptation["closed_interrupted"]) == (None, 1, 0)
        assert control["caught_adaptation_error_inside_atomic"]["rows"] == 0

    if driver in CUT_MID_QUERY:
        # The reply was on its way: the session is closed, and the block says so at its exit.
        caught = fixed["caught_interrupt_inside_atomic"]
        assert caught["cut"] and caught["rows"] == 0 and caught["closed_interrupted"] == 1, caught
        assert caught["error"].startswith("TransactionLost: "), caught
        assert control["caught_interrupt_inside_atomic"]["error"] is None  # before: silence
        # The same with autocommit off, outside atomic(): before, the second row was committed on
        # a new session in autocommit and commit() did nothing (half a transaction, no error).
        by_hand = fixed["caught_interrupt_in_a_transaction_managed_by_hand"]
        assert by_hand["error"].startswith("TransactionLost: ") and by_hand["rows"] == 0, by_hand
        by_hand_before = control["caught_interrupt_in_a_transaction_managed_by_hand"]
        assert (by_hand_before["error"], by_hand_before["second_row"]) == (None, 1), by_hand_before
        propagated = fixed["interrupt_propagates_out_of_atomic"]
        assert propagated["error"] == "Cut: " and propagated["rows"] == 0 and propagated["follow_up_error"] is None

    if driver != "sqlite":
        # The server ended the session of a transaction managed by hand; then the idle-session
        # check ran (a Celery task's start). Before, it closed the session, and the next write
        # went in autocommit on a new one: half a transaction, no error. Now the transaction's
        # next query fails, as without serverhooks.
        ended = fixed["ended_session_in_a_transaction_managed_by_hand"]
        assert ended["ended"] >= 1 and ended["error"] is not None and ended["rows"] == 0, ended
        ended_before = control["ended_session_in_a_transaction_managed_by_hand"]
        assert (ended_before["error"], ended_before["second_row"]) == (None, 1), ended_before

    if driver in CUT_MID_COMMIT:
        # COMMIT went out, its reply never read: the block raises, the rows are all there or none,
        # and the next query runs on a new session instead of reading that reply.
        commit = fixed["interrupted_commit"]
        assert commit["error"] == "Cut: " and commit["rows"] in (0, 2) and commit["follow_up_right"], commit
        assert not control["interrupted_commit"]["follow_up_right"]  # before: a stray reply, or an error
