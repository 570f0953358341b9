"""The driver: runs steps on real Django connections to a real server, and reports what it saw.

Modes (one per process; the runner sets the process up before importing this module):

    django   plain Django, no serverhooks at all: the differential's reference
    plain    serverhooks as in a sync worker: connections tracked and guarded, no pool
    gevent   gevent.monkey.patch_all(), serverhooks.pool.gevent (greenlets are units)
    threads  serverhooks.pool.threads (threads are units, as Django's ASGI request threads)

A unit of work runs in the main thread (django, plain), in a thread of its own (threads)
or a greenlet of its own (gevent); it starts with request_started and ends with
request_finished, as a request does.

Interrupts are injected, not timed: for one call, the DB-API connection's read step is
replaced by one that raises `Interrupted` (a BaseException, as gevent.Timeout, a signal's
exception or a cancellation are), after the driver sent the query and before it read the
reply. PyMySQL: `_read_query_result`; psycopg 3: the generator given to `Connection.wait`
raises at its first wait for a read. COMMIT: PyMySQL sends COMMIT and raises; psycopg 3 the
same through `wait`. mysqlclient and psycopg2 send and read each query in one C call, so
an interrupt cannot land in between: their sequences have no injected interrupts (see
`can_interrupt`; `arm_query` still knows how to cut mysqlclient with send_query).
Under gevent, `gtimeout` is a real gevent.Timeout around a query that sleeps server-side.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from tests.support.integrity.model import Observation
from tests.support.integrity.steps import Step

MODES = ("django", "plain", "gevent", "threads")
DRIVERS = {"mysql": ("pymysql", "mysqlclient"), "postgres": ("psycopg", "psycopg2")}
URL_DRIVER = {"pymysql": "pymysql", "mysqlclient": "", "psycopg": "", "psycopg2": "psycopg2"}
POOL_SIZE = 4
POOL_TIMEOUT = 3.0
JOIN_TIMEOUT = 30.0

# Rows of the unit under test, and rows of other units (threads, executor workers), in tables of
# their own: InnoDB's gap locks from a block's duplicate-key check must not make a thread wait.
DDL = {
    "mysql": [
        f"CREATE TABLE IF NOT EXISTS {table} (id BIGINT AUTO_INCREMENT PRIMARY KEY, marker VARCHAR(64) NOT NULL, "
        f"k INT NOT NULL, UNIQUE KEY {table}_marker_k (marker, k)) ENGINE=InnoDB"
        for table in ("sh_integrity", "sh_integrity_t")
    ],
    "postgres": [
        f"CREATE TABLE IF NOT EXISTS {table} (id BIGSERIAL PRIMARY KEY, marker VARCHAR(64) NOT NULL, "
        "k INT NOT NULL, UNIQUE (marker, k))"
        for table in ("sh_integrity", "sh_integrity_t")
    ],
}
INSERT = "INSERT INTO sh_integrity (marker, k) VALUES (%s, %s)"
SLOW_INSERT = {
    "mysql": "INSERT INTO sh_integrity (marker, k) SELECT %s, %s FROM (SELECT SLEEP(0.3) AS s) AS slow",
    "postgres": "INSERT INTO sh_integrity (marker, k) SELECT %s, %s FROM pg_sleep(0.3)",
}


class Interrupted(BaseException):
    """Injected after the query was sent: not a database error, as gevent.Timeout is not."""


class Boom(Exception):
    """The program's own exception, raised inside a block."""


class UserError(Exception):
    """Raised by an execute_wrapper, before the driver sends anything."""


class Hang(Exception):
    """A unit of work did not finish in time: the process cannot go on safely."""


# ----------------------------------------------------------------------------- the row model

_row_models: dict[str, Any] = {}


def row_model(table: str = "sh_integrity") -> Any:
    """The test's model of `table`, unmanaged, on the project's app (defined once Django is set up)."""
    if table not in _row_models:
        from django.db import models

        class Meta:
            app_label = "project"
            managed = False
            db_table = table

        name = "IntegrityRow" if table == "sh_integrity" else "IntegrityThreadRow"
        _row_models[table] = type(
            name,
            (models.Model,),
            {
                "__module__": __name__,
                "marker": models.CharField(max_length=64),
                "k": models.IntegerField(),
                "Meta": Meta,
            },
        )
    return _row_models[table]


# ----------------------------------------------------------------------------- injection


