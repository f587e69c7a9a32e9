"""Runs: the list, the new-run form, the live run page, cancel and resume, and episodes as CSV."""

from __future__ import annotations

import csv
import json
from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse, StreamingHttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_POST

from webapp import catalog
from webapp.forms import REWARD_HELP, RunForm, agent_field_name
from webapp.models import Dataset, Episode, Run, UploadedModel
from webapp.permissions import can_change, get_visible_or_404, visible
from webapp.views import runinfo

STATUS_FILTERS = ("active", "finished", "failed", "cancelled")
# Downloads in the order a user looks for them: the compressed model first, the records last.
ARTIFACT_KINDS = (
    "pt2",
    "onnx",
    "int8.onnx",
    "tvm",
    "report",
    "policy",
    "episodes.csv",
    "episodes.jsonl",
    "log",
)
ARTIFACT_ORDER = {k: i for i, k in enumerate(ARTIFACT_KINDS)}


@login_required
def run_list(request: HttpRequest) -> HttpResponse:
    """All runs of the user (staff: everyone's), filterable by status; pick some to compare."""
    runs = visible(Run, request.user).select_related("model", "dataset", "target", "owner")
    status = request.GET.get("status", "")
    if status == "active":
        runs = runs.filter(status__in=Run.ACTIVE)
    elif status in STATUS_FILTERS:
        runs = runs.filter(status=status)
    return render(
        request, "runs/list.html", {"runs": runs[:500], "status": status, "filters": STATUS_FILTERS}
    )


@login_required
def run_new(request: HttpRequest) -> HttpResponse:
    """GET: the form (``?model=<id>`` preselects a model, ``?from=<run id>`` copies a run's settings);
    POST: create the run and open its live page."""
    if request.method == "POST":
        form = RunForm(request.POST, user=request.user)
        if form.is_valid():
            run = form.save()
            if form.queue_error:
                messages.error(request, f"the run is saved but not started: {form.queue_error}")
            return redirect("ui:run", pk=run.pk)
    else:
        form = RunForm(user=request.user, initial=_initial(request))
    context = {
        "form": form,
        "catalog": catalog.catalog(),
        "reward_help": REWARD_HELP,
        "has_models": visible(UploadedModel, request.user).filter(status="ready").exists(),
    }
    return render(request, "runs/new.html", context)


def _initial(request: HttpRequest) -> dict[str, Any]:
    """Initial values from the query string: a model to preselect, or a run whose settings to copy."""
    builtin = Dataset.objects.filter(kind="builtin", name="digits").first()
    initial: dict[str, Any] = {"dataset": builtin.pk if builtin else None}
    if request.GET.get("model", "").isdigit():
        initial["model"] = int(request.GET["model"])
    if request.GET.get("from", "").isdigit():
        src = visible(Run, request.user).filter(pk=int(request.GET["from"])).first()
        if src:
            initial.update(copied_settings(src))
    return initial


# the run form's fields that take a stored config's value as it is
_COPIED = (
    "objective",
    "budget",
    "reward",
    "episodes",
    "seed",
    "val_samples",
    "calib_samples",
    "round_to",
    "top_k",
    "device_check_rounds",
    "fine_tune_epochs",
    "fine_tune_augment",
    "checkpoint_every",
    "min_keep",
    "min_bits",
    "max_bits",
    "tune_steps",
    "budget_mode",
)
# yes/no switches the form holds as "true"/"false"
_SWITCHES = ("train_top_up", "float_bits", "free_precision", "reconstruct")


def copied_settings(src: Run) -> dict[str, Any]:
    """The run form's initial values that repeat ``src``: every setting of its stored config, its agent's
    settings included ("Run again…" is the same experiment unless the user changes something)."""
    cfg = dict(src.config or {})
    out: dict[str, Any] = {k: cfg[k] for k in _COPIED if cfg.get(k) is not None}
    out.update({k: "true" if cfg[k] else "false" for k in _SWITCHES if k in cfg})
    if cfg.get("enforce_budget") is not None:
        out["enforce_budget"] = "true" if cfg["enforce_budget"] else "false"
    if cfg.get("layout"):
        out["layout"] = cfg["layout"]
    if cfg.get("export_formats"):
        out["export_formats"] = list(cfg["export_formats"])
    out.update({k: v for k, v in (cfg.get("reward_params") or {}).items() if k in ("beta", "rho")})
    out.update(model=src.model_id, dataset=src.dataset_id, target=src.target.name, agent=src.agent)
    fields = {p["name"] for p in (catalog.agent_info(src.agent) or {"params": []})["params"]}
    rest = {}
    for key, value in (cfg.get("agent_config") or {}).items():
        if key in fields:
            out[agent_field_name(src.agent, key)] = value
        else:  # a setting the page has no field for (set through the API): kept in the JSON box
            rest[key] = value
    if rest:
        out["agent_config"] = rest
    return out


