"""Start-up check of every database alias, in a background thread.

Why: a wrong ENGINE or an unreachable host otherwise shows up only as failing
requests. The check never blocks a worker's boot (a firewalled host can take the
driver's whole connect timeout) and never raises; it logs one WARNING per
problem, naming the alias and the reason, never the password.
"""

from __future__ import annotations

import threading

from serverhooks import _django
from serverhooks._log import describe_error, logger, remember_secret
from serverhooks.release import release_connections

__all__ = ["probe_databases", "probe_in_background"]


def probe_databases() -> dict[str, str]:
    """Check each alias; return {alias: "ok" | reason}. Runs in the calling thread."""
    from django.db import connections

    results: dict[str, str] = {}
    for alias in connections:
        settings_dict = connections.settings.get(alias, {})
        remember_secret(settings_dict.get("PASSWORD"))
        described = _django.describe_alias(alias, settings_dict)
        try:
            wrapper = connections[alias]
        except Exception as exc:
            results[alias] = describe_error(exc)
            logger.warning(
                "serverhooks: database %s cannot be loaded: %s. Fix DATABASES[%r]['ENGINE'].",
                described,
                results[alias],
                alias,
            )
            continue
        try:
            wrapper.ensure_connection()
            results[alias] = "ok"
            logger.debug("serverhooks: database %s answers", described)
        except Exception as exc:
            results[alias] = describe_error(exc)
            logger.warning(
                "serverhooks: database %s does not answer: %s. Requests that use it will fail "
                "until it does; check HOST, PORT and credentials in DATABASES[%r].",
                described,
                results[alias],
                alias,
            )
    # Under the gevent pool this thread is a greenlet holding pooled connections.
    release_connections()
    return results


def probe_in_background() -> threading.Thread:
    thread = threading.Thread(target=_probe_quietly, name="serverhooks-probe", daemon=True)
    thread.start()
    return thread


def _probe_quietly() -> None:
    try:
        probe_databases()
    except Exception as exc:
        logger.warning("serverhooks: database probe failed: %s", describe_error(exc))