def driver_of(raw: Any) -> str:
    module = type(raw).__module__
    if module.startswith("pymysql"):
        return "pymysql"
    if module.startswith("MySQLdb"):
        return "mysqlclient"
    if module.startswith("psycopg2"):
        return "psycopg2"
    return "psycopg"


def can_interrupt(driver: str) -> bool:
    """Can a Python-level interrupt land between sending a query and reading its reply?

    mysqlclient and psycopg2 (without a wait callback) send and read in one C call: an
    exception from a signal handler or a timeout lands after the reply was read. (mysqlclient
    has a narrower window, a SELECT's rows unread between query() and store_result(); it is
    not modelled.) Their sequences get no injected interrupts; psycopg2 under gevent (with
    psycogreen) still gets gevent timeouts."""
    return driver in ("pymysql", "psycopg")


def _interrupt_on_read(gen: Any) -> Any:
    """Forward a psycopg generator until it first waits to read: the query is sent; raise."""
    from psycopg.waiting import Wait

    try:
        state = next(gen)
        while True:
            if state == Wait.R:
                raise Interrupted("after the query was sent, before its reply was read")
            ready = yield state
            state = gen.send(ready)
    except StopIteration as stop:
        return stop.value


def arm_query(raw: Any) -> None:
    """The next query sent on `raw` is interrupted once it is sent."""
    kind = driver_of(raw)
    if kind == "pymysql":

        def read(*args: Any, **kwargs: Any) -> Any:
            vars(raw).pop("_read_query_result", None)
            raise Interrupted("after the query was sent, before its reply was read")

        raw._read_query_result = read
    elif kind == "mysqlclient":

        def query(sql: Any) -> None:
            vars(raw).pop("query", None)
            raw.send_query(sql)
            raise Interrupted("after the query was sent, before its reply was read")

        raw.query = query
    elif kind == "psycopg":

        def wait(gen: Any, *args: Any, **kwargs: Any) -> Any:
            vars(raw).pop("wait", None)
            return type(raw).wait(raw, _interrupt_on_read(gen), *args, **kwargs)

        raw.wait = wait
    else:
        raise NotImplementedError(f"no interrupt injection for {kind}")


def arm_commit(raw: Any) -> None:
    """The next COMMIT on `raw` is interrupted once it is sent."""
    kind = driver_of(raw)

    def commit() -> None:
        vars(raw).pop("commit", None)
        if kind == "pymysql":
            from pymysql.constants import COMMAND

            raw._execute_command(COMMAND.COM_QUERY, "COMMIT")
            raise Interrupted("after COMMIT was sent, before its reply was read")
        if kind == "mysqlclient":
            raw.send_query(b"COMMIT")
            raise Interrupted("after COMMIT was sent, before its reply was read")
        arm_query(raw)
        try:
            type(raw).commit(raw)
        finally:
            vars(raw).pop("wait", None)

    raw.commit = commit


def disarm(raw: Any) -> None:
    for name in ("_read_query_result", "query", "wait", "commit"):
        with contextlib.suppress(TypeError):
            vars(raw).pop(name, None)


def session_id(raw: Any) -> int | None:
    """The server's id of this DB-API connection's session, without a round trip; None if closed."""
    if raw is None:
        return None
    try:
        kind = driver_of(raw)
        if kind in ("psycopg", "psycopg2"):
            if raw.closed:
                return None
            return int(raw.info.backend_pid) or None
        if kind == "pymysql":
            return int(raw.thread_id()) if raw.open else None
        return int(raw.thread_id())
    except Exception:
        return None


# ----------------------------------------------------------------------------- setup


def configure(mode: str, family: str, driver: str, dbname: str) -> None:
    """Environment and settings for this process, before django.setup(). gevent: patch first."""
    from tests.support import dbserver

    os.environ["DATABASE_URL"] = dbserver.django_url(family, dbname, URL_DRIVER[driver])
    os.environ["DJANGO_SETTINGS_MODULE"] = "tests.project.settings"
    os.environ.setdefault("CONN_MAX_AGE", "3600")
    # A lock wait is a bug of the suite (sequences never wait on each other): fail fast.
    if family == "mysql":
        os.environ["MYSQL_INIT_COMMAND"] = "SET SESSION innodb_lock_wait_timeout=5"


