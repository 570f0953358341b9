"""Pages for the overload tests (issue 22): each holds its pooled session for a known time.

`sleep` holds it in a SQL sleep (the database works, the worker idles: the pool is the only
bottleneck). `render` queries, then computes for a while without yielding, as a template render
does, then queries again: the session stays checked out across CPU work that lets no other unit
of work run, which is what makes a keep-alive client that takes back its own freed slot starve
the queue.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import wraps

from django.db import connection
from django.db.utils import OperationalError
from django.http import HttpRequest, HttpResponse

SLEEP_SQL = {"mysql": "SELECT SLEEP(%s)", "postgresql": "SELECT pg_sleep(%s)"}


def _is_pool_timeout(exc: BaseException | None) -> bool:
    """serverhooks' PoolTimeout, or psycopg_pool's (Django's pool) under Django's OperationalError."""
    while exc is not None:
        if type(exc).__name__ == "PoolTimeout":
            return True
        exc = exc.__cause__
    return False


def pool_timeout_is_503(view: Callable[[HttpRequest], HttpResponse]) -> Callable[[HttpRequest], HttpResponse]:
    """A pool timeout answers 503, anything else fails as it would (500): the load client can then
    count PoolTimeouts apart from other failures (a database refusing connections, say)."""

    @wraps(view)
    def wrapped(request: HttpRequest) -> HttpResponse:
        try:
            return view(request)
        except OperationalError as exc:
            if _is_pool_timeout(exc):
                return HttpResponse("pool timeout", status=503, content_type="text/plain")
            raise

    return wrapped


def _query(sql: str, params: list[float]) -> None:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        cursor.fetchall()


@pool_timeout_is_503
def sleep(request: HttpRequest) -> HttpResponse:
    """?s=0.05: hold the session that many seconds inside the database (capped at 5)."""
    seconds = min(float(request.GET.get("s", "0.05")), 5.0)
    _query(SLEEP_SQL[connection.vendor], [seconds])
    return HttpResponse("slept", content_type="text/plain")


def _burn(seconds: float) -> int:
    """Pure-Python work for `seconds` of wall time: no I/O, no sleep, so gevent's hub never runs."""
    until = time.perf_counter() + seconds
    spins = 0
    while time.perf_counter() < until:
        for _ in range(200):
            spins += 1
    return spins


@pool_timeout_is_503
def render(request: HttpRequest) -> HttpResponse:
    """?ms=20: a query, that many milliseconds of CPU work holding the session, a second query."""
    seconds = min(float(request.GET.get("ms", "20")), 500.0) / 1000.0
    _query("SELECT 1", [])
    spins = _burn(seconds)
    _query("SELECT %s", [spins])
    return HttpResponse("rendered", content_type="text/plain")
