"""Family 5: PostgreSQL ended every session at once with a notice, not an error.

In a crash-restart (one backend died abnormally, e.g. at the hands of the OOM killer) and in an
immediate shutdown (`pg_ctl stop -m immediate`, as failover tools stop a primary), each backend
sends its client a NoticeResponse, "terminating connection because of crash of another server
process" (57P02) or "... due to immediate shutdown command" (57P01), and exits. Before the fix
the idle-session check peeked, saw only a notice, and kept the session: the first request per
worker, thread or pool slot then failed.

The tests start a PostgreSQL of their own (never the shared one) and, against it, every worker
class at once: Gunicorn sync, gthread, gevent and asgi, and uWSGI, each twice: with serverhooks
as shipped, and with the fix reverted (tests/support/health_control.py, imported by the
master); plain Django (the check switched off) once, with sync workers. Every worker, thread and
pool slot first holds an idle session (counted on the server, by application_name), then the
server crashes and restarts, or stops immediately and starts again, and every server gets
requests. With serverhooks no request fails and each worker replaced its dead sessions; with the
fix reverted the first request of every worker fails, as in plain Django.

The other test asks the check directly, in this process, about psycopg and psycopg2 sessions
with and without TLS (whose bytes it cannot read: there the FIN decides, or the driver's read).

13 to 22 s for the module on this 2-core machine (4 tests; 9 s of it starting the 11 servers,
which start once, together, for the module; each fault and its requests take 1.5 to 2.5 s).
Needs root and PostgreSQL's binaries (a private server), so it skips inside the tests container.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import psycopg2
import pytest

from serverhooks import health
from tests.conftest import project_env
from tests.support import faults, health_control, http, procs

pytestmark = [pytest.mark.gunicorn, pytest.mark.uwsgi]

ASGI_APP = "tests.project.asgi:application"
POOL_SIZE = 10  # serverhooks' default: the gevent and asgi workers' pools hold at most this many
CONTROL_CONF = """
# The control arm: the shipped file, then the idle-session check's judgement before the fix.
import tests.support.health_control  # noqa: E402,F401
"""


@dataclass(frozen=True)
class Kind:
    """A worker class, how many workers it runs, how many sessions each holds when warm, and
    how many it may hold at most (a pool's bound: a request's connection goes back to the pool
    a moment after its response, so the next request may take another)."""

    name: str
    env: dict[str, str]
    workers: int
    per_worker: int
    most_per_worker: int = 0

    @property
    def slots(self) -> int:
        return self.workers * self.per_worker

    @property
    def most(self) -> int:
        return self.workers * max(self.per_worker, self.most_per_worker)


KINDS = (
    Kind("sync", {"GUNICORN_WORKER_CLASS": "sync"}, workers=2, per_worker=1),
    Kind("gthread", {"GUNICORN_WORKER_CLASS": "gthread", "GUNICORN_THREADS": "4"}, workers=1, per_worker=4),
    Kind("gevent", {"GUNICORN_WORKER_CLASS": "gevent"}, workers=1, per_worker=4, most_per_worker=POOL_SIZE),
    Kind("asgi", {"GUNICORN_WORKER_CLASS": "asgi"}, workers=1, per_worker=4, most_per_worker=POOL_SIZE),
    Kind("uwsgi", {}, workers=2, per_worker=1),
)
FIXED, CONTROL, PLAIN = "serverhooks", "fix-reverted", "plain-django"
ARMS = {
    FIXED: {},
    CONTROL: {"SERVERHOOKS_TEST_HEALTH_CONTROL": "1"},
    PLAIN: {"SERVERHOOKS_CHECK_IDLE_SESSIONS": "0"},
}
WARM_ROUNDS = 8  # rounds of slow requests, one per slot at once, until every slot holds a session
AFTER_ROUNDS = 3  # requests per slot after the fault


@dataclass
class Member:
    """One server of the fleet: its sessions carry `label` as their application_name."""

    arm: str
    kind: Kind
    server: procs.Server

    @property
    def label(self) -> str:
        return f"sh-{self.arm}-{self.kind.name}"


@dataclass
class Fleet:
    pg: faults.PrivateServer
    members: list[Member] = field(default_factory=list)

    def logs(self) -> str:
        parts = [f"----- private postgres log -----\n{self.pg.log()[-6000:]}"]
        for member in self.members:
            parts.append(f"----- {member.label} (pid {member.server.pid}) -----\n{member.server.log()[-6000:]}")
        return "\n".join(parts)


@contextmanager
def logs_on_failure(fleet: Fleet) -> Iterator[None]:
    try:
        yield
    except BaseException:
        print(fleet.logs())
        raise


def each(members: list[Member], work: Callable[[Member], Any], timeout: float = 90.0) -> dict[str, Any]:
    """`work(member)` for every member at once, in threads (bounded); {label: result or exception}."""
    results: dict[str, Any] = {}

    def run(member: Member) -> None:
        try:
            results[member.label] = work(member)
        except Exception as exc:
            results[member.label] = exc

    threads = [threading.Thread(target=run, args=(m,)) for m in members]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    for member in members:
        results.setdefault(member.label, TimeoutError(f"{member.label}: no result within {timeout} s"))
    return results


def start(arm: str, kind: Kind, pg: faults.PrivateServer, tmp: Path) -> Member:
    label = f"sh-{arm}-{kind.name}"
    # PGAPPNAME names every session of this server on the database server's side (libpq reads
    # it); TLS off, so the check parses the bytes (TLS: test_the_check_sees_what_ended_a_session).
    env = project_env(pg.url, CONN_MAX_AGE=600, PGAPPNAME=label, PGSSLMODE="disable", **ARMS[arm])
    tmp = tmp / label
    if kind.name == "uwsgi":
        args = ["--import", "tests.support.health_control"] if arm == CONTROL else None
        server = procs.start_uwsgi(tmp, env, workers=kind.workers, args=args)
    else:
        conf = None
        if arm == CONTROL:
            tmp.mkdir(parents=True)
            conf = tmp / "control.conf.py"
            conf.write_text((procs.REPO / "gunicorn.conf.py").read_text() + CONTROL_CONF)
        app = ASGI_APP if kind.name == "asgi" else "tests.project.wsgi:application"
        server = procs.start_gunicorn(tmp, {**env, **kind.env}, conf=conf, app=app, workers=kind.workers)
    return Member(arm, kind, server)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    reason = faults.why_no_private_server()
    if reason:
        pytest.skip(reason)
    pg = faults.PrivateServer("postgres")
    crew = Fleet(pg)
    try:
        pg.init()
        faults.enable_tls(pg)  # clients choose: the fleet does not, the direct test does
        tmp = tmp_path_factory.mktemp("crash")
        procs.create_schema(project_env(pg.url, PGSSLMODE="disable"))
        for arm in (FIXED, CONTROL):
            crew.members += [start(arm, kind, pg, tmp) for kind in KINDS]
        crew.members.append(start(PLAIN, KINDS[0], pg, tmp))
        ready = each(crew.members, lambda m: m.server.wait_ready(60))
        failed = {label: str(result)[:3000] for label, result in ready.items() if result is not None}
        if failed:
            print(crew.logs())
            raise RuntimeError(f"servers did not start: {failed}")
        yield crew
    finally:
        each(crew.members, lambda m: m.server.stop())  # by pid, then its process group; all at once
        pg.remove()


def warm(member: Member, pg: faults.PrivateServer) -> int:
    """Slow requests, one per slot at once, until every worker, thread and pool slot holds a
    session (as the server counts them); the number it holds."""
    held = 0
    for _ in range(WARM_ROUNDS):
        statuses = http.concurrent_gets(member.server.socket_path, "/sleep?s=0.3", member.kind.slots, 1)
        held = faults.sessions_by_application(pg).get(member.label, 0)
        if held >= member.kind.slots and statuses == {200: member.kind.slots}:
            break
    return held


def closed_unhealthy(member: Member) -> dict[int, int]:
    """{worker pid: sessions its check found ended so far}, by asking every worker (bounded)."""
    found: dict[int, int] = {}
    for _ in range(100):
        data = http.get_json(member.server.socket_path, "/whoami")
        found[data["pid"]] = data["serverhooks"]["closed_unhealthy"]
        if len(found) == member.kind.workers:
            break
    return found


@dataclass
class After:
    """What one server's requests met after the fault."""

    answers: list[tuple[int, str | None]] = field(default_factory=list)  # (pid, error), in order
    closed: dict[int, int] = field(default_factory=dict)  # the check's verdicts since the fault
    echo_failed: int = 0
    echo_sent: int = 0

    @property
    def errors(self) -> int:
        return sum(error is not None for _, error in self.answers)

    def first_per_worker(self) -> dict[int, str | None]:
        first: dict[int, str | None] = {}
        for pid, error in self.answers:
            first.setdefault(pid, error)
        return first


