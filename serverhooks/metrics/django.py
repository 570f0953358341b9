"""A /metrics view for projects that have no Prometheus endpoint yet.

    # urls.py
    from serverhooks.metrics.django import metrics_view
    urlpatterns += [path("metrics", metrics_view)]

It merges every process's multiprocess files (prometheus_client's MultiProcessCollector), so it
shows serverhooks' metrics and any other the project writes in multiprocess mode, and it never
reads while a worker merges dead workers' files (serverhooks.metrics.files). A project
that already has such an endpoint (django-prometheus, or its own view) needs none of this:
serverhooks' metrics are in the same files, hence already on that endpoint.

Importing this module imports neither prometheus_client nor django.db: only the view does,
when called.
"""

from __future__ import annotations

import os

from django.http import HttpRequest, HttpResponse

__all__ = ["metrics_view"]


def metrics_view(request: HttpRequest) -> HttpResponse:
    """Every process's metrics, in Prometheus' text format; 503 and the reason when there are none."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not path or not os.path.isdir(path):
        return HttpResponse(
            "PROMETHEUS_MULTIPROC_DIR is not set to a directory in the server's environment: "
            "no multiprocess metrics to show.\n",
            status=503,
            content_type="text/plain; charset=utf-8",
        )
    try:
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    except ImportError:
        return HttpResponse(
            "prometheus_client is not installed: pip install 'serverhooks[prometheus]'.\n",
            status=503,
            content_type="text/plain; charset=utf-8",
        )

    from serverhooks.metrics import files
    from serverhooks.metrics.collect import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path)  # type: ignore[no-untyped-call]
    # A worker merging dead workers' files holds this lock for a few milliseconds: reading
    # meanwhile could count those files twice (or fail on one that just went).
    with files.compaction_lock(path, exclusive=False, wait_seconds=2.0):
        body = generate_latest(registry)
    return HttpResponse(body, content_type=CONTENT_TYPE_LATEST)
