"""Gunicorn gevent workers with and without serverhooks' connection pool, against its peers.

    python -m bench.gevent_bench            # full run, about 7 minutes (waits first for a quiet machine)
    python -m bench.gevent_bench --quick    # smoke run, under a minute

The issue's scenario: `-k gevent -w 2`, CONN_MAX_AGE=600, every request on a fresh client
connection (HTTP/1.0, Connection: close), one SELECT per request (GET /count?m=<marker>).
Arms, alternated in rounds (the order rotates every round), each on a fresh database of its own:

    MariaDB (PyMySQL)   no hooks | serverhooks | serverhooks with mysqlclient | sync-worker ceiling
    PostgreSQL          no hooks | serverhooks | django-db-geventpool | Django's psycopg pool | sync ceiling

"no hooks" is the shipped gunicorn.conf.py without its `from serverhooks.gunicorn import *`;
"serverhooks" is the shipped file as it is (pool on, POOL_SIZE at its default). Every window
starts a fresh master, warms it up, measures, and stops it; sessions opened are counted on the
database server over the master's whole life, the peak of concurrent sessions by sampling.

Results go to bench/GEVENT_RESULTS.md; logs and raw data to bench/out/gevent/ (git-ignored).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from bench import common

if TYPE_CHECKING:
    from multiprocessing.pool import Pool

    from tests.support.procs import Server

OUT_DIR = common.BENCH_DIR / "out" / "gevent"
RESULTS_PATH = common.BENCH_DIR / "GEVENT_RESULTS.md"
# serverhooks/, tests/ and gunicorn.conf.py as committed at HEAD, and the bench, copied at the start.
CODE_DIR = OUT_DIR / "code"
COMMITTED = ("serverhooks", "tests", "gunicorn.conf.py")

WORKERS = 2
CONN_MAX_AGE = 600
ENDPOINT = "/count"  # one SELECT COUNT(*) ... WHERE marker = %s; nothing ever inserts, so the answer is 0
EXPECTED = {"count": 0}
HOOKS_IMPORT = re.compile(r"^from serverhooks\.gunicorn import \*.*\n", re.MULTILINE)

# Targets (ratios; the session bound is computed from the resolved POOL_SIZE).
MYSQL_RPS_RATIO = 1.5  # serverhooks / no hooks, MariaDB
MYSQL_SESSIONS_FRACTION = 1 / 50  # serverhooks' sessions opened / no hooks'
PEER_RPS_RATIO = 0.95  # serverhooks / best peer, PostgreSQL
SYNC_RPS_RATIO = 0.9  # serverhooks / sync-worker ceiling (an aim, reported)

LOAD_QUIET = 0.6  # the full run waits until the 1-minute load average is below this
LOAD_WAIT_S = 15 * 60
LOAD_POLL_S = 20.0


@dataclasses.dataclass(frozen=True)
class Arm:
    key: str
    family: str
    title: str
    worker_class: str  # gevent or sync
    hooks: bool  # the shipped gunicorn.conf.py, or the same file without serverhooks
    driver: str = ""  # "" (mysqlclient, psycopg 3) or "pymysql"
    peer: str = ""  # BENCH_PEER for bench/settings_peers.py
    url_query: str = ""

    @property
    def pooled_by_serverhooks(self) -> bool:
        return self.hooks and self.worker_class == "gevent"


NOHOOKS, SERVERHOOKS, MYSQLCLIENT, SYNC, GEVENTPOOL, DJANGOPOOL = (
    "nohooks",
    "serverhooks",
    "serverhooks_mysqlclient",
    "sync",
    "geventpool",
    "djangopool",
)
ARMS: dict[str, tuple[Arm, ...]] = {
    "mysql": (
        Arm(NOHOOKS, "mysql", "no hooks (gevent, PyMySQL)", "gevent", False, "pymysql"),
        Arm(SERVERHOOKS, "mysql", "serverhooks (gevent, PyMySQL)", "gevent", True, "pymysql"),
        Arm(MYSQLCLIENT, "mysql", "serverhooks (gevent, mysqlclient)", "gevent", True),
        Arm(SYNC, "mysql", "sync-worker ceiling (sync, PyMySQL, no hooks)", "sync", False, "pymysql"),
    ),
    "postgres": (
        Arm(NOHOOKS, "postgres", "no hooks (gevent, psycopg 3)", "gevent", False),
        Arm(SERVERHOOKS, "postgres", "serverhooks (gevent, psycopg 3)", "gevent", True),
        Arm(GEVENTPOOL, "postgres", "django-db-geventpool (gevent, psycopg 3)", "gevent", False, peer="geventpool"),
        Arm(
            DJANGOPOOL,
            "postgres",
            "Django's psycopg pool (gevent, psycopg 3)",
            "gevent",
            False,
            peer="djangopool",
            url_query="pool=1",
        ),
        Arm(SYNC, "postgres", "sync-worker ceiling (sync, psycopg 3, no hooks)", "sync", False),
    ),
}
PEERS = (GEVENTPOOL, DJANGOPOOL)
A = TypeVar("A", bound=Arm)  # this bench's arms, or another's (bench/asgi_bench.py)


@dataclasses.dataclass(frozen=True)
class Plan:
    mode: str
    rounds: int  # windows per arm
    warmup_seconds: float
    window_seconds: float
    clients: common.Clients
    sample_interval: float  # SessionSampler (a new connection per sample)
    tracker_interval: float  # SessionTracker (one held connection)
    gap_seconds: float  # between windows: the database settles; MariaDB's foreign connections are counted

    @property
    def concurrency(self) -> int:
        return self.clients.concurrency


QUICK = Plan(
    mode="quick",
    rounds=1,
    warmup_seconds=0.5,
    window_seconds=1.5,
    clients=common.Clients(procs=4, threads=5),
    sample_interval=0.05,
    tracker_interval=0.02,
    gap_seconds=0.2,
)
FULL = dataclasses.replace(QUICK, mode="full", rounds=6, warmup_seconds=1.0, window_seconds=4.0, gap_seconds=0.5)

# =========================================================================== load (client processes)


@dataclasses.dataclass
class LoadCounts:
    requests: int = 0  # answered (any status), in or after the window
    in_window: int = 0  # answered right and completed by the window's end
    ok: int = 0
    wrong: int = 0
    http_errors: int = 0
    failures: int = 0  # no answer: refused, reset, timeout
    client_cpu_s: float = 0.0
    examples: list[str] = dataclasses.field(default_factory=list)

    def add(self, other: LoadCounts) -> None:
        for name in ("requests", "in_window", "ok", "wrong", "http_errors", "failures", "client_cpu_s"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.examples = (self.examples + other.examples)[:5]

    def note(self, problem: str) -> None:
        if len(self.examples) < 5:
            self.examples.append(problem)

    @property
    def errors(self) -> int:
        return self.wrong + self.http_errors + self.failures


def _client_thread(path: str, prefix: str, start_at: float, end_at: float, limit: int, out: LoadCounts) -> None:
    def send(i: int) -> tuple[str, str]:
        status, body = common.http_get(path, f"{ENDPOINT}?m={prefix}x{i}")
        if status != 200:
            return "http", f"HTTP {status}: {body[:80]!r}"
        try:
            answer = json.loads(body)
        except ValueError:
            answer = None
        return ("ok", "") if answer == EXPECTED else ("wrong", f"unexpected answer {body[:80]!r}")

    common.timed_requests(start_at, end_at, limit, out, send)


def _client_process(args: tuple[str, int, float, float, int]) -> LoadCounts:
    """One client process: `threads` threads, each a request at a time, from start_at to end_at."""
    return common.run_client_threads(_client_thread, LoadCounts, args)


# =========================================================================== CPU: where time goes


def _db_cpu() -> dict[int, tuple[float, float]]:
    """{pid: (own CPU s, CPU s of its reaped children)} of every MariaDB / PostgreSQL process.

    PostgreSQL runs a process per session; sessions that start and end within a window are
    only seen through the postmaster's reaped-children times."""
    found: dict[int, tuple[float, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm") as f:
                if f.read().strip() not in common.DB_PROCESS_NAMES:
                    continue
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        own = (int(fields[11]) + int(fields[12])) / common.TICKS
        children = (int(fields[13]) + int(fields[14])) / common.TICKS
        found[int(entry)] = (own, children)
    return found


def _db_cpu_delta(before: dict[int, tuple[float, float]], after: dict[int, tuple[float, float]]) -> float:
    own = sum(v[0] for v in after.values()) - sum(v[0] for v in before.values())
    reaped = sum(after[pid][1] - before[pid][1] for pid in before.keys() & after.keys())
    return own + reaped


@dataclasses.dataclass
class CpuSnapshot:
    at: float
    machine: float
    workers: float
    databases: dict[int, tuple[float, float]]
    bench: float

    @classmethod
    def take(cls, server: Server) -> CpuSnapshot:
        own = os.times()
        return cls(
            at=time.monotonic(),
            machine=common.machine_busy_seconds(),
            workers=common.cpu_seconds([server.pid, *server.workers()]),
            databases=_db_cpu(),
            bench=own.user + own.system,
        )


@dataclasses.dataclass
class Load:
    seconds: float
    counts: LoadCounts
    worker_cpu_s: float
    db_cpu_s: float
    other_cores: float  # CPU used by anything but the bench, its server, its clients and the database servers

    @property
    def rps(self) -> float:
        return self.counts.in_window / self.seconds


def run_load(pool: Pool, server: Server, seconds: float, plan: Plan) -> Load:
    before = CpuSnapshot.take(server)
    start_at = time.monotonic() + 0.1
    end_at = start_at + seconds
    limit = int(seconds * 5000) + 100  # far above what 2 workers answer
    args = [(server.socket_path, plan.clients.threads, start_at, end_at, limit)] * plan.clients.procs
    parts = pool.map_async(_client_process, args, chunksize=1).get(timeout=seconds + 90.0)
    after = CpuSnapshot.take(server)
    counts = LoadCounts()
    for part in parts:
        counts.add(part)
    workers = after.workers - before.workers
    db = _db_cpu_delta(before.databases, after.databases)
    other = (after.machine - before.machine) - workers - db - (after.bench - before.bench) - counts.client_cpu_s
    return Load(seconds, counts, workers, db, max(0.0, other) / (after.at - before.at))


# =========================================================================== counting on the database server


class ServerCounters:
    """Cumulative counters read on one admin session that stays open for the whole run.

    MariaDB: global status (Connections counts every attempt, refused ones too; the run's other
    connections, the session sampler's, are subtracted by the caller). PostgreSQL: pg_stat_database
    of the arm's own database, so nothing else is counted."""

    def __init__(self, family: str) -> None:
        from tests.support import dbserver

        self.family = family
        self._cm = dbserver.admin(family)
        self.conn: Any = self._cm.__enter__()

    def close(self) -> None:
        self._cm.__exit__(None, None, None)

    def _rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        cur = self.conn.cursor()
        cur.execute(sql, params)
        return list(cur.fetchall())

    def read(self, database: str) -> dict[str, int]:
        if self.family == "mysql":
            rows = self._rows(
                "SHOW GLOBAL STATUS WHERE Variable_name IN "
                "('Connections', 'Connection_errors_max_connections', 'Com_select')"
            )
            return {str(name): int(value) for name, value in rows}
        ((sessions, xacts),) = self._rows(
            "SELECT sessions, xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s", (database,)
        )
        return {"sessions": int(sessions or 0), "transactions": int(xacts or 0)}

    def open_sessions(self, database: str) -> int:
        if self.family == "mysql":
            sql = "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE DB = %s"
        else:
            sql = "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = %s"
        return int(self._rows(sql, (database,))[0][0])

    def settle(self, database: str, timeout: float = 20.0) -> tuple[int, dict[str, int]]:
        """Wait (bounded) until the database has no session left and its counters stop moving."""
        deadline = time.monotonic() + timeout
        left = self.open_sessions(database)
        while left and time.monotonic() < deadline:
            time.sleep(0.05)
            left = self.open_sessions(database)
        counters = self.read(database)
        if self.family == "postgres":  # an exiting backend may leave pg_stat_activity before it reports
            for _ in range(20):
                time.sleep(0.15)
                again = self.read(database)
                if again == counters:
                    break
                counters = again
        return left, counters


class SessionTracker:
    """The distinct sessions of one database and their peak, sampled on a held admin session.

    Per database on both servers (MariaDB's counters are global), and never refused when the
    server is full. A session that opens and closes between two samples is missed, so the
    count is a lower bound; sessions here live for a whole master or until garbage collection."""

    def __init__(self, admin: ServerCounters, database: str, interval: float, max_seconds: float = 180.0) -> None:
        self.admin, self.database, self.interval, self.max_seconds = admin, database, interval, max_seconds
        self.seen: set[tuple[Any, ...]] = set()
        self.peak = 0
        self.samples = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        if self.admin.family == "mysql":
            sql = "SELECT ID FROM information_schema.PROCESSLIST WHERE DB = %s"
        else:
            sql = "SELECT pid, backend_start::text FROM pg_stat_activity WHERE datname = %s"
        deadline = time.monotonic() + self.max_seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                rows = self.admin._rows(sql, (self.database,))
            except Exception as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}")
                if len(self.errors) > 20:
                    return
            else:
                self.seen.update(rows)
                self.peak = max(self.peak, len(rows))
                self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> SessionTracker:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


# =========================================================================== one window


@dataclasses.dataclass
class Window:
    arm: str
    family: str
    rnd: int
    position: int  # in the round's order
    load: Load
    warmup: LoadCounts
    sessions_opened: int  # over the master's life: warm-up, window and the stats requests
    sessions_refused: int  # MariaDB: the app's attempts refused at max_connections (-1: not known)
    selects: int  # MariaDB: Com_select; PostgreSQL: transactions (-1: not known)
    sessions_seen: int  # distinct sessions of the arm's database, sampled on a held admin session
    peak_sessions: int  # the higher of the two samplers' peaks
    peak_sampler: int  # tests/support/dbserver.SessionSampler's
    peak_tracker: int  # SessionTracker's
    sampler_samples: int
    sampler_refused: int
    left_open_after_stop: int
    foreign_connections: int  # MariaDB: connections by others during the gap before the window
    requests_total: int  # every request the master answered (warm-up, window, stats)
    pool: dict[str, float]  # serverhooks.stats() summed over the workers (serverhooks arms)
    pool_opened_per_worker: list[int]


def _conf_source(hooks: bool, code_dir: Path = CODE_DIR) -> str:
    """The shipped gunicorn.conf.py from the snapshot, importing from the snapshot; without serverhooks' line."""
    text = (code_dir / "gunicorn.conf.py").read_text()
    if len(HOOKS_IMPORT.findall(text)) != 1:
        raise RuntimeError("gunicorn.conf.py: expected exactly one `from serverhooks.gunicorn import *` line")
    if not hooks:
        text = HOOKS_IMPORT.sub("", text)
    return f"import sys\nsys.path.insert(0, {str(code_dir)!r})\n" + text


def arm_env(arm: Arm, database: str, pool_size: int) -> dict[str, str]:
    from tests.support import dbserver

    env = {
        "DATABASE_URL": dbserver.django_url(arm.family, database, arm.driver, arm.url_query),
        "DJANGO_SETTINGS_MODULE": "bench.settings_peers" if arm.peer else "tests.project.settings",
        "CONN_MAX_AGE": str(CONN_MAX_AGE),
        "GUNICORN_WORKER_CLASS": arm.worker_class,
        "GUNICORN_PRELOAD": "0",
        "GUNICORN_LOGLEVEL": "info",
        **common.bytecode_env(),
    }
    if arm.peer:
        env.update(BENCH_PEER=arm.peer, BENCH_PEER_POOL_SIZE=str(pool_size))
    return env


def _worker_stats(server: Server) -> tuple[dict[int, dict[str, Any]], int]:
    """serverhooks.stats() of every worker, asking /whoami until each answered (bounded); and requests sent."""
    found: dict[int, dict[str, Any]] = {}
    sent = 0
    for _ in range(60):
        sent += 1
        try:
            status, body = common.http_get(server.socket_path, "/whoami")
        except OSError:
            continue
        if status == 200:
            data = json.loads(body)
            found[int(data["pid"])] = data["serverhooks"]
        if len(found) >= WORKERS:
            break
    return found, sent


POOL_KEYS = ("pool_opened", "pool_reused", "pool_waits", "pool_wait_seconds", "pool_discarded", "pool_reclaimed")


def run_window(
    arm: Arm,
    rnd: int,
    position: int,
    database: str,
    admins: tuple[ServerCounters, ServerCounters],
    plan: Plan,
    pool: Pool,
    pool_size: int,
) -> Window:
    """One window of one arm: a fresh master, warm-up, the measured load, its stats; stopped; counted."""
    from tests.support import procs

    def start() -> Server:
        return procs.start_gunicorn(
            OUT_DIR / f"{arm.family}-{arm.key}-r{rnd}",
            arm_env(arm, database, pool_size),
            settings={"_source": _conf_source(arm.hooks)},
            workers=WORKERS,
        )

    return measure_window(
        arm.key, arm.family, start, arm.pooled_by_serverhooks, rnd, position, database, admins, plan, pool
    )


def measure_window(
    arm_key: str,
    family: str,
    start: Callable[[], Server],
    pool_stats: bool,
    rnd: int,
    position: int,
    database: str,
    admins: tuple[ServerCounters, ServerCounters],
    plan: Plan,
    pool: Pool,
    while_up: Callable[[Server], None] | None = None,
) -> Window:
    """One window on the master `start()` starts: warm-up, the measured load, (`pool_stats`) every
    worker's serverhooks.stats(), then `while_up(server)` if given; stopped; counted.

    Shared with bench/asgi_bench.py, whose servers and arms are its own."""
    counters, tracker_admin = admins
    from tests.support import dbserver

    # The gap: nothing of ours touches the server; MariaDB's global counter tells whether anyone else did.
    gap_before = counters.read(database)
    time.sleep(plan.gap_seconds)
    before = counters.read(database)
    foreign = before.get("Connections", 0) - gap_before.get("Connections", 0)
    server: Server | None = None
    try:
        with (
            SessionTracker(tracker_admin, database, plan.tracker_interval) as tracker,
            dbserver.SessionSampler(family, database, interval=plan.sample_interval) as sampler,
        ):
            server = start()
            server.wait_ready(60.0)
            warm = run_load(pool, server, plan.warmup_seconds, plan)
            load = run_load(pool, server, plan.window_seconds, plan)
            stats: dict[int, dict[str, Any]] = {}
            stats_requests = 0
            if pool_stats:
                stats, stats_requests = _worker_stats(server)
            if while_up is not None:
                while_up(server)
            server.stop()
            left_now = counters.open_sessions(database)
            for _ in range(200):  # until the stopped master's sessions are gone (bounded), still tracking
                if not left_now:
                    break
                time.sleep(0.05)
                left_now = counters.open_sessions(database)
    except BaseException:
        if server is not None:
            server.stop()
            print(f"--- {family}/{arm_key} round {rnd}: server log ---\n{server.log()[-5000:]}", file=sys.stderr)
        raise
    left, after = counters.settle(database)
    attempts = sampler.samples + len(sampler.refused)
    sampler_refused_max = sum(1 for r in sampler.refused if "Too many connections" in r or "1040" in r)
    if family == "mysql":
        app_attempts = after["Connections"] - before["Connections"] - attempts
        refused = after["Connection_errors_max_connections"] - before["Connection_errors_max_connections"]
        refused -= sampler_refused_max
        opened = app_attempts - refused
        selects = after["Com_select"] - before["Com_select"] - sampler.samples
    else:
        refused = -1
        opened = after["sessions"] - before["sessions"]
        selects = after["transactions"] - before["transactions"]
    requests_total = warm.counts.requests + load.counts.requests + stats_requests
    pool_sum = {key: float(sum(s.get(key, 0) for s in stats.values())) for key in POOL_KEYS}
    return Window(
        arm=arm_key,
        family=family,
        rnd=rnd,
        position=position,
        load=load,
        warmup=warm.counts,
        sessions_opened=opened,
        sessions_refused=refused,
        selects=selects,
        sessions_seen=len(tracker.seen),
        peak_sessions=max(sampler.peak, tracker.peak),
        peak_sampler=sampler.peak,
        peak_tracker=tracker.peak,
        sampler_samples=sampler.samples,
        sampler_refused=len(sampler.refused),
        left_open_after_stop=left,
        foreign_connections=foreign,
        requests_total=requests_total,
        pool=pool_sum,
        pool_opened_per_worker=sorted(int(s.get("pool_opened", 0)) for s in stats.values()),
    )


# =========================================================================== the run


def resolved_pool_size(database: str, code_dir: Path = CODE_DIR) -> int:
    """POOL_SIZE as the serverhooks arm's workers resolve it (env > settings.SERVERHOOKS > default)."""
    env = arm_env(ARMS["postgres"][1], database, 0)
    code = "import django; django.setup(); from serverhooks import conf; print(conf.get('POOL_SIZE'))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=common.REPO,
        env={**os.environ, **env, "PYTHONSAFEPATH": "1", "PYTHONPATH": str(code_dir)},
        capture_output=True,
        check=True,
        timeout=60,
    )
    return int(out.stdout.decode().strip().splitlines()[-1])


