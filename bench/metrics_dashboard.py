"""A Grafana-like dashboard of serverhooks' Prometheus metrics, drawn from a real run (README, Metrics).

    python -m bench.metrics_dashboard            # about 2 minutes; writes bench/metrics_dashboard.png
    python -m bench.metrics_dashboard --quick    # smoke run, under a minute; writes bench/out/metrics_dashboard/
    python -m bench.metrics_dashboard --out PATH

One real Gunicorn master on PostgreSQL: `-k gevent -w 2`, preload_app, a query in the master at
import (QUERY_AT_IMPORT=1: every worker would inherit that session without serverhooks),
SERVERHOOKS_POOL_SIZE=4, max_requests with jitter (workers recycle during the run), metrics on
(a fresh PROMETHEUS_MULTIPROC_DIR). Client processes send GET /sleep?s=0.02 (a pg_sleep that holds
a pooled connection 20 ms) in steps of 4, 16, 48 and 4 concurrent clients, while this process
scrapes GET /metrics once a second, as Prometheus would, through the same unix socket.

From the scrapes it computes what the README's PromQL shows (rate() over 5 s windows, as the
increase between the scrape 5 s earlier and this one, without Prometheus' extrapolation; and
histogram_quantile() on the bucket increases), draws the panels with each query as subtitle, and
prints a summary to quote. The servers run a copy of the working tree taken at the start, as
bench/metrics_bench.py's do (its snapshot, its server start, gunicorn_bench's load counters).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import itertools
import json
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.common import (
    BENCH_DIR,
    FAMILY_TITLE,
    REPO,
    Clients,
    drop_quietly,
    http_get,
    run_client_threads,
    timed_requests,
)
from bench.gunicorn_bench import LoadCounts, _project_env
from bench.metrics_bench import ON, _settle, _start, snapshot_working_tree

if TYPE_CHECKING:
    from matplotlib.artist import Artist
    from matplotlib.axes import Axes

    from tests.support.procs import Server

OUT_DIR = BENCH_DIR / "out" / "metrics_dashboard"
CODE_DIR = OUT_DIR / "code"
PNG_PATH = BENCH_DIR / "metrics_dashboard.png"
FAMILY = "postgres"
WORKERS = 2  # metrics_bench's _start always starts two
POOL_SIZE = 4  # small, so that 16 and 48 clients queue for connections
QUERY_SECONDS = 0.02  # each request holds its pooled connection this long (pg_sleep)
RATE_WINDOW = 5.0  # seconds: rate(...[5s]); a real dashboard scraping every 15 s would use [1m] or more
SCRAPE_EVERY = 1.0
_CONF = f"import sys\nsys.path.insert(0, {str(CODE_DIR)!r})\nfrom serverhooks.gunicorn import *"

Series = dict[tuple[str, ...], float]  # label values of the `by` labels -> value
Labels = tuple[tuple[str, str], ...]  # one series' labels, sorted


@dataclasses.dataclass(frozen=True)
class Step:
    clients: Clients
    seconds: float


@dataclasses.dataclass(frozen=True)
class Plan:
    mode: str
    steps: tuple[Step, ...]
    idle_seconds: float  # scraped before the first step and after the last
    max_requests: int  # per worker life, plus 0..jitter: several recycles per run
    jitter: int


FULL = Plan(
    "full",
    (Step(Clients(1, 4), 22.0), Step(Clients(2, 8), 22.0), Step(Clients(4, 12), 22.0), Step(Clients(1, 4), 22.0)),
    idle_seconds=5.0,
    max_requests=2000,
    jitter=1000,
)
QUICK = Plan(
    "quick",
    (Step(Clients(1, 4), 5.0), Step(Clients(2, 8), 5.0), Step(Clients(4, 12), 5.0), Step(Clients(1, 4), 5.0)),
    idle_seconds=3.0,
    max_requests=400,
    jitter=200,
)


# =========================================================================== the load


def _client_thread(path: str, prefix: str, start_at: float, end_at: float, limit: int, out: LoadCounts) -> None:
    """One client: GET /sleep after GET /sleep (a new unix-socket connection each), from start_at to end_at."""

    def send(i: int) -> tuple[str, str]:
        status, _body = http_get(path, f"/sleep?s={QUERY_SECONDS}", timeout=30.0)
        return ("ok", "") if status == 200 else ("http", f"HTTP {status}")

    timed_requests(start_at, end_at, limit, out, send)


def _client_process(args: tuple[str, int, float, float, int]) -> LoadCounts:
    return run_client_threads(_client_thread, LoadCounts, args)


# =========================================================================== the scrapes


@dataclasses.dataclass
class Scrape:
    at: float  # seconds since the run's start, when the answer came
    samples: dict[tuple[str, Labels], float]  # (sample name, labels) -> value
    workers: tuple[int, ...]  # the master's children then, from /proc


def parse(text: str) -> dict[tuple[str, Labels], float]:
    """Every serverhooks sample of one /metrics answer, keyed by name and all its labels (whatever they are)."""
    from prometheus_client.parser import text_string_to_metric_families

    samples: dict[tuple[str, Labels], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("serverhooks_"):
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def scrape(server: Server, started: float) -> Scrape | None:
    """One GET /metrics through a worker, as Prometheus scrapes it; None if it failed (a gap in the graphs)."""
    try:
        status, body = http_get(server.socket_path, "/metrics", timeout=5.0)
    except (OSError, RuntimeError):
        return None
    if status != 200:
        return None
    return Scrape(time.monotonic() - started, parse(body.decode()), tuple(server.workers()))


def total(s: Scrape, name: str, by: Sequence[str] = ()) -> Series:
    """`sum by (by) (name)` at one scrape: summed over every label not in `by`."""
    out: Series = {}
    for (sample, labels), value in s.samples.items():
        if sample == name:
            key = tuple(dict(labels).get(label, "") for label in by)
            out[key] = out.get(key, 0.0) + value
    return out


def _window(scrapes: Sequence[Scrape], i: int, seconds: float) -> list[Scrape]:
    """The scrapes from the last one at least `seconds` before scrape i up to scrape i."""
    first = i
    while first > 0 and scrapes[i].at - scrapes[first].at < seconds:
        first -= 1
    return list(scrapes[first : i + 1])


def increase(window: Sequence[Scrape], name: str, by: Sequence[str] = (), per_second: bool = False) -> Series:
    """`sum by (by) (increase(name[window]))` (or rate): per series first, a drop counting as a reset, as
    Prometheus does; then summed. No extrapolation to the window's edges."""
    out: Series = {}
    if len(window) < 2:
        return out
    series = {labels for s in window for (sample, labels) in s.samples if sample == name}
    elapsed = window[-1].at - window[0].at
    for labels in series:
        grown = 0.0
        previous: float | None = None
        for s in window:
            value = s.samples.get((name, labels))
            if value is None:
                continue
            if previous is not None:
                grown += value - previous if value >= previous else value
            previous = value
        key = tuple(dict(labels).get(label, "") for label in by)
        out[key] = out.get(key, 0.0) + (grown / elapsed if per_second else grown)
    return out


