"""The model: what Django (and serverhooks once fixed) must do, step by step; the oracle.

It shadows one unit's Django connection and its server session:

- Django's bookkeeping, as django/db/transaction.py's Atomic.__enter__/__exit__ and
  mark_for_rollback_on_error keep it: the stack of open blocks (with or without a
  savepoint), `needs_rollback`, and `closed_in_transaction` (here `lost`).
- The server's transaction: the rows pending at each savepoint level, and PostgreSQL's
  aborted state (after an error, only ROLLBACK TO SAVEPOINT or the end helps; COMMIT
  then rolls back without an error). MariaDB rolls back only the failed statement.
- What is committed: exact keys; `either` keys (an autocommit INSERT interrupted after it
  was sent: the server decides); `groups` (a block whose COMMIT was interrupted after it
  was sent: all of its rows or none).

serverhooks' promises, as the lead's fixes define them:

- A non-database exception raised before the driver sent anything (an execute_wrapper
  that raises, a parameter the driver cannot adapt) leaves everything as plain Django.
- An interrupt after the query was sent closes the connection. In a block, Django then
  refuses further queries (`REFUSED`), inner exits pass, and the outermost exit raises
  `TransactionLost` unless another exception is propagating; outside a block the next
  query reconnects. The interrupted session is never used again.
- An interrupted COMMIT raises out of the block's exit; the block's rows are all
  committed or none.
- Releases inside a block do nothing to the block's connection; it continues on the
  same wrapper and session.
- A session the server ended while idle between units is invisible to the next unit.
- A session the server ended inside a unit (`kill` step) makes the model *uncertain*
  until the unit ends: outcomes are not predicted, but the open block's rows must all be
  absent, some exception must reach the program before that block's outermost exit
  ("never vanishes in silence"), an INSERT reported done in autocommit is committed,
  and an echo never returns another query's answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tests.support.integrity.steps import Step

OK: frozenset[str] = frozenset()
REFUSED = frozenset({"TransactionManagementError", "OperationalError", "InterfaceError", "ProgrammingError"})
LOST = frozenset({"TransactionLost"})
BROKEN = frozenset({"TransactionManagementError"})
ABORTED = frozenset({"InternalError"})
INTEGRITY = frozenset({"IntegrityError"})
BOOM = frozenset({"Boom"})
USER = frozenset({"UserError"})
INTERRUPTED = frozenset({"Interrupted"})
TIMEOUT = frozenset({"Timeout"})
# A parameter the driver cannot adapt: PyMySQL raises TypeError, psycopg a ProgrammingError.
BADPARAM = frozenset({"TypeError", "ProgrammingError"})

Expect = frozenset[str]  # the exception class names allowed; empty: the step must not raise


@dataclass
class Observation:
    """What the driver saw when it ran one step."""

    raised: str | None = None  # the class name of what the step's own action raised
    message: str = ""
    caught: str | None = None  # what reached the program's except clause after unwinding
    depth: int = 0  # open blocks after the step (the driver's own stack)
    echo_wrong: str | None = None  # an echo that answered something else
    session_before: int | None = None  # the main unit's server session before the step, if open
    session: int | None = None  # ... and after it, if open
    wrapper_changed: bool = False  # inside a block: connections["default"] is not the block's wrapper
    thread_errors: list[str] = field(default_factory=list)
    thread_sessions: list[int] = field(default_factory=list)
    pool_problems: list[str] = field(default_factory=list)
    skipped: bool = False


@dataclass
class Violation:
    kind: str  # a short signature: what shrinking keeps constant
    message: str


@dataclass
class Level:
    savepoint: bool
    rows: set[int] = field(default_factory=set)


def _fmt(expect: Expect) -> str:
    return "ok" if not expect else "|".join(sorted(expect))


class Model:
    def __init__(self, family: str, mode: str) -> None:
        self.family = family  # "mysql" or "postgres"
        self.mode = mode
        self.committed: set[int] = set()
        self.either: set[int] = set()
        self.groups: list[set[int]] = []
        self.group_sessions: list[int] = []  # the sessions those COMMITs went out on
        self.thread_committed: set[int] = set()
        self.levels: list[Level] = []
        self.needs_rollback = False
        self.lost = False
        self.pg_aborted = False
        self.tx_started = False  # psycopg sends BEGIN with the block's first statement, not at its start
        self.uncertain = False
        self.doomed: set[int] = set()  # rows of a block whose session the server ended: never committed
        self.in_doomed_block = False
        self.loud_pending = False
        self.block_session: int | None = None
        self.dead_sessions: set[int] = set()

    # ----------------------------------------------------------------- what the walk reads

    def depth(self) -> int:
        return len(self.levels)

    def pending(self) -> set[int]:
        return set().union(*(level.rows for level in self.levels)) if self.levels else set()

    def visible_keys(self) -> list[int]:
        if self.uncertain:
            return sorted(self.committed)
        return sorted(self.committed | self.pending())

    def broken(self) -> bool:
        return self.lost or self.needs_rollback or self.pg_aborted

    # ----------------------------------------------------------------- Django, shadowed

    def enter(self, savepoint: bool) -> Expect:
        if not self.levels:
            self.needs_rollback = False
            self.lost = False
            self.pg_aborted = False
            self.tx_started = False
            self.block_session = None
            self.levels.append(Level(False))
            return OK
        if savepoint and not self.needs_rollback:
            if self.pg_aborted:
                return ABORTED  # SAVEPOINT in an aborted transaction: __enter__ raises, nothing pushed
            self.tx_started = True
            self.levels.append(Level(True))
        else:
            self.levels.append(Level(False))
        return OK

    def exit(self, exc: Expect | None) -> Expect:
        """Atomic.__exit__; `exc` is the exception propagating (None: a normal exit)."""
        level = self.levels.pop()
        outermost = not self.levels
        if self.lost:
            if outermost:
                self._reset_after_block()
                return LOST if exc is None else OK
            return OK
        if exc is None and not self.needs_rollback:
            if not outermost:
                if level.savepoint and self.pg_aborted:
                    # RELEASE SAVEPOINT fails; Django rolls back to it, then raises that error.
                    self.pg_aborted = False
                    return ABORTED
                self.levels[-1].rows |= level.rows
                return OK
            if not self.pg_aborted:  # PostgreSQL answers COMMIT in an aborted transaction with ROLLBACK
                self.committed |= level.rows
            self._reset_after_block()
            return OK
        self.needs_rollback = False
        if not outermost:
            if level.savepoint:
                self.pg_aborted = False
            else:
                self.needs_rollback = True
                self.levels[-1].rows |= level.rows
        else:
            self._reset_after_block()
        return OK

    def exit_commit_interrupted(self) -> Expect:
        """The outermost normal exit whose COMMIT is interrupted once sent (if it sends one)."""
        if self.lost or self.needs_rollback or (self.family == "postgres" and not self.tx_started):
            return self.exit(None)  # no COMMIT goes out: a ROLLBACK, or nothing (psycopg: no BEGIN yet)
        level = self.levels.pop()
        if not self.pg_aborted and level.rows:
            self.groups.append(set(level.rows))
            if self.block_session is not None:
                self.group_sessions.append(self.block_session)
        self._reset_after_block()
        return INTERRUPTED | LOST  # the interrupt itself, or serverhooks' TransactionLost from it

    def _reset_after_block(self) -> None:
        self.levels.clear()
        self.needs_rollback = False
        self.lost = False
        self.pg_aborted = False
        self.tx_started = False
        self.block_session = None

    def insert(self, key: int, via: str) -> Expect:
        if self.levels and self.lost:
            return REFUSED
        if self.levels and self.needs_rollback:
            return BROKEN
        self.tx_started = True
        if self.pg_aborted:
            if via == "orm":
                self.needs_rollback = True
            return ABORTED
        if key in self.committed or key in self.pending():
            if self.levels:
                if via == "orm":
                    self.needs_rollback = True  # mark_for_rollback_on_error
                elif self.family == "postgres":
                    self.pg_aborted = True
            return INTEGRITY
        if self.levels:
            self.levels[-1].rows.add(key)
        else:
            self.committed.add(key)
        return OK

    def user_fault(self, via: str) -> Expect:
        """An execute_wrapper raises UserError: before Django's own checks, before the driver."""
        if self.levels and self.lost:
            return USER | REFUSED  # psycopg refuses to make a cursor on a closed connection first
        if self.levels and via == "orm":
            self.needs_rollback = True  # mark_for_rollback_on_error catches any Exception
        return USER

    def bad_param(self) -> Expect:
        if self.levels and self.lost:
            return REFUSED | BADPARAM
        if self.levels and self.needs_rollback:
            return BROKEN
        self.tx_started = True  # psycopg sends BEGIN before it adapts the parameters
        return BADPARAM

    def interrupt(self, key: int, kind: frozenset[str]) -> Expect:
        if self.levels and self.lost:
            return REFUSED
        if self.levels and self.needs_rollback:
            return BROKEN  # refused before anything is sent: nothing to interrupt
        self.tx_started = True
        if kind == TIMEOUT and self.pg_aborted:
            return ABORTED  # the server refuses the slow statement at once: no time to time out
        if self.levels:
            self.lost = True
            self.needs_rollback = True
        elif key not in self.committed:
            self.either.add(key)  # autocommit: the server ran it, or not
        return kind

    def echo(self) -> Expect:
        if self.levels and self.lost:
            return REFUSED
        if self.levels and self.needs_rollback:
            return BROKEN
        self.tx_started = True
        if self.pg_aborted:
            return ABORTED
        return OK

    def inline_work(self, first: int, count: int, flag: str) -> Expect:
        """A Thread's run() or an executor task in the caller's unit: its connection, its block."""
        keys = range(first, first + count)
        if not flag:
            for key in keys:
                raised = self.insert(key, "orm")
                if raised:
                    return raised
            return OK
        raised = self.enter(True)
        if raised:
            return raised
        for key in keys:
            raised = self.insert(key, "orm")
            if raised:
                break
        if not raised and flag == "atomic-boom":
            raised = BOOM
        if raised:
            self.exit(raised)
            return OK if raised == BOOM else raised
        return self.exit(None)

    # ----------------------------------------------------------------- the oracle

    def check(self, step: Step, obs: Observation) -> list[Violation]:
        """Compare what the driver saw with the prediction; advance the model."""
        if obs.skipped:
            return []
        found: list[Violation] = []
        if obs.echo_wrong is not None:
            found.append(Violation("wrong-answer", f"{step}: the echo answered {obs.echo_wrong}"))
        found += [Violation("pool-invariant", f"{step}: {p}") for p in obs.pool_problems]
        found += [Violation("thread-error", f"{step}: a thread unit failed: {e}") for e in obs.thread_errors]
        for session in (obs.session, *obs.thread_sessions):
            if session is not None and session in self.dead_sessions:
                found.append(Violation("session-reused", f"{step}: interrupted session {session} was used again"))
        if self.uncertain:
            return found + self._follow(step, obs)
        depth_before = self.depth()
        expect = self._predict(step)
        if expect is None:
            return found
        raised = obs.raised
        if (raised is None) != (not expect) or (raised is not None and raised not in expect):
            kind = "silent-loss" if expect == LOST and raised is None else f"outcome:{step.kind}"
            found.append(
                Violation(kind, f"{step}: expected {_fmt(expect)}, got {raised or 'ok'} {obs.message}".rstrip())
            )
            return found  # the model no longer knows the state: the sequence stops here
        if raised is not None:
            if raised in INTERRUPTED | TIMEOUT and obs.session_before is not None:
                self.dead_sessions.add(obs.session_before)  # a reply may still be on its way there
            for _ in range(min(step.unwind, self.depth())):
                self.exit(expect)
            if obs.caught != raised:
                found.append(Violation("unwind-replaced", f"{step}: {raised} became {obs.caught} while unwinding"))
        if obs.depth != self.depth():
            found.append(Violation("depth", f"{step}: {obs.depth} blocks open, the model has {self.depth()}"))
            return found
        if depth_before and self.depth() and not self.lost:
            if obs.wrapper_changed:
                found.append(Violation("session-moved", f"{step}: connections['default'] is not the block's wrapper"))
            if obs.session is not None:
                if self.block_session is None:
                    self.block_session = obs.session
                elif obs.session != self.block_session:
                    found.append(
                        Violation(
                            "session-moved", f"{step}: the block ran on session {self.block_session}, now {obs.session}"
                        )
                    )
        elif self.depth() and obs.session is not None and self.block_session is None and not self.lost:
            self.block_session = obs.session
        if step.kind in ("thread", "executor") and obs.session_before is not None:
            for session in obs.thread_sessions:
                if session == obs.session_before:
                    found.append(Violation("session-shared", f"{step}: a thread unit ran on the caller's session"))
        return found

    def _predict(self, step: Step) -> Expect | None:
        kind = step.kind
        if kind == "enter":
            return self.enter(bool(step.n))
        if kind == "exit":
            return self.exit(None)
        if kind == "exit_ci":
            return self.exit_commit_interrupted()
        if kind == "raise":
            return BOOM
        if kind == "insert":
            return self.insert(step.key, step.via)
        if kind == "userfault":
            return self.user_fault(step.via)
        if kind == "badparam":
            return self.bad_param()
        if kind == "interrupt":
            return self.interrupt(step.key, INTERRUPTED)
        if kind == "gtimeout":
            return self.interrupt(step.key, TIMEOUT)
        if kind == "echo":
            return self.echo()
        if kind == "releasing":
            return self.insert(step.key, "orm")
        if kind in ("thread", "executor"):
            if step.flag != "atomic-boom":
                self.thread_committed |= set(range(step.key, step.key + step.n))
            return OK
        if kind in ("thread_run", "executor_inline"):
            return self.inline_work(step.key, step.n, step.flag)
        if kind == "release":
            return OK
        if kind == "kill":
            self.uncertain = True
            if self.levels:
                self.doomed |= self.pending()
                self.in_doomed_block = True
                # Loud only if there was something to lose: a transaction begun (psycopg sends BEGIN
                # with the first statement) that was going to commit. One already marked for rollback
                # (a caught error, which the program saw), or aborted on PostgreSQL, rolls back anyway.
                self.loud_pending = self.tx_started and not self.broken()
            return None
        if kind == "unit":
            return None
        raise ValueError(f"unknown step kind {kind!r}")

    def _follow(self, step: Step, obs: Observation) -> list[Violation]:
        """Uncertain (the server ended the session mid-unit): follow what happened, check what must hold."""
        found: list[Violation] = []
        depth_before = self.depth()
        if obs.raised is not None or obs.caught is not None:
            self.loud_pending = False
        keys: list[int] = []
        if step.kind in ("insert", "releasing", "userfault", "badparam", "interrupt", "gtimeout"):
            keys = [step.key]
        elif step.kind in ("thread_run", "executor_inline"):
            keys = list(range(step.key, step.key + step.n))
        elif step.kind in ("thread", "executor") and step.flag != "atomic-boom":
            self.thread_committed |= set(range(step.key, step.key + step.n))
        for key in keys:
            if key in self.committed or key in self.either:
                continue  # a duplicate: it was there before, it stays
            if self.in_doomed_block:
                self.doomed.add(key)
            elif depth_before == 0 and obs.raised is None and step.kind in ("insert", "releasing"):
                self.committed.add(key)  # reported done in autocommit: it is committed
            else:
                self.either.add(key)
        while len(self.levels) > obs.depth:
            self.levels.pop()
        while len(self.levels) < obs.depth:
            self.levels.append(Level(True))
        if self.in_doomed_block and not self.levels:
            self.in_doomed_block = False
            if self.loud_pending:
                found.append(
                    Violation(
                        "silent-after-kill",
                        f"{step}: the block whose session the server ended exited without any exception",
                    )
                )
            self.loud_pending = False
        return found

    def end_unit(self) -> None:
        """request_finished: the unit's connection state starts afresh in the next unit."""
        self._reset_after_block()
        self.uncertain = False
        self.in_doomed_block = False
        self.loud_pending = False

    def check_rows(self, main: set[int], threads: set[int]) -> tuple[list[Violation], bool]:
        """Compare the committed rows (read server-side) with the model; (violations, retry?)."""
        found: list[Violation] = []
        missing = self.committed - main
        allowed = self.committed | self.either
        for group in self.groups:
            allowed |= group
        extra = main - allowed
        # A key a dead block wrote is free again: a later write of it may be committed.
        doomed = main & (self.doomed - self.committed - self.either)
        if missing:
            found.append(Violation("rows-missing", f"committed rows missing: {sorted(missing)}"))
        if doomed:
            found.append(
                Violation("rows-unexpected", f"rows of a block whose session ended were committed: {sorted(doomed)}")
            )
        elif extra:
            found.append(Violation("rows-unexpected", f"rows committed that should not be: {sorted(extra)}"))
        partial = [group for group in self.groups if group & main and group - main]
        for group in partial:
            found.append(
                Violation("rows-partial", f"an interrupted COMMIT committed {sorted(group & main)} of {sorted(group)}")
            )
        t_missing = self.thread_committed - threads
        t_extra = threads - self.thread_committed
        if t_missing:
            found.append(Violation("rows-missing", f"thread rows missing: {sorted(t_missing)}"))
        if t_extra:
            found.append(Violation("rows-unexpected", f"thread rows that should not be: {sorted(t_extra)}"))
        return found, bool(partial)

    def resolve_groups(self, main: set[int]) -> None:
        """After a clean check: each interrupted COMMIT went all one way; the model learns which."""
        for group in self.groups:
            if group <= main:
                self.committed |= group
            # else none was committed: the keys are never reused, and must stay absent
        self.groups = []
        self.group_sessions = []
