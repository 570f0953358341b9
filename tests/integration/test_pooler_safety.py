"""Behind a transaction pooler, a server-side cursor or a prepared statement either works or fails
loudly: it never reads another request's rows (issue 21, serverhooks.cursornames).

Real PgBouncer (transaction mode, two server sessions P and Q), real Gunicorn with two workers
forked from one master (the same main-thread ident, so Django gives both the same cursor name;
psycopg numbers statements per connection, so both get the same statement name). The test
steers every statement onto a session of its choosing: it pins a session by holding a
transaction open on it through PgBouncer, so the one other session is the only one free, and
the views pause where the test says (tests/project/pooler_views.py):

1. P pinned: request A (tag A) declares its cursor, or prepares its statement, on Q; pauses.
2. Q pinned, P released: request B (tag B, the other worker) does the same on P.
3. A goes on: its FETCH, or its next run of the prepared statement, can only land on P.

Control (serverhooks' line with the renaming turned off): A reads B's rows, HTTP 200. Fix: the
name A asks for does not exist on P, a loud HTTP 500 whose error names the fix. No luck involved.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.conftest import project_env, report
from tests.support import dbserver, http, procs
from tests.support import pgbouncer as pgbouncer_support

pytestmark = pytest.mark.gunicorn

ROWS = 6  # rows per tag; the cursor views read two per FETCH


@pytest.fixture
def pooled(request: pytest.FixtureRequest, fresh_database: Callable[[str], str]) -> Iterator[tuple[str, int]]:
    """(database, port) of a PgBouncer with exactly two server sessions in front of a fresh database."""
    if not pgbouncer_support.installed():
        if os.environ.get("CI") == "true":
            pytest.fail(pgbouncer_support.MISSING)
        pytest.skip(pgbouncer_support.MISSING)
    name = fresh_database("postgres")
    settings = {"default_pool_size": "2", "reserve_pool_size": "0", "max_db_connections": "2"}
    with pgbouncer_support.running([name], settings=settings) as bouncer:
        yield name, bouncer.port
        if getattr(request.node, "rep_call", None) and request.node.rep_call.failed:
            print(f"\n----- pgbouncer log -----\n{bouncer.logs()[-10000:]}")


class Pin:
    """A transaction held open through PgBouncer: the server session it runs on is nobody else's."""

    def __init__(self, port: int, name: str) -> None:
        self.conn = psycopg.connect(
            host="127.0.0.1", port=port, dbname=name, user="postgres", prepare_threshold=None, connect_timeout=10
        )
        row = self.conn.execute("SELECT pg_backend_pid()").fetchone()  # opens the transaction
        assert row is not None
        self.session: int = row[0]

    def release(self) -> None:
        self.conn.commit()
        self.conn.close()


class Request(threading.Thread):
    """One GET in a thread of its own: its (status, JSON body) once joined."""

    def __init__(self, socket_path: str, url: str) -> None:
        super().__init__(daemon=True)
        self.socket_path, self.url = socket_path, url
        self.status, self.body = 0, {}  # type: tuple[int, dict[str, Any]]

    def run(self) -> None:
        status, raw = http.get(self.socket_path, self.url, timeout=40)
        self.status = status
        try:
            self.body = json.loads(raw)
        except ValueError:
            self.body = {"error": raw[:300].decode(errors="replace")}

    def result(self, timeout: float = 40.0) -> tuple[int, dict[str, Any]]:
        self.join(timeout)
        assert not self.is_alive(), f"{self.url} did not answer in {timeout} s"
        return self.status, self.body


