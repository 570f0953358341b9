"""The pool's waiter for threads: what ASGI servers run Django's sync code in.

Django's ASGI handler gives each request a thread of its own (a `ThreadSensitiveContext`):
the view, the middleware and every `sync_to_async` call of that request run there, async
ORM calls included. So a request is its thread: it checks a connection out at its first
database use and gives it back at `request_finished`, in that thread. A thread that ended
without giving back (a client that went away mid-request) gives back as it ends.
"""

from __future__ import annotations

import _thread
import threading
import weakref
from collections.abc import Callable
from typing import Any

from serverhooks.pool import active, fifo

__all__ = ["ThreadWaiter", "activate"]


class _EndOfThread:
    """Kept in a thread's own storage: freed, and its finalizers run, when the thread ends."""

    __slots__ = ("__weakref__",)


class ThreadWaiter:
    """Threads queue on a lock of their own each; each holds what it checked out until its request ends.

    A thread that ends without giving back (a client that went away mid-request, a thread
    of the app's own) is told of through its thread-local storage: CPython frees a thread's
    locals when the thread ends, threads not started by `threading` included (their
    `is_alive()` may never turn False), and a finalizer on an object kept there runs then.
    """

    # What most often holds slots under ASGI: work that has no request end.
    timeout_hint = (
        " Work outside a request (a thread of your own, run_in_executor, a Channels consumer) keeps "
        "its connection until it runs inside serverhooks.threads.releasing()."
    )

    def __init__(self) -> None:
        self._local = threading.local()

    def signal(self) -> fifo.Signal:
        return _thread.allocate_lock()

    def current(self) -> Any:
        return threading.current_thread()

    def is_dead(self, unit: Any) -> bool:
        try:
            return not unit.is_alive()
        except RuntimeError:  # Python 3.13's _DummyThread says "thread is not alive" this way
            return True

    def on_death(self, unit: Any, callback: Callable[[Any], None]) -> bool:
        if unit is not threading.current_thread():
            return False  # only a thread's own storage ends with it
        # Once per thread and pool, kept in the thread's own storage: not per Thread object,
        # since before Python 3.13 a thread not started by `threading` gets the _DummyThread of
        # an earlier one whose ident it reuses, and must be told of in its own right.
        token = getattr(self._local, "end", None)
        if token is None:
            token = self._local.end = _EndOfThread()
            self._local.told = set()
        owner = id(getattr(callback, "__self__", callback))
        if owner not in self._local.told:
            self._local.told.add(owner)
            weakref.finalize(token, callback, unit).atexit = False  # at shutdown there is nothing to give back to
        return True


def activate(size: int, timeout: float) -> list[str]:
    """Pool every alias for this process's threads; returns the pooled aliases.

    Here CONN_MAX_AGE=0 (Django's advice for ASGI, against the leak the pool removes) means
    reuse with no age cap; a value above 0 still caps each session's lifetime.
    """
    return active.activate(ThreadWaiter(), size, timeout, max_age_zero_reuses=True)
