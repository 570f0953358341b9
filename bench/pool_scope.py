"""POOL_SCOPE='transaction' against the request scope, on the render page (issue 22, deliverable 4).

    python -m bench.pool_scope           # full run (about 9 minutes); writes bench/SCOPE_RESULTS.md
    python -m bench.pool_scope --quick   # short run (about 2 minutes); --results PATH elsewhere

The render page (tests/project/overload_views.py) runs a query, 20 ms of pure-Python work, and a
second query. Under the request scope it holds its pooled session the whole time; under the
transaction scope it gives it back after each query and takes one again for the next. Two questions,
for gevent and asgi workers (`-w 1`) on MariaDB and PostgreSQL:

1. The rate with the same sessions: POOL_SIZE=1, 2 and 8, each scope, the same wrk load.
2. The sessions needed for the same rate: the request scope's rate at POOL_SIZE=8 is the reference;
   the smallest POOL_SIZE at which each scope reaches 95 % of it (1, 2, then 3, 4... up to the plan's
   limit, each scope's search ending once it has reached it).

Each arm is tests/support/overload.py's: a fresh Gunicorn master with one worker, warmed up with as many
keep-alive connections as the pool has slots, then loaded by wrk with `clients` keep-alive connections
(enough to saturate it: requests always queue for a session). A thread samples the server's session
count for the database throughout the arm (its peak must not pass POOL_SIZE). The arms of a cell run
mirrored, A B B A: request@8, transaction@8, request@2, transaction@2, transaction@1, request@1, then
transaction@2, request@2, transaction@8, request@8, so that a drift of the shared machine falls on both
scopes alike; the quick run stops after the first half. Then the search, against the reference of all the
request@8 runs: 3, 4... (the order alternating from size to size), each scope until it has reached 95 % of
it, or until its rate rose less than 3 % from one size to the next (bound by something else than sessions).

The servers run a snapshot of `serverhooks/`, `tests/` and gunicorn.conf.py as committed at HEAD
(bench/common.py's snapshot_code), so that edits in the checkout during a run do not mix versions.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import common

OUT_DIR = common.BENCH_DIR / "out" / "scope"
CODE_DIR = OUT_DIR / "code"
RESULTS_PATH = common.BENCH_DIR / "SCOPE_RESULTS.md"
COMMITTED = ("serverhooks", "tests", "gunicorn.conf.py")
WORKERS = ("gevent", "asgi")
FAMILIES = ("mysql", "postgres")
REQUEST, TRANSACTION = "request", "transaction"
SCOPES = (REQUEST, TRANSACTION)
SAME_RATE = 0.95  # "the same rate": at least this share of the reference
REFERENCE_SIZE = 8
FLAT = 1.03  # the search stops for a scope whose rate rose less than this from one size to the next
# What a worker's log should never say in these arms (serverhooks' own warnings start "serverhooks:").
LOG_TROUBLE = re.compile(r"\[(?:WARNING|ERROR|CRITICAL)\]|Traceback|serverhooks:|Warning:")


@dataclasses.dataclass(frozen=True)
class Plan:
    mode: str
    seconds: float  # wrk's measured run per arm
    warmup_seconds: float
    clients: int  # keep-alive connections: far more than any pool here, so requests always queue
    search_max: int  # the largest POOL_SIZE the search tries (sizes 1 and 2 always run)
    mirrored: bool  # the second half (B A) of each cell


FULL = Plan("full", seconds=5.0, warmup_seconds=1.5, clients=40, search_max=6, mirrored=True)
QUICK = Plan("quick", seconds=2.0, warmup_seconds=0.5, clients=40, search_max=2, mirrored=False)


def load_for(plan: Plan, size: int) -> Any:
    from tests.support.overload import Load

    return Load(clients=plan.clients, seconds=plan.seconds, warmup_seconds=plan.warmup_seconds, pool_size=size)


def driver_title(worker: str, family: str) -> str:
    from tests.support.overload import FIX, Arm

    if family == "postgres":
        return "psycopg 3"
    return "PyMySQL" if Arm(worker, family, "render", FIX).driver == "pymysql" else "mysqlclient"


def run_one(worker: str, family: str, database: str, scope: str, size: int, plan: Plan, seq: int) -> dict[str, Any]:
    """One arm, with the server's session count sampled throughout; a row (or a row saying it failed)."""
    from tests.support import dbserver
    from tests.support.overload import FIX, Arm, run_arm

    arm = Arm(worker, family, "render", FIX)
    base = {"cell": f"{worker}-{family}", "worker": worker, "family": family, "scope": scope, "size": size, "seq": seq}
    # The last arm's sessions must be gone from the server, or this arm's peak would count them.
    left = dbserver.wait_sessions_at_most(family, database, 0, timeout=15)
    tmp = OUT_DIR / f"{seq:02d}-{worker}-{family}-{scope}-{size}"
    extra = {"SERVERHOOKS_POOL_SCOPE": scope, **common.bytecode_env()}
    try:
        with dbserver.SessionSampler(family, database, interval=0.1) as sampler:
            result = run_arm(arm, database, load_for(plan, size), tmp, code_dir=CODE_DIR, extra_env=extra)
    except Exception as exc:  # one arm's failure is a figure too, not the end of the run
        return {**base, "failed": f"{type(exc).__name__}: {exc}"[:500]}
    run = result.run
    log = Path(result.log_path).read_text(errors="replace")
    trouble = [line for line in log.splitlines() if LOG_TROUBLE.search(line)]
    checkouts = result.pool.get("pool_opened", 0) + result.pool.get("pool_reused", 0)
    return {
        **base,
        "rate": round(run.rate, 2),
        "requests": run.requests,
        "p50_s": round(run.p50_s, 3),
        "p99_s": round(run.p99_s, 3),
        "max_s": round(run.max_s, 3),
        "non_2xx": run.non_2xx,
        "pool_timeouts": run.pool_timeouts,
        "socket_errors": run.socket_errors,
        "pool_waits": int(result.pool.get("pool_waits", 0)),
        # wrk leaves `clients` requests in flight at its end; the worker still serves them before the
        # counters are read.
        "checkouts_per_request": round(checkouts / (run.requests + plan.clients), 2),
        "sessions_peak": sampler.peak,
        "sessions_samples": sampler.samples,
        "sampler_refused": len(sampler.refused),
        "sessions_at_end": result.sessions_at_end,
        "sessions_left_before": len(left),
        "log_trouble": trouble[:5],
        "log_trouble_count": len(trouble),
        "seconds": round(result.seconds, 1),
    }


