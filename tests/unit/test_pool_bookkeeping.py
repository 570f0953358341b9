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


def interleave(tmp_path: Path, **env: str) -> dict[str, Any]:
    full_env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.project.settings",
        "DATABASE_URL": f"sqlite:///{tmp_path}/interleaving.sqlite3",
        **env,
    }
    out = subprocess.run(
        [sys.executable, "-m", "tests.support.pool_interleaving"],
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
    control = interleave(tmp_path, POOL_CONTROL="1")
    assert control == {"id_reused": True, "shared": True}, control  # the race, reproduced
    fixed = interleave(tmp_path)
    # Held units are the pool's keys, so a holder's id cannot be reused while it holds.
    assert fixed == {"id_reused": False, "shared": False}, fixed
