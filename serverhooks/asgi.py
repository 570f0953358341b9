"""ASGI: a bounded pool of database connections per worker process.

Why: Django's ASGI handler runs each request's sync code (middleware, sync views, and the
ORM behind async views' `sync_to_async`) in a thread of its own. Django keeps connections
per thread, so every request opens a session; with `CONN_MAX_AGE > 0` the finished
request's session lingers until the garbage collector runs, and the server runs out.

With the pool (serverhooks.pool.threads), a request checks a connection out at its first
database use and gives it back at `request_finished`, which Django sends in the request's
thread even when the client went away. At most SERVERHOOKS['POOL_SIZE'] per alias exist
in a worker.

Under Gunicorn's `asgi` worker the usual line in gunicorn.conf.py installs it. Elsewhere
(uvicorn, or any ASGI server), wrap the application in asgi.py:

    from serverhooks.asgi import pooled
    application = pooled(get_asgi_application())

Work outside a request (a background thread, an executor job, a Channels consumer) has no
`request_finished`: wrap it in `serverhooks.threads.releasing()` to give its connection back.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from serverhooks import _django, conf, registry
from serverhooks._log import describe_error, logger

__all__ = ["install", "is_asgi_worker", "pooled"]

Scope = MutableMapping[str, Any]
ASGIApp = Callable[..., Awaitable[None]]

_installed_in_pid: int | None = None


def install() -> list[str]:
    """Give this process's request threads a pool per database alias; returns the pooled aliases.

    Once per process (a forked child installs again; the parent's pools are abandoned by the
    fork rules). Never raises: a failure is logged, and Django carries on without the pool.
    """
    global _installed_in_pid
    if _installed_in_pid == os.getpid():
        return []
    _installed_in_pid = os.getpid()
    try:
        if not conf.get("ASGI_POOL"):
            logger.debug("serverhooks: SERVERHOOKS['ASGI_POOL'] is off; no pool for ASGI")
            return []
        if _django.load_settings() is not _django.DjangoStatus.READY:
            return []
        from serverhooks.pool import active, threads

        waiter = active.active_waiter()
        if waiter is not None and not isinstance(waiter, threads.ThreadWaiter):
            logger.warning("serverhooks: this process already pools for another kind of worker; no ASGI pool")
            return []
        pooled_aliases = threads.activate(conf.get("POOL_SIZE"), conf.get("POOL_TIMEOUT"))
        registry.start_tracking()  # done already under Gunicorn; uvicorn runs no hook of ours
        logger.debug(
            "serverhooks: ASGI pool for %s (size %s, timeout %s s)",
            ", ".join(pooled_aliases) or "no alias",
            conf.get("POOL_SIZE"),
            conf.get("POOL_TIMEOUT"),
        )
        return pooled_aliases
    except Exception as exc:
        logger.warning("serverhooks: installing the ASGI pool failed: %s; Django runs without it", describe_error(exc))
        return []


def pooled(application: ASGIApp) -> ASGIApp:
    """Wrap an ASGI application: the first call in each process installs the pool.

    Installing at the first call, not at import, puts the pool in the process that serves:
    a server that imports the app and then forks or spawns workers gets one per worker.
    """

    async def pooled_application(scope: Scope, receive: Any, send: Any) -> None:
        if _installed_in_pid != os.getpid():
            install()
        await application(scope, receive, send)

    pooled_application.__wrapped__ = application  # type: ignore[attr-defined]
    return pooled_application


def is_asgi_worker(worker: Any) -> bool:
    """Does this Gunicorn worker serve ASGI (Gunicorn's own `asgi` worker, or uvicorn's)?"""
    for klass in type(worker).__mro__:
        module = klass.__module__ or ""
        if module == "gunicorn.workers.gasgi" or module.startswith(("uvicorn", "uvicorn_worker")):
            return True
    return False