def mean_rate(rows: list[dict[str, Any]], cell: str, scope: str, size: int) -> float | None:
    rates = [r["rate"] for r in rows if "failed" not in r and (r["cell"], r["scope"], r["size"]) == (cell, scope, size)]
    return statistics.mean(rates) if rates else None


def reached(rows: list[dict[str, Any]], cell: str, scope: str, reference: float, below: int) -> bool:
    """Whether `scope` reached SAME_RATE x reference at some size below `below`."""
    for size in range(1, below):
        rate = mean_rate(rows, cell, scope, size)
        if rate is not None and rate >= SAME_RATE * reference:
            return True
    return False


def run_cell(worker: str, family: str, database: str, plan: Plan, rows: list[dict[str, Any]]) -> None:
    cell = f"{worker}-{family}"

    def arm(scope: str, size: int) -> None:
        row = run_one(worker, family, database, scope, size, plan, len(rows))
        rows.append(row)
        shown = {k: v for k, v in row.items() if k not in ("cell", "worker", "family", "log_trouble")}
        print(f"  {cell} {scope}@{size}: {shown}", flush=True)

    for scope, size in [
        (REQUEST, REFERENCE_SIZE),
        (TRANSACTION, REFERENCE_SIZE),
        (REQUEST, 2),
        (TRANSACTION, 2),
        (TRANSACTION, 1),
        (REQUEST, 1),
    ]:
        arm(scope, size)
    if plan.mirrored:
        for scope, size in [(TRANSACTION, 2), (REQUEST, 2), (TRANSACTION, REFERENCE_SIZE), (REQUEST, REFERENCE_SIZE)]:
            arm(scope, size)
    # The search, against the reference of all the request@8 runs: each scope goes on to the next
    # size until it has reached the reference, or until its rate stops rising (a worker bound by
    # something else than its sessions: more of them would not get it there either).
    reference = mean_rate(rows, cell, REQUEST, REFERENCE_SIZE)
    searching = {scope: reference is not None for scope in SCOPES}
    for size in range(3, plan.search_max + 1):
        order = list(SCOPES) if size % 2 else list(reversed(SCOPES))
        for scope in order:
            if not searching[scope] or reference is None:
                continue
            if reached(rows, cell, scope, reference, size) or _flat(rows, cell, scope, size):
                searching[scope] = False
                continue
            arm(scope, size)


