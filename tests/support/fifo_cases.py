"""Issue 22: the pool's permits go first come, first served, for threads and for greenlets.

Runs as a script (`python -m tests.support.fifo_cases KIND`), KIND `threads` or `gevent`
(gevent patches the process first), and prints one JSON line of what it saw. With
SERVERHOOKS_TEST_SLOTS_CONTROL=1 the permits are the semaphore of before the fix
(tests/support/slots_control.py), which the same cases show starving.

Cases, on the real FifoSlots with the waiter's own signal and the pool's kind of lock:
- `order`: one permit, held; three units queue in turn; the holder releases and at once asks
  again (a keep-alive client's next request). Who gets the permit, in which order?
- `newcomer`: a free permit with a unit queued is never taken by one that did not queue.
- `give_up`: a unit whose wait times out, and one killed while waiting (with the permit handed
  to it meanwhile, under gevent), leave the queue; afterwards every permit can still be taken.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any

KIND = sys.argv[1] if len(sys.argv) > 1 else "threads"
if KIND == "gevent":
    from gevent import monkey

    monkey.patch_all()

import threading  # noqa: E402  (after the patch, as in a gevent worker)

import tests.support.slots_control  # noqa: E402,F401  (reverts the fix when asked to)
from serverhooks.pool import fifo  # noqa: E402

if KIND == "gevent":
    import gevent

    from serverhooks.pool.gevent import GreenletWaiter

    new_signal: Callable[[], Any] = GreenletWaiter().signal

    def start(body: Callable[[], Any]) -> Any:
        return gevent.spawn(body)

    def pause(seconds: float) -> None:
        gevent.sleep(seconds)

else:
    from serverhooks.pool.threads import ThreadWaiter

    new_signal = ThreadWaiter().signal

    def start(body: Callable[[], Any]) -> Any:
        thread = threading.Thread(target=body, daemon=True)
        thread.start()
        return thread

    def pause(seconds: float) -> None:
        time.sleep(seconds)


def new_slots(size: int) -> Any:
    return fifo.FifoSlots(size, threading.Lock(), new_signal)


def queue_up(slots: Any, name: str, got: list[str], hold: float = 0.0) -> Any:
    """A unit that waits for a permit, notes when it got one, holds it a moment, gives it back."""

    def body() -> None:
        if slots.take() or slots.wait(5.0):
            got.append(name)
            pause(hold)
            slots.release()

    unit = start(body)
    pause(0.05)  # it is queued before the next one comes
    return unit


def case_order() -> dict[str, Any]:
    slots = new_slots(1)
    assert slots.take()
    got: list[str] = []
    units = [queue_up(slots, name, got, hold=0.02) for name in ("first", "second", "third")]
    slots.release()
    # The releasing unit asks again at once, as a keep-alive client starts its next request.
    again = slots.take() or slots.wait(5.0)
    if again:
        got.append("releaser")
        slots.release()
    for unit in units:
        unit.join(5)
    return {"order": got}


def case_newcomer() -> dict[str, Any]:
    slots = new_slots(1)
    assert slots.take()
    got: list[str] = []
    queued = queue_up(slots, "queued", got)
    slots.release()
    newcomer_took = slots.take()  # before the queued unit has run again
    if newcomer_took:
        slots.release()
    queued.join(5)
    return {"newcomer_took_it": newcomer_took, "queued_got_it": got == ["queued"]}


def case_give_up() -> dict[str, Any]:
    slots = new_slots(2)
    assert slots.take() and slots.take()
    timed_out: list[bool] = []
    waiter = start(lambda: timed_out.append(not slots.wait(0.1)))
    waiter.join(5)
    killed_with_permit = None
    if KIND == "gevent":
        doomed = gevent.spawn(lambda: slots.wait(5.0))
        pause(0.05)
        # The kill is queued first, then the permit is handed to the doomed greenlet: the hub
        # delivers GreenletExit in its wait before it wakes it. The permit must not go with it.
        doomed.kill(block=False)
        slots.release()
        pause(0.05)
        killed_with_permit = doomed.dead
    else:
        slots.release()
    takeable = sum(1 for _ in range(3) if slots.take())
    return {
        "timed_out": timed_out == [True],
        "killed_with_permit": killed_with_permit,
        "takeable_after": takeable,  # one was still held by us: 1 of 2 is free
        "waiting_after": slots.waiting(),
    }


if __name__ == "__main__":
    started = time.monotonic()
    result: dict[str, Any] = {"order": case_order(), "newcomer": case_newcomer(), "give_up": case_give_up()}
    result["seconds"] = round(time.monotonic() - started, 2)
    print(json.dumps(result))
