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
from serverhooks.doctor.findings import DoctorError


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
        database = Database(
            alias=alias,
            vendor=vendor,
            driver=_driver(vendor),
            conn_max_age=settings_dict.get("CONN_MAX_AGE", 0),
            health_checks=bool(settings_dict.get("CONN_HEALTH_CHECKS")),
            django_pool=bool(settings_dict.get("OPTIONS", {}).get("pool")),
            described=redact(_django.describe_alias(alias, settings_dict), [str(settings_dict.get("PASSWORD", ""))]),
        )
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


def database_ports() -> dict[int, str]:
    """{port: vendor} of the TCP databases in DJANGO_SETTINGS_MODULE's DATABASES; {} when unknown.

    Live mode recognises the usual ports by itself; these add a server on another port.
    Reading them connects to nothing, and any failure just leaves live mode with the usual ones.
    """
    if not os.environ.get("DJANGO_SETTINGS_MODULE"):
        return {}
    importable_from_here()
    try:
        from django.conf import settings

        configured = dict(settings.DATABASES)
    except Exception:
        return {}
    ports: dict[int, str] = {}
    for settings_dict in configured.values():
        engine = str(settings_dict.get("ENGINE", ""))
        vendor = next((v for v in ("mysql", "postgresql") if v in engine), None)
        if vendor and str(settings_dict.get("PORT") or "").isdigit():
            ports[int(settings_dict["PORT"])] = vendor
    return ports


def _read_live(wrapper: Any, database: Database) -> None:
    """wait_timeout and max_connections from the server itself; never fails the doctor."""
    try:
        with wrapper.cursor() as cursor:
            if database.vendor == "mysql":
                cursor.execute("SELECT @@wait_timeout, @@max_connections")
            else:
                cursor.execute("SELECT NULL, current_setting('max_connections')::int")
            wait_timeout, max_connections = cursor.fetchone()
        database.wait_timeout = None if wait_timeout is None else int(wait_timeout)
        database.max_connections = int(max_connections)
    except Exception as exc:
        database.live_error = describe_error(exc)
    finally:
        try:
            wrapper.close()
        except Exception:
            pass
