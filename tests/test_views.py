"""Dashboard pages with Django's test client: rendering, forms (validation beside fields, what is created and
queued), the run page's data, downloads, large runs, the local Plotly.js, and that pages never import torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse

from tests.ui_helpers import (
    PASSWORD,
    DispatchRecorder,
    add_artifact,
    digits,
    make_model,
    make_run,
    make_user,
    small_cnn_inspection,
    tiny_pt2_bytes,
)

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def private_dirs(settings, tmp_path):
    """Uploads and run outputs in per-test directories."""
    settings.PRIVATE_MEDIA_ROOT = tmp_path / "media"
    settings.RUNS_ROOT = tmp_path / "runs"
    settings.PRIVATE_MEDIA_ROOT.mkdir()
    settings.RUNS_ROOT.mkdir()
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]  # fast logins in tests


@pytest.fixture
def dispatch(monkeypatch) -> DispatchRecorder:
    return DispatchRecorder(monkeypatch)


@pytest.fixture
def alice(client):
    user = make_user("alice")
    client.force_login(user)
    return user


PAGES = [
    "ui:home",
    "ui:models",
    "ui:datasets",
    "ui:targets",
    "ui:runs",
    "ui:run-new",
    "ui:compare",
    "ui:api-docs",
]


@pytest.mark.parametrize("name", PAGES)
def test_every_page_needs_login(client, name):
    url = reverse(name)
    resp = client.get(url)
    assert resp.status_code == 302
    assert resp["Location"].startswith("/accounts/login/?next=")


@pytest.mark.parametrize("name", PAGES)
def test_pages_render(client, alice, name):
    resp = client.get(reverse(name))
    assert resp.status_code == 200
    assert b"Compression Studio" in resp.content
    assert b"alice" in resp.content


def test_login_page_and_sign_in(client):
    make_user("bob")
    page = client.get("/accounts/login/")
    assert page.status_code == 200 and b"csrfmiddlewaretoken" in page.content
    bad = client.post("/accounts/login/", {"username": "bob", "password": "wrong"})
    assert bad.status_code == 200 and b"form-errors" in bad.content
    ok = client.post("/accounts/login/", {"username": "bob", "password": PASSWORD})
    assert ok.status_code == 302
    assert client.get(reverse("ui:home")).status_code == 200
    out = client.post("/accounts/logout/")
    assert out.status_code == 302
    assert client.get(reverse("ui:home")).status_code == 302


# --- models --------------------------------------------------------------------------------------------


def test_upload_pt2_creates_model_and_queues_inspection(
    client, alice, dispatch, django_capture_on_commit_callbacks
):
    f = SimpleUploadedFile("net.pt2", tiny_pt2_bytes(), content_type="application/octet-stream")
    with django_capture_on_commit_callbacks(execute=True):
        resp = client.post(reverse("ui:models") + "?form=upload", {"form": "upload", "file": f})
    from webapp.models import UploadedModel

    m = UploadedModel.objects.get(owner=alice)
    assert resp.status_code == 302 and resp["Location"] == reverse("ui:model", args=[m.pk])
    assert (m.name, m.kind, m.status, m.size_bytes) == ("net", "pt2", "pending", len(tiny_pt2_bytes()))
    assert open(m.file.path, "rb").read() == tiny_pt2_bytes()
    assert dispatch.calls == [("enqueue_inspect", (m,))]
    page = client.get(resp["Location"])
    assert b"Queued for a worker" in page.content and b"data-poll-url" in page.content


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("net.onnx", b"PK\x03\x04xxxx", b"is not a .pt2 model"),
        ("net.pt2", b"\x80\x04pickle", b"does not look like a .pt2 model"),
        ("net.pt2", b"", b"The submitted file is empty"),
    ],
)
def test_upload_refusals_are_shown_beside_the_field(client, alice, dispatch, name, content, message):
    f = SimpleUploadedFile(name, content)
    resp = client.post(reverse("ui:models") + "?form=upload", {"form": "upload", "file": f})
    assert resp.status_code == 200
    assert message in resp.content
    assert b'id="field-file"' in resp.content and b"has-error" in resp.content
    assert dispatch.calls == []


def test_upload_size_limit(client, alice, settings):
    settings.MAX_MODEL_UPLOAD_BYTES = 1024 * 1024
    f = SimpleUploadedFile("big.pt2", b"PK\x03\x04" + b"0" * (1024 * 1024 + 10))
    resp = client.post(reverse("ui:models") + "?form=upload", {"form": "upload", "file": f})
    assert b"big.pt2 is 1 MiB; the limit for a .pt2 model is 1 MiB" in resp.content


def test_zoo_model_form(client, alice, dispatch, django_capture_on_commit_callbacks):
    bad = client.post(
        reverse("ui:models") + "?form=zoo", {"form": "zoo", "zoo_arch": "resnet20", "input_shape": "3x32"}
    )
    assert b"the input shape has three numbers" in bad.content
    with django_capture_on_commit_callbacks(execute=True):
        ok = client.post(
            reverse("ui:models") + "?form=zoo",
            {"form": "zoo", "zoo_arch": "resnet20", "input_shape": "1, 8, 8", "num_classes": "10"},
        )
    from webapp.models import UploadedModel

    m = UploadedModel.objects.get(owner=alice)
    assert ok.status_code == 302
    assert (m.kind, m.zoo_arch, m.input_shape, m.num_classes) == ("zoo", "resnet20", [1, 8, 8], 10)
    assert dispatch.names() == ["enqueue_inspect"]


def test_train_baseline_form(client, alice, dispatch, django_capture_on_commit_callbacks):
    ds = digits()
    page = client.get(reverse("ui:models") + "?form=train").content.decode()
    assert f'<option value="{ds.pk}" selected>' in _field_html(page, "dataset")  # ready to submit as it comes
    with django_capture_on_commit_callbacks(execute=True):
        resp = client.post(
            reverse("ui:models") + "?form=train",
            {
                "form": "train",
                "zoo_arch": "small_cnn",
                "dataset": ds.pk,
                "epochs": 3,
                "lr": 0.05,
                "batch_size": 64,
                "seed": 1,
            },
        )
    from webapp.models import UploadedModel

    m = UploadedModel.objects.get(owner=alice)
    assert resp.status_code == 302
    assert m.status == "training" and m.train_config["epochs"] == 3 and m.train_config["dataset_id"] == ds.pk
    assert dispatch.calls == [("enqueue_train", (m, ds))]


def test_model_page_shows_layer_table_and_unsupported_ops(client, alice):
    m = make_model(alice)
    insp = json.loads(json.dumps(small_cnn_inspection()))
    insp["summary"]["unsupported"] = [
        {"op": "PixelShuffle", "layers": ["features.3"], "action": "kept unpruned"}
    ]
    m.inspection = insp
    m.save()
    resp = client.get(reverse("ui:model", args=[m.pk]))
    html = resp.content.decode()
    assert resp.status_code == 200
    for layer in insp["layers"]:
        assert f"<code>{layer['name']}</code>" in html
    assert html.count("<tr>", html.index('id="layer-table"')) >= len(insp["layers"])
    assert "PixelShuffle" in html and "touches features.3" in html
    assert "New run with this model" in html


def test_failed_model_shows_engine_message(client, alice):
    m = make_model(alice, status="failed")
    m.error = "net.pt2 contains a pickled member that imports os.system: re-export with torch.export.save"
    m.save()
    html = client.get(reverse("ui:model", args=[m.pk])).content.decode()
    assert "imports os.system" in html and "callout bad" in html


# --- datasets and targets ------------------------------------------------------------------------------


def test_dataset_upload_checks_kind_and_queues(client, alice, dispatch, django_capture_on_commit_callbacks):
    wrong = client.post(
        reverse("ui:datasets"), {"kind": "cifar", "file": SimpleUploadedFile("d.npz", b"PK\x03\x04")}
    )
    assert b"expected a file ending in .tar.gz or .tgz" in wrong.content
    with django_capture_on_commit_callbacks(execute=True):
        ok = client.post(
            reverse("ui:datasets"), {"kind": "npz", "file": SimpleUploadedFile("mine.npz", b"PK\x03\x04data")}
        )
    from webapp.models import Dataset

    ds = Dataset.objects.get(owner=alice)
    assert ok.status_code == 302 and ds.name == "mine" and ds.status == "pending"
    assert dispatch.names() == ["enqueue_inspect_dataset"]


def test_digits_dataset_page(client, alice):
    resp = client.get(reverse("ui:dataset", args=[digits().pk]))
    assert resp.status_code == 200 and b"1797" in resp.content and b"1\xc3\x978\xc3\x978" in resp.content


def test_target_form_validation(client, alice, dispatch):
    url = reverse("ui:targets")
    resp = client.post(url, {"name": "pi", "backend": "tvm", "tvm_target": "{kind: llvm", "round_to": 1})
    assert b"not valid JSON" in resp.content
    resp = client.post(
        url,
        {
            "name": "pi",
            "backend": "tvm",
            "tvm_target": '{"kind": "llvm"}',
            "rpc_host": "10.0.0.2",
            "round_to": 1,
        },
    )
    # beside the port and the key, and again in the summary at the top of the form
    assert resp.content.count(b"needs the tracker host, port and device key together") == 4
    resp = client.post(url, {"name": "local-tvm", "backend": "torch", "round_to": 1})
    assert b"exists already" in resp.content
    resp = client.post(
        url, {"name": "x", "backend": "onnxruntime", "tvm_target": '{"kind": "llvm"}', "round_to": 1}
    )
    assert b"only the tvm backend takes a TVM target" in resp.content
    assert dispatch.calls == []


def test_target_form_creates_remote_device(client, alice, dispatch, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        resp = client.post(
            reverse("ui:targets"),
            {
                "name": "rpi4-farm",
                "backend": "tvm",
                "tvm_target": '{"kind": "llvm", "mtriple": "aarch64-linux-gnu", "num-cores": 4}',
                "rpc_host": "127.0.0.1",
                "rpc_port": 9190,
                "rpc_key": "rpi4",
                "threads": 4,
                "round_to": 8,
            },
        )
    from webapp.models import Target

    t = Target.objects.get(name="rpi4-farm")
    assert resp.status_code == 302 and resp["Location"] == reverse("ui:target", args=["rpi4-farm"])
    assert t.owner == alice and t.round_to == 8
    assert t.settings == {
        "target": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "num-cores": 4},
        "rpc": {"host": "127.0.0.1", "port": 9190, "key": "rpi4"},
        "threads": 4,
    }
    assert dispatch.names() == ["enqueue_check_target"]
    page = client.get(resp["Location"]).content.decode()
    assert "checking" in page and "data-poll-url" in page
    # left blank, the rounding is the backend's own, decided by the engine on the machine that measures
    with django_capture_on_commit_callbacks(execute=True):
        client.post(reverse("ui:targets"), {"name": "ort-2", "backend": "onnxruntime", "threads": 1})
    ort = Target.objects.get(name="ort-2")
    assert ort.round_to == 0 and ort.spec_dict()["round_to"] is None
    assert (
        "own (ONNX Runtime: its kernel block"
        in client.get(reverse("ui:target", args=["ort-2"])).content.decode()
    )


def test_measure_now_queues_a_benchmark(client, alice, dispatch, django_capture_on_commit_callbacks):
    m = make_model(alice)
    with django_capture_on_commit_callbacks(execute=True):
        resp = client.post(
            reverse("ui:benchmark-new"),
            {
                "model": m.pk,
                "target": "local-ort",
                "repeats": 5,
                "warmup": 1,
                "next": reverse("ui:model", args=[m.pk]),
            },
        )
    from webapp.models import Benchmark

    b = Benchmark.objects.get()
    assert resp["Location"] == reverse("ui:model", args=[m.pk])
    assert (b.target.name, b.params) == ("local-ort", {"repeats": 5, "warmup": 1})
    assert dispatch.calls == [("enqueue_benchmark", (b,))]
    b.status, b.result = (
        "finished",
        {"median_ms": 0.42, "mean_ms": 0.43, "std_ms": 0.01, "min_ms": 0.4, "runs": 5},
    )
    b.save()
    assert b"420 \xc2\xb5s" in client.get(reverse("ui:benchmark", args=[b.pk])).content


# --- new run -------------------------------------------------------------------------------------------


def run_post(model, **extra):
    data = {
        "model": model.pk,
        "dataset": digits().pk,
        "target": "local-ort",
        "agent": "amc",
        "objective": "latency",
        "budget": "0.5",
        "reward": "acc",
        "beta": "-5",
        "rho": "0.5",
        "episodes": "12",
        "seed": "3",
        "val_samples": "100",
        "calib_samples": "64",
        "top_k": "1",
        "fine_tune_epochs": "0",
        "checkpoint_every": "4",
        "min_keep": "0.2",
        "min_bits": "2",
        "max_bits": "8",
        "budget_mode": "cap",
        "enforce_budget": "",
        "export_formats": ["pt2", "onnx"],
        "agent_fields": "1",
    }
    # a browser submits the checkboxes that are ticked, and a bool setting that defaults to on renders ticked
    from webapp import catalog
    from webapp.forms import agent_field_name

    agent = extra.get("agent", data["agent"])
    for p in (catalog.agent_info(agent) or {"params": []})["params"]:
        if p["type"] == "bool" and p["default"]:
            data[agent_field_name(agent, p["name"])] = "on"
    data.update(extra)
    return data


def test_new_run_form_defaults_and_agent_fields(client, alice):
    make_model(alice)
    html = client.get(reverse("ui:run-new")).content.decode()
    from webapp.catalog import agent_names

    for name in agent_names():
        assert f'data-agent="{name}"' in html
    assert 'name="agent_amc__warmup_episodes"' in html and 'name="agent_haq__pin_first_last_8bit"' in html
    assert 'value="0.5"' in html  # budget default from SearchConfig


def test_new_run_creates_run_and_queues_search(client, alice, dispatch, django_capture_on_commit_callbacks):
    m = make_model(alice)
    with django_capture_on_commit_callbacks(execute=True):
        resp = client.post(
            reverse("ui:run-new"), run_post(m, agent_amc__warmup_episodes="4", agent_amc__hidden1="300")
        )
    from compression.search.results import SearchConfig
    from webapp.models import Run

    run = Run.objects.get()
    assert resp.status_code == 302 and resp["Location"] == reverse("ui:run", args=[run.pk])
    cfg = SearchConfig.from_dict(run.config)
    assert (cfg.agent, cfg.episodes, cfg.seed, cfg.target, cfg.dataset) == (
        "amc",
        12,
        3,
        "local-ort",
        "digits",
    )
    assert cfg.agent_config == {"warmup_episodes": 4}  # defaults are not stored
    assert (
        cfg.float_bits is True
        and cfg.reconstruct is True
        and cfg.free_precision is True
        and cfg.train_top_up is True
        and cfg.tune_steps == 0
        and cfg.fine_tune_augment is False
    )  # not posted (an API client): the engine's defaults
    assert (run.episodes_total, run.status, run.model_id) == (12, "queued", m.pk)
    assert dispatch.calls == [("enqueue_run", (run,))]


def test_new_run_can_turn_off_the_default_on_engine_switches(
    client, alice, dispatch, django_capture_on_commit_callbacks
):
    m = make_model(alice)
    html = client.get(reverse("ui:run-new")).content.decode()
    assert 'name="float_bits"' in html and 'name="reconstruct"' in html and 'name="free_precision"' in html
    with django_capture_on_commit_callbacks(execute=True):
        client.post(
            reverse("ui:run-new"),
            run_post(
                m,
                float_bits="false",
                reconstruct="false",
                free_precision="false",
                train_top_up="false",
                tune_steps="12",
                fine_tune_augment="on",
            ),
        )
    from compression.search.results import SearchConfig
    from webapp.models import Run

    cfg = SearchConfig.from_dict(Run.objects.get().config)
    assert cfg.float_bits is False and cfg.reconstruct is False and cfg.free_precision is False
    assert cfg.train_top_up is False
    assert cfg.tune_steps == 12 and 'name="tune_steps"' in html
    assert cfg.fine_tune_augment is True and 'name="fine_tune_augment"' in html


@pytest.mark.parametrize(
    "extra,field,message",
    [
        ({"budget": "1.5"}, "budget", "less than or equal to 1.0"),
        ({"episodes": "0"}, "episodes", "greater than or equal to 1"),
        ({"agent_amc__hidden1": "1"}, "agent_amc__hidden1", "greater than or equal to 4"),
        ({"reward": "galen", "beta": ""}, "beta", "the galen reward needs beta"),
        ({"agent": "haq", "objective": "macs"}, "objective", "changes bit-widths only"),
        ({"min_bits": "6", "max_bits": "4"}, "max_bits", "max bits must be at least min bits"),
        ({"tune_steps": "-1"}, "tune_steps", "greater than or equal to 0"),
        ({"target": "analytic"}, "objective", "computes costs and measures no time"),
    ],
)
def test_new_run_errors_beside_fields(client, alice, dispatch, extra, field, message):
    m = make_model(alice)
    resp = client.post(reverse("ui:run-new"), run_post(m, **extra))
    html = resp.content.decode()
    assert resp.status_code == 200
    block = html[html.index(f'id="field-{field}"') :]
    block = block[: block.index("</div>\n", block.index('<ul class="errors">'))]
    assert message in block
    # and summarised at the top of the long form, each linking to its field (a UI review found errors off-screen)
    summary = html[html.index('id="form-error-summary"') :]
    summary = summary[: summary.index("</div></div>")]
    assert f'href="#field-{field}"' in summary and message in summary
    assert html.index('id="form-error-summary"') < html.index(f'id="field-{field}"')
    assert dispatch.calls == []


def _field_html(html: str, name: str) -> str:
    """The rendered element (input, or select with its options) whose name is ``name``."""
    import re

    m = re.search(rf'<(input|select)[^>]*name="{re.escape(name)}"[^>]*>', html)
    assert m, name
    if m.group(1) == "input":
        return m.group(0)
    return html[m.start() : html.index("</select>", m.end())]


def test_run_again_copies_every_setting_of_the_source_run(
    client, alice, dispatch, django_capture_on_commit_callbacks
):
    """ "Run again…" is the same experiment: the form comes back with every setting of the run, its agent's too."""
    import re

    from webapp.models import Run

    m = make_model(alice)
    post = run_post(
        m,
        agent_amc__warmup_episodes="4",
        max_bits="6",
        min_bits="3",
        reconstruct="false",
        free_precision="false",
        layout="prune",
        enforce_budget="true",
        budget_mode="repair",
        tune_steps="5",
        export_formats=["pt2"],
    )
    with django_capture_on_commit_callbacks(execute=True):
        client.post(reverse("ui:run-new"), post)
    run = Run.objects.get()
    html = client.get(reverse("ui:run-new") + f"?from={run.pk}").content.decode()
    for name, value in (
        ("agent_amc__warmup_episodes", "4"),
        ("max_bits", "6"),
        ("min_bits", "3"),
        ("tune_steps", "5"),
        ("episodes", "12"),
        ("budget", "0.5"),
    ):
        assert f'value="{value}"' in _field_html(html, name), (name, _field_html(html, name))
    for name, value in (
        ("reconstruct", "false"),
        ("free_precision", "false"),
        ("layout", "prune"),
        ("enforce_budget", "true"),
        ("budget_mode", "repair"),
        ("target", "local-ort"),
        ("agent", "amc"),
    ):
        assert re.search(rf'<option value="{value}"[^>]*selected', _field_html(html, name)), name
    formats = re.findall(r'<input[^>]*name="export_formats"[^>]*>', html)
    assert [("checked" in f) for f in formats] == [True, False]  # pt2 only


