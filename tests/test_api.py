"""The JSON API with Django's test client: authentication, create/list/get, episode increments, cancel and
resume, uploads, artifacts, and the OpenAPI schema matching the routes."""

from __future__ import annotations

import json
import re

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from tests.ui_helpers import (
    DispatchRecorder,
    add_artifact,
    basic,
    digits,
    make_model,
    make_run,
    make_user,
    tiny_pt2_bytes,
)

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def private_dirs(settings, tmp_path):
    settings.PRIVATE_MEDIA_ROOT = tmp_path / "media"
    settings.RUNS_ROOT = tmp_path / "runs"
    settings.PRIVATE_MEDIA_ROOT.mkdir()
    settings.RUNS_ROOT.mkdir()
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def dispatch(monkeypatch) -> DispatchRecorder:
    return DispatchRecorder(monkeypatch)


@pytest.fixture
def alice():
    return make_user("alice")


def get(client, url, user, **params):
    return client.get(url, params, **basic(user))


def post_json(client, url, user, body):
    return client.post(url, json.dumps(body), content_type="application/json", **basic(user))


def test_authentication(client, alice):
    anon = client.get("/api/runs/")
    assert anon.status_code == 401 and anon.json()["error"].startswith("authentication required")
    assert anon["WWW-Authenticate"].startswith("Basic")
    assert client.get("/api/runs/", **basic("alice", "nope")).status_code == 401
    me = get(client, "/api/me/", alice)
    assert me.json() == {"username": "alice", "id": alice.pk, "is_staff": False}
    client.force_login(alice)
    assert client.get("/api/me").json()["username"] == "alice"  # session, trailing slash optional
    assert client.put("/api/runs/").status_code == 405


def test_agents_catalog(client, alice):
    data = get(client, "/api/agents/", alice).json()
    names = [a["name"] for a in data["agents"]]
    assert {"amc", "haq", "galen", "ajpq", "random", "uniform", "two-stage"} <= set(names)
    amc = data["agents"][names.index("amc")]
    assert {"name": "hidden1", "type": "int", "default": 300}.items() <= amc["params"][0].items()


def test_create_run_with_defaults(client, alice, dispatch, django_capture_on_commit_callbacks):
    m = make_model(alice)
    with django_capture_on_commit_callbacks(execute=True):
        resp = post_json(
            client,
            "/api/runs/",
            alice,
            {"model": m.pk, "target": "local-ort", "episodes": 8, "agent_config": {"warmup_episodes": 2}},
        )
    assert resp.status_code == 201, resp.content
    run = resp.json()
    assert run["status"] == "queued" and run["episodes_total"] == 8 and run["target"] == "local-ort"
    cfg = run["config"]
    assert (cfg["agent"], cfg["budget"], cfg["objective"], cfg["dataset"]) == (
        "amc",
        0.5,
        "latency",
        "digits",
    )
    assert cfg["agent_config"] == {"warmup_episodes": 2} and cfg["export_formats"] == ["pt2", "onnx"]
    assert dispatch.names() == ["enqueue_run"]
    listed = get(client, "/api/runs/", alice).json()
    assert listed["count"] == 1 and listed["results"][0]["id"] == run["id"]


@pytest.mark.parametrize(
    "body,field",
    [
        ({"budget": 2}, "budget"),
        ({"agent": "nope"}, "agent"),
        ({"agent_config": {"hidden1": "many"}}, "agent_config"),
        ({"agent_config": {"no_such": 1}}, "agent_config"),
        ({"target": "no-such-target"}, "target"),
    ],
)
def test_create_run_validation(client, alice, dispatch, body, field):
    m = make_model(alice)
    resp = post_json(client, "/api/runs/", alice, {"model": m.pk, **body})
    assert resp.status_code == 400
    err = resp.json()
    assert field in err["fields"] and err["error"].startswith("invalid input")
    assert dispatch.calls == []


def test_bad_json_body(client, alice):
    resp = client.post("/api/runs/", "{not json", content_type="application/json", **basic(alice))
    assert resp.status_code == 400 and "JSON object" in resp.json()["error"]


def test_episode_increments(client, alice):
    run = make_run(alice, episodes=10)
    first = get(client, f"/api/runs/{run.pk}/episodes/", alice, since=4).json()
    assert [e["number"] for e in first["episodes"]] == [5, 6, 7, 8, 9, 10]
    assert first["last"] == 10 and first["more"] is False and first["run"]["episodes_done"] == 10
    assert "raw_actions" not in first["episodes"][0]
    page = get(client, f"/api/runs/{run.pk}/episodes/", alice, since=0, limit=3, full=1).json()
    assert [e["number"] for e in page["episodes"]] == [1, 2, 3] and page["more"] is True and page["last"] == 3
    assert "raw_actions" in page["episodes"][0]
    empty = get(client, f"/api/runs/{run.pk}/episodes/", alice, since=10).json()
    assert empty["episodes"] == [] and empty["last"] == 10
    assert get(client, f"/api/runs/{run.pk}/episodes/", alice, since="x").status_code == 400
    overview = get(client, f"/api/runs/{run.pk}/episodes/", alice, overview=1).json()
    assert overview["total"] == 10 and overview["downsampled"] is False


