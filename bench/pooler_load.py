"""Issue 21 under real concurrent load: `.iterator()` and prepared statements behind PgBouncer.

    python -m bench.pooler_load             # full run, a few minutes; writes bench/POOLER_RESULTS.md
    python -m bench.pooler_load --quick --results bench/out/pooler-quick.md   # smoke run, about 30 s

What the issue measured, with its setup: PgBouncer 1.18 (Debian's) in transaction mode with
`default_pool_size = 3`, `reserve_pool_size = 0` (tests/support/pgbouncer.py, the shipped
deploy/pgbouncer/pgbouncer.ini otherwise), Django's default DISABLE_SERVER_SIDE_CURSORS = False,
CONN_MAX_AGE=600, `preload_app`. No scripting of which server session a statement meets (that is
tests/integration/test_pooler_safety.py's job): 8 client threads x 250 requests, each for a random
tag, and PgBouncer hands out its 3 sessions as the load falls.

Views (tests/project/pooler_views.py), on the rows of 20 tags (A to T) x 6 rows, inserted straight
on PostgreSQL:

    iterate    /pooler/iterate?tag=X: the tag's rows through `.iterator(chunk_size=2)`, a WITH HOLD
               server-side cursor fetched two rows at a time (QUERY_AT_IMPORT=1: the master queries)
    prepared   /pooler/prepared?tag=X, psycopg 3 with server_side_binding and prepare_threshold=0
               (tests/project/dburl.py): the tag's statement prepared at its first run, run twice
               (QUERY_AT_IMPORT=0 and SERVERHOOKS_PROBE_DATABASES=0, as the scripted test has them)

Arms, for each view and worker class (`-k sync -w 4`, `-k gevent -w 2`), one after the other in
the same run, each with a fresh database, PgBouncer and Gunicorn master of its own:

    plain         no serverhooks line in the Gunicorn config at all
    control       `from serverhooks.gunicorn import *`, then serverhooks.cursornames.set_enabled(False)
    serverhooks   `from serverhooks.gunicorn import *` (cursor and statement names made unique)

Per arm: requests; worker deaths (the master's log); ok (HTTP 200 with exactly its own tag's
rows, all of them); wrong, split into "foreign" (HTTP 200 with any row of another tag) and
"partial" (HTTP 200, only its own rows, but not all of them); loud (any other status); no answer
(the client got none); the kinds of the loud errors (the first line of the JSON "error", numbers
shown as N, serverhooks' random name part as <token>). The figure that
matters is 0 wrong in every serverhooks row; a wrong answer there is printed in full (the request,
the rows, the answering pid, the master's workers) and makes the bench exit 1.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import random
import re
import shutil
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from bench.common import (
    BENCH_DIR,
    bench_arguments,
    bytecode_env,
    drop_quietly,
    environment,
    report_head,
    schema,
    snapshot_code,
    write_report,
)

OUT_DIR = BENCH_DIR / "out" / "pooler"
CODE_DIR = OUT_DIR / "code"
RESULTS_PATH = BENCH_DIR / "POOLER_RESULTS.md"

TAGS = "ABCDEFGHIJKLMNOPQRST"  # capital letters: the prepared view takes one; no tag is another's prefix
ROWS = 6  # per tag
BOUNCER = {"default_pool_size": "3", "reserve_pool_size": "0"}
VIEWS = ("iterate", "prepared")
QUERIES = {"iterate": "", "prepared": "?server_side_binding=1&prepare_threshold=0"}
READS = {"iterate": 1, "prepared": 2}  # the prepared view runs its statement twice
WORKER_CLASSES = {"sync": 4, "gevent": 2}
KINDS_SHOWN = 6  # per row of the report; raw.json has them all
PLAIN, CONTROL, FIX = "plain", "control", "serverhooks"
ARMS = (PLAIN, CONTROL, FIX)
_SNAPSHOT_FIRST = f"import sys\nsys.path.insert(0, {str(CODE_DIR)!r})\n"
CONF_SOURCE = {
    PLAIN: _SNAPSHOT_FIRST,
    CONTROL: _SNAPSHOT_FIRST + "from serverhooks.gunicorn import *\n"
    "import serverhooks.cursornames\nserverhooks.cursornames.set_enabled(False)\n",
    FIX: _SNAPSHOT_FIRST + "from serverhooks.gunicorn import *\n",
}


@dataclasses.dataclass(frozen=True)
class Plan:
    mode: str
    threads: int
    per_thread: int
    deadline_s: float  # per arm, for its load
    request_timeout_s: float = 30.0


QUICK = Plan("quick", threads=4, per_thread=10, deadline_s=30.0)
FULL = Plan("full", threads=8, per_thread=250, deadline_s=300.0)


@dataclasses.dataclass
class ArmCounts:
    requests: int = 0
    ok: int = 0
    wrong_foreign: int = 0
    wrong_partial: int = 0
    loud: int = 0
    no_answer: int = 0
    not_sent: int = 0  # left when the arm's deadline came
    seconds: float = 0.0
    worker_deaths: int = 0  # the master's log: a worker killed by a signal, timed out or exited with an error
    error_kinds: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    error_samples: dict[str, str] = dataclasses.field(default_factory=dict)  # kind -> one unblurred error
    wrong_samples: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    answering_pids: set[int] = dataclasses.field(default_factory=set)
    workers: list[int] = dataclasses.field(default_factory=list)

    @property
    def wrong(self) -> int:
        return self.wrong_foreign + self.wrong_partial


_TOKEN = re.compile(r"(?<=_)[0-9a-f]{12}(?=_)")  # serverhooks' random part of a name
_NUMBER = re.compile(r"(?<![A-Za-z])\d+")  # not the 3 of _pg3
_DEATHS = re.compile(r"was sent SIG|WORKER TIMEOUT|exited with code [1-9]")
_STATUS = re.compile(r"^HTTP \d+")


def blur(error: str) -> str:
    """The first line of an error with its numbers (thread idents, serials, pids) shown as N and
    serverhooks' random name parts as <token>; a leading HTTP status is kept."""
    first = (error.strip().splitlines() or [""])[0]
    status = _STATUS.match(first)
    head = status.group(0) if status else ""
    return (head + _NUMBER.sub("N", _TOKEN.sub("<token>", first[len(head) :])))[:200]


