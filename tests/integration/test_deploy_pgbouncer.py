"""PgBouncer for real: Debian's pgbouncer, in transaction mode, configured from the shipped
deploy/pgbouncer/pgbouncer.ini, between Gunicorn (with serverhooks) and PostgreSQL."""

from __future__ import annotations

import configparser
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import project_env
from tests.support import dbserver, http, procs

pytestmark = pytest.mark.deploy

SHIPPED = procs.REPO / "deploy" / "pgbouncer" / "pgbouncer.ini"
PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


def _shipped() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=(";",))
    parser.read_string(SHIPPED.read_text())
    return parser


@pytest.fixture
def pgbouncer(request: pytest.FixtureRequest, fresh_database: Callable[[str], str]) -> Iterator[tuple[str, int]]:
    """(database, port) of a PgBouncer in front of a fresh PostgreSQL database."""
    if not Path(PGBOUNCER).exists():
        message = "pgbouncer is not installed: apt-get install pgbouncer (tests/run setup does it as root)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    name = fresh_database("postgres")
    from urllib.parse import urlsplit

    server = urlsplit(dbserver.server_url("postgres"))
    # PgBouncer refuses to run as root: run it as postgres, from a directory it can read.
    work = Path(tempfile.mkdtemp(prefix="sh-pgbouncer-"))
    work.chmod(0o755)
    config = _shipped()
    # The server may ask for a password: PgBouncer then logs in as this user with it (it takes a
    # password= from here only together with user=).
    login = f" user={server.username or 'postgres'} password={server.password}" if server.password else ""
    config["databases"] = {name: f"host={server.hostname} port={server.port or 5432} dbname={name}{login}"}
    port = procs.free_port()
    config["pgbouncer"].update(
        listen_port=str(port),
        unix_socket_dir="",
        auth_type="trust",  # the local server trusts loopback; production uses scram-sha-256
        auth_file=str(work / "userlist.txt"),
        logfile=str(work / "pgbouncer.log"),
        pidfile=str(work / "pgbouncer.pid"),
    )
    (work / "userlist.txt").write_text(f'"{server.username or "postgres"}" ""\n')
    with open(work / "pgbouncer.ini", "w") as f:
        config.write(f)
    user: list[str] = []
    if os.geteuid() == 0:
        user = ["-u", "postgres"]
        for path in [work, *work.iterdir()]:
            shutil.chown(path, "postgres")
    with open(work / "stderr.log", "wb") as stderr:
        proc = subprocess.Popen(
            [PGBOUNCER, *user, str(work / "pgbouncer.ini")],
            stdout=stderr,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def logs() -> str:
        return "".join(
            p.read_text(errors="replace") for p in (work / "stderr.log", work / "pgbouncer.log") if p.exists()
        )

    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if proc.poll() is not None:
                raise RuntimeError(f"pgbouncer exited with {proc.returncode}:\n{logs()}")
            time.sleep(0.1)
        yield name, port
        if getattr(request.node, "rep_call", None) and request.node.rep_call.failed:
            print(f"\n----- pgbouncer log -----\n{logs()[-10000:]}")
    finally:
        proc.send_signal(signal.SIGINT)  # PgBouncer's "safe shutdown"
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        shutil.rmtree(work, ignore_errors=True)


def test_shipped_config_is_transaction_pooling_without_secrets() -> None:
    config = _shipped()["pgbouncer"]
    assert config["pool_mode"] == "transaction"
    assert int(config["max_db_connections"]) >= int(config["default_pool_size"])
    assert config["auth_type"] in {"scram-sha-256", "md5", "hba", "cert"}
    assert "password" not in SHIPPED.read_text().lower().replace("passwords live", "")


@pytest.mark.parametrize("worker_class", ["sync", "gevent"])
def test_gunicorn_through_pgbouncer(
    worker_class: str, pgbouncer: tuple[str, int], servers: list[procs.Server], tmp_path: Path
) -> None:
    name, port = pgbouncer
    pool_size = int(_shipped()["pgbouncer"]["default_pool_size"])
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
