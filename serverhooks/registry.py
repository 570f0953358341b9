"""The connection registry: every Django connection this process opened, in any thread.

Django keeps connections per thread, and one thread cannot list another's. At a fork or
at exit, serverhooks must reach them all, so from `start_tracking()` on it follows
Django's `connection_created` signal. Each connection it sees also gets serverhooks'
per-connection care: the idle-session check (serverhooks.health), the guard against
interrupted queries (serverhooks.cursorguard), and cursor and statement names no other
client of a transaction pooler can reach (serverhooks.cursornames).

Nothing here imports `django.db` unless the process has already imported it.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

from serverhooks import _django, _imports, _internals, conf
from serverhooks._log import describe_error, logger, remember_secret
from serverhooks._process import once, state

__all__ = [
    "all_wrappers",
    "close_wrapper",
    "start_tracking",
    "stop_tracking",
    "stop_waiting_for_django_db",
    "this_thread_wrappers",
    "track_from_django_db_import",
]

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
    from serverhooks import cursorguard, cursornames, health

    health.watch(connection)
    try:
        cursornames.install(connection)
    except Exception as exc:  # never fail the user's connect
        logger.warning("serverhooks: unique cursor names on %s: %s", connection.alias, describe_error(exc))
    if conf.get("CLOSE_INTERRUPTED"):
        cursorguard.guard(connection)


def start_tracking(*, existing: bool = True) -> None:
    """Follow every new connection of this process; only once `django.db` is loaded. Idempotent.

    `existing=False` skips looking for this thread's open connections: while django.db is being
    imported there are none, and looking would load the settings module."""
    if _django.loaded_db() is None or not once(_TRACKING):
        return
    from django.db.backends.signals import connection_created

    connection_created.connect(_on_connection_created, weak=False, dispatch_uid="serverhooks.track")
    from serverhooks import cursornames

    cursornames.prepare_process()
    if conf.get("CLOSE_INTERRUPTED"):
        # Now, not at the first guarded connection: a `with atomic():` looks its __exit__ up
        # on entry, and the first connection is often opened inside the first block.
        from serverhooks import transactions

        transactions.install()
    for wrapper in this_thread_wrappers() if existing else []:
        if wrapper.connection is not None:
            _on_connection_created(type(wrapper), wrapper)


# Tracking starts right after `django.db` is imported, by whoever imports it: for a fork guard
# installed before that (a master, a manage.py, a settings module), importing django.db ourselves
# would create Django's connection storage too early (before gevent patches threading), and waiting
# until a fork would miss the connections other threads opened by then.
_waiting_for_django_db: _imports.AfterImport | None = None


def _track_once_django_db_is_imported() -> None:
    global _waiting_for_django_db
    _waiting_for_django_db = None
    start_tracking(existing=False)  # django.db is in sys.modules (importlib puts it there first)


def track_from_django_db_import() -> None:
    """Start tracking now if `django.db` is loaded, else as soon as it is; never imports it."""
    global _waiting_for_django_db
    if _django.loaded_db() is not None:
        start_tracking()
        return
    if _waiting_for_django_db is None:
        _waiting_for_django_db = _imports.after_import(
            "django.db", _track_once_django_db_is_imported, "tracking connections"
        )


def stop_waiting_for_django_db() -> None:
    """Undo a `track_from_django_db_import` that is still waiting (sys.meta_path as it was)."""
    global _waiting_for_django_db
    finder, _waiting_for_django_db = _waiting_for_django_db, None
    _imports.cancel(finder)


def stop_tracking() -> None:
    """Undo `start_tracking`: forget every connection and stop following new ones, and give psycopg
    its own statement names back (connections already open keep the names they prepared)."""
    from serverhooks._process import forget_once

    if _django.loaded_db() is not None:
        from django.db.backends.signals import connection_created

        connection_created.disconnect(dispatch_uid="serverhooks.track")
    from serverhooks import cursornames

    cursornames.forget_process()
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
    for held in list(current.held_for_fork.values()):
        for wrapper, _raw in held:
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
