"""Small helpers shared by the page views."""

from __future__ import annotations

from django.contrib import messages
from django.forms import Form
from django.http import HttpRequest


def saved(request: HttpRequest, form: Form, text: str) -> None:
    """Tell the user what was created, or that it is stored but could not be queued (and why)."""
    error = getattr(form, "queue_error", None)
    if error:
        messages.error(request, f"saved, but not started: {error}")
    else:
        messages.success(request, text)
