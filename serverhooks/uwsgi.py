"""uWSGI adapter. In uwsgi.ini:

    import = serverhooks.uwsgi

That puts serverhooks' after-fork step first in uWSGI's post-fork chain, so every
worker (respawns included) abandons inherited connections before anything else
runs, and registers a clean close at exit through `uwsgi.atexit`, which uWSGI also
calls from its gevent loop, where it skips Python's `atexit`.

Your own post-fork code, run after serverhooks' step:

    from serverhooks.uwsgi import postfork

    @postfork
    def everywhere(): ...

    @postfork(2)
    def only_in_worker_2(): ...

Outside uWSGI (tests, manage.py, Celery) nothing forks under uWSGI's control:
importing this module does nothing, and `postfork` returns your function unchanged
without ever calling it.

Note that uWSGI runs `os.register_at_fork` handlers only with `py-call-uwsgi-fork-hooks`
(both sides of the fork) or `py-call-osafterfork` (the child's side): this adapter's
post-fork step, not the fork guard, is what covers uWSGI's own forks. The shipped
uwsgi.ini sets `py-call-uwsgi-fork-hooks`, which also lets the master close its own
connections before it forks (uWSGI never runs Python when the master exits).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from typing import Any, TypeVar, overload

# Everything the workers run is imported here, in the master (see gunicorn.py).
from serverhooks import _adapter, _django, fork, metrics
from serverhooks._log import say_once
from serverhooks.worker import close_at_exit

__all__ = ["postfork"]

F = TypeVar("F", bound=Callable[[], Any])

try:  # only importable inside a uWSGI process
    import uwsgi
except ImportError:
    uwsgi = None


def _never_raise(hook: str) -> contextlib.AbstractContextManager[None]:
    return _adapter.never_raise(hook, "uWSGI")


def _has_master() -> bool:
    return uwsgi is not None and bool(uwsgi.masterpid())


def _first_worker_of_server() -> bool:
    """Worker 1 on its first spawn: the one that checks the databases, as Gunicorn's first worker does."""
    if uwsgi is None or uwsgi.worker_id() != 1:
        return False
    try:
        me = next(w for w in uwsgi.workers() if w.get("id") == 1)
        return int(me.get("respawn_count", 0)) == 0  # 0 on the first spawn, 1 on the first respawn
    except Exception:  # an older uWSGI without the count: probing once more is harmless
        return True


def _prepare_when_app_is_loaded() -> None:
    """The worker-ready step needs the app (and gevent's patch): now, or at the first request."""
    if _django.loaded_settings_are_configured():
        _adapter.worker_ready(first_worker_of_server=_first_worker_of_server())
        return
    # lazy-apps: this runs before the app is imported; Django's first request
    # signal comes after both the app and any gevent patching.
    from django.core.signals import request_started

    def prepare_once(**kwargs: Any) -> None:
        request_started.disconnect(dispatch_uid="serverhooks.uwsgi.prepare")
        with _never_raise("first request"):
            _adapter.worker_ready(first_worker_of_server=_first_worker_of_server())

    request_started.connect(prepare_once, weak=False, dispatch_uid="serverhooks.uwsgi.prepare")


def after_fork_in_worker() -> None:
    """First in uWSGI's post-fork chain, in every worker: abandon, then get ready."""
    with _never_raise("postfork"):
        fork.abandon_inherited()
        _prepare_when_app_is_loaded()


def _close_in_master_before_fork() -> None:
    """Master only, before each fork (with py-call-uwsgi-fork-hooks): like Gunicorn's
    pre_fork. uWSGI never runs Python at the master's exit, so this is the one
    chance to end the session the master opened while loading the app."""
    if uwsgi is not None and uwsgi.worker_id() == 0 and uwsgi.masterpid() == os.getpid():
        with _never_raise("before fork (master)"):
            metrics.enable_if_configured(worker=False)  # the master's own counters
            fork.close_before_fork()


def _close_at_exit() -> None:
    with _never_raise("atexit"):
        close_at_exit()


def install() -> None:
    """What `import = serverhooks.uwsgi` does; idempotent."""
    if uwsgi is None or not _adapter.once("uwsgi.install"):
        return
    previous_atexit = getattr(uwsgi, "atexit", None)

    def at_exit() -> None:
        if previous_atexit is not None:
            previous_atexit()  # the user's code may still need the database
        _close_at_exit()

    uwsgi.atexit = at_exit
    if not _has_master():
        say_once(
            "uwsgi-no-master",
            logging.WARNING,
            "serverhooks: uWSGI runs without a master process (set master = true): uwsgidecorators "
            "needs one, and without a master there is no fork to guard. serverhooks only prepares "
            "this process and closes its connections at exit.",
        )
        with _never_raise("import"):
            _prepare_when_app_is_loaded()
        return
    import uwsgidecorators

    os.register_at_fork(before=_close_in_master_before_fork)
    # First in the chain, even if user code registered its functions before us.
    uwsgidecorators.postfork_chain.insert(0, after_fork_in_worker)
    if uwsgi.worker_id() > 0:
        # lazy-apps: imported in a worker that already forked; its chain has run.
        after_fork_in_worker()


@overload
def postfork(target: F) -> F: ...
@overload
def postfork(target: int) -> Callable[[F], F]: ...


def postfork(target: Any) -> Any:
    """Run a function in every uWSGI worker after each fork (respawns too), once
    serverhooks abandoned the inherited connections. `@postfork(N)`: worker N only.

    Outside uWSGI, or without a master, the function is returned unchanged and never called.
    """
    if callable(target):
        return _register(target, worker_id=0)
    worker_id = int(target)
    return lambda function: _register(function, worker_id)


def _register(function: F, worker_id: int) -> F:
    if not _has_master():
        return function
    import uwsgidecorators

    def run() -> None:
        if worker_id and uwsgi.worker_id() != worker_id:
            return
        fork.abandon_inherited()  # idempotent; covers a chain where ours is missing
        function()

    uwsgidecorators.postfork_chain.append(run)
    return function


install()
