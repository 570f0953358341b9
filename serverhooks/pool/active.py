"""The active pools of this worker, and the one change that makes Django use them.

`activate(waiter, size, timeout)` gives every database alias a pool (serverhooks.pool.core)
and swaps the class of Django's connection handler for a subclass whose `connections[alias]`
checks a connection out of it; `request_finished` (or `release_current()`) checks it back in.
`deactivate()` undoes all of it. Nothing here imports `django.db` before `activate()`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from serverhooks import _internals, conf, sockets, transactions
from serverhooks._log import describe_error, logger, say_once
from serverhooks._process import state
from serverhooks.pool import scope
from serverhooks.pool.core import Pool, Waiter

__all__ = [
    "activate",
    "active_waiter",
    "any_active",
    "deactivate",
    "forget_after_fork",
    "pools",
    "release_between_transactions",
    "release_current",
]


_pools: dict[str, Pool] = {}
_original_handler_class: Any = None


def _pooled_handler_class(base: Any) -> type:
    def __getitem__(self: Any, alias: str) -> Any:
        storage = _internals.connection_storage(self)
        try:
            return getattr(storage, alias)
        except AttributeError:
            pass
        pool = _pools.get(alias)
        if pool is None or asyncio._get_running_loop() is not None:
            # An event loop's thread never ends a request, so it would hold a slot for good;
            # it gets Django's own wrapper, which refuses queries there (SynchronousOnlyOperation).
            return base.__getitem__(self, alias)
        wrapper = pool.checkout()
        setattr(storage, alias, wrapper)
        return wrapper

    return type(f"Pooled{base.__name__}", (base,), {"__getitem__": __getitem__, "__module__": __name__})


def _count_opened(sender: Any, connection: Any, **kwargs: Any) -> None:
    if getattr(connection, "_serverhooks_pool", None) is not None:
        state().counters.add("pool_opened", connection.alias)


def release_current() -> int:
    """Return the current unit of work's pooled connections, except one inside a transaction;
    how many went back."""
    if not _pools:
        return 0
    from django.db import connections

    storage = _internals.connection_storage(connections)
    released = 0
    for alias, pool in _pools.items():
        wrapper = getattr(storage, alias, None)
        if wrapper is None or not pool.holds(wrapper) or transactions.in_transaction(wrapper):
            # In a transaction (`releasing()` inside atomic()): the rest of the block must run
            # on this same session. It goes back once the unit of work is outside the block.
            continue
        delattr(storage, alias)
        pool.checkin(wrapper)
        released += 1
    return released


def release_between_transactions(wrapper: Any) -> None:
    """POOL_SCOPE='transaction' (serverhooks.pool.scope): give back a wrapper the current unit
    of work holds and is done with for now; its next query checks one out again."""
    from django.db import connections

    storage = _internals.connection_storage(connections)
    pool = getattr(wrapper, "_serverhooks_pool", None)
    alias: str = wrapper.alias
    if pool is None or storage is None or getattr(storage, alias, None) is not wrapper:
        return  # not the current unit's: a reference kept from before, which Django refuses anyway
    delattr(storage, alias)
    pool.checkin(wrapper)


def _on_request_finished(**kwargs: Any) -> None:
    try:
        release_current()
    except Exception as exc:  # a release failure must not turn into a failed response
        logger.warning("serverhooks: returning connections to the pool failed: %s", describe_error(exc))


def activate(waiter: Waiter, size: int, timeout: float, *, max_age_zero_reuses: bool = False) -> list[str]:
    """Pool every alias that does not use Django's own pool; returns the pooled aliases."""
    global _original_handler_class
    from django.core.signals import request_finished
    from django.db import connections
    from django.db.backends.signals import connection_created

    if conf.get("CLOSE_INTERRUPTED"):
        transactions.install()  # before any block: `with atomic():` looks its __exit__ up on entry
    if conf.get("POOL_SCOPE") == "transaction":
        scope.install()  # after transactions.install(): it gives back once that exit check is done
    handler: Any = connections
    if _original_handler_class is None:
        _original_handler_class = type(handler)
        handler.__class__ = _pooled_handler_class(_original_handler_class)
    for alias in handler:
        if handler.settings[alias].get("OPTIONS", {}).get("pool"):
            say_once(
                f"django-pool-{alias}",
                logging.INFO,
                "serverhooks: database %r uses Django's own pool (OPTIONS['pool']); serverhooks leaves it alone.",
                alias,
            )
            continue
        _pools.setdefault(alias, Pool(alias, size, timeout, waiter, max_age_zero_reuses=max_age_zero_reuses))
    request_finished.connect(_on_request_finished, dispatch_uid="serverhooks.pool.release")
    connection_created.connect(_count_opened, dispatch_uid="serverhooks.pool.opened")
    return sorted(_pools)


def deactivate() -> None:
    """Undo `activate`: close idle connections, restore Django's handler class and signals."""
    global _original_handler_class
    from django.core.signals import request_finished
    from django.db import connections
    from django.db.backends.signals import connection_created

    for pool in _pools.values():
        pool.close_idle()
    _pools.clear()
    if _original_handler_class is not None:
        handler: Any = connections
        handler.__class__ = _original_handler_class
        _original_handler_class = None
    request_finished.disconnect(dispatch_uid="serverhooks.pool.release")
    connection_created.disconnect(dispatch_uid="serverhooks.pool.opened")


def forget_after_fork() -> None:
    """In a forked child: the pools' sessions were abandoned with the rest; start empty."""
    for alias, pool in list(_pools.items()):
        sockets.keep_forever(pool)
        _pools[alias] = pool.recreate()


def any_active() -> bool:
    return bool(_pools)


def pools() -> list[Pool]:
    """This worker's active pools (serverhooks.metrics reports them)."""
    return list(_pools.values())


def active_waiter() -> Waiter | None:
    """The waiter of the active pools (one kind per process), or None."""
    return next((pool.waiter for pool in _pools.values()), None)
