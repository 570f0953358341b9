"""What both settings modules share: Django's own test settings (tests/test_sqlite.py) plus ours.

The harness passes the server and the database names in the environment:

=========================  ===============================================  ===================
variable                   meaning                                          default
=========================  ===============================================  ===================
DJANGO_SUITE_DB_PREFIX     prefix of the database names (unique per run)    djsuite_<pid>
DJANGO_SUITE_DB_HOST       server host                                      127.0.0.1
DJANGO_SUITE_DB_PORT       server port                                      the engine's
DJANGO_SUITE_DB_USER       user                                             root / postgres
DJANGO_SUITE_DB_PASSWORD   password                                         empty
DJANGO_SUITE_CONN_MAX_AGE  CONN_MAX_AGE of both aliases                     600
=========================  ===============================================  ===================

Django's test runner creates (and at the end drops) `test_<NAME>` for each alias, and
`test_<NAME>_<n>` clones with --parallel; the `NAME` databases themselves are never created.
"""

from __future__ import annotations

import os
from typing import Any

SECRET_KEY = "django_tests_secret_key"
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
USE_TZ = False

# Records every test's outcome (DJANGO_SUITE_OUTCOMES) and otherwise is Django's DiscoverRunner.
TEST_RUNNER = "bench.django_suite_support.recorder.RecordingRunner"

# serverhooks' guard, explicitly on. Only read in the "prepared" arm: the plain arm never imports
# serverhooks. The harness also clears SERVERHOOKS_* overrides from the environment.
SERVERHOOKS = {
    "CLOSE_INTERRUPTED": True,
    "CHECK_IDLE_SESSIONS": True,
    "FORK_GUARD": True,
    "PROBE_DATABASES": False,
}


def databases(engine: str, default_port: int, default_user: str, extra: dict[str, Any]) -> dict[str, Any]:
    """The two aliases Django's suite needs, `default` and `other`."""
    prefix = os.environ.get("DJANGO_SUITE_DB_PREFIX") or f"djsuite_{os.getpid()}"
    common: dict[str, Any] = {
        "ENGINE": engine,
        "HOST": os.environ.get("DJANGO_SUITE_DB_HOST", "127.0.0.1"),
        "PORT": int(os.environ.get("DJANGO_SUITE_DB_PORT") or default_port),
        "USER": os.environ.get("DJANGO_SUITE_DB_USER", default_user),
        "PASSWORD": os.environ.get("DJANGO_SUITE_DB_PASSWORD", ""),
        # Persistent connections in both arms, so that the persistent-connection code paths run.
        "CONN_MAX_AGE": int(os.environ.get("DJANGO_SUITE_CONN_MAX_AGE", "600")),
        **extra,
    }
    return {alias: {**common, "NAME": f"{prefix}_{alias}"} for alias in ("default", "other")}
