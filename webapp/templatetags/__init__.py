"""Template filters and tags of the dashboard (``{% load ui %}``)."""
