"""The Docker path for real: build both targets of deploy/docker/Dockerfile, start the app
container, and run the compose file's `tests` service against containerised databases.

On this machine no image registry answers and containers may use the host's network only,
so the images are built on stand-ins from Debian's packages and a CI copy of compose.yml
puts every service on 127.0.0.1 on a port of its own (tests/support/dockerstack.py). Where
no engine can run, the module skips and says why; under CI=true on the host it must run.
Inside the tests container it always skips: there is no Docker in Docker.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from tests.conftest import report
from tests.support import dbserver, dockerstack, procs
from tests.support.dockerstack import Ports

pytestmark = pytest.mark.docker

APP_IMAGE = "serverhooks-ci/app:latest"
TESTS_IMAGE = "serverhooks-ci/tests:latest"
PROJECT = "serverhooks-ci"
SUITE_TIMEOUT = 40 * 60  # the suite inside the container took about 8 minutes here
# Docker's own networks. A daemon started here has no bridge (--bridge=none); one started by
# its user usually has "bridge". The run must create none: a new one would be a bridge on a
# private range, which is off limits on this project's CI machine.
BUILT_IN_NETWORKS = {"bridge", "host", "none"}


@dataclass
class Stack:
    engine: dockerstack.Engine
    work: Path
    compose_file: Path
    ports: Ports
    secrets: dict[str, str]
    networks_before: set[str]
    base_image: str
    timings: dict[str, float] = field(default_factory=dict)

    def compose(self, *args: str, timeout: float = 600, log: Path | None = None) -> Any:
        command = [*self.engine.compose, "-f", str(self.compose_file), "-p", PROJECT, *args]
        return dockerstack.run(command, timeout, log, cwd=self.work)

    def container(self, service: str) -> str:
        ids = self.compose("ps", "-q", service, timeout=60).stdout.split()
        assert ids, f"no container for {service}"
        return str(ids[0])

    def url(self, family: str, database: str = "test") -> str:
        if family == "mysql":
            return f"mysql://root:{self.secrets['MARIADB_ROOT_PASSWORD']}@127.0.0.1:{self.ports.mariadb}/{database}"
        return f"postgres://postgres:{self.secrets['POSTGRES_PASSWORD']}@127.0.0.1:{self.ports.postgres}/{database}"


def _skip_or_fail(reason: str) -> None:
    # Under CI=true on the host the check must run; inside the tests container it never can.
    if os.environ.get("CI") == "true" and not dockerstack.in_container():
        pytest.fail(f"the Docker check must run under CI=true on the host: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    reason = dockerstack.why_no_engine()
    if reason:
        _skip_or_fail(reason)
    work = tmp_path_factory.mktemp("docker")
    log = work / "build.log"
    started = time.monotonic()
    with dockerstack.engine(work) as engine:
        report(f"docker: engine {engine.server_version}, compose {engine.compose_version} ({' '.join(engine.compose)})")
        networks_before = dockerstack.networks()
        assert networks_before <= BUILT_IN_NETWORKS, f"networks beyond Docker's own before the run: {networks_before}"
        if engine.started_pid is not None:
            assert networks_before == {"host", "none"}, networks_before
        timings: dict[str, float] = {"engine": time.monotonic() - started}
        base = dockerstack.python_standin(log, timings)
        images = {
            name: dockerstack.database_standin(name, base, log, timings) for name in dockerstack.DATABASE_SERVICES
        }
        dockerstack.build_target("runtime", base, APP_IMAGE, log, timings)
        dockerstack.build_target("tests", base, TESTS_IMAGE, log, timings)
        images.update({"app-gunicorn": APP_IMAGE, "app-uwsgi": APP_IMAGE, "tests": TESTS_IMAGE})

        ports = Ports.free()
        secrets = dockerstack.secrets_env()
        shipped = yaml.safe_load(dockerstack.COMPOSE_FILE.read_text())
        compose_file = work / "compose.ci.yml"
        compose_file.write_text(yaml.safe_dump(dockerstack.ci_compose(shipped, images, ports), sort_keys=False))
        (work / ".env").write_text("".join(f"{key}={value}\n" for key, value in secrets.items()))
        stack = Stack(engine, work, compose_file, ports, secrets, networks_before, base, timings)
        try:
            up = time.monotonic()
            done = stack.compose("up", "-d", *dockerstack.DATABASE_SERVICES, log=work / "compose.log")
            assert done.returncode == 0, (work / "compose.log").read_text()
            for service in dockerstack.DATABASE_SERVICES:
                dockerstack.wait_healthy(stack.container(service), timeout=180)
            timings["databases healthy"] = time.monotonic() - up
            yield stack
        finally:
            stack.compose("logs", "--no-color", log=work / "containers.log")
            stack.compose("down", "-v", "--remove-orphans", "--timeout", "40", log=work / "compose.log")
            after = dockerstack.networks()
            report(
                "docker: "
                + ", ".join(f"{step} {seconds:.0f} s" for step, seconds in timings.items())
                + f"; total {time.monotonic() - started:.0f} s"
            )
            assert after == networks_before, f"networks before the run: {networks_before}, after: {after}"


# ---- what the host's and the containers' servers saw -----------------------------------------------


class ServerCounters:
    """Connections each server has accepted since it started, from its own counters.

    Read twice over the same held connections, so that reading adds nothing to the count.
    """

    def __init__(self, mysql_url: str, postgres_url: str, redis_url: str) -> None:
        self._stack = contextlib.ExitStack()
        self.mysql = self._stack.enter_context(dbserver.admin("mysql", url=mysql_url))
        self.postgres = self._stack.enter_context(dbserver.admin("postgres", url=postgres_url))
        self.redis = redis.Redis.from_url(redis_url, socket_timeout=5)
        self._stack.callback(self.redis.close)

    def read(self) -> dict[str, int]:
        cur = self.mysql.cursor()
        cur.execute("SHOW GLOBAL STATUS LIKE 'Connections'")
        mysql_total = int(cur.fetchone()[1])
        self.postgres.execute("SELECT pg_stat_clear_snapshot()")
        row = self.postgres.execute("SELECT sum(sessions) FROM pg_stat_database").fetchone()
        info = self.redis.info("stats")
        return {
            "mariadb": mysql_total,
            "postgres": int(row[0]) if row else 0,
            "redis": int(info["total_connections_received"]),
        }

    def close(self) -> None:
        self._stack.close()


def host_counters() -> ServerCounters:
    """This machine's own servers: the ones the suite on the host uses."""
    return ServerCounters(*(dbserver.server_url(family) for family in ("mysql", "postgres", "redis")))


