"""The crash tests' control arm: serverhooks' idle-session check as it judged before it knew
a backend's last notice, so that a PostgreSQL crash-restart or immediate shutdown leaves
sessions it takes for healthy (the bug the fix closed; plain Django fails the same way).

Two things are put back, and nothing else: a FIN behind waiting data is not looked at (the
judgement rests on the peeked bytes alone), and a NoticeResponse always passes for a message a
healthy session may get. The rest of serverhooks works as usual.

A server's master imports this module (a gunicorn conf, or uWSGI's `--import`), and every
worker it forks inherits the change; it applies only with SERVERHOOKS_TEST_HEALTH_CONTROL=1
in the environment, so that importing it elsewhere (the unit tests use `reverted()`) changes
nothing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from serverhooks import health

_FIXED_HUNG_UP = health._HUNG_UP
_FIXED_NOTICE_ENDS_SESSION = health._notice_ends_session


def _no_notice_ends_a_session(body: bytes) -> bool:
    return False


def revert() -> None:
    """The judgement before the fix: only POLLHUP, POLLERR and POLLNVAL were asked for, and they
    led to the peek too; a notice never meant ended."""
    health._HUNG_UP = 0
    health._notice_ends_session = _no_notice_ends_a_session


def restore() -> None:
    health._HUNG_UP = _FIXED_HUNG_UP
    health._notice_ends_session = _FIXED_NOTICE_ENDS_SESSION


@contextmanager
def reverted() -> Iterator[None]:
    revert()
    try:
        yield
    finally:
        restore()


if os.environ.get("SERVERHOOKS_TEST_HEALTH_CONTROL") == "1":
    revert()