def histogram_quantile(q: float, buckets: Series) -> float:
    """Prometheus' histogram_quantile on {(le,): cumulative count}: linear within the bucket the rank falls in."""
    ordered = sorted((float(le[0]), count) for le, count in buckets.items())
    if not ordered or ordered[-1][1] <= 0:
        return math.nan
    rank = q * ordered[-1][1]
    lower, below = 0.0, 0.0
    for n, (upper, cumulative) in enumerate(ordered):
        if cumulative >= rank:
            if math.isinf(upper):  # in the +Inf bucket: the highest finite bound, as Prometheus answers
                return ordered[n - 1][0] if n > 0 else math.nan
            inside = cumulative - below
            return upper if inside <= 0 else lower + (upper - lower) * (rank - below) / inside
        lower, below = upper, cumulative
    return math.nan


def counter_drops(scrapes: Sequence[Scrape]) -> list[str]:
    """Counter series whose value went down between two scrapes (a merged total must never do that)."""
    drops: list[str] = []
    for before, after in itertools.pairwise(scrapes):
        for key, value in after.samples.items():
            name = key[0]
            if name.endswith(("_total", "_count", "_sum", "_bucket")) and value < before.samples.get(key, 0.0):
                drops.append(f"{name}{dict(key[1]) or ''} {before.samples[key]:g} -> {value:g} at {after.at:.0f} s")
    return drops


