"""The JSON API: everything the pages do, for scripts. Documented by ``webapp.openapi`` (/api/openapi.json).

Authentication: the browser session (CSRF token on unsafe methods) or HTTP Basic with a Django user
(``webapp.permissions.api_view``). Objects of other users answer 404. Errors are ``{"error": "..."}``
(400 with ``"fields": {name: [messages]}`` for validation errors). Creating things goes through the same
forms as the pages (``webapp.forms``), so the rules are the same; bodies are JSON, uploads multipart.
"""

from __future__ import annotations

import json
from typing import Any

from django.forms import Form, JSONField
from django.http import HttpRequest, HttpResponse, JsonResponse, QueryDict
from django.urls import reverse

from webapp import catalog
from webapp.forms import (
    BenchmarkForm,
    DatasetUploadForm,
    ModelUploadForm,
    RunForm,
    TargetForm,
    TrainBaselineForm,
    ZooModelForm,
)
from webapp.models import Benchmark, Dataset, Episode, Run, RunArtifact, RunLog, Target, UploadedModel
from webapp.openapi import schema
from webapp.permissions import api_error, api_view, can_change, get_visible_or_404, visible
from webapp.views import runinfo
from webapp.views.files import open_artifact
from webapp.views.runs import resume_refusal

MAX_PAGE = 1000
MAX_EPISODES_PAGE = 5000


# --- helpers ----------------------------------------------------------------------------------------------


