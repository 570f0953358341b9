"""What serverhooks costs under Gunicorn: worker fork-to-ready time and requests per second.

    python -m bench.gunicorn_bench            # full run, about 5 minutes
    python -m bench.gunicorn_bench --quick    # smoke run, under a minute

Both parts run two arms side by side on real servers, alternated A B A B:

    without   no serverhooks at all (the control)
    with      serverhooks' Gunicorn hooks, as `from serverhooks.gunicorn import *` installs them

1. Fork-to-ready (MariaDB, sync workers, preload_app, CONN_MAX_AGE=3600, a query in the
   master at import). The bench hooks below take `time.monotonic()` first thing in
   `pre_fork` (master), keep it on the worker object (the child inherits it) and take
   the delta at the very end of `post_worker_init` (worker). In the "with" arm they call
   serverhooks' hooks inside that interval and time each call with `perf_counter`. Two
   pairs of `os.register_at_fork` handlers bracket serverhooks' fork guard, whose
   handlers run inside `os.fork()` itself, so that cost is measured directly as well.
2. Requests per second (`-k sync -w 2`, preload_app, CONN_MAX_AGE=3600, /echo?m=<marker>,
   MariaDB and PostgreSQL): client processes with threads over the unix socket, every
   response's marker checked.

Results go to bench/RESULTS.md; logs and raw data to bench/out/last/ (git-ignored).
This module is also imported by the Gunicorn masters the bench starts (for its hooks),
so its top level imports nothing heavy.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.common import (
    BENCH_DIR,
    FAMILY_TITLE,
    Clients,
    bench_arguments,
    bootstrap,
    bytecode_env,
    cpu_seconds,
    db_server_pids,
    drop_quietly,
    environment,
    http_get,
    load_average,
    machine_busy_seconds,
    median,
    quartiles,
    report_head,
    run_client_threads,
    schema,
    snapshot_code,
    timed_requests,
    verdict,
    write_report,
    yes,
)

if TYPE_CHECKING:
    from multiprocessing.pool import Pool

    from tests.support.procs import Server

OUT_DIR = BENCH_DIR / "out" / "last"
RESULTS_PATH = BENCH_DIR / "RESULTS.md"
# The code the servers run: serverhooks/ and tests/ as committed at HEAD, and the bench,
# copied at the start, so edits made in the checkout meanwhile cannot leak into a run.
CODE_DIR = OUT_DIR / "code"

WITHOUT, WITH = "without", "with"
ARMS = (WITHOUT, WITH)  # the order of every round: A then B
ARM_TITLE = {WITHOUT: "without serverhooks", WITH: "with serverhooks"}

FORK_TARGET_MS = 1.0
RPS_TARGET_RATIO = 0.99

ENV_FORK_OUT = "SERVERHOOKS_BENCH_FORK_OUT"

# =========================================================================== inside Gunicorn
#
# Everything in this section runs in the Gunicorn master (pre_fork) or in a worker
# (post_fork, post_worker_init). The config file the bench writes imports the
# `plain_*` hooks (arm "without") or, after `from serverhooks.gunicorn import *`,
# the `hooks_*` ones (arm "with"). Both arms run the same instrumentation; only
# the inner call differs (a no-op or serverhooks' hook of the same name).

Hook = Callable[..., None]

# Stamps (perf_counter, minor page faults so far) of the at-fork handlers, taken in
# the master before the fork (the child inherits them) and in the child after it.
Stamp = tuple[float, int]
_atfork: dict[str, Stamp] = {
    "outer_before": (0.0, 0),
    "inner_before": (0.0, 0),
    "outer_child": (0.0, 0),
    "inner_child": (0.0, 0),
}
_atfork_registered: set[str] = set()


def _stamp() -> Stamp:
    """Now, and this process's minor page faults so far (copy-on-write faults after a fork)."""
    return time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _since(stamp: Stamp) -> Stamp:
    now = _stamp()
    return now[0] - stamp[0], now[1] - stamp[1]


def _between(first: Stamp, second: Stamp) -> Stamp:
    return second[0] - first[0], second[1] - first[1]


def _outer_before() -> None:
    _atfork["outer_before"] = _stamp()


def _outer_child() -> None:
    _atfork["outer_child"] = _stamp()


def _inner_before() -> None:
    _atfork["inner_before"] = _stamp()


def _inner_child() -> None:
    _atfork["inner_child"] = _stamp()


def _register_atfork(which: str) -> None:
    """Python runs `before` handlers in reverse registration order and `after_in_child`
    ones in registration order. "outer" is registered before serverhooks' pre_fork
    (which installs the fork guard) and "inner" after it, so the guard's handlers run
    between the two stamps on both sides of the fork."""
    if which in _atfork_registered:
        return
    _atfork_registered.add(which)
    if which == "outer":
        os.register_at_fork(before=_outer_before, after_in_child=_outer_child)
    else:
        os.register_at_fork(before=_inner_before, after_in_child=_inner_child)