def _rotated(arms: Sequence[A], rnd: int) -> list[A]:
    shift = rnd % len(arms)
    return [*arms[shift:], *arms[:shift]]


def run_all(plan: Plan, families: Sequence[str]) -> tuple[list[Window], int]:
    import multiprocessing

    from tests.support import dbserver

    databases: dict[tuple[str, str], str] = {}
    admins: dict[str, tuple[ServerCounters, ServerCounters]] = {}
    windows: list[Window] = []
    try:
        for family in families:
            for arm in ARMS[family]:
                databases[(family, arm.key)] = dbserver.create_database(family)
        pool_size = resolved_pool_size(databases[("postgres", SERVERHOOKS)])
        for family in families:
            for arm in ARMS[family]:
                common.schema(arm_env(arm, databases[(family, arm.key)], pool_size), CODE_DIR)
        for family in families:
            admins[family] = (ServerCounters(family), ServerCounters(family))
        # The client processes are forked once, before any server or sampler thread starts.
        with multiprocessing.get_context("fork").Pool(plan.clients.procs) as pool:
            for rnd in range(plan.rounds):
                for family in families:
                    line = []
                    for position, arm in enumerate(_rotated(ARMS[family], rnd)):
                        w = run_window(
                            arm, rnd, position, databases[(family, arm.key)], admins[family], plan, pool, pool_size
                        )
                        windows.append(w)
                        line.append(
                            f"{arm.key}={w.load.rps:.0f}/s ({w.sessions_opened} opened, peak {w.peak_sessions}"
                            + (f", {w.load.counts.errors} errors" if w.load.counts.errors else "")
                            + ")"
                        )
                    print(f"  round {rnd + 1}/{plan.rounds} {family}: " + ", ".join(line), flush=True)
    finally:
        for pair in admins.values():
            for admin in pair:
                try:
                    admin.close()
                except Exception:
                    pass
        for (family, _arm), name in databases.items():
            common.drop_quietly(family, name)
    return windows, pool_size


