"""The core against real servers: forked children never harm the parent's sessions.

Each arm runs `tests.support.forkcheck` in a fresh interpreter (its own driver and
settings). Control arm: SERVERHOOKS_APP=0. Hooks arm: "serverhooks" in
INSTALLED_APPS, so its AppConfig installs the fork guard: no server hook runs here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import django
import pytest

from tests.support import dbserver, procs

pytestmark = pytest.mark.core

DRIVERS = [("mysql", ""), ("mysql", "pymysql"), ("postgres", ""), ("postgres", "psycopg2")]


def forkcheck(database_url: str, hooks: bool, *args: str) -> dict[str, Any]:
    env = {
        "DATABASE_URL": database_url,
        "SERVERHOOKS_APP": "1" if hooks else "0",
        "DJANGO_SETTINGS_MODULE": "tests.project.settings",
        "CONN_MAX_AGE": "3600",
        "PATH": "",
    }
    out = subprocess.run(
        [sys.executable, "-m", "tests.support.forkcheck", *args],
        cwd=procs.REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout)
    result["stderr"] = out.stderr
    return result


@pytest.mark.parametrize(("family", "driver"), DRIVERS, ids=[d or f"{f}-default" for f, d in DRIVERS])
def test_parent_session_survives_children_that_close_and_collect(
    family: str, driver: str, fresh_database: Callable[[str], str]
) -> None:
    url = dbserver.django_url(family, fresh_database(family), driver)

    control = forkcheck(url, False, "--child-closes", "--children", "3")
    assert control["children"][0]["session"] == control["parent_before"], "control: the child used the parent's session"
    assert "parent_error" in control, "control: a child's close() ended the parent's session"

    hooks = forkcheck(url, True, "--child-closes", "--children", "3")
    assert hooks.get("parent_error") is None, hooks
    assert hooks["parent_after"] == hooks["parent_before"]
    child_sessions = [child["session"] for child in hooks["children"]]
    assert all("error" not in child for child in hooks["children"]), hooks["children"]
    assert hooks["parent_before"] not in child_sessions
    assert len(set(child_sessions)) == len(child_sessions)
    assert "Traceback" not in hooks["stderr"]


@pytest.mark.parametrize("family", ["mysql", "postgres"])
def test_multiprocessing_fork_children_get_their_own_sessions(
    family: str, fresh_database: Callable[[str], str]
) -> None:
    url = dbserver.django_url(family, fresh_database(family))
    hooks = forkcheck(url, True, "--how", "multiprocessing", "--children", "4")
    sessions = [child["session"] for child in hooks["children"]]
    assert hooks["parent_after"] == hooks["parent_before"]
    assert hooks["parent_before"] not in sessions and len(set(sessions)) == 4


def test_connection_parked_in_another_thread_survives_a_fork(fresh_database: Callable[[str], str]) -> None:
    """CPython finalises other threads' locals in the child; mysqlclient then sends COM_QUIT."""
    url = dbserver.django_url("mysql", fresh_database("mysql"))
    control = forkcheck(url, False, "--thread-conn", "--children", "1")
    assert "error" in control["thread"], "control: the fork alone killed the parked thread's session"
    hooks = forkcheck(url, True, "--thread-conn", "--children", "1")
    assert hooks["thread"].get("after") == hooks["thread"]["before"], hooks["thread"]


@pytest.mark.skipif(django.VERSION < (5, 1), reason="Django's PostgreSQL pool is new in 5.1")
def test_django_pool_is_not_shared_with_children(fresh_database: Callable[[str], str]) -> None:
    """Django ticket 36957: the class-level pool dict survives fork."""
    url = dbserver.django_url("postgres", fresh_database("postgres"), extra_query="pool=1")
    control = forkcheck(url, False, "--child-closes", "--children", "2")
    assert control["pooled"]
    assert control["children"][0]["session"] == control["parent_before"], (
        "control: child got the parent's pooled session"
    )

    hooks = forkcheck(url, True, "--child-closes", "--children", "2")
    sessions = [child["session"] for child in hooks["children"]]
    assert hooks["parent_after"] == hooks["parent_before"]
    assert hooks["parent_before"] not in sessions


@pytest.mark.skipif(django.VERSION < (5, 1), reason="Django's PostgreSQL pool is new in 5.1")
@pytest.mark.parametrize("fix", ["clear", "delete"])
def test_django_fixing_its_pool_after_fork_too(fix: str, fresh_database: Callable[[str], str]) -> None:
    """Django's pending fix (ticket 36957, PR 20803) clears the pools dict in the child before
    serverhooks' guard runs: serverhooks finds it empty, or gone, and carries on without an error.
    (With the attribute gone, Django's own pool property fails in the child: that is Django's.)"""
    url = dbserver.django_url("postgres", fresh_database("postgres"), extra_query="pool=1")
    hooks = forkcheck(url, True, "--child-closes", "--children", "2", "--django-fork-fix", fix)
    assert hooks["parent_after"] == hooks["parent_before"]
    for child in hooks["children"]:
        assert child["serverhooks_errors"] == 0, child
        if fix == "clear":
            assert "error" not in child and child["session"] != hooks["parent_before"], child


def test_sqlite_child_never_uses_the_parents_handle(tmp_path: Any) -> None:
    url = f"sqlite:///{tmp_path}/fork.sqlite3"
    control = forkcheck(url, False, "--children", "2")
    assert control["children"][0]["raw_id_before_query"] == control["parent_raw_id"]

    hooks = forkcheck(url, True, "--children", "2")
    for child in hooks["children"]:
        assert child["raw_id_before_query"] is None
        assert child["raw_id"] != hooks["parent_raw_id"]
