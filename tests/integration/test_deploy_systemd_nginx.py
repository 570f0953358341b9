"""The systemd units and nginx sites in deploy/, checked with the real tools.

- nginx: Debian's /usr/sbin/nginx runs `nginx -t` on each site inside a throwaway prefix,
  and then serves for real, in front of a real Gunicorn and a real uWSGI.
- systemd: `systemd-analyze verify` works here without a running systemd, once ExecStart
  points at binaries that exist (a test-only copy with the venv's bin directory in place
  of /srv/app/venv/bin); `systemd-analyze security --offline=true` scores the hardening.
  What only a booted systemd does (switch to the unit's user, apply the sandbox, own the
  socket) is approximated: systemd-socket-activate hands Gunicorn its socket exactly as
  gunicorn.socket would (LISTEN_FDS/LISTEN_PID, fd 3, on the first connection), both
  servers run the units' ExecStart and Environment= lines, a notify socket receives their
  READY=1, and they are reloaded and stopped with the units' ExecReload= and KillSignal=.
  The sandboxing directives themselves are asserted from the files.

The timeouts the templates must match are read from gunicorn.conf.py (executed with no
GUNICORN_* variable set) and from uwsgi.ini (`uwsgi --ini uwsgi.ini --get harakiri`).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support import procs

pytestmark = pytest.mark.deploy

SYSTEMD = procs.REPO / "deploy" / "systemd"
NGINX = procs.REPO / "deploy" / "nginx"
VENV_BIN = Path(sys.executable).parent
TEMPLATE_BIN = "/srv/app/venv/bin"
UNITS = ("gunicorn.socket", "gunicorn.service", "uwsgi.service")
SITES = ("gunicorn", "uwsgi")

Unit = dict[str, dict[str, list[str]]]


# ---------------------------------------------------------------------------- tools


def _require_tool(candidates: list[str], package: str) -> str:
    """The first existing binary; else skip (or, under CI=true, fail) saying what to install."""
    for candidate in candidates:
        found = shutil.which(candidate) if "/" not in candidate else candidate
        if found and os.access(found, os.X_OK):
            return found
    message = f"{candidates[0]} is not installed: apt-get install {package}"
    if os.environ.get("CI") == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def _nginx() -> str:
    return _require_tool(["/usr/sbin/nginx", "nginx"], "nginx")


def _systemd_analyze() -> str:
    return _require_tool(["/usr/bin/systemd-analyze", "systemd-analyze"], "systemd")


def _socket_activate() -> str:
    return _require_tool(["/usr/bin/systemd-socket-activate", "systemd-socket-activate"], "systemd")


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


def _seconds(value: str) -> float:
    """nginx ("30s", "1m", "30") and systemd ("40", "40s", "1min 10s") durations."""
    units = {"": 1.0, "ms": 0.001, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
    units.update(w=7 * 86400.0, M=30 * 86400.0, y=365 * 86400.0)
    total = 0.0
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-zA-Z]*)", value.strip())
    assert parts, f"not a duration: {value!r}"
    for number, unit in parts:
        total += float(number) * units[unit]
    return total


# ------------------------------------------------------------- the servers' settings


def _gunicorn_defaults() -> dict[str, Any]:
    """timeout, graceful_timeout and forwarded_allow_ips as gunicorn.conf.py sets them by default."""
    code = (
        "import json, runpy\n"
        "conf = runpy.run_path('gunicorn.conf.py')\n"
        "print(json.dumps({k: conf[k] for k in ('timeout', 'graceful_timeout', 'forwarded_allow_ips')}))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GUNICORN_", "FORWARDED_ALLOW_IPS"))}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=procs.REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    values: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return values


def _uwsgi_bin() -> str:
    return str(VENV_BIN / "uwsgi")


def _uwsgi_get(option: str) -> str:
    """The value uwsgi.ini gives `option` when no UWSGI_* variable overrides it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("UWSGI_")}
    out = subprocess.run(
        [_uwsgi_bin(), "--ini", str(procs.REPO / "uwsgi.ini"), "--get", option],
        cwd=procs.REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and out.stdout.strip(), out.stdout + out.stderr
    return out.stdout.strip().splitlines()[-1]


def _uwsgi_worker_reload_mercy() -> int:
    """uWSGI's built-in default for worker-reload-mercy, as its own --help states it."""
    out = subprocess.run([_uwsgi_bin(), "--help"], capture_output=True, text=True, timeout=60)
    found = re.search(r"--worker-reload-mercy\s.*\(default is (\d+)\)", out.stdout)
    assert found, "uwsgi --help no longer states worker-reload-mercy's default"
    return int(found.group(1))


# ------------------------------------------------------------------- systemd units


def _parse_unit(text: str) -> Unit:
    """{section: {key: [values, in order]}}; repeated keys (Environment=) keep every value."""
    unit: Unit = {}
    section: dict[str, list[str]] | None = None
    logical: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not logical and (not line or line.startswith(("#", ";"))):
            continue
        if line.endswith("\\"):
            logical.append(line[:-1].strip())
            continue
        line = " ".join([*logical, line]).strip()
        logical = []
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], {})
            continue
        assert section is not None and "=" in line, f"not a unit file line: {raw!r}"
        key, _, value = line.partition("=")
        section.setdefault(key.strip(), []).append(value.strip())
    return unit