# =========================================================================== connect cost


def connect_costs(rounds: int = 20) -> dict[str, float]:
    """CPU ms this process spends to open and close one session, per driver (context for the arms)."""
    import MySQLdb
    import psycopg
    import pymysql

    from tests.support import dbserver

    my = dbserver.connection_params(dbserver.server_url("mysql"))
    pg = dbserver.connection_params(dbserver.server_url("postgres"))
    mysql_kwargs = {"host": my["host"], "port": my["port"] or 3306, "user": my["user"], "password": my["password"]}
    openers: dict[str, Any] = {
        "PyMySQL": lambda: pymysql.connect(**mysql_kwargs, database=my["name"]),
        "PyMySQL, ssl_disabled=True": lambda: pymysql.connect(**mysql_kwargs, database=my["name"], ssl_disabled=True),
        "mysqlclient": lambda: MySQLdb.connect(**mysql_kwargs, database=my["name"]),
        "psycopg 3": lambda: psycopg.connect(
            host=pg["host"], port=pg["port"] or 5432, user=pg["user"], password=pg["password"], dbname=pg["name"]
        ),
    }
    costs: dict[str, float] = {}
    for name, opener in openers.items():
        opener().close()  # imports and first-time set-up
        started = time.process_time()
        for _ in range(rounds):
            opener().close()
        costs[name] = (time.process_time() - started) / rounds * 1e3
    return costs


