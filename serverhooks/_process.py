"""This process's state, in one place: what serverhooks counts and tracks, and what a fork needs.

A forked child inherits all of it from its parent. `start_afresh_after_fork` is the one
place that resets it, once the child has abandoned what it inherited (serverhooks.fork).
"""

from __future__ import annotations

import dataclasses
import os
import threading
import weakref
from typing import Any


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
    #: Database sessions this process opened (Django's connection_created), pooled or not.
    sessions_opened: int = 0
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

    def __post_init__(self) -> None:
        # Not a field: stats() stays a flat dict of totals. The metrics' alias labels read it.
        #: What add() counted, by (counter, database alias).
        self.by_alias: dict[tuple[str, str], float] = {}

    def add(self, name: str, alias: str, amount: float = 1) -> None:
        """Count `amount` more of the counter `name` for the database `alias`."""
        # Not setattr(): a metered subclass mirrors plain assignments as unlabelled increments.
        object.__setattr__(self, name, getattr(self, name) + amount)
        key = (name, alias)
        self.by_alias[key] = self.by_alias.get(key, 0) + amount


@dataclasses.dataclass
class ProcessState:
    #: Every Django connection opened in this process, in any thread, by id(): a connection
    #: of another thread is only reachable through this map (serverhooks.registry).
    tracked: dict[int, weakref.ref[Any]] = dataclasses.field(default_factory=dict)
    #: (wrapper, raw connection) pairs kept referenced across a guarded fork (serverhooks.fork).
    held_for_fork: list[tuple[Any, Any]] = dataclasses.field(default_factory=list)
    #: The parent's answer, just before a fork: did anything need abandoning? None: not known.
    fork_has_work: bool | None = None
    #: The pid that finished abandoning what it inherited; None until one did.
    abandoned_in_pid: int | None = None
    counters: Counters = dataclasses.field(default_factory=Counters)


_state = ProcessState()
_once_lock = threading.Lock()
_done_once: set[str] = set()


def state() -> ProcessState:
    """The live state; a child that nothing reset yet counts from zero (its parent's work is not its own)."""
    if _state.counters.pid != os.getpid():
        _state.counters = Counters()
    return _state


def start_afresh_after_fork() -> None:
    """In a child, once it abandoned what it inherited: drop the parent's bookkeeping."""
    global _state
    _state = ProcessState(abandoned_in_pid=os.getpid())


def once(key: str) -> bool:
    """True the first time `key` is asked in this process tree, False after: "run once", under a lock.

    A forked child inherits what its parent already did (hooks, patches and signal
    connections all survive a fork).
    """
    with _once_lock:
        if key in _done_once:
            return False
        _done_once.add(key)
        return True


def forget_once(key: str) -> None:
    """Let `once(key)` be True again (the undo of what `key` did)."""
    with _once_lock:
        _done_once.discard(key)
