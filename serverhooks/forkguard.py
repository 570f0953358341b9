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

from serverhooks import lifecycle
from serverhooks._log import describe_error, logger

_registered = False
_enabled = False


def _before() -> None:
    if _enabled:
        try:
            lifecycle.hold_for_fork()
        except Exception as exc:
            logger.warning("serverhooks: fork guard (parent, before fork): %s", describe_error(exc))


def _after_in_parent() -> None:
    lifecycle.release_hold()


def _after_in_child() -> None:
    if _enabled:
        try:
            lifecycle.abandon_inherited_after_guarded_fork()
        except Exception as exc:
            logger.warning("serverhooks: fork guard (child): %s", describe_error(exc))
    else:
        lifecycle.release_hold()


def install_fork_guard() -> None:
    """Treat the child of every later `os.fork()` in this process and its descendants."""
    global _registered, _enabled
    _enabled = True
    if not _registered:
        os.register_at_fork(before=_before, after_in_parent=_after_in_parent, after_in_child=_after_in_child)
        _registered = True


def uninstall_fork_guard() -> None:
    """Turn the guard's handlers into no-ops (they cannot be unregistered)."""
    global _enabled
    _enabled = False


def fork_guard_installed() -> bool:
    return _enabled
