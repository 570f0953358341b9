"""The pools under overload (issue 22): a real load client (wrk, keep-alive) against one Gunicorn worker.

One arm is a Gunicorn master with `-w 1` (gevent or asgi worker), a small pool, and a page that holds
its session for a known time (tests/project/overload_views.py). wrk keeps `clients` connections busy,
each sending its next request as soon as the last one is answered, which is how browsers and proxies
reuse connections, and what lets a client that just freed a slot take it back at once.

Little's law ties the figures together: with `clients` requests always in the system and `rate`
answered per second, a request spends clients / rate seconds in it on average (the *mean* below).
A first-come-first-served queue gives every request about that; a queue that lets newcomers overtake
gives some much less and others much more (the worst, wrk's max, far above the mean), up to
POOL_TIMEOUT, when they fail with PoolTimeout
(the overload pages answer it with 503, to tell it from other failures).

Modes:
- fix: serverhooks as it is (the shipped gunicorn.conf.py);
- control: the same, with tests.support.slots_control imported by the conf and
  SERVERHOOKS_TEST_SLOTS_CONTROL=1: the pool's permits are the semaphore of before issue 22;
- peer: plain Django (the conf without serverhooks' line) with Django's psycopg pool, max_size =
  POOL_SIZE (bench/settings_peers.py), PostgreSQL only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.support import dbserver, http, procs

WRK = shutil.which("wrk") or "/usr/bin/wrk"
HOOKS_IMPORT = re.compile(r"^from serverhooks\.gunicorn import \*.*$", re.MULTILINE)
FIX, CONTROL, PEER = "fix", "control", "peer"
PAGES = {"sleep": "/overload/sleep?s={seconds:g}", "render": "/overload/render?ms={ms:g}"}

# wrk's per-thread Lua states count statuses; done() sums them through setup()'s thread handles and
# prints one JSON line (latencies in microseconds, as wrk keeps them).
WRK_SCRIPT = r"""
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) s2xx = 0; s4xx = 0; s503 = 0; s5xx = 0; sother = 0 end
function response(status, headers, body)
  if status >= 200 and status < 300 then s2xx = s2xx + 1
  elseif status == 503 then s503 = s503 + 1
  elseif status >= 500 then s5xx = s5xx + 1
  elseif status >= 400 then s4xx = s4xx + 1
  else sother = sother + 1 end
end
function done(summary, latency, requests)
  local c = {s2xx = 0, s4xx = 0, s503 = 0, s5xx = 0, sother = 0}
  for _, t in ipairs(threads) do
    for k, _ in pairs(c) do c[k] = c[k] + (t:get(k) or 0) end
  end
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "mean_us": %.1f, "p50_us": %d, "p90_us": %d, ' ..
    '"p99_us": %d, "max_us": %d, "connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d, ' ..
    '"s2xx": %d, "s4xx": %d, "s503": %d, "s5xx": %d, "sother": %d}\n',
    summary.requests, summary.duration, latency.mean, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, e.connect, e.read, e.write, e.status, e.timeout,
    c.s2xx, c.s4xx, c.s503, c.s5xx, c.sother))
end
"""


@dataclasses.dataclass(frozen=True)
class Load:
    """What an arm offers: `clients` keep-alive connections for `seconds`, after a warm-up."""

    clients: int = 40
    seconds: float = 6.0
    warmup_seconds: float = 2.0
    pool_size: int = 2
    pool_timeout: float = 5.0
    sleep_ms: float = 50.0  # the sleep page's SQL sleep (the 50 ms)
    render_ms: float = 20.0  # the render page's CPU work between its two queries
    wrk_timeout: float = 30.0  # far above POOL_TIMEOUT: wrk never cuts a request the pool would still answer

    def path(self, page: str) -> str:
        return PAGES[page].format(seconds=self.sleep_ms / 1000.0, ms=self.render_ms)


@dataclasses.dataclass(frozen=True)
class Arm:
    worker: str  # gevent or asgi
    family: str  # mysql or postgres
    page: str  # sleep or render
    mode: str  # fix, control or peer

    @property
    def name(self) -> str:
        return f"{self.mode}-{self.worker}-{self.family}-{self.page}"

    @property
    def driver(self) -> str:
        # mysqlclient blocks gevent's hub on every query (serverhooks warns, W002): PyMySQL there.
        return "pymysql" if self.family == "mysql" and self.worker == "gevent" else ""


@dataclasses.dataclass
class WrkRun:
    requests: int
    seconds: float
    rate: float  # requests answered per second (any status)
    mean_s: float  # wrk's own mean latency
    p50_s: float
    p90_s: float
    p99_s: float
    max_s: float
    non_2xx: int
    pool_timeouts: int  # 503: the overload pages answer a pool timeout so (tests/project/overload_views.py)
    socket_errors: int  # connect, read, write and timeout errors
    timeouts: int
    clients: int  # connections wrk kept busy

    @property
    def little_mean_s(self) -> float:
        """Little's law: the mean time a request spends in the system, from the offered concurrency."""
        return float("inf") if self.rate <= 0 else self.clients / self.rate

    @property
    def worst_over_mean(self) -> float:
        return self.max_s / self.little_mean_s


