"""Family 3 under real Gunicorn gevent workers, counted on the database server.

Control arms run the same load without serverhooks: a session per client connection,
and with preload_app every request fails on the shared wrapper.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import project_env
from tests.support import dbserver, http, procs

pytestmark = pytest.mark.gunicorn

WORKERS = 2
POOL_SIZE = 10  # serverhooks' default
BURST = 1000
THREAD_SHARING = "can only be used in that same thread"
DRIVERS = [("mysql", "pymysql"), ("mysql", ""), ("postgres", ""), ("postgres", "psycopg2")]
DRIVER_IDS = ["pymysql", "mysqlclient", "psycopg", "psycopg2"]


def _start(
    tmp_path: Path,
    servers: list[procs.Server],
    url: str,
    *,
    hooks: bool = True,
    workers: int = WORKERS,
    preload: bool = False,
    **env: Any,
) -> procs.Server:
    full_env = project_env(url, CONN_MAX_AGE=600, GUNICORN_WORKER_CLASS="gevent", GUNICORN_LOGLEVEL="debug", **env)
    procs.create_schema(full_env)
    if hooks:
        full_env["GUNICORN_PRELOAD"] = "1" if preload else "0"
        server = procs.start_gunicorn(tmp_path, full_env, workers=workers)
    else:
        settings = {"worker_class": "gevent", "preload_app": preload}
        server = procs.start_gunicorn(tmp_path, full_env, settings=settings, workers=workers)
    servers.append(server)
    server.wait_ready()
    return server


def _worker_stats(server: procs.Server) -> list[dict[str, Any]]:
    return http.worker_stats(server.socket_path, WORKERS)


@pytest.mark.parametrize("family", ["mysql", "postgres"])
def test_control_arm_a_session_per_client_connection(
    family: str, fresh_database: Callable[[str], str], servers: list[procs.Server], tmp_path: Path
) -> None:
    name = fresh_database(family)
    driver = "pymysql" if family == "mysql" else ""
    server = _start(tmp_path, servers, dbserver.django_url(family, name, driver), hooks=False)
    with dbserver.SessionSampler(family, name) as sampler:
        run = http.marker_load(server.socket_path, clients=20, per_client=BURST // 20)
    distinct = {session for _pid, session in run.sessions}
    still_open = dbserver.sessions_or_none(family, name)
    left_open = "too many to connect" if still_open is None else len(still_open)
    print(
        f"control {family}: {len(distinct)} distinct sessions for {run.ok} answered requests, "
        f"{len(run.http_errors)} refused, peak {sampler.peak} open, {left_open} still open after the burst"
    )
    assert run.wrong == []
    assert len(distinct) >= 0.9 * run.ok, "without serverhooks every client connection opens a session"
    assert run.ok >= 100
    assert still_open is None or len(still_open) > 0, "sessions are left open after the burst"
    assert sampler.peak > WORKERS * POOL_SIZE or sampler.refused, "sessions pile up until the server refuses"


@pytest.mark.parametrize(("family", "driver"), DRIVERS, ids=DRIVER_IDS)
def test_hooks_arm_sessions_stay_within_the_bound(
    family: str, driver: str, fresh_database: Callable[[str], str], servers: list[procs.Server], tmp_path: Path
) -> None:
    name = fresh_database(family)
    server = _start(tmp_path, servers, dbserver.django_url(family, name, driver))
    with dbserver.SessionSampler(family, name) as sampler:
        run = http.marker_load(server.socket_path, clients=20, per_client=BURST // 20)
    assert run.failures == [] and run.http_errors == [] and run.wrong == []
    assert run.ok == BURST
    distinct = {session for _pid, session in run.sessions}
    bound = WORKERS * POOL_SIZE
    assert len(distinct) <= bound, f"{len(distinct)} distinct sessions for {BURST} requests"
    time.sleep(5)
    stats = _worker_stats(server)
    pool_counters = [{k: v for k, v in s.items() if k.startswith(("pool", "closed"))} for s in stats]
    # On failure the counters say whether a worker replaced a session (a closed backend can
    # still show on the server for a moment while its replacement connects).
    assert sampler.peak <= bound, f"peak {sampler.peak}; {len(distinct)} distinct; {pool_counters}"
    assert len(dbserver.sessions(family, name)) <= bound
    stored = {row[0] for row in dbserver.query(family, "SELECT marker FROM sh_hit", database=name)}
    assert stored == set(run.sent)
    assert sum(s["pool_reused"] for s in stats) > 0
    assert all(s["pool_opened"] <= POOL_SIZE for s in stats), pool_counters
    log = server.log()
    if driver == "":
        assert ("mysqlclient blocks the gevent hub" in log) == (family == "mysql")
    if driver == "psycopg2":
        assert "psycopg2 wait callback (psycogreen)" in log
    print(f"hooks {family}/{driver or 'default'}: {len(distinct)} distinct sessions, peak {sampler.peak}")


def test_hooks_arm_sqlite(servers: list[procs.Server], tmp_path: Path) -> None:
    server = _start(tmp_path, servers, f"sqlite:///{tmp_path}/gevent.sqlite3")
    run = http.marker_load(server.socket_path, clients=10, per_client=50)
    assert run.ok == 500 and run.wrong == [] and run.failures == [] and run.http_errors == []
    assert all(s["pool_opened"] <= POOL_SIZE for s in _worker_stats(server))


@pytest.mark.parametrize("family", ["mysql", "postgres"])
def test_200_clients_never_exceed_the_bound(
    family: str, fresh_database: Callable[[str], str], servers: list[procs.Server], tmp_path: Path
) -> None:
    name = fresh_database(family)
    driver = "pymysql" if family == "mysql" else ""
    server = _start(
        tmp_path,
        servers,
        dbserver.django_url(family, name, driver),
        SERVERHOOKS_POOL_SIZE=3,
        SERVERHOOKS_POOL_TIMEOUT=60,
    )
    with dbserver.SessionSampler(family, name, interval=0.02) as sampler:
        statuses = http.concurrent_gets(server.socket_path, "/sleep?s=0.05", clients=200, per_client=2)
    assert statuses == {200: 400}
    assert 0 < sampler.peak <= WORKERS * 3
    assert sum(s["pool_waits"] for s in _worker_stats(server)) > 0, "greenlets did wait for each other"


def test_checkout_timeout_names_the_settings(
    fresh_database: Callable[[str], str], servers: list[procs.Server], tmp_path: Path
) -> None:
    name = fresh_database("postgres")
    server = _start(
        tmp_path,
        servers,
        dbserver.django_url("postgres", name),
        workers=1,
        SERVERHOOKS_POOL_SIZE=1,
        SERVERHOOKS_POOL_TIMEOUT=0.3,
    )
    with dbserver.SessionSampler("postgres", name, interval=0.02) as sampler:
        statuses = http.concurrent_gets(server.socket_path, "/sleep?s=1", clients=4, per_client=1)
    assert statuses.get(500, 0) >= 1 and statuses.get(200, 0) >= 1, statuses
    assert sampler.peak <= 1
    log = server.log()
    assert "POOL_TIMEOUT=0.3 s; all POOL_SIZE=1 are in use" in log


@pytest.mark.parametrize(
    ("family", "driver"),
    [("mysql", "pymysql"), ("postgres", ""), ("postgres", "psycopg2")],
    ids=["pymysql", "psycopg", "psycopg2"],
)
def test_preload_queries_overlap_without_thread_sharing_errors(
    family: str, driver: str, fresh_database: Callable[[str], str], servers: list[procs.Server], tmp_path: Path
) -> None:
    name = fresh_database(family)
    url = dbserver.django_url(family, name, driver)
    server = _start(tmp_path, servers, url, workers=1, preload=True, QUERY_AT_IMPORT=1)
    started = time.monotonic()
    statuses = http.concurrent_gets(server.socket_path, "/sleep?s=0.2", clients=50, per_client=1)
    took = time.monotonic() - started
    assert statuses == {200: 50}
    # 50 x 0.2 s in SQL over POOL_SIZE=10 sessions: ~1 s when they overlap, 10 s when not.
    assert took < 2.5, f"50 sleeps took {took:.2f} s: queries did not overlap"
    assert THREAD_SHARING not in server.log()
    print(f"preload {family}/{driver or 'default'}: 50 x 0.2 s took {took:.2f} s")


def test_preload_control_arm_fails_on_the_shared_wrapper(
    fresh_database: Callable[[str], str], servers: list[procs.Server], tmp_path: Path
) -> None:
    name = fresh_database("postgres")
    server = _start(
        tmp_path,
        servers,
        dbserver.django_url("postgres", name),
        hooks=False,
        workers=1,
        preload=True,
        QUERY_AT_IMPORT=1,
    )
    statuses = http.concurrent_gets(server.socket_path, "/echo?m=x", clients=10, per_client=10)
    assert statuses == {500: 100}, statuses


def test_opting_out_keeps_per_greenlet_state_but_no_pool(
    fresh_database: Callable[[str], str], servers: list[procs.Server], tmp_path: Path
) -> None:
    name = fresh_database("postgres")
    server = _start(
        tmp_path,
        servers,
        dbserver.django_url("postgres", name),
        preload=True,
        QUERY_AT_IMPORT=1,
        SERVERHOOKS_GEVENT_POOL=0,
    )
    run = http.marker_load(server.socket_path, clients=10, per_client=10)
    assert run.ok == 100 and THREAD_SHARING not in server.log()
    assert len({session for _pid, session in run.sessions}) > WORKERS * POOL_SIZE, "no pool: Django's own behaviour"


@pytest.mark.parametrize("family", ["mysql", "postgres"])
def test_hygiene_between_greenlets(
    family: str, fresh_database: Callable[[str], str], servers: list[procs.Server], tmp_path: Path
) -> None:
    """One worker, POOL_SIZE=1: every request gets the connection the previous one used."""
    name = fresh_database(family)
    driver = "pymysql" if family == "mysql" else ""
    server = _start(
        tmp_path,
        servers,
        dbserver.django_url(family, name, driver),
        workers=1,
        SERVERHOOKS_POOL_SIZE=1,
        SERVERHOOKS_POOL_TIMEOUT=3,
    )
    sock = server.socket_path
    clean = {"autocommit": True, "in_atomic_block": False, "in_transaction": False}

    # Autocommit left off: Django itself closes such a connection at request end.
    http.get_json(sock, "/leave-transaction-open?m=uncommitted")
    assert {key: http.get_json(sock, "/state")[key] for key in clean} == clean
    assert http.get_json(sock, "/count?m=uncommitted")["count"] == 0

    # A raw BEGIN that Django does not know about: the pool rolls it back and reuses the session.
    began = http.get_json(sock, "/begin-behind-djangos-back?m=raw-begin")
    after = http.get_json(sock, "/state")
    assert {key: after[key] for key in clean} == clean
    assert after["session"] == began["session"], "rolled back and reused, not reconnected"
    assert http.get_json(sock, "/count?m=raw-begin")["count"] == 0

    assert http.get(sock, "/raise-inside-atomic?m=atomic")[0] == 500
    assert {key: http.get_json(sock, "/state")[key] for key in clean} == clean
    assert http.get_json(sock, "/count?m=atomic")["count"] == 0

    if family == "postgres":
        http.get_json(sock, "/set-time-zone")
        assert http.get_json(sock, "/state")["time_zone"] == "UTC"

    # A session killed on the server while idle in the pool costs no failed request.
    victim = http.get_json(sock, "/state")["session"]
    kill = f"KILL {int(victim)}" if family == "mysql" else f"SELECT pg_terminate_backend({int(victim)})"
    dbserver.query(family, kill)
    deadline = time.monotonic() + 5
    while victim in dbserver.sessions(family, name) and time.monotonic() < deadline:
        time.sleep(0.05)
    replaced = http.get_json(sock, "/state")
    assert replaced["session"] != victim

    # A greenlet that dies holding a connection gives it back: with POOL_SIZE=1 and
    # POOL_TIMEOUT=3 s, the next request would fail if it were not reclaimed.
    spawned = http.get_json(sock, "/spawn-and-forget")
    started = time.monotonic()
    assert http.get_json(sock, "/state")["session"] == spawned["spawned_session"]
    assert time.monotonic() - started < 1.0
    (stats,) = _worker_stats_one(server)
    assert stats["pool_reclaimed"] >= 1 and stats["pool_discarded"] >= 1


def _worker_stats_one(server: procs.Server) -> list[dict[str, Any]]:
    return [http.get_json(server.socket_path, "/whoami")["serverhooks"]]
