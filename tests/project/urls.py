from django.urls import path

from tests.project import views

urlpatterns = [
    path("ping", views.ping),
    path("echo", views.echo),
    path("whoami", views.whoami),
    path("sleep", views.sleep),
]
