"""Every private attribute of another project that serverhooks reads or sets, in one place.

Django, asgiref, psycopg, psycopg_pool, redis-py and PyMySQL give no public way to do
what a fork or a greenlet needs here: find a connection of another thread, replace the
storage of connections built before gevent patched threading, reach the sockets of a
pool or a cache client. Each access below is named after what it gets, and
tests/unit/test_internals.py checks it against the versions serverhooks supports.

When a release moves one of them, the accessor says so once, at WARNING, naming what
is missing and what serverhooks then skips, and returns its "nothing there" value:
never an AttributeError inside a server's hook.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

from serverhooks._log import say_once

__all__ = [
    "cache_client_pools",
    "connection_storage",
    "forget_unprefixed_statements",
    "local_storage",
    "pool_idle_connections",
    "postgres_pools",
    "prefix_psycopg_statement_names",
    "pymysql_reply_pending",
    "pymysql_socket",
    "replace_connection_storage",
    "run_after_dirty_worker_cleanup",
    "set_thread_ident",
    "thread_ident",
    "track_pymysql_replies",
    "unprefix_psycopg_statement_names",
    "untrack_pymysql_replies",
    "use_psycopg_poll_wait",
]

_MISSING = object()


def _get(owner: Any, name: str, where: str, skipped: str) -> Any:
    value = getattr(owner, name, _MISSING)
    if value is _MISSING:
        say_once(
            f"internals-{where}.{name}",
            logging.WARNING,
            "serverhooks: %s.%s is not there in this version; serverhooks skips %s. Please report it, "
            "with the versions in use.",
            where,
            name,
            skipped,
        )
        return None
    return value


# --------------------------------------------------------------------------- Django


def connection_storage(handler: Any) -> Any:
    """A Django connection handler's per-thread storage (`_connections`: an asgiref Local)."""
    return _get(handler, "_connections", "django ConnectionHandler", "resetting its storage")


def replace_connection_storage(handler: Any, storage: Any) -> Any:
    """Give a handler (of databases or caches) a new storage; returns the old one, or None."""
    old = connection_storage(handler)
    if old is not None:
        handler._connections = storage
    return old


def thread_ident(wrapper: Any) -> int | None:
    """The thread (or greenlet) a DatabaseWrapper belongs to (`_thread_ident`)."""
    value = _get(wrapper, "_thread_ident", "django DatabaseWrapper", "its thread check")
    return value if isinstance(value, int) else None


def set_thread_ident(wrapper: Any, ident: int) -> None:
    """Hand a DatabaseWrapper to another thread or greenlet (Django refuses cross-thread use).

    Runs at every pool checkout and checkin: the common case is one attribute test."""
    if isinstance(getattr(wrapper, "_thread_ident", None), int):
        wrapper._thread_ident = ident
    else:
        thread_ident(wrapper)  # says once that it is missing


def postgres_pools() -> dict[Any, Any]:
    """Django 5.1+'s class-level PostgreSQL pools (`_connection_pools`), or {}.

    Keyed by alias on PostgreSQL (Oracle keys by (alias, user)): callers never assume the
    key's shape. A pending Django fix clears it in forked children: an empty dict is normal.
    """
    base = sys.modules.get("django.db.backends.postgresql.base")
    wrapper_class = getattr(base, "DatabaseWrapper", None)
    if wrapper_class is None:
        return {}
    pools = getattr(wrapper_class, "_connection_pools", None)  # absent before Django 5.1
    return pools if isinstance(pools, dict) else {}


# --------------------------------------------------------------------------- asgiref


def local_storage(local: Any) -> Any:
    """What an asgiref Local stores into (`_storage`): a threading.local, or gevent's once patched."""
    return _get(local, "_storage", "asgiref Local", "the check of Django's connection storage under gevent")


# --------------------------------------------------------------------------- psycopg, psycopg_pool


def pool_idle_connections(pool: Any) -> list[Any]:
    """The idle connections a psycopg_pool ConnectionPool holds (`_pool`, a deque)."""
    idle = _get(pool, "_pool", "psycopg_pool ConnectionPool", "its idle connections after fork")
    return list(idle) if idle is not None else []


