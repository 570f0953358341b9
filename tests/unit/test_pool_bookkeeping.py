"""Issue 20, finding 3: reclaiming a dead unit's connection never takes a live unit's.

tests/support/pool_interleaving.py drives the interleaving step by step on a real Pool of
real Django wrappers: a scan for dead holders pauses after its snapshot, a unit that died
holding a connection is freed, a newcomer checks out, the scan goes on, a third unit checks
out. The control is the bookkeeping from before the fix (keyed by `id(unit)`, changed outside
the lock): the newcomer gets the dead unit's id, the scan takes the newcomer's connection and
hands it to the third unit. Plain Django has no pool, so it cannot fail this way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support import procs

pytestmark = pytest.mark.core


def run_support(module: str, tmp_path: Path, **env: str) -> dict[str, Any]:
    full_env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.project.settings",
        "DATABASE_URL": f"sqlite:///{tmp_path}/interleaving.sqlite3",
        **env,
    }
    out = subprocess.run(
        [sys.executable, "-m", module],
        cwd=procs.REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    result: dict[str, Any] = json.loads(out.stdout.splitlines()[-1])
    return result


def test_a_scan_that_saw_a_dead_holder_never_takes_a_live_units_connection(tmp_path: Path) -> None:
    control = run_support("tests.support.pool_interleaving", tmp_path, POOL_CONTROL="1")
    assert control == {"id_reused": True, "shared": True}, control  # the race, reproduced
    fixed = run_support("tests.support.pool_interleaving", tmp_path)
    # Held units are the pool's keys, so a holder's id cannot be reused while it holds.
    assert fixed == {"id_reused": False, "shared": False}, fixed


def test_threads_not_started_by_threading_give_their_slots_back_as_they_end(tmp_path: Path) -> None:
    """tests/support/pool_thread_ends.py: `_thread` threads and C pthreads end holding a connection.

    The control (the bookkeeping as it was) keeps their slots: nothing told the pool they ended,
    and on Python 3.11 and 3.12 a scan never finds them either (`is_alive()` stays True)."""
    control = run_support("tests.support.pool_thread_ends", tmp_path, POOL_CONTROL="1")
    # Python 3.13 forgets a _DummyThread when its thread ends: the old scan then finds the slots
    # of the sequential pthreads when the pool runs dry; before 3.13 they are lost for good.
    assert control["held_after_the_threads_ended"] >= 2, control
    fixed = run_support("tests.support.pool_thread_ends", tmp_path)
    assert fixed == {"held_after_the_threads_ended": 0, "reclaimed": 7, "failed": []}, fixed
