"""serverhooks under a real uWSGI booted with the shipped uwsgi.ini, on MariaDB and PostgreSQL.

Control arms use the same file with the `import = serverhooks.uwsgi` line removed.
"""

from __future__ import annotations

import configparser
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import project_env
from tests.support import dbserver, http, procs

pytestmark = pytest.mark.uwsgi

IMPORT_LINE = "import = serverhooks.uwsgi"
PROTOCOL_ERRORS = re.compile(r"\((2006|2013|2014|2027), |lost synchronization|InterfaceError|Traceback")
POOL_SIZE = 10


def _ini_without_hooks(tmp_path: Path) -> Path:
    text = (procs.REPO / "uwsgi.ini").read_text()
    assert IMPORT_LINE in text
    path = tmp_path / "no-hooks.ini"
    path.write_text(text.replace(IMPORT_LINE, "; (serverhooks removed for the control arm)"))
    return path


def _start(
    tmp_path: Path,
    servers: list[procs.Server],
    url: str,
    *,
    hooks: bool = True,
    workers: int = 4,
    args: list[str] | None = None,
    **env: Any,
) -> procs.Server:
    full_env = project_env(url, **env)
    procs.create_schema(full_env)
    ini = None if hooks else _ini_without_hooks(tmp_path)
    server = procs.start_uwsgi(tmp_path, full_env, ini=ini, args=args, workers=workers)
    servers.append(server)
    server.wait_ready()
    return server


def test_shipped_ini_has_the_production_options() -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.read_string((procs.REPO / "uwsgi.ini").read_text())
    section = parser["uwsgi"]
    for option in (
        "master",
        "strict",
        "need-app",
        "die-on-term",
        "vacuum",
        "single-interpreter",
        "enable-threads",
        "py-call-uwsgi-fork-hooks",
    ):
        assert section.get(option) == "true", option
    for option in ("harakiri", "max-requests", "max-requests-delta", "reload-on-rss", "socket"):
        assert option in section, option
    assert str(section.get("socket")).startswith(("127.0.0.1:", "/"))
    assert section.get("import") == "serverhooks.uwsgi"


@pytest.mark.parametrize("family", ["mysql", "postgres"])
def test_prefork_control_arm_workers_share_the_masters_socket(
    family: str, fresh_database: Callable[[str], str], servers: list[procs.Server], tmp_path: Path
) -> None:
    name = fresh_database(family)
    server = _start(
        tmp_path, servers, dbserver.django_url(family, name), hooks=False, CONN_MAX_AGE=3600, QUERY_AT_IMPORT=1
    )
    shared = procs.shared_inodes(procs.db_sockets([server.pid, *server.workers()], dbserver.port(family)))
    assert any(server.pid in owners and len(owners) == 5 for owners in shared.values()), shared


@pytest.mark.parametrize("family", ["mysql", "postgres"])
def test_prefork_hooks_arm(
    family: str, fresh_database: Callable[[str], str], servers: list[procs.Server], tmp_path: Path
) -> None:
    name = fresh_database(family)
    aborted_before = dbserver.aborted_clients() if family == "mysql" else 0
    server = _start(tmp_path, servers, dbserver.django_url(family, name), CONN_MAX_AGE=3600, QUERY_AT_IMPORT=1)
    run = http.marker_load(server.socket_path, clients=8, per_client=250)
    assert run.failures == [] and run.http_errors == [] and run.wrong == []
    assert run.ok == 2000 and run.inherited == 0
    held = procs.db_sockets([server.pid, *server.workers()], dbserver.port(family))
    assert procs.shared_inodes(held) == {}, held
    assert held[server.pid] == set(), "the master closed its session before forking"
    stored = {row[0] for row in dbserver.query(family, "SELECT marker FROM sh_hit", database=name)}
    assert stored == set(run.sent)
    assert len(dbserver.sessions(family, name)) <= 4
    assert server.stop() in (0, 30)  # 30: uWSGI's exit code after SIGTERM with die-on-term
    assert dbserver.wait_sessions_at_most(family, name, 0) == []
    assert not PROTOCOL_ERRORS.search(server.log())
    if family == "mysql":
        assert dbserver.aborted_clients() == aborted_before, "every session ended with COM_QUIT"


def test_lazy_apps_with_threads_stay_within_processes_times_threads(
    fresh_database: Callable[[str], str], servers: list[procs.Server], tmp_path: Path
) -> None:
    name = fresh_database("mysql")
    server = _start(
        tmp_path,
        servers,
        dbserver.django_url("mysql", name),
        args=["--lazy-apps"],
        CONN_MAX_AGE=3600,
        QUERY_AT_IMPORT=1,
        UWSGI_THREADS=4,
    )
    with dbserver.SessionSampler("mysql", name) as sampler:
        run = http.marker_load(server.socket_path, clients=16, per_client=60)
    assert run.ok == 960 and run.wrong == [] and run.failures == [] and run.http_errors == []
    assert sampler.peak <= 4 * 4, sampler.peak
    server.stop()
    assert dbserver.wait_sessions_at_most("mysql", name, 0) == []


