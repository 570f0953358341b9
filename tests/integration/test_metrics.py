"""Prometheus metrics, scraped from a real /metrics while real workers serve, and checked against
the database server's own session list, on MariaDB and PostgreSQL.

Every arm writes into prometheus_client's multiprocess directory, as a user sets it up
(PROMETHEUS_MULTIPROC_DIR, empty at start); tests/project/urls.py serves
serverhooks.metrics.django.metrics_view. The control arms switch off what removes the live
gauges of workers that are gone (tests/support/metrics_control.py, and a child_exit of the
conf's own): there, dead workers keep counting.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from serverhooks.metrics import files
from tests.conftest import project_env
from tests.support import dbserver, http, procs

pytestmark = [pytest.mark.gunicorn, pytest.mark.uwsgi]

WORKERS = 2
POOL_SIZE = 10  # serverhooks' default
FAMILIES = ["mysql", "postgres"]
SERVERS = ["sync", "gevent", "asgi", "uwsgi"]
ASGI_APP = "tests.project.asgi:application"
DEFAULT = (("alias", "default"),)
MERGE_AT = 2  # dead workers' counter files merged once this many wait (32 by default)
CONTROL_CONF = """
# The control arm: the shipped file, then no cleanup of dead workers' live gauges.
import tests.support.metrics_control  # noqa: E402,F401


def child_exit(server, worker):  # replaces serverhooks' hook (no @chain)
    pass
"""

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(server: procs.Server) -> Samples:
    """GET /metrics, parsed as Prometheus parses it; live-gauge samples of every pid summed."""
    status, body = http.get(server.socket_path, "/metrics")
    assert status == 200, body[:500]
    found: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            key = (sample.name, tuple(sorted((k, v) for k, v in sample.labels.items() if k != "pid")))
            found[key] = found.get(key, 0.0) + sample.value
    return found


def _start(
    kind: str,
    tmp_path: Path,
    servers: list[procs.Server],
    url: str,
    metrics_dir: Path,
    *,
    control: bool = False,
    **extra: Any,
) -> procs.Server:
    env = project_env(
        url, CONN_MAX_AGE=600, PROMETHEUS_MULTIPROC_DIR=metrics_dir, SERVERHOOKS_PROBE_DATABASES=0, **extra
    )
    procs.create_schema(env)
    metrics_dir.mkdir()  # created empty before the server starts, as the user does
    if kind == "uwsgi":
        args = ["--import", "tests.support.metrics_control"] if control else None
        server = procs.start_uwsgi(tmp_path, env, workers=WORKERS, args=args)
    else:
        env.update(GUNICORN_WORKER_CLASS=kind, GUNICORN_LOGLEVEL="debug")
        conf = None
        if control:
            conf = tmp_path / "control.conf.py"
            conf.write_text((procs.REPO / "gunicorn.conf.py").read_text() + CONTROL_CONF)
        app = ASGI_APP if kind == "asgi" else "tests.project.wsgi:application"
        server = procs.start_gunicorn(tmp_path, env, conf=conf, app=app, workers=WORKERS)
    servers.append(server)
    server.wait_ready(60)
    return server


def _value(samples: Samples, name: str, labels: tuple[tuple[str, str], ...] | None = None) -> float:
    """One sample's value; with no labels given, the sum over every label set (every alias)."""
    if labels is not None:
        return samples.get((name, labels), 0.0)
    return sum(value for (found, _labels), value in samples.items() if found == name)