def _unit(name: str) -> Unit:
    return _parse_unit((SYSTEMD / name).read_text())


def _one(unit: Unit, section: str, key: str) -> str:
    values = unit.get(section, {}).get(key, [])
    assert len(values) == 1, f"[{section}] {key}= set {len(values)} times: {values}"
    return values[0]


def _environment(unit: Unit) -> dict[str, str]:
    env: dict[str, str] = {}
    for value in unit["Service"].get("Environment", []):
        for item in shlex.split(value):
            key, _, val = item.partition("=")
            env[key] = val
    return env


def _exec(unit: Unit, key: str) -> list[str]:
    return shlex.split(_one(unit, "Service", key))


def _units_for_verify(directory: Path) -> list[Path]:
    """Copies of the units whose ExecStart names the venv's binaries instead of /srv/app/venv/bin."""
    directory.mkdir(parents=True, exist_ok=True)
    copies = []
    for name in UNITS:
        text = (SYSTEMD / name).read_text()
        if name.endswith(".service"):
            assert TEMPLATE_BIN in text, f"{name}: ExecStart no longer under {TEMPLATE_BIN}"
            text = text.replace(TEMPLATE_BIN, str(VENV_BIN))
        (directory / name).write_text(text)
        copies.append(directory / name)
    return copies


def _verify(files: list[Path]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_systemd_analyze(), "verify", "--man=no", *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": ""},
    )


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """Exit 0 and not one warning: verify only warns (exit 0) on an unknown key or a bad value."""
    out = _verify(_units_for_verify(tmp_path))
    assert out.returncode == 0 and not out.stderr.strip() and not out.stdout.strip(), out.stdout + out.stderr


def test_systemd_analyze_verify_can_fail(tmp_path: Path) -> None:
    copies = _units_for_verify(tmp_path)
    service = tmp_path / "gunicorn.service"
    text = service.read_text()
    assert "ProtectSystem=strict" in text and "Type=notify" in text
    service.write_text(text.replace("ProtectSystem=strict", "ProtectSytem=strict").replace("Type=notify", "Type=notfy"))
    out = _verify(copies)
    assert "Unknown key" in out.stderr and "ProtectSytem" in out.stderr, out.stderr
    assert "notfy" in out.stderr, out.stderr
    # A socket unit without its service is an error, not a warning.
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(SYSTEMD / "gunicorn.socket", alone / "gunicorn.socket")
    out = _verify([alone / "gunicorn.socket"])
    assert out.returncode != 0 and "gunicorn.service" in out.stderr, out.stderr


