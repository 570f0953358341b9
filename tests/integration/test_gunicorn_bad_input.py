"""Misconfiguration never stops Gunicorn: it boots, serves what needs no database, and
the log names the problem without a password."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import project_env
from tests.support import dbserver, http, procs

pytestmark = pytest.mark.gunicorn
SECRET = "S3cret-Pw-do-not-log"


def _boot(tmp_path: Path, servers: list[procs.Server], env: dict[str, str], app: str, **extra: str) -> procs.Server:
    clean = {key: "" for key in ("DJANGO_SETTINGS_MODULE",)}
    server = procs.start_gunicorn(tmp_path, {**clean, **env, **extra}, app=app, workers=2)
    servers.append(server)
    server.wait_ready()
    return server


def _wait_for_log(server: procs.Server, needle: str, timeout: float = 10.0) -> str:
    import time

    deadline = time.monotonic() + timeout
    while needle not in server.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    return server.log()


def test_no_django_settings(tmp_path: Path, servers: list[procs.Server]) -> None:
    server = _boot(tmp_path, servers, {"GUNICORN_PRELOAD": "1"}, "tests.support.plainapp:application")
    assert http.get(server.socket_path, "/")[0] == 200
    server.stop()
    log = server.log()
    assert log.count("DJANGO_SETTINGS_MODULE is unset") == 1, "said once, by the master"
    assert "Traceback" not in log


def test_django_not_installed(tmp_path: Path, servers: list[procs.Server]) -> None:
    conf = tmp_path / "nodjango.conf.py"
    conf.write_text(
        "import sys\nsys.modules['django'] = None  # as if Django were not installed\n"
        + (procs.REPO / "gunicorn.conf.py").read_text()
    )
    server = procs.start_gunicorn(
        tmp_path,
        {"DJANGO_SETTINGS_MODULE": "tests.project.settings"},
        conf=conf,
        app="tests.support.plainapp:application",
        workers=2,
    )
    servers.append(server)
    server.wait_ready()
    assert http.get(server.socket_path, "/")[0] == 200
    server.stop()
    log = server.log()
    assert log.count("serverhooks: Django is not installed; the hooks do nothing.") == 1, log
    assert "Traceback" not in log


def test_broken_settings_module(tmp_path: Path, servers: list[procs.Server]) -> None:
    env = {"DJANGO_SETTINGS_MODULE": "tests.project.no_such_settings"}
    server = _boot(tmp_path, servers, env, "tests.support.plainapp:application")
    assert http.get(server.socket_path, "/")[0] == 200
    log = _wait_for_log(server, "cannot load Django settings")
    assert "cannot load Django settings (DJANGO_SETTINGS_MODULE=tests.project.no_such_settings)" in log
    assert "ModuleNotFoundError" in log
    assert server.proc.poll() is None, "the master keeps running"


@pytest.mark.parametrize("preload", ["0", "1"])
def test_wrong_engine(preload: str, tmp_path: Path, servers: list[procs.Server]) -> None:
    env = project_env(
        f"mysql://root:{SECRET}@127.0.0.1:3306/test",
        DATABASE_ENGINE="django.db.backends.nosuch",
        GUNICORN_PRELOAD=preload,
    )
    server = _boot(tmp_path, servers, env, "tests.project.wsgi:application")
    assert http.get(server.socket_path, "/ping")[0] == 200
    log = _wait_for_log(server, "cannot be loaded")
    assert "database 'default' (nosuch at 127.0.0.1:3306, NAME 'test') cannot be loaded" in log
    assert "Fix DATABASES['default']['ENGINE']" in log
    assert SECRET not in log
    assert server.proc.poll() is None


@pytest.mark.parametrize(
    "url", [f"mysql://root:{SECRET}@127.0.0.1:1/test", f"postgres://postgres:{SECRET}@127.0.0.1:1/test"]
)
def test_unreachable_database(url: str, tmp_path: Path, servers: list[procs.Server]) -> None:
    server = _boot(tmp_path, servers, project_env(url, GUNICORN_PRELOAD="1"), "tests.project.wsgi:application")
    assert http.get(server.socket_path, "/ping")[0] == 200
    status, _ = http.get(server.socket_path, "/echo?m=x")
    assert status == 500, "the request that needs the database fails, and only that one"
    log = _wait_for_log(server, "does not answer")
    assert "database 'default'" in log and "does not answer" in log and "127.0.0.1:1" in log
    assert SECRET not in log
    assert server.proc.poll() is None


def test_chained_hooks_run_with_ours_and_replaced_hooks_are_reported(
    fresh_database: Callable[[str], str], tmp_path: Path, servers: list[procs.Server]
) -> None:
    """The user's pre_fork opens a connection after ours closed it; with the fork guard
    off, only our chained post_fork can keep the workers from inheriting it."""
    name = fresh_database("mysql")
    conf = tmp_path / "chained.conf.py"
    conf.write_text(
        (procs.REPO / "gunicorn.conf.py").read_text()
        + """
