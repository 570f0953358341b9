"""The part of the pool that faces Django: what a pooled `DatabaseWrapper` goes through.

A pool lends whole wrappers, not raw connections: reusing the wrapper keeps what Django set
up on connect (time zone, isolation level, `init_command`) and skips the reconnect. Here is
how one is made, made ready for its next holder, and cleaned when it comes back; the pool
(serverhooks.pool.core) decides who holds which and when. Every function may do I/O, so none
is ever called with the pool's lock held.
"""

from __future__ import annotations

import _thread
import time
from typing import Any

from serverhooks import _internals, conf, cursorguard, health, transactions
from serverhooks._log import describe_error, logger
from serverhooks._process import state
from serverhooks.pool import scope

__all__ = [
    "adopt",
    "close_quietly",
    "disown",
    "driver_in_transaction",
    "drop_dead_session",
    "make_clean",
    "new_wrapper",
]

#: The thread ident of a wrapper nobody holds: no thread or greenlet has it, so Django refuses
#: any use of an idle wrapper through a reference kept from before its checkin.
NOBODY = 0


def new_wrapper(pool: Any, alias: str, *, max_age_zero_reuses: bool) -> Any:
    """A fresh wrapper for `alias`, not yet connected (it connects at its first query)."""
    from django.db import connections

    fresh: Any = connections.create_connection(alias)
    fresh._serverhooks_pool = pool
    if max_age_zero_reuses and fresh.settings_dict.get("CONN_MAX_AGE") == 0:
        # A copy: Django shares one settings dict between every wrapper of an alias.
        fresh.settings_dict = {**fresh.settings_dict, "CONN_MAX_AGE": None}
    health.watch(fresh)
    if conf.get("CLOSE_INTERRUPTED"):
        cursorguard.guard(fresh)  # a query cut short closes it: nothing reaches the next holder
    if conf.get("POOL_SCOPE") == "transaction":
        scope.track(fresh)
    return fresh


def drop_dead_session(wrapper: Any, alias: str) -> bool:
    """Close an idle connection that expired or that the server ended (KILL, a restart):
    one poll() syscall, no round trip (serverhooks.health). A session that fails to get
    ready (its time zone) is replaced too: the request gets a new one, not the error.
    Always True: the wrapper itself stays usable (it reconnects at its next query)."""
    if wrapper.connection is None:
        return True
    expired = wrapper.close_at is not None and time.monotonic() >= wrapper.close_at
    ended = not expired and conf.get("CHECK_IDLE_SESSIONS") and health.session_ended(wrapper.connection, wrapper)
    if expired or ended:
        counters = state().counters
        counters.add("pool_discarded", alias)
        if ended:
            counters.add("closed_unhealthy", alias)
        close_quietly(wrapper)
    if hasattr(wrapper, "ensure_timezone") and wrapper.connection is not None:
        try:
            wrapper.ensure_timezone()  # PostgreSQL: a request may have run SET TIME ZONE
        except Exception as exc:
            logger.debug("serverhooks: replacing a pooled %r session: %s", alias, describe_error(exc))
            state().counters.add("pool_discarded", alias)
            close_quietly(wrapper)
    return True


def make_clean(wrapper: Any, alias: str) -> bool:
    """Leave no transaction, autocommit change or broken session behind; False: drop the wrapper."""
    transactions.forget_lost(wrapper)
    scope.forget_use(wrapper)
    if isinstance(wrapper.connection, transactions.LostSession):
        wrapper.connection = None  # its session is gone already; the next use connects anew
    if wrapper.in_atomic_block:
        # Only a unit that died inside atomic() gets here: Django's bookkeeping for that
        # block cannot be unwound, so the wrapper goes, and its session too.
        state().counters.add("pool_discarded", alias)
        close_quietly(wrapper)
        return False
    if wrapper.connection is None:
        return True
    if wrapper.close_at is not None and time.monotonic() >= wrapper.close_at:
        # Past CONN_MAX_AGE (0: at the end of each request, as Django closes it): not kept idle.
        state().counters.add("pool_discarded", alias)
        close_quietly(wrapper)
        return True
    try:
        # `autocommit` is Django's own record while connected; get_autocommit() would first
        # call ensure_connection() for nothing.
        if wrapper.autocommit != wrapper.settings_dict["AUTOCOMMIT"]:
            wrapper.rollback()
            wrapper.set_autocommit(wrapper.settings_dict["AUTOCOMMIT"])
        elif driver_in_transaction(wrapper.connection):
            wrapper.connection.rollback()
        if wrapper.errors_occurred:
            if not wrapper.is_usable():
                raise ConnectionError("the session is no longer usable")
            wrapper.errors_occurred = False
    except Exception as exc:
        logger.debug("serverhooks: discarding a pooled %r connection: %s", alias, describe_error(exc))
        state().counters.add("pool_discarded", alias)
        close_quietly(wrapper)
    wrapper.run_on_commit = []
    wrapper.health_check_done = False  # CONN_HEALTH_CHECKS: check again in the next request
    return True


def adopt(wrapper: Any) -> None:
    """Let the current unit of work use a wrapper another one created: Django refuses
    cross-thread use (and under gevent a greenlet's ident is its own); a pooled wrapper is
    only ever used by the one unit that checked it out."""
    _internals.set_thread_ident(wrapper, _thread.get_ident())  # as Django reads it


def disown(wrapper: Any) -> None:
    """Mark a wrapper that went back as nobody's: a reference its last holder kept (code that
    held `connections[alias]` across a release) now fails loudly in Django's thread check
    instead of running on a session the pool may hand to another unit of work."""
    _internals.set_thread_ident(wrapper, NOBODY)


def close_quietly(wrapper: Any) -> None:
    try:
        wrapper.close()
    except Exception as exc:
        logger.debug("serverhooks: closing a pooled connection: %s", describe_error(exc))
        wrapper.connection = None


def driver_in_transaction(raw: Any) -> bool:
    """An explicit BEGIN keeps a transaction open even in autocommit mode: is one open?

    Read from what the driver already knows, no round trip: psycopg and psycopg2 track
    libpq's transaction status, PyMySQL the server's status flags. mysqlclient does not
    expose them; there, only Django's own autocommit check applies.
    """
    info = getattr(raw, "info", None)
    status = getattr(info, "transaction_status", None)
    if status is not None:
        return int(status) != 0  # 0: IDLE in both psycopg and psycopg2
    server_status = getattr(raw, "server_status", None)  # PyMySQL
    return isinstance(server_status, int) and bool(server_status & 0x0001)  # SERVER_STATUS_IN_TRANS
