from django.urls import path

from serverhooks.metrics.django import metrics_view
from tests.project import async_views, integrity_views, overload_views, pooler_views, views

urlpatterns = [
    path("ping", views.ping),
    path("echo", views.echo),
    path("whoami", views.whoami),
    path("sleep", views.sleep),
    path("leave-transaction-open", views.leave_transaction_open),
    path("raise-inside-atomic", views.raise_inside_atomic),
    path("begin-behind-djangos-back", views.begin_behind_djangos_back),
    path("set-time-zone", views.set_time_zone),
    path("state", views.state),
    path("spawn-and-forget", views.spawn_and_forget),
    path("count", views.count),
    path("cut", views.cut),
    path("dirty", views.dirty),
    path("listen", views.listen),
    path("notifications", views.notifications),
    path("async/orm", async_views.orm),
    path("async/stream", async_views.stream),
    path("async/slow", async_views.slow),
    path("async/background", async_views.background),
    path("metrics", metrics_view),
    path("integrity/write-then-refused", integrity_views.write_then_refused),
    path("integrity/release-inside-atomic", integrity_views.release_inside_atomic),
    path("pooler/iterate", pooler_views.iterate),
    path("pooler/prepared", pooler_views.prepared),
    path("overload/sleep", overload_views.sleep),
    path("overload/render", overload_views.render),
]
