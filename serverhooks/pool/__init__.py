"""serverhooks' bounded connection pool: one core, several ways to wait.

`core` lends whole Django connections per database alias, bounded, clean on return,
checked on checkout. A *waiter* says what "the current unit of work" is and how to wait
for a free slot: `serverhooks.pool.gevent` for greenlets. Importing this package imports
neither gevent nor `django.db`; `serverhooks.pool.PoolTimeout` (Django's OperationalError
underneath) loads `django.db.utils` when first asked for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from serverhooks.pool.errors import PoolTimeout

__all__ = ["PoolTimeout"]


def __getattr__(name: str) -> Any:
    if name == "PoolTimeout":
        from serverhooks.pool.errors import PoolTimeout

        return PoolTimeout
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
