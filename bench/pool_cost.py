"""What serverhooks' pool costs, against its best peers, on the interpreter that runs this bench.

    python -m bench.pool_cost                      # full run, about 4 minutes per leg
    python -m bench.pool_cost --quick              # smoke run, about a minute
    python -m bench.pool_cost --legs /work/venv-lts/bin/python,.venv/bin/python
                                                   # run each interpreter's leg in turn (a subprocess each)
    python -m bench.pool_cost --uncommitted        # serve the working tree, not HEAD (for trying pool changes)

Issue 22's deliverable 3, three parts, all on PostgreSQL, side by side in one run:

a) ASGI (`gunicorn -k asgi -w 2`, tests.project.asgi): serverhooks' pool (CONN_MAX_AGE 600, POOL_SIZE
   at its default) against Django's own psycopg pool (OPTIONS['pool'], CONN_MAX_AGE 0, max_size =
   POOL_SIZE per worker: bench/settings_peers.py). The issue's load shape: a batch of N requests
   (1000 in a full run), 20 at a time, each on a fresh client connection, GET /count (one SELECT);
   rate = answers / (last answer - start). Alternated pairs (A B, then B A), each window on a fresh
   master after a warm-up batch; ratio of medians with a bootstrap 95 % interval.
b) gevent (`-k gevent -w 2`): serverhooks' pool against the sync-worker ceiling (`-k sync -w 2`,
   no hooks, persistent sessions), as bench/gevent_bench.py defines it; the same kind of batch.
c) a sampling profile (py-spy) of a `-w 1` gevent worker with the pool on, serving /count under
   the same load: the share of the worker's samples inside serverhooks/pool/* (which includes the
   connection handler's intercept, pool/active.py `__getitem__`, and everything it calls: checkout,
   checkin, release_current, make_clean, drop_dead_session, the health poll), inside any of
   serverhooks, and the top serverhooks frames, self and total.

Each run writes its own leg's section of bench/POOL_COST_RESULTS.md (a leg is Django x.y / Python
x.y, read from the interpreter), keeping the other legs' sections as they were (each says its date
and commit). Logs, raw numbers and profiles go to bench/out/pool_cost/<leg>/ (git-ignored).
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
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench import common

if TYPE_CHECKING:
    from multiprocessing.pool import Pool

    from tests.support.procs import Server

OUT_ROOT = common.BENCH_DIR / "out" / "pool_cost"
RESULTS_PATH = common.BENCH_DIR / "POOL_COST_RESULTS.md"
COMMITTED = ("serverhooks", "tests", "gunicorn.conf.py")
ENDPOINT = "/count"
EXPECTED = b'{"count": 0}'

# Targets (issue 22, deliverable 3).
ASGI_TARGET = 1.0  # serverhooks / Django's psycopg pool
GEVENT_TARGET = 0.95  # serverhooks / sync-worker ceiling
PROFILE_TARGET = 0.02  # the pool's share of a -w 1 gevent worker's samples


@dataclasses.dataclass(frozen=True)
class Plan:
    mode: str
    asgi_pairs: int
    asgi_requests: int  # per measured batch
    gevent_pairs: int
    gevent_requests: int
    warmup_requests: int
    clients: common.Clients
    profile_seconds: float
    profile_rate: int  # samples per second


QUICK = Plan(
    mode="quick",
    asgi_pairs=1,
    asgi_requests=400,
    gevent_pairs=1,
    gevent_requests=2000,
    warmup_requests=200,
    clients=common.Clients(procs=4, threads=5),
    profile_seconds=4.0,
    profile_rate=200,
)
FULL = dataclasses.replace(
    QUICK, mode="full", asgi_pairs=6, asgi_requests=1000, gevent_pairs=5, gevent_requests=4000, warmup_requests=300,
    profile_seconds=15.0,
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Arm:
    key: str
    title: str
    worker_class: str
    hooks: bool
    conn_max_age: int
    peer: str = ""
    url_query: str = ""


SH_ASGI = Arm("sh_asgi", "serverhooks pool, asgi, CMA=600", "asgi", True, 600)
DJ_ASGI = Arm("dj_asgi", "Django's psycopg pool, asgi, CMA=0", "asgi", False, 0, "djangopool", "pool=1")
SH_GEVENT = Arm("sh_gevent", "serverhooks pool, gevent, CMA=600", "gevent", True, 600)
SYNC = Arm("sync", "sync-worker ceiling, no hooks, CMA=600", "sync", False, 600)

# =========================================================================== load


@dataclasses.dataclass
class BatchCounts:
    requests: int = 0
    in_window: int = 0
    ok: int = 0
    wrong: int = 0
    http_errors: int = 0
    failures: int = 0
    client_cpu_s: float = 0.0
    first_start: float = float("inf")
    last_done: float = 0.0
    examples: list[str] = dataclasses.field(default_factory=list)

    def add(self, other: BatchCounts) -> None:
        for name in ("requests", "in_window", "ok", "wrong", "http_errors", "failures", "client_cpu_s"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.first_start = min(self.first_start, other.first_start)
        self.last_done = max(self.last_done, other.last_done)
        self.examples = (self.examples + other.examples)[:5]

    def note(self, problem: str) -> None:
        if len(self.examples) < 5:
            self.examples.append(problem)

    @property
    def errors(self) -> int:
        return self.wrong + self.http_errors + self.failures


def _client_thread(path: str, prefix: str, start_at: float, end_at: float, limit: int, out: BatchCounts) -> None:
    """`limit` requests one after the other (end_at is only a safety stop); CLOCK_MONOTONIC is
    system-wide, so the times of every client process compare."""

    def send(i: int) -> tuple[str, str]:
        status, body = common.http_get(path, f"{ENDPOINT}?m={prefix}x{i}")
        out.last_done = time.monotonic()
        if status != 200:
            return "http", f"HTTP {status}: {body[:80]!r}"
        return ("ok", "") if body.strip() == EXPECTED else ("wrong", f"unexpected answer {body[:80]!r}")

    out.first_start = start_at
    common.timed_requests(start_at, end_at, limit, out, send)


def _client_process(args: tuple[str, int, float, float, int]) -> BatchCounts:
    return common.run_client_threads(_client_thread, BatchCounts, args)


@dataclasses.dataclass
class Batch:
    requests: int
    seconds: float
    counts: BatchCounts
    worker_cpu_s: float
    db_cpu_s: float
    other_cores: float

    @property
    def rps(self) -> float:
        return self.counts.in_window / self.seconds if self.seconds > 0 else 0.0


def run_batch(pool: Pool, server: Server, total: int, clients: common.Clients, seconds: float = 0.0) -> Batch:
    """`total` requests, `clients.concurrency` at a time (each client thread total / concurrency);
    or, with `seconds`, as many as they make in that time."""
    from bench.gevent_bench import CpuSnapshot, _db_cpu_delta

    per_thread = max(1, total // clients.concurrency) if not seconds else 10**6
    before = CpuSnapshot.take(server)
    start_at = time.monotonic() + 0.1
    end_at = start_at + (seconds or 120.0)
    args = [(server.socket_path, clients.threads, start_at, end_at, per_thread)] * clients.procs
    parts = pool.map_async(_client_process, args, chunksize=1).get(timeout=200.0)
    after = CpuSnapshot.take(server)
    counts = BatchCounts()
    for part in parts:
        counts.add(part)
    seconds = min(counts.last_done, end_at) - start_at
    workers = after.workers - before.workers
    db = _db_cpu_delta(before.databases, after.databases)
    other = (after.machine - before.machine) - workers - db - (after.bench - before.bench) - counts.client_cpu_s
    return Batch(counts.ok, seconds, counts, workers, db, max(0.0, other) / (after.at - before.at))


# =========================================================================== servers


def _conf_source(hooks: bool, code_dir: Path) -> str:
    from bench import gevent_bench

    return gevent_bench._conf_source(hooks, code_dir)


def arm_env(arm: Arm, database: str, pool_size: int) -> dict[str, str]:
    from tests.support import dbserver

    env = {
        "DATABASE_URL": dbserver.django_url("postgres", database, "", arm.url_query),
        "DJANGO_SETTINGS_MODULE": "bench.settings_peers" if arm.peer else "tests.project.settings",
        "CONN_MAX_AGE": str(arm.conn_max_age),
        "GUNICORN_WORKER_CLASS": arm.worker_class,
        "GUNICORN_PRELOAD": "0",
        "GUNICORN_LOGLEVEL": "info",
        **common.bytecode_env(),
    }
    if arm.peer:
        env.update(BENCH_PEER=arm.peer, BENCH_PEER_POOL_SIZE=str(pool_size))
    return env


def start_server(arm: Arm, database: str, pool_size: int, code_dir: Path, log_dir: Path, workers: int = 2) -> Server:
    from tests.support import procs

    app = "tests.project.asgi:application" if arm.worker_class == "asgi" else "tests.project.wsgi:application"
    server = procs.start_gunicorn(
        log_dir,
        arm_env(arm, database, pool_size),
        settings={"_source": _conf_source(arm.hooks, code_dir)},
        app=app,
        workers=workers,
    )
    try:
        server.wait_ready(60.0)
    except BaseException:
        server.stop()
        print(f"--- {arm.key}: server log ---\n{server.log()[-5000:]}", file=sys.stderr)
        raise
    return server


def _wait_no_sessions(database: str, timeout: float = 20.0) -> None:
    from tests.support import dbserver

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = dbserver.query("postgres", "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = %s", (database,))
        if not rows[0][0]:
            return
        time.sleep(0.05)


@dataclasses.dataclass
class Window:
    arm: str
    pair: int
    position: int
    batch: Batch
    warmup_errors: int
    warmup_examples: list[str]


def run_window(
    arm: Arm, pair: int, position: int, database: str, pool_size: int, plan: Plan, total: int, pool: Pool, out: Path
) -> Window:
    server = start_server(arm, database, pool_size, out / "code", out / f"{arm.key}-p{pair}")
    try:
        warm = run_batch(pool, server, plan.warmup_requests, plan.clients)
        batch = run_batch(pool, server, total, plan.clients)
    finally:
        server.stop()
    _wait_no_sessions(database)
    return Window(arm.key, pair, position, batch, warm.counts.errors, warm.counts.examples)


def run_pairs(
    a: Arm, b: Arm, pairs: int, total: int, plan: Plan, pool: Pool, databases: dict[str, str], pool_size: int, out: Path
) -> list[Window]:
    windows: list[Window] = []
    for pair in range(pairs):
        order = (a, b) if pair % 2 == 0 else (b, a)
        line = []
        for position, arm in enumerate(order):
            w = run_window(arm, pair, position, databases[arm.key], pool_size, plan, total, pool, out)
            windows.append(w)
            line.append(
                f"{arm.key}={w.batch.rps:.0f}/s ({w.batch.worker_cpu_s / max(1, w.batch.counts.ok) * 1e6:.0f} µs "
                f"worker CPU/req" + (f", {w.batch.counts.errors} errors" if w.batch.counts.errors else "") + ")"
            )
        print(f"  pair {pair + 1}/{pairs}: " + ", ".join(line), flush=True)
    return windows


# =========================================================================== profile


POOL_PART = "serverhooks/pool/"
FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*)(?::(?P<line>\d+))?\)$")


def _frame_label(frame: str, code_dir: Path) -> tuple[str, str]:
    """(function, file relative to the snapshot or site-packages) of a py-spy frame."""
    m = FRAME.match(frame.strip())
    if not m:
        return frame.strip(), ""
    path = m.group("file")
    for root in (str(code_dir) + "/", "site-packages/"):
        if root in path:
            path = path.split(root, 1)[1]
    return m.group("func"), path


def profile_worker(plan: Plan, pool: Pool, database: str, pool_size: int, out: Path) -> dict[str, Any]:
    """py-spy on a `-w 1` gevent worker with the pool on, while the load client runs."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        return {"error": "py-spy is not installed (pip install py-spy)"}
    code_dir = out / "code"
    server = start_server(SH_GEVENT, database, pool_size, code_dir, out / "profile", workers=1)
    raw_path = out / "profile" / "profile.txt"
    try:
        run_batch(pool, server, plan.warmup_requests * 4, plan.clients)
        (worker,) = server.workers()
        spy = subprocess.Popen(
            [py_spy, "record", "--pid", str(worker), "--format", "raw", "--rate", str(plan.profile_rate),
             "--duration", str(int(plan.profile_seconds)), "--nolineno", "--output", str(raw_path)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        # Load for longer than the profile lasts: the requests cover the whole sampling.
        batch = run_batch(pool, server, 0, plan.clients, seconds=plan.profile_seconds + 2.0)
        spy_out, _ = spy.communicate(timeout=60)
    finally:
        server.stop()
    _wait_no_sessions(database)
    if spy.returncode != 0 or not raw_path.exists():
        return {"error": f"py-spy failed ({spy.returncode}): {spy_out.decode(errors='replace')[-500:]}"}
    return {**analyse_profile(raw_path.read_text(), code_dir), "load_rps": batch.rps, "load_seconds": batch.seconds}


def analyse_profile(text: str, code_dir: Path) -> dict[str, Any]:
    total = 0
    in_pool = in_serverhooks = pool_self = serverhooks_self = 0
    self_counts: Counter[tuple[str, str]] = Counter()
    total_counts: Counter[tuple[str, str]] = Counter()
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        n = int(count_text)
        frames = [_frame_label(f, code_dir) for f in stack.split(";")[1:]]  # [0] is the thread
        total += n
        ours = [f for f in frames if f[1].startswith("serverhooks/")]
        if any(f[1].startswith(POOL_PART) for f in frames):
            in_pool += n
        if ours:
            in_serverhooks += n
        if frames and frames[-1][1].startswith("serverhooks/"):
            serverhooks_self += n
            self_counts[frames[-1]] += n
            if frames[-1][1].startswith(POOL_PART):
                pool_self += n
        for f in set(ours):
            total_counts[f] += n
    share = (lambda n: n / total) if total else (lambda n: float("nan"))
    top = sorted(total_counts, key=lambda f: (-total_counts[f], f))[:15]
    return {
        "samples": total,
        "pool_total": share(in_pool),
        "pool_self": share(pool_self),
        "serverhooks_total": share(in_serverhooks),
        "serverhooks_self": share(serverhooks_self),
        "top": [
            {"function": f[0], "file": f[1], "self": share(self_counts[f]), "total": share(total_counts[f])}
            for f in top
        ],
    }


# =========================================================================== summary and report


def _ratio(windows: list[Window], a: str, b: str) -> dict[str, Any]:
    ra = [w.batch.rps for w in windows if w.arm == a]
    rb = [w.batch.rps for w in windows if w.arm == b]
    pairs = sorted({w.pair for w in windows})
    per_pair = []
    for p in pairs:
        x = [w.batch.rps for w in windows if w.pair == p and w.arm == a]
        y = [w.batch.rps for w in windows if w.pair == p and w.arm == b]
        if x and y and y[0]:
            per_pair.append(x[0] / y[0])
    return {
        "a_rates": ra,
        "b_rates": rb,
        "a_median": common.median(ra),
        "b_median": common.median(rb),
        "ratio": common.median(ra) / common.median(rb) if rb and common.median(rb) else float("nan"),
        "ci": common.bootstrap(rb, ra, lambda x, y: y / x if x else float("nan")),
        "per_pair": per_pair,
        "pair_median": common.median(per_pair),
    }


def _arm_stats(windows: list[Window], key: str) -> dict[str, Any]:
    mine = [w for w in windows if w.arm == key]

    def per_req(field: str) -> float:
        return common.median([getattr(w.batch, field) / max(1, w.batch.counts.ok) * 1e6 for w in mine])

    return {
        "rates": [w.batch.rps for w in mine],
        "worker_cpu_us": per_req("worker_cpu_s"),
        "db_cpu_us": per_req("db_cpu_s"),
        "client_cpu_us": common.median([w.batch.counts.client_cpu_s / max(1, w.batch.counts.ok) * 1e6 for w in mine]),
        "other_cores_max": max((w.batch.other_cores for w in mine), default=float("nan")),
        "errors": sum(w.batch.counts.errors + w.warmup_errors for w in mine),
        "requests": sum(w.batch.counts.requests + w.batch.counts.failures for w in mine),
        "examples": [e for w in mine for e in w.warmup_examples + w.batch.counts.examples][:3],
    }


def leg_key(env: dict[str, str]) -> str:
    django = ".".join(env["Django"].split(".")[:2])
    python = ".".join(env["python"].split(".")[:2])
    return f"Django {django} / Python {python}"


def _fmt_ratio(r: dict[str, Any]) -> str:
    lo, hi = r["ci"]
    return f"{r['ratio']:.3f} (95% CI {lo:.3f} to {hi:.3f})"


def render_leg(plan: Plan, env: dict[str, str], summary: dict[str, Any], took: float) -> str:
    key = leg_key(env)
    a, g, p = summary["asgi"], summary["gevent"], summary["profile"]
    arms = summary["arms"]
    lines = [
        f"<!-- leg: {key} -->",
        f"## {key}",
        "",
        f"Written by `python -m bench.pool_cost{' --quick' if plan.mode == 'quick' else ''}` with {env['executable']} "
        f"({plan.mode} run, {took:.0f} s).",
        "",
        "| | |",
        "|---|---|",
        f"| date | {env['date']} |",
        f"| machine | {env['cores']} cores ({env['usable_cores']} usable), {env['cpu']}, {env['os']}; shared with "
        "other work |",
        f"| load average (1, 5, 15 min) | before: {env['load_before']}; after: {env['load_after']} |",
        f"| Python, Django, asgiref | {env['python']}, {env['Django']}, {env['asgiref']} |",
        f"| gunicorn, gevent, greenlet | {env['gunicorn']}, {env['gevent']}, {env['greenlet']} |",
        f"| psycopg, psycopg-pool, py-spy | {env['psycopg']}, {env['psycopg-pool']}, {env['py-spy']} |",
        f"| serverhooks | {env['serverhooks']}, {env['code_from']} |",
        f"| PostgreSQL | {env['postgres_server']} on 127.0.0.1 |",
        "",
        "| target | measured | met |",
        "|---|---|---|",
        f"| a) ASGI: serverhooks' pool at least {ASGI_TARGET:g}x Django's psycopg pool (req/s, {plan.asgi_pairs} "
        f"alternated pairs of {plan.asgi_requests} requests) | {_fmt_ratio(a)}: {a['a_median']:.0f} vs "
        f"{a['b_median']:.0f} req/s; per pair: {' '.join(f'{x:.2f}' for x in a['per_pair'])} "
        f"| {common.verdict(a['ratio'] >= ASGI_TARGET, a['ci'], ASGI_TARGET)} |",
        f"| b) gevent: serverhooks' pool at least {GEVENT_TARGET:g}x the sync-worker ceiling (req/s, "
        f"{plan.gevent_pairs} alternated pairs of {plan.gevent_requests} requests) | {_fmt_ratio(g)}: "
        f"{g['a_median']:.0f} vs {g['b_median']:.0f} req/s; per pair: {' '.join(f'{x:.2f}' for x in g['per_pair'])} "
        f"| {common.verdict(g['ratio'] >= GEVENT_TARGET, g['ci'], GEVENT_TARGET)} |",
    ]
    if "error" in p:
        lines.append(f"| c) the pool's share of a `-w 1` gevent worker's samples at most {PROFILE_TARGET:.0%} "
                     f"| not measured: {p['error']} | |")  # fmt: skip
    else:
        lines.append(
            f"| c) the pool's share of a `-w 1` gevent worker's samples at most {PROFILE_TARGET:.0%} "
            f"| {p['pool_total']:.1%} inside serverhooks/pool/* (self {p['pool_self']:.1%}); all of serverhooks "
            f"{p['serverhooks_total']:.1%} (self {p['serverhooks_self']:.1%}); {p['samples']} samples "
            f"| {common.yes(p['pool_total'] <= PROFILE_TARGET)} |"
        )
    errors = sum(s["errors"] for s in arms.values())
    lines.append(f"| every answer right | {errors} errors or wrong answers | {common.yes(errors == 0)} |")
    lines += [
        "",
        "| arm | every window (req/s) | worker CPU µs/req | database CPU µs/req | client CPU µs/req "
        "| other work, max (cores) | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm in (SH_ASGI, DJ_ASGI, SH_GEVENT, SYNC):
        s = arms[arm.key]
        lines.append(
            f"| {arm.title} | {' '.join(f'{x:.0f}' for x in s['rates'])} | {s['worker_cpu_us']:.0f} "
            f"| {s['db_cpu_us']:.0f} | {s['client_cpu_us']:.0f} | {s['other_cores_max']:.2f} | {s['errors']} |"
        )
    problems = [f"{a.title}: `{e}`" for a in (SH_ASGI, DJ_ASGI, SH_GEVENT, SYNC)
                for e in arms[a.key]["examples"]]  # fmt: skip
    if problems:
        lines += ["", "First problems seen: " + "; ".join(problems[:6])]
    if "error" not in p:
        lines += [
            "",
            f"Profile: py-spy {plan.profile_rate} Hz for {plan.profile_seconds:g} s on the one worker of "
            f"`-k gevent -w 1` (pool on, CONN_MAX_AGE 600), GET {ENDPOINT} by {plan.clients.concurrency} clients "
            f"({p['load_rps']:.0f} req/s meanwhile); idle samples (the hub waiting) left out, so shares are of the "
            "worker's busy time. *Total*: samples with the function anywhere on the stack; *self*: at the top.",
            "",
            "| serverhooks frame | file | total | self |",
            "|---|---|---|---|",
            *(f"| `{t['function']}` | {t['file']} | {t['total']:.2%} | {t['self']:.2%} |" for t in p["top"]),
        ]
    lines += ["", f"<!-- summary: {json.dumps(_short(key, env, summary))} -->", f"<!-- end leg: {key} -->", ""]
    return "\n".join(lines)


def _short(key: str, env: dict[str, str], summary: dict[str, Any]) -> dict[str, Any]:
    p = summary["profile"]
    return {
        "leg": key,
        "date": env["date"],
        "commit": env["commit"],
        "asgi": [summary["asgi"]["ratio"], *summary["asgi"]["ci"]],
        "gevent": [summary["gevent"]["ratio"], *summary["gevent"]["ci"]],
        "pool_share": p.get("pool_total"),
        "serverhooks_share": p.get("serverhooks_total"),
    }


LEG_BLOCK = re.compile(r"<!-- leg: (?P<key>[^>]*?) -->\n.*?<!-- end leg: (?P=key) -->\n", re.DOTALL)
SUMMARY_LINE = re.compile(r"<!-- summary: (?P<json>\{.*\}) -->")


def merge_results(path: Path, key: str, section: str) -> str:
    """The whole report: the head, a table of every leg, and each leg's section (this one replaced)."""
    sections: dict[str, str] = {}
    if path.exists():
        for m in LEG_BLOCK.finditer(path.read_text()):
            sections[m.group("key")] = m.group(0)
    sections[key] = section if section.endswith("\n") else section + "\n"
    rows = []
    for k in sorted(sections):
        summary = SUMMARY_LINE.search(sections[k])
        if not summary:
            continue
        s = json.loads(summary.group("json"))
        share = "n/a" if s["pool_share"] is None else f"{s['pool_share']:.1%} ({s['serverhooks_share']:.1%})"
        rows.append(
            f"| {k} | {s['asgi'][0]:.3f} ({s['asgi'][1]:.3f} to {s['asgi'][2]:.3f}) "
            f"| {s['gevent'][0]:.3f} ({s['gevent'][1]:.3f} to {s['gevent'][2]:.3f}) | {share} "
            f"| {s['commit']}, {s['date']} |"
        )
    head = [
        "# What serverhooks' pool costs, on every leg of the matrix",
        "",
        "Written by `python -m bench.pool_cost` (each interpreter writes its own leg's section and keeps the "
        "others'; `--legs PY1,PY2` runs several); bench/pool_cost.py's docstring says what each figure means. "
        "Regenerate rather than edit.",
        "",
        f"| leg | a) ASGI: serverhooks / Django's psycopg pool, req/s (95% CI); target {ASGI_TARGET:g} "
        f"| b) gevent: serverhooks / sync-worker ceiling (95% CI); target {GEVENT_TARGET:g} "
        f"| c) pool's share of a gevent worker's samples (all serverhooks); target {PROFILE_TARGET:.0%} "
        "| commit, date |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ]
    return "\n".join(head) + "\n" + "\n".join(sections[k] for k in sorted(sections))


# =========================================================================== main


def take_code(code_dir: Path, uncommitted: bool) -> dict[str, str]:
    if not uncommitted:
        info = common.snapshot_code(code_dir, COMMITTED)
        left = f"; {info['uncommitted']} uncommitted change(s) left out" if info["uncommitted"] != "0" else ""
        return {**info, "code_from": f"as committed in {info['commit']}{left}"}
    shutil.rmtree(code_dir, ignore_errors=True)
    code_dir.mkdir(parents=True)
    for name in COMMITTED:
        source = common.REPO / name
        if source.is_dir():
            shutil.copytree(source, code_dir / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, code_dir / name)
    shutil.copytree(common.BENCH_DIR, code_dir / "bench", ignore=shutil.ignore_patterns("__pycache__", "out", "*.md"))
    compile_env = {**os.environ, **common.bytecode_env()}
    command = [sys.executable, "-m", "compileall", "-q", str(code_dir)]
    subprocess.run(command, env=compile_env, check=True, timeout=120, stdout=subprocess.DEVNULL)
    commit = common.git("rev-parse", "--short", "HEAD").decode().strip()
    version = re.search(r'__version__ = "([^"]+)"', (code_dir / "serverhooks" / "__init__.py").read_text())
    return {
        "serverhooks": version.group(1) if version else "?",
        "commit": commit + "+uncommitted",
        "uncommitted": "working tree",
        "code_from": f"the working tree on {commit}, uncommitted changes included (--uncommitted)",
    }


def run_leg(plan: Plan, uncommitted: bool) -> tuple[dict[str, str], dict[str, Any], dict[str, Any]]:
    import multiprocessing

    from bench import gevent_bench
    from tests.support import dbserver

    env = {**common.environment(("asgiref", "gevent", "greenlet", "psycopg-pool", "py-spy"))}
    env["executable"] = sys.executable
    out = OUT_ROOT / re.sub(r"[^A-Za-z0-9.]+", "-", leg_key(env))
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env.update(take_code(out / "code", uncommitted))
    print(f"{leg_key(env)}: {plan.mode} run; logs in {out}", flush=True)
    databases: dict[str, str] = {}
    try:
        for arm in (SH_ASGI, DJ_ASGI, SH_GEVENT, SYNC):
            databases[arm.key] = dbserver.create_database("postgres")
        databases["profile"] = dbserver.create_database("postgres")
        pool_size = gevent_bench.resolved_pool_size(databases[SH_GEVENT.key], out / "code")
        for key, name in databases.items():
            arm = {a.key: a for a in (SH_ASGI, DJ_ASGI, SH_GEVENT, SYNC)}.get(key, SH_GEVENT)
            common.schema(arm_env(arm, name, pool_size), out / "code")
        with multiprocessing.get_context("fork").Pool(plan.clients.procs) as pool:
            print("a) ASGI, PostgreSQL: serverhooks' pool vs Django's psycopg pool", flush=True)
            asgi = run_pairs(
                SH_ASGI, DJ_ASGI, plan.asgi_pairs, plan.asgi_requests, plan, pool, databases, pool_size, out
            )
            print("b) gevent, PostgreSQL: serverhooks' pool vs the sync-worker ceiling", flush=True)
            gevent = run_pairs(
                SH_GEVENT, SYNC, plan.gevent_pairs, plan.gevent_requests, plan, pool, databases, pool_size, out
            )
            print("c) profile of a -w 1 gevent worker", flush=True)
            profile = profile_worker(plan, pool, databases["profile"], pool_size, out)
    finally:
        for name in databases.values():
            common.drop_quietly("postgres", name)
    env["load_after"] = common.load_average()
    windows = asgi + gevent
    summary = {
        "pool_size": pool_size,
        "asgi": _ratio(asgi, SH_ASGI.key, DJ_ASGI.key),
        "gevent": _ratio(gevent, SH_GEVENT.key, SYNC.key),
        "arms": {arm.key: _arm_stats(windows, arm.key) for arm in (SH_ASGI, DJ_ASGI, SH_GEVENT, SYNC)},
        "profile": profile,
    }
    raw = {"plan": dataclasses.asdict(plan), "env": env, "windows": [dataclasses.asdict(w) for w in windows],
           "summary": summary}  # fmt: skip
    (out / "raw.json").write_text(json.dumps(raw, indent=1, default=str))
    return env, summary, raw


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="serverhooks' pool cost against its peers; writes a leg's section.")
    parser.add_argument("--quick", action="store_true", help="short smoke run (about a minute per leg)")
    parser.add_argument("--results", type=Path, default=RESULTS_PATH, help=f"the report (default {RESULTS_PATH})")
    parser.add_argument("--uncommitted", action="store_true", help="serve the working tree, not HEAD's code")
    parser.add_argument("--legs", default="", help="comma-separated interpreters: run this bench under each in turn")
    parser.add_argument("--no-wait", action="store_true", help="accepted for the other benches' sake; never waits")
    args = parser.parse_args(argv)
    os.chdir(common.REPO)
    if str(common.REPO) not in sys.path:
        sys.path.insert(0, str(common.REPO))
    if args.legs:
        status = 0
        for python in [p for p in args.legs.split(",") if p]:
            cmd = [python, "-m", "bench.pool_cost", "--results", str(args.results.resolve())]
            cmd += ["--quick"] * args.quick + ["--uncommitted"] * args.uncommitted
            print(f"=== {' '.join(cmd)}", flush=True)
            status = max(status, subprocess.run(cmd, cwd=common.REPO, check=False).returncode)
        return status
    from bench import gevent_bench
    from tests.support import dbserver

    reason = dbserver.reachable("postgres")
    if reason is not None:
        print(f"postgres server at {dbserver.server_url('postgres')} does not answer: {reason}", file=sys.stderr)
        return 2
    plan = QUICK if args.quick else FULL
    started = time.monotonic()
    with gevent_bench._scrubbed_environment() as removed:
        if removed:
            print(f"ignoring these variables of the calling environment: {', '.join(removed)}", flush=True)
        env, summary, _raw = run_leg(plan, args.uncommitted)
    took = time.monotonic() - started
    section = render_leg(plan, env, summary, took)
    report = merge_results(args.results, leg_key(env), section)
    args.results.write_text(report)
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
