"""Worker exit never closes another thread's connection inside a transaction.

Django's close() inside atomic() only marks the block `closed_in_transaction`: the block then
ends without an error and without a commit, so a request thread that exits its block after
the close answers 200 with its writes gone. The cases run in processes of their own
(tests/support/exitcase.py) against the real servers; the control arm is serverhooks with the
fix reverted (plain Django closes no other thread's connection at exit, so it cannot fail so).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

from tests.support import dbserver, procs

pytestmark = pytest.mark.core


def run_arm(arm: str, url: str) -> dict[str, dict[str, Any]]:
    env = {**os.environ, "DATABASE_URL": url, "DJANGO_SETTINGS_MODULE": "tests.project.settings"}
    env.update(CONN_MAX_AGE="600", SERVERHOOKS_PROBE_DATABASES="0")
    env.pop("SERVERHOOKS_EXIT_WAIT", None)
    procs.create_schema(env)
    out = subprocess.run(
        [sys.executable, "-m", "tests.support.exitcase", arm],
        cwd=procs.REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    stages = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    print(f"{arm}: {stages}")
    return {stage.pop("stage"): stage for stage in stages}


@pytest.mark.parametrize("family", ["mysql", "postgres"])
def test_exit_leaves_a_thread_inside_atomic_to_commit_as_written(
    family: str, fresh_database: Callable[[str], str]
) -> None:
    url = dbserver.django_url(family, fresh_database(family))
    control = run_arm("reverted", url)
    # The control: the block "succeeded" and nothing was committed (the silent loss), or, when a
    # write follows the close, that write failed; either way the exit closed it (closed_at_exit).
    assert control["after-writes"]["error"] is None and control["after-writes"]["rows"] == 0, control
    assert control["left-to-os"]["error"] is None and control["left-to-os"]["rows"] == 0, control
    assert control["between-writes"]["error"] is not None and control["between-writes"]["rows"] == 0, control
    assert all(stage["closed_at_exit"] == 1 and stage["busy_at_exit"] == 0 for stage in control.values())

    fixed = run_arm("fixed", url)
    for name in ("after-writes", "between-writes"):
        # The exit waited for the block to end, then closed the idle connection cleanly.
        stage = fixed[name]
        assert (stage["error"], stage["rows"], stage["closed_at_exit"], stage["busy_at_exit"]) == (None, 2, 1, 0)
        assert stage["errors"] == 0 and stage["warnings"] == [], stage
    left = fixed["left-to-os"]
    # Still inside its block after EXIT_WAIT: left open, counted and named, and the block then
    # committed as written (a worker that exits instead takes the whole transaction with it).
    assert (left["error"], left["rows"], left["closed_at_exit"], left["busy_at_exit"]) == (None, 2, 0, 1), left
    assert 0.3 <= left["exit_took"] < 1.5, left
    assert len(left["warnings"]) == 1 and "'default'" in left["warnings"][0], left
    assert "transaction" in left["warnings"][0], left
