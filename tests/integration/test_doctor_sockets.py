"""`serverhooks doctor` finds every shared database socket, and the transaction poolers (issue 21).

Live mode on real servers: Gunicorn workers sharing a Unix socket to PostgreSQL or MariaDB (which
/proc's TCP tables cannot show), Gunicorn's dirty workers (the master's grandchildren), and a
process in a network namespace of its own. Static and live: PostgreSQL through a real PgBouncer in
transaction mode with server-side cursors or prepared statements on. Each has its control arm.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from serverhooks.doctor import live, unix_diag
from tests.conftest import project_env, require_server
from tests.integration.test_doctor import PG, doctor, gunicorn_conf, ids
from tests.support import dbserver, http, pgbouncer, procs

pytestmark = pytest.mark.gunicorn

MYSQL_SOCKET = "/run/mysqld/mysqld.sock"
PG_SOCKET_DIR = "/var/run/postgresql"


def on_port(url: str, port: int) -> str:
    """`url` with another port (the suite's server may be on any port: the tests container's is)."""
    parts = urlsplit(url)
    credentials = parts.netloc.rpartition("@")[0]
    return parts._replace(netloc=f"{credentials + '@' if credentials else ''}{parts.hostname}:{port}").geturl()


def unix_url(family: str, name: str) -> str:
    """A DATABASE_URL that reaches the local server over its Unix socket (HOST "" / "localhost")."""
    if family == "postgres":
        return f"postgres://postgres@/{name}"  # HOST "": libpq's default socket directory
    return f"mysql://root@localhost/{name}"  # "localhost": mysqlclient's default socket


@pytest.mark.parametrize("family", ["postgres", "mysql"])
def test_live_mode_finds_workers_sharing_a_unix_socket(
    family: str, fresh_database: Callable[[str], str], servers: list[procs.Server], tmp_path: Path
) -> None:
    needed = os.path.join(PG_SOCKET_DIR, ".s.PGSQL.5432") if family == "postgres" else MYSQL_SOCKET
    # The socket must be the suite's server's own: the default one on this machine, on its default port.
    if dbserver.port(family) != {"postgres": 5432, "mysql": 3306}[family] or not os.path.exists(needed):
        pytest.skip(f"the suite's {family} server has no Unix socket at {needed} (or is on another port)")
    url = unix_url(family, fresh_database(family))
    env = project_env(url, CONN_MAX_AGE=3600, QUERY_AT_IMPORT=1)
    started = procs.start_gunicorn(tmp_path, env, settings={"preload_app": True}, workers=2)
    servers.append(started)
    started.wait_ready()
    assert http.answers(started.socket_path)
    status, data, output = doctor(["--pid", str(started.pid)], {"DATABASE_URL": url})
    assert status == 1 and [f["id"] for f in data["findings"]] == ["serverhooks.W101"], output
    assert needed in data["findings"][0]["why"], output
    shared = {inode for p in data["processes"] for inode in p["socket_inodes"]}
    assert shared and all(len(p["socket_inodes"]) == 1 for p in data["processes"]), output
    # The control: the old reading (the TCP tables) knows none of these sockets, and /proc/net/unix
    # lists them with no peer and no path, so nothing there ties them to the database.
    assert not shared & set(live.tcp_peers(live.DATABASE_PORTS))
    unix_lines = Path("/proc/net/unix").read_text().splitlines()[1:]
    rows = [line.split() for line in unix_lines if line.split()[6] in {str(i) for i in shared}]
    assert rows and all(len(row) == 7 for row in rows), rows  # inode last: no path column


def test_live_mode_reads_the_dirty_workers_without_false_alarms(
    fresh_database: Callable[[str], str], servers: list[procs.Server], tmp_path: Path
) -> None:
    import gunicorn

    if tuple(gunicorn.version_info) < (25, 0):
        pytest.skip("Gunicorn's dirty arbiter needs Gunicorn 25+")
    url = dbserver.django_url("mysql", fresh_database("mysql"))
    env = project_env(url, CONN_MAX_AGE=3600, QUERY_AT_IMPORT=1)
    procs.create_schema(env)
    found = {}
    for hooks in (False, True):
        settings: dict[str, object] = {
            "preload_app": True,
            "dirty_workers": 2,
            "dirty_apps": ["tests.project.dirty:OrmApp"],
            "graceful_timeout": 10,
        }
        if hooks:
            settings["_source"] = "from serverhooks.gunicorn import *"
        started = procs.start_gunicorn(tmp_path / str(hooks), env, settings=settings, workers=2)
        servers.append(started)
        started.wait_ready()
        status, data, output = doctor(["--pid", str(started.pid)], {"DATABASE_URL": url})
        found[hooks] = (status, data, output)
        started.stop()
    # Without serverhooks the dirty workers (the master's grandchildren) hold the master's socket too.
    status, data, output = found[False]
    grandchildren = {p["pid"] for p in data["processes"] if p["role"] == "child"}
    assert len(grandchildren) == 2, output
    assert status == 1 and [f["id"] for f in data["findings"]] == ["serverhooks.W101"], output
    sharing = {int(pid.strip(",")) for pid in data["findings"][0]["why"].split(" hold")[0].split()[1:]}
    assert grandchildren <= sharing, output
    # With the hooks: the dirty workers are read, and the arbiter's own sockets are no alarm.
    status, data, output = found[True]
    assert len([p for p in data["processes"] if p["role"] == "child"]) == 2, output
    assert status == 0 and data["findings"] == [], output


def test_live_mode_reads_a_process_in_another_network_namespace(tmp_path: Path) -> None:
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("a network namespace of the test's own needs root and iproute2")
    namespace = f"sh-doctor-{uuid.uuid4().hex[:8]}"
    script = tmp_path / "gunicorn_netns_holder.py"
    script.write_text((procs.REPO / "tests" / "support" / "netns_holder.py").read_text())
    holder: subprocess.Popen[str] | None = None
    try:
        subprocess.run(["ip", "netns", "add", namespace], check=True, timeout=10)
        subprocess.run(["ip", "netns", "exec", namespace, "ip", "link", "set", "lo", "up"], check=True, timeout=10)
        holder = subprocess.Popen(
            ["ip", "netns", "exec", namespace, sys.executable, str(script), "5432", str(tmp_path), "60"],
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        assert holder.stdout is not None
        _, tcp_inode, unix_inode = holder.stdout.readline().split()
        status, data, output = doctor(["--pid", str(holder.pid)], {})
        assert status == 1, output
        whys = " ".join(f["why"] for f in data["findings"])
        assert [f["id"] for f in data["findings"]] == ["serverhooks.W101"] * 2, output
        assert f"inode {tcp_inode}, 127.0.0.1:5432" in whys and f"inode {unix_inode}, {tmp_path}/.s.PGSQL" in whys
        # The control: the doctor's own namespace (what /proc/net/tcp and sock_diag show here) has neither.
        assert int(tcp_inode) not in live.tcp_peers(live.DATABASE_PORTS)
        assert int(unix_inode) not in unix_diag.dump()
    finally:
        if holder is not None:
            os.killpg(holder.pid, 9)
            holder.wait(timeout=10)
        subprocess.run(["ip", "netns", "delete", namespace], timeout=10)


# --------------------------------------------------------------------------- transaction poolers

POOLED = "tests.support.doctor_settings"
PREPARING = '{"server_side_binding": true, "prepare_threshold": 5}'


def pooled_ids(url: str, args: list[str] | None = None, **env: Any) -> dict[str, str]:
    """{finding id: why} of the settings-only findings (no server config given)."""
    status, data, output = doctor(args or [], {"DATABASE_URL": url, "DJANGO_SETTINGS_MODULE": POOLED, **env})
    assert status in (0, 1), output
    return {f["id"]: f"{f['severity']}: {f['why']}" for f in data["findings"]}


def test_poolers_server_side_cursors_and_prepared_statements(fresh_database: Callable[[str], str]) -> None:
    require_server("postgres")
    if not pgbouncer.installed():
        pytest.skip(pgbouncer.MISSING)
    name = fresh_database("postgres")
    direct = dbserver.django_url("postgres", name)
    # Static: PgBouncer's default port, not connected to: a warning, the pool mode being unknown.
    static = pooled_ids(on_port(direct, 6432), ["--no-live-db"])
    assert static.get("serverhooks.W011", "").startswith("warning: "), static
    assert "PORT 6432" in static["serverhooks.W011"]
    # Live, through a real PgBouncer in transaction mode on a port of its own: seen by the server's port.
    with pgbouncer.running([name], settings={"admin_users": "postgres"}) as bouncer:
        pooled = on_port(direct, bouncer.port)
        assert pooled != direct
        found = pooled_ids(pooled)
        assert set(found) == {"serverhooks.W011"}, found
        assert (
            found["serverhooks.W011"].startswith("error: ") and "pool_mode = transaction" in found["serverhooks.W011"]
        )
        found = pooled_ids(pooled, DOCTOR_PG_OPTIONS=PREPARING, DISABLE_SERVER_SIDE_CURSORS=1)
        assert set(found) == {"serverhooks.W012"}, found
        assert "PgBouncer 1." in found["serverhooks.W012"]
        # The fixes: no server-side cursors, and Django's defaults for prepared statements.
        assert pooled_ids(pooled, DISABLE_SERVER_SIDE_CURSORS=1) == {}
        # Django's system checks report the same (check --deploy --database default).
        out = subprocess.run(
            [sys.executable, "-m", "django", "check", "--deploy", "--database", "default"],
            cwd=procs.REPO,
            env={
                **os.environ,
                "DJANGO_SETTINGS_MODULE": POOLED,
                "SERVERHOOKS_APP": "1",
                "DATABASE_URL": pooled,
                "DOCTOR_PG_OPTIONS": PREPARING,
            },
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "serverhooks.W011" in out.stdout + out.stderr and "serverhooks.W012" in out.stdout + out.stderr
    # No pooler in between: nothing, whatever the options.
    assert pooled_ids(direct, DOCTOR_PG_OPTIONS=PREPARING) == {}


def test_a_gunicorn_config_with_a_pooled_database_reports_it_too(tmp_path: Path) -> None:
    conf = ["-c", gunicorn_conf(tmp_path, "workers = 2", hooks=True), "--no-live-db"]
    assert "serverhooks.W011" in ids(conf, {"DATABASE_URL": on_port(PG, 6432)})
    assert "serverhooks.W011" not in ids(conf, {"DATABASE_URL": PG})