def test_an_agents_other_name_is_accepted(client, alice, dispatch, django_capture_on_commit_callbacks):
    from webapp.models import Run

    m = make_model(alice)
    with django_capture_on_commit_callbacks(execute=True):
        resp = client.post(
            reverse("ui:run-new"), run_post(m, agent="galen-pq")
        )  # the README's and CLI's name
    run = Run.objects.get()
    assert resp.status_code == 302 and run.agent == "galen" and run.config["agent"] == "galen"


def test_new_run_refuses_dataset_with_more_classes(client, alice):
    m = make_model(alice)
    m.inspection = {**small_cnn_inspection(), "num_classes": 5}
    m.save()
    html = client.post(reverse("ui:run-new"), run_post(m)).content.decode()
    assert "digits has 10 classes but small-cnn outputs 5" in html


def test_haq_bool_setting_can_be_switched_off(client, alice, dispatch, django_capture_on_commit_callbacks):
    m = make_model(alice)
    data = run_post(m, agent="haq", objective="bops")
    from webapp.forms import agent_field_name

    del data[agent_field_name("haq", "pin_first_last_8bit")]  # unticked: the browser does not send it
    with django_capture_on_commit_callbacks(execute=True):
        client.post(reverse("ui:run-new"), data)
    from webapp.models import Run

    assert Run.objects.get().config["agent_config"] == {"pin_first_last_8bit": False}


