"""Issue 22, part 4: POOL_SCOPE='transaction' on a real database, with the threads' waiter.

Run as `python -m tests.support.scope_cases` with DATABASE_URL set and SERVERHOOKS_POOL_SCOPE
`transaction` (or `request`, the comparison); prints one JSON line of what each case saw.
With SERVERHOOKS_TEST_SCOPE_CONTROL=1 two of its safeguards are reverted (a wrapper given back
stays usable through a kept reference; no statement pins its session), to show what they stop.

Cases (every "session" is the server's own id for it: pg_backend_pid() or CONNECTION_ID()):
- `between`: a unit runs a query, then "renders": is its wrapper in use meanwhile? Its next
  query checks one out again.
- `atomic`: inside atomic() the session stays (same id, in use throughout); it goes back at
  the block's end.
- `pinned`: a session-level SET keeps the session with the unit (and logs one warning).
- `hand_begin`: a unit BEGINs by hand; another unit INSERTs in autocommit; the first rolls back.
  Is the other unit's row committed? Without pinning, where the driver does not report the open
  transaction (mysqlclient), the other unit gets the session in the middle of it, and its row
  goes with the first unit's ROLLBACK.
- `kept_reference`: a unit keeps `connections[alias]` across a release, another unit checks
  the wrapper out; what does the first unit's next use do?
"""

from __future__ import annotations

import json
import logging
import os
import threading
from typing import Any

import django

django.setup()

from django.db import connections, transaction  # noqa: E402

from serverhooks.pool import active, scope  # noqa: E402
from serverhooks.pool import wrappers as pool_wrappers  # noqa: E402
from serverhooks.pool.threads import ThreadWaiter  # noqa: E402

VENDOR = connections["default"].vendor
SESSION_ID = "SELECT pg_backend_pid()" if VENDOR == "postgresql" else "SELECT CONNECTION_ID()"
CONTROL = os.environ.get("SERVERHOOKS_TEST_SCOPE_CONTROL") == "1"

warnings: list[str] = []


class _Collect(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        warnings.append(record.getMessage())


logging.getLogger("serverhooks").addHandler(_Collect(level=logging.WARNING))

if CONTROL:
    pool_wrappers.disown = lambda wrapper: None
    scope._SESSION_STATE = __import__("re").compile(r"(?!)")  # never matches: nothing pins

active.activate(ThreadWaiter(), size=2, timeout=5.0)
POOL = active._pools["default"]


def session_id() -> int:
    with connections["default"].cursor() as cursor:
        cursor.execute(SESSION_ID)
        return int(cursor.fetchone()[0])


def in_use() -> int:
    return POOL.occupancy()[0]


def in_unit(body: Any) -> Any:
    """Run `body` in a thread of its own (a request), releasing at its end like request_finished."""
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = body()
        except Exception as exc:
            result["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            active.release_current()

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)
    return result


def case_between() -> dict[str, Any]:
    def body() -> dict[str, Any]:
        first = session_id()
        rendering = in_use()  # between the two queries: what a page holds while it renders
        session_id()
        return {"in_use_while_rendering": rendering, "in_use_after": in_use(), "first_ok": first > 0}

    outcome = in_unit(body)
    assert "value" in outcome, outcome
    return outcome["value"]  # type: ignore[no-any-return]


def case_atomic() -> dict[str, Any]:
    def body() -> dict[str, Any]:
        with transaction.atomic():
            first = session_id()
            inside = in_use()
            second = session_id()
        return {"same_session_in_block": first == second, "in_use_in_block": inside, "in_use_after_block": in_use()}

    outcome = in_unit(body)
    assert "value" in outcome, outcome
    return outcome["value"]  # type: ignore[no-any-return]


def case_pinned() -> dict[str, Any]:
    statement = "SET statement_timeout = 5000" if VENDOR == "postgresql" else "SET @serverhooks_marker = 1"

    def body() -> dict[str, Any]:
        with connections["default"].cursor() as cursor:
            cursor.execute(statement)
        return {"in_use_after_set": in_use()}

    seen = in_unit(body)["value"]
    seen["warned"] = any("leaves state in the session" in message for message in warnings)
    seen["warning_names_no_value"] = not any("5000" in message for message in warnings)
    return seen  # type: ignore[no-any-return]


def case_hand_begin(table: str) -> dict[str, Any]:
    began, other_done = threading.Event(), threading.Event()

    def writer() -> dict[str, Any]:
        with connections["default"].cursor() as cursor:
            cursor.execute("BEGIN")
        began.set()
        other_done.wait(10)
        with connections["default"].cursor() as cursor:
            cursor.execute(f"INSERT INTO {table} (note) VALUES ('writer')")
        with connections["default"].cursor() as cursor:
            cursor.execute("ROLLBACK")  # the writer's own choice: its row goes
        return {}

    def other() -> dict[str, Any]:
        began.wait(10)
        with connections["default"].cursor() as cursor:  # autocommit: this row is committed, or fails
            cursor.execute(f"INSERT INTO {table} (note) VALUES ('other')")
        other_done.set()
        return {}

    threads = [threading.Thread(target=in_unit, args=(unit,)) for unit in (writer, other)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    POOL.close_idle()  # any session left in a transaction rolls back as it closes

    def count() -> int:
        with connections["default"].cursor() as cursor:
            cursor.execute(f"SELECT COUNT(*) FROM {table} WHERE note = 'other'")
            return int(cursor.fetchone()[0])

    return {"other_rows_committed": in_unit(count)["value"]}


def case_kept_reference() -> dict[str, Any]:
    released, other_holds = threading.Event(), threading.Event()
    seen: dict[str, Any] = {}

    def keeper() -> None:
        kept = connections["default"]
        with kept.cursor() as cursor:  # closing it gives the wrapper back
            cursor.execute(SESSION_ID)
        try:
            cursor = kept.cursor()  # a reference kept across the release
        except Exception as exc:
            seen["keeper_error"] = type(exc).__name__
            released.set()
            return
        released.set()
        other_holds.wait(10)  # meanwhile another unit checked the idle wrapper out
        cursor.execute(SESSION_ID)
        seen["keeper_session"] = int(cursor.fetchone()[0])
        cursor.close()

    def other() -> None:
        released.wait(10)
        with transaction.atomic():  # holds its wrapper for the whole block
            seen["other_session"] = session_id()
            other_holds.set()
            threading.Event().wait(0.3)  # the keeper's query runs now

    threads = [threading.Thread(target=in_unit, args=(unit,)) for unit in (keeper, other)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return {
        "keeper_refused": seen.get("keeper_error"),
        "two_units_on_one_session": seen.get("keeper_session") == seen.get("other_session"),
    }


def main() -> None:
    table = f"sh_scope_{os.getpid()}"
    with connections["default"].cursor() as cursor:
        cursor.execute(f"CREATE TABLE {table} (note VARCHAR(20))")
    active.release_current()
    try:
        result = {
            "scope": os.environ.get("SERVERHOOKS_POOL_SCOPE", "request"),
            "between": case_between(),
            "atomic": case_atomic(),
            "pinned": case_pinned(),
            "hand_begin": case_hand_begin(table),
            "kept_reference": case_kept_reference(),
        }
    finally:
        active.release_current()
        with connections["default"].cursor() as cursor:
            cursor.execute(f"DROP TABLE {table}")
        active.release_current()
        active.deactivate()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