# =========================================================================== the run


@dataclasses.dataclass
class Run:
    plan: Plan
    scrapes: list[Scrape]
    failed_scrapes: int
    steps_at: list[tuple[float, float, int]]  # (start, end, concurrent clients), seconds since the start
    counts: LoadCounts
    took: float
    server_version: str
    code: dict[str, str]


def run(plan: Plan) -> Run:
    from tests.support import dbserver

    snapshot = snapshot_working_tree(CODE_DIR)
    procs_needed = sum(step.clients.procs for step in plan.steps)
    name = dbserver.create_database(FAMILY)
    server: Server | None = None
    # The client processes are forked first, before any thread or server exists here; each sleeps
    # until its step's start (timed_requests), so that every step can be queued at once.
    with multiprocessing.get_context("fork").Pool(procs_needed) as pool:
        try:
            env = _project_env(
                dbserver.django_url(FAMILY, name), QUERY_AT_IMPORT="1", SERVERHOOKS_POOL_SIZE=str(POOL_SIZE)
            )
            server = _start(
                "gevent", ON, env, OUT_DIR, _source=_CONF, loglevel="info",
                max_requests=plan.max_requests, max_requests_jitter=plan.jitter,
            )  # fmt: skip
            server.wait_ready(60.0)
            _settle(server, OUT_DIR / "prom")  # both workers count themselves: the run starts from a steady state
            version = str(dbserver.query(FAMILY, "SHOW server_version")[0][0]).split(" ")[0]
            started = time.monotonic()
            steps_at: list[tuple[float, float, int]] = []
            args: list[tuple[str, int, float, float, int]] = []
            at = plan.idle_seconds
            for step in plan.steps:
                steps_at.append((at, at + step.seconds, step.clients.concurrency))
                # Bounded by count as well as time: a client thread cannot exceed 1 / QUERY_SECONDS per second.
                limit = int(step.seconds / QUERY_SECONDS) + 10
                one = (server.socket_path, step.clients.threads, started + at, started + at + step.seconds, limit)
                args += [one] * step.clients.procs
                at += step.seconds
            end = at + plan.idle_seconds
            load = pool.map_async(_client_process, args, chunksize=1)
            scrapes: list[Scrape] = []
            failed = 0
            for n in range(int(end / SCRAPE_EVERY) + 1):  # bounded: one scrape a second until the end
                time.sleep(max(0.0, started + n * SCRAPE_EVERY - time.monotonic()))
                got = scrape(server, started)
                if got is None:
                    failed += 1
                else:
                    scrapes.append(got)
            parts = load.get(timeout=60.0)
            counts = LoadCounts()
            for part in parts:
                counts.add(part)
            return Run(plan, scrapes, failed, steps_at, counts, time.monotonic() - started, version, snapshot)
        finally:
            if server is not None:
                server.stop()
            drop_quietly(FAMILY, name)


# =========================================================================== figures


@dataclasses.dataclass
class Figures:
    """What the panels draw (one value per scrape) and the summary quotes."""

    t: list[float]
    aliases: list[str]
    saturation: dict[str, list[float]]  # per alias, in_use / size
    in_use: list[float]
    size: list[float]
    waiting: list[float]
    waits_rate: list[float]
    p95_ms: list[float]
    sessions_rate: dict[str, list[float]]
    closed_before_fork: list[float]
    abandoned_after_fork: list[float]
    processes: list[float]
    workers_proc: list[int]
    checkouts_rate: list[float]
    recycled_at: list[float]
    summary: dict[str, Any]


def _one(series: Series) -> float:
    return sum(series.values())


