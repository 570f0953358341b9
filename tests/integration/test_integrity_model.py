"""The model-based integrity suite, as CI runs it: a fixed seed, a bounded number of sequences.

Each sequence is a seeded random walk of nested atomic() blocks and savepoints, caught
IntegrityErrors, execute_wrappers that raise, parameters the driver cannot adapt, releases
(release_connections(), releasing(), Thread, ThreadPoolExecutor, in other threads and in
the caller's), interrupts after a query or a COMMIT was sent, gevent timeouts, and sessions
the server ends, run against the real MariaDB and PostgreSQL; the model
(tests/support/integrity/model.py) says what each step must do and which rows must be
committed, read server-side at each unit's end. Each mode runs in a process of its own.

- test_sequences_keep_integrity: serverhooks without a pool, under the gevent pool and
  under the threads' (ASGI) pool, with every fault on: zero violations.
- test_other_drivers: mysqlclient (no pool) and psycopg2 (gevent pool, psycogreen).
- test_same_as_plain_django: without faults, every mode sees step by step what plain
  Django (no serverhooks at all) sees, and plain Django agrees with the model (which
  checks the model itself).
- test_control_plain_django_under_faults: the control arm. Plain Django under the same
  faults hands an interrupted session on and fails after a session the server ended:
  the suite can fail.

The long run (at least 5,000 sequences per mode and database) is bench/integrity_long.py;
its recorded results are bench/INTEGRITY_RESULTS.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import FAMILIES, report
from tests.support import procs

SEED = 20260601
SEQUENCES = {"plain": 60, "gevent": 45, "threads": 45}
DIFFERENTIAL_SEQUENCES = 30
CONTROL_SEQUENCES = 30
OTHER_DRIVER_SEQUENCES = 40


def run_suite(mode: str, family: str, dbname: str, sequences: int, *extra: str) -> dict[str, Any]:
    command = [
        sys.executable,
        "-m",
        "tests.support.integrity",
        *("--mode", mode, "--database", family, "--dbname", dbname),
        *("--seed", str(SEED), "--sequences", str(sequences)),
        *("--shrink", "3", "--shrink-seconds", "20", "--examples", "1", "--progress", "30"),
        *extra,
    ]
    started = time.monotonic()
    out = subprocess.run(command, cwd=procs.REPO, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-6000:]
    result: dict[str, Any] = json.loads(out.stdout.splitlines()[-1])
    result["wall_seconds"] = round(time.monotonic() - started, 1)
    return result


def describe(result: dict[str, Any]) -> str:
    """The violations, each kind's minimal sequence, and how to replay it."""
    lines = [
        f"{result['mode']}/{result['database']}/{result['driver']} seed {result['seed']}: "
        f"{result['failing_sequences']} of {result['sequences']} sequences failed: {result['violations']}"
    ]
    for kind, minimal in result["minimal"].items():
        if not minimal.get("reproduced_alone"):
            example = result["examples"][kind][0]
            where = f"only after earlier sequences; sequence {example['sequence']}"
            lines.append(f"- {kind} ({where}): {example['message']}")
            lines.append(f"    {example['steps']}")
            continue
        lines.append(f"- {kind}: {minimal['message']}")
        lines.append(f"    minimal: {minimal['steps']}")
        lines.append(
            f"    replay:  python -m tests.support.integrity --mode {result['mode']} --database {result['database']} "
            f"--replay '{json.dumps(minimal['json'])}'"
        )
    for kind in result["violations"]:
        if kind not in result["minimal"] and result["examples"].get(kind):
            example = result["examples"][kind][0]
            lines.append(f"- {kind}: {example['message']}\n    {example['steps']}")
    return "\n".join(lines)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", list(SEQUENCES))