# --- the run page ----------------------------------------------------------------------------------------


def test_a_run_without_episodes_shows_no_policy(client, alice):
    """A run that failed before its first episode: no table of unpruned float layers as its "best policy"."""
    run = make_run(alice, episodes=0, status="failed")
    html = client.get(reverse("ui:run", args=[run.pk])).content.decode()
    table = html[html.index('id="best-policy"') :]
    table = table[: table.index("</table>")]
    assert "No episode within budget yet." in table and "<code>" not in table


def test_run_page_carries_what_the_live_script_needs(client, alice):
    run = make_run(alice, episodes=30)
    resp = client.get(reverse("ui:run", args=[run.pk]))
    html = resp.content.decode()
    page = json.loads(html.split('<script id="run-page" type="application/json">')[1].split("</script>")[0])
    assert page["ws"] == f"/ws/runs/{run.pk}/"
    assert page["layers"] == [r["name"] for r in small_cnn_inspection()["layers"]]
    assert page["cost_field"] == "latency_ms" and page["has_latency"] is True
    assert page["run"]["episodes_done"] == 30
    assert page["channels"]["features.0"] == small_cnn_inspection()["layers"][0]["out_channels"]
    for chart in (
        "chart-reward",
        "chart-accuracy",
        "chart-latency",
        "chart-size",
        "heat-keep",
        "heat-bits",
        "chart-pareto",
    ):
        assert f'id="{chart}"' in html
    assert reverse("ui:plotly") in html and "js/run.js" in html
    best = run.best["policy"]["layers"]
    table = html[html.index('id="best-policy"') :]
    assert all(f"<code>{name}</code>" in table for name in best)
    assert 'id="cancel-run"' in html and 'id="resume-run"' not in html


