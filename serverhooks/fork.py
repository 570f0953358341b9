"""The fork steps: close in the parent before a server forks, abandon in the child after.

=====================  ================  ==============================================
call                   process           effect
=====================  ================  ==============================================
close_before_fork()    parent            close initialised connections, pools, caches
hold_for_fork()        parent, any fork  keep other threads' connections referenced
abandon_inherited()    child, first      detach inherited connections, no network I/O
=====================  ================  ==============================================

None of them imports `django.db` when the process has not imported it already, and
none of them raises: failures are logged on the `serverhooks` logger and counted.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from typing import Any

from serverhooks import _django, _internals, conf, registry, sockets
from serverhooks._log import describe_error, logger
from serverhooks._process import ProcessState, start_afresh_after_fork, state
from serverhooks.pool import active as pools

__all__ = [
    "abandon_after_guarded_fork",
    "abandon_inherited",
    "close_before_fork",
    "hold_for_fork",
    "release_hold",
]


# --------------------------------------------------------------------------- before fork


def close_before_fork() -> None:
    """In the parent, right before a server forks: close connections, pools and caches.

    Closing here is the clean path: the parent's sessions end with a proper goodbye
    and the children inherit nothing. It is for server masters, which hold no
    transaction; for forks in arbitrary code the fork guard keeps the parent's
    connections open and only treats the child.
    """
    if _django.loaded_db() is None:
        return
    registry.start_tracking()
    counters = state().counters
    for wrapper in registry.this_thread_wrappers():
        if wrapper.connection is None:
            continue
        try:
            wrapper.close()
            counters.add("closed_before_fork", wrapper.alias)
        except Exception as exc:
            counters.add("errors", "")
            logger.warning(
                "serverhooks: closing database %s before fork failed: %s",
                _django.describe_alias(wrapper.alias, wrapper.settings_dict),
                describe_error(exc),
            )
    pools = _internals.postgres_pools()
    for key, pool in list(pools.items()):
        try:
            pool.close()
            counters.add("closed_before_fork", str(key))
        except Exception as exc:
            counters.add("errors", "")
            logger.warning("serverhooks: closing the pool of %r before fork failed: %s", key, describe_error(exc))
        pools.pop(key, None)
    if conf.get("CLOSE_CACHES_BEFORE_FORK"):
        for cache in _initialised_caches():
            try:
                cache.close()
                for redis_pool in _internals.cache_client_pools(cache):
                    redis_pool.disconnect()
                counters.add("caches_closed_before_fork", "")
            except Exception as exc:
                counters.add("errors", "")
                logger.warning("serverhooks: closing cache %r before fork failed: %s", cache, describe_error(exc))


def _initialised_caches() -> list[Any]:
    cache_module = sys.modules.get("django.core.cache")
    if cache_module is None:
        return []
    try:
        return list(cache_module.caches.all(initialized_only=True))
    except Exception:
        return []


def hold_for_fork() -> None:
    """Parent, just before any fork: keep every live raw connection referenced.

    CPython clears the other threads' states in a forked child before any at-fork
    handler runs. Connections held only in those threads' thread-locals are then
    garbage (a DatabaseWrapper is a reference cycle), finalised by the first garbage
    collection, which may run before the guard's handler; and mysqlclient's finaliser
    sends COM_QUIT on the parent's socket. Holding a reference across the fork leaves
    them for `abandon_inherited` to detach quietly. It also answers, for the child,
    whether anything needs abandoning at all; until that answer is complete it stays
    "not known". Both are kept per forking thread: two threads may fork at once.
    """
    current, me = state(), _forking_thread()
    current.fork_has_work[me] = None
    held = [(w, w.connection) for w in registry.all_wrappers() if w.connection is not None]
    current.held_for_fork[me] = held
    current.fork_has_work[me] = bool(held or _internals.postgres_pools() or _initialised_caches() or pools.any_active())


def release_hold() -> None:
    """Parent, right after a fork (and a child the guard does not treat): this thread's references
    are no longer needed, nor is its answer. Another thread's fork keeps its own."""
    current, me = state(), _forking_thread()
    current.held_for_fork.pop(me, None)
    current.fork_has_work.pop(me, None)


