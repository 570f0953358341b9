"""Faults behind the app's back, made on purpose: sessions ended by the server, and servers of
the tests' own that can be restarted (never the shared ones other tests use)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.support import dbserver, procs

MARIADBD = shutil.which("mariadbd") or "/usr/sbin/mariadbd"
MARIADB_INSTALL_DB = shutil.which("mariadb-install-db") or "/usr/bin/mariadb-install-db"
_PG_LIB = Path("/usr/lib/postgresql")
PG_BIN = _PG_LIB / (sorted(os.listdir(_PG_LIB))[-1] if _PG_LIB.is_dir() else "15") / "bin"
# setpriv execs: the process a test holds is the server itself, so signals reach it.
AS_POSTGRES = ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups"]


def end_sessions(family: str, name: str) -> int:
    """End every session on database `name` from the server's side (KILL / pg_terminate_backend)."""
    ended = 0
    for session in dbserver.sessions(family, name):
        try:
            if family == "mysql":
                dbserver.query(family, f"KILL {int(session)}")
            else:
                dbserver.query(family, "SELECT pg_terminate_backend(%s)", (session,))
            ended += 1
        except Exception:
            pass  # it ended on its own meanwhile
    return ended


def why_no_private_server() -> str | None:
    """None when this process can run throwaway MariaDB and PostgreSQL servers of its own."""
    if os.geteuid() != 0:
        return "a private database server needs root here (to run it as the mysql and postgres users)"
    for binary in (MARIADBD, MARIADB_INSTALL_DB, str(PG_BIN / "initdb"), str(PG_BIN / "pg_ctl")):
        if not Path(binary).exists():
            return f"{binary} is not installed"
    return None


