"""App configuration for ``webapp``."""

from django.apps import AppConfig


class WebappConfig(AppConfig):
    """The studio's one Django app."""

    name = "webapp"
    verbose_name = "Compression studio"
    default_auto_field = "django.db.models.BigAutoField"
