"""Is a connection's wire protocol in step, after an exception cut a driver call short?

A driver call can end in an exception at two very different moments:

- before anything was sent (an `execute_wrapper` that refuses a query, a parameter the
  driver cannot adapt: psycopg's `TypeError`, psycopg2's `ValueError` for a NUL byte,
  PyMySQL's formatting errors, `UnicodeEncodeError`). The session is exactly as it was:
  Django's own rules apply, and the connection must be left alone.
- after a command went out and before its whole reply came back (a `gevent.Timeout`, a
  signal handler's exception, `GreenletExit`, a cancelled task). The reply is still on
  its way: the next command would read it as its own answer.

The exception's type cannot tell the two apart (Celery's `SoftTimeLimitExceeded` is an
`Exception`; a row converter can fail halfway through a reply), so each driver is asked
what it knows, without a byte of I/O:

=========== ===================================================================
psycopg 3   libpq's transaction status: ACTIVE while a command is in progress
psycopg2    the same, through `connection.info`
PyMySQL     the connection's current result: None from sending a command until its
            whole reply was read (serverhooks._internals.pymysql_reply_pending)
mysqlclient `next_result()`: refused client-side, with no I/O, while a result is unread
sqlite3     in-process: there is no reply in flight
=========== ===================================================================

A connection the driver already closed (PyMySQL and psycopg2 close themselves when a
read is interrupted) is out of step too: its session is gone. Any other driver is assumed
out of step: closing too often costs a reconnect, missing one hands on a stray reply.
"""

from __future__ import annotations

from typing import Any

from serverhooks import _internals, sockets

__all__ = ["out_of_step"]

_LIBPQ_ACTIVE = 1  # PQTRANS_ACTIVE, the same number in psycopg 3 and psycopg2


def out_of_step(raw: Any) -> bool:
    """May a reply still be on its way on this DB-API connection, or is its session gone?"""
    driver = sockets.driver_name(raw)
    try:
        if driver == "psycopg":
            return bool(raw.closed) or int(raw.pgconn.transaction_status) == _LIBPQ_ACTIVE
        if driver == "psycopg2":
            return bool(raw.closed) or int(raw.info.transaction_status) == _LIBPQ_ACTIVE
        if driver == "pymysql":
            return _internals.pymysql_socket(raw) is None or _internals.pymysql_reply_pending(raw)
        if driver == "mysqlclient":
            return _mysqlclient_out_of_step(raw)
        if driver == "sqlite3":
            return False
    except Exception:  # a driver that cannot even say: assume the worst
        return True
    return True


def _mysqlclient_out_of_step(raw: Any) -> bool:
    # mysql_next_result() checks the client's own state first: with a result not yet
    # read it fails at once (2014, commands out of sync) without touching the socket;
    # in step and with no further result it returns -1, again without I/O. A 0 means a
    # multi-statement's next result was waiting: cut short too.
    if not raw.open:
        return True
    try:
        return bool(raw.next_result() != -1)
    except Exception:
        return True
