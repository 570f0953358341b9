"""Django's own test suite, plain and with serverhooks' worker preparation: every outcome must match.

    python -m bench.django_suite [--databases mysql,postgres] [--labels LABEL ...]
                                 [--order default,reverse] [--conn-max-age 600[,0]] [--results PATH]
                                 [--code worktree|REV] [--parallel N] [--confirm N] [--timeout S]

For each database, CONN_MAX_AGE and order (a "pass") it runs Django's `tests/runtests.py`
twice, in two arms:

- plain:    runtests.py as Django runs it;
- prepared: `serverhooks.prepare_worker()` right after every `django.setup()`, in the main
            process and in every parallel test worker (bench/django_suite_support/launch.py).

The suite is the one of exactly the installed Django: its sdist, fetched once with
`pip download --no-deps --no-binary :all: Django==<version>` into bench/out/django_suite/
(git-ignored). What runtests.py needs for these labels and the venv lacks (tblib for
--parallel, Pillow for the ImageField tests) is installed there too, with `pip install
--no-deps --target`, and put on the runs' PYTHONPATH: the venv itself is never changed.

Both arms use the same settings (bench/django_suite_support/settings_*.py): CONN_MAX_AGE=600
on both aliases by default, so that the persistent-connection code paths run, and database
names unique per run. Each run imports a snapshot of serverhooks/ taken at the start (the
working tree, or a commit with --code REV), so editing the checkout meanwhile cannot mix
versions. Outcomes are recorded per test and compared test by test; a pass whose arms differ
is run again, both arms (--confirm), and a difference counts only if it comes back. The
report (default bench/DJANGO_SUITE_RESULTS.md) gives the versions, the counts per outcome and
arm, the time of each run, and every test whose outcome differs, with its error. Exit status:
0 when every outcome matched, 1 when one differed (reproducibly) or a run did not finish, 2
when the setup failed. With the default labels a run takes 15 to 60 s on a 2-core machine.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from textwrap import indent
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
OUT = BENCH_DIR / "out" / "django_suite"
DEFAULT_RESULTS = BENCH_DIR / "DJANGO_SUITE_RESULTS.md"

DEFAULT_LABELS = (
    "transactions",
    "transaction_hooks",
    "backends",
    "basic",
    "queries",
    "select_for_update",
    "get_or_create",
    "bulk_create",
    "model_fields",
)
FAMILIES = {"mysql": "MariaDB", "postgres": "PostgreSQL"}
ARMS = ("plain", "prepared")
ORDERS = ("default", "reverse")
OUTCOMES = ("ok", "skipped", "expected failure", "FAIL", "ERROR", "unexpected success")
# Least to most severe: a test with several outcomes (failed, then errored in a cleanup) counts as its worst.
SEVERITY = ("ok", "skipped", "expected failure", "unexpected success", "FAIL", "ERROR")
# The server refused a new session: its max_connections was reached, by this run or by anything else on it.
REFUSED = re.compile(r"too many clients already|Too many connections|\(1040,|remaining connection slots are reserved")
NOT_RUN = "not run"
# Modules runtests.py uses for these labels when present, and the distributions that provide them.
EXTRAS = {"tblib": "tblib", "PIL": "Pillow"}
CONN_MAX_AGE = 600
PIP_TIMEOUT = 900
PIP = (sys.executable, "-m", "pip")


def _log(message: str) -> None:
    print(f"[django_suite {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ====================================================================== the suite and its needs


def fetch_suite(version: str) -> Path:
    """Django's tests/ folder of exactly `version`, from its sdist (cached under bench/out/)."""
    dest = OUT / f"django-{version}"
    if (dest / "tests" / "runtests.py").is_file():
        return dest / "tests"
    sdists = OUT / "sdist"
    sdists.mkdir(parents=True, exist_ok=True)
    archives = [p for p in sdists.glob("*.tar.gz") if p.name.lower() == f"django-{version}.tar.gz"]
    if not archives:
        _log(f"pip download --no-deps --no-binary :all: Django=={version}")
        subprocess.run(
            [*PIP, "download", "-q", "--no-deps", "--no-binary", ":all:", f"Django=={version}", "-d", str(sdists)],
            check=True,
            timeout=PIP_TIMEOUT,
        )
        archives = [p for p in sdists.glob("*.tar.gz") if p.name.lower() == f"django-{version}.tar.gz"]
    if not archives:
        raise RuntimeError(f"pip download left no django-{version}.tar.gz in {sdists}")
    staging = OUT / f"django-{version}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    with tarfile.open(archives[0]) as archive:
        _extract(archive, staging, [m for m in archive.getmembers() if m.name.split("/")[1:2] == ["tests"]])
    (top,) = [p for p in staging.iterdir() if p.is_dir()]
    dest.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):  # a concurrent run may have put it there first
        (top / "tests").rename(dest / "tests")
    shutil.rmtree(staging, ignore_errors=True)
    return dest / "tests"


