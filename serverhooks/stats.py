"""Per-process counters: what serverhooks did to this process's connections.

They are plain integers in module state, so reading them costs nothing and a
forked child starts from zero (see `reset_for_new_process`).
"""

from __future__ import annotations

import dataclasses
import os


@dataclasses.dataclass
class Counters:
    """What serverhooks did in the process whose pid is `pid`."""

    pid: int = dataclasses.field(default_factory=os.getpid)
    #: Connections closed cleanly in a parent right before it forked.
    closed_before_fork: int = 0
    #: Django cache clients closed in a parent right before it forked.
    caches_closed_before_fork: int = 0
    #: Inherited connections made unusable in a child without a byte sent.
    abandoned_after_fork: int = 0
    #: Django PostgreSQL pools (5.1+) dropped in a child (their sockets neutralised).
    pools_abandoned_after_fork: int = 0
    #: Connections closed cleanly when the worker exited.
    closed_at_exit: int = 0
    #: gevent pool: sessions opened by pooled connections.
    pool_opened: int = 0
    #: gevent pool: checkouts served by an already open session.
    pool_reused: int = 0
    #: gevent pool: sessions closed as expired, broken, or left inside a transaction.
    pool_discarded: int = 0
    #: gevent pool: connections recovered from greenlets that died holding them.
    pool_reclaimed: int = 0
    #: gevent pool: checkouts that had to wait, and the seconds spent waiting.
    pool_waits: int = 0
    pool_wait_seconds: float = 0.0
    #: Connections closed because a query on them was cut short by something other than a database
    #: error (a timeout, GreenletExit, a cancelled task): the reply may still be on its way.
    closed_interrupted: int = 0
    #: Idle sessions the server had ended (KILL, idle timeout, restart), closed before a request used them.
    closed_unhealthy: int = 0
    #: Connections left open at exit because another thread was still inside a query on them.
    busy_at_exit: int = 0
    #: Close attempts that failed and were logged instead of raised.
    errors: int = 0


_counters = Counters()


def counters() -> Counters:
    """The live counters of this process (mutated by serverhooks)."""
    if _counters.pid != os.getpid():
        reset_for_new_process()
    return _counters


def stats() -> dict[str, float]:
    """A snapshot of this process's counters, as a plain dict."""
    return dataclasses.asdict(counters())


def reset_for_new_process() -> None:
    """Start counting afresh: a forked child must not report its parent's work."""
    global _counters
    _counters = Counters()
