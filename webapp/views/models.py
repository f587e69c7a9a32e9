"""Models: the list with the three ways to add one, and a model's page with its layer table."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from webapp.forms import BenchmarkForm, ModelUploadForm, TrainBaselineForm, ZooModelForm
from webapp.models import Dataset, UploadedModel
from webapp.permissions import can_change, get_visible_or_404, visible
from webapp.views.common import saved

ADD_FORMS = {"upload": ModelUploadForm, "zoo": ZooModelForm, "train": TrainBaselineForm}


@login_required
def model_list(request: HttpRequest) -> HttpResponse:
    """GET: the models and the add forms; POST ``?form=upload|zoo|train``: add one and open its page."""
    active = request.GET.get("form") or request.POST.get("form") or "upload"
    if active not in ADD_FORMS:
        active = "upload"
    forms = {key: cls(user=request.user) for key, cls in ADD_FORMS.items()}
    builtin = Dataset.objects.filter(kind="builtin", name="digits").first()
    if builtin is not None:  # the built-in dataset preselected, so the training form is ready to submit
        forms["train"].initial["dataset"] = builtin.pk
    if request.method == "POST":
        form = ADD_FORMS[active](request.POST, request.FILES, user=request.user)
        if form.is_valid():
            m = form.save()
            # not "queued": the inspection may already have ended (a refused file fails in a second) by the time
            # the model's page shows, and that page says where it stands
            saved(request, form, f"{m.name} added.")
            return redirect("ui:model", pk=m.pk)
        forms[active] = form
    models = visible(UploadedModel, request.user).select_related("owner")
    return render(request, "models/list.html", {"models": models, "forms": forms, "active": active})


@login_required
def model_detail(request: HttpRequest, pk: int) -> HttpResponse:
    """A model's status, summary, unsupported ops and per-layer table, with "measure now" and "new run"."""
    m = get_visible_or_404(UploadedModel, request.user, pk=pk)
    inspection = m.inspection or {}
    bench_form = BenchmarkForm(user=request.user, initial={"model": m.pk, "target": "local-ort"})
    context = {
        "m": m,
        "inspection": inspection,
        "summary": inspection.get("summary") or {},
        "layers": inspection.get("layers") or [],
        "unsupported": (inspection.get("summary") or {}).get("unsupported") or [],
        "bench_form": bench_form,
        "benchmarks": m.benchmarks.select_related("target").order_by("-created_at")[:10],
        "runs": m.runs.select_related("target").order_by("-created_at")[:10],
        "can_change": can_change(m, request.user),
    }
    return render(request, "models/detail.html", context)


@login_required
@require_POST
def model_delete(request: HttpRequest, pk: int) -> HttpResponse:
    """Delete a model (and its runs) the user owns."""
    m = get_visible_or_404(UploadedModel, request.user, pk=pk)
    if not can_change(m, request.user):
        raise Http404("no model matches")
    name = m.name
    refused = m.delete_everything()
    if refused:
        messages.error(request, refused)
        return redirect("ui:model", pk)
    messages.success(request, f"deleted {name}")
    return redirect("ui:models")
