"""The overload tests' control arm: the pool's permits as they were before issue 22, a bounded
semaphore of the waiter's kind (gevent's under gevent, `threading`'s otherwise), taken first
without waiting by every checkout.

Such a semaphore gives a free permit to whoever asks, even while others queue, and wakes a
waiter only later: a keep-alive client that finishes a request and starts the next takes back
the permit it just freed, and the units that queued first starve. Nothing else changes.

A server's master imports this module (a gunicorn conf), and every worker it forks inherits the
change; it applies only with SERVERHOOKS_TEST_SLOTS_CONTROL=1 in the environment. The unit tests
use `reverted()`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from serverhooks.pool import fifo

_FIXED = fifo.FifoSlots


class SemaphoreSlots:
    """FifoSlots' interface over the semaphore the pool used before."""

    def __init__(self, size: int, lock: Any, new_signal: Callable[[], Any]) -> None:
        if type(new_signal()).__module__.startswith("gevent"):
            from gevent.lock import BoundedSemaphore

            self._semaphore: Any = BoundedSemaphore(size)
        else:
            self._semaphore = threading.BoundedSemaphore(size)

    def _take_locked(self) -> bool:
        return bool(self._semaphore.acquire(blocking=False))

    def take(self) -> bool:
        return self._take_locked()

    def wait(self, timeout: float) -> bool:
        return bool(self._semaphore.acquire(timeout=timeout))

    def release(self) -> None:
        self._semaphore.release()

    def waiting(self) -> int:
        return 0


def revert() -> None:
    fifo.FifoSlots = SemaphoreSlots  # type: ignore[misc, assignment]


def restore() -> None:
    fifo.FifoSlots = _FIXED  # type: ignore[misc]


@contextmanager
def reverted() -> Iterator[None]:
    revert()
    try:
        yield
    finally:
        restore()


if os.environ.get("SERVERHOOKS_TEST_SLOTS_CONTROL") == "1":
    revert()