@pytest.mark.parametrize("kind", SERVERS)
@pytest.mark.parametrize("family", FAMILIES)
def test_scrape_under_load_matches_the_database_server(
    family: str, kind: str, fresh_database: Callable[[str], str], servers: list[procs.Server], tmp_path: Path
) -> None:
    name = fresh_database(family)
    metrics_dir = tmp_path / "prom"
    # Sync and uWSGI load the app in the master, which queries at import: the session it opened
    # is closed before the fork (closed_before_fork), so no worker inherits it.
    preloaded = kind in ("sync", "uwsgi")
    extra: dict[str, Any] = {"GUNICORN_PRELOAD": 1, "QUERY_AT_IMPORT": 1} if preloaded else {}
    server = _start(kind, tmp_path, servers, dbserver.django_url(family, name), metrics_dir, **extra)
    during: list[Samples] = []
    run_done = threading.Event()

    def scrape_during_load() -> None:  # scrapes while the workers serve: each must answer
        for _ in range(100):
            if run_done.wait(0.05):
                return
            during.append(scrape(server))

    scraper = threading.Thread(target=scrape_during_load)
    scraper.start()
    run = http.marker_load(server.socket_path, clients=8, per_client=40)
    run_done.set()
    scraper.join(30)
    assert run.ok == 320 and run.failures == [] and run.http_errors == [] and run.wrong == []
    assert during, "no scrape answered during the load"
    distinct = {session for _pid, session in run.sessions}
    on_server = dbserver.sessions(family, name)
    m = scrape(server)
    if kind in ("gevent", "asgi"):  # each worker samples its pools every second: the last checkins show then
        deadline = time.monotonic() + 10
        while _value(m, "serverhooks_pool_idle", DEFAULT) != len(on_server) and time.monotonic() < deadline:
            time.sleep(0.2)
            m = scrape(server)
    opened = _value(m, "serverhooks_sessions_opened_total", DEFAULT)
    closed_before_fork = _value(m, "serverhooks_closed_before_fork_total")
    print(
        f"{family}/{kind}: server has {len(on_server)} sessions, requests saw {len(distinct)}; scrape: "
        f"sessions_opened={opened:g} closed_before_fork={closed_before_fork:g} "
        f"processes={_value(m, 'serverhooks_processes'):g} pool_idle={_value(m, 'serverhooks_pool_idle', DEFAULT):g}"
    )
    # Every session a worker opened is still open (CONN_MAX_AGE=600, nothing recycled), and the
    # requests saw each of them; the master's own, if any, was closed before it forked.
    assert len(on_server) == len(distinct) > 0
    assert opened - closed_before_fork == len(on_server)
    assert closed_before_fork == (1 if preloaded else 0)
    assert _value(m, "serverhooks_abandoned_after_fork_total") == 0  # nothing was left to inherit
    assert _value(m, "serverhooks_closed_at_exit_total") == 0
    assert _value(m, "serverhooks_processes") == WORKERS
    if kind in ("gevent", "asgi"):
        assert _value(m, "serverhooks_pool_size", DEFAULT) == WORKERS * POOL_SIZE
        assert _value(m, "serverhooks_pool_in_use", DEFAULT) == 0
        assert _value(m, "serverhooks_pool_waiting", DEFAULT) == 0
        assert _value(m, "serverhooks_pool_idle", DEFAULT) == len(on_server)
        assert _value(m, "serverhooks_pool_opened_total") == len(on_server)
        reused = _value(m, "serverhooks_pool_reused_total")
        assert reused + len(on_server) >= run.ok  # a checkout per request at least
        assert max(_value(s, "serverhooks_pool_in_use", DEFAULT) for s in during) <= WORKERS * POOL_SIZE
    else:
        assert len(on_server) <= WORKERS  # one persistent session per sync worker
        assert ("serverhooks_pool_in_use", DEFAULT) not in m


def _wait_workers(server: procs.Server, count: int, exclude: set[int], timeout: float = 30.0) -> list[int]:
    """The master's workers once `count` run and none of them is in `exclude` (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        workers = server.workers()
        if len(workers) == count and not set(workers) & exclude:
            return workers
        time.sleep(0.05)
    raise AssertionError(f"workers {server.workers()} after {timeout} s (waiting for {count}, not {exclude})")


def _settled(server: procs.Server, metrics_dir: Path, timeout: float = 30.0) -> list[int]:
    """The workers, once recycling is over: the same `WORKERS` pids for half a second, each with
    its live gauges written (a worker that got its last request may still be on its way out)."""
    deadline = time.monotonic() + timeout
    previous: list[int] = []
    while time.monotonic() < deadline:
        workers = sorted(server.workers())
        ready = set(workers) <= files.live_gauge_pids(str(metrics_dir))
        if workers == previous and len(workers) == WORKERS and ready:
            return workers
        previous = workers
        time.sleep(0.5)
    raise AssertionError(f"workers still changing after {timeout} s: {server.workers()}")


def _wait_gauges_of(metrics_dir: Path, pids: set[int], timeout: float = 30.0) -> None:
    """Until each of `pids` has written its live gauges (a worker does as it gets ready)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pids <= files.live_gauge_pids(str(metrics_dir)):
            return
        time.sleep(0.05)
    raise AssertionError(f"no live gauges from {pids - files.live_gauge_pids(str(metrics_dir))}")


