"""Run Django's runtests.py in this process, plain or with serverhooks' worker preparation.

    python -m bench.django_suite_support.launch {plain|prepared} PATH/TO/runtests.py [runtests.py options]

plain:    runtests.py exactly as `python runtests.py ...` runs it (with sys.path[0] its folder).
prepared: the same, but `serverhooks.prepare_worker()` runs right after every `django.setup()`:
          runtests.py's own call in the main process, and in each parallel test worker. Django
          passes its pool workers `ParallelTestSuite.init_worker`; ours is importable by name, so a
          spawned worker (spawn/forkserver start methods) prepares itself after its own
          `django.setup()`, and a forked one (Linux's default before Python 3.14), which inherits
          the prepared parent, calls `prepare_worker()` after Django switched it to its clone
          database, as a server's worker would after its fork.

Every prepared process appends a JSON line to $DJANGO_SUITE_MARKS (pid, where serverhooks was
imported from, whether the fork guard is on) and, when it ends, another with its counters.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
from typing import Any

ARMS = ("plain", "prepared")
MARKS_ENV = "DJANGO_SUITE_MARKS"


def _mark(event: str, **fields: Any) -> None:
    path = os.environ.get(MARKS_ENV)
    if not path:
        return
    with open(path, "a", encoding="utf-8") as sink:
        sink.write(json.dumps({"pid": os.getpid(), "event": event, **fields}) + "\n")


def _at_exit() -> None:
    import serverhooks

    _mark("exit", counters=serverhooks.stats())


def _prepare(where: str) -> None:
    from django.db.backends.signals import connection_created

    import serverhooks
    from bench.django_suite_support import recorder

    recorder.collect_serverhooks_log()
    serverhooks.prepare_worker()
    _mark(
        "prepared",
        where=where,
        serverhooks=serverhooks.__file__,
        tracking=connection_created.has_listeners(),
        fork_guard=serverhooks.fork_guard_installed(),
    )


def init_prepared_worker(*args: Any, **kwargs: Any) -> None:
    """Django's `_init_worker` for a parallel test worker, then `prepare_worker()` (picklable by name)."""
    import multiprocessing.util

    from django.test import runner

    install_preparation()  # a spawned worker: before the django.setup() that _init_worker makes
    runner._init_worker(*args, **kwargs)  # type: ignore[attr-defined]
    _prepare("parallel worker, after Django's _init_worker")
    # A pool worker ends with os._exit(): atexit never runs there, multiprocessing's finalizers do.
    multiprocessing.util.Finalize(None, _at_exit, exitpriority=0)


def install_preparation() -> None:
    """Wrap `django.setup` so that `prepare_worker()` follows it; idempotent."""
    import django

    if getattr(django.setup, "_django_suite_prepared", False):
        return
    original = django.setup

    def setup(set_prefix: bool = True) -> None:
        original(set_prefix)
        _prepare("right after django.setup()")
        # runtests.py imported the runner already; its parallel workers are prepared too.
        from django.test.runner import ParallelTestSuite

        ParallelTestSuite.init_worker = init_prepared_worker

    setup._django_suite_prepared = True  # type: ignore[attr-defined]
    django.setup = setup


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[0] not in ARMS:
        raise SystemExit(f"usage: python -m bench.django_suite_support.launch {{{'|'.join(ARMS)}}} runtests.py [...]")
    arm, runtests, rest = argv[0], os.path.abspath(argv[1]), argv[2:]
    sys.argv = [runtests, *rest]
    sys.path[0] = os.path.dirname(runtests)  # as `python runtests.py` would have it
    if arm == "prepared":
        install_preparation()
        import atexit

        atexit.register(_at_exit)
    runpy.run_path(runtests, run_name="__main__")


if __name__ == "__main__":
    # Run as the module's real name, not __main__: a spawned test worker finds
    # init_prepared_worker by that name (its __main__ is runtests.py).
    from bench.django_suite_support.launch import main as real_main

    real_main(sys.argv[1:])
