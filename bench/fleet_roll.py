"""A fleet that rolls without a failed request: Gunicorn hosts behind nginx, one PgBouncer, one PostgreSQL.

    python -m bench.fleet_roll            # full run, about a minute; writes bench/FLEET_RESULTS.md
    python -m bench.fleet_roll --quick    # smoke run, about 30 s; 2 hosts

Run as root (it makes network namespaces), with Debian's pgbouncer and nginx installed (tests/run setup).

Each application host is a network namespace of its own (`shfleet<N>`), joined to the root namespace by
a veth pair (10.231.N.1 root side, 10.231.N.2 host side; no bridge, no default route: a host reaches only
PgBouncer). Each runs Gunicorn with the shipped gunicorn.conf.py (its one serverhooks line), sync workers,
serving the test project (tests/project) from a snapshot of HEAD, CONN_MAX_AGE=600, through PgBouncer in
transaction mode (`?pgbouncer=1`: no server-side cursors, no prepared statements). nginx on 127.0.0.1 has
the hosts as upstreams and routes around a stopping or stopped one (`proxy_next_upstream error timeout`).
A load client in the root namespace sends GET /echo?m=<marker> through nginx, a fresh connection per
request, and checks that every answer carries its own marker.

Under that load: a Gunicorn HUP of each host in turn, then a graceful stop (SIGTERM) and start of each;
then PgBouncer's RELOAD (SIGHUP) and a full restart (safe shutdown, start). Recorded per phase: failed
requests and wrong answers; server sessions on PostgreSQL (sampled) against default_pool_size; PgBouncer's
client connections (its admin console) against hosts x workers; sessions left after the run.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import types
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.common import (
    BENCH_DIR,
    Clients,
    bench_arguments,
    drop_quietly,
    environment,
    report_head,
    run_client_threads,
    schema,
    snapshot_code,
    write_report,
    yes,
)

OUT_DIR = BENCH_DIR / "out" / "fleet"
CODE_DIR = OUT_DIR / "code"
RESULTS_PATH = BENCH_DIR / "FLEET_RESULTS.md"
COMMITTED = ("serverhooks", "tests", "gunicorn.conf.py")
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
IP = shutil.which("ip") or "/usr/sbin/ip"
NETNS_PREFIX = "shfleet"
SUBNET = "10.231"  # 10.231.N.0/24 per host; checked unused before anything is made
APP_PORT = 8000
LIMIT = 1_000_000  # requests per client thread: a bound, never reached before the time bound

ROLLING = ("rolling HUP", "rolling stop/start")  # phases that must not fail a single request


@dataclasses.dataclass(frozen=True)
class Plan:
    mode: str
    hosts: int
    workers: int  # sync workers per host: one database connection each
    pool_size: int  # PgBouncer's default_pool_size: below hosts x workers, so it really multiplexes
    clients: Clients
    baseline_s: float  # steady load before the first restart and after the last
    settle_s: float  # after a host is back, before the next one goes (longer than nginx's fail_timeout)
    bouncer_settle_s: float  # after each PgBouncer step
    budget_s: float  # hard bound on the load and the samplers


QUICK = Plan("quick", hosts=2, workers=2, pool_size=3, clients=Clients(1, 4), baseline_s=1.0, settle_s=1.2,
             bouncer_settle_s=2.0, budget_s=120.0)  # fmt: skip
FULL = Plan("full", hosts=3, workers=2, pool_size=4, clients=Clients(2, 3), baseline_s=3.0, settle_s=2.5,
            bouncer_settle_s=4.0, budget_s=300.0)  # fmt: skip

# Set by main() once the sequence is over; the load processes inherit it through fork.
_STOP: Any = None


# =========================================================================== preflight


def preflight() -> str | None:
    """None when this machine can run the bench, else what is missing."""
    from tests.support import dbserver, pgbouncer

    if os.geteuid() != 0:
        return "run as root: the bench makes network namespaces and veth pairs"
    for name, path in (("pgbouncer", pgbouncer.BINARY), ("nginx", NGINX), ("ip (iproute2)", IP)):
        if not Path(path).exists():
            return f"{name} is not installed ({path}); tests/run setup installs it"
    namespaces = subprocess.run([IP, "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    if NETNS_PREFIX in namespaces:
        return f"network namespaces named {NETNS_PREFIX}* exist already (another run?): {namespaces.strip()}"
    addresses = subprocess.run([IP, "-4", "-o", "addr"], capture_output=True, text=True, timeout=10).stdout
    routes = subprocess.run([IP, "-4", "route"], capture_output=True, text=True, timeout=10).stdout
    if f" {SUBNET}." in addresses or f"{SUBNET}." in routes:
        return f"{SUBNET}.0.0/16 is in use on this machine already; the bench will not share it"
    problem = dbserver.reachable("postgres")
    return f"PostgreSQL unreachable: {problem}" if problem else None


# =========================================================================== the hosts' network


@dataclasses.dataclass
class Host:
    """One application host: a namespace, its veth pair, and the Gunicorn master serving in it."""

    n: int
    made: bool = False
    server: Any = None  # tests.support.procs.Server of the current incarnation
    incarnation: int = 0
    logs: list[Path] = dataclasses.field(default_factory=list)

    @property
    def netns(self) -> str:
        return f"{NETNS_PREFIX}{self.n}"

    @property
    def root_if(self) -> str:
        return f"{NETNS_PREFIX}{self.n}r"

    @property
    def host_if(self) -> str:
        return f"{NETNS_PREFIX}{self.n}h"

    @property
    def root_addr(self) -> str:
        return f"{SUBNET}.{self.n}.1"

    @property
    def addr(self) -> str:
        return f"{SUBNET}.{self.n}.2"


def ip(*args: str, netns: str | None = None, check: bool = True) -> None:
    command = [IP, *(["-n", netns] if netns else []), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=15)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}: {done.stderr.strip()}")


def make_network(host: Host) -> None:
    """The namespace and its veth pair; `made` is set first so that cleanup removes a half-made one."""
    host.made = True
    ip("netns", "add", host.netns)
    ip("link", "add", host.root_if, "type", "veth", "peer", "name", host.host_if, "netns", host.netns)
    ip("addr", "add", f"{host.root_addr}/24", "dev", host.root_if)
    ip("link", "set", host.root_if, "up")
    ip("link", "set", "lo", "up", netns=host.netns)
    ip("addr", "add", f"{host.addr}/24", "dev", host.host_if, netns=host.netns)
    ip("link", "set", host.host_if, "up", netns=host.netns)


def remove_network(host: Host) -> None:
    """Deleting the namespace deletes the veth pair with it; the root end is deleted too if it is left."""
    if not host.made:
        return
    ip("netns", "del", host.netns, check=False)
    if Path(f"/sys/class/net/{host.root_if}").exists():
        ip("link", "del", host.root_if, check=False)
    host.made = False


# =========================================================================== Gunicorn on each host


def gunicorn_conf() -> Path:
    """The snapshot's shipped gunicorn.conf.py, importing serverhooks from the snapshot."""
    conf = OUT_DIR / "gunicorn.conf.py"
    conf.write_text(
        f"import sys\nsys.path.insert(0, {str(CODE_DIR)!r})\n" + (CODE_DIR / "gunicorn.conf.py").read_text()
    )
    return conf


