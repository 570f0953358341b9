"""A per-worker, bounded, greenlet-aware pool of Django connections (gevent).

Why: under gevent every client connection is served by a new greenlet, and Django
keeps connections per greenlet, so `CONN_MAX_AGE` never gets a chance to reuse
anything: each client opens a session, and the old ones linger until collected.

How: the pool holds Django `DatabaseWrapper` objects, not raw connections. When a
greenlet first asks `connections[alias]`, it checks one out (waiting cooperatively
when all are in use); at `request_finished` it goes back, in a clean state. Reusing
the wrapper keeps everything Django set up on connect (time zone, isolation level,
`init_command`) and skips the reconnect entirely.

Import this module only once gevent has patched the process (it imports gevent
and `django.db`); `serverhooks.greenlets` does that from the worker-ready hook.
"""

from __future__ import annotations

import _thread
import time
import weakref
from dataclasses import dataclass
from typing import Any

from django.db import connections as django_connections
from django.db.backends.signals import connection_created
from django.db.utils import OperationalError
from gevent import getcurrent
from gevent.lock import BoundedSemaphore

from serverhooks import conf, cursorguard, health, sockets
from serverhooks._log import describe_error, logger
from serverhooks.stats import counters

# Typed loosely: serverhooks works with the handler's internals (_connections, __class__).
connections: Any = django_connections


class PoolTimeout(OperationalError):
    """No pooled connection became free in time; the message names the settings."""


@dataclass
class _Holding:
    greenlet: weakref.ref[Any]
    wrappers: list[Any]