def _extract(archive: tarfile.TarFile, where: Path, members: list[tarfile.TarInfo] | None = None) -> None:
    """extractall, refusing absolute paths, links out and device files where Python can (3.11.4+)."""
    if hasattr(tarfile, "data_filter"):
        archive.extractall(where, members=members, filter="data")
    else:  # pragma: no cover - older Pythons; the archives come from PyPI and git
        archive.extractall(where, members=members)


def ensure_extras() -> tuple[Path | None, dict[str, str]]:
    """Install what the venv lacks of EXTRAS into a folder of the harness's own.

    Returns that folder (None when nothing was missing) and {distribution: "version (where)"}.
    A package that cannot be installed is reported, and the tests that need it skip in both arms.
    """
    target = OUT / f"site-py{sys.version_info.major}{sys.version_info.minor}"
    found: dict[str, str] = {}
    missing: list[str] = []
    for module, dist in EXTRAS.items():
        if importlib.util.find_spec(module) is not None:
            found[dist] = f"{importlib.metadata.version(dist)} (the venv)"
        elif not (target / module).is_dir():
            missing.append(dist)
    if missing:
        _log(f"pip install --no-deps --target {target.relative_to(REPO)} {' '.join(missing)}")
        done = subprocess.run(
            [*PIP, "install", "-q", "--no-deps", "--target", str(target), *missing],
            timeout=PIP_TIMEOUT,
            check=False,
        )
        if done.returncode != 0:
            _log(f"could not install {missing}: the tests that need them skip in both arms")
    used = False
    for installed in importlib.metadata.distributions(path=[str(target)]):
        name = next((d for d in EXTRAS.values() if d.lower() == str(installed.metadata["Name"]).lower()), "")
        if name and name not in found:
            found[name] = f"{installed.version} (bench/out, --target)"
            used = True
    for dist in EXTRAS.values():
        found.setdefault(dist, "missing: its tests skip")
    return (target if used else None), found


def snapshot_code(run_root: Path, source: str) -> tuple[Path, str]:
    """serverhooks/ (as the working tree has it now, or as committed at `source`) plus the launcher.

    What every run imports, ahead of the editable install: edits meanwhile cannot mix versions.
    """
    code = run_root / "code"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    if source != "worktree":
        code.mkdir(parents=True)
        archive = subprocess.run(
            ["git", "archive", "--format=tar", source, "serverhooks"],
            cwd=REPO,
            capture_output=True,
            timeout=60,
            check=True,
        ).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            _extract(tar, code)
    else:
        shutil.copytree(REPO / "serverhooks", code / "serverhooks", ignore=ignore)
    (code / "bench").mkdir(parents=True)
    shutil.copy2(BENCH_DIR / "__init__.py", code / "bench" / "__init__.py")
    shutil.copytree(BENCH_DIR / "django_suite_support", code / "bench" / "django_suite_support", ignore=ignore)
    return code, tree_digest(code / "serverhooks")


def tree_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*.py")):
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _git(*args: str) -> str:
    try:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"(git unavailable: {exc})"
    return done.stdout.rstrip() if done.returncode == 0 else f"(git failed: {done.stderr.strip()[:200]})"


# ====================================================================== the servers


def _server_params(family: str) -> dict[str, Any]:
    from tests.support import dbserver

    return dbserver.connection_params(dbserver.server_url(family))


def server_version(family: str) -> str:
    from tests.support import dbserver

    sql = "SELECT version()" if family == "mysql" else "SHOW server_version"
    try:
        return str(dbserver.query(family, sql)[0][0])
    except Exception as exc:
        return f"unknown ({type(exc).__name__})"


def drop_leftovers(family: str, prefix: str) -> list[str]:
    """Drop every database a run with this prefix left behind (Django drops its own unless killed)."""
    from tests.support import dbserver

    if family == "mysql":
        names = [str(r[0]) for r in dbserver.query(family, "SHOW DATABASES")]
    else:
        names = [str(r[0]) for r in dbserver.query(family, "SELECT datname FROM pg_database")]
    mine = [n for n in names if n.startswith((prefix, f"test_{prefix}"))]
    for name in mine:
        if re.fullmatch(r"[A-Za-z0-9_]+", name):
            dbserver.drop_database(family, name)
    return mine