def use_psycopg_poll_wait(waiting: Any) -> Callable[[], None] | None:
    """psycopg 3 picked its blocking C wait at import (before gevent patched): use the poll one.

    Returns the undo, or None when there was nothing to change.
    """
    wait_c = getattr(waiting, "wait_c", None)
    if wait_c is None or waiting.wait is not wait_c:
        return None
    ready_poll = _get(waiting, "_ready_poll", "psycopg.waiting", "making psycopg 3 cooperative")
    if ready_poll is None:
        return None
    original_wait, original_ready = waiting.wait, getattr(waiting, "_ready", None)
    waiting.wait, waiting._ready = waiting.wait_poll, ready_poll

    def undo() -> None:
        waiting.wait, waiting._ready = original_wait, original_ready

    return undo


_psycopg_get: list[Callable[..., Any]] = []


def prefix_psycopg_statement_names(make_prefix: Callable[[], bytes]) -> bool:
    """Name psycopg 3's prepared statements `<prefix><n>` instead of `_pg3_<n>`, with a prefix of
    each connection's own (`make_prefix()`, asked once per connection). Idempotent.

    psycopg names them in PrepareManager.get (one manager per connection, `_prepared`), which
    returns (Prepare.SHOULD, name) only when a statement is to be prepared: that name is the one
    prepared, cached and bound later. Wrapped on the class, so that a connection's statements
    prepared while Django sets it up are covered too; a connection that prepares nothing
    (prepare_threshold None, Django's default) never reaches the renaming.
    """
    module = sys.modules.get("psycopg._preparing")
    manager_class = getattr(module, "PrepareManager", None)
    if manager_class is None:
        return False
    if _psycopg_get:
        return True
    get = _get(manager_class, "get", "psycopg PrepareManager", "unique prepared statement names")
    if get is None:
        return False

    def get_prefixed(self: Any, *args: Any, **kwargs: Any) -> Any:
        prep, name = get(self, *args, **kwargs)
        if name.startswith(b"_pg3_"):
            prefix = vars(self).get("_serverhooks_prefix")
            if prefix is None:
                prefix = self._serverhooks_prefix = make_prefix()
            if not name.startswith(prefix):
                name = prefix + name[len(b"_pg3_") :]
        return prep, name

    manager_class.get = get_prefixed
    _psycopg_get.append(get)
    return True


def forget_unprefixed_statements(raw: Any, prefix: bytes = b"_pg3_") -> int:
    """Make a psycopg 3 connection prepare again, under new names, the statements it prepared
    before `prefix_psycopg_statement_names` (its `_prepared._names`); they stay unused on the server."""
    manager = _get(raw, "_prepared", "psycopg Connection", "renaming statements prepared earlier")
    names = getattr(manager, "_names", None)
    if names is None:
        return 0
    own = vars(manager).get("_serverhooks_prefix", b"")
    stale = [key for key, name in names.items() if name.startswith(prefix) and not (own and name.startswith(own))]
    for key in stale:
        names.pop(key, None)
    return len(stale)


def unprefix_psycopg_statement_names() -> None:
    """Undo `prefix_psycopg_statement_names` (tests)."""
    manager_class = getattr(sys.modules.get("psycopg._preparing"), "PrepareManager", None)
    if manager_class is not None and _psycopg_get:
        manager_class.get = _psycopg_get.pop()


# --------------------------------------------------------------------------- Gunicorn


def run_after_dirty_worker_cleanup(worker: Any, step: Callable[[], None]) -> bool:
    """Run `step` when a Gunicorn dirty worker cleans up on its way out (`_cleanup`, after its
    apps closed): it leaves with os._exit, so no hook or atexit handler runs after that."""
    cleanup = _get(worker, "_cleanup", "gunicorn DirtyWorker", "closing its connections at exit")
    if cleanup is None:
        return False

    def cleanup_then_step() -> None:
        try:
            cleanup()
        finally:
            step()

    worker._cleanup = cleanup_then_step
    return True