def _flat(rows: list[dict[str, Any]], cell: str, scope: str, size: int) -> bool:
    """Whether the rate at size - 1 rose less than FLAT over size - 2's."""
    last, before = mean_rate(rows, cell, scope, size - 1), mean_rate(rows, cell, scope, size - 2)
    return last is not None and before is not None and last < FLAT * before


def run_all(plan: Plan) -> list[dict[str, Any]]:
    from tests.support import dbserver

    databases = {family: dbserver.create_database(family) for family in FAMILIES}
    rows: list[dict[str, Any]] = []
    try:
        for worker in WORKERS:
            for family in FAMILIES:
                run_cell(worker, family, databases[family], plan, rows)
    finally:
        for family, name in databases.items():
            common.drop_quietly(family, name)
    return rows


def _stats(rows: list[dict[str, Any]], cell: str, scope: str, size: int) -> dict[str, Any] | None:
    mine = [r for r in rows if "failed" not in r and (r["cell"], r["scope"], r["size"]) == (cell, scope, size)]
    if not mine:
        return None
    rates = [r["rate"] for r in mine]
    return {
        "n": len(mine),
        "rate": statistics.mean(rates),
        "rates": rates,
        "p50_s": statistics.mean(r["p50_s"] for r in mine),
        "p99_s": statistics.mean(r["p99_s"] for r in mine),
        "peak": max(r["sessions_peak"] for r in mine),
        "checkouts": statistics.mean(r["checkouts_per_request"] for r in mine),
    }


def summarise(rows: list[dict[str, Any]], plan: Plan) -> dict[str, Any]:
    good = [r for r in rows if "failed" not in r]
    cells = list(dict.fromkeys(r["cell"] for r in rows))
    same_sessions = []
    for cell in cells:
        for size in sorted({r["size"] for r in good if r["cell"] == cell and r["size"] in (1, 2, REFERENCE_SIZE)}):
            req, txn = _stats(rows, cell, REQUEST, size), _stats(rows, cell, TRANSACTION, size)
            if req and txn:
                same_sessions.append({"cell": cell, "size": size, "request": req, "transaction": txn})
    same_rate = []
    for cell in cells:
        ref = _stats(rows, cell, REQUEST, REFERENCE_SIZE)
        if ref is None:
            continue
        entry: dict[str, Any] = {"cell": cell, "reference": ref["rate"], "reference_rates": ref["rates"]}
        sizes = sorted({r["size"] for r in good if r["cell"] == cell})
        for scope in SCOPES:
            found = None
            curve = []
            for size in sizes:
                stats = _stats(rows, cell, scope, size)
                if stats is None:
                    continue
                curve.append((size, stats["rate"]))
                if found is None and size < REFERENCE_SIZE and stats["rate"] >= SAME_RATE * ref["rate"]:
                    found = (size, stats["rate"])
            tried = max((s for s, _ in curve if s < REFERENCE_SIZE), default=0)
            entry[scope] = {"found": found, "curve": curve, "tried_up_to": tried}
        same_rate.append(entry)
    spread = {}
    for key in sorted({(r["cell"], r["scope"], r["size"]) for r in good}):
        rates = [r["rate"] for r in good if (r["cell"], r["scope"], r["size"]) == key]
        if len(rates) > 1:
            spread["-".join(map(str, key))] = (max(rates) - min(rates)) / statistics.mean(rates)
    return {
        "failed": [r for r in rows if "failed" in r],
        "non_2xx": sum(r["non_2xx"] for r in good),
        "socket_errors": sum(r["socket_errors"] for r in good),
        "over_bound": [
            f"{r['cell']} {r['scope']}@{r['size']}: {r['sessions_peak']}"
            for r in good
            if r["sessions_peak"] > r["size"]
        ],
        "peak_max_ratio": max((r["sessions_peak"] / r["size"] for r in good), default=0.0),
        "samples_min": min((r["sessions_samples"] for r in good), default=0),
        "sampler_refused": sum(r["sampler_refused"] for r in good),
        "log_trouble": [f"{r['cell']} {r['scope']}@{r['size']}: {line}" for r in good for line in r["log_trouble"]],
        "log_trouble_count": sum(r["log_trouble_count"] for r in good),
        "scope_in_effect": {
            scope: (
                min((r["checkouts_per_request"] for r in good if r["scope"] == scope), default=0.0),
                max((r["checkouts_per_request"] for r in good if r["scope"] == scope), default=0.0),
            )
            for scope in SCOPES
        },
        "same_sessions": same_sessions,
        "same_rate": same_rate,
        "spread": spread,
        "spread_max": max(spread.values(), default=0.0),
    }


