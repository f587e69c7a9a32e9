"""The ``analytic`` backend: a cost computed from shapes and bit-widths, no hardware, no time.

Decision: ``AnalyticBackend.measure`` returns a ``Measurement`` so the analytic target plugs into every place
a target goes (``bench``, latency tables, the search), but **its numbers are not milliseconds**. The
``*_ms`` fields hold the chosen metric in the unit named by ``details["unit"]``, ``details["analytic"]`` is
``True``, ``runs`` and ``warmup`` are 0 and the spread is 0 (nothing was timed). Code that shows a
measurement must check ``details.get("analytic")`` and print the unit (``describe_value`` does).

Settings: ``metric``, one of ``bops`` (default: MACs x w_bits x a_bits, in GBOPs), ``macs`` (in MMACs),
``params`` (in M) or ``bytes`` (weight storage at the chosen bits, in MB). MACs count convolutions and
linear layers only, the same rule as ``compression.costs``; the counts come from the model's actual
(possibly pruned) shapes, read from the same workloads a latency table uses, with the quantization plan
given as ``bits``. ``compression.costs.compute_costs`` computes the same quantities from a layer graph and a
policy before the model is pruned; the test suite checks that both agree on MACs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compression.errors import TargetError
from compression.targets.base import Measurement, TargetSpec
from compression.targets.workloads import FLOAT_BITS, LayerWorkload, extract_workloads

METRICS = {"bops": ("GBOPs", 1e9), "macs": ("MMACs", 1e6), "params": ("Mparams", 1e6), "bytes": ("MB", 1e6)}


def workload_cost(w: LayerWorkload, metric: str) -> float:
    """One workload's cost in raw units (BOPs, MACs, parameters or bytes); 0 for non conv/linear work."""
    if not w.is_layer:
        return 0.0
    if metric == "macs":
        return float(w.macs)
    if metric == "bops":
        return float(w.macs) * w.w_bits * w.a_bits
    bias = w.out_channels if w.bias else 0
    if metric == "params":
        return float(w.weight_params + bias)
    if metric == "bytes":
        return w.weight_params * w.w_bits / 8.0 + bias * 4.0
    raise TargetError(f"unknown analytic metric {metric!r}", f"use one of {', '.join(METRICS)}")


def model_costs(module: nn.Module, example_input: torch.Tensor, bits: Any = None) -> dict[str, Any]:
    """MACs, BOPs, params and bytes of ``module`` at the plan ``bits``, with per-layer rows.

    Params and bytes count every parameter: conv/linear weights at their ``w_bits``, everything else at 32
    bits (as ``compression.costs`` does). Shared layers are counted once for params/bytes.
    """
    workloads = extract_workloads(module, example_input, bits)
    layers = [w for w in workloads if w.is_layer]
    seen: set[str] = set()
    layer_params = 0
    layer_bytes = 0.0
    for w in layers:
        base = w.name.split("#")[0]
        if base in seen:
            continue
        seen.add(base)
        layer_params += int(workload_cost(w, "params"))
        layer_bytes += workload_cost(w, "bytes")
    total_params = sum(p.numel() for p in module.parameters())
    weight_and_bias = 0
    for name in seen:
        for suffix in (".weight", ".bias"):
            p = dict(module.named_parameters()).get(name + suffix)
            if p is not None:
                weight_and_bias += p.numel()
    other = max(0, total_params - weight_and_bias)
    return {
        "macs": int(sum(w.macs for w in layers)),
        "bops": int(sum(workload_cost(w, "bops") for w in layers)),
        "params": layer_params + other,
        "bytes": layer_bytes + other * FLOAT_BITS / 8.0,
        "layers": {
            w.name: {
                "macs": w.macs,
                "bops": int(workload_cost(w, "bops")),
                "w_bits": w.w_bits,
                "a_bits": w.a_bits,
            }
            for w in layers
        },
    }


def describe_value(m: Measurement) -> str:
    """A measurement's median with its real unit (``"1.234 ms"`` or ``"2.6 GBOPs (analytic)"``)."""
    if m.details.get("analytic"):
        return f"{m.median_ms:.4g} {m.details.get('unit', '')} (analytic)"
    return f"{m.median_ms:.3f} ms"


class AnalyticBackend:
    """Counts BOPs/MACs/params/bytes instead of timing (see the module docstring: not milliseconds)."""

    def __init__(self, spec: TargetSpec) -> None:
        self.spec = spec
        self.metric = str(spec.settings.get("metric", "bops"))
        if self.metric not in METRICS:
            raise TargetError(
                f"target {spec.name}: unknown analytic metric {self.metric!r}",
                f"use one of {', '.join(METRICS)}",
            )
        self.unit, self.scale = METRICS[self.metric]

    def bits_run(self, w_bits: int, a_bits: int) -> tuple[int, int]:
        """Analytic costs use the requested bits as they are."""
        return int(w_bits), int(a_bits)

    def fingerprint(self) -> dict[str, Any]:
        """What the value depends on: only the metric."""
        return {"backend": "analytic", "metric": self.metric}

    def check(self) -> dict[str, Any]:
        """Always available."""
        return {"reachable": True, "backend": "analytic", "metric": self.metric, "unit": self.unit}

    def workload_value(self, w: LayerWorkload) -> float:
        """One workload's cost in this target's unit (what a latency table stores for it)."""
        return workload_cost(w, self.metric) / self.scale

    def measure(
        self,
        module: nn.Module,
        example_input: torch.Tensor,
        *,
        warmup: int = 0,
        repeats: int = 0,
        timeout_s: float = 0.0,
        bits: Any = None,
    ) -> Measurement:
        """The model's cost in this target's unit, shaped as a ``Measurement`` (``details["analytic"]``)."""
        costs = model_costs(module, example_input, bits)
        value = float(costs[self.metric]) / self.scale
        from compression.targets.onnx_io import as_inputs

        return Measurement(
            target=self.spec.name,
            backend="analytic",
            mean_ms=value,
            median_ms=value,
            std_ms=0.0,
            min_ms=value,
            runs=0,
            warmup=0,
            compile_s=0.0,
            batch=int(as_inputs(example_input)[0].shape[0]),
            details={
                "analytic": True,
                "metric": self.metric,
                "unit": self.unit,
                "note": f"not a time: the *_ms fields hold {self.metric} in {self.unit}",
                "macs": costs["macs"],
                "bops": costs["bops"],
                "params": costs["params"],
                "bytes": costs["bytes"],
            },
        )
