"""Root URLconf: the admin, accounts (login/logout/password), the dashboard pages and the JSON API."""

from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("accounts/", include("django.contrib.auth.urls")),
    path("", include("webapp.api_urls")),
    path("", include("webapp.ui_urls")),
]