def test_finished_run_shows_results_and_downloads(client, alice):
    run = make_run(alice, episodes=12, status="finished")
    run.summary = {
        "status": "finished",
        "best_episode": run.best["number"],
        "within_budget": True,
        "accuracy": {
            "original_test": 0.95,
            "compressed_test": 0.931,
            "compressed_test_before_fine_tune": 0.8,
        },
        "latency": {"original": {"median_ms": 2.0}, "compressed": {"median_ms": 0.8}, "speedup": 2.5},
        "costs": {"before": {"bytes": 400000}, "after": {"bytes": 100000}, "ratio": {"macs": 0.3}},
        "timing": {"search_s": 61.0, "finalize_s": 5.0},
        "candidates": [
            {"episode": run.best["number"], "reward": 0.9, "val_accuracy": 0.9, "test_accuracy": 0.931},
            {
                "episode": 999,
                "reward": 0.8,
                "val_accuracy": 0.8,
                "test_accuracy": 0.7,
                "fine_tune_kept": False,
            },
        ],
    }
    run.save()
    a = add_artifact(run, "model.pt2", b"PK\x03\x04" + b"x" * 3000)
    html = client.get(reverse("ui:run", args=[run.pk])).content.decode()
    assert "93.10%" in html and "2.50×" in html and "800 µs" in html and "2.00 ms" in html
    assert "model.pt2" in html and "2.9 KiB" in html and "torch.export.load" in html
    assert html.count("(fine-tune undone)") == 1  # only the candidate whose fine-tune was undone says so
    dl = client.get(reverse("ui:artifact", args=[run.pk, a.pk]))
    assert dl.status_code == 200 and b"".join(dl.streaming_content) == b"PK\x03\x04" + b"x" * 3000
    assert 'filename="model.pt2"' in dl["Content-Disposition"]
    assert 'id="over-budget"' not in html
    # the device disagreed with the latency table: the page says the budget was not met there
    run.summary["latency"]["over_budget"] = (
        "measured end to end at 113% of the original's latency, over the 85% budget"
    )
    run.save()
    html = client.get(reverse("ui:run", args=[run.pk])).content.decode()
    assert (
        'id="over-budget"' in html and "113% of the original" in html and "over budget on the device" in html
    )
    assert 'id="device-check"' not in html  # a report from before the device check: nothing claimed
    # the candidates were checked on the device: their measured ratios and the ones it replaced are shown
    del run.summary["latency"]["over_budget"]
    run.summary["candidates"][0]["measured_ratio"] = 0.412
    run.summary["latency"]["device_check"] = {
        "rounds": 3,
        "limit": 0.55,
        "measured": [
            {"episode": run.best["number"], "measured_ratio": 0.412},
            {"episode": 7, "measured_ratio": 0.71},
        ],
        "dropped_over_budget": [7],
        "fits": True,
        "seconds": 4.2,
    }
    run.save()
    html = client.get(reverse("ui:run", args=[run.pk])).content.decode()
    note = html[html.index('id="device-check"') :].split("</p>")[0]
    assert "2 policies measured against the original in 3 interleaved rounds" in note
    assert "replaced: episode 7." in note and "0.412" in html


