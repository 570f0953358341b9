"""Read a deployment's Django settings: its databases, and what serverhooks is set to do.

The doctor loads them from DJANGO_SETTINGS_MODULE (running `django.setup()`, with the
current directory importable, as manage.py does); Django's system checks read the
settings of the process they run in, which is set up already.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
from typing import Any

from serverhooks._log import describe_error, redact
from serverhooks.doctor import pooler
from serverhooks.doctor.findings import DoctorError
from serverhooks.doctor.pooler import Pooler


@dataclasses.dataclass
class Database:
    alias: str
    vendor: str  # mysql | postgresql | sqlite | other
    driver: str  # mysqlclient | pymysql | psycopg | psycopg2 | sqlite3 | ?
    conn_max_age: float | None  # None: unlimited
    health_checks: bool
    django_pool: bool
    described: str
    wait_timeout: int | None = None
    max_connections: int | None = None
    live_error: str | None = None
    host: str = ""
    port: int | None = None
    name: str = ""
    server_side_cursors: bool = True  # not DISABLE_SERVER_SIDE_CURSORS: .iterator() uses named cursors
    prepares_statements: bool = False  # psycopg 3, server_side_binding and a numeric prepare_threshold
    prepare_threshold: int | None = None
    pooler: Pooler | None = None  # a transaction pooler in between (see pooler.py)


@dataclasses.dataclass
class Django:
    settings_module: str
    debug: bool
    serverhooks_app: bool
    gevent_pool: bool
    pool_size: int
    psycogreen: bool
    databases: list[Database]


def _driver(vendor: str) -> str:
    if vendor == "mysql":
        try:
            import MySQLdb

            return "pymysql" if MySQLdb.__name__ == "pymysql" else "mysqlclient"
        except ImportError:
            return "?"
    if vendor == "postgresql":
        try:
            from django.db.backends.postgresql.psycopg_any import is_psycopg3

            return "psycopg" if is_psycopg3 else "psycopg2"
        except Exception:
            return "?"
    return "sqlite3" if vendor == "sqlite" else "?"


def importable_from_here() -> None:
    """Like manage.py, Gunicorn and Celery: the project in the current directory is importable."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


def read_django(live: bool, set_up: bool = True) -> Django | None:
    """Django settings from DJANGO_SETTINGS_MODULE, or None when it is unset.

    `set_up=False`: Django is set up already (a system check); leave it and sys.path alone.
    """
    module = os.environ.get("DJANGO_SETTINGS_MODULE")
    if not module:
        return None
    try:
        import django

        if set_up:
            importable_from_here()
            django.setup()
        from django.conf import settings
        from django.db import connections
    except Exception as exc:
        raise DoctorError(f"cannot load Django settings {module!r}: {describe_error(exc)}") from None
    from serverhooks import _django, conf

    conf.reload()
    databases = []
    for alias in connections:
        settings_dict = connections.settings[alias]
        engine = str(settings_dict.get("ENGINE", ""))
        vendor = next((v for v in ("mysql", "postgresql", "sqlite") if v in engine), "other")
        options = settings_dict.get("OPTIONS") or {}
        port = str(settings_dict.get("PORT") or "")
        threshold = options.get("prepare_threshold")
        database = Database(
            alias=alias,
            vendor=vendor,
            driver=_driver(vendor),
            conn_max_age=settings_dict.get("CONN_MAX_AGE", 0),
            health_checks=bool(settings_dict.get("CONN_HEALTH_CHECKS")),
            django_pool=bool(options.get("pool")),
            described=redact(_django.describe_alias(alias, settings_dict), [str(settings_dict.get("PASSWORD", ""))]),
            host=str(settings_dict.get("HOST") or ""),
            port=int(port) if port.isdigit() else None,
            name=str(settings_dict.get("NAME") or ""),
            server_side_cursors=not settings_dict.get("DISABLE_SERVER_SIDE_CURSORS"),
            # Django's defaults prepare nothing: client-side binding, prepare_threshold None.
            prepares_statements=bool(options.get("server_side_binding"))
            and isinstance(threshold, int)
            and not isinstance(threshold, bool),
            prepare_threshold=threshold if isinstance(threshold, int) else None,
        )
        if vendor == "postgresql":
            database.pooler = pooler.from_settings(database.host, database.port)
        if live and vendor in ("mysql", "postgresql"):
            _read_live(connections[alias], database)
        databases.append(database)
    return Django(
        settings_module=module,
        debug=bool(settings.DEBUG),
        serverhooks_app="serverhooks" in settings.INSTALLED_APPS
        or any(str(app).startswith("serverhooks.") for app in settings.INSTALLED_APPS),
        gevent_pool=bool(conf.get("GEVENT_POOL")),
        pool_size=int(conf.get("POOL_SIZE")),
        psycogreen=importlib.util.find_spec("psycogreen") is not None,
        databases=databases,
    )


