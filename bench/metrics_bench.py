"""What serverhooks' Prometheus metrics cost: per request, and after many worker recycles.

    python -m bench.metrics_bench            # full run, about 6 minutes; writes bench/METRICS_RESULTS.md
    python -m bench.metrics_bench --quick    # smoke run, under a minute

1. Side by side, alternated A B within each round, fresh preloaded masters (`-w 2`,
   CONN_MAX_AGE=3600, /echo?m=<marker>) on MariaDB and PostgreSQL, under `-k sync` (metrics
   change nothing per request there) and `-k gevent` (the pool updates its gauges at each
   checkout and checkin):

       metrics off   PROMETHEUS_MULTIPROC_DIR unset: serverhooks does not import prometheus_client
       metrics on    PROMETHEUS_MULTIPROC_DIR set (a fresh, empty directory per master)

   Worker CPU per request (from /proc) is the figure the target is set on (at most 1 % above
   "off"), with its bootstrap 95 % interval; the request rate ratio is beside it, and the
   workers' resident memory after the load.
2. Recycles (MariaDB, `-k sync -w 2`, preload_app, max_requests=1, metrics on): the directory's
   files and size, the time to merge them as a scrape does (MultiProcessCollector and the text
   format, in this process), the live gauges left behind, and the memory of the master and
   its workers, before and after `plan.recycles` worker recycles.

The servers run a copy of the working tree taken at the start (bench/out/metrics/code), with
bytecode under bench/out/pycache, so that editing the checkout during a run mixes nothing.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.common import (
    BENCH_DIR,
    FAMILY_TITLE,
    REPO,
    Clients,
    bench_arguments,
    bootstrap,
    bytecode_env,
    drop_quietly,
    environment,
    http_get,
    median,
    report_head,
    schema,
    verdict,
    write_report,
    yes,
)
from bench.gunicorn_bench import LoadCounts, Window, _load, _project_env

if TYPE_CHECKING:
    from multiprocessing.pool import Pool

    from tests.support.procs import Server

OUT_DIR = BENCH_DIR / "out" / "metrics"
CODE_DIR = OUT_DIR / "code"
RESULTS_PATH = BENCH_DIR / "METRICS_RESULTS.md"
OFF, ON = "metrics off", "metrics on"
ARMS = (OFF, ON)
KINDS = ("sync", "gevent")
CPU_TARGET = 1.01  # worker CPU per request, on / off
ENV_VAR = "PROMETHEUS_MULTIPROC_DIR"
_CONF = f"import sys\nsys.path.insert(0, {str(CODE_DIR)!r})\nfrom serverhooks.gunicorn import *"


@dataclasses.dataclass(frozen=True)
class Plan:
    mode: str
    rounds: int  # fresh masters for both arms, per database and worker class
    rps_reps: int  # measured windows per arm within a round, alternated A B
    rps_seconds: float
    warmup_seconds: float
    recycles: int  # worker recycles in part 2
    recycle_seconds: float  # at most this long for them
    scrapes: int  # merges timed, before and after
    clients: Clients = dataclasses.field(default_factory=lambda: Clients(procs=2, threads=3))


QUICK = Plan("quick", rounds=1, rps_reps=1, rps_seconds=1.0, warmup_seconds=0.2, recycles=25,
             recycle_seconds=10.0, scrapes=5)  # fmt: skip
FULL = Plan("full", rounds=5, rps_reps=3, rps_seconds=2.0, warmup_seconds=0.5, recycles=1000,
            recycle_seconds=480.0, scrapes=30)  # fmt: skip


def snapshot_working_tree(code_dir: Path) -> dict[str, str]:
    """Copy serverhooks/, tests/ and bench/ as they are in the checkout (uncommitted work
    included: what is being measured), and precompile them."""
    shutil.rmtree(code_dir, ignore_errors=True)
    ignore = shutil.ignore_patterns("__pycache__", "out", "*.pyc")
    for part in ("serverhooks", "tests", "bench"):
        shutil.copytree(REPO / part, code_dir / part, ignore=ignore)
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(code_dir)],
        env={**os.environ, **bytecode_env()},
        check=True,
        timeout=120,
        stdout=subprocess.DEVNULL,
    )
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return {"code": "working tree", "commit": (head.stdout.strip() or "?") + " plus uncommitted changes"}


def rss_kib(pids: Sequence[int]) -> int:
    """Resident memory of `pids`, KiB, from /proc."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration, ValueError):
            pass
    return total


