"""Gunicorn's asgi worker with and without serverhooks' ASGI pool, against Django's own pool.

    python -m bench.asgi_bench            # full run, about 10 minutes (waits first for a quiet machine)
    python -m bench.asgi_bench --quick    # smoke run, about a minute and a half

The scenario: `gunicorn -k asgi -w 2` serving tests.project.asgi:application (Django's
get_asgi_application) through the shipped gunicorn.conf.py (GUNICORN_WORKER_CLASS=asgi), 20
concurrent clients, every request on a fresh client connection (HTTP/1.0, Connection: close),
one SELECT per request (GET /count?m=<marker>, a sync view: Django's ASGI handler runs it in a
thread of its own, so plain Django opens a session per request, and with CONN_MAX_AGE > 0 the
finished request's session lingers until the garbage collector finds it). Arms, alternated in
rounds (the order rotates every round), each on a fresh database of its own:

    MariaDB      no hooks CMA=0 | no hooks CMA=600 (the leak) | serverhooks CMA=600
                 | serverhooks with PyMySQL CMA=600 | no hooks with PyMySQL CMA=0
    PostgreSQL   no hooks CMA=0 | serverhooks CMA=600 | Django's psycopg pool (CMA=0, as Django
                 requires; max_size = POOL_SIZE per worker) | no hooks CMA=600 (the leak)

"no hooks" is the shipped gunicorn.conf.py without its `from serverhooks.gunicorn import *`;
"serverhooks" is the shipped file as it is (its post_worker_init installs the ASGI pool, POOL_SIZE
at its default: at most workers x POOL_SIZE sessions). Every window starts a fresh master, warms
it up, measures, reads the workers' serverhooks.stats() (serverhooks arms), lets the master idle
and counts the sessions still open (serverhooks and leaking arms), and stops it; sessions opened
are counted on the database server over the master's whole life, the peak by sampling. After the
rounds, one more window checks the bound at 200 concurrent clients. The windows, the load client
and the server-side counting are bench/gevent_bench.py's.

Results go to bench/ASGI_RESULTS.md; logs and raw data to bench/out/asgi/ (git-ignored).
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from bench import common, gevent_bench
from bench.gevent_bench import ServerCounters, Window

if TYPE_CHECKING:
    from multiprocessing.pool import Pool

    from tests.support.procs import Server

OUT_DIR = common.BENCH_DIR / "out" / "asgi"
RESULTS_PATH = common.BENCH_DIR / "ASGI_RESULTS.md"
CODE_DIR = OUT_DIR / "code"
COMMITTED = gevent_bench.COMMITTED
ASGI_APP = "tests.project.asgi:application"
WORKERS = gevent_bench.WORKERS  # gevent_bench's stats reader expects this many workers
CONN_MAX_AGE = 600

NOHOOKS0, NOHOOKS600, SERVERHOOKS, SERVERHOOKS_PYMYSQL, NOHOOKS0_PYMYSQL, DJANGOPOOL = (
    "nohooks_cma0",
    "nohooks_cma600",
    "serverhooks",
    "serverhooks_pymysql",
    "nohooks_pymysql_cma0",
    "djangopool",
)


@dataclasses.dataclass(frozen=True)
class Arm(gevent_bench.Arm):
    """gevent_bench's arm, on Gunicorn's asgi worker, with its own CONN_MAX_AGE."""

    conn_max_age: int = CONN_MAX_AGE
    idle_check: bool = False  # count the sessions left after the master idled (the pool's keep, or the leak)

    @property
    def pooled_by_serverhooks(self) -> bool:
        return self.hooks


def _arm(key: str, family: str, title: str, hooks: bool, cma: int, **more: Any) -> Arm:
    return Arm(key, family, title, "asgi", hooks, conn_max_age=cma, idle_check=hooks or cma > 0, **more)


ARMS: dict[str, tuple[Arm, ...]] = {
    "mysql": (
        _arm(NOHOOKS0, "mysql", "no hooks, CMA=0 (mysqlclient)", False, 0),
        _arm(NOHOOKS600, "mysql", "no hooks, CMA=600 (mysqlclient)", False, 600),
        _arm(SERVERHOOKS, "mysql", "serverhooks, CMA=600 (mysqlclient)", True, 600),
        _arm(SERVERHOOKS_PYMYSQL, "mysql", "serverhooks, CMA=600 (PyMySQL)", True, 600, driver="pymysql"),
        _arm(NOHOOKS0_PYMYSQL, "mysql", "no hooks, CMA=0 (PyMySQL)", False, 0, driver="pymysql"),
    ),
    "postgres": (
        _arm(NOHOOKS0, "postgres", "no hooks, CMA=0 (psycopg 3)", False, 0),
        _arm(SERVERHOOKS, "postgres", "serverhooks, CMA=600 (psycopg 3)", True, 600),
        # dburl.py's ?pool=1 forces CMA=0 (Django refuses persistent connections with its pool);
        # bench/settings_peers.py raises max_size to POOL_SIZE: the same bound per worker.
        _arm(DJANGOPOOL, "postgres", "Django's psycopg pool, CMA=0", False, 0, peer="djangopool", url_query="pool=1"),
        _arm(NOHOOKS600, "postgres", "no hooks, CMA=600 (psycopg 3)", False, 600),
    ),
}
SERVERHOOKS_ARMS = (SERVERHOOKS, SERVERHOOKS_PYMYSQL)
WIDE_FAMILY, WIDE_ARM = "mysql", SERVERHOOKS  # the 200-client check of the bound

# Targets: (family, arm, against, least ratio of median req/s, aim or None).
RATIO_TARGETS: tuple[tuple[str, str, str, float, float | None], ...] = (
    ("mysql", SERVERHOOKS, NOHOOKS0, 1.15, None),
    ("mysql", SERVERHOOKS, NOHOOKS600, 1.0, None),
    ("mysql", SERVERHOOKS_PYMYSQL, NOHOOKS0_PYMYSQL, 1.15, None),
    ("postgres", SERVERHOOKS, NOHOOKS0, 2.5, None),
    ("postgres", SERVERHOOKS, DJANGOPOOL, 0.95, 1.0),
)


@dataclasses.dataclass(frozen=True)
class Plan(gevent_bench.Plan):
    idle_seconds: float  # after the load and the stats, the master idles this long; then sessions are counted
    wide_clients: common.Clients  # the bound's check: as many processes as `clients`, more threads


QUICK = Plan(
    mode="quick",
    rounds=1,
    warmup_seconds=0.5,
    window_seconds=1.5,
    clients=common.Clients(procs=4, threads=5),
    sample_interval=0.05,
    tracker_interval=0.02,
    gap_seconds=0.2,
    idle_seconds=1.0,  # the quick run stays under a minute and a half; the full run waits the 5 s asked
    wide_clients=common.Clients(procs=4, threads=50),
)
# Nine arms, five of them idling 5 s per window: 3 s windows keep five rounds within about 10 minutes.
FULL = dataclasses.replace(
    QUICK, mode="full", rounds=5, warmup_seconds=1.0, window_seconds=3.0, gap_seconds=0.5, idle_seconds=5.0
)


# =========================================================================== one window


@dataclasses.dataclass
class Measured:
    window: Window
    left_after_idle: int  # sessions of the arm's database once the master idled plan.idle_seconds (-1: not counted)


def arm_env(arm: Arm, database: str, pool_size: int) -> dict[str, str]:
    return {**gevent_bench.arm_env(arm, database, pool_size), "CONN_MAX_AGE": str(arm.conn_max_age)}


def run_window(
    arm: Arm,
    label: str,
    rnd: int,
    position: int,
    database: str,
    admins: tuple[ServerCounters, ServerCounters],
    plan: Plan,
    pool: Pool,
    pool_size: int,
) -> Measured:
    from tests.support import procs

    def start() -> Server:
        return procs.start_gunicorn(
            OUT_DIR / f"{arm.family}-{arm.key}-{label}",
            arm_env(arm, database, pool_size),
            settings={"_source": gevent_bench._conf_source(arm.hooks, CODE_DIR)},
            app=ASGI_APP,
            workers=WORKERS,
        )

    left: list[int] = []

    def idle(server: Server) -> None:
        # What the workers keep once the load is over: the pool's idle sessions, or the leak's.
        time.sleep(plan.idle_seconds)
        left.append(admins[0].open_sessions(database))

    window = gevent_bench.measure_window(
        arm.key,
        arm.family,
        start,
        arm.pooled_by_serverhooks,
        rnd,
        position,
        database,
        admins,
        plan,
        pool,
        while_up=idle if arm.idle_check else None,
    )
    return Measured(window, left[0] if left else -1)


def _line(m: Measured) -> str:
    w = m.window
    text = f"{w.arm}={w.load.rps:.0f}/s ({w.sessions_opened} opened, peak {w.peak_sessions}"
    if m.left_after_idle >= 0:
        text += f", {m.left_after_idle} left"
    if w.load.counts.errors:
        text += f", {w.load.counts.errors} errors"
    if w.pool.get("pool_waits"):
        text += f", {w.pool['pool_waits']:.0f} waits"
    return text + ")"


def run_all(plan: Plan, families: Sequence[str]) -> tuple[list[Measured], Measured, int]:
    import multiprocessing

    from tests.support import dbserver

    if plan.wide_clients.procs != plan.clients.procs:
        raise ValueError("the wide check reuses the client processes: same number of processes")
    wide_arm = next(arm for arm in ARMS[WIDE_FAMILY] if arm.key == WIDE_ARM)
    databases: dict[tuple[str, str], str] = {}
    admins: dict[str, tuple[ServerCounters, ServerCounters]] = {}
    measured: list[Measured] = []
    try:
        for family in families:
            for arm in ARMS[family]:
                databases[(family, arm.key)] = dbserver.create_database(family)
        databases[(WIDE_FAMILY, "wide")] = dbserver.create_database(WIDE_FAMILY)
        pool_size = gevent_bench.resolved_pool_size(databases[(WIDE_FAMILY, WIDE_ARM)], CODE_DIR)
        for family in families:
            for arm in ARMS[family]:
                common.schema(arm_env(arm, databases[(family, arm.key)], pool_size), CODE_DIR)
        common.schema(arm_env(wide_arm, databases[(WIDE_FAMILY, "wide")], pool_size), CODE_DIR)
        for family in {*families, WIDE_FAMILY}:
            admins[family] = (ServerCounters(family), ServerCounters(family))
        # The client processes are forked once, before any server or sampler thread starts.
        with multiprocessing.get_context("fork").Pool(plan.clients.procs) as pool:
            for rnd in range(plan.rounds):
                for family in families:
                    line = []
                    for position, arm in enumerate(gevent_bench._rotated(ARMS[family], rnd)):
                        m = run_window(
                            arm,
                            f"r{rnd}",
                            rnd,
                            position,
                            databases[(family, arm.key)],
                            admins[family],
                            plan,
                            pool,
                            pool_size,
                        )
                        measured.append(m)
                        line.append(_line(m))
                    print(f"  round {rnd + 1}/{plan.rounds} {family}: " + ", ".join(line), flush=True)
            wide_plan = dataclasses.replace(plan, clients=plan.wide_clients)
            wide = run_window(
                wide_arm,
                "wide",
                plan.rounds,
                0,
                databases[(WIDE_FAMILY, "wide")],
                admins[WIDE_FAMILY],
                wide_plan,
                pool,
                pool_size,
            )
            print(f"  {plan.wide_clients.concurrency} clients, {WIDE_FAMILY}: {_line(wide)}", flush=True)
    finally:
        for pair in admins.values():
            for admin in pair:
                try:
                    admin.close()
                except Exception:
                    pass
        for (family, _key), name in databases.items():
            common.drop_quietly(family, name)
    return measured, wide, pool_size


# =========================================================================== summary


def _summarise_arm(arm: Arm, mine: list[Measured]) -> dict[str, Any]:
    windows = [m.window for m in mine]
    left = [m.left_after_idle for m in mine if m.left_after_idle >= 0]
    return {
        **gevent_bench.summarise_arm(arm, windows),
        "conn_max_age": arm.conn_max_age,
        "opened_max": max((w.sessions_opened for w in windows), default=0),  # over one master's life
        "seen_max": max((w.sessions_seen for w in windows), default=0),
        "pool_opened_max": max((w.pool["pool_opened"] for w in windows), default=0.0),  # summed over its workers
        # Sessions a master opened outside its workers' pools (server counter less pool_opened).
        "outside_pool": [w.sessions_opened - int(w.pool["pool_opened"]) for w in windows],
        "left_after_idle": left,
    }


def summarise(measured: list[Measured], wide: Measured, families: Sequence[str], pool_size: int) -> dict[str, Any]:
    out: dict[str, Any] = {"bound": WORKERS * pool_size, "pool_size": pool_size, "families": {}}
    for family in families:
        arms = {
            arm.key: _summarise_arm(arm, [m for m in measured if m.window.family == family and m.window.arm == arm.key])
            for arm in ARMS[family]
        }
        ratios = {
            f"{a}/{b}": gevent_bench._ratio(arms, a, b) for fam, a, b, _least, _aim in RATIO_TARGETS if fam == family
        }
        out["families"][family] = {"arms": arms, "ratios": ratios}
    wide_arm = next(arm for arm in ARMS[WIDE_FAMILY] if arm.key == WIDE_ARM)
    out["wide"] = _summarise_arm(wide_arm, [wide])
    return out


# =========================================================================== report


def _left_text(s: dict[str, Any]) -> str:
    return " ".join(str(x) for x in s["left_after_idle"]) or "not counted"


def _target_rows(plan: Plan, summary: dict[str, Any]) -> list[str]:
    fams = summary["families"]
    bound = summary["bound"]
    rows = ["| target | measured | met |", "|---|---|---|"]
    for family, a, b, least, aim in RATIO_TARGETS:
        if family not in fams:
            continue
        arms = fams[family]["arms"]
        r = fams[family]["ratios"][f"{a}/{b}"]
        aim_text = f" (aim {aim:g})" if aim is not None else ""
        aim_met = "" if aim is None else f"; aim {aim:g}: {common.yes(r['ratio'] >= aim)}"
        rows.append(
            f"| {common.FAMILY_TITLE[family]}: {arms[a]['title']} at least {least:g}x{aim_text} {arms[b]['title']} "
            f"| {gevent_bench._ratio_text(r)}: {arms[a]['median_rps']:.0f} vs {arms[b]['median_rps']:.0f} req/s "
            f"| {common.verdict(r['ratio'] >= least, r['ci'], least)}{aim_met} |"
        )
    size = f"workers x POOL_SIZE = {WORKERS} x {summary['pool_size']} = {bound}"
    bad = answered = 0
    for family, res in fams.items():
        for key in SERVERHOOKS_ARMS:
            if key not in res["arms"]:
                continue
            s = res["arms"][key]
            name = f"{common.FAMILY_TITLE[family]}, {s['title']}"
            rows.append(
                f"| {name}: peak concurrent sessions at most {size} | {s['peak_max']} "
                f"(SessionSampler {s['peak_sampler_max']}, held sampler {s['peak_tracker_max']}) "
                f"| {common.yes(s['peak_max'] <= bound)} |"
            )
            seen = ""
            if family == "mysql":  # MariaDB's counter is global: the per-database count only sees this bench
                seen = f"; distinct sessions seen on its database: at most {s['seen_max']}"
            pool = s["pool"]
            rows.append(
                f"| {name}: sessions opened over a master's whole life at most {bound} (in a fault-free run: "
                f"pool_discarded 0) | at most {s['opened_max']} per master (server counter; per window: "
                f"{' '.join(str(x) for x in s['sessions_opened'])}){seen}; workers' pool_opened at most "
                f"{s['pool_opened_max']:.0f} per master, so opened outside the pools: "
                f"{' '.join(str(x) for x in s['outside_pool'])} per window (serverhooks' start-up probe, "
                "SERVERHOOKS_PROBE_DATABASES, on as shipped, opens one in a master's first worker; on MariaDB's global "
                f"counter, anyone else's connections count too); pool_discarded {pool['pool_discarded']:.0f}, "
                f"pool_reclaimed {pool['pool_reclaimed']:.0f} in all | {common.yes(s['opened_max'] <= bound)}"
                + (f" (per-database count: {common.yes(s['seen_max'] <= bound)})" if seen else "")
                + " |"
            )
            left = s["left_after_idle"]
            rows.append(
                f"| {name}: sessions left {plan.idle_seconds:g} s after the load at most {bound} "
                f"| {_left_text(s)} (per window) | {common.yes(bool(left) and max(left) <= bound)} |"
            )
            c = s["checked"]
            bad += c["http_errors"] + c["failures"] + c["wrong"]
            answered += c["requests"] + c["failures"]
    w = summary["wide"]
    wc = w["checked"]
    # A pool that ran dry past POOL_TIMEOUT answers HTTP 500; a connect the server's listen queue
    # refused never reached a worker (no answer): counted and shown, not held against the pool.
    wide_bad = wc["http_errors"] + wc["wrong"]
    no_answer = ""
    if wc["failures"]:
        first = next((e for e in wc["examples"] if not e.startswith("HTTP")), "")
        no_answer = f", {wc['failures']} without answer (first: `{first}`)"
    pool = w["pool"]
    waits = pool["pool_waits"]
    each = f", {pool['pool_wait_seconds'] / waits * 1e3:.1f} ms each on average" if waits else ""
    rows.append(
        f"| {plan.wide_clients.concurrency} concurrent clients, {common.FAMILY_TITLE[WIDE_FAMILY]}, {w['title']}: "
        f"peak at most {bound}, no HTTP error or wrong answer | peak {w['peak_max']}, {w['opened_max']} opened, "
        f"{_left_text(w)} left after {plan.idle_seconds:g} s; pool_waits {waits:.0f} "
        f"({pool['pool_wait_seconds']:.2f} s in all{each}); {w['median_rps']:.0f} req/s; {wide_bad} HTTP errors or "
        f"wrong answers in {wc['requests']} answered{no_answer} "
        f"| {common.yes(w['peak_max'] <= bound and wide_bad == 0)} |"
    )
    rows.append(
        f"| every answer right in every serverhooks arm (warm-up included) | {bad} errors or wrong answers in "
        f"{answered} requests | {common.yes(bad == 0)} |"
    )
    for family, res in fams.items():
        for key, s in res["arms"].items():
            if key in SERVERHOOKS_ARMS:
                continue
            c = s["checked"]
            failed = c["http_errors"] + c["failures"] + c["wrong"]
            refused = s["sessions_refused_total"]
            refused_text = f"; {refused} connection attempts refused at max_connections" if refused else ""
            rows.append(
                f"| (reported, no target) {common.FAMILY_TITLE[family]}, {s['title']}: requests that failed "
                f"| {failed} of {c['requests'] + c['failures']} ({c['http_errors']} HTTP 500, {c['failures']} no "
                f"answer, {c['wrong']} wrong){refused_text} | |"
            )
    return rows


def _setup_lines(plan: Plan, env: dict[str, str], summary: dict[str, Any], costs: dict[str, float]) -> list[str]:
    size = summary["pool_size"]
    cost_text = ", ".join(f"{name} {ms:.2f} ms" for name, ms in costs.items())
    return [
        "## Setup",
        "",
        f"Gunicorn `-k asgi -w {WORKERS}` (GUNICORN_WORKER_CLASS=asgi), no preload, `max_requests` 0, serving "
        f"`{ASGI_APP}` (Django's `get_asgi_application()`). Every request is GET {gevent_bench.ENDPOINT}?m=<marker> "
        "on a fresh unix-socket connection (HTTP/1.0, `Connection: close`): a sync view running exactly one SELECT "
        "(`SELECT COUNT(*) FROM sh_hit WHERE marker = %s`), which Django's ASGI handler runs in a thread of its own "
        'per request; nothing inserts, so every right answer is exactly `{"count": 0}`, and every answer is '
        f"checked. Load: {plan.clients.procs} client processes x {plan.clients.threads} threads = "
        f"{plan.concurrency} concurrent connections, each thread one request at a time. {plan.rounds} round(s); in "
        "each, every arm of a database gets one window in turn (the order rotates by one arm every round): a fresh "
        f"master on the arm's own database (created once for the run), {plan.warmup_seconds:g} s of warm-up "
        f"(checked, not timed), {plan.window_seconds:g} s measured, then (serverhooks arms) each worker's "
        "`serverhooks.stats()` via /whoami, then (serverhooks arms and the CMA=600 no-hooks arms) "
        f"{plan.idle_seconds:g} s of idling before the sessions still open on the arm's database are counted; then "
        "the master is stopped and the bench waits until the database has no session left.",
        "",
        "- **no hooks**: the shipped gunicorn.conf.py without its `from serverhooks.gunicorn import *` line; "
        "CONN_MAX_AGE 0 (a session per request, closed at its end: what Django's docs advise under ASGI) or 600 "
        "(each request's session stays open until the garbage collector frees its thread's connection).",
        "- **serverhooks**: the shipped gunicorn.conf.py as it is, CONN_MAX_AGE 600; its post_worker_init installs "
        f"the ASGI pool (serverhooks.asgi) with the default POOL_SIZE ({size}, as the workers resolve it) per "
        "worker; mysqlclient, and once more with PyMySQL.",
        "- **Django's psycopg pool** (PostgreSQL): the no-hooks file, DATABASE_URL with `?pool=1` (CONN_MAX_AGE 0, "
        "which Django requires with its pool; tests/project/dburl.py gives min_size 2, max_size 4); "
        f"bench/settings_peers.py raises max_size to {size} per worker, the same bound as serverhooks.",
        "",
        "**Sessions opened**, **distinct sessions seen**, **peak concurrent sessions**, **statements per request**, "
        "**CPU per request** and **other work** are counted as in bench/GEVENT_RESULTS.md (bench/README.md): "
        "PostgreSQL's per database, MariaDB's `Connections` counter global, less the samplers' own connections and "
        "the refused attempts. PostgreSQL keeps no count of refused connections: an arm that runs the server out "
        "of sessions shows them as HTTP 500s (and as the SessionSampler's refused samples).",
        "",
        f"Opening one session, CPU ms in the bench process (mean of 20): {cost_text}.",
        "",
    ]


def _family_section(family: str, res: dict[str, Any], plan: Plan) -> list[str]:
    rows = []
    for arm in ARMS[family]:
        s = res["arms"][arm.key]
        c = s["checked"]
        refused = "" if not s["sessions_refused_total"] else f" (+{s['sessions_refused_total']} refused)"
        peak = f"{s['peak_sampler_max']} / {s['peak_tracker_max']}"
        if s["sampler_refused"]:
            peak += f" ({s['sampler_refused']} of {s['sampler_attempts']} samples refused)"
        rows.append(
            f"| {s['title']} | **{s['median_rps']:.0f}** | {s['q1_rps']:.0f} to {s['q3_rps']:.0f} "
            f"| {' '.join(f'{x:.0f}' for x in s['rates'])} "
            f"| {' '.join(str(x) for x in s['sessions_opened'])}{refused} | {s['seen_max']} "
            f"| {s['sessions_per_1000']:.1f} | {peak} | {_left_text(s)} "
            f"| {s['statements_per_request']:.2f} | {s['worker_cpu_us']:.0f} | {s['db_cpu_us']:.0f} "
            f"| {s['client_cpu_us']:.0f} | {s['other_cores_median']:.2f} / {s['other_cores_max']:.2f} "
            f"| {c['requests'] + c['failures']} | {c['http_errors']} | {c['failures']} | {c['wrong']} |"
        )
    out = [
        f"## {common.FAMILY_TITLE[family]}",
        "",
        "| arm | median req/s | 25th to 75th | every window (req/s) | sessions opened per master, server counter "
        "| distinct sessions seen on its database, most in one master | sessions opened per 1000 requests "
        "| peak concurrent sessions (SessionSampler / held sampler) "
        f"| sessions left {plan.idle_seconds:g} s after the load | statements per request | worker CPU µs/req "
        "| database CPU µs/req | client CPU µs/req | other work (cores, median / max) | requests | HTTP errors "
        "| no answer | wrong answer |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]
    arms = res["arms"]
    for key, r in res["ratios"].items():
        a, b = key.split("/")
        out.append(f"- {arms[a]['title']} / {arms[b]['title']}: {gevent_bench._ratio_text(r)}")
    for key in SERVERHOOKS_ARMS:
        if key not in arms:
            continue
        s = arms[key]
        pool = s["pool"]
        out.append(
            f"- {s['title']}, `serverhooks.stats()` summed over workers and windows: pool_opened "
            f"{pool['pool_opened']:.0f} (at most {s['pool_opened_per_worker_max']} in one worker), pool_reused "
            f"{pool['pool_reused']:.0f}, pool_waits {pool['pool_waits']:.0f} ({pool['pool_wait_seconds']:.2f} s), "
            f"pool_discarded {pool['pool_discarded']:.0f}, pool_reclaimed {pool['pool_reclaimed']:.0f}"
        )
    if family == "mysql":
        foreign = sum(s["foreign_connections"] for s in arms.values())
        out.append(f"- connections to MariaDB by anyone else during the gaps before the windows: {foreign}")
    left = max(s["left_open"] for s in arms.values())
    if left:
        out.append(f"- sessions still open 20 s after a master stopped (most in one window): {left}")
    examples = [f"{s['title']}: `{e}`" for s in arms.values() for e in s["checked"]["examples"][:2]]
    if examples:
        out.append("- first problems seen: " + "; ".join(examples))
    out.append("")
    return out


def render(plan: Plan, env: dict[str, str], summary: dict[str, Any], costs: dict[str, float], took: float) -> str:
    title = "Gunicorn ASGI benchmark: serverhooks' ASGI pool against no hooks and Django's pool"
    code = f"serverhooks/, tests/ and gunicorn.conf.py as committed in {env['commit']}" + (
        f" ({env['uncommitted']} uncommitted change(s) left out)" if env["uncommitted"] != "0" else ""
    )
    w = summary["wide"]
    wc = w["checked"]
    out = [
        *common.report_head(title, "bench.asgi_bench", plan.mode, took, env),
        f"| machine | {env['cores']} cores ({env['usable_cores']} usable), {env['cpu']}, {env['os']}; shared with "
        f"other work |",
        f"| load average (1, 5, 15 min) | before: {env['load_before']}; after: {env['load_after']}; "
        f"{env['load_wait']} |",
        f"| Python | {env['python']} |",
        f"| serverhooks | {env['serverhooks']}, {code} (copied to bench/out/asgi/code at the start) |",
        f"| gunicorn, asgiref | {env['gunicorn']}, {env['asgiref']} |",
        f"| Django | {env['Django']} |",
        f"| drivers | mysqlclient {env['mysqlclient']}, PyMySQL {env['PyMySQL']}, psycopg {env['psycopg']}, "
        f"psycopg-pool {env['psycopg-pool']} |",
        f"| database servers | MariaDB {env['mysql_server']} (max_connections {env['mysql_max_connections']}), "
        f"PostgreSQL {env['postgres_server']} (max_connections {env['postgres_max_connections']}), on 127.0.0.1 |",
        "",
        "## Summary",
        "",
        *_target_rows(plan, summary),
        "",
        *_setup_lines(plan, env, summary, costs),
    ]
    for family, res in summary["families"].items():
        out += _family_section(family, res, plan)
    pool = w["pool"]
    out += [
        f"## The bound at {plan.wide_clients.concurrency} concurrent clients",
        "",
        f"One more master of the {common.FAMILY_TITLE[WIDE_FAMILY]} arm {w['title']}, on a fresh database, "
        f"after the rounds: {plan.wide_clients.procs} client processes x {plan.wide_clients.threads} threads, the "
        f"same warm-up, window, stats and idling. {w['median_rps']:.0f} req/s; peak concurrent sessions "
        f"{w['peak_sampler_max']} / {w['peak_tracker_max']} (SessionSampler / held sampler); {w['opened_max']} "
        f"sessions opened over the master's life; {_left_text(w)} left after {plan.idle_seconds:g} s; "
        f"`serverhooks.stats()`: pool_opened {pool['pool_opened']:.0f}, pool_reused {pool['pool_reused']:.0f}, "
        f"pool_waits {pool['pool_waits']:.0f} ({pool['pool_wait_seconds']:.2f} s in all), pool_discarded "
        f"{pool['pool_discarded']:.0f}; {wc['requests'] + wc['failures']} requests, {wc['http_errors']} HTTP errors, "
        f"{wc['failures']} without answer, {wc['wrong']} wrong. A connect that the socket's listen queue refuses "
        "(EAGAIN on a unix socket) never reaches a worker: it counts as without answer, and its client thread tries "
        "again at once. (Gunicorn's asgi worker serves the socket through asyncio's `create_server`, which listens "
        "again with asyncio's default backlog of 100, not Gunicorn's `backlog`.)",
        "",
    ]
    return "\n".join(out)


# =========================================================================== main


def main(argv: Sequence[str] | None = None) -> int:
    args = common.bench_arguments(
        "serverhooks' ASGI pool under Gunicorn's asgi worker; writes bench/ASGI_RESULTS.md.", RESULTS_PATH, argv
    )
    plan = QUICK if args.quick else FULL
    from tests.support import dbserver

    families = ("mysql", "postgres")
    for family in families:
        reason = dbserver.reachable(family)
        if reason is not None:
            print(f"{family} server at {dbserver.server_url(family)} does not answer: {reason}", file=sys.stderr)
            return 2
    with gevent_bench._scrubbed_environment() as removed:
        if removed:
            print(f"ignoring these variables of the calling environment: {', '.join(removed)}", flush=True)
        if plan.mode == "full" and not args.no_wait:
            load_wait = gevent_bench.wait_for_quiet_machine()
        else:
            load_wait = "no wait for a quiet machine (quick run)" if plan.mode == "quick" else "no wait (--no-wait)"
        print(load_wait, flush=True)
        shutil.rmtree(OUT_DIR, ignore_errors=True)
        OUT_DIR.mkdir(parents=True)
        started = time.monotonic()
        env = {
            **common.environment(("asgiref", "PyMySQL", "psycopg-pool")),
            **gevent_bench._max_connections(),
            **common.snapshot_code(CODE_DIR, COMMITTED),
            "load_wait": load_wait,
        }
        print(f"{plan.mode} run; server logs in {OUT_DIR}", flush=True)
        costs = gevent_bench.connect_costs()
        measured, wide, pool_size = run_all(plan, families)
    env["load_after"] = common.load_average()
    took = time.monotonic() - started
    summary = summarise(measured, wide, families, pool_size)
    raw = {
        "plan": dataclasses.asdict(plan),
        "env": env,
        "windows": [{**dataclasses.asdict(m.window), "left_after_idle": m.left_after_idle} for m in measured],
        "wide": {**dataclasses.asdict(wide.window), "left_after_idle": wide.left_after_idle},
        "summary": summary,
        "connect_costs_ms": costs,
    }
    return common.write_report(OUT_DIR, raw, render(plan, env, summary, costs, took), args.results)


if __name__ == "__main__":
    sys.exit(main())
