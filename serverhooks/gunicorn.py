"""Gunicorn adapter. In gunicorn.conf.py, first line:

    from serverhooks.gunicorn import *

That installs the hooks below for every worker class. To keep a hook of your
own, decorate it with `chain`, which runs serverhooks' hook of the same name too:

    from serverhooks.gunicorn import chain

    @chain
    def post_fork(server, worker):
        ...

Importing this module is free: no `django.db`, no settings, no database.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from typing import Any

# Everything the workers run is imported here, in the master: that spares every worker the
# import (and its copy-on-write page faults). None of it imports django.db.
from serverhooks import _adapter, _django, _internals, asgi, fork, metrics, registry
from serverhooks._log import logger, say_once
from serverhooks.worker import close_at_exit


def _has_dirty_arbiter() -> bool:
    """Gunicorn 25+ has a dirty arbiter, with hooks of its own (gunicorn is imported already here)."""
    try:
        import gunicorn

        return tuple(gunicorn.version_info) >= (25, 0)
    except Exception:
        return False


_HOOK_NAMES = [
    "child_exit", "on_exit", "on_starting", "post_fork", "post_worker_init", "pre_exec", "pre_fork", "worker_exit",
]  # fmt: skip
_DIRTY_HOOK_NAMES = ["dirty_post_fork", "dirty_worker_exit", "dirty_worker_init", "on_dirty_starting"]
# What `from serverhooks.gunicorn import *` installs: the dirty arbiter's hooks only where they exist.
__all__ = sorted(_HOOK_NAMES + (_DIRTY_HOOK_NAMES if _has_dirty_arbiter() else []))

Hook = Callable[..., None]


def _never_raise(hook: str) -> contextlib.AbstractContextManager[None]:
    return _adapter.never_raise(hook, "Gunicorn")


def _route_logs_to_gunicorn(glog: Any) -> None:
    """Without logging config of its own, `serverhooks` logs into Gunicorn's error log."""
    if logger.handlers or logging.getLogger().handlers:
        return
    error_log = getattr(glog, "error_log", None)
    if not isinstance(error_log, logging.Logger) or not error_log.handlers:
        return
    for handler in error_log.handlers:
        logger.addHandler(handler)
    logger.setLevel(error_log.level)
    logger.propagate = False


def _warn_about_replaced_hooks(cfg: Any) -> None:
    """A hook defined after the star import silently replaces ours: say how to keep both.

    Once per master: workers inherit that it was done (and the config) from it.
    """
    if not _adapter.once("gunicorn.replaced-hooks"):
        return
    for name in __all__:
        try:
            current = cfg.settings[name].get()
        except Exception:
            continue
        if not getattr(current, "__serverhooks__", False):
            say_once(
                f"gunicorn-replaced-{name}",
                logging.WARNING,
                "serverhooks: gunicorn.conf.py defines its own %s, which replaces serverhooks' one. "
                "Decorate it with @serverhooks.gunicorn.chain to run both.",
                name,
            )


def _say_if_django_unusable() -> None:
    status = _django.status_without_importing()
    if status is not _django.DjangoStatus.READY:
        say_once(f"django-{status.name}", logging.INFO, "serverhooks: %s; the hooks do nothing.", status.value)


def _ours(function: Hook) -> Hook:
    function.__serverhooks__ = True  # type: ignore[attr-defined]
    return function


@_ours
def on_starting(server: Any) -> None:
    """Master, app preloaded, before any fork. Gunicorn 25+ forks its dirty arbiter right after,
    with no pre_fork: close here, so that it inherits nothing, and arm the fork guard."""
    with _never_raise("on_starting"):
        _route_logs_to_gunicorn(server.log)
        _warn_about_replaced_hooks(server.cfg)
        metrics.enable_if_configured(worker=False)  # the master's own counters (closed_before_fork)
        fork.close_before_fork()
        _adapter.arm_fork_guard()


@_ours
def pre_fork(server: Any, worker: Any) -> None:
    """Master, before each fork: close connections, pools and caches; arm the fork guard."""
    with _never_raise("pre_fork"):
        _route_logs_to_gunicorn(server.log)
        _warn_about_replaced_hooks(server.cfg)
        _say_if_django_unusable()
        metrics.enable_if_configured(worker=False)  # idempotent; on_starting did it where it ran
        fork.close_before_fork()
        _adapter.arm_fork_guard()


@_ours
def post_fork(server: Any, worker: Any) -> None:
    """Worker, right after the fork: abandon every inherited connection."""
    with _never_raise("post_fork"):
        fork.abandon_inherited()


