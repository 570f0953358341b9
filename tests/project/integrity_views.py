"""Views that write inside atomic() and then do what issue 20 found serverhooks mishandled.

Each answers as /echo does ({"m", "pid", "session", "inherited"}), so tests/support/http.py's
marker load drives them; the test then counts the rows each marker left.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from django.db import connection, transaction
from django.http import HttpRequest, JsonResponse

from serverhooks import release_connections
from serverhooks.threads import Thread, releasing
from tests.project.models import Hit
from tests.project.views import SESSION_ID_SQL


class Refused(Exception):
    """What the execute_wrapper raises: the query is never sent (Django's documented "blocker")."""


def _refuse(execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any) -> Any:
    raise Refused("no queries here")


def _answer(marker: str) -> JsonResponse:
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {SESSION_ID_SQL[connection.vendor]}")
        session = cursor.fetchone()[0]
    return JsonResponse({"m": marker, "pid": os.getpid(), "session": session, "inherited": False})


def write_then_refused(request: HttpRequest) -> JsonResponse:
    """A row written, then a query an execute_wrapper refuses before sending, caught: the row stays."""
    marker = request.GET.get("m", "")
    with transaction.atomic():
        Hit.objects.create(marker=marker, pid=os.getpid())
        try:
            with connection.execute_wrapper(_refuse):
                Hit.objects.filter(marker=marker).exists()
        except Refused:
            pass
    return _answer(marker)


def release_inside_atomic(request: HttpRequest) -> JsonResponse:
    """Two rows in one block, with every way to release in between; ?fail=1 raises at the block's end."""
    marker = request.GET.get("m", "")
    with transaction.atomic():
        Hit.objects.create(marker=f"{marker}-1", pid=os.getpid())
        with releasing():
            Hit.objects.count()
        release_connections()
        Thread(target=Hit.objects.count).run()  # run() in this thread, as a subclass might
        Hit.objects.create(marker=f"{marker}-2", pid=os.getpid())
        if request.GET.get("fail") == "1":
            raise RuntimeError("the block fails at its end: nothing of it may stay")
    return _answer(marker)
