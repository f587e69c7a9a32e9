"""The overview page: what is running, recent runs, and the user's inputs at a glance."""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from webapp.models import Dataset, Run, Target, UploadedModel
from webapp.permissions import visible


@login_required
def home(request: HttpRequest) -> HttpResponse:
    """Counts, active runs and the latest runs and models of the signed-in user (everything for staff)."""
    runs = visible(Run, request.user).select_related("model", "target", "dataset")
    context = {
        "active_runs": runs.filter(status__in=Run.ACTIVE)[:10],
        "recent_runs": runs[:8],
        "models": visible(UploadedModel, request.user)[:6],
        "counts": {
            "runs": runs.count(),
            "finished": runs.filter(status="finished").count(),
            "models": visible(UploadedModel, request.user).count(),
            "datasets": visible(Dataset, request.user).count(),
            "targets": visible(Target, request.user).count(),
        },
    }
    return render(request, "home.html", context)
