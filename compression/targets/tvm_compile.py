"""From a PyTorch module to a TVM (Relax) executable: export, import, fold, fuse, build.

The steps, and why they are not TVM's defaults:

- ``export_program``: ``torch.export`` in eval mode (plain modules and fx ``GraphModule``s alike).
- ``import_relax``: ``tvm.relax.frontend.torch.from_exported_program`` with the weights bound as constants.
- ``fuse``: batch-norm decomposition, a numpy constant folder, dead-code elimination, legalization to TIR and
  operator fusion. TVM's own ``FoldConstant`` JIT-compiles every foldable operator with LLVM separately:
  on ResNet-20 it folds ~110 tiny batch-norm expressions (``sqrt(var + eps)``, ``expand_dims``) in 7-9 s of
  CPU, which would dominate the compile time of every one-layer latency-table entry. ``NumpyFold`` folds the
  same expressions with numpy in ~0.04 s, and dead-code elimination then drops batch norm's unused
  statistics outputs so that ReLUs and residual additions fuse into the convolution (14 fused functions
  for ResNet-20, the same as with ``FoldConstant``).
- ``build``: ``tvm.compile`` with only the lowering and finalisation passes, so functions scheduled
  beforehand (database records, default schedules) are not re-fused or re-legalized.

The fused module is what MetaSchedule's tasks and database records are keyed by, so tuning and measuring
must both go through ``fuse``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from compression.errors import ModelError, TargetError


def first_line(exc: BaseException) -> str:
    """The last non-empty line of an exception's text (TVM puts the message after a C++ trace), shortened."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:300]


