"""Placeholder until the dashboard's URLs are written."""

urlpatterns: list = []
