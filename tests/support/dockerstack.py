"""A Docker engine for the Docker check: set up on this machine, stand-in images, a CI compose file.

This machine reaches no image registry, and its containers may only use the host's
network. So the check:
- installs Debian's engine when there is none and starts `dockerd` without a bridge
  (stopped afterwards by pid, if this module started it);
- builds stand-ins for the official base and database images from Debian's packages
  (tests/docker/standins/README.md), each tagged by a hash of its inputs and rebuilt only
  when they change;
- writes a CI copy of the shipped compose.yml in which every service uses the host's
  network and listens on 127.0.0.1 on a port of its own.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.support import procs
from tests.support.procs import REPO

STANDINS = REPO / "tests" / "docker" / "standins"
COMPOSE_FILE = REPO / "deploy" / "docker" / "compose.yml"
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "serverhooks-ci"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_SOURCES = (
    "deb http://deb.debian.org/debian bookworm main\n"
    "deb http://deb.debian.org/debian bookworm-updates main\n"
    "deb http://deb.debian.org/debian-security bookworm-security main\n"
)
# What the official python:*-slim-bookworm images have, plus the headers the builder stage needs.
DEBOOTSTRAP_PACKAGES = "python3,python3-venv,python3-pip,python3-dev,ca-certificates"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
OFFICIAL_IMAGE_PIP = "pip==24.0 setuptools==65.5.1 wheel==0.44.0"
DATABASE_SERVICES = ("mariadb", "postgres", "redis")
# Debian has no MySQL 8: the compose file's `mysql` service goes unexercised here.
SERVICES_WITHOUT_STANDIN = ("mysql",)
STANDARD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BUILD_ENV = {**os.environ, "DOCKER_BUILDKIT": "0"}  # the legacy builder: no registry for BuildKit's frontend


def in_container() -> bool:
    # Set by the tests image. Not /.dockerenv: this project's CI machine has one itself.
    return os.environ.get("SERVERHOOKS_IN_CONTAINER") == "1"


def run(args: list[str], timeout: float, log: Path | None = None, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a command, bounded; its output goes to `log` when given (builds print a lot)."""
    if log is None:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(args)}\n")
        out.flush()
        return subprocess.run(args, stdout=out, stderr=subprocess.STDOUT, text=True, timeout=timeout, **kwargs)


def check(args: list[str], timeout: float, log: Path | None = None, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    done = run(args, timeout, log, **kwargs)
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-6000:] if log else (done.stdout + done.stderr)[-6000:]
        raise RuntimeError(f"{' '.join(args[:4])} ... exited with {done.returncode}:\n{tail}")
    return done


# ---- the engine -------------------------------------------------------------------------


@dataclass
class Engine:
    compose: list[str]  # ["docker", "compose"] (v2) or ["docker-compose"] (v1)
    compose_version: str
    server_version: str
    started_pid: int | None  # the dockerd this module started, stopped at the end


# SERVERHOOKS_TEST_DOCKER: "0" skips the Docker check; "1" (and CI=true) lets it install and start an
# engine when none answers. Unset: it uses an engine that answers, and installs nothing.
OPT_IN = "SERVERHOOKS_TEST_DOCKER"


def why_no_engine() -> str | None:
    """None when an engine can be used or set up here, else why not."""
    if in_container():
        return "inside the tests container: there is no Docker in Docker"
    if os.environ.get(OPT_IN) == "0":
        return f"{OPT_IN}=0"
    if _engine_answers():
        return None
    if os.environ.get(OPT_IN) != "1" and os.environ.get("CI") != "true":
        return f"no Docker engine answers; set {OPT_IN}=1 to let the suite install and start one (root, apt-get)"
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "no Docker engine answers, and this user cannot install one (needs root and apt-get)"
    return None


