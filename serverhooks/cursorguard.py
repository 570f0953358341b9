"""Nothing is handed on from an interrupted query.

A query cut short in the client (`gevent.Timeout`, `GreenletExit`, a cancelled task,
`KeyboardInterrupt`, Celery's soft time limit) leaves its session mid-reply: the
server's answer is still on its way. The next query on that connection would read
it as its own answer (another request's result) or fail with a protocol error
("InterfaceError: (0, '')"). Django cannot see this: such exceptions are not
database errors, so it neither marks the connection nor closes it.

So every cursor operation on a guarded connection runs inside a guard, and an
exception that is not a database error closes the connection there and then.
Inside `atomic()` Django then refuses further queries in that block, loudly, instead
of running them on a session in an unknown state. Database errors are left to
Django: the driver has read the error reply, so the protocol is in step.

The guard also counts operations in flight, so that exit can tell a connection that
another thread is using from an idle one (`busy`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from serverhooks._log import describe_error, logger
from serverhooks.counters import counters

__all__ = ["busy", "guard", "unguard"]

T = TypeVar("T")

_GUARDED_METHODS = ("execute", "executemany", "callproc", "fetchone", "fetchmany", "fetchall")


def _run_guarded(db: Any, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    db._serverhooks_busy = getattr(db, "_serverhooks_busy", 0) + 1
    try:
        return call(*args, **kwargs)
    except _database_errors:
        raise
    except BaseException as exc:
        _close_interrupted(db, exc)
        raise
    finally:
        db._serverhooks_busy -= 1


def _close_interrupted(db: Any, exc: BaseException) -> None:
    if db.connection is None:
        return
    counters().add("closed_interrupted", db.alias)
    logger.debug(
        "serverhooks: closing %r: a query was interrupted by %s, its reply may still be on the way",
        db.alias,
        describe_error(exc),
    )
    try:
        db.close()
    except BaseException as close_error:  # the session is in an unknown state: drop it regardless
        logger.debug("serverhooks: closing an interrupted connection: %s", describe_error(close_error))
    if not db.in_atomic_block:
        db.connection = None


def _guarded_method(name: str) -> Callable[..., Any]:
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        guarded = type(self)
        try:
            parent = getattr(super(guarded, self), name)
        except AttributeError:
            # Django's CursorWrapper serves fetch*() through __getattr__, which super() does not consult.
            base: Any = guarded.__mro__[1]
            parent = base.__getattr__(self, name)
        return _run_guarded(self.db, parent, *args, **kwargs)

    method.__name__ = name
    return method


_END = object()


def _guarded_iter(self: Any) -> Iterator[Any]:
    rows = super(type(self), self).__iter__()
    while True:
        row = _run_guarded(self.db, next, rows, _END)
        if row is _END:
            return
        yield row


# A guarded subclass per cursor wrapper class (Django's, or a backend's own).
_guarded_for: dict[type, type] = {}


def _guarded_class(cls: type) -> type:
    guarded = _guarded_for.get(cls)
    if guarded is None:
        body: dict[str, Any] = {name: _guarded_method(name) for name in _GUARDED_METHODS}
        body["__iter__"] = _guarded_iter
        body["__module__"] = __name__
        guarded = type(f"Guarded{cls.__name__}", (cls,), body)
        _guarded_for[cls] = guarded
    return guarded


def _make_guarded(original: Callable[[Any, Any], Any], db: Any, cursor: Any) -> Any:
    wrapped = original(db, cursor)
    wrapped.__class__ = _guarded_class(type(wrapped))
    return wrapped


# Django's database errors (set by the first guard(), importing django.db.utils only then):
# the driver has read the error reply, so the protocol is in step. Until then, nothing is one.
_database_errors: tuple[type[BaseException], ...] = ()


def guard(db: Any) -> None:
    """Guard every cursor this DatabaseWrapper makes from now on; idempotent."""
    global _database_errors
    if not _database_errors:
        from django.db.utils import Error

        _database_errors = (Error,)
    if "make_cursor" in vars(db):
        return
    cls = type(db)
    db.make_cursor = functools.partial(_make_guarded, cls.make_cursor, db)
    db.make_debug_cursor = functools.partial(_make_guarded, cls.make_debug_cursor, db)


def unguard(db: Any) -> None:
    """Undo `guard` (tests)."""
    vars(db).pop("make_cursor", None)
    vars(db).pop("make_debug_cursor", None)


def busy(db: Any) -> bool:
    """Is a cursor operation running on this connection right now (in any thread)?"""
    return bool(getattr(db, "_serverhooks_busy", 0))
