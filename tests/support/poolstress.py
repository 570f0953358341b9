"""`python -m tests.support.poolstress threads|gevent`: hundreds of short-lived units of work on one pool.

Units of work check pooled connections out of a small pool (POOL_SIZE 4) against DATABASE_URL
and prove, on the server, that nobody else uses their session meanwhile: each writes a token
of its own into a session variable, yields, and reads it back. Many give their connection
back; many end holding it: threads that simply end, threads not started by `threading`
(`_thread.start_new_thread`, and a pthread made through ctypes, as Granian's and uWSGI's
threads are), gevent greenlets that end or are killed in the middle of a query, raw greenlets.
A scanner looks for dead holders all the while (`_reclaim_from_dead_units`, what a checkout
does when the pool runs dry). The pool's invariant checks are on throughout.

It prints one JSON line: errors by kind, the invariant violations, the sessions seen shared,
the most connections the pool had at once, and serverhooks' counters.
POOL_CONTROL=1 puts back the bookkeeping from before issue 20 (tests/support/pool_control.py).
"""

from __future__ import annotations

import collections
import ctypes
import json
import os
import random
import sys
import threading
import time
import uuid
from collections.abc import Callable

MODE = sys.argv[1] if len(sys.argv) > 1 else "threads"
if MODE == "gevent":
    from gevent import monkey

    monkey.patch_all()

import django  # noqa: E402 - after gevent's patching, as in a gevent worker

UNITS = int(os.environ.get("STRESS_UNITS", "300"))
AT_ONCE = 24  # units alive at once: short-lived, and bounded
POOL_SIZE = 4
SET_TOKEN = {"mysql": "SET @sh_token = %s", "postgresql": "SELECT set_config('sh.token', %s, false)"}
GET_TOKEN = {"mysql": "SELECT @sh_token", "postgresql": "SELECT current_setting('sh.token')"}
SLEEP = {"mysql": "SELECT SLEEP(0.05)", "postgresql": "SELECT pg_sleep(0.05)"}

errors: collections.Counter[str] = collections.Counter()
shared = 0
peak = 0


def _pause() -> None:
    if MODE == "gevent":
        import gevent

        gevent.sleep(random.uniform(0, 0.004))
    else:
        time.sleep(random.uniform(0, 0.004))


def use_a_connection(release: bool) -> None:
    """Check out, prove the session is ours alone, then give it back or not."""
    global shared, peak
    from django.db import connection

    from serverhooks import release_connections
    from serverhooks.pool import active

    token = uuid.uuid4().hex
    try:
        with connection.cursor() as cursor:
            cursor.execute(SET_TOKEN[connection.vendor], [token])
            _pause()
            cursor.execute(GET_TOKEN[connection.vendor])
            if cursor.fetchone()[0] != token:
                shared += 1
        in_use, idle = active.pools()[0].occupancy()
        peak = max(peak, in_use + idle)
    except Exception as exc:
        errors[type(exc).__name__] += 1
    finally:
        if release:
            release_connections()


def killed_mid_query() -> None:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(SLEEP[connection.vendor])


_PTHREAD_START = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)


def in_a_pthread(work: Callable[[], None]) -> None:
    """Run `work` in a thread made by C (ctypes + pthread_create), as servers written in C or Rust make theirs."""
    libc = ctypes.CDLL(None)
    callback = _PTHREAD_START(lambda _arg: work())
    handle = ctypes.c_ulong()
    if libc.pthread_create(ctypes.byref(handle), None, callback, None) != 0:
        raise OSError("pthread_create failed")
    libc.pthread_join(handle, None)


def run_threads() -> None:
    import _thread

    kinds: list[tuple[str, Callable[[], None]]] = [
        ("released", lambda: use_a_connection(release=True)),
        ("ends holding", lambda: use_a_connection(release=False)),
    ]
    alive: list[threading.Thread] = []
    started_raw = threading.Semaphore(AT_ONCE)

    def raw_thread() -> None:
        try:
            use_a_connection(release=False)
        finally:
            started_raw.release()

    rng = random.Random(20)
    for index in range(UNITS):
        alive = [t for t in alive if t.is_alive()]
        while len(alive) >= AT_ONCE:
            alive[0].join(10)
            alive = [t for t in alive if t.is_alive()]
        roll = rng.random()
        if roll < 0.12:
            started_raw.acquire(timeout=10)
            _thread.start_new_thread(raw_thread, ())  # a _DummyThread: is_alive() never turns False
        elif roll < 0.16:
            runner = threading.Thread(target=in_a_pthread, args=(lambda: use_a_connection(release=False),))
            runner.start()
            alive.append(runner)
        else:
            _, work = kinds[index % 2 if roll < 0.6 else 0]
            unit = threading.Thread(target=work)
            unit.start()
            alive.append(unit)
    for unit in alive:
        unit.join(30)
    for _ in range(AT_ONCE):  # every raw thread is done
        started_raw.acquire(timeout=10)


def run_gevent() -> None:
    import gevent
    import gevent.pool
    from greenlet import greenlet

    group = gevent.pool.Pool(AT_ONCE)
    rng = random.Random(20)
    for index in range(UNITS):
        roll = rng.random()
        if roll < 0.1:
            victim = group.spawn(killed_mid_query)
            gevent.sleep(0.01)
            victim.kill(block=False)  # GreenletExit in the middle of the query
        elif roll < 0.2:
            raw = greenlet(lambda: use_a_connection(release=False))  # cannot say when it ends
            raw.switch()
        else:
            group.spawn(use_a_connection, index % 2 == 0 or roll < 0.6)
    group.join(timeout=60)


def scan_until(done: threading.Event) -> None:
    from serverhooks.pool import active

    deadline = time.monotonic() + 120
    while not done.is_set() and time.monotonic() < deadline:
        for pool in active.pools():
            try:
                pool._reclaim_from_dead_units()
            except AssertionError:
                pass  # recorded in invariant_violations
        if MODE == "gevent":
            import gevent

            gevent.sleep(0.001)
        else:
            time.sleep(0.001)


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.project.settings")
    django.setup()
    from serverhooks import registry, stats
    from serverhooks.pool import core
    from serverhooks.pool import gevent as gevent_pool
    from serverhooks.pool import threads as thread_pool

    if os.environ.get("POOL_CONTROL") == "1":
        import tests.support.pool_control  # noqa: F401 - the bookkeeping as it was

    registry.start_tracking()
    (gevent_pool if MODE == "gevent" else thread_pool).activate(size=POOL_SIZE, timeout=3.0)
    core.invariant_checks = True
    done = threading.Event()
    scanner = threading.Thread(target=scan_until, args=(done,))
    scanner.start()
    started = time.monotonic()
    try:
        run_gevent() if MODE == "gevent" else run_threads()
    finally:
        done.set()
        scanner.join(30)
    counters = stats()
    print(
        json.dumps(
            {
                "mode": MODE,
                "units": UNITS,
                "seconds": round(time.monotonic() - started, 1),
                "errors": dict(errors),
                "violations": core.invariant_violations[:10],
                "violation_count": len(core.invariant_violations),
                "shared_sessions": shared,
                "peak_connections": peak,
                "sessions_opened": counters["sessions_opened"],
                "pool_reclaimed": counters["pool_reclaimed"],
                "closed_interrupted": counters["closed_interrupted"],
            }
        )
    )


if __name__ == "__main__":
    main()
