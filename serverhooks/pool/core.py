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
from typing import Any, Protocol

from serverhooks import _internals, conf, cursorguard, health, transactions
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
        """Ask to be told when `unit` ends; False where that kind of unit cannot tell.

        Asked at every checkout: the waiter registers once per unit's life and callback owner."""


#: Tests switch this on: every change of who holds what then checks, under the pool's lock,
#: that no wrapper is held by two units of work at once, nor held and idle, and that no more
#: than `size` wrappers exist. A violation is recorded here and raised where it happened.
invariant_checks = False
invariant_violations: list[str] = []


class Pool:
    """Wrappers for one alias: at most `size` exist; idle ones are reused newest first.

    Who holds what (`_holders`: unit of work -> the wrappers it checked out) and the idle
    lists change only under `_lock`, and a wrapper goes back only by a compare-and-pop:
    a checkin removes it from its own unit's holding, a reclaim pops a dead unit's holding
    only if it is still the one the scan saw. Units are the keys themselves, never their
    ids, which a new thread or greenlet reuses. The lock is held only around those dict
    and list operations, never across I/O, so under gevent (where it is gevent's lock) it
    never yields.
    """

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
        self._lock = threading.Lock()
        self._idle: list[Any] = []
        self._reclaimed: list[Any] = []  # from dead units of work: cleaned by the next checkout
        self._holders: dict[Any, list[Any]] = {}
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
        with self._lock:
            return wrappers.pop() if wrappers else None

    def _next_wrapper(self) -> Any:
        """A clean wrapper for the caller, which holds a slot: an idle one, or a new one."""
        while (wrapper := self._pop(self._reclaimed)) is not None:
            if self._ready_for_use(wrapper, self._make_clean):
                return wrapper
        while (wrapper := self._pop(self._idle)) is not None:
            if self._ready_for_use(wrapper, self._drop_dead_session):
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

    def _ready_for_use(self, wrapper: Any, prepare: Any) -> bool:
        """Prepare a wrapper taken out of a list; False: it was discarded, take the next.

        An interrupt (GreenletExit, a timeout) in the middle leaves its session in an unknown
        state: it is closed, never put back, and the interrupt goes on.
        """
        _adopt(wrapper)
        try:
            return bool(prepare(wrapper))
        except BaseException:
            _close_quietly(wrapper)
            raise

    def _drop_dead_session(self, wrapper: Any) -> bool:
        """Close an idle connection that expired or that the server ended (KILL, a restart):
        one poll() syscall, no round trip (serverhooks.health). A session that fails to get
        ready (its time zone) is replaced too: the request gets a new one, not the error."""
        if wrapper.connection is None:
            return True
        expired = wrapper.close_at is not None and time.monotonic() >= wrapper.close_at
        ended = not expired and conf.get("CHECK_IDLE_SESSIONS") and health.session_ended(wrapper.connection, wrapper)
        if expired or ended:
            state().counters.add("pool_discarded", self.alias)
            if ended:
                state().counters.add("closed_unhealthy", self.alias)
            _close_quietly(wrapper)
        if hasattr(wrapper, "ensure_timezone") and wrapper.connection is not None:
            try:
                wrapper.ensure_timezone()  # PostgreSQL: a request may have run SET TIME ZONE
            except Exception as exc:
                logger.debug("serverhooks: replacing a pooled %r session: %s", self.alias, describe_error(exc))
                state().counters.add("pool_discarded", self.alias)
                _close_quietly(wrapper)
        return True

    # ----------------------------------------------------------------- checkin

    def checkin(self, wrapper: Any) -> None:
        """Return a wrapper checked out by the current unit of work."""
        if not self._unhold(wrapper):
            # Not this unit's: the pool took it back already (and freed its slot). Putting it
            # back again would hand one session to two units.
            self._violation(f"{self.alias!r}: checkin of a wrapper the current unit does not hold")
            return
        try:
            if self._ready_for_use(wrapper, self._make_clean):
                with self._lock:
                    self._idle.append(wrapper)
        finally:
            self._slots.release()

    def _make_clean(self, wrapper: Any) -> bool:
        """Leave no transaction, autocommit change or broken session behind; False: drop it."""
        transactions.forget_lost(wrapper)
        if isinstance(wrapper.connection, transactions.LostSession):
            wrapper.connection = None  # its session is gone already; the next use connects anew
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
        with self._lock:
            if invariant_checks:
                self._check_free_locked(wrapper)
            self._holders.setdefault(unit, []).append(wrapper)
        self.waiter.on_death(unit, self._on_unit_death)

    def _unhold(self, wrapper: Any) -> bool:
        """Remove `wrapper` from the current unit's holding; False if it is not there."""
        unit = self.waiter.current()
        with self._lock:
            held = self._holders.get(unit)
            if held is None:
                return False
            for index, candidate in enumerate(held):
                if candidate is wrapper:
                    del held[index]
                    if not held:
                        del self._holders[unit]
                    return True
            return False

    def holds(self, wrapper: Any) -> bool:
        return getattr(wrapper, "_serverhooks_pool", None) is self

    def _on_unit_death(self, unit: Any) -> None:
        # May run in gevent's hub, or in a thread that is ending: it only moves wrappers aside.
        self._reclaim(unit)

    def _reclaim_from_dead_units(self) -> None:
        """Units that cannot tell us they ended (raw greenlets): find them when the pool runs dry."""
        with self._lock:
            holdings = list(self._holders.items())
        for unit, held in holdings:
            if self.waiter.is_dead(unit):
                self._reclaim(unit, expected=held)

    def _reclaim(self, unit: Any, expected: list[Any] | None = None) -> None:
        """Take back what a dead unit held: only its holding as the caller saw it, if still there."""
        with self._lock:
            held = self._holders.get(unit)
            if held is None or (expected is not None and held is not expected):
                return
            del self._holders[unit]
            self._reclaimed.extend(held)
        for _wrapper in held:
            state().counters.add("pool_reclaimed", self.alias)
            self._slots.release()

    def _check_free_locked(self, wrapper: Any) -> None:
        """Invariants, with the lock held: `wrapper` is held by nobody and idle nowhere."""
        holders = [unit for unit, held in self._holders.items() if any(w is wrapper for w in held)]
        if holders:
            self._violation(f"{self.alias!r}: a wrapper handed out while {len(holders)} unit(s) hold it")
        if any(w is wrapper for w in self._idle) or any(w is wrapper for w in self._reclaimed):
            self._violation(f"{self.alias!r}: a wrapper handed out while it is also idle")
        existing = len(self._idle) + len(self._reclaimed) + sum(len(held) for held in self._holders.values()) + 1
        if existing > self.size:
            self._violation(f"{self.alias!r}: {existing} wrappers exist, above POOL_SIZE={self.size}")

    def _violation(self, message: str) -> None:
        logger.warning("serverhooks: pool invariant broken: %s", message)
        if invariant_checks:
            invariant_violations.append(message)
            raise AssertionError(f"serverhooks pool invariant: {message}")

    def close_idle(self) -> None:
        with self._lock:
            wrappers = self._idle + self._reclaimed
            self._idle.clear()
            self._reclaimed.clear()
        for wrapper in wrappers:
            _adopt(wrapper)
            _close_quietly(wrapper)

    def occupancy(self) -> tuple[int, int]:
        """(checked out, idle) right now; serverhooks.metrics samples it. Reclaimed ones count as idle."""
        with self._lock:
            in_use = sum(len(held) for held in self._holders.values())
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
