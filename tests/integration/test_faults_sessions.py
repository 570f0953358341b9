"""Family 5: sessions the server ended while idle never fail a request.

Gunicorn sync, gthread and gevent workers and uWSGI processes keep Django's persistent
connections (CONN_MAX_AGE=600). The server ends the idle sessions: `KILL` /
`pg_terminate_backend`, or its own idle timeout (MySQL `wait_timeout`, PostgreSQL
`idle_session_timeout`) shorter than the gap between requests. The control is the same
server with serverhooks' request-start check switched off (SERVERHOOKS_CHECK_IDLE_SESSIONS=0),
which is what plain Django does: the first request on each dead session fails.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import project_env
from tests.support import dbserver, faults, http, procs

pytestmark = pytest.mark.gunicorn

KINDS: dict[str, dict[str, str]] = {
    "sync": {"GUNICORN_WORKER_CLASS": "sync"},
    "gthread": {"GUNICORN_WORKER_CLASS": "gthread", "GUNICORN_THREADS": "4"},
    "gevent": {"GUNICORN_WORKER_CLASS": "gevent"},
    "uwsgi": {},
}
IDLE_TIMEOUT = 2  # seconds; the gap between the bursts below is longer


def start(
    kind: str, tmp_path: Path, servers: list[procs.Server], env: dict[str, str], workers: int = 2
) -> procs.Server:
    server = (
        procs.start_uwsgi(tmp_path, env, workers=workers)
        if kind == "uwsgi"
        else procs.start_gunicorn(tmp_path, {**env, **KINDS[kind]}, workers=workers)
    )
    servers.append(server)
    server.wait_ready()
    return server


def failed(run: http.MarkerRun) -> int:
    return len(run.http_errors) + len(run.wrong) + len(run.failures)


def driver_for(family: str, kind: str) -> str:
    return "pymysql" if family == "mysql" and kind == "gevent" else ""  # mysqlclient blocks gevent's hub


@pytest.mark.parametrize("fault", ["killed", "idle-timeout"])
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("family", ["mysql", "postgres"])
def test_ended_idle_sessions_fail_no_request(
    family: str,
    kind: str,
    fault: str,
    fresh_database: Callable[[str], str],
    servers: list[procs.Server],
    tmp_path: Path,
) -> None:
    name = fresh_database(family)
    env = project_env(dbserver.django_url(family, name, driver_for(family, kind)), CONN_MAX_AGE=600)
    procs.create_schema(env)
    if fault == "idle-timeout":
        if family == "mysql":
            env["MYSQL_INIT_COMMAND"] = f"SET SESSION wait_timeout={IDLE_TIMEOUT}"
        else:
            dbserver.query(family, f"ALTER DATABASE {name} SET idle_session_timeout = '{IDLE_TIMEOUT}s'")
    outcome: dict[str, Any] = {}
    for check in (False, True):
        server = start(
            kind, tmp_path / f"check{int(check)}", servers, {**env, "SERVERHOOKS_CHECK_IDLE_SESSIONS": str(int(check))}
        )
        warm = http.marker_load(server.socket_path, clients=8, per_client=5)
        assert failed(warm) == 0, warm.http_errors[:3]
        if fault == "killed":
            time.sleep(0.2)  # the last request's session is idle again
            ended = faults.end_sessions(family, name)
            assert ended > 0
            time.sleep(0.5)
        else:
            time.sleep(IDLE_TIMEOUT + 1.5)
        run = http.marker_load(server.socket_path, clients=4, per_client=25)
        outcome[f"check={check}"] = f"{failed(run)} of {len(run.sent)} failed"
        if check:
            stats = [http.get_json(server.socket_path, "/whoami")["serverhooks"] for _ in range(6)]
            outcome["closed_unhealthy (some workers)"] = sum(s["closed_unhealthy"] for s in stats)
            assert failed(run) == 0, (run.http_errors[:3], run.wrong[:3], run.failures[:3])
        else:
            control_failures = failed(run)
        server.stop()
    print(f"{family} {kind} {fault}: {outcome}")
    assert control_failures > 0, "without the check the first request on a dead session should fail"


@pytest.mark.parametrize("driver", ["", "psycopg2"], ids=["psycopg", "psycopg2"])
def test_a_notification_is_not_taken_for_an_ended_session(
    driver: str, fresh_database: Callable[[str], str], servers: list[procs.Server], tmp_path: Path
) -> None:
    """A session that LISTENs gets NOTIFY while idle: its socket is readable, yet it is healthy."""
    name = fresh_database("postgres")
    env = project_env(dbserver.django_url("postgres", name, driver), CONN_MAX_AGE=600)
    server = start("sync", tmp_path, servers, env, workers=1)
    listening = http.get_json(server.socket_path, "/listen?channel=sh_news")["session"]
    dbserver.query("postgres", "SELECT pg_notify('sh_news', 'hello')", database=name)
    time.sleep(0.3)  # the notification sits unread on the idle session's socket
    after = http.get_json(server.socket_path, "/whoami")
    assert after["session"] == listening, "a healthy session was replaced"
    assert after["serverhooks"]["closed_unhealthy"] == 0
    # ... and the notification is still there for the app to read.
    assert http.get_json(server.socket_path, "/notifications")["payloads"] == ["hello"]
    # The same session, ended for real, is replaced: the check does tell them apart.
    faults.end_sessions("postgres", name)
    time.sleep(0.3)
    replaced = http.get_json(server.socket_path, "/whoami")
    assert replaced["error"] is None and replaced["session"] != listening
    assert replaced["serverhooks"]["closed_unhealthy"] == 1
