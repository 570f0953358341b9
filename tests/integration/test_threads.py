"""Family 2: threads and thread pools, sessions counted on the server.

Control arms use the standard library's classes; hooks arms serverhooks' drop-ins.
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


def threadloop(family: str, name: str, kind: str, shape: str) -> dict[str, Any]:
    env = {"DATABASE_URL": dbserver.django_url(family, name), "CONN_MAX_AGE": "0", "PATH": ""}
    # The loop counts sessions itself, on the servers this suite was pointed at.
    env.update({key: value for key, value in os.environ.items() if key.startswith("SERVERHOOKS_TEST_")})
    procs.create_schema(env)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.support.threadloop",
            "--family",
            family,
            "--database",
            name,
            "--kind",
            kind,
            "--shape",
            shape,
        ],
        cwd=procs.REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout.splitlines()[-1])
    print(f"{family} {shape} {kind}: {result}")
    return result


@pytest.mark.parametrize("family", ["mysql", "postgres"])
@pytest.mark.parametrize("shape", ["pools", "threads"])
def test_standard_library_leaves_sessions_open(family: str, shape: str, fresh_database: Callable[[str], str]) -> None:
    result = threadloop(family, fresh_database(family), "stdlib", shape)
    leaked = result["after"] is None or result["after"] > result["before"]
    refused = result["errors"] > 0  # the leak ran the server out of sessions
    assert leaked or refused, result


@pytest.mark.parametrize("family", ["mysql", "postgres"])
@pytest.mark.parametrize(
    ("shape", "kind"),
    [
        ("pools", "serverhooks"),
        ("pools", "serverhooks-per-thread"),
        ("threads", "serverhooks"),
        ("many-tasks", "serverhooks"),
        ("many-tasks", "serverhooks-per-thread"),
    ],
)
def test_serverhooks_leaves_none_and_loses_no_row(
    family: str, shape: str, kind: str, fresh_database: Callable[[str], str]
) -> None:
    result = threadloop(family, fresh_database(family), kind, shape)
    assert result["errors"] == 0, result["first_error"]
    assert result["after"] == result["before"], result
    assert result["rows"] == {"pools": 300, "threads": 200, "many-tasks": 300}[shape]