def judge(tag: str, view: str, status: int, raw: bytes) -> tuple[str, dict[str, Any]]:
    """("ok" | "foreign" | "partial" | "loud", the parsed body)."""
    try:
        body: dict[str, Any] = json.loads(raw)
    except ValueError:
        body = {"error": f"HTTP {status}: " + raw[:200].decode(errors="replace")}
        return ("loud" if status != 200 else "partial"), body
    if status != 200:
        body.setdefault("error", f"HTTP {status}")
        return "loud", body
    rows = [str(r) for r in body.get("rows", [])]
    if any(not r.startswith(f"{tag}-") for r in rows):
        return "foreign", body
    if rows != [f"{tag}-{n}" for n in range(ROWS)] * READS[view]:
        return "partial", body
    return "ok", body


def load(socket_path: str, view: str, plan: Plan, seed: int) -> ArmCounts:
    """`plan.threads` client threads x `plan.per_thread` requests, each for a random tag, until the deadline."""
    from tests.support import http

    counts = ArmCounts()
    lock = threading.Lock()
    stop_at = time.monotonic() + plan.deadline_s

    def client(n: int) -> None:
        rng = random.Random(seed * 1000 + n)
        for i in range(plan.per_thread):
            if time.monotonic() > stop_at:
                with lock:
                    counts.not_sent += plan.per_thread - i
                return
            tag = rng.choice(TAGS)
            url = f"/pooler/{view}?tag={tag}"
            try:
                status, raw = http.get(socket_path, url, timeout=plan.request_timeout_s)
            except Exception as exc:
                with lock:
                    counts.requests += 1
                    counts.no_answer += 1
                    kind = f"no answer: {type(exc).__name__}"
                    counts.error_kinds[kind] += 1
                    counts.error_samples.setdefault(kind, str(exc)[:300])
                continue
            outcome, body = judge(tag, view, status, raw)
            with lock:
                counts.requests += 1
                if isinstance(body.get("pid"), int):
                    counts.answering_pids.add(body["pid"])
                if outcome == "ok":
                    counts.ok += 1
                elif outcome == "loud":
                    counts.loud += 1
                    kind = blur(str(body.get("error", "")))
                    counts.error_kinds[kind] += 1
                    counts.error_samples.setdefault(kind, str(body.get("error", ""))[:500])
                else:
                    if outcome == "foreign":
                        counts.wrong_foreign += 1
                    else:
                        counts.wrong_partial += 1
                    if len(counts.wrong_samples) < 20:
                        counts.wrong_samples.append(
                            {
                                "url": url,
                                "tag": tag,
                                "status": status,
                                "kind": outcome,
                                "rows": body.get("rows"),
                                "pid": body.get("pid"),
                                "client_thread": n,
                                "request": i,
                                "at": time.monotonic(),
                            }
                        )

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(plan.threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, stop_at - time.monotonic()) + plan.request_timeout_s + 10)
    counts.seconds = time.monotonic() - started
    if any(t.is_alive() for t in threads):
        counts.error_kinds["a client thread did not finish"] += 1
    return counts


