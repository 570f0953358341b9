"""Instrumentation of the project itself, so the control arm (no serverhooks) can
report which process opened the connection a request used."""

from __future__ import annotations

import os
from typing import Any

from django.apps import AppConfig

_opened = {"pid": 0, "count": 0}


def stamp_opener(sender: Any, connection: Any, **kwargs: Any) -> None:
    connection.opened_in_pid = os.getpid()
    if _opened["pid"] != os.getpid():  # a forked child counts its own
        _opened.update(pid=os.getpid(), count=0)
    _opened["count"] += 1


def opened_in_this_process() -> int:
    return _opened["count"] if _opened["pid"] == os.getpid() else 0


class ProjectConfig(AppConfig):
    name = "tests.project"
    label = "project"

    def ready(self) -> None:
        from django.db.backends.signals import connection_created

        connection_created.connect(stamp_opener, dispatch_uid="tests.project.stamp")
