"""The server-agnostic core: what happens to Django's connections around a fork.

Adapters translate their server's hooks into these calls:

=====================  ================  ==============================================
call                   process           effect
=====================  ================  ==============================================
close_before_fork()    parent            close initialised connections, pools, caches
abandon_inherited()    child, first      detach inherited connections, no network I/O
prepare_worker()       worker, app ready track connections, guard forks, probe databases
close_at_exit()        exiting process   close this process's connections cleanly
=====================  ================  ==============================================

None of them imports `django.db` when the process has not imported it already,
and none of them raises: failures are logged on the `serverhooks` logger.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import weakref
from typing import Any

from serverhooks import _django, conf, sockets
from serverhooks._log import describe_error, logger, redact, remember_secret
from serverhooks.stats import counters

# Every DatabaseWrapper that connected in this process, in any thread, by id().
# A connection of another thread is only reachable through this map.
_tracked: dict[int, weakref.ref[Any]] = {}
_tracking = False
# Strong references held across a guarded fork, see `hold_for_fork`.
_held_for_fork: list[tuple[Any, Any]] = []
_abandoned_in_pid: int | None = None
# Set by the parent in `hold_for_fork`, just before a fork: did anything need abandoning?
# None means "not known for this fork" (the handler did not run, or failed): the child
# then does the full abandon. The parent resets it right after each fork.
_fork_has_work: bool | None = None


# --------------------------------------------------------------------------- tracking


def _on_connection_created(sender: Any, connection: Any, **kwargs: Any) -> None:
    key = id(connection)

    def forget(_ref: weakref.ref[Any]) -> None:
        _tracked.pop(key, None)

    _tracked[key] = weakref.ref(connection, forget)
    remember_secret(connection.settings_dict.get("PASSWORD"))
    # Both import django.db.utils: only once django.db is loaded, as it is here.
    from serverhooks import cursorguard, health

    health.watch(connection)
    if conf.get("CLOSE_INTERRUPTED"):
        cursorguard.guard(connection)


def start_tracking() -> None:
    """Follow every new connection of this process; only once `django.db` is loaded."""
    global _tracking
    db = _django.loaded_db()
    if _tracking or db is None:
        return
    from django.db.backends.signals import connection_created

    connection_created.connect(_on_connection_created, weak=False, dispatch_uid="serverhooks.track")
    _tracking = True
    for wrapper in _this_thread_wrappers():
        if wrapper.connection is not None:
            _on_connection_created(type(wrapper), wrapper)


def stop_tracking() -> None:
    """Undo `start_tracking` (tests)."""
    global _tracking
    if _tracking:
        from django.db.backends.signals import connection_created

        connection_created.disconnect(dispatch_uid="serverhooks.track")
        _tracking = False
    _tracked.clear()


def _this_thread_wrappers() -> list[Any]:
    db = _django.loaded_db()
    if db is None:
        return []
    try:
        return list(db.connections.all(initialized_only=True))
    except Exception as exc:  # settings not loadable: then no wrapper exists either
        logger.debug("serverhooks: listing connections: %s", describe_error(exc))
        return []


def _all_wrappers() -> list[Any]:
    """This thread's initialised wrappers plus every tracked one, without duplicates."""
    found = {id(w): w for w in _this_thread_wrappers()}
    for ref in list(_tracked.values()):
        wrapper = ref()
        if wrapper is not None:
            found.setdefault(id(wrapper), wrapper)
    for wrapper, _raw in _held_for_fork:
        found.setdefault(id(wrapper), wrapper)
    return list(found.values())


def _django_pg_pools() -> dict[str, Any]:
    """Django 5.1+'s class-level PostgreSQL pools (survive fork: Django ticket 36957)."""
    base = sys.modules.get("django.db.backends.postgresql.base")
    pools = getattr(getattr(base, "DatabaseWrapper", None), "_connection_pools", None)
    return pools if isinstance(pools, dict) else {}


def _initialised_caches() -> list[Any]:
    cache_module = sys.modules.get("django.core.cache")
    if cache_module is None:
        return []
    try:
        return list(cache_module.caches.all(initialized_only=True))
    except Exception:
        return []


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
    start_tracking()
    stats = counters()
    for wrapper in _this_thread_wrappers():
        if wrapper.connection is None:
            continue
        try:
            wrapper.close()
            stats.closed_before_fork += 1
        except Exception as exc:
            stats.errors += 1
            logger.warning(
                "serverhooks: closing database %s before fork failed: %s",
                _django.describe_alias(wrapper.alias, wrapper.settings_dict),
                describe_error(exc),
            )
    pools = _django_pg_pools()
    for alias, pool in list(pools.items()):
        try:
            pool.close()
            stats.closed_before_fork += 1
        except Exception as exc:
            stats.errors += 1
            logger.warning("serverhooks: closing the pool of %r before fork failed: %s", alias, describe_error(exc))
        pools.pop(alias, None)
    if conf.get("CLOSE_CACHES_BEFORE_FORK"):
        for cache in _initialised_caches():
            try:
                cache.close()
                _disconnect_redis_pools(cache)
                stats.caches_closed_before_fork += 1
            except Exception as exc:
                stats.errors += 1
                logger.warning("serverhooks: closing cache %r before fork failed: %s", cache, describe_error(exc))


