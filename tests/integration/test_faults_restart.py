"""Family 5: a database restart under steady load.

The tests start database servers of their own (their own data directory and port, never
the shared ones other tests use), serve them with Gunicorn gthread workers (4 threads
each, so some sessions sit idle through the restart), and restart them while a client
keeps sending requests (it pauses while the server is down, so that every session the
workers hold sits idle through the restart: a request during the outage would fail anyway,
and Django would close that session, which made the control depend on which threads the
outage's requests happened to reach). Requests started 1 s after the server answers again
must all succeed. The control is the same run with serverhooks' request-start check switched
off: there, the first requests after the server is back fail on the dead sessions (Django
then closes them, so the failures stop soon after).
Needs root and the servers' binaries, so it skips inside the tests container.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import project_env
from tests.support import faults, http, procs

pytestmark = pytest.mark.gunicorn

DOWN_SECONDS = 1.0
GRACE = 1.0  # requests started this long after the server answers again must succeed


@pytest.fixture
def private_server(request: pytest.FixtureRequest) -> Iterator[faults.PrivateServer]:
    reason = faults.why_no_private_server()
    if reason:
        pytest.skip(reason)
    server = faults.PrivateServer(request.param)
    try:
        server.init()
        yield server
    finally:
        failed = getattr(request.node, "rep_call", None) and request.node.rep_call.failed
        if failed:
            print(f"\n----- private {server.family} server log -----\n{server.log()[-6000:]}")
        server.remove()


@dataclass
class SteadyLoad:
    """One client, a request every 200 ms, recording when each request started and how it ended.

    pause() waits for the request in flight and holds the next one until resume(), so every
    session the workers hold sits idle through the outage, as most do in a fleet of workers.
    """

    socket_path: str
    results: list[tuple[float, bool]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _running: threading.Event = field(default_factory=threading.Event)
    _idle: threading.Event = field(default_factory=threading.Event)

    def pause(self) -> None:
        self._running.clear()
        if not self._idle.wait(15):
            raise AssertionError("the steady client did not pause within 15 s")

    def resume(self) -> None:
        self._running.set()

    def _client(self) -> None:
        deadline = time.monotonic() + 120
        while not self._stop.is_set() and time.monotonic() < deadline:
            if not self._running.is_set():
                self._idle.set()
                self._running.wait(1.0)
                continue
            self._idle.clear()
            started = time.monotonic()
            marker = uuid.uuid4().hex
            try:
                ok = http.get_json(self.socket_path, f"/echo?m={marker}", timeout=10)["m"] == marker
            except Exception:
                ok = False
            self.results.append((started, ok))
            self._stop.wait(0.2)

    def __enter__(self) -> SteadyLoad:
        self._running.set()
        self._threads = [threading.Thread(target=self._client)]
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._running.set()
        for thread in self._threads:
            thread.join(30)


@pytest.mark.parametrize("private_server", ["mysql", "postgres"], indirect=True)
def test_restart_under_steady_load(
    private_server: faults.PrivateServer, servers: list[procs.Server], tmp_path: Path
) -> None:
    env = project_env(private_server.url, CONN_MAX_AGE=600, GUNICORN_WORKER_CLASS="gthread", GUNICORN_THREADS=4)
    procs.create_schema(env)
    outcome: dict[bool, dict[str, float]] = {}
    for check in (False, True):
        server = procs.start_gunicorn(
            tmp_path / f"check{int(check)}", {**env, "SERVERHOOKS_CHECK_IDLE_SESSIONS": str(int(check))}, workers=2
        )
        servers.append(server)
        server.wait_ready()
        http.marker_load(server.socket_path, clients=8, per_client=5)  # every thread has a session
        with SteadyLoad(server.socket_path) as load:
            time.sleep(1.0)
            load.pause()
            private_server.stop()
            time.sleep(DOWN_SECONDS)
            private_server.start()
            back = time.monotonic()
            load.resume()
            time.sleep(GRACE + 4.0)
        after_back = [ok for started, ok in load.results if started >= back]
        after_grace = [ok for started, ok in load.results if started >= back + GRACE]
        first_success = min((started for started, ok in load.results if started >= back and ok), default=None)
        outcome[check] = {
            "failed once it answered": after_back.count(False),
            "failed after the grace": after_grace.count(False),
            "requests after the grace": len(after_grace),
            "seconds to the first success": round(first_success - back, 3) if first_success else -1,
        }
        server.stop()
    print(f"{private_server.family} restart: without the check {outcome[False]}; with it {outcome[True]}")
    assert outcome[True]["requests after the grace"] >= 15
    assert outcome[True]["failed after the grace"] == 0
    # The control: sessions idle through the restart fail their next request, after the server is back.
    # Every thread that ever served holds one (CONN_MAX_AGE=600), so the first request after the
    # restart meets one in any worker that served.
    assert outcome[False]["failed once it answered"] > 0, "the control should show requests failing on dead sessions"