class GreenletPool:
    """Wrappers for one alias: at most `size` exist, idle ones are reused newest first."""

    def __init__(self, alias: str, size: int, timeout: float) -> None:
        self.alias = alias
        self.size = size
        self.timeout = timeout
        self._slots = BoundedSemaphore(size)
        self._idle: list[Any] = []
        self._reclaimed: list[Any] = []  # from dead greenlets: cleaned by the next checkout
        self._holdings: dict[int, _Holding] = {}
        self._linked: weakref.WeakSet[Any] = weakref.WeakSet()
        self._last_timeout_logged = float("-inf")

    # ----------------------------------------------------------------- checkout

    def checkout(self) -> Any:
        stats = counters()
        if not self._slots.acquire(blocking=False):
            self._reclaim_from_dead_greenlets()
            started = time.monotonic()
            stats.pool_waits += 1
            acquired = self._slots.acquire(timeout=self.timeout)
            stats.pool_wait_seconds += time.monotonic() - started
            if not acquired:
                error = PoolTimeout(
                    f"serverhooks: no connection to database {self.alias!r} became free within "
                    f"POOL_TIMEOUT={self.timeout:g} s; all POOL_SIZE={self.size} are in use by this worker. "
                    "Raise SERVERHOOKS['POOL_SIZE'] (within the database's max_connections) or "
                    "SERVERHOOKS['POOL_TIMEOUT'], or hold connections for less time."
                )
                self._log_timeout(error)
                raise error
        try:
            wrapper = self._next_wrapper()
        except BaseException:
            self._slots.release()
            raise
        self._hold(wrapper)
        return wrapper

    def _log_timeout(self, error: PoolTimeout) -> None:
        """Django logs the failed request only where its logging is set up: say it here too,
        at most every 10 s, so an overloaded worker does not flood its log."""
        now = time.monotonic()
        if now - self._last_timeout_logged >= 10.0:
            self._last_timeout_logged = now
            logger.warning("%s", error)

    def _next_wrapper(self) -> Any:
        while self._reclaimed:
            wrapper = self._reclaimed.pop()
            if self._make_clean(wrapper):
                return wrapper
        while self._idle:
            wrapper = self._idle.pop()
            _adopt(wrapper)
            self._drop_dead_session(wrapper)
            if wrapper.connection is not None:
                counters().pool_reused += 1
            return wrapper
        fresh: Any = connections.create_connection(self.alias)
        fresh._serverhooks_pool = self
        health.watch(fresh)
        if conf.get("CLOSE_INTERRUPTED"):
            cursorguard.guard(fresh)  # a query cut short closes it: nothing reaches the next holder
        return fresh

    def _drop_dead_session(self, wrapper: Any) -> None:
        """Close an idle connection that expired or that the server ended (KILL, restart).

        The check costs one poll() syscall and no round trip (`serverhooks.health`).
        """
        if wrapper.connection is None:
            return
        expired = wrapper.close_at is not None and time.monotonic() >= wrapper.close_at
        ended = not expired and conf.get("CHECK_IDLE_SESSIONS") and health.session_ended(wrapper.connection, wrapper)
        if expired or ended:
            counters().pool_discarded += 1
            counters().closed_unhealthy += bool(ended)
            _close_quietly(wrapper)
        if hasattr(wrapper, "ensure_timezone") and wrapper.connection is not None:
            # PostgreSQL: a request may have run SET TIME ZONE; restore Django's.
            wrapper.ensure_timezone()

    # ----------------------------------------------------------------- checkin

    def checkin(self, wrapper: Any) -> None:
        """Return a wrapper checked out by the current greenlet."""
        self._unhold(wrapper)
        try:
            if self._make_clean(wrapper):
                self._idle.append(wrapper)
        finally:
            self._slots.release()

    def _make_clean(self, wrapper: Any) -> bool:
        """Leave no transaction, autocommit change or broken session behind; False: drop it."""
        _adopt(wrapper)
        if wrapper.in_atomic_block:
            # Only a greenlet that died inside atomic() gets here: Django's bookkeeping
            # for that block cannot be unwound, so the wrapper goes, and its session too.
            counters().pool_discarded += 1
            _close_quietly(wrapper)
            return False
        if wrapper.connection is None:
            return True
        try:
            if wrapper.get_autocommit() != wrapper.settings_dict["AUTOCOMMIT"]:
                wrapper.rollback()
                wrapper.set_autocommit(wrapper.settings_dict["AUTOCOMMIT"])
            elif _driver_in_transaction(wrapper.connection):
                wrapper.connection.rollback()
            if wrapper.errors_occurred:
                if not wrapper.is_usable():
                    raise OperationalError("the session is no longer usable")
                wrapper.errors_occurred = False
        except Exception as exc:
            logger.debug("serverhooks: discarding a pooled %r connection: %s", self.alias, describe_error(exc))
            counters().pool_discarded += 1
            _close_quietly(wrapper)
        wrapper.run_on_commit = []
        wrapper.health_check_done = False  # CONN_HEALTH_CHECKS: check again in the next request
        return True

    # ----------------------------------------------------------------- who holds what

    def _hold(self, wrapper: Any) -> None:
        current = getcurrent()
        holding = self._holdings.get(id(current))
        if holding is not None and holding.greenlet() is not current:
            # An id is reused once its greenlet is gone: what that one held comes back first.
            self._reclaim(id(current))
            holding = None
        if holding is None:
            holding = self._holdings[id(current)] = _Holding(weakref.ref(current), [])
        holding.wrappers.append(wrapper)
        if hasattr(current, "rawlink") and current not in self._linked:
            # gevent Greenlets (gevent.spawn, each client of a gevent server) tell
            # us when they die: their wrappers come back at the next hub turn.
            current.rawlink(self._on_greenlet_death)
            self._linked.add(current)

    def _unhold(self, wrapper: Any) -> None:
        holding = self._holdings.get(id(getcurrent()))
        if holding is not None and wrapper in holding.wrappers:
            holding.wrappers.remove(wrapper)
            if not holding.wrappers:
                del self._holdings[id(getcurrent())]

    def holds(self, wrapper: Any) -> bool:
        return getattr(wrapper, "_serverhooks_pool", None) is self

    def _on_greenlet_death(self, greenlet: Any) -> None:
        # Runs in the hub, which must not block: only move the wrappers aside.
        holding = self._holdings.get(id(greenlet))
        if holding is not None and holding.greenlet() in (greenlet, None):
            self._reclaim(id(greenlet))

    def _reclaim_from_dead_greenlets(self) -> None:
        """Raw greenlets cannot notify us: find the dead ones when the pool runs dry."""
        for key, holding in list(self._holdings.items()):
            greenlet = holding.greenlet()
            if greenlet is None or greenlet.dead:
                self._reclaim(key)

    def _reclaim(self, key: int) -> None:
        holding = self._holdings.pop(key, None)
        if holding is None:
            return
        for wrapper in holding.wrappers:
            self._reclaimed.append(wrapper)
            counters().pool_reclaimed += 1
            self._slots.release()

    def close_idle(self) -> None:
        for wrapper in self._idle + self._reclaimed:
            _adopt(wrapper)
            _close_quietly(wrapper)
        self._idle.clear()
        self._reclaimed.clear()