def _engine_answers() -> bool:
    if not shutil.which("docker"):
        return False
    try:
        return run(["docker", "version", "--format", "{{.Server.Version}}"], 20).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def _install_engine(log: Path) -> None:
    missing = [
        package
        for command, package in (("dockerd", "docker.io"), ("debootstrap", "debootstrap"))
        if not shutil.which(command) and not Path(f"/usr/sbin/{command}").exists()
    ]
    if not _compose_command():
        missing.append("docker-compose")
    if missing:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        check(["apt-get", "update", "-qq"], 600, log, env=env)
        check(["apt-get", "install", "-y", "-qq", *missing], 900, log, env=env)


def _compose_command() -> list[str] | None:
    for candidate in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(candidate[0]) and run([*candidate, "version"], 30).returncode == 0:
            return candidate
    return None


@contextmanager
def engine(workdir: Path) -> Iterator[Engine]:
    """A Docker engine that answers: the running one, or one installed and started here."""
    log = workdir / "engine.log"
    started: subprocess.Popen[bytes] | None = None
    if not _engine_answers():
        _install_engine(log)
        # No bridge: its private-range addresses are off limits here; containers use the host's network.
        dockerd = shutil.which("dockerd") or "/usr/sbin/dockerd"
        with (workdir / "dockerd.log").open("wb") as out:
            started = subprocess.Popen(
                [dockerd, "--bridge=none", "--iptables=false", "--ip-forward=false"],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while not _engine_answers():
            if started.poll() is not None or time.monotonic() > deadline:
                _stop_dockerd(started)
                raise RuntimeError("dockerd did not answer within 60 s:\n" + (workdir / "dockerd.log").read_text())
            time.sleep(0.5)
    elif not _compose_command():
        _install_engine(log)
    compose = _compose_command()
    if compose is None:
        raise RuntimeError("no Docker Compose: neither `docker compose` (v2) nor `docker-compose` (v1) runs")
    try:
        yield Engine(
            compose=compose,
            compose_version=run([*compose, "version", "--short"], 30).stdout.strip(),
            server_version=run(["docker", "version", "--format", "{{.Server.Version}}"], 30).stdout.strip(),
            started_pid=started.pid if started else None,
        )
    finally:
        if started is not None:
            _stop_dockerd(started)


def _stop_dockerd(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def networks() -> set[str]:
    return set(check(["docker", "network", "ls", "--format", "{{.Name}}"], 30).stdout.split())


# ---- stand-in images ----------------------------------------------------------------------


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "big") + part)
    return h.hexdigest()[:12]


def _image_exists(tag: str) -> bool:
    return run(["docker", "image", "inspect", tag], 30).returncode == 0


