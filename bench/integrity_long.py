"""The integrity suite's long run: many seeded sequences per mode and database, on the real servers.

    python -m bench.integrity_long                       # 5,000 sequences per mode and database
    python -m bench.integrity_long --quick               # 100 each, report to bench/out/
    python -m bench.integrity_long --code worktree       # the checkout's serverhooks, uncommitted changes too

It runs `python -m tests.support.integrity` (tests/support/integrity/, the model-based suite)
once per mode and database, in processes of their own (--jobs at a time), each on a database
of its own: serverhooks without a pool (plain), under the gevent pool and under the threads'
(ASGI) pool, all faults on; and plain Django without faults (django), which checks the model
itself on the same walk. Progress lines come through as the runs go.

The code under test: by default serverhooks as committed at HEAD (a `git archive` snapshot, as
the other benches take it) with the suite as it is in the checkout; `--code worktree` takes the
checkout as it is. The report names the commit and whether the checkout had uncommitted
changes to serverhooks, and says which was run.

The report goes to bench/INTEGRITY_RESULTS.md (each run a section, newest first; `--replace`
starts the file afresh): per mode and database the sequences run, how many failed and how,
the time per sequence, and for each kind of violation the minimal sequence the run shrank it
to, with the command that replays it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench import common

RESULTS = common.BENCH_DIR / "INTEGRITY_RESULTS.md"
OUT_DIR = common.BENCH_DIR / "out" / "integrity"
SEED = 20260601
HEADER = """# The integrity suite's long run

Written by `python -m bench.integrity_long` (tests/support/integrity/ is the suite; its docstrings say what
each step, mode and check is). Each run is a section below, newest first. Regenerate rather than edit.

A sequence is a seeded random walk of nested `atomic()` blocks and savepoints, caught database errors,
`execute_wrapper`s that raise, parameters the driver cannot adapt, releases (`release_connections()`,
`releasing()`, `Thread`, `ThreadPoolExecutor`, in other threads and in the caller's), interrupts after a
query or a COMMIT was sent, gevent timeouts, and sessions the server ends, between units of work and inside
them. The model says what each step must raise and which rows must be committed (read server-side at each
unit's end); a sequence stops at its first violation. *Minimal* is the shortest sequence the run shrank the
first failure of each kind to (replayed alone, from a clean process state).
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sequences", type=int, default=5000, help="per mode and database (default 5000)")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--modes", default="plain,gevent,threads,django")
    parser.add_argument("--databases", default="mysql,postgres")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2: this machine's cores)")
    parser.add_argument("--code", choices=["committed", "worktree"], default="committed")
    parser.add_argument("--commit", default="HEAD", help="with --code committed: which commit's serverhooks")
    parser.add_argument("--label", default="", help="what this run is, for the report (e.g. 'before the fixes')")
    parser.add_argument("--max-seconds", type=float, default=4 * 3600.0, help="per run: start no sequence after")
    parser.add_argument("--quick", action="store_true", help="100 sequences each; report to bench/out/")
    parser.add_argument("--results", type=Path, help=f"where the report goes (default {RESULTS})")
    parser.add_argument("--replace", action="store_true", help="start the report afresh instead of adding a section")
    args = parser.parse_args(argv)
    if args.quick:
        args.sequences = min(args.sequences, 100)
    if args.results is None:
        args.results = OUT_DIR / "INTEGRITY_RESULTS.md" if args.quick else RESULTS
    os.chdir(common.REPO)
    return args


def code_dir(kind: str, commit: str) -> tuple[Path, dict[str, str]]:
    """Where the runs start: a snapshot (serverhooks at `commit`, the suite from the checkout), or the checkout."""
    changed = common.git("status", "--porcelain", "--", "serverhooks").decode().split("\n")
    info = {
        "commit": common.git("rev-parse", commit).decode().strip(),
        "head": common.git("rev-parse", "HEAD").decode().strip(),
        "uncommitted": str(len([line for line in changed if line.strip()])),
    }
    if kind == "worktree":
        return common.REPO, {
            **info,
            "commit": info["head"],
            "code": "the checkout as it is (uncommitted changes included)",
        }
    import io
    import tarfile

    target = OUT_DIR / "code"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(common.git("archive", "--format=tar", commit, "serverhooks"))) as tar:
        tar.extractall(target, filter="data")
    for tree in ("tests", "bench"):
        shutil.copytree(
            common.REPO / tree, target / tree, ignore=shutil.ignore_patterns("__pycache__", "out"), dirs_exist_ok=True
        )
    where = "HEAD" if info["commit"] == info["head"] else f"commit {info['commit'][:12]} (HEAD is {info['head'][:12]})"
    return target, {**info, "code": f"serverhooks as committed at {where} (git archive); the suite from the checkout"}