def after_fault(member: Member, before: dict[int, int]) -> After:
    """One request per slot at once, AFTER_ROUNDS times, to /whoami (which answers with the error
    its query met instead of failing, so every answer names its worker); then more, one at a time
    (bounded), until every worker answered; then a marker load through /echo, which writes."""
    seen = After()
    lock = threading.Lock()

    def client() -> None:
        for _ in range(AFTER_ROUNDS):
            data = http.get_json(member.server.socket_path, "/whoami")
            with lock:
                seen.answers.append((data["pid"], data["error"]))

    threads = [threading.Thread(target=client) for _ in range(member.kind.slots)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for _ in range(50):
        if len({pid for pid, _ in seen.answers}) >= member.kind.workers:
            break
        data = http.get_json(member.server.socket_path, "/whoami")
        seen.answers.append((data["pid"], data["error"]))
    now = closed_unhealthy(member)
    seen.closed = {pid: now[pid] - before.get(pid, 0) for pid in now}
    run = http.marker_load(member.server.socket_path, clients=member.kind.slots, per_client=5, deadline_s=60)
    seen.echo_sent = len(run.sent)
    seen.echo_failed = len(run.http_errors) + len(run.wrong) + len(run.failures)
    return seen


def crash_restart(pg: faults.PrivateServer) -> None:
    faults.crash_restart(pg)  # SIGKILL to a backend of its own; back once it answers again


def immediate_shutdown(pg: faults.PrivateServer) -> None:
    faults.stop_immediately(pg)
    pg.start()  # answers once its recovery is done


FAULTS: dict[str, Callable[[faults.PrivateServer], None]] = {
    "crash-restart": crash_restart,
    "immediate-shutdown": immediate_shutdown,
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_sessions_postgresql_ended_with_a_notice_fail_no_request(fleet: Fleet, fault: str) -> None:
    with logs_on_failure(fleet):
        held = each(fleet.members, lambda m: warm(m, fleet.pg))
        for member in fleet.members:
            assert held[member.label] >= member.kind.slots, (
                f"{member.label}: {held[member.label]} sessions held, {member.kind.slots} wanted before the fault"
            )
        before = each(fleet.members, closed_unhealthy)
        assert not [b for b in before.values() if isinstance(b, Exception)], before
        started = time.monotonic()
        FAULTS[fault](fleet.pg)
        down = time.monotonic() - started
        gone = faults.sessions_by_application(fleet.pg)
        assert not any(gone.get(m.label) for m in fleet.members), f"sessions survived the {fault}: {gone}"
        after = each(fleet.members, lambda m: after_fault(m, before[m.label]))
        broken = {label: repr(result) for label, result in after.items() if isinstance(result, Exception)}
        assert not broken, broken
        now = faults.sessions_by_application(fleet.pg)

        table = [f"{fault} ({down:.2f} s until the server answered again):"]
        for m in fleet.members:
            seen: After = after[m.label]
            table.append(
                f"  {m.label:26} held {held[m.label]:2}  failed {seen.errors:2} of {len(seen.answers):2}  "
                f"first per worker failed {sum(e is not None for e in seen.first_per_worker().values())}"
                f"/{m.kind.workers}  found ended {sum(seen.closed.values()):2}  "
                f"echo failed {seen.echo_failed} of {seen.echo_sent}  sessions now {now.get(m.label, 0)}"
            )
        sample = next((e for m in fleet.members for _, e in after[m.label].answers if e), None)
        table.append(f"  what a failed request met: {sample}")
        print("\n".join(table))

        for m in fleet.members:
            seen = after[m.label]
            first = seen.first_per_worker()
            assert len(first) == m.kind.workers, f"{m.label}: workers that answered: {sorted(first)}"
            if m.arm == FIXED:
                assert seen.errors == 0, f"{m.label}: {[e for _, e in seen.answers if e][:3]}"
                assert seen.echo_failed == 0, f"{m.label}: {seen.echo_failed} of {seen.echo_sent} /echo failed"
                # Every worker's first request met a session the server ended, and replaced it.
                assert all(count >= 1 for count in seen.closed.values()), f"{m.label}: {seen.closed}"
            else:
                # The bug: the session passed for healthy, and the first request of every worker
                # failed on it (as many requests as dead sessions met, at most one each).
                assert all(error is not None for error in first.values()), f"{m.label}: {first}"
                assert 1 <= seen.errors <= held[m.label], f"{m.label}: {seen.errors} failed"
                assert all(count == 0 for count in seen.closed.values()), f"{m.label}: {seen.closed}"
            # Nothing leaked: dead sessions were closed, not left beside their replacements.
            assert now.get(m.label, 0) <= m.kind.most, f"{m.label}: {now.get(m.label)} sessions after"


def _connect(driver: str, tls: bool, pg: faults.PrivateServer, name: str) -> Any:
    if tls:
        conninfo = faults.tls_conninfo(pg, name)
    else:
        conninfo = f"host=127.0.0.1 port={pg.port} user=postgres dbname=test sslmode=disable application_name={name}"
    if driver == "psycopg":
        return psycopg.connect(conninfo, autocommit=True, connect_timeout=5)
    conn = psycopg2.connect(conninfo, connect_timeout=5)
    conn.autocommit = True
    return conn


def _tls_in_use(raw: Any) -> bool:
    return bool(raw.pgconn.ssl_in_use if isinstance(raw, psycopg.Connection) else raw.info.ssl_in_use)


@pytest.mark.parametrize("fault", list(FAULTS))
def test_the_check_sees_what_ended_a_session(fleet: Fleet, fault: str) -> None:
    """serverhooks.health.session_ended, asked in this process about idle sessions of both drivers,
    with and without TLS. With TLS the check cannot read the notice; the FIN settles it."""
    with logs_on_failure(fleet):
        sessions = {
            (driver, tls): _connect(driver, tls, fleet.pg, f"sh-direct-{driver}-{int(tls)}")
            for driver in ("psycopg", "psycopg2")
            for tls in (False, True)
        }
        try:
            for (driver, tls), raw in sessions.items():
                assert _tls_in_use(raw) is tls, (driver, tls)
                raw.cursor().execute("SELECT 1")
                assert not health.session_ended(raw), f"{driver} tls={tls}: a healthy session judged ended"
            FAULTS[fault](fleet.pg)
            verdicts = {key: health.session_ended(raw) for key, raw in sessions.items()}
            # The control, after the fix's verdicts (under TLS the old path reads the socket, which
            # makes libpq drop it): without TLS the notice passed for a healthy session.
            with health_control.reverted():
                reverted = {key: health.session_ended(raw) for key, raw in sessions.items()}
        finally:
            for raw in sessions.values():
                try:
                    raw.close()
                except Exception:
                    pass  # the session is gone: the goodbye may fail
        print(f"{fault}: fixed {verdicts}; reverted {reverted}")
        assert all(verdicts.values()), verdicts
        assert reverted == {(driver, tls): tls for driver, tls in sessions}, reverted