def wait_for(path: Path, request: Request, timeout: float = 20.0) -> None:
    """Until the view paused at `path` (or answered without pausing)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if not request.is_alive():
            raise AssertionError(f"{request.url} answered before pausing: {request.status} {request.body}")
        assert time.monotonic() < deadline, f"{path.name} did not appear in {timeout} s"
        time.sleep(0.02)


def start(tmp_path: Path, name: str, port: int, worker_class: str, renaming: bool, view: str) -> procs.Server:
    url = f"postgres://postgres@127.0.0.1:{port}/{name}{QUERIES[view]}"
    signals = tmp_path / "signals"
    signals.mkdir()
    # Only the test's requests connect in the prepared arms. psycopg numbers each connection's
    # statements from _pg3_0, and Django's setup prepares the first (set_config TimeZone): A and B
    # then get the same numbers, on P and on Q. A master's connection (QUERY_AT_IMPORT, preloaded)
    # or the first worker's start-up probe (a background thread, at a moment of its own) would
    # leave statements of the same numbers on a session, and A's or B's own Parse or Bind would
    # meet them: a loud "already exists" or "bind message supplies 1 parameters", never the
    # control's real symptom. The cursor arms query in the master, as before.
    at_import = 0 if view == "prepared" else 1
    env = project_env(
        url,
        CONN_MAX_AGE=600,
        POOLER_SIGNAL_DIR=signals,
        QUERY_AT_IMPORT=at_import,
        SERVERHOOKS_PROBE_DATABASES=0 if view == "prepared" else 1,
    )
    # Straight to PostgreSQL: through PgBouncer, its own prepared statements would stay on a session.
    procs.create_schema({**os.environ, **project_env(dbserver.django_url("postgres", name))})
    with psycopg.connect(dbserver.server_url("postgres"), dbname=name, autocommit=True) as conn:
        for tag in "AB":
            for n in range(ROWS):
                conn.execute("INSERT INTO sh_hit (marker, pid) VALUES (%s, 0)", [f"{tag}-{n}"])
    source = "from serverhooks.gunicorn import *\n"
    if not renaming:  # the control: serverhooks' line, with the fix turned off
        source += "import serverhooks.cursornames\nserverhooks.cursornames.set_enabled(False)\n"
    # worker_connections=1: a gevent worker busy with A takes no other request, so B meets the other worker.
    settings = {"_source": source, "worker_class": worker_class, "preload_app": True, "worker_connections": 1}
    return procs.start_gunicorn(tmp_path, env, settings=settings, workers=2)


def scripted(
    server: procs.Server, port: int, name: str, signals: Path, view: str
) -> dict[str, tuple[int, dict[str, Any]]]:
    """Run steps 1 to 3 of the module's docstring; each request's (status, body)."""
    first = Pin(port, name)
    a = Request(server.socket_path, f"/pooler/{view}?tag=A&step=a")
    a.start()
    wait_for(signals / "a.paused", a)
    second = Pin(port, name)
    assert second.session != first.session, "PgBouncer gave the pinned session out twice"
    first.release()
    b = Request(server.socket_path, f"/pooler/{view}?tag=B&step=b" if view == "iterate" else f"/pooler/{view}?tag=B")
    b.start()
    if view == "iterate":
        wait_for(signals / "b.paused", b)
    else:
        b.join(20)
    (signals / "a.go").touch()
    results = {"A": a.result()}
    second.release()
    (signals / "b.go").touch()
    results["B"] = b.result()
    return results


FIXES = {"iterate": "DISABLE_SERVER_SIDE_CURSORS = True", "prepared": "max_prepared_statements"}
QUERIES = {"iterate": "", "prepared": "?server_side_binding=1&prepare_threshold=0"}


# Under gevent Django names a cursor after the request's greenlet, whose id differs between two
# workers more often than not: the cursor control would count on luck there, so it runs under sync
# only. psycopg's statement names depend on the connection alone (see `start`): both servers.
ARMS = [
    pytest.param(renaming, view, worker_class, id=f"{'fix' if renaming else 'control'}-{view}-{worker_class}")
    for view in ("iterate", "prepared")
    for worker_class in ("sync", "gevent")
    for renaming in (True, False)
    if renaming or view == "prepared" or worker_class == "sync"
]


@pytest.mark.parametrize(("renaming", "view", "worker_class"), ARMS)
def test_never_another_requests_rows(
    renaming: bool,
    view: str,
    worker_class: str,
    pooled: tuple[str, int],
    servers: list[procs.Server],
    tmp_path: Path,
) -> None:
    name, port = pooled
    server = start(tmp_path, name, port, worker_class, renaming, view)
    servers.append(server)
    server.wait_ready()
    results = scripted(server, port, name, tmp_path / "signals", view)
    wrong = {tag: body for tag, (status, body) in results.items() if status == 200 and not _own(tag, body)}
    loud = {tag: body for tag, (status, body) in results.items() if status == 500 and body.get("error")}
    other = {tag: (status, body) for tag, (status, body) in results.items() if status not in (200, 500)}
    arm = "fix" if renaming else "control"
    report(
        f"pooler {view} {worker_class} {arm}: 2 requests, {len(wrong)} wrong answers, {len(loud)} loud errors"
        f" ({', '.join(sorted(b['error'].split(':')[0] for b in loud.values())) or 'none'})"
    )
    print(results)
    assert other == {}, other
    if renaming:
        assert wrong == {}, f"another request's rows behind a 200: {wrong}"
        assert loud, f"A's statement met P, where its name does not exist: it must fail loudly: {results}"
        for body in loud.values():
            assert any(FIXES[view] in note for note in body["notes"]), body
    else:
        assert wrong, f"the control must show another request's rows: {results}"


def _own(tag: str, body: dict[str, Any]) -> bool:
    return all(str(marker).startswith(f"{tag}-") for marker in body.get("rows", []))
