"""The core without a database server: the pool core (with a waiter for threads), the registry,
the sockets' neutralising, and every third-party private attribute serverhooks uses.

The Django parts run in a process of their own on SQLite: Django's settings are per process.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from serverhooks import sockets
from tests.support import procs

pytestmark = pytest.mark.core


def run_script(script: str, tmp_path: Path, **env: str) -> None:
    full_env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.project.settings",
        "DATABASE_URL": f"sqlite:///{tmp_path}/core.sqlite3",
        "CONN_MAX_AGE": "600",
        **env,
    }
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=procs.REPO, env=full_env, capture_output=True, text=True, timeout=120
    )
    assert out.stdout.strip().endswith("ok"), out.stdout[-3000:] + out.stderr[-3000:]


POOL = r"""
import threading, time, django
django.setup()
from django.db import connections
from serverhooks.pool import PoolTimeout, active
from serverhooks.pool.threads import ThreadWaiter
from serverhooks._process import state

assert active.activate(ThreadWaiter(), size=2, timeout=0.3) == ["default"]
pool = active._pools["default"]

def use_and_release():
    connections["default"].cursor().execute("SELECT 1")
    return active.release_current()

# Checkout at first use, checkin at release; the same wrapper is reused.
first = connections["default"]
first.cursor().execute("SELECT 1")
assert active.release_current() == 1 and pool._idle == [first]
assert connections["default"] is first and pool._idle == []
active.release_current()

# The bound: two holders; a third waits POOL_TIMEOUT, then fails naming the settings.
hold, stop = threading.Barrier(3, timeout=5), threading.Event()
def holder():
    connections["default"].cursor().execute("SELECT 1")
    hold.wait(); stop.wait(5); active.release_current()
holders = [threading.Thread(target=holder) for _ in range(2)]
for t in holders: t.start()
hold.wait()
started = time.monotonic()
try:
    connections["default"]
    raise AssertionError("a third checkout got a connection past the bound")
except PoolTimeout as exc:
    assert "POOL_SIZE=2" in str(exc) and "POOL_TIMEOUT=0.3" in str(exc), exc
assert 0.25 < time.monotonic() - started < 2
stop.set()
for t in holders: t.join(5)

# A unit that ended holding a connection (no release): reclaimed when the pool runs dry.
def leaks():
    connections["default"].cursor().execute("SELECT 1")
for _ in range(3):
    t = threading.Thread(target=leaks); t.start(); t.join(5)
assert use_and_release() == 1

# A release inside a transaction keeps the connection (the transaction goes on, on its session);
# a thread that ends holding one gives it back as it ends, cleaned at the next checkout:
# autocommit turned off is rolled back and restored; inside atomic() it is dropped.
def leaves_autocommit_off():
    connections["default"].set_autocommit(False)
    connections["default"].cursor().execute("SELECT 1")
    assert active.release_current() == 0
t = threading.Thread(target=leaves_autocommit_off); t.start(); t.join(5)
assert use_and_release() == 1
assert all(w.get_autocommit() for w in pool._idle if w.connection is not None)
from django.db import transaction
def dies_in_atomic():
    transaction.atomic().__enter__()
    connections["default"].cursor().execute("SELECT 1")
    assert active.release_current() == 0
discarded = state().counters.pool_discarded
t = threading.Thread(target=dies_in_atomic); t.start(); t.join(5)
assert use_and_release() == 1
assert state().counters.pool_discarded == discarded + 1

# Many threads at once (ASGI's request threads): no error, never more than the bound in use.
import asyncio
in_use, peak, lock, errors = 0, 0, threading.Lock(), []
def churn():
    global in_use, peak
    try:
        for _ in range(100):
            connections["default"].cursor().execute("SELECT 1")
            with lock:
                in_use += 1; peak = max(peak, in_use)
            with lock:
                in_use -= 1
            active.release_current()
    except Exception as exc:
        errors.append(repr(exc))
pool.timeout = 10
threads = [threading.Thread(target=churn) for _ in range(16)]
for t in threads: t.start()
for t in threads: t.join(60)
assert errors == [] and peak <= 2, (errors[:3], peak)
assert len({id(w) for w in pool._idle}) <= 2

# An event loop's thread never checks one out: it would hold it for good.
async def in_the_loop():
    return connections["default"]
