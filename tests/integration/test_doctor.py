"""`serverhooks doctor` and the system checks, on real config files, real servers and databases.

Every static finding is triggered by a config and absent from a near-identical one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import project_env, require_server
from tests.support import dbserver, http, procs

pytestmark = pytest.mark.gunicorn

SECRET = "D0ctor-secret-pw"
BLOCK_PSYCOGREEN = "import sys; sys.modules['psycogreen'] = None; "


def doctor(args: list[str], env: dict[str, Any], prelude: str = "") -> tuple[int, dict[str, Any], str]:
    code = prelude + "import sys; from serverhooks.__main__ import main; sys.exit(main(sys.argv[1:]))"
    out = subprocess.run(
        [sys.executable, "-c", code, "doctor", *args, "--json"],
        cwd=procs.REPO,
        env={
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "tests.project.settings",
            **{key: str(value) for key, value in env.items()},
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "Traceback" not in out.stderr, out.stderr
    data = json.loads(out.stdout) if out.stdout.strip() else {}
    return out.returncode, data, out.stdout + out.stderr


def ids(args: list[str], env: dict[str, Any], prelude: str = "") -> set[str]:
    status, data, output = doctor(args, env, prelude)
    assert status in (0, 1), output
    assert status == (1 if data["findings"] else 0)
    return {finding["id"] for finding in data["findings"]}


def gunicorn_conf(tmp_path: Path, body: str, hooks: bool = False) -> str:
    # A new file name each time: Python may cache a config file's bytecode by mtime and size,
    # and two configs written within a second that differ in one digit would look the same.
    index = len(list(tmp_path.glob("*.conf.py")))
    path = tmp_path / f"{'hooks' if hooks else 'plain'}-{index}.conf.py"
    path.write_text(("from serverhooks.gunicorn import *\n" if hooks else "") + body + "\n")
    return str(path)


# The servers the suite was pointed at (SERVERHOOKS_TEST_*_URL), never a hard-coded one: inside
# the tests container on host networking, 127.0.0.1:3306 would be this machine's own server.
MYSQL = dbserver.server_url("mysql")
PG = dbserver.server_url("postgres")


def with_driver(url: str, driver: str) -> str:
    """`mysql://...` -> `mysql+pymysql://...` (only the scheme: a user may be called "postgres")."""
    scheme, rest = url.split("://", 1)
    return f"{scheme}+{driver}://{rest}"


@pytest.fixture(autouse=True)
def _servers_up() -> None:
    require_server("mysql")
    require_server("postgres")


@pytest.mark.parametrize("server", ["gunicorn", "uwsgi", "celery"])
def test_w001_forking_after_loading_with_persistent_connections(server: str, tmp_path: Path) -> None:
    env = {"DATABASE_URL": MYSQL, "CONN_MAX_AGE": 3600}
    if server == "gunicorn":
        affected = ["-c", gunicorn_conf(tmp_path, "preload_app = True")]
        fixed = ["-c", gunicorn_conf(tmp_path, "preload_app = True", hooks=True)]
    elif server == "uwsgi":
        (tmp_path / "a.ini").write_text("[uwsgi]\nmaster = true\nprocesses = 4\n")
        (tmp_path / "b.ini").write_text("[uwsgi]\nmaster = true\nprocesses = 4\nimport = serverhooks.uwsgi\n")
        affected, fixed = ["--ini", str(tmp_path / "a.ini")], ["--ini", str(tmp_path / "b.ini")]
        assert "serverhooks.W001" not in ids(["--ini", str(procs.REPO / "uwsgi.ini")], env)
        (tmp_path / "lazy.ini").write_text("[uwsgi]\nmaster = true\nprocesses = 4\nlazy-apps = true\n")
        assert "serverhooks.W001" not in ids(["--ini", str(tmp_path / "lazy.ini")], env)
    else:
        affected = fixed = ["--celery-app", "tests.project.celery_app:app"]
    assert "serverhooks.W001" in ids(affected, {**env, "SERVERHOOKS_CELERY": 0})
    assert "serverhooks.W001" not in ids(fixed, {**env, "SERVERHOOKS_CELERY": 1})
    assert "serverhooks.W001" not in ids(affected, {**env, "CONN_MAX_AGE": 0, "SERVERHOOKS_CELERY": 0})


def test_w002_gevent_with_mysqlclient(tmp_path: Path) -> None:
    conf = ["-c", gunicorn_conf(tmp_path, "worker_class = 'gevent'", hooks=True)]
    assert "serverhooks.W002" in ids(conf, {"DATABASE_URL": MYSQL})
    assert "serverhooks.W002" not in ids(conf, {"DATABASE_URL": with_driver(MYSQL, "pymysql")})


def test_w003_gevent_with_psycopg2_without_psycogreen(tmp_path: Path) -> None:
    conf = ["-c", gunicorn_conf(tmp_path, "worker_class = 'gevent'", hooks=True)]
    env = {"DATABASE_URL": with_driver(PG, "psycopg2")}
    assert "serverhooks.W003" in ids(conf, env, prelude=BLOCK_PSYCOGREEN)
    assert "serverhooks.W003" not in ids(conf, env)


def test_w004_gevent_with_preload(tmp_path: Path) -> None:
    body = "worker_class = 'gevent'\npreload_app = True"
    env = {"DATABASE_URL": PG}
    assert "serverhooks.W004" in ids(["-c", gunicorn_conf(tmp_path, body)], env)
    assert "serverhooks.W004" not in ids(["-c", gunicorn_conf(tmp_path, body, hooks=True)], env)


def test_w005_django_pool_with_a_forking_server(tmp_path: Path) -> None:
    env = {"DATABASE_URL": PG + "?pool=1"}
    assert "serverhooks.W005" in ids(["-c", gunicorn_conf(tmp_path, "preload_app = True")], env)
    assert "serverhooks.W005" not in ids(["-c", gunicorn_conf(tmp_path, "preload_app = True", hooks=True)], env)


def test_w006_conn_max_age_beyond_wait_timeout() -> None:
    wait_timeout = int(dbserver.query("mysql", "SELECT @@global.wait_timeout")[0][0])
    env = {"DATABASE_URL": MYSQL, "CONN_MAX_AGE": wait_timeout + 100}
    assert "serverhooks.W006" in ids([], env)
    assert "serverhooks.W006" not in ids([], {**env, "CONN_HEALTH_CHECKS": 1})
    assert "serverhooks.W006" not in ids([], {**env, "CONN_MAX_AGE": wait_timeout - 100})


def test_w007_sessions_beyond_max_connections(tmp_path: Path) -> None:
    max_connections = int(dbserver.query("mysql", "SELECT @@max_connections")[0][0])
    threads = 10
    over = max_connections // threads + 1
    body = f"worker_class = 'gthread'\nthreads = {threads}\nworkers = {{}}"
    env = {"DATABASE_URL": MYSQL}
    assert "serverhooks.W007" in ids(["-c", gunicorn_conf(tmp_path, body.format(over), hooks=True)], env)
    assert "serverhooks.W007" not in ids(["-c", gunicorn_conf(tmp_path, body.format(over - 2), hooks=True)], env)


def test_w008_debug_under_a_server(tmp_path: Path) -> None:
    conf = ["-c", gunicorn_conf(tmp_path, "workers = 2", hooks=True)]
    assert "serverhooks.W008" in ids(conf, {"DATABASE_URL": MYSQL, "DJANGO_DEBUG": 1})
    assert "serverhooks.W008" not in ids(conf, {"DATABASE_URL": MYSQL})


def test_w009_forwarded_allow_ips_star(tmp_path: Path) -> None:
    env = {"DATABASE_URL": MYSQL}
    star = gunicorn_conf(tmp_path, "forwarded_allow_ips = '*'", hooks=True)
    assert "serverhooks.W009" in ids(["-c", star], env)
    local = gunicorn_conf(tmp_path, "forwarded_allow_ips = '127.0.0.1'", hooks=True)
    assert "serverhooks.W009" not in ids(["-c", local], env)


def test_w010_the_dirty_arbiter_without_serverhooks(tmp_path: Path) -> None:
    body = "preload_app = True\ndirty_workers = 2\ndirty_apps = ['tests.project.dirty:OrmApp']"
    env = {"DATABASE_URL": MYSQL, "CONN_MAX_AGE": 3600}
    plain = doctor(["-c", gunicorn_conf(tmp_path, body)], env)[1]["findings"]
    assert [(f["id"], f["severity"]) for f in plain if f["id"] == "serverhooks.W010"] == [("serverhooks.W010", "error")]
    assert "serverhooks.W010" not in ids(["-c", gunicorn_conf(tmp_path, body, hooks=True)], env)
    no_dirty = gunicorn_conf(tmp_path, "preload_app = True")
    assert "serverhooks.W010" not in {f["id"] for f in doctor(["-c", no_dirty], env)[1]["findings"]}


def test_the_shipped_configs_are_clean() -> None:
    env = {"DATABASE_URL": with_driver(MYSQL, "pymysql"), "GUNICORN_CONTROL_SOCKET_DISABLE": 1}
    assert ids(["-c", "gunicorn.conf.py", "--ini", "uwsgi.ini"], env) == set()


@pytest.mark.parametrize("server", ["gunicorn", "uwsgi"])
def test_live_mode_finds_the_shared_socket_and_not_after_the_fix(
    server: str, fresh_database: Callable[[str], str], servers: list[procs.Server], tmp_path: Path
) -> None:
    name = fresh_database("mysql")
    url = dbserver.django_url("mysql", name)
    env = project_env(url, CONN_MAX_AGE=3600, QUERY_AT_IMPORT=1)
    results = {}
    for hooks in (False, True):
        where = tmp_path / ("hooks" if hooks else "plain")
        if server == "gunicorn":
            settings: dict[str, object] = {"preload_app": True}
            if hooks:
                settings["_source"] = "from serverhooks.gunicorn import *"
            started = procs.start_gunicorn(where, env, settings=settings, workers=2)
        else:
            ini = where / "uwsgi.ini"
            where.mkdir(parents=True)
            shipped = (procs.REPO / "uwsgi.ini").read_text()
            ini.write_text(shipped if hooks else shipped.replace("import = serverhooks.uwsgi", ""))
            started = procs.start_uwsgi(where, env, ini=ini, workers=2)
        servers.append(started)
        started.wait_ready()
        assert http.answers(started.socket_path)
        status, data, output = doctor(["--pid", str(started.pid)], {"DATABASE_URL": url})
        results[hooks] = (status, data)
        started.stop()
        assert SECRET not in output
    status, data = results[False]
    assert status == 1 and [f["id"] for f in data["findings"]] == ["serverhooks.W101"], data
    assert len(data["processes"]) == 3
    status, data = results[True]
    assert status == 0 and data["findings"] == [], data


def test_bad_input_is_a_clear_message_and_exit_2(tmp_path: Path) -> None:
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        status, _, output = doctor(["--pid", str(sleeper.pid)], {})
        assert status == 2 and "is not a Gunicorn, uWSGI or Celery master" in output
    finally:
        sleeper.kill()
        sleeper.wait()
    status, _, output = doctor(["--pid", str(sleeper.pid)], {})
    assert status == 2 and f"no process {sleeper.pid}" in output

    broken = tmp_path / "broken.conf.py"
    broken.write_text("workers = = 4\n")
    status, _, output = doctor(["-c", str(broken)], {"DATABASE_URL": MYSQL})
    assert status == 2 and "could not load" in output

    status, _, output = doctor(["-c", "gunicorn.conf.py"], {"DATABASE_URL": f"mysql://root:{SECRET}@127.0.0.1:1/test"})
    assert status == 2 and "does not answer" in output and "--no-live-db" in output
    assert SECRET not in output

    status, _, output = doctor(["-c", str(tmp_path / "missing.conf.py")], {})
    assert status == 2 and "no Gunicorn config file" in output


def test_django_system_checks_report_settings_findings() -> None:
    def check(**env: Any) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "django", "check", "--deploy", "--database", "default"],
            cwd=procs.REPO,
            env={
                **os.environ,
                "DJANGO_SETTINGS_MODULE": "tests.project.settings",
                "SERVERHOOKS_APP": "1",
                "DATABASE_URL": MYSQL,
                **{k: str(v) for k, v in env.items()},
            },
            capture_output=True,
            text=True,
            timeout=120,
        )
        return out.stdout + out.stderr

    wait_timeout = int(dbserver.query("mysql", "SELECT @@global.wait_timeout")[0][0])
    report = check(DJANGO_DEBUG=1, CONN_MAX_AGE=wait_timeout + 100)
    assert "serverhooks.W008" in report and "serverhooks.W006" in report, report
    report = check(CONN_MAX_AGE=wait_timeout - 100)
    assert "serverhooks.W" not in report, report


def test_readme_finding_table_matches_the_code() -> None:
    import re

    readme = (procs.REPO / "README.md").read_text()
    table = re.search(r"<!-- finding-ids.*?-->\n(.*?)<!-- /finding-ids -->", readme, flags=re.S)
    assert table is not None
    documented = set(re.findall(r"`(serverhooks\.W\d{3})`", table.group(1)))
    code = "".join(path.read_text() for path in (procs.REPO / "serverhooks" / "doctor").glob("*.py"))
    code += (procs.REPO / "serverhooks" / "checks.py").read_text()
    assert documented == set(re.findall(r"serverhooks\.W\d{3}", code))


def test_readme_output_block_is_what_the_doctor_prints(
    fresh_database: Callable[[str], str], servers: list[procs.Server], tmp_path: Path
) -> None:
    """The README's example is real output: the same scenario prints the same, numbers aside."""
    import re

    readme = (procs.REPO / "README.md").read_text()
    shown = re.search(r"A real run against Gunicorn.*?```text\n(.*?)```", readme, flags=re.S)
    assert shown is not None
    url = dbserver.django_url("mysql", fresh_database("mysql"))
    env = project_env(url, CONN_MAX_AGE=3600, QUERY_AT_IMPORT=1)
    started = procs.start_gunicorn(tmp_path, env, settings={"preload_app": True}, workers=2)
    servers.append(started)
    started.wait_ready()
    out = subprocess.run(
        [sys.executable, "-m", "serverhooks", "doctor", "--pid", str(started.pid)],
        cwd=procs.REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1

    def shape(text: str) -> str:
        # Numbers (pids, inodes) differ from run to run, and with their widths the line wrapping.
        return re.sub(r"\d+", "N", " ".join(text.split()))

    assert shape(out.stdout) == shape(shown.group(1))
