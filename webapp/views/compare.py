"""Compare runs: overlaid curves, settings side by side, best policies as heatmaps, Pareto fronts, summary."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from webapp.models import Run
from webapp.permissions import visible
from webapp.views import runinfo

MAX_RUNS = 8


def parse_ids(request: HttpRequest) -> list[int]:
    """Run ids from ``?ids=1&ids=2`` or ``?ids=1,2`` (order kept, duplicates dropped)."""
    out: list[int] = []
    for raw in request.GET.getlist("ids"):
        for part in raw.split(","):
            part = part.strip()
            if part.isdigit() and int(part) not in out:
                out.append(int(part))
    return out[:MAX_RUNS]


@login_required
def compare(request: HttpRequest) -> HttpResponse:
    """With two or more visible run ids: the comparison; otherwise the picker. Ids the user may not see
    are ignored as if they did not exist."""
    ids = parse_ids(request)
    runs_by_id = {
        r.pk: r
        for r in visible(Run, request.user).filter(pk__in=ids).select_related("model", "dataset", "target")
    }
    runs = [runs_by_id[i] for i in ids if i in runs_by_id]
    missing = [i for i in ids if i not in runs_by_id]
    if missing:  # not there, or not the user's to see: the same answer for both
        messages.warning(
            request,
            f"no run {', '.join(f'#{i}' for i in missing)} to compare: it does not exist or is not yours to see",
        )
    candidates = visible(Run, request.user).select_related("model", "target")[:200]
    if len(runs) < 2:
        return render(request, "runs/compare.html", {"runs": runs, "candidates": candidates, "picked": ids})
    series = []
    for r in runs:
        episodes, downsampled, total = runinfo.overview_episodes(r, runinfo.COMPARE_MAX)
        cost_field, cost_label = runinfo.cost_axis(r)
        series.append(
            {
                "id": r.pk,
                "name": str(r),
                "status": r.status,
                "layers": runinfo.layer_names(r),
                "cost_field": cost_field,
                "cost_label": cost_label,
                "episodes": [_slim(e) for e in episodes],
                "downsampled": downsampled,
                "total": total,
                "best_policy": (r.best or {}).get("policy") or {},
            }
        )
    rows = [{"run": r, "fig": runinfo.summary_figures(r)} for r in runs]
    context = {
        "runs": runs,
        "candidates": candidates,
        "picked": ids,
        "series": series,
        "summary_rows": rows,
        "any_partial": any(not row["fig"]["accuracy_final"] for row in rows),
        "config_rows": runinfo.config_table(runs),
    }
    return render(request, "runs/compare.html", context)


def _slim(e: dict) -> dict:
    """What the comparison charts draw of an episode (policies are only needed for the best one)."""
    keys = (
        "number",
        "reward",
        "accuracy",
        "latency_ms",
        "cost_ratio",
        "bytes",
        "macs",
        "is_best",
        "meets_budget",
    )
    return {k: e.get(k) for k in keys}
