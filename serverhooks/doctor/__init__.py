"""`serverhooks doctor`: is this deployment affected, before and while it bites?

The command line is `cli`; what it reads is `servers` (Gunicorn, uWSGI, Celery configs) and
`django_settings`; `rules` turns those into findings; `live` reads a running server
through /proc. Django's system checks (serverhooks.checks) use `django_settings` and
`rules` only.
"""

from __future__ import annotations

__all__: list[str] = []
