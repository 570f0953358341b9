"""Names no other client can reach: server-side cursors and prepared statements behind a pooler.

Behind a transaction pooler (PgBouncer in transaction mode), many clients take turns on the
same server sessions, and each statement outside a transaction may land on another one. A
WITH HOLD cursor or a prepared statement lives on in the session it was made in. Django names
its cursors `_django_curs_<thread ident>_<task>_<counter>`, and every forked worker's main
thread has the same ident; psycopg 3 names statements `_pg3_<counter>`, per connection. So two
clients make the same name on two sessions, and a FETCH or a Bind that lands on the other
session reads the other client's rows, with no error at all.

Here each name gets a part no other client has: a random token per process (made anew in a
forked child; a pid alone repeats across containers and hosts) for Django's cursors, a random
token per connection for psycopg's statements. A statement that lands on the wrong session
then fails loudly ("does not exist"), and the error names the settings that make it work.
Django's defaults (DISABLE_SERVER_SIDE_CURSORS aside, client-side binding without
prepare_threshold) prepare nothing, and are left as they are.
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import sys
from typing import Any

from serverhooks import _imports, _internals
from serverhooks._log import say_once

__all__ = [
    "explain",
    "forget_process",
    "install",
    "prepare_process",
    "process_token",
    "set_enabled",
    "statement_prefix",
    "uninstall",
    "unique_cursor_name",
]

CURSOR_PREFIX = "_django_curs_"
STATEMENT_PREFIX = b"_pg3_"
_MAX_NAME = 63  # PostgreSQL truncates longer identifiers (NAMEDATALEN - 1)

CURSOR_FIX = (
    "a server-side cursor (.iterator()) moved to another server session: behind a transaction pooler "
    "(PgBouncer in transaction mode) set DISABLE_SERVER_SIDE_CURSORS = True for this database"
)
STATEMENT_FIX = (
    "a prepared statement ran on another server session: behind a transaction pooler set OPTIONS "
    '"prepare_threshold" to None (Django\'s default), or use PgBouncer 1.21+ with max_prepared_statements'
)

_enabled = True
_token: tuple[int, str] = (-1, "")
_serial = itertools.count(1)


def _after_fork_in_child() -> None:
    global _token, _serial
    _token, _serial = (-1, ""), itertools.count(1)


os.register_at_fork(after_in_child=lambda: _after_fork_in_child())


def process_token() -> str:
    """This process's random token: 12 hex digits, new in every process (forks included)."""
    global _token
    pid = os.getpid()
    if _token[0] != pid:  # the fork hook resets it too; this also covers a hook that never ran
        _token = (pid, secrets.token_hex(6))
    return _token[1]


def unique_cursor_name(name: str) -> str:
    """Django's cursor name with this process's token and a per-process serial in front of its
    own parts (thread ident, task, counter): unique across processes, threads and hosts."""
    if not name.startswith(CURSOR_PREFIX):
        return name
    unique = f"{CURSOR_PREFIX}{process_token()}_{next(_serial)}"
    longer = f"{unique}_{name[len(CURSOR_PREFIX) :]}"
    return longer if len(longer) <= _MAX_NAME else unique


def set_enabled(enabled: bool) -> None:
    """Turn the renaming on or off for connections made from now on (the tests' control arm)."""
    global _enabled
    _enabled = enabled


def install(wrapper: Any) -> None:
    """Give a PostgreSQL DatabaseWrapper unique cursor names, its psycopg 3 connection unique
    statement names (only when it prepares), and errors that name the fix. Idempotent."""
    if not _enabled or getattr(wrapper, "vendor", None) != "postgresql":
        return
    if "create_cursor" not in vars(wrapper):
        original = type(wrapper).create_cursor

        def create_cursor(name: str | None = None) -> Any:
            return original(wrapper, unique_cursor_name(name) if name else name)

        wrapper.create_cursor = create_cursor
        wrapper.wrap_database_errors = _explaining_errors(wrapper)
    raw = wrapper.connection
    if raw is not None and getattr(raw, "prepare_threshold", None) is not None:
        # From now on for every psycopg 3 connection of the process: the next one's own setup too.
        _internals.prefix_psycopg_statement_names(statement_prefix)
        _internals.forget_unprefixed_statements(raw)


_waiting_for_psycopg: _imports.AfterImport | None = None


def prepare_process() -> None:
    """Name psycopg 3's prepared statements uniquely from now on: before this process's first
    connection, whose own setup (Django's time zone) may prepare a statement already. If psycopg
    is not loaded yet, as soon as it is (importing it here would bind its waiting functions before
    gevent patches them)."""
    global _waiting_for_psycopg
    if not _enabled or _internals.prefix_psycopg_statement_names(statement_prefix):
        return
    if _waiting_for_psycopg is None and "psycopg._preparing" not in sys.modules:
        _waiting_for_psycopg = _imports.after_import(
            "psycopg._preparing", _prefix_once_psycopg_is_imported, "naming prepared statements"
        )


def _prefix_once_psycopg_is_imported() -> None:
    global _waiting_for_psycopg
    _waiting_for_psycopg = None
    _internals.prefix_psycopg_statement_names(statement_prefix)


def forget_process() -> None:
    """Undo `prepare_process`: psycopg's own names for statements prepared from now on."""
    global _waiting_for_psycopg
    finder, _waiting_for_psycopg = _waiting_for_psycopg, None
    _imports.cancel(finder)
    _internals.unprefix_psycopg_statement_names()


def statement_prefix() -> bytes:
    """A new connection's prefix for its prepared statements' names: random, its own."""
    return STATEMENT_PREFIX + secrets.token_hex(6).encode() + b"_"


def uninstall(wrapper: Any) -> None:
    """Undo `install` (tests)."""
    for name in ("create_cursor", "wrap_database_errors"):
        vars(wrapper).pop(name, None)
    _internals.unprefix_psycopg_statement_names()


def explain(exc: BaseException) -> str | None:
    """The fix for a database error a pooler caused with a cursor's or a statement's name, or None."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:  # Django's error wraps the driver's
        seen.add(id(current))
        code = getattr(current, "sqlstate", None) or getattr(current, "pgcode", None)
        text = str(current)
        # 34000 invalid_cursor_name, 42P03 duplicate_cursor; 26000 invalid_sql_statement_name,
        # 42P05 duplicate_prepared_statement
        if code in {"34000", "42P03"} and CURSOR_PREFIX in text:
            return CURSOR_FIX
        if code in {"26000", "42P05"} and STATEMENT_PREFIX.decode() in text:
            return STATEMENT_FIX
        current = current.__cause__ or current.__context__
    return None


def _explaining_errors(wrapper: Any) -> Any:
    from django.db.utils import DatabaseErrorWrapper

    class ExplainingErrorWrapper(DatabaseErrorWrapper):
        """Django's own error translation, plus a note that names the fix (the type is unchanged)."""

        def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
            try:
                super().__exit__(exc_type, exc_value, traceback)
            except Exception as raised:
                fix = explain(raised)
                if fix is not None and fix not in getattr(raised, "__notes__", ()):
                    raised.add_note(f"serverhooks: {fix}")
                    say_once(f"cursornames-{fix[:20]}", logging.WARNING, "serverhooks: %s", fix)
                raise

    return ExplainingErrorWrapper(wrapper)
