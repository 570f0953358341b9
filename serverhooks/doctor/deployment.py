"""Read a deployment's configuration through the servers' own loaders where they exist.

Gunicorn: its own `Config` loads gunicorn.conf.py. uWSGI has no parse-only mode, so
uwsgi.ini is read here following uWSGI's rules (repeated keys, if-env/if-not-env
blocks, %d, $(VAR)). Celery: the app's own configuration. Django: its settings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import os
import re
import sys
from pathlib import Path
from typing import Any

from serverhooks._log import describe_error, redact
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


@dataclasses.dataclass
class Database:
    alias: str
    vendor: str  # mysql | postgresql | sqlite | other
    driver: str  # mysqlclient | pymysql | psycopg | psycopg2 | sqlite3 | ?
    conn_max_age: float | None  # None: unlimited
    health_checks: bool
    django_pool: bool
    described: str
    wait_timeout: int | None = None
    max_connections: int | None = None
    live_error: str | None = None


@dataclasses.dataclass
class Django:
    settings_module: str
    debug: bool
    serverhooks_app: bool
    gevent_pool: bool
    pool_size: int
    psycogreen: bool
    databases: list[Database]


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
    )


# --------------------------------------------------------------------------- uWSGI

_TRUE = {"1", "true", "yes", "on", ""}


def parse_uwsgi_ini(text: str, directory: str, env: dict[str, str] | None = None) -> dict[str, list[str]]:
    """The [uwsgi] section as uWSGI reads it: every value of repeated keys, env blocks applied."""
    env = dict(os.environ) if env is None else env
    options: dict[str, list[str]] = {}
    in_section = False
    skipping: list[bool] = []

    def expand(value: str) -> str:
        value = value.replace("%d", directory.rstrip("/") + "/")
        return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), ""), value)

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
        options = parse_uwsgi_ini(file.read_text(), str(file.parent.resolve()))
    except Exception as exc:
        raise DoctorError(f"cannot parse {path} as a uWSGI ini file: {describe_error(exc)}") from None

    def last(key: str, default: str = "") -> str:
        return options.get(key, [default])[-1]

    def flag(key: str) -> bool:
        return key in options and last(key).lower() in _TRUE

    gevent_cores = int(last("gevent", "0") or 0)
    imports = [
        module for key in ("import", "pyimport", "py-import", "python-import") for module in options.get(key, [])
    ]
    return Server(
        kind="uwsgi",
        source=path,
        forks_after_loading_app=not flag("lazy-apps") and not flag("lazy"),
        processes=int(last("processes", last("workers", "1")) or 1),
        threads=int(last("threads", "1") or 1),
        gevent=gevent_cores > 0,
        serverhooks="serverhooks.uwsgi" in imports,
        per_process_limit=gevent_cores or None,
    )


# --------------------------------------------------------------------------- Celery


def read_celery(app_path: str) -> Server:
    module_name, _, attribute = app_path.partition(":")
    _importable_from_here()
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


def _driver(vendor: str) -> str:
    if vendor == "mysql":
        try:
            import MySQLdb

            return "pymysql" if MySQLdb.__name__ == "pymysql" else "mysqlclient"
        except ImportError:
            return "?"
    if vendor == "postgresql":
        try:
            from django.db.backends.postgresql.psycopg_any import is_psycopg3

            return "psycopg" if is_psycopg3 else "psycopg2"
        except Exception:
            return "?"
    return "sqlite3" if vendor == "sqlite" else "?"


def _importable_from_here() -> None:
    """Like manage.py, Gunicorn and Celery: the project in the current directory is importable."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


def read_django(live: bool) -> Django | None:
    """Django settings from DJANGO_SETTINGS_MODULE, or None when it is unset."""
    module = os.environ.get("DJANGO_SETTINGS_MODULE")
    if not module:
        return None
    _importable_from_here()
    try:
        import django

        django.setup()
        from django.conf import settings
        from django.db import connections
    except Exception as exc:
        raise DoctorError(f"cannot load Django settings {module!r}: {describe_error(exc)}") from None
    from serverhooks import _django, conf

    conf.reload()
    databases = []
    for alias in connections:
        settings_dict = connections.settings[alias]
        engine = str(settings_dict.get("ENGINE", ""))
        vendor = next((v for v in ("mysql", "postgresql", "sqlite") if v in engine), "other")
        database = Database(
            alias=alias,
            vendor=vendor,
            driver=_driver(vendor),
            conn_max_age=settings_dict.get("CONN_MAX_AGE", 0),
            health_checks=bool(settings_dict.get("CONN_HEALTH_CHECKS")),
            django_pool=bool(settings_dict.get("OPTIONS", {}).get("pool")),
            described=redact(_django.describe_alias(alias, settings_dict), [str(settings_dict.get("PASSWORD", ""))]),
        )
        if live and vendor in ("mysql", "postgresql"):
            _read_live(connections[alias], database)
        databases.append(database)
    return Django(
        settings_module=module,
        debug=bool(settings.DEBUG),
        serverhooks_app="serverhooks" in settings.INSTALLED_APPS
        or any(str(app).startswith("serverhooks.") for app in settings.INSTALLED_APPS),
        gevent_pool=bool(conf.get("GEVENT_POOL")),
        pool_size=int(conf.get("POOL_SIZE")),
        psycogreen=importlib.util.find_spec("psycogreen") is not None,
        databases=databases,
    )


def database_ports() -> dict[int, str]:
    """{port: vendor} of the TCP databases in DJANGO_SETTINGS_MODULE's DATABASES; {} when unknown.

    Live mode recognises the usual ports by itself; these add a server on another port.
    Reading them connects to nothing, and any failure just leaves live mode with the usual ones.
    """
    if not os.environ.get("DJANGO_SETTINGS_MODULE"):
        return {}
    _importable_from_here()
    try:
        from django.conf import settings

        configured = dict(settings.DATABASES)
    except Exception:
        return {}
    ports: dict[int, str] = {}
    for settings_dict in configured.values():
        engine = str(settings_dict.get("ENGINE", ""))
        vendor = next((v for v in ("mysql", "postgresql") if v in engine), None)
        if vendor and str(settings_dict.get("PORT") or "").isdigit():
            ports[int(settings_dict["PORT"])] = vendor
    return ports


def _read_live(wrapper: Any, database: Database) -> None:
    """wait_timeout and max_connections from the server itself; never fails the doctor."""
    try:
        with wrapper.cursor() as cursor:
            if database.vendor == "mysql":
                cursor.execute("SELECT @@wait_timeout, @@max_connections")
            else:
                cursor.execute("SELECT NULL, current_setting('max_connections')::int")
            wait_timeout, max_connections = cursor.fetchone()
        database.wait_timeout = None if wait_timeout is None else int(wait_timeout)
        database.max_connections = int(max_connections)
    except Exception as exc:
        database.live_error = describe_error(exc)
    finally:
        try:
            wrapper.close()
        except Exception:
            pass