def test_artifact_missing_on_disk_is_404(client, alice):
    run = make_run(alice, episodes=1, status="finished")
    a = add_artifact(run, "model.onnx", b"onnx")
    os.remove(run.out_path / "model.onnx")
    assert client.get(reverse("ui:artifact", args=[run.pk, a.pk])).status_code == 404


def test_cancel_and_resume(client, alice, dispatch):
    run = make_run(alice, episodes=3)
    resp = client.post(reverse("ui:run-cancel", args=[run.pk]))
    assert resp.status_code == 302 and dispatch.calls == [("request_cancel", (run,))]
    run.status = "cancelled"
    run.save()
    no_ckpt = client.post(reverse("ui:run-resume", args=[run.pk]), follow=True)
    assert b"without a checkpoint cannot be resumed" in no_ckpt.content
    run.checkpoint_episode = 3
    run.save()
    client.post(reverse("ui:run-resume", args=[run.pk]))
    assert dispatch.names() == ["request_cancel", "resume_run"]
    html = client.get(reverse("ui:run", args=[run.pk])).content.decode()
    assert 'id="resume-run"' in html and 'id="cancel-run"' not in html


def test_a_run_failed_on_its_input_offers_a_new_run_not_a_resume(client, alice, dispatch):
    run = make_run(alice, episodes=4, status="failed")
    run.error, run.error_kind, run.checkpoint_episode = "the dataset has 3 classes, the model 10", "input", 4
    run.save()
    html = client.get(reverse("ui:run", args=[run.pk])).content.decode()
    assert 'id="resume-run"' not in html and "Resuming would fail the same way" in html
    assert f"?from={run.pk}" in html[html.index('id="run-error"') :]
    refused = client.post(reverse("ui:run-resume", args=[run.pk]), follow=True).content.decode()
    assert "would fail the same way again" in refused and dispatch.names() == []
    # nothing exported, and the page says so beside what the run did keep
    add_artifact(run, "best_policy.json", b'{"layers": {}}', kind="policy")
    html = client.get(reverse("ui:run", args=[run.pk])).content.decode()
    assert "No compressed model was exported: the run failed after 4 episodes." in html
    # a device's failure can be resumed once the device answers again
    run.error_kind = "device"
    run.save()
    html = client.get(reverse("ui:run", args=[run.pk])).content.decode()
    assert 'id="resume-run"' in html and "Check the target" in html
    assert "resume it to finish the search, fine-tune and export its best policy" in html


