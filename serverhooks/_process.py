"""This process's state, in one place: what serverhooks counts and tracks, and what a fork needs.

A forked child inherits all of it from its parent. `start_afresh_after_fork` is the one
place that resets it, once the child has abandoned what it inherited (serverhooks.fork);
only the lock of `once()` is replaced earlier, at the fork itself.
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
    #: Connections left open at exit because another thread was still inside a query or a
    #: transaction on them after EXIT_WAIT (closing would end its atomic() block without a commit).
    busy_at_exit: int = 0
    #: Close attempts that failed and were logged instead of raised.
    errors: int = 0

    def __post_init__(self) -> None:
        # Not a field: stats() stays a flat dict of totals. The metrics' alias labels read it.
        #: What add() counted, by (counter, database alias).
        self.by_alias: dict[tuple[str, str], float] = {}
        # add() is a read-modify-write, and gthread and ASGI workers count from many threads at
        # once: unlocked, two increments could land as one. Reentrant, so that a signal handler
        # that counts while its thread is inside add() cannot hang it. A forked child gets fresh
        # Counters (state()), hence a fresh lock, whoever held this one.
        self._lock = threading.RLock()

    def add(self, name: str, alias: str, amount: float = 1) -> None:
        """Count `amount` more of the counter `name` for the database `alias` ("": none applies).

        Exact under threads; `counters.x += 1` is not, so everything that may count from two threads
        at once uses add()."""
        key = (name, alias)
        with self._lock:
            # The instance dict, not setattr(): a metered subclass mirrors plain assignments as
            # unlabelled increments (and this path is the cheaper one: it runs per pool checkout).
            self.__dict__[name] += amount
            by_alias = self.by_alias
            by_alias[key] = by_alias.get(key, 0) + amount


@dataclasses.dataclass
class ProcessState:
    #: Every Django connection opened in this process, in any thread, by id(): a connection
    #: of another thread is only reachable through this map (serverhooks.registry).
    tracked: dict[int, weakref.ref[Any]] = dataclasses.field(default_factory=dict)
    #: (wrapper, raw connection) pairs kept referenced across a guarded fork (serverhooks.fork), by
    #: forking thread: two threads may fork at once, and one's release must not drop the other's hold.
    held_for_fork: dict[int, list[tuple[Any, Any]]] = dataclasses.field(default_factory=dict)
    #: The parent's answer, just before a fork, by forking thread: did anything need abandoning?
    #: None (or no entry): not known.
    fork_has_work: dict[int, bool | None] = dataclasses.field(default_factory=dict)
    #: The pid that finished abandoning what it inherited; None until one did.
    abandoned_in_pid: int | None = None
    counters: Counters = dataclasses.field(default_factory=Counters)


_state = ProcessState()
_once_lock = threading.Lock()
_done_once: set[str] = set()


def _after_fork_in_child() -> None:
    """A fresh `once()` lock in every child: a fork while another thread held it (that thread does
    not exist in the child) would leave the child's copy held forever, and every later hook stuck."""
    global _once_lock
    _once_lock = threading.Lock()


# Looked up at each fork rather than bound now, so that a test can take the reset away (its control).
os.register_at_fork(after_in_child=lambda: _after_fork_in_child())


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
