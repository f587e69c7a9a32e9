"""Hardware targets: list and add, a target's health and measurements, "check now" and "measure now"."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_POST

from webapp.forms import BenchmarkForm, TargetForm
from webapp.models import Benchmark, Run, Target
from webapp.permissions import can_change, get_visible_or_404, visible
from webapp.views.common import saved


@login_required
def target_list(request: HttpRequest) -> HttpResponse:
    """GET: targets (built-ins and the user's) and the add form; POST: add one and check its health."""
    form = TargetForm(user=request.user)
    if request.method == "POST":
        form = TargetForm(request.POST, user=request.user)
        if form.is_valid():
            t = form.save()
            saved(request, form, f"{t.name}: added — checking that it is reachable.")
            return redirect("ui:target", name=t.name)
    targets = visible(Target, request.user).select_related("owner")
    return render(request, "targets/list.html", {"targets": targets, "form": form})


@login_required
def target_detail(request: HttpRequest, name: str) -> HttpResponse:
    """A target's settings, health, recent measurements of the user's models, and "measure now"."""
    t = get_visible_or_404(Target, request.user, name=name)
    bench_form = BenchmarkForm(user=request.user, initial={"target": t.name})
    benchmarks = visible(Benchmark, request.user).filter(target=t).select_related("model")[:20]
    context = {
        "t": t,
        "bench_form": bench_form,
        "benchmarks": benchmarks,
        "can_change": can_change(t, request.user),
        "runs": visible(Run, request.user).filter(target=t)[:10],
    }
    return render(request, "targets/detail.html", context)


@login_required
@require_POST
def target_check(request: HttpRequest, name: str) -> HttpResponse:
    """Queue a health check of the target (anyone who can see it may ask)."""
    t = get_visible_or_404(Target, request.user, name=name)
    from workers import dispatch

    try:
        dispatch.enqueue_check_target(t)
    except dispatch.BrokerUnavailable as exc:
        messages.error(request, str(exc))
    else:
        messages.info(request, f"checking {t.name} …")
    return redirect("ui:target", name=t.name)


@login_required
@require_POST
def target_delete(request: HttpRequest, name: str) -> HttpResponse:
    """Delete a target the user owns, unless runs were measured on it."""
    t = get_visible_or_404(Target, request.user, name=name)
    if t.is_builtin or not can_change(t, request.user):
        raise Http404("no target matches")
    if t.runs.exists():
        messages.error(
            request, f"{t.name} has runs measured on it; it stays so their results keep their meaning"
        )
        return redirect("ui:target", name=t.name)
    t.delete()
    messages.success(request, f"deleted {name}")
    return redirect("ui:targets")


@login_required
@require_POST
def benchmark_new(request: HttpRequest) -> HttpResponse:
    """ "Measure now": queue a benchmark, then go back to the page that asked (or the benchmark's page)."""
    form = BenchmarkForm(request.POST, user=request.user)
    nxt = request.POST.get("next", "")
    back = nxt if url_has_allowed_host_and_scheme(nxt, allowed_hosts={request.get_host()}) else ""
    if not form.is_valid():
        for field, errs in form.errors.items():
            messages.error(request, f"{field}: {' '.join(errs)}" if field != "__all__" else " ".join(errs))
        return redirect(back or "ui:targets")
    b = form.save()
    saved(request, form, f"measuring {b.model.name} on {b.target.name} …")
    return redirect(back or reverse("ui:benchmark", args=[b.pk]))


@login_required
def benchmark_detail(request: HttpRequest, pk: int) -> HttpResponse:
    """One measurement: its status, then the timing statistics."""
    b = get_visible_or_404(Benchmark, request.user, pk=pk)
    return render(request, "targets/benchmark.html", {"b": b, "r": b.result or {}})
