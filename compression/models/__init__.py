"""Models in: the built-in zoo, safe ingestion of uploads (``.pt2``, state dicts) and the layer graph.

A model argument everywhere (CLI, workers, dashboard) is a *spec* string:

- ``zoo:NAME`` — a freshly initialised zoo architecture, e.g. ``zoo:resnet20``;
- ``zoo:NAME@WEIGHTS`` — the same with a ``state_dict`` file loaded safely (``weights_only=True``) and a
  strict shape check, e.g. ``zoo:resnet20@resnet20.pth``;
- a path to a ``.pt2`` file written by ``torch.export.save`` — vetted (no unsafe pickles), loaded, and
  lifted into a module with real Conv2d / Linear / BatchNorm layers.

May import: torch, torch-pruning and the rest of ``compression``; never ``webapp`` or ``workers``.
"""

from __future__ import annotations

import os

from compression.errors import ModelError
from compression.models.artifact import ModelArtifact
from compression.models.graph import LayerGraph, LayerInfo, PruneGroup

__all__ = ["ModelArtifact", "LayerGraph", "LayerInfo", "PruneGroup", "load_model", "parse_model_spec"]


def parse_model_spec(spec: str) -> tuple[str, str | None, str | None]:
    """Split a model spec into (kind, name_or_path, weights): kind is ``zoo`` or ``pt2``."""
    if not isinstance(spec, str) or not spec.strip():
        raise ModelError("no model given", "use zoo:NAME (e.g. zoo:resnet20) or a .pt2 file")
    spec = spec.strip()
    if spec.startswith("zoo:"):
        body = spec[4:]
        name, _, weights = body.partition("@")
        if not name:
            raise ModelError(
                f"model spec {spec!r} has no zoo name", "e.g. zoo:resnet20 or zoo:resnet20@w.pth"
            )
        return "zoo", name, (weights or None)
    ext = os.path.splitext(spec)[1].lower()
    if ext == ".pt2":
        return "pt2", spec, None
    if ext in (".pt", ".pth", ".bin", ".ckpt", ".pkl"):
        raise ModelError(
            f"{os.path.basename(spec)} is a weights/pickle file, not a model graph",
            "upload a .pt2 from torch.export.save, or use zoo:NAME@" + os.path.basename(spec),
        )
    raise ModelError(
        f"cannot tell what kind of model {spec!r} is",
        "use zoo:NAME, zoo:NAME@weights.pth, or a .pt2 file written by torch.export.save",
    )


def load_model(
    spec: str,
    *,
    num_classes: int | None = None,
    input_shape: tuple[int, int, int] | None = None,
) -> ModelArtifact:
    """Load a model from a spec (see the module docstring) as a float, eval-mode ``ModelArtifact``.

    For zoo models ``num_classes`` (default 10, or read from the weights file) and ``input_shape``
    (default ``(3, 32, 32)``; channels read from the weights file when given) choose the architecture's
    variant. For ``.pt2`` files both come from the file; a given value that disagrees is an error.
    """
    kind, name, weights = parse_model_spec(spec)
    if kind == "zoo":
        from compression.models.zoo import build_zoo_model, load_state_dict_into

        state = None
        if weights is not None:
            from compression.models.safety import load_state_dict_file

            if not os.path.exists(weights):
                raise ModelError(f"weights file {weights} does not exist", "check the path after '@'")
            state = load_state_dict_file(weights)
        c, h, w = input_shape or (None, 32, 32)
        if h != w:
            raise ModelError(f"zoo models take square inputs, got {h}x{w}", "resize the data to a square")
        if state is not None:
            num_classes, c = _infer_from_state(state, num_classes, c)
        model = build_zoo_model(name, num_classes=num_classes or 10, in_channels=c or 3, input_size=h)
        if state is not None:
            load_state_dict_into(model, state)
        model.eval()
        shape = (c or 3, h, w)
        return ModelArtifact(model, shape, num_classes or 10, spec, arch=name, info={"weights": weights})

    from compression.models.pt2 import load_pt2

    if not os.path.exists(name):
        raise ModelError(f"model file {name} does not exist", "check the path")
    art = load_pt2(name, num_classes=num_classes)
    if input_shape is not None and tuple(input_shape) != tuple(art.input_shape):
        raise ModelError(
            f"the model takes inputs of shape {art.input_shape}, not {tuple(input_shape)}",
            "leave the input shape unset for .pt2 models: it comes from the file",
        )
    return art


def _infer_from_state(
    state: dict, num_classes: int | None, channels: int | None
) -> tuple[int | None, int | None]:
    """Read the class count (last 2-D weight) and input channels (first 4-D weight) from a state dict."""
    mats = [v for k, v in state.items() if k.endswith("weight") and getattr(v, "ndim", 0) == 2]
    convs = [v for k, v in state.items() if k.endswith("weight") and getattr(v, "ndim", 0) == 4]
    if num_classes is None and mats:
        num_classes = int(mats[-1].shape[0])
    if channels is None and convs:
        channels = int(convs[0].shape[1])
    return num_classes, channels
