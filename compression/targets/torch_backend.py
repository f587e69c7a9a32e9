"""The ``torch`` backend: PyTorch eager on this machine's CPU, at a fixed thread count.

Settings: ``threads`` (default 2), ``lock`` (device lock name, default ``local-cpu``), ``wait_s`` (how long to
queue for the device). The model runs under ``torch.inference_mode()`` in eval mode, after warm-up.

Quantization: PyTorch eager runs float. A bits plan is recorded in the measurement's details
(``bits_run: float``) but does not change the timed computation; bits affect the analytic cost only. The
deprecated ``torch.ao`` int8 CPU path (x86/fbgemm quantized conv) was tried on ResNet-20-sized layers: it
runs, but was within 10% of float at these sizes, its tensor types are announced for removal, and it needs
the model rewritten around quantized tensors; so it is not used (see ``docs/targets.md``).
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from compression.errors import TargetError
from compression.targets.base import Measurement, TargetSpec
from compression.targets.contention import CpuWatch
from compression.targets.measure import (
    DEFAULT_DEVICE,
    DEFAULT_WAIT_S,
    make_measurement,
    measure_locked,
    measure_with_cleanup,
)
from compression.targets.onnx_io import as_inputs
from compression.targets.workloads import FLOAT_BITS, extract_workloads, normalize_bits

FLOAT_NOTE = "torch eager runs float; bits affect the analytic cost only"


def cpu_model() -> str:
    """This machine's CPU model name (for fingerprints and health checks)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class TorchBackend:
    """Measures latency with PyTorch eager (float) on the local CPU."""

    def __init__(self, spec: TargetSpec) -> None:
        self.spec = spec
        self.threads = int(spec.settings.get("threads", 2))
        self.device = str(spec.settings.get("lock", DEFAULT_DEVICE))
        self.wait_s = float(spec.settings.get("wait_s", DEFAULT_WAIT_S))

    # models can be timed side by side (measure_interleaved)
    interleaves = True

    def bits_run(self, w_bits: int, a_bits: int) -> tuple[int, int]:
        """The bit-widths this backend really runs for a request: always float."""
        return FLOAT_BITS, FLOAT_BITS

    def fingerprint(self) -> dict[str, Any]:
        """What a latency measured here depends on (keys a latency table)."""
        return {"backend": "torch", "torch": torch.__version__, "threads": self.threads, "cpu": cpu_model()}

    def check(self) -> dict[str, Any]:
        """The local CPU is always reachable; report what it is."""
        return {
            "reachable": True,
            "backend": "torch",
            "torch": torch.__version__,
            "threads": self.threads,
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
        }

    def measure(
        self,
        module: nn.Module,
        example_input: torch.Tensor | tuple[torch.Tensor, ...],
        *,
        warmup: int = 10,
        repeats: int = 50,
        timeout_s: float = 120.0,
        bits: Any = None,
    ) -> Measurement:
        """Time ``module(*example_input)`` (eval mode, inference mode) with warm-up and repeats."""
        inputs = as_inputs(example_input)
        prepare, cleanup = self._preparer(module, inputs, bits)
        try:
            stats, compile_s, details = measure_locked(
                prepare,
                what=f"target {self.spec.name}",
                device=self.device,
                warmup=warmup,
                repeats=repeats,
                timeout_s=timeout_s,
                wait_s=self.wait_s,
                setup_thread=self._setup_thread,
            )
        finally:
            cleanup()
        return make_measurement(self.spec, stats, compile_s, details, warmup, repeats, inputs[0].shape[0])

    def measure_interleaved(
        self,
        modules: Sequence[nn.Module],
        example_input: torch.Tensor | tuple[torch.Tensor, ...],
        *,
        bits: Sequence[Any] | None = None,
        warmup: int = 10,
        repeats: int = 50,
        blocks: int = 3,
        timeout_s: float = 300.0,
    ) -> tuple[list[list[list[float]]], list[float], list[dict[str, Any]]]:
        """Time ``modules`` side by side, one forward of each in turn (``measure.time_interleaved``)."""
        inputs = as_inputs(example_input)
        plans = list(bits) if bits is not None else [None] * len(modules)
        times, compile_s, details = measure_with_cleanup(
            lambda m, b: self._preparer(m, inputs, b),
            list(modules),
            plans,
            what=f"target {self.spec.name}",
            device=self.device,
            warmup=warmup,
            repeats=repeats,
            blocks=blocks,
            timeout_s=timeout_s,
            wait_s=self.wait_s,
            setup_thread=self._setup_thread,
            watch=CpuWatch,  # timed on this machine: other processes' CPU use is recorded
        )
        return times, compile_s, details

    def _setup_thread(self) -> Callable[[], None]:
        previous = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        return lambda: torch.set_num_threads(previous)

    def _preparer(
        self, module: nn.Module, inputs: tuple[torch.Tensor, ...], bits: Any
    ) -> tuple[Callable[[], tuple[Callable[[], None], dict[str, Any]]], Callable[[], None]]:
        """``(prepare, cleanup)`` for one model; eval mode holds from here until ``cleanup``."""
        plan = normalize_bits(bits)
        quantized = {n: b for n, b in plan.items() if b != (FLOAT_BITS, FLOAT_BITS)}
        if plan:
            extract_workloads(module, inputs, plan)  # refuses a plan naming layers the model lacks

        def prepare() -> tuple[Any, dict[str, Any]]:
            def run() -> None:
                with torch.inference_mode():
                    module(*inputs)

            try:
                run()  # fail here, with the model's own error, rather than inside the timing loop
            except Exception as exc:
                raise TargetError(f"the model failed to run in PyTorch: {type(exc).__name__}: {exc}") from exc
            details: dict[str, Any] = {"mode": "eager", "threads": self.threads, "bits_run": "float"}
            if quantized:
                details["note"] = FLOAT_NOTE
                details["bits_requested"] = {n: list(b) for n, b in quantized.items()}
            return run, details

        # eval mode must hold while timing too: set it for the whole measurement and restore after
        was_training = bool(getattr(module, "training", False))
        restore = False
        if was_training:
            try:
                module.eval()
                restore = True
            except NotImplementedError:
                pass

        def cleanup() -> None:
            if restore:
                module.train(True)

        return prepare, cleanup