def _cell_title(cell: str) -> str:
    worker, family = cell.split("-")
    return f"{worker} | {common.FAMILY_TITLE[family]} ({driver_title(worker, family)})"


def _found(entry: dict[str, Any], scope: str) -> str:
    info = entry[scope]
    if info["found"] is None:
        rate_at = dict(info["curve"])
        best = max((rate for size, rate in info["curve"] if size < REFERENCE_SIZE), default=float("nan"))
        note = f"; best {best:.1f} /s" if info["curve"] else ""
        at_ref = rate_at.get(REFERENCE_SIZE)
        ref_note = f"; at {REFERENCE_SIZE}: {at_ref:.1f} /s" if at_ref is not None and scope == TRANSACTION else ""
        return f"not reached at <= {info['tried_up_to']}{note}{ref_note}"
    size, rate = info["found"]
    return f"**{size}** ({rate:.1f} /s, {rate / entry['reference'] * 100:.0f} %)"


def render(plan: Plan, env: dict[str, str], rows: list[dict[str, Any]], summary: dict[str, Any], took: float) -> str:
    load = load_for(plan, 2)
    out = common.report_head(
        "POOL_SCOPE='transaction' against the request scope: the render page (issue 22)",
        "bench.pool_scope",
        plan.mode,
        took,
        env,
    )
    out += [
        f"| machine | {env['cpu']}, {env['cores']} cores ({env['usable_cores']} usable), {env['os']} |",
        f"| versions | Python {env['python']}, Django {env['Django']}, Gunicorn {env['gunicorn']}, gevent "
        f"{env['gevent']}, psycopg {env['psycopg']}, PyMySQL {env['PyMySQL']}, mysqlclient {env['mysqlclient']}, "
        f"{env['wrk']} |",
        f"| databases | MariaDB {env['mysql_server']}, {env['postgres_server']} |",
        f"| code | serverhooks {env['serverhooks']}, commit {env['commit']} ({env['uncommitted']} uncommitted files "
        "left out of the snapshot) |",
        f"| load average | {env['load_before']} before, {env['load_after']} after (the machine is shared) |",
        "",
        "## Settings",
        "",
        "- Gunicorn `-w 1`, `-k gevent` or `-k asgi`, no preload, `max_requests = 0`, CONN_MAX_AGE=600, "
        f"POOL_TIMEOUT={load.pool_timeout:g} s; `SERVERHOOKS_POOL_SCOPE=request` or `transaction`; POOL_SIZE per arm.",
        f"- Page: **render** (tests/project/overload_views.py), `SELECT 1`, {load.render_ms:g} ms of pure-Python work "
        "(a loop until `perf_counter()` has advanced that much), `SELECT %s`. Under the request scope the session "
        "is held throughout; under the transaction scope only during each query.",
        f"- wrk, one thread, {plan.clients} keep-alive connections, {plan.seconds:g} s per arm after a "
        f"{plan.warmup_seconds:g} s warm-up with POOL_SIZE connections; wrk's timeout {load.wrk_timeout:g} s. "
        f"{plan.clients} connections on one worker keep requests queued for a session in every arm: the load "
        "saturates the worker.",
        "- Drivers: psycopg 3 on PostgreSQL; on MariaDB PyMySQL under gevent (mysqlclient blocks the hub), "
        "**mysqlclient** under asgi.",
        "- Order within a cell: request@8, transaction@8, request@2, transaction@2, transaction@1, request@1"
        + (
            ", transaction@2, request@2, transaction@8, request@8 (A B B A)"
            if plan.mirrored
            else " (one half of A B B A)"
        )
        + f"; then the search against the reference of all request@8 runs (3 to {plan.search_max}, the order "
        f"alternating by size), each scope until it has reached {SAME_RATE * 100:.0f} % of the reference or its rate "
        f"rose less than {(FLAT - 1) * 100:.0f} % from one size to the next (the worker bound by something else than "
        "its sessions). Every arm is a fresh master, after the last arm's sessions have left the server.",
        "- *sessions peak*: the server's own count of sessions on the arm's database (pg_stat_activity, "
        "information_schema.PROCESSLIST), sampled every 0.1 s from the master's start to its stop (warm-up "
        "included). *checkouts/req*: the worker's pool checkouts (pool_opened + pool_reused) over the requests it "
        "served in the measured run (wrk's, plus the connections' last ones, still in flight when wrk stopped): "
        "about 1 under the request scope, about 2 under the transaction scope (one per query), which shows the "
        "scope in effect.",
        "",
        "## Verdicts",
        "",
        "| | |",
        "|---|---|",
        "| 0 non-2xx answers and 0 socket errors, every arm | "
        f"{common.yes(summary['non_2xx'] + summary['socket_errors'] == 0)}"
        f" ({summary['non_2xx']} non-2xx, {summary['socket_errors']} socket errors in {len(rows)} arms) |",
        f"| sessions on the server never above POOL_SIZE | {common.yes(not summary['over_bound'])} "
        "(peak / POOL_SIZE at "
        f"most {summary['peak_max_ratio']:.2f}; at least {summary['samples_min']} samples an arm"
        + (f"; over: {', '.join(summary['over_bound'])}" if summary["over_bound"] else "")
        + (f"; the sampler was refused {summary['sampler_refused']} times" if summary["sampler_refused"] else "")
        + ") |",
        f"| the scope in effect (checkouts per request) | request {summary['scope_in_effect'][REQUEST][0]:.2f} to "
        f"{summary['scope_in_effect'][REQUEST][1]:.2f}, transaction {summary['scope_in_effect'][TRANSACTION][0]:.2f} "
        f"to {summary['scope_in_effect'][TRANSACTION][1]:.2f} |",
        f"| warnings or errors in the workers' logs | {summary['log_trouble_count']} lines |",
    ]
    if summary["failed"]:
        out.append(f"| arms that failed to run | {len(summary['failed'])}: see below and raw.json |")
    out += [
        "",
        "## The rate with the same sessions",
        "",
        "Means over the arm's runs (*n*); *txn/req*, the transaction scope's rate over the request scope's.",
        "",
        "| worker | database (driver) | POOL_SIZE | request: rate /s (n) | p50 s | p99 s | sessions peak "
        "| transaction: rate /s (n) | p50 s | p99 s | sessions peak | txn/req |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in summary["same_sessions"]:
        req, txn = entry["request"], entry["transaction"]
        out.append(
            f"| {_cell_title(entry['cell'])} | {entry['size']} | {req['rate']:.1f} ({req['n']}) | {req['p50_s']:.3f} "
            f"| {req['p99_s']:.3f} | {req['peak']} | {txn['rate']:.1f} ({txn['n']}) | {txn['p50_s']:.3f} "
            f"| {txn['p99_s']:.3f} | {txn['peak']} | **{txn['rate'] / req['rate']:.2f}** |"
        )
    out += [
        "",
        "## The sessions needed for the same rate",
        "",
        f"The reference: the request scope's rate at POOL_SIZE={REFERENCE_SIZE} (mean of its runs). Each scope's "
        f"smallest POOL_SIZE whose mean rate reaches {SAME_RATE * 100:.0f} % of it; *rate by POOL_SIZE*, the mean "
        "rates measured (request / transaction).",
        "",
        "| worker | database (driver) | reference /s (runs) | request scope needs | transaction scope needs "
        "| rate by POOL_SIZE, request / transaction |",
        "|---|---|---|---|---|---|",
    ]
    for entry in summary["same_rate"]:
        req_curve, txn_curve = dict(entry[REQUEST]["curve"]), dict(entry[TRANSACTION]["curve"])
        sizes = sorted(set(req_curve) | set(txn_curve))
        by_size = ", ".join(
            f"{s}: {req_curve[s]:.1f} / {txn_curve[s]:.1f}"
            if s in req_curve and s in txn_curve
            else f"{s}: {req_curve.get(s, float('nan')):.1f} / {txn_curve.get(s, float('nan')):.1f}"
            for s in sizes
        )
        runs = ", ".join(f"{x:.1f}" for x in entry["reference_rates"])
        out.append(
            f"| {_cell_title(entry['cell'])} | {entry['reference']:.1f} ({runs}) | {_found(entry, REQUEST)} "
            f"| {_found(entry, TRANSACTION)} | {by_size.replace('nan', '-')} |"
        )
    out += [
        "",
        "## Arms, in the order run",
        "",
        "| # | worker | database | scope | POOL_SIZE | rate /s | p50 s | p99 s | max s | non-2xx | socket errors "
        "| waits | checkouts/req | sessions peak | at end | log lines | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        head = f"| {r['seq']} | {r['worker']} | {common.FAMILY_TITLE[r['family']]} | {r['scope']} | {r['size']} "
        if "failed" in r:
            out.append(head + f"| failed: {r['failed']} |" + " |" * 11)
            continue
        out.append(
            head + f"| {r['rate']:.1f} | {r['p50_s']:.3f} | {r['p99_s']:.3f} | {r['max_s']:.3f} | {r['non_2xx']} "
            f"| {r['socket_errors']} | {r['pool_waits']} | {r['checkouts_per_request']:.2f} | {r['sessions_peak']} "
            f"| {r['sessions_at_end']} | {r['log_trouble_count']} | {r['seconds']:.0f} |"
        )
    if summary["spread"]:
        out += [
            "",
            "## Spread between runs of the same arm",
            "",
            "(max - min) / mean of an arm's rates within its cell: what this machine's noise is, against the "
            f"differences above (largest {summary['spread_max'] * 100:.1f} %).",
            "",
            "| arm | rates /s | spread |",
            "|---|---|---|",
        ]
        for key, value in summary["spread"].items():
            worker, family, scope, size = key.split("-")
            rates = [
                r["rate"]
                for r in rows
                if "failed" not in r and (r["cell"], r["scope"], str(r["size"])) == (f"{worker}-{family}", scope, size)
            ]
            out.append(
                f"| {worker}, {common.FAMILY_TITLE[family]}, {scope}@{size} | "
                f"{', '.join(f'{x:.1f}' for x in rates)} | {value * 100:.1f} % |"
            )
    if summary["log_trouble"]:
        out += ["", "## What the workers' logs said", ""]
        out += [f"- `{line}`" for line in summary["log_trouble"][:20]]
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = common.bench_arguments(
        "POOL_SCOPE='transaction' against the request scope on the render page; writes bench/SCOPE_RESULTS.md.",
        RESULTS_PATH,
        argv,
    )
    plan = QUICK if args.quick else FULL
    from bench.pool_overload import wrk_version
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
        **common.environment(("gevent", "PyMySQL")),
        **common.snapshot_code(CODE_DIR, COMMITTED),
        "wrk": wrk_version(),
    }
    print(f"{plan.mode} run; server logs in {OUT_DIR}", flush=True)
    rows = run_all(plan)
    env["load_after"] = common.load_average()
    took = time.monotonic() - started
    summary = summarise(rows, plan)
    raw = {"plan": dataclasses.asdict(plan), "env": env, "rows": rows, "summary": summary}
    return common.write_report(OUT_DIR, raw, render(plan, env, rows, summary, took), Path(args.results))


if __name__ == "__main__":
    sys.exit(main())
