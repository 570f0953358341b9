"""The real database servers the tests use: where they are, and admin queries on them.

SERVERHOOKS_TEST_MYSQL_URL and SERVERHOOKS_TEST_POSTGRES_URL point at them; the
defaults are this machine's local servers. Each test gets a database of its own,
so sessions can be counted per test on the server side.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import unquote, urlsplit

import psycopg
import pymysql

DEFAULT_URLS = {
    "mysql": "mysql://root@127.0.0.1:3306/test",
    "postgres": "postgres://postgres@127.0.0.1:5432/test",
    "redis": "redis://127.0.0.1:6379/0",
}


DEFAULT_PORTS = {"mysql": 3306, "postgres": 5432, "redis": 6379}


def port(family: str) -> int:
    """The TCP port of the server the suite was pointed at."""
    return urlsplit(server_url(family)).port or DEFAULT_PORTS[family]


def server_url(family: str) -> str:
    return os.environ.get(f"SERVERHOOKS_TEST_{family.upper()}_URL") or DEFAULT_URLS[family]


def connection_params(url: str) -> dict[str, Any]:
    parts = urlsplit(url)
    return {
        "host": parts.hostname or "127.0.0.1",
        "port": parts.port,
        "user": unquote(parts.username or ""),
        "password": unquote(parts.password or ""),
        "name": unquote(parts.path.lstrip("/")),
    }


@contextmanager
def admin(family: str, database: str | None = None, url: str | None = None) -> Iterator[Any]:
    """An autocommit admin connection (not through Django, not through serverhooks).

    To the server the suite was pointed at, or to the one `url` names."""
    p = connection_params(url or server_url(family))
    common = {"host": p["host"], "user": p["user"], "password": p["password"], "autocommit": True, "connect_timeout": 5}
    if family == "mysql":
        conn: Any = pymysql.connect(port=p["port"] or 3306, database=database or p["name"], **common)
    else:
        conn = psycopg.connect(port=p["port"] or 5432, dbname=database or p["name"], **common)
    try:
        yield conn
    finally:
        conn.close()


def reachable(family: str) -> str | None:
    """None when the server answers, else why not."""
    if family == "redis":
        import redis

        try:
            redis.Redis.from_url(server_url(family), socket_timeout=5).ping()
            return None
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
    try:
        with admin(family) as conn:
            conn.cursor().execute("SELECT 1")
        return None
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def query(
    family: str, sql: str, params: tuple[Any, ...] = (), database: str | None = None, url: str | None = None
) -> list[tuple[Any, ...]]:
    with admin(family, database, url) as conn:
        cur = conn.cursor()
        cur.execute(sql, params)
        return list(cur.fetchall()) if cur.description else []


def create_database(family: str) -> str:
    name = "sh_" + uuid.uuid4().hex[:12]
    query(family, f"CREATE DATABASE {name}")
    return name


def drop_database(family: str, name: str) -> None:
    if family == "mysql":
        for (session_id,) in query(family, "SELECT ID FROM information_schema.PROCESSLIST WHERE DB = %s", (name,)):
            try:
                query(family, f"KILL {int(session_id)}")
            except Exception:
                pass
        query(family, f"DROP DATABASE IF EXISTS {name}")
    else:
        query(family, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def sessions(family: str, name: str) -> list[int]:
    """Server-side ids of the sessions connected to database `name` right now."""
    if family == "mysql":
        rows = query(family, "SELECT ID FROM information_schema.PROCESSLIST WHERE DB = %s", (name,))
    else:
        rows = query(family, "SELECT pid FROM pg_stat_activity WHERE datname = %s", (name,))
    return sorted(int(r[0]) for r in rows)


def django_url(family: str, name: str, driver: str = "", extra_query: str = "") -> str:
    """The DATABASE_URL the test project uses to reach database `name`."""
    parts = urlsplit(server_url(family))
    scheme = family + (f"+{driver}" if driver else "")
    return parts._replace(scheme=scheme, path="/" + name, query=extra_query).geturl()


def aborted_clients() -> int:
    return int(query("mysql", "SHOW GLOBAL STATUS LIKE 'Aborted_clients'")[0][1])


def wait_sessions_at_most(family: str, name: str, limit: int, timeout: float = 15.0) -> list[int]:
    """The sessions on database `name`, polled until at most `limit` remain (bounded by `timeout`).

    A client's close reaches the server's session list a moment later, PostgreSQL's the latest.
    """
    deadline = time.monotonic() + timeout
    current = sessions(family, name)
    while len(current) > limit and time.monotonic() < deadline:
        time.sleep(0.1)
        current = sessions(family, name)
    return current


def sessions_or_none(family: str, name: str, tries: int = 20, pause: float = 0.25) -> list[int] | None:
    """`sessions()`, retried while the server refuses new connections; None if it kept refusing."""
    for _ in range(tries):
        try:
            return sessions(family, name)
        except Exception:
            time.sleep(pause)
    return None


class SessionSampler:
    """Samples the server-side session count of one database in a thread (bounded)."""

    def __init__(self, family: str, name: str, interval: float = 0.05, max_seconds: float = 300.0) -> None:
        self.family, self.name, self.interval, self.max_seconds = family, name, interval, max_seconds
        self.peak = 0
        self.samples = 0
        self.refused: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                self.peak = max(self.peak, len(sessions(self.family, self.name)))
                self.samples += 1
            except Exception as exc:  # e.g. "Too many connections": the control arm's symptom
                self.refused.append(f"{type(exc).__name__}: {exc}")
            self._stop.wait(self.interval)

    def __enter__(self) -> SessionSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
