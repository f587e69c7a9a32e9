"""Owners see and control their own models, datasets, targets, runs, benchmarks and files; other users get
404 (pages, API, downloads, actions); staff see everything; built-ins are shared; forms need CSRF."""

from __future__ import annotations

import pytest
from django.test import Client
from django.urls import reverse

from tests.ui_helpers import (
    DispatchRecorder,
    add_artifact,
    basic,
    make_model,
    make_run,
    make_user,
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
def world(monkeypatch):
    """alice owns a model, a finished run with a file, a dataset, a target and a benchmark; bob owns a run."""
    from webapp.models import Benchmark, Dataset, Target

    recorder = DispatchRecorder(monkeypatch)
    alice, bob, staff = make_user("alice"), make_user("bob"), make_user("root", staff=True)
    model = make_model(alice)
    run = make_run(alice, model=model, episodes=5, status="finished")
    run.checkpoint_episode = 5
    run.save()
    art = add_artifact(run, "model.pt2", b"PK\x03\x04secret-weights")
    ds = Dataset.objects.create(
        owner=alice, name="private-set", kind="npz", status="ready", meta={"num_classes": 3}
    )
    target = Target.objects.create(owner=alice, name="alice-board", backend="torch", settings={"threads": 1})
    bench = Benchmark.objects.create(owner=alice, model=model, target=target)
    bob_run = make_run(bob, model=make_model(bob, name="bob-net"), episodes=2)
    return {
        "alice": alice,
        "bob": bob,
        "staff": staff,
        "model": model,
        "run": run,
        "art": art,
        "ds": ds,
        "target": target,
        "bench": bench,
        "bob_run": bob_run,
        "dispatch": recorder,
    }


def client_for(user) -> Client:
    c = Client()
    c.force_login(user)
    return c


def alice_pages(w) -> list[str]:
    run = w["run"]
    return [
        reverse("ui:model", args=[w["model"].pk]),
        reverse("ui:model-file", args=[w["model"].pk]),
        reverse("ui:dataset", args=[w["ds"].pk]),
        reverse("ui:target", args=[w["target"].name]),
        reverse("ui:benchmark", args=[w["bench"].pk]),
        reverse("ui:run", args=[run.pk]),
        reverse("ui:run-episodes-csv", args=[run.pk]),
        reverse("ui:artifact", args=[run.pk, w["art"].pk]),
    ]


def test_other_user_gets_404_on_every_page(world):
    bob = client_for(world["bob"])
    for url in alice_pages(world):
        if url.endswith("/file/"):
            continue  # a zoo model without weights has no file for anybody
        assert bob.get(url).status_code == 404, url


def test_owner_and_staff_see_them(world):
    for user in (world["alice"], world["staff"]):
        c = client_for(user)
        for url in alice_pages(world):
            if url.endswith("/file/"):
                continue
            assert c.get(url).status_code == 200, (user, url)


def test_artifact_of_another_run_id_is_404(world):
    # The artifact exists, but not under bob's run id: no way around the owner check through the URL.
    bob = client_for(world["bob"])
    url = reverse("ui:artifact", args=[world["bob_run"].pk, world["art"].pk])
    assert bob.get(url).status_code == 404


def test_other_user_cannot_act(world):
    bob = client_for(world["bob"])
    run, model, ds, target = world["run"], world["model"], world["ds"], world["target"]
    posts = [
        reverse("ui:run-cancel", args=[run.pk]),
        reverse("ui:run-resume", args=[run.pk]),
        reverse("ui:model-delete", args=[model.pk]),
        reverse("ui:dataset-delete", args=[ds.pk]),
        reverse("ui:target-delete", args=[target.name]),
        reverse("ui:target-check", args=[target.name]),
    ]
    for url in posts:
        assert bob.post(url).status_code == 404, url
    assert world["dispatch"].calls == []
    from webapp.models import Dataset, Target, UploadedModel

    assert UploadedModel.objects.filter(pk=model.pk).exists()
    assert Dataset.objects.filter(pk=ds.pk).exists() and Target.objects.filter(pk=target.pk).exists()


def test_lists_show_only_own_objects(world):
    bob = client_for(world["bob"])
    for name, secret in (
        ("ui:runs", f"#{world['run'].pk} "),
        ("ui:models", reverse("ui:model", args=[world["model"].pk])),
        ("ui:datasets", "private-set"),
        ("ui:targets", "alice-board"),
        ("ui:home", f"#{world['run'].pk} "),
        ("ui:compare", f"#{world['run'].pk} "),
    ):
        html = bob.get(reverse(name)).content.decode()
        assert secret not in html, name
    # built-ins are shared
    assert "digits" in bob.get(reverse("ui:datasets")).content.decode()
    assert "local-tvm" in bob.get(reverse("ui:targets")).content.decode()
    staff_runs = client_for(world["staff"]).get(reverse("ui:runs")).content.decode()
    assert f"#{world['run'].pk} " in staff_runs and f"#{world['bob_run'].pk} " in staff_runs


def test_compare_ignores_runs_of_others(world):
    bob = client_for(world["bob"])
    html = bob.get(
        reverse("ui:compare") + f"?ids={world['run'].pk}&ids={world['bob_run'].pk}"
    ).content.decode()
    assert "compare-data" not in html  # only one visible run: the picker, no comparison
    assert world["run"].name not in html


def test_forms_cannot_use_objects_of_others(world):
    bob = client_for(world["bob"])
    resp = bob.post(
        reverse("ui:run-new"),
        {"model": world["model"].pk, "dataset": world["ds"].pk, "target": "alice-board", "agent": "amc"},
    )
    html = resp.content.decode()
    assert resp.status_code == 200 and html.count("Select a valid choice") >= 3
    resp = bob.post(
        reverse("ui:benchmark-new"),
        {"model": world["model"].pk, "target": "local-ort", "repeats": 3, "warmup": 0},
    )
    assert resp.status_code == 302
    from webapp.models import Benchmark

    assert Benchmark.objects.filter(owner=world["bob"]).count() == 0


def test_api_other_user_404(world, client):
    run, art = world["run"], world["art"]
    urls = [
        f"/api/runs/{run.pk}/",
        f"/api/runs/{run.pk}/episodes/",
        f"/api/runs/{run.pk}/log/",
        f"/api/runs/{run.pk}/artifacts/",
        f"/api/runs/{run.pk}/artifacts/{art.pk}/",
        f"/api/models/{world['model'].pk}/",
        f"/api/datasets/{world['ds'].pk}/",
        f"/api/targets/{world['target'].name}/",
        f"/api/benchmarks/{world['bench'].pk}/",
    ]
    for url in urls:
        resp = client.get(url, **basic(world["bob"]))
        assert resp.status_code == 404, url
        assert resp.json()["error"]
        assert client.get(url, **basic(world["alice"])).status_code == 200, url
    for url in (f"/api/runs/{run.pk}/cancel/", f"/api/runs/{run.pk}/resume/"):
        assert client.post(url, **basic(world["bob"])).status_code == 404
    assert client.delete(f"/api/models/{world['model'].pk}/", **basic(world["bob"])).status_code == 404
    listed = client.get("/api/runs/", **basic(world["bob"])).json()
    assert [r["id"] for r in listed["results"]] == [world["bob_run"].pk]
    everyone = client.get("/api/runs/", **basic(world["staff"])).json()
    assert everyone["count"] == 2


def test_forms_need_csrf(world):
    c = Client(enforce_csrf_checks=True)
    c.force_login(world["alice"])
    assert c.post(reverse("ui:run-cancel", args=[world["bob_run"].pk])).status_code == 403
    assert (
        c.post(reverse("ui:models") + "?form=zoo", {"form": "zoo", "zoo_arch": "resnet20"}).status_code == 403
    )
    page = c.get(reverse("ui:run-new")).content.decode()
    assert 'name="csrfmiddlewaretoken"' in page
