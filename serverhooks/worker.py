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

from serverhooks import (
    _django,
    _internals,
    conf,
    cursorguard,
    forkguard,
    greenlets,
    metrics,
    probe,
    registry,
    transactions,
)
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

    A connection another thread is still using (inside a query, or inside a transaction) is
    waited for (EXIT_WAIT), then left to the operating system and counted, rather than closed
    under that thread: Django's close() inside atomic() makes the block end without an error
    and without a commit, so a request could answer 200 with its writes gone. Left alone, the
    transaction commits as written if the thread gets there, or the server rolls it back as a
    whole when the process is gone.
    """
    if _django.loaded_db() is not None:
        counters = state().counters
        wrappers = registry.all_wrappers()
        still_used = _wait_until_unused(wrappers, conf.get("EXIT_WAIT"))
        for wrapper in wrappers:
            described = _django.describe_alias(wrapper.alias, wrapper.settings_dict)
            inside = still_used.get(id(wrapper))
            if inside is not None:
                counters.add("busy_at_exit", wrapper.alias)
                logger.warning(
                    "serverhooks: at exit, another thread is still inside %s on %s after %s s; "
                    "leaving that connection to the operating system.",
                    inside,
                    described,
                    conf.get("EXIT_WAIT"),
                )
                continue
            try:
                if registry.close_wrapper(wrapper):
                    counters.add("closed_at_exit", wrapper.alias)
            except Exception as exc:
                counters.add("errors", "")
                logger.warning("serverhooks: closing database %s at exit failed: %s", described, describe_error(exc))
        for key, pool in list(_internals.postgres_pools().items()):
            try:
                pool.close()
            except Exception as exc:
                logger.warning("serverhooks: closing the pool of %r at exit failed: %s", key, describe_error(exc))
    metrics.at_exit()  # a process that is gone must not count in live gauges
    level = logging.getLevelName(conf.get("STATS_LOG_LEVEL"))
    logger.log(level, "serverhooks: pid %d counters: %s", os.getpid(), redact(_format_counters()))


def _in_transaction(wrapper: Any) -> bool:
    """Is this connection inside a transaction (serverhooks.transactions.in_transaction)?"""
    return transactions.in_transaction(wrapper)


def _still_used(wrapper: Any, me: int) -> str | None:
    """What another thread is inside of on `wrapper` ("a query", "a transaction"), or None."""
    if wrapper.connection is None or _internals.thread_ident(wrapper) in (None, me):
        return None
    if cursorguard.busy(wrapper):
        return "a query"
    if _in_transaction(wrapper):
        return "a transaction"
    return None


def _wait_until_unused(wrappers: list[Any], seconds: float) -> dict[int, str]:
    """{id: what} of the wrappers another thread still uses after `seconds` (polled, bounded)."""
    me = threading.get_ident()
    deadline = time.monotonic() + seconds
    while True:
        used = {id(w): inside for w in wrappers if (inside := _still_used(w, me)) is not None}
        if not used or time.monotonic() >= deadline:
            return used
        time.sleep(0.02)


def _format_counters() -> str:
    return ", ".join(f"{key}={value}" for key, value in stats().items() if key != "pid")