def _noop(*args: Any) -> None:
    return None


def _serverhooks_hook(name: str) -> Hook:
    from serverhooks import gunicorn as serverhooks_gunicorn

    hook: Hook = getattr(serverhooks_gunicorn, name)
    return hook


def _measured_pre_fork(server: Any, worker: Any, inner: Hook) -> None:
    t0 = time.monotonic()
    _register_atfork("outer")
    started = _stamp()
    inner(server, worker)
    worker.bench_pre_fork = _since(started)
    _register_atfork("inner")
    worker.bench_t0 = t0


def _measured_post_fork(server: Any, worker: Any, inner: Hook) -> None:
    started = _stamp()
    inner(server, worker)
    worker.bench_post_fork = _since(started)


def _measured_post_worker_init(worker: Any, inner: Hook, arm: str) -> None:
    started = _stamp()
    inner(worker)
    post_worker_init = _since(started)
    ready_s = time.monotonic() - worker.bench_t0
    # Measurement done; the rest (the record) is outside the interval.
    parts = {
        "pre_fork": worker.bench_pre_fork,
        "atfork_parent": _between(_atfork["inner_before"], _atfork["outer_before"]),
        "atfork_child": _between(_atfork["outer_child"], _atfork["inner_child"]),
        "post_fork": worker.bench_post_fork,
        "post_worker_init": post_worker_init,
    }
    record: dict[str, Any] = {
        "arm": arm,
        "pid": os.getpid(),
        "age": int(getattr(worker, "age", 0)),
        "ready_s": ready_s,
        # every minor fault of the child, fork to ready
        "child_faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt,
        # where serverhooks came from (none in the control arm)
        "serverhooks_file": getattr(sys.modules.get("serverhooks"), "__file__", None) or "",
    }
    for name, (seconds, faults) in parts.items():
        record[f"{name}_s"] = seconds
        record[f"{name}_faults"] = faults
    out = Path(os.environ[ENV_FORK_OUT])
    partial = out / f".partial-{os.getpid()}"
    partial.write_text(json.dumps(record))
    partial.rename(out / f"worker-{os.getpid()}.json")


def plain_pre_fork(server: Any, worker: Any) -> None:
    _measured_pre_fork(server, worker, _noop)


def plain_post_fork(server: Any, worker: Any) -> None:
    _measured_post_fork(server, worker, _noop)


def plain_post_worker_init(worker: Any) -> None:
    _measured_post_worker_init(worker, _noop, WITHOUT)


def hooks_pre_fork(server: Any, worker: Any) -> None:
    _measured_pre_fork(server, worker, _serverhooks_hook("pre_fork"))


def hooks_post_fork(server: Any, worker: Any) -> None:
    _measured_post_fork(server, worker, _serverhooks_hook("post_fork"))


def hooks_post_worker_init(worker: Any) -> None:
    _measured_post_worker_init(worker, _serverhooks_hook("post_worker_init"), WITH)


# These run serverhooks' hooks, as @chain does: mark them so serverhooks does not
# warn (from inside the measured interval) that gunicorn.conf.py replaced its hooks.
_MARKED: tuple[Hook, ...] = (hooks_pre_fork, hooks_post_fork, hooks_post_worker_init)
for _hook in _MARKED:
    _hook.__serverhooks__ = True  # type: ignore[attr-defined]

# First lines of every config file: import serverhooks, the project and these hooks from
# the snapshot. (Gunicorn puts its working directory, the checkout, first on sys.path
# before it reads the config file.)
_SNAPSHOT_FIRST = f"import sys\nsys.path.insert(0, {str(CODE_DIR)!r})\n"
_FORK_CONF_SOURCE = {
    WITHOUT: "from bench.gunicorn_bench import plain_pre_fork as pre_fork, plain_post_fork as post_fork, "
    "plain_post_worker_init as post_worker_init",
    WITH: "from serverhooks.gunicorn import *\n"
    "from bench.gunicorn_bench import hooks_pre_fork as pre_fork, hooks_post_fork as post_fork, "
    "hooks_post_worker_init as post_worker_init",
}
_RPS_CONF_SOURCE = {WITHOUT: "", WITH: "from serverhooks.gunicorn import *"}

# =========================================================================== plan and statistics


@dataclasses.dataclass(frozen=True)
class Plan:
    mode: str
    fork_rounds: int  # masters per arm
    fork_workers: int  # workers per master
    rps_rounds: int  # fresh pairs of masters per database
    rps_reps: int  # measured windows per arm within a round, alternated A B A B
    rps_seconds: float  # one measured window
    warmup_seconds: float
    clients: Clients
    families: tuple[str, ...] = ("mysql", "postgres")


