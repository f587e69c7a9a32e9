"""Hardware targets: measure a model's latency on a device, and per-target latency tables.

A target is data (``TargetSpec``: name, backend, settings); ``registry`` checks descriptions and turns them
into backends: ``torch`` (PyTorch eager), ``onnxruntime`` (float, or int8 for <= 8-bit layers), ``tvm``
(local or through an RPC tracker; ``tvm_backend``, imported only for TVM targets) and ``analytic`` (BOPs, not
a time). ``measure`` holds the timing rules every local backend follows (device lock, warm-up, repeats,
robust statistics, deadline); ``workloads`` and ``table`` make a model's latency a sum of per-layer
entries. ``onnx_io.export_onnx`` is the one ONNX export of the engine.

This package imports torch, ONNX and ONNX Runtime (lazily where it can); never Django or the workers.
"""

from __future__ import annotations

import inspect
import os

# TVM pins its thread pool's threads to cores, the thread that runs a module included (TVM_BIND_THREADS, on by
# default). In a process that also measures ONNX Runtime (a worker, the benchmarks), ONNX Runtime sessions made
# later from a pinned thread run all their threads on its one core: measured on ResNet-20/digits, 0.214 ms before
# a TVM measurement in the same process and 0.39 ms (within-measurement cv 1.5) after, for as long as the process
# lives. TVM's own latency is the same unpinned (0.72 vs 0.73 ms). An explicit setting is kept.
os.environ.setdefault("TVM_BIND_THREADS", "0")
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from compression.errors import TargetError
from compression.targets.base import BACKENDS, Backend, Measurement, TargetSpec
from compression.targets.registry import (
    get_target,
    list_targets,
    load_targets_file,
    make_backend,
    register_target,
    validate_target,
)
from compression.targets.table import LatencyTable
from compression.targets.workloads import LayerWorkload, extract_workloads

__all__ = [
    "BACKENDS",
    "Backend",
    "Comparison",
    "LatencyTable",
    "LayerWorkload",
    "Measurement",
    "TargetError",
    "TargetSpec",
    "bench_model",
    "compare_models",
    "extract_workloads",
    "get_target",
    "list_targets",
    "load_targets_file",
    "make_backend",
    "register_target",
    "validate_target",
]


