"""The pool core: bounded, per-worker pools of whole Django connections, one per database alias.

Why pool at all: where each unit of work (a greenlet under gevent, a request's thread under
ASGI) gets Django connections of its own, `CONN_MAX_AGE` never gets a chance to reuse
anything: each opens a session, and the old ones linger until collected.

How: when a unit of work first asks `connections[alias]`, it checks a wrapper out (queueing,
first come first served, when all are in use); at `request_finished`, or `release_current()`,
it goes back in a clean state. The pool is split the way SQLAlchemy splits its own:

- serverhooks.pool.fifo: the queue of permits, and how a unit waits in it;
- this module: who holds which wrapper, what is idle, all under the pool's one lock;
- serverhooks.pool.wrappers: the part that faces Django (make, check, clean a wrapper);
- serverhooks.pool.active: which pools are active, and how Django is made to use them.

What a unit of work is, and what it sleeps on, is the *waiter*'s business (see `Waiter`);
this module knows neither gevent nor threads. It imports `django.db` only in workers.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Protocol

from serverhooks._log import logger
from serverhooks._process import state
from serverhooks.pool import fifo, wrappers

__all__ = ["Pool", "Waiter"]


class PoolObserver(Protocol):
    """Who watches the pools: serverhooks.metrics' meter, while metrics are on."""

    def pool_created(self, pool: Pool) -> None: ...

    def waiting(self, pool: Pool) -> None: ...

    def waited(self, pool: Pool, seconds: float) -> None: ...


#: Set by serverhooks.metrics (the pools never import it: metrics sits above them); None: nobody.
observer: PoolObserver | None = None


class Waiter(Protocol):
    """How a kind of concurrency waits for a pooled connection."""

    def signal(self) -> fifo.Signal:
        """A new lock of this kind, unlocked: what a queued unit sleeps on (cooperatively, for greenlets)."""

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

    Who holds what (`_holders`: unit of work -> the wrappers it checked out), the idle
    lists and the queue of permits change only under `_lock`, and a wrapper goes back only by a compare-and-pop:
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
        self._lock = threading.Lock()  # gevent's, in a patched worker: it is created after the patch
        self._slots = fifo.FifoSlots(size, self._lock, waiter.signal)
        self._idle: list[Any] = []
        self._reclaimed: list[Any] = []  # from dead units of work: cleaned by the next checkout
        self._holders: dict[Any, list[Any]] = {}
        self._last_timeout_logged = float("-inf")
        if observer is not None:  # its sampler reports occupancy(); requests write no metric
            observer.pool_created(self)

    def recreate(self) -> Pool:
        """A new, empty pool of the same settings: for a forked child, whose inherited
        sessions were abandoned with the rest (SQLAlchemy's `Pool.recreate()`)."""
        return Pool(self.alias, self.size, self.timeout, self.waiter, max_age_zero_reuses=self.max_age_zero_reuses)

    # ----------------------------------------------------------------- checkout

    def checkout(self) -> Any:
        with self._lock:  # one trip through the lock on the common path: a permit and an idle wrapper
            permitted = self._slots._take_locked()
            wrapper, reclaimed = self._pop_locked() if permitted else (None, False)
        if not permitted:
            self._wait_for_permit()
            wrapper, reclaimed = self._pop()
        try:
            wrapper = self._ready_wrapper(wrapper, reclaimed)
        except BaseException:
            self._slots.release()
            raise
        self._hold(wrapper)
        return wrapper

    def _wait_for_permit(self) -> None:
        """Queue behind the units already waiting; raise PoolTimeout if none frees in time."""
        self._reclaim_from_dead_units()
        counters = state().counters
        started = time.monotonic()
        counters.add("pool_waits", self.alias)
        watching = observer
        if watching is not None:
            watching.waiting(self)
        try:
            acquired = self._slots.wait(self.timeout)
        finally:  # also when the wait is cut short (GreenletExit): the gauge must come down
            waited = time.monotonic() - started
            counters.add("pool_wait_seconds", self.alias, waited)
            if watching is not None:
                watching.waited(self, waited)
        if not acquired:
            raise self._timed_out()

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

    def _pop_locked(self) -> tuple[Any, bool]:
        """(a wrapper to reuse or None, whether it came from a dead unit); the lock is held."""
        if self._reclaimed:
            return self._reclaimed.pop(), True
        if self._idle:
            return self._idle.pop(), False  # newest first: the oldest idle ones age out
        return None, False

    def _pop(self) -> tuple[Any, bool]:
        with self._lock:
            return self._pop_locked()

    def _ready_wrapper(self, wrapper: Any, reclaimed: bool) -> Any:
        """A clean wrapper for the caller, which holds a permit: the one popped, the next
        one if that was discarded, or a new one."""
        while wrapper is not None:
            if self._ready_for_use(wrapper, wrappers.make_clean if reclaimed else wrappers.drop_dead_session):
                if not reclaimed and wrapper.connection is not None:
                    state().counters.add("pool_reused", self.alias)
                return wrapper
            wrapper, reclaimed = self._pop()
        return wrappers.new_wrapper(self, self.alias, max_age_zero_reuses=self.max_age_zero_reuses)

    def _ready_for_use(self, wrapper: Any, prepare: Any) -> bool:
        """Prepare a wrapper taken out of a list; False: it was discarded, take the next.

        An interrupt (GreenletExit, a timeout) in the middle leaves its session in an unknown
        state: it is closed, never put back, and the interrupt goes on.
        """
        wrappers.adopt(wrapper)
        try:
            return bool(prepare(wrapper, self.alias))
        except BaseException:
            wrappers.close_quietly(wrapper)
            raise

    # ----------------------------------------------------------------- checkin

    def checkin(self, wrapper: Any) -> None:
        """Return a wrapper checked out by the current unit of work."""
        if not self._unhold(wrapper):
            # Not this unit's: the pool took it back already (and freed its permit). Putting it
            # back again would hand one session to two units.
            self._violation(f"{self.alias!r}: checkin of a wrapper the current unit does not hold")
            return
        try:
            if self._ready_for_use(wrapper, wrappers.make_clean):
                wrappers.disown(wrapper)
                with self._lock:
                    self._idle.append(wrapper)
        finally:
            self._slots.release()  # to the longest waiter, if any: it finds the wrapper idle

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
            unused = self._idle + self._reclaimed
            self._idle.clear()
            self._reclaimed.clear()
        for wrapper in unused:
            wrappers.adopt(wrapper)
            wrappers.close_quietly(wrapper)

    def occupancy(self) -> tuple[int, int]:
        """(checked out, idle) right now; serverhooks.metrics samples it. Reclaimed ones count as idle."""
        with self._lock:
            in_use = sum(len(held) for held in self._holders.values())
            return in_use, len(self._idle) + len(self._reclaimed)
