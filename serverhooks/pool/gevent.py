"""The pool's waiter for greenlets: a gevent lock to sleep on, and greenlets as the units of work.

Import it only once gevent has patched the process; `serverhooks.greenlets` does that
from the worker-ready hook.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gevent import getcurrent
from gevent.lock import Semaphore

from serverhooks.pool import active, fifo

__all__ = ["GreenletWaiter", "activate"]


class GreenletWaiter:
    """Greenlets wait cooperatively; each holds what it checked out until its request ends."""

    def signal(self) -> fifo.Signal:
        signal: fifo.Signal = Semaphore()
        return signal

    def current(self) -> Any:
        return getcurrent()

    def is_dead(self, unit: Any) -> bool:
        return bool(unit.dead)

    def on_death(self, unit: Any, callback: Callable[[Any], None]) -> bool:
        # gevent Greenlets (gevent.spawn, each client of a gevent server) say when they die:
        # what they held comes back at the next hub turn. Raw greenlets cannot.
        if not hasattr(unit, "rawlink"):
            return False
        # Which pools this greenlet already told of its death, kept on the greenlet itself (a
        # keep-alive client checks out once per request, and must not pile up a link per checkout).
        told = getattr(unit, "_serverhooks_linked", None)
        if told is None:
            told = unit._serverhooks_linked = set()
        owner = id(getattr(callback, "__self__", callback))
        if owner not in told:
            told.add(owner)
            unit.rawlink(callback)
        return True


def activate(size: int, timeout: float) -> list[str]:
    """Pool every alias for this gevent worker; returns the pooled aliases."""
    return active.activate(GreenletWaiter(), size, timeout)
