"""Every code block in the README is run or checked here, and its tables match the code."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from serverhooks import conf
from tests.support import procs

README = (procs.REPO / "README.md").read_text()
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, flags=re.S)


def blocks(language: str) -> list[str]:
    return [body for lang, body in BLOCKS if lang == language]


def test_every_block_has_a_known_language() -> None:
    assert {lang for lang, _ in BLOCKS} <= {"bash", "python", "text", "ini"}
    assert len(BLOCKS) >= 7


def test_settings_table_is_generated_from_the_code() -> None:
    table = re.search(r"<!-- settings-table.*?-->\n(.*?)\n<!-- /settings-table -->", README, flags=re.S)
    assert table is not None
    assert table.group(1).strip() == conf.render_table()


def test_hook_table_lists_exactly_the_exported_hooks() -> None:
    import serverhooks.gunicorn

    rows = re.findall(r"^\| `(\w+)` \| (?:master|worker|re-exec|dirty)", README, flags=re.M)
    assert sorted(rows) == sorted(serverhooks.gunicorn.__all__)


def test_the_test_command_is_what_ci_runs() -> None:
    commands = [line.split("#")[0].strip() for line in blocks("bash")[0].splitlines()]
    assert commands == ["tests/run demo", "tests/run"]
    ci = (procs.REPO / ".ci" / "run").read_text().splitlines()
    assert "tests/run" in [line.strip() for line in ci], "CI runs the README's test command exactly"


def test_demo_commands_with_urls_are_valid() -> None:
    from tests.demo import build_parser
    from tests.project import dburl

    for line in blocks("bash")[1].splitlines():
        argv = shlex.split(line)
        assert argv[:2] == ["tests/run", "demo"]
        args = build_parser().parse_args(argv[2:])
        if args.database_url in ("embedded", "sqlite"):  # the demo's own keywords
            continue
        assert dburl.parse(args.database_url)["ENGINE"].startswith("django.db.backends.")


@pytest.mark.gunicorn
def test_demo_runs_and_prints_the_rows_the_readme_shows() -> None:
    # On SQLite, for speed: the rows are the same (tests/integration/test_demo.py runs the default).
    out = subprocess.run(
        [sys.executable, "-m", "tests.demo", "--requests", "160", "--database-url", "sqlite"],
        cwd=procs.REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "serverhooks arm: clean" in out.stdout
    lines = blocks("text")[0].splitlines()
    header = next(i for i, line in enumerate(lines) if "without serverhooks" in line)
    assert lines[0].split(":")[0] in out.stdout and lines[1].split(":")[0] in out.stdout
    for line in lines[header + 1 :]:
        label = re.split(r"\s{2,}", line.strip())[0]
        assert label in out.stdout, label


@pytest.mark.gunicorn
def test_gunicorn_conf_snippets_pass_check_config(tmp_path: Path) -> None:
    snippets = [body for body in blocks("python") if body.startswith("# gunicorn.conf.py")]
    assert len(snippets) == 2
    for index, body in enumerate(snippets):
        path = tmp_path / f"snippet{index}.conf.py"
        path.write_text(body + "\ncontrol_socket_disable = True\n")
        out = subprocess.run(
            [sys.executable, "-m", "gunicorn", "--check-config", "-c", str(path), "tests.project.wsgi"],
            cwd=procs.REPO,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "DJANGO_SETTINGS_MODULE": "tests.project.settings"},
        )
        assert out.returncode == 0, out.stdout + out.stderr


def test_installed_apps_snippet_is_valid_python() -> None:
    (snippet,) = [body for body in blocks("python") if "INSTALLED_APPS" in body]
    namespace: dict[str, object] = {}
    exec(compile(snippet, "README", "exec"), namespace)
    assert "serverhooks" in namespace["INSTALLED_APPS"]  # type: ignore[operator]


def test_function_api_snippet_runs(tmp_path: Path) -> None:
    (snippet,) = [body for body in blocks("python") if "serverhooks.close_before_fork()" in body]
    code = "import django; django.setup()\nfrom django.db import connection\nconnection.ensure_connection()\n" + snippet
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.project.settings",
        "DATABASE_URL": f"sqlite:///{tmp_path}/api.sqlite3",
    }
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=procs.REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "'closed_before_fork': 1" in out.stdout


def test_settings_example_uses_known_keys() -> None:
    example = re.search(r"For example `SERVERHOOKS = (\{.*?\})`", README)
    assert example is not None
    assert set(eval(example.group(1))) <= {setting.key for setting in conf.SETTINGS}


def test_uwsgi_snippets_match_the_shipped_file_and_the_adapter() -> None:
    (ini,) = blocks("ini")
    shipped = (procs.REPO / "uwsgi.ini").read_text()
    for line in ini.splitlines():
        if line and not line.startswith(";"):
            assert line in shipped, line
    (snippet,) = [body for body in blocks("python") if "serverhooks.uwsgi import postfork" in body]
    namespace: dict[str, object] = {}
    exec(compile(snippet, "README", "exec"), namespace)  # outside uWSGI: returned unchanged
    assert callable(namespace["say_ready"]) and callable(namespace["only_in_worker_two"])


def test_fork_hook_table_matches_the_tests() -> None:
    """The table states what test_whether_register_at_fork_handlers_run_in_workers asserts."""
    from tests.integration import test_uwsgi

    marked: Any = test_uwsgi.test_whether_register_at_fork_handlers_run_in_workers  # pytest adds .pytestmark
    (mark,) = [m for m in marked.pytestmark if m.name == "parametrize"]
    asserted = {
        ("none (uWSGI's default)" if not options else f"`{options[0].lstrip('-')}`"): "yes" if runs else "no"
        for options, runs in mark.args[1]
    }
    rows = dict(re.findall(r"^\| (none \(uWSGI's default\)|`[\w-]+`)[^|]* \| (yes|no)", README, flags=re.M))
    assert rows == asserted


def test_threads_snippet_runs(tmp_path: Path) -> None:
    (snippet,) = [body for body in blocks("python") if "serverhooks.threads import" in body]
    code = "import django; django.setup()\n" + snippet
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.project.settings",
        "DATABASE_URL": f"sqlite:///{tmp_path}/threads.sqlite3",
    }
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=procs.REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and out.stdout.strip() == "done", out.stderr


def test_celery_snippet_is_the_adapter() -> None:
    (snippet,) = [body for body in blocks("python") if "import serverhooks.celery" in body]
    out = subprocess.run([sys.executable, "-c", snippet], cwd=procs.REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


@pytest.mark.gunicorn
def test_doctor_commands_run(tmp_path: Path) -> None:
    (block,) = [body for body in blocks("bash") if "serverhooks doctor" in body]
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.project.settings",
        "DATABASE_URL": f"sqlite:///{tmp_path}/doctor.sqlite3",
        "GUNICORN_CONTROL_SOCKET_DISABLE": "1",
    }
    for line in block.splitlines():
        argv = shlex.split(line.split("#")[0])
        assert argv[:2] == ["serverhooks", "doctor"]
        if "--pid" in argv:  # a placeholder pid: the live mode is run against real servers in test_doctor.py
            from serverhooks.doctor.cli import _parser

            assert _parser().parse_args(argv[2:]).pid == 4242
            continue
        out = subprocess.run(
            [sys.executable, "-m", "serverhooks", *argv[1:]],
            cwd=procs.REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0 and "No problems found." in out.stdout, out.stdout + out.stderr


def test_deploy_section_has_a_subsection_per_template_folder() -> None:
    section = README.split("## Deploy\n", 1)[1].split("\n## ", 1)[0]
    folders = {path.name for path in (procs.REPO / "deploy").iterdir() if path.is_dir()}
    for folder in folders:
        assert f"(`deploy/{folder}/" in section, folder
    for part in section.split("### ")[1:]:
        assert all(word in part for word in ("**Copy**", "**Change**", "**Check**")), part[:60]
