"""What the idle-session check costs per request, against no check and Django's CONN_HEALTH_CHECKS.

    python -m bench.health_bench            # full run, about 6 minutes; writes bench/HEALTH_RESULTS.md
    python -m bench.health_bench --quick    # smoke run, about a minute

Three arms side by side, alternated A B C within each round, all with serverhooks' Gunicorn
hooks (`-k sync -w 2`, preload_app, CONN_MAX_AGE=3600, /echo?m=<marker>, MariaDB and PostgreSQL):

    no check      SERVERHOOKS_CHECK_IDLE_SESSIONS=0: plain Django's persistent connections
    check         serverhooks' default: one poll() on each idle session at request start
    django        SERVERHOOKS_CHECK_IDLE_SESSIONS=0 and CONN_HEALTH_CHECKS=True: Django's own check,
                  a round trip to the database at a request's first use of its connection

Worker CPU per request (from /proc) is the figure the target is set on: at most 1 % above "no
check". End to end, on this shared 2-core machine, its windows vary by 10 % or more, so the
verdict rests on the check's own cost measured directly: Django's close_old_connections() (what
runs at a request's start and end) timed in-process on a live connection, with and without the
check, alternated, as a share of a request's worker CPU. The end-to-end ratios, with bootstrap
95 % intervals, and the rate ratios are reported beside it. The load client is gunicorn_bench's.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from bench.common import (
    BENCH_DIR,
    FAMILY_TITLE,
    Clients,
    bench_arguments,
    bootstrap,
    drop_quietly,
    environment,
    median,
    snapshot_code,
    write_report,
    yes,
)
from bench.gunicorn_bench import LoadCounts, SyncArms, Window, _project_env, sync_rounds

OUT_DIR = BENCH_DIR / "out" / "health"
CODE_DIR = OUT_DIR / "code"
RESULTS_PATH = BENCH_DIR / "HEALTH_RESULTS.md"
NO_CHECK, CHECK, DJANGO = "no check", "check", "django"
ARMS = (NO_CHECK, CHECK, DJANGO)
ARM_ENV = {
    NO_CHECK: {"SERVERHOOKS_CHECK_IDLE_SESSIONS": "0"},
    CHECK: {"SERVERHOOKS_CHECK_IDLE_SESSIONS": "1"},
    DJANGO: {"SERVERHOOKS_CHECK_IDLE_SESSIONS": "0", "CONN_HEALTH_CHECKS": "1"},
}
CPU_TARGET = 1.01  # worker CPU per request, check / no check
_CONF = f"import sys\nsys.path.insert(0, {str(CODE_DIR)!r})\nfrom serverhooks.gunicorn import *"


@dataclasses.dataclass(frozen=True)
class Plan:
    mode: str
    rounds: int  # fresh masters for every arm, per database
    rps_reps: int  # measured windows per arm within a round, alternated A B C
    rps_seconds: float  # one measured window
    warmup_seconds: float
    clients: Clients = dataclasses.field(default_factory=lambda: Clients(procs=2, threads=3))


QUICK = Plan("quick", rounds=1, rps_reps=2, rps_seconds=1.0, warmup_seconds=0.3)
FULL = Plan("full", rounds=5, rps_reps=4, rps_seconds=2.5, warmup_seconds=1.0)


def run_family(family: str, plan: Plan, pool: Any) -> dict[str, Any]:
    arms = SyncArms(ARMS, dict.fromkeys(ARMS, _CONF), plan, pool)
    windows = sync_rounds(
        family,
        arms,
        ARM_ENV,
        plan.rounds,
        OUT_DIR / family,
        CODE_DIR,
        lambda w: f"{w.arm}={w.worker_cpu_us_per_request:.0f}us",
    )
    return summarise(windows)


# Django's close_old_connections() (what runs at a request's start and end), timed in a process
# of its own on a live connection: alternately with serverhooks' check and without it.
_DIRECT = """
import json, time, django
django.setup()
from django.db import close_old_connections, connections
from serverhooks import health
wrapper = connections["default"]
wrapper.ensure_connection()
best = {"check": [], "no check": []}
for _ in range(40):
    for arm in ("no check", "check"):
        (health.watch if arm == "check" else health.unwatch)(wrapper)
        started = time.perf_counter()
        for _ in range(2000):
            close_old_connections()
        best[arm].append((time.perf_counter() - started) / 2000 * 1e6)