def start_host(host: Host, plan: Plan, env: dict[str, str]) -> None:
    """Gunicorn in the host's namespace (`ip netns exec` execs it: the pid is the master's), as
    tests/support/procs.start_gunicorn starts one, but bound to the host's address."""
    from tests.support import procs

    host.incarnation += 1
    log_path = OUT_DIR / f"host{host.n}-{host.incarnation}.log"
    host.logs.append(log_path)
    full_env = {
        **os.environ,
        **env,
        "GUNICORN_BIND": f"{host.addr}:{APP_PORT}",
        "WEB_CONCURRENCY": str(plan.workers),
        "GUNICORN_WORKER_CLASS": "sync",
        "GUNICORN_CONTROL_SOCKET_DISABLE": "1",
        "GUNICORN_MAX_REQUESTS": "0",  # no recycling: only the bench's restarts happen
        "PYTHONUNBUFFERED": "1",
        "PYTHONSAFEPATH": "1",
        "PYTHONPATH": str(CODE_DIR),
    }
    command = [IP, "netns", "exec", host.netns, sys.executable, "-m", "gunicorn", "-c", str(gunicorn_conf())]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [*command, "tests.project.wsgi:application"],
            cwd=CODE_DIR,
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    host.server = procs.Server(proc=proc, socket_path="", log_path=log_path, expected_workers=plan.workers)


def http_status(addr: str, port: int, target: str, timeout: float = 2.0) -> int:
    conn = http.client.HTTPConnection(addr, port, timeout=timeout)
    try:
        conn.request("GET", target, headers={"Connection": "close"})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def answers(addr: str, port: int) -> bool:
    try:
        return http_status(addr, port, "/ping") == 200
    except OSError:
        return False


