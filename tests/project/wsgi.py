"""WSGI entry point. QUERY_AT_IMPORT=1 runs a query while the app loads, which under
preload_app is in the master: the setup that makes every worker inherit a socket."""

from __future__ import annotations

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.project.settings")
application = get_wsgi_application()

if os.environ.get("QUERY_AT_IMPORT") == "1":
    from django.db import connections

    for _alias in connections:
        with connections[_alias].cursor() as _cursor:
            _cursor.execute("SELECT 1")
    if os.environ.get("CACHE_URL"):
        from django.core.cache import cache

        cache.set("warmed-in-master", os.getpid())
