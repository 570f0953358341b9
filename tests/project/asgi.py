"""ASGI entry point. SERVERHOOKS_TEST_ASGI_WRAP=1 wraps it in serverhooks.asgi.pooled, the
one line the README gives for uvicorn and other ASGI servers."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.project.settings")
application: Callable[..., Any] = get_asgi_application()

if os.environ.get("SERVERHOOKS_TEST_ASGI_WRAP") == "1":
    from serverhooks.asgi import pooled

    application = pooled(application)

if os.environ.get("QUERY_AT_IMPORT") == "1":
    from django.db import connections

    for _alias in connections:
        with connections[_alias].cursor() as _cursor:
            _cursor.execute("SELECT 1")
