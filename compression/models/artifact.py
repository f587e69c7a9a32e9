"""The in-memory form of a model the engine works on."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class ModelArtifact:
    """A loaded, float, eval-mode model with what the engine needs to know about it.

    module: the model as an ``nn.Module`` whose convolutions, linear layers and batch norms are real
        submodules (zoo models are plain modules; ``.pt2`` uploads are lifted into a ``torch.fx.GraphModule``).
    input_shape: one sample's shape, ``(C, H, W)``; batch is always the first, free dimension.
    num_classes: size of the classifier output.
    source: where it came from, e.g. ``zoo:resnet20`` or the ``.pt2`` path.
    arch: zoo architecture name, or ``None`` for an uploaded graph.
    info: free-form facts gathered while loading (warnings, original op counts, ...).
    """

    module: nn.Module
    input_shape: tuple[int, int, int]
    num_classes: int
    source: str
    arch: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def example_input(self, batch: int = 1) -> torch.Tensor:
        """A deterministic example input of the right shape (for tracing and export)."""
        g = torch.Generator().manual_seed(0)
        return torch.randn((batch, *self.input_shape), generator=g)
