"""A user's module for uWSGI (`import = tests.support.uwsgi_user`): post-fork functions that
record, in $POSTFORK_LOG, that they ran, in which worker, and whether they saw an inherited
connection."""

from __future__ import annotations

import os

import uwsgi

from serverhooks.uwsgi import postfork


def _record(tag: str) -> None:
    from django.db import connection

    opener = getattr(connection, "opened_in_pid", None)
    inherited = connection.connection is not None and opener not in (None, os.getpid())
    with open(os.environ["POSTFORK_LOG"], "a") as log:
        log.write(f"{tag} worker={uwsgi.worker_id()} pid={os.getpid()} inherited={inherited}\n")


@postfork
def everywhere() -> None:
    _record("all")


@postfork(2)
def only_in_worker_2() -> None:
    _record("only2")