def _start(kind: str, arm: str, env: dict[str, str], out: Path, **settings: Any) -> Server:
    from tests.support import procs

    arm_env = dict(env)
    if arm == ON:
        metrics_dir = out / "prom"
        shutil.rmtree(metrics_dir, ignore_errors=True)
        metrics_dir.mkdir(parents=True)  # empty at each start, as the user's setup does
        arm_env[ENV_VAR] = str(metrics_dir)
    return procs.start_gunicorn(
        out,
        arm_env,
        settings={"_source": _CONF, "preload_app": True, "worker_class": kind, "loglevel": "warning", **settings},
        workers=2,
    )


# =========================================================================== part 1: side by side


def side_by_side(family: str, kind: str, plan: Plan, pool: Pool) -> dict[str, Any]:
    from tests.support import dbserver

    databases = {arm: dbserver.create_database(family) for arm in ARMS}
    windows: list[Window] = []
    memory: dict[str, list[int]] = {arm: [] for arm in ARMS}
    try:
        envs = {arm: _project_env(dbserver.django_url(family, databases[arm])) for arm in ARMS}
        for arm in ARMS:
            schema(envs[arm], CODE_DIR)
        for rnd in range(plan.rounds):
            servers: dict[str, Server] = {}
            try:
                for arm in ARMS:
                    servers[arm] = _start(kind, arm, envs[arm], OUT_DIR / f"{family}-{kind}-r{rnd}-{arm[8:]}")
                for arm in ARMS:
                    servers[arm].wait_ready(60.0)
                for arm in ARMS:
                    windows.append(_load(pool, servers[arm], plan.warmup_seconds, plan, arm, rnd, -1))  # type: ignore[arg-type]
                for rep in range(plan.rps_reps):
                    for arm in ARMS:
                        windows.append(_load(pool, servers[arm], plan.rps_seconds, plan, arm, rnd, rep))  # type: ignore[arg-type]
                for arm in ARMS:
                    memory[arm].append(rss_kib(servers[arm].workers()))
            finally:
                for server in servers.values():
                    server.stop()
            line = " ".join(f"{w.arm[8:]}={w.worker_cpu_us_per_request:.0f}us" for w in windows if w.rnd == rnd)
            print(f"  {family} {kind} round {rnd + 1}/{plan.rounds}: {line}", flush=True)
    finally:
        for name in databases.values():
            drop_quietly(family, name)
    measured = [w for w in windows if w.rep >= 0]
    cpu = {arm: [w.worker_cpu_us_per_request for w in measured if w.arm == arm] for arm in ARMS}
    rates = {arm: [w.rps for w in measured if w.arm == arm] for arm in ARMS}
    checked = LoadCounts()
    for w in windows:
        checked.add(w.counts)
    ratio = median(cpu[ON]) / median(cpu[OFF])
    return {
        "cpu_us": {arm: median(cpu[arm]) for arm in ARMS},
        "cpu_ratio": ratio,
        "cpu_ratio_ci": bootstrap(cpu[OFF], cpu[ON], lambda a, b: b / a),
        "rps": {arm: median(rates[arm]) for arm in ARMS},
        "rate_ratio": median(rates[ON]) / median(rates[OFF]),
        "rate_ratio_ci": bootstrap(rates[OFF], rates[ON], lambda a, b: b / a),
        "rss_kib": {arm: median(memory[arm]) for arm in ARMS},
        "target_met": ratio <= CPU_TARGET,
        "checked": dataclasses.asdict(checked),
        "windows": len(measured),
    }


