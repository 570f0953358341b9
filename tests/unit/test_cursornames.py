"""serverhooks.cursornames: names no other client of a transaction pooler can reach (issue 21).

The names themselves without a server (marker `core`); psycopg 3's statement names and the
errors to explain on the local PostgreSQL test server, through real psycopg connections.
The Gunicorn + PgBouncer end of it is tests/integration/test_pooler_safety.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import errors

from serverhooks import _internals, cursornames
from tests.conftest import require_server
from tests.support import dbserver, procs

core = pytest.mark.core

# What Django 6.0 makes: _django_curs_<thread ident>_<task>_<counter> (task: "sync" or an asyncio task's id)
DJANGO_NAME = f"{cursornames.CURSOR_PREFIX}{threading.get_ident()}_sync_1"


@core
def test_the_process_token_is_new_in_a_forked_child() -> None:
    ours = cursornames.process_token()
    assert re.fullmatch(r"[0-9a-f]{12}", ours) and cursornames.process_token() == ours
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report back, leave at once (no pytest teardown in here)
        try:
            os.write(write, f"{cursornames.process_token()} {cursornames.unique_cursor_name(DJANGO_NAME)}".encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        token, name = pipe.read().decode().split(" ")
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert re.fullmatch(r"[0-9a-f]{12}", token) and token != ours, (token, ours)
    assert name.startswith(f"{cursornames.CURSOR_PREFIX}{token}_"), name
    assert cursornames.process_token() == ours, "the parent keeps its own"


@core
def test_names_from_many_threads_all_differ() -> None:
    names: list[str] = []
    lock, start = threading.Lock(), threading.Barrier(8, timeout=10)

    def make() -> None:
        start.wait()
        made = [cursornames.unique_cursor_name(f"{cursornames.CURSOR_PREFIX}1_sync_1") for _ in range(200)]
        with lock:
            names.extend(made)

    threads = [threading.Thread(target=make) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(names) == 1600 and len(set(names)) == 1600, "Django's same name, 1600 different ones"
    token = cursornames.process_token()
    assert all(name.startswith(f"{cursornames.CURSOR_PREFIX}{token}_") for name in names)


@core
def test_a_cursor_name_stays_within_63_characters() -> None:
    short = cursornames.unique_cursor_name(DJANGO_NAME)
    assert len(short) <= 63 and short.endswith(DJANGO_NAME[len(cursornames.CURSOR_PREFIX) :]), short
    # The longest Django makes: a 64-bit thread ident, an asyncio task's id, a big counter.
    longest = f"{cursornames.CURSOR_PREFIX}{2**64 - 1}_{2**64 - 1}_{10**9}"
    renamed = cursornames.unique_cursor_name(longest)
    assert len(renamed) <= 63, (len(renamed), renamed)
    assert renamed.startswith(f"{cursornames.CURSOR_PREFIX}{cursornames.process_token()}_")
    assert cursornames.unique_cursor_name("mine") == "mine", "a name of the user's own is left alone"


@pytest.fixture
def no_wrap() -> Iterator[None]:
    """psycopg's PrepareManager.get as psycopg ships it, before and after the test."""
    while _internals._psycopg_get:
        _internals.unprefix_psycopg_statement_names()
    yield
    while _internals._psycopg_get:
        _internals.unprefix_psycopg_statement_names()


def connect(**options: object) -> psycopg.Connection[tuple[object, ...]]:
    require_server("postgres")
    return psycopg.connect(dbserver.server_url("postgres"), autocommit=True, connect_timeout=10, **options)  # type: ignore[arg-type]


def prepared_names(conn: psycopg.Connection[tuple[object, ...]]) -> list[str]:
    """Prepare two statements of the connection's own, then list what the server holds for it."""
    conn.execute("SELECT %s::int", [1])
    conn.execute("SELECT %s::text", ["x"])
    rows = conn.execute("SELECT name FROM pg_prepared_statements ORDER BY prepare_time").fetchall()
    return [str(row[0]) for row in rows]


def test_psycopg_statement_names_carry_a_token_of_each_connection(no_wrap: None) -> None:
    assert _internals.prefix_psycopg_statement_names(cursornames.statement_prefix)
    assert _internals.prefix_psycopg_statement_names(cursornames.statement_prefix), "idempotent"
    assert len(_internals._psycopg_get) == 1
    tokens = []
    for _ in range(2):
        with connect(prepare_threshold=0) as conn:
            names = prepared_names(conn)
        assert len(names) >= 3, names  # the two, and the query that lists them
        found = {re.fullmatch(r"_pg3_([0-9a-f]{12})_\d+", name) for name in names}
        assert None not in found, names
        assert len({m.group(1) for m in found if m}) == 1, f"one token per connection: {names}"
        tokens.append(next(m.group(1) for m in found if m))
    assert tokens[0] != tokens[1], tokens

    # The control: the wrap undone, psycopg's own names, the same on every connection.
    _internals.unprefix_psycopg_statement_names()
    plain = []
    for _ in range(2):
        with connect(prepare_threshold=0) as conn:
            plain.append(prepared_names(conn))
    assert all(re.fullmatch(r"_pg3_\d+", name) for names in plain for name in names), plain
    assert plain[0] == plain[1], "without the token two connections make the same names"