def driver_versions() -> dict[str, str]:
    versions: dict[str, str] = {}
    for dist in ("mysqlclient", "psycopg", "psycopg-binary"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[dist] = importlib.metadata.version(dist)
    try:
        import psycopg

        libpq = psycopg.pq.version()
        versions["libpq"] = f"{libpq // 10000}.{libpq % 10000}"
    except Exception:
        pass
    return versions


# ====================================================================== one run


@dataclasses.dataclass
class Outcome:
    outcome: str
    detail: str = ""
    serverhooks: dict[str, float] = dataclasses.field(default_factory=dict)
    log: list[str] = dataclasses.field(default_factory=list)

    @property
    def intervened(self) -> bool:
        """Did serverhooks close a connection during this test?"""
        return bool(self.serverhooks.get("closed_interrupted") or self.serverhooks.get("closed_unhealthy"))


def worst_of(outcome: str) -> str:
    parts = outcome.split("+")
    return max(parts, key=lambda part: SEVERITY.index(part) if part in SEVERITY else len(SEVERITY))


@dataclasses.dataclass(frozen=True)
class Pass:
    """One database, CONN_MAX_AGE and order: both arms run it, and their outcomes are compared."""

    family: str
    conn_max_age: int
    order: str

    def __str__(self) -> str:
        return f"{FAMILIES[self.family]}, CONN_MAX_AGE={self.conn_max_age}, {self.order} order"

    @property
    def slug(self) -> str:
        return f"{self.family}-age{self.conn_max_age}-{self.order}"


@dataclasses.dataclass
class Run:
    at: Pass
    arm: str
    folder: Path
    seconds: float = 0.0
    returncode: int | None = None
    timed_out: bool = False
    outcomes: dict[str, Outcome] = dataclasses.field(default_factory=dict)  # in the order they ran
    summary: dict[str, Any] | None = None
    ran: int | None = None  # "Ran N tests" from the text output
    marks: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    leftovers: list[str] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)

    @property
    def log_path(self) -> Path:
        return self.folder / "output.log"

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(OUTCOMES, 0)
        for result in self.outcomes.values():
            worst = worst_of(result.outcome)
            counts[worst] = counts.get(worst, 0) + 1
        return counts

    def serverhooks_totals(self) -> dict[str, float]:
        """The counters every prepared process logged at its end, added up."""
        totals: dict[str, float] = {}
        for mark in self.marks:
            if mark.get("event") == "exit":
                for key, value in mark.get("counters", {}).items():
                    if key != "pid" and isinstance(value, int | float):
                        totals[key] = totals.get(key, 0) + value
        return totals

    def last_intervention_before(self, test_id: str) -> tuple[str, Outcome, int] | None:
        """The last test before `test_id` in this run during which serverhooks closed a connection."""
        ids = list(self.outcomes)
        if test_id not in ids:
            return None
        at = ids.index(test_id)
        for back, earlier in enumerate(reversed(ids[:at]), start=1):
            if self.outcomes[earlier].intervened:
                return earlier, self.outcomes[earlier], back
        return None


def _environment(run: Run, code: Path, extras: Path | None, prefix: str) -> dict[str, str]:
    # No SERVERHOOKS_* override reaches a run (its settings module says what serverhooks does), and
    # nothing else decides what it imports.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("SERVERHOOKS_") and k not in {"DJANGO_SETTINGS_MODULE", "PYTHONPATH", "PYTHONSTARTUP"}
    }
    params = _server_params(run.at.family)
    env.update(
        PYTHONPATH=os.pathsep.join([str(code)] + ([str(extras)] if extras else [])),
        PYTHONUNBUFFERED="1",
        DJANGO_SUITE_DB_PREFIX=prefix,
        DJANGO_SUITE_DB_HOST=str(params["host"]),
        DJANGO_SUITE_DB_PORT=str(params["port"] or ""),
        DJANGO_SUITE_DB_USER=str(params["user"]),
        DJANGO_SUITE_DB_PASSWORD=str(params["password"]),
        DJANGO_SUITE_CONN_MAX_AGE=str(run.at.conn_max_age),
        DJANGO_SUITE_OUTCOMES=str(run.folder / "outcomes.jsonl"),
        DJANGO_SUITE_MARKS=str(run.folder / "marks.jsonl"),
    )
    return env