@_ours
def post_worker_init(worker: Any) -> None:
    """Worker, app loaded (and gevent patched): track connections, guard forks, probe once;
    under an ASGI worker, give its request threads a pool (serverhooks.asgi)."""
    with _never_raise("post_worker_init"):
        _route_logs_to_gunicorn(worker.log)
        _warn_about_replaced_hooks(worker.cfg)
        if asgi.is_asgi_worker(worker):
            asgi.install()  # first, so that the probe below borrows a pooled session too
        # The first worker a master spawns checks the databases; respawns do not.
        _adapter.worker_ready(first_worker_of_server=getattr(worker, "age", 0) == 1)


@_ours
def worker_exit(server: Any, worker: Any) -> None:
    """Worker exiting: close cleanly. Also runs in the master for a worker that is gone."""
    with _never_raise("worker_exit"):
        if getattr(worker, "pid", None) != os.getpid():
            # Gunicorn calls this in the master when kill() found the worker gone
            # (ESRCH). Its connections died with it; the master's are not its own.
            logger.debug("serverhooks: worker %s is already gone; nothing to close here", worker.pid)
            return
        close_at_exit()


@_ours
def child_exit(server: Any, worker: Any) -> None:
    """Master, a worker gone (recycled, killed or crashed): remove its live gauges' files, as
    prometheus_client's mark_process_dead does, so that /metrics stops counting it."""
    with _never_raise("child_exit"):
        metrics.mark_process_dead(worker.pid)


@_ours
def pre_exec(server: Any) -> None:
    """Re-exec child (USR2), before exec: nothing inherited may survive into the new master."""
    with _never_raise("pre_exec"):
        fork.abandon_inherited()


@_ours
def on_exit(server: Any) -> None:
    """Master exiting: close whatever it opened since the last fork."""
    with _never_raise("on_exit"):
        close_at_exit()


@_ours
def on_dirty_starting(arbiter: Any) -> None:
    """The dirty arbiter, first thing (Gunicorn 25+): abandon what it inherited from the master,
    and guard the forks of its dirty workers, which run no pre_fork or post_fork either."""
    with _never_raise("on_dirty_starting"):
        fork.abandon_inherited()
        registry.start_tracking()
        _adapter.arm_fork_guard()


@_ours
def dirty_post_fork(arbiter: Any, worker: Any) -> None:
    """The dirty arbiter, after forking a dirty worker: nothing to do (the fork guard did it);
    here so that @chain keeps a hook of your own."""


@_ours
def dirty_worker_init(worker: Any) -> None:
    """A dirty worker, its apps loaded: get ready as a worker does, and close cleanly at its exit
    (dirty workers leave with os._exit, so neither worker_exit nor atexit runs there)."""
    with _never_raise("dirty_worker_init"):
        fork.abandon_inherited()
        _adapter.worker_ready(first_worker_of_server=False)
        _internals.run_after_dirty_worker_cleanup(worker, close_at_exit)


@_ours
def dirty_worker_exit(arbiter: Any, worker: Any) -> None:
    """The dirty arbiter, after a dirty worker exited: nothing to do (it closed its own
    connections); here so that @chain keeps a hook of your own."""


_HOOKS: dict[str, Hook] = {name: globals()[name] for name in _HOOK_NAMES + _DIRTY_HOOK_NAMES}
# Ours run first where the user's code should see a clean process, last where it
# may still want the database.
_OURS_LAST = {"worker_exit", "on_exit", "dirty_worker_exit"}


def chain(user_hook: Hook) -> Hook:
    """Decorator: keep your own Gunicorn hook and serverhooks' one of the same name.

    It raises TypeError at config load for an unknown name or a wrong number of
    arguments, with the signature Gunicorn expects.
    """
    import inspect

    name = getattr(user_hook, "__name__", "")
    ours = _HOOKS.get(name)
    if ours is None:
        raise TypeError(
            f"@chain: serverhooks has no Gunicorn hook named {name!r}; it chains: {', '.join(sorted(_HOOKS))}."
        )
    params = list(inspect.signature(ours).parameters)
    try:
        inspect.signature(user_hook).bind(*params)
    except TypeError:
        raise TypeError(f"@chain: {name} must accept ({', '.join(params)}), as Gunicorn calls it.") from None
    first, second = (user_hook, ours) if name in _OURS_LAST else (ours, user_hook)

    def run_both(*args: Any) -> None:
        first(*args)
        second(*args)

    # Gunicorn checks a hook's arity, so the chained hook takes exactly our arguments.
    run_both.__signature__ = inspect.signature(ours)  # type: ignore[attr-defined]
    run_both.__name__ = name
    run_both.__doc__ = user_hook.__doc__
    run_both.__wrapped_hooks__ = (first, second)  # type: ignore[attr-defined]
    return _ours(run_both)
