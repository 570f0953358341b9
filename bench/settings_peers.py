"""Django settings for the gevent bench's PostgreSQL peers: the test project's, with another pool.

DJANGO_SETTINGS_MODULE=bench.settings_peers and BENCH_PEER set to one of:

geventpool  django-db-geventpool's psycopg 3 backend, configured as its README says for Django 5.1+:
            ENGINE django_db_geventpool.backends.postgresql_psycopg3, CONN_MAX_AGE 0, OPTIONS
            MAX_CONNS = REUSE_CONNS = BENCH_PEER_POOL_SIZE, and Django's own pool off.
djangopool  Django's native psycopg pool (DATABASE_URL with ?pool=1, which gives CONN_MAX_AGE 0 and
            min_size 2, max_size 4), with max_size raised to BENCH_PEER_POOL_SIZE: the same bound per
            worker as serverhooks' POOL_SIZE.
"""

from __future__ import annotations

import os
from typing import Any

from tests.project.settings import *  # noqa: F403
from tests.project.settings import DATABASES

PEER = os.environ["BENCH_PEER"]
POOL_SIZE = int(os.environ["BENCH_PEER_POOL_SIZE"])

_default: dict[str, Any] = DATABASES["default"]
if PEER == "geventpool":
    _default["ENGINE"] = "django_db_geventpool.backends.postgresql_psycopg3"
    _default["CONN_MAX_AGE"] = 0
    _default["OPTIONS"] = {**_default["OPTIONS"], "MAX_CONNS": POOL_SIZE, "REUSE_CONNS": POOL_SIZE, "pool": False}
elif PEER == "djangopool":
    if not _default["OPTIONS"].get("pool"):
        raise RuntimeError("BENCH_PEER=djangopool needs DATABASE_URL=postgres://...?pool=1")
    _default["OPTIONS"]["pool"] = {**_default["OPTIONS"]["pool"], "max_size": POOL_SIZE}
else:
    raise RuntimeError(f"BENCH_PEER must be geventpool or djangopool, not {PEER!r}")