def container_counters(stack: Stack) -> ServerCounters:
    return ServerCounters(stack.url("mysql"), stack.url("postgres"), f"redis://127.0.0.1:{stack.ports.redis}/0")


# ---- the tests --------------------------------------------------------------------------------------


def test_every_container_uses_the_host_network_and_no_bridge_exists(stack: Stack) -> None:
    for service in dockerstack.DATABASE_SERVICES:
        assert dockerstack.inspect(stack.container(service), "{{.HostConfig.NetworkMode}}") == "host", service
    assert dockerstack.networks() == stack.networks_before


def test_tests_image_setup_at_build_time_makes_the_start_cheap(stack: Stack) -> None:
    started = time.monotonic()
    done = dockerstack.run(["docker", "run", "--rm", "--network", "host", TESTS_IMAGE, "tests/run", "setup"], 300)
    took = time.monotonic() - started
    assert done.returncode == 0, done.stdout + done.stderr
    assert "installing" not in done.stdout + done.stderr, "tests/run setup reinstalled at run time"
    assert took < 30, f"tests/run setup took {took:.1f} s in a container of the built image"
    stack.timings["tests/run setup in the built image"] = took


def test_a_broken_dockerfile_fails_the_build(stack: Stack, tmp_path: Path) -> None:
    """The control: without the line that gives the tests user its /repo, the build must fail."""
    shipped = (procs.REPO / "deploy" / "docker" / "Dockerfile").read_text()
    broken = shipped.replace(" \\\n    && install -d -o tester -g tester /repo", "")
    assert broken != shipped
    (tmp_path / "Dockerfile").write_text(broken)
    log = tmp_path / "build.log"
    with pytest.raises(RuntimeError):
        dockerstack.build_target(
            "tests", stack.base_image, "serverhooks-ci/broken:latest", log, {}, tmp_path / "Dockerfile"
        )
    assert "Permission denied" in log.read_text(errors="replace")


def test_the_compose_tests_service_passes_inside_the_container(stack: Stack) -> None:
    """`docker compose run --rm tests`: the image's own command, against the containers' servers."""
    host, containers = host_counters(), container_counters(stack)
    host_before, containers_before = host.read(), containers.read()
    log = stack.work / "tests-service.log"
    started = time.monotonic()
    done = stack.compose("run", "--rm", "tests", timeout=SUITE_TIMEOUT, log=log)
    stack.timings["suite inside the tests container"] = time.monotonic() - started
    output = log.read_text(errors="replace")
    summaries = re.findall(r"^=+ (.*(?:passed|failed|error).*) in [\d.]+s", output, flags=re.M)
    report("docker: inside the tests container: " + " | ".join(summaries))
    assert done.returncode == 0, output[-20000:]
    assert summaries and all("failed" not in s and "error" not in s for s in summaries), summaries
    # The suite talked to the containers' servers, and not once to this machine's own.
    host_after, containers_after = host.read(), containers.read()
    host.close()
    containers.close()
    assert host_after == host_before, f"the suite reached this machine's servers: {host_before} -> {host_after}"
    grew = {name: containers_after[name] - containers_before[name] for name in containers_after}
    report(f"docker: connections the containers' servers accepted during the suite: {grew}")
    assert all(count > 50 for count in grew.values()), grew


