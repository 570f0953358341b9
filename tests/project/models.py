from django.db import models


class Hit(models.Model):
    """The table tests/project/schema.py creates (unmanaged: no migrations needed)."""

    marker = models.CharField(max_length=64)
    pid = models.IntegerField()

    class Meta:
        managed = False
        db_table = "sh_hit"