@dataclasses.dataclass
class ArmResult:
    arm: Arm
    load: Load
    run: WrkRun
    pool: dict[str, float]  # serverhooks' pool counters of the worker, measured run only
    sessions_at_end: int  # on the database server, the arm's server still up
    log_path: str
    log_tail: str
    seconds: float  # wall time of the whole arm

    def row(self) -> dict[str, Any]:
        r = self.run
        return {
            "arm": self.arm.name,
            "rate": round(r.rate, 2),
            "little_mean_s": round(r.little_mean_s, 3),
            "p50_s": round(r.p50_s, 3),
            "p90_s": round(r.p90_s, 3),
            "p99_s": round(r.p99_s, 3),
            "max_s": round(r.max_s, 3),
            "worst_over_mean": round(r.worst_over_mean, 2),
            "non_2xx": r.non_2xx,
            "pool_timeouts": r.pool_timeouts,
            "socket_errors": r.socket_errors,
            "pool_waits": self.pool.get("pool_waits", 0),
            "pool_wait_seconds": round(self.pool.get("pool_wait_seconds", 0.0), 2),
            "sessions_at_end": self.sessions_at_end,
        }


def wrk_available() -> bool:
    return os.access(WRK, os.X_OK)


def run_wrk(url: str, clients: int, seconds: float, timeout: float, script_dir: Path) -> WrkRun:
    """One wrk run (one thread: the load is a few hundred requests a second at most, and the machine's
    other core belongs to the server); its figures from the Lua script's JSON line."""
    script_dir.mkdir(parents=True, exist_ok=True)
    script = script_dir / "overload.lua"
    script.write_text(WRK_SCRIPT)
    command = [WRK, "-t1", f"-c{clients}", f"-d{max(1, round(seconds))}s", f"--timeout={timeout:g}s"]
    command += ["-s", str(script), url]
    out = subprocess.run(command, capture_output=True, text=True, timeout=seconds + timeout + 30)
    line = next((x for x in out.stdout.splitlines() if x.startswith("WRK_JSON ")), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    data = json.loads(line.removeprefix("WRK_JSON "))
    duration = data["duration_us"] / 1e6
    return WrkRun(
        requests=data["requests"],
        seconds=duration,
        rate=data["requests"] / duration if duration > 0 else 0.0,
        mean_s=data["mean_us"] / 1e6,
        p50_s=data["p50_us"] / 1e6,
        p90_s=data["p90_us"] / 1e6,
        p99_s=data["p99_us"] / 1e6,
        max_s=data["max_us"] / 1e6,
        non_2xx=data["s4xx"] + data["s503"] + data["s5xx"] + data["sother"],
        pool_timeouts=data["s503"],
        socket_errors=data["connect"] + data["read"] + data["write"] + data["timeout"],
        timeouts=data["timeout"],
        clients=clients,
    )


def conf_source(arm: Arm, socket_path: str, port: int, code_dir: Path | None = None) -> str:
    """A Gunicorn conf: the shipped one (without serverhooks' line for the peer), plus the control's
    import, one worker, a unix socket (for the test's own requests) and a TCP port (for wrk)."""
    root = code_dir or procs.REPO
    text = (root / "gunicorn.conf.py").read_text()
    if len(HOOKS_IMPORT.findall(text)) != 1:
        raise RuntimeError("gunicorn.conf.py: expected exactly one `from serverhooks.gunicorn import *` line")
    if arm.mode == PEER:
        text = HOOKS_IMPORT.sub("", text)
    head = f"import sys\nsys.path.insert(0, {str(root)!r})\n" if code_dir is not None else ""
    tail = [
        f"bind = ['unix:{socket_path}', '127.0.0.1:{port}']",
        "workers = 1",
        f"worker_class = {arm.worker!r}",
        "control_socket_disable = True",  # several masters may run at once (Gunicorn 25+)
        "max_requests = 0",  # a recycle in the middle would be a pause of its own
        "preload_app = False",
    ]
    if arm.mode == CONTROL:
        # Imported in the master: every worker forked from it inherits the semaphore (with the env var).
        tail.insert(0, "import tests.support.slots_control  # noqa: F401")
    return head + text + "\n" + "\n".join(tail) + "\n"


def arm_env(arm: Arm, database: str, load: Load, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {
        "DATABASE_URL": dbserver.django_url(arm.family, database, arm.driver, "pool=1" if arm.mode == PEER else ""),
        "DJANGO_SETTINGS_MODULE": "bench.settings_peers" if arm.mode == PEER else "tests.project.settings",
        "CONN_MAX_AGE": "600",
        "SERVERHOOKS_POOL_SIZE": str(load.pool_size),
        "SERVERHOOKS_POOL_TIMEOUT": f"{load.pool_timeout:g}",
        "SERVERHOOKS_TEST_SLOTS_CONTROL": "1" if arm.mode == CONTROL else "0",
        "GUNICORN_LOGLEVEL": "info",
        "PYTHONUNBUFFERED": "1",
    }
    if arm.mode == PEER:
        env.update(BENCH_PEER="djangopool", BENCH_PEER_POOL_SIZE=str(load.pool_size))
    env.update(extra or {})
    return env


def start(arm: Arm, tmp: Path, env: dict[str, str], code_dir: Path | None = None) -> tuple[procs.Server, int]:
    """A master with one worker, in its own process group; (server, TCP port)."""
    tmp.mkdir(parents=True, exist_ok=True)
    socket_path = str(tmp / "gunicorn.sock")
    log_path = tmp / "gunicorn.log"
    port = procs.free_port()
    conf = tmp / "gunicorn_overload.conf.py"
    conf.write_text(conf_source(arm, socket_path, port, code_dir))
    app = "tests.project.asgi:application" if arm.worker == "asgi" else "tests.project.wsgi:application"
    scrubbed = {k: v for k, v in os.environ.items() if not k.startswith(("GUNICORN_", "SERVERHOOKS_", "BENCH_PEER"))}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", str(conf), app],
            cwd=code_dir or procs.REPO,
            env={**scrubbed, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return procs.Server(proc=proc, socket_path=socket_path, log_path=log_path, expected_workers=1), port


POOL_KEYS = ("pool_opened", "pool_reused", "pool_waits", "pool_wait_seconds", "pool_discarded", "pool_reclaimed")


def pool_counters(server: procs.Server) -> dict[str, float]:
    """The worker's serverhooks counters (its /whoami), the pool's only."""
    data = http.get_json(server.socket_path, "/whoami", timeout=30)
    return {key: float(data["serverhooks"].get(key, 0)) for key in POOL_KEYS}


def run_arm(
    arm: Arm,
    database: str,
    load: Load,
    tmp: Path,
    servers: list[procs.Server] | None = None,
    code_dir: Path | None = None,
    extra_env: dict[str, str] | None = None,
) -> ArmResult:
    """Start the arm's master, warm it up, load it, read its counters and the server's sessions, stop it.

    The warm-up runs with as many connections as the pool has slots: it opens the pool's sessions
    and loads the code without leaving a queue behind that the measured run would inherit.
    """
    started = time.monotonic()
    server, port = start(arm, tmp, arm_env(arm, database, load, extra_env), code_dir)
    if servers is not None:
        servers.append(server)  # the caller prints its log on failure
    try:
        server.wait_ready(timeout=60)
        url = f"http://127.0.0.1:{port}{load.path(arm.page)}"
        run_wrk(url, load.pool_size, load.warmup_seconds, load.wrk_timeout, tmp)
        before = pool_counters(server)
        run = run_wrk(url, load.clients, load.seconds, load.wrk_timeout, tmp)
        # The requests wrk left in flight still finish (or time out) in the worker; this request
        # queues behind them, so the counters below include them: a handful of waits at most.
        after = pool_counters(server)
        sessions = len(dbserver.sessions(arm.family, database))
    finally:
        server.stop()
    pool = {key: after[key] - before[key] for key in POOL_KEYS}
    return ArmResult(
        arm=arm,
        load=load,
        run=run,
        pool=pool,
        sessions_at_end=sessions,
        log_path=str(server.log_path),
        log_tail=server.log()[-4000:],
        seconds=time.monotonic() - started,
    )
