"""Default CPU schedules for TVM: good code for conv/linear layers in milliseconds of compile time, no tuning.

TVM 0.27's llvm pipeline lowers every operator to naive loop nests (no parallelism, no vectorization, no
register blocking): ResNet-20 runs 10-30x slower than PyTorch. MetaSchedule fixes that, but costs tens of
seconds to minutes per new workload. ``dlight`` (``tvm.s_tir.dlight.cpu``) only has GEMV and
normalisation/softmax rules for CPUs, nothing for convolutions.

These rules fill the gap with one template that generalises across shapes (see ``docs/targets-tvm.md`` for
what they cost and give next to MetaSchedule, ONNX Runtime and PyTorch):

- ``AnchorTiling``: a fused function with one reduction block (conv2d, dense/matmul, pooling, mean) whose
  other blocks are injective (the padding before it, batch norm / bias / residual / ReLU after it). The
  reduction's spatial loops are tiled so that a small output tile (``reg`` output channels x ``rows`` rows x
  one vector of output columns) stays in registers while the reduction loops run around it; the tile loop
  nest is fused and run in parallel; the epilogue is computed per tile while the tile is hot in cache. A
  strided input (stride-2 convolutions) is stored de-interleaved (``[..., w % 2, w // 2]``) so the vector
  axis reads contiguous memory instead of gathering.
- ``InjectiveFallback``: anything else (reshapes, pads, elementwise functions, functions with several
  reductions): each block gets its leading spatial loops in parallel and, for injective blocks, a vectorized
  inner loop. It schedules every function the normaliser accepts, so no function is left as naive code
  silently: ``schedule_module`` reports how many functions each source scheduled.

Vector width comes from the target (``llvm_get_vector_width``), so the same rules serve x86 (AVX2, AVX-512)
and ARM (NEON) targets, including cross-compiled RPC devices.
"""

from __future__ import annotations

import logging
from typing import Any

import tvm
from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.target import Target

log = logging.getLogger(__name__)

SCHEDULED_ATTR = "tirx.is_scheduled"
# which rule scheduled a function (kept on the function so the backend can count sources)
SOURCE_ATTR = "compression.schedule"


def _divisor_at_most(n: int, cap: int) -> int:
    """The largest divisor of ``n`` that is <= ``cap`` (tiles divide loops exactly: no tail predicates)."""
    for d in range(min(n, cap), 0, -1):
        if n % d == 0:
            return d
    return 1


def _x86_vector_bits(target: Target) -> int | None:
    """The SIMD register width of an x86 ``target`` from its features (None for other architectures).

    TVM 0.27's ``llvm_get_vector_width`` answers 512 for every x86 CPU, AVX2-only ones included (znver3,
    haswell): there a vector of 16 floats is two registers, and a tile sized for it needs twice the registers."""
    try:
        from tvm.target.codegen import target_has_features

        if not target_has_features("sse2", target):
            return None
        if target_has_features("avx512f", target):
            return 512
        return 256 if target_has_features("avx", target) else 128
    except Exception:  # not an llvm target, or an LLVM without this query
        return None


def vector_bits(target: Target) -> int:
    """The SIMD register width of ``target`` in bits (128 when LLVM cannot tell)."""
    x86 = _x86_vector_bits(target)
    if x86 is not None:
        return x86
    try:
        from tvm.target.codegen import llvm_get_vector_width

        width = int(llvm_get_vector_width(target))
    except Exception:  # not an llvm target, or an LLVM without this query: assume 128-bit SIMD
        return 128
    return width if width > 0 else 128