def test_favicon_is_served(client):
    resp = client.get("/favicon.ico")
    assert resp.status_code == 200 and resp["Content-Type"] == "image/svg+xml" and b"<svg" in resp.content


def test_episodes_csv(client, alice):
    run = make_run(alice, episodes=25)
    resp = client.get(reverse("ui:run-episodes-csv", args=[run.pk]))
    lines = b"".join(resp.streaming_content).decode().strip().splitlines()
    assert len(lines) == 26 and lines[0].startswith("number,stage,reward,accuracy,latency_ms")
    assert lines[1].split(",")[0] == "1" and lines[-1].split(",")[0] == "25"


def test_large_run_page_is_fast_and_overview_is_downsampled(client, alice):
    from webapp.views import runinfo

    run = make_run(alice, episodes=3000)
    t0 = time.perf_counter()
    resp = client.get(reverse("ui:run", args=[run.pk]))
    elapsed = time.perf_counter() - t0
    assert resp.status_code == 200 and elapsed < 2.0, elapsed
    assert len(resp.content) < 200_000  # episodes come over the websocket, downsampled, not in the page
    episodes, downsampled, total = runinfo.overview_episodes(run, limit=400)
    numbers = [e["number"] for e in episodes]
    bests = list(run.episodes.filter(is_best=True).values_list("number", flat=True))
    assert downsampled and total == 3000 and len(episodes) <= 400 + len(bests)
    assert numbers[0] == 1 and numbers[-1] == 3000 and numbers == sorted(numbers)
    assert set(bests) <= set(numbers) and run.best["number"] in numbers