# =========================================================================== summary


def _per_request(values: Sequence[float], requests: Sequence[int]) -> float:
    """Median over windows of value / requests, in µs."""
    return common.median([v / max(1, n) * 1e6 for v, n in zip(values, requests, strict=True)])


def summarise_arm(arm: Arm, mine: list[Window]) -> dict[str, Any]:
    rates = [w.load.rps for w in mine]
    checked = LoadCounts()
    for w in mine:
        checked.add(w.warmup)
        checked.add(w.load.counts)
    requests_total = sum(w.requests_total for w in mine)
    opened = sum(w.sessions_opened for w in mine)
    window_requests = [w.load.counts.requests for w in mine]
    q1, q3 = common.quartiles(rates)
    return {
        "title": arm.title,
        "rates": rates,
        "median_rps": common.median(rates),
        "q1_rps": q1,
        "q3_rps": q3,
        "sessions_opened": [w.sessions_opened for w in mine],
        "sessions_opened_total": opened,
        "sessions_seen_total": sum(w.sessions_seen for w in mine),
        "sessions_refused_total": sum(w.sessions_refused for w in mine) if arm.family == "mysql" else None,
        "requests_total": requests_total,
        "sessions_per_1000": 1000 * opened / max(1, requests_total),
        "statements_per_request": sum(w.selects for w in mine) / max(1, requests_total),
        "peak_max": max((w.peak_sessions for w in mine), default=0),
        "peak_sampler_max": max((w.peak_sampler for w in mine), default=0),
        "peak_tracker_max": max((w.peak_tracker for w in mine), default=0),
        "sampler_refused": sum(w.sampler_refused for w in mine),
        "sampler_attempts": sum(w.sampler_samples + w.sampler_refused for w in mine),
        "left_open": max((w.left_open_after_stop for w in mine), default=0),
        "foreign_connections": sum(w.foreign_connections for w in mine),
        "worker_cpu_us": _per_request([w.load.worker_cpu_s for w in mine], window_requests),
        "db_cpu_us": _per_request([w.load.db_cpu_s for w in mine], window_requests),
        "client_cpu_us": _per_request([w.load.counts.client_cpu_s for w in mine], window_requests),
        "other_cores_median": common.median([w.load.other_cores for w in mine]),
        "other_cores_max": max((w.load.other_cores for w in mine), default=float("nan")),
        "checked": dataclasses.asdict(checked),
        "pool": {key: sum(w.pool[key] for w in mine) for key in POOL_KEYS},
        "pool_opened_per_worker_max": max((max(w.pool_opened_per_worker, default=0) for w in mine), default=0),
    }


