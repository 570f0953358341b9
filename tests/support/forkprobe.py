"""`import = tests.support.forkprobe`: records in $FORKPROBE_LOG every process in which
`os.register_at_fork` after-in-child handlers ran, to learn whether uWSGI runs them."""

from __future__ import annotations

import os


def _record() -> None:
    with open(os.environ["FORKPROBE_LOG"], "a") as log:
        log.write(f"{os.getpid()}\n")


os.register_at_fork(after_in_child=_record)