def python_standin(log: Path, timings: dict[str, float]) -> str:
    """The stand-in for python:*-slim-bookworm, built from a debootstrap tree (cached)."""
    ca = HOST_CA_BUNDLE.read_bytes() if HOST_CA_BUNDLE.exists() else b""
    tree_key = _digest(DEBIAN_MIRROR.encode(), DEBIAN_SOURCES.encode(), DEBOOTSTRAP_PACKAGES.encode(), ca)
    image_key = _digest(tree_key.encode(), OFFICIAL_IMAGE_PIP.encode(), b"PIP_CERT")
    tag = f"serverhooks-standin/python:bookworm-{image_key}"
    if _image_exists(tag):
        return tag
    started = time.monotonic()
    tree_tar = CACHE / f"debootstrap-bookworm-{tree_key}.tar"
    if not tree_tar.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            root = Path(tmp) / "root"
            check(
                [
                    "debootstrap",
                    "--variant=minbase",
                    f"--include={DEBOOTSTRAP_PACKAGES}",
                    "bookworm",
                    str(root),
                    DEBIAN_MIRROR,
                ],
                1200,
                log,
            )
            (root / "etc/apt/sources.list").write_text(DEBIAN_SOURCES)
            if ca:
                # The host's bundle, so pip and apt inside builds trust what the host trusts.
                (root / "etc/ssl/certs/ca-certificates.crt").write_bytes(ca)
            for leftovers in ("var/cache/apt/archives", "var/lib/apt/lists"):
                shutil.rmtree(root / leftovers, ignore_errors=True)
                (root / leftovers).mkdir(parents=True)
            partial = tree_tar.with_suffix(".partial")
            check(["tar", "-C", str(root), "-cf", str(partial), "."], 600, log)
            partial.rename(tree_tar)
        timings["debootstrap"] = time.monotonic() - started
    stage0 = f"serverhooks-standin/debootstrap:bookworm-{tree_key}"
    check(
        [
            "docker",
            "import",
            "--change",
            f"ENV PATH={STANDARD_PATH}",
            "--change",
            "ENV LANG=C.UTF-8",
            str(tree_tar),
            stage0,
        ],
        600,
        log,
    )
    with tempfile.TemporaryDirectory() as context:
        # A venv at /usr/local gives the official images' layout: /usr/local/bin/python and pip,
        # with the pip, setuptools and wheel that python:3.11.10-slim-bookworm ships.
        (Path(context) / "Dockerfile").write_text(
            f"FROM {stage0}\n"
            # pip from PyPI trusts certifi's bundle, not the system's: point it at the host's (as the host does).
            f"ENV PIP_CERT={HOST_CA_BUNDLE}\n"
            f"RUN python3 -m venv /usr/local && pip install --no-cache-dir {OFFICIAL_IMAGE_PIP}\n"
            'CMD ["python3"]\n'
        )
        check(["docker", "build", "--network", "host", "-t", tag, context], 900, log, env=BUILD_ENV)
    timings["python stand-in"] = time.monotonic() - started
    return tag


def database_standin(name: str, base: str, log: Path, timings: dict[str, float]) -> str:
    folder = STANDINS / name
    files = sorted(p for p in folder.iterdir() if p.is_file())
    key = _digest(base.encode(), *(p.name.encode() + p.read_bytes() for p in files))
    tag = f"serverhooks-standin/{name}:{key}"
    if not _image_exists(tag):
        started = time.monotonic()
        check(
            ["docker", "build", "--network", "host", "--build-arg", f"BASE={base}", "-t", tag, str(folder)],
            900,
            log,
            env=BUILD_ENV,
        )
        timings[f"{name} stand-in"] = time.monotonic() - started
    return tag


def build_target(
    target: str, base: str, tag: str, log: Path, timings: dict[str, float], dockerfile: Path | None = None
) -> None:
    """A target of deploy/docker/Dockerfile (or a copy), on the stand-in base; Docker's layer cache applies."""
    started = time.monotonic()
    check(
        [
            "docker",
            "build",
            "--network",
            "host",
            "--build-arg",
            f"PYTHON_IMAGE={base}",
            "--target",
            target,
            "-f",
            str(dockerfile or REPO / "deploy" / "docker" / "Dockerfile"),
            "-t",
            tag,
            ".",
        ],
        1800,
        log,
        cwd=REPO,
        env=BUILD_ENV,
    )
    timings[f"{target} image"] = time.monotonic() - started


# ---- the CI compose file ------------------------------------------------------------------


@dataclass
class Ports:
    mariadb: int
    postgres: int
    redis: int
    gunicorn: int
    uwsgi: int

    @classmethod
    def free(cls) -> Ports:
        return cls(*(procs.free_port() for _ in range(5)))

    def addresses(self) -> dict[str, str]:
        """The compose services' host:port, and where each listens here instead."""
        return {
            "mariadb:3306": f"127.0.0.1:{self.mariadb}",
            "postgres:5432": f"127.0.0.1:{self.postgres}",
            "redis:6379": f"127.0.0.1:{self.redis}",
        }


def secrets_env() -> dict[str, str]:
    """Values for every ${VAR} of .env.example: fresh random ones, so none can be baked in unnoticed."""
    example = (COMPOSE_FILE.parent / ".env.example").read_text()
    names = [line.split("=", 1)[0] for line in example.splitlines() if "=" in line and not line.startswith("#")]
    return {name: "ci-" + secrets.token_hex(12) for name in names}


