"""Family 1 under real Gunicorn: preload_app, CONN_MAX_AGE=3600, a query in the master.

Control arm: no serverhooks, and the master's DB socket is in every worker (same inode).
Hooks arm: the shipped gunicorn.conf.py; 8 clients x 250 marker requests come back
right, every row is stored, nothing is shared, and a graceful stop closes cleanly.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import project_env
from tests.support import dbserver, http, procs

pytestmark = pytest.mark.gunicorn

WORKERS = 4
THREADS = {"sync": 1, "gthread": 4}
PROTOCOL_ERRORS = re.compile(r"\((2006|2013|2014|2027), |lost synchronization|InterfaceError|Traceback")


def _schema(env: dict[str, str]) -> None:
    procs.create_schema({**env, "PATH": ""})


@pytest.mark.parametrize("worker_class", ["sync", "gthread"])
@pytest.mark.parametrize("family", ["mysql", "postgres"])
def test_control_arm_workers_share_the_masters_socket(
    family: str, worker_class: str, fresh_database: Callable[[str], str], servers: list[procs.Server], tmp_path: Path
) -> None:
    name = fresh_database(family)
    env = project_env(dbserver.django_url(family, name), CONN_MAX_AGE=3600, QUERY_AT_IMPORT=1)
    server = procs.start_gunicorn(
        tmp_path,
        env,
        settings={"preload_app": True, "worker_class": worker_class, "threads": THREADS[worker_class]},
        workers=WORKERS,
    )
    servers.append(server)
    server.wait_ready()

    pids = [server.pid, *server.workers()]
    shared = procs.shared_inodes(procs.db_sockets(pids, dbserver.port(family)))
    assert shared, "without serverhooks the master's DB socket should be in its workers"
    # The deterministic symptom: one socket, the master's, in the master and all workers.
    assert any(server.pid in owners and len(owners) == WORKERS + 1 for owners in shared.values()), shared


@pytest.mark.parametrize("worker_class", ["sync", "gthread"])
@pytest.mark.parametrize("family", ["mysql", "postgres"])
def test_hooks_arm_nothing_shared_no_wrong_answers(
    family: str, worker_class: str, fresh_database: Callable[[str], str], servers: list[procs.Server], tmp_path: Path
) -> None:
    name = fresh_database(family)
    env = project_env(
        dbserver.django_url(family, name),
        CONN_MAX_AGE=3600,
        QUERY_AT_IMPORT=1,
        GUNICORN_PRELOAD=1,
        GUNICORN_WORKER_CLASS=worker_class,
        GUNICORN_THREADS=THREADS[worker_class],
        GUNICORN_LOGLEVEL="debug",
    )
    _schema(env)
    aborted_before = dbserver.aborted_clients() if family == "mysql" else 0
    server = procs.start_gunicorn(tmp_path, env, workers=WORKERS)  # the shipped gunicorn.conf.py
    servers.append(server)
    server.wait_ready()

    run = http.marker_load(server.socket_path, clients=8, per_client=250)
    assert run.failures == [] and run.http_errors == [], (run.failures[:5], run.http_errors[:5])
    assert run.wrong == [], f"{len(run.wrong)} wrong answers, e.g. {run.wrong[:3]}"
    assert run.ok == 2000
    assert run.inherited == 0

    pids = [server.pid, *server.workers()]
    held = procs.db_sockets(pids, dbserver.port(family))
    assert procs.shared_inodes(held) == {}, held
    assert held[server.pid] == set(), "the master keeps no DB socket after pre_fork"
    stored = {row[0] for row in dbserver.query(family, "SELECT marker FROM sh_hit", database=name)}
    assert stored == set(run.sent)
    assert len(dbserver.sessions(family, name)) <= WORKERS * THREADS[worker_class]

    assert server.stop() == 0
    assert dbserver.wait_sessions_at_most(family, name, 0) == [], "a graceful stop leaves no session behind"
    log = server.log()
    assert not PROTOCOL_ERRORS.search(log), PROTOCOL_ERRORS.search(log)
    assert re.search(r"serverhooks: pid \d+ counters: closed_before_fork=1", log), "the master closed its socket"
    if family == "mysql":
        assert dbserver.aborted_clients() == aborted_before, "every session ended with COM_QUIT"


@pytest.mark.parametrize("hooks", [False, True], ids=["control", "hooks"])
def test_cache_client_sockets_are_not_inherited(hooks: bool, servers: list[procs.Server], tmp_path: Path) -> None:
    """Django's RedisCache used in the master: its pool's socket must not reach the workers."""
    from tests.conftest import require_server

    require_server("redis")
    redis_url = dbserver.server_url("redis")
    env = project_env(f"sqlite:///{tmp_path}/cache.sqlite3", QUERY_AT_IMPORT=1, CACHE_URL=redis_url)
    settings: dict[str, object] = {"preload_app": True}
    if hooks:
        settings["_source"] = "from serverhooks.gunicorn import *"
    server = procs.start_gunicorn(tmp_path, env, settings=settings, workers=2)
    servers.append(server)
    server.wait_ready()
    from urllib.parse import urlsplit

    held = procs.db_sockets([server.pid, *server.workers()], urlsplit(redis_url).port or 6379)
    if hooks:
        assert procs.shared_inodes(held) == {} and held[server.pid] == set(), held
    else:
        assert any(len(owners) == 3 for owners in procs.shared_inodes(held).values()), held
