"""Latency of a candidate policy on the target, as a sum of per-layer table lookups (for the search).

The per-target ``LatencyTable`` (``compression.targets.table``) stores measured layer workloads. For the
search, a layer's workload is the original layer's workload with its channel counts replaced by the kept
ones and its bits by the policy's, so the latency of a candidate needs no model to be built: it is a few
dictionary look-ups, and a missing entry is measured once on the target and stored for every later run.
Everything that is not a convolution or linear layer (additions, pooling, the runtime's per-call overhead)
is a constant residual taken from the original model; the error this leaves is measured at the end of the
search (``finalize`` confirms the chosen model end to end) and in ``bench/``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from compression.models.artifact import ModelArtifact
from compression.models.graph import LayerGraph
from compression.search.env import LatencyModel
from compression.targets.base import TargetSpec

log = logging.getLogger("compression.search")


def cache_dir() -> Path:
    """Where latency tables and tuning databases live (``COMPRESSION_CACHE_DIR``, default ~/.cache/compression)."""
    return Path(os.environ.get("COMPRESSION_CACHE_DIR", Path.home() / ".cache" / "compression"))


def table_path() -> Path:
    return cache_dir() / "latency.sqlite"


class TableLatency(LatencyModel):
    """``LatencyModel`` backed by a per-target ``LatencyTable`` (see the module docstring)."""

    def __init__(self, table, graph: LayerGraph, example_input: torch.Tensor) -> None:
        from compression.targets.workloads import extract_workloads

        self.table = table
        self.graph = graph
        x = example_input[:1]
        templates = {w.name: w for w in extract_workloads(graph.module, x) if w.is_layer}
        missing = [n for n in graph.layer_names if n not in templates]
        if missing:
            raise RuntimeError(f"no workload found for layers {missing[:5]}")
        self.templates = templates
        # Per-entry timings miss what the runtime does across layers (fusions, boundary costs). The table's
        # calibration measures the original model end to end and stores the factor that maps the sum of
        # its entries onto that measurement; it holds for every pruned/quantized variant of the same
        # structure, which is exactly what a search tries.
        _, rows, _ = table.predict(graph.module, x, measure_missing=True, calibrated=False)
        self.calibration = table.calibrate(graph.module, x)
        self.scale = float(self.calibration.get("scale") or 1.0)
        base = float(rows[-1]["ms"] or 0.0)  # the runtime's per-call overhead
        layer_kinds = ("conv2d", "linear")
        layer_raw = sum(r["ms"] for r in rows[:-1] if r.get("kind") in layer_kinds and r["ms"] is not None)
        rest_raw = sum(r["ms"] for r in rows[:-1] if r.get("kind") not in layer_kinds and r["ms"] is not None)
        self._cache: dict[tuple, float] = {}
        super().__init__(self._layer_ms, residual_ms=base + self.scale * rest_raw)
        self.original_ms = base + self.scale * (layer_raw + rest_raw)
        log.info(
            "latency table for %s: original %.3f ms predicted, %.3f ms measured (factor %.2f, rest %.3f ms)",
            table.spec.name,
            self.original_ms,
            float(self.calibration.get("measured_ms") or 0.0),
            self.scale,
            self.residual_ms,
        )

    def _layer_ms(self, name: str, in_c: int, out_c: int, w_bits: float, a_bits: int) -> float:
        key = (name, in_c, out_c, int(round(w_bits)), int(a_bits))
        v = self._cache.get(key)
        if v is not None:
            return v
        from compression.targets.workloads import overhead_workload

        t = self.templates[name]
        if t.kind == "conv2d":
            depthwise = t.groups > 1 and t.groups == t.in_channels == t.out_channels
            w = replace(
                t,
                in_channels=in_c,
                out_channels=out_c,
                groups=in_c if depthwise else t.groups,
                in_shape=(t.in_shape[0], in_c, *t.in_shape[2:]),
                out_shape=(t.out_shape[0], out_c, *t.out_shape[2:]),
            )
        else:
            w = replace(
                t,
                in_channels=in_c,
                out_channels=out_c,
                in_shape=(*t.in_shape[:-1], in_c),
                out_shape=(*t.out_shape[:-1], out_c),
            )
        w = self.table.normalize(w.with_bits(int(round(w_bits)), int(a_bits)))
        ms = self.table.lookup(w)
        if ms is None:
            self.table.measure_workload(w)
            ms = self.table.lookup(w)
        over = overhead_workload(torch.empty(w.in_shape))
        o = self.table.lookup(over)
        if o is None:
            self.table.measure_workload(over)
            o = self.table.lookup(over)
        v = self.scale * max(0.0, float(ms) - float(o or 0.0))
        self._cache[key] = v
        return v


def build_latency_model(
    target: TargetSpec,
    graph: LayerGraph,
    artifact: ModelArtifact,
    *,
    round_to: int = 1,
    progress: Callable[[int, int, dict], None] | None = None,
) -> LatencyModel | None:
    """The search's latency model for a target (None for the analytic target, which has no time)."""
    if target.backend == "analytic":
        return None
    from compression.targets import LatencyTable

    # fewer repeats than a benchmark: an entry is measured once and reused by every later run
    table = LatencyTable(target, table_path(), warmup=5, repeats=40)
    return TableLatency(table, graph, artifact.example_input(1))