def _forking_thread() -> int:
    """The key of this fork's hold: the forking thread, which is the one thread its child runs, under
    the same ident."""
    return threading.get_ident()


# --------------------------------------------------------------------------- after fork


def abandon_after_guarded_fork() -> int:
    """The fork guard's child handler: `abandon_inherited`, or next to nothing when the
    parent saw nothing to abandon (the usual case after a server's pre_fork).

    Why the shortcut: every object a fresh child touches costs a copy-on-write page
    fault, and those dominate the cost of the full scan.
    """
    if state().fork_has_work.get(_forking_thread()) is not False:
        return abandon_inherited()
    start_afresh_after_fork()
    return 0


def abandon_inherited() -> int:
    """In a forked child, first thing: stop using every inherited connection.

    Nothing is written to any inherited socket, now or later; the parent's sessions
    keep working. Idempotent per process: the fork guard and a server's post-fork
    hook may both call it. It counts as done only once every step has run, so a step
    that failed is tried again by the next call. Returns how many connections were
    abandoned.
    """
    current = state()
    if current.abandoned_in_pid == os.getpid():
        return 0
    if _django.loaded_db() is None:
        start_afresh_after_fork()
        return 0
    abandoned = 0
    for wrapper in registry.all_wrappers():
        raw = wrapper.connection
        if raw is None:
            continue
        try:
            sockets.neutralise(raw)
            abandoned += 1
            current.counters.add("abandoned_after_fork", wrapper.alias)
        except Exception as exc:
            current.counters.add("errors", "")
            logger.warning(
                "serverhooks: abandoning inherited %s failed: %s",
                _django.describe_alias(wrapper.alias, wrapper.settings_dict),
                describe_error(exc),
            )
        _forget_connection(wrapper)
    steps: tuple[Callable[[ProcessState], None], ...] = (_abandon_postgres_pools, _forget_caches, _forget_pooled)
    complete = True
    for step in steps:
        try:
            step(current)
        except Exception as exc:
            complete = False
            current.counters.add("errors", "")
            logger.warning("serverhooks: after fork, %s failed: %s", step.__name__.strip("_"), describe_error(exc))
    if complete:
        counters = current.counters
        start_afresh_after_fork()  # the parent's bookkeeping goes; this child's counts stay
        state().counters = counters
        logger.debug("serverhooks: pid %d abandoned %d inherited connection(s)", os.getpid(), abandoned)
    return abandoned


def _forget_connection(wrapper: Any) -> None:
    """Put a wrapper in the state Django's own close() leaves it in, without closing."""
    wrapper.connection = None
    wrapper.run_on_commit = []
    wrapper.close_at = None
    wrapper.errors_occurred = False
    if hasattr(wrapper, "health_check_done"):
        wrapper.health_check_done = False
    if wrapper.in_atomic_block:
        # The transaction lives in the parent's session: the child cannot go on
        # with it. Django then refuses new queries in this block with a clear error.
        wrapper.closed_in_transaction = True
        wrapper.needs_rollback = True


def _abandon_postgres_pools(current: ProcessState) -> None:
    pools = _internals.postgres_pools()
    for key, pool in list(pools.items()):
        idle = _internals.pool_idle_connections(pool)
        for raw in idle:
            sockets.neutralise(raw)
        # The pool object itself (its locks, its dead worker threads) is the parent's:
        # never touch or finalise it here; Django builds a fresh one on demand.
        sockets.keep_forever(pool)
        pools.pop(key, None)
        current.counters.add("pools_abandoned_after_fork", str(key))
        current.counters.add("abandoned_after_fork", str(key), len(idle))


def _forget_caches(current: ProcessState) -> None:
    """Give the child fresh cache clients instead of the parent's sockets."""
    cache_module = sys.modules.get("django.core.cache")
    if cache_module is None:
        return
    from asgiref.local import Local  # a Django dependency

    handler = cache_module.caches
    # Keep the parent's clients alive (their finalisers may say goodbye), and start an
    # empty storage of the same kind Django builds.
    old = _internals.replace_connection_storage(handler, Local(handler.thread_critical))
    if old is not None:
        sockets.keep_forever(old)


def _forget_pooled(current: ProcessState) -> None:
    pools.forget_after_fork()
