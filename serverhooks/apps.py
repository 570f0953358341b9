"""`"serverhooks"` in INSTALLED_APPS: the fork guard in every process that runs Django.

That covers management commands, scripts, Celery and any server, with or without
an adapter: every fork after `django.setup()` gets a child that abandons the
inherited connections.
"""

from __future__ import annotations

from django.apps import AppConfig


class ServerhooksConfig(AppConfig):
    name = "serverhooks"
    verbose_name = "serverhooks"
    default = True

    def ready(self) -> None:
        import django.db  # noqa: F401 - tracking needs it, and Django is set up by now

        from serverhooks import (
            _adapter,
            checks,  # noqa: F401 - registers the system checks
            registry,
        )

        registry.start_tracking()
        _adapter.arm_fork_guard()
