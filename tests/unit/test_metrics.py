"""serverhooks.metrics without a database server: on SQLite, each case in a process of its own
(prometheus_client picks multiprocess mode at import, from the environment)."""

from __future__ import annotations

import ast
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from serverhooks._process import Counters
from tests.support import procs

pytestmark = pytest.mark.core


def run_script(script: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    full_env.update(
        DJANGO_SETTINGS_MODULE="tests.project.settings",
        DATABASE_URL=f"sqlite:///{tmp_path}/metrics.sqlite3",
        CONN_MAX_AGE="600",
        SERVERHOOKS_PROBE_DATABASES="0",
        **env,
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=procs.REPO, env=full_env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout[-3000:] + out.stderr[-3000:]
    return out


# Every hook serverhooks has, run once in this process, then a look at sys.modules.
HOOKS_THEN_MODULES = r"""
import logging, sys, types
logging.basicConfig(level=logging.DEBUG)
{block}
import django
django.setup()
from django.db import connection
from serverhooks import _adapter, gunicorn, worker
server = types.SimpleNamespace(log=None, cfg=types.SimpleNamespace(settings={{}}))
gunicorn.on_starting(server)
gunicorn.pre_fork(server, types.SimpleNamespace(pid=1))
gunicorn.post_fork(server, types.SimpleNamespace(pid=1))
_adapter.worker_ready(first_worker_of_server=True)
connection.ensure_connection()
gunicorn.child_exit(server, types.SimpleNamespace(pid=999999999))
worker.close_at_exit()
import serverhooks.metrics.django  # the view's module, as urls.py imports it
# Not imported (None: the "not installed" case's stand-in for a missing package).
assert sys.modules.get("prometheus_client") is None, sorted(m for m in sys.modules if "prom" in m)
assert not [m for m in sys.modules if m.startswith("prometheus_client.")]
print("ok")
"""


@pytest.mark.parametrize(
    ("env", "block"),
    [
        ({}, ""),
        ({"PROMETHEUS_MULTIPROC_DIR": "{tmp}", "SERVERHOOKS_METRICS": "0"}, ""),
        ({"PROMETHEUS_MULTIPROC_DIR": "{tmp}"}, "sys.modules['prometheus_client'] = None  # not installed"),
    ],
    ids=["not-configured", "switched-off", "not-installed"],
)
def test_off_nothing_is_imported_and_nothing_written(env: dict[str, str], block: str, tmp_path: Path) -> None:
    directory = tmp_path / "prom"
    directory.mkdir()
    env = {key: value.format(tmp=directory) for key, value in env.items()}
    out = run_script(HOOKS_THEN_MODULES.format(block=block), tmp_path, **env)
    assert list(directory.iterdir()) == []
    assert "WARNING" not in out.stderr, out.stderr


# A worker with metrics on: its counters, a pool's gauges and waits, as a scrape sees them.
ENABLED = r"""
import os, threading, time, types, django
django.setup()
from django.db import connection, connections
from prometheus_client import CollectorRegistry, multiprocess
from serverhooks import _adapter, gunicorn, metrics, stats
from serverhooks.pool.core import Pool
from serverhooks.pool.threads import ThreadWaiter

def scrape():
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    found = {}
    for family in registry.collect():
        for s in family.samples:
            found[(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "pid")))] = s.value
    return found

from serverhooks._process import state
state().counters.add("abandoned_after_fork", "default", 3)  # counted before metrics were on
_adapter.worker_ready(first_worker_of_server=False)
assert metrics.meter is not None
connection.ensure_connection()
m = scrape()
assert m[("serverhooks_sessions_opened_total", (("alias", "default"),))] == 1, m
assert m[("serverhooks_processes", ())] == 1, m
assert stats()["sessions_opened"] == 1
assert "by_alias" not in stats()
# Counters mirror the plain counters, also for increments made before metrics were on, by alias;
# every counter of every configured alias shows from the start; no alias applies to errors.
assert m[("serverhooks_abandoned_after_fork_total", (("alias", "default"),))] == 3, m
assert m[("serverhooks_closed_interrupted_total", (("alias", "default"),))] == 0, m
state().counters.errors += 2
assert scrape()[("serverhooks_errors_total", (("alias", ""),))] == 2

from serverhooks.metrics import _meter
_meter.SAMPLE_SECONDS = 3600  # the worker's sampler stays asleep: flush() by hand
pool = Pool("default", 1, 5.0, ThreadWaiter())
held = pool.checkout()
# The request path writes no gauge: the worker's sampler does, every SAMPLE_SECONDS.
assert scrape()[("serverhooks_pool_in_use", (("alias", "default"),))] == 0
metrics.meter.flush()
m = scrape()
assert m[("serverhooks_pool_size", (("alias", "default"),))] == 1, m
assert m[("serverhooks_pool_in_use", (("alias", "default"),))] == 1, m
assert m[("serverhooks_pool_idle", (("alias", "default"),))] == 0, m

def waiter():
    pool.checkin(pool.checkout())

t = threading.Thread(target=waiter)
t.start()
for _ in range(200):
    if scrape()[("serverhooks_pool_waiting", (("alias", "default"),))] == 1:
        break
    time.sleep(0.01)
else:
    raise AssertionError("the waiting thread never showed")
time.sleep(0.1)
pool.checkin(held)
t.join(10)
metrics.meter.flush()
m = scrape()
assert m[("serverhooks_pool_waiting", (("alias", "default"),))] == 0, m
assert m[("serverhooks_pool_in_use", (("alias", "default"),))] == 0, m
assert m[("serverhooks_pool_idle", (("alias", "default"),))] == 1, m
assert m[("serverhooks_pool_checkout_wait_seconds_count", (("alias", "default"),))] == 1, m
assert m[("serverhooks_pool_checkout_wait_seconds_sum", (("alias", "default"),))] >= 0.1, m
assert m[("serverhooks_pool_waits_total", (("alias", "default"),))] == 1, m
# No pool activated: pool_opened counts active pools only.
assert m[("serverhooks_pool_opened_total", (("alias", "default"),))] == 0

# The process exits: its live gauges go, its counters stay.
from serverhooks import worker
worker.close_at_exit()
names = sorted(os.listdir(os.environ["PROMETHEUS_MULTIPROC_DIR"]))
assert not [n for n in names if n.startswith("gauge_live")], names
assert f"counter_{os.getpid()}.db" in names, names
print("ok")
"""


def test_enabled_counters_gauges_and_waits_reach_the_files(tmp_path: Path) -> None:
    directory = tmp_path / "prom"
    directory.mkdir()
    run_script(ENABLED, tmp_path, PROMETHEUS_MULTIPROC_DIR=str(directory))


def test_sweep_removes_only_live_gauges_of_dead_pids(tmp_path: Path) -> None:
    from serverhooks.metrics import files

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid, live_pid = int(dead.stdout), os.getpid()
    assert not files.pid_alive(dead_pid)
    names = [
        f"gauge_livesum_{dead_pid}.db",
        f"gauge_liveall_{dead_pid}.db",
        f"gauge_livesum_{live_pid}.db",
        f"gauge_all_{dead_pid}.db",
        f"counter_{dead_pid}.db",
        f"histogram_{dead_pid}.db",
        "notes.txt",
    ]
    for name in names:  # a header that says "8 bytes used": a valid file with no value yet
        (tmp_path / name).write_bytes((8).to_bytes(4, "little") + bytes(4))
    assert files.sweep_dead(str(tmp_path)) == [dead_pid]
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(names[2:]), left


def test_control_without_the_sweep_dead_live_gauges_stay(tmp_path: Path) -> None:
    """The control arm: prometheus_client alone never removes a dead process's live gauges."""
    from serverhooks.metrics import files

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / f"gauge_livesum_{int(dead.stdout)}.db").write_bytes(b"")
    assert files.live_gauge_pids(str(tmp_path)) == {int(dead.stdout)}
    files.sweep_dead(str(tmp_path))
    assert files.live_gauge_pids(str(tmp_path)) == set()


MISCONFIGURED = r"""
import logging, django
logging.basicConfig(level=logging.INFO)
django.setup()
from django.db import connection
from serverhooks import _adapter, metrics, worker
_adapter.worker_ready(first_worker_of_server=False)
_adapter.worker_ready(first_worker_of_server=False)
assert metrics.meter is None
with connection.cursor() as cursor:
    cursor.execute("SELECT 1")
worker.close_at_exit()
print("ok")
"""


@pytest.mark.parametrize("kind", ["missing", "a-file"])
def test_misconfigured_directory_is_one_warning_and_the_process_carries_on(kind: str, tmp_path: Path) -> None:
    target = tmp_path / "prom"
    if kind == "a-file":
        target.write_text("")
    out = run_script(MISCONFIGURED, tmp_path, PROMETHEUS_MULTIPROC_DIR=str(target))
    warnings = [line for line in out.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1, out.stderr
    assert "PROMETHEUS_MULTIPROC_DIR" in warnings[0] and "SERVERHOOKS_METRICS=0" in warnings[0]
    assert "Create that directory" in warnings[0]


IMPORTED_TOO_EARLY = r"""
import logging, os, sys
logging.basicConfig(level=logging.INFO)
import prometheus_client  # before the variable is set: values stay in this process
os.environ["PROMETHEUS_MULTIPROC_DIR"] = sys.argv[1] if len(sys.argv) > 1 else os.environ["LATE_DIR"]
import django
django.setup()
from serverhooks import metrics
assert metrics.enable_if_configured(worker=True) is False and metrics.meter is None
print("ok")
"""


def test_prometheus_client_imported_before_the_variable_is_one_warning(tmp_path: Path) -> None:
    directory = tmp_path / "prom"
    directory.mkdir()
    out = run_script(IMPORTED_TOO_EARLY, tmp_path, LATE_DIR=str(directory))
    assert out.stderr.count("WARNING") == 1 and "imported before PROMETHEUS_MULTIPROC_DIR" in out.stderr, out.stderr


def test_every_counter_has_a_metric() -> None:
    from serverhooks.metrics import _meter

    fields = {field.name for field in dataclasses.fields(Counters)} - {"pid"}
    assert set(_meter.HELP) == fields


def test_gunicorn_exports_child_exit_and_chain_keeps_both() -> None:
    import serverhooks.gunicorn as adapter

    assert "child_exit" in adapter.__all__
    called: list[int] = []

    @adapter.chain
    def child_exit(server: object, worker: object) -> None:
        called.append(1)

    child_exit(None, type("W", (), {"pid": 999999999})())
    assert called == [1]


def test_readme_urls_snippet_serves_the_view(tmp_path: Path) -> None:
    import re
    import textwrap

    readme = (procs.REPO / "README.md").read_text()
    (snippet,) = [body for body in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "metrics_view" in body]
    directory = tmp_path / "prom"
    directory.mkdir()
    script = (
        "import django\ndjango.setup()\n" + textwrap.dedent(snippet) + "from django.test import RequestFactory\n"
        "from serverhooks import _adapter\n"
        "_adapter.worker_ready(first_worker_of_server=False)\n"
        "view = [p for p in urlpatterns if p.resolve('metrics')][0].resolve('metrics').func\n"
        "response = view(RequestFactory().get('/metrics'))\n"
        "assert response.status_code == 200, response.content\n"
        "assert b'serverhooks_processes 1.0' in response.content, response.content\n"
        "print('ok')\n"
    )
    run_script(script, tmp_path, PROMETHEUS_MULTIPROC_DIR=str(directory))


VIEW_WITHOUT_PROMETHEUS = r"""
import sys
sys.modules["prometheus_client"] = None  # not installed
import django
django.setup()
from django.test import RequestFactory
from serverhooks.metrics.django import metrics_view
response = metrics_view(RequestFactory().get("/metrics"))
assert response.status_code == 503 and b"serverhooks[prometheus]" in response.content, response.content
print("ok")
"""


def test_view_without_prometheus_client_says_what_to_install(tmp_path: Path) -> None:
    directory = tmp_path / "prom"
    directory.mkdir()
    run_script(VIEW_WITHOUT_PROMETHEUS, tmp_path, PROMETHEUS_MULTIPROC_DIR=str(directory))


COMPACTION = r"""
import os, signal, sys, time
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
from serverhooks.metrics import files

path = os.environ["PROMETHEUS_MULTIPROC_DIR"]
requests = Counter("app_requests", "Requests.", ["alias"])
waits = Histogram("app_wait_seconds", "Waits.", ["alias"], buckets=(0.1, 1.0))


def lives(count, first):
    # Each child counts, then dies: what max_requests recycling leaves behind.
    for n in range(first, first + count):
        pid = os.fork()
        if pid == 0:
            requests.labels("default").inc(n)
            requests.labels("replica").inc()
            waits.labels("default").observe(n % 3 * 0.3)
            os._exit(0)
        os.waitpid(pid, 0)


def scrape():
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path)
    return generate_latest(registry).decode()


def values(text):
    found = {}
    for line in text.splitlines():
        if not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            found[key] = float(value)
    return found


def db_files():
    return sorted(name for name in os.listdir(path) if name.endswith(".db"))


read, write = os.pipe()
live = os.fork()
if live == 0:  # a worker still running: its files must stay its own
    requests.labels("default").inc(1000)
    os.write(write, b"x")
    time.sleep(60)
    os._exit(0)
os.read(read, 1)
try:
    lives(40, 1)
    before = values(scrape())
    assert len(db_files()) == 81, db_files()  # 40 dead pids x (counter + histogram) + the live counter
    assert files.compact_dead(path, at_least=81) == 0  # below the threshold: nothing done
    with files.compaction_lock(path, exclusive=False, wait_seconds=0) as held:  # a scrape reading
        assert held
        assert files.compact_dead(path) == 0
    assert files.compact_dead(path) == 80
    after = values(scrape())
    assert after.keys() == before.keys()
    for key, value in before.items():  # counts exact; seconds never below (a reset), a rounding above
        assert value <= after[key] <= value * (1 + 1e-12), (key, value, after[key])
        assert after[key] == value or "_sum{" in key, (key, value, after[key])
    assert db_files() == sorted(["counter_archive.db", "histogram_archive.db", f"counter_{live}.db"]), db_files()
    lives(40, 41)  # more recycling: the archive absorbs the next dead pids, totals still exact
    files.compact_dead(path)
    after = scrape()
    assert 'app_requests_total{alias="default"} 4240.0' in after, after  # 1000 live + 1..80
    assert 'app_requests_total{alias="replica"} 80.0' in after, after
    assert 'app_wait_seconds_count{alias="default"} 80.0' in after, after
    assert len(db_files()) == 3, db_files()
finally:
    os.kill(live, signal.SIGKILL)
    os.waitpid(live, 0)
print("ok")
"""


def test_dead_workers_counter_files_merge_into_an_archive_totals_exact(tmp_path: Path) -> None:
    """1,000 recycles left 1,009 files and a 67 ms scrape (bench/METRICS_RESULTS.md): the dead
    pids' counter and histogram files are summed into one archive per type, and a scrape shows
    exactly what it showed before. The control is the first count: every life leaves its files."""
    directory = tmp_path / "prom"
    directory.mkdir()
    run_script(COMPACTION, tmp_path, PROMETHEUS_MULTIPROC_DIR=str(directory))


EMPTY_FILES = r"""
import os, struct, subprocess, sys
from prometheus_client import CollectorRegistry, Counter, generate_latest, multiprocess
from serverhooks.metrics import files
from serverhooks.metrics.collect import MultiProcessCollector

path = os.environ["PROMETHEUS_MULTIPROC_DIR"]
requests = Counter("app_requests", "Requests.")
pid = os.fork()
if pid == 0:
    requests.inc(7)
    os._exit(0)
os.waitpid(pid, 0)
dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout)
# What prometheus_client leaves between creating a file and sizing it: a process being born
# (this one) and one killed at that moment (dead).
for name in (f"counter_{os.getpid()}.db", f"counter_{dead}.db", f"gauge_all_{dead}.db"):
    open(os.path.join(path, name), "wb").close()

def text(collector_class):
    registry = CollectorRegistry()
    collector_class(registry, path)
    return generate_latest(registry).decode()

try:  # the control: prometheus_client's own collector fails the whole scrape
    text(multiprocess.MultiProcessCollector)
    raise AssertionError("prometheus_client read a 0-byte file")
except struct.error:
    pass
assert "app_requests_total 7.0" in text(MultiProcessCollector)
files.sweep_dead(path)  # a new worker: the dead pid's empty files go, the living one's stays
left = sorted(os.listdir(path))
assert left == sorted([f"counter_{pid}.db", f"counter_{os.getpid()}.db"]), left
os.unlink(os.path.join(path, f"counter_{os.getpid()}.db"))
assert "app_requests_total 7.0" in text(multiprocess.MultiProcessCollector)
open(os.path.join(path, f"counter_{dead}.db"), "wb").close()
assert files.compact_dead(path, at_least=1) == 2  # an empty dead file merges as nothing
assert "app_requests_total 7.0" in text(multiprocess.MultiProcessCollector)
print("ok")
"""


def test_empty_files_never_fail_serverhooks_scrape_and_dead_ones_go(tmp_path: Path) -> None:
    """prometheus/client_python#1199: a 0-byte file (created, not yet sized) fails every
    MultiProcessCollector scrape; the control shows it. serverhooks' collector skips it, and a
    new worker's sweep removes those of dead pids, so other endpoints recover too."""
    directory = tmp_path / "prom"
    directory.mkdir()
    run_script(EMPTY_FILES, tmp_path, PROMETHEUS_MULTIPROC_DIR=str(directory))


UNREADABLE_ARCHIVE = r"""
import logging, os, struct
from prometheus_client import CollectorRegistry, Counter, generate_latest, multiprocess
from serverhooks.metrics import files

path = os.environ["PROMETHEUS_MULTIPROC_DIR"]
warnings = []


class Collect(logging.Handler):
    def emit(self, record):
        warnings.append(record.getMessage())


logging.getLogger("serverhooks").addHandler(Collect(logging.WARNING))
if os.environ["ARM"] == "reverted":  # the control: the fix taken away
    files._keeps_unreadable_archive = lambda archive, unreadable: False
requests = Counter("app_requests", "Requests.")


def lives(count, amount):
    for _ in range(count):
        pid = os.fork()
        if pid == 0:
            requests.inc(amount)
            os._exit(0)
        os.waitpid(pid, 0)


def total():
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path)
    text = generate_latest(registry).decode()
    return float(text.split("\napp_requests_total ")[1].split()[0])


def dead_counter_files():
    mine = (files.archive_name("counter"), f"counter_{os.getpid()}.db")
    return sorted(name for name in os.listdir(path) if name.startswith("counter_") and name not in mine)


lives(3, 10)
assert files.compact_dead(path, at_least=1) == 3 and total() == 30.0
archive = os.path.join(path, files.archive_name("counter"))
with open(archive, "rb") as f:
    good = f.read()
# The archive turns unreadable: its first entry's length points past the data (prometheus_client:
# "Read beyond file size detected, file is corrupted").
bad = good[:8] + struct.pack("i", 1 << 20) + good[12:]
with open(archive, "wb") as f:
    f.write(bad)
lives(3, 5)
first, second = files.compact_dead(path, at_least=1), files.compact_dead(path, at_least=1)
left = len(dead_counter_files())
with open(archive, "rb") as f:
    kept = f.read() == bad
if kept:  # what the operator does next: the archive restored, readable again
    with open(archive, "wb") as f:
        f.write(good)
after = total()
files.compact_dead(path, at_least=1)  # readable again: the merge goes on, totals exact
print(dict(merged=[first, second], kept=kept, left=left, after=after, again=total(),
           warnings=len(warnings), warning=warnings[0] if warnings else ""))
print("ok")
"""


@pytest.mark.parametrize("arm", ["reverted", "fixed"])
def test_an_unreadable_archive_is_never_overwritten(arm: str, tmp_path: Path) -> None:
    """A merge that cannot read the archive wrote a new one from the dead files alone over it:
    30 counted, then 15 (a counter reset to Prometheus, 30 counts gone for good). Now the merge of
    that type waits, says so once, and every count survives (30 + 15 once the archive is back)."""
    directory = tmp_path / "prom"
    directory.mkdir()
    out = run_script(UNREADABLE_ARCHIVE, tmp_path, PROMETHEUS_MULTIPROC_DIR=str(directory), ARM=arm)
    result = ast.literal_eval(out.stdout.strip().splitlines()[-2])
    print(result)
    if arm == "reverted":
        assert result["merged"] == [3, 0] and not result["kept"] and result["left"] == 0, result
        assert result["after"] == result["again"] == 15.0, result  # 30 counts lost
        return
    assert result["merged"] == [0, 0] and result["kept"] and result["left"] == 3, result
    assert result["after"] == result["again"] == 45.0, result
    assert result["warnings"] == 1 and "counter_archive.db cannot be read" in result["warning"], result
    assert "corrupted" in result["warning"], result


METERED_THREADS = r"""
import sys, threading, django
django.setup()
from prometheus_client import CollectorRegistry, multiprocess
from serverhooks import _adapter, stats
from serverhooks._process import state
from serverhooks.metrics import _meter

_adapter.worker_ready(first_worker_of_server=False)
counters = state().counters
assert isinstance(counters, _meter.MeteredCounters), type(counters)
threads, each = 8, 5000
start = threading.Barrier(threads, timeout=10)


def checkouts():
    start.wait()
    for _ in range(each):
        counters.add("pool_reused", "default")


sys.setswitchinterval(1e-6)  # threads switch every microsecond: a lost update needs a switch inside add()
workers = [threading.Thread(target=checkouts) for _ in range(threads)]
for worker in workers:
    worker.start()
for worker in workers:
    worker.join(30)
sys.setswitchinterval(0.005)
registry = CollectorRegistry()
multiprocess.MultiProcessCollector(registry)
scraped = {(s.name, s.labels.get("alias")): s.value for family in registry.collect() for s in family.samples}
expected = threads * each
assert stats()["pool_reused"] == expected, stats()["pool_reused"]
assert counters.by_alias[("pool_reused", "default")] == expected
assert scraped[("serverhooks_pool_reused_total", "default")] == expected, scraped
print("ok")
"""


def test_metered_counters_count_exactly_under_threads(tmp_path: Path) -> None:
    """The metered subclass keeps add()'s lock: stats(), the alias totals and the scrape all agree
    on 40,000 checkouts counted by 8 threads (the unlocked control: tests/unit/test_counters.py)."""
    directory = tmp_path / "prom"
    directory.mkdir()
    run_script(METERED_THREADS, tmp_path, PROMETHEUS_MULTIPROC_DIR=str(directory))
