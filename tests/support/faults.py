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
