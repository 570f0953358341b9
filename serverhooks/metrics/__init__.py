"""Prometheus metrics: serverhooks' counters and pool gauges, in prometheus_client's multiprocess files.

On only where the user already runs prometheus_client in multiprocess mode: the package is
installed, `PROMETHEUS_MULTIPROC_DIR` is set, and SERVERHOOKS['METRICS'] is not off. Then
each process writes its values into that directory's mmap'd files, the ones any
MultiProcessCollector endpoint (django-prometheus's, the user's own, or
serverhooks.metrics.django.metrics_view) already merges: there is never a second endpoint.

Everything here is free when metrics are off: this module imports neither prometheus_client
nor Django, and the pool core only checks `observer is not None` when it creates a pool or a
checkout has to wait.

=================================  ==========================  ================================
call                               where                       effect
=================================  ==========================  ================================
enable_if_configured(worker=...)   a master before forking,    create the metrics, mirror this
                                   each worker once ready      process's counters; a worker
                                                               also sweeps dead pids' live gauges
                                                               and merges their counter files
mark_process_dead(pid)             Gunicorn's master           remove a dead worker's live gauges
at_exit()                          an exiting process          remove its own live gauges
=================================  ==========================  ================================
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import TYPE_CHECKING

from serverhooks import conf
from serverhooks._log import describe_error, logger, say_once

if TYPE_CHECKING:
    from serverhooks.metrics._meter import Meter

__all__ = ["at_exit", "directory", "enable_if_configured", "mark_process_dead", "meter"]

ENV_VAR = "PROMETHEUS_MULTIPROC_DIR"

#: This process's meter, or None while metrics are off; also the pool core's observer (set
#: here: the pools never import metrics). It stays None unless everything below succeeded.
meter: Meter | None = None


def directory() -> str | None:
    """PROMETHEUS_MULTIPROC_DIR when metrics are wanted and prometheus_client is installed; else None.

    Never imports prometheus_client (find_spec only locates it)."""
    path = os.environ.get(ENV_VAR)
    if not path or not conf.get("METRICS"):
        return None
    try:
        if importlib.util.find_spec("prometheus_client") is None:
            logger.debug("serverhooks: %s is set but prometheus_client is not installed: no metrics", ENV_VAR)
            return None
    except (ImportError, ValueError):
        return None
    return path


def _unusable(path: str) -> str | None:
    """Why `path` cannot hold the multiprocess files, or None. prometheus_client would raise at the
    first metric it creates there (in the middle of a request); we say so once, up front."""
    if not os.path.isdir(path):
        return "it does not exist or is not a directory"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"this process (uid {os.getuid()}) cannot write to it"
    return None


def enable_if_configured(*, worker: bool) -> bool:
    """Start exporting this process's counters (and, in a worker, its pools); True if metrics are on.

    Idempotent per process; never raises. A misconfiguration is one WARNING that names the fix,
    and the server carries on without metrics."""
    global meter
    path = directory()
    if path is None:
        return False
    problem = _unusable(path)
    if problem is not None:
        say_once(
            "metrics-directory",
            logging.WARNING,
            "serverhooks: no metrics: %s=%s is unusable (%s). Create that directory, writable by the server's "
            "user, and empty it before each server start; or unset %s, or set SERVERHOOKS_METRICS=0. "
            "The server keeps serving.",
            ENV_VAR,
            path,
            problem,
            ENV_VAR,
        )
        return False
    try:
        from serverhooks.metrics import _meter

        if meter is None:
            created = _meter.Meter.create()
            if created is None:
                return False
            meter = created
        meter.attach(worker=worker)
        from serverhooks.pool import core

        core.observer = meter
        if worker:
            # uWSGI's master runs no Python when a worker dies, and a harakiri'd or killed worker
            # cannot clean up after itself: each new worker removes what the dead left behind,
            # and merges their counter files once enough wait (a bounded scrape time).
            from serverhooks.metrics import files

            files.sweep_dead(path)
            if conf.get("METRICS_MERGE_AT") > 0:
                files.compact_dead(path, at_least=conf.get("METRICS_MERGE_AT"))
    except Exception as exc:
        meter = None
        _stop_observing()
        say_once(
            "metrics-failed",
            logging.WARNING,
            "serverhooks: no metrics: setting them up failed: %s. Set SERVERHOOKS_METRICS=0 to silence this; "
            "the server keeps serving.",
            describe_error(exc),
        )
        return False
    return True


def _stop_observing() -> None:
    from serverhooks.pool import core  # imports neither Django nor prometheus_client

    core.observer = None


def mark_process_dead(pid: int) -> None:
    """A worker is gone (Gunicorn's child_exit): remove its live gauges, as prometheus_client's
    `multiprocess.mark_process_dead` does. Nothing at all when metrics are off."""
    path = directory()
    if path is None or _unusable(path) is not None:
        return
    from serverhooks.metrics import files

    files.mark_dead(pid, path)


def at_exit() -> None:
    """This process exits: its live gauges go with it (a scrape must not count it any more)."""
    if meter is None:
        return
    path = directory()
    if path is not None:
        from serverhooks.metrics import files

        files.mark_dead(os.getpid(), path)
