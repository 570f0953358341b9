"""`python -m tests.support.integrity`: run sequences in one mode against one database; JSON out.

    python -m tests.support.integrity --mode plain --database mysql --sequences 200 --seed 1

One mode per process (gevent must patch before anything imports a socket). Each sequence
gets its own markers (its rows never meet another's), its own server-side row check at
each unit end (a separate admin connection), and the model's verdict at each step. A
failing sequence is recorded with its steps; at the end the first sequence of each kind
of violation is shrunk (replayed from a clean process state, steps removed while the
same kind still shows) to a minimal one. Progress goes to stderr, the result (JSON) is
the last line of stdout, and `--json PATH` writes it to a file as well.

`--replay '[{"kind": "enter", "n": 1}, ...]'` runs one recorded sequence and prints what
each step did.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import re
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from tests.support.integrity.model import Model, Observation, Violation
from tests.support.integrity.steps import FAULT_KINDS, Options, Step, Walk, show

# Violations after which the model no longer knows the state: the rows are not checked.
DIVERGED = ("outcome:", "silent-loss", "depth", "server-refused")
# The server is full: whose sessions fill it is in the message (another suite's, or a leak of ours).
REFUSED_TEXTS = ("Too many connections", "too many clients")


@dataclass
class SequenceResult:
    steps: list[Step] = field(default_factory=list)
    violations: list[Violation] = field(default_factory=list)
    trace: list[str] = field(default_factory=list)
    digest: str = ""
    seconds: float = 0.0


def refused_elsewhere(violation: Violation) -> bool:
    """The server refused a connection while this suite held a handful: another suite filled it."""
    held = re.search(r"sessions on this suite's database: (\d+),", violation.message)
    return violation.kind == "server-refused" and held is not None and int(held.group(1)) <= 8


def sequence_seed(seed: int, index: int) -> int:
    return seed * 1_000_003 + index


class Runner:
    def __init__(self, driver: Any, family: str, mode: str, options: Options, run_id: str) -> None:
        self.driver = driver
        self.family = family
        self.mode = mode
        self.options = options
        self.run_id = run_id
        self.replays = 0
        self.verbose = False
        self.peak_sessions = 0  # on this suite's database, sampled at each unit's end

    def run_sequence(self, tag: str, seed: int | None = None, steps: list[Step] | None = None) -> SequenceResult:
        started = time.perf_counter()
        driver, result = self.driver, SequenceResult()
        driver.set_markers(tag)
        model = Model(self.family, self.mode)
        walk = Walk(seed, self.options) if seed is not None else None
        todo = collections.deque(steps or [])

        def next_step() -> Step | None:
            if walk is not None:
                step = walk.next(model)
                if step.kind == "unit" and walk.done():
                    result.steps.append(step)
                    return None
                return step
            if todo:
                return todo.popleft()
            return Step("exit") if model.depth() else None

        def fits(step: Step) -> bool:
            depth = model.depth()
            if step.kind in ("exit", "raise"):
                return depth > 0
            if step.kind == "exit_ci":
                return depth == 1
            if step.kind == "gtimeout":
                return self.mode == "gevent"
            return True

        def body() -> tuple[str, Step | None]:
            while True:
                step = next_step()
                if step is None:
                    return "end", None
                if step.kind == "unit":
                    if model.depth():
                        todo.appendleft(step)
                        step = Step("exit")
                    else:
                        result.steps.append(step)
                        return "unit", step
                if not fits(step):
                    continue
                obs: Observation = driver.run(step)
                result.steps.append(step)
                result.trace.append(f"{step}={obs.raised or 'ok'}")
                if self.verbose:
                    print(
                        f"  {step!s:32} raised={obs.raised} caught={obs.caught} depth={obs.depth} "
                        f"session {obs.session_before}->{obs.session} {obs.message}",
                        file=sys.stderr,
                    )
                found = self._refused(model.check(step, obs))
                if found:
                    result.violations += found
                    return "stop", None

        for _unit in range(10_000):  # bounded by the steps; this only guards the loop itself
            try:
                outcome, step = driver.in_unit(body)
            except Exception as exc:
                result.violations.append(Violation("unit-error", f"the unit ended with {type(exc).__name__}: {exc}"))
                break
            model.end_unit()
            self.peak_sessions = max(self.peak_sessions, driver.session_counts()[0])
            diverged = any(v.kind.startswith(DIVERGED) for v in result.violations)
            if not diverged:
                result.violations += self._check_rows(model)
                leaked = driver.pool_in_use()
                if leaked:
                    result.violations.append(Violation("pool-leak", f"{leaked} connection(s) still checked out"))
            if outcome != "unit" or result.violations:
                break
            if step is not None and step.n:
                driver.end_sessions()  # between units: idle sessions ended server-side
        result.seconds = time.perf_counter() - started
        result.digest = hashlib.sha1(" ".join(result.trace).encode()).hexdigest()[:12]
        return result

    def _refused(self, found: list[Violation]) -> list[Violation]:
        """A server that refused a connection (max_connections): say whose sessions filled it."""
        refused = [v for v in found if any(text in v.message for text in REFUSED_TEXTS)]
        if refused:
            ours, everyone = self.driver.session_counts()
            for violation in refused:
                violation.kind = "server-refused"
                violation.message += f" [sessions on this suite's database: {ours}, on the server: {everyone}]"
        return found

    def _check_rows(self, model: Model) -> list[Violation]:
        for session in model.group_sessions:
            # An interrupted COMMIT: the server decides, once it has read it and flushed its WAL.
            self.driver.wait_session_settled(session)
        main, threads = self.driver.read_rows()
        found, _ = model.check_rows(main, threads)
        if not found:
            model.resolve_groups(main)
        return found

    def replay(self, steps: list[Step]) -> SequenceResult:
        self.driver.reset()
        self.replays += 1
        return self.run_sequence(f"{self.run_id}-r{self.replays}", steps=steps)

    def shrink(self, steps: list[Step], kind: str, budget_seconds: float = 90.0) -> tuple[list[Step], str] | None:
        """The shortest sequence found (by removing steps) that still shows `kind`; None: not alone.

        Returned as run: with the exits that closed the blocks it left open."""
        deadline = time.monotonic() + budget_seconds
        ran: list[Step] = []

        def shows(candidate: list[Step]) -> str | None:
            result = self.replay(candidate)
            message = next((v.message for v in result.violations if v.kind == kind), None)
            if message is not None:
                ran[:] = result.steps
            return message

        message = shows(steps)
        if message is None:
            return None
        chunk = max(len(steps) // 2, 1)
        while chunk >= 1 and time.monotonic() < deadline:
            changed, at = False, 0
            while at < len(steps) and time.monotonic() < deadline:
                candidate = steps[:at] + steps[at + chunk :]
                found = shows(candidate) if candidate else None
                if found is not None:
                    steps, message, changed = candidate, found, True
                else:
                    at += chunk
            if not changed:
                chunk //= 2
        for at, step in enumerate(steps):  # then simpler steps: caught where they are raised
            if step.unwind and time.monotonic() < deadline:
                candidate = [*steps[:at], Step(**{**step.__dict__, "unwind": 0}), *steps[at + 1 :]]
                found = shows(candidate)
                if found is not None:
                    steps, message = candidate, found
        return ran, message


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.support.integrity", description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=["django", "plain", "gevent", "threads"], required=True)
    parser.add_argument("--database", choices=["mysql", "postgres"], required=True)
    parser.add_argument("--driver", help="pymysql (default) or mysqlclient; psycopg (default) or psycopg2")
    parser.add_argument("--sequences", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--steps", type=int, default=28, help="steps per sequence (closing exits on top)")
    parser.add_argument("--no-faults", action="store_true", help="no interrupts or ended sessions (differential)")
    parser.add_argument("--faults", action="store_true", help="faults in django mode too (the control arm)")
    parser.add_argument("--max-seconds", type=float, default=3600.0, help="stop starting sequences after this")
    parser.add_argument("--shrink", type=int, default=4, help="shrink the first failure of this many kinds")
    parser.add_argument("--shrink-seconds", type=float, default=90.0, help="time budget per shrink")
    parser.add_argument("--examples", type=int, default=2, help="failing sequences kept per kind")
    parser.add_argument("--dbname", help="an existing database to use (default: a new one, dropped at the end)")
    parser.add_argument("--digests", action="store_true", help="include each sequence's outcome digest")
    parser.add_argument("--json", help="also write the result to this file")
    parser.add_argument("--replay", help="a JSON list of steps: run it once, verbosely")
    parser.add_argument("--progress", type=float, default=10.0, help="seconds between progress lines")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.mode == "gevent":
        from gevent import monkey

        monkey.patch_all()
    from tests.support import dbserver
    from tests.support.integrity import driver as drivers

    family = args.database
    driver_name = args.driver or drivers.DRIVERS[family][0]
    if driver_name not in drivers.DRIVERS[family]:
        raise SystemExit(f"--driver {driver_name} does not serve {family}")
    own_db = args.dbname is None
    dbname = args.dbname or dbserver.create_database(family)
    try:
        drivers.configure(args.mode, family, driver_name, dbname)
        driver = drivers.Driver(args.mode, family, driver_name, dbname)
        faults = not args.no_faults and (args.mode != "django" or args.faults)
        options = Options(
            faults=faults,
            gevent=args.mode == "gevent" and driver_name != "mysqlclient",  # mysqlclient blocks the hub
            badparam=driver_name != "mysqlclient",  # it adapts anything
            steps=args.steps,
        )
        if not drivers.can_interrupt(driver_name):
            options.interrupts = False
        run_id = uuid.uuid4().hex[:8]
        runner = Runner(driver, family, args.mode, options, run_id)
        if args.replay:
            runner.verbose = True
            steps = [Step.from_json(item) for item in json.loads(args.replay)]
            result = runner.replay(steps)
            print(json.dumps({"steps": show(result.steps), "violations": [v.__dict__ for v in result.violations]}))
            return 1 if result.violations else 0
        report = run_many(runner, args, driver_name, run_id)
    finally:
        if own_db:
            try:
                dbserver.drop_database(family, dbname)
            except Exception as exc:
                print(f"could not drop {family} database {dbname}: {exc}", file=sys.stderr)
    text = json.dumps(report, default=str)
    if args.json:
        with open(args.json, "w") as out:
            out.write(text + "\n")
    print(text)
    return 0


def run_many(runner: Runner, args: argparse.Namespace, driver_name: str, run_id: str) -> dict[str, Any]:
    label = f"{args.mode}/{args.database}/{driver_name}"
    started = time.monotonic()
    last_progress = started
    kinds: collections.Counter[str] = collections.Counter()
    failing_sequences = 0
    examples: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    step_kinds: collections.Counter[str] = collections.Counter()
    digests: list[str] = []
    seconds: list[float] = []
    done = 0
    environment_retries = 0
    hang = None
    for index in range(args.sequences):
        if time.monotonic() - started > args.max_seconds:
            break
        seed = sequence_seed(args.seed, index)
        try:
            result = runner.run_sequence(f"{run_id}-{index}", seed=seed)
            for attempt in range(5):
                # The shared server was full of other suites' sessions (none of ours, says the
                # message): not a finding. Run the same sequence again once it has room.
                if not result.violations or any(not refused_elsewhere(v) for v in result.violations):
                    break
                environment_retries += 1
                runner.driver.reset()
                time.sleep(2.0 * (attempt + 1))
                result = runner.run_sequence(f"{run_id}-{index}-again{attempt}", seed=seed)
        except Exception as exc:  # a Hang: the process state cannot be trusted any more
            hang = f"{type(exc).__name__}: {exc}"
            kinds["hang"] += 1
            examples["hang"].append({"sequence": index, "seed": seed, "message": hang})
            break
        done += 1
        seconds.append(result.seconds)
        digests.append(result.digest)
        step_kinds.update("unit_kill" if step.kind == "unit" and step.n else step.kind for step in result.steps)
        if result.violations:
            failing_sequences += 1
            for kind in dict.fromkeys(v.kind for v in result.violations):
                kinds[kind] += 1
                if len(examples[kind]) < args.examples:
                    examples[kind].append(
                        {
                            "sequence": index,
                            "seed": seed,
                            "message": next(v.message for v in result.violations if v.kind == kind),
                            "steps": show(result.steps),
                            "json": [step.to_json() for step in result.steps],
                        }
                    )
            runner.driver.reset()
        now = time.monotonic()
        if now - last_progress >= args.progress:
            last_progress = now
            print(
                f"[{label}] {done}/{args.sequences} sequences, {failing_sequences} failing "
                f"({dict(kinds)}), {1000 * sum(seconds) / len(seconds):.0f} ms/sequence, {now - started:.0f} s",
                file=sys.stderr,
                flush=True,
            )
    minimal: dict[str, Any] = {}
    if hang is None:
        for kind in list(examples)[: args.shrink]:
            first = examples[kind][0]
            shrunk = runner.shrink([Step.from_json(item) for item in first["json"]], kind, args.shrink_seconds)
            if shrunk is None:
                minimal[kind] = {"reproduced_alone": False, "from_sequence": first["sequence"]}
            else:
                steps, message = shrunk
                minimal[kind] = {
                    "reproduced_alone": True,
                    "steps": show(steps),
                    "json": [step.to_json() for step in steps],
                    "message": message,
                    "from_sequence": first["sequence"],
                }
    elapsed = time.monotonic() - started
    report: dict[str, Any] = {
        "mode": args.mode,
        "database": args.database,
        "driver": driver_name,
        "seed": args.seed,
        "faults": runner.options.faults,
        "sequences_requested": args.sequences,
        "sequences": done,
        "failing_sequences": failing_sequences,
        "violations": dict(kinds),
        "examples": dict(examples),
        "minimal": minimal,
        "ms_per_sequence": round(1000 * sum(seconds) / len(seconds), 1) if seconds else None,
        "steps": sum(step_kinds.values()),
        "step_kinds": dict(step_kinds),
        "fault_steps": sum(count for kind, count in step_kinds.items() if kind in FAULT_KINDS | {"unit_kill"}),
        "seconds": round(elapsed, 1),
        "peak_sessions": runner.peak_sessions,
        "environment_retries": environment_retries,
        "hang": hang,
        "pid": os.getpid(),
    }
    if args.digests:
        report["digests"] = digests
    print(
        f"[{label}] done: {done} sequences, {failing_sequences} failing, {dict(kinds)}, {elapsed:.0f} s",
        file=sys.stderr,
        flush=True,
    )
    return report