def figures(r: Run) -> Figures:
    s = r.scrapes
    aliases = sorted({a for x in s for (a,) in total(x, "serverhooks_pool_size", ["alias"])})
    windows = [_window(s, i, RATE_WINDOW) for i in range(len(s))]

    def per_alias(values: Callable[[int], Series]) -> dict[str, list[float]]:
        return {alias: [values(i).get((alias,), math.nan) for i in range(len(s))] for alias in aliases}

    def ratio(i: int) -> Series:
        used, size = total(s[i], "serverhooks_pool_in_use", ["alias"]), total(s[i], "serverhooks_pool_size", ["alias"])
        return {k: used.get(k, 0.0) / v for k, v in size.items() if v > 0}

    bucket = "serverhooks_pool_checkout_wait_seconds_bucket"
    seen: set[int] = set()
    recycled_at: list[float] = []
    for x in s:
        new = set(x.workers) - seen
        if seen and new:
            recycled_at += [x.at] * len(new)
        seen |= new
    f = Figures(
        t=[x.at for x in s],
        aliases=aliases,
        saturation=per_alias(ratio),
        in_use=[_one(total(x, "serverhooks_pool_in_use")) for x in s],
        size=[_one(total(x, "serverhooks_pool_size")) for x in s],
        waiting=[_one(total(x, "serverhooks_pool_waiting")) for x in s],
        waits_rate=[
            _one(increase(w, "serverhooks_pool_checkout_wait_seconds_count", per_second=True)) for w in windows
        ],
        p95_ms=[1e3 * histogram_quantile(0.95, increase(w, bucket, ["le"])) for w in windows],
        sessions_rate={
            alias: [
                increase(w, "serverhooks_sessions_opened_total", ["alias"], True).get((alias,), 0.0) for w in windows
            ]
            for alias in sorted({a for x in s for (a,) in total(x, "serverhooks_sessions_opened_total", ["alias"])})
        },
        closed_before_fork=[_one(total(x, "serverhooks_closed_before_fork_total")) for x in s],
        abandoned_after_fork=[_one(total(x, "serverhooks_abandoned_after_fork_total")) for x in s],
        processes=[_one(total(x, "serverhooks_processes")) for x in s],
        workers_proc=[len(x.workers) for x in s],
        checkouts_rate=[
            _one(increase(w, "serverhooks_pool_reused_total", per_second=True))
            + _one(increase(w, "serverhooks_pool_opened_total", per_second=True))
            for w in windows
        ],
        recycled_at=recycled_at,
        summary={},
    )
    whole = [s[0], s[-1]] if s else []
    last = s[-1] if s else Scrape(0.0, {}, ())
    finite_p95 = [v for v in f.p95_ms if not math.isnan(v)]
    f.summary = {
        "requests": r.counts.requests,
        "http_errors": r.counts.http_errors,
        "failures": r.counts.failures,
        "peak_in_use": max(f.in_use, default=0.0),
        "size": max(f.size, default=0.0),
        "peak_saturation": max((v for a in aliases for v in f.saturation[a] if not math.isnan(v)), default=0.0),
        "peak_waiting": max(f.waiting, default=0.0),
        "waits": _one(increase(whole, "serverhooks_pool_checkout_wait_seconds_count")),
        "waits_counter": _one(increase(whole, "serverhooks_pool_waits_total")),
        "wait_seconds": _one(increase(whole, "serverhooks_pool_checkout_wait_seconds_sum")),
        "wait_seconds_counter": _one(increase(whole, "serverhooks_pool_wait_seconds_total")),
        "p95_run_ms": 1e3 * histogram_quantile(0.95, increase(whole, bucket, ["le"])),
        "p95_peak_ms": max(finite_p95, default=math.nan),
        "sessions_opened": _one(total(last, "serverhooks_sessions_opened_total")),
        "pool_opened": _one(total(last, "serverhooks_pool_opened_total")),
        "pool_reused": _one(total(last, "serverhooks_pool_reused_total")),
        "closed_before_fork": _one(total(last, "serverhooks_closed_before_fork_total")),
        "abandoned_after_fork": _one(total(last, "serverhooks_abandoned_after_fork_total")),
        "errors": _one(total(last, "serverhooks_errors_total")),
        "recycles": len(recycled_at),
        "worker_lives": len(seen),
        "processes_min_max": (min(f.processes, default=0.0), max(f.processes, default=0.0)),
        "scrapes": len(s),
        "failed_scrapes": r.failed_scrapes,
        "counter_drops": counter_drops(s),
        "counter_labels": sorted(
            {label for (name, labels) in last.samples if name.endswith("_total") for label, _ in labels}
        ),
    }
    return f