@pytest.mark.parametrize("arm", ["hooks", "control"])
@pytest.mark.parametrize("kind", ["sync", "uwsgi"])
@pytest.mark.parametrize("family", FAMILIES)
def test_recycled_workers_live_gauges_disappear(
    family: str,
    kind: str,
    arm: str,
    fresh_database: Callable[[str], str],
    servers: list[procs.Server],
    tmp_path: Path,
) -> None:
    """GUNICORN_MAX_REQUESTS (UWSGI_MAX_REQUESTS) recycles the workers, each leaving as it should
    (worker_exit, uwsgi.atexit): their live gauges go, and their counter files are merged into an
    archive by the next workers (METRICS_MERGE_AT, lowered to see it here), counts intact."""
    name = fresh_database(family)
    metrics_dir = tmp_path / "prom"
    recycle: dict[str, Any] = {"GUNICORN_MAX_REQUESTS": 25, "GUNICORN_MAX_REQUESTS_JITTER": 0}
    if kind == "uwsgi":
        recycle = {"UWSGI_MAX_REQUESTS": 25, "UWSGI_MAX_REQUESTS_DELTA": 1, "UWSGI_MIN_WORKER_LIFETIME": 0}
    recycle["SERVERHOOKS_METRICS_MERGE_AT"] = MERGE_AT
    server = _start(
        kind, tmp_path, servers, dbserver.django_url(family, name), metrics_dir, control=arm == "control", **recycle
    )
    first = set(server.workers())
    run = http.marker_load(server.socket_path, clients=4, per_client=50)
    assert run.ok == 200 and run.failures == [] and run.http_errors == [] and run.wrong == []
    served = set(run.requests_by_pid)
    _wait_workers(server, WORKERS, first)
    workers = _settled(server, metrics_dir)
    # Read before the scrape, which is a request too, and may be a worker's last.
    dead_with_gauges = files.live_gauge_pids(str(metrics_dir)) - set(workers) - {server.pid}
    dead_counter_files = files.dead_summed_files(str(metrics_dir)).get("counter", [])
    archived = (metrics_dir / files.archive_name("counter")).exists()
    on_server = dbserver.wait_sessions_at_most(family, name, WORKERS)
    m = scrape(server)
    opened = _value(m, "serverhooks_sessions_opened_total", DEFAULT)
    at_exit = _value(m, "serverhooks_closed_at_exit_total")
    print(
        f"{family}/{kind}/{arm}: {len(served)} worker pids served, {len(run.sessions)} sessions seen, "
        f"scrape: sessions_opened={opened:g} closed_at_exit={at_exit:g} "
        f"processes={_value(m, 'serverhooks_processes'):g}"
        f"; live-gauge files of dead pids: {len(dead_with_gauges)}; dead pids' counter files: "
        f"{len(dead_counter_files)}, archive: {archived}; {len(os.listdir(metrics_dir))} files"
    )
    assert len(served) >= 4, "the workers were recycled"
    # Counters outlive their workers, merged or not: every session any worker opened, and each
    # one's goodbye.
    assert opened == len(run.sessions)
    assert opened - at_exit == len(on_server)
    if arm == "hooks":
        assert dead_with_gauges == set()
        assert _value(m, "serverhooks_processes") == WORKERS
        assert archived and len(dead_counter_files) <= MERGE_AT, dead_counter_files
    else:  # without the cleanup, every recycled worker still counts as running, and left its file
        assert dead_with_gauges >= served - set(workers)
        assert _value(m, "serverhooks_processes") >= WORKERS + len(served - set(workers))
        assert not archived and len(dead_counter_files) >= len(served - set(workers))


@pytest.mark.parametrize("arm", ["hooks", "control"])
@pytest.mark.parametrize(("kind", "family"), [("sync", "mysql"), ("sync", "postgres"), ("uwsgi", "mysql"),
                                              ("uwsgi", "postgres")])  # fmt: skip
def test_killed_workers_live_gauges_are_swept(
    kind: str,
    family: str,
    arm: str,
    fresh_database: Callable[[str], str],
    servers: list[procs.Server],
    tmp_path: Path,
) -> None:
    """SIGKILL (a harakiri, an OOM kill): the worker cleans up nothing. Gunicorn's child_exit and,
    under uWSGI, whose master runs no Python then, the next worker's sweep remove its live gauges."""
    name = fresh_database(family)
    metrics_dir = tmp_path / "prom"
    server = _start(kind, tmp_path, servers, dbserver.django_url(family, name), metrics_dir, control=arm == "control")
    http.marker_load(server.socket_path, clients=4, per_client=10)
    _settled(server, metrics_dir)
    killed: set[int] = set()
    for _ in range(3):
        victim = server.workers()[0]
        os.kill(victim, signal.SIGKILL)
        killed.add(victim)
        workers = _wait_workers(server, WORKERS, killed)
        _wait_gauges_of(metrics_dir, set(workers))
    run = http.marker_load(server.socket_path, clients=4, per_client=10)
    assert run.ok == 40 and run.failures == [] and run.http_errors == []
    m = scrape(server)
    left = files.live_gauge_pids(str(metrics_dir)) & killed
    print(f"{kind}/{family}/{arm}: killed {sorted(killed)}, their live gauges left: {sorted(left)}; "
          f"processes={_value(m, 'serverhooks_processes'):g}")  # fmt: skip
    if arm == "hooks":
        assert left == set()
        assert _value(m, "serverhooks_processes") == WORKERS
    else:
        assert left == killed
        assert _value(m, "serverhooks_processes") == WORKERS + len(killed)


