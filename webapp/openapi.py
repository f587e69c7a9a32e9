"""The OpenAPI 3.1 schema of the JSON API, served at ``/api/openapi.json``.

Request bodies are generated from the same forms that validate them (``webapp.forms``), so a new run
setting appears in the schema when it is added to ``RunForm``; responses are described by hand below.
``tests/test_api.py`` checks that every route in ``webapp.api_urls`` is documented and every documented
path exists.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from django import forms
from django.contrib.auth.models import AnonymousUser

from webapp.forms import (
    BenchmarkForm,
    DatasetUploadForm,
    ModelUploadForm,
    RunForm,
    TargetForm,
    TrainBaselineForm,
    ZooModelForm,
)
from webapp.models import Run

API_VERSION = "1.0"


def form_schema(form_cls: type[forms.Form], *, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """A JSON schema object for a form's fields: types, ranges, choices, defaults, help as description."""
    form = form_cls(user=AnonymousUser())
    props: dict[str, Any] = {}
    required = []
    for name, field in form.fields.items():
        if name in exclude or "__" in name:  # per-agent page fields; the API sends agent_config
            continue
        prop = _field_schema(field)
        initial = form.get_initial_for_field(field, name)
        if initial not in (None, "", []) and not hasattr(initial, "pk"):
            prop["default"] = list(initial) if isinstance(initial, tuple) else initial
        if field.help_text:
            prop["description"] = str(field.help_text)
        props[name] = prop
        if field.required and "default" not in prop:
            required.append(name)
    out: dict[str, Any] = {"type": "object", "properties": props}
    if required:
        out["required"] = required
    return out


def _field_schema(field: forms.Field) -> dict[str, Any]:
    if isinstance(field, forms.FileField):
        return {"type": "string", "format": "binary"}
    if isinstance(field, forms.ModelChoiceField):
        if field.to_field_name:
            return {"type": "string", "description": f"{field.queryset.model._meta.verbose_name} name"}
        return {"type": "integer", "description": f"{field.queryset.model._meta.verbose_name} id"}
    if isinstance(field, forms.MultipleChoiceField):
        return {"type": "array", "items": {"type": "string", "enum": [str(c[0]) for c in field.choices]}}
    if isinstance(field, forms.ChoiceField):
        values = [c[0] for c in field.choices if c[0] != ""]
        return {"type": "string", "enum": values}
    if isinstance(field, forms.BooleanField):
        return {"type": "boolean"}
    if isinstance(field, forms.JSONField):
        return {"type": "object"}
    if isinstance(field, (forms.IntegerField, forms.FloatField)):
        # FloatField subclasses IntegerField in Django: test for it first.
        prop: dict[str, Any] = {"type": "number" if isinstance(field, forms.FloatField) else "integer"}
        if field.min_value is not None:
            prop["minimum"] = field.min_value
        if field.max_value is not None:
            prop["maximum"] = field.max_value
        return prop
    return {"type": "string"}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _list_of(name: str) -> dict[str, Any]:
    return _json(
        {
            "type": "object",
            "properties": {
                "count": {"type": "integer"},
                "limit": {"type": "integer"},
                "offset": {"type": "integer"},
                "results": {"type": "array", "items": _ref(name)},
            },
        }
    )


ERRORS = {
    "400": {"$ref": "#/components/responses/Invalid"},
    "401": {"$ref": "#/components/responses/Unauthorized"},
    "404": {"$ref": "#/components/responses/NotFound"},
}
PAGING = [
    {"name": "limit", "in": "query", "schema": {"type": "integer", "default": 100, "maximum": 1000}},
    {"name": "offset", "in": "query", "schema": {"type": "integer", "default": 0}},
]


def _op(tag: str, summary: str, responses: dict[str, Any], **extra: Any) -> dict[str, Any]:
    op = {"tags": [tag], "summary": summary, "responses": {**responses, **ERRORS}}
    op.update(extra)
    return op


def _body(schema: dict[str, Any], media: str = "application/json") -> dict[str, Any]:
    return {"required": True, "content": {media: {"schema": schema}}}


