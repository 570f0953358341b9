"""Each bench's --quick mode, as a fresh clone runs it: so that its setup cannot drift again.

The results go to a temporary file, never over the committed bench/*RESULTS.md. The benches
run the code as committed (a `git archive` snapshot), so they need the repository's .git:
inside the tests container, which has none, they skip.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import procs

pytestmark = pytest.mark.bench


# The line of each report that checks every answer, and what it says when all were right.
ALL_RIGHT = {
    "gunicorn_bench": ("every response carries its own marker", "| 0 wrong, 0 errors in "),
    "gevent_bench": ("every answer right, in every arm but no hooks", "| 0 errors or wrong answers in "),
    "health_bench": ("wrong answers / HTTP errors / failures, all arms", "| 0 / 0 / 0 | 0 / 0 / 0 |"),
    "asgi_bench": ("every answer right in every serverhooks arm", "| 0 errors or wrong answers in "),
    "metrics_bench": ("wrong answers / HTTP errors / failures, all arms", "| 0 / 0 / 0 | 0 / 0 / 0 |"),
}


@pytest.mark.parametrize("bench", list(ALL_RIGHT))
def test_quick_run(bench: str, tmp_path: Path) -> None:
    if not (procs.REPO / ".git").exists():
        pytest.skip("no .git here (the tests container): the benches snapshot the committed code with git archive")
    results = tmp_path / "RESULTS.md"
    out = subprocess.run(
        [sys.executable, "-m", f"bench.{bench}", "--quick", "--results", str(results)],
        cwd=procs.REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    report = results.read_text()
    print(report[:3000])
    assert "quick run" in report
    row, all_right = ALL_RIGHT[bench]
    (line,) = [line for line in report.splitlines() if row in line]
    assert all_right in line, line
