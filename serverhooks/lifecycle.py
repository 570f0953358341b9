"""Deprecated: the old home of the core's functions, kept for one release.

The core now has one module per job: serverhooks.registry (tracking), serverhooks.fork
(close before fork, abandon after), serverhooks.worker (worker ready, exit) and
serverhooks.release. The public functions are in `serverhooks` itself, as before.
"""

from __future__ import annotations

import warnings

from serverhooks.fork import abandon_inherited, close_before_fork
from serverhooks.registry import close_wrapper, start_tracking
from serverhooks.release import release_connections
from serverhooks.worker import close_at_exit, prepare_worker

__all__ = [
    "abandon_inherited",
    "close_at_exit",
    "close_before_fork",
    "close_wrapper",
    "prepare_worker",
    "release_connections",
    "start_tracking",
]

warnings.warn(
    "serverhooks.lifecycle is deprecated and goes in the next release: import the functions from "
    "serverhooks (abandon_inherited, close_at_exit, close_before_fork, prepare_worker, release_connections), "
    "or serverhooks.registry (start_tracking, close_wrapper).",
    DeprecationWarning,
    stacklevel=2,
)
