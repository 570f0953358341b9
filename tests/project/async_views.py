"""Views for the ASGI tests: the async ORM, atomic() in sync_to_async, streaming, a slow
view for clients that go away, and work outside any request."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator

from asgiref.sync import sync_to_async
from django.db import connection, transaction
from django.http import HttpRequest, JsonResponse, StreamingHttpResponse

from tests.project.models import Hit
from tests.project.views import SESSION_ID_SQL


def _session_id() -> object:
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {SESSION_ID_SQL[connection.vendor]}")
        return cursor.fetchone()[0]


def _insert_in_atomic(marker: str) -> object:
    with transaction.atomic():
        Hit.objects.create(marker=marker, pid=os.getpid())
        return _session_id()


async def orm(request: HttpRequest) -> JsonResponse:
    """The async ORM, a raw query and atomic() in sync_to_async: all on the request's one session."""
    marker = request.GET.get("m", "")
    created = await Hit.objects.acreate(marker=marker, pid=os.getpid())
    found = await Hit.objects.aget(pk=created.pk)
    sessions = [await sync_to_async(_session_id)(), await sync_to_async(_insert_in_atomic)(marker)]
    # "session" and "inherited" as /echo answers, so the tests' marker load can drive this view too.
    return JsonResponse(
        {"m": found.marker, "pid": os.getpid(), "sessions": sessions, "session": sessions[0], "inherited": False}
    )


def stream(request: HttpRequest) -> StreamingHttpResponse:
    """A streaming response that queries while it streams."""
    marker = request.GET.get("m", "")

    def chunks() -> Iterator[str]:
        for _ in range(3):
            with connection.cursor() as cursor:
                cursor.execute(f"SELECT %s, {SESSION_ID_SQL[connection.vendor]}", [marker])
                echoed, session = cursor.fetchone()
            yield f"{echoed} {session}\n"

    return StreamingHttpResponse(chunks(), content_type="text/plain")


def _sql_sleep(seconds: float) -> None:
    with connection.cursor() as cursor:
        if connection.vendor == "mysql":
            cursor.execute("SELECT SLEEP(%s)", [seconds])
        elif connection.vendor == "postgresql":
            cursor.execute("SELECT pg_sleep(%s)", [seconds])


async def slow(request: HttpRequest) -> JsonResponse:
    """Sleeps in SQL: the tests hang up on it mid-request."""
    seconds = min(float(request.GET.get("s", "0.5")), 5.0)
    await sync_to_async(_sql_sleep)(seconds)
    return JsonResponse({"pid": os.getpid()})


def _background_query(release: bool) -> None:
    from serverhooks.threads import releasing

    if release:
        with releasing():
            _session_id()
    else:
        _session_id()


async def background(request: HttpRequest) -> JsonResponse:
    """Starts work in the event loop's default executor, outside this request, and does not wait."""
    release = request.GET.get("release") == "1"
    future = asyncio.get_running_loop().run_in_executor(None, _background_query, release)
    await asyncio.wait_for(asyncio.shield(future), timeout=5)
    return JsonResponse({"pid": os.getpid(), "released": release})
