"""Django's own test suite on MariaDB/MySQL (mysqlclient); see settings_common for the environment."""

from __future__ import annotations

from bench.django_suite_support.settings_common import (  # noqa: F401 - the settings Django reads
    PASSWORD_HASHERS,
    SECRET_KEY,
    SERVERHOOKS,
    TEST_RUNNER,
    USE_TZ,
    databases,
)

DATABASES = databases("django.db.backends.mysql", 3306, "root", {"TEST": {"CHARSET": "utf8mb4"}})
