"""The pool core: bounded, per-worker pools of whole Django connections, one per database alias.

Why pool at all: where each unit of work (a greenlet under gevent) gets Django
connections of its own, `CONN_MAX_AGE` never gets a chance to reuse anything: each
opens a session, and the old ones linger until collected.

How: a pool holds Django `DatabaseWrapper` objects, not raw connections. When a unit of
work first asks `connections[alias]`, it checks one out (waiting when all are in use);
at `request_finished`, or `release_current()`, it goes back in a clean state. Reusing the
wrapper keeps what Django set up on connect (time zone, isolation level,
`init_command`) and skips the reconnect entirely.

What a unit of work is, and how to wait, is the *waiter*'s business (see `Waiter`);
this module knows neither gevent nor threads. Which pools are active, and how Django is
made to use them, is serverhooks.pool.active. It imports `django.db` only in workers.
"""

from __future__ import annotations

import _thread
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Protocol

from serverhooks import _internals, conf, cursorguard, health
from serverhooks._log import describe_error, logger
from serverhooks._process import state

__all__ = ["Pool", "Slots", "Waiter"]


class PoolObserver(Protocol):
    """Who watches the pools: serverhooks.metrics' meter, while metrics are on."""

    def pool_created(self, pool: Pool) -> None: ...

    def waiting(self, pool: Pool) -> None: ...

    def waited(self, pool: Pool, seconds: float) -> None: ...


#: Set by serverhooks.metrics (the pools never import it: metrics sits above them); None: nobody.
observer: PoolObserver | None = None


class Slots(Protocol):
    """A bounded semaphore of the waiter's kind."""

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool: ...
    def release(self) -> None: ...


class Waiter(Protocol):
    """How a kind of concurrency waits for a pooled connection."""

    def slots(self, size: int) -> Slots:
        """A bounded semaphore that waits the way this kind waits (cooperatively, for greenlets)."""

    def current(self) -> Any:
        """The unit of work running now, which holds what it checked out."""

    def is_dead(self, unit: Any) -> bool:
        """Has this unit of work ended (so what it holds can be reclaimed)?"""

    def on_death(self, unit: Any, callback: Any) -> bool:
        """Ask to be told when `unit` ends; False where that kind of unit cannot tell."""


@dataclass
class _Holding:
    unit: weakref.ref[Any]
    wrappers: list[Any]


