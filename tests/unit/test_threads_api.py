"""serverhooks.threads behaves as the standard library's classes, and releases connections.

Runs in a subprocess with Django on SQLite, so the test process stays Django-free.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import procs

pytestmark = pytest.mark.core

SCRIPT = r"""
import threading, django
django.setup()
from django.db import connection
from serverhooks.threads import ThreadPoolExecutor, Thread, releasing

def opened():
    with connection.cursor() as c:
        c.execute("SELECT 1")
    return connection.connection is not None

def after_task_is_released():
    return connection.connection is None

# submit returns the future; results and exceptions reach it
with ThreadPoolExecutor(2, thread_name_prefix="shtest") as pool:
    future = pool.submit(lambda x, y=0: x + y, 1, y=2)
    assert future.result(5) == 3
    boom = pool.submit(lambda: 1 / 0)
    assert isinstance(boom.exception(5), ZeroDivisionError)
    assert list(pool.map(lambda x: x * 2, [1, 2, 3])) == [2, 4, 6]
    names = set(pool.map(lambda _: threading.current_thread().name, range(8)))
    assert all(name.startswith("shtest") for name in names), names
    assert pool.submit(opened).result(5) is True
    # the task's connection was closed when it ended: the next task on that thread starts clean
    assert all(pool.map(lambda _: after_task_is_released(), range(4)))

# initializer and initargs
seen = []
with ThreadPoolExecutor(1, initializer=seen.append, initargs=("ready",)) as pool:
    pool.submit(lambda: None).result(5)
assert seen == ["ready"]

# shutdown, and submit after shutdown
pool = ThreadPoolExecutor(1)
pool.shutdown()
try:
    pool.submit(lambda: None)
    raise AssertionError("submit after shutdown must raise")
except RuntimeError:
    pass

# per-thread release: kept across tasks, closed at shutdown
with ThreadPoolExecutor(1, release="thread") as pool:
    assert pool.submit(opened).result(5) is True
    assert pool.submit(lambda: connection.connection is not None).result(5) is True
used = list(pool._used_wrappers)
assert used == [], used
try:
    ThreadPoolExecutor(1, release="sometimes")
    raise AssertionError("a bad release mode must raise")
except ValueError as exc:
    assert "release must be 'task' or 'thread'" in str(exc)

# Thread, including subclasses that override run()
state = {}
def target():
    state["opened"] = opened()
t = Thread(target=target, name="plain")
t.start(); t.join(5)
assert state["opened"] and t.name == "plain"

class Worker(Thread):
    def run(self):
        state["sub"] = opened()
        state["sub_conn"] = connection.connection
w = Worker(); w.start(); w.join(5)
assert state["sub"] and state["sub_conn"] is not None

# releasing: as a context manager and as a decorator, in a thread we did not create
def foreign():
    with releasing():
        opened()
    state["ctx"] = connection.connection is None
    @releasing()
    def job():
        return opened()
    state["deco"] = job() and connection.connection is None
plain = threading.Thread(target=foreign); plain.start(); plain.join(5)
assert state["ctx"] and state["deco"], state
print("ok")
"""


def test_drop_in_behaviour_and_release(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.project.settings",
        "DATABASE_URL": f"sqlite:///{tmp_path}/threads.sqlite3",
        # Persistent, so release="thread" has something to keep between tasks (it applies CONN_MAX_AGE).
        "CONN_MAX_AGE": "600",
    }
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=procs.REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.stdout.strip() == "ok", out.stdout + out.stderr
