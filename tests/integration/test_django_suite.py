"""The Django-suite harness (bench/django_suite.py) on one small label: so that the harness itself is tested.

Opt in with SERVERHOOKS_TEST_DJANGO_SUITE=1 (it fetches Django's sdist from PyPI on its first run,
into bench/out/). It runs Django's own `transaction_hooks` tests on MariaDB and PostgreSQL, in
both orders, plain and with serverhooks' worker preparation, and every outcome must match.
The full run (every label of the issue) is `python -m bench.django_suite`, about 5 minutes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_server
from tests.support import procs

pytestmark = pytest.mark.bench

OPT_IN = "SERVERHOOKS_TEST_DJANGO_SUITE"


def test_transaction_hooks_same_outcomes_plain_and_prepared(tmp_path: Path) -> None:
    if os.environ.get(OPT_IN) != "1":
        pytest.skip(f"set {OPT_IN}=1 to run Django's own tests through bench/django_suite.py")
    for family in ("mysql", "postgres"):
        require_server(family)
    results = tmp_path / "DJANGO_SUITE_RESULTS.md"
    out = subprocess.run(
        [sys.executable, "-m", "bench.django_suite", "--labels", "transaction_hooks", "--results", str(results)],
        cwd=procs.REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    report = results.read_text() if results.exists() else "(no report)"
    print(out.stdout[-4000:], out.stderr[-4000:], report[-6000:], sep="\n")
    assert out.returncode == 0, "the harness found differences or problems; see the report above"
    assert "Result: every outcome matched" in report
    # A difference that came back on a rerun of both arms would be listed here instead.
    assert "## Differences\n\nNone: every test had the same outcome in both arms, in every pass." in report
    # The harness really ran both databases, both orders, both arms: 8 runs, none empty.
    rows = [line for line in report.splitlines() if line.startswith(("| MariaDB | ", "| PostgreSQL | "))]
    runs = [row for row in rows if "| plain |" in row or "| prepared |" in row]
    assert len(runs) == 8, runs
    for row in runs:
        ok = int(row.split("|")[5])
        assert ok > 0, row