QUICK = Plan(
    mode="quick",
    fork_rounds=2,
    fork_workers=8,
    rps_rounds=2,
    rps_reps=2,
    rps_seconds=1.0,
    warmup_seconds=0.3,
    clients=Clients(procs=2, threads=3),
)
FULL = dataclasses.replace(
    QUICK, mode="full", fork_rounds=10, rps_rounds=6, rps_reps=3, rps_seconds=2.5, warmup_seconds=1.0
)


def _project_env(database_url: str, **extra: str) -> dict[str, str]:
    return {
        "DATABASE_URL": database_url,
        "DJANGO_SETTINGS_MODULE": "tests.project.settings",
        "CONN_MAX_AGE": "3600",
        **bytecode_env(),
        **extra,
    }


# =========================================================================== part 1: fork-to-ready

PARTS = ("pre_fork", "atfork_parent", "atfork_child", "post_fork", "post_worker_init")


def _fork_round(arm: str, rnd: int, database: str, plan: Plan) -> list[dict[str, Any]]:
    from tests.support import dbserver, procs

    tmp = OUT_DIR / f"fork-r{rnd}-{arm}"
    ready_dir = tmp / "ready"
    ready_dir.mkdir(parents=True)
    env = _project_env(dbserver.django_url("mysql", database), QUERY_AT_IMPORT="1", **{ENV_FORK_OUT: str(ready_dir)})
    settings: dict[str, object] = {
        "_source": _SNAPSHOT_FIRST + _FORK_CONF_SOURCE[arm],
        "preload_app": True,
        "worker_class": "sync",
        "loglevel": "info",
    }
    server = procs.start_gunicorn(tmp, env, settings=settings, workers=plan.fork_workers)
    try:
        deadline = time.monotonic() + 60.0
        files: list[Path] = []
        while time.monotonic() < deadline:
            files = sorted(ready_dir.glob("worker-*.json"))
            if len(files) >= plan.fork_workers:
                break
            if server.proc.poll() is not None:
                raise RuntimeError(f"gunicorn ({arm}) exited with {server.proc.returncode}:\n{server.log()[-3000:]}")
            time.sleep(0.05)
        else:
            raise RuntimeError(f"{len(files)} of {plan.fork_workers} workers ready after 60 s:\n{server.log()[-3000:]}")
        records = [json.loads(f.read_text()) for f in files]
    finally:
        server.stop()
    for record in records:
        record["round"] = rnd
    return records


def run_fork_part(plan: Plan) -> dict[str, list[dict[str, Any]]]:
    from tests.support import dbserver

    records: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
    databases: dict[str, str] = {}
    try:
        for arm in ARMS:
            databases[arm] = dbserver.create_database("mysql")
        for arm in ARMS:  # not measured: fills the bytecode and page caches
            _fork_round(arm, -1, databases[arm], plan)
        for rnd in range(plan.fork_rounds):
            for arm in ARMS:
                records[arm] += _fork_round(arm, rnd, databases[arm], plan)
            so_far = ", ".join(f"{arm} {median([r['ready_s'] for r in records[arm]]) * 1e3:.2f} ms" for arm in ARMS)
            print(f"  fork round {rnd + 1}/{plan.fork_rounds}: medians so far: {so_far}", flush=True)
    finally:
        for name in databases.values():
            drop_quietly("mysql", name)
    return records


