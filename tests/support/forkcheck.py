"""`python -m tests.support.forkcheck`: fork with open connections, report what survived.

Run in a fresh interpreter per arm, so each gets its own driver and settings:

    DATABASE_URL=... SERVERHOOKS_APP=1|0 python -m tests.support.forkcheck \
        --how os.fork|multiprocessing --children 3 [--child-closes] [--thread-conn]
        [--django-fork-fix clear|delete]

The parent opens a session, forks, lets each child (optionally) query and call
`connections.close_all()` as common recipes do, then `gc.collect()`. It prints
JSON: the parent's session id before and after, any error, the children's ids.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import sys
import threading
from typing import Any

import django

SESSION_SQL = {"mysql": "SELECT CONNECTION_ID()", "postgresql": "SELECT pg_backend_pid()", "sqlite": "SELECT 0"}


def _session(alias: str = "default") -> Any:
    from django.db import connections

    conn = connections[alias]
    with conn.cursor() as cursor:
        cursor.execute(SESSION_SQL[conn.vendor])
        return cursor.fetchone()[0]


def _child_body(child_closes: bool, out: Any) -> None:
    from django.db import connection, connections

    report: dict[str, Any] = {"pid": os.getpid()}
    try:
        report["raw_id_before_query"] = id(connection.connection) if connection.connection is not None else None
        report["session"] = _session()
        report["raw_id"] = id(connection.connection)
        if child_closes:
            connections.close_all()
        gc.collect()
    except Exception as exc:
        report["error"] = f"{type(exc).__name__}: {exc}"
    import serverhooks

    report["serverhooks_errors"] = serverhooks.stats()["errors"]
    out.send(report)


def _simulate_django_fork_fix(how: str) -> None:
    """Django's pending fix for ticket 36957 (PR 20803): an at-fork handler that clears the class-level
    PostgreSQL pools in the child. Registered before serverhooks' guard, so it runs first there."""

    def in_child() -> None:
        base = sys.modules.get("django.db.backends.postgresql.base")
        wrapper_class = getattr(base, "DatabaseWrapper", None)
        if wrapper_class is None:
            return
        if how == "clear":
            wrapper_class._connection_pools.clear()
        elif "_connection_pools" in vars(wrapper_class):
            delattr(wrapper_class, "_connection_pools")

    os.register_at_fork(after_in_child=in_child)


def _run_child_os_fork(child_closes: bool) -> dict[str, Any]:
    reader, writer = multiprocessing.Pipe(duplex=False)
    pid = os.fork()
    if pid == 0:
        try:
            _child_body(child_closes, writer)
        finally:
            os._exit(0)
    report = reader.recv() if reader.poll(30) else {"error": "child did not answer in 30 s"}
    os.waitpid(pid, 0)
    return report


def _run_child_multiprocessing(child_closes: bool) -> dict[str, Any]:
    ctx = multiprocessing.get_context("fork")
    reader, writer = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_body, args=(child_closes, writer))
    proc.start()
    report = reader.recv() if reader.poll(30) else {"error": "child did not answer in 30 s"}
    proc.join(30)
    return report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--how", choices=["os.fork", "multiprocessing"], default="os.fork")
    parser.add_argument("--children", type=int, default=3)
    parser.add_argument("--child-closes", action="store_true")
    parser.add_argument("--thread-conn", action="store_true", help="also hold a connection in a parked thread")
    parser.add_argument("--django-fork-fix", choices=["clear", "delete"], help="simulate Django's PR 20803")
    args = parser.parse_args()
    if args.django_fork_fix:
        _simulate_django_fork_fix(args.django_fork_fix)

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.project.settings")
    django.setup()
    from django.db import connection

    result: dict[str, Any] = {"vendor": connection.vendor}
    result["parent_before"] = _session()
    result["parent_raw_id"] = id(connection.connection)
    if connection.vendor == "postgresql" and getattr(connection, "pool", None) is not None:
        result["pooled"] = True

    parked = threading.Event()
    release = threading.Event()
    thread_result: dict[str, Any] = {}

    def hold_connection_in_thread() -> None:
        from django.db import connection as thread_connection

        thread_result["before"] = _session()
        parked.set()
        release.wait(60)
        try:
            thread_result["after"] = _session()
        except Exception as exc:
            thread_result["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            thread_connection.close()

    if args.thread_conn:
        holder = threading.Thread(target=hold_connection_in_thread)
        holder.start()
        parked.wait(30)

    run = _run_child_os_fork if args.how == "os.fork" else _run_child_multiprocessing
    result["children"] = [run(args.child_closes) for _ in range(args.children)]
    gc.collect()
    try:
        result["parent_after"] = _session()
    except Exception as exc:
        result["parent_error"] = f"{type(exc).__name__}: {exc}"
    if args.thread_conn:
        release.set()
        holder.join(60)
        result["thread"] = thread_result
    import serverhooks

    result["parent_stats"] = serverhooks.stats()
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