def test_sequences_keep_integrity(mode: str, family: str, fresh_database: Callable[[str], str]) -> None:
    result = run_suite(mode, family, fresh_database(family), SEQUENCES[mode])
    report(
        f"integrity {mode}/{family}: {result['sequences']} sequences, {result['steps']} steps "
        f"({result['fault_steps']} faults), {result['ms_per_sequence']} ms/sequence, {result['wall_seconds']} s"
    )
    assert result["sequences"] == SEQUENCES[mode], describe(result)
    assert result["fault_steps"] > 0, "the walk chose no fault: the seed or the weights changed"
    assert not result["violations"], describe(result)


@pytest.mark.parametrize(
    ("mode", "family", "driver"), [("plain", "mysql", "mysqlclient"), ("gevent", "postgres", "psycopg2")]
)
def test_other_drivers(mode: str, family: str, driver: str, fresh_database: Callable[[str], str]) -> None:
    """mysqlclient and psycopg2: no injected interrupts (each query is one C call), the rest as above."""
    result = run_suite(mode, family, fresh_database(family), OTHER_DRIVER_SEQUENCES, "--driver", driver)
    assert result["sequences"] == OTHER_DRIVER_SEQUENCES, describe(result)
    assert not result["violations"], describe(result)


@pytest.mark.parametrize("family", FAMILIES)
def test_same_as_plain_django(family: str, fresh_database: Callable[[str], str]) -> None:
    dbname = fresh_database(family)
    runs = {
        mode: run_suite(mode, family, dbname, DIFFERENTIAL_SEQUENCES, "--no-faults", "--digests")
        for mode in ("django", "plain", "gevent", "threads")
    }
    reference = runs.pop("django")
    # Plain Django must do what the model says: otherwise the model, not serverhooks, is wrong.
    assert not reference["violations"], "the model disagrees with plain Django:\n" + describe(reference)
    different = {}
    for mode, result in runs.items():
        if result["digests"] != reference["digests"]:
            pairs = zip(result["digests"], reference["digests"], strict=False)
            first = next((index for index, (a, b) in enumerate(pairs) if a != b), len(result["digests"]))
            different[mode] = f"sequence {first} differs first\n{describe(result)}"
    assert not different, "\n".join(f"{mode}: {text}" for mode, text in different.items())


@pytest.mark.parametrize("family", FAMILIES)
def test_control_plain_django_under_faults(family: str, fresh_database: Callable[[str], str]) -> None:
    result = run_suite("django", family, fresh_database(family), CONTROL_SEQUENCES, "--faults", "--shrink", "0")
    print(describe(result))
    kinds = result["violations"]
    # An interrupted session is used again (no guard), and a session the server ended between
    # requests fails the next one (no idle-session check).
    assert kinds.get("session-reused"), kinds
    assert any(kind.startswith("outcome:") for kind in kinds), kinds


WEDGED = [
    {"kind": "enter", "n": 1},
    {"kind": "kill"},
    {"kind": "insert", "key": 0, "via": "raw"},
    {"kind": "exit"},
    {"kind": "enter", "n": 1},
    {"kind": "unit"},
    {"kind": "insert", "key": 0, "via": "orm"},
]


@pytest.mark.parametrize("mode", ["django", "plain"])
def test_a_session_that_died_in_a_block_does_not_wedge_the_next_requests(
    mode: str, fresh_database: Callable[[str], str]
) -> None:
    """Found by the long run: the server ends a session inside atomic(); the block's exit fails to
    turn autocommit back on, the next atomic() fails halfway in and leaves the connection inside a
    block that no longer exists. Plain Django (mode "django", the control) then fails every later
    request of that thread; serverhooks resets the connection at the next request's start."""
    command = [sys.executable, "-m", "tests.support.integrity", "--mode", mode, "--database", "mysql"]
    command += ["--dbname", fresh_database("mysql"), "--replay", json.dumps(WEDGED)]
    out = subprocess.run(command, cwd=procs.REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == (1 if mode == "django" else 0), out.stdout[-4000:] + out.stderr[-4000:]
    violations = json.loads(out.stdout.splitlines()[-1])["violations"]
    if mode == "django":
        assert [v["kind"] for v in violations] == ["outcome:insert"], violations
        assert "TransactionManagementError" in violations[0]["message"]
    else:
        assert violations == [], violations
