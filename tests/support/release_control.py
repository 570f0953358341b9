"""The release tests' control arm: the pools' release as it was before issue 20.

`release_current()` checked every pooled connection of the unit back in, also one inside an
open atomic() block: the pool rolled that transaction back, and the block's next query
checked out another connection, in autocommit. Imported by a test process or a server's
master (RELEASE_CONTROL), so every worker inherits the change.
"""

from __future__ import annotations

from typing import Any

from serverhooks import _internals
from serverhooks.pool import active


def release_current() -> int:
    if not active._pools:
        return 0
    from django.db import connections

    storage = _internals.connection_storage(connections)
    released = 0
    for alias, pool in active._pools.items():
        wrapper: Any = getattr(storage, alias, None)
        if wrapper is not None and pool.holds(wrapper):
            delattr(storage, alias)
            pool.checkin(wrapper)
            released += 1
    return released


active.release_current = release_current
