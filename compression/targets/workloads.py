"""Layer workloads: what a latency table is keyed by.

``extract_workloads(module, example_input, bits)`` runs the model once under a ``TorchDispatchMode`` in
inference mode and records every aten operation with its input/output tensors. That one mechanism sees
plain modules, functional calls (``F.relu``, ``x + y``) and fx ``GraphModule``s of aten calls alike. From the
record it builds, in execution order:

- one ``conv2d`` / ``linear`` workload per convolution / linear operation whose weight is a constant (a
  parameter or buffer of the model, possibly through a view such as ``t()``), together with the operations
  fused into it: a following batch norm, then a following ReLU / ReLU6 (``hardtanh(0, 6)``) / Hardswish, each
  fused only when it is the sole consumer of the previous result (a residual branch that also reads the
  value keeps them apart). The layer's name is its weight's owner (``layer1.0.conv1.weight`` ->
  ``layer1.0.conv1``), which is how policies and the ``bits`` plan name layers;
- one ``op`` workload for every other operation on activations (additions, pooling, concatenations,
  reshapes, unfused activations ...), keyed by the aten operation and its arguments with tensors replaced
  by their shapes. Operations on constants only (``t()`` of a weight, factory calls) are skipped: runtimes
  fold them.

A workload's ``key`` is canonical JSON of everything except the layer name, so the same workload in two
models, or twice in one model, is one table entry. ``build_workload_module`` makes the one-layer (fused)
module a table measures for a workload.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from compression.errors import PolicyError, TargetError

FLOAT_BITS = 32
# version of the activation quantizer's arithmetic in ``act_fq`` entries' keys (see ``LayerWorkload.key``)
ACT_FQ_VERSION = 2

_CONV_OPS = {
    "aten.conv2d.default",
    "aten.conv2d.padding",
    "aten.convolution.default",
    "aten._convolution.default",
}
_LINEAR_OPS = {"aten.linear.default", "aten.addmm.default", "aten.mm.default", "aten.matmul.default"}
_BN_OPS = {
    "aten.batch_norm.default",
    "aten.native_batch_norm.default",
    "aten._native_batch_norm_legit_no_training.default",
}
# aten ops that do no work at run time and that exporters drop
_IGNORED = {
    "aten.detach.default",
    "aten.detach_.default",
    "aten.alias.default",
    "aten.lift_fresh.default",
    "aten.lift_fresh_copy.default",
    "aten._assert_async.msg",
    "aten._assert_tensor_metadata.default",
    "aten.sym_constrain_range_for_size.default",
}


@dataclass(frozen=True)
class LayerWorkload:
    """One unit of work a model runs, described by shapes (and bits), not by which model runs it.

    kind: ``conv2d``, ``linear``, ``op`` (any other aten operation) or ``overhead`` (the cost of one call of
        an empty model on the target, used to correct per-entry measurements).
    op: the aten operation for ``op`` workloads (in-place variants folded into out-of-place ones);
        equals ``kind`` otherwise.
    in_shape / out_shape: activation input and output shapes (batch first).
    in_channels, out_channels, kernel, stride, padding, dilation, groups, bias: conv/linear geometry.
    fused: operations executed as part of this workload: ``bn``, then one of ``relu``/``relu6``/``hardswish``.
    w_bits / a_bits: requested bit-widths (32 = float). A table replaces them with what its backend
        really runs before looking up.
    act_fq: the layer computes in float but its input is fake-quantized first (a quantized layer on a
        runtime without integer kernels for it): the quantizer's arithmetic is part of the workload.
    signature: for ``op`` workloads, canonical JSON of the arguments (tensors as shapes/dtypes).
    name: where it occurs (layer name, or ``<op>:<index>``); not part of the key.
    """

    kind: str
    op: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...] = ()
    in_channels: int = 0
    out_channels: int = 0
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | str = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    bias: bool = False
    fused: tuple[str, ...] = ()
    w_bits: int = FLOAT_BITS
    a_bits: int = FLOAT_BITS
    signature: str = ""
    act_fq: bool = False
    name: str = field(default="", compare=False, hash=False)

    @property
    def key(self) -> str:
        """Canonical JSON of the workload (everything but ``name``; ``act_fq`` only when set): the table's key."""
        d = asdict(self)
        del d["name"]
        if not d["act_fq"]:
            del d["act_fq"]  # keys of float/int8 workloads stay those of tables written before the field
        else:
            # the quantizer's arithmetic is versioned: entries measured with an earlier ``ActQuantizer`` (2: no
            # straight-through ``x + (q - x)`` at inference, two passes fewer) are not reused
            d["act_fq"] = ACT_FQ_VERSION
        return json.dumps(d, sort_keys=True, separators=(",", ":"))

    @property
    def batch(self) -> int:
        return int(self.in_shape[0]) if self.in_shape else 1

    @property
    def is_layer(self) -> bool:
        """True for conv/linear workloads (the ones a policy prunes and quantizes)."""
        return self.kind in ("conv2d", "linear")

    @property
    def macs(self) -> int:
        """Multiply-accumulates of the conv/linear (0 for other workloads), same rule as ``compression.costs``."""
        if self.kind == "conv2d":
            kh, kw = self.kernel
            oh, ow = self.out_shape[-2], self.out_shape[-1]
            return (
                self.batch * self.out_channels * oh * ow * (self.in_channels // max(1, self.groups)) * kh * kw
            )
        if self.kind == "linear":
            rows = 1
            for d in self.in_shape[:-1]:
                rows *= int(d)
            return rows * self.in_channels * self.out_channels
        return 0

    @property
    def weight_params(self) -> int:
        """Number of weights (without bias) of the conv/linear, 0 otherwise."""
        if self.kind == "conv2d":
            kh, kw = self.kernel
            return self.out_channels * (self.in_channels // max(1, self.groups)) * kh * kw
        if self.kind == "linear":
            return self.in_channels * self.out_channels
        return 0

    def with_bits(self, w_bits: int, a_bits: int) -> LayerWorkload:
        """The same workload at other bit-widths (other workloads are returned unchanged)."""
        if not self.is_layer:
            return self
        return replace(self, w_bits=int(w_bits), a_bits=int(a_bits))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_key(cls, key: str, name: str = "") -> LayerWorkload:
        """Rebuild a workload from its ``key``."""
        d = json.loads(key)
        for k in ("in_shape", "out_shape", "kernel", "stride", "dilation", "fused"):
            d[k] = tuple(d.get(k, ()))
        if isinstance(d.get("padding"), list):
            d["padding"] = tuple(d["padding"])
        return cls(name=name, **d)


# ------------------------------------------------------------------------------------------ bits plans
def normalize_bits(bits: Any) -> dict[str, tuple[int, int]]:
    """Turn a quantization plan into ``{layer: (w_bits, a_bits)}``.

    Accepts ``None``, a ``Policy`` (its layers' ``w_bits``/``a_bits``), or a mapping from layer name to
    ``(w_bits, a_bits)``, ``{"w_bits": .., "a_bits": ..}`` or an object with those attributes (``LayerPolicy``).
    """
    if bits is None:
        return {}
    if hasattr(bits, "layers") and isinstance(bits.layers, Mapping):
        bits = bits.layers
    if not isinstance(bits, Mapping):
        raise PolicyError(f"bits must map layer names to (w_bits, a_bits), got {type(bits).__name__}")
    out: dict[str, tuple[int, int]] = {}
    for name, v in bits.items():
        if isinstance(v, Mapping):
            w, a = v.get("w_bits", FLOAT_BITS), v.get("a_bits", FLOAT_BITS)
        elif hasattr(v, "w_bits") and hasattr(v, "a_bits"):
            w, a = v.w_bits, v.a_bits
        elif isinstance(v, (tuple, list)) and len(v) == 2:
            w, a = v
        else:
            raise PolicyError(f"bits for layer {name!r} must be (w_bits, a_bits), got {v!r}")
        try:
            w, a = int(w), int(a)
        except (TypeError, ValueError) as exc:
            raise PolicyError(f"bits for layer {name!r} are not integers: {v!r}") from exc
        for label, b in (("w_bits", w), ("a_bits", a)):
            if not (1 <= b <= 8 or b == FLOAT_BITS):
                raise PolicyError(
                    f"layer {name!r}: {label}={b} is not supported", "use 1..8, or 32 for float"
                )
        out[str(name)] = (w, a)
    return out


# ------------------------------------------------------------------------------------------ recording
@dataclass
class _Op:
    index: int
    name: str
    func: Any
    args: Any  # template: tensors replaced by ("T", value_id)
    kwargs: Any
    inputs: list[int]  # value ids of activation inputs, in argument order
    consts: list[int]  # value ids of constant inputs
    outputs: list[int]
    out_shapes: list[tuple[int, ...]]


class _Recorder(TorchDispatchMode):
    """Records aten calls with versioned tensor identities (an in-place op makes a new value)."""

    def __init__(self, params: dict[tuple[int, tuple[int, ...]], str]) -> None:
        super().__init__()
        self.params = params
        self.ops: list[_Op] = []
        self.value_of: dict[int, int] = {}  # id(tensor) -> current value id
        self.is_act: dict[int, bool] = {}
        self.origin: dict[int, str] = {}  # constant value -> parameter name it derives from
        self.shape: dict[int, tuple[int, ...]] = {}
        self.dtype: dict[int, torch.dtype] = {}
        self.keep: list[torch.Tensor] = []  # keeps ids unique while recording
        self.next_id = 0

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # torch would wrap __torch_dispatch__ in dynamo.disable, importing torch._dynamo (2-8 s) on the first
        # recording; the recorder only ever runs eager models, so there is nothing for dynamo to skip
        return False

    def new_value(self, t: torch.Tensor, act: bool, origin: str = "") -> int:
        vid = self.next_id
        self.next_id += 1
        self.value_of[id(t)] = vid
        self.is_act[vid] = act
        self.shape[vid] = tuple(int(s) for s in t.shape)
        self.dtype[vid] = t.dtype
        if origin:
            self.origin[vid] = origin
        self.keep.append(t)
        return vid

    def value(self, t: torch.Tensor) -> int:
        vid = self.value_of.get(id(t))
        if vid is not None:
            return vid
        name = self.params.get((t.data_ptr(), tuple(t.shape))) if t.numel() else None
        return self.new_value(t, act=False, origin=name or "")

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = str(func)
        if name in _IGNORED:
            out = func(*args, **kwargs)
            # a no-op view keeps the value identity of its input
            if isinstance(out, torch.Tensor) and args and isinstance(args[0], torch.Tensor):
                self.value_of[id(out)] = self.value(args[0])
                self.keep.append(out)
            return out
        flat_in, _ = tree_flatten((args, kwargs))
        in_vids = [self.value(t) for t in flat_in if isinstance(t, torch.Tensor)]

        def template(x: Any) -> Any:
            if isinstance(x, torch.Tensor):
                return ("T", self.value(x))
            if isinstance(x, (list, tuple)):
                return type(x)(template(i) for i in x)
            if isinstance(x, dict):
                return {k: template(v) for k, v in x.items()}
            return x

        targs, tkwargs = template(args), template(kwargs)
        out = func(*args, **kwargs)
        acts = [v for v in in_vids if self.is_act[v]]
        consts = [v for v in in_vids if not self.is_act[v]]
        origin = next((self.origin[v] for v in consts if v in self.origin), "")
        flat_out, _ = tree_flatten(out)
        out_vids = [
            self.new_value(t, act=bool(acts), origin="" if acts else origin)
            for t in flat_out
            if isinstance(t, torch.Tensor)
        ]
        if acts:
            self.ops.append(
                _Op(
                    len(self.ops),
                    name,
                    func,
                    targs,
                    tkwargs,
                    acts,
                    consts,
                    out_vids,
                    [self.shape[v] for v in out_vids],
                )
            )
        return out


def _param_names(module: nn.Module) -> dict[tuple[int, tuple[int, ...]], str]:
    names: dict[tuple[int, tuple[int, ...]], str] = {}
    for n, p in list(module.named_buffers()) + list(module.named_parameters()):
        if p.numel():
            names.setdefault((p.data_ptr(), tuple(p.shape)), n)
    return names


def _pair(v: Any, n: int = 2) -> tuple[int, ...]:
    if isinstance(v, (list, tuple)):
        if len(v) == 1:
            return tuple(int(v[0]) for _ in range(n))
        return tuple(int(i) for i in v)
    return tuple(int(v) for _ in range(n))


def _arg(op: _Op, i: int, name: str, default: Any) -> Any:
    if len(op.args) > i:
        return op.args[i]
    return op.kwargs.get(name, default)


def _act_kind(op: _Op) -> str | None:
    n = op.name
    if n in ("aten.relu.default", "aten.relu_.default"):
        return "relu"
    if n in ("aten.hardswish.default", "aten.hardswish_.default"):
        return "hardswish"
    if n in ("aten.hardtanh.default", "aten.hardtanh_.default", "aten.relu6.default"):
        lo, hi = _arg(op, 1, "min_val", -1.0), _arg(op, 2, "max_val", 1.0)
        if n == "aten.relu6.default" or (float(lo) == 0.0 and float(hi) == 6.0):
            return "relu6"
    return None


def _encode(x: Any, rec: _Recorder) -> Any:
    """Arguments as canonical JSON-able data; tensors become their role, shape and dtype."""
    if isinstance(x, tuple) and len(x) == 2 and x[0] == "T" and isinstance(x[1], int):
        v = x[1]
        return {
            "T": "act" if rec.is_act[v] else "const",
            "shape": list(rec.shape[v]),
            "dtype": str(rec.dtype[v]).replace("torch.", ""),
        }
    if isinstance(x, (list, tuple)):
        return [_encode(i, rec) for i in x]
    if isinstance(x, dict):
        return {str(k): _encode(v, rec) for k, v in sorted(x.items())}
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, torch.dtype):
        return {"dtype": str(x).replace("torch.", "")}
    if isinstance(x, torch.device):
        return {"device": x.type}
    if isinstance(x, torch.memory_format):
        return {"memory_format": str(x).replace("torch.", "")}
    if isinstance(x, torch.layout):
        return {"layout": str(x).replace("torch.", "")}
    return {"unsupported": type(x).__name__}


def _functional_name(name: str) -> str:
    """``aten.relu_.default`` -> ``aten.relu.default`` when the out-of-place op exists (same work)."""
    parts = name.split(".")
    if len(parts) == 3 and parts[1].endswith("_") and not parts[1].startswith("_"):
        base = parts[1][:-1]
        packet = getattr(torch.ops.aten, base, None)
        if packet is not None and parts[2] in packet.overloads():
            return f"aten.{base}.{parts[2]}"
    return name


def record_ops(
    module: nn.Module, example_input: torch.Tensor | tuple[torch.Tensor, ...]
) -> tuple[_Recorder, Any]:
    """Run ``module`` once in inference mode and return the recorder (aten ops) and the output."""
    from compression.targets.onnx_io import as_inputs

    inputs = as_inputs(example_input)
    rec = _Recorder(_param_names(module))
    for t in inputs:
        rec.new_value(t, act=True)
    try:
        with torch.inference_mode(), rec:
            out = module(*inputs)
    except Exception as exc:
        raise TargetError(
            f"the model failed to run on the example input: {type(exc).__name__}: {exc}"
        ) from exc
    return rec, out


def extract_workloads(
    module: nn.Module,
    example_input: torch.Tensor | tuple[torch.Tensor, ...],
    bits: Any = None,
) -> list[LayerWorkload]:
    """The model's workloads in execution order (see the module docstring).

    ``bits`` is a quantization plan (``{layer: (w_bits, a_bits)}``, a ``Policy`` ...); conv/linear workloads
    carry their layer's bits (float when absent). Without a plan, the bits a compressed model carries
    (``compression.quant.quantization_plan``) are used. Activation quantizers are not recorded as operations
    of their own: their cost belongs to the quantized layer's workload (see ``LayerWorkload.act_fq``).
    Raises ``PolicyError`` when the plan names a layer that is not a convolution or linear layer of the model.
    """
    from compression.quant import act_quantizers_bypassed, quantization_plan

    plan = normalize_bits(bits) if bits is not None else quantization_plan(module)
    with act_quantizers_bypassed(module):
        rec, out = record_ops(module, example_input)
    consumers: dict[int, list[int]] = {}
    for op in rec.ops:
        for v in op.inputs:
            consumers.setdefault(v, []).append(op.index)
    flat_out, _ = tree_flatten(out)
    for t in flat_out:
        if isinstance(t, torch.Tensor) and id(t) in rec.value_of:
            consumers.setdefault(rec.value_of[id(t)], []).append(-1)  # the model's output is a consumer too

    def sole_consumer(v: int) -> _Op | None:
        c = consumers.get(v, [])
        if len(c) == 1 and c[0] >= 0:
            op = rec.ops[c[0]]
            if op.inputs and op.inputs[0] == v:
                return op
        return None

    fused_away: set[int] = set()
    result: list[LayerWorkload] = []
    seen_layers: set[str] = set()
    for op in rec.ops:
        if op.index in fused_away:
            continue
        layer = _layer_workload(op, rec)
        if layer is None:
            result.append(_op_workload(op, rec))
            continue
        fused: list[str] = []
        v = op.outputs[0]
        nxt = sole_consumer(v)
        if nxt is not None and nxt.name in _BN_OPS and len(nxt.inputs) == 1:
            fused.append("bn")
            fused_away.add(nxt.index)
            v = nxt.outputs[0]
            nxt = sole_consumer(v)
        if nxt is not None and _act_kind(nxt) is not None and len(nxt.inputs) == 1:
            fused.append(_act_kind(nxt) or "")
            fused_away.add(nxt.index)
            v = nxt.outputs[0]
        name = layer.name
        if name in seen_layers:  # a layer called twice (weight sharing) is two occurrences
            name = f"{name}#{op.index}"
        seen_layers.add(layer.name)
        w_bits, a_bits = plan.get(layer.name, (FLOAT_BITS, FLOAT_BITS))
        result.append(
            replace(
                layer, fused=tuple(fused), out_shape=rec.shape[v], w_bits=w_bits, a_bits=a_bits, name=name
            )
        )
    unknown = sorted(set(plan) - seen_layers)
    if unknown:
        raise PolicyError(
            f"the bits plan names layers that are not convolution/linear layers of the model: {', '.join(unknown[:8])}",
            "use the layers' qualified names, e.g. layer1.0.conv1",
        )
    return result


def _layer_workload(op: _Op, rec: _Recorder) -> LayerWorkload | None:
    """A conv2d/linear workload for ``op`` (without fusions), or None when it is another kind of op."""
    if op.name in _CONV_OPS:
        x, w = _arg(op, 0, "input", None), _arg(op, 1, "weight", None)
        if not (isinstance(w, tuple) and w[0] == "T") or rec.is_act[w[1]] or len(rec.shape[w[1]]) != 4:
            return None
        if op.name == "aten.convolution.default" or op.name == "aten._convolution.default":
            if bool(_arg(op, 6, "transposed", False)):
                return None
            stride, padding, dilation = (
                _arg(op, 3, "stride", 1),
                _arg(op, 4, "padding", 0),
                _arg(op, 5, "dilation", 1),
            )
            groups = int(_arg(op, 8, "groups", 1))
        else:
            stride, padding = _arg(op, 3, "stride", 1), _arg(op, 4, "padding", 0)
            dilation, groups = _arg(op, 5, "dilation", 1), int(_arg(op, 6, "groups", 1))
        bias = _arg(op, 2, "bias", None)
        wshape = rec.shape[w[1]]
        in_shape = rec.shape[x[1]]
        return LayerWorkload(
            kind="conv2d",
            op="conv2d",
            in_shape=in_shape,
            out_shape=op.out_shapes[0],
            in_channels=int(in_shape[1]),
            out_channels=int(wshape[0]),
            kernel=(int(wshape[2]), int(wshape[3])),
            stride=_pair(stride),
            padding=padding if isinstance(padding, str) else _pair(padding),
            dilation=_pair(dilation),
            groups=groups,
            bias=bias is not None,
            name=_layer_name(rec, w[1], op),
        )
    if op.name in _LINEAR_OPS:
        if op.name == "aten.linear.default":
            x, w, bias = _arg(op, 0, "input", None), _arg(op, 1, "weight", None), _arg(op, 2, "bias", None)
            transposed = False
        elif op.name == "aten.addmm.default":
            bias, x, w = _arg(op, 0, "self", None), _arg(op, 1, "mat1", None), _arg(op, 2, "mat2", None)
            transposed = True
        else:
            x, w, bias = _arg(op, 0, "self", None), _arg(op, 1, "mat2", _arg(op, 1, "other", None)), None
            transposed = True
        if not (isinstance(w, tuple) and w[0] == "T" and isinstance(x, tuple) and x[0] == "T"):
            return None
        if rec.is_act[w[1]] or not rec.is_act[x[1]] or len(rec.shape[w[1]]) != 2:
            return None
        if bias is not None and (not isinstance(bias, tuple) or rec.is_act[bias[1]]):
            return None
        wshape = rec.shape[w[1]]
        out_f, in_f = (wshape[1], wshape[0]) if transposed else (wshape[0], wshape[1])
        return LayerWorkload(
            kind="linear",
            op="linear",
            in_shape=rec.shape[x[1]],
            out_shape=op.out_shapes[0],
            in_channels=int(in_f),
            out_channels=int(out_f),
            bias=bias is not None,
            name=_layer_name(rec, w[1], op),
        )
    return None


def _layer_name(rec: _Recorder, weight_vid: int, op: _Op) -> str:
    origin = rec.origin.get(weight_vid, "")
    if origin:
        return origin.rsplit(".", 1)[0] if "." in origin else origin
    return f"{op.name.split('.')[1]}:{op.index}"


def _op_workload(op: _Op, rec: _Recorder) -> LayerWorkload:
    name = _functional_name(op.name)
    sig = json.dumps(
        {"args": _encode(op.args, rec), "kwargs": _encode(op.kwargs, rec)},
        sort_keys=True,
        separators=(",", ":"),
    )
    short = name.split(".")[1] if name.count(".") >= 2 else name
    return LayerWorkload(
        kind="op",
        op=name,
        in_shape=rec.shape[op.inputs[0]],
        out_shape=op.out_shapes[0] if op.out_shapes else (),
        signature=sig,
        name=f"{short}:{op.index}",
    )


def overhead_workload(example_input: torch.Tensor | tuple[torch.Tensor, ...]) -> LayerWorkload:
    """The pseudo-workload measuring one call of an empty model with this input (the per-call overhead)."""
    from compression.targets.onnx_io import as_inputs

    shape = tuple(int(s) for s in as_inputs(example_input)[0].shape)
    return LayerWorkload(kind="overhead", op="identity", in_shape=shape, out_shape=shape, name="overhead")


# ------------------------------------------------------------------------------------------ rebuilding
WORKLOAD_LAYER = "op"  # the conv/linear of a one-layer module is named this (``bits={"op": (w, a)}``)


class FusedLayer(nn.Module):
    """A conv2d or linear layer with its fused batch norm and activation: one table entry's module."""

    def __init__(self, w: LayerWorkload) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        if w.kind == "conv2d":
            self.op = nn.Conv2d(
                w.in_channels,
                w.out_channels,
                w.kernel,
                w.stride,
                w.padding,
                w.dilation,
                w.groups,
                bias=w.bias,
            )
            bn: nn.Module = nn.BatchNorm2d(w.out_channels)
        elif w.kind == "linear":
            self.op = nn.Linear(w.in_channels, w.out_channels, bias=w.bias)
            bn = nn.BatchNorm1d(w.out_channels)
        else:
            raise TargetError(f"FusedLayer needs a conv2d or linear workload, got {w.kind}")
        with torch.no_grad():
            fan_in = max(1, self.op.weight[0].numel())
            self.op.weight.copy_(torch.randn(self.op.weight.shape, generator=g) / fan_in**0.5)
            if self.op.bias is not None:
                self.op.bias.copy_(torch.randn(self.op.bias.shape, generator=g) * 0.1)
        self.bn = None
        if "bn" in w.fused:
            self.bn = bn
            with torch.no_grad():
                bn.running_mean.copy_(torch.randn(w.out_channels, generator=g) * 0.1)
                bn.running_var.copy_(torch.rand(w.out_channels, generator=g) + 0.5)
        acts = {"relu": nn.ReLU, "relu6": nn.ReLU6, "hardswish": nn.Hardswish}
        act = next((a for a in w.fused if a in acts), None)
        self.act = acts[act]() if act else None
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.op(x)
        if self.bn is not None:
            x = self.bn(x)
        if self.act is not None:
            x = self.act(x)
        return x


def _decode_dtype(s: str) -> torch.dtype:
    dt = getattr(torch, s, None)
    if not isinstance(dt, torch.dtype):
        raise TargetError(f"unknown dtype {s!r} in a workload signature")
    return dt


class OpModule(nn.Module):
    """Calls one aten operation with recorded arguments: activations are inputs, constants are buffers."""

    def __init__(self, w: LayerWorkload) -> None:
        super().__init__()
        self.op_name = w.op
        _, base, overload = w.op.split(".")
        self.func = getattr(getattr(torch.ops.aten, base), overload)
        sig = json.loads(w.signature)
        g = torch.Generator().manual_seed(0)
        self.input_specs: list[tuple[tuple[int, ...], torch.dtype]] = []
        n_const = 0

        def build(x: Any) -> Any:
            nonlocal n_const
            if isinstance(x, dict) and "T" in x:
                shape, dtype = tuple(x["shape"]), _decode_dtype(x["dtype"])
                if x["T"] == "act":
                    self.input_specs.append((shape, dtype))
                    return ("input", len(self.input_specs) - 1)
                if dtype.is_floating_point:
                    # positive values keep ops such as batch-norm variances or logs well defined
                    t = torch.rand(shape, generator=g).to(dtype) + 0.5
                else:
                    t = torch.zeros(shape, dtype=dtype)
                name = f"const{n_const}"
                n_const += 1
                self.register_buffer(name, t)
                return ("buffer", name)
            if isinstance(x, dict) and "unsupported" in x:
                raise TargetError(
                    f"workload {w.op} has an argument of type {x['unsupported']} that cannot be rebuilt"
                )
            if isinstance(x, dict) and len(x) == 1:
                ((k, v),) = x.items()
                if k == "dtype":
                    return _decode_dtype(v)
                if k == "device":
                    return torch.device(v)
                if k == "memory_format":
                    return getattr(torch, v)
                if k == "layout":
                    return getattr(torch, v)
            if isinstance(x, list):
                return [build(i) for i in x]
            if isinstance(x, dict):
                return {k: build(v) for k, v in x.items()}
            return x

        self.args_t = build(sig["args"])
        self.kwargs_t = build(sig["kwargs"])

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(1)
        return tuple(
            torch.randn(shape, generator=g).to(dt) if dt.is_floating_point else torch.zeros(shape, dtype=dt)
            for shape, dt in self.input_specs
        )

    def forward(self, *xs: torch.Tensor) -> Any:
        def fill(x: Any) -> Any:
            if isinstance(x, tuple) and len(x) == 2 and x[0] == "input":
                return xs[x[1]]
            if isinstance(x, tuple) and len(x) == 2 and x[0] == "buffer":
                return getattr(self, x[1])
            if isinstance(x, list):
                return [fill(i) for i in x]
            if isinstance(x, dict):
                return {k: fill(v) for k, v in x.items()}
            return x

        return self.func(*fill(self.args_t), **fill(self.kwargs_t))


class OverheadModule(nn.Module):
    """The empty model: returns its input (what one call costs on a target before any work)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def build_workload_module(
    w: LayerWorkload,
) -> tuple[nn.Module, tuple[torch.Tensor, ...], dict[str, tuple[int, int]]]:
    """The module a table measures for ``w``, its inputs, and the bits plan for it.

    Conv/linear workloads give a ``FusedLayer`` whose layer is named ``op`` (the plan is ``{"op": (w, a)}``
    when quantized); ``op`` workloads an ``OpModule``; ``overhead`` the empty model.
    """
    g = torch.Generator().manual_seed(1)
    if w.is_layer:
        module: nn.Module = FusedLayer(w)
        x = torch.randn(w.in_shape, generator=g)
        plan = (
            {} if (w.w_bits, w.a_bits) == (FLOAT_BITS, FLOAT_BITS) else {WORKLOAD_LAYER: (w.w_bits, w.a_bits)}
        )
        if w.act_fq:
            # float compute with a fake-quantized input: the quantizer's arithmetic (same at any bit-width)
            from compression.quant import attach_act_quantizer

            q = attach_act_quantizer(module.op, 8)
            assert q is not None
            with torch.no_grad():
                module(x)
            q.finish_calibration()
        return module, (x,), plan
    if w.kind == "op":
        om = OpModule(w)
        return om, om.example_inputs(), {}
    if w.kind == "overhead":
        return OverheadModule(), (torch.randn(w.in_shape, generator=g),), {}
    raise TargetError(f"unknown workload kind {w.kind!r}")
