"""`python -m tests.support.forkcases CASE ARM`: serverhooks' own bookkeeping across real forks.

Each case prints one JSON line. ARM `fixed` runs serverhooks as it is; `reverted` takes the fix
away (monkeypatched, as tests/support/metrics_control.py does), which is the control.

- `once_lock`: another thread holds the lock of `_process.once()` while the main thread forks;
  does the child's `once()` answer (within 2 s)?
- `concurrent_forks`: threads A and B fork at once, A's release landing between B's hold and B's
  fork, while thread C keeps a connection parked, and the child collects garbage before the
  guard's handler runs. Does B's child leave C's session alone?
- `guard_alone`: `serverhooks.install_fork_guard()` before Django is loaded, nothing else of
  serverhooks; thread C opens a connection, the main thread forks. Same question.

"Leave the session alone": the child holds none of the parent's database sockets once it ran
`gc.collect()`, and the parent's session in thread C still answers, as the same session.
DATABASE_URL selects the database (the last two cases).
"""

from __future__ import annotations

import gc
import json
import os
import select
import signal
import sys
import threading
import time
from typing import Any

SESSION_SQL = {"mysql": "SELECT CONNECTION_ID()", "postgresql": "SELECT pg_backend_pid()"}


def _wait_child(pid: int, read_fd: int, seconds: float) -> dict[str, Any]:
    """The child's JSON report, or {"hung": True} (then it is killed) after `seconds`."""
    ready, _, _ = select.select([read_fd], [], [], seconds)
    report: dict[str, Any] = json.loads(os.read(read_fd, 65536) or b"{}") if ready else {"hung": True}
    if not ready:
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    os.close(read_fd)
    return report


def _report_from_child(write_fd: int, report: dict[str, Any]) -> None:
    os.write(write_fd, json.dumps(report).encode())
    os._exit(0)


def once_lock(arm: str) -> dict[str, Any]:
    from serverhooks import _process

    if arm == "reverted":
        _process._after_fork_in_child = lambda: None
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with _process._once_lock:
            holding.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    assert holding.wait(5)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        _report_from_child(write_fd, {"once": _process.once("asked in the child")})
    os.close(write_fd)
    report = _wait_child(pid, read_fd, 2.0)
    release.set()
    holder.join(5)
    return report


class ParkedConnection:
    """Thread C: a Django connection opened in a thread of its own, referenced only by Django's
    thread-local storage, parked until `finish()` asks it once more."""

    def __init__(self) -> None:
        self.before: Any = None
        self.after: Any = None
        self.error: str | None = None
        self._parked, self._release = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, name="C")
        self._thread.start()
        assert self._parked.wait(10), "thread C never connected"

    @staticmethod
    def _session() -> Any:
        from django.db import connection

        with connection.cursor() as cursor:
            cursor.execute(SESSION_SQL[connection.vendor])
            return cursor.fetchone()[0]

    def _run(self) -> None:
        from django.db import connection

        self.before = self._session()
        self._parked.set()
        self._release.wait(30)
        try:
            self.after = self._session()
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"[:200]
        finally:
            connection.close()

    def finish(self) -> dict[str, Any]:
        self._release.set()
        self._thread.join(10)
        return {"session_kept": self.after is not None and self.after == self.before, "error": self.error}


def _db_socket_inodes(pid: int) -> set[int]:
    from tests.project import dburl
    from tests.support import dbserver, procs

    family, _driver = dburl.split_driver(os.environ["DATABASE_URL"])
    return procs.db_sockets([pid], dbserver.port(family))[pid]


def _child_after_fork(write_fd: int, parents: set[int]) -> None:
    gc.collect()  # what any child does sooner or later: every unreachable finaliser runs
    _report_from_child(write_fd, {"shares": sorted(parents & _db_socket_inodes(os.getpid()))})


def concurrent_forks(arm: str) -> dict[str, Any]:
    import django

    django.setup()
    from serverhooks import fork, forkguard

    if arm == "reverted":  # one hold slot for every forking thread, as before
        fork._forking_thread = lambda: 0
    b_held, a_released = threading.Event(), threading.Event()

    def pause_before() -> None:  # registered before the guard: runs right after its hold
        name = threading.current_thread().name
        if name == "A":
            b_held.wait(5)  # A forks only once B holds too
        elif name == "B":
            b_held.set()
            a_released.wait(5)  # B forks only once A released

    def after_in_parent() -> None:  # registered after the guard: runs right after its release
        if threading.current_thread().name == "A":
            a_released.set()

    # A Django connection is a reference cycle: in a child, the thread states CPython deletes leave
    # thread C's unreachable, and the next garbage collection finalises it (mysqlclient: COM_QUIT on
    # the parent's socket), unless the hold keeps it referenced. This collection, registered before
    # the guard, runs right before its child handler: it stands in for one that an earlier at-fork
    # handler's allocations (threading's, logging's) trigger.
    os.register_at_fork(before=pause_before, after_in_child=gc.collect)
    forkguard.install_fork_guard()
    os.register_at_fork(after_in_parent=after_in_parent)
    parked = ParkedConnection()
    parents = _db_socket_inodes(os.getpid())
    children: dict[str, dict[str, Any]] = {}

    def forking(name: str) -> None:
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            _child_after_fork(write_fd, parents)
        os.close(write_fd)
        children[name] = _wait_child(pid, read_fd, 10.0)

    threads = [threading.Thread(target=forking, args=(name,), name=name) for name in ("A", "B")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    return {"parent_sockets": len(parents), "children": children, **parked.finish()}


def guard_alone(arm: str) -> dict[str, Any]:
    import serverhooks
    from serverhooks import registry

    if arm == "reverted":  # the guard as it was: no tracking of its own
        registry.track_from_django_db_import = lambda: None
    serverhooks.install_fork_guard()
    imported_by_the_guard = "django.db" in sys.modules
    import django

    django.setup()
    parked = ParkedConnection()
    parents = _db_socket_inodes(os.getpid())
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        _child_after_fork(write_fd, parents)
    os.close(write_fd)
    child = _wait_child(pid, read_fd, 10.0)
    time.sleep(0.2)  # a COM_QUIT the child sent reaches the server
    return {
        "imported_by_the_guard": imported_by_the_guard,
        "parent_sockets": len(parents),
        "child": child,
        **parked.finish(),
    }


CASES = {case.__name__: case for case in (once_lock, concurrent_forks, guard_alone)}


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.project.settings")
    print(json.dumps(CASES[sys.argv[1]](sys.argv[2])), flush=True)


if __name__ == "__main__":
    main()
