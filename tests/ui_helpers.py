"""Shared helpers of the dashboard tests (views, API, permissions): users, a real ``.pt2``, the engine's
real layer table of a small model, and runs with episodes whose policies name that model's layers.

The episode numbers made here are test input for the display code (charts, tables, downsampling), not
results shown as measurements anywhere.
"""

from __future__ import annotations

import io
import os
import random
from functools import lru_cache
from pathlib import Path
from typing import Any

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "webapp.settings")

PASSWORD = "s3cret-pass-123"


def make_user(username: str, staff: bool = False):
    """A user with the shared test password."""
    from django.contrib.auth.models import User

    return User.objects.create_user(username, password=PASSWORD, is_staff=staff)


@lru_cache(maxsize=1)
def tiny_pt2_bytes() -> bytes:
    """A small conv net (1x8x8 input, 10 classes) exported with torch.export and saved as ``.pt2``."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    ).eval()
    buf = io.BytesIO()
    torch.export.save(torch.export.export(net, (torch.randn(1, 1, 8, 8),)), buf)
    return buf.getvalue()


@lru_cache(maxsize=1)
def small_cnn_inspection() -> dict[str, Any]:
    """The engine's real inspection of ``zoo:small_cnn`` at 1x8x8 (what the worker stores on a model)."""
    from compression.pipeline import inspect_model

    return inspect_model("zoo:small_cnn", input_shape=(1, 8, 8))


def make_model(owner, name: str = "small-cnn", status: str = "ready"):
    """A zoo model row with the real inspection (as if a worker had inspected it)."""
    from webapp.models import UploadedModel

    insp = small_cnn_inspection() if status == "ready" else None
    return UploadedModel.objects.create(
        owner=owner,
        name=name,
        kind="zoo",
        zoo_arch="small_cnn",
        input_shape=[1, 8, 8],
        num_classes=10,
        status=status,
        inspection=insp,
    )


def digits():
    """The built-in dataset row (created by the migration)."""
    from webapp.models import Dataset

    return Dataset.objects.get(kind="builtin", name="digits")


def target(name: str = "local-ort"):
    """A built-in target row."""
    from webapp.models import Target

    return Target.objects.get(name=name)


def episode_dict(number: int, layers: list[str], rng: random.Random, best: bool = False) -> dict[str, Any]:
    """One episode as ``EpisodeResult.to_dict()`` lays it out, with a policy over ``layers``."""
    keep = {n: round(rng.uniform(0.3, 1.0), 3) for n in layers}
    bits = {n: rng.choice([2, 4, 6, 8, 32]) for n in layers}
    ratio = sum(keep.values()) / len(layers)
    return {
        "episode": number,
        "reward": round(rng.uniform(0.5, 0.95), 4),
        "accuracy": round(rng.uniform(0.5, 0.95), 4),
        "latency_ms": round(0.2 + ratio, 4),
        "macs": int(1_000_000 * ratio),
        "bops": int(20_000_000 * ratio),
        "params": int(100_000 * ratio),
        "bytes": 400_000 * ratio,
        "cost_ratio": ratio,
        "meets_budget": ratio <= 0.7,
        "is_best": best,
        "policy": {
            "layers": {
                n: {"keep_ratio": keep[n], "w_bits": bits[n], "a_bits": bits[n], "sparsity": 0.0}
                for n in layers
            },
            "meta": {},
        },
        "raw_actions": [[keep[n]] for n in layers],
        "enforced_actions": [[keep[n]] for n in layers],
        "wall_time_s": 0.5,
        "timings": {"apply_s": 0.1},
        "stage": "search",
    }


def make_run(
    owner, model=None, episodes: int = 0, status: str = "running", agent: str = "amc", **config: Any
):
    """A run with ``episodes`` stored episodes; every 7th within budget is marked best (rising reward)."""
    from compression.search.results import SearchConfig
    from webapp.models import Episode, Run

    model = model or make_model(owner)
    cfg = SearchConfig(
        model="zoo:small_cnn", agent=agent, target="local-ort", episodes=max(episodes, 10), **config
    )
    run = Run.objects.create(
        owner=owner,
        name=f"{model.name} {agent}",
        model=model,
        dataset=digits(),
        target=target(),
        agent=agent,
        config=cfg.to_dict(),
        status=status,
        episodes_total=max(episodes, 10),
        episodes_done=episodes,
    )
    layers = [r["name"] for r in model.inspection["layers"]] if model.inspection else ["conv1"]
    rng = random.Random(run.pk)
    rows, best = [], None
    for n in range(1, episodes + 1):
        d = episode_dict(n, layers, rng)
        if d["meets_budget"] and (best is None or d["reward"] > best["reward"]):
            d["is_best"] = True
            best = d
        rows.append(Episode(run=run, number=n, **Episode.defaults_from_result(d)))
    Episode.objects.bulk_create(rows)
    if best is not None:
        run.best = Episode.objects.get(run=run, number=best["episode"]).to_event()
        run.save(update_fields=["best"])
    return run


def add_artifact(run, name: str, content: bytes, kind: str = "pt2"):
    """Write a file into the run's directory and register it as a RunArtifact."""
    from webapp.models import RunArtifact

    out = Path(run.out_path)
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_bytes(content)
    return RunArtifact.objects.create(
        run=run,
        kind=kind,
        path=name,
        bytes=len(content),
        note="test file",
        how_to_load="torch.export.load(...)",
    )


def basic(user_or_name, password: str = PASSWORD) -> dict[str, str]:
    """The HTTP Basic header for the Django test client."""
    import base64

    name = getattr(user_or_name, "username", user_or_name)
    token = base64.b64encode(f"{name}:{password}".encode()).decode()
    return {"HTTP_AUTHORIZATION": f"Basic {token}"}


class DispatchRecorder:
    """Replaces ``workers.dispatch``'s scheduling functions and records the calls (no broker needed)."""

    NAMES = (
        "enqueue_run",
        "request_cancel",
        "resume_run",
        "enqueue_inspect",
        "enqueue_train",
        "enqueue_inspect_dataset",
        "enqueue_benchmark",
        "enqueue_check_target",
    )

    def __init__(self, monkeypatch) -> None:
        from workers import dispatch

        self.calls: list[tuple[str, tuple]] = []
        for name in self.NAMES:
            monkeypatch.setattr(dispatch, name, self._recorder(name))

    def _recorder(self, name: str):
        def record(*args: Any, **kwargs: Any) -> str:
            self.calls.append((name, args))
            return "task-id"

        return record

    def names(self) -> list[str]:
        """The names of the functions called, in order."""
        return [c[0] for c in self.calls]


def trained_digits_pt2(path: str | os.PathLike, epochs: int = 12, seed: int = 0) -> dict[str, Any]:
    """Train a small CNN on the built-in digits (1x8x8) and save it with ``torch.export.save``, as a user
    would before uploading. Returns the test accuracy measured here. A few seconds on one core."""
    import torch
    from torch import nn

    from compression.data import load_dataset

    torch.manual_seed(seed)
    data = load_dataset("digits", input_shape=(1, 8, 8), seed=seed)
    net = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, data.num_classes),
    )
    x, y = data.train.tensors
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        net.train()
        for idx in torch.randperm(len(x), generator=gen).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    net.eval()
    xt, yt = data.test.tensors
    with torch.no_grad():
        acc = float((net(xt).argmax(1) == yt).float().mean())
    torch.export.save(torch.export.export(net, (x[:1],)), str(path))
    return {"test_accuracy": acc, "path": str(path)}