def test_run_detail_and_log(client, alice):
    run = make_run(alice, episodes=3)
    run.log("search started")
    run.log("episode 3 took long", "warning")
    detail = get(client, f"/api/runs/{run.pk}/", alice).json()
    assert (
        detail["id"] == run.pk
        and detail["config"]["agent"] == "amc"
        and detail["figures"]["accuracy"] is not None
    )
    log = get(client, f"/api/runs/{run.pk}/log/", alice, since=1).json()
    assert [ln["message"] for ln in log["lines"]] == ["episode 3 took long"] and log["last"] == 2


def test_cancel_and_resume(client, alice, dispatch):
    run = make_run(alice, episodes=3)
    assert post_json(client, f"/api/runs/{run.pk}/cancel/", alice, {}).status_code == 202
    assert dispatch.names() == ["request_cancel"]
    run.status = "finished"
    run.save()
    assert post_json(client, f"/api/runs/{run.pk}/cancel/", alice, {}).status_code == 409
    assert post_json(client, f"/api/runs/{run.pk}/resume/", alice, {}).status_code == 409
    run.status, run.checkpoint_episode = "failed", 3
    run.save()
    assert post_json(client, f"/api/runs/{run.pk}/resume/", alice, {}).status_code == 202
    assert dispatch.names() == ["request_cancel", "resume_run"]


def test_artifacts(client, alice):
    run = make_run(alice, episodes=2, status="finished")
    a = add_artifact(run, "model.pt2", b"PK\x03\x04abc")
    add_artifact(run, "report.json", b'{"status": "finished"}', kind="report")
    arts = get(client, f"/api/runs/{run.pk}/artifacts/", alice).json()["artifacts"]
    assert {x["name"]: x["bytes"] for x in arts} == {"model.pt2": 7, "report.json": 22}
    url = next(x["download"] for x in arts if x["name"] == "model.pt2")
    assert url == f"/api/runs/{run.pk}/artifacts/{a.pk}"
    dl = get(client, url, alice)
    assert dl.status_code == 200 and b"".join(dl.streaming_content) == b"PK\x03\x04abc"