@pytest.mark.parametrize("service", ["gunicorn.service", "uwsgi.service"])
def test_services_are_hardened_by_systemd_analyze_security(tmp_path: Path, service: str) -> None:
    """systemd's own exposure score (0 best, 10 worst), offline: at most 3.5 (it is 2.9)."""
    _units_for_verify(tmp_path)
    out = subprocess.run(
        [_systemd_analyze(), "security", "--offline=true", "--no-pager", str(tmp_path / service)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_COLORS": "0"},
    )
    if "--offline" in out.stderr and "unrecognized" in out.stderr:
        pytest.skip(f"this systemd-analyze has no offline security mode: {out.stderr.strip()}")
    found = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", out.stdout)
    assert found, out.stdout + out.stderr
    assert float(found.group(1)) <= 3.5, out.stdout


def test_gunicorn_units_key_directives() -> None:
    service, sock = _unit("gunicorn.service"), _unit("gunicorn.socket")
    defaults = _gunicorn_defaults()
    s = service["Service"]
    _assert_common_hardening(service, "gunicorn")
    assert _exec(service, "ExecReload") == ["/bin/kill", "-HUP", "$MAINPID"]
    assert _one(service, "Service", "KillSignal") == "SIGTERM", "SIGTERM is Gunicorn's graceful stop"
    stop = _seconds(_one(service, "Service", "TimeoutStopSec"))
    assert stop > defaults["graceful_timeout"], f"TimeoutStopSec={stop} must exceed graceful_timeout"
    assert stop <= defaults["graceful_timeout"] + 30, "only a bit above graceful_timeout"
    # Socket activation: the service needs the socket, takes fd 3 from it, and keeps its directory.
    assert "gunicorn.socket" in _one(service, "Unit", "Requires").split()
    assert "gunicorn.socket" in _one(service, "Unit", "After").split()
    env = _environment(service)
    assert "GUNICORN_BIND" not in env, "Gunicorn takes the socket from LISTEN_FDS; fd://3 as well crashes it"
    assert env.get("GUNICORN_CONTROL_SOCKET", "").startswith("/run/gunicorn/")
    assert s["RuntimeDirectory"] == ["gunicorn"]
    listen = _one(sock, "Socket", "ListenStream")
    assert listen.startswith("/run/gunicorn/"), listen
    assert _one(service, "Service", "RuntimeDirectoryPreserve") == "yes", (
        "the socket file lives in RuntimeDirectory: removing the directory at stop would unlink it"
    )
    assert _one(sock, "Socket", "SocketMode") == "0660", "only nginx's group may connect"
    assert _one(sock, "Socket", "SocketGroup")
    assert _one(sock, "Install", "WantedBy") == "sockets.target"
    assert listen == _nginx_upstream("gunicorn").removeprefix("unix:")


def test_uwsgi_unit_key_directives() -> None:
    service = _unit("uwsgi.service")
    _assert_common_hardening(service, "uwsgi")
    assert _exec(service, "ExecReload") == ["/bin/kill", "-HUP", "$MAINPID"]
    assert _one(service, "Service", "KillSignal") == "SIGTERM", "with die-on-term, SIGQUIT would reload"
    assert re.search(r"^die-on-term\s*=\s*true", (procs.REPO / "uwsgi.ini").read_text(), flags=re.M)
    start = _exec(service, "ExecStart")
    hook = start.index("--hook-master-start")
    assert start[hook + 1] == "unix_signal:15 gracefully_kill_them_all", "SIGTERM must stop uWSGI gracefully"
    stop = _seconds(_one(service, "Service", "TimeoutStopSec"))
    mercy = _uwsgi_worker_reload_mercy()
    harakiri = int(_uwsgi_get("harakiri"))
    assert stop > max(mercy, harakiri), f"TimeoutStopSec={stop} must exceed the mercy ({mercy}) and harakiri"
    assert stop <= mercy + 30, "only a bit above the mercy"
    assert service["Service"]["RuntimeDirectory"] == ["uwsgi"]


def _assert_common_hardening(unit: Unit, server: str) -> None:
    s = unit["Service"]
    for key, value in {
        "Type": "notify",
        "NotifyAccess": "main",
        "KillMode": "mixed",
        "DynamicUser": "no",
        "NoNewPrivileges": "true",
        "ProtectSystem": "strict",
        "ProtectHome": "true",
        "PrivateTmp": "true",
        "PrivateDevices": "true",
        "ProtectKernelTunables": "true",
        "ProtectKernelModules": "true",
        "ProtectControlGroups": "true",
        "RestrictNamespaces": "true",
        "LockPersonality": "true",
        "CapabilityBoundingSet": "",
        "EnvironmentFile": "-/etc/serverhooks/app.env",
        "Restart": "on-failure",
    }.items():
        assert _one(unit, "Service", key) == value, f"{server}: {key}={s.get(key)}, expected {value!r}"
    assert sorted(_one(unit, "Service", "RestrictAddressFamilies").split()) == ["AF_INET", "AF_INET6", "AF_UNIX"]
    user, group = _one(unit, "Service", "User"), _one(unit, "Service", "Group")
    assert user and user not in {"root", "0"} and group not in {"root", "0"}, (user, group)
    assert _one(unit, "Service", "WorkingDirectory").startswith("/")
    assert _exec(unit, "ExecStart")[0] == f"{TEMPLATE_BIN}/{server}"
    assert "MemoryDenyWriteExecute" not in s, "left off on purpose (C extensions), see the comment in the unit"
    assert all(p.startswith("-") for p in s.get("ReadWritePaths", [])), "a missing path must not stop the service"


def test_templates_hold_no_secrets() -> None:
    files = sorted([*SYSTEMD.glob("*.s*"), *NGINX.glob("*.conf")])
    assert len(files) == 5, files
    secret_name = re.compile(r"(?i)pass|secret|token|key|credential")
    for path in files:
        text = path.read_text()
        assert not re.search(r"\w+://[^\s/:@]+:[^\s/@]+@", text), f"{path.name}: a URL with a password"
        head = text.splitlines()[:12]
        assert all(line.startswith("#") for line in head[:3]), f"{path.name}: starts with a header comment"
        assert re.search(r"\bCopy\b", "\n".join(head)) and re.search(r"\bChange\b", "\n".join(head)), path.name
        for line in text.splitlines():
            if line.lstrip().startswith("#"):
                continue
            assert not re.search(r"(?i)(password|passwd|secret|token)\w*\s*[=:]?\s*\S", line), f"{path.name}: {line}"
        if path.suffix == ".service":
            for name in _environment(_parse_unit(text)):
                assert not secret_name.search(name), f"{path.name}: {name} belongs in the EnvironmentFile"


# ---------------------------------------------------------------------- nginx sites


def _nginx_directives(text: str) -> list[tuple[str, list[str]]]:
    """(name, args) of every simple directive, comments removed (the sites use no quoted ';')."""
    code = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    found = []
    for statement, end in re.findall(r"([^;{}]*)([;{}])", code):
        words = shlex.split(statement)
        if words and end == ";":  # not a block's name (server {, location / {)
            found.append((words[0], words[1:]))
    return found


def _site_directives(site: str) -> list[tuple[str, list[str]]]:
    return _nginx_directives((NGINX / f"{site}.conf").read_text())


def _nginx_upstream(site: str) -> str:
    servers = [args[0] for name, args in _site_directives(site) if name == "server"]
    assert len(servers) == 1, servers
    return servers[0]


def _site_for_test(site: str, port: int, *, static: Path, upstream: str | None = None) -> str:
    """The site with test-only substitutions: a free loopback port, a static directory, an upstream."""
    text = (NGINX / f"{site}.conf").read_text()
    replacements = {
        "listen 80;": f"listen 127.0.0.1:{port};",
        "listen [::]:80;": f"listen [::1]:{port};" if _ipv6_loopback() else "",
        "alias /srv/app/static/;": f"alias {static}/;",
    }
    if upstream is not None:
        replacements[f"server {_nginx_upstream(site)} fail_timeout=0;"] = f"server {upstream} fail_timeout=0;"
    for old, new in replacements.items():
        assert text.count(old) == 1, f"{site}.conf: expected one {old!r}"
        text = text.replace(old, new)
    return text


def _nginx_prefix(prefix: Path, site_text: str, *, serve: bool = False) -> Path:
    """A throwaway nginx prefix: nginx.conf including the site, every path inside `prefix`."""
    prefix.mkdir(parents=True, exist_ok=True)
    (prefix / "site.conf").write_text(site_text)
    # The site includes uwsgi_params relative to the configuration's directory, as in /etc/nginx.
    params = Path("/etc/nginx/uwsgi_params")
    if params.exists():
        shutil.copy(params, prefix / "uwsgi_params")
    mime = Path("/etc/nginx/mime.types")
    lines = [
        f"error_log {prefix}/error.log info;" if serve else f"error_log {prefix}/error.log;",
        f"pid {prefix}/nginx.pid;",
        # As root, nginx's workers would run as nobody and could not reach the test's files.
        "user root;" if serve and os.geteuid() == 0 else "",
        "daemon off;" if serve else "",
        "events { worker_connections 64; }",
        "http {",
        f"    include {mime};" if mime.exists() else "",
        f"    access_log {prefix}/access.log;",
        *(f"    {kind}_temp_path {prefix}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")),
        f"    include {prefix}/site.conf;",
        "}",
    ]
    conf = prefix / "nginx.conf"
    conf.write_text("\n".join(line for line in lines if line) + "\n")
    return conf


