"""`python -m tests.support.findings CASE`: the review findings of issue 11, each in a process of its own.

Each case prints one JSON line: what happened, in the figures its test asserts on.
DATABASE_URL selects the database (CACHE_URL too, for the cache case).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import django


def _session(connection: Any) -> Any:
    sql = {"mysql": "SELECT CONNECTION_ID()", "postgresql": "SELECT pg_backend_pid()", "sqlite": "SELECT 0"}
    with connection.cursor() as cursor:
        cursor.execute(sql[connection.vendor])
        return cursor.fetchone()[0]


def _error(call: Callable[[], Any]) -> str | None:
    try:
        call()
        return None
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"[:300]


def eager_celery_task_inside_atomic() -> dict[str, Any]:
    """An eager task (task_always_eager) runs inline, inside the caller's transaction."""
    from celery import Celery
    from django.db import transaction

    import serverhooks.celery  # noqa: F401 - what users put where the app is defined
    from tests.project.models import Hit

    app = Celery("findings", broker="memory://")
    app.conf.task_always_eager = True

    @app.task
    def count_hits() -> int:
        return Hit.objects.count()

    def work() -> None:
        with transaction.atomic():
            Hit.objects.create(marker="before", pid=os.getpid())
            count_hits.delay().get()
            Hit.objects.create(marker="after", pid=os.getpid())

    return {"error": _error(work), "rows": Hit.objects.filter(marker__in=["before", "after"]).count()}


def releasing_inside_atomic() -> dict[str, Any]:
    from django.db import transaction

    from serverhooks.threads import Thread, releasing
    from tests.project.models import Hit

    def work() -> None:
        with transaction.atomic():
            Hit.objects.create(marker="one", pid=os.getpid())
            with releasing():
                Hit.objects.count()
            releasing()(Hit.objects.count)()
            Thread(target=Hit.objects.count).run()  # run() in this thread, as a subclass might
            Hit.objects.create(marker="two", pid=os.getpid())

    return {"error": _error(work), "rows": Hit.objects.filter(marker__in=["one", "two"]).count()}


def per_thread_release_after_the_session_ended() -> dict[str, Any]:
    """release="thread" keeps a session across tasks: one the server ended must not fail the next task."""
    from django.db import connection

    from serverhooks.threads import ThreadPoolExecutor
    from tests.support import faults

    with ThreadPoolExecutor(1, release="thread") as pool:
        first = pool.submit(_session, connection).result(10)
        ended = faults.end_sessions(
            connection.vendor.replace("postgresql", "postgres"), connection.settings_dict["NAME"]
        )
        time.sleep(0.3)
        second = pool.submit(lambda: _error(lambda: _session(connection))).result(10)
        third = pool.submit(_session, connection).result(10)
    return {"ended": ended, "error": second, "first": first, "third": third}


def per_thread_release_applies_conn_max_age() -> dict[str, Any]:
    """With CONN_MAX_AGE=1, a session older than that is not used by the next task."""
    from django.db import connection

    from serverhooks.threads import ThreadPoolExecutor

    with ThreadPoolExecutor(1, release="thread") as pool:
        first = pool.submit(_session, connection).result(10)
        time.sleep(1.5)
        second = pool.submit(_session, connection).result(10)
    return {"first": first, "second": second}


def stale_fork_answer() -> dict[str, Any]:
    """A fork whose parent-side step failed must not trust the answer of an earlier fork."""
    from django.db import connection

    from serverhooks import forkguard, registry

    registry.start_tracking()
    forkguard.install_fork_guard()
    parent = os.getpid()
    pid = os.fork()  # nothing is open yet: "nothing to abandon" is the right answer here
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    connection.ensure_connection()
    original = registry.all_wrappers

    def failing_in_the_parent() -> list[Any]:
        if os.getpid() == parent:
            raise RuntimeError("the parent's before-fork step failed")
        return original()

    registry.all_wrappers = failing_in_the_parent
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(write, json.dumps({"child_abandoned": connection.connection is None}).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    report: dict[str, Any] = json.loads(os.read(read, 4096))
    report["parent_still_works"] = _error(lambda: _session(connection)) is None
    return report


def abandon_retries_a_failed_step() -> dict[str, Any]:
    """A step of the child's abandon that failed is run again by the next call."""
    from django.core.cache import cache

    from serverhooks import fork

    cache.set("findings", 1)  # the parent's cache client exists
    parent_storage = cache_storage()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        original = fork._forget_caches

        def failing(current: Any) -> None:
            raise RuntimeError("forgetting the caches failed")

        fork._forget_caches = failing
        fork.abandon_inherited()
        fork._forget_caches = original
        fork.abandon_inherited()
        os.write(write, json.dumps({"fresh_cache_clients": cache_storage() is not parent_storage}).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    result: dict[str, Any] = json.loads(os.read(read, 4096))
    return result


def cache_storage() -> Any:
    from django.core.cache import caches

    from serverhooks import _internals

    return _internals.connection_storage(caches)


def greenlet_ids_reused() -> dict[str, Any]:
    """Raw greenlets that die holding a pooled connection, whose ids new greenlets reuse.

    Then two greenlets hold a connection each at the same time: a pool of 2 must serve both.
    """
    import gevent
    from greenlet import greenlet

    from serverhooks import release_connections
    from serverhooks.pool import gevent as gevent_pool

    django_db = __import__("django.db", fromlist=["connections"])
    gevent_pool.activate(size=2, timeout=0.5)
    seen: set[int] = set()
    reused = 0
    for _ in range(20):
        worker = greenlet(lambda: django_db.connections["default"].cursor().execute("SELECT 1").close())
        reused += id(worker) in seen
        seen.add(id(worker))
        worker.switch()
        del worker

    def hold_a_connection() -> str | None:
        try:
            django_db.connections["default"].cursor().execute("SELECT 1").close()
            gevent.sleep(1.0)
            return None
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"[:200]
        finally:
            release_connections()

    holders = [gevent.spawn(hold_a_connection) for _ in range(2)]
    gevent.joinall(holders, timeout=10)
    return {"ids_reused": reused, "errors": [h.value for h in holders if h.value]}


def exit_while_another_thread_queries() -> dict[str, Any]:
    """close_at_exit() while another thread is inside a 1.5 s query on its own connection."""
    from django.db import connection

    from serverhooks import close_at_exit, registry, stats

    registry.start_tracking()
    outcome: dict[str, Any] = {}

    def query() -> None:
        outcome["error"] = _error(lambda: connection.cursor().execute("SELECT SLEEP(1.5)"))

    worker = threading.Thread(target=query)
    worker.start()
    time.sleep(0.3)
    started = time.monotonic()
    close_at_exit()
    outcome["exit_took"] = round(time.monotonic() - started, 2)
    worker.join(10)
    outcome.update(
        {key: value for key, value in stats().items() if key in ("busy_at_exit", "closed_at_exit", "errors")}
    )
    return outcome


CASES = {
    case.__name__: case
    for case in (
        eager_celery_task_inside_atomic,
        releasing_inside_atomic,
        per_thread_release_after_the_session_ended,
        per_thread_release_applies_conn_max_age,
        stale_fork_answer,
        abandon_retries_a_failed_step,
        greenlet_ids_reused,
        exit_while_another_thread_queries,
    )
}


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.project.settings")
    case = CASES[sys.argv[1]]
    if case is greenlet_ids_reused:
        from gevent import monkey

        monkey.patch_all()
    django.setup()
    print(json.dumps(case(), default=str))


if __name__ == "__main__":
    main()