# =========================================================================== the dashboard

# Grafana's dark theme: page, panel, text, grid, and its classic series colours.
BG, PANEL, TEXT, MUTED, GRID = "#111217", "#181b1f", "#d8d9da", "#8e8e8e", "#2c3235"
GREEN, YELLOW, BLUE, ORANGE, RED, PURPLE = "#73bf69", "#fade2a", "#5794f2", "#ff9830", "#f2495c", "#b877d9"


def _panel(ax: Axes, title: str, queries: Sequence[str], r: Run, f: Figures) -> None:
    """A panel's frame: title, its PromQL below it, the load steps shaded behind, Grafana's colours."""
    ax.set_facecolor(PANEL)
    for side in ax.spines.values():
        side.set_color(GRID)
    ax.tick_params(colors=MUTED, labelsize=8)
    ax.grid(True, color=GRID, linewidth=0.6)
    ax.set_xlim(0, f.t[-1] if f.t else 1)
    # Room for two queries above every panel, so that the titles of a row line up.
    ax.set_title(title, loc="left", color=TEXT, fontsize=11, fontweight="bold", pad=6 + 11 * 2)
    for n, query in enumerate(queries[:2]):
        ax.text(0, 1.015 + 0.075 * (1 - n), query, transform=ax.transAxes, fontsize=7.2, family="monospace",
                color=MUTED, va="bottom")  # fmt: skip
    for n, (start, end, clients) in enumerate(r.steps_at):
        ax.axvspan(start, end, color="#ffffff", alpha=0.035 if n % 2 else 0.07, linewidth=0)
        ax.text((start + end) / 2, 0.97, f"{clients} clients", transform=ax.get_xaxis_transform(), ha="center",
                va="top", fontsize=7.5, color=MUTED)  # fmt: skip


def _legend(ax: Axes, handles: Sequence[Artist] | None = None, left: bool = False) -> None:
    """The series' names, under the step labels; on a panel with two axes, on the upper one (drawn last)."""
    legend = ax.legend(
        handles=handles
        if handles is not None
        else [h for h in ax.get_lines() if not str(h.get_label()).startswith("_")],
        loc="upper left" if left else "upper right",
        bbox_to_anchor=(0.0, 0.9) if left else (1.0, 0.9),
        fontsize=7.5,
        frameon=True,
    )
    legend.get_frame().set_facecolor(PANEL)
    legend.get_frame().set_edgecolor(GRID)
    for text in legend.get_texts():
        text.set_color(TEXT)


def _twin(ax: Axes, color: str) -> Axes:
    other = ax.twinx()
    other.tick_params(colors=color, labelsize=8)
    for side in other.spines.values():
        side.set_color(GRID)
    return other


