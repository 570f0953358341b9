"""prometheus_client's multiprocess directory: removing the live gauges of processes that are gone.

prometheus_client keeps one file per metric type and pid. The files of a "live" gauge mode
(`gauge_live<mode>_<pid>.db`) describe a running process only, and
`multiprocess.mark_process_dead(pid)` deletes them when that process is gone; every other
file (counters, histograms, non-live gauges) must stay, or totals would go backwards. This
module deletes nothing else, and never empties the directory: that is the user's job at
each server start.
"""

from __future__ import annotations

import os
import re

from serverhooks._log import describe_error, logger

__all__ = ["live_gauge_pids", "mark_dead", "pid_alive", "sweep_dead"]

# prometheus_client's names for live gauges' files: gauge_liveall_123.db, gauge_livesum_123.db, ...
_LIVE_GAUGE_FILE = re.compile(r"^gauge_live[a-z]+_(\d+)\.db$")


def live_gauge_pids(path: str) -> set[int]:
    """The pids that have live-gauge files in `path`."""
    try:
        names = os.listdir(path)
    except OSError:
        return set()
    return {int(match.group(1)) for name in names if (match := _LIVE_GAUGE_FILE.match(name))}


def pid_alive(pid: int) -> bool:
    """Is there a process `pid` (in this pid namespace)? Signal 0 checks without signalling."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, under another user
        return True
    return True


def mark_dead(pid: int, path: str) -> None:
    """prometheus_client's own bookkeeping for a dead process: its live gauges' files go."""
    from prometheus_client import multiprocess

    try:
        multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]
    except OSError as exc:  # another process removed them first: that is the same outcome
        logger.debug("serverhooks: removing live gauges of pid %d: %s", pid, describe_error(exc))


def sweep_dead(path: str) -> list[int]:
    """Remove the live gauges of every pid that no longer runs; the pids swept."""
    swept = sorted(pid for pid in live_gauge_pids(path) if not pid_alive(pid))
    for pid in swept:
        mark_dead(pid, path)
    if swept:
        logger.debug("serverhooks: removed the live gauges of %d dead processes", len(swept))
    return swept