def wait_host_ready(host: Host, old_workers: frozenset[int] = frozenset(), timeout: float = 40.0) -> None:
    """Until every worker is up (none of `old_workers` left: a HUP replaces them all) and /ping answers."""
    server = host.server
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"host{host.n}: gunicorn exited with {server.proc.returncode}")
        workers = set(server.workers())
        if len(workers) == server.expected_workers and not workers & old_workers and answers(host.addr, APP_PORT):
            return
        time.sleep(0.05)
    raise RuntimeError(f"host{host.n}: not ready after {timeout} s")


def hup_host(host: Host) -> None:
    """Gunicorn's graceful reload: new workers first, then the old ones finish their requests and go."""
    old = frozenset(host.server.workers())
    os.kill(host.server.pid, signal.SIGHUP)
    wait_host_ready(host, old)


def stop_host(host: Host) -> None:
    if host.server is not None:
        host.server.stop(signal.SIGTERM, timeout=35.0)  # graceful; SIGKILL to the group after that


# =========================================================================== nginx in front


def nginx_conf(prefix: Path, port: int, hosts: Sequence[Host]) -> str:
    # max_fails=1 fail_timeout=1s: a refused host is skipped for a second, then tried again with a live
    # request (routed on if it fails again). GET is idempotent to nginx: it is passed on after an error
    # even when the request was sent already; `timeout` covers connect only in practice (read timeout 30 s).
    servers = "\n".join(f"    server {h.addr}:{APP_PORT} max_fails=1 fail_timeout=1s;" for h in hosts)
    temp = "\n".join(
        f"  {kind}_temp_path {prefix}/tmp/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""daemon off;
master_process on;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
  log_format fleet '$msec $status "$request_uri" up="$upstream_addr" st="$upstream_status" t=$request_time';
  access_log {prefix}/access.log fleet;
{temp}
  upstream fleet {{
{servers}
  }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://fleet;
      proxy_http_version 1.0;
      proxy_next_upstream error timeout;
      proxy_next_upstream_tries {len(hosts)};
      proxy_next_upstream_timeout 10s;
      proxy_connect_timeout 1s;
      proxy_read_timeout 30s;
    }}
  }}
}}
"""


def start_nginx(port: int, hosts: Sequence[Host]) -> subprocess.Popen[bytes]:
    prefix = OUT_DIR / "nginx"
    (prefix / "tmp").mkdir(parents=True, exist_ok=True)
    (prefix / "nginx.conf").write_text(nginx_conf(prefix, port, hosts))
    with open(prefix / "stderr.log", "wb") as log:
        proc = subprocess.Popen(
            [NGINX, "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(prefix / "nginx.conf")],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 15.0
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"nginx exited with {proc.returncode}:\n{nginx_logs()}")
        if answers("127.0.0.1", port):
            return proc
        time.sleep(0.05)
    raise RuntimeError(f"nginx does not answer on 127.0.0.1:{port}:\n{nginx_logs()}")


def stop_process(proc: subprocess.Popen[bytes] | None, sig: int, timeout: float = 15.0) -> None:
    """`sig` to the pid, then SIGKILL to its process group if it is still there after `timeout`."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(5)


def nginx_logs() -> str:
    prefix = OUT_DIR / "nginx"
    return "".join(p.read_text(errors="replace") for p in (prefix / "stderr.log", prefix / "error.log") if p.exists())


def nginx_retries() -> list[dict[str, Any]]:
    """Requests nginx passed to more than one upstream, from its access log."""
    found: list[dict[str, Any]] = []
    log = OUT_DIR / "nginx" / "access.log"
    for line in log.read_text(errors="replace").splitlines() if log.exists() else []:
        match = re.match(r'(\S+) (\d+) "(\S+)" up="([^"]*)" st="([^"]*)"', line)
        if match and "," in match.group(4):
            found.append({"at": float(match.group(1)), "status": int(match.group(2)), "uri": match.group(3),
                          "upstreams": match.group(4), "statuses": match.group(5)})  # fmt: skip
    return found


# =========================================================================== the load client