def _stop_group(process: subprocess.Popen[bytes]) -> None:
    """End the run's process group (runtests.py and its test workers): TERM, then KILL."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_suite(
    at: Pass,
    arm: str,
    *,
    suite: Path,
    labels: Sequence[str],
    code: Path,
    extras: Path | None,
    folder: Path,
    prefix: str,
    parallel: int,
    timeout: float,
) -> Run:
    folder.mkdir(parents=True, exist_ok=True)
    run = Run(at, arm, folder)
    command = [
        sys.executable,
        "-m",
        "bench.django_suite_support.launch",
        arm,
        str(suite / "runtests.py"),
        "--settings",
        f"bench.django_suite_support.settings_{at.family}",
        "--verbosity",
        "2",
        "--noinput",
        f"--parallel={parallel}",
        *(["--reverse"] if at.order == "reverse" else []),
        *labels,
    ]
    (folder / "command.txt").write_text(" ".join(command) + "\n")
    env = _environment(run, code, extras, prefix)
    _log(f"{at}, {arm}: runtests.py {' '.join(labels)} (timeout {timeout:.0f} s)")
    started = time.monotonic()
    with open(run.log_path, "wb") as log:
        process = subprocess.Popen(
            command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        try:
            run.returncode = process.wait(timeout)
        except subprocess.TimeoutExpired:
            run.timed_out = True
            run.problems.append(f"did not finish within {timeout:.0f} s: stopped")
        finally:
            if process.returncode is None:
                _stop_group(process)
            run.returncode = process.returncode
    run.seconds = time.monotonic() - started
    try:
        run.leftovers = drop_leftovers(at.family, prefix)
    except Exception as exc:
        run.problems.append(f"could not drop leftover databases: {type(exc).__name__}: {exc}")
    read_results(run)
    counts = ", ".join(f"{n} {k}" for k, n in run.counts().items() if n)
    _log(f"  {run.seconds:.0f} s, exit {run.returncode}: {counts or 'no outcomes'}")
    for problem in run.problems:
        _log(f"  problem: {problem}")
    return run


def read_results(run: Run) -> None:
    outcomes_file = run.folder / "outcomes.jsonl"
    lines = outcomes_file.read_text(encoding="utf-8").splitlines() if outcomes_file.exists() else []
    for raw in lines:
        try:
            line = json.loads(raw)
        except json.JSONDecodeError:
            run.problems.append(f"unreadable outcome line: {raw[:120]}")
            continue
        if "summary" in line:
            run.summary = line["summary"]
            continue
        test_id = str(line["id"])
        new = Outcome(str(line["outcome"]), str(line.get("detail") or ""), line.get("serverhooks") or {})
        new.log = list(line.get("log") or [])
        old = run.outcomes.get(test_id)
        if old is not None:  # e.g. a test that failed, then errored in a cleanup
            new = Outcome(
                f"{old.outcome}+{new.outcome}",
                f"{old.detail}\n{new.detail}",
                {
                    k: old.serverhooks.get(k, 0) + new.serverhooks.get(k, 0)
                    for k in {*old.serverhooks, *new.serverhooks}
                },
                old.log + new.log,
            )
        run.outcomes[test_id] = new
    text = run.log_path.read_text(encoding="utf-8", errors="replace") if run.log_path.exists() else ""
    ran = re.findall(r"^Ran (\d+) tests? in ", text, re.MULTILINE)
    run.ran = int(ran[-1]) if ran else None
    if run.summary is None and not run.timed_out:
        run.problems.append("runtests.py ended without finishing its test run (see its output.log)")
    if run.summary is not None and run.ran is not None and run.summary.get("testsRun") != run.ran:
        run.problems.append(f"recorded {run.summary.get('testsRun')} tests run, the text output says {run.ran}")
    if run.leftovers:
        run.problems.append(f"left databases behind (dropped): {', '.join(run.leftovers)}")
    marks_file = run.folder / "marks.jsonl"
    if marks_file.exists():
        run.marks = [json.loads(m) for m in marks_file.read_text(encoding="utf-8").splitlines() if m.strip()]
    if run.arm == "plain" and (run.marks or (run.summary or {}).get("serverhooks_imported")):
        run.problems.append("serverhooks was imported in the plain arm")
    if run.arm == "prepared":
        prepared = [m for m in run.marks if m.get("event") == "prepared"]
        if not prepared:
            run.problems.append("no process recorded prepare_worker(): the prepared arm was not prepared")
        for mark in prepared:
            if not str(mark.get("serverhooks", "")).startswith(str(run.folder.parent / "code")):
                run.problems.append(f"pid {mark.get('pid')} imported serverhooks from {mark.get('serverhooks')}")
            if not mark.get("tracking"):
                run.problems.append(f"pid {mark.get('pid')}: serverhooks is not tracking connections")


# ====================================================================== comparison and report


@dataclasses.dataclass
class Difference:
    at: Pass
    test_id: str
    plain: Outcome
    prepared: Outcome
    #: For each rerun of both arms: did this test's outcome differ again?
    reruns: list[bool] = dataclasses.field(default_factory=list)

    @property
    def reproduced(self) -> bool:
        """Counts as a difference: no rerun was made, or it differed again in every rerun."""
        return all(self.reruns)

    @property
    def refused(self) -> bool:
        """Did the server refuse a new session in either arm (max_connections reached)?"""
        return any(REFUSED.search(o.detail) for o in (self.plain, self.prepared))

    def rerun_text(self) -> str:
        if not self.reruns:
            return "not rerun"
        again = sum(self.reruns)
        return f"{'yes' if self.reproduced else 'no'} ({again}/{len(self.reruns)})"


def differences(plain: Run, prepared: Run) -> list[Difference]:
    found = []
    for test_id in sorted(set(plain.outcomes) | set(prepared.outcomes)):
        a = plain.outcomes.get(test_id, Outcome(NOT_RUN))
        b = prepared.outcomes.get(test_id, Outcome(NOT_RUN))
        if a.outcome != b.outcome:
            found.append(Difference(plain.at, test_id, a, b))
    return found


def error_lines(detail: str, count: int = 8) -> list[str]:
    """The end of a traceback (where the exception and the innermost frames are), at most `count` lines."""
    lines = [line.rstrip() for line in detail.strip().splitlines() if line.strip()]
    return lines[-count:]


def error_excerpt(detail: str, tail: int = 8) -> list[str]:
    """The frames of a traceback in Django's test files (where the test was), then its last lines."""
    lines = [line.rstrip() for line in detail.strip().splitlines() if line.strip()]
    if len(lines) <= tail + 6:
        return lines
    own = [
        i
        for i, line in enumerate(lines[:-tail])
        if line.lstrip().startswith('File "') and "/tests/" in line and "site-packages" not in line
    ]
    picked = [lines[j] for i in own[-3:] for j in (i, i + 1) if j < len(lines) - tail]
    return [*dict.fromkeys(picked), "  ...", *lines[-tail:]]


