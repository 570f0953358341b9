"""The steps of a sequence, and the seeded random walk that chooses them.

A sequence is a list of `Step`s run one after the other by one unit of work at a time
(a request: the main thread, a thread or a greenlet per unit, as the mode says); a
`unit` step ends the current unit and starts the next. Blocks are entered and left by
explicit steps, so a sequence reads like the program it stands for:

    enter(sp) insert(3,orm) insert(1,raw)!integrity unwind=0 release exit

Every step that may raise carries `unwind`: how many enclosing atomic() blocks the
exception passes through before the program catches it (0: a try/except right around
the step). A step that does not raise ignores it.

The walk is stateful: what it picks next depends on the model's state (how deep the
open blocks are, which keys exist and so would collide), as in hypothesis' stateful
testing, but seeded and without hypothesis. A sequence is recorded as its steps, so it
can be replayed and shrunk; a step that does not fit where shrinking left it (an `exit`
with no block open) is skipped by the runner and the model alike.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any, Protocol

# What each kind does (the runner, tests/support/integrity/driver.py, does it):
KINDS = {
    "enter": "enter atomic(savepoint=bool(n)) (n=1: savepoint, n=0: savepoint=False)",
    "exit": "leave the innermost block normally",
    "exit_ci": "leave the outermost block; its COMMIT is interrupted after it was sent",
    "raise": "raise Boom (not a database error) inside the block",
    "insert": "create the row `key` (via orm: Model.objects.create; via raw: cursor.execute)",
    "userfault": "insert through an execute_wrapper that raises UserError before the driver sends",
    "badparam": "raw insert with a parameter the driver cannot adapt (pre-send: TypeError / ProgrammingError)",
    "interrupt": "insert, interrupted (a BaseException) after the driver sent it, before the reply was read",
    "gtimeout": "a slow raw insert cut short by gevent.Timeout (gevent mode only)",
    "echo": "SELECT a token and check the answer is that token (a desync shows here)",
    "release": "serverhooks.release_connections()",
    "releasing": "with serverhooks.threads.releasing(): insert(key, orm)",
    "thread": "serverhooks.threads.Thread in its own unit inserts n thread rows (flag: atomic / atomic-boom)",
    "executor": "serverhooks.threads.ThreadPoolExecutor(2): n tasks, one thread row each",
    "thread_run": "serverhooks.threads.Thread(target=work).run() in the caller's unit: n rows on its connection",
    "executor_inline": "a ThreadPoolExecutor task run in the caller's thread (its work item's run())",
    "kill": "the server ends every session of the database, now (mid-unit)",
    "unit": "end this unit of work (request_finished), [n=1: the server ends every idle session], start the next",
}

FAULT_KINDS = frozenset({"exit_ci", "interrupt", "gtimeout", "kill"})


@dataclass(frozen=True)
class Step:
    kind: str
    key: int = -1
    via: str = ""
    unwind: int = 0
    n: int = 0
    flag: str = ""

    def __str__(self) -> str:
        parts: list[str] = []
        if self.key >= 0:
            parts.append(str(self.key))
        if self.via:
            parts.append(self.via)
        if self.kind == "enter":
            parts.append("sp" if self.n else "nosp")
        elif self.kind == "unit" and self.n:
            parts.append("kill")
        elif self.n:
            parts.append(f"n={self.n}")
        if self.flag:
            parts.append(self.flag)
        text = self.kind + (f"({','.join(parts)})" if parts else "")
        return text + (f"^{self.unwind}" if self.unwind else "")

    def to_json(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if key == "kind" or value != _DEFAULTS[key]}

    @staticmethod
    def from_json(data: dict[str, Any]) -> Step:
        return Step(**data)


_DEFAULTS: dict[str, Any] = {"key": -1, "via": "", "unwind": 0, "n": 0, "flag": ""}


def show(steps: list[Step]) -> str:
    return " ".join(str(step) for step in steps)


class ModelView(Protocol):
    """What the walk reads from the model (tests/support/integrity/model.py)."""

    def depth(self) -> int: ...
    def visible_keys(self) -> list[int]: ...
    def broken(self) -> bool: ...


@dataclass
class Options:
    faults: bool = True  # interrupts, interrupted COMMITs, gevent timeouts, sessions ended server-side
    gevent: bool = False  # gtimeout steps
    interrupts: bool = True  # injected interrupts (not psycopg2, which runs each query whole in C)
    badparam: bool = True  # the driver raises before sending (not mysqlclient, which adapts anything)
    max_depth: int = 3
    steps: int = 28  # per sequence, unit ends included; the closing exits come on top
    unit_steps: int = 7  # a unit ends after about this many steps


class Walk:
    """The seeded random walk for one sequence: `next(model)` is the step to run next."""

    def __init__(self, seed: int, options: Options) -> None:
        self.rng = random.Random(seed)
        self.options = options
        self.next_key = 0
        self.next_thread_key = 0
        self.taken = 0
        self.in_unit = 0

    def fresh(self) -> int:
        self.next_key += 1
        return self.next_key - 1

    def fresh_thread(self, count: int) -> int:
        self.next_thread_key += count
        return self.next_thread_key - count

    def _unwind(self, depth: int) -> int:
        if depth == 0 or self.rng.random() < 0.7:
            return 0
        return self.rng.randint(1, depth)

    def done(self) -> bool:
        return self.taken >= self.options.steps

    def next(self, model: ModelView) -> Step:
        """The next step; once `done()`, the steps that close the open blocks and end the unit."""
        depth = model.depth()
        if self.done():
            return Step("exit") if depth else Step("unit")
        self.taken += 1
        self.in_unit += 1
        if depth == 0 and self.in_unit > self.options.unit_steps and self.rng.random() < 0.5:
            self.in_unit = 0
            kill = self.options.faults and self.rng.random() < 0.25
            return Step("unit", n=int(kill))
        weights = self._weights(depth, model)
        kind = self.rng.choices(list(weights), list(weights.values()))[0]
        return self._make(kind, depth, model)

    def _weights(self, depth: int, model: ModelView) -> dict[str, float]:
        faults, o = self.options.faults, self.options
        w: dict[str, float] = {
            "enter": 3.0 if depth < o.max_depth else 0.0,
            "exit": 3.0 if depth else 0.0,
            "exit_ci": 0.6 if faults and o.interrupts and depth == 1 else 0.0,
            "raise": 0.8 if depth else 0.0,
            "insert": 4.0,
            "dup": 1.5 if model.visible_keys() else 0.0,
            "userfault": 0.7,
            "badparam": 0.4 if o.badparam else 0.0,
            "interrupt": 0.7 if faults and o.interrupts else 0.0,
            "gtimeout": 0.12 if faults and o.gevent else 0.0,
            "echo": 1.0,
            "release": 0.8,
            "releasing": 0.6,
            "thread": 0.4,
            "executor": 0.3,
            "thread_run": 0.5,
            "executor_inline": 0.4,
            "kill": 0.12 if faults else 0.0,
        }
        return {kind: weight for kind, weight in w.items() if weight > 0}

    def _make(self, kind: str, depth: int, model: ModelView) -> Step:
        rng = self.rng
        via = rng.choice(("orm", "raw"))
        if kind == "enter":
            return Step("enter", n=int(rng.random() < 0.8), unwind=self._unwind(depth))
        if kind in ("exit", "exit_ci"):
            return Step(kind, unwind=self._unwind(max(depth - 1, 0)))
        if kind == "raise":
            return Step("raise", unwind=rng.randint(1, depth))
        if kind == "dup":
            return Step("insert", key=rng.choice(model.visible_keys()), via=via, unwind=self._unwind(depth))
        if kind in ("insert", "userfault", "interrupt"):
            return Step(kind, key=self.fresh(), via=via, unwind=self._unwind(depth))
        if kind in ("badparam", "gtimeout"):
            return Step(kind, key=self.fresh(), via="raw", unwind=self._unwind(depth))
        if kind == "echo":
            return Step("echo", unwind=self._unwind(depth))
        if kind == "releasing":
            return Step("releasing", key=self.fresh(), via="orm", unwind=self._unwind(depth))
        if kind in ("thread", "executor"):
            count = rng.randint(1, 2)
            flag = "" if kind == "executor" else rng.choice(("", "atomic", "atomic-boom"))
            return Step(kind, key=self.fresh_thread(count), n=count, flag=flag)
        if kind in ("thread_run", "executor_inline"):
            count = rng.randint(1, 2)
            first = self.fresh()
            self.next_key += count - 1
            flag = rng.choice(("", "atomic", "atomic-boom"))
            return Step(kind, key=first, n=count, flag=flag, unwind=self._unwind(depth))
        return Step(kind)  # release, kill