@dataclasses.dataclass
class FleetCounts:
    """One client thread's requests, each with its times (monotonic, machine-wide) and outcome."""

    requests: int = 0
    in_window: int = 0
    ok: int = 0
    wrong: int = 0
    http_errors: int = 0
    failures: int = 0
    client_cpu_s: float = 0.0
    events: list[tuple[float, float, str, str, str]] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    def add(self, other: FleetCounts) -> None:
        for name in ("requests", "in_window", "ok", "wrong", "http_errors", "failures", "client_cpu_s"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.events += other.events
        self.notes += other.notes

    def note(self, message: str) -> None:
        self.notes.append(message)


def error_kind(status: int, body: bytes) -> str:
    """What an error answer says, with numbers and addresses blurred so that kinds can be counted.

    Django's debug 500 in text/plain starts with the exception's type, then its message."""
    text = body.decode(errors="replace")
    title = re.search(r"<title>(.*?)</title>", text)
    lines = [title.group(1)] if title else text.splitlines()[:2]
    return re.sub(r"\d+", "N", f"{status} " + ": ".join(line.strip()[:160] for line in lines))


def one_request(host: str, port: int, marker: str) -> tuple[str, str]:
    conn = http.client.HTTPConnection(host, port, timeout=20.0)
    try:
        conn.request("GET", f"/echo?m={marker}", headers={"Connection": "close", "Accept": "text/plain"})
        response = conn.getresponse()
        status, body = response.status, response.read()
    except Exception as exc:
        return "failure", re.sub(r"\d+", "N", f"{type(exc).__name__}: {exc}")
    finally:
        conn.close()
    if status != 200:
        return "http", error_kind(status, body)
    try:
        echoed = json.loads(body)["m"]
    except (ValueError, KeyError, TypeError):
        return "wrong", f"unreadable answer {body[:120]!r}"
    return ("ok", "") if echoed == marker else ("wrong", f"sent {marker}, got {echoed}")


def load_thread(target: str, prefix: str, start_at: float, end_at: float, limit: int, out: FleetCounts) -> None:
    """One client: request after request until the bench says stop (or end_at, the hard bound)."""
    host, port = target.rsplit(":", 1)
    time.sleep(max(0.0, start_at - time.monotonic()))
    for i in range(limit):
        if time.monotonic() >= end_at or _STOP.is_set():
            break
        marker = f"{prefix}-{i}"
        began = time.monotonic()
        kind, detail = one_request(host, int(port), marker)
        out.events.append((began, time.monotonic(), kind, marker, detail))
        out.requests += 1
        if kind == "ok":
            out.ok += 1
            out.in_window += 1
        elif kind == "wrong":
            out.wrong += 1
        elif kind == "http":
            out.http_errors += 1
        else:
            out.failures += 1


def run_load(args: tuple[str, int, float, float, int]) -> FleetCounts:
    return run_client_threads(load_thread, FleetCounts, args)


# =========================================================================== samplers


class BouncerSampler:
    """PgBouncer's admin console (SHOW POOLS, SHOW CLIENTS) sampled in a thread; reconnects across restarts."""

    def __init__(self, port: int, database: str, interval: float, max_seconds: float) -> None:
        self.port, self.database, self.interval, self.max_seconds = port, database, interval, max_seconds
        self.series: list[tuple[float, int, int, int, float]] = []  # t, clients, cl_waiting, servers, maxwait
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def connect(self) -> Any:
        import psycopg

        # The admin console speaks the simple query protocol only: a ClientCursor.
        return psycopg.connect(host="127.0.0.1", port=self.port, dbname="pgbouncer", user="postgres",
                               autocommit=True, connect_timeout=2, cursor_factory=psycopg.ClientCursor)  # fmt: skip

    def show(self, conn: Any, what: str) -> list[dict[str, Any]]:
        cur = conn.execute(f"SHOW {what}")
        names = [d.name for d in cur.description]
        return [
            dict(zip(names, row, strict=True))
            for row in cur.fetchall()
            if row[names.index("database")] == self.database
        ]

    def sample(self, conn: Any) -> tuple[float, int, int, int, float]:
        pools = self.show(conn, "POOLS")
        clients = len(self.show(conn, "CLIENTS"))
        servers = sum(int(p[k]) for p in pools for k in ("sv_active", "sv_idle", "sv_used", "sv_tested", "sv_login"))
        waiting = sum(int(p["cl_waiting"]) for p in pools)
        maxwait = max((int(p["maxwait"]) + int(p.get("maxwait_us", 0)) / 1e6 for p in pools), default=0.0)
        return time.monotonic(), clients, waiting, servers, maxwait

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        conn: Any = None
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                conn = conn or self.connect()
                self.series.append(self.sample(conn))
            except Exception as exc:  # PgBouncer restarting: count it, reconnect next time
                self.errors.append(f"{type(exc).__name__}: {exc}")
                if conn is not None:
                    conn.close()
                conn = None
            self._stop.wait(self.interval)
        if conn is not None:
            conn.close()

    def clients_now(self) -> int:
        with self.connect() as conn:
            return len(self.show(conn, "CLIENTS"))

    def __enter__(self) -> BouncerSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


# =========================================================================== the sequence


@dataclasses.dataclass
class Timeline:
    """Phases and their steps, in monotonic time (the load processes use the same clock)."""

    phases: list[tuple[str, float]] = dataclasses.field(default_factory=list)
    steps: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def phase(self, name: str) -> None:
        print(f"== {name}", flush=True)
        self.phases.append((name, time.monotonic()))

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        began = time.monotonic()
        yield
        self.steps.append(
            {"phase": self.phases[-1][0], "step": name, "start": began, "seconds": time.monotonic() - began}
        )
        print(f"   {name}: {time.monotonic() - began:.2f} s", flush=True)

    def phase_of(self, t: float) -> str:
        name = "before"
        for phase, began in self.phases:
            if t >= began:
                name = phase
        return name


def roll(
    plan: Plan, hosts: list[Host], bouncer: Any, env_of: dict[int, dict[str, str]], timeline: Timeline
) -> dict[str, float]:
    """The restarts, one after another, with the load running. Returns PgBouncer's down window."""
    time.sleep(plan.baseline_s)  # the "baseline" phase began with the load
    timeline.phase("rolling HUP")
    for host in hosts:
        with timeline.step(f"HUP host{host.n}"):
            hup_host(host)
        time.sleep(plan.settle_s)
    timeline.phase("rolling stop/start")
    for host in hosts:
        with timeline.step(f"stop host{host.n}"):
            stop_host(host)
        with timeline.step(f"start host{host.n}"):
            start_host(host, plan, env_of[host.n])
            wait_host_ready(host)
        time.sleep(plan.settle_s)
    timeline.phase("PgBouncer RELOAD")
    with timeline.step("SIGHUP"):
        bouncer.reload()
    time.sleep(plan.bouncer_settle_s)
    timeline.phase("PgBouncer restart")
    down_at = time.monotonic()
    with timeline.step("stop (SIGINT, safe shutdown)"):
        bouncer.stop()
    stopped_at = time.monotonic()
    with timeline.step("start"):
        bouncer.start()
    up_at = time.monotonic()
    time.sleep(plan.bouncer_settle_s)
    timeline.phase("after")
    time.sleep(plan.baseline_s)
    return {
        "stop_seconds": stopped_at - down_at,
        "down_seconds": up_at - stopped_at,
        "down_at": down_at,
        "up_at": up_at,
    }


def empty_phase() -> dict[str, Any]:
    return {
        "seconds": 0.0,
        "requests": 0,
        "ok": 0,
        "wrong": 0,
        "http": 0,
        "failure": 0,
        "kinds": {},
        "first_error": None,
    }


def by_phase(events: list[tuple[float, float, str, str, str]], timeline: Timeline) -> dict[str, dict[str, Any]]:
    """Requests by the phase they ended in (a request cut short by a restart ends after it began), with
    counts, error kinds, and the window from the first error's start to the last error's end."""
    phases = {name: empty_phase() for name, _ in timeline.phases}
    for began, ended, kind, _marker, detail in sorted(events):
        row = phases.setdefault(timeline.phase_of(ended), empty_phase())
        row["requests"] += 1
        row[kind] += 1
        if kind != "ok":
            row["kinds"][f"{kind}: {detail}"] = row["kinds"].get(f"{kind}: {detail}", 0) + 1
            row["first_error"] = began if row["first_error"] is None else row["first_error"]
            row["error_window_s"] = ended - row["first_error"]
    for name, began in timeline.phases:
        later = [t for _, t in timeline.phases if t > began]
        phases[name]["seconds"] = (min(later) if later else max((e[1] for e in events), default=began)) - began
    return phases


def bouncer_by_phase(series: list[tuple[float, int, int, int, float]], timeline: Timeline) -> dict[str, list[int]]:
    """{phase: [client connections min, median, max, server connections max]} from the admin console's samples."""
    found: dict[str, list[tuple[int, int]]] = {}
    for t, clients, _waiting, servers, _maxwait in series:
        found.setdefault(timeline.phase_of(t), []).append((clients, servers))
    return {
        name: [min(c for c, _ in v), sorted(c for c, _ in v)[len(v) // 2], max(c for c, _ in v), max(s for _, s in v)]
        for name, v in found.items()
    }


def check_rows(database: str, events: list[tuple[float, float, str, str, str]]) -> dict[str, int]:
    """Each answered marker's row is there once: none lost, none written twice (a retry that ran again)."""
    from tests.support import dbserver

    rows = dbserver.query("postgres", "SELECT marker, count(*) FROM sh_hit GROUP BY marker", database=database)
    counts = {str(m): int(c) for m, c in rows}
    ok = [e[3] for e in events if e[2] == "ok"]
    failed = [e[3] for e in events if e[2] != "ok"]
    return {
        "rows": sum(counts.values()),
        "ok_markers_missing": sum(1 for m in ok if m not in counts),
        "markers_written_twice": sum(1 for c in counts.values() if c > 1),
        "failed_requests_whose_row_exists": sum(1 for m in failed if m in counts),
    }


def fleet_run(plan: Plan, database: str, hosts: list[Host], bouncer: Any, pool: Any) -> dict[str, Any]:
    """Hosts and nginx up, the load on, the roll, then everything down in order and counted."""
    from bench.gunicorn_bench import _project_env
    from tests.support import dbserver, procs

    global _nginx
    schema(_project_env(dbserver.django_url("postgres", database)), CODE_DIR)
    env_of = {
        h.n: _project_env(
            f"postgres://postgres@{h.root_addr}:{bouncer.port}/{database}?pgbouncer=1",
            CONN_MAX_AGE="600",
            DJANGO_DEBUG="1",  # a 500 then names its exception (text/plain), so errors can be told apart
        )
        for h in hosts
    }
    for host in hosts:
        start_host(host, plan, env_of[host.n])
    for host in hosts:
        wait_host_ready(host)
    nginx_port = procs.free_port()
    _nginx = start_nginx(nginx_port, hosts)
    timeline = Timeline()
    expected_clients = plan.hosts * plan.workers
    with (
        dbserver.SessionSampler("postgres", database, interval=0.1, max_seconds=plan.budget_s) as sessions,
        BouncerSampler(bouncer.port, database, interval=0.2, max_seconds=plan.budget_s) as admin,
    ):
        timeline.phase("baseline")
        start_at = time.monotonic()
        args = (f"127.0.0.1:{nginx_port}", plan.clients.threads, start_at, start_at + plan.budget_s, LIMIT)
        loads = [pool.apply_async(run_load, (args,)) for _ in range(plan.clients.procs)]
        try:
            bouncer_window = roll(plan, hosts, bouncer, env_of, timeline)
        finally:
            _STOP.set()
        counts = FleetCounts()
        for load in loads:
            counts.add(load.get(60.0))
    # Hosts first (their workers close their PgBouncer connections at exit), then count what is left.
    for host in hosts:
        stop_host(host)
    clients_left = admin.clients_now()
    stop_process(_nginx, signal.SIGQUIT)
    bouncer.stop()
    left = dbserver.wait_sessions_at_most("postgres", database, 0, timeout=10.0)
    servers = [s[3] for s in admin.series]
    clients = [s[1] for s in admin.series]
    return {
        "timeline": {"phases": timeline.phases, "steps": timeline.steps},
        "phases": by_phase(counts.events, timeline),
        "totals": {k: getattr(counts, k) for k in ("requests", "ok", "wrong", "http_errors", "failures")},
        "client_cpu_s": counts.client_cpu_s,
        "client_notes": counts.notes[:20],
        "bouncer_window": bouncer_window,
        "rows": check_rows(database, counts.events),
        "nginx_retries": nginx_retries(),
        "pg_sessions_peak": sessions.peak,
        "pg_sessions_samples": sessions.samples,
        "pg_sampler_refused": len(sessions.refused),
        "pg_sampler_refusals": sorted(set(sessions.refused))[:5],
        "bouncer_servers_peak": max(servers, default=0),
        "bouncer_clients_peak": max(clients, default=0),
        "bouncer_clients_median": sorted(clients)[len(clients) // 2] if clients else 0,
        "bouncer_waiting_peak": max((s[2] for s in admin.series), default=0),
        "bouncer_maxwait_peak_s": max((s[4] for s in admin.series), default=0.0),
        "bouncer_samples": len(admin.series),
        "bouncer_by_phase": bouncer_by_phase(admin.series, timeline),
        "bouncer_series": admin.series,
        "bouncer_sampler_errors": len(admin.errors),
        "expected_clients": expected_clients,
        "clients_left_on_bouncer": clients_left,
        "pg_sessions_left": len(left),
    }


_nginx: subprocess.Popen[bytes] | None = None


# =========================================================================== report


def verdicts(plan: Plan, r: dict[str, Any]) -> dict[str, bool]:
    rolling = [r["phases"][p] for p in ROLLING]
    return {
        "rolling restarts: 0 failed, 0 wrong": all(p["requests"] == p["ok"] for p in rolling),
        "no wrong answer anywhere": all(p["wrong"] == 0 for p in r["phases"].values()),
        f"server sessions never above default_pool_size ({plan.pool_size})": r["pg_sessions_peak"] <= plan.pool_size,
        "0 sessions left on PostgreSQL": r["pg_sessions_left"] == 0,
        "0 client connections left on PgBouncer after the hosts stopped": r["clients_left_on_bouncer"] == 0,
        "no answered request lost its row": r["rows"]["ok_markers_missing"] == 0,
    }


def render(plan: Plan, env: dict[str, str], r: dict[str, Any], took: float) -> str:
    lines = report_head("A fleet that rolls: Gunicorn hosts behind nginx, PgBouncer, PostgreSQL", "bench.fleet_roll",
                        plan.mode, took, env)  # fmt: skip
    lines += [f"| {k} | {v} |" for k, v in env.items() if k != "date"]
    lines += [
        "",
        f"{plan.hosts} hosts (network namespaces, veth pairs) x {plan.workers} Gunicorn sync workers, "
        f"CONN_MAX_AGE=600, the shipped gunicorn.conf.py; one PgBouncer (transaction mode, "
        f"default_pool_size={plan.pool_size}, reserve_pool_size=0); nginx with `proxy_next_upstream error timeout`; "
        f"{plan.clients.concurrency} client "
        f"threads ({plan.clients.procs} processes) sending GET /echo?m=<marker>, a fresh connection each.",
        "",
        "## Requests, by the phase they ended in",
        "",
        "| phase | seconds | requests | ok | wrong | HTTP errors | failures | error window (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in r["phases"].items():
        window = f"{row['error_window_s']:.2f}" if "error_window_s" in row else "-"
        lines.append(f"| {name} | {row['seconds']:.1f} | {row['requests']} | {row['ok']} | {row['wrong']} | "
                     f"{row['http']} | {row['failure']} | {window} |")  # fmt: skip
    lines += ["", "Errors by kind (numbers blurred to N):", ""]
    kinds = [(name, kind, n) for name, row in r["phases"].items() for kind, n in sorted(row["kinds"].items())]
    lines += [f"- {name}: {n} x `{kind}`" for name, kind, n in kinds] or ["- none"]
    w = r["bouncer_window"]
    retries = r["nginx_retries"]
    tally: dict[str, int] = {}
    for retry in retries:
        tally[retry["statuses"]] = tally.get(retry["statuses"], 0) + 1
    statuses = "; ".join(f"{n} x `{st}`" for st, n in sorted(tally.items()))
    lines += [
        "",
        "## Restarts",
        "",
        "| step | seconds |",
        "|---|---|",
        *(f"| {s['phase']}: {s['step']} | {s['seconds']:.2f} |" for s in r["timeline"]["steps"]),
        "",
        f"PgBouncer was down (not listening) for {w['down_seconds']:.2f} s after a safe shutdown of "
        f"{w['stop_seconds']:.2f} s. nginx passed {len(retries)} requests on to another host after an upstream "
        f"error (upstream statuses: {statuses or 'none'}); rows in sh_hit: "
        f"{r['rows']['rows']}, answered markers missing {r['rows']['ok_markers_missing']}, markers written twice "
        f"{r['rows']['markers_written_twice']}, failed requests whose row exists "
        f"{r['rows']['failed_requests_whose_row_exists']}.",
        "",
        "## Sessions and connections",
        "",
        "| | |",
        "|---|---|",
        f"| PostgreSQL sessions of the bench's database, peak (sampled every 0.1 s, {r['pg_sessions_samples']} "
        f"samples) | {r['pg_sessions_peak']} (default_pool_size {plan.pool_size}) |",
        f"| PgBouncer server connections, peak (SHOW POOLS, {r['bouncer_samples']} samples) | "
        f"{r['bouncer_servers_peak']} |",
        f"| PgBouncer client connections, median / peak (SHOW CLIENTS) | {r['bouncer_clients_median']} / "
        f"{r['bouncer_clients_peak']} |",
        f"| sizing rule: hosts x workers x 1 (sync: one connection per worker) | {r['expected_clients']} "
        f"({plan.hosts} x {plan.workers} x 1) |",
        f"| clients waiting for a server connection, peak; longest wait (s) | {r['bouncer_waiting_peak']}; "
        f"{r['bouncer_maxwait_peak_s']:.3f} |",
        f"| PgBouncer client connections left after the hosts stopped | {r['clients_left_on_bouncer']} |",
        f"| PostgreSQL sessions left after the hosts, then PgBouncer, stopped | {r['pg_sessions_left']} |",
        "",
        "PgBouncer's connections by phase (admin console, sampled every 0.2 s):",
        "",
        "| phase | client connections min / median / max | server connections max |",
        "|---|---|---|",
        *(f"| {name} | {c0} / {c1} / {c2} | {sv} |" for name, (c0, c1, c2, sv) in r["bouncer_by_phase"].items()),
        "",
        "## Verdicts",
        "",
        *(f"- {name}: {yes(met)}" for name, met in verdicts(plan, r).items()),
        "",
        f"Client CPU {r['client_cpu_s']:.1f} s; admin console samples that failed (PgBouncer restarting) "
        f"{r['bouncer_sampler_errors']}; session samples refused {r['pg_sampler_refused']}.",
        "",
    ]
    return "\n".join(lines)


# =========================================================================== main


def print_logs(hosts: Sequence[Host], bouncer: Any) -> None:
    for host in hosts:
        for path in host.logs:
            text = path.read_text(errors="replace") if path.exists() else ""
            print(f"--- {path.name} ---\n{text[-4000:]}", file=sys.stderr)
    print(f"--- nginx ---\n{nginx_logs()[-4000:]}", file=sys.stderr)
    if bouncer is not None:
        print(f"--- pgbouncer ---\n{bouncer.logs()[-4000:]}", file=sys.stderr)


def tool_version(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=10)
    return (done.stdout + done.stderr).strip().splitlines()[0] if (done.stdout + done.stderr).strip() else "?"


def _terminate(signum: int, frame: types.FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # so that every finally block runs


def main(argv: Sequence[str] | None = None) -> int:
    global _STOP
    args = bench_arguments("A rolling restart of a Gunicorn fleet under load; writes bench/FLEET_RESULTS.md.",
                           RESULTS_PATH, argv)  # fmt: skip
    plan = QUICK if args.quick else FULL
    problem = preflight()
    if problem:
        print(f"fleet_roll: {problem}", file=sys.stderr)
        return 2
    from tests.support import dbserver, pgbouncer

    shutil.rmtree(OUT_DIR, ignore_errors=True)
    OUT_DIR.mkdir(parents=True)
    started = time.monotonic()
    env = {**environment(), **snapshot_code(CODE_DIR, COMMITTED)}
    env["pgbouncer"] = tool_version([pgbouncer.BINARY, "--version"])
    env["nginx"] = tool_version([NGINX, "-v"])
    env["worker class"] = "sync"
    # The PostgreSQL server is shared: how full it was says whether PgBouncer could get its sessions back.
    in_use = dbserver.query("postgres", "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'")
    env["postgres sessions in use / max_connections at start"] = (
        f"{in_use[0][0]} / {dbserver.query('postgres', 'SHOW max_connections')[0][0]}"
    )
    context = multiprocessing.get_context("fork")
    _STOP = context.Event()
    hosts = [Host(n) for n in range(1, plan.hosts + 1)]
    database = dbserver.create_database("postgres")
    bouncer: Any = None
    ok = False
    try:
        # The load processes are forked first, before any thread or server exists.
        with context.Pool(plan.clients.procs) as pool:
            signal.signal(signal.SIGTERM, _terminate)  # here: the pool's workers keep the default (terminate())
            for host in hosts:
                make_network(host)
            listen = ",".join(["127.0.0.1", *(h.root_addr for h in hosts)])
            settings = {"default_pool_size": str(plan.pool_size), "reserve_pool_size": "0", "admin_users": "postgres"}
            with pgbouncer.running([database], listen_addr=listen, settings=settings) as bouncer:
                try:
                    results = fleet_run(plan, database, hosts, bouncer, pool)
                    ok = all(verdicts(plan, results).values())
                finally:
                    if not ok:
                        print_logs(hosts, bouncer)
                    for host in hosts:
                        stop_host(host)
                    stop_process(_nginx, signal.SIGQUIT)
    finally:
        for host in hosts:
            stop_host(host)
        stop_process(_nginx, signal.SIGQUIT)
        for host in hosts:
            remove_network(host)
        drop_quietly("postgres", database)
    took = time.monotonic() - started
    raw = {"plan": dataclasses.asdict(plan), "results": results}
    write_report(OUT_DIR, raw, render(plan, env, results, took), args.results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
