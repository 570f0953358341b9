"""`python -m tests.support.pool_thread_ends`: threads that end holding a pooled connection.

Two kinds of threads each check a connection out of a threads' pool (the ASGI pool) and end
without giving it back: threads started by `_thread.start_new_thread`, and pthreads made by C
(ctypes), as Granian's, uWSGI's and other servers' threads are. Python knows them only as
`_DummyThread`s, whose `is_alive()` never turns False on Python 3.11 and 3.12. The question:
do their slots come back when they end, before anyone has to wait for one?

Real Django wrappers (DATABASE_URL, SQLite by default) in a real Pool. Prints one JSON line.
POOL_CONTROL=1: the bookkeeping from before the fix (tests/support/pool_control.py).
"""

from __future__ import annotations

import _thread
import ctypes
import json
import os
import threading
import time

import django

PTHREADS = 5  # more than the pool holds: each must give back before the next can check out
_PTHREAD_START = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)


failed: list[str] = []


def hold_and_end(done: threading.Semaphore) -> None:
    from django.db import connection

    try:
        connection.cursor().execute("SELECT 1")
    except Exception as exc:
        failed.append(type(exc).__name__)
    finally:
        done.release()


def in_a_pthread(done: threading.Semaphore) -> None:
    libc = ctypes.CDLL(None)
    callback = _PTHREAD_START(lambda _arg: hold_and_end(done))
    handle = ctypes.c_ulong()
    if libc.pthread_create(ctypes.byref(handle), None, callback, None) != 0:
        raise OSError("pthread_create failed")
    libc.pthread_join(handle, None)


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.project.settings")
    django.setup()
    if os.environ.get("POOL_CONTROL") == "1":
        import tests.support.pool_control  # noqa: F401 - the bookkeeping as it was
    from serverhooks import stats
    from serverhooks.pool import active
    from serverhooks.pool import threads as thread_pool

    thread_pool.activate(size=4, timeout=1.0)
    pool = active.pools()[0]
    done = threading.Semaphore(0)
    for _ in range(2):
        _thread.start_new_thread(hold_and_end, (done,))
    # pthreads one after the other: before Python 3.13 each may get the _DummyThread of the one
    # before it (the ident is reused), and must still give its own connection back.
    for _ in range(PTHREADS):
        runner = threading.Thread(target=in_a_pthread, args=(done,))
        runner.start()
        runner.join(10)
    for _ in range(2 + PTHREADS):
        done.acquire(timeout=10)
    held = pool.occupancy()[0]
    deadline = time.monotonic() + 3.0
    while held and time.monotonic() < deadline:  # bounded: the threads end within milliseconds
        time.sleep(0.05)
        held = pool.occupancy()[0]
    print(json.dumps({"held_after_the_threads_ended": held, "reclaimed": stats()["pool_reclaimed"], "failed": failed}))


if __name__ == "__main__":
    main()