def test_a_connection_that_prepares_nothing_is_left_alone(no_wrap: None) -> None:
    _internals.prefix_psycopg_statement_names(cursornames.statement_prefix)
    with connect(prepare_threshold=None) as conn:
        assert prepared_names(conn) == []
        assert "_serverhooks_prefix" not in vars(conn._prepared)


def test_explain_names_the_fix_for_real_errors_from_postgresql() -> None:
    with connect() as conn:
        name = cursornames.unique_cursor_name(DJANGO_NAME)
        with pytest.raises(errors.InvalidCursorName) as cursor_error:
            conn.execute(f'FETCH 2 FROM "{name}"')
        assert cursor_error.value.sqlstate == "34000"
        assert cursornames.explain(cursor_error.value) == cursornames.CURSOR_FIX

        # Django raises its own error from the driver's: explain follows the chain.
        from django.db.utils import ProgrammingError

        try:
            raise ProgrammingError(str(cursor_error.value)) from cursor_error.value
        except ProgrammingError as wrapped:
            assert cursornames.explain(wrapped) == cursornames.CURSOR_FIX

        with pytest.raises(errors.InvalidSqlStatementName) as statement_error:
            conn.execute(f"EXECUTE {cursornames.statement_prefix().decode()}1")
        assert cursornames.explain(statement_error.value) == cursornames.STATEMENT_FIX

        # A cursor of the user's own name, or another error, is not the pooler's doing.
        with pytest.raises(errors.InvalidCursorName) as own_cursor:
            conn.execute('FETCH 2 FROM "mine"')
        assert cursornames.explain(own_cursor.value) is None
        with pytest.raises(errors.UndefinedTable) as other:
            conn.execute("SELECT * FROM sh_no_such_table")
        assert cursornames.explain(other.value) is None


TRACKING = r"""
import psycopg, django  # psycopg loaded before tracking starts, as with a preloaded app that queried
django.setup()
from psycopg._preparing import PrepareManager
from serverhooks import _internals, registry

shipped = PrepareManager.get
registry.start_tracking()
assert PrepareManager.get is not shipped, "the class, for every connection of the process"
registry.start_tracking()
assert len(_internals._psycopg_get) == 1
registry.stop_tracking()
assert PrepareManager.get is shipped, "stop_tracking undoes it"
registry.start_tracking()
assert PrepareManager.get is not shipped, "and a new start makes it again"
print("ok")
"""


@core
def test_start_tracking_wraps_psycopg_for_the_process_and_stop_tracking_undoes_it(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.project.settings",
        "DATABASE_URL": f"sqlite:///{tmp_path}/names.sqlite3",
    }
    out = subprocess.run(
        [sys.executable, "-c", TRACKING], cwd=procs.REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.stdout.strip().endswith("ok"), out.stdout[-3000:] + out.stderr[-3000:]


FIRST_CONNECTION = r"""
import json
import sys
import django
django.setup()
from django.db import connection
from serverhooks import registry

assert "psycopg" not in sys.modules, "psycopg must not be loaded yet: Django loads it with the first connection"
registry.start_tracking()
assert "psycopg" not in sys.modules, "start_tracking never imports psycopg itself"
if sys.argv[1] == "control":
    registry.stop_tracking()  # the control: psycopg's own names
with connection.cursor() as cursor:
    cursor.execute("SELECT %s::int", [1])
    cursor.execute("SELECT name FROM pg_prepared_statements ORDER BY name")
    print("names", json.dumps([row[0] for row in cursor.fetchall()]))
"""


def test_the_first_connection_of_a_process_that_never_loaded_psycopg_is_named_too(tmp_path: Path) -> None:
    """Django's own setup of a process's first connection (its time zone) prepares a statement
    before any serverhooks hook sees the connection: psycopg's import is followed instead."""
    require_server("postgres")
    url = dbserver.django_url("postgres", "test", extra_query="server_side_binding=1&prepare_threshold=0")
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.project.settings", "DATABASE_URL": url}
    names = {}
    for arm in ("fix", "control"):
        out = subprocess.run(
            [sys.executable, "-c", FIRST_CONNECTION, arm],
            cwd=procs.REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        lines = [line for line in out.stdout.splitlines() if line.startswith("names ")]
        assert out.returncode == 0 and lines, out.stdout[-3000:] + out.stderr[-3000:]
        names[arm] = json.loads(lines[0][len("names ") :])
    print(names)
    assert names["control"] and all(re.fullmatch(r"_pg3_\d+", name) for name in names["control"]), names
    assert names["fix"] and all(re.fullmatch(r"_pg3_[0-9a-f]{12}_\d+", name) for name in names["fix"]), names