class Pool:
    """Wrappers for one alias: at most `size` exist; idle ones are reused newest first."""

    def __init__(
        self, alias: str, size: int, timeout: float, waiter: Waiter, *, max_age_zero_reuses: bool = False
    ) -> None:
        self.alias = alias
        self.size = size
        self.timeout = timeout
        self.waiter = waiter
        # CONN_MAX_AGE=0 is what Django tells ASGI users to set, only because their sessions
        # leak otherwise. Under a pool nothing leaks, so there it means "reuse, no age cap".
        self.max_age_zero_reuses = max_age_zero_reuses
        self._slots = waiter.slots(size)
        # Guards the idle lists between OS threads. It is held only around list operations,
        # never across I/O, so under gevent (where it is gevent's lock) it never yields.
        self._lists = threading.Lock()
        self._idle: list[Any] = []
        self._reclaimed: list[Any] = []  # from dead units of work: cleaned by the next checkout
        self._holdings: dict[int, _Holding] = {}
        self._linked: weakref.WeakSet[Any] = weakref.WeakSet()
        self._last_timeout_logged = float("-inf")
        if observer is not None:  # its sampler reports occupancy(); requests write no metric
            observer.pool_created(self)

    # ----------------------------------------------------------------- checkout

    def checkout(self) -> Any:
        counters = state().counters
        if not self._slots.acquire(blocking=False):
            self._reclaim_from_dead_units()
            started = time.monotonic()
            counters.add("pool_waits", self.alias)
            watching = observer
            if watching is not None:
                watching.waiting(self)
            try:
                acquired = self._slots.acquire(timeout=self.timeout)
            finally:  # also when the wait is cut short (GreenletExit): the gauge must come down
                waited = time.monotonic() - started
                counters.add("pool_wait_seconds", self.alias, waited)
                if watching is not None:
                    watching.waited(self, waited)
            if not acquired:
                raise self._timed_out()
        try:
            wrapper = self._next_wrapper()
        except BaseException:
            self._slots.release()
            raise
        self._hold(wrapper)
        return wrapper

    def _timed_out(self) -> Exception:
        from serverhooks.pool.errors import PoolTimeout

        error = PoolTimeout(
            f"serverhooks: no connection to database {self.alias!r} became free within "
            f"POOL_TIMEOUT={self.timeout:g} s; all POOL_SIZE={self.size} are in use by this worker. "
            "Raise SERVERHOOKS['POOL_SIZE'] (within the database's max_connections) or "
            "SERVERHOOKS['POOL_TIMEOUT'], or hold connections for less time." + getattr(self.waiter, "timeout_hint", "")
        )
        # Django logs the failed request only where its logging is set up: say it here
        # too, at most every 10 s, so that an overloaded worker does not flood its log.
        now = time.monotonic()
        if now - self._last_timeout_logged >= 10.0:
            self._last_timeout_logged = now
            logger.warning("%s", error)
        return error

    def _pop(self, wrappers: list[Any]) -> Any:
        with self._lists:
            return wrappers.pop() if wrappers else None

    def _next_wrapper(self) -> Any:
        while (wrapper := self._pop(self._reclaimed)) is not None:
            if self._make_clean(wrapper):
                return wrapper
        while (wrapper := self._pop(self._idle)) is not None:
            _adopt(wrapper)
            self._drop_dead_session(wrapper)
            if wrapper.connection is not None:
                state().counters.add("pool_reused", self.alias)
            return wrapper
        from django.db import connections

        fresh: Any = connections.create_connection(self.alias)
        fresh._serverhooks_pool = self
        if self.max_age_zero_reuses and fresh.settings_dict.get("CONN_MAX_AGE") == 0:
            # A copy: Django shares one settings dict between every wrapper of an alias.
            fresh.settings_dict = {**fresh.settings_dict, "CONN_MAX_AGE": None}
        health.watch(fresh)
        if conf.get("CLOSE_INTERRUPTED"):
            cursorguard.guard(fresh)  # a query cut short closes it: nothing reaches the next holder
        return fresh

    def _drop_dead_session(self, wrapper: Any) -> None:
        """Close an idle connection that expired or that the server ended (KILL, a restart):
        one poll() syscall, no round trip (serverhooks.health)."""
        if wrapper.connection is None:
            return
        expired = wrapper.close_at is not None and time.monotonic() >= wrapper.close_at
        ended = not expired and conf.get("CHECK_IDLE_SESSIONS") and health.session_ended(wrapper.connection, wrapper)
        if expired or ended:
            state().counters.add("pool_discarded", self.alias)
            if ended:
                state().counters.add("closed_unhealthy", self.alias)
            _close_quietly(wrapper)
        if hasattr(wrapper, "ensure_timezone") and wrapper.connection is not None:
            wrapper.ensure_timezone()  # PostgreSQL: a request may have run SET TIME ZONE

    # ----------------------------------------------------------------- checkin

    def checkin(self, wrapper: Any) -> None:
        """Return a wrapper checked out by the current unit of work."""
        self._unhold(wrapper)
        try:
            if self._make_clean(wrapper):
                with self._lists:
                    self._idle.append(wrapper)
        finally:
            self._slots.release()

    def _make_clean(self, wrapper: Any) -> bool:
        """Leave no transaction, autocommit change or broken session behind; False: drop it."""
        _adopt(wrapper)
        if wrapper.in_atomic_block:
            # Only a unit that died inside atomic() gets here: Django's bookkeeping for that
            # block cannot be unwound, so the wrapper goes, and its session too.
            state().counters.add("pool_discarded", self.alias)
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
                    raise ConnectionError("the session is no longer usable")
                wrapper.errors_occurred = False
        except Exception as exc:
            logger.debug("serverhooks: discarding a pooled %r connection: %s", self.alias, describe_error(exc))
            state().counters.add("pool_discarded", self.alias)
            _close_quietly(wrapper)
        wrapper.run_on_commit = []
        wrapper.health_check_done = False  # CONN_HEALTH_CHECKS: check again in the next request
        return True

    # ----------------------------------------------------------------- who holds what

    def _hold(self, wrapper: Any) -> None:
        unit = self.waiter.current()
        holding = self._holdings.get(id(unit))
        if holding is not None and holding.unit() is not unit:
            # An id is reused once its unit of work is gone: what that one held comes back first.
            self._reclaim(id(unit))
            holding = None
        if holding is None:
            holding = self._holdings[id(unit)] = _Holding(weakref.ref(unit), [])
        holding.wrappers.append(wrapper)
        if unit not in self._linked and self.waiter.on_death(unit, self._on_unit_death):
            self._linked.add(unit)

    def _unhold(self, wrapper: Any) -> None:
        key = id(self.waiter.current())
        holding = self._holdings.get(key)
        if holding is not None and wrapper in holding.wrappers:
            holding.wrappers.remove(wrapper)
            if not holding.wrappers:
                del self._holdings[key]

    def holds(self, wrapper: Any) -> bool:
        return getattr(wrapper, "_serverhooks_pool", None) is self

    def _on_unit_death(self, unit: Any) -> None:
        # May run in gevent's hub, which must not block: only move the wrappers aside.
        holding = self._holdings.get(id(unit))
        if holding is not None and holding.unit() in (unit, None):
            self._reclaim(id(unit))

    def _reclaim_from_dead_units(self) -> None:
        """Units that cannot tell us they ended (raw greenlets): find them when the pool runs dry."""
        for key, holding in list(self._holdings.items()):
            unit = holding.unit()
            if unit is None or self.waiter.is_dead(unit):
                self._reclaim(key)

    def _reclaim(self, key: int) -> None:
        holding = self._holdings.pop(key, None)
        if holding is None:
            return
        for wrapper in holding.wrappers:
            with self._lists:
                self._reclaimed.append(wrapper)
            state().counters.add("pool_reclaimed", self.alias)
            self._slots.release()

    def close_idle(self) -> None:
        with self._lists:
            wrappers = self._idle + self._reclaimed
            self._idle.clear()
            self._reclaimed.clear()
        for wrapper in wrappers:
            _adopt(wrapper)
            _close_quietly(wrapper)

    def occupancy(self) -> tuple[int, int]:
        """(checked out, idle) right now; serverhooks.metrics samples it. Reclaimed ones count as idle."""
        in_use = sum(len(holding.wrappers) for holding in list(self._holdings.values()))
        return in_use, len(self._idle) + len(self._reclaimed)


def _adopt(wrapper: Any) -> None:
    """Let the current unit of work use a wrapper another one created: Django refuses
    cross-thread use (and under gevent a greenlet's ident is its own); a pooled wrapper is
    only ever used by the one unit that checked it out."""
    _internals.set_thread_ident(wrapper, _thread.get_ident())  # as Django reads it


def _close_quietly(wrapper: Any) -> None:
    try:
        wrapper.close()
    except Exception as exc:
        logger.debug("serverhooks: closing a pooled connection: %s", describe_error(exc))
        wrapper.connection = None


def _driver_in_transaction(raw: Any) -> bool:
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