def _body(request: HttpRequest) -> dict[str, Any] | QueryDict | None:
    """The request's data: parsed JSON, or the form fields of a multipart/urlencoded body; None if bad JSON."""
    ctype = request.META.get("CONTENT_TYPE", "")
    if ctype.startswith("application/json"):
        try:
            data = json.loads(request.body or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        return data if isinstance(data, dict) else None
    return request.POST


def _bind(form_cls: type[Form], request: HttpRequest, data: Any, **kwargs: Any) -> Form:
    """Bind a page form to API data: absent fields take the form's defaults (as the page pre-fills them),
    and JSON values are turned into what an HTML form would send."""
    probe = form_cls(user=request.user, **kwargs)
    merged: dict[str, Any] = {}
    for name, field in probe.fields.items():
        if "__" in name:  # the page's per-agent fields: the API sends agent_config instead
            continue
        initial = probe.get_initial_for_field(field, name)
        if initial is not None and not (isinstance(initial, (list, tuple)) and not initial):
            merged[name] = getattr(initial, "pk", initial)
    if isinstance(data, QueryDict):
        bound_data: Any = data.copy()
        for key, value in merged.items():
            if key not in bound_data:
                if isinstance(value, (list, tuple)):
                    bound_data.setlist(key, [str(v) for v in value])
                else:
                    bound_data[key] = value
    else:
        bound_data = {**merged, **data}
        for name, field in probe.fields.items():
            if isinstance(field, JSONField) and name in bound_data and not isinstance(bound_data[name], str):
                bound_data[name] = json.dumps(bound_data[name])
    return form_cls(bound_data, request.FILES, user=request.user, **kwargs)


def _invalid(form: Form) -> JsonResponse:
    fields = {k: [str(m) for m in v] for k, v in form.errors.items()}
    first = next(iter(fields.items()), ("", [""]))
    where = "" if first[0] == "__all__" else f"{first[0]}: "
    return api_error(400, f"invalid input — {where}{first[1][0]}", fields=fields)


def _page(request: HttpRequest, qs, serialize) -> JsonResponse:
    """A list response with ``limit`` / ``offset`` paging: {count, results}."""
    try:
        limit = max(1, min(MAX_PAGE, int(request.GET.get("limit", 100))))
        offset = max(0, int(request.GET.get("offset", 0)))
    except ValueError:
        return api_error(400, "limit and offset must be integers")
    total = qs.count()
    items = [serialize(o) for o in qs[offset : offset + limit]]
    return JsonResponse({"count": total, "limit": limit, "offset": offset, "results": items})


def _iso(value) -> str | None:
    return value.isoformat() if value else None


# --- serializers ------------------------------------------------------------------------------------------


def model_json(m: UploadedModel, full: bool = False) -> dict[str, Any]:
    """A model as the API returns it (``full`` adds the per-layer inspection)."""
    insp = m.inspection or {}
    d = {
        "id": m.pk,
        "name": m.name,
        "owner": m.owner.get_username(),
        "kind": m.kind,
        "zoo_arch": m.zoo_arch or None,
        "status": m.status,
        "error": m.error or None,
        "size_bytes": m.size_bytes,
        "input_shape": insp.get("input_shape") or m.input_shape,
        "num_classes": insp.get("num_classes") or m.num_classes,
        "summary": insp.get("summary"),
        "progress": m.progress,
        "train_config": m.train_config,
        "created_at": _iso(m.created_at),
        "url": reverse("ui:model", args=[m.pk]),
    }
    if full:
        d["layers"] = insp.get("layers")
        d["groups"] = insp.get("groups")
    return d


def dataset_json(ds: Dataset) -> dict[str, Any]:
    """A dataset with its metadata."""
    return {
        "id": ds.pk,
        "name": ds.name,
        "owner": ds.owner.get_username() if ds.owner_id else None,
        "kind": ds.kind,
        "status": ds.status,
        "error": ds.error or None,
        "size_bytes": ds.size_bytes,
        "meta": ds.meta,
        "created_at": _iso(ds.created_at),
    }


def target_json(t: Target) -> dict[str, Any]:
    """A hardware target: backend, settings, health."""
    return {
        "name": t.name,
        "id": t.pk,
        "owner": t.owner.get_username() if t.owner_id else None,
        "builtin": t.is_builtin,
        "backend": t.backend,
        "settings": t.settings,
        "round_to": t.round_to or None,  # None: the backend's own, decided by the engine
        "description": t.description,
        "health": t.health,
        "created_at": _iso(t.created_at),
    }


def benchmark_json(b: Benchmark) -> dict[str, Any]:
    """A stand-alone measurement and its result (``Measurement.to_dict()``)."""
    return {
        "id": b.pk,
        "model": b.model_id,
        "target": b.target.name,
        "params": b.params,
        "status": b.status,
        "result": b.result,
        "error": b.error or None,
        "created_at": _iso(b.created_at),
        "finished_at": _iso(b.finished_at),
    }


def artifact_json(a: RunArtifact) -> dict[str, Any]:
    """A run's file: kind, size, how to load it, and its download URL."""
    return {
        "id": a.pk,
        "kind": a.kind,
        "name": a.filename,
        "bytes": a.bytes,
        "note": a.note,
        "how_to_load": a.how_to_load,
        "download": reverse("api:run-artifact", args=[a.run_id, a.pk]),
    }


def run_json(r: Run, full: bool = False) -> dict[str, Any]:
    """A run: status and progress (``Run.status_event``), its inputs, and the headline figures.
    ``full`` adds the stored configuration, the engine's start info and the final report."""
    d = r.status_event()
    d.update(
        owner=r.owner.get_username(),
        agent=r.agent,
        model=r.model_id,
        dataset=r.dataset_id,
        target=r.target.name,
        figures=runinfo.summary_figures(r),
        url=reverse("ui:run", args=[r.pk]),
    )
    if full:
        d.update(config=r.config, start_info=r.start_info, summary=r.summary)
    return d


# --- views ------------------------------------------------------------------------------------------------


@api_view(("GET",))
def openapi_json(request: HttpRequest) -> JsonResponse:
    """The OpenAPI 3 schema of this API."""
    return JsonResponse(schema())


@api_view(("GET",))
def me(request: HttpRequest) -> JsonResponse:
    """Who the request is authenticated as."""
    u = request.user
    return JsonResponse({"username": u.get_username(), "id": u.pk, "is_staff": u.is_staff})


@api_view(("GET",))
def agents(request: HttpRequest) -> JsonResponse:
    """The search agents with their settings, zoo architectures, layouts and target backends."""
    return JsonResponse(catalog.catalog())


@api_view(("GET", "POST"))
def models(request: HttpRequest) -> HttpResponse:
    """GET: the user's models. POST: add one — multipart ``file`` (.pt2); or JSON/form ``kind=zoo``
    (zoo_arch, num_classes, input_shape, optional multipart weights_file); or ``kind=train`` (zoo_arch,
    dataset, epochs, lr, batch_size, seed)."""
    if request.method == "GET":
        return _page(request, visible(UploadedModel, request.user).select_related("owner"), model_json)
    data = _body(request)
    if data is None:
        return api_error(400, "the body must be a JSON object")
    kind = data.get("kind") or ("pt2" if "file" in request.FILES else "zoo")
    form_cls = {"pt2": ModelUploadForm, "zoo": ZooModelForm, "train": TrainBaselineForm}.get(kind)
    if form_cls is None:
        return api_error(400, f"kind {kind!r} is unknown: use pt2 (upload), zoo or train")
    form = _bind(form_cls, request, data)
    if not form.is_valid():
        return _invalid(form)
    return JsonResponse(model_json(form.save()), status=201)


@api_view(("GET", "DELETE"))
def model(request: HttpRequest, pk: int) -> HttpResponse:
    """GET: a model with its layer table. DELETE: remove it (and its runs)."""
    m = get_visible_or_404(UploadedModel, request.user, pk=pk)
    if request.method == "DELETE":
        if not can_change(m, request.user):
            return api_error(404, "no model matches")
        refused = m.delete_everything()
        if refused:
            return api_error(409, refused)
        return HttpResponse(status=204)
    return JsonResponse(model_json(m, full=True))


@api_view(("GET", "POST"))
def datasets(request: HttpRequest) -> HttpResponse:
    """GET: built-in and own datasets. POST (multipart): ``file`` + ``kind`` (npz | cifar | imagezip) + name."""
    if request.method == "GET":
        return _page(request, visible(Dataset, request.user).select_related("owner"), dataset_json)
    data = _body(request)
    if data is None:
        return api_error(400, "the body must be multipart with a file")
    form = _bind(DatasetUploadForm, request, data)
    if not form.is_valid():
        return _invalid(form)
    return JsonResponse(dataset_json(form.save()), status=201)


@api_view(("GET",))
def dataset(request: HttpRequest, pk: int) -> JsonResponse:
    """One dataset."""
    return JsonResponse(dataset_json(get_visible_or_404(Dataset, request.user, pk=pk)))


@api_view(("GET", "POST"))
def targets(request: HttpRequest) -> HttpResponse:
    """GET: targets. POST (JSON): name, backend, tvm_target (object), rpc_host/rpc_port/rpc_key, threads,
    round_to, description; the health check (full validation by the engine) is queued."""
    if request.method == "GET":
        return _page(request, visible(Target, request.user).select_related("owner"), target_json)
    data = _body(request)
    if data is None:
        return api_error(400, "the body must be a JSON object")
    if isinstance(data, dict) and isinstance(data.get("tvm_target"), dict):
        data = {**data, "tvm_target": json.dumps(data["tvm_target"])}
    form = _bind(TargetForm, request, data)
    if not form.is_valid():
        return _invalid(form)
    return JsonResponse(target_json(form.save()), status=201)


@api_view(("GET",))
def target(request: HttpRequest, name: str) -> JsonResponse:
    """One target with its health."""
    return JsonResponse(target_json(get_visible_or_404(Target, request.user, name=name)))


@api_view(("POST",))
def target_check(request: HttpRequest, name: str) -> JsonResponse:
    """Queue a health check; poll the target for ``health.checked_at`` to change."""
    t = get_visible_or_404(Target, request.user, name=name)
    from workers import dispatch

    try:
        dispatch.enqueue_check_target(t)
    except dispatch.BrokerUnavailable as exc:
        return api_error(503, str(exc))
    return JsonResponse({"queued": True, "target": t.name}, status=202)


@api_view(("GET", "POST"))
def benchmarks(request: HttpRequest) -> HttpResponse:
    """GET: the user's measurements. POST (JSON): model (id), target (name), repeats, warmup."""
    if request.method == "GET":
        qs = visible(Benchmark, request.user).select_related("target")
        return _page(request, qs, benchmark_json)
    data = _body(request)
    if data is None:
        return api_error(400, "the body must be a JSON object")
    form = _bind(BenchmarkForm, request, data)
    if not form.is_valid():
        return _invalid(form)
    return JsonResponse(benchmark_json(form.save()), status=201)


@api_view(("GET",))
def benchmark(request: HttpRequest, pk: int) -> JsonResponse:
    """One measurement."""
    return JsonResponse(benchmark_json(get_visible_or_404(Benchmark, request.user, pk=pk)))


@api_view(("GET", "POST"))
def runs(request: HttpRequest) -> HttpResponse:
    """GET: runs (``?status=``). POST (JSON): model (id), dataset (id), target (name), agent, objective,
    budget, reward, beta, rho, episodes, seed, agent_config {...} and the other SearchConfig settings;
    absent ones take the defaults. The search is queued; the response is the new run (201)."""
    if request.method == "GET":
        qs = visible(Run, request.user).select_related("owner", "target", "model")
        status = request.GET.get("status")
        if status:
            qs = qs.filter(status__in=status.split(","))
        return _page(request, qs, run_json)
    data = _body(request)
    if data is None:
        return api_error(400, "the body must be a JSON object")
    form = _bind(RunForm, request, data)
    if not form.is_valid():
        return _invalid(form)
    return JsonResponse(run_json(form.save(), full=True), status=201)


@api_view(("GET",))
def run(request: HttpRequest, pk: int) -> JsonResponse:
    """A run with its configuration, figures, start info and final report."""
    r = get_visible_or_404(Run, request.user, pk=pk)
    return JsonResponse(run_json(r, full=True))


@api_view(("GET",))
def run_episodes(request: HttpRequest, pk: int) -> JsonResponse:
    """Episodes with ``number > since`` in order (``limit`` at most 5000 per call; ``full=1`` adds actions
    and timings). ``overview=1`` returns the whole run downsampled for plotting instead."""
    r = get_visible_or_404(Run, request.user, pk=pk)
    if request.GET.get("overview") in ("1", "true"):
        episodes, downsampled, total = runinfo.overview_episodes(r)
        return JsonResponse(
            {"episodes": episodes, "downsampled": downsampled, "total": total, "run": r.status_event()}
        )
    try:
        since = int(request.GET.get("since", 0))
        limit = max(1, min(MAX_EPISODES_PAGE, int(request.GET.get("limit", MAX_EPISODES_PAGE))))
    except ValueError:
        return api_error(400, "since and limit must be integers")
    full = request.GET.get("full") in ("1", "true")
    qs = Episode.objects.filter(run=r, number__gt=since).order_by("number")[: limit + 1]
    rows = list(qs)
    more = len(rows) > limit
    items = [e.to_event(full=full) for e in rows[:limit]]
    last = items[-1]["number"] if items else since
    return JsonResponse({"episodes": items, "last": last, "more": more, "run": r.status_event()})


@api_view(("GET",))
def run_log(request: HttpRequest, pk: int) -> JsonResponse:
    """Log lines with ``seq > since`` (at most 1000)."""
    r = get_visible_or_404(Run, request.user, pk=pk)
    try:
        since = int(request.GET.get("since", 0))
    except ValueError:
        return api_error(400, "since must be an integer")
    lines = [ln.to_event() for ln in RunLog.objects.filter(run=r, seq__gt=since).order_by("seq")[:1000]]
    return JsonResponse({"lines": lines, "last": lines[-1]["seq"] if lines else since})


@api_view(("POST",))
def run_cancel(request: HttpRequest, pk: int) -> JsonResponse:
    """Ask the run to stop (between episodes; its checkpoint stays for a resume)."""
    r = get_visible_or_404(Run, request.user, pk=pk)
    if not can_change(r, request.user):
        return api_error(404, "no run matches")
    if not r.is_active:
        return api_error(409, f"the run is {r.status}; only queued or running runs can be cancelled")
    from workers import dispatch

    dispatch.request_cancel(r)
    r.refresh_from_db()
    return JsonResponse(run_json(r), status=202)


@api_view(("POST",))
def run_resume(request: HttpRequest, pk: int) -> JsonResponse:
    """Requeue a cancelled or failed run from its last checkpoint."""
    r = get_visible_or_404(Run, request.user, pk=pk)
    if not can_change(r, request.user):
        return api_error(404, "no run matches")
    refusal = resume_refusal(r)
    if refusal:
        return api_error(409, refusal)
    from workers import dispatch

    try:
        dispatch.resume_run(r)
    except dispatch.BrokerUnavailable as exc:
        return api_error(503, str(exc))
    r.refresh_from_db()
    return JsonResponse(run_json(r), status=202)


@api_view(("GET",))
def run_artifacts(request: HttpRequest, pk: int) -> JsonResponse:
    """The run's files with sizes, notes and download URLs."""
    r = get_visible_or_404(Run, request.user, pk=pk)
    return JsonResponse({"artifacts": [artifact_json(a) for a in r.artifacts.order_by("kind", "path")]})


@api_view(("GET",))
def run_artifact(request: HttpRequest, pk: int, aid: int) -> HttpResponse:
    """Download one of the run's files."""
    return open_artifact(request, pk, aid)