def _get(port: int, path: str, timeout: float = 10) -> tuple[int, bytes]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as response:
        return int(response.status), response.read()


def _sessions_of(stack: Stack, database: str) -> dict[int, str]:
    """{pid: what it is} of the sessions on `database` in the stack's PostgreSQL, but this one."""
    with dbserver.admin("postgres", url=stack.url("postgres")) as pg:
        rows = pg.execute(
            "SELECT pid, application_name, client_addr, backend_start, state, left(query, 80) "
            "FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            (database,),
        ).fetchall()
    return {int(row[0]): " ".join(str(field) for field in row[1:]) for row in rows}


def test_app_container_keeps_the_images_promises(stack: Stack) -> None:
    # Sessions that are not the app's (a test before this one may have left one closing).
    before = set(_sessions_of(stack, "test"))
    done = stack.compose("up", "-d", "app-gunicorn", log=stack.work / "compose.log")
    assert done.returncode == 0, (stack.work / "compose.log").read_text()
    container = stack.container("app-gunicorn")
    port = stack.ports.gunicorn
    # Its HEALTHCHECK asks where GUNICORN_BIND says (not the image's default 8000).
    stack.timings["app healthy"] = dockerstack.wait_healthy(container, timeout=120)
    assert _get(port, "/ping") == (200, b"pong")
    answers = [json.loads(_get(port, "/whoami")[1]) for _ in range(12)]
    assert all(a["error"] is None and a["session"] and not a["inherited"] for a in answers), answers
    assert all("abandoned_after_fork" in a["serverhooks"] for a in answers), "a request through serverhooks"

    # A non-root uid, from the image's config and from the running process itself.
    assert dockerstack.inspect(container, "{{.Config.User}}") == "10001:10001"
    master = int(dockerstack.inspect(container, "{{.State.Pid}}"))
    uids = Path(f"/proc/{master}/status").read_text().split("Uid:")[1].split()[:2]
    assert uids == ["10001", "10001"], uids
    # Nothing writable but what deploy/k8s mounts: a read-only root and /tmp.
    assert dockerstack.inspect(container, "{{.HostConfig.ReadonlyRootfs}}") == "true"
    assert "/tmp" in json.loads(dockerstack.inspect(container, "{{json .HostConfig.Tmpfs}}"))

    # SIGTERM: the request in flight completes, Gunicorn exits within graceful_timeout, no session is left.
    assert set(_sessions_of(stack, "test")) - before, "the app holds sessions while it serves"
    slow: list[Any] = []
    request = threading.Thread(target=lambda: slow.append(_get(port, "/sleep?s=2", timeout=30)))
    request.start()
    time.sleep(0.5)
    started = time.monotonic()
    stopped = dockerstack.run(["docker", "stop", "--time", "40", container], 60)
    took = time.monotonic() - started
    request.join(30)
    assert stopped.returncode == 0, stopped.stderr
    assert slow and slow[0][0] == 200, slow
    graceful_timeout = 30  # gunicorn.conf.py's default; compose.yml does not change it
    assert took < graceful_timeout, f"docker stop took {took:.1f} s"
    assert dockerstack.inspect(container, "{{.State.ExitCode}}") == "0"
    deadline = time.monotonic() + 10
    while set(_sessions_of(stack, "test")) - before and time.monotonic() < deadline:
        time.sleep(0.2)
    left = {pid: what for pid, what in _sessions_of(stack, "test").items() if pid not in before}
    assert left == {}, f"the app's sessions left after its graceful stop: {left}; before it started: {before}"
    stack.timings["app graceful stop"] = took


def test_uwsgi_app_container_serves_through_serverhooks(stack: Stack) -> None:
    done = stack.compose("up", "-d", "app-uwsgi", log=stack.work / "compose.log")
    assert done.returncode == 0, (stack.work / "compose.log").read_text()
    container = stack.container("app-uwsgi")
    dockerstack.wait_healthy(container, timeout=120)
    answer = json.loads(_get(stack.ports.uwsgi, "/whoami")[1])
    assert answer["error"] is None and answer["session"] and not answer["inherited"], answer
    stopped = dockerstack.run(["docker", "stop", "--time", "70", container], 90)
    assert stopped.returncode == 0, stopped.stderr


def test_no_secret_is_baked_into_the_images(stack: Stack) -> None:
    for image in (APP_IMAGE, TESTS_IMAGE):
        history = dockerstack.check(["docker", "history", "--no-trunc", "--format", "{{.CreatedBy}}", image], 60)
        config = dockerstack.check(["docker", "image", "inspect", "--format", "{{json .Config}}", image], 60)
        text = history.stdout + config.stdout
        for name, value in stack.secrets.items():
            assert value not in text, f"{name}'s value is in {image}"
        env = json.loads(config.stdout).get("Env") or []
        assert not [item for item in env if re.search(r"(?i)password|secret", item.split("=", 1)[0])], env
