"""Settings driven by the environment, so one project serves every test arm.

DATABASE_URL       see tests/project/dburl.py; default: SQLite in the temp dir
CONN_MAX_AGE       seconds, default 3600 (the setting that makes fork inheritance bite)
CONN_HEALTH_CHECKS "1" turns Django's health checks on
DJANGO_DEBUG       "1" sets DEBUG = True
CACHE_URL          redis://... makes the default cache Django's RedisCache
MYSQL_INIT_COMMAND MySQL's init_command, run on every new session
DATABASE_ENGINE    replaces ENGINE (the bad-input tests)
SERVERHOOKS_APP    "1" adds "serverhooks" to INSTALLED_APPS (the fork guard everywhere)
"""

from __future__ import annotations

import os
import sys
import tempfile

from tests.project import dburl

DATABASE_URL = os.environ.get("DATABASE_URL") or "sqlite:///" + os.path.join(
    tempfile.gettempdir(), "serverhooks-demo.sqlite3"
)
_family, _driver = dburl.split_driver(DATABASE_URL)
if _driver == "pymysql":
    import pymysql

    pymysql.install_as_MySQLdb()
elif _driver == "psycopg2":
    # Django prefers psycopg 3 when both are installed; hide it to test psycopg2.
    sys.modules["psycopg"] = None  # type: ignore[assignment]

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "tests-only-not-secret")
DEBUG = os.environ.get("DJANGO_DEBUG") == "1"
ALLOWED_HOSTS = ["*"]
USE_TZ = True
ROOT_URLCONF = "tests.project.urls"
INSTALLED_APPS = ["tests.project"]
if os.environ.get("SERVERHOOKS_APP") == "1":
    INSTALLED_APPS.append("serverhooks")
MIDDLEWARE: list[str] = []
DATABASES = {"default": dburl.parse(DATABASE_URL, int(os.environ.get("CONN_MAX_AGE", "3600")))}
DATABASES["default"]["CONN_HEALTH_CHECKS"] = os.environ.get("CONN_HEALTH_CHECKS") == "1"
if os.environ.get("MYSQL_INIT_COMMAND"):  # e.g. "SET SESSION wait_timeout=2" (the fault tests)
    DATABASES["default"]["OPTIONS"]["init_command"] = os.environ["MYSQL_INIT_COMMAND"]
if os.environ.get("DATABASE_ENGINE"):  # the bad-input tests' wrong ENGINE
    DATABASES["default"]["ENGINE"] = os.environ["DATABASE_ENGINE"]
if os.environ.get("CACHE_URL"):
    CACHES = {
        "default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": os.environ["CACHE_URL"]}
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
LOGGING = {"version": 1, "disable_existing_loggers": False}
