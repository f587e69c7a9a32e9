"""What every hardware target shares: its description (plain data) and the result of a measurement.

A target is data, never code: a name, a backend and backend settings. Adding a device means adding a
``TargetSpec`` (a JSON/YAML entry or a database row), not writing a class. Each backend module exposes one
``Backend`` implementation that turns a ``TargetSpec`` into measurements.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

BACKENDS = ("tvm", "onnxruntime", "torch", "analytic")


@dataclass
class TargetSpec:
    """A hardware target described as data.

    name: unique name, e.g. ``local-tvm`` or ``rpi4-farm``.
    backend: one of ``BACKENDS``.
    settings: backend-specific, e.g. for ``tvm``: ``{"target": {"kind": "llvm", "mcpu": ..., "num-cores": 2},
        "rpc": {"host": ..., "port": ..., "key": ..., "timeout_s": ...}, "tuning": {...}}``; for
        ``onnxruntime`` / ``torch``: ``{"threads": 2}``.
    round_to: kept channels are rounded to a multiple of this for this target (bounds distinct workloads).
    description: free text shown in the dashboard.
    """

    name: str
    backend: str
    settings: dict[str, Any] = field(default_factory=dict)
    round_to: int = 1
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Measurement:
    """Latency of one model (or one layer workload) on one target, from repeated timed runs.

    Times are in milliseconds per inference at the measured batch size. ``runs`` is the number of timed
    runs after ``warmup`` untimed ones. ``cv`` is std/mean. ``compile_s`` is the time to build for the
    target (0 when nothing is compiled). ``details`` holds backend facts (e.g. TVM tuning state, int8 or
    float kernels, the format actually run for a requested bit-width).
    """

    target: str
    backend: str
    mean_ms: float
    median_ms: float
    std_ms: float
    min_ms: float
    runs: int
    warmup: int
    compile_s: float
    batch: int = 1
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def cv(self) -> float:
        return self.std_ms / self.mean_ms if self.mean_ms > 0 else 0.0

    def statistic(self, name: str) -> float:
        """The named statistic in ms: ``median``, ``min`` or ``mean``.

        A measurement made in blocks (``compare_models``, whose details hold ``block_min_ms``) reads its minimum
        as the median of its blocks' minima, close to how a latency table's calibration reads the models it
        measures (a minimum per block, the median over blocks; the calibration also rescales each block to the
        reference's median state, and its blocks may hold another number of runs): the minimum over all runs falls
        with their number, so it compares less well with a prediction calibrated block by block."""
        if name == "min":
            blocks = self.details.get("block_min_ms")
            if blocks:
                return float(statistics.median(blocks))
            return self.min_ms
        if name == "median":
            return self.median_ms
        if name == "mean":
            return self.mean_ms
        raise ValueError(f"unknown statistic {name!r}: use median, min or mean")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["cv"] = self.cv
        return d


class Backend(Protocol):
    """Measures latency of float or quantized models on one target."""

    def measure(
        self,
        module: nn.Module,
        example_input: torch.Tensor,
        *,
        warmup: int,
        repeats: int,
        timeout_s: float,
    ) -> Measurement: ...

    def check(self) -> dict[str, Any]:
        """Health: is the device reachable, what it is. Raises TargetError when not reachable."""
        ...
