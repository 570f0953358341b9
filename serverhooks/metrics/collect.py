"""prometheus_client's MultiProcessCollector, made safe against a process being born or merged.

    from serverhooks.metrics.collect import MultiProcessCollector  # instead of prometheus_client's

prometheus_client creates each process's file before it sizes it, and its collector fails the
whole scrape on such a 0-byte file (prometheus/client_python#1199): with workers recycled often,
a scrape now and then meets one. This collector reads only files that hold a header.
serverhooks.metrics.django.metrics_view uses it; imported only by those who call it.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import multiprocess
from prometheus_client.metrics_core import Metric

from serverhooks.metrics import files

__all__ = ["MultiProcessCollector"]


class MultiProcessCollector(multiprocess.MultiProcessCollector):
    """The same merge, over the files a scrape can read (files.readable_files)."""

    def collect(self) -> Iterable[Metric]:
        return self.merge(files.readable_files(self._path), accumulate=True)  # type: ignore[no-untyped-call,no-any-return]