@dataclass
class PrivateServer:
    """A throwaway database server on its own port and data directory, which a test may restart."""

    family: str
    port: int = field(default_factory=procs.free_port)
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="sh-private-db-")))
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.family == "mysql":
            return f"mysql://root@127.0.0.1:{self.port}/test"
        return f"postgres://postgres@127.0.0.1:{self.port}/test"

    @property
    def log_path(self) -> Path:
        return self.root / "server.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def init(self) -> None:
        self.root.chmod(0o777)  # the servers' users put their sockets and logs here
        data = self.root / "data"
        owner = "mysql" if self.family == "mysql" else "postgres"
        data.mkdir()
        shutil.chown(data, owner, owner)
        if self.family == "mysql":
            command = [MARIADB_INSTALL_DB, "--no-defaults", f"--datadir={data}", "--user=mysql", "--skip-test-db"]
        else:
            command = [*AS_POSTGRES, str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust"]
        subprocess.run(command, check=True, capture_output=True, timeout=120)
        self.start()
        dbserver.query(self.family, "CREATE DATABASE test", database=self.admin_db, url=self.url)

    def start(self, timeout: float = 60.0) -> float:
        """Start the server; seconds until it answers."""
        data = self.root / "data"
        log = self.log_path.open("ab")
        if self.family == "mysql":
            command = [MARIADBD, "--no-defaults", f"--datadir={data}", "--user=mysql", f"--port={self.port}"]
            command += ["--bind-address=127.0.0.1", f"--socket={self.root}/mysqld.sock", "--skip-grant-tables"]
            command += [f"--pid-file={self.root}/mysqld.pid", "--skip-log-bin", "--innodb-buffer-pool-size=32M"]
        else:
            command = [*AS_POSTGRES, str(PG_BIN / "postgres"), "-D", str(data)]
            command += ["-p", str(self.port), "-k", str(self.root), "-c", "listen_addresses=127.0.0.1"]
        self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"private {self.family} server exited:\n{self.log()[-4000:]}")
            if self.answers():
                return time.monotonic() - started
            time.sleep(0.1)
        raise RuntimeError(f"private {self.family} server did not answer in {timeout} s:\n{self.log()[-4000:]}")

    def answers(self) -> bool:
        try:
            with dbserver.admin(self.family, database=self.admin_db, url=self.url) as conn:
                conn.cursor().execute("SELECT 1")
            return True
        except Exception:
            return False

    @property
    def admin_db(self) -> str:
        return "mysql" if self.family == "mysql" else "postgres"

    def stop(self, timeout: float = 60.0) -> None:
        """A clean, fast shutdown by pid (MariaDB: SIGTERM; PostgreSQL: SIGINT, which does not wait
        for clients), then SIGKILL to its process group if it hangs."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM if self.family == "mysql" else signal.SIGINT)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait(10)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# PostgreSQL's own ways of ending every session at once (tests/integration/test_faults_crash.py).
# In both, each backend sends its client a NoticeResponse (not an error) and exits.


def _pg_ctl(server: PrivateServer, *args: str, timeout: float = 60.0) -> None:
    command = [*AS_POSTGRES, str(PG_BIN / "pg_ctl"), *args, "-D", str(server.root / "data")]
    subprocess.run(command, check=True, capture_output=True, timeout=timeout)


def _log_size(server: PrivateServer) -> int:
    return server.log_path.stat().st_size if server.log_path.exists() else 0


def _log_since(server: PrivateServer, offset: int) -> str:
    with server.log_path.open("rb") as log:
        log.seek(offset)
        return log.read().decode(errors="replace")


def crash_restart(server: PrivateServer, timeout: float = 60.0) -> int:
    """A crash-restart of a private PostgreSQL, as when the OOM killer takes one backend.

    SIGKILL goes to the backend of a session of our own (never one a test server holds): the
    postmaster then sends SIGQUIT to every other backend, each tells its client "terminating
    connection because of crash of another server process" (a 57P02 notice) and exits, and the
    server recovers. Returns the killed backend's pid once the server accepts connections again.
    """
    if server.family != "postgres" or server.proc is None:
        raise ValueError("a crash-restart needs a running private PostgreSQL")
    offset = _log_size(server)
    with dbserver.admin("postgres", database=server.admin_db, url=server.url) as victim:
        victim.execute("SET application_name = 'sh-crash-victim'")
        (pid,) = victim.execute("SELECT pg_backend_pid()").fetchone()
        os.kill(int(pid), signal.SIGKILL)
        deadline = time.monotonic() + timeout
        # Ready again means ready after the reinitialisation: the server may still accept a
        # connection in the instant before the postmaster reaps the killed backend.
        while time.monotonic() < deadline:
            since = _log_since(server, offset)
            restarted = since.find("reinitializing")
            if restarted >= 0 and "ready to accept connections" in since[restarted:] and server.answers():
                break
            if server.proc.poll() is not None:
                raise RuntimeError(f"private postgres exited in its crash-restart:\n{server.log()[-4000:]}")
            time.sleep(0.05)
        else:
            raise RuntimeError(f"private postgres did not come back in {timeout} s:\n{server.log()[-4000:]}")
        try:
            victim.close()
        except Exception:
            pass  # its backend is gone: the goodbye may fail, and nothing depends on it
    return int(pid)


def stop_immediately(server: PrivateServer, timeout: float = 60.0) -> None:
    """`pg_ctl stop -m immediate`, as failover tools stop a primary: every backend tells its client
    "terminating connection due to immediate shutdown command" (a 57P01 notice) and exits, with no
    checkpoint. Start it again with `server.start()` (it then recovers)."""
    if server.family != "postgres" or server.proc is None:
        raise ValueError("an immediate shutdown needs a running private PostgreSQL")
    _pg_ctl(server, "stop", "-m", "immediate", "-w", "-t", str(int(timeout)), timeout=timeout + 10)
    server.proc.wait(timeout)


def enable_tls(server: PrivateServer, timeout: float = 30.0) -> None:
    """Let a private PostgreSQL's clients choose TLS (`ssl = on`, a self-signed certificate made
    here), reloaded in place; returns once a client that requires TLS gets it."""
    data = server.root / "data"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
         "-keyout", str(data / "server.key"), "-out", str(data / "server.crt")],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    for name in ("server.key", "server.crt"):
        shutil.chown(data / name, "postgres", "postgres")
        (data / name).chmod(0o600)
    with (data / "postgresql.conf").open("a") as conf:
        conf.write("\n# enable_tls() (tests/support/faults.py)\nssl = on\n")
    _pg_ctl(server, "reload")
    import psycopg

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with psycopg.connect(tls_conninfo(server), connect_timeout=5) as conn:
                if conn.pgconn.ssl_in_use:
                    return
        except Exception:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"private postgres did not offer TLS within {timeout} s:\n{server.log()[-4000:]}")


def tls_conninfo(server: PrivateServer, application: str = "") -> str:
    """A libpq conninfo for a private PostgreSQL that requires TLS (after `enable_tls`)."""
    conninfo = f"host=127.0.0.1 port={server.port} user=postgres dbname=test sslmode=require"
    return conninfo + (f" application_name={application}" if application else "")


def sessions_by_application(server: PrivateServer) -> dict[str, int]:
    """{application_name: client sessions} on a private PostgreSQL, as the server counts them."""
    rows = dbserver.query(
        "postgres",
        "SELECT application_name, count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
        " GROUP BY application_name",
        database=server.admin_db,
        url=server.url,
    )
    return {str(name): int(count) for name, count in rows}
