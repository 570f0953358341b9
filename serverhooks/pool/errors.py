"""The pool's error. Importing it imports `django.db.utils` (it is an OperationalError, so
views and Django's own handling treat it as one), but neither gevent nor anything else."""

from __future__ import annotations

from django.db.utils import OperationalError

__all__ = ["PoolTimeout"]


class PoolTimeout(OperationalError):
    """No pooled connection became free in time; the message names the settings to change."""