class Driver:
    def __init__(self, mode: str, family: str, driver: str, dbname: str) -> None:
        import django

        self.mode, self.family, self.driver, self.dbname = mode, family, driver, dbname
        django.setup()
        from django.conf import settings

        options = settings.DATABASES["default"].setdefault("OPTIONS", {})
        if family == "postgres":
            options["options"] = "-c lock_timeout=5000"
        if driver == "pymysql":
            # PyMySQL 1.2 builds a TLS context for every connect (~40 ms) unless told not to; this
            # server has TLS off, and the suite connects often (bench/gevent_bench.py notes the same).
            options["ssl_disabled"] = True
        self.admin_stack = contextlib.ExitStack()
        from tests.support import dbserver

        self.admin: Any = self.admin_stack.enter_context(dbserver.admin(family, database=dbname))
        for ddl in DDL[family]:
            self.admin.cursor().execute(ddl)
        self.Row = row_model()
        self.ThreadRow = row_model("sh_integrity_t")
        self.blocks: list[Any] = []
        self.block_wrapper: Any = None
        self.marker = ""
        self.seen_violations = 0
        self._activate()

    # ----------------------------------------------------------------- modes

    def _activate(self) -> None:
        if self.mode == "django":
            return
        from serverhooks import registry
        from serverhooks.pool import core

        core.invariant_checks = True  # (HEAD has no such switch: then it is set and ignored)
        registry.start_tracking()
        if self.mode == "gevent":
            from serverhooks import greenlets
            from serverhooks.pool import gevent as gevent_pool

            greenlets.make_drivers_cooperative()
            gevent_pool.activate(POOL_SIZE, POOL_TIMEOUT)
        elif self.mode == "threads":
            from serverhooks.pool import threads as threads_pool

            threads_pool.activate(POOL_SIZE, POOL_TIMEOUT)

    def reset(self) -> None:
        """Start again from a clean process state (after a failed sequence, and before each replay)."""
        from django.db import connections

        self.blocks.clear()
        self.block_wrapper = None
        with contextlib.suppress(Exception):
            for wrapper in connections.all(initialized_only=True):
                with contextlib.suppress(Exception):
                    wrapper.in_atomic_block = False
                    wrapper.savepoint_ids = []
                    wrapper.atomic_blocks = []
                    wrapper.closed_in_transaction = False
                    wrapper.needs_rollback = False
                    wrapper.close()
                    wrapper.connection = None
        if self.mode in ("gevent", "threads"):
            from serverhooks.pool import active

            with contextlib.suppress(Exception):
                active.deactivate()
            self._activate()
        self.seen_violations = len(self.invariant_violations())

    def invariant_violations(self) -> list[str]:
        if self.mode == "django":
            return []
        from serverhooks.pool import core

        found: list[str] = list(getattr(core, "invariant_violations", []))
        return found

    def set_markers(self, tag: str) -> None:
        self.marker = tag

    # ----------------------------------------------------------------- units of work

    def in_unit(self, body: Callable[[], Any]) -> Any:
        """Run `body` as one unit of work (a request): request_started, body, request_finished."""
        from django.core.signals import request_finished, request_started

        result: list[Any] = []
        failure: list[BaseException] = []

        def unit() -> None:
            request_started.send(sender=Driver)
            try:
                result.append(body())
            except BaseException as exc:
                failure.append(exc)
            finally:
                self._close_blocks()
                try:
                    request_finished.send(sender=Driver)
                except BaseException as exc:
                    failure.append(exc)

        if self.mode == "threads":
            worker = threading.Thread(target=unit, name="unit")
            worker.start()
            worker.join(JOIN_TIMEOUT)
            if worker.is_alive():
                raise Hang("a unit thread did not finish within 30 s")
        elif self.mode == "gevent":
            import gevent

            greenlet = gevent.spawn(unit)
            greenlet.join(JOIN_TIMEOUT)
            if not greenlet.dead:
                raise Hang("a unit greenlet did not finish within 30 s")
        else:
            unit()
        if failure:
            raise failure[0]
        return result[0] if result else None

    def _close_blocks(self) -> None:
        """What is still open when a unit stops early is rolled back, as an exception would."""
        while self.blocks:
            block = self.blocks.pop()
            with contextlib.suppress(BaseException):
                block.__exit__(Boom, Boom("closing"), None)
        self.block_wrapper = None

    def pool_in_use(self) -> int:
        if self.mode not in ("gevent", "threads"):
            return 0
        from serverhooks.pool import active

        try:
            return sum(pool.occupancy()[0] for pool in active.pools())
        except Exception:
            return 0

    # ----------------------------------------------------------------- the server's side

    def read_rows(self) -> tuple[set[int], set[int]]:
        """The committed keys of this sequence: (the unit's rows, other units' rows)."""
        found: list[set[int]] = []
        for table in ("sh_integrity", "sh_integrity_t"):
            cursor = self.admin.cursor()
            cursor.execute(f"SELECT k FROM {table} WHERE marker = %s", (self.marker,))
            found.append({int(row[0]) for row in cursor.fetchall()})
        return found[0], found[1]

    def end_sessions(self) -> int:
        """The server ends every session on the database but the admin's; waits until they are gone."""
        cursor = self.admin.cursor()
        if self.family == "mysql":
            cursor.execute(
                "SELECT ID FROM information_schema.PROCESSLIST WHERE DB = %s AND ID <> CONNECTION_ID()",
                (self.dbname,),
            )
            ids = [int(row[0]) for row in cursor.fetchall()]
            for session in ids:
                with contextlib.suppress(Exception):
                    cursor.execute(f"KILL {session}")
            listing = "SELECT ID FROM information_schema.PROCESSLIST WHERE DB = %s AND ID <> CONNECTION_ID()"
        else:
            cursor.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()", (self.dbname,)
            )
            ids = [int(row[0]) for row in cursor.fetchall()]
            for session in ids:
                cursor.execute("SELECT pg_terminate_backend(%s)", (session,))
            listing = "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()"
        deadline = time.monotonic() + 5.0
        while ids and time.monotonic() < deadline:
            cursor.execute(listing, (self.dbname,))
            if not {int(row[0]) for row in cursor.fetchall()} & set(ids):
                break
            time.sleep(0.005)
        return len(ids)

    def session_counts(self) -> tuple[int, int]:
        """(sessions on this suite's database, sessions on the whole server), admin's excluded."""
        cursor = self.admin.cursor()
        if self.family == "mysql":
            cursor.execute("SELECT DB FROM information_schema.PROCESSLIST WHERE ID <> CONNECTION_ID()")
        else:
            cursor.execute("SELECT datname FROM pg_stat_activity WHERE pid <> pg_backend_pid() AND datname IS NOT NULL")
        names = [row[0] for row in cursor.fetchall()]
        return sum(1 for name in names if name == self.dbname), len(names)

    def wait_session_settled(self, session: int, timeout: float = 5.0) -> None:
        """Until `session` is idle (not inside a statement, COMMIT included) or gone; bounded."""
        if self.family == "mysql":
            sql = "SELECT COMMAND FROM information_schema.PROCESSLIST WHERE ID = %s"
            idle = {"Sleep"}
        else:
            sql = "SELECT state FROM pg_stat_activity WHERE pid = %s"
            idle = {"idle", "idle in transaction", "idle in transaction (aborted)"}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            cursor = self.admin.cursor()
            cursor.execute(sql, (session,))
            row = cursor.fetchone()
            if row is None or row[0] in idle:
                return
            time.sleep(0.005)

    # ----------------------------------------------------------------- the main unit's connection

    def peek_wrapper(self) -> Any:
        """This unit's connection, if it has one, without checking one out of a pool."""
        from django.db import connections

        storage: Any = connections._connections  # type: ignore[attr-defined]
        return getattr(storage, "default", None)

    def main_session(self) -> int | None:
        wrapper = self.peek_wrapper()
        if wrapper is None:
            return None
        return session_id(wrapper.connection)

    def _raw_for_injection(self) -> Any:
        from django.db import connection

        wrapper: Any = connection
        if wrapper.connection is None and not wrapper.in_atomic_block:
            wrapper.ensure_connection()
        return wrapper.connection

    # ----------------------------------------------------------------- steps

    def run(self, step: Step) -> Observation:
        obs = Observation()
        obs.session_before = self.main_session()
        try:
            self._do(step, obs)
        except (KeyboardInterrupt, SystemExit, Hang):
            raise
        except BaseException as exc:
            obs.raised = type(exc).__name__
            obs.message = f"({str(exc)[:160]})"
            caught = self._unwind(exc, step.unwind)
            obs.caught = type(caught).__name__
        obs.depth = len(self.blocks)
        obs.session = self.main_session()
        if self.blocks:
            obs.wrapper_changed = self.peek_wrapper() is not self.block_wrapper
        obs.pool_problems = self.pool_problems()
        return obs

    def _unwind(self, exc: BaseException, levels: int) -> BaseException:
        for _ in range(min(levels, len(self.blocks))):
            block = self.blocks.pop()
            try:
                block.__exit__(type(exc), exc, exc.__traceback__)
            except BaseException as replaced:
                if replaced is not exc:
                    exc = replaced
        if not self.blocks:
            self.block_wrapper = None
        return exc

    def _enter(self, savepoint: bool) -> None:
        from django.db import transaction

        block = transaction.atomic(savepoint=savepoint)
        block.__enter__()
        self.blocks.append(block)
        if len(self.blocks) == 1:
            self.block_wrapper = self.peek_wrapper()

    def _exit(self) -> None:
        block = self.blocks.pop()
        try:
            block.__exit__(None, None, None)
        finally:
            if not self.blocks:
                self.block_wrapper = None

    def _insert(self, key: int, via: str, marker: str | None = None) -> None:
        marker = marker or self.marker
        if via == "orm":
            self.Row.objects.create(marker=marker, k=key)
        else:
            from django.db import connection

            with connection.cursor() as cursor:
                cursor.execute(INSERT, [marker, key])

    def _do(self, step: Step, obs: Observation) -> None:
        kind = step.kind
        from django.db import connection

        if kind == "enter":
            self._enter(bool(step.n))
        elif kind == "exit":
            self._exit()
        elif kind == "exit_ci":
            wrapper: Any = connection
            raw = wrapper.connection
            if raw is not None:
                arm_commit(raw)
            try:
                self._exit()
            finally:
                if raw is not None:
                    disarm(raw)
        elif kind == "raise":
            raise Boom("raised inside the block")
        elif kind == "insert":
            self._insert(step.key, step.via)
        elif kind == "userfault":

            def refuse(execute: Any, sql: Any, params: Any, many: Any, context: Any) -> Any:
                raise UserError("an execute_wrapper refused the query")

            with connection.execute_wrapper(refuse):
                self._insert(step.key, step.via)
        elif kind == "badparam":
            unadaptable: list[Any] = [self.marker, {"k": step.key}]
            with connection.cursor() as cursor:
                cursor.execute(INSERT, unadaptable)
        elif kind == "interrupt":
            raw = self._raw_for_injection()
            if raw is not None:
                arm_query(raw)
            try:
                self._insert(step.key, step.via)
            finally:
                if raw is not None:
                    disarm(raw)
        elif kind == "gtimeout":
            import gevent

            with gevent.Timeout(0.03), connection.cursor() as cursor:
                cursor.execute(SLOW_INSERT[self.family], [self.marker, step.key])
        elif kind == "echo":
            token = uuid.uuid4().hex
            with connection.cursor() as cursor:
                cursor.execute("SELECT %s", [token])
                row = cursor.fetchone()
            if row is None or row[0] != token:
                obs.echo_wrong = repr(row)[:80]
        elif kind == "release":
            self._release()
        elif kind == "releasing":
            with self._releasing():
                self._insert(step.key, "orm")
        elif kind in ("thread", "executor"):
            self._other_units(step, obs)
        elif kind == "thread_run":
            self._thread_run(step)
        elif kind == "executor_inline":
            self._executor_inline(step)
        elif kind == "kill":
            self.end_sessions()
        else:
            raise ValueError(f"unknown step {kind!r}")

    # ----------------------------------------------------------------- releases and threads

    def _release(self) -> None:
        if self.mode == "django":
            if not self.blocks:
                from django.db import connection

                connection.close()
            return
        import serverhooks

        serverhooks.release_connections()

    @contextlib.contextmanager
    def _releasing(self) -> Iterator[None]:
        if self.mode == "django":
            try:
                yield
            finally:
                self._release()
            return
        from serverhooks.threads import releasing

        with releasing():
            yield

    def _work(self, keys: list[int], flag: str, other_unit: bool) -> None:
        from django.db import transaction

        model = self.ThreadRow if other_unit else self.Row
        try:
            if flag:
                with transaction.atomic():
                    for key in keys:
                        model.objects.create(marker=self.marker, k=key)
                    if flag == "atomic-boom":
                        raise Boom("inside the work's own block")
            else:
                for key in keys:
                    model.objects.create(marker=self.marker, k=key)
        except Boom:
            pass

    def _other_unit_work(self, keys: list[int], flag: str, out: list[tuple[str | None, int | None]]) -> None:
        error: str | None = None
        try:
            self._work(keys, flag, True)
        except BaseException as exc:
            error = f"{type(exc).__name__}: {str(exc)[:160]}"
        session = self.main_session()  # this thread's own connection
        out.append((error, session))
        if self.mode == "django":
            from django.db import connection

            connection.close()

    def _other_units(self, step: Step, obs: Observation) -> None:
        keys = list(range(step.key, step.key + step.n))
        out: list[tuple[str | None, int | None]] = []
        if step.kind == "thread":
            thread: threading.Thread
            if self.mode == "django":
                thread = threading.Thread(target=self._other_unit_work, args=(keys, step.flag, out))
            else:
                from serverhooks.threads import Thread

                thread = Thread(target=self._other_unit_work, args=(keys, step.flag, out))
            thread.start()
            thread.join(JOIN_TIMEOUT)
            if thread.is_alive():
                raise Hang("a Thread did not finish within 30 s")
        else:
            executor: concurrent.futures.ThreadPoolExecutor
            if self.mode == "django":
                executor = concurrent.futures.ThreadPoolExecutor(2)
            else:
                from serverhooks.threads import ThreadPoolExecutor

                executor = ThreadPoolExecutor(2)
            with executor:
                futures = [executor.submit(self._other_unit_work, [key], step.flag, out) for key in keys]
                for future in futures:
                    future.result(JOIN_TIMEOUT)
        obs.thread_errors = [error for error, _ in out if error]
        obs.thread_sessions = [session for _, session in out if session is not None]

    def _thread_run(self, step: Step) -> None:
        keys = list(range(step.key, step.key + step.n))
        if self.mode == "django":
            self._work(keys, step.flag, False)
            return
        from serverhooks.threads import Thread

        # run() in the caller's thread: the work's exceptions come through, after its release.
        Thread(target=self._work, args=(keys, step.flag, False)).run()

    def _executor_inline(self, step: Step) -> None:
        keys = list(range(step.key, step.key + step.n))
        if self.mode == "django":
            self._work(keys, step.flag, False)
            return
        executor = inline_executor()
        future = executor.submit(self._work, keys, step.flag, False)
        executor.run_pending()
        executor.shutdown(wait=False)
        future.result(0)

    # ----------------------------------------------------------------- the pool's invariants

    def pool_problems(self) -> list[str]:
        if self.mode not in ("gevent", "threads"):
            return []
        problems: list[str] = []
        reported = self.invariant_violations()
        problems += [f"serverhooks.pool.core: {text}" for text in reported[self.seen_violations :]]
        self.seen_violations = len(reported)
        from serverhooks.pool import active

        for pool in active.pools():
            try:
                idle = list(pool._idle) + list(getattr(pool, "_reclaimed", []))
                if hasattr(pool, "_holdings"):
                    held = [w for holding in list(pool._holdings.values()) for w in holding.wrappers]
                else:
                    held = [w for wrappers in list(pool._holders.values()) for w in wrappers]
            except (AttributeError, TypeError):
                continue  # the pool's internals changed: only its own invariant checks apply
            if len({id(w) for w in idle}) != len(idle):
                problems.append("a wrapper is in the idle list twice")
            both = {id(w) for w in idle} & {id(w) for w in held}
            if both:
                problems.append("a wrapper is idle and held at once")
            if any(w.in_atomic_block for w in idle):
                problems.append("an idle wrapper is inside atomic()")
            if len({id(w) for w in idle + held}) > pool.size:
                problems.append(f"{len({id(w) for w in idle + held})} wrappers exist for a pool of {pool.size}")
            if self.block_wrapper is not None and pool.holds(self.block_wrapper):
                if any(w is self.block_wrapper for w in idle):
                    problems.append("the open block's wrapper is in the idle list")
                elif not any(w is self.block_wrapper for w in held):
                    problems.append("the open block's wrapper is held by nobody")
        return problems


_inline_class: Any = None


def inline_executor() -> Any:
    """serverhooks' ThreadPoolExecutor whose tasks run in the caller's thread, at `run_pending()`."""
    global _inline_class
    if _inline_class is None:
        from serverhooks.threads import ThreadPoolExecutor

        class InlineExecutor(ThreadPoolExecutor):
            def _adjust_thread_count(self) -> None:
                pass  # no worker thread: the queued work items run in the caller's thread

            def run_pending(self) -> None:
                while True:
                    try:
                        item = self._work_queue.get_nowait()
                    except queue.Empty:
                        return
                    if item is not None:
                        item.run()

        _inline_class = InlineExecutor
    return _inline_class()
