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
        "axis_notes": axis_notes(runs, series),
        "runs": runs,
        "candidates": candidates,
        "picked": ids,
        "series": series,
        "summary_rows": rows,
        "any_partial": any(not row["fig"]["accuracy_final"] for row in rows),
        "config_rows": runinfo.config_table(runs),
    }
    return render(request, "runs/compare.html", context)


def axis_notes(runs: list[Run], series: list[dict]) -> list[str]:
    """Warnings about what shares an axis but does not compare: runs that optimise different costs, latencies
    on different hardware, different models."""
    notes = []
    objectives = sorted({(r.config or {}).get("objective", "latency") for r in runs})
    if len(objectives) > 1:
        notes.append(
            f"These runs optimise different costs ({', '.join(objectives)}): the cost charts show each run's cost as "
            "a fraction of its own original, and a fraction of one cost does not measure the same thing as a "
            "fraction of another."
        )
    targets = sorted({r.target.name for r in runs})
    if all(s["cost_field"] == "latency_ms" for s in series) and len(targets) > 1:
        notes.append(
            f"Latencies were measured on different targets ({', '.join(targets)}): the latency charts put "
            "different hardware side by side."
        )
    models = sorted({r.model.name for r in runs})
    if len(models) > 1:
        notes.append(
            f"The runs compress different models ({', '.join(models)}): accuracies and costs start from "
            "different originals."
        )
    return notes


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
