"""Helpers shared by the benchmarks: statistics, the frozen code snapshot, /proc CPU accounting, the report.

Gunicorn masters started by a bench import the bench's module (for its hooks), and with it
this one: its top level imports nothing but the standard library.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
# Bytecode caches for every process a bench starts, as an installed package would have
# them (this machine may set PYTHONDONTWRITEBYTECODE): outside the source tree.
PYCACHE_DIR = BENCH_DIR / "out" / "pycache"

FAMILY_TITLE = {"mysql": "MariaDB", "postgres": "PostgreSQL"}

# =========================================================================== statistics


class Counts(Protocol):
    """What a bench's per-thread load counters offer (each bench has its own fields)."""

    requests: int
    in_window: int
    ok: int
    wrong: int
    http_errors: int
    failures: int
    client_cpu_s: float

    def add(self, other: Any) -> None: ...

    def note(self, message: str) -> None: ...


C = TypeVar("C", bound=Counts)


@dataclasses.dataclass(frozen=True)
class Clients:
    """The load: client processes, each with threads sending one request at a time."""

    procs: int
    threads: int  # per process

    @property
    def concurrency(self) -> int:
        return self.procs * self.threads


def timed_requests(
    start_at: float, end_at: float, limit: int, out: Counts, send: Callable[[int], tuple[str, str]]
) -> None:
    """One client thread: request after request from start_at until end_at (at most `limit`).

    `send(i)` makes request i and says how it went: ("ok", ""), ("wrong", what came back) or
    ("http", the status). A request that could not be made is counted as a failure here.
    """
    time.sleep(max(0.0, start_at - time.monotonic()))
    for i in range(limit):
        if time.monotonic() >= end_at:
            break
        try:
            outcome, detail = send(i)
        except Exception as exc:
            out.failures += 1
            out.note(f"{type(exc).__name__}: {exc}")
            continue
        done = time.monotonic()
        out.requests += 1
        if outcome == "ok":
            out.ok += 1
            out.in_window += done <= end_at
        elif outcome == "wrong":
            out.wrong += 1
            out.note(detail)
        else:
            out.http_errors += 1
            out.note(detail)


def run_client_threads(
    thread: Callable[..., None], counts: Callable[[], C], args: tuple[str, int, float, float, int]
) -> C:
    """One load-client process: `threads` threads running `thread` from start_at to end_at.

    Returns their summed counts, with the process's CPU time, so a bench can show its client
    is not the bottleneck. Every join is bounded.
    """
    path, threads, start_at, end_at, limit = args
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_before = usage.ru_utime + usage.ru_stime
    per_thread = [counts() for _ in range(threads)]
    prefix = uuid.uuid4().hex[:16]
    clients = [
        threading.Thread(target=thread, args=(path, f"{prefix}t{n}", start_at, end_at, limit, per_thread[n]))
        for n in range(threads)
    ]
    for t in clients:
        t.start()
    for t in clients:
        t.join(max(0.0, end_at - time.monotonic()) + 30.0)
    total = counts()
    for each in per_thread:
        total.add(each)
    if any(t.is_alive() for t in clients):
        total.failures += 1
        total.note("a client thread did not finish")
    usage = resource.getrusage(resource.RUSAGE_SELF)
    total.client_cpu_s = usage.ru_utime + usage.ru_stime - cpu_before
    return total


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def quartiles(values: Sequence[float]) -> tuple[float, float]:
    if len(values) < 2:
        return (median(values), median(values))
    q1, _q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def bootstrap(
    a: Sequence[float], b: Sequence[float], stat: Callable[[float, float], float], n: int = 2000, seed: int = 12345
) -> tuple[float, float]:
    """95% percentile-bootstrap interval of stat(median(a), median(b)), resampling each arm."""
    if not a or not b:
        return (float("nan"), float("nan"))
    rng = random.Random(seed)
    values = sorted(stat(median(rng.choices(a, k=len(a))), median(rng.choices(b, k=len(b)))) for _ in range(n))
    return values[int(0.025 * (n - 1))], values[int(0.975 * (n - 1))]


# =========================================================================== the code under test


def bytecode_env() -> dict[str, str]:
    return {"PYTHONPYCACHEPREFIX": str(PYCACHE_DIR), "PYTHONDONTWRITEBYTECODE": ""}


def git(*args: str) -> bytes:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, check=True, timeout=60).stdout


def snapshot_code(code_dir: Path, committed: Sequence[str] = ("serverhooks", "tests")) -> dict[str, str]:
    """Copy the code under test into `code_dir` and precompile it; say what was taken.

    `committed` (paths in the repository) are taken as committed at HEAD; the bench's own
    modules (bench/*.py) as they are in the checkout."""
    import io
    import tarfile

    shutil.rmtree(code_dir, ignore_errors=True)
    code_dir.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(git("archive", "--format=tar", "HEAD", *committed))) as tar:
        tar.extractall(code_dir, filter="data")
    (code_dir / "bench").mkdir()
    for source in sorted(BENCH_DIR.glob("*.py")):
        shutil.copy2(source, code_dir / "bench" / source.name)
    # serverhooks imports some modules lazily in each worker: give them bytecode, as pip install would.
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(code_dir)],
        env={**os.environ, **bytecode_env()},
        check=True,
        timeout=120,
        stdout=subprocess.DEVNULL,
    )
    version = re.search(r'__version__ = "([^"]+)"', (code_dir / "serverhooks" / "__init__.py").read_text())
    uncommitted = git("status", "--porcelain", "--", *committed).decode().split("\n")
    return {
        "serverhooks": version.group(1) if version else "?",
        "commit": git("rev-parse", "--short", "HEAD").decode().strip(),
        "uncommitted": str(len([line for line in uncommitted if line.strip()])),
    }