def _adopt(wrapper: Any) -> None:
    """Let the current greenlet use a wrapper another greenlet created.

    Django refuses cross-thread use (and gevent's thread ident is the greenlet's);
    a pooled wrapper is only ever used by the one greenlet that checked it out.
    """
    wrapper._thread_ident = _thread.get_ident()


def _close_quietly(wrapper: Any) -> None:
    try:
        wrapper.close()
    except Exception as exc:
        logger.debug("serverhooks: closing a pooled connection: %s", describe_error(exc))
        wrapper.connection = None


def _driver_in_transaction(raw: Any) -> bool:
    """An explicit BEGIN keeps a transaction open even in autocommit mode: is one open?

    Read from what the driver already knows, no round trip: psycopg and psycopg2
    track libpq's transaction status, PyMySQL the server's status flags. mysqlclient
    does not expose them; there, only Django's own autocommit check applies.
    """
    info = getattr(raw, "info", None)
    status = getattr(info, "transaction_status", None)
    if status is not None:
        return int(status) != 0  # 0: IDLE in both psycopg and psycopg2
    server_status = getattr(raw, "server_status", None)  # PyMySQL
    return isinstance(server_status, int) and bool(server_status & 0x0001)  # SERVER_STATUS_IN_TRANS


# --------------------------------------------------------------------------- activation

_pools: dict[str, GreenletPool] = {}
_original_class: Any = None


def _pooled_handler_class(base: Any) -> type:
    def __getitem__(self: Any, alias: str) -> Any:
        storage = self._connections
        try:
            return getattr(storage, alias)
        except AttributeError:
            pass
        pool = _pools.get(alias)
        if pool is None:
            return base.__getitem__(self, alias)
        wrapper = pool.checkout()
        setattr(storage, alias, wrapper)
        return wrapper

    return type(f"Pooled{base.__name__}", (base,), {"__getitem__": __getitem__, "__module__": __name__})


def _count_opened(sender: Any, connection: Any, **kwargs: Any) -> None:
    if getattr(connection, "_serverhooks_pool", None) is not None:
        counters().pool_opened += 1


def release_current() -> int:
    """Return the current greenlet's pooled connections; how many went back."""
    storage = connections._connections
    released = 0
    for alias, pool in _pools.items():
        wrapper = getattr(storage, alias, None)
        if wrapper is not None and pool.holds(wrapper):
            delattr(storage, alias)
            pool.checkin(wrapper)
            released += 1
    return released


def _on_request_finished(**kwargs: Any) -> None:
    try:
        release_current()
    except Exception as exc:  # a release failure must not turn into a failed response
        logger.warning("serverhooks: returning connections to the pool failed: %s", describe_error(exc))


def activate(size: int, timeout: float) -> list[str]:
    """Pool every alias that does not use Django's own pool; returns the pooled aliases."""
    global _original_class
    from django.core.signals import request_finished

    if _original_class is None:
        _original_class = type(connections)
        connections.__class__ = _pooled_handler_class(_original_class)
    for alias in connections:
        options = connections.settings[alias].get("OPTIONS", {})
        if options.get("pool"):
            logger.debug("serverhooks: %r uses Django's own pool; serverhooks does not pool it", alias)
            continue
        _pools.setdefault(alias, GreenletPool(alias, size, timeout))
    request_finished.connect(_on_request_finished, dispatch_uid="serverhooks.pool.release")
    connection_created.connect(_count_opened, dispatch_uid="serverhooks.pool.opened")
    return sorted(_pools)


def deactivate() -> None:
    """Undo `activate`: close idle connections, restore Django's handler class."""
    global _original_class
    from django.core.signals import request_finished

    for pool in _pools.values():
        pool.close_idle()
    _pools.clear()
    if _original_class is not None:
        connections.__class__ = _original_class
        _original_class = None
    request_finished.disconnect(dispatch_uid="serverhooks.pool.release")
    connection_created.disconnect(dispatch_uid="serverhooks.pool.opened")


def forget_after_fork() -> None:
    """In a forked child: the pools' sessions were abandoned with the rest; start empty."""
    for pool in _pools.values():
        sockets._never_finalise.append(pool)
    for alias in list(_pools):
        _pools[alias] = GreenletPool(alias, _pools[alias].size, _pools[alias].timeout)


def active() -> bool:
    return bool(_pools)