def _disconnect_redis_pools(cache: Any) -> None:
    """Django's RedisCache.close() is a no-op: its pools keep their sockets open.

    Its client (a cached property) only exists once the cache was used.
    """
    client = vars(cache).get("_cache")
    pools = getattr(client, "_pools", None)
    if isinstance(pools, dict):
        for pool in pools.values():
            pool.disconnect()


def hold_for_fork() -> None:
    """Parent, just before any fork: keep every live raw connection referenced.

    CPython clears the other threads' states in a forked child before any at-fork
    handler runs. Connections held only in those threads' thread-locals would be
    finalised right there, and mysqlclient's finaliser sends COM_QUIT on the
    parent's socket. Holding a reference across the fork leaves them for
    `abandon_inherited` to detach quietly.
    """
    global _fork_has_work
    _fork_has_work = None  # until the answer below is complete
    _held_for_fork[:] = [(w, w.connection) for w in _all_wrappers() if w.connection is not None]
    gevent_pool = sys.modules.get("serverhooks.pool")
    _fork_has_work = bool(
        _held_for_fork
        or _django_pg_pools()
        or _initialised_caches()
        or (gevent_pool is not None and gevent_pool.active())
    )


def release_hold() -> None:
    """Parent, right after a fork: the references are no longer needed, nor is the answer."""
    global _fork_has_work
    _held_for_fork.clear()
    _fork_has_work = None


def abandon_inherited_after_guarded_fork() -> int:
    """The fork guard's child handler: `abandon_inherited`, or next to nothing when
    the parent saw nothing to abandon (the usual case after a server's pre_fork).

    Why the shortcut: every object a fresh child touches costs a copy-on-write page
    fault, and those dominate the cost of the full scan.
    """
    global _abandoned_in_pid, _tracked
    if _fork_has_work is not False:
        return abandon_inherited()
    _abandoned_in_pid = os.getpid()
    _tracked = {}
    return 0


# --------------------------------------------------------------------------- after fork


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


def abandon_inherited() -> int:
    """In a forked child, first thing: stop using every inherited connection.

    Nothing is written to any inherited socket, now or later; the parent's sessions
    keep working. Idempotent per process: the fork guard and a server's post-fork
    hook may both call it. It counts as done only once every step has run, so a step
    that failed is tried again by the next call. Returns how many connections were
    abandoned.
    """
    global _abandoned_in_pid, _tracked
    pid = os.getpid()
    if _abandoned_in_pid == pid:
        return 0
    stats = counters()  # a new pid starts from zero
    if _django.loaded_db() is None:
        _held_for_fork.clear()
        _abandoned_in_pid = pid
        return 0
    before = stats.abandoned_after_fork
    for wrapper in _all_wrappers():
        raw = wrapper.connection
        if raw is None:
            continue
        try:
            sockets.neutralise(raw)
            stats.abandoned_after_fork += 1
        except Exception as exc:
            stats.errors += 1
            logger.warning(
                "serverhooks: abandoning inherited %s failed: %s",
                _django.describe_alias(wrapper.alias, wrapper.settings_dict),
                describe_error(exc),
            )
        _forget_connection(wrapper)
    complete = True
    for step in (_abandon_pools, _forget_caches, _forget_pooled):
        try:
            step(stats)
        except Exception as exc:
            complete = False
            stats.errors += 1
            logger.warning("serverhooks: after fork, %s failed: %s", step.__name__.strip("_"), describe_error(exc))
    if not complete:
        return stats.abandoned_after_fork - before
    _held_for_fork.clear()
    # The wrappers of the parent's other threads are unreachable here now.
    _tracked = {}
    _abandoned_in_pid = pid
    logger.debug("serverhooks: pid %d abandoned %d inherited connection(s)", pid, stats.abandoned_after_fork)
    return stats.abandoned_after_fork - before


def _forget_pooled(stats: Any) -> None:
    gevent_pool = sys.modules.get("serverhooks.pool")
    if gevent_pool is not None:
        gevent_pool.forget_after_fork()


def _abandon_pools(stats: Any) -> None:
    pools = _django_pg_pools()
    for alias, pool in list(pools.items()):
        idle = list(getattr(pool, "_pool", ()))
        for raw in idle:
            sockets.neutralise(raw)
        # The pool object itself (its locks, its dead worker threads) is the
        # parent's: never touch or finalise it here, build a fresh one on demand.
        sockets._never_finalise.append(pool)
        pools.pop(alias, None)
        stats.pools_abandoned_after_fork += 1
        stats.abandoned_after_fork += len(idle)


