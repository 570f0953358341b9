"""Real server processes for the tests: start, inspect through /proc, stop by pid/pgid."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from serverhooks.doctor import live
from tests.support import http

REPO = Path(__file__).resolve().parents[2]


def create_schema(env: dict[str, str]) -> None:
    """The test project's table, in the database env["DATABASE_URL"] names (python -m tests.project.schema)."""
    subprocess.run([sys.executable, "-m", "tests.project.schema"], cwd=REPO, env=env, check=True, timeout=60)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def children(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc (the doctor's own reading)."""
    return live.children(pid)


def db_sockets(pids: list[int], port: int) -> dict[int, set[int]]:
    """{pid: inodes of its sockets connected to the database port}, as `serverhooks doctor --pid` reads them."""
    wanted = set(live.tcp_peers({port: "database"}))
    held: dict[int, set[int]] = {}
    for pid in pids:
        try:
            held[pid] = live.socket_inodes(pid) & wanted
        except OSError:
            held[pid] = set()
    return held


def shared_inodes(held: dict[int, set[int]]) -> dict[int, list[int]]:
    """{inode: pids} for every inode held by two processes or more."""
    owners: dict[int, list[int]] = {}
    for pid, inodes in held.items():
        for inode in inodes:
            owners.setdefault(inode, []).append(pid)
    return {inode: pids for inode, pids in owners.items() if len(pids) > 1}


@dataclass
class Server:
    """A server master started by a test, in its own process group."""

    proc: subprocess.Popen[bytes]
    socket_path: str
    log_path: Path
    expected_workers: int
    stopped: bool = field(default=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def workers(self) -> list[int]:
        return children(self.pid)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until /ping answers and every worker is up; bounded by `timeout`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            if len(self.workers()) >= self.expected_workers and http.answers(self.socket_path):
                return
            time.sleep(0.05)
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        """Graceful stop by pid, then SIGKILL to the whole process group if needed."""
        if self.stopped:
            return self.proc.returncode
        self.stopped = True
        try:
            os.kill(self.pid, sig)
            return self.proc.wait(timeout)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        finally:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self.proc.wait(10)
        return self.proc.returncode


def start_gunicorn(
    tmp: Path,
    env: dict[str, str],
    *,
    conf: Path | None = None,
    settings: dict[str, object] | None = None,
    app: str = "tests.project.wsgi:application",
    workers: int = 4,
) -> Server:
    """Start `python -m gunicorn` with `conf` (default: the shipped gunicorn.conf.py).

    `settings` are written into a config file of their own when no `conf` is given
    and the shipped file is not wanted; either way the master listens on a unix
    socket in `tmp`, and its control socket is disabled (several masters run at once).
    """
    tmp.mkdir(parents=True, exist_ok=True)
    socket_path = str(tmp / "gunicorn.sock")
    log_path = tmp / "gunicorn.log"
    full_env = {**os.environ, **env}
    full_env.update(
        GUNICORN_BIND=f"unix:{socket_path}",
        WEB_CONCURRENCY=str(workers),
        GUNICORN_CONTROL_SOCKET_DISABLE="1",
        GUNICORN_MAX_REQUESTS=env.get("GUNICORN_MAX_REQUESTS", "0"),
        PYTHONUNBUFFERED="1",
    )
    if settings is not None:
        conf = tmp / "gunicorn_test.conf.py"
        lines = [f"{key} = {value!r}" for key, value in settings.items() if key != "_source"]
        lines.insert(0, str(settings.get("_source", "")))
        lines += [
            f"bind = ['unix:{socket_path}']",
            f"workers = {workers}",
            "control_socket_disable = True",
        ]
        conf.write_text("\n".join(lines) + "\n")
    conf = conf or REPO / "gunicorn.conf.py"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", str(conf), app],
            cwd=REPO,
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Server(proc=proc, socket_path=socket_path, log_path=log_path, expected_workers=workers)


def _asgi_server_command(server: str, socket_path: str, workers: int) -> list[str]:
    if server == "uvicorn":
        return ["-m", "uvicorn", "--uds", socket_path, "--workers", str(workers), "--lifespan", "off",
                "--log-level", "warning", "--timeout-graceful-shutdown", "10"]  # fmt: skip
    if server == "hypercorn":
        return ["-m", "hypercorn", "--bind", f"unix:{socket_path}", "--workers", str(workers),
                "--graceful-timeout", "10"]  # fmt: skip
    raise ValueError(f"no command for ASGI server {server!r}")


def start_asgi_server(
    server: str, tmp: Path, env: dict[str, str], *, app: str = "tests.project.asgi:application", workers: int = 2
) -> Server:
    """Start uvicorn or hypercorn with `workers` worker processes, serving HTTP on a unix socket in `tmp`."""
    tmp.mkdir(parents=True, exist_ok=True)
    socket_path = str(tmp / f"{server}.sock")
    log_path = tmp / f"{server}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, *_asgi_server_command(server, socket_path, workers), app],
            cwd=REPO,
            env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Server(proc=proc, socket_path=socket_path, log_path=log_path, expected_workers=workers)


def start_uwsgi(
    tmp: Path,
    env: dict[str, str],
    *,
    ini: Path | None = None,
    args: list[str] | None = None,
    app: str = "tests.project.wsgi:application",
    workers: int = 4,
) -> Server:
    """Start uWSGI with `ini` (default: the shipped uwsgi.ini), serving HTTP on a unix socket."""
    tmp.mkdir(parents=True, exist_ok=True)
    socket_path = str(tmp / "http.sock")
    log_path = tmp / "uwsgi.log"
    full_env = {**os.environ, **env}
    full_env.update(
        UWSGI_SOCKET=str(tmp / "uwsgi.sock"),
        UWSGI_PROCESSES=str(workers),
        UWSGI_MAX_REQUESTS=full_env.get("UWSGI_MAX_REQUESTS", "0"),
        PYTHONUNBUFFERED="1",
    )
    uwsgi_bin = str(Path(sys.executable).with_name("uwsgi"))
    command = [uwsgi_bin, "--ini", str(ini or REPO / "uwsgi.ini"), "--http-socket", socket_path, "--module", app]
    command += ["--chdir", str(REPO), *(args or [])]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            command, cwd=REPO, env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    return Server(proc=proc, socket_path=socket_path, log_path=log_path, expected_workers=workers)


def start_celery(tmp: Path, env: dict[str, str], *, pool: str = "prefork", concurrency: int = 4) -> Server:
    """A real `celery worker` for tests.project.celery_app, in its own process group.

    Its `socket_path` is unused (Celery serves no HTTP): wait for readiness with
    `wait_celery_ready`.
    """
    tmp.mkdir(parents=True, exist_ok=True)
    log_path = tmp / "celery.log"
    full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
    command = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "tests.project.celery_app",
        "worker",
        "-P",
        pool,
        "-c",
        str(concurrency),
        "--loglevel",
        "INFO",
        "-Q",
        full_env["CELERY_QUEUE"],
        "-n",
        f"{full_env['CELERY_QUEUE']}@%h",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            command, cwd=REPO, env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    workers = concurrency if pool == "prefork" else 0
    return Server(proc=proc, socket_path="", log_path=log_path, expected_workers=workers)


def wait_celery_ready(server: Server, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"celery exited with {server.proc.returncode}:\n{server.log()}")
        if " ready." in server.log() and len(server.workers()) >= server.expected_workers:
            return
        time.sleep(0.1)
    raise RuntimeError(f"celery not ready after {timeout} s:\n{server.log()}")
