"""Nothing is handed on from an interrupted query, and nothing else is touched.

A query cut short in the client (`gevent.Timeout`, `GreenletExit`, a cancelled task,
`KeyboardInterrupt`, Celery's soft time limit) can leave its session mid-reply: the
server's answer is still on its way, and the next query on that connection would read it
as its own (another request's result) or fail with a protocol error. Django cannot see
this: such exceptions are not database errors, so it neither marks the connection nor
closes it.

So every cursor operation, and every raw commit, rollback, autocommit change and ping, runs
inside a guard. When one ends in an exception that is not a database error, the guard asks
the driver whether the protocol is still in step (serverhooks.protocol, no I/O):

- in step (the exception came before anything was sent: an `execute_wrapper` that refused
  the query, a parameter the driver could not adapt): the connection and the transaction
  are left exactly as plain Django leaves them;
- out of step: the connection is closed. Inside `atomic()` Django then refuses further
  queries in the block, and its outermost level raises `TransactionLost` at its exit even
  if the interrupt was caught (serverhooks.transactions): a transaction is committed as
  written, or fails loudly.

Database errors are left to Django: the driver read the error reply, so the protocol is in
step. The guard also counts operations in flight, so that exit can tell a connection
another thread is using from an idle one (`busy`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from serverhooks import _internals, protocol, transactions
from serverhooks._log import describe_error, logger
from serverhooks.counters import counters

__all__ = ["busy", "drop_interrupted", "guard", "run_guarded", "unguard"]

T = TypeVar("T")

# Django's CursorWrapper: every call that may talk to the server. close() and nextset()
# read what is left of a reply (PyMySQL and mysqlclient drain further result sets).
_CURSOR_METHODS = ("execute", "executemany", "callproc", "fetchone", "fetchmany", "fetchall", "nextset", "close")
# The DatabaseWrapper's own round trips, which no cursor sees: the ones that end a transaction, and a ping.
_ENDING_METHODS: tuple[str, ...] = ("_commit", "_rollback", "_set_autocommit")
_WRAPPER_METHODS: tuple[str, ...] = (*_ENDING_METHODS, "is_usable")


def run_guarded(db: Any, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`call(*args, **kwargs)` on `db`'s session, closing the session if an interrupt left it out of step."""
    return _run(db, False, call, args, kwargs)


def _run(db: Any, ends_transaction: bool, call: Callable[..., T], args: Any, kwargs: Any) -> T:
    db._serverhooks_busy = getattr(db, "_serverhooks_busy", 0) + 1
    try:
        return call(*args, **kwargs)
    except BaseException as exc:
        # Database errors (Django's, or the driver's own where Django does not wrap the
        # call): the driver read the error reply, so the protocol is in step.
        if not isinstance(exc, _database_errors) and not isinstance(exc, db.Database.Error):
            raw = db.connection
            if raw is not None and not db.closed_in_transaction and protocol.out_of_step(raw):
                drop_interrupted(db, exc, ends_transaction=ends_transaction)
        raise
    finally:
        db._serverhooks_busy -= 1


def _guarded_end(db: Any, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """A COMMIT, ROLLBACK or autocommit change: cut short, it ends the transaction anyway (the
    interrupt says so); whether the server committed is the server's to say."""
    return _run(db, True, call, args, kwargs)


def drop_interrupted(db: Any, exc: BaseException, *, ends_transaction: bool = False) -> None:
    """Close `db`'s session, which `exc` left out of step; inside a transaction, mark it lost.

    `ends_transaction`: `exc` cut short the COMMIT, ROLLBACK or autocommit change that ends
    it, and reaches the code that asked for that: nothing is left to mark.
    """
    counters().add("closed_interrupted", db.alias)
    reason = f"a query was cut short by {describe_error(exc)}"
    in_block = bool(db.in_atomic_block)
    # autocommit off, outside atomic(): a transaction the code manages by hand
    by_hand = not in_block and not ends_transaction and transactions.in_transaction(db)
    if in_block:
        transactions.mark_lost(db, reason)
    logger.log(
        logging.WARNING if in_block or by_hand else logging.DEBUG,
        "serverhooks: closing %r: %s, and its reply may still be on the way%s",
        db.alias,
        reason,
        "; the open transaction is rolled back: its atomic() block raises TransactionLost at its exit"
        if in_block
        else "; the open transaction is rolled back: its next query or commit() raises TransactionLost"
        if by_hand
        else "",
    )
    try:
        db.close()
    except BaseException as close_error:  # the session is in an unknown state: drop it regardless
        logger.debug("serverhooks: closing an interrupted connection: %s", describe_error(close_error))
    if not db.in_atomic_block:
        db.connection = None
        if by_hand:
            transactions.stand_in_for_lost_session(db, reason)


def _guarded_method(name: str, owner: list[type]) -> Callable[..., Any]:
    # `owner` holds the guarded class once made: not type(self), which a subclass of it
    # (serverhooks.pool.scope's) would turn into endless recursion through super().
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        guarded = owner[0]
        try:
            parent = getattr(super(guarded, self), name)
        except AttributeError:
            # Django's CursorWrapper serves fetch*() and close() through __getattr__, which super() does not consult.
            base: Any = guarded.__mro__[1]
            parent = base.__getattr__(self, name)
        return run_guarded(self.db, parent, *args, **kwargs)

    method.__name__ = name
    return method


_END = object()


def _guarded_iter(owner: list[type]) -> Callable[[Any], Iterator[Any]]:
    def __iter__(self: Any) -> Iterator[Any]:
        guarded: Any = owner[0]
        rows = super(guarded, self).__iter__()
        while True:
            row = run_guarded(self.db, next, rows, _END)
            if row is _END:
                return
            yield row

    return __iter__


# A guarded subclass per cursor wrapper class (Django's, or a backend's own).
_guarded_for: dict[type, type] = {}


def _guarded_class(cls: type) -> type:
    guarded = _guarded_for.get(cls)
    if guarded is None:
        owner: list[type] = []
        body: dict[str, Any] = {name: _guarded_method(name, owner) for name in _CURSOR_METHODS}
        body["__iter__"] = _guarded_iter(owner)
        body["__module__"] = __name__
        guarded = type(f"Guarded{cls.__name__}", (cls,), body)
        owner.append(guarded)
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
    """Guard every cursor this DatabaseWrapper makes from now on, and its own round trips; idempotent."""
    global _database_errors
    if not _database_errors:
        from django.db.utils import Error

        _database_errors = (Error,)
    if "make_cursor" in vars(db):
        return
    transactions.install()
    if db.vendor == "mysql":
        _internals.track_pymysql_replies()  # only where PyMySQL is loaded: mysqlclient needs nothing
    cls = type(db)
    db.make_cursor = functools.partial(_make_guarded, cls.make_cursor, db)
    db.make_debug_cursor = functools.partial(_make_guarded, cls.make_debug_cursor, db)
    for name in _WRAPPER_METHODS:
        own = getattr(cls, name, None)
        if own is not None:
            runner = _guarded_end if name in _ENDING_METHODS else run_guarded
            setattr(db, name, functools.partial(runner, db, functools.partial(own, db)))


def unguard(db: Any) -> None:
    """Undo `guard` (tests)."""
    for name in ("make_cursor", "make_debug_cursor", *_WRAPPER_METHODS):
        vars(db).pop(name, None)


def busy(db: Any) -> bool:
    """Is a cursor operation running on this connection right now (in any thread)?"""
    return bool(getattr(db, "_serverhooks_busy", 0))
