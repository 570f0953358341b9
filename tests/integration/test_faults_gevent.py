"""Family 5 under Gunicorn's gevent worker and serverhooks' pool: a view with a time budget.

The view runs a slow query inside `gevent.Timeout`, catches the timeout and answers 200,
as a view with a time budget does. The query is cut during the server's think time, or
halfway through a 10 MB reply. Its connection must never go back to the pool: the next
holder would read the old reply as its own (another request's result) or fail.

The control is serverhooks with the guard switched off (SERVERHOOKS_CLOSE_INTERRUPTED=0):
plain Django cannot show this, since without the pool the greenlet's connection dies
with it. With one pooled connection the next request gets it, deterministically.
mysqlclient blocks the hub for the whole query, so no timeout can cut it: not tested.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import project_env
from tests.support import dbserver, http, procs

pytestmark = pytest.mark.gunicorn

DRIVERS = [("mysql", "pymysql"), ("postgres", ""), ("postgres", "psycopg2")]
DRIVER_IDS = ["pymysql", "psycopg", "psycopg2-psycogreen"]
CUTS = 40
CLIENTS, PER_CLIENT = 20, 30


def _start(tmp_path: Path, servers: list[procs.Server], url: str, **env: Any) -> procs.Server:
    full_env = project_env(url, CONN_MAX_AGE=600, GUNICORN_WORKER_CLASS="gevent", **env)
    procs.create_schema(full_env)
    server = procs.start_gunicorn(tmp_path, full_env, workers=1)
    servers.append(server)
    server.wait_ready()
    return server


def _next_request_is_right(server: procs.Server) -> bool:
    marker = uuid.uuid4().hex
    status, body = http.get(server.socket_path, f"/echo?m={marker}")
    return status == 200 and json.loads(body)["m"] == marker


@pytest.mark.parametrize(("family", "driver"), DRIVERS, ids=DRIVER_IDS)
def test_a_cut_query_never_reaches_the_next_holder(
    family: str, driver: str, fresh_database: Callable[[str], str], servers: list[procs.Server], tmp_path: Path
) -> None:
    url = dbserver.django_url(family, fresh_database(family), driver)

    # Control: the guard off, one pooled connection. The request after a cut gets the old reply.
    control = _start(tmp_path / "control", servers, url, SERVERHOOKS_POOL_SIZE=1, SERVERHOOKS_CLOSE_INTERRUPTED=0)
    outcomes = []
    for kind in ("think", "reply"):
        assert http.get_json(control.socket_path, f"/cut?kind={kind}")["cut"] is True
        time.sleep(0.6)  # the rest of the old reply arrives
        outcomes.append(_next_request_is_right(control))
    print(f"control {family}/{driver or 'psycopg'}: the request after each cut was right: {outcomes}")
    if driver == "pymysql":
        # PyMySQL keeps no state that tells: the next holder reads the old reply.
        assert not any(outcomes), "without the guard, the request after a cut should fail or read the old reply"
    control.stop()

    # Fixed: two pooled connections, cuts during a marker load in the same worker.
    server = _start(tmp_path / "fixed", servers, url, SERVERHOOKS_POOL_SIZE=2)
    cut_results: list[Any] = []

    def cutter() -> None:
        for i in range(CUTS):
            kind = "reply" if i % 2 else "think"
            try:
                cut_results.append(http.get_json(server.socket_path, f"/cut?kind={kind}", timeout=30)["cut"])
            except Exception as exc:
                cut_results.append(f"{type(exc).__name__}: {exc}")

    cutting = threading.Thread(target=cutter)
    cutting.start()
    run = http.marker_load(server.socket_path, clients=CLIENTS, per_client=PER_CLIENT)
    cutting.join(120)
    stats = http.get_json(server.socket_path, "/whoami")["serverhooks"]
    print(
        f"fixed {family}/{driver or 'psycopg'}: {run.ok}/{len(run.sent)} right, {len(run.wrong)} wrong, "
        f"{len(run.http_errors)} errors; {cut_results.count(True)} cuts; counters {stats}"
    )
    assert run.ok == len(run.sent) == CLIENTS * PER_CLIENT, (run.http_errors[:3], run.failures[:3])
    assert not run.wrong and not run.http_errors and not run.failures
    assert cut_results.count(True) == CUTS, cut_results
    assert stats["closed_interrupted"] == CUTS, "every cut query's connection was closed"
    assert _next_request_is_right(server)
