"""`python -m tests.support.guardcases CASE...`: what the cursor guard does to a user's transaction.

The cases run one after the other in a process of their own, against DATABASE_URL, as in a
worker (connections tracked and guarded: `registry.start_tracking()`). It prints one JSON
line: per case, the rows it committed (counted on a new connection), the error the code saw,
and how many connections serverhooks closed as interrupted.
GUARD_CONTROL=1 runs it with the guard as it was before issue 20 (tests/support/guard_control.py);
PLAIN=1 without serverhooks at all.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import django


class Refused(Exception):
    """What an `execute_wrapper` raises to refuse a query: nothing is sent."""


class Cut(BaseException):
    """An interrupt that is not a database error (as gevent.Timeout, GreenletExit, a cancellation)."""


def refuse(execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any) -> Any:
    raise Refused(f"refused before sending: {sql[:40]}")


SLEEP = {"mysql": "SELECT SLEEP(0.5)", "postgresql": "SELECT pg_sleep(0.5)"}


@contextmanager
def cut_after(seconds: float) -> Iterator[None]:
    def raise_cut(signum: int, frame: Any) -> None:
        raise Cut()

    signal.signal(signal.SIGALRM, raise_cut)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def _marker() -> str:
    return uuid.uuid4().hex[:16]


def _error(call: Callable[[], Any]) -> str | None:
    try:
        call()
        return None
    except BaseException as exc:
        return f"{type(exc).__name__}: {exc}"[:300]


def _committed(markers: list[str]) -> int:
    """Rows with these markers, as a new session sees them (the work's own connection may be closed)."""
    from django.db import connections

    reader = connections.create_connection("default")
    try:
        with reader.cursor() as cursor:
            placeholders = ", ".join(["%s"] * len(markers))
            cursor.execute(f"SELECT COUNT(*) FROM sh_hit WHERE marker IN ({placeholders})", markers)
            return int(cursor.fetchone()[0])
    finally:
        reader.close()


def _adaptation_error_params(vendor: str, driver: str) -> tuple[str, list[Any]] | None:
    """A query whose parameters this driver refuses before sending: a non-database exception."""
    if driver == "psycopg":
        from psycopg.types.json import Jsonb

        return "SELECT %s", [Jsonb(object())]  # json.dumps raises TypeError while adapting
    if driver == "psycopg2":
        return "SELECT %s", ["nul\x00byte"]  # ValueError: a string literal cannot contain NUL
    if driver in ("pymysql", "mysqlclient"):
        return "SELECT %s", ["lone \ud800 surrogate"]  # UnicodeEncodeError while encoding the query
    return None


def _driver() -> str:
    from django.db import connection

    from serverhooks import sockets

    connection.ensure_connection()
    return sockets.driver_name(connection.connection)


def caught_refusal_inside_atomic() -> dict[str, Any]:
    """A row written, then a query an execute_wrapper refuses, caught: plain Django commits the row."""
    from django.db import connection, transaction

    from tests.project.models import Hit

    marker = _marker()

    def work() -> None:
        with transaction.atomic():
            Hit.objects.create(marker=marker, pid=os.getpid())
            try:
                with connection.execute_wrapper(refuse):
                    Hit.objects.filter(marker=marker).exists()
            except Refused:
                pass

    return {"error": _error(work), "rows": _committed([marker])}


def refused_after_a_caught_database_error() -> dict[str, Any]:
    """A database error's reply (a duplicate key) read and caught; then a refused query, caught:
    the protocol is in step all along, so the block ends as in plain Django (MySQL commits the row;
    PostgreSQL aborted the transaction at the error)."""
    from django.db import IntegrityError, connection, transaction

    from tests.project.models import Hit

    marker = _marker()

    def work() -> None:
        with transaction.atomic():
            Hit.objects.create(marker=marker, pid=os.getpid())
            try:  # no savepoint: MySQL goes on with the transaction after a duplicate key
                with connection.cursor() as cursor:
                    cursor.execute("INSERT INTO sh_hit (id, marker, pid) SELECT id, marker, pid FROM sh_hit LIMIT 1")
            except IntegrityError:
                pass
            try:
                with connection.execute_wrapper(refuse):
                    Hit.objects.filter(marker=marker).exists()
            except Refused:
                pass

    return {"error": _error(work), "rows": _committed([marker])}


def skip_bad_rows() -> dict[str, Any]:
    """The usual import loop: a savepoint per row, rows the driver refuses are skipped."""
    from django.db import connection, transaction

    from tests.project.models import Hit

    bad = _adaptation_error_params(connection.vendor, _driver())
    markers = [_marker() for _ in range(5)]

    def work() -> None:
        with transaction.atomic():
            for index, marker in enumerate(markers):
                try:
                    with transaction.atomic():
                        Hit.objects.create(marker=marker, pid=os.getpid())
                        if index == 2:
                            if bad is None:
                                with connection.execute_wrapper(refuse):
                                    Hit.objects.count()
                            else:
                                with connection.cursor() as cursor:
                                    cursor.execute(*bad)
                except Exception:
                    continue

    return {"error": _error(work), "rows": _committed(markers), "driver_refuses": bad is not None}


def caught_adaptation_error_inside_atomic() -> dict[str, Any]:
    """A parameter the driver cannot adapt (TypeError/ValueError raised before sending), caught."""
    from django.db import connection, transaction

    from tests.project.models import Hit

    bad = _adaptation_error_params(connection.vendor, _driver())
    if bad is None:
        return {"skipped": "this driver turns the error into a database error"}
    marker = _marker()
    seen: dict[str, str] = {}

    def work() -> None:
        with transaction.atomic():
            Hit.objects.create(marker=marker, pid=os.getpid())
            try:
                with connection.cursor() as cursor:
                    cursor.execute(*bad)
            except Exception as exc:
                seen["raised"] = type(exc).__name__

    return {"error": _error(work), "rows": _committed([marker]), **seen}


def caught_interrupt_inside_atomic() -> dict[str, Any]:
    """A row written, then a query cut short by an interrupt the code catches: the reply may be in flight."""
    from django.db import connection, transaction

    from tests.project.models import Hit

    marker = _marker()
    seen: dict[str, Any] = {"cut": False}

    def work() -> None:
        with transaction.atomic():
            Hit.objects.create(marker=marker, pid=os.getpid())
            try:
                with cut_after(0.15), connection.cursor() as cursor:
                    cursor.execute(SLEEP[connection.vendor])
            except Cut:
                seen["cut"] = True

    return {"error": _error(work), "rows": _committed([marker]), **seen}


def caught_interrupt_in_a_transaction_managed_by_hand() -> dict[str, Any]:
    """autocommit off, outside atomic(): a row, a query cut short and caught, a second row, commit()."""
    from django.db import connection, transaction

    from tests.project.models import Hit

    markers = [_marker(), _marker()]
    seen: dict[str, Any] = {"cut": False}

    def work() -> None:
        transaction.set_autocommit(False)
        try:
            Hit.objects.create(marker=markers[0], pid=os.getpid())
            try:
                with cut_after(0.15), connection.cursor() as cursor:
                    cursor.execute(SLEEP[connection.vendor])
            except Cut:
                seen["cut"] = True
            Hit.objects.create(marker=markers[1], pid=os.getpid())
            transaction.commit()
        except BaseException:
            transaction.rollback()
            raise
        finally:
            transaction.set_autocommit(True)

    error = _error(work)
    return {"error": error, "rows": _committed(markers), "second_row": _committed(markers[1:]), **seen}


def _end_session_from_outside(connection: Any) -> int:
    """KILL / pg_terminate_backend this connection's session, from another session (any driver)."""
    from django.db import connections

    with connection.cursor() as cursor:
        cursor.execute({"mysql": "SELECT CONNECTION_ID()", "postgresql": "SELECT pg_backend_pid()"}[connection.vendor])
        session = int(cursor.fetchone()[0])
    admin = connections.create_connection("default")
    try:
        with admin.cursor() as cursor:
            if connection.vendor == "mysql":
                cursor.execute(f"KILL {session}")
            else:
                cursor.execute("SELECT pg_terminate_backend(%s)", [session])
        return 1
    finally:
        admin.close()


def ended_session_in_a_transaction_managed_by_hand() -> dict[str, Any]:
    """autocommit off: a row, the server ends the session, the idle-session check runs (a Celery
    task's start, a release="thread" task's start), a second row, commit()."""
    from django.db import connection, transaction

    from serverhooks import health
    from tests.project.models import Hit

    markers = [_marker(), _marker()]
    seen: dict[str, Any] = {}

    def work() -> None:
        transaction.set_autocommit(False)
        try:
            Hit.objects.create(marker=markers[0], pid=os.getpid())
            seen["ended"] = _end_session_from_outside(connection)
            time.sleep(0.3)  # the server's close reaches the socket
            seen["closed_by_check"] = health.close_ended_in_this_thread()
            Hit.objects.create(marker=markers[1], pid=os.getpid())
            transaction.commit()
        except BaseException:
            transaction.rollback()
            raise
        finally:
            transaction.set_autocommit(True)

    error = _error(work)
    connection.close()  # the session this case ended: the next case starts on a new one
    return {"error": error, "rows": _committed(markers), "second_row": _committed(markers[1:]), **seen}


def interrupt_propagates_out_of_atomic() -> dict[str, Any]:
    """The interrupt is not caught inside the block: it propagates, unchanged, and nothing is committed."""
    from django.db import connection, transaction

    from tests.project.models import Hit

    marker = _marker()

    def work() -> None:
        with transaction.atomic():
            Hit.objects.create(marker=marker, pid=os.getpid())
            with cut_after(0.15), connection.cursor() as cursor:
                cursor.execute(SLEEP[connection.vendor])

    error = _error(work)
    follow_up = _error(lambda: Hit.objects.filter(marker=marker).count())
    return {"error": error, "rows": _committed([marker]), "follow_up_error": follow_up}


def interrupted_commit() -> dict[str, Any]:
    """COMMIT sent, its reply not read: the block must raise; its rows are all there or none."""
    from django.db import connection, transaction

    from tests.project.models import Hit

    markers = [_marker(), _marker()]

    def cut_the_commit_reply() -> None:
        raw: Any = connection.connection
        if connection.vendor == "mysql" and _driver() == "pymysql":
            original = raw._read_ok_packet

            def read_ok(*args: Any) -> Any:
                raw._read_ok_packet = original  # once
                raise Cut()

            raw._read_ok_packet = read_ok
        elif _driver() == "psycopg":
            original_wait = raw.wait

            def wait(gen: Any, *args: Any, **kwargs: Any) -> Any:
                raw.wait = original_wait  # once: send the command, then stop before its reply
                next(gen)
                raise Cut()

            raw.wait = wait
        else:
            raise RuntimeError("interrupted_commit needs PyMySQL or psycopg 3")

    def work() -> None:
        with transaction.atomic():
            for marker in markers:
                Hit.objects.create(marker=marker, pid=os.getpid())
            cut_the_commit_reply()

    error = _error(work)
    answer: dict[str, int] = {}

    def follow_up() -> None:
        answer["count"] = Hit.objects.filter(marker__in=markers).count()

    follow_up_error = _error(follow_up)
    rows = _committed(markers)
    # The next query on this process's connection must get its own answer, not a stray reply.
    follow_up_right = follow_up_error is None and answer.get("count") == rows
    return {"error": error, "rows": rows, "follow_up_error": follow_up_error, "follow_up_right": follow_up_right}


CASES = {
    case.__name__: case
    for case in (
        caught_refusal_inside_atomic,
        refused_after_a_caught_database_error,
        skip_bad_rows,
        caught_adaptation_error_inside_atomic,
        caught_interrupt_inside_atomic,
        caught_interrupt_in_a_transaction_managed_by_hand,
        ended_session_in_a_transaction_managed_by_hand,
        interrupt_propagates_out_of_atomic,
        interrupted_commit,
    )
}


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.project.settings")
    django.setup()
    from serverhooks import registry, stats

    if os.environ.get("PLAIN") != "1":
        if os.environ.get("GUARD_CONTROL") == "1":
            import tests.support.guard_control  # noqa: F401 - the guard as it was
        registry.start_tracking()  # what every adapter does in a worker: it guards new connections
    results: dict[str, dict[str, Any]] = {}
    for name in sys.argv[1:] or list(CASES):
        before = stats()["closed_interrupted"]
        results[name] = CASES[name]()
        results[name]["closed_interrupted"] = stats()["closed_interrupted"] - before
    print(json.dumps(results, default=str))


if __name__ == "__main__":
    main()
