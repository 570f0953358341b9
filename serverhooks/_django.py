"""Lazy, side-effect-free access to Django.

Nothing here imports `django.db` unless asked to by a caller that knows it is
safe: importing it creates Django's thread-local connection storage, which must
not happen in a master before gevent patches threading.
"""

from __future__ import annotations

import enum
import importlib.util
import logging
import os
import sys
from types import ModuleType
from typing import Any

from serverhooks._log import describe_error, remember_secret, say_once


class DjangoStatus(enum.Enum):
    ABSENT = "Django is not installed"
    UNCONFIGURED = "DJANGO_SETTINGS_MODULE is unset and settings.configure() was not called"
    BROKEN = "the Django settings module cannot be loaded"
    READY = "ready"


def loaded_db() -> ModuleType | None:
    """`django.db` if this process already imported it, else None (never imports it)."""
    return sys.modules.get("django.db")


def loaded_settings_are_configured() -> bool:
    """True when Django settings are loaded already; never triggers loading."""
    conf = sys.modules.get("django.conf")
    if conf is None:
        return False
    try:
        return bool(conf.settings.configured)
    except Exception:
        return False


def status_without_importing() -> DjangoStatus:
    """What can be known without importing Django or the settings module (for masters)."""
    # sys.modules["django"] = None (an import blocked on purpose) counts as absent too.
    if sys.modules.get("django") is None and importlib.util.find_spec("django") is None:
        return DjangoStatus.ABSENT
    if loaded_settings_are_configured() or os.environ.get("DJANGO_SETTINGS_MODULE"):
        return DjangoStatus.READY
    return DjangoStatus.UNCONFIGURED


def load_settings() -> DjangoStatus:
    """Load Django settings if possible (workers only), logging once why not."""
    status = status_without_importing()
    if status is not DjangoStatus.READY:
        say_once(f"django-{status.name}", logging.INFO, "serverhooks: %s; the hooks do nothing.", status.value)
        return status
    try:
        from django.conf import settings

        databases = settings.DATABASES  # forces the settings module to load
    except Exception as exc:  # its message may quote a DSN: describe_error redacts URLs and key=value
        say_once(
            "django-BROKEN",
            logging.WARNING,
            "serverhooks: cannot load Django settings (DJANGO_SETTINGS_MODULE=%s): %s; "
            "the hooks do nothing until the settings module is fixed.",
            os.environ.get("DJANGO_SETTINGS_MODULE", "<unset>"),
            describe_error(exc),
        )
        return DjangoStatus.BROKEN
    _remember_passwords(databases)
    return DjangoStatus.READY


def _remember_passwords(databases: object) -> None:
    """Every configured password, redacted from every later log line before a connection opens
    (a driver's error may quote it bare, with neither a key nor a URL around it)."""
    if isinstance(databases, dict):
        for entry in databases.values():
            if isinstance(entry, dict):
                remember_secret(entry.get("PASSWORD"))


def describe_alias(alias: str, settings_dict: dict[str, Any]) -> str:
    """`'default' (mysql at 127.0.0.1:3306, NAME 'test')`: enough to act on, never a secret."""
    engine = str(settings_dict.get("ENGINE", "?")).rsplit(".", 1)[-1]
    host = settings_dict.get("HOST") or "local socket"
    port = settings_dict.get("PORT")
    where = f"{host}:{port}" if port else str(host)
    return f"{alias!r} ({engine} at {where}, NAME {str(settings_dict.get('NAME', ''))!r})"
