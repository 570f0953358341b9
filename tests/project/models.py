from __future__ import annotations

from django.db import models


class Hit(models.Model):
    """The table tests/project/schema.py creates (unmanaged: no migrations needed)."""

    marker: models.CharField[str, str] = models.CharField(max_length=64)
    pid: models.IntegerField[int, int] = models.IntegerField()

    class Meta:
        managed = False
        db_table = "sh_hit"