print(json.dumps({arm: sorted(values)[len(values) // 2] for arm, values in best.items()}))
"""


def direct_cost(family: str) -> dict[str, float]:
    """µs per close_old_connections() call, with and without the check (medians of 40 alternated runs)."""
    from tests.support import dbserver

    name = dbserver.create_database(family)
    try:
        env = {**os.environ, **_project_env(dbserver.django_url(family, name)), "PYTHONPATH": str(CODE_DIR)}
        out = subprocess.run(
            [sys.executable, "-c", _DIRECT], env=env, cwd=CODE_DIR, capture_output=True, text=True, timeout=300
        )
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-2000:])
        result: dict[str, float] = json.loads(out.stdout.splitlines()[-1])
        return result
    finally:
        drop_quietly(family, name)


def summarise(windows: list[Window]) -> dict[str, Any]:
    measured = [w for w in windows if w.rep >= 0]
    cpu = {arm: [w.worker_cpu_us_per_request for w in measured if w.arm == arm] for arm in ARMS}
    rates = {arm: [w.rps for w in measured if w.arm == arm] for arm in ARMS}
    checked = {arm: LoadCounts() for arm in ARMS}
    for w in windows:
        checked[w.arm].add(w.counts)
    out: dict[str, Any] = {"arms": {}}
    for arm in ARMS:
        out["arms"][arm] = {
            "worker_cpu_us": median(cpu[arm]),
            "median_rps": median(rates[arm]),
            "checked": dataclasses.asdict(checked[arm]),
        }
    for arm in (CHECK, DJANGO):
        out[arm] = {
            "cpu_ratio": median(cpu[arm]) / median(cpu[NO_CHECK]),
            "cpu_ratio_ci": bootstrap(cpu[NO_CHECK], cpu[arm], lambda a, b: b / a),
            "rate_ratio": median(rates[arm]) / median(rates[NO_CHECK]),
            "rate_ratio_ci": bootstrap(rates[NO_CHECK], rates[arm], lambda a, b: b / a),
        }
    by_slot = {(w.rnd, w.rep, w.arm): w for w in measured}
    pairs = [
        by_slot[(w.rnd, w.rep, CHECK)].worker_cpu_us_per_request / w.worker_cpu_us_per_request
        for w in measured
        if w.arm == NO_CHECK and (w.rnd, w.rep, CHECK) in by_slot
    ]
    out[CHECK]["cpu_pair_ratio_median"] = median(pairs)
    return out


def _ratio(value: float, interval: tuple[float, float], digits: int = 3) -> str:
    return f"{value:.{digits}f} ({interval[0]:.{digits}f} to {interval[1]:.{digits}f})"


def render(plan: Plan, env: dict[str, str], results: dict[str, dict[str, Any]], took: float) -> str:
    lines = [
        "# The idle-session check: what it costs per request",
        "",
        f"`python -m bench.health_bench{' --quick' if plan.mode == 'quick' else ''}`, {plan.mode} run, "
        f"{took / 60:.1f} min. See the module's docstring for the arms; {plan.rounds} rounds x "
        f"{plan.rps_reps} windows of {plan.rps_seconds:g} s per arm, per database.",
        "",
        "| | " + " | ".join(FAMILY_TITLE[f] for f in results) + " |",
        "|---|" + "---|" * len(results),
    ]

    def row(title: str, cell: Any) -> None:
        lines.append(f"| {title} | " + " | ".join(cell(results[f]) for f in results) + " |")

    for arm in ARMS:
        row(f"worker CPU per request, {arm} (µs)", lambda r, a=arm: f"{r['arms'][a]['worker_cpu_us']:.0f}")
    row(
        "CPU ratio, check / no check (95% CI)",
        lambda r: _ratio(r[CHECK]["cpu_ratio"], r[CHECK]["cpu_ratio_ci"], 4),
    )
    row("paired windows: median of check / no check", lambda r: f"{r[CHECK]['cpu_pair_ratio_median']:.4f}")
    row(
        "close_old_connections(), no check / check (µs per call, in-process)",
        lambda r: f"{r['direct'][NO_CHECK]:.2f} / {r['direct'][CHECK]:.2f}",
    )
    row(
        "the check's own CPU per request (2 calls), share of a request",
        lambda r: f"{r['direct']['added_us_per_request']:.2f} µs, {100 * r['direct']['share']:.2f} %",
    )
    row(f"target: at most {100 * (CPU_TARGET - 1):g} % more CPU per request", lambda r: yes(r["target_met"]))
    row(
        "CPU ratio, django / no check (95% CI)",
        lambda r: (
            f"{r[DJANGO]['cpu_ratio']:.3f} ({r[DJANGO]['cpu_ratio_ci'][0]:.3f} to {r[DJANGO]['cpu_ratio_ci'][1]:.3f})"
        ),
    )
    for arm in ARMS:
        row(f"requests/s, {arm}", lambda r, a=arm: f"{r['arms'][a]['median_rps']:.0f}")
    for arm in (CHECK, DJANGO):
        row(
            f"rate ratio, {arm} / no check (95% CI)",
            lambda r, a=arm: (
                f"{r[a]['rate_ratio']:.3f} ({r[a]['rate_ratio_ci'][0]:.3f} to {r[a]['rate_ratio_ci'][1]:.3f})"
            ),
        )
    row(
        "wrong answers / HTTP errors / failures, all arms",
        lambda r: " / ".join(
            str(sum(r["arms"][a]["checked"][k] for a in ARMS)) for k in ("wrong", "http_errors", "failures")
        ),
    )
    lines += ["", "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items() if k != "code"), ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = bench_arguments("The idle-session check's cost; writes bench/HEALTH_RESULTS.md.", RESULTS_PATH, argv)
    plan = QUICK if args.quick else FULL
    shutil.rmtree(OUT_DIR, ignore_errors=True)
    OUT_DIR.mkdir(parents=True)
    started = time.monotonic()
    env = {**environment(), **snapshot_code(CODE_DIR)}
    results: dict[str, dict[str, Any]] = {}
    with multiprocessing.get_context("fork").Pool(plan.clients.procs) as pool:
        for family in ("mysql", "postgres"):
            results[family] = run_family(family, plan, pool)
    for family in ("mysql", "postgres"):
        direct = direct_cost(family)
        added = 2 * (direct[CHECK] - direct[NO_CHECK])  # close_old_connections runs at a request's start and end
        share = added / results[family]["arms"][NO_CHECK]["worker_cpu_us"]
        results[family]["direct"] = {**direct, "added_us_per_request": added, "share": share}
        results[family]["target_met"] = share <= CPU_TARGET - 1
    took = time.monotonic() - started
    raw = {"plan": dataclasses.asdict(plan), "results": results}
    return write_report(OUT_DIR, raw, render(plan, env, results, took), args.results)


if __name__ == "__main__":
    sys.exit(main())