def seed_rows(name: str) -> None:
    """The tags' rows, straight on PostgreSQL (through PgBouncer, psycopg's own statements would stay behind)."""
    import psycopg

    from tests.support import dbserver

    with psycopg.connect(dbserver.server_url("postgres"), dbname=name, autocommit=True) as conn, conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO sh_hit (marker, pid) VALUES (%s, 0)", [(f"{tag}-{n}",) for tag in TAGS for n in range(ROWS)]
        )


def run_arm(view: str, worker_class: str, arm: str, plan: Plan, seed: int) -> ArmCounts:
    from tests.conftest import project_env
    from tests.support import dbserver, procs
    from tests.support import pgbouncer as pgbouncer_support

    out = OUT_DIR / f"{view}-{worker_class}-{arm}"
    name = dbserver.create_database("postgres")
    server: procs.Server | None = None
    try:
        schema(project_env(dbserver.django_url("postgres", name), **bytecode_env()), CODE_DIR)
        seed_rows(name)
        with pgbouncer_support.running([name], settings=BOUNCER) as bouncer:
            try:
                env = project_env(
                    f"postgres://postgres@127.0.0.1:{bouncer.port}/{name}{QUERIES[view]}",
                    CONN_MAX_AGE=600,
                    QUERY_AT_IMPORT=1 if view == "iterate" else 0,
                    SERVERHOOKS_PROBE_DATABASES=1 if view == "iterate" else 0,
                    **bytecode_env(),
                )
                settings = {"_source": CONF_SOURCE[arm], "worker_class": worker_class, "preload_app": True}
                server = procs.start_gunicorn(out, env, settings=settings, workers=WORKER_CLASSES[worker_class])
                server.wait_ready(60)
                counts = load(server.socket_path, view, plan, seed)
                counts.workers = server.workers()
                server.stop()
                counts.worker_deaths = len(_DEATHS.findall(server.log()))
            finally:
                if server is not None:
                    server.stop()  # once only: a no-op after the stop above
                (out / "pgbouncer.log").write_text(bouncer.logs())
        return counts
    finally:
        drop_quietly("postgres", name)


def _cell(counts: ArmCounts) -> dict[str, Any]:
    return {
        **{k: v for k, v in dataclasses.asdict(counts).items() if k not in ("error_kinds", "answering_pids")},
        "error_kinds": dict(counts.error_kinds.most_common()),
        "answering_pids": sorted(counts.answering_pids),
        "wrong": counts.wrong,
    }


