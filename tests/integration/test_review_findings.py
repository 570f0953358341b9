"""The review findings of issue 11, each a test that failed on the code before its fix.

The cases run in processes of their own (tests/support/findings.py) against the real
servers. Where plain Django has no such failure, because the bug was serverhooks' own,
the control is the code as it was: each test below failed on commit b14b9ec (how, is
in its docstring).
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

from tests.conftest import require_server
from tests.support import dbserver, procs

pytestmark = pytest.mark.core


def run_case(case: str, url: str, **env: Any) -> dict[str, Any]:
    full_env = {**os.environ, "DATABASE_URL": url, "DJANGO_SETTINGS_MODULE": "tests.project.settings"}
    full_env.update({key: str(value) for key, value in env.items()})
    procs.create_schema(full_env)
    out = subprocess.run(
        [sys.executable, "-m", "tests.support.findings", case],
        cwd=procs.REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    result: dict[str, Any] = json.loads(out.stdout.splitlines()[-1])
    print(f"{case}: {result}")
    return result


@pytest.fixture(params=["mysql", "postgres"])
def url(request: pytest.FixtureRequest, fresh_database: Callable[[str], str]) -> str:
    return dbserver.django_url(request.param, fresh_database(request.param))


def test_an_eager_celery_task_leaves_the_callers_transaction_alone(url: str) -> None:
    """Before: task_postrun closed the connection (its autocommit differs inside atomic()),
    and the caller's next query failed ("connection already closed" or a TransactionManagementError)."""
    result = run_case("eager_celery_task_inside_atomic", url, CONN_MAX_AGE=600)
    assert result == {"error": None, "rows": 2}


def test_releasing_and_thread_leave_an_open_transaction_alone(url: str) -> None:
    """Before: `releasing()` inside atomic() closed the connection under the caller's transaction."""
    result = run_case("releasing_inside_atomic", url, CONN_MAX_AGE=600)
    assert result == {"error": None, "rows": 2}


def test_per_thread_release_replaces_a_session_the_server_ended(url: str) -> None:
    """Before: the thread kept its dead session, and every later task on it failed."""
    result = run_case("per_thread_release_after_the_session_ended", url, CONN_MAX_AGE=600)
    assert result["ended"] == 1 and result["error"] is None and result["third"] != result["first"]


def test_per_thread_release_applies_conn_max_age(url: str) -> None:
    """Before: a session outlived CONN_MAX_AGE for as long as the executor lived."""
    result = run_case("per_thread_release_applies_conn_max_age", url, CONN_MAX_AGE=1)
    assert result["second"] != result["first"]


def test_a_fork_never_trusts_an_earlier_forks_answer(url: str) -> None:
    """Before: the parent's before-fork step failed, the child kept the answer of the
    earlier fork ("nothing to abandon"), and kept the parent's socket."""
    result = run_case("stale_fork_answer", url, CONN_MAX_AGE=600)
    assert result == {"child_abandoned": True, "parent_still_works": True}


def test_a_failed_step_of_the_abandon_is_tried_again(tmp_path: Path) -> None:
    """Before: abandon_inherited() was marked done before its cache step, so a failure there
    was final: the child kept the parent's cache clients."""
    require_server("redis")
    result = run_case(
        "abandon_retries_a_failed_step",
        f"sqlite:///{tmp_path}/findings.sqlite3",
        CACHE_URL=dbserver.server_url("redis"),
    )
    assert result == {"fresh_cache_clients": True}


def test_greenlet_ids_reused_lose_no_pool_slot(tmp_path: Path) -> None:
    """Before: a new greenlet with a dead one's id overwrote its holding and that slot was lost
    for good: a pool of 2 then served one holder at a time, and the second timed out."""
    result = run_case("greenlet_ids_reused", f"sqlite:///{tmp_path}/findings.sqlite3", CONN_MAX_AGE=600)
    assert result["ids_reused"] > 0, "no id was reused: the case did not happen"
    assert result["errors"] == []


@pytest.mark.parametrize(("exit_wait", "busy", "closed"), [("0.3", 1, 0), ("5", 0, 1)])
def test_exit_waits_for_a_thread_inside_a_query_then_leaves_it(
    exit_wait: str, busy: int, closed: int, fresh_database: Callable[[str], str]
) -> None:
    """Before: exit closed another thread's connection at once, while that thread was inside a
    query on it. mysqlclient 2.2 refuses ("already in use from another thread"): serverhooks
    logged a WARNING, counted an error, and never closed the session cleanly, even once the
    query was over. Drivers without that guard share one socket between two threads."""
    url = dbserver.django_url("mysql", fresh_database("mysql"))
    result = run_case("exit_while_another_thread_queries", url, CONN_MAX_AGE=600, SERVERHOOKS_EXIT_WAIT=exit_wait)
    assert result["error"] is None, "the other thread's query completed"
    assert (result["busy_at_exit"], result["closed_at_exit"], result["errors"]) == (busy, closed, 0), result
