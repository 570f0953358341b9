"""Family 4 under real Gunicorn `-k asgi`, uvicorn and hypercorn, counted on the database server.

Django's ASGI handler runs each request's sync code in a thread of its own, so without
serverhooks every request opens a session, and with CONN_MAX_AGE > 0 they pile up (the
control arms). With serverhooks each worker has a bounded pool (serverhooks.asgi).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import project_env
from tests.support import dbserver, http, procs

pytestmark = pytest.mark.gunicorn

WORKERS = 2
POOL_SIZE = 4
BOUND = WORKERS * POOL_SIZE
BURST = 400
ASGI_APP = "tests.project.asgi:application"
FAMILIES = [("mysql", ""), ("postgres", "")]
ALL_DRIVERS = [("mysql", ""), ("mysql", "pymysql"), ("postgres", ""), ("postgres", "psycopg2")]
ALL_DRIVER_IDS = ["mysqlclient", "pymysql", "psycopg", "psycopg2"]


def _env(url: str, conn_max_age: int = 600, **extra: Any) -> dict[str, str]:
    settings: dict[str, Any] = {"GUNICORN_WORKER_CLASS": "asgi", "GUNICORN_LOGLEVEL": "debug"}
    settings["SERVERHOOKS_POOL_SIZE"] = POOL_SIZE
    env = project_env(url, CONN_MAX_AGE=conn_max_age, **{**settings, **extra})
    procs.create_schema(env)
    return env


def _gunicorn(
    tmp_path: Path,
    servers: list[procs.Server],
    env: dict[str, str],
    *,
    hooks: bool = True,
    preload: bool = False,
    workers: int = WORKERS,
) -> procs.Server:
    if hooks:
        env = {**env, "GUNICORN_PRELOAD": "1" if preload else "0"}
        server = procs.start_gunicorn(tmp_path, env, app=ASGI_APP, workers=workers)
    else:
        settings = {"worker_class": "asgi", "preload_app": preload}
        server = procs.start_gunicorn(tmp_path, env, settings=settings, app=ASGI_APP, workers=workers)
    servers.append(server)
    server.wait_ready()
    return server


def _asgi_server(
    kind: str, tmp_path: Path, servers: list[procs.Server], env: dict[str, str], *, hooks: bool
) -> procs.Server:
    server = procs.start_asgi_server(kind, tmp_path, {**env, "SERVERHOOKS_TEST_ASGI_WRAP": "1" if hooks else "0"})
    servers.append(server)
    server.wait_ready(timeout=60)
    return server


def _worker_stats(server: procs.Server) -> list[dict[str, Any]]:
    return http.worker_stats(server.socket_path, WORKERS)


def _pool_figures(stats: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{key: value for key, value in s.items() if key.startswith("pool")} for s in stats]


def _assert_clean(run: http.MarkerRun, expected: int) -> None:
    assert run.failures == [] and run.http_errors[:3] == [] and run.wrong == [], (
        run.failures[:3],
        run.http_errors[:3],
        run.wrong[:3],
    )
    assert run.ok == expected


def _burst_and_count(server: procs.Server, family: str, name: str, endpoint: str = "/echo") -> dict[str, Any]:
    with dbserver.SessionSampler(family, name) as sampler:
        run = http.marker_load(server.socket_path, clients=20, per_client=BURST // 20, endpoint=endpoint)
    time.sleep(5)  # what is still open 5 s after the burst is what the workers keep
    after_idle = dbserver.sessions_or_none(family, name)
    return {
        "run": run,
        "distinct": len({session for _pid, session in run.sessions}),
        "peak": sampler.peak,
        "refused": sampler.refused,
        "after_idle": None if after_idle is None else len(after_idle),
    }


# ----------------------------------------------------------------- Gunicorn -k asgi


@pytest.mark.parametrize(("family", "driver"), FAMILIES, ids=["mysql", "postgres"])
def test_control_arm_a_session_per_request_and_the_leak(
    family: str, driver: str, fresh_database: Callable[[str], str], servers: list[procs.Server], tmp_path: Path
) -> None:
    name = fresh_database(family)
    server = _gunicorn(tmp_path, servers, _env(dbserver.django_url(family, name, driver)), hooks=False)
    seen = _burst_and_count(server, family, name)
    run = seen["run"]
    print(
        f"asgi control {family}: {seen['distinct']} sessions for {run.ok} answers, peak {seen['peak']}, "
        f"{seen['after_idle']} open 5 s after the burst, {len(run.http_errors)} refused"
    )
    assert run.wrong == []
    assert seen["distinct"] >= 0.9 * run.ok, "without serverhooks every ASGI request opens a session"
    assert seen["peak"] > BOUND or seen["refused"], "sessions pile up beyond the pool's bound"


@pytest.mark.parametrize(("family", "driver"), ALL_DRIVERS, ids=ALL_DRIVER_IDS)
def test_gunicorn_asgi_sessions_stay_within_the_bound(
    family: str, driver: str, fresh_database: Callable[[str], str], servers: list[procs.Server], tmp_path: Path
) -> None:
    name = fresh_database(family)
    server = _gunicorn(tmp_path, servers, _env(dbserver.django_url(family, name, driver)))
    seen = _burst_and_count(server, family, name)
    _assert_clean(seen["run"], BURST)
    stats = _worker_stats(server)
    print(
        f"asgi hooks {family}/{driver or 'default'}: {seen['distinct']} sessions, peak {seen['peak']}, "
        f"{seen['after_idle']} after 5 s idle; {_pool_figures(stats)}"
    )
    assert seen["distinct"] <= BOUND
    assert seen["peak"] <= BOUND
    assert seen["after_idle"] is not None and seen["after_idle"] <= BOUND
    # Fault-free: discards are the only reason to open more than the bound, and there are none.
    assert sum(s["pool_opened"] for s in stats) <= BOUND
    assert sum(s["pool_discarded"] for s in stats) == 0
    assert sum(s["pool_reused"] for s in stats) > 0
    stored = {row[0] for row in dbserver.query(family, "SELECT marker FROM sh_hit", database=name)}
    assert stored == set(seen["run"].sent)


def test_gunicorn_with_uvicorns_worker_class(
    fresh_database: Callable[[str], str], servers: list[procs.Server], tmp_path: Path
) -> None:
    """`-k uvicorn.workers.UvicornWorker`: the same one line installs the same pool."""
    pytest.importorskip("uvicorn.workers")
    name = fresh_database("mysql")
    env = {**_env(dbserver.django_url("mysql", name)), "GUNICORN_WORKER_CLASS": "uvicorn.workers.UvicornWorker"}
    server = _gunicorn(tmp_path, servers, env)
    seen = _burst_and_count(server, "mysql", name)
    _assert_clean(seen["run"], BURST)
    assert seen["distinct"] <= BOUND and seen["peak"] <= BOUND
    assert sum(s["pool_opened"] for s in _worker_stats(server)) <= BOUND


def test_gunicorn_asgi_sqlite(servers: list[procs.Server], tmp_path: Path) -> None:
    server = _gunicorn(tmp_path, servers, _env(f"sqlite:///{tmp_path}/asgi.sqlite3"))
    run = http.marker_load(server.socket_path, clients=10, per_client=20)
    _assert_clean(run, 200)
    assert all(0 < s["pool_opened"] <= POOL_SIZE for s in _worker_stats(server))


@pytest.mark.parametrize(("family", "driver"), FAMILIES, ids=["mysql", "postgres"])
def test_async_orm_atomic_and_streaming_use_the_requests_connection(
    family: str, driver: str, fresh_database: Callable[[str], str], servers: list[procs.Server], tmp_path: Path
) -> None:
    name = fresh_database(family)
    server = _gunicorn(tmp_path, servers, _env(dbserver.django_url(family, name, driver)))
    sessions: set[Any] = set()
    for _ in range(40):
        marker = uuid.uuid4().hex
        data = http.get_json(server.socket_path, f"/async/orm?m={marker}")
        assert data["m"] == marker
        assert len(set(data["sessions"])) == 1, "sync_to_async calls of one request ran on two sessions"
        sessions.add((data["pid"], data["sessions"][0]))
        status, body = http.get(server.socket_path, f"/async/stream?m={marker}")
        lines = body.decode().split()
        assert status == 200 and lines[0::2] == [marker] * 3
        assert len(set(lines[1::2])) == 1, "a streaming response's chunks ran on two sessions"
        sessions.add((None, lines[1]))
    assert len({session for _pid, session in sessions}) <= BOUND
    assert len(dbserver.sessions(family, name)) <= BOUND


def _hang_up_mid_request(socket_path: str, url: str) -> None:
    """Send a request and close the connection before the answer comes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(5)
        client.connect(socket_path)
        client.sendall(f"GET {url} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        time.sleep(0.05)  # the request reached the view: its query is running


@pytest.mark.parametrize(("family", "driver"), FAMILIES, ids=["mysql", "postgres"])
def test_clients_that_hang_up_leak_no_slot(
    family: str, driver: str, fresh_database: Callable[[str], str], servers: list[procs.Server], tmp_path: Path
) -> None:
    name = fresh_database(family)
    env = _env(dbserver.django_url(family, name, driver), SERVERHOOKS_POOL_SIZE=2, SERVERHOOKS_POOL_TIMEOUT=5)
    server = _gunicorn(tmp_path, servers, env)
    for _ in range(20):  # 10 times each worker's 2 slots
        _hang_up_mid_request(server.socket_path, "/async/slow?s=0.3")
    time.sleep(1.0)  # the abandoned views finish their queries
    run = http.marker_load(server.socket_path, clients=8, per_client=10, endpoint="/async/orm")
    _assert_clean(run, 80)
    stats = _worker_stats(server)
    assert all(s["pool_opened"] <= 2 for s in stats), _pool_figures(stats)
    assert len(dbserver.sessions(family, name)) <= WORKERS * 2


@pytest.mark.parametrize("release", [False, True], ids=["control-no-release", "releasing"])
def test_work_outside_a_request_gives_its_slot_back_with_releasing(
    release: bool, fresh_database: Callable[[str], str], servers: list[procs.Server], tmp_path: Path
) -> None:
    name = fresh_database("postgres")
    env = _env(dbserver.django_url("postgres", name), SERVERHOOKS_POOL_SIZE=1, SERVERHOOKS_POOL_TIMEOUT=1)
    server = _gunicorn(tmp_path, servers, env, workers=1)  # one worker, one slot: the request must wait for it
    assert http.get_json(server.socket_path, f"/async/background?release={int(release)}")["released"] is release
    status, body = http.get(server.socket_path, f"/echo?m={uuid.uuid4().hex}")
    if release:
        assert status == 200, body[:300]
    else:
        # The control: a thread outside any request keeps the worker's only slot.
        assert status == 500, body[:300]
        deadline = time.monotonic() + 10  # the worker's WARNING reaches its log a moment later
        while "releasing()" not in server.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "POOL_TIMEOUT" in server.log() and "releasing()" in server.log()


def test_conn_max_age_0_reuses_and_above_0_caps(
    fresh_database: Callable[[str], str], servers: list[procs.Server], tmp_path: Path
) -> None:
    name = fresh_database("mysql")
    url = dbserver.django_url("mysql", name)
    reused = _gunicorn(tmp_path / "cma0", servers, _env(url, conn_max_age=0))
    run = http.marker_load(reused.socket_path, clients=4, per_client=25)
    _assert_clean(run, 100)
    assert len({session for _pid, session in run.sessions}) <= BOUND, "CONN_MAX_AGE=0 under the pool reuses"
    reused.stop()
    capped = _gunicorn(tmp_path / "cma1", servers, _env(url, conn_max_age=1))
    first = http.marker_load(capped.socket_path, clients=4, per_client=10)
    time.sleep(1.5)
    second = http.marker_load(capped.socket_path, clients=4, per_client=10)
    _assert_clean(first, 40)
    _assert_clean(second, 40)
    before = {session for _pid, session in first.sessions}
    after = {session for _pid, session in second.sessions}
    assert before.isdisjoint(after), "a session past CONN_MAX_AGE was reused"
    assert sum(s["pool_discarded"] for s in _worker_stats(capped)) > 0


@pytest.mark.parametrize("family", ["mysql", "postgres"])
def test_preload_app_with_a_query_in_the_master(
    family: str, fresh_database: Callable[[str], str], servers: list[procs.Server], tmp_path: Path
) -> None:
    name = fresh_database(family)
    env = _env(dbserver.django_url(family, name), QUERY_AT_IMPORT=1)
    server = _gunicorn(tmp_path, servers, env, preload=True)
    run = http.marker_load(server.socket_path, clients=10, per_client=20)
    _assert_clean(run, 200)
    assert run.inherited == 0
    held = procs.db_sockets([server.pid, *server.workers()], dbserver.port(family))
    assert procs.shared_inodes(held) == {}
    assert len(dbserver.sessions(family, name)) <= BOUND


def test_200_clients_never_exceed_the_bound(
    fresh_database: Callable[[str], str], servers: list[procs.Server], tmp_path: Path
) -> None:
    name = fresh_database("postgres")
    env = _env(dbserver.django_url("postgres", name), SERVERHOOKS_POOL_SIZE=3, SERVERHOOKS_POOL_TIMEOUT=60)
    server = _gunicorn(tmp_path, servers, env)
    with dbserver.SessionSampler("postgres", name, interval=0.02) as sampler:
        # Gunicorn 27's asgi worker re-listens with asyncio's default backlog of 100, whatever
        # `backlog` says: connects beyond it are refused (EAGAIN) before any worker sees them.
        statuses = http.concurrent_gets(
            server.socket_path, "/sleep?s=0.05", clients=200, per_client=2, timeout=90, retry_full_backlog=True
        )
    assert statuses == {200: 400}
    assert 0 < sampler.peak <= WORKERS * 3
    assert sum(s["pool_waits"] for s in _worker_stats(server)) > 0


def test_djangos_own_pool_is_left_alone_and_said_once(
    fresh_database: Callable[[str], str], servers: list[procs.Server], tmp_path: Path
) -> None:
    name = fresh_database("postgres")
    server = _gunicorn(tmp_path, servers, _env(dbserver.django_url("postgres", name, extra_query="pool=1")))
    run = http.marker_load(server.socket_path, clients=10, per_client=20)
    _assert_clean(run, 200)
    stats = _worker_stats(server)
    assert all(s["pool_opened"] == 0 for s in stats), _pool_figures(stats)
    said = "uses Django's own pool (OPTIONS['pool']); serverhooks leaves it alone"
    assert server.log().count(said) == WORKERS  # once per worker, in each worker's log lines
    # Django's pool (max_size 4 per worker in the test project) bounds the sessions itself.
    assert len(dbserver.sessions("postgres", name)) <= WORKERS * 4


@pytest.mark.parametrize("worker_class", ["sync", "gthread"])
def test_sync_and_gthread_workers_keep_their_behaviour(
    worker_class: str, fresh_database: Callable[[str], str], servers: list[procs.Server], tmp_path: Path
) -> None:
    name = fresh_database("mysql")
    env = {**_env(dbserver.django_url("mysql", name)), "GUNICORN_WORKER_CLASS": worker_class, "GUNICORN_THREADS": "4"}
    server = procs.start_gunicorn(tmp_path, env, workers=WORKERS)
    servers.append(server)
    server.wait_ready()
    run = http.marker_load(server.socket_path, clients=4, per_client=10)
    _assert_clean(run, 40)
    stats = _worker_stats(server)
    assert all(s["pool_opened"] == 0 and s["pool_reused"] == 0 for s in stats), _pool_figures(stats)
    assert "ASGI pool" not in server.log()


# ----------------------------------------------------------------- uvicorn, hypercorn


@pytest.mark.parametrize("hooks", [False, True], ids=["control", "pooled"])
@pytest.mark.parametrize(("family", "driver"), FAMILIES, ids=["mysql", "postgres"])
@pytest.mark.parametrize("kind", ["uvicorn", "hypercorn"])
def test_asgi_servers_with_the_asgi_py_line(
    kind: str,
    hooks: bool,
    family: str,
    driver: str,
    fresh_database: Callable[[str], str],
    servers: list[procs.Server],
    tmp_path: Path,
) -> None:
    pytest.importorskip(kind)
    name = fresh_database(family)
    server = _asgi_server(kind, tmp_path, servers, _env(dbserver.django_url(family, name, driver)), hooks=hooks)
    seen = _burst_and_count(server, family, name, endpoint="/async/orm")
    run = seen["run"]
    print(
        f"{kind} {'pooled' if hooks else 'control'} {family}: {seen['distinct']} sessions for {run.ok}, "
        f"peak {seen['peak']}, {seen['after_idle']} after 5 s idle"
    )
    if not hooks:
        assert run.wrong == []
        assert seen["distinct"] >= 0.9 * run.ok
        assert seen["peak"] > BOUND or seen["refused"]
        return
    _assert_clean(run, BURST)
    assert seen["peak"] <= BOUND
    assert seen["after_idle"] is not None and seen["after_idle"] <= BOUND


def test_the_asgi_line_is_idempotent_and_reports_its_pool(tmp_path: Path) -> None:
    """`pooled()` installs once per process; with ASGI_POOL off it installs nothing."""
    script = (
        "import asyncio, json, os\n"
        "os.environ['DJANGO_SETTINGS_MODULE'] = 'tests.project.settings'\n"
        "import django; django.setup()\n"
        "from serverhooks import asgi\n"
        "from serverhooks.pool import active\n"
        "async def app(scope, receive, send): pass\n"
        "wrapped = asgi.pooled(app)\n"
        "asyncio.run(wrapped({}, None, None)); asyncio.run(wrapped({}, None, None))\n"
        "print(json.dumps({'active': active.any_active(), 'again': asgi.install()}))\n"
    )
    for setting, expected in (("1", True), ("0", False)):
        env = {**project_env(f"sqlite:///{tmp_path}/x.sqlite3"), "SERVERHOOKS_ASGI_POOL": setting}
        done = subprocess.run(
            [sys.executable, "-c", script],
            cwd=procs.REPO,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert json.loads(done.stdout.strip().splitlines()[-1]) == {"active": expected, "again": []}