def _path_param(name: str, kind: str = "integer") -> list[dict[str, Any]]:
    return [{"name": name, "in": "path", "required": True, "schema": {"type": kind}}]


@lru_cache(maxsize=1)
def schema() -> dict[str, Any]:
    """The whole OpenAPI document (built once per process)."""
    run_body = form_schema(RunForm)
    zoo = form_schema(ZooModelForm, exclude=("weights_file",))
    zoo["properties"]["kind"] = {"type": "string", "enum": ["zoo"]}
    train = form_schema(TrainBaselineForm)
    train["properties"]["kind"] = {"type": "string", "enum": ["train"]}
    upload = form_schema(ModelUploadForm)
    upload["properties"]["kind"] = {"type": "string", "enum": ["pt2"]}
    zoo_upload = form_schema(ZooModelForm)
    zoo_upload["properties"]["kind"] = {"type": "string", "enum": ["zoo"]}
    target_body = form_schema(TargetForm)
    target_body["properties"]["tvm_target"] = {
        "type": "object",
        "description": 'TVM target dict, e.g. {"kind": "llvm", "mcpu": "cortex-a72", "num-cores": 4}',
    }
    paths: dict[str, Any] = {
        "/api/me/": {"get": _op("account", "The authenticated user", {"200": _json(_ref("User"))})},
        "/api/agents/": {
            "get": _op(
                "runs",
                "Search agents with their settings (name, type, default, range, help), zoo architectures, layouts",
                {"200": _json({"type": "object"})},
            )
        },
        "/api/models/": {
            "get": _op("models", "List models", {"200": _list_of("Model")}, parameters=PAGING),
            "post": _op(
                "models",
                "Add a model: upload a .pt2 (multipart), a zoo architecture (JSON, or multipart with weights_file), "
                "or train a zoo baseline on a dataset (JSON, kind=train). Inspection is queued.",
                {"201": _json(_ref("Model"), "created")},
                requestBody={
                    "required": True,
                    "content": {
                        "multipart/form-data": {"schema": {"oneOf": [upload, zoo_upload]}},
                        "application/json": {"schema": {"oneOf": [zoo, train]}},
                    },
                },
            ),
        },
        "/api/models/{id}/": {
            "parameters": _path_param("id"),
            "get": _op("models", "A model with its layer table", {"200": _json(_ref("Model"))}),
            "delete": _op("models", "Delete a model and its runs", {"204": {"description": "deleted"}}),
        },
        "/api/datasets/": {
            "get": _op(
                "datasets",
                "List datasets (built-in and own)",
                {"200": _list_of("Dataset")},
                parameters=PAGING,
            ),
            "post": _op(
                "datasets",
                "Upload a dataset file (.npz, CIFAR-10 archive, image-folder zip); its metadata is read by a worker",
                {"201": _json(_ref("Dataset"), "created")},
                requestBody=_body(form_schema(DatasetUploadForm), "multipart/form-data"),
            ),
        },
        "/api/datasets/{id}/": {
            "parameters": _path_param("id"),
            "get": _op("datasets", "A dataset with its metadata", {"200": _json(_ref("Dataset"))}),
        },
        "/api/targets/": {
            "get": _op("targets", "List hardware targets", {"200": _list_of("Target")}, parameters=PAGING),
            "post": _op(
                "targets",
                "Add a hardware target; the engine validates it and checks its health in a worker",
                {"201": _json(_ref("Target"), "created")},
                requestBody=_body(target_body),
            ),
        },
        "/api/targets/{name}/": {
            "parameters": _path_param("name", "string"),
            "get": _op("targets", "A target with its health", {"200": _json(_ref("Target"))}),
        },
        "/api/targets/{name}/check/": {
            "parameters": _path_param("name", "string"),
            "post": _op("targets", "Queue a health check", {"202": {"description": "queued"}}),
        },
        "/api/benchmarks/": {
            "get": _op("targets", "List measurements", {"200": _list_of("Benchmark")}, parameters=PAGING),
            "post": _op(
                "targets",
                "Measure a model on a target now",
                {"201": _json(_ref("Benchmark"), "created")},
                requestBody=_body(form_schema(BenchmarkForm)),
            ),
        },
        "/api/benchmarks/{id}/": {
            "parameters": _path_param("id"),
            "get": _op("targets", "A measurement and its result", {"200": _json(_ref("Benchmark"))}),
        },
        "/api/runs/": {
            "get": _op(
                "runs",
                "List runs",
                {"200": _list_of("Run")},
                parameters=[
                    *PAGING,
                    {
                        "name": "status",
                        "in": "query",
                        "schema": {"type": "string"},
                        "description": "comma list",
                    },
                ],
            ),
            "post": _op(
                "runs",
                "Start a search run (absent settings take their defaults); the search is queued",
                {"201": _json(_ref("Run"), "created")},
                requestBody=_body(run_body),
            ),
        },
        "/api/runs/{id}/": {
            "parameters": _path_param("id"),
            "get": _op(
                "runs",
                "A run: status, progress, configuration, figures, final report",
                {"200": _json(_ref("Run"))},
            ),
        },
        "/api/runs/{id}/episodes/": {
            "parameters": _path_param("id"),
            "get": _op(
                "runs",
                "Episodes after `since` in order (increments for polling), or the downsampled overview",
                {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {
                                "episodes": {"type": "array", "items": _ref("Episode")},
                                "last": {"type": "integer", "description": "pass as since on the next call"},
                                "more": {"type": "boolean"},
                                "downsampled": {"type": "boolean"},
                                "total": {"type": "integer"},
                                "run": {"type": "object"},
                            },
                        }
                    )
                },
                parameters=[
                    {"name": "since", "in": "query", "schema": {"type": "integer", "default": 0}},
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "default": 5000, "maximum": 5000},
                    },
                    {
                        "name": "full",
                        "in": "query",
                        "schema": {"type": "boolean"},
                        "description": "add actions",
                    },
                    {"name": "overview", "in": "query", "schema": {"type": "boolean"}},
                ],
            ),
        },
        "/api/runs/{id}/log/": {
            "parameters": _path_param("id"),
            "get": _op(
                "runs",
                "Log lines after `since`",
                {"200": _json({"type": "object"})},
                parameters=[{"name": "since", "in": "query", "schema": {"type": "integer", "default": 0}}],
            ),
        },
        "/api/runs/{id}/cancel/": {
            "parameters": _path_param("id"),
            "post": _op(
                "runs",
                "Stop a queued or running run",
                {"202": _json(_ref("Run")), "409": _json(_ref("Error"))},
            ),
        },
        "/api/runs/{id}/resume/": {
            "parameters": _path_param("id"),
            "post": _op(
                "runs",
                "Requeue a cancelled or failed run from its checkpoint",
                {"202": _json(_ref("Run")), "409": _json(_ref("Error"))},
            ),
        },
        "/api/runs/{id}/artifacts/": {
            "parameters": _path_param("id"),
            "get": _op(
                "downloads",
                "The run's files: compressed model (.pt2, ONNX, int8 ONNX, TVM library), report.json, ...",
                {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {"artifacts": {"type": "array", "items": _ref("Artifact")}},
                        }
                    )
                },
            ),
        },
        "/api/runs/{id}/artifacts/{aid}/": {
            "parameters": _path_param("id") + _path_param("aid"),
            "get": _op(
                "downloads",
                "Download a file of the run",
                {"200": {"description": "the file", "content": {"application/octet-stream": {}}}},
            ),
        },
        "/api/openapi.json": {
            "get": {
                "tags": ["account"],
                "summary": "This document",
                "responses": {"200": _json({"type": "object"})},
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Compression Studio API",
            "version": API_VERSION,
            "description": (
                "Script everything the dashboard does. Authenticate with HTTP Basic (a Django user) or the "
                "browser session (send X-CSRFToken on POST/DELETE). Objects of other users answer 404."
            ),
        },
        "servers": [{"url": "/"}],
        "security": [{"basic": []}, {"session": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "basic": {"type": "http", "scheme": "basic"},
                "session": {"type": "apiKey", "in": "cookie", "name": "sessionid"},
            },
            "responses": {
                "Invalid": _json(_ref("Error"), "invalid input (fields says which)"),
                "Unauthorized": _json(_ref("Error"), "not authenticated"),
                "NotFound": _json(_ref("Error"), "no such object, or not yours"),
            },
            "schemas": _components(),
        },
    }