# --------------------------------------------------------------------------- redis, PyMySQL


def cache_client_pools(cache: Any) -> list[Any]:
    """The connection pools of Django's RedisCache client, if the client was ever created.

    RedisCache.close() is a no-op, so its pools keep their sockets open; the client is a
    cached property (`_cache`) holding them (`_pools`).
    """
    client = vars(cache).get("_cache")
    if client is None:
        return []
    pools = _get(client, "_pools", "django RedisCacheClient", "closing its pools before fork")
    return list(pools.values()) if isinstance(pools, dict) else []


def pymysql_socket(raw: Any) -> Any:
    """A PyMySQL connection's socket (`_sock`), None once closed."""
    return getattr(raw, "_sock", None)


_PYMYSQL_REPLIED = "_serverhooks_replied"
_pymysql_originals: dict[str, Callable[..., Any]] = {}


def track_pymysql_replies() -> None:
    """Note on every PyMySQL connection whether the last command's reply was read in full.

    PyMySQL keeps no such flag: its current result (`_result`) is None both while a reply is
    on its way and after any command that answers with a bare OK (COMMIT, SET AUTOCOMMIT, a
    ping). So its sender (`_execute_command`) and its two readers of a whole reply
    (`_read_query_result`, `_read_ok_packet`: every command Django sends ends in one) are
    wrapped, on the class, once: an attribute write per command, nothing else changes.
    """
    if _pymysql_originals:
        return
    module = sys.modules.get("pymysql.connections")
    cls = getattr(module, "Connection", None)
    if cls is None:
        return
    names = ("_execute_command", "_read_query_result", "_read_ok_packet")
    originals = {
        name: _get(cls, name, "pymysql Connection", "telling a query cut short from one never sent") for name in names
    }
    if any(original is None for original in originals.values()):
        return
    send, read_result, read_ok = (originals[name] for name in names)
    # An error reply ends a reply too. (A lost connection is an error as well, but PyMySQL has
    # then dropped its socket, which pymysql_socket() shows.)
    server_error: type[BaseException] = getattr(sys.modules.get("pymysql.err"), "MySQLError", Exception)

    def _execute_command(self: Any, *args: Any, **kwargs: Any) -> Any:
        setattr(self, _PYMYSQL_REPLIED, False)
        return send(self, *args, **kwargs)

    def _read_query_result(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            affected = read_result(self, *args, **kwargs)
        except server_error:
            setattr(self, _PYMYSQL_REPLIED, True)
            raise
        setattr(self, _PYMYSQL_REPLIED, True)
        return affected

    def _read_ok_packet(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            ok = read_ok(self, *args, **kwargs)
        except server_error:
            setattr(self, _PYMYSQL_REPLIED, True)
            raise
        setattr(self, _PYMYSQL_REPLIED, True)
        return ok

    for name, replacement in zip(names, (_execute_command, _read_query_result, _read_ok_packet), strict=True):
        setattr(cls, name, replacement)
    _pymysql_originals.update(originals)


def untrack_pymysql_replies() -> None:
    """Undo `track_pymysql_replies` (tests)."""
    cls = getattr(sys.modules.get("pymysql.connections"), "Connection", None)
    if cls is not None:
        for name, original in _pymysql_originals.items():
            setattr(cls, name, original)
    _pymysql_originals.clear()


def pymysql_reply_pending(raw: Any) -> bool:
    """Has a PyMySQL connection sent a command whose reply it has not read in full?

    Where `track_pymysql_replies` did not see the connection's last command, PyMySQL's own
    state answers on the safe side: a reply may be pending whenever there is no current
    result. An unbuffered result still streaming (`unbuffered_active`) is pending too.
    """
    result = getattr(raw, "_result", _MISSING)
    if result is _MISSING:
        _get(raw, "_result", "pymysql Connection", "telling a query cut short from one never sent")
        return True
    if result is not None and getattr(result, "unbuffered_active", False):
        return True
    replied = getattr(raw, _PYMYSQL_REPLIED, None)
    return result is None if replied is None else not replied
