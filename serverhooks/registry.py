"""The connection registry: every Django connection this process opened, in any thread.

Django keeps connections per thread, and one thread cannot list another's. At a fork or
at exit, serverhooks must reach them all, so from `start_tracking()` on it follows
Django's `connection_created` signal. Each connection it sees also gets serverhooks'
per-connection care: the idle-session check (serverhooks.health) and the guard against
interrupted queries (serverhooks.cursorguard).

Nothing here imports `django.db` unless the process has already imported it.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

from serverhooks import _django, _internals, conf
from serverhooks._log import describe_error, logger, remember_secret
from serverhooks._process import once, state

__all__ = ["all_wrappers", "close_wrapper", "start_tracking", "stop_tracking", "this_thread_wrappers"]

_TRACKING = "registry.tracking"


def _on_connection_created(sender: Any, connection: Any, **kwargs: Any) -> None:
    tracked = state().tracked
    key = id(connection)

    def forget(_ref: weakref.ref[Any]) -> None:
        tracked.pop(key, None)

    tracked[key] = weakref.ref(connection, forget)
    state().counters.add("sessions_opened", connection.alias)
    remember_secret(connection.settings_dict.get("PASSWORD"))
    # Both import django.db.utils: only once django.db is loaded, as it is here.
    from serverhooks import cursorguard, health

    health.watch(connection)
    if conf.get("CLOSE_INTERRUPTED"):
        cursorguard.guard(connection)


def start_tracking() -> None:
    """Follow every new connection of this process; only once `django.db` is loaded. Idempotent."""
    if _django.loaded_db() is None or not once(_TRACKING):
        return
    from django.db.backends.signals import connection_created

    connection_created.connect(_on_connection_created, weak=False, dispatch_uid="serverhooks.track")
    if conf.get("CLOSE_INTERRUPTED"):
        # Now, not at the first guarded connection: a `with atomic():` looks its __exit__ up
        # on entry, and the first connection is often opened inside the first block.
        from serverhooks import transactions

        transactions.install()
    for wrapper in this_thread_wrappers():
        if wrapper.connection is not None:
            _on_connection_created(type(wrapper), wrapper)


def stop_tracking() -> None:
    """Undo `start_tracking`: forget every connection and stop following new ones."""
    from serverhooks._process import forget_once

    if _django.loaded_db() is not None:
        from django.db.backends.signals import connection_created

        connection_created.disconnect(dispatch_uid="serverhooks.track")
    forget_once(_TRACKING)
    state().tracked.clear()


def this_thread_wrappers() -> list[Any]:
    """This thread's (or greenlet's) initialised Django connections."""
    db = _django.loaded_db()
    if db is None:
        return []
    try:
        return list(db.connections.all(initialized_only=True))
    except Exception as exc:  # settings not loadable: then no wrapper exists either
        logger.debug("serverhooks: listing connections: %s", describe_error(exc))
        return []


def all_wrappers() -> list[Any]:
    """This thread's initialised connections, every tracked one, and those held across a fork."""
    found = {id(w): w for w in this_thread_wrappers()}
    current = state()
    for ref in list(current.tracked.values()):
        wrapper = ref()
        if wrapper is not None:
            found.setdefault(id(wrapper), wrapper)
    for wrapper, _raw in current.held_for_fork:
        found.setdefault(id(wrapper), wrapper)
    return list(found.values())


def close_wrapper(wrapper: Any) -> bool:
    """Close a connection cleanly, even one another thread created; False if it was not open."""
    if wrapper.connection is None:
        return False
    foreign = _internals.thread_ident(wrapper) not in (None, threading.get_ident())
    if foreign:
        wrapper.inc_thread_sharing()
    try:
        wrapper.close()
    finally:
        if foreign:
            wrapper.dec_thread_sharing()
    return True
