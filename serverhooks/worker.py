"""A worker's life: get ready once the app is loaded, close cleanly at exit.

=====================  ==================  ==============================================
call                   process             effect
=====================  ==================  ==============================================
prepare_worker()       worker, app ready   track connections, guard forks, gevent support
close_at_exit()        exiting process     close this process's connections cleanly
=====================  ==================  ==============================================
"""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from typing import Any

from serverhooks import _django, _internals, conf, cursorguard, forkguard, greenlets, metrics, probe, registry
from serverhooks._log import describe_error, logger, redact
from serverhooks._process import state
from serverhooks.counters import stats

__all__ = ["close_at_exit", "prepare_worker"]


def prepare_worker(*, probe_databases: bool | None = None) -> None:
    """Worker ready (app loaded, after any gevent patching): track, guard, and set gevent up.

    `probe_databases` is deprecated: whether to probe is SERVERHOOKS['PROBE_DATABASES'], and
    which worker probes is the adapter's business (serverhooks._adapter.worker_ready).
    """
    if probe_databases is not None:
        warnings.warn(
            "prepare_worker(probe_databases=...) is deprecated and goes in the next release: the adapters "
            "probe in the first worker of a server, as SERVERHOOKS['PROBE_DATABASES'] says.",
            DeprecationWarning,
            stacklevel=2,
        )
    if _django.load_settings() is not _django.DjangoStatus.READY:
        return
    try:
        import django.db  # noqa: F401 - safe here: the worker is past any patching
    except Exception as exc:
        logger.warning("serverhooks: cannot import django.db: %s", describe_error(exc))
        return
    registry.start_tracking()
    forkguard.arm_if_configured()
    if greenlets.gevent_patched():
        greenlets.prepare_gevent_worker()
    if probe_databases and conf.get("PROBE_DATABASES"):
        probe.probe_in_background()


def close_at_exit() -> None:
    """Exiting process: close its connections with a proper goodbye, log the counters.

    A connection another thread is still inside a query on is waited for (EXIT_WAIT),
    then left to the operating system and counted, rather than closed under that query.
    """
    if _django.loaded_db() is not None:
        counters = state().counters
        wrappers = registry.all_wrappers()
        busy = _wait_until_idle(wrappers, conf.get("EXIT_WAIT"))
        for wrapper in wrappers:
            described = _django.describe_alias(wrapper.alias, wrapper.settings_dict)
            if id(wrapper) in busy:
                counters.add("busy_at_exit", wrapper.alias)
                logger.warning(
                    "serverhooks: at exit, another thread is still inside a query on %s after %s s; "
                    "leaving that connection to the operating system.",
                    described,
                    conf.get("EXIT_WAIT"),
                )
                continue
            try:
                if registry.close_wrapper(wrapper):
                    counters.add("closed_at_exit", wrapper.alias)
            except Exception as exc:
                counters.errors += 1
                logger.warning("serverhooks: closing database %s at exit failed: %s", described, describe_error(exc))
        for key, pool in list(_internals.postgres_pools().items()):
            try:
                pool.close()
            except Exception as exc:
                logger.warning("serverhooks: closing the pool of %r at exit failed: %s", key, describe_error(exc))
    metrics.at_exit()  # a process that is gone must not count in live gauges
    level = logging.getLevelName(conf.get("STATS_LOG_LEVEL"))
    logger.log(level, "serverhooks: pid %d counters: %s", os.getpid(), redact(_format_counters()))


def _wait_until_idle(wrappers: list[Any], seconds: float) -> set[int]:
    """ids of the wrappers still inside a query in another thread after `seconds` (polled, bounded)."""
    me = threading.get_ident()
    deadline = time.monotonic() + seconds
    while True:
        busy = {
            id(w)
            for w in wrappers
            if w.connection is not None and _internals.thread_ident(w) not in (None, me) and cursorguard.busy(w)
        }
        if not busy or time.monotonic() >= deadline:
            return busy
        time.sleep(0.02)


def _format_counters() -> str:
    return ", ".join(f"{key}={value}" for key, value in stats().items() if key != "pid")
