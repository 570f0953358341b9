"""Database URLs to Django DATABASES entries (no third-party parser needed).

sqlite:///path/to/file.sqlite3
mysql://user:pass@host:port/name             mysqlclient
mysql+pymysql://...                          PyMySQL
postgres://user@host:port/name               psycopg 3
postgres+psycopg2://...                      psycopg2
...?pool=1                                   Django 5.1+'s psycopg pool
...?server_side_binding=1&prepare_threshold=0  psycopg 3 prepared statements (OPTIONS)
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

ENGINES = {
    "sqlite": "django.db.backends.sqlite3",
    "mysql": "django.db.backends.mysql",
    "postgres": "django.db.backends.postgresql",
    "postgresql": "django.db.backends.postgresql",
}


def split_driver(url: str) -> tuple[str, str]:
    """("mysql", "pymysql") for mysql+pymysql://..., ("postgres", "") for postgres://..."""
    scheme = urlsplit(url).scheme
    family, _, driver = scheme.partition("+")
    return family, driver


def parse(url: str, conn_max_age: int = 0) -> dict[str, Any]:
    parts = urlsplit(url)
    family, _driver = split_driver(url)
    if family not in ENGINES:
        raise ValueError(f"unsupported database URL scheme {parts.scheme!r}; use one of {', '.join(ENGINES)}")
    query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
    if family == "sqlite":
        return {"ENGINE": ENGINES[family], "NAME": unquote(parts.path) or ":memory:", "CONN_MAX_AGE": conn_max_age}
    options: dict[str, Any] = {}
    if query.get("pgbouncer") in {"1", "true"}:
        # PgBouncer in transaction mode: no server-side prepared statements (psycopg 3
        # prepares after 5 runs of a query; PgBouncer < 1.21 cannot follow them).
        options["prepare_threshold"] = None
    if query.get("server_side_binding") in {"1", "true"}:  # psycopg 3 binds on the server, may prepare
        options["server_side_binding"] = True
    if query.get("prepare_threshold", "").isdigit():  # psycopg 3 prepares after this many runs
        options["prepare_threshold"] = int(query["prepare_threshold"])
    if query.get("pool") in {"1", "true"}:
        options["pool"] = {"min_size": 2, "max_size": 4}
        conn_max_age = 0  # Django refuses persistent connections with its pool
    return {
        "ENGINE": ENGINES[family],
        # Named cursors need their transaction; PgBouncer may move the next FETCH elsewhere.
        "DISABLE_SERVER_SIDE_CURSORS": query.get("pgbouncer") in {"1", "true"},
        "NAME": unquote(parts.path.lstrip("/")),
        "USER": unquote(parts.username or ""),
        "PASSWORD": unquote(parts.password or ""),
        "HOST": parts.hostname or "",
        "PORT": str(parts.port or ""),
        "CONN_MAX_AGE": conn_max_age,
        "OPTIONS": options,
    }


def with_name(url: str, name: str) -> str:
    """The same server URL pointing at database `name`."""
    parts = urlsplit(url)
    return parts._replace(path="/" + name).geturl()