# --- compare -------------------------------------------------------------------------------------------


def test_compare_two_runs(client, alice):
    a = make_run(alice, episodes=20, agent="amc")
    b = make_run(alice, model=a.model, episodes=15, agent="random", status="finished", budget=0.3)
    resp = client.get(reverse("ui:compare") + f"?ids={a.pk}&ids={b.pk}")
    html = resp.content.decode()
    data = json.loads(
        html.split('<script id="compare-data" type="application/json">')[1].split("</script>")[0]
    )
    assert [s["id"] for s in data] == [a.pk, b.pk]
    assert [len(s["episodes"]) for s in data] == [20, 15]
    assert data[0]["best_policy"]["layers"]
    table = html[html.index('id="compare-config"') :]
    assert '<tr class="differs"><td>agent' in table and '<tr class="differs"><td>budget' in table
    assert "<tr><td>model</td>" in table  # same model: not highlighted
    assert html.count('class="swatch"') == 2
    one = client.get(reverse("ui:compare") + f"?ids={a.pk}")
    assert b"Pick two or more runs" in one.content and b"compare-data" not in one.content
    gone = client.get(reverse("ui:compare") + f"?ids={a.pk}&ids=99999").content.decode()
    assert "no run #99999 to compare: it does not exist or is not yours to see" in gone


