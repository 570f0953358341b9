"""The fork guard: `os.register_at_fork` handlers for forks no server hook sees.

multiprocessing's fork start method, `os.fork()` in user code and libraries that
fork all bypass Gunicorn's and uWSGI's hooks. The guard gives their children the
same treatment (`abandon_inherited`) and leaves the parent's connections open,
because such a fork can happen anywhere, even inside a transaction.

`os.register_at_fork` cannot be undone, so uninstalling turns the handlers into
no-ops. Installing twice registers once.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from serverhooks import conf, fork, registry
from serverhooks._log import describe_error, logger
from serverhooks._process import once

__all__ = ["arm_if_configured", "fork_guard_installed", "install_fork_guard", "uninstall_fork_guard"]

_enabled = False


def _quietly(step: Callable[[], object], where: str) -> None:
    """An at-fork handler must never raise: it would surface in whatever code forked."""
    try:
        step()
    except Exception as exc:
        logger.warning("serverhooks: fork guard (%s): %s", where, describe_error(exc))


def _before() -> None:
    if _enabled:
        _quietly(fork.hold_for_fork, "parent, before fork")


def _after_in_parent() -> None:
    fork.release_hold()


def _after_in_child() -> None:
    _quietly(fork.abandon_after_guarded_fork if _enabled else fork.release_hold, "child")


def install_fork_guard() -> None:
    """Treat the child of every later `os.fork()` in this process and its descendants.

    It also starts tracking connections (now, or as soon as `django.db` is imported): without
    it, other threads' connections are out of the guard's reach."""
    global _enabled
    _enabled = True
    registry.track_from_django_db_import()
    if once("forkguard.register_at_fork"):
        os.register_at_fork(before=_before, after_in_parent=_after_in_parent, after_in_child=_after_in_child)


def uninstall_fork_guard() -> None:
    """Turn the guard's handlers into no-ops (they cannot be unregistered). Tracking, once started,
    stays: the exit and the server hooks use it too."""
    global _enabled
    _enabled = False
    registry.stop_waiting_for_django_db()


def fork_guard_installed() -> bool:
    return _enabled


def arm_if_configured() -> None:
    """Install the guard unless SERVERHOOKS['FORK_GUARD'] is off: what every adapter does."""
    if conf.get("FORK_GUARD"):
        install_fork_guard()
