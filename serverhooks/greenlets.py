"""gevent support, shared by every adapter whose workers run gevent.

Called once per worker, after gevent patched the process and the app is loaded
(Gunicorn's `post_worker_init`, uWSGI's gevent loop). It fixes three things that
were decided before the patch, when Django or a driver was imported early
(`preload_app`, or a config file that imports Django):

1. Django's connection storage wraps a `threading.local()` built at import: made
   before the patch, it is per OS thread, so every greenlet shares one connection.
   It is rebuilt, and is per greenlet from then on.
2. Drivers: psycopg 3 picked a blocking C wait function at import; psycopg2 needs a
   wait callback (psycogreen); mysqlclient blocks the hub on every query.
3. The connection pool (`serverhooks.pool`), unless SERVERHOOKS['GEVENT_POOL'] is off.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from serverhooks import conf, lifecycle
from serverhooks._log import describe_error, logger, say_once


def gevent_patched() -> bool:
    """True when gevent monkey-patched threading in this process."""
    monkey = sys.modules.get("gevent.monkey")
    try:
        return bool(monkey and monkey.is_module_patched("threading"))
    except Exception:
        return False


def make_connection_state_per_greenlet() -> list[str]:
    """Rebuild Django's connection storage if it predates the patch; returns what was reset."""
    from asgiref.local import Local
    from django.db import connections as django_connections
    from gevent.local import local as greenlet_local

    connections: Any = django_connections
    # Whatever this greenlet opened so far (the app's import in this worker) is this
    # worker's own: close it cleanly, or it would idle outside the pool for good.
    for wrapper in connections.all(initialized_only=True):
        try:
            lifecycle.close_wrapper(wrapper)
        except Exception as exc:
            logger.debug("serverhooks: closing %r before the storage reset: %s", wrapper.alias, describe_error(exc))
    if isinstance(getattr(connections._connections, "_storage", None), greenlet_local):
        return []
    connections._connections = Local(connections.thread_critical)
    return ["django.db.connections (per OS thread -> per greenlet)"]


def _aliases_with_vendor(vendor: str) -> list[str]:
    from django.db import connections

    return [alias for alias in connections if vendor in str(connections.settings[alias].get("ENGINE", ""))]


def make_drivers_cooperative() -> list[str]:
    """Fix or flag drivers that would block the gevent hub; returns what was changed."""
    changed: list[str] = []
    waiting: Any = sys.modules.get("psycopg.waiting")
    if waiting is not None and getattr(waiting, "wait_c", None) is not None and waiting.wait is waiting.wait_c:
        # Imported before the patch: psycopg chose its C wait, which blocks. The
        # poll-based one uses select.poll, which gevent made cooperative.
        waiting.wait = waiting.wait_poll
        waiting._ready = waiting._ready_poll
        changed.append("psycopg.waiting.wait (wait_c -> wait_poll)")
    if _aliases_with_vendor("postgresql"):
        changed += _make_psycopg2_cooperative()
    if _aliases_with_vendor("mysql"):
        _warn_if_mysqlclient()
    return changed


def _make_psycopg2_cooperative() -> list[str]:
    try:
        from django.db.backends.postgresql.psycopg_any import is_psycopg3
    except Exception:
        return []
    if is_psycopg3:
        return []
    import psycopg2.extensions

    if psycopg2.extensions.get_wait_callback() is not None:
        return []
    try:
        from psycogreen.gevent import patch_psycopg
    except ImportError:
        say_once(
            "psycopg2-no-psycogreen",
            logging.WARNING,
            "serverhooks: psycopg2 blocks the gevent hub for every query: pip install psycogreen "
            "(or serverhooks[gevent]) and serverhooks applies it.",
        )
        return []
    patch_psycopg()
    return ["psycopg2 wait callback (psycogreen)"]


def _warn_if_mysqlclient() -> None:
    try:
        import MySQLdb
    except ImportError:
        return
    if MySQLdb.__name__ == "MySQLdb":  # pymysql.install_as_MySQLdb() makes it "pymysql"
        say_once(
            "mysqlclient-blocks",
            logging.WARNING,
            "serverhooks: mysqlclient blocks the gevent hub for the whole of every query, so one slow "
            "query stalls the worker. Use PyMySQL: pip install PyMySQL, then in settings.py: "
            "import pymysql; pymysql.install_as_MySQLdb()",
        )


def prepare_gevent_worker() -> None:
    """Everything above, in order; never raises."""
    try:
        reset = make_connection_state_per_greenlet()
        changed = make_drivers_cooperative()
        pooled: list[str] = []
        if conf.get("GEVENT_POOL"):
            from serverhooks import pool

            pooled = pool.activate(conf.get("POOL_SIZE"), conf.get("POOL_TIMEOUT"))
        logger.debug(
            "serverhooks: gevent worker ready; reset: %s; drivers: %s; pooled aliases: %s (size %s)",
            ", ".join(reset) or "nothing",
            ", ".join(changed) or "nothing to change",
            ", ".join(pooled) or "none",
            conf.get("POOL_SIZE"),
        )
    except Exception as exc:
        logger.warning("serverhooks: preparing the gevent worker failed: %s", describe_error(exc))