# The pool's checkout and checkin (what a pooled request does once per alias), timed in a process
# of its own on SQLite, alternately with the meter and without it (metrics.meter is all the pool
# looks at): the metrics' own cost per pooled request, free of the end-to-end windows' noise.
_DIRECT = """
import dataclasses, json, os, time, django
django.setup()
from serverhooks import metrics
from serverhooks._process import Counters, state
from serverhooks.pool.core import Pool
from serverhooks.pool.threads import ThreadWaiter
assert metrics.enable_if_configured(worker=True)
meter = metrics.meter
# Off: no meter, and counters that mirror nothing (checkouts count pool_reused).
counters = {"on": state().counters, "off": Counters(**dataclasses.asdict(state().counters))}
pool = Pool("default", 10, 5.0, ThreadWaiter())
first = pool.checkout()
first.ensure_connection()  # a session, as after a request's first query: checkouts reuse it
pool.checkin(first)
best = {"off": [], "on": []}
for _ in range(40):
    for arm in ("off", "on"):
        metrics.meter = meter if arm == "on" else None
        state().counters = counters[arm]
        started = time.perf_counter()
        for _ in range(2000):
            pool.checkin(pool.checkout())
        best[arm].append((time.perf_counter() - started) / 2000 * 1e6)
print(json.dumps({arm: sorted(v)[len(v) // 2] for arm, v in best.items()}))
"""


