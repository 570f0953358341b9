"""The doctor's static reading (issue 21): what "serverhooks" in INSTALLED_APPS really fixes, and
uWSGI's magic variables. Pure functions over real ini files; no server, no database."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from serverhooks.doctor import cli, rules, servers
from serverhooks.doctor.django_settings import Database, Django


def django(app: bool) -> Django:
    database = Database("default", "postgresql", "psycopg", 3600, False, False, "'default' (postgresql)")
    return Django("proj.settings", False, app, False, 10, True, [database])


def found(server: servers.Server, app: bool) -> set[str]:
    return {finding.id for finding in rules.server_rules(server, django(app))}


def uwsgi(tmp_path: Path, body: str) -> servers.Server:
    ini = tmp_path / f"u{len(list(tmp_path.iterdir()))}.ini"
    ini.write_text("[uwsgi]\nmaster = true\n" + body)
    return servers.read_uwsgi(str(ini))


def test_the_app_silences_w001_only_where_fork_handlers_run(tmp_path: Path) -> None:
    # uWSGI forks in C: Python's fork handlers (the app's fork guard) run only with py-call-osafterfork.
    plain = uwsgi(tmp_path, "processes = 4\n")
    assert "serverhooks.W001" in found(plain, app=True)
    why = next(f.why for f in rules.server_rules(plain, django(True)) if f.id == "serverhooks.W001")
    assert "py-call-osafterfork" in why
    assert "serverhooks.W001" not in found(uwsgi(tmp_path, "processes = 4\npy-call-osafterfork = true\n"), app=True)
    assert "serverhooks.W001" not in found(uwsgi(tmp_path, "processes = 4\nimport = serverhooks.uwsgi\n"), app=False)
    # Gunicorn forks with os.fork: there the app's fork guard runs, and still counts.
    gunicorn = servers.Server("gunicorn", "g.conf.py", True, 4, 1, False, False, None)
    assert "serverhooks.W001" in found(gunicorn, app=False)
    assert "serverhooks.W001" not in found(gunicorn, app=True)


def test_the_app_does_not_silence_w004_gevent_with_preload() -> None:
    # The fork guard drops inherited connections; the storage made before the patch stays per thread.
    gevent = servers.Server("gunicorn", "g.conf.py", True, 4, 1, True, False, 1000)
    assert "serverhooks.W004" in found(gevent, app=True)
    hooked = servers.Server("gunicorn", "g.conf.py", True, 4, 1, True, True, 1000)
    assert "serverhooks.W004" not in found(hooked, app=False)


def test_uwsgi_magic_variables_are_read(tmp_path: Path) -> None:
    server = uwsgi(tmp_path, "processes = %k\nthreads = %(processes)\nchdir = %d\n")
    assert server.processes == (os.cpu_count() or 1) and server.threads == server.processes
    assert server.unreadable == {}
    options = servers.parse_uwsgi_ini("[uwsgi]\nchdir = %d\nname = %n-%s\nmark = 50%%\n", "/srv/app", {}, "a.ini")
    assert options == {"chdir": ["/srv/app/"], "name": ["a-a.ini"], "mark": ["50%"]}


def test_an_unreadable_number_is_a_finding_not_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("DJANGO_SETTINGS_MODULE", raising=False)
    (tmp_path / "k.ini").write_text("[uwsgi]\nmaster = true\nprocesses = %k\n")
    assert cli.main(["--ini", str(tmp_path / "k.ini"), "--no-live-db"]) == 0
    (tmp_path / "v.ini").write_text("[uwsgi]\nmaster = true\nprocesses = %V\n")
    capsys.readouterr()
    assert cli.main(["--ini", str(tmp_path / "v.ini"), "--no-live-db"]) == 1
    out = capsys.readouterr().out
    assert "serverhooks.W013" in out and "processes = '%V'" in out
