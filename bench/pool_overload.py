"""The pools under overload (issue 22): first come, first served, against the old semaphore and Django's pool.

    python -m bench.pool_overload           # full matrix, 2 rounds (about 10 minutes); bench/OVERLOAD_RESULTS.md
    python -m bench.pool_overload --quick   # one short round (about 4 minutes); --results PATH elsewhere

Every cell of gevent and asgi workers x MariaDB and PostgreSQL x the sleep and render pages runs three
arms (tests/support/overload.py runs each): serverhooks as it is (fix), the same with the pool's permits
put back to the semaphore of before (control), and on PostgreSQL plain Django with its psycopg pool
bounded the same (peer). Each arm is a fresh Gunicorn master with one worker, warmed up, then loaded by
wrk with keep-alive connections. The order of the arms alternates from round to round, so that a
slow stretch of the machine does not always fall on the same arm.

The servers run a snapshot of `serverhooks/`, `tests/` and gunicorn.conf.py as committed at HEAD
(bench/common.py's snapshot_code), so that edits in the checkout during a run do not mix versions.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import common

OUT_DIR = common.BENCH_DIR / "out" / "overload"
CODE_DIR = OUT_DIR / "code"
RESULTS_PATH = common.BENCH_DIR / "OVERLOAD_RESULTS.md"
COMMITTED = ("serverhooks", "tests", "gunicorn.conf.py")
WORKERS = ("gevent", "asgi")
FAMILIES = ("mysql", "postgres")
PAGES = ("sleep", "render")
WORST_OVER_MEAN = 1.5  # the target for the fix
P99_TOLERANCE = 1.05  # as tests/integration/test_pool_overload.py: within the run-to-run spread


@dataclasses.dataclass(frozen=True)
class Plan:
    mode: str
    rounds: int
    seconds: float
    warmup_seconds: float


FULL = Plan("full", rounds=2, seconds=8.0, warmup_seconds=2.0)
QUICK = Plan("quick", rounds=1, seconds=4.0, warmup_seconds=1.0)


def arms_of_cell(worker: str, family: str, page: str, rnd: int) -> list[Any]:
    from tests.support.overload import CONTROL, FIX, PEER, Arm

    modes = [FIX, CONTROL] + ([PEER] if family == "postgres" else [])
    if rnd % 2:
        modes.reverse()
    return [Arm(worker, family, page, mode) for mode in modes]


def run_all(plan: Plan) -> list[dict[str, Any]]:
    from tests.support import dbserver
    from tests.support.overload import Load, run_arm

    load = Load(seconds=plan.seconds, warmup_seconds=plan.warmup_seconds)
    databases = {family: dbserver.create_database(family) for family in FAMILIES}
    rows: list[dict[str, Any]] = []
    try:
        for rnd in range(plan.rounds):
            for worker in WORKERS:
                for family in FAMILIES:
                    for page in PAGES:
                        for arm in arms_of_cell(worker, family, page, rnd):
                            tmp = OUT_DIR / f"r{rnd}-{arm.name}"
                            try:
                                result = run_arm(
                                    arm,
                                    databases[family],
                                    load,
                                    tmp,
                                    code_dir=CODE_DIR,
                                    extra_env=common.bytecode_env(),
                                )
                            except Exception as exc:  # one arm's failure is a figure too, not the end of the run
                                print(f"  round {rnd} {arm.name}: FAILED {type(exc).__name__}: {exc}", flush=True)
                                rows.append({"round": rnd, "arm": arm.name, "failed": f"{type(exc).__name__}: {exc}"})
                                continue
                            row = {"round": rnd, **result.row(), "mode": arm.mode, "cell": _cell(arm)}
                            rows.append(row)
                            print(f"  round {rnd} {arm.name}: {row}", flush=True)
    finally:
        for family, name in databases.items():
            common.drop_quietly(family, name)
    return rows


def _cell(arm: Any) -> str:
    return f"{arm.worker}-{arm.family}-{arm.page}"


def _arm_title(name: str) -> str:
    mode, worker, family, page = name.split("-")
    return f"{mode} | {worker} | {common.FAMILY_TITLE[family]} | {page}"


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    good = [r for r in rows if "failed" not in r]
    fix = [r for r in good if r["mode"] == "fix"]
    control = [r for r in good if r["mode"] == "control"]
    peers = [r for r in good if r["mode"] == "peer"]
    p99_pairs = []
    for peer in peers:
        ours = [r for r in fix if r["cell"] == peer["cell"] and r["round"] == peer["round"]]
        if ours:
            p99_pairs.append((peer["cell"], peer["round"], ours[0]["p99_s"], peer["p99_s"]))
    spread: dict[str, float] = {}  # rate spread of one arm across rounds: what back-to-back runs differ by
    for name in sorted({r["arm"] for r in good}):
        rates = [r["rate"] for r in good if r["arm"] == name]
        if len(rates) > 1:
            spread[name] = (max(rates) - min(rates)) / statistics.mean(rates)
    return {
        "failed": [r for r in rows if "failed" in r],
        "fix_timeouts": sum(r["pool_timeouts"] for r in fix),
        "fix_non_2xx": sum(r["non_2xx"] + r["socket_errors"] for r in fix),
        "fix_worst_over_mean": max((r["worst_over_mean"] for r in fix), default=float("nan")),
        "fix_within": all(r["worst_over_mean"] <= WORST_OVER_MEAN for r in fix),
        "control_over_bound": [r["arm"] for r in control if r["worst_over_mean"] > WORST_OVER_MEAN],
        "control_count": len(control),
        "control_starved_gevent": [
            r["arm"] for r in control if "gevent" in r["cell"] and r["p50_s"] < 0.5 * r["little_mean_s"]
        ],
        "control_gevent_count": len([r for r in control if "gevent" in r["cell"]]),
        "control_timeouts": sum(r["pool_timeouts"] for r in control),
        "p99_pairs": p99_pairs,
        "rate_spread": spread,
        "sessions_max": max((r["sessions_at_end"] for r in good), default=0),
    }


def render(plan: Plan, env: dict[str, str], rows: list[dict[str, Any]], summary: dict[str, Any], took: float) -> str:
    from tests.support.overload import Load

    load = Load(seconds=plan.seconds, warmup_seconds=plan.warmup_seconds)
    out = common.report_head(
        "The pools under overload: first come, first served (issue 22)", "bench.pool_overload", plan.mode, took, env
    )
    clean = summary["fix_timeouts"] == 0 and summary["fix_non_2xx"] == 0
    out += [
        f"| machine | {env['cpu']}, {env['cores']} cores ({env['usable_cores']} usable), {env['os']} |",
        f"| versions | Python {env['python']}, Django {env['Django']}, Gunicorn {env['gunicorn']}, gevent "
        f"{env['gevent']}, psycopg {env['psycopg']}, psycopg-pool {env['psycopg-pool']}, PyMySQL {env['PyMySQL']}, "
        f"mysqlclient {env['mysqlclient']}, {env['wrk']} |",
        f"| databases | MariaDB {env['mysql_server']}, {env['postgres_server']} |",
        f"| code | serverhooks {env['serverhooks']}, commit {env['commit']} ({env['uncommitted']} uncommitted files "
        "left out of the snapshot) |",
        f"| load average | {env['load_before']} before, {env['load_after']} after (the machine is shared) |",
        "",
        "## Settings",
        "",
        f"- Gunicorn `-w 1`, `-k gevent` or `-k asgi`, no preload, `max_requests = 0`, CONN_MAX_AGE=600; "
        f"POOL_SIZE={load.pool_size}, POOL_TIMEOUT={load.pool_timeout:g} s.",
        f"- wrk, one thread, {load.clients} keep-alive connections, {plan.seconds:g} s per arm after a "
        f"{plan.warmup_seconds:g} s warm-up with {load.pool_size} connections (opens the pool's sessions, leaves no "
        f"queue behind); wrk's timeout {load.wrk_timeout:g} s, above POOL_TIMEOUT, so that wrk never cuts a request "
        "the pool would still answer.",
        "- Pages (tests/project/overload_views.py): **sleep** holds its session in "
        f"`SELECT pg_sleep({load.sleep_ms / 1000:g})` / `SELECT SLEEP({load.sleep_ms / 1000:g})`; "
        f"**render** runs a query, {load.render_ms:g} ms of pure-Python "
        "work that never yields, and a second query, holding its session throughout.",
        "- Drivers: psycopg 3 on PostgreSQL; PyMySQL under gevent (mysqlclient blocks the hub), mysqlclient "
        "under asgi.",
        "- Arms: **fix**, serverhooks as committed; **control**, the same with tests/support/slots_control.py "
        "(the pool's permits back to the semaphore of before issue 22, a bounded semaphore taken first without "
        "waiting); **peer**, plain Django (gunicorn.conf.py without serverhooks' line) with `OPTIONS['pool']`, "
        f"max_size {load.pool_size} (bench/settings_peers.py).",
        f"- {plan.rounds} round(s); the arms' order within a cell alternates between rounds.",
        "",
        "*mean* is Little's law's: connections / rate, the mean time a request spent in the system. *worst/mean*"
        " is wrk's max over it: a first-come-first-served queue keeps it near 1. *PoolTimeouts* are the 503s the pages"
        " answer a pool timeout with; *other errors*, any other non-2xx answer or socket error."
        " *waits* and *wait s* are the worker's `pool_waits` and `pool_wait_seconds` over the"
        " measured run (0 for the peer, which serverhooks does not pool). *sessions* are the database's own count "
        "at the end, the master still up.",
        "",
        "## Verdicts",
        "",
        "| | |",
        "|---|---|",
        f"| fix: 0 PoolTimeouts, 0 non-2xx or socket errors | {common.yes(clean)} ({summary['fix_timeouts']} "
        f"PoolTimeouts, {summary['fix_non_2xx']} others) |",
        f"| fix: worst <= {WORST_OVER_MEAN:g} x mean in every arm | {common.yes(summary['fix_within'])} (largest "
        f"{summary['fix_worst_over_mean']:.2f}) |",
        f"| control: worst > {WORST_OVER_MEAN:g} x mean (overtaken requests) | {len(summary['control_over_bound'])} of "
        f"{summary['control_count']} control arms; {summary['control_timeouts']} PoolTimeouts in all |",
        f"| control under gevent: median below half the mean (newcomers pass, the queue starves) | "
        f"{len(summary['control_starved_gevent'])} of {summary['control_gevent_count']} |",
    ]
    for cell, rnd, ours, theirs in summary["p99_pairs"]:
        out.append(
            f"| {cell}, round {rnd}: p99 fix {ours:.3f} s, Django's pool {theirs:.3f} s (no worse: within "
            f"{(P99_TOLERANCE - 1) * 100:.0f} %) | {common.yes(ours <= P99_TOLERANCE * theirs)} "
            f"({ours / theirs:.3f} x) |"
        )
    out.append(f"| sessions on the server, at most | {summary['sessions_max']} (bound {load.pool_size}) |")
    if summary["failed"]:
        out.append(f"| arms that failed to run | {len(summary['failed'])}: see raw.json |")
    out += [
        "",
        "## Arms",
        "",
        "| round | arm | worker | database | page | rate /s | mean s | p50 s | p90 s | p99 s | max s | worst/mean "
        "| PoolTimeouts | other errors | waits | wait s | sessions |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "failed" in r:
            out.append(f"| {r['round']} | {r['arm']}: failed, {r['failed']} |" + " |" * 15)
            continue
        out.append(
            f"| {r['round']} | {_arm_title(r['arm'])} | {r['rate']:.1f} | {r['little_mean_s']:.3f} | {r['p50_s']:.3f} "
            f"| {r['p90_s']:.3f} | {r['p99_s']:.3f} | {r['max_s']:.3f} | {r['worst_over_mean']:.2f} "
            f"| {r['pool_timeouts']} | {r['non_2xx'] - r['pool_timeouts'] + r['socket_errors']} "
            f"| {r['pool_waits']:.0f} | {r['pool_wait_seconds']:.1f} | {r['sessions_at_end']} |"
        )
    if summary["rate_spread"]:
        out += [
            "",
            "## Spread between rounds",
            "",
            "The rate of one arm in its rounds, (max - min) / mean: what back-to-back runs of the same arm differ by "
            "on this machine (tests/integration/test_pool_overload.py's p99 tolerance against Django's pool rests "
            "on it).",
            "",
            "| arm | spread |",
            "|---|---|",
        ]
        out += [f"| {name} | {value * 100:.1f} % |" for name, value in sorted(summary["rate_spread"].items())]
    return "\n".join(out) + "\n"


def wrk_version() -> str:
    import subprocess

    from tests.support.overload import WRK

    out = subprocess.run([WRK, "-v"], capture_output=True, text=True, timeout=10)
    return (out.stdout + out.stderr).splitlines()[0].split(" Copyright")[0].strip() or "wrk ?"


def main(argv: Sequence[str] | None = None) -> int:
    args = common.bench_arguments(
        "Pools under overload with wrk; writes bench/OVERLOAD_RESULTS.md.", RESULTS_PATH, argv
    )
    plan = QUICK if args.quick else FULL
    from tests.support import dbserver
    from tests.support.overload import wrk_available

    if not wrk_available():
        print("wrk is not installed (Debian: apt-get install wrk)", file=sys.stderr)
        return 2
    for family in FAMILIES:
        reason = dbserver.reachable(family)
        if reason is not None:
            print(f"{family} server at {dbserver.server_url(family)} does not answer: {reason}", file=sys.stderr)
            return 2
    for key in [k for k in os.environ if k.startswith(("GUNICORN_", "BENCH_PEER"))]:
        os.environ.pop(key)  # the arms set their own; overload.start() drops SERVERHOOKS_* too
    shutil.rmtree(OUT_DIR, ignore_errors=True)
    OUT_DIR.mkdir(parents=True)
    started = time.monotonic()
    env = {
        **common.environment(("gevent", "PyMySQL", "psycopg-pool")),
        **common.snapshot_code(CODE_DIR, COMMITTED),
        "wrk": wrk_version(),
    }
    print(f"{plan.mode} run; server logs in {OUT_DIR}", flush=True)
    rows = run_all(plan)
    env["load_after"] = common.load_average()
    took = time.monotonic() - started
    summary = summarise(rows)
    raw = {"plan": dataclasses.asdict(plan), "env": env, "rows": rows, "summary": summary}
    return common.write_report(OUT_DIR, raw, render(plan, env, rows, summary, took), Path(args.results))


if __name__ == "__main__":
    sys.exit(main())