def _rewrite(value: Any, addresses: Mapping[str, str]) -> Any:
    if isinstance(value, str):
        for service_address, local in addresses.items():
            value = value.replace(service_address, local)
    return value


def ci_compose(shipped: dict[str, Any], images: Mapping[str, str], ports: Ports) -> dict[str, Any]:
    """The shipped compose file, changed only where this machine requires it.

    Every service uses the host's network and listens on 127.0.0.1 on its own port; images
    are the ones built here; the `mysql` service (no stand-in) is left out. Commands,
    healthchecks and environments stay as shipped but for those host:port pairs, and the
    `tests` service runs the fix arms only (SERVERHOOKS_TEST_FIX_ARMS_ONLY, tests/conftest.py).
    """
    data: dict[str, Any] = yaml.safe_load(yaml.safe_dump(shipped))  # a deep copy
    data.pop("name", None)  # Compose v1 does not know the top-level `name`
    services: dict[str, Any] = data["services"]
    for gone in SERVICES_WITHOUT_STANDIN:
        services.pop(gone, None)
    addresses = ports.addresses()
    for name, service in services.items():
        service["network_mode"] = "host"
        service.pop("ports", None)
        service.pop("build", None)
        service["image"] = images[name]
        deps = service.get("depends_on")
        if isinstance(deps, dict):
            for gone in SERVICES_WITHOUT_STANDIN:
                deps.pop(gone, None)
        env = service.get("environment")
        if isinstance(env, dict):
            service["environment"] = {key: _rewrite(value, addresses) for key, value in env.items()}
    services["mariadb"]["command"] = [f"--port={ports.mariadb}", "--bind-address=127.0.0.1"]
    # postgres and pg_isready (the healthcheck, unchanged) both read PGPORT.
    services["postgres"]["environment"]["PGPORT"] = str(ports.postgres)
    services["postgres"]["command"] = ["postgres", "-c", "listen_addresses=127.0.0.1"]
    services["redis"]["command"] = [*services["redis"]["command"], "--bind", "127.0.0.1", "--port", str(ports.redis)]
    services["redis"]["healthcheck"]["test"] = ["CMD", "redis-cli", "-p", str(ports.redis), "ping"]
    services["app-gunicorn"]["environment"]["GUNICORN_BIND"] = f"127.0.0.1:{ports.gunicorn}"
    # CI's time budget: the host's run shows the control arms and runs the benches; here, the fixes.
    services["tests"].setdefault("environment", {})["SERVERHOOKS_TEST_FIX_ARMS_ONLY"] = "1"
    uwsgi = services["app-uwsgi"]
    uwsgi["command"] = [re.sub(r"^0\.0\.0\.0:8001$", f"127.0.0.1:{ports.uwsgi}", part) for part in uwsgi["command"]]
    uwsgi["healthcheck"]["test"] = [
        part.replace("127.0.0.1:8001", f"127.0.0.1:{ports.uwsgi}") for part in uwsgi["healthcheck"]["test"]
    ]
    return data


# ---- containers -----------------------------------------------------------------------------


def inspect(container: str, template: str) -> str:
    return check(["docker", "inspect", "--format", template, container], 30).stdout.strip()


def wait_healthy(container: str, timeout: float) -> float:
    """Seconds until the container's own HEALTHCHECK said healthy (bounded by `timeout`)."""
    started = time.monotonic()
    status = ""
    while time.monotonic() - started < timeout:
        status = inspect(container, "{{if .State.Health}}{{.State.Health.Status}}{{end}} {{.State.Status}}")
        if status.startswith("healthy"):
            return time.monotonic() - started
        if "exited" in status or "dead" in status:
            break
        time.sleep(0.5)
    logs = run(["docker", "logs", "--tail", "80", container], 30)
    raise RuntimeError(f"{container} not healthy after {timeout} s ({status}):\n{logs.stdout}{logs.stderr}")
