"""Django system checks: `manage.py check --deploy` reports what settings alone reveal.

Registered by serverhooks' AppConfig. The ids are the doctor's (serverhooks.W006, ...).
Pass `--database default` to let W006 read the MySQL server's wait_timeout.
"""

from __future__ import annotations

from typing import Any

from django.core import checks

from serverhooks.doctor import django_settings, rules


@checks.register(checks.Tags.database, deploy=True)
def serverhooks_deploy_checks(app_configs: Any = None, databases: Any = None, **kwargs: Any) -> list[checks.Warning]:
    django = django_settings.read_django(live=bool(databases), set_up=False)
    if django is None:
        return []
    return [
        checks.Warning(f"{finding.why}", hint=finding.fix, obj=finding.where, id=finding.id)
        for finding in rules.settings_rules(django, include_debug=True)
    ]
