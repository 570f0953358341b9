"""What every server adapter does, in one place, so that each adapter is only its server's hooks.

- `never_raise(hook, server)`: an exception in a hook is logged and counted, never raised
  into the server (an exception in Gunicorn's post_fork halts the master; in uWSGI's
  post-fork chain it skips every later function).
- `once(key)`: run something once per process tree, under a lock.
- `worker_ready(first_worker_of_server=...)`: the worker-ready step, and the database
  probe, which runs in the first worker a server starts, and in no respawn.
- `arm_fork_guard()`: the fork guard, unless SERVERHOOKS['FORK_GUARD'] is off.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from serverhooks import _django, conf, forkguard, metrics, probe, worker
from serverhooks._log import describe_error, logger
from serverhooks._process import once, state

__all__ = ["arm_fork_guard", "never_raise", "once", "worker_ready"]


@contextlib.contextmanager
def never_raise(hook: str, server: str) -> Iterator[None]:
    """Log an exception from a hook instead of raising it into the server."""
    try:
        yield
    except Exception as exc:
        state().counters.add("errors", "")
        logger.warning("serverhooks: the %s hook failed: %s; %s carries on.", hook, describe_error(exc), server)
        logger.debug("serverhooks: %s traceback", hook, exc_info=True)


def arm_fork_guard() -> None:
    """The fork guard, once Django's connections exist in this process (and unless switched off)."""
    if _django.loaded_db() is not None:
        forkguard.arm_if_configured()


def worker_ready(*, first_worker_of_server: bool) -> None:
    """A worker has loaded the app: prepare it; the first worker of a server start also checks,
    in a background thread, that every database alias loads and answers (PROBE_DATABASES)."""
    # First (nothing unless configured): the sessions, pools and counters prepare_worker
    # finds or makes are then counted with their alias.
    metrics.enable_if_configured(worker=True)
    worker.prepare_worker()
    if first_worker_of_server and conf.get("PROBE_DATABASES") and _django.loaded_db() is not None:
        probe.probe_in_background()