def _obj(props: dict[str, Any], description: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "properties": props}
    if description:
        out["description"] = description
    return out


S, INT, N, B, OBJ = (
    {"type": "string"},
    {"type": "integer"},
    {"type": "number"},
    {"type": "boolean"},
    {"type": "object"},
)
NS, NN, NI = ({"type": ["string", "null"]}, {"type": ["number", "null"]}, {"type": ["integer", "null"]})


def _components() -> dict[str, Any]:
    status = {
        "type": "string",
        "enum": ["queued", "running", "finalizing", "finished", "failed", "cancelled"],
    }
    return {
        "Error": _obj({"error": S, "fields": {"type": "object", "additionalProperties": {"type": "array"}}}),
        "User": _obj({"username": S, "id": INT, "is_staff": B}),
        "Model": _obj(
            {
                "id": INT,
                "name": S,
                "owner": S,
                "kind": {"type": "string", "enum": ["pt2", "zoo"]},
                "zoo_arch": NS,
                "status": {
                    "type": "string",
                    "enum": ["pending", "training", "inspecting", "ready", "failed"],
                },
                "error": NS,
                "size_bytes": INT,
                "input_shape": {"type": ["array", "null"], "items": INT},
                "num_classes": NI,
                "summary": _obj(
                    {
                        "params": INT,
                        "macs": INT,
                        "layers": INT,
                        "prunable_groups": INT,
                        "quantizable_layers": INT,
                    }
                ),
                "layers": {"type": "array", "items": OBJ, "description": "per-layer table (GET one model)"},
                "created_at": S,
            }
        ),
        "Dataset": _obj(
            {
                "id": INT,
                "name": S,
                "owner": NS,
                "kind": S,
                "status": S,
                "error": NS,
                "size_bytes": INT,
                "meta": OBJ,
            }
        ),
        "Target": _obj(
            {
                "name": S,
                "id": INT,
                "owner": NS,
                "builtin": B,
                "backend": {"type": "string", "enum": ["tvm", "onnxruntime", "torch", "analytic"]},
                "settings": OBJ,
                "round_to": INT,
                "description": S,
                "health": _obj({"reachable": B, "checked_at": S, "detail": S, "error": S}),
            }
        ),
        "Benchmark": _obj(
            {
                "id": INT,
                "model": INT,
                "target": S,
                "status": S,
                "result": _obj({"mean_ms": N, "median_ms": N, "std_ms": N, "min_ms": N, "runs": INT}),
                "error": NS,
            }
        ),
        "Episode": _obj(
            {
                "number": INT,
                "stage": S,
                "reward": N,
                "accuracy": N,
                "latency_ms": NN,
                "macs": INT,
                "bops": INT,
                "params": INT,
                "bytes": N,
                "cost_ratio": N,
                "meets_budget": B,
                "is_best": B,
                "policy": _obj(
                    {"layers": OBJ, "meta": OBJ}, "layer -> {keep_ratio, w_bits, a_bits, sparsity}"
                ),
                "wall_time_s": N,
            }
        ),
        "Run": _obj(
            {
                "id": INT,
                "name": S,
                "owner": S,
                "status": status,
                "phase": S,
                "episodes_done": INT,
                "episodes_total": INT,
                "best": {"oneOf": [_ref("Episode"), {"type": "null"}]},
                "error": S,
                "error_kind": {
                    "type": "string",
                    "enum": ["", *(kind for kind, _ in Run.ERROR_KINDS)],
                    "description": "why a failed run failed; resume helps after device, worker and internal errors",
                },
                "agent": S,
                "model": INT,
                "dataset": INT,
                "target": S,
                "figures": OBJ,
                "config": OBJ,
                "summary": {"type": ["object", "null"], "description": "the final report"},
                "elapsed_s": NN,
            }
        ),
        "Artifact": _obj(
            {"id": INT, "kind": S, "name": S, "bytes": INT, "note": S, "how_to_load": S, "download": S}
        ),
    }