def export_program(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Any:
    """``torch.export`` of ``module`` in eval mode (its training flag is restored afterwards)."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            return torch.export.export(module, tuple(t.detach().cpu() for t in inputs))
    except Exception as exc:
        raise ModelError(
            f"torch.export cannot export the model for TVM: {type(exc).__name__}: {first_line(exc)}",
            "TVM imports models through torch.export; remove data-dependent Python control flow from forward()",
        ) from exc
    finally:
        module.train(was_training)


def import_relax(exported: Any) -> Any:
    """A Relax IRModule (weights bound as constants) from an ``ExportedProgram``."""
    from tvm.relax.frontend.torch import from_exported_program

    try:
        return from_exported_program(exported, keep_params_as_input=False)
    except Exception as exc:
        raise TargetError(
            f"TVM cannot import the model: {type(exc).__name__}: {first_line(exc)}",
            "an operator is not supported by TVM's PyTorch frontend; measure this model with local-ort or local-torch",
        ) from exc


_BINARY = {
    "relax.add": np.add,
    "relax.subtract": np.subtract,
    "relax.multiply": np.multiply,
    "relax.divide": np.divide,
}
_UNARY = {"relax.sqrt": np.sqrt, "relax.rsqrt": lambda x: 1.0 / np.sqrt(x), "relax.negative": np.negative}


def _make_folder() -> Any:
    """The numpy constant-folding mutator (built lazily: defining it needs TVM)."""
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    def array_of(expr: Any) -> np.ndarray | None:
        if isinstance(expr, tvm.ir.GenericConst):
            value = expr.value
            return value.numpy() if hasattr(value, "numpy") else None
        return None

    @mutator
    class NumpyFold(PyExprMutator):
        """Evaluates elementwise arithmetic, ``expand_dims`` and ``permute_dims`` of constants with numpy."""

        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            if not isinstance(call.op, tvm.ir.Op):
                return call
            args = []
            for a in call.args:
                if isinstance(a, relax.Var):
                    bound = self.lookup_binding(a)
                    a = bound if bound is not None else a
                args.append(array_of(a) if isinstance(a, relax.Expr) else None)
            name = call.op.name
            try:
                out = self._evaluate(name, call, args)
            except (ValueError, TypeError, IndexError, AttributeError):
                return call
            if out is None:
                return call
            ty = call.ty
            dtype = str(ty.dtype) if getattr(ty, "dtype", None) is not None else str(out.dtype)
            out = np.ascontiguousarray(out.astype(dtype))
            try:
                if ty.shape is None or tuple(int(d) for d in ty.shape) != out.shape:
                    return call
            except (TypeError, AttributeError):  # symbolic shapes: leave it to TVM
                return call
            return relax.const(out, dtype)

        @staticmethod
        def _evaluate(name: str, call: Any, args: list[np.ndarray | None]) -> np.ndarray | None:
            if name in _BINARY and len(args) == 2 and args[0] is not None and args[1] is not None:
                return _BINARY[name](args[0], args[1])
            if name in _UNARY and len(args) == 1 and args[0] is not None:
                return _UNARY[name](args[0])
            if name == "relax.expand_dims" and args and args[0] is not None:
                out = args[0]
                axes = [int(a) for a in call.attrs.axis]
                ndim = out.ndim + len(axes)
                for ax in sorted(a if a >= 0 else a + ndim for a in axes):
                    out = np.expand_dims(out, ax)
                return out
            if name == "relax.permute_dims" and args and args[0] is not None:
                axes = call.attrs.axes
                return np.transpose(args[0], None if axes is None else [int(a) for a in axes])
            return None

    return NumpyFold


_folder_cls: Any = None


def numpy_fold(mod: Any) -> Any:
    """Fold constant subexpressions of every Relax function of ``mod`` with numpy (see module docstring)."""
    global _folder_cls
    from tvm import relax

    if _folder_cls is None:
        _folder_cls = _make_folder()
    folder = _folder_cls(mod)
    updates = {gv: folder.visit_expr(f) for gv, f in mod.functions_items() if isinstance(f, relax.Function)}
    for gv, f in updates.items():
        mod[gv] = f
    return mod


def fuse(mod: Any, target: Any) -> Any:
    """Decompose, fold, legalize to TIR and fuse (the form tuning tasks and database records are keyed by)."""
    import tvm
    from tvm import relax

    with target, tvm.transform.PassContext(opt_level=3):
        mod = tvm.transform.Sequential(
            [relax.transform.DecomposeOpsForInference(), relax.transform.CanonicalizeBindings()]
        )(mod)
        mod = numpy_fold(mod)
        return tvm.transform.Sequential(
            [
                relax.transform.CanonicalizeBindings(),
                relax.transform.DeadCodeElimination(),
                *relax.pipeline.library_dispatch_passes(target),
                relax.transform.LegalizeOps(),
                relax.transform.AnnotateTIROpPattern(),
                relax.transform.FuseOps(),
                relax.transform.FuseTIR(),
            ]
        )(mod)


def build(mod: Any, target: Any) -> Any:
    """Compile a fused, scheduled Relax module to a VM executable (no further fusion: schedules stay)."""
    import tvm
    from tvm import relax

    try:
        lower = relax.pipeline.dataflow_lower_passes(target) + relax.pipeline.finalize_passes(target)
    except AttributeError:
        # TVM 0.27 does not export cpu_generic.dataflow_lower_passes (relax.pipeline looks for it there)
        from tvm.relax.backend.cpu_generic import pipeline as cpu_pipeline

        lower = cpu_pipeline.dataflow_lower_passes(target) + cpu_pipeline.finalize_passes(target)
    with target, tvm.transform.PassContext(opt_level=3):
        return tvm.compile(mod, target=target, relax_pipeline=tvm.transform.Sequential(lower))


def compile_module(module: nn.Module, inputs: tuple[torch.Tensor, ...], target: Any) -> Any:
    """Export, import and fuse ``module`` for ``target`` (unscheduled: schedule it before ``build``)."""
    return fuse(import_relax(export_program(module, inputs)), target)


class _Batch(nn.Module):
    """Several modules side by side: ``forward`` takes their inputs one after another, returns every output."""

    def __init__(self, modules: list[nn.Module], counts: list[int]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(modules)
        self.counts = counts

    def forward(self, *xs: torch.Tensor) -> tuple[Any, ...]:
        outs = []
        k = 0
        for part, c in zip(self.parts, self.counts, strict=True):
            outs.append(part(*xs[k : k + c]))
            k += c
        return tuple(outs)


def import_many(
    items: list[tuple[nn.Module, tuple[torch.Tensor, ...]]], n_outputs: list[int], prefix: str = "w"
) -> tuple[Any, list[str]]:
    """One Relax IRModule with one function per module (``w0``, ``w1``, ...), from one export and one import.

    What a latency table measures is many one-layer modules, and most of what one costs to compile is fixed:
    ``run_decompositions`` alone rebuilds PyTorch's decomposition tables on every call (~0.1 s). Exported
    together, the modules share that cost. The import's ``main`` (all inputs in, all outputs out as one tuple)
    is cut into one function per module: its parameters, the bindings its outputs depend on, and its outputs
    as a tuple, which is what importing the module alone gives. ``n_outputs`` is each module's count of
    (flattened) outputs. Raises like ``export_program`` / ``import_relax``.
    """
    import tvm
    from tvm import relax

    counts = [len(inp) for _, inp in items]
    batch = _Batch([m for m, _ in items], counts)
    exported = export_program(batch, tuple(t for _, inp in items for t in inp))
    mod = import_relax(exported)
    main = mod["main"]
    params = list(main.params)
    seq = main.body
    bindings = [b for blk in seq.blocks for b in blk.bindings]
    value_of = {b.var: b.value for b in bindings}
    out = seq.body
    fields = None
    if isinstance(out, relax.Tuple):
        fields = list(out.fields)
    elif isinstance(out, relax.Var) and isinstance(value_of.get(out), relax.Tuple):
        fields = list(value_of[out].fields)
    if fields is None or len(fields) != sum(n_outputs) or len(params) != sum(counts):
        raise TargetError(
            f"TVM's import of {len(items)} workloads gave {len(params)} inputs and "
            f"{'no tuple of' if fields is None else len(fields)} outputs, expected {sum(counts)} and {sum(n_outputs)}"
        )
    functions = {gv: f for gv, f in mod.functions_items() if gv.name_hint != "main"}
    out_mod = tvm.IRModule(functions, attrs=mod.attrs)
    names: list[str] = []
    p = o = 0
    for i, (c, n) in enumerate(zip(counts, n_outputs, strict=True)):
        mine = params[p : p + c]
        outs = fields[o : o + n]
        p, o = p + c, o + n
        need: set[Any] = set()
        stack = [v for f in outs for v in relax.analysis.free_vars(f)]
        while stack:
            v = stack.pop()
            if v in need:
                continue
            need.add(v)
            if v in value_of:
                stack.extend(relax.analysis.free_vars(value_of[v]))
        foreign = [v for v in need if v not in value_of and not any(v.same_as(q) for q in mine)]
        if foreign:
            raise TargetError(
                f"workload {i} of a batch depends on another workload's input ({foreign[0].name_hint})"
            )
        ret = relax.Var("gv", relax.TupleType([f.ty for f in outs]))
        block = relax.DataflowBlock(
            [b for b in bindings if b.var in need] + [relax.VarBinding(ret, relax.Tuple(outs))]
        )
        name = f"{prefix}{i}"
        fn = relax.Function(mine, relax.SeqExpr([block], ret), ret.ty).with_attr("global_symbol", name)
        # every function gets its own variables (a variable is defined once in a module)
        out_mod[name] = relax.utils.copy_with_new_vars(fn)
        names.append(name)
    return out_mod, names
