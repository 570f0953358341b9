"""A real PgBouncer (Debian's package) of a test's or bench's own: its own port, work directory and pid.

Configured from the shipped deploy/pgbouncer/pgbouncer.ini with only what a test must change (the
database line, the port, trust auth for the local server, paths). Stopped by pid, never by name.
"""

from __future__ import annotations

import configparser
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from tests.support import dbserver, procs

SHIPPED = procs.REPO / "deploy" / "pgbouncer" / "pgbouncer.ini"
BINARY = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
MISSING = "pgbouncer is not installed: apt-get install pgbouncer (tests/run setup does it as root)"


def installed() -> bool:
    return Path(BINARY).exists()


def shipped() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=(";",))
    parser.read_string(SHIPPED.read_text())
    return parser


def version() -> tuple[int, ...]:
    """PgBouncer's version, e.g. (1, 18, 0)."""
    out = subprocess.run([BINARY, "--version"], capture_output=True, text=True, timeout=10).stdout
    digits = out.split()[1] if len(out.split()) > 1 else "0"
    return tuple(int(part) for part in digits.split(".") if part.isdigit())


@dataclass
class PgBouncer:
    """A running PgBouncer: `port` for clients, `reload()`, `restart()`, `stop()`, `logs()`."""

    work: Path
    port: int
    listen_addr: str
    user: list[str]
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = field(default=0)

    @property
    def config(self) -> Path:
        return self.work / "pgbouncer.ini"

    def start(self, timeout: float = 15.0) -> None:
        with open(self.work / "stderr.log", "ab") as stderr:
            self.proc = subprocess.Popen(
                [BINARY, *self.user, str(self.config)],
                stdout=stderr,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        host = self.listen_addr.split(",")[0].strip()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex((host, self.port)) == 0:
                    return
            if self.proc.poll() is not None:
                raise RuntimeError(f"pgbouncer exited with {self.proc.returncode}:\n{self.logs()}")
            time.sleep(0.05)
        raise RuntimeError(f"pgbouncer does not listen on {host}:{self.port} after {timeout} s:\n{self.logs()}")

    def reload(self) -> None:
        """Re-read the config file (SIGHUP, the same as the admin console's RELOAD)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGINT, PgBouncer's safe shutdown (waits for running transactions); SIGKILL after `timeout`."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def restart(self) -> None:
        self.stop()
        self.restarts += 1
        self.start()

    def logs(self) -> str:
        return "".join(
            p.read_text(errors="replace") for p in (self.work / "stderr.log", self.work / "pgbouncer.log") if p.exists()
        )


@contextmanager
def running(
    databases: dict[str, str] | list[str],
    *,
    listen_addr: str = "127.0.0.1",
    port: int | None = None,
    settings: dict[str, str] | None = None,
) -> Iterator[PgBouncer]:
    """A PgBouncer in front of the local PostgreSQL test server, transaction pooling as shipped.

    `databases`: names on that server (each served under its own name), or {name: connection string}.
    `settings`: [pgbouncer] keys to change beyond the test's own (e.g. default_pool_size).
    """
    server = urlsplit(dbserver.server_url("postgres"))
    # The server may ask for a password: PgBouncer then logs in as this user with it (it takes a
    # password= from here only together with user=).
    login = f" user={server.username or 'postgres'} password={server.password}" if server.password else ""
    if isinstance(databases, list):
        databases = {
            name: f"host={server.hostname} port={server.port or 5432} dbname={name}{login}" for name in databases
        }
    # PgBouncer refuses to run as root: run it as postgres, from a directory it can read.
    work = Path(tempfile.mkdtemp(prefix="sh-pgbouncer-"))
    work.chmod(0o755)
    config = shipped()
    config["databases"] = databases
    port = port or procs.free_port()
    config["pgbouncer"].update(
        listen_addr=listen_addr,
        listen_port=str(port),
        unix_socket_dir="",
        auth_type="trust",  # the local server trusts loopback; production uses scram-sha-256
        auth_file=str(work / "userlist.txt"),
        logfile=str(work / "pgbouncer.log"),
        pidfile=str(work / "pgbouncer.pid"),
        **(settings or {}),
    )
    (work / "userlist.txt").write_text(f'"{server.username or "postgres"}" ""\n')
    with open(work / "pgbouncer.ini", "w") as f:
        config.write(f)
    user: list[str] = []
    if os.geteuid() == 0:
        user = ["-u", "postgres"]
        for path in [work, *work.iterdir()]:
            shutil.chown(path, "postgres")
    bouncer = PgBouncer(work, port, listen_addr, user)
    try:
        bouncer.start()
        yield bouncer
    finally:
        bouncer.stop()
        shutil.rmtree(work, ignore_errors=True)
