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
    "LatencyTable",
    "LayerWorkload",
    "Measurement",
    "TargetError",
    "TargetSpec",
    "bench_model",
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