@pytest.mark.parametrize("hooks", [False, True], ids=["control", "hooks"])
@pytest.mark.parametrize(("family", "driver"), [("mysql", "pymysql"), ("postgres", "")], ids=["pymysql", "psycopg"])
def test_gevent_loop(
    hooks: bool,
    family: str,
    driver: str,
    fresh_database: Callable[[str], str],
    servers: list[procs.Server],
    tmp_path: Path,
) -> None:
    name = fresh_database(family)
    # Through the environment, as the shipped uwsgi.ini asks (it then leaves out the fork hooks).
    server = _start(
        tmp_path,
        servers,
        dbserver.django_url(family, name, driver),
        hooks=hooks,
        workers=2,
        CONN_MAX_AGE=600,
        UWSGI_THREADS=1,
        UWSGI_GEVENT=100,
        UWSGI_GEVENT_EARLY_MONKEY_PATCH=1,
    )
    with dbserver.SessionSampler(family, name) as sampler:
        run = http.marker_load(server.socket_path, clients=20, per_client=25)
    distinct = {session for _pid, session in run.sessions}
    assert run.wrong == []
    if hooks:
        assert run.ok == 500 and run.failures == [] and run.http_errors == []
        assert len(distinct) <= 2 * POOL_SIZE and sampler.peak <= 2 * POOL_SIZE
        server.stop()
        assert dbserver.wait_sessions_at_most(family, name, 0) == [], "closed at exit, where uWSGI skips atexit"
    else:
        assert len(distinct) >= 0.9 * run.ok, "a session per client connection"


def _wait_until_workers_are_steady(server: procs.Server, seconds: float, timeout: float) -> None:
    """Until the same workers, as many as expected, have run for `seconds` (bounded by `timeout`)."""
    deadline = time.monotonic() + timeout
    steady_since, seen = time.monotonic(), set(server.workers())
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = set(server.workers())
        if now != seen or len(now) < server.expected_workers:
            steady_since, seen = time.monotonic(), now
        elif time.monotonic() - steady_since >= seconds:
            return


@pytest.mark.parametrize("family", ["mysql", "postgres"])
def test_respawns_and_graceful_reload_leave_nothing_behind(
    family: str, fresh_database: Callable[[str], str], servers: list[procs.Server], tmp_path: Path
) -> None:
    name = fresh_database(family)
    aborted_before = dbserver.aborted_clients() if family == "mysql" else 0
    server = _start(
        tmp_path,
        servers,
        dbserver.django_url(family, name),
        CONN_MAX_AGE=3600,
        QUERY_AT_IMPORT=1,
        UWSGI_MAX_REQUESTS=20,
        UWSGI_MAX_REQUESTS_DELTA=1,
        UWSGI_MIN_WORKER_LIFETIME=0,  # uWSGI recycles no worker younger than 10 s by default
    )
    first_workers = set(server.workers())
    run = http.marker_load(server.socket_path, clients=4, per_client=125)
    assert run.ok == 500 and run.wrong == []
    assert len({pid for pid, _ in run.sessions} - first_workers) > 0, "workers were respawned"
    assert len(dbserver.wait_sessions_at_most(family, name, 4)) <= 4

    # A reload that lands while the master is pausing its respawns ("respawning too fast ... sleep a
    # bit") can wait out uWSGI's 60 s reload mercy for the worker it respawns: reload once it is calm.
    _wait_until_workers_are_steady(server, seconds=3.0, timeout=20.0)
    os.kill(server.pid, signal.SIGHUP)  # graceful reload
    deadline = time.monotonic() + 30
    while (set(server.workers()) & first_workers or len(server.workers()) < 4) and time.monotonic() < deadline:
        time.sleep(0.1)
    server.wait_ready(timeout=90)
    run = http.marker_load(server.socket_path, clients=4, per_client=10)
    assert run.ok == 40 and run.wrong == []
    assert len(dbserver.wait_sessions_at_most(family, name, 4)) <= 4
    if family == "mysql":
        assert dbserver.aborted_clients() == aborted_before, "recycled workers said goodbye"


def test_postfork_decorator_runs_in_every_worker_after_serverhooks(
    fresh_database: Callable[[str], str], servers: list[procs.Server], tmp_path: Path
) -> None:
    name = fresh_database("mysql")
    log = tmp_path / "postfork.log"
    server = _start(
        tmp_path,
        servers,
        dbserver.django_url("mysql", name),
        args=["--import", "tests.support.uwsgi_user"],
        CONN_MAX_AGE=3600,
        QUERY_AT_IMPORT=1,
        POSTFORK_LOG=str(log),
        UWSGI_MAX_REQUESTS=10,
        UWSGI_MAX_REQUESTS_DELTA=1,
        UWSGI_MIN_WORKER_LIFETIME=0,  # uWSGI recycles no worker younger than 10 s by default
    )
    http.marker_load(server.socket_path, clients=4, per_client=40)
    deadline = time.monotonic() + 10
    while len(server.workers()) < 4 and time.monotonic() < deadline:
        time.sleep(0.1)
    lines = [line.split() for line in log.read_text().splitlines()]
    everywhere = [dict(item.split("=") for item in fields[1:]) for fields in lines if fields[0] == "all"]
    only2 = [dict(item.split("=") for item in fields[1:]) for fields in lines if fields[0] == "only2"]
    pids = [entry["pid"] for entry in everywhere]
    assert len(pids) == len(set(pids)), "once per worker"
    assert len(pids) > 4, "respawned workers ran it too"
    assert {entry["worker"] for entry in everywhere} == {"1", "2", "3", "4"}
    assert only2 and {entry["worker"] for entry in only2} == {"2"}
    assert all(entry["inherited"] == "False" for entry in everywhere + only2)


