"""serverhooks: Django database connections that survive forking servers.

Importing this package (or any adapter) is free: it does not import `django.db`,
read settings or open a connection. The work happens inside the hooks.

The function API below is what the shipped adapters call; call it yourself from
a server we ship no adapter for:

    close_before_fork()   in the parent, right before it forks workers
    abandon_inherited()   in each child, first thing after the fork
    prepare_worker()      in each worker, once the app is loaded
    close_at_exit()       in each worker, as it exits
    release_connections() when a request, task or thread's work is done
"""

from __future__ import annotations

from serverhooks.counters import stats
from serverhooks.fork import abandon_inherited, close_before_fork
from serverhooks.forkguard import fork_guard_installed, install_fork_guard, uninstall_fork_guard
from serverhooks.release import release_connections
from serverhooks.worker import close_at_exit, prepare_worker

__version__ = "0.1.0"

__all__ = [
    "abandon_inherited",
    "close_at_exit",
    "close_before_fork",
    "fork_guard_installed",
    "install_fork_guard",
    "prepare_worker",
    "release_connections",
    "stats",
    "uninstall_fork_guard",
]
