"""Celery adapter: `import serverhooks.celery` in the module that defines your Celery app.

Signal handlers, named after the signals they serve:

=====================================  ===========================================
signal                                 what serverhooks does
=====================================  ===========================================
worker_init (main process)             track connections, arm the fork guard
worker_process_init (pool child)       abandon inherited connections (no network I/O)
worker_ready (main process)            gevent/eventlet-less pools: prepare the worker
task_prerun (where the task runs)      replace idle sessions the server ended (no round trip)
task_postrun (where the task ran)      release: back to the gevent pool, or close
                                       connections that are obsolete or broken
                                       (eager tasks: nothing, they are the caller's)
worker_process_shutdown (pool child)   close cleanly
worker_shutdown (main process)         close cleanly
=====================================  ===========================================

They are connected when this module is imported, so they run before Celery's own
Django fixup connects its handlers (at worker start). That fixup closes each
inherited socket with a bare `os.close()` and then calls `close()` on the
connection, which can write into whatever file reuses that fd number; by the time
it runs, serverhooks has already detached the connection, so it finds nothing to do.
"""

from __future__ import annotations

from typing import Any

try:
    from celery import signals
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "serverhooks.celery needs Celery: pip install 'serverhooks[celery]' (or pip install celery)."
    ) from exc

from serverhooks import _adapter, _django, conf, fork, registry
from serverhooks.pool import active as pools
from serverhooks.worker import close_at_exit

__all__ = [
    "on_task_postrun",
    "on_task_prerun",
    "on_worker_init",
    "on_worker_process_init",
    "on_worker_process_shutdown",
    "on_worker_ready",
    "on_worker_shutdown",
]


def _guarded(hook: str) -> Any:
    return _adapter.never_raise(hook, "Celery")


def on_worker_init(**kwargs: Any) -> None:
    """Main process, before the pool starts: follow connections and guard the pool's forks."""
    with _guarded("worker_init"):
        registry.start_tracking()
        _adapter.arm_fork_guard()


def on_worker_process_init(**kwargs: Any) -> None:
    """Prefork pool child, first thing: abandon what the parent had open."""
    with _guarded("worker_process_init"):
        fork.abandon_inherited()
        _adapter.worker_ready(first_worker_of_server=False)


def on_worker_ready(**kwargs: Any) -> None:
    """Main process, consuming: the threads and gevent pools run tasks right here."""
    with _guarded("worker_ready"):
        # The main process, once per worker start: it also checks the databases.
        _adapter.worker_ready(first_worker_of_server=True)


def _is_eager(task: Any) -> bool:
    """`apply()` and `task_always_eager` run the task inline, in the caller's thread: its
    connections are the caller's, maybe inside the caller's `atomic()`. Celery's own
    Django fixup leaves them alone too."""
    return bool(getattr(getattr(task, "request", None), "is_eager", False))


def on_task_prerun(task: Any = None, **kwargs: Any) -> None:
    """Where the task runs, before it starts: replace idle sessions the server ended."""
    with _guarded("task_prerun"):
        if _is_eager(task) or not conf.get("CHECK_IDLE_SESSIONS"):
            return
        if _django.loaded_db() is not None:
            from serverhooks import health

            health.close_ended_in_this_thread()


def on_task_postrun(task: Any = None, **kwargs: Any) -> None:
    """Where the task ran: give its connections back.

    Under the gevent pool they return to serverhooks' pool. Elsewhere a worker
    process or thread runs task after task, so persistent connections stay, and
    only broken or expired ones (CONN_MAX_AGE) are closed, as Django does at the
    end of a request. Eager tasks are the caller's business: nothing is released.
    """
    with _guarded("task_postrun"):
        if _is_eager(task):
            return
        if pools.any_active():
            pools.release_current()
            return
        db = _django.loaded_db()
        if db is not None:
            for wrapper in db.connections.all(initialized_only=True):
                wrapper.close_if_unusable_or_obsolete()


def on_worker_process_shutdown(**kwargs: Any) -> None:
    with _guarded("worker_process_shutdown"):
        close_at_exit()


def on_worker_shutdown(**kwargs: Any) -> None:
    with _guarded("worker_shutdown"):
        close_at_exit()


_CONNECTIONS = {
    signals.worker_init: on_worker_init,
    signals.worker_process_init: on_worker_process_init,
    signals.worker_ready: on_worker_ready,
    signals.task_prerun: on_task_prerun,
    signals.task_postrun: on_task_postrun,
    signals.worker_process_shutdown: on_worker_process_shutdown,
    signals.worker_shutdown: on_worker_shutdown,
}
for _signal, _handler in _CONNECTIONS.items():
    _signal.connect(_handler, weak=False, dispatch_uid=f"serverhooks.celery.{_handler.__name__}")
