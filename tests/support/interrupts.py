"""`python -m tests.support.interrupts`: a query cut short in the client, then the next query.

    DATABASE_URL=mysql+pymysql://... python -m tests.support.interrupts --cut think|reply

A timer signal raises an exception that is not a database error while a query is
under way: during the server's think time (`think`), or halfway through a reply of
several MB (`reply`: rows of 1 MB, with a pause after the fifth). The script waits
until the rest of that reply has arrived, then asks a marker query on the same
`django.db.connection` and prints JSON: the marker's answer, its error, the session
ids, and serverhooks' counters. SERVERHOOKS_CLOSE_INTERRUPTED=0 is the control.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
import uuid
from typing import Any

import django


class Cut(BaseException):
    """Not a database error, as gevent.Timeout, GreenletExit or a cancellation are not."""


SLOW = {
    ("mysql", "think"): "SELECT SLEEP(0.4)",
    ("postgresql", "think"): "SELECT pg_sleep(0.4)",
    ("mysql", "reply"): "SELECT seq, REPEAT('x', 1000000), IF(seq = 5, SLEEP(0.4), 0) FROM seq_1_to_10",
    ("postgresql", "reply"): (
        "SELECT i, repeat('x', 1000000), CASE WHEN i = 5 THEN pg_sleep(0.4) END FROM generate_series(1, 10) i"
    ),
}
CUT_AFTER = {"think": 0.1, "reply": 0.2}
SESSION_SQL = {"mysql": "SELECT CONNECTION_ID()", "postgresql": "SELECT pg_backend_pid()"}


def _raise_cut(signum: int, frame: Any) -> None:
    raise Cut()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cut", choices=["think", "reply"], required=True)
    args = parser.parse_args()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.project.settings")
    django.setup()
    from django.db import connection

    from serverhooks import registry, stats

    registry.start_tracking()  # what every adapter does in a worker: it guards new connections
    result: dict[str, Any] = {"cut": False}
    with connection.cursor() as cursor:
        cursor.execute(SESSION_SQL[connection.vendor])
        result["session_before"] = cursor.fetchone()[0]
    signal.signal(signal.SIGALRM, _raise_cut)
    signal.setitimer(signal.ITIMER_REAL, CUT_AFTER[args.cut])
    try:
        with connection.cursor() as cursor:
            cursor.execute(SLOW[(connection.vendor, args.cut)])
            cursor.fetchall()
    except Cut:
        result["cut"] = True
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    time.sleep(1.0)  # the rest of the interrupted reply is on the socket by now
    marker = uuid.uuid4().hex
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT %s", [marker])
            result["answer_right"] = cursor.fetchone()[0] == marker
            cursor.execute(SESSION_SQL[connection.vendor])
            result["session_after"] = cursor.fetchone()[0]
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"[:300]
    result["serverhooks"] = stats()
    print(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
