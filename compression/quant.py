"""Mixed-precision fake quantization for the search, and the bit-width bookkeeping for deployment.

- Weights: per-output-channel symmetric, ``2**(b-1) - 1`` levels each side (b = 1 is sign x mean |w|).
  Quantized once, in place, when a policy is applied: the forward pass pays nothing for it.
- Activations: the *input* of each quantized layer, per-tensor asymmetric (unsigned range ``0..2**b - 1``
  with a zero point), range calibrated by min/max on training samples. Implemented as an ``ActQuantizer``
  submodule of the layer called from a forward pre-hook, so layer names and state-dict keys stay the same
  and ``torch.export`` traces it (as plain round/clamp arithmetic, batch dimension kept dynamic).
- 32 bits means float: nothing is done.

On a runtime that computes in float (TVM and PyTorch here, ONNX Runtime for layers it cannot run in int8)
the activation quantizers are real work: their round/clamp arithmetic runs before each quantized layer. The
latency tables charge it (a layer workload with ``act_fq``); ONNX Runtime replaces the quantizers of its
int8 layers by its own QuantizeLinear nodes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import nn

from compression.policy import FLOAT_BITS


@torch.no_grad()
def fake_quantize_weight(w: torch.Tensor, bits: int | Sequence[int]) -> torch.Tensor:
    """Per-output-channel symmetric fake quantization of a weight tensor (dim 0 = output channels).

    ``bits`` is one bit-width, or one per output channel (AJPQ's per-group bits expanded to channels).
    """
    out_c = w.shape[0]
    if isinstance(bits, int):
        if bits >= FLOAT_BITS:
            return w.clone()
        bits_t = torch.full((out_c,), bits, dtype=torch.float32)
    else:
        bits_t = torch.tensor(list(bits), dtype=torch.float32)
        if bits_t.numel() != out_c:
            raise ValueError(f"{bits_t.numel()} bit-widths for {out_c} output channels")
    flat = w.reshape(out_c, -1)
    absmax = flat.abs().amax(dim=1).clamp_min(1e-12)
    levels = (2.0 ** (bits_t - 1) - 1).clamp_min(1.0)  # 1 bit -> 1 level: sign
    scale = absmax / levels
    q = torch.clamp(torch.round(flat / scale[:, None]), -levels[:, None], levels[:, None]) * scale[:, None]
    one_bit = bits_t == 1
    if bool(one_bit.any()):
        mean_abs = flat.abs().mean(dim=1)
        q[one_bit] = torch.sign(flat[one_bit]) * mean_abs[one_bit, None]
    keep_float = bits_t >= FLOAT_BITS
    if bool(keep_float.any()):
        q[keep_float] = flat[keep_float]
    return q.reshape_as(w)


class ActQuantizer(nn.Module):
    """Asymmetric per-tensor fake quantizer for a layer's input, calibrated by observed min/max."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = int(bits)
        self.observing = False
        self.bypass = (
            False  # True while a latency table records the model's ops (see act_quantizers_bypassed)
        )
        self.register_buffer("lo", torch.tensor(float("inf")))
        self.register_buffer("hi", torch.tensor(float("-inf")))
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0, dtype=torch.int32))

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1

    @torch.no_grad()
    def finish_calibration(self) -> None:
        """Turn the observed range into scale and zero point (the range always includes 0)."""
        lo = torch.minimum(self.lo, torch.tensor(0.0))
        hi = torch.maximum(self.hi, torch.tensor(0.0))
        if not torch.isfinite(lo) or not torch.isfinite(hi):
            lo, hi = torch.tensor(0.0), torch.tensor(1.0)
        scale = ((hi - lo) / self.qmax).clamp_min(1e-8)
        zp = torch.clamp(torch.round(-lo / scale), 0, self.qmax)
        self.scale.copy_(scale)
        self.zero_point.copy_(zp.to(torch.int32))
        self.observing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bypass:
            return x
        if self.observing:
            with torch.no_grad():
                lo, hi = torch.aminmax(x.detach())
                self.lo.copy_(torch.minimum(self.lo, lo))
                self.hi.copy_(torch.maximum(self.hi, hi))
            return x
        # Written out rather than torch.fake_quantize_per_tensor_affine, whose tensor-qparams kernel has no
        # symbolic-shape support: this way torch.export keeps the batch dimension dynamic.
        zp = self.zero_point.to(x.dtype)
        if not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            # Scoring a candidate (no autograd, not tracing): the same arithmetic in place, one buffer
            # instead of five, and the zero point folded into the clamp (round(v) + zp, clamped to [0, qmax],
            # minus zp is exactly round(v) clamped to [-zp, qmax - zp]: integers, exact in float): four passes
            # over the tensor, bit-identical to the expression below, which export traces.
            z = float(self.zero_point)
            q = x / self.scale
            return q.round_().clamp_(-z, self.qmax - z).mul_(self.scale)
        q = (torch.clamp(torch.round(x / self.scale) + zp, 0, self.qmax) - zp) * self.scale
        if x.requires_grad:
            # training through the quantizer (the fine-tune): the straight-through estimator, gradient 1. Only
            # here: ``x + (q - x)`` costs two more passes, and a model exported for inference (no input needing a
            # gradient) or scored carries the plain ``q`` (measured on ResNet-20/digits: the two passes were a
            # third of the quantizers' time in a joint policy's scoring; docs/BENCHMARKS.md 2, session 11)
            return x + (q - x).detach()
        return q


def _pre_hook(module: nn.Module, args: tuple) -> tuple:
    return (module.act_quant(args[0]), *args[1:])


