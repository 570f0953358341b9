"""`python -m tests.support.exitcase ARM`: a worker exits while another thread is inside atomic().

A request thread writes inside `transaction.atomic()` and pauses there; the main thread runs
`close_at_exit()` (what a server's worker_exit hook does); then the request thread finishes its
block, as a request does before it answers 200. Three stages, each with its own thread and rows:

- `after-writes`: both rows written, the block not yet over (no query follows the exit);
- `between-writes`: one row written, the second written after the exit;
- `left-to-os`: as `after-writes`, but the thread stays in its block longer than EXIT_WAIT.

ARM `fixed` runs serverhooks as it is; `reverted` monkeypatches the fix away (exit then sees no
transaction anywhere, as before). Prints one JSON line per stage: the rows committed, the
error the block raised (None: it "succeeded"), and the exit's counters and warnings.
DATABASE_URL selects the database.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from typing import Any

import django

STAGES = ("after-writes", "between-writes", "left-to-os")
#: EXIT_WAIT of the `left-to-os` stage, and how long its thread stays in the block after the exit began.
SHORT_EXIT_WAIT = "0.3"
LONG_PAUSE = 1.5


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def run_stage(stage: str, warnings: _Collect) -> dict[str, Any]:
    from django.db import connection, transaction

    from serverhooks import close_at_exit, conf, stats
    from tests.project.models import Hit

    if stage == "left-to-os":
        os.environ["SERVERHOOKS_EXIT_WAIT"] = SHORT_EXIT_WAIT
        conf.reload()
    marker = f"exit-{stage}"
    wrote, exit_started, exit_returned = threading.Event(), threading.Event(), threading.Event()
    outcome: dict[str, Any] = {"error": "the block did not end"}

    def request() -> None:
        try:
            with transaction.atomic():
                Hit.objects.create(marker=marker, pid=os.getpid())
                if stage != "between-writes":
                    Hit.objects.create(marker=marker, pid=os.getpid())
                wrote.set()
                exit_started.wait(10)
                # Without the fix, the exit closes this connection at once and returns: the block goes
                # on only after that. With it, the exit waits for this block to end (up to EXIT_WAIT).
                exit_returned.wait(LONG_PAUSE if stage == "left-to-os" else 0.5)
                if stage == "between-writes":
                    Hit.objects.create(marker=marker, pid=os.getpid())
            outcome["error"] = None
        except Exception as exc:
            outcome["error"] = f"{type(exc).__name__}: {exc}"[:200]
        finally:
            wrote.set()

    before = stats()
    warnings.lines.clear()
    worker = threading.Thread(target=request, name=f"request-{stage}")
    worker.start()
    assert wrote.wait(10), "the request thread never wrote"
    exit_started.set()
    started = time.monotonic()
    close_at_exit()
    exit_took = time.monotonic() - started
    exit_returned.set()
    worker.join(10)
    after = stats()
    rows = Hit.objects.filter(marker=marker).count()  # a fresh session of the main thread
    connection.close()
    return {
        "stage": stage,
        "rows": rows,
        "error": outcome["error"],
        "exit_took": round(exit_took, 2),
        "thread_done": not worker.is_alive(),
        **{key: after[key] - before[key] for key in ("busy_at_exit", "closed_at_exit", "errors")},
        "warnings": list(warnings.lines),
    }


def revert_the_fix() -> None:
    """The control: exit sees no transaction in any thread, as before the fix."""
    from serverhooks import worker

    def never_in_a_transaction(wrapper: Any) -> bool:
        return False

    worker._in_transaction = never_in_a_transaction


def main() -> None:
    arm = sys.argv[1]
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.project.settings")
    django.setup()
    from serverhooks import registry

    if arm == "reverted":
        revert_the_fix()
    registry.start_tracking()  # what prepare_worker does in every worker
    warnings = _Collect()
    logging.getLogger("serverhooks").addHandler(warnings)
    for stage in STAGES:
        print(json.dumps(run_stage(stage, warnings)), flush=True)


if __name__ == "__main__":
    main()
