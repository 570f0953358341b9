"""A transaction serverhooks had to cut short fails loudly, at the exit of its outermost block.

When a query inside `atomic()` is interrupted with its reply still on the way, the session
cannot be used again and is closed (serverhooks.cursorguard). Django then refuses further
queries in the block. But code that caught the interrupt (Celery's docs recommend catching
`SoftTimeLimitExceeded`; a `gevent.Timeout` used as a deadline) reaches the end of the block
without an exception, and Django, seeing the connection closed in the transaction, neither
commits nor raises: the view returns 200 and its writes are gone.

So serverhooks wraps `Atomic.__exit__`: the outermost block of a transaction whose session
serverhooks dropped raises `TransactionLost` (an `OperationalError`) when no other exception
is already on its way out. Its message says what cut the transaction short.

A transaction managed by hand (`set_autocommit(False)`, outside atomic()) has no block to
raise at. There Django would reconnect at the next query, in autocommit, and `commit()`
would do nothing: the writes before the interrupt gone, those after it committed one by
one. So the closed session is replaced by a `LostSession`: every query and `commit()` raise
`TransactionLost` until the code rolls back (or the connection is closed).

`TransactionLost` is made on first use: defining it imports `django.db`, which a server's
master must not do at import (see serverhooks._django).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # at run time the class is made on first use (see _transaction_lost)
    from django.db.utils import OperationalError

    class TransactionLost(OperationalError):
        """serverhooks closed this transaction's session: none of its writes were committed."""


__all__ = [
    "LostSession",
    "TransactionLost",
    "forget_lost",
    "in_transaction",
    "install",
    "mark_lost",
    "stand_in_for_lost_session",
    "uninstall",
]

_LOST = "_serverhooks_lost"
_install_lock = threading.Lock()
_original_exit: Callable[..., Any] | None = None
_lost_class: type[Exception] | None = None


def _transaction_lost() -> type[Exception]:
    global _lost_class
    if _lost_class is None:
        from django.db.utils import OperationalError

        class TransactionLost(OperationalError):
            """serverhooks closed this transaction's session (a query on it was cut short):
            the server rolled it back, and none of its writes were committed."""

        TransactionLost.__module__ = __name__
        _lost_class = TransactionLost
    return _lost_class


def __getattr__(name: str) -> Any:
    if name == "TransactionLost":
        return _transaction_lost()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def in_transaction(wrapper: Any) -> bool:
    """Is this connection inside a transaction: an atomic() block, or autocommit turned off by hand?

    Read from Django's own flags, so from any thread: no round trip, and no connect
    (`get_autocommit()` would). With `AUTOCOMMIT: False` in the settings every connection is
    always in one; there only atomic() blocks count, as at a request's end in Django.
    """
    if wrapper.in_atomic_block:
        return True
    return wrapper.connection is not None and wrapper.autocommit != wrapper.settings_dict["AUTOCOMMIT"]


def mark_lost(wrapper: Any, reason: str) -> None:
    """Say why `wrapper`'s open transaction was lost: its outermost block raises with `reason`."""
    vars(wrapper).setdefault(_LOST, reason)


def forget_lost(wrapper: Any) -> str | None:
    """Drop the mark (the block ended, or the wrapper is being reset); returns the reason, if any."""
    reason: str | None = vars(wrapper).pop(_LOST, None)
    return reason


class LostSession:
    """Stands in for the DB-API connection of a hand-managed transaction serverhooks closed.

    Django calls it as it calls a driver's connection. Anything that would go on with the
    transaction (a cursor, `commit()`, turning autocommit back on) raises `TransactionLost`;
    `rollback()` and `close()` end it, and the next query opens a new session.
    """

    _wrapper: Any
    _reason: str

    def __init__(self, wrapper: Any, reason: str) -> None:
        object.__setattr__(self, "_wrapper", wrapper)
        object.__setattr__(self, "_reason", reason)

    def _lost(self) -> Exception:
        return _transaction_lost()(
            f"serverhooks: the transaction on database {self._wrapper.alias!r} (autocommit off) was rolled "
            f"back and none of its writes were committed: {self._reason}, so serverhooks closed its session. "
            "Roll back (transaction.rollback()) and retry it."
        )

    def cursor(self, *args: Any, **kwargs: Any) -> Any:
        raise self._lost()

    def commit(self) -> None:
        raise self._lost()

    def autocommit(self, *args: Any) -> None:  # MySQL's drivers switch autocommit with a call
        raise self._lost()

    def rollback(self) -> None:
        self._end()

    def close(self) -> None:
        self._end()

    def _end(self) -> None:
        if self._wrapper.connection is self:
            self._wrapper.connection = None

    def __setattr__(self, name: str, value: Any) -> None:  # psycopg's and SQLite's autocommit
        raise self._lost()


def stand_in_for_lost_session(wrapper: Any, reason: str) -> None:
    """After a hand-managed transaction's session was closed: make its next use fail loudly."""
    wrapper.connection = LostSession(wrapper, reason)


def _exit_raising_if_lost(self: Any, exc_type: Any, exc_value: Any, traceback: Any) -> Any:
    from django.db.transaction import get_connection

    assert _original_exit is not None
    connection = get_connection(self.using)
    try:
        result = _original_exit(self, exc_type, exc_value, traceback)
    except BaseException:
        if not connection.atomic_blocks:
            forget_lost(connection)
        raise
    if connection.atomic_blocks:  # an inner block: the outermost one decides
        return result
    reason = forget_lost(connection)
    if reason is not None and exc_type is None:
        raise _transaction_lost()(
            f"serverhooks: this transaction on database {connection.alias!r} was rolled back and none of "
            f"its writes were committed: {reason}, so serverhooks closed its session (a reply could still "
            "have been on its way). Let the interrupt propagate out of the atomic() block, or retry the block."
        )
    return result


def install() -> None:
    """Wrap `Atomic.__exit__` (once per process tree; a forked child inherits the class)."""
    global _original_exit
    with _install_lock:
        if _original_exit is not None:
            return
        from django.db.transaction import Atomic

        _original_exit = Atomic.__exit__
        Atomic.__exit__ = _exit_raising_if_lost  # type: ignore[method-assign]


def uninstall() -> None:
    """Put Django's `Atomic.__exit__` back (tests)."""
    global _original_exit
    with _install_lock:
        if _original_exit is None:
            return
        from django.db.transaction import Atomic

        Atomic.__exit__ = _original_exit  # type: ignore[method-assign]
        _original_exit = None
