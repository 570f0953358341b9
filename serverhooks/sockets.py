"""Make an inherited DB-API connection harmless without sending a byte on its socket.

Why not simply close it: in a forked child the socket is shared with the parent,
so `close()` sends COM_QUIT (MySQL) or Terminate (PostgreSQL) on the parent's
session and kills it. mysqlclient and psycopg2 do the same when the object is
garbage collected. And a bare `os.close(fd)` frees the number for reuse, so a
later close by the driver would write into whatever file got that number.

So: `dup2` an fd on /dev/null over the socket's fd. The number stays taken, the
child's reference to the shared socket is gone, and anything the driver sends
later fails with ENOTSOCK instead of reaching the server. Only then do we close
the driver object, which frees its memory and the /dev/null fd deterministically.

SQLite handles and drivers we do not recognise have no fd we can safely swap, so
they are kept alive forever instead: never used again, never finalised.
"""

from __future__ import annotations

import os
from typing import Any

from serverhooks import _internals
from serverhooks._log import describe_error, logger

__all__ = ["driver_name", "keep_forever", "neutralise", "socket_fd"]

# Objects that must never be finalised in this process (see module docstring).
_never_finalise: list[object] = []


def keep_forever(obj: object) -> None:
    """Keep `obj` referenced for the life of the process: its finaliser never runs here."""
    _never_finalise.append(obj)


_DRIVERS = {"MySQLdb": "mysqlclient", "pymysql": "pymysql", "psycopg": "psycopg", "psycopg2": "psycopg2"}
_driver_of_type: dict[type, str] = {}  # asked at every request start: worth remembering


def driver_name(raw: Any) -> str:
    """The driver behind a DB-API connection: mysqlclient, pymysql, psycopg, psycopg2, sqlite3 or ?."""
    kind = type(raw)
    name = _driver_of_type.get(kind)
    if name is None:
        module = kind.__module__.split(".")[0]
        name = _driver_of_type[kind] = {**_DRIVERS, "sqlite3": "sqlite3"}.get(module, module or "?")
    return name


def socket_fd(raw: Any) -> int | None:
    """The fd of the connection's socket, or None if it has none or is already closed."""
    driver = driver_name(raw)
    try:
        if driver == "pymysql":
            sock = _internals.pymysql_socket(raw)
            return sock.fileno() if sock is not None else None
        if driver == "psycopg":
            return None if raw.closed else int(raw.pgconn.socket)
        if driver == "psycopg2":
            return None if raw.closed else int(raw.fileno())
        if driver == "mysqlclient":
            return int(raw.fileno()) if raw.open else None
    except Exception:  # a connection broken before the fork has no usable fd
        return None
    return None


def _swap_in_devnull(fd: int) -> None:
    devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        os.dup2(devnull, fd, inheritable=False)
    finally:
        os.close(devnull)


def neutralise(raw: Any) -> None:
    """Detach this process from `raw`'s socket, then release `raw` without network I/O."""
    driver = driver_name(raw)
    if driver not in {"mysqlclient", "pymysql", "psycopg", "psycopg2"}:
        _never_finalise.append(raw)
        return
    fd = socket_fd(raw)
    if fd is None or fd < 0:
        # Already closed in the parent (or broken): nothing shared remains, but its
        # finaliser may still try a goodbye, so keep it out of the GC's reach.
        _never_finalise.append(raw)
        return
    try:
        _swap_in_devnull(fd)
    except OSError as exc:
        logger.warning("serverhooks: could not detach %s socket fd %d: %s", driver, fd, describe_error(exc))
        _never_finalise.append(raw)
        return
    try:
        raw.close()  # every byte it tries to send now fails with ENOTSOCK
    except Exception as exc:
        logger.debug("serverhooks: closing a detached %s connection: %s", driver, describe_error(exc))
