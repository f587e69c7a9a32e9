"""Datasets: the built-in digits and the user's uploads, with their metadata."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from webapp.forms import DatasetUploadForm
from webapp.models import Dataset
from webapp.permissions import can_change, get_visible_or_404, visible
from webapp.views.common import saved


@login_required
def dataset_list(request: HttpRequest) -> HttpResponse:
    """GET: datasets and the upload form; POST: upload one (its metadata is read by a worker)."""
    form = DatasetUploadForm(user=request.user)
    if request.method == "POST":
        form = DatasetUploadForm(request.POST, request.FILES, user=request.user)
        if form.is_valid():
            ds = form.save()
            saved(request, form, f"{ds.name}: uploaded — reading its metadata.")
            return redirect("ui:dataset", pk=ds.pk)
    datasets = visible(Dataset, request.user).select_related("owner")
    return render(request, "datasets/list.html", {"datasets": datasets, "form": form})


@login_required
def dataset_detail(request: HttpRequest, pk: int) -> HttpResponse:
    """A dataset's metadata: samples, classes (with counts), native input shape."""
    ds = get_visible_or_404(Dataset, request.user, pk=pk)
    meta = ds.meta or {}
    names = meta.get("class_names") or []
    counts = meta.get("class_counts") or []
    classes = [{"name": n, "count": counts[i] if i < len(counts) else None} for i, n in enumerate(names)]
    context = {"ds": ds, "meta": meta, "classes": classes, "can_change": can_change(ds, request.user)}
    return render(request, "datasets/detail.html", context)


@login_required
@require_POST
def dataset_delete(request: HttpRequest, pk: int) -> HttpResponse:
    """Delete an uploaded dataset the user owns (built-ins cannot be deleted here)."""
    ds = get_visible_or_404(Dataset, request.user, pk=pk)
    if ds.is_builtin or not can_change(ds, request.user):
        raise Http404("no dataset matches")
    if ds.runs.exists():
        messages.error(request, f"{ds.name} is used by runs; delete those first")
        return redirect("ui:dataset", pk=ds.pk)
    if ds.file:
        ds.file.delete(save=False)
    ds.delete()
    messages.success(request, "dataset deleted")
    return redirect("ui:datasets")
