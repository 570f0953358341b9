"""Read a server's configuration through the server's own loader where there is one.

Gunicorn: its own `Config` loads gunicorn.conf.py. uWSGI has no parse-only mode, so
uwsgi.ini is read here following uWSGI's rules (repeated keys, if-env/if-not-env
blocks, $(VAR), and the magic variables: %k, %d, %(option), ...). Celery: the app's own
configuration.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import os
import re
import socket
import sys
from pathlib import Path
from typing import Any

from serverhooks._log import describe_error
from serverhooks.doctor.django_settings import importable_from_here
from serverhooks.doctor.findings import DoctorError


@dataclasses.dataclass
class Server:
    kind: str  # gunicorn | uwsgi | celery
    source: str
    forks_after_loading_app: bool  # preload_app, uWSGI without lazy-apps, Celery prefork
    processes: int
    threads: int
    gevent: bool
    serverhooks: bool
    per_process_limit: int | None  # gevent's worker_connections / async cores: greenlets per process
    forwarded_allow_ips: list[str] = dataclasses.field(default_factory=list)
    dirty_workers: int = 0  # Gunicorn 25+'s dirty arbiter, forked after preload_app without pre_fork
    # Python's os.register_at_fork handlers run in the workers (the fork guard of "serverhooks" in
    # INSTALLED_APPS): Gunicorn and Celery fork with os.fork; uWSGI forks in C and runs them only
    # with py-call-osafterfork.
    fork_handlers_run: bool = True
    unreadable: dict[str, str] = dataclasses.field(default_factory=dict)  # option -> value not read as a number


# --------------------------------------------------------------------------- Gunicorn


def read_gunicorn(path: str) -> Server:
    try:
        from gunicorn.app.base import Application
    except ImportError as exc:
        raise DoctorError("reading a Gunicorn config needs Gunicorn installed: pip install gunicorn") from exc
    if not Path(path).is_file():
        raise DoctorError(f"no Gunicorn config file at {path}")

    class ConfigOnly(Application):  # type: ignore[misc]
        def init(self, parser: Any, opts: Any, args: Any) -> None:
            return None

        def load_config(self) -> None:
            self.load_config_from_file(path)

        def load(self) -> None:
            return None

    # Gunicorn prints a traceback and exits on a broken file: keep the gist, not the traceback.
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            cfg = ConfigOnly().cfg
    except SystemExit:
        lines = [line.strip() for line in captured.getvalue().splitlines() if line.strip()]
        gist = next((line for line in reversed(lines) if "Error" in line), lines[-1] if lines else "")
        where = next((line for line in lines if line.startswith(f'File "{path}"')), "")
        raise DoctorError(f"Gunicorn could not load {path}: {gist} {where}".strip()) from None
    except Exception as exc:
        raise DoctorError(f"Gunicorn could not load {path}: {describe_error(exc)}") from None
    worker_class = str(cfg.worker_class_str).lower()
    gevent = "gevent" in worker_class
    hooks = [cfg.settings[name].get() for name in ("pre_fork", "post_fork", "post_worker_init")]
    return Server(
        kind="gunicorn",
        source=path,
        forks_after_loading_app=bool(cfg.preload_app),
        processes=int(cfg.workers),
        threads=int(cfg.threads) if "gthread" in worker_class or int(cfg.threads) > 1 else 1,
        gevent=gevent,
        serverhooks=any(getattr(hook, "__serverhooks__", False) for hook in hooks),
        per_process_limit=int(cfg.worker_connections) if gevent else None,
        forwarded_allow_ips=list(cfg.forwarded_allow_ips or []),
        dirty_workers=int(getattr(cfg, "dirty_workers", 0) or 0) if getattr(cfg, "dirty_apps", None) else 0,
    )


# --------------------------------------------------------------------------- uWSGI

_TRUE = {"1", "true", "yes", "on", ""}


_MAGIC = re.compile(r"%(\([\w.-]+\)|.)")


def _magic_table(path: str, directory: str) -> dict[str, str]:
    """uWSGI's magic variables that a config can be read with (uWSGI's docs, "Magic variables")."""
    file = Path(path) if path else Path(directory) / "uwsgi.ini"
    absolute = Path(directory) / file.name
    table = {
        "d": directory.rstrip("/") + "/",
        "p": str(absolute),
        "s": file.name,
        "n": file.stem,
        "e": file.suffix.lstrip("."),
        "c": Path(directory).name,
        "x": "uwsgi",
        "v": os.getcwd(),
        "k": str(os.cpu_count() or 1),
        "h": socket.gethostname(),
        "u": str(os.getuid()),
        "g": str(os.getgid()),
        "%": "%",
    }
    for index, part in enumerate(Path(directory).parts[1:10]):
        table[str(index)] = part
    return table


def parse_uwsgi_ini(
    text: str, directory: str, env: dict[str, str] | None = None, path: str = ""
) -> dict[str, list[str]]:
    """The [uwsgi] section as uWSGI reads it: every value of repeated keys, env blocks applied.

    Magic variables are expanded as uWSGI does (%k the CPU count, %d the file's directory,
    %(option) an option set above, ...); one the doctor cannot know (%V, %t, @(...)) stays as
    written, and a number option holding it is then reported, not guessed.
    """
    env = dict(os.environ) if env is None else env
    options: dict[str, list[str]] = {}
    in_section = False
    skipping: list[bool] = []
    magic = _magic_table(path, directory)

    def variable(match: re.Match[str]) -> str:
        name = match.group(1)
        if name.startswith("("):
            known = options.get(name[1:-1])
            return known[-1] if known else match.group(0)
        return magic.get(name, match.group(0))

    def expand(value: str) -> str:
        value = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), ""), value)
        return _MAGIC.sub(variable, value)

    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith((";", "#")):
            continue
        if line.startswith("["):
            in_section = line == "[uwsgi]"
            continue
        if not in_section or "=" not in line:
            continue
        key, value = (part.strip() for part in line.split("=", 1))
        if key in {"if-env", "if-not-env"}:
            present = bool(env.get(value.split("=", 1)[0]))
            skipping.append(present if key == "if-not-env" else not present)
            continue
        if key == "endif":
            if skipping:
                skipping.pop()
            continue
        if any(skipping):
            continue
        options.setdefault(key, []).append(expand(value))
    # uWSGI applies UWSGI_<OPTION> environment variables as options too.
    for name, value in env.items():
        if name.startswith("UWSGI_") and name not in {"UWSGI_ORIGINAL_PROC_NAME", "UWSGI_RELOADS"}:
            options.setdefault(name[6:].lower().replace("_", "-"), [value])
    return options


def read_uwsgi(path: str) -> Server:
    file = Path(path)
    if not file.is_file():
        raise DoctorError(f"no uWSGI ini file at {path}")
    try:
        options = parse_uwsgi_ini(file.read_text(), str(file.parent.resolve()), path=str(file))
    except Exception as exc:
        raise DoctorError(f"cannot parse {path} as a uWSGI ini file: {describe_error(exc)}") from None

    def last(key: str, default: str = "") -> str:
        return options.get(key, [default])[-1]

    def flag(key: str) -> bool:
        return key in options and last(key).lower() in _TRUE

    unreadable: dict[str, str] = {}

    def number(key: str, default: str, *aliases: str) -> int:
        for name in (key, *aliases):
            if name in options:
                value = last(name).strip()
                try:
                    return int(value or default)
                except ValueError:
                    unreadable[name] = value
                    return int(default)
        return int(default)

    gevent_cores = number("gevent", "0")
    imports = [
        module for key in ("import", "pyimport", "py-import", "python-import") for module in options.get(key, [])
    ]
    return Server(
        kind="uwsgi",
        source=path,
        forks_after_loading_app=not flag("lazy-apps") and not flag("lazy"),
        processes=number("processes", "1", "workers"),
        threads=number("threads", "1"),
        gevent=gevent_cores > 0,
        serverhooks="serverhooks.uwsgi" in imports,
        per_process_limit=gevent_cores or None,
        fork_handlers_run=flag("py-call-osafterfork"),
        unreadable=unreadable,
    )


# --------------------------------------------------------------------------- Celery


def read_celery(app_path: str) -> Server:
    module_name, _, attribute = app_path.partition(":")
    importable_from_here()
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise DoctorError(f"cannot import the Celery app module {module_name!r}: {describe_error(exc)}") from None
    app = getattr(module, attribute or "app", None) or getattr(module, "celery", None)
    if app is None or not hasattr(app, "conf"):
        raise DoctorError(f"{app_path!r} is not a Celery app (give module:attribute)")
    pool = str(app.conf.worker_pool or "prefork")
    concurrency = int(app.conf.worker_concurrency or os.cpu_count() or 1)
    return Server(
        kind="celery",
        source=app_path,
        forks_after_loading_app=pool == "prefork",
        processes=concurrency if pool == "prefork" else 1,
        threads=concurrency if pool == "threads" else 1,
        gevent=pool == "gevent",
        serverhooks="serverhooks.celery" in sys.modules,
        per_process_limit=concurrency if pool == "gevent" else None,
    )


# --------------------------------------------------------------------------- Django