def _ratio(arms: dict[str, Any], a: str, b: str) -> dict[str, Any]:
    """a / b of the arms' median req/s, with its bootstrap 95% interval."""
    return {
        "ratio": arms[a]["median_rps"] / arms[b]["median_rps"] if arms[b]["median_rps"] else float("nan"),
        "ci": common.bootstrap(arms[b]["rates"], arms[a]["rates"], lambda x, y: y / x if x else float("nan")),
    }


def _fraction(part: int, whole: int) -> float:
    return part / whole if whole > 0 else float("inf")


def _fraction_f(part: float, whole: float) -> float:
    return part / whole if whole > 0 else float("inf")


def summarise(windows: list[Window], families: Sequence[str], pool_size: int) -> dict[str, Any]:
    bound = WORKERS * pool_size
    out: dict[str, Any] = {"bound": bound, "pool_size": pool_size, "families": {}}
    for family in families:
        arms = {
            arm.key: summarise_arm(arm, [w for w in windows if w.family == family and w.arm == arm.key])
            for arm in ARMS[family]
        }
        result: dict[str, Any] = {
            "arms": arms,
            "vs_sync": _ratio(arms, SERVERHOOKS, SYNC),
            "vs_nohooks": _ratio(arms, SERVERHOOKS, NOHOOKS),
        }
        if family == "mysql":
            sh, nh = arms[SERVERHOOKS], arms[NOHOOKS]
            result["mysqlclient_vs_nohooks"] = _ratio(arms, MYSQLCLIENT, NOHOOKS)
            result["mysqlclient_vs_sync"] = _ratio(arms, MYSQLCLIENT, SYNC)
            # Absolute: the same load time. Per request: sessions opened / requests served.
            result["sessions_fraction"] = _fraction(sh["sessions_opened_total"], nh["sessions_opened_total"])
            result["sessions_fraction_seen"] = _fraction(sh["sessions_seen_total"], nh["sessions_seen_total"])
            per_request = {
                key: (
                    s["sessions_opened_total"] / max(1, s["requests_total"]),
                    s["sessions_seen_total"] / max(1, s["requests_total"]),
                )
                for key, s in ((SERVERHOOKS, sh), (NOHOOKS, nh))
            }
            result["sessions_per_request"] = per_request
            result["sessions_fraction_per_request"] = _fraction_f(per_request[SERVERHOOKS][0], per_request[NOHOOKS][0])
            result["sessions_fraction_per_request_seen"] = _fraction_f(
                per_request[SERVERHOOKS][1], per_request[NOHOOKS][1]
            )
        else:
            best = max(PEERS, key=lambda key: arms[key]["median_rps"])
            result["best_peer"] = best
            result["vs_best_peer"] = _ratio(arms, SERVERHOOKS, best)
            result["vs_peers"] = {key: _ratio(arms, SERVERHOOKS, key) for key in PEERS}
        out["families"][family] = result
    peaks = [
        (family, key, res["arms"][key]["peak_max"])
        for family, res in out["families"].items()
        for key in (SERVERHOOKS, MYSQLCLIENT)
        if key in res["arms"]
    ]
    out["serverhooks_peaks"] = peaks
    out["serverhooks_peak"] = max((p for _f, _k, p in peaks), default=0)
    return out


# =========================================================================== report


def _ratio_text(r: dict[str, Any]) -> str:
    lo, hi = r["ci"]
    return f"{r['ratio']:.3f} (95% CI {lo:.3f} to {hi:.3f})"


def _one_in(fraction: float) -> str:
    return "none" if fraction == 0 else ("n/a" if fraction == float("inf") else f"1/{1 / fraction:.0f}")


def _arm_rows(family: str, result: dict[str, Any]) -> list[str]:
    rows = []
    for arm in ARMS[family]:
        s = result["arms"][arm.key]
        c = s["checked"]
        refused = "" if s["sessions_refused_total"] is None else f" (+{s['sessions_refused_total']} refused)"
        peak = f"{s['peak_sampler_max']} / {s['peak_tracker_max']}"
        if s["sampler_refused"]:
            peak += f" ({s['sampler_refused']} of {s['sampler_attempts']} samples refused)"
        rows.append(
            f"| {s['title']} | **{s['median_rps']:.0f}** | {s['q1_rps']:.0f} to {s['q3_rps']:.0f} "
            f"| {' '.join(f'{x:.0f}' for x in s['rates'])} "
            f"| {s['sessions_opened_total']}{refused} | {s['sessions_seen_total']} "
            f"| {' '.join(str(x) for x in s['sessions_opened'])} | {s['sessions_per_1000']:.1f} | {peak} "
            f"| {s['statements_per_request']:.2f} | {s['worker_cpu_us']:.0f} | {s['db_cpu_us']:.0f} "
            f"| {s['client_cpu_us']:.0f} | {s['other_cores_median']:.2f} / {s['other_cores_max']:.2f} "
            f"| {c['requests'] + c['failures']} | {c['http_errors']} | {c['failures']} | {c['wrong']} |"
        )
    return rows