def _one_line(detail: str) -> str:
    last = error_lines(detail, 1)
    text = last[0].strip() if last else ""
    return (text[:160] + "...") if len(text) > 160 else text


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("`", "'")


def _seconds(run: Run) -> str:
    return f"{run.seconds:.0f} s" + (" (timed out)" if run.timed_out else "")


@dataclasses.dataclass
class Context:
    started: str
    command: str
    note: str
    django: str
    labels: list[str]
    parallel: int
    timeout: float
    head: str
    status: str
    code: str
    commit: str
    digest: str
    digest_after: str
    drivers: dict[str, str]
    extras: dict[str, str]
    servers: dict[str, str]


Runs = dict[Pass, dict[str, Run]]
Reruns = dict[Pass, list[dict[str, Run]]]


def compare(runs: Runs, reruns: Reruns) -> list[Difference]:
    """Every difference of the first round, with whether it differed again in each rerun of its pass."""
    found: list[Difference] = []
    for at, arms in runs.items():
        if "plain" not in arms or "prepared" not in arms:
            continue
        for difference in differences(arms["plain"], arms["prepared"]):
            for again in reruns.get(at, []):
                differing = {d.test_id for d in differences(again["plain"], again["prepared"])}
                difference.reruns.append(difference.test_id in differing)
            found.append(difference)
    return found


