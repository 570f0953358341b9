"""Issue 22, part 4: POOL_SCOPE='transaction' gives a session back between transactions, and
only then (tests/support/scope_cases.py, on the real databases, with the threads' waiter).

The request scope is the comparison: there a page holds its session while it renders. The
control arm reverts two safeguards of the transaction scope: a statement that leaves state in
the session (a BEGIN by hand, a SET) no longer pins it, and a wrapper given back stays usable
through a reference kept from before. Then, on mysqlclient (which does not report an open
transaction), another unit's autocommitted row joins a hand-begun transaction and vanishes
with its ROLLBACK; and everywhere, two units run on one session. Plain Django has no pool.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support import dbserver, procs

pytestmark = pytest.mark.core

TARGETS = [("postgres", ""), ("mysql", ""), ("mysql", "pymysql")]


@pytest.fixture(scope="module", params=TARGETS, ids=["psycopg", "mysqlclient", "pymysql"])
def database(request: pytest.FixtureRequest) -> Iterator[str]:
    family, driver = request.param
    missing = dbserver.reachable(family)
    if missing:
        pytest.skip(missing)
    name = dbserver.create_database(family)
    try:
        yield dbserver.django_url(family, name, driver)
    finally:
        dbserver.drop_database(family, name)


def run_cases(url: str, scope: str, control: bool = False) -> dict[str, Any]:
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.project.settings",
        "DATABASE_URL": url,
        "CONN_MAX_AGE": "600",
        "SERVERHOOKS_POOL_SCOPE": scope,
        "SERVERHOOKS_TEST_SCOPE_CONTROL": "1" if control else "0",
    }
    out = subprocess.run(
        [sys.executable, "-m", "tests.support.scope_cases"],
        cwd=procs.REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    result: dict[str, Any] = json.loads(out.stdout.splitlines()[-1])
    return result


def test_request_scope_holds_the_session_while_the_page_renders(database: str) -> None:
    seen = run_cases(database, "request")
    assert seen["between"]["in_use_while_rendering"] == 1, seen
    assert seen["atomic"]["in_use_after_block"] == 1, seen


def test_transaction_scope_gives_back_between_transactions_and_never_inside_one(database: str) -> None:
    seen = run_cases(database, "transaction")
    assert seen["between"] == {"in_use_while_rendering": 0, "in_use_after": 0, "first_ok": True}, seen
    assert seen["atomic"] == {"same_session_in_block": True, "in_use_in_block": 1, "in_use_after_block": 0}, seen
    assert seen["pinned"] == {"in_use_after_set": 1, "warned": True, "warning_names_no_value": True}, seen
    assert seen["hand_begin"] == {"other_rows_committed": 1}, seen
    assert seen["kept_reference"] == {"keeper_refused": "DatabaseError", "two_units_on_one_session": False}, seen


def test_control_without_its_safeguards_two_units_share_a_session(database: str) -> None:
    seen = run_cases(database, "transaction", control=True)
    assert seen["kept_reference"]["two_units_on_one_session"] is True, seen
    assert seen["pinned"]["in_use_after_set"] == 0, seen
    if database.startswith("mysql://"):  # mysqlclient: nothing else sees the hand-begun transaction
        assert seen["hand_begin"] == {"other_rows_committed": 0}, seen
