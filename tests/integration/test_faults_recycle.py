"""Family 5: workers that come and go leave no session behind and end theirs with a goodbye.

Gunicorn recycles workers (`max_requests`), reloads them all (SIGHUP) and kills one that
overran its `timeout`. Each session must end with a goodbye (MariaDB's `Aborted_clients`,
PostgreSQL's `sessions_abandoned` stay where they were), except the one of the worker
killed mid-query, and no session may outlive its worker.

The control, for gevent workers, is the same recycling without serverhooks: a session per
greenlet, and with PyMySQL each ends without a goodbye. Plain Django's sync workers already
end their sessions cleanly when recycled (mysqlclient and psycopg say goodbye when the
interpreter exits): there the test keeps serverhooks' own exit step from changing that.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import project_env
from tests.support import dbserver, http, procs

pytestmark = pytest.mark.gunicorn

WORKERS = 2
MAX_REQUESTS = 20
LOAD: dict[str, Any] = {"clients": 4, "per_client": 60}  # 240 requests: about 12 recycled workers


def abandoned(family: str, name: str) -> int:
    """Sessions that ended without the client's goodbye, as the server counts them."""
    if family == "mysql":
        return dbserver.aborted_clients()  # server-wide: the tests run one at a time
    dbserver.query(family, "SELECT pg_stat_clear_snapshot()")
    row = dbserver.query(family, "SELECT sessions_abandoned FROM pg_stat_database WHERE datname = %s", (name,))
    return int(row[0][0]) if row else 0


def wait_abandoned(family: str, name: str, at_most: int, timeout: float = 5.0) -> int:
    """PostgreSQL counts a session when its backend exits, a moment after the client went: poll (bounded)."""
    deadline = time.monotonic() + timeout
    value = abandoned(family, name)
    while value > at_most and time.monotonic() < deadline:
        time.sleep(0.2)
        value = abandoned(family, name)
    return value


def start(tmp_path: Path, servers: list[procs.Server], url: str, worker_class: str, hooks: bool) -> procs.Server:
    env = project_env(
        url,
        CONN_MAX_AGE=600,
        GUNICORN_WORKER_CLASS=worker_class,
        GUNICORN_MAX_REQUESTS=MAX_REQUESTS,
        GUNICORN_MAX_REQUESTS_JITTER=1,
        GUNICORN_TIMEOUT=2,
    )
    procs.create_schema(env)
    if hooks:
        server = procs.start_gunicorn(tmp_path, env, workers=WORKERS)
    else:
        settings = {"worker_class": worker_class, "max_requests": MAX_REQUESTS, "max_requests_jitter": 1}
        server = procs.start_gunicorn(tmp_path, env, settings=settings, workers=WORKERS)
    servers.append(server)
    server.wait_ready()
    return server


def driver_for(family: str, worker_class: str) -> str:
    return "pymysql" if family == "mysql" and worker_class == "gevent" else ""


def per_worker_bound(worker_class: str) -> int:
    return 10 if worker_class == "gevent" else 1  # the gevent pool's POOL_SIZE; one session otherwise


def assert_clean_load(server: procs.Server) -> None:
    run = http.marker_load(server.socket_path, **LOAD)
    assert run.ok == len(run.sent), (run.http_errors[:3], run.failures[:3])


@pytest.mark.parametrize("worker_class", ["sync", "gevent"])
@pytest.mark.parametrize("family", ["mysql", "postgres"])
def test_recycling_reload_and_a_killed_worker_leave_nothing_behind(
    family: str, worker_class: str, fresh_database: Callable[[str], str], servers: list[procs.Server], tmp_path: Path
) -> None:
    name = fresh_database(family)
    url = dbserver.django_url(family, name, driver_for(family, worker_class))
    bound = WORKERS * per_worker_bound(worker_class)
    figures: dict[str, Any] = {}

    if worker_class == "gevent":
        # Control: the same recycling without serverhooks. A session per greenlet, and PyMySQL's
        # end without a goodbye (psycopg's finaliser does say goodbye).
        control = start(tmp_path / "control", servers, url, worker_class, hooks=False)
        before = abandoned(family, name)
        run = http.marker_load(control.socket_path, **LOAD)
        control.stop()
        figures["control: distinct sessions"] = len({session for _pid, session in run.sessions})
        figures["control: sessions ended without a goodbye"] = wait_abandoned(family, name, before) - before
        assert figures["control: distinct sessions"] > bound
        if family == "mysql":
            assert figures["control: sessions ended without a goodbye"] > 0

    server = start(tmp_path / "hooks", servers, url, worker_class, hooks=True)
    before = abandoned(family, name)
    assert_clean_load(server)  # about a dozen workers recycled by max_requests
    figures["after recycling: sessions"] = len(dbserver.wait_sessions_at_most(family, name, bound))
    assert figures["after recycling: sessions"] <= bound

    old_workers = set(server.workers())
    os.kill(server.pid, signal.SIGHUP)  # a graceful reload of every worker
    deadline = time.monotonic() + 30
    while (set(server.workers()) & old_workers or len(server.workers()) < WORKERS) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert_clean_load(server)
    figures["after the reload: sessions"] = len(dbserver.wait_sessions_at_most(family, name, bound))
    assert figures["after the reload: sessions"] <= bound
    assert abandoned(family, name) == before, "recycled and reloaded workers said goodbye"

    # A worker stuck past its timeout (2 s) in a 4 s query: the master kills it.
    try:
        figures["overrunning request"] = http.get(server.socket_path, "/sleep?s=4", timeout=30)[0]
    except OSError as exc:  # a sync worker is killed before it answers
        figures["overrunning request"] = type(exc).__name__
    assert_clean_load(server)
    figures["after the kill: sessions ended without a goodbye"] = wait_abandoned(family, name, before + 1) - before
    assert figures["after the kill: sessions ended without a goodbye"] <= 1

    server.stop()
    figures["after a graceful stop: sessions"] = len(dbserver.wait_sessions_at_most(family, name, 0))
    assert figures["after a graceful stop: sessions"] == 0
    assert wait_abandoned(family, name, before + 1) - before <= 1
    print(f"{family} {worker_class}: {figures}")
