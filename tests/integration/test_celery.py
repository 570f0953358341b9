"""serverhooks.celery with a real Celery worker (Redis broker) on MariaDB and PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import project_env, require_server
from tests.support import dbserver, procs

pytestmark = pytest.mark.celery


@pytest.fixture
def queue() -> Iterator[str]:
    require_server("redis")
    yield "sh-" + uuid.uuid4().hex[:10]


def _start(
    tmp_path: Path,
    servers: list[procs.Server],
    url: str,
    queue: str,
    *,
    pool: str = "prefork",
    concurrency: int = 4,
    **env: Any,
) -> procs.Server:
    full_env = project_env(url, CELERY_QUEUE=queue, CELERY_BROKER_URL=dbserver.server_url("redis"), **env)
    procs.create_schema(full_env)
    server = procs.start_celery(tmp_path, full_env, pool=pool, concurrency=concurrency)
    servers.append(server)
    procs.wait_celery_ready(server)
    return server


def _echo_tasks(queue: str, count: int) -> tuple[list[str], list[dict[str, Any]], list[str]]:
    """Send `count` echo tasks; (markers, results, errors). Bounded by per-result timeouts."""
    from celery import Celery

    client = Celery("client", broker=dbserver.server_url("redis"), backend=dbserver.server_url("redis"))
    markers = [uuid.uuid4().hex for _ in range(count)]
    pending = [client.send_task("tests.echo", args=[marker], queue=queue) for marker in markers]
    results: list[dict[str, Any]] = []
    errors: list[str] = []
    for result in pending:
        try:
            results.append(result.get(timeout=60))
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
    return markers, results, errors


@pytest.mark.parametrize("family", ["mysql", "postgres"])
def test_prefork_control_arm_pool_shares_the_parents_socket(
    family: str, queue: str, fresh_database: Callable[[str], str], servers: list[procs.Server], tmp_path: Path
) -> None:
    name = fresh_database(family)
    server = _start(
        tmp_path,
        servers,
        dbserver.django_url(family, name),
        queue,
        CONN_MAX_AGE=3600,
        QUERY_BEFORE_FORK=1,
        CELERY_DJANGO_FIXUP=0,
    )
    shared = procs.shared_inodes(procs.db_sockets([server.pid, *server.workers()], dbserver.port(family)))
    assert any(server.pid in owners and len(owners) == 5 for owners in shared.values()), shared


@pytest.mark.parametrize("fixup", ["with-django-fixup", "without-django-fixup"])
@pytest.mark.parametrize("family", ["mysql", "postgres"])
def test_prefork_hooks_arm(
    family: str,
    fixup: str,
    queue: str,
    fresh_database: Callable[[str], str],
    servers: list[procs.Server],
    tmp_path: Path,
) -> None:
    name = fresh_database(family)
    server = _start(
        tmp_path,
        servers,
        dbserver.django_url(family, name),
        queue,
        CONN_MAX_AGE=3600,
        QUERY_BEFORE_FORK=1,
        SERVERHOOKS_CELERY=1,
        CELERY_DJANGO_FIXUP="1" if fixup == "with-django-fixup" else "0",
    )
    markers, results, errors = _echo_tasks(queue, 200)
    assert errors == []
    assert [r["m"] for r in results] == markers, "every task got its own marker back"
    pool_pids = set(server.workers())
    held = procs.db_sockets([server.pid, *pool_pids], dbserver.port(family))
    assert procs.shared_inodes(held) == {}, held
    stored = {row[0] for row in dbserver.query(family, "SELECT marker FROM sh_hit", database=name)}
    assert stored == set(markers)
    os.kill(server.pid, signal.SIGTERM)  # warm shutdown
    assert server.proc.wait(60) == 0
    assert dbserver.wait_sessions_at_most(family, name, 0, timeout=10) == [], "no session of the worker's remains"
    log = server.log()
    assert "Traceback" not in log and "serverhooks: the" not in log, log[-3000:]


@pytest.mark.parametrize(
    ("pool", "family", "driver"), [("threads", "mysql", ""), ("gevent", "postgres", ""), ("gevent", "mysql", "pymysql")]
)
def test_threads_and_gevent_pools(
    pool: str,
    family: str,
    driver: str,
    queue: str,
    fresh_database: Callable[[str], str],
    servers: list[procs.Server],
    tmp_path: Path,
) -> None:
    name = fresh_database(family)
    concurrency = 4 if pool == "threads" else 30
    server = _start(
        tmp_path,
        servers,
        dbserver.django_url(family, name, driver),
        queue,
        pool=pool,
        concurrency=concurrency,
        CONN_MAX_AGE=600,
        SERVERHOOKS_CELERY=1,
    )
    with dbserver.SessionSampler(family, name) as sampler:
        markers, results, errors = _echo_tasks(queue, 150)
    assert errors == [] and [r["m"] for r in results] == markers
    bound = 4 if pool == "threads" else 10  # threads: one each; gevent: serverhooks' POOL_SIZE
    assert sampler.peak <= bound + 1, sampler.peak  # +1: the main process's own session, if any
    os.kill(server.pid, signal.SIGTERM)
    assert server.proc.wait(60) == 0
    assert dbserver.wait_sessions_at_most(family, name, 0, timeout=10) == []


def test_importing_without_celery_names_the_fix() -> None:
    code = (
        "import sys\nsys.modules['celery'] = None\n"
        "try:\n    import serverhooks.celery\nexcept ImportError as e:\n    print(e)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=procs.REPO, capture_output=True, text=True, timeout=60)
    assert "pip install 'serverhooks[celery]'" in out.stdout, out