def direct_cost(out: Path) -> dict[str, float]:
    """µs per pool checkout + checkin, metrics off and on (medians of 40 alternated runs)."""
    metrics_dir = out / "direct-prom"
    metrics_dir.mkdir(parents=True)
    env = {
        **os.environ,
        **_project_env(f"sqlite:///{out}/direct.sqlite3"),
        "PYTHONPATH": str(CODE_DIR),
        ENV_VAR: str(metrics_dir),
    }
    done = subprocess.run(
        [sys.executable, "-c", _DIRECT], env=env, cwd=CODE_DIR, capture_output=True, text=True, timeout=300
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    result: dict[str, float] = json.loads(done.stdout.splitlines()[-1])
    return result


# =========================================================================== part 2: recycles


def merge_seconds(metrics_dir: Path, times: int) -> tuple[float, dict[str, float]]:
    """Median seconds to merge the directory as serverhooks' /metrics does, and serverhooks' values in it.

    serverhooks' collector, not prometheus_client's: while workers are born every few ms, the
    latter now and then meets a file created but not yet sized and fails (client_python#1199)."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from serverhooks.metrics.collect import MultiProcessCollector

    took: list[float] = []
    text = b""
    for _ in range(times):
        started = time.perf_counter()
        registry = CollectorRegistry()
        MultiProcessCollector(registry, str(metrics_dir))  # type: ignore[no-untyped-call]
        text = generate_latest(registry)
        took.append(time.perf_counter() - started)
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            if sample.name.startswith("serverhooks_"):
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return median(took), values


def directory_state(metrics_dir: Path, server: Server, plan: Plan) -> dict[str, Any]:
    from serverhooks.metrics import files

    stats = []
    for name in os.listdir(metrics_dir):
        try:
            stats.append(os.stat(metrics_dir / name))
        except FileNotFoundError:  # a live gauge removed meanwhile
            pass
    workers = server.workers()
    seconds, values = merge_seconds(metrics_dir, plan.scrapes)
    live = files.live_gauge_pids(str(metrics_dir))
    return {
        "files": len(stats),
        "kib_on_disk": sum(st.st_blocks for st in stats) // 2,
        "kib_apparent": sum(st.st_size for st in stats) // 1024,
        "merge_ms": seconds * 1e3,
        "live_gauge_files_of_dead_pids": len(live - {server.pid, *workers}),
        "processes_gauge": values.get("serverhooks_processes", float("nan")),
        "sessions_opened": values.get("serverhooks_sessions_opened_total", float("nan")),
        "closed_at_exit": values.get("serverhooks_closed_at_exit_total", float("nan")),
        "master_rss_kib": rss_kib([server.pid]),
        "workers_rss_kib": rss_kib(workers),
        "scrape_http_ms": _http_scrape_ms(server),
    }


def _http_scrape_ms(server: Server) -> float:
    """One GET /metrics through a worker (which then recycles: max_requests=1)."""
    started = time.perf_counter()
    status, _body = http_get(server.socket_path, "/metrics", timeout=30.0)
    return (time.perf_counter() - started) * 1e3 if status == 200 else float("nan")


def _settle(server: Server, metrics_dir: Path, timeout: float = 30.0) -> None:
    """Until both workers run and count themselves in serverhooks_processes (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(server.workers()) == 2 and merge_seconds(metrics_dir, 1)[1].get("serverhooks_processes") == 2:
            return
        time.sleep(0.05)


def recycles(plan: Plan) -> dict[str, Any]:
    from tests.support import dbserver

    name = dbserver.create_database("mysql")
    out = OUT_DIR / "recycles"
    server = None
    try:
        env = _project_env(dbserver.django_url("mysql", name))
        schema(env, CODE_DIR)
        server = _start("sync", ON, env, out, max_requests=1, max_requests_jitter=0)
        server.wait_ready(60.0)
        metrics_dir = out / "prom"
        _settle(server, metrics_dir)
        before = directory_state(metrics_dir, server, plan)
        _settle(server, metrics_dir)  # its GET /metrics recycled a worker
        pids: set[int] = set()
        errors: list[str] = []
        lock = threading.Lock()
        deadline = time.monotonic() + plan.recycle_seconds

        def client(n: int) -> None:  # each answered request ends its worker's life (bounded loop)
            for i in range(plan.recycles * 2):
                with lock:
                    if len(pids) >= plan.recycles or time.monotonic() > deadline:
                        return
                try:
                    status, body = http_get(server.socket_path, f"/echo?m=c{n}x{i}", timeout=30.0)
                except OSError as exc:
                    with lock:
                        errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                with lock:
                    if status == 200:
                        pids.add(json.loads(body)["pid"])
                    else:
                        errors.append(f"HTTP {status}")

        started = time.monotonic()
        threads = [threading.Thread(target=client, args=(n,)) for n in range(2)]
        for t in threads:
            t.start()
        # The directory along the way: new workers merge dead ones' counter files once
        # files.COMPACT_AT of them wait, so the file count and merge time must stay flat.
        checkpoints = [plan.recycles * k // 4 for k in (1, 2, 3)]
        along: list[dict[str, float]] = []
        for _ in range(int((plan.recycle_seconds + 60) / 0.2)):  # bounded: the clients' own deadline
            if not any(t.is_alive() for t in threads):
                break
            with lock:
                lives = len(pids)
            if checkpoints and lives >= checkpoints[0]:
                checkpoints.pop(0)
                seconds, _values = merge_seconds(metrics_dir, max(3, plan.scrapes // 3))
                along.append({"lives": lives, "files": len(os.listdir(metrics_dir)), "merge_ms": seconds * 1e3})
            time.sleep(0.2)
        for t in threads:
            t.join(plan.recycle_seconds + 60)
        took = time.monotonic() - started
        _settle(server, metrics_dir)
        after = directory_state(metrics_dir, server, plan)
        print(f"  {len(pids)} worker lives in {took:.0f} s; files {before['files']} -> {after['files']}, "
              f"merge {before['merge_ms']:.1f} -> {after['merge_ms']:.1f} ms", flush=True)  # fmt: skip
        return {"recycled": len(pids), "seconds": took, "errors": errors[:5], "error_count": len(errors),
                "before": before, "after": after, "along": along}  # fmt: skip
    finally:
        if server is not None:
            server.stop()
        drop_quietly("mysql", name)


# =========================================================================== report


def _ci(value: float, interval: tuple[float, float], digits: int = 3) -> str:
    return f"{value:.{digits}f} ({interval[0]:.{digits}f} to {interval[1]:.{digits}f})"


def render(plan: Plan, env: dict[str, str], side: dict[str, dict[str, Any]], recycled: dict[str, Any],
           took: float) -> str:  # fmt: skip
    lines = report_head("Prometheus metrics: what they cost", "bench.metrics_bench", plan.mode, took, env)
    lines += [f"| {k} | {v} |" for k, v in env.items() if k != "date"]
    columns = list(side)
    lines += [
        "",
        "## Per request: metrics on vs off, side by side",
        "",
        f"{plan.rounds} rounds x {plan.rps_reps} windows of {plan.rps_seconds:g} s per arm; "
        f"`-w 2`, preload_app, {plan.clients.concurrency} concurrent clients.",
        "",
        "| | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]

    def row(title: str, cell: Any) -> None:
        lines.append(f"| {title} | " + " | ".join(cell(side[c]) for c in columns) + " |")

    for arm in ARMS:
        row(f"worker CPU per request, {arm} (µs)", lambda r, a=arm: f"{r['cpu_us'][a]:.0f}")
    row("CPU ratio, on / off (95% CI)", lambda r: _ci(r["cpu_ratio"], r["cpu_ratio_ci"], 4))
    row(
        f"target: CPU ratio at most {CPU_TARGET} (end to end)",
        lambda r: verdict(r["target_met"], r["cpu_ratio_ci"], CPU_TARGET),
    )
    row(
        "the metrics' own CPU per request (in-process: pool checkout + checkin, on - off), share of a request",
        lambda r: (
            f"{r['direct_added_us']:+.2f} µs ({r['direct_us'][OFF]:.2f} -> {r['direct_us'][ON]:.2f}), "
            f"{100 * r['direct_share']:+.2f} %"
            if r["direct_added_us"]
            else "none: no pool"
        ),
    )
    row(
        f"target: at most {100 * (CPU_TARGET - 1):g} % (the metrics' own CPU)",
        lambda r: yes(r["direct_share"] <= CPU_TARGET - 1),
    )
    for arm in ARMS:
        row(f"requests/s, {arm}", lambda r, a=arm: f"{r['rps'][a]:.0f}")
    row("rate ratio, on / off (95% CI)", lambda r: _ci(r["rate_ratio"], r["rate_ratio_ci"]))
    for arm in ARMS:
        row(f"workers' resident memory, {arm} (MiB, 2 workers)", lambda r, a=arm: f"{r['rss_kib'][a] / 1024:.1f}")
    row(
        "wrong answers / HTTP errors / failures, all arms",
        lambda r: " / ".join(str(r["checked"][k]) for k in ("wrong", "http_errors", "failures")),
    )
    from serverhooks.metrics import files

    b, a = recycled["before"], recycled["after"]
    along = "; ".join(
        f"after {point['lives']:.0f} lives: {point['files']:.0f} files, {point['merge_ms']:.1f} ms"
        for point in recycled.get("along", [])
    )
    lines += [
        "",
        f"## After {recycled['recycled']} worker recycles",
        "",
        f"MariaDB, `-k sync -w 2`, preload_app, max_requests=1, metrics on; {recycled['recycled']} worker lives "
        f"(of {plan.recycles} asked) in {recycled['seconds']:.0f} s, {recycled['error_count']} failed requests. "
        f"Merge time: median of {plan.scrapes} merges in this process (serverhooks.metrics.collect's "
        "MultiProcessCollector and the text format, what serverhooks' /metrics does); one GET /metrics through a "
        "worker beside it.",
        "",
        "| | before | after |",
        "|---|---|---|",
        f"| files in the directory | {b['files']} | {a['files']} |",
        f"| size on disk / apparent (KiB) | {b['kib_on_disk']} / {b['kib_apparent']} "
        f"| {a['kib_on_disk']} / {a['kib_apparent']} |",
        f"| merge time (ms) | {b['merge_ms']:.1f} | {a['merge_ms']:.1f} |",
        f"| GET /metrics (ms) | {b['scrape_http_ms']:.1f} | {a['scrape_http_ms']:.1f} |",
        f"| live-gauge files of dead pids | {b['live_gauge_files_of_dead_pids']} "
        f"| {a['live_gauge_files_of_dead_pids']} |",
        f"| serverhooks_processes (2 workers run) | {b['processes_gauge']:g} | {a['processes_gauge']:g} |",
        f"| serverhooks_sessions_opened_total / closed_at_exit_total | {b['sessions_opened']:g} / "
        f"{b['closed_at_exit']:g} | {a['sessions_opened']:g} / {a['closed_at_exit']:g} |",
        f"| master resident memory (MiB) | {b['master_rss_kib'] / 1024:.1f} | {a['master_rss_kib'] / 1024:.1f} |",
        f"| workers' resident memory (MiB, 2 workers) | {b['workers_rss_kib'] / 1024:.1f} "
        f"| {a['workers_rss_kib'] / 1024:.1f} |",
        f"| no live gauge left by a dead worker | | {yes(a['live_gauge_files_of_dead_pids'] == 0)} |",
        "",
        f"Along the way: {along or 'not measured'}.",
        "",
        "prometheus_client keeps each dead worker's counter and histogram files (totals must not go backwards: "
        "sessions opened and closed at exit above count every life) and a scrape reads every file. "
        "Each new worker merges them into one archive file per type once "
        f"{files.COMPACT_AT} wait (serverhooks.metrics.files), so the file count, and with it the merge time, "
        "stays bounded however many workers were recycled since the directory was emptied.",
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = bench_arguments("What serverhooks' metrics cost; writes bench/METRICS_RESULTS.md.", RESULTS_PATH, argv)
    plan = QUICK if args.quick else FULL
    os.environ.pop(ENV_VAR, None)  # the off arm must not inherit one
    from tests.support import dbserver

    for family in ("mysql", "postgres"):
        reason = dbserver.reachable(family)
        if reason is not None:
            print(f"{family} server at {dbserver.server_url(family)} does not answer: {reason}", file=sys.stderr)
            return 2
    shutil.rmtree(OUT_DIR, ignore_errors=True)
    OUT_DIR.mkdir(parents=True)
    started = time.monotonic()
    env = {**environment(["prometheus-client"]), **snapshot_working_tree(CODE_DIR)}
    side: dict[str, dict[str, Any]] = {}
    print(f"{plan.mode} run; server logs in {OUT_DIR}", flush=True)
    with multiprocessing.get_context("fork").Pool(plan.clients.procs) as pool:
        for family in ("mysql", "postgres"):
            for kind in KINDS:
                side[f"{FAMILY_TITLE[family]}, {kind}"] = side_by_side(family, kind, plan, pool)
    direct = {{"off": OFF, "on": ON}[arm]: value for arm, value in direct_cost(OUT_DIR).items()}
    print(f"direct: {direct}", flush=True)
    for key, result in side.items():
        # Sync workers have no pool: metrics do nothing per request there (sessions_opened counts
        # at connect time only). Pooled workers check out and in once per request and alias.
        added = direct[ON] - direct[OFF] if key.endswith("gevent") else 0.0
        result["direct_us"] = direct
        result["direct_added_us"] = added
        result["direct_share"] = added / result["cpu_us"][OFF]
    print("recycles", flush=True)
    recycled = recycles(plan)
    took = time.monotonic() - started
    raw = {"plan": dataclasses.asdict(plan), "env": env, "side_by_side": side, "recycles": recycled}
    return write_report(OUT_DIR, raw, render(plan, env, side, recycled, took), args.results)


if __name__ == "__main__":
    sys.exit(main())
