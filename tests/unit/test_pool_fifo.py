"""Issue 22, part 1: first come, first served, in both waiters (tests/support/fifo_cases.py).

The control arm is the semaphore of before (tests/support/slots_control.py): a unit that
releases and asks again at once takes its permit back ahead of the three that queued, and a
newcomer takes a permit a queued unit was waiting for. Plain Django has no pool.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

from tests.support import procs

pytestmark = pytest.mark.core

KINDS = ["threads", "gevent"]


def run_cases(kind: str, control: bool) -> dict[str, Any]:
    env = {**os.environ, "SERVERHOOKS_TEST_SLOTS_CONTROL": "1" if control else "0"}
    out = subprocess.run(
        [sys.executable, "-m", "tests.support.fifo_cases", kind],
        cwd=procs.REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    result: dict[str, Any] = json.loads(out.stdout.splitlines()[-1])
    return result


@pytest.mark.parametrize("kind", KINDS)
def test_control_the_semaphore_lets_a_returning_unit_and_a_newcomer_overtake(kind: str) -> None:
    seen = run_cases(kind, control=True)
    assert seen["order"]["order"][0] == "releaser", seen  # it took back what it had just freed
    assert seen["newcomer"]["newcomer_took_it"] is True, seen


@pytest.mark.parametrize("kind", KINDS)
def test_permits_go_to_the_longest_waiter_and_never_to_a_newcomer(kind: str) -> None:
    seen = run_cases(kind, control=False)
    assert seen["order"]["order"] == ["first", "second", "third", "releaser"], seen
    assert seen["newcomer"] == {"newcomer_took_it": False, "queued_got_it": True}, seen


@pytest.mark.parametrize("kind", KINDS)
def test_a_unit_that_gives_up_leaves_the_queue_without_losing_a_permit(kind: str) -> None:
    given_up = run_cases(kind, control=False)["give_up"]
    assert given_up["timed_out"] is True, given_up
    if kind == "gevent":
        assert given_up["killed_with_permit"] is True, given_up
    assert given_up["takeable_after"] == 1 and given_up["waiting_after"] == 0, given_up
