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

Each change keeps what it replaced: `undo_gevent_changes()` puts everything back.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

from serverhooks import _internals, conf, registry
from serverhooks._log import describe_error, logger, say_once

__all__ = ["gevent_patched", "prepare_gevent_worker", "undo_gevent_changes"]

# What to run, newest first, to put back what prepare_gevent_worker changed.
_undo: list[Callable[[], None]] = []


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
    from django.db import connections
    from gevent.local import local as greenlet_local

    # Whatever this greenlet opened so far (the app's import in this worker) is this
    # worker's own: close it cleanly, or it would idle outside the pool for good.
    for wrapper in registry.this_thread_wrappers():
        try:
            registry.close_wrapper(wrapper)
        except Exception as exc:
            logger.debug("serverhooks: closing %r before the storage reset: %s", wrapper.alias, describe_error(exc))
    storage = _internals.connection_storage(connections)
    if storage is None or isinstance(_internals.local_storage(storage), greenlet_local):
        return []
    old = _internals.replace_connection_storage(connections, Local(connections.thread_critical))
    _undo.append(lambda: _internals.replace_connection_storage(connections, old))
    return ["django.db.connections (per OS thread -> per greenlet)"]


def _aliases_with_vendor(vendor: str) -> list[str]:
    from django.db import connections

    return [alias for alias in connections if vendor in str(connections.settings[alias].get("ENGINE", ""))]


def make_drivers_cooperative() -> list[str]:
    """Fix or flag drivers that would block the gevent hub; returns what was changed."""
    changed: list[str] = []
    waiting: Any = sys.modules.get("psycopg.waiting")
    # Imported before the patch, psycopg chose its C wait, which blocks. The poll-based
    # one uses select.poll, which gevent made cooperative.
    undo = _internals.use_psycopg_poll_wait(waiting) if waiting is not None else None
    if undo is not None:
        _undo.append(undo)
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
    _undo.append(lambda: psycopg2.extensions.set_wait_callback(None))
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
            from serverhooks.pool import active, gevent

            pooled = gevent.activate(conf.get("POOL_SIZE"), conf.get("POOL_TIMEOUT"))
            _undo.append(active.deactivate)
        logger.debug(
            "serverhooks: gevent worker ready; reset: %s; drivers: %s; pooled aliases: %s (size %s)",
            ", ".join(reset) or "nothing",
            ", ".join(changed) or "nothing to change",
            ", ".join(pooled) or "none",
            conf.get("POOL_SIZE"),
        )
    except Exception as exc:
        logger.warning("serverhooks: preparing the gevent worker failed: %s", describe_error(exc))


def undo_gevent_changes() -> None:
    """Put back everything prepare_gevent_worker changed, newest first."""
    while _undo:
        try:
            _undo.pop()()
        except Exception as exc:
            logger.warning("serverhooks: undoing a gevent change failed: %s", describe_error(exc))
