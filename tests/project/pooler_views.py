"""Views that read rows tagged for one request, so that a test can tell another request's rows
(tests/integration/test_pooler_safety.py). Each may pause, at a point the test chooses, until
the test says go: the test then steers which PgBouncer server session the next statement meets.

POOLER_SIGNAL_DIR  where the views write `<step>.paused` and wait for `<step>.go`
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from django.db import DatabaseError, connection
from django.http import HttpRequest, JsonResponse

from tests.project.models import Hit

_WAIT = 20.0  # seconds a paused view waits for its go, at most


def _pause(request: HttpRequest) -> None:
    step = request.GET.get("step", "")
    if not re.fullmatch(r"[a-z0-9-]{1,40}", step):
        return
    signals = Path(os.environ["POOLER_SIGNAL_DIR"])
    (signals / f"{step}.paused").touch()
    deadline = time.monotonic() + _WAIT
    while not (signals / f"{step}.go").exists() and time.monotonic() < deadline:
        time.sleep(0.02)


def _answer(read: list[str], exc: Exception | None = None) -> JsonResponse:
    body: dict[str, object] = {"pid": os.getpid(), "rows": read}
    if exc is not None:  # loud: a 500 that carries the error and the notes of its chain (serverhooks')
        body["error"] = f"{type(exc).__name__}: {exc}"
        notes: list[str] = []
        seen: BaseException | None = exc
        for _ in range(5):  # Django's cursor close is not translated: psycopg's error, Django's as context
            if seen is None:
                break
            notes += getattr(seen, "__notes__", [])
            seen = seen.__cause__ or seen.__context__
        body["notes"] = notes
        return JsonResponse(body, status=500)
    return JsonResponse(body)


def _driver_errors() -> type[Exception]:
    """The driver's base error: Django does not translate those of a cursor's close()."""
    return connection.Database.Error  # type: ignore[attr-defined,no-any-return]


def iterate(request: HttpRequest) -> JsonResponse:
    """The markers starting with `tag`, read through a server-side cursor (`.iterator()`) two
    rows per FETCH; pauses after the first row when `step` is given."""
    tag = request.GET["tag"]
    read: list[str] = []
    try:
        rows = Hit.objects.filter(marker__startswith=tag).order_by("id").values_list("marker", flat=True)
        for marker in rows.iterator(chunk_size=2):
            read.append(marker)
            if len(read) == 1:
                _pause(request)
    except (DatabaseError, _driver_errors()) as exc:
        return _answer(read, exc)
    return _answer(read)


def prepared(request: HttpRequest) -> JsonResponse:
    """The markers starting with `tag` (a capital letter, written into the SQL text, so that each
    tag is a statement of its own with the same parameters), twice: pauses in between when
    `step` is given. With prepare_threshold=0 psycopg prepares the statement at its first run."""
    tag = request.GET["tag"]
    if not re.fullmatch(r"[A-Z]", tag):
        return JsonResponse({"error": "tag: one capital letter"}, status=400)
    read: list[str] = []
    sql = f"SELECT marker FROM sh_hit WHERE marker LIKE '{tag}-%%' AND id >= %s ORDER BY id"
    try:
        with connection.cursor() as cursor:
            cursor.execute(sql, [0])
            read += [row[0] for row in cursor.fetchall()]
            _pause(request)
            cursor.execute(sql, [0])
            read += [row[0] for row in cursor.fetchall()]
    except (DatabaseError, _driver_errors()) as exc:
        return _answer(read, exc)
    return _answer(read)