def render(plan: Plan, env: dict[str, str], results: dict[str, Any], took: float, alarms: list[str]) -> str:
    lines = report_head(
        "Issue 21 under concurrent load: .iterator() and prepared statements behind PgBouncer 1.18",
        "bench.pooler_load",
        plan.mode,
        took,
        env,
    )
    lines += [f"| {k} | {v} |" for k, v in env.items() if k != "date"]
    lines += [
        f"| load | {plan.threads} client threads x {plan.per_thread} requests per arm, a random tag of "
        f"{len(TAGS)} each ({ROWS} rows a tag); deadline {plan.deadline_s:g} s per arm |",
        f"| PgBouncer | transaction mode, {', '.join(f'{k} {v}' for k, v in BOUNCER.items())}, one per arm |",
        "| Django | DISABLE_SERVER_SIDE_CURSORS False (its default), CONN_MAX_AGE 600, preload_app |",
        "",
    ]
    if alarms:
        lines += ["## WRONG ANSWERS IN A SERVERHOOKS ARM: a bug, not a figure", ""]
        lines += [f"- `{a}`" for a in alarms]
        lines += [""]
    for view in VIEWS:
        lines += [
            f"## {view}: /pooler/{view}?tag=X{QUERIES[view].replace('?', '&')}",
            "",
            "| workers | arm | requests | ok | wrong: foreign rows | wrong: partial | loud (non-200) "
            "| no answer | worker deaths | s | loud errors by kind |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for worker_class, n in WORKER_CLASSES.items():
            for arm in ARMS:
                c = results[view][worker_class][arm]
                ranked = list(c["error_kinds"].items())
                kinds = "; ".join(f"{count} x `{kind}`" for kind, count in ranked[:KINDS_SHOWN]) or "none"
                if len(ranked) > KINDS_SHOWN:
                    kinds += f"; {sum(n for _, n in ranked[KINDS_SHOWN:])} of {len(ranked) - KINDS_SHOWN} other kinds"
                wrong_foreign = f"**{c['wrong_foreign']}**" if arm == FIX else str(c["wrong_foreign"])
                wrong_partial = f"**{c['wrong_partial']}**" if arm == FIX else str(c["wrong_partial"])
                lines.append(
                    f"| {worker_class} -w {n} | {arm} | {c['requests']} | {c['ok']} | {wrong_foreign} "
                    f"| {wrong_partial} | {c['loud']} | {c['no_answer']} | {c['worker_deaths']} "
                    f"| {c['seconds']:.0f} | {kinds} |"
                )
        lines.append("")
    fix_wrong = sum(results[v][w][FIX]["wrong"] for v in VIEWS for w in WORKER_CLASSES)
    lines += [
        f"Wrong answers in the serverhooks arms, all rows: **{fix_wrong}** (the target: 0).",
        "",
        "Arms: **plain** has no serverhooks line in its Gunicorn config; **control** has it, then "
        "`serverhooks.cursornames.set_enabled(False)`; **serverhooks** has it alone. *foreign rows*: HTTP 200 "
        "with a row of another tag; *partial*: HTTP 200 with only its own rows but not all of them. Worker "
        "deaths: the master's log (a signal such as SIGSEGV, a timeout, an error exit). Error kinds: the first line "
        "of the view's `error`, numbers shown as N, serverhooks' random name part as `<token>`. Logs, PgBouncer's "
        "logs and raw.json (one unblurred error per kind, the first wrong answers in full) in bench/out/pooler/.",
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = bench_arguments("Issue 21 under concurrent load behind PgBouncer; writes bench/POOLER_RESULTS.md.",
                           RESULTS_PATH, argv)  # fmt: skip
    from tests.support import pgbouncer as pgbouncer_support

    if not pgbouncer_support.installed():
        print(pgbouncer_support.MISSING, file=sys.stderr)
        return 2
    plan = QUICK if args.quick else FULL
    shutil.rmtree(OUT_DIR, ignore_errors=True)
    OUT_DIR.mkdir(parents=True)
    started = time.monotonic()
    env = {
        **environment(),
        "pgbouncer": ".".join(str(p) for p in pgbouncer_support.version()),
        **snapshot_code(CODE_DIR),
    }
    env.pop("mysql_server", None)
    env.pop("mysqlclient", None)
    results: dict[str, dict[str, dict[str, Any]]] = {}
    alarms: list[str] = []
    seed = 0
    for view in VIEWS:
        for worker_class in WORKER_CLASSES:
            for arm in ARMS:
                seed += 1
                counts = run_arm(view, worker_class, arm, plan, seed)
                results.setdefault(view, {}).setdefault(worker_class, {})[arm] = _cell(counts)
                print(
                    f"{view} {worker_class} {arm}: {counts.requests} requests, {counts.ok} ok, "
                    f"{counts.wrong_foreign} foreign, {counts.wrong_partial} partial, {counts.loud} loud, "
                    f"{counts.no_answer} no answer, {counts.seconds:.1f} s",
                    flush=True,
                )
                if arm == FIX and counts.wrong:
                    for sample in counts.wrong_samples:
                        alarms.append(f"{view} {worker_class}: {json.dumps(sample)} workers {counts.workers}")
                    print("WRONG ANSWER IN THE SERVERHOOKS ARM:\n" + "\n".join(alarms), file=sys.stderr)
    took = time.monotonic() - started
    raw = {"plan": dataclasses.asdict(plan), "env": env, "results": results, "alarms": alarms}
    status = write_report(OUT_DIR, raw, render(plan, env, results, took, alarms), args.results)
    return 1 if alarms else status


if __name__ == "__main__":
    sys.exit(main())