def render(context: Context, runs: Runs, reruns: Reruns, found: list[Difference]) -> tuple[str, int, int]:
    """The Markdown report, the number of (reproduced) differences, and the number of runs with problems."""
    all_differences = [d for d in found if d.reproduced]
    flaky = [d for d in found if not d.reproduced]
    every_run = [run for arms in runs.values() for run in arms.values()]
    every_run += [run for rounds in reruns.values() for arms in rounds for run in arms.values()]
    troubled = [run for run in every_run if run.problems]
    out: list[str] = []
    w = out.append
    w("# Django's own test suite, plain and with serverhooks' worker preparation\n")
    if context.note:
        w(f"{context.note}\n")
    verdict = "every outcome matched" if not all_differences else f"**{len(all_differences)} outcome(s) differ**"
    if flaky:
        verdict += (
            f" (and {len(flaky)} that differed once did not differ again when both arms ran that pass anew: "
            "not counted, listed below)"
        )
    if troubled:
        verdict += f"; **{len(troubled)} run(s) had problems** (below)"
    w(f"Result: {verdict}.\n")
    w(f"Generated by `{context.command}`, started {context.started}.\n")
    w("## What ran\n")
    if context.code == "worktree":
        w(f"- **Code**: the working tree of the checkout, whose `git rev-parse HEAD` was `{context.head}`.")
    else:
        w(
            f"- **Code**: `serverhooks/` as committed at `{context.commit}` (`--code {context.code}`); the "
            f"checkout's `git rev-parse HEAD` was `{context.head}`."
        )
    if context.status:
        w("  `git status --short serverhooks` at the start:\n\n  ```\n" + indent(context.status, "  ") + "\n  ```\n")
    else:
        w("  `git status --short serverhooks` at the start: empty (no uncommitted change in serverhooks/).")
    changed = "" if context.digest_after == context.digest else f"; it was `{context.digest_after}` at the end"
    where = "the working tree's `serverhooks/`" if context.code == "worktree" else "that commit's `serverhooks/`"
    w(
        f"  Every run imported a snapshot of {where}, taken at the start, ahead of the editable install "
        f"(sha256 of its sources `{context.digest}`{changed})."
    )
    w(f"- **Django {context.django}**'s own suite: `tests/` of its sdist (`pip download --no-binary :all:`), run")
    w(f"  by `tests/runtests.py --verbosity 2 --noinput --parallel={context.parallel}` [`--reverse`] with the labels")
    w(f"  `{' '.join(context.labels)}`. Each run was bounded by {context.timeout:.0f} s.")
    if context.parallel == 1:
        w(
            "  One process runs every test, so the order is fixed and the same in both arms (an order-dependent "
            "difference reproduces) and serverhooks' counters can be read per test. With `--parallel N` every "
            "test worker is prepared too (after Django's `_init_worker`), but which worker runs which test "
            "case varies from run to run."
        )
    drivers = ", ".join(f"{k} {v}" for k, v in context.drivers.items())
    w(f"- **Python** {platform.python_version()}; drivers: {drivers}")
    w(
        "  (Django uses psycopg 3 when it is installed); runtests.py extras: "
        + ", ".join(f"{k} {v}" for k, v in context.extras.items())
        + "."
    )
    w("- **Servers**: " + "; ".join(f"{FAMILIES[f]} {v}" for f, v in context.servers.items()) + ", on 127.0.0.1.")
    ages = sorted({at.conn_max_age for at in runs}, reverse=True)
    w(
        "- **Settings** (bench/django_suite_support/settings_*.py), the same in both arms: "
        f"`CONN_MAX_AGE` {' and '.join(map(str, ages))} on both aliases (`default`, `other`; a value above 0 "
        "makes the persistent-connection code paths run); database names unique per run; Django's test settings "
        "otherwise (`USE_TZ=False`, MD5 hasher). `SERVERHOOKS` turns the guard on explicitly "
        "(`CLOSE_INTERRUPTED`, `CHECK_IDLE_SESSIONS`, `FORK_GUARD`), and the harness clears any `SERVERHOOKS_*` "
        "override from the environment."
    )
    w(
        "- **Arms**: *plain* runs runtests.py as Django does; *prepared* runs `serverhooks.prepare_worker()` "
        "right after every `django.setup()` (the main process, and each parallel test worker), so every "
        "connection the tests open is tracked, health-watched and cursor-guarded. Outcomes are recorded "
        "per test by a `DiscoverRunner` subclass (one JSON line per outcome; text output unchanged).\n"
    )
    w("## Counts per outcome, and run times\n")
    w("| database | CONN_MAX_AGE | order | arm | " + " | ".join(OUTCOMES) + " | tests run | exit | time |")
    w("|---|---|---|---|" + "---|" * len(OUTCOMES) + "---|---|---|")
    for at, arms in runs.items():
        rounds = [("", arms)] + [(f", rerun {n}", again) for n, again in enumerate(reruns.get(at, []), start=1)]
        for suffix, arm, run in [(suffix, arm, run) for suffix, each in rounds for arm, run in each.items()]:
            counts = run.counts()
            w(
                f"| {FAMILIES[at.family]} | {at.conn_max_age} | {at.order} | {arm}{suffix} | "
                + " | ".join(str(counts[o]) for o in OUTCOMES)
                + f" | {run.ran if run.ran is not None else '-'} | {run.returncode} | {_seconds(run)} |"
            )
    w("")
    w(
        "Outcomes are counted per test id: a failing subtest counts under its own id, and an error outside a "
        "test (setUpClass, tearDownClass) under an id that says so, so the sum can exceed the tests run; a "
        "test with several outcomes (a failure, then an error in a cleanup) counts under the worst. A pass whose "
        "arms differed runs again, both arms (*rerun*), to tell a reproducible difference from a passing one.\n"
    )
    w("## serverhooks in the prepared arm\n")
    w("| database | CONN_MAX_AGE | order | processes prepared | sessions opened | closed interrupted | closed ended |")
    w("|---|---|---|---|---|---|---|")
    for at, arms in runs.items():
        if "prepared" not in arms:
            continue
        prepared_run = arms["prepared"]
        processes = len({m["pid"] for m in prepared_run.marks if m.get("event") == "prepared"})
        totals = prepared_run.serverhooks_totals()
        w(
            f"| {FAMILIES[at.family]} | {at.conn_max_age} | {at.order} | {processes} | "
            f"{totals.get('sessions_opened', 0):.0f} | {totals.get('closed_interrupted', 0):.0f} | "
            f"{totals.get('closed_unhealthy', 0):.0f} |"
        )
    w("")
    fired = [
        (at, test_id, o)
        for at, arms in runs.items()
        if "prepared" in arms
        for test_id, o in arms["prepared"].outcomes.items()
        if o.intervened
    ]
    if fired:
        w("Tests during which serverhooks closed a connection (prepared arm, from its counters and log):\n")
        w("| pass | test | outcome | serverhooks' log |")
        w("|---|---|---|---|")
        for at, test_id, o in fired:
            log = "<br>".join(_cell(line[:240]) for line in o.log)
            w(f"| {at} | `{test_id}` | {o.outcome} | {log} |")
        w("")
    w("## Differences\n")
    if not all_differences:
        w("None: every test had the same outcome in both arms, in every pass.\n")
    else:
        _difference_table(w, all_differences)
    if flaky:
        w("## Differences that did not reproduce\n")
        w(
            "These differed in one round only: when both arms ran the same pass again, the outcomes matched. "
            "Where the error says the server refused a new session (max_connections reached), the server was "
            "short of sessions at that moment, whoever held them (other test suites share it).\n"
        )
        _difference_table(w, flaky)
    if found:
        w("## Each difference in detail\n")
    for d in all_differences + flaky:
        w(f"### {d.at}: `{d.test_id}`\n")
        w(f"Reproduced on a rerun of both arms: {d.rerun_text()}.\n")
        for arm, o in (("plain", d.plain), ("prepared", d.prepared)):
            w(f"- {arm}: **{o.outcome}**")
            if o.detail and o.outcome not in ("ok", NOT_RUN):
                w("\n```\n" + "\n".join(error_excerpt(o.detail)) + "\n```\n")
            for line in o.log:
                w(f"  - serverhooks' log during it: `{_cell(line[:300])}`")
        if d.refused:
            w("- The server refused a new session here (max_connections reached).")
        earlier = runs[d.at]["prepared"].last_intervention_before(d.test_id)
        if earlier is not None:
            test_id, o, back = earlier
            log = "; ".join(_cell(line[:300]) for line in o.log)
            w(
                f"- In the prepared run, the last test before it during which serverhooks closed a connection "
                f"was `{test_id}` ({back} test(s) earlier, outcome {o.outcome}): {log}"
            )
        w("")
    w("## Not ok in both arms alike\n")
    w("The same outcome in both arms, so not a difference; listed to show what this environment does not pass.\n")
    any_alike = False
    for at, arms in runs.items():
        if not ("plain" in arms and "prepared" in arms):
            continue
        alike = [
            (test_id, o)
            for test_id, o in sorted(arms["plain"].outcomes.items())
            if o.outcome not in ("ok", "skipped", "expected failure")
            and arms["prepared"].outcomes.get(test_id, Outcome(NOT_RUN)).outcome == o.outcome
        ]
        if alike:
            any_alike = True
            w(f"- {at}:")
            for test_id, o in alike:
                w(f"  - `{test_id}`: {o.outcome}: {_cell(_one_line(o.detail))}")
    if not any_alike:
        w("None.")
    w("")
    if troubled:
        w("## Runs with problems\n")
        for run in troubled:
            for problem in run.problems:
                w(f"- {run.at}, {run.arm}: {problem}")
        w("")
    w("## Logs\n")
    w(f"Each run's output, outcomes and marks: `{_relative(every_run[0].folder.parent)}/` (git-ignored).")
    return "\n".join(out) + "\n", len(all_differences), len(troubled)


