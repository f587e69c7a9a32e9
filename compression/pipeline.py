"""The engine's high-level operations: what the CLI commands and the Celery tasks both call.

Each function takes plain arguments (specs, paths, numbers), does one job, and returns plain data or the
engine's objects. ``progress`` callbacks let the caller draw a bar or write a log line.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from compression.costs import compute_costs
from compression.data import DatasetSplits, check_compatible, load_dataset
from compression.errors import CompressionError, DatasetError
from compression.models import LayerGraph, ModelArtifact, load_model
from compression.policy import Policy
from compression.training import evaluate

Progress = Callable[[int, int, dict], None]

# Written into every .pt2 we save, so a model remembers how its inputs were normalised.
META_NAME = "compression.json"


@dataclass
class Workspace:
    """A model, its dataset (adapted to the model's input) and its layer graph, ready to compress."""

    artifact: ModelArtifact
    data: DatasetSplits
    graph: LayerGraph
    warnings: list[str]

    def calibration_batch(self, n: int = 256, seed: int = 0) -> torch.Tensor:
        """``n`` training inputs (deterministic) for batch-norm re-estimation and activation ranges."""
        x = self.data.train.tensors[0]
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
        return x[idx]

    def search_set(
        self, n: int, calib_samples: int, seed: int = 0, top_up: bool = True
    ) -> tuple[torch.utils.data.TensorDataset, dict[str, int]]:
        """The images a search scores its candidates on: up to ``n`` validation images and, when the validation
        split holds fewer and ``top_up`` is on, training images that ``calibration_batch(calib_samples, seed)``
        does not use (the batch the re-fit and batch-norm re-estimation see). Deterministic.

        AMC scores its reward on held-out training images; here the validation split comes first. A small
        validation split cannot rank candidates that differ by a point or two (digits: 180 images, 0.56 points
        each; ``bench/search_set.py`` measures the ranking). Returns the set and how many images came from each split.
        """
        from torch.utils.data import TensorDataset

        from compression.training import subset

        val = subset(self.data.val, n, seed)
        need = n - len(val)
        if not top_up or need <= 0:
            return val, {"validation": len(val), "training": 0}
        xt, yt = self.data.train.tensors
        idx = torch.randperm(len(xt), generator=torch.Generator().manual_seed(seed))[calib_samples:][:need]
        xv, yv = val.tensors
        images = TensorDataset(torch.cat([xv, xt[idx]]), torch.cat([yv, yt[idx]]))
        return images, {"validation": len(val), "training": len(idx)}

    def tune_set(
        self, n: int, calib_samples: int, seed: int = 0, top_up: bool = True
    ) -> torch.utils.data.TensorDataset:
        """The training images that ``search_set(n, calib_samples, seed, top_up)`` does not use: what a search's
        per-candidate short fine-tune trains on (``EnvSettings.tune_steps``), so the search set stays unseen.
        It includes the calibration batch. Deterministic; may be empty when the top-up took every other image."""
        from torch.utils.data import TensorDataset

        _, used = self.search_set(n, calib_samples, seed, top_up)
        xt, yt = self.data.train.tensors
        perm = torch.randperm(len(xt), generator=torch.Generator().manual_seed(seed))
        keep = torch.cat([perm[:calib_samples], perm[calib_samples + used["training"] :]])
        return TensorDataset(xt[keep], yt[keep])


def read_model_meta(path: str) -> dict[str, Any]:
    """Normalisation and dataset facts stored in a ``.pt2`` we wrote (empty for others)."""
    import zipfile

    if not path.endswith(".pt2") or not os.path.exists(path):
        return {}
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if info.filename.endswith("/extra/" + META_NAME) and info.file_size < 1_000_000:
                    return json.loads(zf.read(info).decode("utf-8"))
    except (zipfile.BadZipFile, ValueError, OSError):
        return {}
    return {}


def open_workspace(
    model_spec: str,
    dataset_spec: str,
    *,
    seed: int = 0,
    num_classes: int | None = None,
    input_shape: tuple[int, int, int] | None = None,
    max_samples: int | None = None,
) -> Workspace:
    """Load a model and a dataset, check they fit, and build the layer graph.

    The dataset is adapted to the model's input shape. If the model is a ``.pt2`` we trained, the
    normalisation it was trained with is reused. A dataset that does not fit is refused before any work.
    """
    if num_classes is None and model_spec.startswith("zoo:") and "@" not in model_spec:
        from compression.data import describe_dataset

        num_classes = int(describe_dataset(dataset_spec)["num_classes"])
    artifact = load_model(model_spec, num_classes=num_classes, input_shape=input_shape)
    meta = read_model_meta(model_spec)
    compat = check_compatible(
        _describe(dataset_spec),
        model_input_shape=artifact.input_shape,
        model_num_classes=artifact.num_classes,
    )
    norm = None
    if meta.get("mean") and meta.get("std"):
        norm = (meta["mean"], meta["std"])
    data = load_dataset(
        dataset_spec, input_shape=artifact.input_shape, seed=seed, max_samples=max_samples, normalization=norm
    )
    check_compatible(data, model_input_shape=artifact.input_shape, model_num_classes=artifact.num_classes)
    graph = LayerGraph.build(artifact.module, artifact.input_shape, num_classes=artifact.num_classes)
    return Workspace(artifact, data, graph, list(compat.warnings) + list(data.warnings))


def _describe(dataset_spec: str) -> dict[str, Any]:
    from compression.data import describe_dataset

    return describe_dataset(dataset_spec)


def inspect_model(model_spec: str, *, num_classes: int | None = None, input_shape=None) -> dict[str, Any]:
    """The per-layer table and summary of a model (no dataset needed)."""
    artifact = load_model(model_spec, num_classes=num_classes, input_shape=input_shape)
    graph = LayerGraph.build(artifact.module, artifact.input_shape, num_classes=artifact.num_classes)
    return {
        "model": model_spec,
        "arch": artifact.arch,
        "input_shape": list(artifact.input_shape),
        "num_classes": artifact.num_classes,
        "summary": graph.summary(),
        "layers": graph.rows(),
        "groups": [g.to_dict() for g in graph.groups],
        "info": artifact.info,
    }


def save_pt2(
    module: torch.nn.Module, example_input: torch.Tensor, path: str, meta: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Export ``module`` with ``torch.export`` (batch dimension dynamic when possible) and save a ``.pt2``.

    ``meta`` is stored inside the archive as ``extra/compression.json``. Returns facts about the export.
    """
    from torch.export import Dim, export, save

    module.eval()
    dynamic = True
    try:
        batch = Dim("batch", min=1, max=4096)
        ep = export(module, (example_input,), dynamic_shapes=({0: batch},), strict=False)
    except Exception:
        # Some graphs specialise on the batch size; a static batch still deploys.
        dynamic = False
        ep = export(module, (example_input,), strict=False)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save(ep, path, extra_files={META_NAME: json.dumps(meta or {})})
    return {"path": path, "bytes": os.path.getsize(path), "dynamic_batch": dynamic}


def train_baseline(
    arch: str,
    dataset_spec: str,
    out_path: str,
    *,
    epochs: int = 15,
    lr: float = 0.05,
    batch_size: int = 64,
    seed: int = 0,
    input_shape: tuple[int, int, int] | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Train a zoo architecture on a dataset and save it as a ``.pt2`` with its normalisation inside.

    ``input_shape`` defaults to the dataset's channels at 32x32 (zoo models are CIFAR-style).
    """
    from compression.data import describe_dataset
    from compression.models.zoo import build_zoo_model
    from compression.training import train

    desc = describe_dataset(dataset_spec)
    if input_shape is None:
        native = desc.get("native_shape") or desc.get("input_shape") or [3, 32, 32]
        input_shape = (int(native[0]), 32, 32)
    c, h, w = input_shape
    if h != w:
        raise DatasetError(f"zoo models take square inputs, got {h}x{w}", "pass --input-shape CxSxS")
    data = load_dataset(dataset_spec, input_shape=input_shape, seed=seed)
    torch.manual_seed(seed)
    model = build_zoo_model(arch, num_classes=data.num_classes, in_channels=c, input_size=h)
    t0 = time.perf_counter()
    history = train(
        model, data.train, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, progress=progress
    )
    seconds = time.perf_counter() - t0
    val = evaluate(model, data.val)
    test = evaluate(model, data.test)
    meta = {
        "arch": arch,
        "dataset": dataset_spec,
        "input_shape": list(input_shape),
        "num_classes": data.num_classes,
        "class_names": list(data.class_names),
        "mean": list(data.mean),
        "std": list(data.std),
        "seed": seed,
        "val_top1": val.top1,
        "test_top1": test.top1,
    }
    saved = save_pt2(model, torch.zeros((1, *input_shape)), out_path, meta)
    weights = os.path.splitext(out_path)[0] + ".pth"
    torch.save(model.state_dict(), weights)
    return {
        "model": out_path,
        "weights": weights,
        "arch": arch,
        "dataset": dataset_spec,
        "input_shape": list(input_shape),
        "epochs": epochs,
        "train_seconds": seconds,
        "history": history,
        "val": val.to_dict(),
        "test": test.to_dict(),
        "file_bytes": saved["bytes"],
    }


def load_policy(path_or_json: str) -> Policy:
    """A policy from a JSON file path or a JSON string."""
    text = path_or_json
    if not path_or_json.lstrip().startswith("{"):
        if not os.path.exists(path_or_json):
            raise CompressionError(f"policy file {path_or_json} does not exist", "check the path")
        with open(path_or_json, encoding="utf-8") as f:
            text = f.read()
    return Policy.from_json(text)


def versions() -> dict[str, str]:
    """Library versions for reports."""
    import platform

    import numpy
    import torch_pruning

    import compression

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_pruning": getattr(torch_pruning, "__version__", "?"),
        "numpy": numpy.__version__,
        "compression": compression.__version__,
    }
    for mod in ("onnx", "onnxruntime", "tvm"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # optional at report time
            pass
    return out


def costs_summary(graph: LayerGraph, policy: Policy | None, round_to: int = 1) -> dict[str, Any]:
    """Costs before and after a policy, with ratios."""
    before = compute_costs(graph, None)
    after = compute_costs(graph, policy, round_to) if policy is not None else before
    return {
        "before": before.to_dict(),
        "after": after.to_dict(),
        "ratio": {
            k: (after.get(k) / before.get(k) if before.get(k) else 1.0)
            for k in ("macs", "bops", "params", "bytes")
        },
    }