def summarise_fork(records: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    ms = {arm: [r["ready_s"] * 1e3 for r in records[arm]] for arm in ARMS}
    arms: dict[str, Any] = {}
    for arm in ARMS:
        mine = records[arm]
        later = [r for r in mine if r["age"] != 1]
        q1, q3 = quartiles(ms[arm])
        direct_us = {part: [r[f"{part}_s"] * 1e6 for r in mine] for part in PARTS}
        direct_us["total"] = [sum(r[f"{part}_s"] for part in PARTS) * 1e6 for r in mine]
        faults = {part: [float(r[f"{part}_faults"]) for r in mine] for part in PARTS}
        faults["total"] = [float(sum(r[f"{part}_faults"] for part in PARTS)) for r in mine]
        arms[arm] = {
            "n": len(mine),
            "median_ms": median(ms[arm]),
            "q1_ms": q1,
            "q3_ms": q3,
            "first_median_ms": median([r["ready_s"] * 1e3 for r in mine if r["age"] == 1]),
            "later_median_ms": median([r["ready_s"] * 1e3 for r in later]),
            "child_faults": median([float(r["child_faults"]) for r in mine]),
            "direct_median_us": {k: median(v) for k, v in direct_us.items()},
            "direct_max_us": {k: max(v) if v else float("nan") for k, v in direct_us.items()},
            "direct_later_us": median([sum(r[f"{part}_s"] for part in PARTS) * 1e6 for r in later]),
            "direct_first_us": median([sum(r[f"{part}_s"] for part in PARTS) * 1e6 for r in mine if r["age"] == 1]),
            "faults_median": {k: median(v) for k, v in faults.items()},
        }
    added = arms[WITH]["median_ms"] - arms[WITHOUT]["median_ms"]
    rounds = sorted({r["round"] for r in records[WITHOUT]} & {r["round"] for r in records[WITH]})
    per_round = [
        median([r["ready_s"] * 1e3 for r in records[WITH] if r["round"] == rnd])
        - median([r["ready_s"] * 1e3 for r in records[WITHOUT] if r["round"] == rnd])
        for rnd in rounds
    ]
    direct_added_us = arms[WITH]["direct_median_us"]["total"] - arms[WITHOUT]["direct_median_us"]["total"]
    return {
        "arms": arms,
        "added_ms": added,
        "added_ci_ms": bootstrap(ms[WITHOUT], ms[WITH], lambda a, b: b - a),
        "added_per_round_ms": per_round,
        "added_paired_ms": median(per_round),
        "added_first_ms": arms[WITH]["first_median_ms"] - arms[WITHOUT]["first_median_ms"],
        "added_later_ms": arms[WITH]["later_median_ms"] - arms[WITHOUT]["later_median_ms"],
        "direct_added_us": direct_added_us,
        "loaded_in_control": sum(1 for r in records[WITHOUT] if r["serverhooks_file"]),
        "from_snapshot": sum(1 for r in records[WITH] if r["serverhooks_file"].startswith(str(CODE_DIR))),
        "target_met": added < FORK_TARGET_MS,
        "direct_target_met": direct_added_us / 1e3 < FORK_TARGET_MS,
    }


# =========================================================================== part 2: requests per second


@dataclasses.dataclass
class LoadCounts:
    """What one window (measured or warm-up) saw."""

    requests: int = 0  # answered, in or after the window
    in_window: int = 0  # answered right and completed within [start_at, end_at]
    ok: int = 0
    wrong: int = 0
    http_errors: int = 0
    failures: int = 0
    inherited: int = 0
    client_cpu_s: float = 0.0
    examples: list[str] = dataclasses.field(default_factory=list)

    def add(self, other: LoadCounts) -> None:
        for name in ("requests", "in_window", "ok", "wrong", "http_errors", "failures", "inherited", "client_cpu_s"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.examples = (self.examples + other.examples)[:5]

    def note(self, problem: str) -> None:
        if len(self.examples) < 5:
            self.examples.append(problem)


def _echo(path: str, marker: str) -> tuple[int, dict[str, Any] | None]:
    """One GET /echo on a fresh unix-socket connection: (status, its JSON when 200)."""
    status, body = http_get(path, f"/echo?m={marker}")
    return status, (json.loads(body) if status == 200 else None)


def _client_thread(path: str, prefix: str, start_at: float, end_at: float, limit: int, out: LoadCounts) -> None:
    def send(i: int) -> tuple[str, str]:
        marker = f"{prefix}x{i}"
        status, data = _echo(path, marker)
        if data is None:
            return "http", f"HTTP {status}"
        if data.get("m") != marker:
            return "wrong", f"sent {marker}, got {data.get('m')!r}"
        out.inherited += bool(data.get("inherited"))
        return "ok", ""

    timed_requests(start_at, end_at, limit, out, send)


def _client_process(args: tuple[str, int, float, float, int]) -> LoadCounts:
    """One client process: `threads` threads sending /echo requests from start_at to end_at."""
    return run_client_threads(_client_thread, LoadCounts, args)


QUIET_CORES = 0.25  # other work below this, in both windows of a pair, makes a "quiet" pair


@dataclasses.dataclass
class CpuSnapshot:
    at: float
    machine: float
    workers: float  # the server's master and workers
    databases: float  # every MariaDB / PostgreSQL server process (ours and anyone else's sessions)
    bench: float  # this process

    @classmethod
    def take(cls, server: Server, db_pids: Sequence[int]) -> CpuSnapshot:
        own = os.times()
        return cls(
            at=time.monotonic(),
            machine=machine_busy_seconds(),
            workers=cpu_seconds([server.pid, *server.workers()]),
            databases=cpu_seconds(db_pids),
            bench=own.user + own.system,
        )


@dataclasses.dataclass
class Window:
    arm: str
    rnd: int
    rep: int  # -1: warm-up, not measured
    seconds: float
    counts: LoadCounts
    worker_cpu_s: float
    other_cores: float  # CPU used by anything but this bench, its servers, clients and the database servers

    @property
    def rps(self) -> float:
        return self.counts.in_window / self.seconds

    @property
    def worker_cpu_us_per_request(self) -> float:
        return self.worker_cpu_s / max(1, self.counts.requests) * 1e6


def _load(pool: Pool, server: Server, seconds: float, plan: Plan, arm: str, rnd: int, rep: int) -> Window:
    """The client processes against `server` for `seconds`."""
    db_pids = db_server_pids()
    before = CpuSnapshot.take(server, db_pids)
    start_at = time.monotonic() + 0.2
    end_at = start_at + seconds
    limit = int(seconds * 5000) + 100  # far above what 2 sync workers answer
    args = [(server.socket_path, plan.clients.threads, start_at, end_at, limit)] * plan.clients.procs
    parts = pool.map_async(_client_process, args, chunksize=1).get(timeout=seconds + 90.0)
    after = CpuSnapshot.take(server, db_pids)
    counts = LoadCounts()
    for part in parts:
        counts.add(part)
    workers = after.workers - before.workers
    other = (
        (after.machine - before.machine)
        - workers
        - (after.databases - before.databases)
        - (after.bench - before.bench)
        - counts.client_cpu_s
    )
    return Window(arm, rnd, rep, seconds, counts, workers, max(0.0, other) / (after.at - before.at))


@dataclasses.dataclass(frozen=True)
class SyncArms:
    """Arms compared side by side under `-k sync -w 2` preloaded masters, and how they are loaded."""

    names: Sequence[str]
    conf_sources: dict[str, str]  # per arm: the top of its gunicorn config file
    plan: Any  # any bench plan with warmup_seconds, rps_seconds, rps_reps and clients
    pool: Pool  # the client processes


def sync_round(arms: SyncArms, envs: dict[str, dict[str, str]], rnd: int, out_dir: Path) -> list[Window]:
    """One round: fresh `-k sync -w 2` preloaded masters for every arm, warmed up, then
    `plan.rps_reps` measured windows per arm, alternated A B (C ...). Shared by the benches."""
    from tests.support import procs

    plan, pool = arms.plan, arms.pool
    windows: list[Window] = []
    servers: dict[str, Server] = {}
    try:
        for arm in arms.names:
            servers[arm] = procs.start_gunicorn(
                out_dir / f"r{rnd}-{arm.replace(' ', '-')}",
                envs[arm],
                settings={
                    "_source": arms.conf_sources[arm],
                    "preload_app": True,
                    "worker_class": "sync",
                    "loglevel": "info",
                },
                workers=2,
            )
        for arm in arms.names:
            servers[arm].wait_ready(60.0)
        for arm in arms.names:  # both workers connect and warm up; not measured, but checked
            windows.append(_load(pool, servers[arm], plan.warmup_seconds, plan, arm, rnd, -1))
        for rep in range(plan.rps_reps):
            for arm in arms.names:
                windows.append(_load(pool, servers[arm], plan.rps_seconds, plan, arm, rnd, rep))
    finally:
        for server in servers.values():
            server.stop()
    return windows


def sync_rounds(
    family: str,
    arms: SyncArms,
    arm_env: dict[str, dict[str, str]],
    rounds: int,
    out_dir: Path,
    code_dir: Path,
    describe: Callable[[Window], str],
) -> list[Window]:
    """`rounds` rounds of `sync_round` on `family`, each arm on a fresh database of its own."""
    from tests.support import dbserver

    databases: dict[str, str] = {}
    windows: list[Window] = []
    try:
        envs: dict[str, dict[str, str]] = {}
        for arm in arms.names:
            databases[arm] = dbserver.create_database(family)
            envs[arm] = _project_env(dbserver.django_url(family, databases[arm]), **arm_env.get(arm, {}))
            schema(envs[arm], code_dir)
        for rnd in range(rounds):
            new = sync_round(arms, envs, rnd, out_dir)
            windows += new
            line = " ".join(describe(w) for w in new if w.rep >= 0)
            print(f"  {family} round {rnd + 1}/{rounds}: {line}", flush=True)
    finally:
        for name in databases.values():
            drop_quietly(family, name)
    return windows


def run_rps_family(family: str, plan: Plan, pool: Pool) -> dict[str, Any]:
    arms = SyncArms(ARMS, {arm: _SNAPSHOT_FIRST + _RPS_CONF_SOURCE[arm] for arm in ARMS}, plan, pool)
    describe: Callable[[Window], str] = lambda w: f"{'AB'[ARMS.index(w.arm)]}={w.rps:.0f} req/s"  # noqa: E731
    return summarise_rps(sync_rounds(family, arms, {}, plan.rps_rounds, OUT_DIR / f"rps-{family}", CODE_DIR, describe))


def summarise_rps(windows: list[Window]) -> dict[str, Any]:
    measured = [w for w in windows if w.rep >= 0]
    rates = {arm: [w.rps for w in measured if w.arm == arm] for arm in ARMS}
    by_slot = {(w.rnd, w.rep, w.arm): w for w in measured}
    adjacent = [
        (w, by_slot[(w.rnd, w.rep, WITH)])
        for w in measured
        if w.arm == WITHOUT and (w.rnd, w.rep, WITH) in by_slot and w.rps > 0
    ]
    pairs = [b.rps / a.rps for a, b in adjacent]
    quiet = [b.rps / a.rps for a, b in adjacent if max(a.other_cores, b.other_cores) < QUIET_CORES]
    arms: dict[str, Any] = {}
    for arm in ARMS:
        mine = [w for w in measured if w.arm == arm]
        checked = LoadCounts()
        for w in windows:
            if w.arm == arm:
                checked.add(w.counts)
        arms[arm] = {
            "rates": rates[arm],
            "median_rps": median(rates[arm]),
            "worker_cpu_us": median([w.worker_cpu_us_per_request for w in mine]),
            "client_cpu_cores": sum(w.counts.client_cpu_s for w in mine) / max(1e-9, sum(w.seconds for w in mine)),
            "other_cores_median": median([w.other_cores for w in mine]),
            "other_cores_max": max((w.other_cores for w in mine), default=float("nan")),
            "checked": dataclasses.asdict(checked),
        }
    ratio = arms[WITH]["median_rps"] / arms[WITHOUT]["median_rps"]
    return {
        "arms": arms,
        "ratio": ratio,
        "ratio_ci": bootstrap(rates[WITHOUT], rates[WITH], lambda a, b: b / a),
        "pair_ratio_median": median(pairs),
        "pair_ratio_quartiles": quartiles(pairs),
        "quiet_pairs": len(quiet),
        "all_pairs": len(pairs),
        "quiet_ratio_median": median(quiet),
        "quiet_ratio_quartiles": quartiles(quiet),
        "cpu_ratio": arms[WITH]["worker_cpu_us"] / arms[WITHOUT]["worker_cpu_us"],
        "target_met": ratio >= RPS_TARGET_RATIO,
    }


def run_rps_part(plan: Plan) -> dict[str, dict[str, Any]]:
    import multiprocessing

    results: dict[str, dict[str, Any]] = {}
    # The client processes are forked once, before any server starts, and reused.
    with multiprocessing.get_context("fork").Pool(plan.clients.procs) as pool:
        for family in plan.families:
            results[family] = run_rps_family(family, plan, pool)
    return results


# =========================================================================== report


def _fork_section(plan: Plan, env: dict[str, str], fork: dict[str, Any]) -> list[str]:
    a, b = fork["arms"][WITHOUT], fork["arms"][WITH]
    out = [
        "## 1. Fork-to-ready time per worker",
        "",
        f"MariaDB, `-k sync -w {plan.fork_workers}`, preload_app, CONN_MAX_AGE=3600, QUERY_AT_IMPORT=1 (the master "
        "holds a connection when it forks), SERVERHOOKS_PROBE_DATABASES left at its default (on: the first worker "
        f"starts a probe thread). {plan.fork_rounds} masters per arm, alternated A B A B (after one unmeasured "
        "master per arm), each arm on its own fresh database. Interval: `time.monotonic()` first thing in "
        "`pre_fork` (master) to the end of `post_worker_init` (worker); in the arm with serverhooks, its hooks run "
        "inside that interval.",
        "",
        "| arm | workers | median (ms) | 25th to 75th percentile (ms) | first worker, age 1 (median ms) "
        "| workers age 2+ (median ms) | child page faults, fork to ready (median) |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, s in ((WITHOUT, a), (WITH, b)):
        out.append(
            f"| {ARM_TITLE[arm]} | {s['n']} | {s['median_ms']:.3f} | {s['q1_ms']:.3f} to {s['q3_ms']:.3f} "
            f"| {s['first_median_ms']:.3f} | {s['later_median_ms']:.3f} | {s['child_faults']:.0f} |"
        )
    lo, hi = fork["added_ci_ms"]
    out += [
        f"| **added by serverhooks** | | **{fork['added_ms']:+.3f}** | 95% CI {lo:+.3f} to {hi:+.3f} "
        f"| {fork['added_first_ms']:+.3f} | {fork['added_later_ms']:+.3f} "
        f"| {b['child_faults'] - a['child_faults']:+.0f} |",
        "",
        f"Per pair of masters (A then B), the difference of their medians, in ms: "
        f"{' '.join(f'{x:+.2f}' for x in fork['added_per_round_ms'])}; median {fork['added_paired_ms']:+.3f}. "
        f"Check: serverhooks was loaded in {fork['loaded_in_control']} of {a['n']} workers without it (must be 0), "
        f"and came from the snapshot in {fork['from_snapshot']} of {b['n']} workers with it.",
        "",
        "Time spent inside serverhooks per worker, timed directly (µs, `perf_counter` around each hook call; the "
        "fork guard rows are its `os.register_at_fork` handlers, which run inside `os.fork()`, bracketed by the "
        "bench's own handlers), with the minor page faults taken meanwhile. The arm without serverhooks times a "
        "no-op in the same places: that column is the instrumentation's floor.",
        "",
        "| where | without: median µs | with: median µs | with: max µs | without: faults | with: faults |",
        "|---|---|---|---|---|---|",
    ]
    labels = {
        "pre_fork": "`pre_fork` (master)",
        "atfork_parent": "fork guard, before the fork (master)",
        "atfork_child": "fork guard, after the fork (child)",
        "post_fork": "`post_fork` (worker)",
        "post_worker_init": "`post_worker_init` (worker)",
        "total": "**total per worker**",
    }
    for key, label in labels.items():
        out.append(
            f"| {label} | {a['direct_median_us'][key]:.1f} | {b['direct_median_us'][key]:.1f} "
            f"| {b['direct_max_us'][key]:.1f} | {a['faults_median'][key]:.0f} | {b['faults_median'][key]:.0f} |"
        )
    out += [
        f"| total, first worker only (median) | {a['direct_first_us']:.1f} | {b['direct_first_us']:.1f} | | | |",
        f"| total, workers age 2+ (median) | {a['direct_later_us']:.1f} | {b['direct_later_us']:.1f} | | | |",
        "",
    ]
    return out


def _rps_section(plan: Plan, rps: dict[str, dict[str, Any]]) -> list[str]:
    out = [
        "## 2. Requests per second",
        "",
        "`-k sync -w 2`, preload_app, CONN_MAX_AGE=3600, no query at import (so the arm without serverhooks is "
        "correct too), GET /echo?m=<marker>: one SELECT that echoes the marker and one INSERT of it. "
        f"{plan.rps_rounds} rounds per database; each round starts fresh masters for both arms (each arm on its "
        f"own fresh database for the whole run), warms both up ({plan.warmup_seconds:g} s each), then measures "
        f"A B A B ... ({plan.rps_reps} windows of {plan.rps_seconds:g} s per arm). Load: {plan.clients.procs} client "
        f"processes x {plan.clients.threads} threads, a new unix-socket connection per request. Rate = right "
        "answers completed inside the window / window length. *Other work* is the CPU the machine spent during "
        "a window outside this bench, its servers, its clients and the database servers (/proc/stat less "
        "/proc/<pid>/stat): another user's load, which makes windows slow at random.",
        "",
        "| database | arm | median req/s | every window (req/s) | worker CPU per request (µs, median) "
        "| client CPU (cores) | other work (cores, median / max) | responses checked | wrong marker | HTTP errors "
        "| failures | inherited connection |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for family, result in rps.items():
        for arm in ARMS:
            s = result["arms"][arm]
            c = s["checked"]
            out.append(
                f"| {FAMILY_TITLE[family]} | {ARM_TITLE[arm]} | {s['median_rps']:.1f} "
                f"| {' '.join(f'{x:.0f}' for x in s['rates'])} | {s['worker_cpu_us']:.0f} "
                f"| {s['client_cpu_cores']:.2f} | {s['other_cores_median']:.2f} / {s['other_cores_max']:.2f} "
                f"| {c['requests']} | {c['wrong']} | {c['http_errors']} "
                f"| {c['failures']} | {c['inherited']} |"
            )
    out += [
        "",
        "| database | with / without (ratio of medians) | 95% CI | adjacent-window ratios: median (25th to 75th) "
        f"| same, quiet pairs only (other work < {QUIET_CORES:g} core in both) "
        f"| worker CPU per request, with / without | at least {RPS_TARGET_RATIO} |",
        "|---|---|---|---|---|---|---|",
    ]
    for family, result in rps.items():
        lo, hi = result["ratio_ci"]
        q1, q3 = result["pair_ratio_quartiles"]
        quiet = f"{result['quiet_pairs']} of {result['all_pairs']} pairs"
        if result["quiet_pairs"]:
            qq1, qq3 = result["quiet_ratio_quartiles"]
            quiet = f"{result['quiet_ratio_median']:.4f} ({qq1:.3f} to {qq3:.3f}), {quiet}"
        out.append(
            f"| {FAMILY_TITLE[family]} | **{result['ratio']:.4f}** | {lo:.3f} to {hi:.3f} "
            f"| {result['pair_ratio_median']:.4f} ({q1:.3f} to {q3:.3f}) | {quiet} | {result['cpu_ratio']:.3f} "
            f"| {yes(result['target_met'])} |"
        )
    examples = [e for r in rps.values() for arm in ARMS for e in r["arms"][arm]["checked"]["examples"]]
    if examples:
        out += ["", "First problems seen: " + "; ".join(f"`{e}`" for e in examples[:5])]
    out.append("")
    return out


def render(plan: Plan, env: dict[str, str], fork: dict[str, Any], rps: dict[str, dict[str, Any]], took: float) -> str:
    lo, hi = fork["added_ci_ms"]
    wrong = sum(r["arms"][arm]["checked"]["wrong"] for r in rps.values() for arm in ARMS)
    errors = sum(
        r["arms"][arm]["checked"]["http_errors"] + r["arms"][arm]["checked"]["failures"]
        for r in rps.values()
        for arm in ARMS
    )
    checked = sum(r["arms"][arm]["checked"]["requests"] for r in rps.values() for arm in ARMS)
    out = [
        *report_head("Gunicorn benchmark: what serverhooks costs", "bench.gunicorn_bench", plan.mode, took, env),
        f"| machine | {env['cores']} cores ({env['usable_cores']} usable), {env['cpu']}, {env['os']}; shared with "
        f"other work (load average before: {env['load_before']}; after: {env['load_after']}) |",
        f"| Python | {env['python']} |",
        f"| serverhooks | {env['serverhooks']}, serverhooks/ and tests/ as committed in {env['commit']} (copied to "
        "bench/out/last/code at the start, so edits in the checkout during the run are not measured"
        + (f"; {env['uncommitted']} uncommitted change(s) there were left out" if env["uncommitted"] != "0" else "")
        + ") |",
        f"| gunicorn | {env['gunicorn']} |",
        f"| Django | {env['Django']} |",
        f"| drivers | mysqlclient {env['mysqlclient']}, psycopg {env['psycopg']} |",
        f"| database servers | MariaDB {env['mysql_server']}, PostgreSQL {env['postgres_server']}, on 127.0.0.1 |",
        "| bytecode | serverhooks, tests and bench precompiled; every server's caches under bench/out/pycache "
        f"(PYTHONPYCACHEPREFIX), as an installed package has them (PYTHONDONTWRITEBYTECODE in the calling "
        f"environment: {env['dont_write_bytecode']}) |",
        "",
        "## Summary",
        "",
        "| target | measured | met |",
        "|---|---|---|",
        f"| fork-to-ready: under {FORK_TARGET_MS:g} ms added per worker (difference of the arms' medians) "
        f"| {fork['added_ms']:+.3f} ms (95% CI {lo:+.3f} to {hi:+.3f}) "
        f"| {verdict(fork['target_met'], (lo, hi), FORK_TARGET_MS)} |",
        f"| the same, timed directly inside serverhooks' hooks and fork guard (median per worker, less the floor) "
        f"| {fork['direct_added_us'] / 1e3:.3f} ms | {yes(fork['direct_target_met'])} |",
    ]
    for family, result in rps.items():
        rlo, rhi = result["ratio_ci"]
        out.append(
            f"| requests/s, {FAMILY_TITLE[family]}: with / without at least {RPS_TARGET_RATIO} "
            f"| {result['ratio']:.4f} (95% CI {rlo:.3f} to {rhi:.3f}; quiet pairs only: "
            f"{result['quiet_ratio_median']:.4f}, {result['quiet_pairs']} of {result['all_pairs']}) "
            f"| {verdict(result['target_met'], (rlo, rhi), RPS_TARGET_RATIO)} |"
        )
    out += [
        f"| every response carries its own marker (both arms) | {wrong} wrong, {errors} errors in {checked} "
        f"responses | {yes(wrong == 0 and errors == 0)} |",
        "",
    ]
    out += _fork_section(plan, env, fork)
    out += _rps_section(plan, rps)
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    args = bench_arguments("What serverhooks costs under Gunicorn; writes bench/RESULTS.md.", RESULTS_PATH, argv)
    plan = QUICK if args.quick else FULL
    from tests.support import dbserver

    for family in ("mysql", "postgres"):
        reason = dbserver.reachable(family)
        if reason is not None:
            print(f"{family} server at {dbserver.server_url(family)} does not answer: {reason}", file=sys.stderr)
            return 2
    shutil.rmtree(OUT_DIR, ignore_errors=True)
    OUT_DIR.mkdir(parents=True)
    started = time.monotonic()
    env = {**environment(), **snapshot_code(CODE_DIR)}
    print(f"{plan.mode} run; server logs in {OUT_DIR}", flush=True)
    print("part 1: fork-to-ready", flush=True)
    fork_records = run_fork_part(plan)
    fork = summarise_fork(fork_records)
    print("part 2: requests per second", flush=True)
    rps = run_rps_part(plan)
    env["load_after"] = load_average()
    took = time.monotonic() - started
    raw = {"plan": dataclasses.asdict(plan), "env": env, "fork_records": fork_records, "fork": fork, "rps": rps}
    return write_report(OUT_DIR, raw, render(plan, env, fork, rps, took), args.results)


if __name__ == "__main__":
    sys.exit(main())
