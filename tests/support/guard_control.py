"""The guard tests' control arm: serverhooks' cursor guard as it was before issue 20.

It closed the connection on any exception that was not a database error, without asking the
driver whether anything had been sent; the atomic() block whose session it closed exited
without a word, and a transaction managed by hand (autocommit off) went on in autocommit on
a new session, after an interrupt as after the idle-session check closed its ended session.
Imported by a test process (GUARD_CONTROL=1) or a server's master, so every worker inherits
the change. Nothing else is switched off.
"""

from __future__ import annotations

import types
from typing import Any

from serverhooks import cursorguard, health, protocol, transactions


def _always_out_of_step(raw: Any) -> bool:
    return True


def _not_marked(wrapper: Any, reason: str) -> None:
    return None


def _no_stand_in(wrapper: Any, reason: str) -> None:
    return None


protocol.out_of_step = _always_out_of_step
transactions.mark_lost = _not_marked
transactions.stand_in_for_lost_session = _no_stand_in
cursorguard._WRAPPER_METHODS = ()  # commits, rollbacks, autocommit changes and pings went unguarded
# The idle-session check spared atomic() blocks only, not a transaction managed by hand.
health.transactions = types.SimpleNamespace(  # type: ignore[attr-defined,assignment]
    in_transaction=lambda wrapper: bool(wrapper.in_atomic_block)
)
