from __future__ import annotations

import os
import time

from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse

from tests.project.apps import opened_in_this_process

SESSION_ID_SQL = {
    "mysql": "CONNECTION_ID()",
    "postgresql": "pg_backend_pid()",
    "sqlite": "0",
}


def ping(request: HttpRequest) -> HttpResponse:
    return HttpResponse("pong", content_type="text/plain")


def _inherited() -> bool:
    """True when this request runs on a connection another process opened."""
    opener = getattr(connection, "opened_in_pid", None)
    return connection.connection is not None and opener is not None and opener != os.getpid()


def echo(request: HttpRequest) -> JsonResponse:
    """Round-trip a marker through the database, and store it."""
    marker = request.GET.get("m", "")
    inherited_before = _inherited()
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT %s, {SESSION_ID_SQL[connection.vendor]}", [marker])
        echoed, session = cursor.fetchone()
        cursor.execute("INSERT INTO sh_hit (marker, pid) VALUES (%s, %s)", [marker, os.getpid()])
    return JsonResponse({"m": echoed, "pid": os.getpid(), "session": session, "inherited": inherited_before})


def whoami(request: HttpRequest) -> JsonResponse:
    """What this worker did: the report the demo prints."""
    import serverhooks

    inherited = _inherited()
    session = None
    error = None
    try:
        with connection.cursor() as cursor:
            cursor.execute(f"SELECT {SESSION_ID_SQL[connection.vendor]}")
            session = cursor.fetchone()[0]
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    return JsonResponse(
        {
            "pid": os.getpid(),
            "inherited": inherited,
            "session": session,
            "opened_here": opened_in_this_process(),
            "error": error,
            "serverhooks": serverhooks.stats(),
        }
    )


def sleep(request: HttpRequest) -> JsonResponse:
    seconds = min(float(request.GET.get("s", "0.2")), 5.0)
    started = time.monotonic()
    with connection.cursor() as cursor:
        if connection.vendor == "mysql":
            cursor.execute("SELECT SLEEP(%s)", [seconds])
        elif connection.vendor == "postgresql":
            cursor.execute("SELECT pg_sleep(%s)", [seconds])
        else:
            time.sleep(seconds)
    return JsonResponse({"pid": os.getpid(), "took": time.monotonic() - started})


def _session_id() -> object:
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {SESSION_ID_SQL[connection.vendor]}")
        return cursor.fetchone()[0]


def leave_transaction_open(request: HttpRequest) -> JsonResponse:
    """A buggy view: turns autocommit off, writes, and never commits."""
    from django.db import transaction

    transaction.set_autocommit(False)
    with connection.cursor() as cursor:
        cursor.execute("INSERT INTO sh_hit (marker, pid) VALUES (%s, %s)", [request.GET.get("m", ""), os.getpid()])
    return JsonResponse({"session": _session_id()})


def begin_behind_djangos_back(request: HttpRequest) -> JsonResponse:
    """Opens a transaction with raw SQL while Django believes it is in autocommit."""
    with connection.cursor() as cursor:
        cursor.execute("START TRANSACTION" if connection.vendor == "mysql" else "BEGIN")
        cursor.execute("INSERT INTO sh_hit (marker, pid) VALUES (%s, %s)", [request.GET.get("m", ""), os.getpid()])
    return JsonResponse({"session": _session_id()})


def raise_inside_atomic(request: HttpRequest) -> HttpResponse:
    from django.db import transaction

    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("INSERT INTO sh_hit (marker, pid) VALUES (%s, %s)", [request.GET.get("m", ""), os.getpid()])
        raise RuntimeError("raised inside atomic() on purpose")


def set_time_zone(request: HttpRequest) -> JsonResponse:
    """A view that changes session state behind Django's back (PostgreSQL)."""
    with connection.cursor() as cursor:
        cursor.execute("SET TIME ZONE 'Asia/Tokyo'")
    return JsonResponse({"session": _session_id()})