holders = dict(pool._holders)
assert not pool.holds(asyncio.run(in_the_loop())) and pool._holders == holders

# After a fork, the pools start empty; deactivate() puts Django's handler back.
active.forget_after_fork()
assert active._pools["default"]._idle == [] and active.any_active()
pooled_class = type(connections)
active.deactivate()
assert type(connections) is not pooled_class and not active.any_active()
print("ok")
"""


def test_pool_core_with_a_waiter_for_threads(tmp_path: Path) -> None:
    run_script(POOL, tmp_path)


REGISTRY = r"""
import threading, django
django.setup()
from django.db import connection, connections
from serverhooks import registry

registry.start_tracking()
registry.start_tracking()  # idempotent: one receiver
from django.db.backends.signals import connection_created
assert sum("serverhooks.track" in str(r[0]) for r in connection_created.receivers) == 1
connection.ensure_connection()
others = []
def other_thread():
    connections["default"].ensure_connection()
    others.append(connections["default"])
t = threading.Thread(target=other_thread); t.start(); t.join(5)
found = registry.all_wrappers()
assert connections["default"] in found and others[0] in found, found
assert registry.close_wrapper(others[0]) and others[0].connection is None  # another thread's, cleanly
assert not registry.close_wrapper(others[0])
registry.stop_tracking()
assert registry.all_wrappers() == [connections["default"]]
print("ok")
"""


def test_registry_finds_every_threads_connections(tmp_path: Path) -> None:
    run_script(REGISTRY, tmp_path)


def test_a_neutralised_socket_sends_nothing_and_leaves_the_parents_copy_alone() -> None:
    ours, server = socket.socketpair()
    parent_copy = socket.socket(fileno=os.dup(ours.fileno()))  # what the parent keeps after a fork
    with ours, server, parent_copy:
        sockets._swap_in_devnull(ours.fileno())
        with pytest.raises(OSError) as sent:
            ours.send(b"COM_QUIT")
        assert sent.value.errno == __import__("errno").ENOTSOCK
        parent_copy.sendall(b"still mine")
        assert server.recv(64) == b"still mine", "the parent's session is untouched"


def test_driver_names() -> None:
    class Fake:
        pass

    for module, name in (
        ("MySQLdb.connections", "mysqlclient"),
        ("pymysql.connections", "pymysql"),
        ("sqlite3", "sqlite3"),
    ):
        kind = type("Connection", (), {"__module__": module})
        assert sockets.driver_name(kind()) == name
    assert sockets.driver_name(Fake()) == "tests"


INTERNALS = r"""
import logging, django
django.setup()
from serverhooks import _internals
from django.db import connections
from django.core.cache import caches
logging.getLogger("serverhooks").addHandler(handler := logging.Handler())
warnings = []
handler.emit = lambda record: warnings.append(record.getMessage())

assert _internals.connection_storage(connections) is not None
assert _internals.connection_storage(caches) is not None
assert _internals.local_storage(_internals.connection_storage(connections)) is not None
wrapper = connections["default"]
assert isinstance(_internals.thread_ident(wrapper), int)
assert isinstance(_internals.postgres_pools(), dict)
import psycopg_pool
pool = psycopg_pool.ConnectionPool("", open=False)
assert _internals.pool_idle_connections(pool) == []
import psycopg.waiting
assert hasattr(psycopg.waiting, "_ready_poll") and hasattr(psycopg.waiting, "wait_poll")
from django.core.cache.backends.redis import RedisCache
cache = RedisCache("redis://127.0.0.1:1/0", {})
cache._cache  # the client, created without connecting
assert _internals.cache_client_pools(cache) == []  # no pool until the first command
import pymysql
assert _internals.pymysql_socket(pymysql.connections.Connection(defer_connect=True)) is None
assert not warnings, warnings
# A moved attribute: one WARNING naming it, and the "nothing there" value.
class Moved: pass
assert _internals.connection_storage(Moved()) is None and _internals.connection_storage(Moved()) is None
assert len(warnings) == 1 and "ConnectionHandler._connections" in warnings[0], warnings
print("ok")
"""


def test_every_private_attribute_is_where_serverhooks_expects_it(tmp_path: Path) -> None:
    run_script(INTERNALS, tmp_path)