@login_required
def run_detail(request: HttpRequest, pk: int) -> HttpResponse:
    """The live run page. The charts fill from the websocket (history, then increments); the server renders
    the status, best policy, results and downloads so the page is useful before any script runs."""
    run = get_visible_or_404(Run, request.user, pk=pk)
    names = runinfo.layer_names(run)
    cost_field, cost_label = runinfo.cost_axis(run)
    best_rows = runinfo.policy_rows((run.best or {}).get("policy"), names, run.model.inspection)
    page = {
        "id": run.pk,
        "ws": f"/ws/runs/{run.pk}/",
        "episodes_api": reverse("api:run-episodes", args=[run.pk]),
        "run_api": reverse("api:run", args=[run.pk]),
        "layers": names,
        "cost_field": cost_field,
        "cost_label": cost_label,
        "objective": (run.config or {}).get("objective", "latency"),
        "budget": (run.config or {}).get("budget"),
        "has_latency": run.target.backend != "analytic",
        "run": run.status_event(),
        "channels": {
            r["name"]: r.get("out_channels")
            for r in (run.model.inspection or {}).get("layers") or []
            if r.get("name")
        },
    }
    context = {
        "run": run,
        "page": page,
        "fig": runinfo.summary_figures(run),
        "best_rows": best_rows,
        "artifacts": sorted(run.artifacts.all(), key=lambda a: (ARTIFACT_ORDER.get(a.kind, 99), a.path)),
        "config_rows": runinfo.config_table([run]),
        "can_change": can_change(run, request.user),
        "can_resume": can_resume(run),
        "report": run.summary or {},
    }
    return render(request, "runs/detail.html", context)


def resume_refusal(run: Run) -> str | None:
    """Why ``run`` cannot be resumed (the page's message and the API's 409), or None when it can: a cancelled or
    failed run with a checkpoint (or with no episode yet) can be requeued, not one that failed on its input (the
    model, dataset or settings), which would fail the same way again."""
    if run.status == "failed" and run.error_kind == "input":
        return (
            "this run failed on its model, dataset or settings and would fail the same way again: "
            "start a new run (Run again… copies its settings)"
        )
    if run.status not in ("cancelled", "failed") or not (
        run.checkpoint_episode is not None
        or (run.out_path / "checkpoint.pt").exists()
        or run.episodes_done == 0
    ):
        return f"a {run.status} run without a checkpoint cannot be resumed; start a new run"
    return None


def can_resume(run: Run) -> bool:
    """Whether ``run`` can be resumed (``resume_refusal``)."""
    return resume_refusal(run) is None


@login_required
@require_POST
def run_cancel(request: HttpRequest, pk: int) -> HttpResponse:
    """Ask the worker to stop the run (it stops between episodes and keeps its checkpoint)."""
    run = get_visible_or_404(Run, request.user, pk=pk)
    if not can_change(run, request.user):
        raise Http404("no run matches")
    if not run.is_active:
        messages.warning(request, f"the run is {run.status}; nothing to cancel")
        return redirect("ui:run", pk=run.pk)
    from workers import dispatch

    dispatch.request_cancel(run)  # a database flag: works while the task queue is down too
    messages.info(request, "cancel requested: the run stops after the current episode")
    return redirect("ui:run", pk=run.pk)


@login_required
@require_POST
def run_resume(request: HttpRequest, pk: int) -> HttpResponse:
    """Requeue a cancelled or failed run; it continues from its last checkpoint."""
    run = get_visible_or_404(Run, request.user, pk=pk)
    if not can_change(run, request.user):
        raise Http404("no run matches")
    refusal = resume_refusal(run)
    if refusal:
        messages.error(request, refusal)
        return redirect("ui:run", pk=run.pk)
    from workers import dispatch

    try:
        dispatch.resume_run(run)
    except dispatch.BrokerUnavailable as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, "resumed from the last checkpoint")
    return redirect("ui:run", pk=run.pk)


class _Echo:
    """A file-like object whose write returns the line (csv.writer into a streaming response)."""

    def write(self, value: str) -> str:
        return value


CSV_FIELDS = (
    "number",
    "stage",
    "reward",
    "accuracy",
    "latency_ms",
    "macs",
    "bops",
    "params",
    "bytes",
    "cost_ratio",
    "meets_budget",
    "is_best",
    "wall_time_s",
)


@login_required
def run_episodes_csv(request: HttpRequest, pk: int) -> StreamingHttpResponse:
    """Every episode of the run as CSV (one row per episode; the policy as JSON in the last column)."""
    run = get_visible_or_404(Run, request.user, pk=pk)
    writer = csv.writer(_Echo())

    def rows():
        yield writer.writerow((*CSV_FIELDS, "policy"))
        qs = Episode.objects.filter(run=run).order_by("number").values_list(*CSV_FIELDS, "policy")
        for row in qs.iterator(chunk_size=500):
            yield writer.writerow((*row[:-1], json.dumps(row[-1], separators=(",", ":"))))

    resp = StreamingHttpResponse(rows(), content_type="text/csv")
    resp["Content-Disposition"] = f'attachment; filename="run-{run.pk}-episodes.csv"'
    return resp