def state(request: HttpRequest) -> JsonResponse:
    """What a fresh request finds on its connection."""
    time_zone = None
    in_transaction = None
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("SHOW TIME ZONE")
            time_zone = cursor.fetchone()[0]
            in_transaction = int(connection.connection.info.transaction_status) != 0
        elif connection.vendor == "mysql":
            cursor.execute("SELECT @@in_transaction")
            in_transaction = bool(cursor.fetchone()[0])
    return JsonResponse(
        {
            "session": _session_id(),
            "autocommit": connection.get_autocommit(),
            "in_atomic_block": connection.in_atomic_block,
            "in_transaction": in_transaction,
            "time_zone": time_zone,
            "pid": os.getpid(),
        }
    )


def spawn_and_forget(request: HttpRequest) -> JsonResponse:
    """A greenlet that queries and dies without any request_finished."""
    import gevent

    def work() -> object:
        return _session_id()

    greenlet = gevent.spawn(work)
    greenlet.join(10)
    return JsonResponse({"spawned_session": greenlet.value, "pid": os.getpid()})


def count(request: HttpRequest) -> JsonResponse:
    marker = request.GET.get("m", "")
    with connection.cursor() as cursor:
        cursor.execute("SELECT COUNT(*) FROM sh_hit WHERE marker = %s", [marker])
        return JsonResponse({"count": cursor.fetchone()[0]})


# A query that takes long (think) or returns 10 MB with a pause halfway (reply).
SLOW_SQL = {
    ("mysql", "think"): "SELECT SLEEP(0.3)",
    ("postgresql", "think"): "SELECT pg_sleep(0.3)",
    ("mysql", "reply"): "SELECT seq, REPEAT('x', 1000000), IF(seq = 5, SLEEP(0.3), 0) FROM seq_1_to_10",
    ("postgresql", "reply"): (
        "SELECT i, repeat('x', 1000000), CASE WHEN i = 5 THEN pg_sleep(0.3) END FROM generate_series(1, 10) i"
    ),
}


def cut(request: HttpRequest) -> JsonResponse:
    """A view with a time budget (gevent): a slow query inside gevent.Timeout, caught, and 200."""
    import gevent

    budget = float(request.GET.get("budget", "0.05"))
    kind = request.GET.get("kind", "think")
    connection.ensure_connection()  # the budget is the query's, not the wait for a pooled connection
    try:
        with gevent.Timeout(budget), connection.cursor() as cursor:
            cursor.execute(SLOW_SQL[(connection.vendor, kind)])
            cursor.fetchall()
    except gevent.Timeout:
        return JsonResponse({"cut": True, "pid": os.getpid()})
    return JsonResponse({"cut": False, "pid": os.getpid()})


def listen(request: HttpRequest) -> JsonResponse:
    """PostgreSQL: LISTEN on this request's session, as an app that wants NOTIFY does."""
    channel = request.GET.get("channel", "serverhooks")
    with connection.cursor() as cursor:
        cursor.execute(f'LISTEN "{channel}"')
    return JsonResponse({"pid": os.getpid(), "session": _session_id()})


def notifications(request: HttpRequest) -> JsonResponse:
    """PostgreSQL: the payloads of notifications waiting for this request's session."""
    connection.ensure_connection()
    raw = connection.connection
    if hasattr(raw, "notifies") and callable(raw.notifies):  # psycopg 3
        payloads = [n.payload for n in raw.notifies(timeout=0.5, stop_after=1)]
    else:  # psycopg2
        raw.poll()
        payloads = [n.payload for n in raw.notifies]
        raw.notifies.clear()
    return JsonResponse({"session": _session_id(), "payloads": payloads})


def dirty(request: HttpRequest) -> JsonResponse:
    """Ask Gunicorn's dirty app (tests/project/dirty.py) to round-trip a marker through its own connection."""
    from gunicorn.dirty import get_dirty_client

    answer = get_dirty_client().execute("tests.project.dirty:OrmApp", "session", request.GET.get("m", ""))
    return JsonResponse(answer)