def test_misconfigured_directory_one_warning_and_the_server_serves(servers: list[procs.Server], tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir"
    env = project_env(f"sqlite:///{tmp_path}/m.sqlite3", PROMETHEUS_MULTIPROC_DIR=missing)
    procs.create_schema(env)
    server = procs.start_gunicorn(tmp_path, env, workers=WORKERS)
    servers.append(server)
    server.wait_ready(60)
    run = http.marker_load(server.socket_path, clients=2, per_client=10)
    assert run.ok == 20
    status, _body = http.get(server.socket_path, "/metrics")
    assert status == 503
    server.stop()
    warnings = [line for line in server.log().splitlines() if "no metrics" in line]
    assert len(warnings) == 1, server.log()[-3000:]
    assert "PROMETHEUS_MULTIPROC_DIR" in warnings[0] and "SERVERHOOKS_METRICS=0" in warnings[0]
    assert not missing.exists()


def _merge(metrics_dir: Path) -> Samples:
    """What any multiprocess /metrics endpoint would show (Celery serves no HTTP)."""
    from prometheus_client import CollectorRegistry, generate_latest, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, str(metrics_dir))  # type: ignore[no-untyped-call]
    found: Samples = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            key = (sample.name, tuple(sorted((k, v) for k, v in sample.labels.items() if k != "pid")))
            found[key] = found.get(key, 0.0) + sample.value
    return found


@pytest.mark.celery
@pytest.mark.parametrize("arm", ["hooks", "control"])
def test_celery_prefork_killed_childs_live_gauges_are_swept(
    arm: str, fresh_database: Callable[[str], str], servers: list[procs.Server], tmp_path: Path
) -> None:
    """Celery's prefork pool replaces a child killed mid-life; the replacement sweeps its gauges."""
    from tests.conftest import require_server
    from tests.integration.test_celery import _echo_tasks

    require_server("redis")
    name = fresh_database("mysql")
    metrics_dir = tmp_path / "prom"
    metrics_dir.mkdir()
    queue = "sh-metrics-" + os.urandom(5).hex()
    env = project_env(
        dbserver.django_url("mysql", name),
        CELERY_QUEUE=queue,
        CELERY_BROKER_URL=dbserver.server_url("redis"),
        SERVERHOOKS_CELERY=1,
        PROMETHEUS_MULTIPROC_DIR=metrics_dir,
        SERVERHOOKS_PROBE_DATABASES=0,
        CONN_MAX_AGE=600,
        SERVERHOOKS_TEST_METRICS_CONTROL=int(arm == "control"),
    )
    procs.create_schema(env)
    server = procs.start_celery(tmp_path, env, concurrency=WORKERS)
    servers.append(server)
    procs.wait_celery_ready(server)
    _markers, results, errors = _echo_tasks(queue, 10)
    assert errors == [] and len(results) == 10
    children = set(server.workers())
    _wait_gauges_of(metrics_dir, children)
    victim = sorted(children)[0]
    os.kill(victim, signal.SIGKILL)
    _wait_workers(server, WORKERS, {victim})
    _wait_gauges_of(metrics_dir, set(server.workers()))
    _markers, results, errors = _echo_tasks(queue, 10)
    assert errors == [] and len(results) == 10
    m = _merge(metrics_dir)
    left = files.live_gauge_pids(str(metrics_dir)) & {victim}
    sessions = {(r["pid"], r["session"]) for r in results}
    print(f"celery/{arm}: killed {victim}; its live gauges left: {sorted(left)}; "
          f"processes={_value(m, 'serverhooks_processes'):g} "
          f"sessions_opened={_value(m, 'serverhooks_sessions_opened_total', DEFAULT):g}")  # fmt: skip
    # The main process counts too (it prepares itself as a worker: threads or gevent pools run there).
    assert _value(m, "serverhooks_sessions_opened_total", DEFAULT) >= len(sessions)
    if arm == "hooks":
        assert left == set()
        assert _value(m, "serverhooks_processes") == WORKERS + 1
    else:
        assert left == {victim}
        assert _value(m, "serverhooks_processes") == WORKERS + 2
