"""The metrics tests' control arm: everything serverhooks does to remove the live gauges of
processes that are gone, and to merge their counter files, switched off. Imported by a server's
master (gunicorn.conf.py, or uWSGI's `--import`), so every worker it forks inherits the change.

Only what cleans up is replaced: the metrics themselves are written as usual.
"""

from __future__ import annotations

from serverhooks import metrics
from serverhooks.metrics import files


def _no_sweep(path: str) -> list[int]:
    return []


def _no_merge(path: str, *, at_least: int = 0) -> int:
    return 0


def _no_cleanup_at_exit() -> None:
    return None


files.sweep_dead = _no_sweep
files.compact_dead = _no_merge
metrics.at_exit = _no_cleanup_at_exit
# Gunicorn's child_exit: the control conf replaces serverhooks' hook with one of its own.