def test_compare_warns_when_an_axis_mixes_what_does_not_compare(client, alice):
    a = make_run(alice, episodes=5, objective="latency")
    b = make_run(alice, model=a.model, episodes=5, objective="bops")
    c = make_run(alice, model=a.model, episodes=5, objective="latency")
    mixed = client.get(reverse("ui:compare") + f"?ids={a.pk}&ids={b.pk}").content.decode()
    assert "These runs optimise different costs (bops, latency)" in mixed
    same = client.get(reverse("ui:compare") + f"?ids={a.pk}&ids={c.pk}").content.decode()
    assert 'class="callout axis-note"' not in same


# --- plumbing ------------------------------------------------------------------------------------------


def test_plotly_is_served_locally_with_caching(client):
    resp = client.get(reverse("ui:plotly"))
    body = b"".join(resp.streaming_content)
    assert resp.status_code == 200 and body.startswith(b"/**\n* plotly.js v") and len(body) > 1_000_000
    assert "javascript" in resp["Content-Type"] and "max-age=86400" in resp["Cache-Control"]
    again = client.get(reverse("ui:plotly"), HTTP_IF_NONE_MATCH=resp["ETag"])
    assert again.status_code == 304
    import gzip

    zipped = client.get(reverse("ui:plotly"), HTTP_ACCEPT_ENCODING="gzip, deflate")
    packed = b"".join(zipped.streaming_content)
    assert zipped["Content-Encoding"] == "gzip" and len(packed) < len(body) / 2
    assert gzip.decompress(packed) == body
    again = client.get(reverse("ui:plotly"), HTTP_ACCEPT_ENCODING="gzip", HTTP_IF_NONE_MATCH=zipped["ETag"])
    assert again.status_code == 304


def test_agent_catalog_snapshot_matches_engine():
    from webapp.catalog import build_catalog, catalog

    assert catalog() == json.loads(json.dumps(build_catalog())), "run: python -m webapp.catalog"


def test_pages_and_api_do_not_import_torch(tmp_path):
    code = (
        "import os, sys, django\n"
        "os.environ['DJANGO_SETTINGS_MODULE'] = 'webapp.settings'\n"
        "django.setup()\n"
        "from django.urls import get_resolver\n"
        "import webapp.urls, webapp.api, webapp.openapi, webapp.forms, webapp.views.runs\n"
        "get_resolver().url_patterns; webapp.openapi.schema()\n"
        "from django.template.loader import get_template\n"
        "for t in ['runs/detail.html', 'runs/new.html', 'runs/compare.html', 'models/detail.html', 'home.html']:\n"
        "    get_template(t)\n"
        "heavy = [m for m in ('torch', 'numpy', 'tvm', 'onnxruntime', 'compression.agents') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    env = {**os.environ, "VAR_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_a_measurement_is_shown_in_its_own_unit() -> None:
    """The analytic target's "measurements" are costs (a UI review saw "2 µs" for 2 GBOPs); a noisy time says so."""
    from webapp.templatetags.ui import measured

    analytic = {
        "median_ms": 2.25,
        "mean_ms": 2.25,
        "std_ms": 0.0,
        "details": {"analytic": True, "unit": "GBOPs"},
    }
    assert measured(analytic) == "2.25 GBOPs (analytic, not a time)"
    assert measured({"median_ms": 15.36, "mean_ms": 70.1, "std_ms": 80.6, "details": {}}) == (
        "15.36 ms (noisy: std 115% of the mean)"
    )
    assert measured({"median_ms": 0.42, "mean_ms": 0.43, "std_ms": 0.01}) == "420 µs"
    assert measured(None) == "—" and measured({"median_ms": None}) == "—"


def test_deleting_a_model_with_a_running_search_says_to_cancel_it_first(client, alice):
    from webapp.models import UploadedModel

    run = make_run(alice, episodes=1, status="running")
    resp = client.post(reverse("ui:model-delete", args=[run.model.pk]), follow=True)
    html = resp.content.decode()
    assert f"has runs still queued or running (#{run.pk}): cancel them first" in html
    assert UploadedModel.objects.filter(pk=run.model.pk).exists()