def _nginx_t(conf: Path) -> subprocess.CompletedProcess[str]:
    prefix = conf.parent
    return subprocess.run(
        [_nginx(), "-t", "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("site", SITES)
def test_nginx_site_passes_nginx_t(tmp_path: Path, site: str) -> None:
    """`nginx -t` binds the listen ports, so the test copy listens on a free loopback port.

    Nothing else needs to exist: nginx -t neither connects to upstreams nor opens aliases.
    """
    conf = _nginx_prefix(tmp_path, _site_for_test(site, procs.free_port(), static=tmp_path / "static"))
    out = _nginx_t(conf)
    assert out.returncode == 0 and "test is successful" in out.stderr, out.stderr
    assert "[warn]" not in out.stderr and "[emerg]" not in out.stderr, out.stderr


def test_nginx_t_can_fail(tmp_path: Path) -> None:
    text = _site_for_test("gunicorn", procs.free_port(), static=tmp_path / "static")
    assert "client_max_body_size 10m;" in text
    broken = text.replace("client_max_body_size 10m;", "client_max_body_size 10m")  # missing semicolon
    out = _nginx_t(_nginx_prefix(tmp_path, broken))
    assert out.returncode != 0 and "[emerg]" in out.stderr, out.stderr


def _only(directives: list[tuple[str, list[str]]], name: str) -> list[str]:
    values = [args for n, args in directives if n == name]
    assert len(values) == 1, f"{name}: {values}"
    return values[0]


def _assert_common_site(directives: list[tuple[str, list[str]]]) -> None:
    assert ["80"] in [args for name, args in directives if name == "listen"]
    assert _only(directives, "server_name")[0].endswith(".example.com"), "a placeholder to change"
    assert re.fullmatch(r"\d+[km]?", _only(directives, "client_max_body_size")[0])
    assert _only(directives, "alias")[0].endswith("/static/")
    assert _seconds(_only(directives, "expires")[0]) >= 7 * 24 * 3600, "a long cache for static files"
    upstream_args = _only(directives, "server")
    assert "fail_timeout=0" in upstream_args, upstream_args


def test_nginx_gunicorn_site_key_directives() -> None:
    directives = _site_directives("gunicorn")
    text = (NGINX / "gunicorn.conf").read_text()
    defaults = _gunicorn_defaults()
    _assert_common_site(directives)
    assert re.search(r"location /static/ \{", text)
    assert _only(directives, "proxy_pass") == ["http://serverhooks_gunicorn"]
    assert _nginx_upstream("gunicorn") == "unix:" + _one(_unit("gunicorn.socket"), "Socket", "ListenStream")
    assert _seconds(_only(directives, "proxy_read_timeout")[0]) == defaults["timeout"]
    headers = {
        args[0].lower(): args[1] if len(args) > 1 else "" for name, args in directives if name == "proxy_set_header"
    }
    assert headers["x-forwarded-proto"] == "$scheme"
    assert headers["x-forwarded-for"] in {"$remote_addr", "$proxy_add_x_forwarded_for"}
    assert headers["x-forwarded-host"] == "$host" and headers["host"] == "$host"
    assert headers["x-forwarded-ssl"] == "" and headers["x-forwarded-protocol"] == ""
    # Gunicorn's trust list never "*", and it names the address nginx connects from over TCP.
    allowed = defaults["forwarded_allow_ips"]
    allowed = allowed if isinstance(allowed, list) else allowed.split(",")
    assert "*" not in allowed and "127.0.0.1" in [a.strip() for a in allowed], allowed


def test_nginx_uwsgi_site_key_directives() -> None:
    directives = _site_directives("uwsgi")
    text = (NGINX / "uwsgi.conf").read_text()
    _assert_common_site(directives)
    assert re.search(r"location /static/ \{", text)
    assert _only(directives, "uwsgi_pass") == ["serverhooks_uwsgi"]
    assert _only(directives, "include") == ["uwsgi_params"]
    assert _nginx_upstream("uwsgi") == _uwsgi_get("socket"), "nginx must reach uwsgi.ini's socket"
    assert _seconds(_only(directives, "uwsgi_read_timeout")[0]) == int(_uwsgi_get("harakiri"))
    params = {args[0]: args[1] for name, args in directives if name == "uwsgi_param"}
    assert params["HTTP_X_FORWARDED_PROTO"] == "$scheme"
    assert params["HTTP_X_FORWARDED_FOR"] == "$remote_addr"
    assert params["HTTP_X_FORWARDED_HOST"] == "$host"


# ---------------------------------------------------------- the real thing, end to end

APP = """
import json, os, time
from pathlib import Path

KEYS = ["wsgi.url_scheme", "REMOTE_ADDR", "HTTP_HOST", "HTTPS", "HTTP_X_FORWARDED_FOR",
        "HTTP_X_FORWARDED_PROTO", "HTTP_X_FORWARDED_HOST", "HTTP_X_FORWARDED_SSL"]


def application(environ, start_response):
    if environ["PATH_INFO"] == "/slow":
        Path(__file__).with_name("slow-started").write_text(str(os.getpid()))
        time.sleep(float(environ["QUERY_STRING"]))
    body = json.dumps({**{k: environ.get(k) for k in KEYS}, "pid": os.getpid()}).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
"""

FORGED = {
    "X-Forwarded-Proto": "https",
    "X-Forwarded-Ssl": "on",
    "X-Forwarded-For": "203.0.113.9",
    "X-Forwarded-Host": "evil.example",
}


class NotifySocket:
    """A stand-in for systemd's NOTIFY_SOCKET: records (sender pid, message)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.messages: list[tuple[int, str]] = []

    def wait_ready(self, count: int = 1, timeout: float = 30.0) -> list[int]:
        """Pids that sent READY=1, once `count` of them arrived."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready = [pid for pid, msg in self.messages if "READY=1" in msg.split("\n")]
            if len(ready) >= count:
                return ready
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except TimeoutError:
                break
            pid = next(
                (
                    struct.unpack("iII", cdata)[0]
                    for level, kind, cdata in ancillary
                    if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS
                ),
                -1,
            )
            self.messages.append((pid, data.decode(errors="replace")))
        raise AssertionError(f"no READY=1 x{count} within {timeout} s: {self.messages}")

    def close(self) -> None:
        self.sock.close()


@dataclass
class Stack:
    """One server and the nginx in front of it, all stopped at the end."""

    work: Path
    port: int
    notify: NotifySocket
    processes: list[tuple[subprocess.Popen[bytes], Path]] = field(default_factory=list)
    last_headers: list[tuple[str, str]] = field(default_factory=list)

    def start(self, command: list[str], env: dict[str, str], log_name: str) -> subprocess.Popen[bytes]:
        log_path = self.work / log_name
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.work
            )
        self.processes.append((proc, log_path))
        return proc

    def start_nginx(self, site_text: str) -> None:
        prefix = self.work / "nginx"
        conf = _nginx_prefix(prefix, site_text, serve=True)
        proc = self.start(
            [_nginx(), "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")], {}, "nginx.out"
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"nginx exited: {self.logs()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return
            time.sleep(0.05)
        raise AssertionError(f"nginx does not listen on {self.port}: {self.logs()}")

    def request(self, path: str, headers: dict[str, str] | None = None, timeout: float = 30) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("GET", path, headers={"Host": "app.example.com", **(headers or {})})
            response = conn.getresponse()
            body = response.read()
            self.last_headers = response.getheaders()
            return response.status, body
        finally:
            conn.close()

    def header(self, name: str) -> list[str]:
        """Every value of header `name` in the last response."""
        return [value for key, value in self.last_headers if key.lower() == name.lower()]

    def echo(self, headers: dict[str, str] | None = None) -> dict[str, Any]:
        status, body = self.request("/echo", headers)
        assert status == 200, (status, body[:500], self.logs())
        data: dict[str, Any] = json.loads(body)
        return data

    def logs(self) -> str:
        parts = []
        for _, path in self.processes:
            with contextlib.suppress(OSError):
                parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-5000:]}")
        with contextlib.suppress(OSError):
            parts.append(f"--- nginx error.log\n{(self.work / 'nginx' / 'error.log').read_text()[-5000:]}")
        return "\n".join(parts)

    def close(self) -> None:
        for proc, _ in reversed(self.processes):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        self.notify.close()


