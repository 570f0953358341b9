"""A Celery app for the tests: `celery -A tests.project.celery_app worker ...`.

SERVERHOOKS_CELERY=1 imports serverhooks.celery (the hooks arm); SERVERHOOKS_TEST_METRICS_CONTROL=1
switches off the removal of dead processes' live gauges. QUERY_BEFORE_FORK=1 runs a
query in the main process before its pool forks. CELERY_BROKER_URL / CELERY_QUEUE keep
each test's tasks apart.
"""

from __future__ import annotations

import os

import django
from celery import Celery, signals

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.project.settings")
django.setup()

if os.environ.get("SERVERHOOKS_CELERY") == "1":
    import serverhooks.celery  # noqa: F401 - the one line users add
if os.environ.get("SERVERHOOKS_TEST_METRICS_CONTROL") == "1":
    import tests.support.metrics_control  # noqa: F401 - the metrics tests' control arm

BROKER = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0")
# CELERY_DJANGO_FIXUP=0: no Django fixup, as when the app is created before
# DJANGO_SETTINGS_MODULE is set (Celery only installs it when that variable is set).
fixups: list[str] | None = [] if os.environ.get("CELERY_DJANGO_FIXUP") == "0" else None
app = Celery("tests", broker=BROKER, backend=BROKER, fixups=fixups)
app.conf.update(
    task_default_queue=os.environ.get("CELERY_QUEUE", "serverhooks-tests"),
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    result_expires=600,
)


@signals.worker_init.connect
def query_before_the_pool_forks(**kwargs: object) -> None:
    """Connected after Celery's fixup (which closes connections at worker_init): the
    main process holds a connection when its pool forks."""
    if os.environ.get("QUERY_BEFORE_FORK") == "1":
        from django.db import connection

        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")


@app.task(name="tests.echo")
def echo(marker: str) -> dict[str, object]:
    from django.db import connection

    from tests.project.views import SESSION_ID_SQL

    with connection.cursor() as cursor:
        cursor.execute(f"SELECT %s, {SESSION_ID_SQL[connection.vendor]}", [marker])
        echoed, session = cursor.fetchone()
        cursor.execute("INSERT INTO sh_hit (marker, pid) VALUES (%s, %s)", [marker, os.getpid()])
    return {"m": echoed, "pid": os.getpid(), "session": session}