@pytest.mark.parametrize(
    ("options", "handlers_run"),
    [([], False), (["--py-call-osafterfork"], True), (["--py-call-uwsgi-fork-hooks"], True)],
    ids=["default", "py-call-osafterfork", "py-call-uwsgi-fork-hooks"],
)
def test_whether_register_at_fork_handlers_run_in_workers(
    options: list[str], handlers_run: bool, servers: list[procs.Server], tmp_path: Path
) -> None:
    """The README's table of when serverhooks' fork guard also runs under uWSGI."""
    if "--py-call-osafterfork" in options and sys.version_info >= (3, 13):
        pytest.skip(
            "uWSGI 2.0's py-call-osafterfork aborts every worker on Python 3.13 (Fatal Python error: "
            "_PyRecursiveMutex_Unlock), with or without serverhooks; the shipped uwsgi.ini does not use it"
        )
    log = tmp_path / "forkprobe.log"
    log.touch()
    ini = tmp_path / "plain.ini"
    shipped = (procs.REPO / "uwsgi.ini").read_text()
    assert "py-call-uwsgi-fork-hooks = true" in shipped
    ini.write_text(shipped.replace("py-call-uwsgi-fork-hooks = true", "; removed: uWSGI's default"))
    full_env = project_env(f"sqlite:///{tmp_path}/probe.sqlite3", FORKPROBE_LOG=str(log))
    server = procs.start_uwsgi(tmp_path, full_env, ini=ini, args=["--import", "tests.support.forkprobe", *options])
    servers.append(server)
    server.wait_ready()
    recorded = {int(pid) for pid in log.read_text().split()}
    assert (set(server.workers()) <= recorded) == handlers_run, (recorded, server.workers())


def test_without_a_master_it_says_why_and_serves(tmp_path: Path, servers: list[procs.Server]) -> None:
    socket_path = str(tmp_path / "http.sock")
    env = {**os.environ, **project_env(f"sqlite:///{tmp_path}/nomaster.sqlite3")}
    uwsgi_bin = str(Path(sys.executable).with_name("uwsgi"))
    log_path = tmp_path / "uwsgi.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                uwsgi_bin,
                "--http-socket",
                socket_path,
                "--module",
                "tests.project.wsgi:application",
                "--import",
                "serverhooks.uwsgi",
                "--chdir",
                str(procs.REPO),
                "--need-app",
            ],
            cwd=procs.REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = procs.Server(proc=proc, socket_path=socket_path, log_path=log_path, expected_workers=0)
    servers.append(server)
    server.wait_ready()
    assert http.get(socket_path, "/ping")[0] == 200
    assert "without a master there is no fork to guard" in server.log()


def test_postfork_outside_uwsgi_returns_the_function_and_never_calls_it() -> None:
    code = """
calls = []
from serverhooks.uwsgi import postfork

@postfork
def a():
    calls.append("a")

@postfork(2)
def b():
    calls.append("b")

assert calls == [], calls
a(); b()
assert calls == ["a", "b"]
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=procs.REPO, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr


def test_the_database_probe_runs_once_per_server_not_per_respawn(servers: list[procs.Server], tmp_path: Path) -> None:
    """As under Gunicorn, only the first worker a server starts checks the databases: here an
    unreachable one, whose WARNING must appear once, however often worker 1 is respawned."""
    env = project_env(
        "mysql://root@127.0.0.1:1/test",
        UWSGI_MAX_REQUESTS=4,
        UWSGI_MAX_REQUESTS_DELTA=1,
        UWSGI_MIN_WORKER_LIFETIME=0,  # uWSGI recycles no worker younger than 10 s by default
    )
    server = procs.start_uwsgi(tmp_path, env, workers=2)
    servers.append(server)
    server.wait_ready()
    first = set(server.workers())
    # The first worker's probe runs in a background thread: let it report before the load
    # recycles that worker (a worker recycled first would take its probe along, unreported).
    deadline = time.monotonic() + 15
    while "does not answer" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    for _ in range(30):
        assert http.get(server.socket_path, "/ping")[0] == 200
    time.sleep(1.5)  # any probe of a respawned worker would have logged by now
    assert set(server.workers()) - first, "workers were respawned"
    assert server.log().count("does not answer") == 1, server.log()[-3000:]