def schema(env: dict[str, str], code_dir: Path) -> None:
    """Create the test project's table in env's DATABASE_URL, with the snapshot's project."""
    subprocess.run(
        [sys.executable, "-m", "tests.project.schema"],
        cwd=REPO,
        env={**os.environ, **env, "PYTHONSAFEPATH": "1", "PYTHONPATH": str(code_dir)},
        check=True,
        timeout=60,
    )


def drop_quietly(family: str, name: str) -> None:
    from tests.support import dbserver

    try:
        dbserver.drop_database(family, name)
    except Exception as exc:
        print(f"  could not drop {family} database {name}: {exc}", file=sys.stderr)


# =========================================================================== CPU accounting from /proc

TICKS = os.sysconf("SC_CLK_TCK")
DB_PROCESS_NAMES = {"mariadbd", "mysqld", "postgres"}


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime of `pids`, from /proc."""
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / TICKS
        except (OSError, IndexError, ValueError):
            pass
    return total


def db_server_pids() -> list[int]:
    pids: list[int] = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm") as f:
                    if f.read().strip() in DB_PROCESS_NAMES:
                        pids.append(int(entry))
            except OSError:
                pass
    return pids


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (user, nice, system, irq, softirq), from /proc/stat."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in f.readline().split()[1:8])
    return (user + nice + system + irq + softirq) / TICKS


# =========================================================================== report


def version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def libpq() -> str:
    try:
        import psycopg

        v = psycopg.pq.version()
        return f"{v // 10000}.{v % 10000}"
    except Exception:
        return "?"


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def environment(extra_dists: Sequence[str] = ()) -> dict[str, str]:
    from tests.support import dbserver

    info = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cores": str(os.cpu_count()),
        "usable_cores": str(len(os.sched_getaffinity(0))),
        "cpu": "?",
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "gunicorn": version("gunicorn"),
        "Django": version("Django"),
        "mysqlclient": version("mysqlclient"),
        "psycopg": f"{version('psycopg')} (libpq {libpq()})",
        "load_before": load_average(),
        "dont_write_bytecode": os.environ.get("PYTHONDONTWRITEBYTECODE", "") or "unset",
    }
    for dist in extra_dists:
        info[dist] = version(dist)
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        pass
    for family in ("mysql", "postgres"):
        try:
            info[f"{family}_server"] = str(dbserver.query(family, "SELECT VERSION()")[0][0]).split(" on ")[0]
        except Exception as exc:
            info[f"{family}_server"] = f"unreachable ({type(exc).__name__})"
    return info


def yes(flag: bool) -> str:
    return "**yes**" if flag else "**NO**"


def verdict(met: bool, interval: tuple[float, float], threshold: float) -> str:
    """Met or not, where the 95% interval tells; where it straddles the threshold, the noise is
    larger than the margin and the point estimate alone decides nothing."""
    lo, hi = interval
    if lo < threshold < hi:
        return (
            f"**not resolved** (the point estimate says {'yes' if met else 'no'}, but the 95% CI straddles "
            f"{threshold:g}: the noise is larger than the margin)"
        )
    return yes(met)


def bench_arguments(description: str, results: Path, argv: Sequence[str] | None) -> argparse.Namespace:
    """Every bench's command line: --quick, and --results (where the report goes), and runs it
    from the repository root with the repository importable."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="short smoke run (about a minute)")
    parser.add_argument("--results", type=Path, default=results, help=f"where to write the report (default {results})")
    parser.add_argument("--no-wait", action="store_true", help="do not wait for a quiet machine first (gevent bench)")
    args = parser.parse_args(argv)
    os.chdir(REPO)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    return args


def http_get(path: str, target: str, timeout: float = 10.0) -> tuple[int, bytes]:
    """One GET on a fresh unix-socket connection, closed by the server after the response.

    HTTP/1.0 with Connection: close, so the body comes whole and the connection ends."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
        sock.sendall(f"GET {target} HTTP/1.0\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
        chunks: list[bytes] = []
        for _ in range(1000):  # a response is a few hundred bytes
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
        else:
            raise RuntimeError("response longer than expected")
    finally:
        sock.close()
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def write_report(out_dir: Path, raw: dict[str, Any], report: str, results: Path) -> int:
    """The raw numbers to out_dir/raw.json, the report to `results` and stdout; the exit status."""
    (out_dir / "raw.json").write_text(json.dumps(raw, indent=1, default=str))
    results.write_text(report)
    print(report)
    return 0


def report_head(title: str, module: str, mode: str, took: float, env: dict[str, str]) -> list[str]:
    """The first lines of every bench's report: what wrote it, then a table opening with the date."""
    return [
        f"# {title}",
        "",
        f"Written by `python -m {module}{' --quick' if mode == 'quick' else ''}` ({mode} run, "
        f"{took:.0f} s); bench/README.md says what each figure means. Regenerate rather than edit.",
        "",
        "| | |",
        "|---|---|",
        f"| date | {env['date']} |",
    ]