def vector_lanes(target: Target, bits: int = 32) -> int:
    """How many ``bits``-wide elements one SIMD register of ``target`` holds (at least 4)."""
    return max(vector_bits(target) // bits, 4)


def register_tile(target: Target) -> tuple[int, int]:
    """(output channels, output rows) of a convolution's register tile on ``target``, one vector wide.

    The tile's accumulators must stay in registers while the reduction runs, beside the input vectors and the
    broadcast weights; on both x86 machines measured the best tile holds about half the register file
    (docs/targets-tvm.md, ``bench/run.py schedules``):

    - AVX/AVX2 (16 vector registers): 4 channels x 2 rows (8 accumulators) ran ResNet-20 1.7x faster than 8
      rows of one vector (its pruned copies 1.1-1.3x, the depthwise net 1.3x), and 8 x 2 (every register) was
      slower than both (an AMD EPYC Zen 3, session 17).
    - AVX-512 (32 registers): 16 accumulators. On an Intel Xeon (Emerald Rapids, session 18) 8 channels x 2
      rows ran ResNet-20 1.2x faster than 8 rows of one vector, its pruned copies 1.05-1.08x, the depthwise
      net 1.4x; 4 x 4 was level with 8 x 2 (0.98-1.00 of it), 24 accumulators (8 x 3, 4 x 6) no faster, 8
      accumulators slower. On an AMD EPYC Zen 4 (whose AVX-512 runs in 256-bit halves, session 21) 4 x 4 ran
      ResNet-20 0.96 of 8 x 2's time, its pruned copies and the depthwise net 0.98-0.99, in two runs: 4 x 4
      is shipped, the tile at least as fast on both.
    - Other architectures (NEON: 32 registers of 4 floats) keep 8 rows of one vector: not measured there.
    """
    bits = _x86_vector_bits(target)
    if bits in (128, 256):
        return 4, 2
    if bits == 512:
        return 4, 4
    return 1, 8


def _leading_spatial(kinds: str) -> int:
    return len(kinds) - len(kinds.lstrip("S"))


def _static_dom(info: Any) -> list[int] | None:
    try:
        return [int(d) for d in info.dom()]
    except TypeError:  # a symbolic extent: these rules only handle static shapes
        return None


class AnchorTiling(dl.ScheduleRule):
    """Register-tiled, parallel schedule for a function built around one reduction (conv, dense, pool).

    channels, rows: the most output channels and output rows accumulated per tile (outputs with channel, row
    and column axes: convolutions, pooling); default ``register_tile(target)``.
    reg: the most output rows per tile of a 2-D output (dense layers at batch > 1).
    lanes: the vector length in floats; default ``vector_lanes(target)``.
    """

    def __init__(self, channels: int = 0, rows: int = 0, reg: int = 8, lanes: int = 0) -> None:
        self.channels = channels
        self.rows = rows
        self.reg = reg
        self.lanes = lanes

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        """Schedule ``func`` or return None when it does not have the one-reduction shape."""
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
            return None
        try:
            return self._apply(func, target)
        except Exception as exc:  # noqa: BLE001 - ScheduleError, TVM's RuntimeErrors: the rule does not apply
            log.debug("AnchorTiling does not apply: %s", str(exc).splitlines()[0] if str(exc) else exc)
            return None

    def _apply(self, func: tirx.PrimFunc, target: Target) -> s_tir.Schedule | None:
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None:
            return None
        reductions = [i for i, b in enumerate(infos) if b.is_reduction()]
        if len(reductions) != 1:
            return None
        k = reductions[0]
        anchor = infos[k]
        kinds = anchor.dom_kind()
        ns = _leading_spatial(kinds)
        if ns == 0 or ns == len(kinds) or "S" in kinds[ns:] or "O" in kinds:
            return None
        prologue, epilogue = infos[:k], infos[k + 1 :]
        if not all(b.is_injective() for b in prologue + epilogue):
            return None
        dom = _static_dom(anchor)
        if dom is None:
            return None

        lanes = self.lanes or vector_lanes(target)
        tile_c, tile_rows = register_tile(target)
        tile_c, tile_rows = self.channels or tile_c, self.rows or tile_rows
        self._deinterleave_strided_inputs(sch, anchor, prologue, ns)
        loops = sch.get_loops(anchor.block_rv)
        spatial, reduce = loops[:ns], loops[ns:]
        # the innermost spatial axis is the vector axis. An output with channel, row and column axes (the last
        # three: the batch loop is gone at batch 1, normalisation drops unit loops) is tiled over channels (the
        # input vector is reused across them) and rows (the weight is reused across them); a 2-D output over
        # its rows
        factors = {ns - 1: _divisor_at_most(dom[ns - 1], lanes)}
        blocks = [(ns - 3, tile_c), (ns - 2, tile_rows)] if ns >= 3 else [(ns - 2, self.reg)]
        for axis, most in blocks:
            if axis >= 0 and dom[axis] > 1 and most > 1:
                factors[axis] = _divisor_at_most(dom[axis], most)
        outer, inner = [], []
        for axis, loop in enumerate(spatial):
            if axis in factors:
                o, i = sch.split(loop, [None, factors[axis]])
                outer.append(o)
                inner.append(i)
            else:
                outer.append(loop)
        sch.reorder(*outer, *reduce, *inner)

        # epilogue: fold the elementwise chain into its last block, computed per output tile
        if epilogue:
            for b in epilogue[:-1]:
                sch.compute_inline(b.block_rv)
            last = epilogue[-1].block_rv
        else:
            last = sch.cache_write(anchor.block_rv, 0, "global")
        sch.reverse_compute_at(last, outer[-1], preserve_unit_loops=True)

        parallel = sch.fuse(*outer[:-1]) if len(outer) > 2 else outer[0]
        sch.parallel(parallel)
        for loop in inner[:-1]:
            sch.unroll(loop)
        sch.vectorize(inner[-1])
        init = sch.decompose_reduction(anchor.block_rv, reduce[0])
        sch.vectorize(sch.get_loops(init)[-1])
        self._vectorize_tail(sch, last, lanes)

        # the prologue (padding) is cheap but big enough to be worth running in parallel
        for b in prologue:
            ploops = sch.get_loops(b.block_rv)
            if len(ploops) >= 2:
                sch.parallel(sch.fuse(*ploops[:2]))
            elif ploops:
                sch.parallel(ploops[0])
        return sch

    @staticmethod
    def _deinterleave_strided_inputs(sch: s_tir.Schedule, anchor: Any, prologue: list[Any], ns: int) -> None:
        """Give strided inputs (stride-2 convolutions) a layout where the vector axis reads contiguously.

        A stride-s convolution reads input column ``s*x + rx``: vectorizing over ``x`` would gather every
        s-th element (measured 6x slower than stride 1 for ResNet-20's downsampling layers). The input
        (the padded copy, or a copy made here) is stored as ``[..., w % s, w // s]`` instead, so column
        ``s*x + rx`` becomes ``[rx % s, x + rx // s]``: contiguous in ``x``.
        """
        block = sch.get(anchor.block_rv)
        vx = block.iter_vars[ns - 1].var
        for i, region in enumerate(block.reads):
            stride = _stride_of(region.region[-1].min, vx)
            buf = region.source
            width = buf.shape[-1]
            if stride is None or stride < 2 or not isinstance(width, tirx.IntImm) or int(width) % stride:
                continue
            producer = next(
                (b.block_rv for b in prologue if sch.get(b.block_rv).writes[0].source.same_as(buf)), None
            )
            if producer is None:  # a function input: de-interleave a copy of it
                producer = sch.cache_read(anchor.block_rv, i, "global")
            sch.transform_layout(producer, ("write", 0), _deinterleave(stride))

    @staticmethod
    def _vectorize_tail(sch: s_tir.Schedule, block: Any, lanes: int) -> None:
        loops = sch.get_loops(block)
        extent = sch.get(loops[-1]).extent
        if isinstance(extent, tirx.IntImm) and int(extent) <= 4 * lanes:
            sch.vectorize(loops[-1])


class InjectiveFallback(dl.ScheduleRule):
    """Parallel (and, for injective blocks, vectorized) loops for any function of static shape."""

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        """Schedule every block of ``func`` simply; None when the function cannot be normalised."""
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
            return None
        try:
            return self._apply(func, target)
        except Exception as exc:  # noqa: BLE001 - the rule does not apply; the next one is tried
            log.debug("InjectiveFallback does not apply: %s", str(exc).splitlines()[0] if str(exc) else exc)
            return None

    @staticmethod
    def _apply(func: tirx.PrimFunc, target: Target) -> s_tir.Schedule | None:
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None:
            return None
        lanes = vector_lanes(target)
        for b in infos:
            dom = _static_dom(b)
            if dom is None:
                return None
            ns = _leading_spatial(b.dom_kind())
            if ns == 0:
                continue
            loops = sch.get_loops(b.block_rv)
            if b.is_injective():
                fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
                total = 1
                for d in dom:
                    total *= d
                vec = _divisor_at_most(total, lanes)
                outer, inner = sch.split(fused, [None, vec])
                # a parallel loop over a handful of elements costs more in thread wake-ups than it saves
                if total // vec >= 4:
                    sch.parallel(outer)
                sch.vectorize(inner)
            else:
                spatial = loops[:ns]
                fused = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
                if _prod(dom[:ns]) >= 4:
                    sch.parallel(fused)
        return sch


def _deinterleave(stride: int) -> Any:
    """Index map ``[..., w] -> [..., w % stride, w // stride]`` (its only parameters are the indices:
    TVM turns every parameter of an index-map function into an index)."""
    return lambda *idx: [*idx[:-1], idx[-1] % stride, idx[-1] // stride]


def _stride_of(expr: Any, var: Any) -> int | None:
    """The constant s in an index of the form ``var * s`` or ``var * s + rest`` (None otherwise)."""
    if isinstance(expr, tirx.Add):
        for term in (expr.a, expr.b):
            s = _stride_of(term, var)
            if s is not None:
                return s
        return None
    if isinstance(expr, tirx.Mul):
        a, b = expr.a, expr.b
        if isinstance(b, tirx.IntImm) and a.same_as(var):
            return int(b)
        if isinstance(a, tirx.IntImm) and b.same_as(var):
            return int(a)
    return None


def _prod(xs: list[int]) -> int:
    out = 1
    for x in xs:
        out *= x
    return out


def default_rules() -> tuple[dl.ScheduleRule, ...]:
    """The default CPU rules in the order they are tried."""
    return (AnchorTiling(), InjectiveFallback())


def _is_scheduled(func: Any) -> bool:
    return isinstance(func, tirx.PrimFunc) and bool(func.attrs and func.attrs.get(SCHEDULED_ATTR, False))


def count_scheduled(mod: tvm.IRModule) -> tuple[int, int]:
    """(scheduled, total) PrimFuncs of ``mod``."""
    funcs = [f for _, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)]
    return sum(1 for f in funcs if _is_scheduled(f)), len(funcs)


def schedule_module(
    mod: tvm.IRModule, target: Target, rules: tuple[dl.ScheduleRule, ...] | None = None
) -> tuple[tvm.IRModule, dict[str, int]]:
    """Apply the default rules (or ``rules``) to every PrimFunc of ``mod`` not scheduled yet (e.g. by a tuning
    database).

    Returns the module and how many functions each rule scheduled (``"unscheduled"`` counts functions no
    rule could handle: they run as naive loops).
    """
    counts: dict[str, int] = {"anchor": 0, "fallback": 0, "unscheduled": 0}
    updates = {}
    names = {AnchorTiling: "anchor", InjectiveFallback: "fallback"}
    rules = default_rules() if rules is None else rules
    with target:
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or _is_scheduled(func):
                continue
            for rule in rules:
                sch = rule.apply(func, target, False)
                if sch is not None:
                    updates[gv] = sch.mod["main"].with_attr(SCHEDULED_ATTR, True)
                    counts[names[type(rule)]] += 1
                    break
            else:
                counts["unscheduled"] += 1
    for gv, func in updates.items():
        mod[gv] = func
    return mod, counts
