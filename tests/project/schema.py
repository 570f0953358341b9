"""`python -m tests.project.schema`: create the project's table in DATABASE_URL."""

from __future__ import annotations

import os

import django

DDL = {
    "mysql": "CREATE TABLE IF NOT EXISTS sh_hit (id BIGINT AUTO_INCREMENT PRIMARY KEY, "
    "marker VARCHAR(64) NOT NULL, pid INT NOT NULL)",
    "postgresql": "CREATE TABLE IF NOT EXISTS sh_hit (id BIGSERIAL PRIMARY KEY, marker VARCHAR(64) NOT NULL, "
    "pid INT NOT NULL)",
    "sqlite": "CREATE TABLE IF NOT EXISTS sh_hit (id INTEGER PRIMARY KEY AUTOINCREMENT, "
    "marker VARCHAR(64) NOT NULL, pid INT NOT NULL)",
}


def create_schema() -> None:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(DDL[connection.vendor])
    connection.close()


if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.project.settings")
    django.setup()
    create_schema()