from serverhooks.gunicorn import chain


@chain
def pre_fork(server, worker):
    from django.db import connection
    connection.ensure_connection()  # runs after serverhooks' pre_fork


@chain
def post_fork(server, worker):
    from django.db import connection
    server.log.info("user post_fork: inherited=%s", connection.connection is not None)


def post_worker_init(worker):  # replaces serverhooks' one: the log must say so
    pass
"""
    )
    env = project_env(dbserver.django_url("mysql", name), GUNICORN_PRELOAD="1", SERVERHOOKS_FORK_GUARD="0")
    server = procs.start_gunicorn(tmp_path, env, conf=conf, workers=2)
    servers.append(server)
    server.wait_ready()
    server.stop()
    log = server.log()
    assert log.count("user post_fork: inherited=False") == 2, log
    assert "defines its own post_worker_init" in log and "@serverhooks.gunicorn.chain" in log


def test_chain_rejects_unknown_names_and_wrong_arity() -> None:
    from serverhooks.gunicorn import chain

    def post_fork_typo(server, worker):  # type: ignore[no-untyped-def]
        pass

    with pytest.raises(TypeError, match="no Gunicorn hook named 'post_fork_typo'"):
        chain(post_fork_typo)

    def post_fork(server):  # type: ignore[no-untyped-def]
        pass

    with pytest.raises(TypeError, match=r"post_fork must accept \(server, worker\)"):
        chain(post_fork)


def test_importing_the_adapter_is_free() -> None:
    code = (
        "import sys, serverhooks, serverhooks.gunicorn;print(sorted(m for m in sys.modules if m.startswith('django')))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=procs.REPO, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out


def test_worker_exit_in_the_master_leaves_its_connections_alone(tmp_path: Path) -> None:
    """Gunicorn calls worker_exit in the master when kill() finds the worker gone (ESRCH)."""
    code = """
import os, types, django
django.setup()
from django.db import connection
connection.ensure_connection()
from serverhooks.gunicorn import worker_exit
import serverhooks
worker_exit(types.SimpleNamespace(), types.SimpleNamespace(pid=os.getpid() + 100000))
assert connection.connection is not None and connection.is_usable()
assert serverhooks.stats()["closed_at_exit"] == 0
worker_exit(types.SimpleNamespace(), types.SimpleNamespace(pid=os.getpid()))
assert connection.connection is None and serverhooks.stats()["closed_at_exit"] == 1
print("ok")
"""
    env = {**os.environ, **project_env(f"sqlite:///{tmp_path}/x.sqlite3")}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=procs.REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.stdout.strip() == "ok", out.stderr


def test_shipped_config_passes_check_config() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "gunicorn", "--check-config", "-c", "gunicorn.conf.py", "tests.project.wsgi"],
        cwd=procs.REPO,
        env={**os.environ, "GUNICORN_CONTROL_SOCKET_DISABLE": "1", "DJANGO_SETTINGS_MODULE": "tests.project.settings"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
