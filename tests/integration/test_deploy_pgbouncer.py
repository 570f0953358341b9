"""PgBouncer for real: Debian's pgbouncer, in transaction mode, configured from the shipped
deploy/pgbouncer/pgbouncer.ini, between Gunicorn (with serverhooks) and PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import project_env
from tests.support import dbserver, http, procs
from tests.support import pgbouncer as pgbouncer_support

pytestmark = pytest.mark.deploy


@pytest.fixture
def pgbouncer(request: pytest.FixtureRequest, fresh_database: Callable[[str], str]) -> Iterator[tuple[str, int]]:
    """(database, port) of a PgBouncer in front of a fresh PostgreSQL database."""
    if not pgbouncer_support.installed():
        if os.environ.get("CI") == "true":
            pytest.fail(pgbouncer_support.MISSING)
        pytest.skip(pgbouncer_support.MISSING)
    name = fresh_database("postgres")
    with pgbouncer_support.running([name]) as bouncer:
        yield name, bouncer.port
        if getattr(request.node, "rep_call", None) and request.node.rep_call.failed:
            print(f"\n----- pgbouncer log -----\n{bouncer.logs()[-10000:]}")


def test_shipped_config_is_transaction_pooling_without_secrets() -> None:
    config = pgbouncer_support.shipped()["pgbouncer"]
    assert config["pool_mode"] == "transaction"
    assert int(config["max_db_connections"]) >= int(config["default_pool_size"])
    assert config["auth_type"] in {"scram-sha-256", "md5", "hba", "cert"}
    assert "password" not in pgbouncer_support.SHIPPED.read_text().lower().replace("passwords live", "")


@pytest.mark.parametrize("worker_class", ["sync", "gevent"])
def test_gunicorn_through_pgbouncer(
    worker_class: str, pgbouncer: tuple[str, int], servers: list[procs.Server], tmp_path: Path
) -> None:
    name, port = pgbouncer
    pool_size = int(pgbouncer_support.shipped()["pgbouncer"]["default_pool_size"])
    url = f"postgres://postgres@127.0.0.1:{port}/{name}?pgbouncer=1"
    env = project_env(url, CONN_MAX_AGE=600, GUNICORN_WORKER_CLASS=worker_class, GUNICORN_PRELOAD=1, QUERY_AT_IMPORT=1)
    subprocess.run(
        [sys.executable, "-m", "tests.project.schema"],
        cwd=procs.REPO,
        env={**os.environ, **env},
        check=True,
        timeout=60,
    )
    server = procs.start_gunicorn(tmp_path, env, workers=4)
    servers.append(server)
    server.wait_ready()
    with dbserver.SessionSampler("postgres", name, interval=0.05) as sampler:
        run = http.marker_load(server.socket_path, clients=8, per_client=250)
    assert run.failures == [] and run.http_errors == [] and run.wrong == [], (run.failures[:3], run.http_errors[:3])
    assert run.ok == 2000
    stored = {row[0] for row in dbserver.query("postgres", "SELECT marker FROM sh_hit", database=name)}
    assert stored == set(run.sent)
    assert 0 < sampler.peak <= pool_size, f"peak {sampler.peak} server sessions, default_pool_size {pool_size}"
    print(f"{worker_class} through PgBouncer: peak {sampler.peak} server sessions for 2000 requests")


def test_proxysql_template_without_proxysql() -> None:
    """ProxySQL is not installed here: check what can be checked without it (README says untested)."""
    import re

    text = (procs.REPO / "deploy" / "proxysql" / "proxysql.cnf").read_text()
    assert "UNTESTED HERE" in text
    assert not re.search(r"(?i)^\s*(password|admin_credentials|monitor_password)\s*=", text, flags=re.M)
    assert 'interfaces="127.0.0.1:6033"' in text and 'mysql_ifaces="127.0.0.1:6032"' in text
    assert "multiplexing=true" in text and "hostgroup=0" in text
    assert "untested here" in (procs.REPO / "deploy" / "proxysql" / "README.md").read_text().lower()
