"""serverhooks' settings: one dict, `settings.SERVERHOOKS`, with environment overrides.

Precedence, highest first: the environment variable `SERVERHOOKS_<KEY>`, then
`settings.SERVERHOOKS[KEY]`, then the default below. The README's settings table
is rendered from `SETTINGS` and a test keeps the two equal.

Reading is lazy (never at import) and never raises: a broken settings module
yields the defaults plus one warning that names the module.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from serverhooks._log import describe_error, say_once

ENV_PREFIX = "SERVERHOOKS_"


class ConfigurationError(ValueError):
    """A SERVERHOOKS value that cannot be used; the message names the fix."""


def _parse_bool(raw: object) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off", ""}:
        return False
    raise ConfigurationError(f"expected a boolean (1/0, true/false, yes/no), got {raw!r}")


def _whole_number_parser(minimum: int) -> Callable[[object], int]:
    def parse(raw: object) -> int:
        try:
            value = int(str(raw).strip())
        except ValueError:
            raise ConfigurationError(f"expected a whole number of at least {minimum}, got {raw!r}") from None
        if value < minimum:
            raise ConfigurationError(f"expected a whole number of at least {minimum}, got {raw!r}")
        return value

    return parse


_parse_positive_int = _whole_number_parser(1)
_parse_count = _whole_number_parser(0)


def _parse_seconds(raw: object) -> float:
    try:
        value = float(str(raw).strip())
    except ValueError:
        raise ConfigurationError(f"expected a number of seconds above 0, got {raw!r}") from None
    if not value > 0:
        raise ConfigurationError(f"expected a number of seconds above 0, got {raw!r}")
    return value


def _parse_level(raw: object) -> str:
    name = str(raw).strip().upper()
    if name not in {"DEBUG", "INFO", "WARNING"}:
        raise ConfigurationError(f"expected DEBUG, INFO or WARNING, got {raw!r}")
    return name


def _parse_scope(raw: object) -> str:
    scope = str(raw).strip().lower()
    if scope not in {"request", "transaction"}:
        raise ConfigurationError(f"expected 'request' or 'transaction', got {raw!r}")
    return scope


@dataclasses.dataclass(frozen=True)
class Setting:
    key: str
    default: Any
    parse: Callable[[object], Any]
    doc: str

    @property
    def env_var(self) -> str:
        return ENV_PREFIX + self.key


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "FORK_GUARD",
        True,
        _parse_bool,
        "Install an `os.register_at_fork` guard, so forks that bypass the server hooks "
        "(multiprocessing, `os.fork()`, libraries) also abandon inherited connections in the child.",
    ),
    Setting(
        "CLOSE_CACHES_BEFORE_FORK",
        True,
        _parse_bool,
        "Before a server forks, also close the parent's initialised Django cache clients.",
    ),
    Setting(
        "PROBE_DATABASES",
        True,
        _parse_bool,
        "The first worker checks, in a background thread, that every database alias loads "
        "and answers, and logs a WARNING that names the problem when one does not.",
    ),
    Setting(
        "GEVENT_POOL",
        True,
        _parse_bool,
        "Under gevent, give each worker a bounded pool of connections that its greenlets check out "
        "and return at the end of each request. Off: plain Django, one connection per greenlet.",
    ),
    Setting(
        "ASGI_POOL",
        True,
        _parse_bool,
        "Under ASGI (Gunicorn's asgi worker, or an app wrapped in serverhooks.asgi.pooled), give each "
        "worker a bounded pool of connections that requests check out and return when they end. "
        "Off: plain Django, a session per request.",
    ),
    Setting(
        "POOL_SIZE",
        10,
        _parse_positive_int,
        "Most connections a worker's pool (gevent or ASGI) holds per database alias (idle plus in use).",
    ),
    Setting(
        "POOL_TIMEOUT",
        10.0,
        _parse_seconds,
        "Seconds a request waits for a free pooled connection before the query fails with an error "
        "naming this setting.",
    ),
    Setting(
        "POOL_SCOPE",
        "request",
        _parse_scope,
        "How long a unit of work holds a pooled connection: `request` (until the request ends) or "
        "`transaction` (until it is between transactions with no cursor open; README, Transaction scope).",
    ),
    Setting(
        "CHECK_IDLE_SESSIONS",
        True,
        _parse_bool,
        "At the start of each request or task, and at each pool checkout, look at each idle persistent "
        "connection's socket (one `poll()`, no round trip) and replace a session the server ended "
        "(`KILL`, an idle timeout, a restart) before the request uses it.",
    ),
    Setting(
        "CLOSE_INTERRUPTED",
        True,
        _parse_bool,
        "Close a connection whose query was cut short by anything but a database error (a timeout, "
        "`GreenletExit`, a cancelled task), so that the reply still on its way never reaches another query.",
    ),
    Setting(
        "EXIT_WAIT",
        5.0,
        _parse_seconds,
        "Seconds a worker's exit waits for other threads still inside a query or a transaction before it "
        "closes their connections; those still busy then are left to the operating system, and counted.",
    ),
    Setting(
        "METRICS",
        True,
        _parse_bool,
        "With prometheus_client installed and `PROMETHEUS_MULTIPROC_DIR` set, export serverhooks' counters "
        "and pool gauges as Prometheus metrics (multiprocess mode; README, Metrics). Off, or without either: "
        "prometheus_client is not even imported.",
    ),
    Setting(
        "METRICS_MERGE_AT",
        32,
        _parse_count,
        "A new worker merges the counter and histogram files that dead workers left in "
        "`PROMETHEUS_MULTIPROC_DIR` into one archive file per type once this many wait, which keeps "
        "the scrape time bounded (totals stay exact). 0: never merge.",
    ),
    Setting(
        "STATS_LOG_LEVEL",
        "DEBUG",
        _parse_level,
        "Level at which a worker logs its counters when it exits (DEBUG, INFO or WARNING).",
    ),
)

_BY_KEY = {setting.key: setting for setting in SETTINGS}
_cache: dict[str, Any] | None = None


def _user_dict() -> tuple[dict[str, Any], bool]:
    """(`settings.SERVERHOOKS` or {}, whether Django settings were loaded); never raises.

    It never triggers loading the settings module: in a server master that did not
    preload the app, that module is the worker's business.
    """
    conf = sys.modules.get("django.conf")
    if conf is None:
        return {}, False
    try:
        if not conf.settings.configured:
            return {}, False
        value = getattr(conf.settings, "SERVERHOOKS", {})
    except Exception as exc:  # a broken settings module must not stop the server
        say_once(
            "settings-broken",
            logging.WARNING,
            "serverhooks: cannot read Django settings (DJANGO_SETTINGS_MODULE=%s): %s; "
            "using serverhooks' defaults. Fix the settings module.",
            os.environ.get("DJANGO_SETTINGS_MODULE", "<unset>"),
            describe_error(exc),
        )
        return {}, True
    if not isinstance(value, dict):
        say_once(
            "settings-not-dict",
            logging.WARNING,
            "serverhooks: settings.SERVERHOOKS must be a dict, got %s; using the defaults.",
            type(value).__name__,
        )
        return {}, True
    return value, True


def load() -> tuple[dict[str, Any], bool]:
    """Resolve every setting (env > settings.SERVERHOOKS > default), logging bad values.

    The flag says whether Django settings took part; until they do, nothing is cached.
    """
    user, complete = _user_dict()
    for unknown in sorted(set(user) - set(_BY_KEY)):
        say_once(
            f"settings-unknown-{unknown}",
            logging.WARNING,
            "serverhooks: unknown key SERVERHOOKS[%r] is ignored; known keys: %s.",
            unknown,
            ", ".join(_BY_KEY),
        )
    resolved: dict[str, Any] = {}
    for setting in SETTINGS:
        source, raw = "default", setting.default
        if setting.key in user:
            source, raw = f"SERVERHOOKS[{setting.key!r}]", user[setting.key]
        if setting.env_var in os.environ:
            source, raw = setting.env_var, os.environ[setting.env_var]
        try:
            resolved[setting.key] = setting.parse(raw)
        except ConfigurationError as exc:
            say_once(
                f"settings-bad-{setting.key}",
                logging.WARNING,
                "serverhooks: %s: %s; using the default %r.",
                source,
                exc,
                setting.default,
            )
            resolved[setting.key] = setting.default
    return resolved, complete


def get(key: str) -> Any:
    """One resolved setting; resolved once per process, then cached."""
    global _cache
    if _cache is not None:
        return _cache[key]
    resolved, complete = load()
    if complete:
        _cache = resolved
    return resolved[key]


def reload() -> None:
    """Forget the cached values (tests, and after Django settings change)."""
    global _cache
    _cache = None


def render_table() -> str:
    """The Markdown table of settings that the README carries."""
    rows = ["| key | environment override | default | what it does |", "|---|---|---|---|"]
    for setting in SETTINGS:
        rows.append(f"| `{setting.key}` | `{setting.env_var}` | `{setting.default!r}` | {setting.doc} |")
    return "\n".join(rows)
