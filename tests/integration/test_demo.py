"""The main job, as a new user runs it: `tests/run demo` on its embedded PostgreSQL default.

The control arm's shared socket is the deterministic symptom and is asserted; its harm (wrong
answers with HTTP 200, errors) depends on timing, so it is reported, not asserted. The
serverhooks arm must be clean. Under CI=true the demo refuses its SQLite fallback, so this
test cannot pass on SQLite unnoticed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.support import procs

pytestmark = pytest.mark.gunicorn


def test_the_demo_on_its_embedded_postgresql_default() -> None:
    env = {key: value for key, value in os.environ.items() if key != "DATABASE_URL"}
    out = subprocess.run(
        [sys.executable, "-m", "tests.demo", "--json"],
        cwd=procs.REPO,
        env={**env, "CI": "true"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    data = json.loads(out.stdout.splitlines()[0])
    assert data["database"].startswith("embedded PostgreSQL"), data["database"]
    control, hooked = data["reports"]
    print(
        f"demo control: {control['wrong']} wrong answers with HTTP 200, {len(control['errors'])} errors, "
        f"{control['shared_with_master']} workers on the master's socket, of {control['requests']} requests"
    )
    assert control["shared_with_master"] == 4, "every worker holds the master's socket without serverhooks"
    assert hooked["shared_with_master"] == 0
    assert hooked["ok"] == hooked["requests"] and hooked["wrong"] == 0 and hooked["errors"] == []