def _summary_rows(plan: Plan, summary: dict[str, Any]) -> list[str]:
    fams = summary["families"]
    bound = summary["bound"]
    rows = ["| target | measured | met |", "|---|---|---|"]
    if "mysql" in fams:
        m = fams["mysql"]
        sh, nh = m["arms"][SERVERHOOKS], m["arms"][NOHOOKS]
        r = m["vs_nohooks"]
        rows.append(
            f"| MariaDB: serverhooks at least {MYSQL_RPS_RATIO:g}x the no-hooks requests/s "
            f"| {_ratio_text(r)}: {sh['median_rps']:.0f} vs {nh['median_rps']:.0f} req/s "
            f"| {common.verdict(r['ratio'] >= MYSQL_RPS_RATIO, r['ci'], MYSQL_RPS_RATIO)} |"
        )
        limit = _one_in(MYSQL_SESSIONS_FRACTION)
        per_request = m["sessions_per_request"]
        rows.append(
            f"| MariaDB: serverhooks opens at most {limit} of the no-hooks sessions, per request served (the same "
            f"load) | server counter: {per_request[SERVERHOOKS][0] * 1000:.2f} vs "
            f"{per_request[NOHOOKS][0] * 1000:.0f} sessions per 1000 requests "
            f"({_one_in(m['sessions_fraction_per_request'])}); per-database count: "
            f"{per_request[SERVERHOOKS][1] * 1000:.2f} vs {per_request[NOHOOKS][1] * 1000:.0f} "
            f"({_one_in(m['sessions_fraction_per_request_seen'])}) "
            f"| {common.yes(m['sessions_fraction_per_request'] <= MYSQL_SESSIONS_FRACTION)} (per-database count: "
            f"{common.yes(m['sessions_fraction_per_request_seen'] <= MYSQL_SESSIONS_FRACTION)}) |"
        )
        rows.append(
            f"| MariaDB: the same in absolute numbers, over the same load time ({plan.rounds} x "
            f"{plan.warmup_seconds + plan.window_seconds:g} s per arm, a fresh master each time) "
            f"| server counter: {sh['sessions_opened_total']} vs {nh['sessions_opened_total']} "
            f"({_one_in(m['sessions_fraction'])}), while serving {sh['requests_total']} vs {nh['requests_total']} "
            f"requests; per-database count: {sh['sessions_seen_total']} vs {nh['sessions_seen_total']} "
            f"({_one_in(m['sessions_fraction_seen'])}) "
            f"| {common.yes(m['sessions_fraction'] <= MYSQL_SESSIONS_FRACTION)} (per-database count: "
            f"{common.yes(m['sessions_fraction_seen'] <= MYSQL_SESSIONS_FRACTION)}) |"
        )
    if "postgres" in fams:
        p = fams["postgres"]
        best = p["best_peer"]
        r = p["vs_best_peer"]
        rows.append(
            f"| PostgreSQL: serverhooks at least {PEER_RPS_RATIO:g}x the best peer's requests/s (best: "
            f"{p['arms'][best]['title']}) | {_ratio_text(r)}: {p['arms'][SERVERHOOKS]['median_rps']:.0f} vs "
            f"{p['arms'][best]['median_rps']:.0f} req/s "
            f"| {common.verdict(r['ratio'] >= PEER_RPS_RATIO, r['ci'], PEER_RPS_RATIO)} |"
        )
    peaks = ", ".join(f"{common.FAMILY_TITLE[f]} {k}: {p}" for f, k, p in summary["serverhooks_peaks"])
    rows.append(
        f"| peak concurrent sessions with serverhooks never above workers x POOL_SIZE = {WORKERS} x "
        f"{summary['pool_size']} = {bound} | max {summary['serverhooks_peak']} ({peaks}) "
        f"| {common.yes(summary['serverhooks_peak'] <= bound)} |"
    )
    for family, res in fams.items():
        r = res["vs_sync"]
        rows.append(
            f"| {common.FAMILY_TITLE[family]}: serverhooks / sync-worker ceiling (aim: at least {SYNC_RPS_RATIO:g}) "
            f"| {_ratio_text(r)}: {res['arms'][SERVERHOOKS]['median_rps']:.0f} vs "
            f"{res['arms'][SYNC]['median_rps']:.0f} req/s "
            f"| {common.verdict(r['ratio'] >= SYNC_RPS_RATIO, r['ci'], SYNC_RPS_RATIO)} |"
        )
    bad = answered = 0
    for res in fams.values():
        for key, s in res["arms"].items():
            if key != NOHOOKS:
                c = s["checked"]
                bad += c["http_errors"] + c["failures"] + c["wrong"]
                answered += c["requests"] + c["failures"]
    rows.append(
        f"| every answer right, in every arm but no hooks (warm-up included) | {bad} errors or wrong answers in "
        f"{answered} requests | {common.yes(bad == 0)} |"
    )
    for family, res in fams.items():
        c = res["arms"][NOHOOKS]["checked"]
        failed = c["http_errors"] + c["failures"] + c["wrong"]
        rows.append(
            f"| (reported, no target) {common.FAMILY_TITLE[family]}, no hooks: requests that failed "
            f"| {failed} of {c['requests'] + c['failures']} ({c['http_errors']} HTTP 500, {c['failures']} no answer, "
            f"{c['wrong']} wrong) | |"
        )
    return rows


