"""Issue 20, findings 1 and 2, end to end: real Gunicorn sync, gevent and asgi workers with the
shipped gunicorn.conf.py, on MariaDB and PostgreSQL, 40 requests per view.

- /integrity/write-then-refused writes a row in atomic(), then catches the refusal of an
  execute_wrapper (raised before anything is sent). Plain Django keeps the row.
- /integrity/release-inside-atomic writes two rows in one block with `releasing()`,
  `release_connections()` and `Thread(...).run()` in between; with ?fail=1 the block raises
  at its end, so neither row may stay.

The control arm is serverhooks with both fixes reverted (tests/support/guard_control.py and
release_control.py, imported by the master): every refused request lost its row behind an
HTTP 200 (with mysqlclient, a 500 for an OperationalError 2006 that plain Django never
raises), and under the gevent and asgi pools every block lost its first row and kept its
second even when it failed.
"""

from __future__ import annotations

import concurrent.futures
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import project_env
from tests.support import dbserver, http, procs

pytestmark = pytest.mark.gunicorn

REQUESTS = 40
CONTROL_CONF = """
# The control arm: the shipped file, then serverhooks as it was before issue 20.
import tests.support.guard_control  # noqa: E402,F401
import tests.support.release_control  # noqa: E402,F401
"""


def _start(
    kind: str, family: str, name: str, tmp_path: Path, servers: list[procs.Server], control: bool
) -> procs.Server:
    driver = "pymysql" if family == "mysql" and kind == "gevent" else ""
    env = project_env(dbserver.django_url(family, name, driver), CONN_MAX_AGE=600, SERVERHOOKS_PROBE_DATABASES=0)
    procs.create_schema(env)
    env["GUNICORN_WORKER_CLASS"] = kind
    conf = None
    if control:
        conf = tmp_path / "control.conf.py"
        conf.write_text((procs.REPO / "gunicorn.conf.py").read_text() + CONTROL_CONF)
    app = "tests.project.asgi:application" if kind == "asgi" else "tests.project.wsgi:application"
    server = procs.start_gunicorn(tmp_path / ("control" if control else "fixed"), env, conf=conf, app=app, workers=2)
    servers.append(server)
    server.wait_ready(60)
    return server


def _requests(server: procs.Server, path: str) -> tuple[list[str], list[int]]:
    """REQUESTS GETs of `path` with a fresh marker each, 4 at a time: (markers, statuses)."""
    markers = [uuid.uuid4().hex for _ in range(REQUESTS)]

    def one(marker: str) -> int:
        joiner = "&" if "?" in path else "?"
        status, _body = http.get(server.socket_path, f"{path}{joiner}m={marker}", timeout=30)
        return status

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(one, markers))
    return markers, statuses


def _rows(family: str, name: str) -> set[str]:
    return {row[0] for row in dbserver.query(family, "SELECT marker FROM sh_hit", database=name)}


def _serve_and_count(server: procs.Server, family: str, name: str) -> dict[str, object]:
    refused, refused_status = _requests(server, "/integrity/write-then-refused")
    released, released_status = _requests(server, "/integrity/release-inside-atomic")
    failed, failed_status = _requests(server, "/integrity/release-inside-atomic?fail=1")
    rows = _rows(family, name)
    return {
        "refused_200": refused_status.count(200),
        "refused_rows": sum(m in rows for m in refused),
        "released_200": released_status.count(200),
        "released_first_rows": sum(f"{m}-1" in rows for m in released),
        "released_second_rows": sum(f"{m}-2" in rows for m in released),
        "failed_500": failed_status.count(500),
        "failed_rows": sum(f"{m}-1" in rows or f"{m}-2" in rows for m in failed),
    }


@pytest.mark.parametrize("kind", ["sync", "gevent", "asgi"])
@pytest.mark.parametrize("family", ["mysql", "postgres"])
def test_no_write_vanishes_behind_a_200_and_no_block_half_commits(
    family: str, kind: str, fresh_database: Callable[[str], str], servers: list[procs.Server], tmp_path: Path
) -> None:
    name = fresh_database(family)
    fixed = _serve_and_count(_start(kind, family, name, tmp_path, servers, control=False), family, name)
    servers[-1].stop()
    control = _serve_and_count(_start(kind, family, name, tmp_path, servers, control=True), family, name)
    print(f"{family} {kind}: fixed {fixed}; control {control}")

    everything = {
        "refused_200": REQUESTS,
        "refused_rows": REQUESTS,
        "released_200": REQUESTS,
        "released_first_rows": REQUESTS,
        "released_second_rows": REQUESTS,
        "failed_500": REQUESTS,
        "failed_rows": 0,
    }
    assert fixed == everything
    # Before: every refused request lost its row, behind a 200 (mysqlclient: a 500 saying 2006).
    assert control["refused_rows"] == 0
    if kind != "sync":  # only the pools (gevent, asgi) checked a connection in inside atomic()
        assert (control["released_first_rows"], control["released_second_rows"]) == (0, REQUESTS)
        assert control["failed_rows"] == REQUESTS  # a block that failed kept its second row
