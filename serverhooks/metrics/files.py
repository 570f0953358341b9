"""prometheus_client's multiprocess directory: what processes that are gone leave behind.

prometheus_client keeps one file per metric type and pid. The files of a "live" gauge mode
(`gauge_live<mode>_<pid>.db`) describe a running process only, and
`multiprocess.mark_process_dead(pid)` deletes them when that process is gone. A dead pid's
counter, histogram and summary files must keep counting, or totals would go backwards: they
are merged into one archive file per type (the totals stay exact), which keeps the number of
files, hence the scrape time, bounded however many workers were recycled. Nothing else is
touched, and the directory is never emptied: that is the user's job at each server start.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import logging
import math
import os
import re
import struct
import time
from collections.abc import Iterator

from serverhooks._log import describe_error, logger, say_once

__all__ = [
    "archive_name",
    "compact_dead",
    "compaction_lock",
    "dead_summed_files",
    "live_gauge_pids",
    "mark_dead",
    "pid_alive",
    "readable_files",
    "remove_empty_of_dead",
    "sweep_dead",
]

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
    """Remove the live gauges of every pid that no longer runs, and dead pids' empty files; the
    pids whose live gauges went."""
    swept = sorted(pid for pid in live_gauge_pids(path) if not pid_alive(pid))
    for pid in swept:
        mark_dead(pid, path)
    if swept:
        logger.debug("serverhooks: removed the live gauges of %d dead processes", len(swept))
    remove_empty_of_dead(path)
    return swept


# prometheus_client creates a file, then sizes it: a process killed in between leaves a 0-byte
# file that makes every later MultiProcessCollector scrape fail (prometheus/client_python#1199).
_ANY_FILE = re.compile(r"^[a-z]+(?:_[a-z]+)?_(\d+)\.db$")


def remove_empty_of_dead(path: str) -> list[str]:
    """Remove the 0-byte metric files of pids that no longer run (they hold no value at all); the names."""
    try:
        names = os.listdir(path)
    except OSError:
        return []
    removed: list[str] = []
    for name in names:
        match = _ANY_FILE.match(name)
        if match is None or pid_alive(int(match.group(1))):
            continue
        file_path = os.path.join(path, name)
        try:
            if os.stat(file_path).st_size == 0:
                os.unlink(file_path)
                removed.append(name)
        except FileNotFoundError:
            continue
    if removed:
        logger.info(
            "serverhooks: removed %d empty metrics file(s) that processes killed while creating them left "
            "behind (they would fail every scrape): %s",
            len(removed),
            ", ".join(sorted(removed)),
        )
    return removed


def readable_files(path: str) -> list[str]:
    """The directory's *.db files a scrape can read: not the 0-byte file of a process creating it
    right now (prometheus_client sizes it a moment later)."""
    found: list[str] = []
    for file_path in glob.glob(os.path.join(path, "*.db")):
        try:
            if os.stat(file_path).st_size > 0:
                found.append(file_path)
        except FileNotFoundError:  # a live gauge removed meanwhile
            continue
    return found


# ---------------------------------------------------------------------------- compaction
#
# prometheus_client keeps each dead process's counter and histogram files for good (dropping
# them would make totals go backwards), and every scrape reads every file: the scrape time grows
# with the number of worker lives since the directory was emptied. Those types are summed over
# processes by MultiProcessCollector, so the dead pids' files can be summed into one archive
# file per type (prometheus_client's own `merge(..., accumulate=False)` is documented for
# writing merged values back into files): the totals stay exact and the file count stays bounded.

#: Metric types MultiProcessCollector sums over processes (the pid never is a label of theirs).
SUMMED_TYPES = ("counter", "histogram", "summary")
#: Dead processes' files that wait before they are merged (SERVERHOOKS['METRICS_MERGE_AT']).
COMPACT_AT = 32
#: Held shared by serverhooks' /metrics view while it reads, exclusively while files are merged.
LOCK_NAME = "serverhooks-compact.lock"
_SUMMED_FILE = re.compile(r"^(counter|histogram|summary)_(\d+)\.db$")


def archive_name(metric_type: str) -> str:
    """The archive of `metric_type`: a name prometheus_client reads like any other file of that type."""
    return f"{metric_type}_archive.db"


def dead_summed_files(path: str) -> dict[str, list[str]]:
    """The counter, histogram and summary files of pids that no longer run, by type."""
    try:
        names = sorted(os.listdir(path))
    except OSError:
        return {}
    found: dict[str, list[str]] = {}
    for name in names:
        match = _SUMMED_FILE.match(name)
        if match and not pid_alive(int(match.group(2))):
            found.setdefault(match.group(1), []).append(os.path.join(path, name))
    return found


@contextlib.contextmanager
def compaction_lock(path: str, *, exclusive: bool, wait_seconds: float) -> Iterator[bool]:
    """flock on the directory's lock file; yields whether it is held. Waits at most `wait_seconds`
    (in short sleeps, so a gevent worker's other greenlets run meanwhile); never raises."""
    try:
        fd = os.open(os.path.join(path, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:  # a read-only directory: nobody can be merging files in it
        yield False
        return
    try:
        mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
        deadline = time.monotonic() + wait_seconds
        held = False
        for _ in range(1000):  # bounded: ~wait_seconds / 5 ms rounds
            try:
                fcntl.flock(fd, mode)
                held = True
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.005)
        yield held
    finally:
        os.close(fd)  # releases the lock too


def _summed_values(paths: list[str]) -> tuple[dict[str, float], list[str], dict[str, str]]:
    """Each key's value summed over `paths`; the paths read; and why each path that exists could not
    be read (a vanished file is neither)."""
    from prometheus_client.mmap_dict import MmapedDict

    parts: dict[str, list[float]] = {}
    read: list[str] = []
    unreadable: dict[str, str] = {}
    for file_path in paths:
        try:
            if os.stat(file_path).st_size == 0:  # nothing ever written: merged as empty
                read.append(file_path)
                continue
            entries = list(MmapedDict.read_all_values_from_file(file_path))  # type: ignore[no-untyped-call]
        except FileNotFoundError:
            continue
        # Corrupted (a bad length: RuntimeError or struct.error; a bad key: UnicodeDecodeError, a
        # ValueError), or not ours to read: left in place, as it was.
        except (OSError, RuntimeError, ValueError, struct.error) as exc:
            unreadable[file_path] = describe_error(exc)
            continue
        for key, value, _timestamp, _position in entries:
            parts.setdefault(key, []).append(value)
        read.append(file_path)
    return {key: _never_below_a_scrape(values) for key, values in parts.items()}, read, unreadable


def _never_below_a_scrape(values: list[float]) -> float:
    """The sum a merged file holds. Counts (whole numbers) add up exactly. Seconds do not: a scrape
    adds files in its own order, and an archive a rounding below what it showed before would look
    to Prometheus like a counter reset. So the correctly rounded sum, raised by twice the
    rounding error any order of additions can make (a few units in the last place)."""
    total = math.fsum(values)
    if all(value.is_integer() for value in values):
        return total
    for _ in range(2 * len(values)):
        total = math.nextafter(total, math.inf)
    return total


def _merge_into_archive(path: str, metric_type: str, dead: list[str]) -> int:
    """Sum the archive and the `dead` files into a new archive, swap it in, remove the dead files."""
    from prometheus_client.mmap_dict import MmapedDict

    archive = os.path.join(path, archive_name(metric_type))
    totals, read, unreadable = _summed_values([archive, *dead])
    if _keeps_unreadable_archive(archive, unreadable):
        return 0
    for file_path, reason in unreadable.items():  # a dead file: it stays, and keeps counting
        say_once(
            f"metrics-unreadable-{file_path}",
            logging.WARNING,
            "serverhooks: metrics file %s is unreadable, not merged: %s",
            file_path,
            reason,
        )
    merged = [file_path for file_path in read if file_path != archive]
    if not merged:
        return 0
    # Written under a name a scrape does not read (not *.db), then renamed over the archive.
    scratch = f"{archive}.{os.getpid()}.tmp"
    try:
        values = MmapedDict(scratch)  # type: ignore[no-untyped-call]
        try:
            for key, value in totals.items():
                values.write_value(key, value, 0.0)  # type: ignore[no-untyped-call]
        finally:
            values.close()  # type: ignore[no-untyped-call]
        os.replace(scratch, archive)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(scratch)
        raise
    for file_path in merged:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(file_path)
    return len(merged)


def _keeps_unreadable_archive(archive: str, unreadable: dict[str, str]) -> bool:
    """True (and one WARNING per process) when the archive exists but cannot be read: a merge would
    write a new archive without its totals over it, and every total would go backwards. Its type's
    dead files then stay as they are (they keep counting) until the archive is readable again."""
    if archive not in unreadable:
        return False
    say_once(
        f"metrics-archive-unreadable-{archive}",
        logging.WARNING,
        "serverhooks: the metrics archive %s cannot be read (%s): dead workers' files are not merged into "
        "it (they keep counting where they are) until it is restored or removed; no total goes backwards.",
        archive,
        unreadable[archive],
    )
    return True


def compact_dead(path: str, *, at_least: int = COMPACT_AT) -> int:
    """Merge dead pids' counter, histogram and summary files into one archive per type, once at
    least `at_least` wait; the number of files merged. Never waits for the lock (another process
    is merging, or a scrape reads: the next new worker does it) and never raises.

    The directory must belong to one process tree, as prometheus_client requires: a pid that is
    not alive here must be gone for good (a writer in another pid namespace would lose counts)."""
    waiting = dead_summed_files(path)
    if sum(len(found) for found in waiting.values()) < at_least:
        return 0
    merged = 0
    try:
        with compaction_lock(path, exclusive=True, wait_seconds=0) as held:
            if not held:
                return 0
            for metric_type, dead in dead_summed_files(path).items():  # again: a peer may have merged them
                merged += _merge_into_archive(path, metric_type, dead)
    except Exception as exc:
        logger.warning("serverhooks: merging dead workers' metrics files failed: %s", describe_error(exc))
        return merged
    if merged:
        logger.debug("serverhooks: merged %d metrics files of dead processes", merged)
    return merged