def bench_model(
    module: nn.Module,
    example_input: torch.Tensor | tuple[torch.Tensor, ...],
    target: str | dict[str, Any] | TargetSpec,
    *,
    warmup: int = 10,
    repeats: int = 50,
    timeout_s: float = 600.0,
    bits: Any = None,
) -> Measurement:
    """Measure ``module`` end to end on ``target``: warm-up, ``repeats`` timed runs, robust statistics.

    ``bits`` is an optional quantization plan (``{layer: (w_bits, a_bits)}`` or a ``Policy``); what the target
    really ran for it is in ``details["bits_run"]``. Raises ``TargetError`` if the target is invalid,
    unreachable, or does not finish within ``timeout_s`` (the analytic target returns a cost, not a time:
    ``details["analytic"]``).
    """
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise TargetError(f"warmup must be an integer >= 0, got {warmup!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise TargetError(f"repeats must be an integer >= 1, got {repeats!r}")
    spec = get_target(target)
    backend = make_backend(spec)
    kwargs: dict[str, Any] = {"warmup": warmup, "repeats": repeats, "timeout_s": timeout_s}
    takes_bits = "bits" in inspect.signature(backend.measure).parameters
    if bits is not None and takes_bits:
        kwargs["bits"] = bits
    m = backend.measure(module, example_input, **kwargs)
    if bits is not None and not takes_bits:
        m.details.setdefault("bits_run", "float")
        m.details.setdefault(
            "note", f"the {spec.backend} backend runs float; bits affect the analytic cost only"
        )
    return m


@dataclass
class Comparison:
    """Several models timed side by side on one target (``compare_models``); model 0 is the reference.

    ``measurements``: each model over all its timed runs. ``block_ms``: each model's median per block.
    ``ratios``: each model's latency over the reference's, the median over blocks of the ratio of the block's
    medians (model 0: 1.0). ``method``: ``interleaved`` (run by run) or ``rounds`` (model by model, the fallback
    for targets that cannot alternate, e.g. a device behind an RPC tracker).
    """

    measurements: list[Measurement]
    block_ms: list[list[float]]
    block_ratios: list[list[float]]
    ratios: list[float]
    method: str

    def spread(self, i: int) -> float:
        """How far model ``i``'s block ratios disagree: (max - min) / median."""
        r = self.block_ratios[i]
        return (max(r) - min(r)) / self.ratios[i] if self.ratios[i] > 0 else 0.0


def compare_models(
    modules: Sequence[nn.Module],
    example_input: torch.Tensor | tuple[torch.Tensor, ...],
    target: str | dict[str, Any] | TargetSpec,
    *,
    bits: Sequence[Any] | None = None,
    warmup: int = 10,
    repeats: int = 50,
    blocks: int = 3,
    timeout_s: float = 600.0,
) -> Comparison:
    """Time ``modules`` side by side on ``target``; their latencies as ratios to ``modules[0]``'s.

    A machine that changes speed for seconds at a time (seen here: everything 30-70% slower for 1-15 s, from one
    measurement of a model to the next) makes two separate measurements disagree by that much, and a ratio of
    them with it. Local targets alternate the models run by run (``measure.time_interleaved``): the models' runs
    are milliseconds apart and a slow stretch slows them alike (measured on ResNet-20 and a half-pruned copy on
    ONNX Runtime: the ratio's spread over 12 repeats 71% from separate measurements, 10-24% alternated without
    spinning threads). Others measure ``blocks`` rounds of each model in turn: a remote device, the analytic
    target, and ONNX Runtime with spinning pool threads (its default; see ``OrtBackend.interleaves``). ``bits`` gives each model's quantization plan (None: the
    plan the model carries).
    """
    if not modules:
        raise TargetError("compare_models needs at least one model")
    for label, v in (("warmup", warmup), ("repeats", repeats), ("blocks", blocks)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if label == "warmup" else 1):
            raise TargetError(f"{label} must be an integer >= {0 if label == 'warmup' else 1}, got {v!r}")
    spec = get_target(target)
    backend = make_backend(spec)
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    batch = int(inputs[0].shape[0])
    plans = list(bits) if bits is not None else [None] * len(modules)
    if len(plans) != len(modules):
        raise TargetError(f"{len(plans)} bit plans for {len(modules)} models")
    interleaves = bool(getattr(backend, "interleaves", False))
    if interleaves:
        from compression.targets.measure import make_measurement, summarize

        times, compile_s, details = backend.measure_interleaved(
            list(modules),
            example_input,
            bits=plans,
            warmup=warmup,
            repeats=repeats,
            blocks=blocks,
            timeout_s=timeout_s,
        )
        measurements = [
            make_measurement(
                spec,
                summarize([t for b in per for t in b]),
                c,
                {**d, "blocks": blocks, "block_min_ms": [min(b) for b in per]},
                warmup,
                repeats * blocks,
                batch,
            )
            for per, c, d in zip(times, compile_s, details, strict=True)
        ]
        block_ms = [[statistics.median(b) for b in per] for per in times]
        method = "interleaved"
    else:
        rounds: list[list[Measurement]] = [[] for _ in modules]
        for _ in range(blocks):
            for i, (m, plan) in enumerate(zip(modules, plans, strict=True)):
                rounds[i].append(
                    bench_model(
                        m, example_input, spec, warmup=warmup, repeats=repeats, timeout_s=timeout_s, bits=plan
                    )
                )
        block_ms = [[m.median_ms for m in per] for per in rounds]
        measurements = []
        for per in rounds:  # the median round, with every round's minimum (``Measurement.statistic``)
            m = sorted(per, key=lambda m: m.median_ms)[(len(per) - 1) // 2]
            measurements.append(replace(m, details={**m.details, "block_min_ms": [r.min_ms for r in per]}))
        method = "rounds"
    ref = block_ms[0]
    block_ratios = [
        [v / r if r > 0 else float("nan") for v, r in zip(per, ref, strict=True)] for per in block_ms
    ]
    ratios = [statistics.median(per) for per in block_ratios]
    return Comparison(measurements, block_ms, block_ratios, ratios, method)
