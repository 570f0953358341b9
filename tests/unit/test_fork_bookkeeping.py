"""serverhooks' own bookkeeping across real forks: the once() lock, holds of threads that fork at
once, and a fork guard installed on its own. Each case runs in a process of its own
(tests/support/forkcases.py); the control arm is serverhooks with the fix reverted, because plain
Django has none of this bookkeeping to get wrong (its own failure, a shared socket, is the symptom).
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


def run_case(case: str, arm: str, url: str = "") -> dict[str, Any]:
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.project.settings"}
    env.update(CONN_MAX_AGE="600", SERVERHOOKS_PROBE_DATABASES="0", SERVERHOOKS_APP="0")
    if url:
        env["DATABASE_URL"] = url
    out = subprocess.run(
        [sys.executable, "-W", "ignore::DeprecationWarning", "-m", "tests.support.forkcases", case, arm],
        cwd=procs.REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    result: dict[str, Any] = json.loads(out.stdout.splitlines()[-1])
    print(f"{case} {arm}: {result}")
    return result


def session_left_alone(result: dict[str, Any], child: dict[str, Any]) -> bool:
    """The child holds none of the parent's database sockets, and thread C's session still answers."""
    assert result["parent_sockets"] >= 1, result
    return child == {"shares": []} and result["session_kept"] and result["error"] is None


def test_once_answers_in_a_child_forked_while_another_thread_held_its_lock() -> None:
    """Before: the child inherited the lock held, by a thread that does not exist there: its first
    once() (every adapter's setup_once) hung for good. The control hangs and is killed after 2 s."""
    assert run_case("once_lock", "reverted") == {"hung": True}
    assert run_case("once_lock", "fixed") == {"once": True}


@pytest.fixture(params=["mysql", "postgres"])
def url(request: pytest.FixtureRequest, fresh_database: Callable[[str], str]) -> str:
    return dbserver.django_url(request.param, fresh_database(request.param))


def test_two_threads_forking_at_once_keep_their_own_holds(url: str) -> None:
    """Before: one hold slot per process. A's release emptied it between B's hold and B's fork, so
    nothing kept thread C's connection referenced in B's child: a garbage collection there finalised
    it (mysqlclient: COM_QUIT, the parent's session lost; psycopg: its socket stayed in the child)."""
    control = run_case("concurrent_forks", "reverted", url)
    assert not session_left_alone(control, control["children"]["B"]), control
    fixed = run_case("concurrent_forks", "fixed", url)
    assert session_left_alone(fixed, fixed["children"]["A"]), fixed
    assert session_left_alone(fixed, fixed["children"]["B"]), fixed


def test_install_fork_guard_alone_reaches_other_threads_connections(url: str) -> None:
    """Before: install_fork_guard() did not track connections, so the child never abandoned
    thread C's (mysqlclient: COM_QUIT at the child's gc.collect(); psycopg: a shared socket).
    Installed before Django is loaded, the guard still does not import django.db itself."""
    control = run_case("guard_alone", "reverted", url)
    assert not session_left_alone(control, control["child"]), control
    fixed = run_case("guard_alone", "fixed", url)
    assert session_left_alone(fixed, fixed["child"]), fixed
    assert fixed["imported_by_the_guard"] is False