@pytest.fixture
def stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    _nginx()
    # Unix socket paths are limited to 108 bytes: keep them short, outside pytest's tmp_path.
    work = Path(tempfile.mkdtemp(prefix="sh-deploy-"))
    (work / "static").mkdir()
    (work / "static" / "app.css").write_text("body { color: teal }\n")
    (work / "deployapp.py").write_text(APP)
    built = Stack(work=work, port=procs.free_port(), notify=NotifySocket(work / "notify.sock"))
    yield built
    built.close()
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        print(built.logs())
    shutil.rmtree(work, ignore_errors=True)


def _server_env(stack: Stack, unit: Unit, **extra: str) -> dict[str, str]:
    """The unit's Environment= lines (no DJANGO_SETTINGS_MODULE: the app is a stub), plus the test's."""
    env = {k: v.replace("/run/", f"{stack.work}/run/") for k, v in _environment(unit).items()}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    (stack.work / "run" / "gunicorn").mkdir(parents=True, exist_ok=True)
    env.update(PATH=os.environ.get("PATH", "/usr/bin:/bin"), PYTHONPATH=f"{stack.work}:{procs.REPO}")
    env.update(NOTIFY_SOCKET=str(stack.notify.path), **extra)
    return env


def _command(unit: Unit, server: str, config: str, app_before: str, app_after: str) -> list[str]:
    """The unit's ExecStart with the template's paths replaced by this checkout's."""
    command = _exec(unit, "ExecStart")
    substitutions = {
        f"{TEMPLATE_BIN}/{server}": str(VENV_BIN / server),
        f"/srv/app/{config}": str(procs.REPO / config),
        app_before: app_after,
    }
    for old in substitutions:
        assert old in command, f"{server}.service ExecStart has no {old!r}: {command}"
    return [substitutions.get(arg, arg) for arg in command]


