"""`python -m tests.support.pool_interleaving`: the reclaim race of issue 20, driven step by step.

A scan for dead holders takes its snapshot, then pauses (the waiter's `is_dead` waits on an
event for one unit). Meanwhile a unit of work that died holding a connection is freed, and a
new unit checks out a connection of its own: with a pool keyed by `id(unit)` it may get the
dead unit's id. The scan then goes on and reclaims "the dead unit's holding", and a third unit
checks out. The question: do two live units now hold one connection?

Real Django wrappers (DATABASE_URL, SQLite by default) in a real Pool; only the units of work
are plain objects, so that the test decides when each one dies. Prints one JSON line.
POOL_CONTROL=1: the bookkeeping from before the fix (tests/support/pool_control.py).
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any

import django


class Unit:
    """A unit of work the test controls: it is dead when the test says so."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.dead = False


class ScriptedWaiter:
    """Units are the test's objects; `is_dead(stall_on)` waits until the test lets the scan go on."""

    def __init__(self) -> None:
        self.now: Any = None
        self.stall_on: Any = None
        self.scan_paused = threading.Event()
        self.scan_may_go_on = threading.Event()

    def signal(self) -> Any:
        return threading.Lock()

    def current(self) -> Any:
        return self.now

    def is_dead(self, unit: Any) -> bool:
        if unit is self.stall_on:
            self.scan_paused.set()
            self.scan_may_go_on.wait(10)
        return bool(unit.dead)

    def on_death(self, unit: Any, callback: Any) -> bool:
        return False


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.project.settings")
    django.setup()
    if os.environ.get("POOL_CONTROL") == "1":
        import tests.support.pool_control  # noqa: F401 - the bookkeeping as it was
    from serverhooks.pool.core import Pool

    waiter = ScriptedWaiter()
    pool = Pool("default", size=4, timeout=1.0, waiter=waiter)

    def checkout_as(unit: Any) -> Any:
        waiter.now = unit
        return pool.checkout()

    staller = Unit("alive, its check pauses the scan")
    checkout_as(staller)
    dying = Unit("dies holding a connection")
    checkout_as(dying)
    dying_id = id(dying)
    dying.dead = True

    waiter.stall_on = staller
    scan = threading.Thread(target=pool._reclaim_from_dead_units)
    scan.start()
    waiter.scan_paused.wait(10)  # the scan took its snapshot and waits

    # The dead unit is gone; a new one starts. Python reuses freed memory, so its id is often
    # the dead one's: try a bounded number of times for that (the old pool's weak spot).
    waiter.now = None
    del dying
    kept: list[Unit] = []
    newcomer = Unit("newcomer")
    for _ in range(1000):
        if id(newcomer) == dying_id:
            break
        kept.append(newcomer)
        newcomer = Unit("newcomer")
    newcomer_wrapper = checkout_as(newcomer)

    waiter.scan_may_go_on.set()
    scan.join(10)
    third_wrapper = checkout_as(Unit("third"))
    print(json.dumps({"id_reused": id(newcomer) == dying_id, "shared": third_wrapper is newcomer_wrapper}))


if __name__ == "__main__":
    main()
