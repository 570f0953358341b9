"""`python -m tests.support.threadloop`: the seed's thread-pool loop, counted on the server.

    DATABASE_URL=... python -m tests.support.threadloop --family mysql --database NAME \
        --kind stdlib|serverhooks|serverhooks-per-thread [--shape pools|threads]

pools:   100 iterations, each a 20-thread pool given 3 tasks (an ORM aggregate and an insert).
threads: 200 short-lived threads (at most 50 alive at once), each an ORM aggregate and an insert.
many-tasks: one 4-thread pool given 300 such tasks (per-task against per-thread release).

The garbage collector runs as usual: what it has not reached by the end of the loop is
still open on the server. "errors" counts tasks the server refused (too many sessions).
Prints JSON.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gc
import json
import os
import threading
import time
import uuid
from typing import Literal

import django

from tests.support import dbserver


def task(run_id: str) -> int:
    from django.db.models import Count

    from tests.project.models import Hit

    total = Hit.objects.aggregate(n=Count("id"))["n"]
    Hit.objects.create(marker=run_id, pid=os.getpid())
    return int(total)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--family", required=True)
    parser.add_argument("--database", required=True)
    parser.add_argument("--kind", choices=["stdlib", "serverhooks", "serverhooks-per-thread"], required=True)
    parser.add_argument("--shape", choices=["pools", "threads", "many-tasks"], default="pools")
    args = parser.parse_args()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.project.settings")
    django.setup()
    from serverhooks import threads as sh_threads

    run_id = uuid.uuid4().hex
    # A previous control arm may have filled the server; its sessions end within seconds.
    at_start = dbserver.sessions_or_none(args.family, args.database, tries=60)
    if at_start is None:
        raise SystemExit(f"{args.family} refused connections for 15 s before the loop started")
    before = len(at_start)
    gc.collect()
    errors: list[str] = []
    started = time.perf_counter()
    per: Literal["task", "thread"] = "thread" if args.kind == "serverhooks-per-thread" else "task"
    executor: concurrent.futures.ThreadPoolExecutor
    if args.shape == "many-tasks":  # where per-thread release should pay off: 4 threads, 300 tasks
        executor = (
            concurrent.futures.ThreadPoolExecutor(4)
            if args.kind == "stdlib"
            else sh_threads.ThreadPoolExecutor(4, release=per)
        )
        with executor:
            futures = [executor.submit(task, run_id) for _ in range(300)]
        errors += [str(f.exception()) for f in futures if f.exception() is not None]
    elif args.shape == "pools":
        for _ in range(100):
            if args.kind == "stdlib":
                executor = concurrent.futures.ThreadPoolExecutor(20)
            else:
                executor = sh_threads.ThreadPoolExecutor(20, release=per)
            with executor:
                futures = [executor.submit(task, run_id) for _ in range(3)]
            for future in futures:
                if future.exception() is not None:
                    errors.append(str(future.exception()))
    else:
        thread_class = threading.Thread if args.kind == "stdlib" else sh_threads.Thread

        # At most 50 alive at once, whatever the machine's speed: a thread's own session counts
        # against max_connections (100 here) while it runs. What a finished thread leaves open
        # is what piles up, in the standard library's arm.
        alive = threading.BoundedSemaphore(50)

        def counted_task(run_id: str) -> None:
            try:
                task(run_id)
            except Exception as exc:
                errors.append(str(exc))
            finally:
                alive.release()

        workers = [thread_class(target=counted_task, args=(run_id,)) for _ in range(200)]
        for worker in workers:
            alive.acquire(timeout=60)
            worker.start()
        for worker in workers:
            worker.join(60)
    seconds = time.perf_counter() - started
    # A PostgreSQL backend leaves pg_stat_activity a moment after its client closed: give the
    # closed ones 3 s to go (what is still open then was left open).
    deadline = time.monotonic() + 3.0
    still_open = dbserver.sessions_or_none(args.family, args.database)
    while still_open and len(still_open) > before and time.monotonic() < deadline:
        time.sleep(0.1)
        still_open = dbserver.sessions_or_none(args.family, args.database)
    gc.collect()
    time.sleep(0.5)
    after_gc = dbserver.sessions_or_none(args.family, args.database)
    rows = dbserver.query(args.family, "SELECT COUNT(*) FROM sh_hit WHERE marker = %s", (run_id,), args.database)
    report = {
        "before": before,
        "after": None if still_open is None else len(still_open),  # None: the server refused to count
        "after_gc": None if after_gc is None else len(after_gc),
        "rows": rows[0][0],
        "errors": len(errors),
        "first_error": errors[0][:200] if errors else None,
        "seconds": round(seconds, 3),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