def _forget_caches(stats: Any = None) -> None:
    """Give the child fresh cache clients instead of the parent's sockets."""
    cache_module = sys.modules.get("django.core.cache")
    if cache_module is None:
        return
    from asgiref.local import Local  # a Django dependency

    handler = cache_module.caches
    # Keep the parent's clients alive (their finalisers may say goodbye) and
    # start an empty storage of the same kind Django builds.
    sockets._never_finalise.append(handler._connections)
    handler._connections = Local(handler.thread_critical)


# --------------------------------------------------------------------------- worker life


def prepare_worker(*, probe_databases: bool = False) -> None:
    """Worker ready (app loaded, after any gevent patching): track and guard.

    With `probe_databases`, also check every alias in a background thread and log
    a WARNING naming the problem when one does not load or answer.
    """
    if _django.load_settings() is not _django.DjangoStatus.READY:
        return
    from serverhooks import forkguard

    try:
        import django.db  # noqa: F401 - safe here: the worker is past any patching
    except Exception as exc:
        logger.warning("serverhooks: cannot import django.db: %s", describe_error(exc))
        return
    start_tracking()
    if conf.get("FORK_GUARD"):
        forkguard.install_fork_guard()
    from serverhooks import greenlets

    if greenlets.gevent_patched():
        greenlets.prepare_gevent_worker()
    if probe_databases and conf.get("PROBE_DATABASES"):
        from serverhooks.probe import probe_in_background

        probe_in_background()


def close_wrapper(wrapper: Any) -> bool:
    """Close a wrapper cleanly, even one created by another thread."""
    if wrapper.connection is None:
        return False
    foreign = wrapper._thread_ident != threading.get_ident()
    if foreign:
        wrapper.inc_thread_sharing()
    try:
        wrapper.close()
    finally:
        if foreign:
            wrapper.dec_thread_sharing()
    return True


def release_connections() -> int:
    """End of a unit of work in this thread or greenlet: give its connections back.

    Under the gevent pool they return to the pool; otherwise they are closed, as
    a thread that ends would otherwise leave them for the garbage collector.
    Returns how many were released.
    """
    db = _django.loaded_db()
    if db is None:
        return 0
    gevent_pool = sys.modules.get("serverhooks.pool")
    released = gevent_pool.release_current() if gevent_pool is not None and gevent_pool.active() else 0
    for wrapper in _this_thread_wrappers():
        if wrapper.in_atomic_block:
            # The caller's transaction is still open (`with releasing():` inside `atomic()`):
            # closing would end it behind the caller's back. Its end closes nothing either;
            # the next release after the block does.
            continue
        try:
            if close_wrapper(wrapper):
                released += 1
        except Exception as exc:
            counters().errors += 1
            logger.warning("serverhooks: closing %r failed: %s", wrapper.alias, describe_error(exc))
    return released


def close_at_exit() -> None:
    """Exiting process: close its connections with a proper goodbye, log the counters.

    Connections of other threads are closed too; call this once the server has
    stopped handing requests to those threads (after its graceful timeout).
    """
    if _django.loaded_db() is not None:
        stats = counters()
        wrappers = _all_wrappers()
        busy = _wait_until_idle(wrappers, conf.get("EXIT_WAIT"))
        for wrapper in wrappers:
            if id(wrapper) in busy:
                # Another thread is inside a query on it: closing from here could crash the
                # driver (mysqlclient). The OS closes the socket when the process exits.
                stats.busy_at_exit += 1
                logger.warning(
                    "serverhooks: at exit, another thread is still inside a query on %s after %s s; "
                    "leaving that connection to the operating system.",
                    _django.describe_alias(wrapper.alias, wrapper.settings_dict),
                    conf.get("EXIT_WAIT"),
                )
                continue
            try:
                if close_wrapper(wrapper):
                    stats.closed_at_exit += 1
            except Exception as exc:
                stats.errors += 1
                logger.warning(
                    "serverhooks: closing database %s at exit failed: %s",
                    _django.describe_alias(wrapper.alias, wrapper.settings_dict),
                    describe_error(exc),
                )
        for alias, pool in list(_django_pg_pools().items()):
            try:
                pool.close()
            except Exception as exc:
                logger.warning("serverhooks: closing the pool of %r at exit failed: %s", alias, describe_error(exc))
    level = logging.getLevelName(conf.get("STATS_LOG_LEVEL"))
    logger.log(level, "serverhooks: pid %d counters: %s", os.getpid(), redact(_format_counters()))


def _wait_until_idle(wrappers: list[Any], seconds: float) -> set[int]:
    """ids of the wrappers still inside a query in another thread after `seconds` (polled, bounded)."""
    from serverhooks import cursorguard

    me = threading.get_ident()
    deadline = time.monotonic() + seconds
    while True:
        busy = {id(w) for w in wrappers if w.connection is not None and w._thread_ident != me and cursorguard.busy(w)}
        if not busy or time.monotonic() >= deadline:
            return busy
        time.sleep(0.02)


def _format_counters() -> str:
    from serverhooks.stats import stats

    return ", ".join(f"{key}={value}" for key, value in stats().items() if key != "pid")