def test_upload_models(client, alice, dispatch, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        up = client.post(
            "/api/models/", {"file": SimpleUploadedFile("tiny.pt2", tiny_pt2_bytes())}, **basic(alice)
        )
    assert up.status_code == 201, up.content
    assert up.json()["kind"] == "pt2" and up.json()["status"] == "pending" and up.json()["name"] == "tiny"
    with django_capture_on_commit_callbacks(execute=True):
        zoo = post_json(
            client, "/api/models/", alice, {"kind": "zoo", "zoo_arch": "resnet20", "input_shape": [3, 32, 32]}
        )
    assert (
        zoo.status_code == 201
        and zoo.json()["zoo_arch"] == "resnet20"
        and zoo.json()["input_shape"] == [3, 32, 32]
    )
    with django_capture_on_commit_callbacks(execute=True):
        train = post_json(
            client, "/api/models/", alice, {"kind": "train", "zoo_arch": "small_cnn", "dataset": digits().pk}
        )
    assert train.status_code == 201 and train.json()["train_config"]["epochs"] == 10
    bad = client.post("/api/models/", {"file": SimpleUploadedFile("x.txt", b"hello")}, **basic(alice))
    assert bad.status_code == 400 and "is not a .pt2 model" in bad.json()["fields"]["file"][0]
    assert post_json(client, "/api/models/", alice, {"kind": "onnx"}).status_code == 400
    assert dispatch.names() == ["enqueue_inspect", "enqueue_inspect", "enqueue_train"]
    one = get(client, f"/api/models/{up.json()['id']}/", alice).json()
    assert "layers" in one


def test_model_with_layer_table_and_delete(client, alice):
    m = make_model(alice)
    data = get(client, f"/api/models/{m.pk}/", alice).json()
    assert data["summary"]["layers"] == len(data["layers"]) and data["num_classes"] == 10
    assert client.delete(f"/api/models/{m.pk}/", **basic(alice)).status_code == 204
    assert get(client, f"/api/models/{m.pk}/", alice).status_code == 404


def test_a_model_with_a_running_search_is_not_deleted_and_a_finished_ones_files_go_with_it(client, alice):
    """Deleting under a worker left the run's directory behind and the worker confused (a UI review)."""
    from webapp.models import Run, UploadedModel

    running = make_run(alice, episodes=2, status="running")
    add_artifact(running, "model.pt2", b"x")
    resp = client.delete(f"/api/models/{running.model.pk}/", **basic(alice))
    assert resp.status_code == 409 and f"runs still queued or running (#{running.pk})" in resp.json()["error"]
    assert Run.objects.filter(pk=running.pk).exists() and running.out_path.exists()
    Run.objects.filter(pk=running.pk).update(status="finished")
    assert client.delete(f"/api/models/{running.model.pk}/", **basic(alice)).status_code == 204
    assert not Run.objects.filter(pk=running.pk).exists() and not running.out_path.exists()
    assert not UploadedModel.objects.filter(pk=running.model.pk).exists()


def test_datasets_targets_benchmarks(client, alice, dispatch, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        ds = client.post(
            "/api/datasets/",
            {"kind": "npz", "file": SimpleUploadedFile("d.npz", b"PK\x03\x04")},
            **basic(alice),
        )
    assert ds.status_code == 201 and ds.json()["kind"] == "npz"
    names = [d["name"] for d in get(client, "/api/datasets/", alice).json()["results"]]
    assert "digits" in names and "d" in names
    with django_capture_on_commit_callbacks(execute=True):
        t = post_json(
            client,
            "/api/targets/",
            alice,
            {"name": "board", "backend": "tvm", "tvm_target": {"kind": "llvm"}},
        )
    assert t.status_code == 201 and t.json()["settings"] == {"target": {"kind": "llvm"}}
    targets = [x["name"] for x in get(client, "/api/targets/", alice).json()["results"]]
    assert {"local-tvm", "local-ort", "local-torch", "analytic", "board"} <= set(targets)
    assert post_json(client, "/api/targets/board/check/", alice, {}).status_code == 202
    m = make_model(alice)
    with django_capture_on_commit_callbacks(execute=True):
        b = post_json(client, "/api/benchmarks/", alice, {"model": m.pk, "target": "local-torch"})
    assert b.status_code == 201 and b.json()["params"] == {"repeats": 20, "warmup": 3}
    assert get(client, f"/api/benchmarks/{b.json()['id']}/", alice).json()["status"] == "queued"
    assert dispatch.names() == [
        "enqueue_inspect_dataset",
        "enqueue_check_target",
        "enqueue_check_target",
        "enqueue_benchmark",
    ]


def test_session_post_needs_csrf(alice):
    from django.test import Client

    c = Client(enforce_csrf_checks=True)
    c.force_login(alice)
    resp = c.post("/api/runs/", "{}", content_type="application/json")
    assert resp.status_code == 403 and "CSRF" in resp.json()["error"]
    # Basic auth carries no cookie: no CSRF token needed.
    c2 = Client(enforce_csrf_checks=True)
    assert c2.post("/api/runs/", "{}", content_type="application/json", **basic(alice)).status_code == 400


# --- the schema ---------------------------------------------------------------------------------------


def _api_routes() -> set[str]:
    """Documented-style paths ('/api/runs/{id}/') of every route in webapp.api_urls."""
    from webapp import api_urls

    out = set()
    for p in api_urls.urlpatterns:
        pattern = getattr(p.pattern, "_regex", None)
        if not pattern or not pattern.startswith("^api/"):
            continue
        path = pattern.strip("^$").replace("\\.", ".").replace("/?", "/")
        path = re.sub(r"\(\?P<(aid)>[^)]*\)", "{aid}", path)
        path = re.sub(r"\(\?P<(pk)>[^)]*\)", "{id}", path)
        path = re.sub(r"\(\?P<(name)>[^)]*\)", "{name}", path)
        out.add("/" + path)
    return out


def test_openapi_documents_every_route(client, alice):
    spec = get(client, "/api/openapi.json", alice).json()
    assert spec["openapi"].startswith("3.") and spec["info"]["title"]
    assert set(spec["paths"]) == _api_routes()
    for path, item in spec["paths"].items():
        for method, op in item.items():
            if method == "parameters":
                continue
            assert op["summary"] and op["responses"], (path, method)
    body = spec["paths"]["/api/runs/"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    props = body["properties"]
    assert props["budget"] == {
        "type": "number",
        "minimum": 0.01,
        "maximum": 1.0,
        "default": 0.5,
        "description": props["budget"]["description"],
    }
    assert "amc" in props["agent"]["enum"] and props["objective"]["enum"] == [
        "latency",
        "macs",
        "bops",
        "params",
        "bytes",
    ]
    assert body["required"] == ["model"]
    assert not any("__" in k for k in props)
    # every $ref resolves
    text = json.dumps(spec)
    for ref in set(re.findall(r'"\$ref": "#/components/(\w+)/(\w+)"', text)):
        assert ref[1] in spec["components"][ref[0]], ref


def test_api_docs_page_lists_the_schema(client, alice):
    client.force_login(alice)
    html = client.get("/api-docs/").content.decode()
    assert "/api/runs/{id}/episodes/" in html and "Start a search run" in html
