"""The ``onnxruntime`` backend: ONNX Runtime's CPU execution provider on this machine.

Settings: ``threads`` (intra-op threads, default 2), ``optimization`` (``disable``/``basic``/``extended``/
``all``, default ``all``), ``spinning`` (let idle pool threads spin between runs, ONNX Runtime's default:
``true``), ``lock`` (device lock name, default ``local-cpu``), ``wait_s`` (how long to queue for the device).

A measurement exports the model with ``onnx_io.export_onnx`` at the measured batch (static shapes, the
fastest form ONNX Runtime can run; the export is checked against PyTorch), creates a session and times
``session.run``. The export, quantization and session creation are reported as ``compile_s``.

Quantized candidates run as real int8: every layer of the ``bits`` plan with both ``w_bits`` and
``a_bits`` <= 8 is quantized with ``onnxruntime.quantization.quantize_static`` (QDQ format, int8 per-channel
weights, uint8 activations, min/max calibration on the example input and three perturbed copies; the
calibration decides scales, not speed), together with the activation that directly follows it. ONNX
Runtime fuses the pattern into ``QLinearConv`` / ``QGemm`` kernels; the measurement counts the int8 kernels
in the optimized graph (``details["int8_kernels"]``) so the claim is checked, not assumed. ONNX Runtime has
no kernels below 8 bits: a 2..7-bit layer runs as int8 (``details["bits_run"][layer] == "int8"``), and a
layer with only one side at <= 8 bits runs float (ONNX Runtime's int8 convolution needs both).
"""

from __future__ import annotations

import collections
import copy
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
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
from compression.targets.onnx_io import as_inputs, export_onnx
from compression.targets.torch_backend import cpu_model
from compression.targets.workloads import FLOAT_BITS, LayerWorkload, extract_workloads, normalize_bits

OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")
INT8_NOTE = (
    "ONNX Runtime has no kernels below 8 bits: layers with <= 8-bit weights and activations run as int8"
)
_ACTIVATION_OPS = {"Relu", "Clip", "HardSwish", "HardSigmoid"}
_INT8_OPS_PREFIX = ("QLinear", "QGemm", "NhwcQLinear")
_INT8_OPS = {"ConvInteger", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul"}


# side-by-side timing with spinning pool threads: timed runs per turn (after one untimed run); see measure_interleaved
SPIN_CHUNK = 4


def int8_bits(w_bits: int, a_bits: int) -> bool:
    """True when ONNX Runtime runs a layer at these bits as int8 (both sides at <= 8 bits)."""
    return w_bits <= 8 and a_bits <= 8


def session_options(threads: int, optimization: str, spinning: bool) -> Any:
    import onnxruntime as ort

    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = levels[optimization]
    so.log_severity_level = 3
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


def _weight_shapes(model: Any) -> dict[str, list[int]]:
    shapes = {init.name: list(init.dims) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    shapes[node.output[0]] = list(attr.t.dims)
    return shapes


def map_layers_to_nodes(model: Any, workloads: list[LayerWorkload]) -> dict[str, str]:
    """Match the model's conv/linear layers to ONNX ``Conv``/``Gemm``/``MatMul`` nodes (by order and weight shape).

    Exporters rename weights (TorchScript folds batch norms into new constants), so names cannot be used;
    both the ONNX graph and the workloads follow execution order, and each match is checked against the
    weight's shape. Unnamed nodes are given names in place. Raises ``TargetError`` when a layer has no match.
    """
    shapes = _weight_shapes(model)
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"node_{i}_{node.op_type}"
    candidates = []
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul") and len(node.input) > 1 and node.input[1] in shapes:
            w = shapes[node.input[1]]
            if node.op_type == "Gemm":
                trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
                w = [w[1], w[0]] if (not trans_b and len(w) == 2) else w
            elif node.op_type == "MatMul" and len(w) == 2:
                w = [w[1], w[0]]
            candidates.append((node, w))
    used: set[int] = set()
    mapping: dict[str, str] = {}
    pos = 0
    for wl in workloads:
        if not wl.is_layer:
            continue
        if wl.kind == "conv2d":
            want_op = ("Conv",)
            want = [wl.out_channels, wl.in_channels // max(1, wl.groups), *wl.kernel]
        else:
            want_op = ("Gemm", "MatMul")
            want = [wl.out_channels, wl.in_channels]
        order = list(range(pos, len(candidates))) + list(range(0, pos))
        hit = next(
            (
                i
                for i in order
                if i not in used and candidates[i][0].op_type in want_op and candidates[i][1] == want
            ),
            None,
        )
        if hit is None:
            raise TargetError(
                f"cannot find layer {wl.name} ({wl.kind} weight {want}) in the exported ONNX graph",
                "the model could not be quantized per layer for ONNX Runtime; measure it in float",
            )
        used.add(hit)
        pos = hit + 1
        mapping[wl.name] = candidates[hit][0].name
    return mapping


def inline_constant_identities(model: Any) -> int:
    """Replace ``Identity`` nodes of initializers by initializers of their own; returns how many.

    The TorchScript exporter shares equal constants (e.g. the zero biases of freshly folded batch norms)
    through ``Identity`` nodes; the quantizer only quantizes a convolution whose bias is an initializer.
    """
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    keep = []
    n = 0
    for node in model.graph.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            arr = numpy_helper.to_array(inits[node.input[0]])
            model.graph.initializer.append(numpy_helper.from_array(arr, name=node.output[0]))
            n += 1
        else:
            keep.append(node)
    if n:
        del model.graph.node[:]
        model.graph.node.extend(keep)
    return n


def _following_activations(model: Any, node_names: set[str]) -> list[str]:
    """Activation nodes that directly and solely consume one of ``node_names`` (quantized with it)."""
    consumers: dict[str, list[Any]] = collections.defaultdict(list)
    for node in model.graph.node:
        for i in node.input:
            consumers[i].append(node)
    extra = []
    for node in model.graph.node:
        if node.name in node_names:
            for out in node.output:
                nxt = consumers.get(out, [])
                if len(nxt) == 1 and nxt[0].op_type in _ACTIVATION_OPS:
                    extra.append(nxt[0].name)
    return extra


def int8_node_names(model: Any, workloads: list[LayerWorkload], layers: list[str]) -> list[str]:
    """The ONNX nodes to quantize so that ``layers`` (and nothing else) run as int8 kernels.

    Names the model's nodes and inlines shared constants in place (``map_layers_to_nodes``,
    ``inline_constant_identities``): the caller saves the model it passes and quantizes that file. An activation
    that alone consumes a quantized layer is quantized with it (ONNX Runtime fuses it into the int8 kernel).
    """
    inline_constant_identities(model)
    node_of = map_layers_to_nodes(model, [w for w in workloads if w.is_layer])
    nodes = sorted(node for n, node in node_of.items() if n in set(layers))
    return nodes + _following_activations(model, set(nodes))


def _quantize(
    src: Path, dst: Path, inputs: tuple[torch.Tensor, ...], in_names: list[str], nodes: list[str], tmp: Path
) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    g = torch.Generator().manual_seed(0)
    batches = [inputs] + [
        tuple(t + 0.1 * torch.randn(t.shape, generator=g) if t.is_floating_point() else t for t in inputs)
        for _ in range(3)
    ]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{n: t.numpy() for n, t in zip(in_names, b, strict=True)} for b in batches])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    quant_logger = logging.getLogger("onnxruntime.quantization")
    root = logging.getLogger()
    levels = (quant_logger.level, root.level)
    quant_logger.setLevel(logging.ERROR)
    root.setLevel(
        max(root.level, logging.ERROR)
    )  # the quantizer logs pre-processing advice on the root logger
    cwd = os.getcwd()
    try:
        os.chdir(tmp)  # calibration writes augmented models to the working directory in some versions
        quantize_static(
            str(src),
            str(dst),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_quantize=nodes,
        )
    finally:
        os.chdir(cwd)
        quant_logger.setLevel(levels[0])
        root.setLevel(levels[1])


class OrtBackend:
    """Measures latency with ONNX Runtime (CPU), float or int8 per layer."""

    def __init__(self, spec: TargetSpec) -> None:
        self.spec = spec
        self.threads = int(spec.settings.get("threads", 2))
        self.optimization = str(spec.settings.get("optimization", "all"))
        self.spinning = bool(spec.settings.get("spinning", True))
        self.device = str(spec.settings.get("lock", DEFAULT_DEVICE))
        self.wait_s = float(spec.settings.get("wait_s", DEFAULT_WAIT_S))
        if self.optimization not in OPTIMIZATION_LEVELS:
            raise TargetError(f"target {spec.name}: unknown optimization {self.optimization!r}")

    def bits_run(self, w_bits: int, a_bits: int) -> tuple[int, int]:
        """The bit-widths ONNX Runtime really runs for a request: (8, 8) or float."""
        return (8, 8) if int8_bits(w_bits, a_bits) else (FLOAT_BITS, FLOAT_BITS)

    def fingerprint(self) -> dict[str, Any]:
        """What a latency measured here depends on (keys a latency table)."""
        import onnxruntime as ort

        return {
            "backend": "onnxruntime",
            "onnxruntime": ort.__version__,
            "threads": self.threads,
            "optimization": self.optimization,
            "spinning": self.spinning,
            "cpu": cpu_model(),
        }

    def check(self) -> dict[str, Any]:
        """ONNX Runtime imports and offers the CPU provider; report versions."""
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise TargetError(f"target {self.spec.name}: onnxruntime is not installed ({exc})") from exc
        providers = ort.get_available_providers()
        if "CPUExecutionProvider" not in providers:
            raise TargetError(f"target {self.spec.name}: ONNX Runtime has no CPU execution provider")
        return {
            "reachable": True,
            "backend": "onnxruntime",
            "onnxruntime": ort.__version__,
            "providers": providers,
            "threads": self.threads,
            "cpu": cpu_model(),
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
        """Export ``module``, quantize the plan's <= 8-bit layers to int8, and time ``session.run``.

        Without ``bits``, the plan a compressed model carries is used (``quantization_plan``): a model from
        ``apply_policy`` runs as it would be deployed here. The activation quantizers of int8 layers are
        removed first (ONNX Runtime quantizes those inputs itself); those of layers kept in float stay.
        """
        inputs = as_inputs(example_input)
        prepare, cleanup = self._preparer(module, inputs, bits, self.spinning)
        try:
            stats, compile_s, details = measure_locked(
                prepare,
                what=f"target {self.spec.name}",
                device=self.device,
                warmup=warmup,
                repeats=repeats,
                timeout_s=timeout_s,
                wait_s=self.wait_s,
            )
        finally:
            cleanup()
        return make_measurement(self.spec, stats, compile_s, details, warmup, repeats, inputs[0].shape[0])

    @property
    def interleaves(self) -> bool:
        """Side by side only without spinning pool threads: with them (ONNX Runtime's default) the original read
        slow beside its compressed copies (measured on ResNet-20: ratios 0.70 side by side against 0.82 measured
        one by one, and a latency table whose calibration went side by side predicted pruned models 45% too
        fast), so ``compare_models`` and the calibration measure one model at a time there."""
        return not self.spinning

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
        """Time ``modules`` side by side, in turn (``measure.time_interleaved``).

        Each model gets its own session, built as ``measure`` builds it. With spinning pool threads (ONNX
        Runtime's default, and the deployed configuration) a session's threads keep spinning after its run and
        take the cores from the next model's: alternating run by run, the ratio of ResNet-20 to its half-pruned
        copy read 0.29-0.72 across repeats. So the models alternate every ``SPIN_CHUNK`` runs, each turn after one
        untimed run (measured: 0.37-0.45, against 0.27-0.63 from separate measurements in the same minutes).
        Without spinning they alternate run by run. Returns ``(times[model][block] in ms, compile_s per model,
        details per model)``.
        """
        inputs = as_inputs(example_input)
        plans = list(bits) if bits is not None else [None] * len(modules)
        times, compile_s, details = measure_with_cleanup(
            lambda m, b: self._preparer(m, inputs, b, self.spinning),
            list(modules),
            plans,
            what=f"target {self.spec.name}",
            device=self.device,
            warmup=warmup,
            repeats=repeats,
            blocks=blocks,
            timeout_s=timeout_s,
            wait_s=self.wait_s,
            chunk=SPIN_CHUNK if self.spinning else 1,
            watch=CpuWatch,  # timed on this machine: other processes' CPU use is recorded
        )
        for d in details:
            d["spinning"] = self.spinning
        return times, compile_s, details

    def _preparer(
        self, module: nn.Module, inputs: tuple[torch.Tensor, ...], bits: Any, spinning: bool
    ) -> tuple[Callable[[], tuple[Callable[[], None], dict[str, Any]]], Callable[[], None]]:
        """``(prepare, cleanup)`` for one model: ``prepare()`` exports it, quantizes its int8 layers and opens
        the session (on the measuring thread, under the device lock), returning ``(run, details)``."""
        import onnx
        import onnxruntime as ort

        from compression.quant import act_quantizers, quantization_plan, strip_act_quantizers

        plan = normalize_bits(bits) if bits is not None else quantization_plan(module)
        int8_layers = sorted(n for n, (w, a) in plan.items() if int8_bits(w, a))
        if int8_layers and act_quantizers(module):
            module = copy.deepcopy(module)
            strip_act_quantizers(module, int8_layers)
        # checks the plan's layer names (PolicyError) before the device is taken
        layer_workloads = extract_workloads(module, inputs, plan) if plan else []
        tmp_holder = tempfile.TemporaryDirectory(prefix="compression-ort-")
        tmp = Path(tmp_holder.name)

        def prepare() -> tuple[Any, dict[str, Any]]:
            exported = export_onnx(module, inputs, tmp / "model.onnx", dynamic_batch=False)
            path = exported.path
            details: dict[str, Any] = {
                "threads": self.threads,
                "optimization": self.optimization,
                "exporter": exported.exporter,
                "opset": exported.opset,
                "onnx_max_abs_diff": exported.max_abs_diff,
            }
            bits_run: dict[str, str] = {}
            for name, (w, a) in plan.items():
                if int8_bits(w, a):
                    bits_run[name] = "int8"
                elif (w, a) != (FLOAT_BITS, FLOAT_BITS):
                    bits_run[name] = "float (int8 needs both w_bits and a_bits <= 8)"
            if int8_layers:
                model = onnx.load(str(path))
                nodes = int8_node_names(model, layer_workloads, int8_layers)
                onnx.save(model, str(tmp / "named.onnx"))
                _quantize(tmp / "named.onnx", tmp / "int8.onnx", inputs, exported.input_names, nodes, tmp)
                path = tmp / "int8.onnx"
                details["quant_format"] = "QDQ (int8 per-channel weights, uint8 activations)"
                if any(plan[n][0] < 8 or plan[n][1] < 8 for n in int8_layers):
                    details["note"] = INT8_NOTE
            if plan:
                details["bits_run"] = bits_run
            so = session_options(self.threads, self.optimization, spinning)
            if int8_layers:
                so.optimized_model_filepath = str(tmp / "optimized.onnx")
            try:
                sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            except Exception as exc:
                raise TargetError(f"ONNX Runtime cannot load the model: {exc}") from exc
            if int8_layers:
                ops = collections.Counter(
                    n.op_type for n in onnx.load(str(tmp / "optimized.onnx")).graph.node
                )
                details["int8_kernels"] = sum(
                    c for op, c in ops.items() if op.startswith(_INT8_OPS_PREFIX) or op in _INT8_OPS
                )
                details["optimized_ops"] = dict(sorted(ops.items()))
            # an exporter may drop an input the graph does not use: feed by name
            wanted = {i.name for i in sess.get_inputs()}
            feeds = {
                n: t.detach().cpu().numpy()
                for n, t in zip(exported.input_names, inputs, strict=True)
                if n in wanted
            }
            sess.run(None, feeds)

            def run() -> None:
                sess.run(None, feeds)

            return run, details

        return prepare, tmp_holder.cleanup
