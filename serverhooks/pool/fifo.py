"""The pool's queue: at most `size` permits, handed out first come, first served.

Why not a semaphore: gevent's `Semaphore.acquire` and `threading.Semaphore.acquire` give a
free permit to whoever asks, even while others are queued, and wake a waiter only later.
A keep-alive client that finishes a request and starts the next one at once takes back the
permit it just freed, again and again, and the units that queued first wait until they time
out. Here a release while units wait hands the permit to the longest waiter directly: it
never passes through the free count, so a newcomer cannot take it (psycopg_pool and
SQLAlchemy's QueuePool hand over the same way).

A waiting unit sleeps on a *signal* of its own: a lock created locked, which the releaser
unlocks. The waiter supplies it, so that greenlets sleep cooperatively and threads on a real
lock. The queue's state lives under the pool's one lock, which is held only around deque and
counter operations, never across a wait.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

__all__ = ["FifoSlots", "Signal"]


class Signal(Protocol):
    """A lock that starts locked: `acquire(True, timeout)` sleeps until `release()`."""

    def acquire(self, blocking: bool = ..., timeout: float = ...) -> bool: ...
    def release(self) -> None: ...


class _Ticket:
    __slots__ = ("granted", "signal")

    def __init__(self, signal: Signal) -> None:
        self.signal = signal
        self.granted = False


class FifoSlots:
    """Permits for a pool's connections. `take()` never waits and never overtakes a waiter;
    `wait(timeout)` queues; `release()` hands over to the longest waiter, or frees."""

    __slots__ = ("_free", "_lock", "_new_signal", "_size", "_waiting")

    def __init__(self, size: int, lock: Any, new_signal: Callable[[], Signal]) -> None:
        self._size = size
        self._free = size
        self._lock = lock
        self._new_signal = new_signal
        self._waiting: deque[_Ticket] = deque()

    def take(self) -> bool:
        """A permit now, if one is free and nobody waits for it."""
        with self._lock:
            return self._take_locked()

    def _take_locked(self) -> bool:
        if self._free and not self._waiting:
            self._free -= 1
            return True
        return False

    def wait(self, timeout: float) -> bool:
        """Queue for a permit, at most `timeout` seconds; False: none came.

        A unit whose wait is cut short (GreenletExit, a timeout of the server's, KeyboardInterrupt)
        leaves the queue; if a permit reached it in the meantime, it goes on to the next waiter.
        """
        with self._lock:
            if self._take_locked():
                return True
            signal = self._new_signal()
            signal.acquire()  # locked: our release() unlocks it
            ticket = _Ticket(signal)
            self._waiting.append(ticket)
        try:
            signal.acquire(True, timeout)
        except BaseException:
            if self._leave(ticket):
                self.release()
            raise
        return self._leave(ticket)

    def _leave(self, ticket: _Ticket) -> bool:
        """After a wait: True if the permit was handed over (keep it); else leave the queue."""
        with self._lock:
            if ticket.granted:
                return True
            self._waiting.remove(ticket)
            return False

    def release(self) -> None:
        with self._lock:
            if self._waiting:
                ticket = self._waiting.popleft()
                ticket.granted = True
            elif self._free < self._size:
                self._free += 1
                return
            else:
                raise ValueError("serverhooks pool: a permit released more often than taken")
        ticket.signal.release()

    def waiting(self) -> int:
        """How many units wait now."""
        return len(self._waiting)
