"""JSON API routes (namespace ``api``), documented in ``webapp.openapi``; trailing slashes optional."""

from django.urls import re_path

from webapp import api

app_name = "api"

ID = r"(?P<pk>[0-9]+)"
NAME = r"(?P<name>[A-Za-z0-9._-]+)"

urlpatterns = [
    re_path(r"^api/openapi\.json$", api.openapi_json, name="openapi"),
    re_path(r"^api/me/?$", api.me, name="me"),
    re_path(r"^api/agents/?$", api.agents, name="agents"),
    re_path(r"^api/models/?$", api.models, name="models"),
    re_path(rf"^api/models/{ID}/?$", api.model, name="model"),
    re_path(r"^api/datasets/?$", api.datasets, name="datasets"),
    re_path(rf"^api/datasets/{ID}/?$", api.dataset, name="dataset"),
    re_path(r"^api/targets/?$", api.targets, name="targets"),
    re_path(rf"^api/targets/{NAME}/?$", api.target, name="target"),
    re_path(rf"^api/targets/{NAME}/check/?$", api.target_check, name="target-check"),
    re_path(r"^api/benchmarks/?$", api.benchmarks, name="benchmarks"),
    re_path(rf"^api/benchmarks/{ID}/?$", api.benchmark, name="benchmark"),
    re_path(r"^api/runs/?$", api.runs, name="runs"),
    re_path(rf"^api/runs/{ID}/?$", api.run, name="run"),
    re_path(rf"^api/runs/{ID}/episodes/?$", api.run_episodes, name="run-episodes"),
    re_path(rf"^api/runs/{ID}/log/?$", api.run_log, name="run-log"),
    re_path(rf"^api/runs/{ID}/cancel/?$", api.run_cancel, name="run-cancel"),
    re_path(rf"^api/runs/{ID}/resume/?$", api.run_resume, name="run-resume"),
    re_path(rf"^api/runs/{ID}/artifacts/?$", api.run_artifacts, name="run-artifacts"),
    re_path(rf"^api/runs/{ID}/artifacts/(?P<aid>[0-9]+)/?$", api.run_artifact, name="run-artifact"),
]
