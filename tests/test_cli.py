"""``python -m compression``: tables by default, JSON with --json, one-line errors with exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "compression", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


def test_zoo_table_and_json():
    out = cli("zoo")
    assert out.returncode == 0, out.stderr
    assert "resnet20" in out.stdout and "mobilenetv2" in out.stdout
    rows = json.loads(cli("zoo", "--json").stdout)
    assert {r["name"] for r in rows} >= {
        "small_cnn",
        "resnet20",
        "resnet56",
        "resnet18",
        "vgg11",
        "vgg16",
        "mobilenetv2",
    }


def test_inspect_a_pt2(trained_small_cnn):
    out = cli("inspect", trained_small_cnn["pt2"])
    assert out.returncode == 0, out.stderr
    assert "prunable groups" in out.stdout and "group leader" in out.stdout
    info = json.loads(cli("inspect", trained_small_cnn["pt2"], "--json").stdout)
    assert info["num_classes"] == 10 and info["input_shape"] == [1, 8, 8]
    assert any(r["prunable"] for r in info["layers"])


def test_evaluate_apply_export_and_search(trained_small_cnn, tmp_path):
    model = trained_small_cnn["pt2"]
    policy = tmp_path / "policy.json"
    info = json.loads(cli("inspect", model, "--json").stdout)
    leaders = [r["name"] for r in info["layers"] if r["group_leader"] and r["prunable"]]
    policy.write_text(
        json.dumps({"layers": {n: {"keep_ratio": 0.5, "w_bits": 8, "a_bits": 8} for n in leaders}})
    )

    ev = json.loads(cli("evaluate", "--model", model, "--policy", str(policy), "--json").stdout)
    assert 0 <= ev["accuracy"]["top1"] <= 1
    assert ev["costs"]["ratio"]["macs"] < 0.6
    # without the least-squares re-fit of the layers after the pruned ones, half the channels cost far more
    plain = cli("evaluate", "--model", model, "--policy", str(policy), "--no-reconstruct", "--json")
    assert json.loads(plain.stdout)["accuracy"]["top1"] < ev["accuracy"]["top1"] - 0.05

    out = tmp_path / "applied"
    res = cli(
        "apply", "--model", model, "--policy", str(policy), "--out", str(out), "--fine-tune-epochs", "1"
    )
    assert res.returncode == 0, res.stderr
    assert "test top-1" in res.stdout
    assert (
        (out / "model.pt2").exists() and (out / "model.onnx").exists() and (out / "model.int8.onnx").exists()
    )
    report = json.loads((out / "report.json").read_text())
    assert report["fine_tune"]["epochs"] == 1

    exp = tmp_path / "exported"
    res = cli("export", "--model", model, "--out", str(exp), "--formats", "onnx", "--json")
    assert res.returncode == 0, res.stderr
    assert [f["format"] for f in json.loads(res.stdout)["files"]] == ["onnx", "report"]

    run = tmp_path / "run"
    res = cli(
        "search",
        "--model",
        model,
        "--agent",
        "random",
        "--layout",
        "prune",
        "--target",
        "analytic",
        "--objective",
        "macs",
        "--budget",
        "0.5",
        "--episodes",
        "3",
        "--val-samples",
        "100",
        "--fine-tune-epochs",
        "0",
        "--top-k",
        "1",
        "--out",
        str(run),
    )
    assert res.returncode == 0, res.stderr
    assert "best episode" in res.stdout
    assert len((run / "episodes.jsonl").read_text().splitlines()) == 3
    stored = json.loads((run / "config.json").read_text())
    assert stored["reconstruct"] is True and stored["float_bits"] is True and stored["free_precision"] is True
    again = cli("search", "--model", model, "--out", str(run))
    assert again.returncode == 2 and "already holds a search" in again.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (("inspect", "zoo:resnet999"), "unknown zoo model"),
        (("inspect", "/nonexistent/model.pt2"), "does not exist"),
        (("inspect", "weights.pth"), "not a model graph"),
        (("evaluate", "--model", "zoo:small_cnn", "--dataset", "/nope/data.npz"), "error:"),
        (("search", "--model", "zoo:small_cnn", "--budget", "1.5", "--out", "/tmp/x-never"), "budget"),
    ],
)
def test_errors_are_one_line_and_exit_2(args, message):
    out = cli(*args)
    assert out.returncode == 2, (out.returncode, out.stderr)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), out.stderr
    assert message in lines[0]


def test_dataset_that_does_not_fit_the_model_is_refused(tmp_path):
    import numpy as np

    data = tmp_path / "five.npz"
    np.savez(data, x=np.random.rand(50, 1, 8, 8).astype("float32"), y=np.arange(50) % 12)
    out = cli("evaluate", "--model", "zoo:small_cnn", "--input-shape", "1x8x8", "--dataset", str(data))
    # zoo models take their class count from the dataset; a .pt2 with 10 outputs cannot take 12 classes
    assert out.returncode == 0, out.stderr
    model = tmp_path / "m.pt2"
    subprocess.run(
        [
            sys.executable,
            "-c",
            (
                "import torch; from compression.models.zoo import build_zoo_model; from compression.pipeline import save_pt2;"
                f"save_pt2(build_zoo_model('small_cnn', 10, 1, 8).eval(), torch.zeros(2, 1, 8, 8), {str(model)!r})"
            ),
        ],
        check=True,
        env=dict(os.environ, PYTHONPATH=ROOT),
        cwd=ROOT,
        timeout=300,
    )
    out = cli("evaluate", "--model", str(model), "--dataset", str(data))
    assert out.returncode == 2
    assert "12 classes but the model outputs 10" in out.stderr
