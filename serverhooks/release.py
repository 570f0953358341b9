"""End of a unit of work (a request, a task, a thread's job): give its connections back.

Under a serverhooks pool they go back to the pool; otherwise they are closed, as a
thread that ends would otherwise leave them for the garbage collector. A connection inside
a transaction is never given back or closed: the transaction goes on, on its own session.
"""

from __future__ import annotations

from serverhooks import registry, transactions
from serverhooks._log import describe_error, logger
from serverhooks._process import state
from serverhooks.pool import active as pools

__all__ = ["release_connections"]


def release_connections() -> int:
    """Give back this thread's (or greenlet's) connections; returns how many were released."""
    released = pools.release_current()
    for wrapper in registry.this_thread_wrappers():
        if transactions.in_transaction(wrapper):
            # The caller's transaction is still open (`with releasing():` inside `atomic()`, or
            # with autocommit off): closing would end it behind the caller's back. The next
            # release after the block does.
            continue
        try:
            if registry.close_wrapper(wrapper):
                released += 1
        except Exception as exc:
            state().counters.add("errors", "")
            logger.warning("serverhooks: closing %r failed: %s", wrapper.alias, describe_error(exc))
    return released