def _signal(unit: Unit, key: str) -> signal.Signals:
    if key == "ExecReload":
        command = _exec(unit, key)
        assert command[0] == "/bin/kill" and command[-1] == "$MAINPID", command
        return signal.Signals["SIG" + command[1].lstrip("-").removeprefix("SIG")]
    return signal.Signals[_one(unit, "Service", key)]


def _assert_static_from_disk(stack: Stack, site: str) -> None:
    """/static/ is the file itself (the app would answer JSON), with one long-lived Cache-Control."""
    status, body = stack.request("/static/app.css")
    assert status == 200 and body == b"body { color: teal }\n", (status, body[:300])
    max_age = int(_seconds(_only(_site_directives(site), "expires")[0]))
    assert stack.header("Cache-Control") == [f"max-age={max_age}"] and stack.header("Expires"), stack.last_headers


def _wait_for(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)


def _reload(stack: Stack, master: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    """Send the reload signal; then requests are served by new workers of the same master."""
    old_workers = set(procs.children(master.pid))
    assert old_workers, stack.logs()
    os.kill(master.pid, sig)
    _wait_for(lambda: stack.echo()["pid"] not in old_workers, 30)
    assert stack.echo()["pid"] not in old_workers, stack.logs()
    assert master.poll() is None, stack.logs()


def _slow_request_during_stop(
    stack: Stack, master: subprocess.Popen[bytes], sig: signal.Signals, *, settle: float = 30
) -> tuple[int | None, int | None]:
    """A 2 s request through nginx, and `sig` to the master once the app has started it.

    Returns the request's status and the master's exit code, each None if it has not come
    within `settle` seconds.
    """
    marker = stack.work / "slow-started"
    marker.unlink(missing_ok=True)
    pool = ThreadPoolExecutor(1)
    try:
        pending: Future[tuple[int, bytes]] = pool.submit(stack.request, "/slow?2")
        _wait_for(marker.exists, 10)
        assert marker.exists(), stack.logs()
        os.kill(master.pid, sig)
        deadline = time.monotonic() + settle
        try:
            status: int | None = pending.result(timeout=settle)[0]
        except TimeoutError:
            status = None
        try:
            code: int | None = master.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            code = None
        return status, code
    finally:
        pool.shutdown(wait=False)  # a request still pending ends when the fixture kills the stack


def test_gunicorn_behind_nginx_with_socket_activation(stack: Stack) -> None:
    """gunicorn.socket + gunicorn.service + the nginx site, with Gunicorn started as systemd would."""
    activate = _socket_activate()
    service, sock = _unit("gunicorn.service"), _unit("gunicorn.socket")
    listen = Path(_one(sock, "Socket", "ListenStream").replace("/run/", f"{stack.work}/run/"))
    listen.parent.mkdir(parents=True, exist_ok=True)
    env = _server_env(stack, service, WEB_CONCURRENCY="2")
    assert "GUNICORN_BIND" not in env
    command = _command(service, "gunicorn", "gunicorn.conf.py", "myproject.wsgi", "deployapp:application")
    # Like systemd, systemd-socket-activate owns the socket and starts Gunicorn on the first connection.
    setenv = [f"--setenv={key}={value}" for key, value in env.items()]
    master = stack.start([activate, "--listen", str(listen), *setenv, *command], env, "gunicorn.log")
    _wait_for(listen.is_socket, 10)  # systemd creates the socket before anything else
    stack.start_nginx(_site_for_test("gunicorn", stack.port, static=stack.work / "static", upstream=f"unix:{listen}"))

    # The first request waits in the socket's backlog while Gunicorn boots.
    seen = stack.echo(FORGED)
    assert stack.notify.wait_ready() == [master.pid], "READY=1 comes from the main pid (NotifyAccess=main)"
    assert f"Listening at: unix:{listen} ({master.pid})" in stack.logs()
    control = Path(env["GUNICORN_CONTROL_SOCKET"])
    _wait_for(control.exists, 10)
    assert control.is_socket(), "the control socket goes to /run/gunicorn"
    # nginx replaced every forged header; over the unix socket Gunicorn trusts nginx's X-Forwarded-Proto.
    assert seen["wsgi.url_scheme"] == "http" and seen["HTTP_X_FORWARDED_PROTO"] == "http", seen
    assert seen["HTTP_X_FORWARDED_FOR"] == "127.0.0.1" and seen["HTTP_X_FORWARDED_HOST"] == "app.example.com", seen
    assert seen["HTTP_X_FORWARDED_SSL"] is None and seen["HTTP_HOST"] == "app.example.com", seen
    assert stack.echo({"X-Forwarded-Proto": "https"})["wsgi.url_scheme"] == "http"

    _assert_static_from_disk(stack, "gunicorn")

    # ExecReload: new workers replace the old ones, on the same socket.
    _reload(stack, master, _signal(service, "ExecReload"))

    # KillSignal: the request in flight completes, the master exits 0, and the socket file stays.
    status, code = _slow_request_during_stop(stack, master, _signal(service, "KillSignal"))
    assert status == 200 and code == 0, (status, code, stack.logs())
    assert listen.is_socket(), "Gunicorn must not unlink the socket systemd owns"


def _start_uwsgi(stack: Stack, *, graceful_hook: bool = True) -> tuple[Unit, subprocess.Popen[bytes]]:
    service = _unit("uwsgi.service")
    command = _command(service, "uwsgi", "uwsgi.ini", "myproject.wsgi:application", "deployapp:application")
    if not graceful_hook:
        assert "--hook-master-start" in command, "uwsgi.service lost its graceful-stop hook"
        at = command.index("--hook-master-start")
        del command[at : at + 2]
    backend = f"127.0.0.1:{procs.free_port()}"
    env = _server_env(stack, service, UWSGI_SOCKET=backend, UWSGI_PROCESSES="2")
    master = stack.start(command, env, "uwsgi.log")
    assert stack.notify.wait_ready() == [master.pid], "READY=1 comes from the main pid (NotifyAccess=main)"
    stack.start_nginx(_site_for_test("uwsgi", stack.port, static=stack.work / "static", upstream=backend))
    return service, master


def _catches(pid: int, sig: signal.Signals) -> bool:
    """Whether process `pid` has a handler installed for `sig` (SigCgt in /proc/PID/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = re.search(r"^SigCgt:\s*([0-9a-f]+)", status, flags=re.M)
    return bool(caught and int(caught.group(1), 16) >> (sig - 1) & 1)


def _wait_uwsgi_settled(stack: Stack, master: subprocess.Popen[bytes], starts: int, workers: int = 2) -> None:
    """Until uWSGI's master has entered its loop `starts` times and every worker handles SIGHUP.

    uWSGI sends READY=1 before it forks the workers. Until its master enters its loop (where
    the master-start hook runs) it ignores SIGHUP and does not yet stop gracefully on
    SIGTERM, and a worker ignores SIGHUP until its own setup is done: a reload or stop
    sent in that window is lost for them. Real, but only in the first moments of a start.
    """
    log = stack.work / "uwsgi.log"

    def settled() -> bool:
        children = procs.children(master.pid)
        return (
            log.read_text(errors="replace").count("(master-start)...") >= starts
            and len(children) == workers
            and all(_catches(pid, signal.SIGHUP) for pid in children)
        )

    _wait_for(settled, 30)
    assert settled(), stack.logs()


def test_uwsgi_behind_nginx(stack: Stack) -> None:
    """uwsgi.service's ExecStart, Environment=, ExecReload= and KillSignal=, behind the nginx site."""
    service, master = _start_uwsgi(stack)
    _wait_uwsgi_settled(stack, master, 1)
    seen = stack.echo(FORGED)
    assert seen["REMOTE_ADDR"] == "127.0.0.1" and seen["wsgi.url_scheme"] == "http" and seen["HTTPS"] is None, seen
    assert seen["HTTP_X_FORWARDED_PROTO"] == "http" and seen["HTTP_X_FORWARDED_FOR"] == "127.0.0.1", seen
    assert seen["HTTP_X_FORWARDED_HOST"] == "app.example.com", seen

    _assert_static_from_disk(stack, "uwsgi")

    # ExecReload: uWSGI re-executes itself under the same pid, with new workers. Its READY=1
    # after a reload is lost (sendmsg EISCONN, unbit/uwsgi#1420); Type=notify does not wait for it.
    _reload(stack, master, _signal(service, "ExecReload"))
    assert {pid for pid, _ in stack.notify.messages} == {master.pid}
    _wait_uwsgi_settled(stack, master, 2)

    # KillSignal (SIGTERM, with the hook): the request in flight completes, the master exits 0.
    status, code = _slow_request_during_stop(stack, master, _signal(service, "KillSignal"))
    assert status == 200 and code == 0, (status, code, stack.logs())
    assert "graceful shutdown triggered" in stack.logs()


def test_uwsgi_sigterm_without_the_hook_cuts_requests(stack: Stack) -> None:
    """The control: die-on-term alone makes SIGTERM brutal in uWSGI 2.0, hence the unit's hook.

    The request in flight is cut: nginx answers 502. Under heavy load we have also seen the
    master still waiting for that worker 30 s later, the request hanging instead of ending.
    """
    service, master = _start_uwsgi(stack, graceful_hook=False)
    _wait_for(lambda: len(procs.children(master.pid)) == 2 and _catches(master.pid, signal.SIGTERM), 30)
    status, _ = _slow_request_during_stop(stack, master, _signal(service, "KillSignal"), settle=5)
    assert status in {502, None}, (status, stack.logs())


def test_forged_scheme_would_reach_gunicorn_without_nginx(tmp_path: Path) -> None:
    """Why the socket's mode matters: Gunicorn 27 trusts every unix-socket peer's X-Forwarded-Proto."""
    from tests.support import http as unix_http

    (tmp_path / "deployapp.py").write_text(APP)
    sock_dir = Path(tempfile.mkdtemp(prefix="sh-deploy-"))
    try:
        path = str(sock_dir / "g.sock")
        env = {
            **os.environ,
            "PYTHONPATH": f"{tmp_path}:{procs.REPO}",
            "GUNICORN_BIND": f"unix:{path}",
            "WEB_CONCURRENCY": "1",
            "GUNICORN_CONTROL_SOCKET_DISABLE": "1",
        }
        env.pop("DJANGO_SETTINGS_MODULE", None)
        command = [str(VENV_BIN / "gunicorn"), "-c", str(procs.REPO / "gunicorn.conf.py"), "deployapp:application"]
        with open(tmp_path / "gunicorn.log", "wb") as log:
            proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 30
            while not unix_http.answers(path) and time.monotonic() < deadline:
                assert proc.poll() is None, (tmp_path / "gunicorn.log").read_text()
                time.sleep(0.05)
            conn = unix_http.UnixHTTPConnection(path)
            conn.request("GET", "/", headers={"X-Forwarded-Proto": "https", "Connection": "close"})
            seen = json.loads(conn.getresponse().read())
            conn.close()
            assert seen["wsgi.url_scheme"] == "https", seen
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)