def _setup_lines(plan: Plan, env: dict[str, str], summary: dict[str, Any], costs: dict[str, float]) -> list[str]:
    size = summary["pool_size"]
    cost_text = ", ".join(f"{name} {ms:.2f} ms" for name, ms in costs.items())
    return [
        "## Setup",
        "",
        f"Gunicorn `-w {WORKERS}`, no preload, CONN_MAX_AGE={CONN_MAX_AGE} (the two peers: 0, as they require), "
        f"`max_requests` 0. Every request is GET {ENDPOINT}?m=<marker> on a fresh unix-socket connection (HTTP/1.0, "
        "`Connection: close`). Of the test project's views it is the lightest that runs exactly one SELECT "
        "(`SELECT COUNT(*) FROM sh_hit WHERE marker = %s`; /echo adds an INSERT, /whoami builds a bigger answer); "
        'nothing inserts, so every right answer is exactly `{"count": 0}`, and every answer is checked. '
        f"Load: {plan.clients.procs} client processes x {plan.clients.threads} threads = {plan.concurrency} "
        f"concurrent connections, each thread one request at a time. {plan.rounds} round(s); in each, every arm "
        "of a database gets one window in turn (the order rotates by one arm every round): a fresh master on the "
        f"arm's own database (created once for the run), {plan.warmup_seconds:g} s of warm-up (checked, not timed), "
        f"{plan.window_seconds:g} s measured, then (serverhooks arms) each worker's `serverhooks.stats()` via "
        "/whoami; then the master is stopped and the bench waits until the database has no session left.",
        "",
        "- **no hooks**: the shipped gunicorn.conf.py without its `from serverhooks.gunicorn import *` line, gevent "
        "workers (GUNICORN_WORKER_CLASS=gevent).",
        "- **serverhooks**: the shipped gunicorn.conf.py as it is, gevent workers, the pool on with its default "
        f"POOL_SIZE ({size}, as the workers resolve it). MariaDB: PyMySQL, and once more with mysqlclient "
        "(which blocks the gevent hub for each query; serverhooks warns about it).",
        "- **sync-worker ceiling**: the no-hooks file with GUNICORN_WORKER_CLASS=sync: two processes, one "
        "persistent session each, the same load queued on the socket; the same driver as the serverhooks arm.",
        "- **django-db-geventpool** (PostgreSQL): the no-hooks file; bench/settings_peers.py sets ENGINE "
        "`django_db_geventpool.backends.postgresql_psycopg3`, CONN_MAX_AGE 0, OPTIONS MAX_CONNS = REUSE_CONNS = "
        f"{size} per worker and Django's own pool off, as its README says for Django 5.1+. It runs `SELECT 1` on "
        "every connection it hands out again (its `check_usable`): two statements per request.",
        "- **Django's psycopg pool** (PostgreSQL): the no-hooks file, DATABASE_URL with `?pool=1` (CONN_MAX_AGE 0; "
        "tests/project/dburl.py gives min_size 2, max_size 4); bench/settings_peers.py raises max_size to "
        f"{size} per worker, the same bound as serverhooks.",
        "",
        "**Sessions opened** are counted on the database server over each master's whole life (warm-up, window, "
        "stats requests; read again once the master has stopped and its sessions are gone). PostgreSQL: "
        "`pg_stat_database.sessions` of the arm's own database. MariaDB: the global `Connections` counter, less "
        "the session sampler's connections and the attempts refused at max_connections "
        "(`Connection_errors_max_connections`, in brackets). That counter is global: anyone else's connections "
        "during the window count too. So every window also records the **distinct sessions seen** on the arm's "
        f"own database, sampled every {plan.tracker_interval * 1e3:.0f} ms on one held admin session (a lower bound: "
        "a session that opens and closes between samples is missed; the sessions here live as long as a master, or "
        "until garbage collection), and the connections to MariaDB by anyone during a "
        f"{plan.gap_seconds:g} s gap before each window. **Peak concurrent sessions**: tests/support/dbserver."
        f"SessionSampler every {plan.sample_interval * 1e3:.0f} ms (a new admin connection per sample, refused "
        "when the server is full) / the held-session sampler. **Statements per request**: MariaDB `Com_select` (less "
        "the sampler's), PostgreSQL transactions (`xact_commit + xact_rollback`; each autocommit statement is "
        "one) of the arm's own database, over every request the master answered; they include each new session's "
        "set-up queries (and MariaDB's also anyone else's SELECTs). **CPU per request** (medians over windows): the "
        "master and its workers; the database server processes (PostgreSQL backends that came and went included; "
        "anyone else's queries too); the client processes. **Other work**: CPU spent during a window outside the "
        "bench, its server, clients and the database servers.",
        "",
        f"Opening one session, CPU ms in the bench process (mean of 20): {cost_text}. PyMySQL "
        f"{env['PyMySQL']} builds a TLS context, loading the system CA bundle, for every connection unless told "
        "`ssl_disabled`, even though this MariaDB has TLS disabled; tests/project/dburl.py does not disable it. "
        "Every session the no-hooks arm opens pays that in its worker.",
        "",
    ]


def _family_section(family: str, res: dict[str, Any]) -> list[str]:
    out = [
        f"## {common.FAMILY_TITLE[family]}",
        "",
        "| arm | median req/s | 25th to 75th | every window (req/s) | sessions opened, server counter, all windows "
        "| distinct sessions seen on its database, all windows | opened per window | sessions opened per 1000 "
        "requests | peak concurrent sessions (SessionSampler / held sampler) | statements per request "
        "| worker CPU µs/req | database CPU µs/req | client CPU µs/req | other work (cores, median / max) "
        "| requests | HTTP errors | no answer | wrong answer |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *_arm_rows(family, res),
        "",
        f"- serverhooks / no hooks: {_ratio_text(res['vs_nohooks'])}",
    ]
    if family == "mysql":
        out.append(f"- serverhooks with mysqlclient / no hooks: {_ratio_text(res['mysqlclient_vs_nohooks'])}")
        out.append(f"- serverhooks with mysqlclient / sync-worker ceiling: {_ratio_text(res['mysqlclient_vs_sync'])}")
    else:
        for key in PEERS:
            out.append(f"- serverhooks / {res['arms'][key]['title']}: {_ratio_text(res['vs_peers'][key])}")
    out.append(f"- serverhooks / sync-worker ceiling: {_ratio_text(res['vs_sync'])}")
    for key in (SERVERHOOKS, MYSQLCLIENT):
        if key not in res["arms"]:
            continue
        s = res["arms"][key]
        pool = s["pool"]
        waits = pool["pool_waits"]
        each = f", {pool['pool_wait_seconds'] / waits * 1e3:.1f} ms each" if waits else ""
        out.append(
            f"- {s['title']}, `serverhooks.stats()` summed over workers and windows: pool_opened "
            f"{pool['pool_opened']:.0f} (at most {s['pool_opened_per_worker_max']} in one worker), pool_reused "
            f"{pool['pool_reused']:.0f}, pool_waits {waits:.0f} ({pool['pool_wait_seconds']:.2f} s in all{each}), "
            f"pool_discarded {pool['pool_discarded']:.0f}, pool_reclaimed {pool['pool_reclaimed']:.0f}"
        )
    if family == "mysql":
        foreign = sum(s["foreign_connections"] for s in res["arms"].values())
        out.append(f"- connections to MariaDB by anyone else during the gaps before the windows: {foreign}")
    left = max(s["left_open"] for s in res["arms"].values())
    if left:
        out.append(f"- sessions still open 20 s after a master stopped (most in one window): {left}")
    examples = [f"{s['title']}: `{e}`" for s in res["arms"].values() for e in s["checked"]["examples"][:2]]
    if examples:
        out.append("- first problems seen: " + "; ".join(examples))
    out.append("")
    return out