def quantize_layer_weights(layer: nn.Module, bits: int | Sequence[int]) -> None:
    """Fake-quantize a conv/linear layer's weights in place and record the bit-width on the layer."""
    layer.weight.data = fake_quantize_weight(layer.weight.data, bits)
    layer.w_bits = bits if isinstance(bits, int) else list(bits)


def attach_act_quantizer(layer: nn.Module, bits: int) -> ActQuantizer | None:
    """Quantize the layer's input at ``bits`` from now on (after calibration). 32 bits attaches nothing."""
    if bits >= FLOAT_BITS:
        return None
    q = ActQuantizer(bits)
    q.observing = True
    layer.act_quant = q
    layer.register_forward_pre_hook(_pre_hook)
    return q


def act_quantizers(model: nn.Module) -> list[ActQuantizer]:
    """Every activation quantizer in a model."""
    return [m for m in model.modules() if isinstance(m, ActQuantizer)]


def bit_widths(model: nn.Module) -> dict[str, dict[str, object]]:
    """The bit-widths recorded on a model's layers by ``apply``: name -> {w_bits, a_bits}."""
    out: dict[str, dict[str, object]] = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            w = getattr(m, "w_bits", FLOAT_BITS)
            a = m.act_quant.bits if isinstance(getattr(m, "act_quant", None), ActQuantizer) else FLOAT_BITS
            if w != FLOAT_BITS or a != FLOAT_BITS:
                out[name] = {"w_bits": w, "a_bits": a}
    return out


def graph_quantizer_levels(gm: nn.Module) -> int | None:
    """Steps of the coarsest activation quantizer in the fx graph ``gm`` (``clamp(round(x / s) + z, lo, hi)`` with
    integer bounds: the form this tool's quantizers take in an exported ``.pt2``, loaded back), or None when there
    is none (or ``gm`` has no graph)."""
    from torch import fx

    graph = getattr(gm, "graph", None)
    if not isinstance(graph, fx.Graph):
        return None

    def op(target) -> str:
        name = target.overloadpacket.__name__ if isinstance(target, torch._ops.OpOverload) else target
        return str(getattr(name, "__name__", name)).split(".")[0]

    levels = []
    for node in graph.nodes:
        if node.op != "call_function" or op(node.target) not in ("clamp", "clamp_"):
            continue
        src = node.args[0] if node.args else None
        # the rounded value, possibly shifted by a zero point first: clamp(round(x / s) + z, lo, hi)
        for _ in range(2):
            if not isinstance(src, fx.Node) or op(src.target) not in ("add", "sub"):
                break
            src = src.args[0]
        if not isinstance(src, fx.Node) or op(src.target) not in ("round", "round_"):
            continue
        lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min")
        hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max")
        if isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and hi > lo:
            levels.append(int(round(hi - lo)))
    return min(levels) if levels else None


def output_tolerance(model: nn.Module, base: float) -> float:
    """Relative tolerance for comparing a runtime's outputs of ``model`` with PyTorch's.

    A float model only differs by float reordering (``base``). A model with activation quantizers can differ
    by whole quantization steps: a runtime that sums in another order moves a value across a rounding
    boundary, and that one step (1/(2^bits-1) of a layer's input range) propagates to the output. So the
    tolerance grows with the coarsest quantizer: 8 steps of its grid, at most half the output scale. A
    miscompiled model still fails, since its outputs are unrelated to PyTorch's.
    """
    bits = [q.bits for q in act_quantizers(model)]
    levels = (2 ** min(bits) - 1) if bits else graph_quantizer_levels(model)  # a compressed .pt2 loaded back
    if not levels:
        return base
    return max(base, min(0.5, 8.0 / levels))


def quantization_plan(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``{layer: (w_bits, a_bits)}`` of a model compressed by ``apply_policy`` (per-channel bits: the widest).

    This is the plan a runtime needs to run the compressed model as it was searched: ONNX Runtime turns
    its <= 8-bit layers into int8 kernels, a latency table looks up the matching entries.
    """
    out: dict[str, tuple[int, int]] = {}
    for name, d in bit_widths(model).items():
        w = d["w_bits"]
        w_max = max(int(b) for b in w) if isinstance(w, (list, tuple)) else int(w)  # type: ignore[arg-type]
        out[name] = (w_max, int(d["a_bits"]))  # type: ignore[call-overload]
    return out


@contextlib.contextmanager
def act_quantizers_bypassed(model: nn.Module) -> Iterator[None]:
    """Within the block the model's activation quantizers pass their input through unchanged.

    Used to record a compressed model's own operations: the quantizers' arithmetic is accounted per layer
    (a layer workload with a quantized input), not as separate elementwise operations.
    """
    qs = act_quantizers(model)
    before = [q.bypass for q in qs]
    for q in qs:
        q.bypass = True
    try:
        yield
    finally:
        for q, b in zip(qs, before, strict=True):
            q.bypass = b


def strip_act_quantizers(model: nn.Module, layers: Iterable[str] | None = None) -> dict[str, int]:
    """Remove activation quantizers in place (for runtimes that quantize activations themselves).

    ``layers`` limits it to those layer names (all layers when None). Returns the a_bits each layer had,
    so the caller can record or re-apply them.
    """
    only = None if layers is None else set(layers)
    removed: dict[str, int] = {}
    for name, m in model.named_modules():
        q = getattr(m, "act_quant", None)
        if isinstance(q, ActQuantizer) and (only is None or name in only):
            removed[name] = q.bits
            for key, fn in list(m._forward_pre_hooks.items()):
                if fn is _pre_hook:
                    del m._forward_pre_hooks[key]
            del m.act_quant
    return removed