def _configured_databases() -> dict[str, Any]:
    """DATABASES of DJANGO_SETTINGS_MODULE, without connecting; {} when unset or unreadable."""
    if not os.environ.get("DJANGO_SETTINGS_MODULE"):
        return {}
    importable_from_here()
    try:
        from django.conf import settings

        return dict(settings.DATABASES)
    except Exception:
        return {}


def database_ports() -> dict[int, str]:
    """{port: vendor} of the TCP databases in DJANGO_SETTINGS_MODULE's DATABASES; {} when unknown.

    Live mode recognises the usual ports by itself; these add a server on another port.
    Reading them connects to nothing, and any failure just leaves live mode with the usual ones.
    """
    configured = _configured_databases()
    ports: dict[int, str] = {}
    for settings_dict in configured.values():
        engine = str(settings_dict.get("ENGINE", ""))
        vendor = next((v for v in ("mysql", "postgresql") if v in engine), None)
        if vendor and str(settings_dict.get("PORT") or "").isdigit():
            ports[int(settings_dict["PORT"])] = vendor
    return ports


def database_socket_paths() -> dict[str, str]:
    """{Unix socket path: vendor} of the databases in DJANGO_SETTINGS_MODULE whose HOST is a path.

    Live mode recognises the usual paths by their names; these add one by another name.
    """
    configured = _configured_databases()
    paths: dict[str, str] = {}
    for settings_dict in configured.values():
        engine = str(settings_dict.get("ENGINE", ""))
        host = str(settings_dict.get("HOST") or "")
        options = settings_dict.get("OPTIONS") or {}
        if "postgresql" in engine and host.startswith("/"):
            paths[f"{host.rstrip('/')}/.s.PGSQL.{settings_dict.get('PORT') or 5432}"] = "postgresql"
        elif "mysql" in engine:
            for path in (host, str(options.get("unix_socket") or "")):
                if path.startswith("/"):
                    paths[path] = "mysql"
    return paths


def _read_live(wrapper: Any, database: Database) -> None:
    """wait_timeout, max_connections and, on PostgreSQL, a pooler in between (the server's own port);
    never fails the doctor."""
    try:
        with wrapper.cursor() as cursor:
            if database.vendor == "mysql":
                cursor.execute("SELECT @@wait_timeout, @@max_connections, NULL")
            else:
                cursor.execute("SELECT NULL, current_setting('max_connections')::int, current_setting('port')::int")
            wait_timeout, max_connections, server_port = cursor.fetchone()
        database.wait_timeout = None if wait_timeout is None else int(wait_timeout)
        database.max_connections = int(max_connections)
    except Exception as exc:
        database.live_error = describe_error(exc)
        return
    finally:
        try:
            wrapper.close()
        except Exception:
            pass
    if server_port is not None:
        django_port = database.port or 5432
        if int(server_port) != django_port:
            database.pooler = pooler.from_server(
                wrapper.get_connection_params(), database.driver, django_port, int(server_port), database.name
            )
        elif database.pooler and database.pooler.seen.startswith("PORT"):
            database.pooler = None  # the server itself listens there: no pooler in between
