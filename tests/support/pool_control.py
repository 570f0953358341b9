"""The pool stress tests' control arm: the pool's bookkeeping of who holds what as it was before
issue 20 (commit ac641db), put back onto today's Pool. Imported by a test process (POOL_CONTROL=1).

Then: holdings keyed by `id(unit)` and read and changed outside the pool's lock; a checkin that
always frees a slot, held or not; threads that cannot say when they end, so that one not
started by `threading` (whose `is_alive()` never turns False) keeps its slot for good. The
invariant checks of today's pool stay on where they still run (a wrapper handed out is not
held or idle elsewhere), so the control can show what they catch.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

from serverhooks._process import state
from serverhooks.pool import core, threads


@dataclass
class _Holding:
    unit: weakref.ref[Any]
    wrappers: list[Any]


def _holdings(pool: Any) -> dict[int, _Holding]:
    found: dict[int, _Holding] | None = vars(pool).get("_holdings")
    if found is None:
        found = pool._holdings = {}
    return found


def _hold(self: Any, wrapper: Any) -> None:
    if core.invariant_checks:
        with self._lock:
            self._check_free_locked(wrapper)
    unit = self.waiter.current()
    holdings = _holdings(self)
    holding = holdings.get(id(unit))
    if holding is not None and holding.unit() is not unit:
        _reclaim(self, id(unit))
        holding = None
    if holding is None:
        holding = holdings[id(unit)] = _Holding(weakref.ref(unit), [])
    holding.wrappers.append(wrapper)
    self._holders[id(unit)] = holding.wrappers  # so that today's invariant checks see them
    linked = vars(self).setdefault("_linked", weakref.WeakSet())
    if unit not in linked and self.waiter.on_death(unit, self._on_unit_death):
        linked.add(unit)


def _unhold(self: Any, wrapper: Any) -> bool:
    key = id(self.waiter.current())
    holding = _holdings(self).get(key)
    if holding is not None and wrapper in holding.wrappers:
        holding.wrappers.remove(wrapper)
        if not holding.wrappers:
            del _holdings(self)[key]
            self._holders.pop(key, None)
    return True  # the old checkin freed a slot whatever it found


def _on_unit_death(self: Any, unit: Any) -> None:
    holding = _holdings(self).get(id(unit))
    if holding is not None and holding.unit() in (unit, None):
        _reclaim(self, id(unit))


def _reclaim_from_dead_units(self: Any) -> None:
    for key, holding in list(_holdings(self).items()):
        unit = holding.unit()
        if unit is None or self.waiter.is_dead(unit):
            _reclaim(self, key)


def _reclaim(self: Any, key: int) -> None:
    holding = _holdings(self).pop(key, None)
    if holding is None:
        return
    self._holders.pop(key, None)
    for wrapper in holding.wrappers:
        with self._lock:
            self._reclaimed.append(wrapper)
        state().counters.add("pool_reclaimed", self.alias)
        self._slots.release()


def _cannot_tell(self: Any, unit: Any, callback: Any) -> bool:
    return False


core.Pool._hold = _hold  # type: ignore[method-assign]
core.Pool._unhold = _unhold  # type: ignore[method-assign]
core.Pool._on_unit_death = _on_unit_death  # type: ignore[method-assign]
core.Pool._reclaim_from_dead_units = _reclaim_from_dead_units  # type: ignore[method-assign]
threads.ThreadWaiter.on_death = _cannot_tell  # type: ignore[method-assign]
