"""Gunicorn's dirty arbiter (Gunicorn 25+): a process pool the master forks after preload_app has
loaded the app and before its first pre_fork, which forks dirty workers of its own. No pre_fork or
post_fork runs for those forks.

A real dirty app (tests/project/dirty.py) answers through the ORM. The control, without
serverhooks, shows the master's database socket in the dirty arbiter and both dirty workers; with
the shipped line nothing is shared, the dirty app's answers are right, the dirty workers close
their sessions when they exit, and a user's own dirty hooks still run through @chain.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import project_env
from tests.support import dbserver, http, procs

pytestmark = pytest.mark.gunicorn

DIRTY_APP = "tests.project.dirty:OrmApp"
USER_HOOKS = """
from serverhooks.gunicorn import chain

def _mark(name):
    import os
    with open(os.path.join({log_dir!r}, name + "." + str(os.getpid())), "w"):
        pass

{decorator}
def on_starting(server):
    _mark("on_starting")

{decorator}
def dirty_post_fork(arbiter, worker):
    _mark("dirty_post_fork")

{decorator}
def dirty_worker_init(worker):
    _mark("dirty_worker_init")

{decorator}
def dirty_worker_exit(arbiter, worker):
    _mark("dirty_worker_exit")
"""


def _gunicorn_has_dirty_arbiter() -> bool:
    import gunicorn

    return tuple(gunicorn.version_info) >= (25, 0)


def start(tmp_path: Path, servers: list[procs.Server], url: str, hooks: bool) -> procs.Server:
    env = project_env(url, CONN_MAX_AGE=3600, QUERY_AT_IMPORT=1)
    procs.create_schema(env)
    marks = tmp_path / "marks"
    marks.mkdir(parents=True)
    # The same hooks of the user's own in both arms: plain without serverhooks, chained with it.
    chain_import = "from serverhooks.gunicorn import *\nfrom serverhooks.gunicorn import chain" if hooks else ""
    source = USER_HOOKS.format(log_dir=str(marks), chain_import=chain_import, decorator="@chain" if hooks else "")
    settings = {
        "_source": source,
        "preload_app": True,
        "dirty_workers": 2,
        "dirty_apps": [DIRTY_APP],
        "graceful_timeout": 10,
    }
    server = procs.start_gunicorn(tmp_path, env, settings=settings, workers=2)
    servers.append(server)
    server.wait_ready()
    return server


def process_tree(server: procs.Server) -> tuple[list[int], int, list[int]]:
    """(HTTP workers, the dirty arbiter, its dirty workers), waiting (bounded) for both dirty workers."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        children = procs.children(server.pid)
        arbiters = [
            pid for pid in children if "dirty" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        ]
        if arbiters and len(procs.children(arbiters[0])) >= 2:
            arbiter = arbiters[0]
            return [pid for pid in children if pid != arbiter], arbiter, procs.children(arbiter)
        time.sleep(0.1)
    raise AssertionError(f"no dirty arbiter with two workers:\n{server.log()[-3000:]}")


def marks(arm_dir: Path) -> set[str]:
    return {path.name.split(".")[0] for path in (arm_dir / "marks").iterdir()}


# A dirty worker that served requests does not leave on SIGTERM under Python 3.12+ (see the end of
# the test below): its dirty_worker_exit mark then never comes before the stop, so a short wait.
DIRTY_EXIT_WAIT = 10.0 if sys.version_info < (3, 12) else 2.0


def wait_for_mark(arm_dir: Path, name: str, timeout: float = DIRTY_EXIT_WAIT) -> None:
    """Until the user's hook `name` ran (bounded); whether Gunicorn calls it is for the caller to see."""
    deadline = time.monotonic() + timeout
    while name not in marks(arm_dir) and time.monotonic() < deadline:
        time.sleep(0.1)


def dirty_answers(server: procs.Server, count: int, check: bool = True) -> list[dict[str, object]]:
    """`count` requests through the dirty app; with `check`, each must come back right."""
    answers = []
    for _ in range(count):
        marker = uuid.uuid4().hex
        status, body = http.get(server.socket_path, f"/dirty?m={marker}", timeout=30)
        if not check:
            continue
        assert status == 200, body[:500]
        answer = json.loads(body)
        assert answer["m"] == marker, answer
        answers.append(answer)
    return answers


@pytest.mark.skipif(not _gunicorn_has_dirty_arbiter(), reason="Gunicorn's dirty arbiter is new in Gunicorn 25")
@pytest.mark.parametrize("family", ["mysql", "postgres"])
def test_dirty_processes_hold_no_inherited_socket_and_close_their_own(
    family: str, fresh_database: Callable[[str], str], servers: list[procs.Server], tmp_path: Path
) -> None:
    name = fresh_database(family)
    url = dbserver.django_url(family, name)

    control = start(tmp_path / "control", servers, url, hooks=False)
    workers, arbiter, dirty_workers = process_tree(control)
    held = procs.db_sockets([control.pid, arbiter, *dirty_workers], dbserver.port(family))
    master_inodes = held[control.pid]
    assert master_inodes, "the master holds its import-time connection (preload_app, CONN_MAX_AGE=3600)"
    inheritors = [pid for pid in (arbiter, *dirty_workers) if held[pid] & master_inodes]
    print(f"control {family}: the master's socket is in the dirty arbiter and {len(inheritors) - 1} dirty workers")
    assert set(inheritors) == {arbiter, *dirty_workers}
    dirty_answers(control, 5, check=False)  # the same load as below (its answers may be wrong here)
    os.kill(dirty_workers[0], signal.SIGTERM)  # as in the hooks arm below
    wait_for_mark(tmp_path / "control", "dirty_worker_exit")
    control.stop()
    dbserver.wait_sessions_at_most(family, name, 0)

    aborted_before = dbserver.aborted_clients() if family == "mysql" else 0
    server = start(tmp_path / "hooks", servers, url, hooks=True)
    workers, arbiter, dirty_workers = process_tree(server)
    answers = dirty_answers(server, 20)
    assert {a["pid"] for a in answers} <= set(dirty_workers)
    pids = [server.pid, *workers, arbiter, *dirty_workers]
    assert procs.shared_inodes(procs.db_sockets(pids, dbserver.port(family))) == {}
    sessions_while_serving = dbserver.sessions(family, name)
    assert {a["session"] for a in answers} <= set(sessions_while_serving)
    # A dirty worker that exits closes its sessions, and the arbiter's dirty_worker_exit runs (chained).
    os.kill(dirty_workers[0], signal.SIGTERM)
    wait_for_mark(tmp_path / "hooks", "dirty_worker_exit")
    server.stop()
    left = dbserver.wait_sessions_at_most(family, name, 0)
    assert left == [], f"sessions left after a graceful stop: {left}"
    if family == "mysql":
        assert dbserver.aborted_clients() == aborted_before, "every session ended with a goodbye"
    # The user's own hooks run with serverhooks exactly as without it. (A dirty worker that served
    # requests does not leave on SIGTERM under Python 3.12+ while the arbiter keeps its connection
    # open: asyncio's Server.wait_closed() waits for it. Then dirty_worker_exit runs at the stop.)
    control_marks, hooks_marks = marks(tmp_path / "control"), marks(tmp_path / "hooks")
    print(f"user hooks run by Gunicorn: {sorted(control_marks)}")
    assert control_marks >= {"on_starting", "dirty_post_fork", "dirty_worker_init"}
    assert hooks_marks == control_marks