def run_one(
    where: Path, mode: str, family: str, args: argparse.Namespace, results: dict[str, Any], lock: threading.Lock
) -> None:
    label = f"{mode}/{family}"
    out_json = OUT_DIR / f"{mode}-{family}.json"
    out_json.unlink(missing_ok=True)
    command = [
        sys.executable,
        "-m",
        "tests.support.integrity",
        *("--mode", mode, "--database", family, "--sequences", str(args.sequences), "--seed", str(args.seed)),
        *("--json", str(out_json), "--progress", "60", "--max-seconds", str(args.max_seconds)),
        *("--shrink", "8", "--shrink-seconds", "60", "--examples", "2"),
    ]
    if mode == "django":
        command.append("--no-faults")
    started = time.monotonic()
    proc = subprocess.Popen(
        command,
        cwd=where,
        env={**os.environ, **common.bytecode_env()},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    tail: list[str] = []
    for line in proc.stderr:  # progress lines; the rest (tracebacks) is kept for the report
        if line.startswith("["):
            print(line.rstrip(), flush=True)
        elif not line.startswith("serverhooks:"):
            tail = [*tail[-40:], line.rstrip()]
    try:
        code = proc.wait(timeout=args.max_seconds + 1800)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = proc.wait(30)
    result: dict[str, Any] = {"returncode": code, "wall_seconds": round(time.monotonic() - started, 1)}
    if out_json.exists():
        result.update(json.loads(out_json.read_text()))
    else:
        result["error"] = "\n".join(tail[-20:])
    with lock:
        results[label] = result
    print(f"[{label}] finished: exit {code}, {result.get('failing_sequences', '?')} failing sequences", flush=True)


def section(args: argparse.Namespace, info: dict[str, str], results: dict[str, Any], took: float) -> str:
    env = common.environment()
    title = f"## Run of {env['date']}: {args.label or info['code']}"
    lines = [
        title,
        "",
        f"`python -m bench.integrity_long --sequences {args.sequences} --seed {args.seed} --code {args.code}"
        + (f" --commit {args.commit}" if args.code == "committed" and args.commit != "HEAD" else "")
        + "` "
        f"({'quick' if args.quick else 'full'} run, {took / 60:.1f} min, {args.jobs} runs at a time).",
        "",
        f"- code under test: {info['code']}; commit `{info['commit']}`; "
        f"uncommitted changes to serverhooks/ in the checkout: {info['uncommitted']} file(s)"
        + (" (not in this run)" if args.code == "committed" and info["uncommitted"] != "0" else ""),
        f"- HEAD at the time of the run: `{info['head']}`",
        f"- seed {args.seed}; sequence i uses random.Random(seed * 1000003 + i); up to 28 steps each, plus the "
        "exits that close its blocks",
        "- environment: "
        + ", ".join(
            f"{key} {env[key]}" for key in ("cores", "cpu", "python", "Django", "mysql_server", "postgres_server")
        )
        + f", PyMySQL, psycopg {env['psycopg']}",
        "",
        "| mode / database | driver | sequences | failing | violations (sequences, by kind) | ms / sequence | steps "
        "(faults) | peak sessions | s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label in sorted(results):
        r = results[label]
        if "sequences" not in r:
            lines.append(f"| {label} | | | | run failed: {r.get('error', '?')[-300:]!r} | | | | |")
            continue
        kinds = ", ".join(f"{kind} {count}" for kind, count in sorted(r["violations"].items())) or "none"
        faults = "none (differential reference)" if not r["faults"] else str(r["fault_steps"])
        lines.append(
            f"| {label} | {r['driver']} | {r['sequences']} | {r['failing_sequences']} | {kinds} | "
            f"{r['ms_per_sequence']} | {r['steps']} ({faults}) | {r['peak_sessions']} | {r['seconds']} |"
        )
    lines += [""]
    retries = {label: r.get("environment_retries", 0) for label, r in results.items() if r.get("environment_retries")}
    if retries:
        lines += [
            "Sequences run again because the shared server was full of other suites' sessions (not findings): "
            + ", ".join(f"{label} {count}" for label, count in sorted(retries.items())),
            "",
        ]
    for label in sorted(results):
        r = results[label]
        if not r.get("violations"):
            continue
        lines += [f"### {label}: minimal sequences", ""]
        for kind in r["violations"]:
            minimal = r.get("minimal", {}).get(kind)
            example = (r.get("examples", {}).get(kind) or [{}])[0]
            if minimal and minimal.get("reproduced_alone"):
                replay = json.dumps(minimal["json"])
                lines += [
                    f"- **{kind}** ({r['violations'][kind]} sequences): {minimal['message']}",
                    f"  - minimal: `{minimal['steps']}`",
                    f"  - replay: `python -m tests.support.integrity --mode {r['mode']} --database {r['database']} "
                    f"--replay '{replay}'`",
                ]
            else:
                why = "not reproduced alone" if minimal else "not shrunk"
                lines += [
                    f"- **{kind}** ({r['violations'][kind]} sequences; {why}; first in sequence "
                    f"{example.get('sequence')}): {example.get('message')}",
                    f"  - sequence: `{example.get('steps')}`",
                ]
        lines.append("")
    return "\n".join(lines)


def write(results_path: Path, text: str, replace: bool) -> None:
    results_path.parent.mkdir(parents=True, exist_ok=True)
    previous = "" if replace or not results_path.exists() else results_path.read_text()
    older = previous.split("\n## Run of ", 1)[1] if "\n## Run of " in previous else ""
    body = HEADER + "\n" + text.rstrip() + "\n" + (("\n## Run of " + older) if older else "")
    results_path.write_text(body.rstrip() + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    where, info = code_dir(args.code, args.commit)
    print(f"integrity long run: {info['code']}, commit {info['commit'][:12]}, from {where}", flush=True)
    started = time.monotonic()
    results: dict[str, Any] = {}
    lock = threading.Lock()
    pending = [(m, f) for m in args.modes.split(",") for f in args.databases.split(",")]
    running: list[threading.Thread] = []
    while pending or running:
        running = [t for t in running if t.is_alive()]
        while pending and len(running) < args.jobs:
            mode, family = pending.pop(0)
            worker = threading.Thread(target=run_one, args=(where, mode, family, args, results, lock), daemon=True)
            worker.start()
            running.append(worker)
        time.sleep(0.5)
    took = time.monotonic() - started
    text = section(args, info, results, took)
    write(args.results, text, args.replace)
    (OUT_DIR / "raw.json").write_text(json.dumps(results, indent=1, default=str))
    print(text)
    print(f"report: {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
