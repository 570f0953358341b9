"""Counters.add counts exactly under threads (gthread and ASGI workers count from many at once).

The control arm is add() as it was before the fix (`add_before_the_fix`, verbatim), an unlocked
read-modify-write. (The metered subclass: tests/unit/test_metrics.py.)
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
import types
from collections.abc import Iterator
from typing import Any

import pytest

from serverhooks._process import Counters
from tests.conftest import report

pytestmark = pytest.mark.core

KEY = ("pool_reused", "default")


def add_before_the_fix(self: Counters, name: str, alias: str, amount: float = 1) -> None:
    object.__setattr__(self, name, getattr(self, name) + amount)
    key = (name, alias)
    self.by_alias[key] = self.by_alias.get(key, 0) + amount


def counters_for(arm: str, monkeypatch: pytest.MonkeyPatch) -> Counters:
    counters = Counters()
    if arm == "reverted":
        monkeypatch.setattr(counters, "add", types.MethodType(add_before_the_fix, counters))
    return counters


@contextlib.contextmanager
def switching_often() -> Iterator[None]:
    """Threads switch every microsecond: a lost update needs a switch inside add()."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


@pytest.mark.parametrize("arm", ["reverted", "fixed"])
def test_threads_counting_at_once_lose_no_count(arm: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """8 threads x 20,000 checkouts. Unlocked, a third to two thirds of the counts went missing
    (measured over six runs: 49,828 to 102,710 of 160,000); locked, every one is there."""
    counters = counters_for(arm, monkeypatch)
    threads, each = 8, 20_000
    start = threading.Barrier(threads, timeout=10)

    def checkouts() -> None:
        start.wait()
        for _ in range(each):
            counters.add(*KEY)

    workers = [threading.Thread(target=checkouts) for _ in range(threads)]
    began = time.monotonic()
    with switching_often():
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(30)
    took = time.monotonic() - began
    assert not any(worker.is_alive() for worker in workers)
    counted = (counters.pool_reused, counters.by_alias[KEY])
    report(f"counters, {arm}: {counted[0]:g} of {threads * each} counted by {threads} threads in {took:.2f} s")
    if arm == "reverted":
        assert counted[0] < threads * each and counted[1] < threads * each, counted
    else:
        assert counted == (threads * each, threads * each)


class PausingOne:
    """The amount 1, whose addition (the middle of add()'s read-modify-write) waits the first time:
    the window in which another thread's increment can be lost, held open on purpose."""

    def __init__(self) -> None:
        self.inside, self.go = threading.Event(), threading.Event()

    def __radd__(self, other: float) -> float:
        if not self.inside.is_set():
            self.inside.set()
            self.go.wait(5)
        return other + 1


@pytest.mark.parametrize("arm", ["reverted", "fixed"])
def test_an_increment_never_lands_inside_another(arm: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Deterministic: thread A is inside add() (it read the value), thread B adds meanwhile. Unlocked,
    B finishes at once and A then writes its stale sum over B's count: 1. Locked, B waits: 2."""
    counters = counters_for(arm, monkeypatch)
    slow = PausingOne()
    amount: Any = slow
    a = threading.Thread(target=counters.add, args=(*KEY, amount))
    a.start()
    assert slow.inside.wait(5)
    b = threading.Thread(target=counters.add, args=KEY)
    b.start()
    b.join(0.3)
    b_finished_inside_a = not b.is_alive()
    slow.go.set()
    a.join(5)
    b.join(5)
    if arm == "reverted":
        assert (b_finished_inside_a, counters.pool_reused) == (True, 1)
    else:
        assert (b_finished_inside_a, counters.pool_reused, counters.by_alias[KEY]) == (False, 2, 2)