def render(plan: Plan, env: dict[str, str], summary: dict[str, Any], costs: dict[str, float], took: float) -> str:
    title = "Gunicorn gevent benchmark: serverhooks' pool against no hooks, its peers and sync workers"
    out = [
        *common.report_head(title, "bench.gevent_bench", plan.mode, took, env),
        f"| machine | {env['cores']} cores ({env['usable_cores']} usable), {env['cpu']}, {env['os']}; shared with "
        f"other work |",
        f"| load average (1, 5, 15 min) | before: {env['load_before']}; after: {env['load_after']}; "
        f"{env['load_wait']} |",
        f"| Python | {env['python']} |",
        f"| serverhooks | {env['serverhooks']}, serverhooks/, tests/ and gunicorn.conf.py as committed in "
        f"{env['commit']} (copied to bench/out/gevent/code at the start"
        + (f"; {env['uncommitted']} uncommitted change(s) there were left out" if env["uncommitted"] != "0" else "")
        + ") |",
        f"| gunicorn, gevent | {env['gunicorn']}, {env['gevent']} (greenlet {env['greenlet']}) |",
        f"| Django | {env['Django']} |",
        f"| drivers | PyMySQL {env['PyMySQL']}, mysqlclient {env['mysqlclient']}, psycopg {env['psycopg']} |",
        f"| peers | django-db-geventpool {env['django-db-geventpool']}, psycopg-pool {env['psycopg-pool']} |",
        f"| database servers | MariaDB {env['mysql_server']} (max_connections {env['mysql_max_connections']}), "
        f"PostgreSQL {env['postgres_server']} (max_connections {env['postgres_max_connections']}), on 127.0.0.1 |",
        "",
        "## Summary",
        "",
        *_summary_rows(plan, summary),
        "",
        *_setup_lines(plan, env, summary, costs),
    ]
    for family, res in summary["families"].items():
        out += _family_section(family, res)
    return "\n".join(out)


# =========================================================================== main


def wait_for_quiet_machine() -> str:
    """Poll /proc/loadavg (bounded) until the 1-minute load average is below LOAD_QUIET."""
    started = time.monotonic()
    for _ in range(int(LOAD_WAIT_S / LOAD_POLL_S) + 1):
        load1 = os.getloadavg()[0]
        if load1 < LOAD_QUIET:
            return f"waited {time.monotonic() - started:.0f} s for a 1-minute load average below {LOAD_QUIET:g}"
        if time.monotonic() - started >= LOAD_WAIT_S:
            break
        print(f"  load average {common.load_average()}: waiting for the 1-minute figure to fall below {LOAD_QUIET:g}")
        time.sleep(LOAD_POLL_S)
    return f"the 1-minute load average stayed at or above {LOAD_QUIET:g} for {LOAD_WAIT_S / 60:.0f} min: ran anyway"


def _max_connections() -> dict[str, str]:
    from tests.support import dbserver

    found = {}
    for family, sql in (("mysql", "SELECT @@max_connections"), ("postgres", "SHOW max_connections")):
        try:
            found[f"{family}_max_connections"] = str(dbserver.query(family, sql)[0][0])
        except Exception as exc:
            found[f"{family}_max_connections"] = f"? ({type(exc).__name__})"
    return found


@contextmanager
def _scrubbed_environment() -> Iterator[list[str]]:
    """Settings of the caller's shell must not leak into the arms: SERVERHOOKS_* (but the test servers'
    addresses), GUNICORN_*, DJANGO_*, BENCH_PEER*, and the test project's other variables."""
    project = {"WEB_CONCURRENCY", "DATABASE_URL", "DATABASE_ENGINE", "CONN_MAX_AGE", "CONN_HEALTH_CHECKS"}
    project |= {"CACHE_URL", "QUERY_AT_IMPORT", "PSYCOPG_WAIT_FUNC"}
    removed: dict[str, str] = {}
    for key in list(os.environ):
        if (
            (key.startswith("SERVERHOOKS_") and not key.startswith("SERVERHOOKS_TEST_"))
            or key.startswith(("GUNICORN_", "DJANGO_", "BENCH_PEER"))
            or key in project
        ):
            removed[key] = os.environ.pop(key)
    try:
        yield sorted(removed)
    finally:
        os.environ.update(removed)


def main(argv: Sequence[str] | None = None) -> int:
    args = common.bench_arguments(
        "serverhooks' gevent pool under Gunicorn; writes bench/GEVENT_RESULTS.md.", RESULTS_PATH, argv
    )
    plan = QUICK if args.quick else FULL
    from tests.support import dbserver

    families = ("mysql", "postgres")
    for family in families:
        reason = dbserver.reachable(family)
        if reason is not None:
            print(f"{family} server at {dbserver.server_url(family)} does not answer: {reason}", file=sys.stderr)
            return 2
    with _scrubbed_environment() as removed:
        if removed:
            print(f"ignoring these variables of the calling environment: {', '.join(removed)}", flush=True)
        if plan.mode == "full" and not args.no_wait:
            load_wait = wait_for_quiet_machine()
        else:
            load_wait = "no wait for a quiet machine (quick run)" if plan.mode == "quick" else "no wait (--no-wait)"
        print(load_wait, flush=True)
        shutil.rmtree(OUT_DIR, ignore_errors=True)
        OUT_DIR.mkdir(parents=True)
        started = time.monotonic()
        env = {
            **common.environment(("gevent", "greenlet", "PyMySQL", "psycopg-pool", "django-db-geventpool")),
            **_max_connections(),
            **common.snapshot_code(CODE_DIR, COMMITTED),
            "load_wait": load_wait,
        }
        print(f"{plan.mode} run; server logs in {OUT_DIR}", flush=True)
        costs = connect_costs()
        windows, pool_size = run_all(plan, families)
    env["load_after"] = common.load_average()
    took = time.monotonic() - started
    summary = summarise(windows, families, pool_size)
    raw = {
        "plan": dataclasses.asdict(plan),
        "env": env,
        "windows": [dataclasses.asdict(w) for w in windows],
        "summary": summary,
        "connect_costs_ms": costs,
    }
    return common.write_report(OUT_DIR, raw, render(plan, env, summary, costs, took), args.results)


if __name__ == "__main__":
    sys.exit(main())
