"""A Gunicorn dirty app (Gunicorn 25+) that works through Django's ORM, as Gunicorn's docs suggest
dirty workers for: long-running work that holds resources such as database connections."""

from __future__ import annotations

import os
from typing import Any

from gunicorn.dirty import DirtyApp


class OrmApp(DirtyApp):  # type: ignore[misc]
    def init(self) -> None:
        import django

        django.setup()  # set up already when the master preloaded the app; harmless again

    def session(self, marker: str) -> dict[str, Any]:
        """Round-trip a marker through this worker's connection; say which session answered."""
        from django.db import connection

        from tests.project.views import SESSION_ID_SQL

        with connection.cursor() as cursor:
            cursor.execute(f"SELECT %s, {SESSION_ID_SQL[connection.vendor]}", [marker])
            echoed, session = cursor.fetchone()
        return {"m": echoed, "pid": os.getpid(), "session": session}