def _difference_table(w: Callable[[str], None], found: list[Difference]) -> None:
    w("| pass | test | plain | prepared | reproduced on rerun | last line of the error |")
    w("|---|---|---|---|---|---|")
    for d in found:
        w(
            f"| {d.at} | `{d.test_id}` | {d.plain.outcome} | {d.prepared.outcome} | {d.rerun_text()} | "
            f"{_cell(_one_line(d.prepared.detail if d.prepared.detail else d.plain.detail))} |"
        )
    w("")


def _relative(path: Path) -> str:
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)


# ====================================================================== main


def _csv(allowed: Sequence[str]) -> Any:
    def parse(text: str) -> list[str]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        bad = [item for item in items if item not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed)} (comma-separated), got {text!r}")
        return items

    return parse


def _ages(text: str) -> list[int]:
    try:
        ages = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected whole numbers of seconds, comma-separated, got {text!r}") from None
    if not ages or min(ages) < 0:
        raise argparse.ArgumentTypeError(f"expected whole numbers of seconds, comma-separated, got {text!r}")
    return ages


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.django_suite", description=__doc__.split("\n\n")[0])
    parser.add_argument("--databases", type=_csv(list(FAMILIES)), default=list(FAMILIES))
    parser.add_argument("--labels", nargs="+", default=list(DEFAULT_LABELS), help="runtests.py labels")
    parser.add_argument(
        "--conn-max-age",
        type=_ages,
        default=[CONN_MAX_AGE],
        help=f"CONN_MAX_AGE of both aliases, in both arms; a comma-separated list runs each (default {CONN_MAX_AGE})",
    )
    parser.add_argument("--order", type=_csv(ORDERS), default=list(ORDERS), help="default, reverse or both")
    parser.add_argument("--arms", type=_csv(ARMS), default=list(ARMS), help=argparse.SUPPRESS)
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="the Markdown report")
    parser.add_argument(
        "--parallel",
        type=int,
        default=1,
        help="runtests.py --parallel (default 1: one process runs the tests in a fixed order, the same in "
        "both arms, so an order-dependent difference reproduces; its counters are then per test)",
    )
    parser.add_argument(
        "--code",
        default="worktree",
        metavar="worktree|REV",
        help="which serverhooks the runs import: the working tree as it is at the start (default), or "
        "serverhooks/ as committed at a git revision (HEAD, a commit id; git archive)",
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds one runtests.py run may take")
    parser.add_argument(
        "--confirm",
        type=int,
        default=1,
        help="when the arms of a pass differ, run both arms of that pass this many times again; a difference "
        "counts only if it comes back every time (default 1; 0: every difference counts)",
    )
    parser.add_argument("--note", default="", help="a paragraph at the top of the report")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    given = list(sys.argv[1:] if argv is None else argv)
    shown = [("'...'" if i > 0 and given[i - 1] == "--note" else shlex.quote(a)) for i, a in enumerate(given)]
    command = " ".join(["python -m bench.django_suite", *shown])
    from tests.support import dbserver

    for family in args.databases:
        reason = dbserver.reachable(family)
        if reason is not None:
            print(f"{FAMILIES[family]} at {dbserver.server_url(family)} does not answer: {reason}", file=sys.stderr)
            return 2
    version = importlib.metadata.version("Django")
    try:
        suite = fetch_suite(version)
    except (subprocess.SubprocessError, OSError, RuntimeError, tarfile.TarError) as exc:
        print(f"cannot get Django {version}'s test suite: {exc}", file=sys.stderr)
        return 2
    extras, extra_versions = ensure_extras()
    run_root = OUT / "runs" / f"{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    run_root.mkdir(parents=True)
    try:
        code, digest = snapshot_code(run_root, args.code)
    except (subprocess.SubprocessError, OSError, tarfile.TarError) as exc:
        print(f"cannot snapshot serverhooks ({args.code}): {exc}", file=sys.stderr)
        return 2
    head, status = _git("rev-parse", "HEAD"), _git("status", "--short", "serverhooks")
    commit = head if args.code == "worktree" else _git("rev-parse", args.code)
    _log(f"Django {version} suite in {_relative(suite)}; code {args.code} ({commit[:12]}), snapshot {digest}")
    if status:
        _log(f"uncommitted in serverhooks/: {status!r}")
    runs: Runs = {}
    index = 0
    for family in args.databases:
        for conn_max_age in args.conn_max_age:
            for order in args.order:
                at = Pass(family, conn_max_age, order)
                runs[at] = {}
                for arm in args.arms:
                    index += 1
                    runs[at][arm] = run_suite(
                        at,
                        arm,
                        suite=suite,
                        labels=args.labels,
                        code=code,
                        extras=extras,
                        folder=run_root / f"{at.slug}-{arm}",
                        prefix=f"djsuite_{os.getpid()}_{index}",
                        parallel=args.parallel,
                        timeout=args.timeout,
                    )
    reruns: Reruns = {}
    for at, arms in runs.items():
        if "plain" not in arms or "prepared" not in arms or not differences(arms["plain"], arms["prepared"]):
            continue
        for n in range(1, args.confirm + 1):
            _log(f"{at}: the arms differed; running both again (rerun {n} of {args.confirm})")
            again: dict[str, Run] = {}
            for arm in ARMS:
                index += 1
                again[arm] = run_suite(
                    at,
                    arm,
                    suite=suite,
                    labels=args.labels,
                    code=code,
                    extras=extras,
                    folder=run_root / f"{at.slug}-{arm}-rerun{n}",
                    prefix=f"djsuite_{os.getpid()}_{index}",
                    parallel=args.parallel,
                    timeout=args.timeout,
                )
            reruns.setdefault(at, []).append(again)
    found = compare(runs, reruns)
    context = Context(
        started=started,
        command=command,
        note=args.note,
        django=version,
        labels=list(args.labels),
        parallel=args.parallel,
        timeout=args.timeout,
        head=head,
        status=status,
        code=args.code,
        commit=commit,
        digest=digest,
        digest_after=tree_digest(REPO / "serverhooks") if args.code == "worktree" else digest,
        drivers=driver_versions(),
        extras=extra_versions,
        servers={family: server_version(family) for family in args.databases},
    )
    report, differing, troubled = render(context, runs, reruns, found)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(report, encoding="utf-8")
    (run_root / "report.md").write_text(report, encoding="utf-8")
    _log(f"report: {_relative(args.results.resolve())}; {differing} difference(s), {troubled} run(s) with problems")
    for line in _summary_lines(runs):
        _log(line)
    return 1 if differing or troubled else 0


def _summary_lines(runs: Runs) -> Iterator[str]:
    for at, arms in runs.items():
        for arm, run in arms.items():
            counts = ", ".join(f"{n} {k}" for k, n in run.counts().items() if n)
            yield f"{at}, {arm:8} {run.seconds:5.0f} s: {counts}"


if __name__ == "__main__":
    sys.exit(main())
