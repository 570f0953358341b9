"""Threads that give their Django connections back: drop-in `Thread` and `ThreadPoolExecutor`.

Why: Django opens one connection per thread and nothing closes it when the thread
is done. The wrapper sits in a reference cycle, so the session lingers until the
garbage collector happens to run: a loop that makes pools leaves hundreds behind.

    from serverhooks.threads import ThreadPoolExecutor, Thread

Each task (or thread) releases what it opened when it finishes: back to the gevent
pool where that is active, otherwise closed. For a thread we did not create, use
`releasing` as a decorator or a context manager.

`ThreadPoolExecutor(release="thread")` keeps a worker thread's connections across
its tasks and closes them when the executor shuts down (fewer connects for many
small tasks); it needs `shutdown(wait=True)` (or the `with` block) to be sure
nothing stays open. The default, `release="task"`, never leaves a session open.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
from collections.abc import Callable
from typing import Any, Literal, ParamSpec, TypeVar

from serverhooks import _django, health
from serverhooks.registry import close_wrapper
from serverhooks.release import release_connections

__all__ = ["Thread", "ThreadPoolExecutor", "releasing"]

P = ParamSpec("P")
R = TypeVar("R")


class releasing(contextlib.ContextDecorator):
    """Release this thread's connections on the way out of a block or a function."""

    def __enter__(self) -> releasing:
        return self

    def __exit__(self, *exc: object) -> None:
        release_connections()


def _run_then_release(function: Callable[P, R]) -> Callable[P, R]:
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return function(*args, **kwargs)
        finally:
            release_connections()

    return run


class Thread(threading.Thread):
    """`threading.Thread` whose connections are released when `run()` ends.

    Subclasses that override `run()` are covered too (see `__init_subclass__`).
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "run" in cls.__dict__:
            cls.run = _run_then_release(cls.__dict__["run"])  # type: ignore[method-assign]

    def run(self) -> None:
        try:
            super().run()
        finally:
            release_connections()


class ThreadPoolExecutor(concurrent.futures.ThreadPoolExecutor):
    """`concurrent.futures.ThreadPoolExecutor` whose tasks release their connections."""

    def __init__(
        self,
        max_workers: int | None = None,
        thread_name_prefix: str = "",
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        *,
        release: Literal["task", "thread"] = "task",
    ) -> None:
        if release not in ("task", "thread"):
            raise ValueError(f"release must be 'task' or 'thread', not {release!r}")
        super().__init__(max_workers, thread_name_prefix, initializer, initargs)
        self._release = release
        # release="thread": the wrappers each worker thread used, closed at shutdown.
        self._used_wrappers: dict[int, Any] = {}
        self._used_lock = threading.Lock()

    def submit(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> concurrent.futures.Future[R]:
        task = _run_then_release(fn) if self._release == "task" else self._remembering(fn)
        return super().submit(task, *args, **kwargs)

    def _remembering(self, function: Callable[P, R]) -> Callable[P, R]:
        def run(*args: P.args, **kwargs: P.kwargs) -> R:
            db = _django.loaded_db()
            if db is not None:
                # As Django at a request's start: expired (CONN_MAX_AGE) or broken sessions go,
                # and (serverhooks.health) sessions the server ended, after a restart say.
                for wrapper in db.connections.all(initialized_only=True):
                    health.watch(wrapper)
                    if not wrapper.in_atomic_block:
                        wrapper.close_if_unusable_or_obsolete()
            try:
                return function(*args, **kwargs)
            finally:
                if db is not None:
                    used = list(db.connections.all(initialized_only=True))
                    with self._used_lock:
                        self._used_wrappers.update((id(wrapper), wrapper) for wrapper in used)
                    for wrapper in used:
                        # As Django at a request's end: CONN_MAX_AGE, and broken sessions.
                        if not wrapper.in_atomic_block:
                            wrapper.close_if_unusable_or_obsolete()

        return run

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        super().shutdown(wait=wait, cancel_futures=cancel_futures)
        if self._release == "thread" and wait:
            # The worker threads have ended: nobody else can be using these now.
            with self._used_lock:
                wrappers, self._used_wrappers = list(self._used_wrappers.values()), {}
            for wrapper in wrappers:
                close_wrapper(wrapper)
