"""`POOL_SCOPE = "transaction"`: a unit of work holds a pooled session only while it uses it.

Under the request scope (the default) a request keeps what it checked out until it ends: a page
that renders for 20 ms between two 1 ms queries holds its session for 22 ms. Under the
transaction scope it gives the wrapper back as soon as it is between transactions, and checks
one out again at its next query: what PgBouncer's transaction mode does, inside the worker.

"Between transactions" is decided when the last open cursor of the wrapper closes, and nothing
is given back unless all of these hold:
- not connecting (Django runs its own statements then);
- outside every `atomic()` block, in autocommit, and with no transaction open in the driver
  (psycopg's and PyMySQL's own status);
- no session state seen on it: a statement that leaves state in the session pins the wrapper
  to its unit of work until the request ends (the request scope, for that request), with one
  warning. These are session-level `SET`s, `BEGIN`/`START TRANSACTION` by hand, advisory and
  named locks (`pg_advisory_lock`, `GET_LOCK`), `LOCK TABLES`, temporary tables, `LISTEN`,
  `PREPARE`, `DECLARE` and MySQL user variables.

A server-side cursor (`.iterator()` on PostgreSQL) is an open cursor until it is exhausted or
closed, so its session stays with it. A cursor never closed keeps its session to the end of
the request: the request scope again, never less.

What it cannot see, and so what it breaks: code that keeps a wrapper (`connections[alias]`)
across statements outside `atomic()`, expecting the same session for both. The pool takes the
wrapper back between them and marks it nobody's, so the second statement fails loudly
(Django's "can only be used in that same thread") instead of running on a session another
unit may hold. Run such code inside `atomic()`. Django's own ORM looks the wrapper up again
for each query.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from serverhooks._log import describe_error, logger, say_once

__all__ = ["forget_use", "install", "track"]

# Statements that leave state in the session, which the next holder would inherit or which
# the holder itself would lose on another session. Anchored ones start the statement; the
# function calls may appear anywhere in it.
_SESSION_STATE = re.compile(
    r"""
    ^\s*(?:
        SET\s+(?!LOCAL\b|TRANSACTION\b|CONSTRAINTS\b)
      | RESET\b | LISTEN\b | PREPARE\b | DECLARE\b | USE\b | LOAD\b | XA\b
      | BEGIN\b | START\s+TRANSACTION\b
      | LOCK\s+TABLES?\b
      | CREATE\s+(?:GLOBAL\s+|LOCAL\s+)?TEMP(?:ORARY)?\b
    )
    | \bpg_(?:try_)?advisory_lock | \bset_config\s*\( | \bGET_LOCK\s*\(
    | \bINTO\s+@ | @\w+\s*:=
    """,
    re.IGNORECASE | re.VERBOSE,
)

_tracked_classes: dict[type, type] = {}
_installed = False


def install() -> None:
    """Give back at the end of an outermost `atomic()` block too, once the block is done with
    its wrapper (after serverhooks' own exit check, which this wraps). Once per process; the
    wrapper does nothing for wrappers not tracked."""
    global _installed
    if _installed:
        return
    from django.db.transaction import Atomic, get_connection

    inner_exit = Atomic.__exit__

    def __exit__(self: Any, exc_type: Any, exc_value: Any, traceback: Any) -> Any:
        connection = get_connection(self.using)
        result = inner_exit(self, exc_type, exc_value, traceback)
        if exc_type is None and hasattr(connection, "_serverhooks_pinned") and not connection.in_atomic_block:
            _release_if_idle(connection)
        return result

    Atomic.__exit__ = __exit__  # type: ignore[method-assign]
    _installed = True


def track(wrapper: Any) -> None:
    """Make a new pooled wrapper give itself back between transactions."""
    wrapper._serverhooks_open_cursors = 0
    wrapper._serverhooks_pinned = False
    wrapper._serverhooks_connecting = False
    for name in ("make_cursor", "make_debug_cursor"):
        setattr(wrapper, name, _counting(wrapper, getattr(wrapper, name)))
    connect_state = wrapper.init_connection_state

    def init_connection_state() -> None:
        wrapper._serverhooks_connecting = True
        try:
            connect_state()
        finally:
            wrapper._serverhooks_connecting = False

    wrapper.init_connection_state = init_connection_state
    wrapper.execute_wrappers.insert(0, _watch_session_state)


def forget_use(wrapper: Any) -> None:
    """At checkin: a new holder starts with no open cursors and no pin."""
    if hasattr(wrapper, "_serverhooks_pinned"):
        wrapper._serverhooks_open_cursors = 0
        wrapper._serverhooks_pinned = False


def _counting(wrapper: Any, make: Any) -> Any:
    def make_counted_cursor(cursor: Any) -> Any:
        wrapped = make(cursor)
        wrapped.__class__ = _closing_class(type(wrapped))
        wrapper._serverhooks_open_cursors += 1
        return wrapped

    return make_counted_cursor


def _closing_class(base: type) -> type:
    """`base` (Django's CursorWrapper or a backend's subclass), telling its wrapper when it closes."""
    tracked = _tracked_classes.get(base)
    if tracked is None:
        owner: list[Any] = []

        def close(self: Any) -> Any:
            try:
                parent = super(owner[0], self).close
            except AttributeError:  # Django's CursorWrapper serves close() through __getattr__
                parent = base.__getattr__(self, "close")  # type: ignore[attr-defined]
            try:
                return parent()
            finally:
                if not self.__dict__.get("_serverhooks_closed"):
                    self._serverhooks_closed = True  # a cursor may be closed twice (__exit__ after close)
                    _cursor_closed(self.db)

        tracked = _tracked_classes[base] = type(base.__name__, (base,), {"close": close, "__module__": base.__module__})
        owner.append(tracked)
    return tracked


def _cursor_closed(wrapper: Any) -> None:
    wrapper._serverhooks_open_cursors = max(0, wrapper._serverhooks_open_cursors - 1)
    _release_if_idle(wrapper)


def _release_if_idle(wrapper: Any) -> None:
    if wrapper._serverhooks_open_cursors:
        return
    try:
        if _between_transactions(wrapper):
            from serverhooks.pool import active

            active.release_between_transactions(wrapper)
    except Exception as exc:  # keeping the session is always safe; losing the query's result is not
        logger.debug("serverhooks: keeping a pooled %r session: %s", wrapper.alias, describe_error(exc))


def _between_transactions(wrapper: Any) -> bool:
    if wrapper._serverhooks_connecting or wrapper._serverhooks_pinned or wrapper.in_atomic_block:
        return False
    raw = wrapper.connection
    if raw is None:
        return True
    if not wrapper.autocommit:
        return False
    from serverhooks.pool.wrappers import driver_in_transaction  # it imports this module

    return not driver_in_transaction(raw)


def _watch_session_state(execute: Any, sql: Any, params: Any, many: bool, context: dict[str, Any]) -> Any:
    wrapper = context["connection"]
    if not wrapper._serverhooks_pinned and not wrapper._serverhooks_connecting:
        found = _SESSION_STATE.search(sql if isinstance(sql, str) else str(sql))
        if found:
            wrapper._serverhooks_pinned = True
            say_once(
                f"scope-pinned-{wrapper.alias}",
                logging.WARNING,
                "serverhooks: POOL_SCOPE='transaction': a statement that leaves state in the session "
                "(%s...) keeps database %r's connection with its request until the request ends. "
                "Use SET LOCAL / transaction-level locks inside atomic(), or POOL_SCOPE='request'.",
                found.group(0).strip(),  # the keyword only: the statement may carry a password
                wrapper.alias,
            )
    return execute(sql, params, many, context)