def draw(r: Run, f: Figures, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display here; and the PNG is all that is wanted
    import matplotlib.pyplot as plt

    w = f"{RATE_WINDOW:g}s"
    fig, axes = plt.subplots(3, 2, figsize=(14, 10), dpi=100, facecolor=BG, sharex=True)
    fig.subplots_adjust(left=0.05, right=0.95, top=0.845, bottom=0.1, hspace=0.55, wspace=0.2)
    (sat, waits), (sessions, checkouts), (inherited, processes) = axes
    t = f.t

    _panel(sat, "Pool saturation", ["sum by (alias) (serverhooks_pool_in_use) / sum by (alias) (serverhooks_pool_size)",
                                    "sum by (alias) (serverhooks_pool_waiting)"], r, f)  # fmt: skip
    lines = [sat.plot(t, [100 * v for v in f.saturation[a]], color=GREEN, lw=1.6, label=f"in use / size, {a}")[0]
             for a in f.aliases]  # fmt: skip
    sat.set_ylim(0, 119)
    sat.set_ylabel("% of pool in use", color=GREEN, fontsize=8)
    right = _twin(sat, ORANGE)
    lines += right.plot(t, f.waiting, color=ORANGE, lw=1.2, label="waiting (units of work)")
    right.set_ylim(0, max(max(f.waiting, default=1.0) * 1.25, 1.0))
    _legend(right, lines, left=True)

    _panel(waits, "Checkout waits", [
        f"sum by (alias) (rate(serverhooks_pool_checkout_wait_seconds_count[{w}]))",
        f"histogram_quantile(0.95, sum by (le, alias) (rate(serverhooks_pool_checkout_wait_seconds_bucket[{w}])))",
    ], r, f)  # fmt: skip
    lines = waits.plot(t, f.waits_rate, color=YELLOW, lw=1.6, label="waits / s")
    waits.set_ylabel("waits / s", color=YELLOW, fontsize=8)
    waits.set_ylim(0, max(max(f.waits_rate, default=1.0) * 1.25, 1.0))
    right = _twin(waits, RED)
    lines += right.plot(t, f.p95_ms, color=RED, lw=1.4, label="p95 wait (ms)")
    right.set_ylim(0, max(max((v for v in f.p95_ms if not math.isnan(v)), default=1.0) * 1.25, 1.0))
    right.set_ylabel("p95 wait (ms)", color=RED, fontsize=8)
    _legend(right, lines, left=True)

    _panel(sessions, "Database sessions opened", [f"sum by (alias) (rate(serverhooks_sessions_opened_total[{w}]))"],
           r, f)  # fmt: skip
    for alias, values in f.sessions_rate.items():
        sessions.plot(t, values, color=BLUE, lw=1.6, label=f"sessions / s, {alias}")
        sessions.fill_between(t, values, color=BLUE, alpha=0.15, linewidth=0)
    sessions.set_ylim(0, max(max((max(v, default=0.0) for v in f.sessions_rate.values()), default=0.0) * 1.4, 1.0))
    sessions.set_ylabel("sessions / s", color=BLUE, fontsize=8)
    for n, at in enumerate(f.recycled_at):  # each new worker opens its own sessions
        sessions.axvline(at, color=PURPLE, lw=0.8, ls=":", label="a new worker (recycle)" if n == 0 else None)
    _legend(sessions)

    _panel(checkouts, "Pooled checkouts (about one per request)", [
        f"sum(rate(serverhooks_pool_reused_total[{w}])) + sum(rate(serverhooks_pool_opened_total[{w}]))"
    ], r, f)  # fmt: skip
    checkouts.plot(t, f.checkouts_rate, color=GREEN, lw=1.6, label="checkouts / s")
    checkouts.fill_between(t, f.checkouts_rate, color=GREEN, alpha=0.15, linewidth=0)
    checkouts.set_ylim(0, max(max(f.checkouts_rate, default=1.0) * 1.3, 1.0))
    checkouts.set_ylabel("checkouts / s", color=GREEN, fontsize=8)
    _legend(checkouts)

    _panel(inherited, "Inherited connections", [
        "sum(serverhooks_closed_before_fork_total)", "sum(serverhooks_abandoned_after_fork_total)",
    ], r, f)  # fmt: skip
    inherited.step(t, f.closed_before_fork, where="post", color=GREEN, lw=1.8,
                   label=f"closed before fork (master): {f.summary['closed_before_fork']:g}")  # fmt: skip
    inherited.step(t, f.abandoned_after_fork, where="post", color=RED, lw=1.8, ls="--",
                   label=f"abandoned after fork (workers): {f.summary['abandoned_after_fork']:g}")  # fmt: skip
    top = max(max(f.closed_before_fork, default=0.0), max(f.abandoned_after_fork, default=0.0))
    inherited.set_ylim(-0.1 * max(top, 1.0), max(top, 1.0) * 1.6)
    inherited.set_ylabel("connections (total)", color=TEXT, fontsize=8)
    inherited.set_xlabel("seconds", color=MUTED, fontsize=8)
    _legend(inherited)

    _panel(processes, "Running worker processes", ["sum(serverhooks_processes)"], r, f)
    processes.step(t, f.processes, where="post", color=PURPLE, lw=1.8, label="serverhooks_processes")
    processes.step(t, f.workers_proc, where="post", color=MUTED, lw=1.0, ls="--", label="master's children (/proc)")
    for n, at in enumerate(f.recycled_at):
        processes.axvline(at, color=PURPLE, lw=0.8, ls=":", label="a worker recycled" if n == 0 else None)
    processes.set_ylim(0, max(max(f.processes, default=0.0), WORKERS) + 1.6)
    processes.set_ylabel("processes", color=PURPLE, fontsize=8)
    processes.set_xlabel("seconds", color=MUTED, fontsize=8)
    _legend(processes)

    sm = f.summary
    steps = ", ".join(str(clients) for _start_at, _end_at, clients in r.steps_at)
    fig.text(
        0.05, 0.975,
        f"serverhooks' Prometheus metrics, a real run: Gunicorn -k gevent -w {WORKERS} on "
        f"{FAMILY_TITLE[FAMILY]} {r.server_version}",
        color=TEXT, fontsize=14, fontweight="bold", va="top",
    )  # fmt: skip
    fig.text(
        0.05, 0.943,
        f"POOL_SIZE={POOL_SIZE} per worker; max_requests={r.plan.max_requests} + 0..{r.plan.jitter} (workers "
        f"recycle); GET /sleep?s={QUERY_SECONDS:g} (a pg_sleep on a pooled connection) from {steps} clients in turn.\n"
        f"GET /metrics scraped every {SCRAPE_EVERY:g} s; rates over {RATE_WINDOW:g} s windows.  "
        f"{datetime.now(UTC):%Y-%m-%d}, serverhooks {r.code.get('commit', '?')}, {r.plan.mode} run "
        "(python -m bench.metrics_dashboard).",
        color=MUTED, fontsize=9, va="top", linespacing=1.5,
    )  # fmt: skip
    fig.text(
        0.05, 0.045,
        f"{sm['requests']:,} requests, {sm['http_errors'] + sm['failures']} errors.  Peak in use "
        f"{sm['peak_in_use']:g} of {sm['size']:g} pooled connections, peak waiting {sm['peak_waiting']:g}.  "
        f"{sm['waits']:,.0f} checkouts waited, p95 {sm['p95_run_ms']:.0f} ms over the run.\n"
        f"{sm['sessions_opened']:g} database sessions opened for {sm['pool_opened'] + sm['pool_reused']:,.0f} "
        f"checkouts.  {sm['recycles']} worker recycles; serverhooks_processes stayed between "
        f"{sm['processes_min_max'][0]:g} and {sm['processes_min_max'][1]:g}.  Inherited connections: "
        f"{sm['closed_before_fork']:g} closed in the master before fork, {sm['abandoned_after_fork']:g} abandoned.",
        color=TEXT, fontsize=9, va="top", linespacing=1.5,
    )  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", facecolor=BG, dpi=100)
    plt.close(fig)
    # A palette of 256 colours, undithered, keeps the flat panels flat: a third of the RGB file's size.
    from PIL import Image

    with Image.open(buffer) as image:
        image.convert("RGB").quantize(256, dither=Image.Dither.NONE).save(out, optimize=True)


def summary_text(r: Run, f: Figures, out: Path) -> str:
    sm = f.summary
    lines = [
        f"metrics dashboard ({r.plan.mode} run, {r.took:.0f} s): {out}",
        f"  server            gunicorn -k gevent -w {WORKERS}, {FAMILY_TITLE[FAMILY]} {r.server_version}, "
        f"POOL_SIZE={POOL_SIZE}, max_requests={r.plan.max_requests} + 0..{r.plan.jitter}, code: "
        f"{r.code.get('code', '?')} ({r.code.get('commit', '?')})",
        f"  requests          {sm['requests']:,} answered, {sm['http_errors']} HTTP errors, {sm['failures']} failures"
        + (f" (e.g. {r.counts.examples[0]})" if r.counts.examples else ""),
        f"  scrapes           {sm['scrapes']} ok, {sm['failed_scrapes']} failed",
        f"  peak in use       {sm['peak_in_use']:g} of {sm['size']:g} pooled connections "
        f"({100 * sm['peak_saturation']:.0f} %), peak waiting {sm['peak_waiting']:g}",
        f"  checkout waits    {sm['waits']:,.0f} (histogram _count; serverhooks_pool_waits_total says "
        f"{sm['waits_counter']:,.0f}), {sm['wait_seconds']:.1f} s waited in all (pool_wait_seconds_total "
        f"{sm['wait_seconds_counter']:.1f} s)",
        f"  p95 wait          {sm['p95_run_ms']:.1f} ms over the run; highest {RATE_WINDOW:g} s-window p95 "
        f"{sm['p95_peak_ms']:.1f} ms",
        f"  sessions opened   {sm['sessions_opened']:g} (pool_opened {sm['pool_opened']:g}, pool_reused "
        f"{sm['pool_reused']:,.0f})",
        f"  inherited         closed_before_fork {sm['closed_before_fork']:g}, abandoned_after_fork "
        f"{sm['abandoned_after_fork']:g}, errors {sm['errors']:g}",
        f"  recycles          {sm['recycles']} ({sm['worker_lives']} worker lives seen in /proc); "
        f"serverhooks_processes min {sm['processes_min_max'][0]:g}, max {sm['processes_min_max'][1]:g}",
        f"  counter labels    {', '.join(sm['counter_labels']) or 'none'}",
    ]
    drops = sm["counter_drops"]
    lines.append(f"  counter drops     {len(drops)}" + "".join(f"\n    {d}" for d in drops[:10]))
    return "\n".join(lines)


def write_raw(r: Run, f: Figures, path: Path) -> None:
    """Every scrape (all serverhooks samples, the workers in /proc) and the summary, to check a figure by."""
    scrapes = [
        {"at": x.at, "workers": x.workers, "samples": [[n, dict(labels), v] for (n, labels), v in x.samples.items()]}
        for x in r.scrapes
    ]
    raw = {"plan": dataclasses.asdict(r.plan), "steps_at": r.steps_at, "summary": f.summary, "scrapes": scrapes}
    path.write_text(json.dumps(raw, indent=1, default=str))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Draw a dashboard of serverhooks' metrics from a real run.")
    parser.add_argument("--quick", action="store_true", help="smoke run, under a minute")
    parser.add_argument(
        "--out", type=Path, help=f"the PNG (default {PNG_PATH}; --quick: {OUT_DIR / 'metrics_dashboard.png'})"
    )
    args = parser.parse_args(argv)
    os.chdir(REPO)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    plan = QUICK if args.quick else FULL
    out: Path = args.out or (OUT_DIR / "metrics_dashboard.png" if args.quick else PNG_PATH)
    from tests.support import dbserver

    reason = dbserver.reachable(FAMILY)
    if reason is not None:
        print(f"{FAMILY} server at {dbserver.server_url(FAMILY)} does not answer: {reason}", file=sys.stderr)
        return 2
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)  # only the server's environment gets one (metrics_bench's _start)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    print(f"{plan.mode} run, about {sum(s.seconds for s in plan.steps) + 2 * plan.idle_seconds + 15:.0f} s; "
          f"server log in {OUT_DIR}", flush=True)  # fmt: skip
    result = run(plan)
    if len(result.scrapes) < 2:
        print(f"only {len(result.scrapes)} scrapes answered: see {OUT_DIR / 'gunicorn.log'}", file=sys.stderr)
        return 1
    f = figures(result)
    draw(result, f, out)
    write_raw(result, f, OUT_DIR / "raw.json")
    print(summary_text(result, f, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
