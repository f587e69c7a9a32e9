"""Load a ``.pt2`` upload and lift its ExportedProgram into a module graph the engine can prune.

``torch.export`` flattens a model into one graph of ATen calls whose weights are graph inputs. Channel
pruning (torch-pruning) and fake quantization need the opposite: convolutions, linear layers and batch
norms as real ``nn.Module`` objects owning their parameters. ``lift_exported_program`` rebuilds that: it
walks the program's graph, turns each recognised layer call into an ``nn.Conv2d`` / ``nn.Linear`` /
``nn.BatchNorm2d`` / ``nn.BatchNorm1d`` / ``nn.Dropout`` submodule named after the user's original layer
(weight ``layer1.0.conv1.weight`` -> submodule ``layer1.0.conv1``), keeps every other op as a
``call_function`` node of a ``torch.fx.GraphModule``, and keeps any other parameter or buffer as an
attribute, so ``model.parameters()`` sees everything and training works. Shape ops that hard-code the
export's batch size are rewritten so any batch size runs.

The mapping from ATen ops to modules is in ``docs/ingestion.md``.
"""

from __future__ import annotations

import io
import keyword
import logging
import math
import operator
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind

from compression.errors import ModelError
from compression.models.artifact import ModelArtifact
from compression.models.safety import (
    DEFAULT_MAX_MEMBERS,
    DEFAULT_MAX_TOTAL_BYTES,
    REEXPORT_HINT,
    _read_capped,
    vet_pt2_bytes,
)

log = logging.getLogger(__name__)
aten = torch.ops.aten

KEPT_UNPRUNED = "layers feeding it are kept unpruned"
REFUSED = "refused"

_CONV_OPS = {aten.conv2d.default, aten.conv2d.padding, aten.convolution.default}
_LINEAR_OPS = {aten.linear.default}
_MATMUL_OPS = {aten.addmm.default, aten.mm.default}
_TRANSPOSE_OPS = {aten.t.default, aten.permute.default, aten.transpose.int, aten.numpy_T.default}
_BN_OPS = {aten.batch_norm.default}
# These return (out, save_mean, save_invstd[, new_running_mean, new_running_var]); only out is used.
_BN_TUPLE_OPS = {
    aten._native_batch_norm_legit_no_training.default,
    aten._native_batch_norm_legit_functional.default,
    aten._native_batch_norm_legit.default,
    aten._native_batch_norm_legit.no_stats,
    aten.native_batch_norm.default,
}
_DROPOUT_OPS = {aten.dropout.default}
_DROPOUT_TUPLE_OPS = {aten.native_dropout.default}
_ASSERT_OPS = {
    aten._assert_tensor_metadata.default,
    aten._assert_scalar.default,
    aten._assert_async.default,
    aten._assert_async.msg,
    aten.sym_constrain_range_for_size.default,
    aten.sym_constrain_range.default,
}
_VIEW_OPS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.view_copy.default}
_EXPAND_OPS = {aten.expand.default}


@dataclass
class _Layer:
    """A layer call found in the program: the module that replaces it and what it consumes."""

    kind: str  # conv | linear | bn | dropout
    name: str
    module: nn.Module
    input: fx.Node
    output: fx.Node  # the node whose value the module returns (getitem 0 for tuple-returning ops)
    params: list[fx.Node] = field(default_factory=list)  # placeholders the module now owns
    consumed: list[fx.Node] = field(default_factory=list)  # graph nodes the module call replaces
    config: tuple = ()  # identifies an identical layer, so a shared weight maps to one module called twice


# --------------------------------------------------------------------------------------------------
# public API


def load_pt2(
    path: str,
    *,
    num_classes: int | None = None,
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
    max_members: int = DEFAULT_MAX_MEMBERS,
) -> ModelArtifact:
    """Vet, load and lift a ``.pt2`` written by ``torch.export.save`` into a float, eval-mode ModelArtifact.

    The file is read once; those bytes are vetted (``compression.models.safety.vet_pt2_bytes``) and the
    same bytes are given to ``torch.export.load``. The program must take one 4-D image batch and return
    one ``(N, classes)`` tensor; ``num_classes``, when given, must agree with it. The lifted module is
    checked against the program itself on the export's example input and for batch independence.
    Raises ``UnsafeFileError`` / ``ModelError`` with what is wrong and what to do.
    """
    what = os.path.basename(path)
    data = _read_capped(path, max_total_bytes, what=what)
    manifest = vet_pt2_bytes(data, source=path, max_total_bytes=max_total_bytes, max_members=max_members)
    try:
        ep = torch.export.load(io.BytesIO(data))
    except Exception as e:
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise ModelError(f"torch.export.load could not read {what}: {first}", REEXPORT_HINT) from None
    module, facts = lift_exported_program(ep, source=what)
    if num_classes is not None and int(num_classes) != facts["num_classes"]:
        raise ModelError(
            f"{what} outputs {facts['num_classes']} classes, not {num_classes}",
            "leave the class count unset for .pt2 models, or upload the model trained for your dataset",
        )
    facts["archive"] = {
        "members": len(manifest.members),
        "bytes": manifest.total_bytes,
        "pickled_members_checked": list(manifest.pickled_members),
        "symbolic_expressions_checked": manifest.symbolic_expressions,
        "extra_files": list(manifest.extra_files),
    }
    return ModelArtifact(
        module=module,
        input_shape=facts.pop("input_shape"),
        num_classes=facts.pop("num_classes"),
        source=path,
        arch=None,
        info=facts,
    )


def lift_exported_program(
    ep: ExportedProgram, *, source: str = "program"
) -> tuple[fx.GraphModule, dict[str, Any]]:
    """Rebuild ``ep`` as an eval-mode ``fx.GraphModule`` with real layer submodules; return it and facts.

    Facts: ``input_shape`` (C, H, W), ``num_classes``, ``export_batch`` (None for a dynamic batch),
    ``layers`` (count per kind), ``ops`` (original ATen op counts), ``rewrites`` (shape ops changed to be
    batch-agnostic), ``unsupported_ops`` (see ``unsupported_ops``), ``warnings``, and ``max_abs_diff``
    against the program's own module on the example input.
    """
    lifter = _Lifter(ep, source)
    gm = lifter.run()
    facts = lifter.facts
    report = unsupported_ops(gm)
    refused = [r for r in report if r["action"] == REFUSED]
    if refused:
        listing = "; ".join(f"{r['name']} ({r['op']}): {r['why']}" for r in refused[:3])
        raise ModelError(
            f"{source} cannot be compressed: {listing}", "remove these ops from forward() and export again"
        )
    facts["unsupported_ops"] = report
    _check_batch_independence(gm, facts, source)
    _check_against_program(ep, gm, facts, source)
    return gm, facts


def unsupported_ops(module: nn.Module) -> list[dict[str, str]]:
    """List the ops of a lifted module that channel pruning cannot pass through, and what happens to them.

    Each entry: ``name`` (graph node), ``op``, ``why``, ``action``: ``"layers feeding it are kept
    unpruned"`` (the engine leaves the channels that reach it alone) or ``"refused"`` (the model cannot be
    compressed at all; ``load_pt2`` raises instead of returning such a model). Plain ``nn.Module`` models
    (the zoo) are built from layers only and report nothing.
    """
    if not isinstance(module, fx.GraphModule):
        return []
    layer_modules = {name for name, m in module.named_modules() if isinstance(m, _LAYER_TYPES)}
    out: list[dict[str, str]] = []
    # Only ops downstream of a layer see prunable channels; input preprocessing (x - mean) never does.
    downstream: set[fx.Node] = set()
    for node in module.graph.nodes:
        if node.op == "call_module":
            if node.target in layer_modules or any(a in downstream for a in node.all_input_nodes):
                downstream.add(node)
            continue
        if node.op != "call_function":
            continue
        if any(a in downstream for a in node.all_input_nodes):
            downstream.add(node)
        verdict = _classify(node, downstream, layer_modules, module)
        if verdict is not None:
            why, action = verdict
            out.append({"name": node.name, "op": _op_name(node.target), "why": why, "action": action})
    return out


# --------------------------------------------------------------------------------------------------
# lifting


_LAYER_TYPES = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.BatchNorm1d)


class _Lifter:
    def __init__(self, ep: ExportedProgram, source: str) -> None:
        self.ep = ep
        self.source = source
        self.graph = ep.graph
        self.facts: dict[str, Any] = {"warnings": [], "rewrites": []}
        self.placeholder_info: dict[fx.Node, tuple[InputKind, str, bool]] = {}
        self.user_input: fx.Node | None = None
        self.used_names: set[str] = set()

    # -- signature --------------------------------------------------------------------------------
    def _read_signature(self) -> list[fx.Node]:
        sig = self.ep.graph_signature
        by_name = {n.name: n for n in self.graph.nodes if n.op == "placeholder"}
        user_inputs = []
        for spec in sig.input_specs:
            node = by_name.get(spec.arg.name) if hasattr(spec.arg, "name") else None
            if spec.kind == InputKind.USER_INPUT:
                if node is None or not isinstance(node.meta.get("val"), torch.Tensor):
                    raise ModelError(
                        f"{self.source} takes a non-tensor input",
                        "export a model whose forward takes one image tensor",
                    )
                user_inputs.append(node)
            elif spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
                persistent = spec.kind != InputKind.BUFFER or bool(spec.persistent)
                self.placeholder_info[node] = (spec.kind, spec.target, persistent)
            else:
                raise ModelError(
                    f"{self.source} has a {spec.kind.name.lower()} input, which the engine does not support",
                    "export a model built from standard PyTorch layers, without custom objects or effects",
                )
        if len(user_inputs) != 1:
            raise ModelError(
                f"{self.source} takes {len(user_inputs)} inputs; the engine compresses single-input image models",
                "export with exactly one example input: torch.export.export(model, (x,))",
            )
        x = user_inputs[0]
        val = x.meta["val"]
        if val.dim() != 4:
            raise ModelError(
                f"{self.source} takes a {val.dim()}-D input of shape {tuple(val.shape)}; images (N, C, H, W) are expected",
                "export a CNN with a batch of images as its example input",
            )
        if not val.dtype.is_floating_point:
            raise ModelError(f"{self.source} takes {val.dtype} input, not float images", REEXPORT_HINT)
        self.user_input = x
        return user_inputs

    def _tensor(self, node: fx.Node) -> torch.Tensor:
        kind, fqn, persistent = self.placeholder_info[node]
        if kind == InputKind.PARAMETER or (kind == InputKind.BUFFER and persistent):
            return self.ep.state_dict[fqn]
        return self.ep.constants[fqn]

    def _is_param(self, node: Any) -> bool:
        return (
            isinstance(node, fx.Node)
            and node in self.placeholder_info
            and self.placeholder_info[node][0] == InputKind.PARAMETER
        )

    def _is_buffer(self, node: Any) -> bool:
        return (
            isinstance(node, fx.Node)
            and node in self.placeholder_info
            and self.placeholder_info[node][0] == InputKind.BUFFER
        )

    # -- finding layers ---------------------------------------------------------------------------
    def _find_layers(self) -> dict[fx.Node, _Layer]:
        layers: dict[fx.Node, _Layer] = {}
        for node in self.graph.nodes:
            if node.op != "call_function":
                continue
            layer = None
            if node.target in _CONV_OPS:
                layer = self._conv(node)
            elif node.target in _LINEAR_OPS:
                layer = self._linear(node)
            elif node.target in _MATMUL_OPS:
                layer = self._addmm(node)
            elif node.target in _BN_OPS or node.target in _BN_TUPLE_OPS:
                layer = self._bn(node)
            elif node.target in _DROPOUT_OPS or node.target in _DROPOUT_TUPLE_OPS:
                layer = self._dropout(node)
            if layer is not None:
                layers[node] = layer
        return self._resolve_sharing(layers)

    def _conv(self, node: fx.Node) -> _Layer | None:
        a = _bind(node)
        x, w, b = a["input"], a["weight"], a.get("bias")
        if not self._is_param(w) or (b is not None and not self._is_param(b)) or _rank(x) != 4:
            return None
        if node.target == aten.convolution.default and (a["transposed"] or any(a["output_padding"])):
            return None
        weight = self._tensor(w)
        if weight.dim() != 4:
            return None
        groups = int(a["groups"])
        padding = a["padding"] if isinstance(a["padding"], str) else _pair(a["padding"])
        stride, dilation = _pair(a["stride"]), _pair(a["dilation"])
        out_c, in_per_group, kh, kw = weight.shape
        conv = nn.Conv2d(
            in_per_group * groups, out_c, (kh, kw), stride=stride, padding=padding, dilation=dilation,
            groups=groups, bias=b is not None,
        )  # fmt: skip
        _set_param(conv, "weight", weight)
        if b is not None:
            _set_param(conv, "bias", self._tensor(b))
        params = [w] + ([b] if b is not None else [])
        return _Layer("conv", self._layer_name(w, node), conv, x, node, params, [node], ("conv", str(conv)))

    def _linear(self, node: fx.Node) -> _Layer | None:
        a = _bind(node)
        x, w, b = a["input"], a["weight"], a.get("bias")
        if not self._is_param(w) or (b is not None and not self._is_param(b)) or _rank(x) < 2:
            return None
        return self._make_linear(node, x, w, b, consumed=[node])

    def _addmm(self, node: fx.Node) -> _Layer | None:
        # Decomposed linear: addmm(bias, x, t(weight)) or mm(x, t(weight)).
        a = _bind(node)
        if node.target == aten.addmm.default:
            b, x, wt = a["self"], a["mat1"], a["mat2"]
            if a.get("beta", 1) != 1 or a.get("alpha", 1) != 1 or not self._is_param(b):
                return None
        else:
            b, x, wt = None, a["self"], a["mat2"]
        if not (isinstance(wt, fx.Node) and wt.op == "call_function" and wt.target in _TRANSPOSE_OPS):
            return None
        w = wt.args[0]
        if not self._is_param(w) or self._tensor(w).dim() != 2 or not _is_2d_transpose(wt):
            return None
        if b is not None and self._tensor(b).dim() != 1:
            return None
        return self._make_linear(node, x, w, b, consumed=[node, wt])

    def _make_linear(
        self, node: fx.Node, x: fx.Node, w: fx.Node, b: fx.Node | None, consumed: list
    ) -> _Layer | None:
        weight = self._tensor(w)
        if weight.dim() != 2:
            return None
        lin = nn.Linear(weight.shape[1], weight.shape[0], bias=b is not None)
        _set_param(lin, "weight", weight)
        if b is not None:
            _set_param(lin, "bias", self._tensor(b))
        params = [w] + ([b] if b is not None else [])
        return _Layer(
            "linear", self._layer_name(w, node), lin, x, node, params, consumed, ("linear", str(lin))
        )

    def _bn(self, node: fx.Node) -> _Layer | None:
        a = _bind(node)
        x, w, b = a["input"], a["weight"], a["bias"]
        rm, rv = a.get("running_mean"), a.get("running_var")
        rank = _rank(x)
        if rank not in (2, 3, 4):
            return None
        if (w is None) != (b is None) or (w is not None and not (self._is_param(w) and self._is_param(b))):
            return None
        if (rm is None) != (rv is None) or (
            rm is not None and not (self._is_buffer(rm) and self._is_buffer(rv))
        ):
            return None
        channels = int(x.meta["val"].shape[1])
        training = bool(a.get("training", False))
        momentum = a.get("momentum", 0.1)
        cls = nn.BatchNorm2d if rank == 4 else nn.BatchNorm1d
        bn = cls(
            channels,
            eps=float(a["eps"]),
            momentum=momentum,
            affine=w is not None,
            track_running_stats=rm is not None,
        )
        params: list[fx.Node] = []
        if w is not None:
            _set_param(bn, "weight", self._tensor(w))
            _set_param(bn, "bias", self._tensor(b))
            params += [w, b]
        if rm is not None:
            bn.running_mean.copy_(self._tensor(rm).detach().float())
            bn.running_var.copy_(self._tensor(rv).detach().float())
            params += [rm, rv]
            nbt = self._num_batches_tracked(rm)
            if nbt is not None:
                bn.num_batches_tracked.copy_(self._tensor(nbt).detach())
                params.append(nbt)
        if training:
            self.facts["warnings"].append(
                "the program was exported in training mode; its batch norms use running statistics once lifted "
                "(export after model.eval())"
            )
        output, consumed = node, [node]
        if node.target in _BN_TUPLE_OPS:
            output = _tuple_output(node)
            if output is None:
                return None
            consumed.extend(node.users)  # getitem 0 and the unused statistics
        anchor = w if w is not None else rm
        name = self._layer_name(anchor, node) if anchor is not None else self._module_stack_name(node, "bn")
        config = ("bn", str(bn))
        return _Layer("bn", name, bn, x, output, params, consumed, config)

    def _num_batches_tracked(self, running_mean: fx.Node) -> fx.Node | None:
        fqn = self.placeholder_info[running_mean][1]
        want = fqn[: -len("running_mean")] + "num_batches_tracked" if fqn.endswith("running_mean") else None
        for n, (kind, target, _p) in self.placeholder_info.items():
            if kind == InputKind.BUFFER and target == want:
                return n
        return None

    def _dropout(self, node: fx.Node) -> _Layer | None:
        a = _bind(node)
        p = float(a["p"])
        if not 0.0 <= p < 1.0:
            return None
        output, consumed = node, [node]
        if node.target in _DROPOUT_TUPLE_OPS:
            output = _tuple_output(node)
            if output is None:
                return None
            consumed.extend(node.users)
        name = self._module_stack_name(node, "dropout")
        return _Layer(
            "dropout", name, nn.Dropout(p), a["input"], output, [], consumed, ("dropout", p, node.name)
        )

    def _resolve_sharing(self, layers: dict[fx.Node, _Layer]) -> dict[fx.Node, _Layer]:
        """A parameter may belong to one module. A second identical call reuses it; anything else stays an op."""
        owner: dict[fx.Node, _Layer] = {}
        kept: dict[fx.Node, _Layer] = {}
        for node, layer in layers.items():
            clash = [owner[p] for p in layer.params if p in owner]
            if clash:
                first = clash[0]
                if (
                    all(c is first for c in clash)
                    and first.config == layer.config
                    and set(first.params) == set(layer.params)
                ):
                    layer.module, layer.name = first.module, first.name
                    kept[node] = layer
                continue
            for p in layer.params:
                owner[p] = layer
            kept[node] = layer
        return kept

    # -- naming -----------------------------------------------------------------------------------
    def _layer_name(self, param: fx.Node, node: fx.Node) -> str:
        fqn = self.placeholder_info[param][1]
        for suffix in (".weight", ".running_mean"):
            if fqn.endswith(suffix):
                fqn = fqn[: -len(suffix)]
                break
        return self._unique(_sanitize_path(fqn) or node.name)

    def _module_stack_name(self, node: fx.Node, default: str) -> str:
        stack = node.meta.get("nn_module_stack") or {}
        if stack:
            path, type_name = list(stack.values())[-1]
            type_name = str(getattr(type_name, "__name__", type_name))
            if default == "dropout" and "Dropout" in type_name and path:
                return self._unique(_sanitize_path(str(path)))
            if path:
                return self._unique(_sanitize_path(f"{path}.{default}"))
        return self._unique(default)

    def _unique(self, name: str) -> str:
        base, i = name, 1
        while name in self.used_names:
            i += 1
            name = f"{base}_{i}"
        self.used_names.add(name)
        return name

    # -- building the new graph -------------------------------------------------------------------
    def run(self) -> fx.GraphModule:
        self._read_signature()
        self.facts["ops"] = dict(
            sorted(Counter(_op_name(n.target) for n in self.graph.nodes if n.op == "call_function").items())
        )
        layers = self._find_layers()
        lifted_outputs = {layer.output: layer for layer in layers.values()}
        consumed = {c for layer in layers.values() for c in layer.consumed}
        owned = {p for layer in layers.values() for p in layer.params}
        user_outputs, dropped = self._outputs(owned)
        if not any(layer.kind in ("conv", "linear") for layer in layers.values()):
            raise ModelError(
                f"{self.source} has no convolution or linear layer the engine can compress "
                f"(ops: {', '.join(list(self.facts['ops'])[:8])})",
                "upload a CNN built from nn.Conv2d / nn.Linear layers",
            )
        # Transposes of weights are consumed only when every user is a lifted linear layer.
        for layer in layers.values():
            for c in list(layer.consumed):
                if c.target in _TRANSPOSE_OPS and any(u not in consumed for u in c.users):
                    layer.consumed.remove(c)
                    consumed.discard(c)

        root = nn.Module()
        g = fx.Graph()
        env: dict[fx.Node, Any] = {}
        attrs: dict[str, fx.Node] = {}
        installed: set[str] = set()
        non_persistent: list[str] = []
        x_old = self.user_input
        x_new = g.placeholder(_sanitize_ident(x_old.name) or "x")
        x_new.meta = dict(x_old.meta)
        env[x_old] = x_new
        val = x_old.meta["val"]
        static_batch = val.shape[0] if isinstance(val.shape[0], int) else None
        self.facts["export_batch"] = static_batch
        batched: set[fx.Node] = {x_old}
        batch_size_node: list[fx.Node] = []

        def batch_size() -> fx.Node:
            if not batch_size_node:
                with g.inserting_after(x_new):
                    batch_size_node.append(g.call_function(aten.sym_size.int, (x_new, 0)))
            return batch_size_node[0]

        def attr(node: fx.Node) -> fx.Node:
            """A get_attr for a parameter/buffer/constant placeholder (the owning layer's, if lifted)."""
            owner = next((lay for lay in layers.values() if node in lay.params), None)
            if owner is not None:
                target = f"{owner.name}.{_attr_in_module(owner, node, self)}"
            else:
                kind, fqn, persistent = self.placeholder_info[node]
                target = _sanitize_path(fqn) or _sanitize_ident(node.name)
                if target not in installed:
                    tensor = self._tensor(node).detach()
                    if tensor.is_floating_point():
                        tensor = tensor.float()
                    if kind == InputKind.PARAMETER:
                        _install(root, target, nn.Parameter(tensor.clone(), requires_grad=True))
                    else:
                        _install(root, target, tensor.clone(), buffer=True, persistent=persistent)
                        if not persistent:
                            non_persistent.append(target)
                    installed.add(target)
            if target not in attrs:
                attrs[target] = g.get_attr(target)
            return attrs[target]

        def arg(a: Any) -> Any:
            if isinstance(a, fx.Node):
                if a in env:
                    return env[a]
                if a in self.placeholder_info:
                    return attr(a)
                raise ModelError(f"{self.source}: internal error lifting {a.name}", "report this model")
            return a

        for layer in layers.values():
            if layer.name not in installed:
                _install(root, layer.name, layer.module)
                installed.add(layer.name)

        for node in self.graph.nodes:
            if node.op in ("placeholder", "output"):
                continue
            if node in dropped or (node.op == "call_function" and node.target in _ASSERT_OPS):
                continue
            if node.op != "call_function":
                raise ModelError(
                    f"{self.source} has a {node.op} node ({node.name}) the engine cannot lift", REEXPORT_HINT
                )
            if any(a in batched for a in node.all_input_nodes):
                batched.add(node)
            if node in lifted_outputs:
                layer = lifted_outputs[node]
                new = g.call_module(layer.name, (arg(layer.input),))
                new.meta = {k: v for k, v in node.meta.items() if k in ("val", "tensor_meta", "stack_trace")}
                env[node] = new
                continue
            if node in consumed:
                continue
            if _is_inplace(node):
                target_buf = node.args[0] if node.args else None
                if target_buf in owned:
                    continue  # e.g. num_batches_tracked += 1: the lifted BatchNorm does this itself
                functional = _functional_variant(node.target)
                if (
                    isinstance(target_buf, fx.Node)
                    and target_buf.op != "placeholder"
                    and functional is not None
                ):
                    # An in-place op on an intermediate activation (nn.ReLU(inplace=True), x += y): the
                    # out-of-place op computes the same, and every later use of the mutated value reads it.
                    new = g.call_function(functional, tuple(arg(a) for a in node.args), dict(node.kwargs))
                    new.meta = dict(node.meta)
                    env[node] = new
                    env[target_buf] = new
                    continue
                raise ModelError(
                    f"{self.source}: forward() modifies {getattr(target_buf, 'name', 'a tensor')} in place ({_op_name(node.target)})",
                    "export the model after model.eval(); in-place updates of parameters, buffers or inputs are not supported",
                )
            new = self._copy(node, g, arg, batched, static_batch, batch_size)
            env[node] = new

        out_node = user_outputs[0]
        g.output(arg(out_node))
        gm = fx.GraphModule(root, g, class_name="LiftedProgram")
        for path in non_persistent:
            # GraphModule copies buffers as persistent; keep them out of state_dict as in the user's model.
            parent, _, leaf = path.rpartition(".")
            owner = gm.get_submodule(parent) if parent else gm
            if leaf in owner._buffers:
                owner._non_persistent_buffers_set.add(leaf)
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
        gm.eval()
        gm.meta["export_batch"] = static_batch
        gm.meta["source"] = self.source

        out_val = out_node.meta.get("val")
        if not isinstance(out_val, torch.Tensor) or out_val.dim() != 2:
            shape = tuple(out_val.shape) if isinstance(out_val, torch.Tensor) else type(out_val).__name__
            raise ModelError(
                f"{self.source} returns {shape}; a classifier returning (N, classes) logits is expected",
                "export a model whose forward returns one (batch, classes) tensor",
            )
        classes = out_val.shape[1]
        if not isinstance(classes, int):
            raise ModelError(f"{self.source} has a symbolic number of classes", REEXPORT_HINT)
        self.facts["num_classes"] = int(classes)
        self.facts["input_shape"] = self._input_shape()
        self.facts["layers"] = dict(
            Counter(layer.kind for layer in {id(v.module): v for v in layers.values()}.values())
        )
        self.facts["dynamic_batch"] = static_batch is None
        return gm

    def _input_shape(self) -> tuple[int, int, int]:
        shape = list(self.user_input.meta["val"].shape[1:])
        if not all(isinstance(s, int) for s in shape):
            example = self.ep.example_inputs
            try:
                shape = list(example[0][0].shape[1:])
            except Exception:
                raise ModelError(
                    f"{self.source} has symbolic image dimensions and no example input",
                    "export with static height and width (only the batch may be dynamic)",
                ) from None
        return (int(shape[0]), int(shape[1]), int(shape[2]))

    def _outputs(self, owned: set[fx.Node]) -> tuple[list[fx.Node], set[fx.Node]]:
        """The user outputs, and the nodes computed only for buffer updates (dropped: modules do that)."""
        out = next(n for n in self.graph.nodes if n.op == "output")
        values = list(out.args[0]) if isinstance(out.args[0], (list, tuple)) else [out.args[0]]
        specs = self.ep.graph_signature.output_specs
        user: list[fx.Node] = []
        mutation_roots: list[fx.Node] = []
        for spec, value in zip(specs, values, strict=False):
            if spec.kind == OutputKind.USER_OUTPUT:
                user.append(value)
            elif spec.kind == OutputKind.BUFFER_MUTATION:
                buffer_fqn = spec.target
                owner_ok = any(self.placeholder_info[p][1] == buffer_fqn for p in owned)
                if not owner_ok:
                    raise ModelError(
                        f"{self.source}: forward() updates buffer {buffer_fqn}",
                        "export the model after model.eval(); only BatchNorm statistics may be updated",
                    )
                if isinstance(value, fx.Node):
                    mutation_roots.append(value)
            else:
                raise ModelError(
                    f"{self.source} has a {spec.kind.name.lower()} output, which the engine does not support",
                    "export an inference model: torch.export.export(model.eval(), (x,))",
                )
        if len(user) != 1 or not isinstance(user[0], fx.Node):
            raise ModelError(
                f"{self.source} returns {len(user)} outputs; one (N, classes) tensor is expected",
                "export a model whose forward returns only the logits",
            )
        needed: set[fx.Node] = set()
        stack = [user[0]]
        while stack:
            n = stack.pop()
            if n in needed:
                continue
            needed.add(n)
            stack.extend(n.all_input_nodes)
        dropped: set[fx.Node] = set()
        stack = list(mutation_roots)
        while stack:
            n = stack.pop()
            if n in needed or n in dropped or n.op == "placeholder":
                continue
            dropped.add(n)
            stack.extend(n.all_input_nodes)
        return user, dropped

    def _copy(
        self, node: fx.Node, g: fx.Graph, arg, batched: set, static_batch: int | None, batch_size
    ) -> fx.Node:
        """Copy one op; rewrite shape ops that would pin the export's batch size or channel count."""
        if node.target in _VIEW_OPS and _is_flatten(node):
            new = g.call_function(aten.flatten.using_ints, (arg(node.args[0]), 1))
            new.meta = dict(node.meta)
            self.facts["rewrites"].append(
                f"{node.name}: {_op_name(node.target)}{list(node.args[1])} -> flatten(x, 1)"
            )
            return new
        if (
            static_batch is not None
            and node.target in _VIEW_OPS | _EXPAND_OPS
            and node.args[0] in batched
            and isinstance(node.args[1], (list, tuple))
            and len(node.args[1]) > 0
            and node.args[1][0] == static_batch
            and _dim0(node.args[0]) == static_batch
            and _dim0(node) == static_batch
        ):
            shape = list(node.args[1])
            shape[0] = -1 if node.target in _EXPAND_OPS else batch_size()
            new = g.call_function(node.target, (arg(node.args[0]), shape, *node.args[2:]), dict(node.kwargs))
            new.meta = dict(node.meta)
            self.facts["rewrites"].append(
                f"{node.name}: {_op_name(node.target)} batch {static_batch} -> input batch"
            )
            return new
        new = g.node_copy(node, arg)
        return new


def _attr_in_module(layer: _Layer, node: fx.Node, lifter: _Lifter) -> str:
    """Which attribute of a lifted layer holds the tensor that came from placeholder ``node``."""
    fqn = lifter.placeholder_info[node][1]
    tail = fqn.rsplit(".", 1)[-1]
    if hasattr(layer.module, tail) and isinstance(getattr(layer.module, tail), torch.Tensor):
        return tail
    return "weight" if node is layer.params[0] else "bias"


# --------------------------------------------------------------------------------------------------
# checks after lifting


def _check_batch_independence(gm: fx.GraphModule, facts: dict[str, Any], source: str) -> None:
    """Batch of 3 in one call must equal three single-sample calls: catches any remaining fixed batch."""
    from compression.quant import output_tolerance

    c, h, w = facts["input_shape"]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, c, h, w, generator=gen)
    try:
        with torch.no_grad():
            together = gm(x)
            apart = torch.cat([gm(x[i : i + 1]) for i in range(3)])
        ok = together.shape == apart.shape and torch.allclose(together, apart, rtol=1e-4, atol=1e-5)
        if not ok and together.shape == apart.shape:
            # activation quantizers (a compressed model exported by this tool: round and clamp to a grid): a
            # batched convolution sums in another order than a single one, which moves a value across a
            # rounding boundary now and then, and that one step reaches the output. Allowed as the runtimes'
            # output checks allow it (``output_tolerance``: 8 steps of the coarsest grid relative to the output
            # scale; 0 here for a model without quantizers); a fixed batch still fails (shapes, unrelated values)
            tol = output_tolerance(gm, 0.0)
            scale = max(1.0, float(together.abs().max()))
            ok = tol > 0 and float((together - apart).abs().max()) <= tol * scale
        problem = (
            ""
            if ok
            else f"max difference {float((together - apart).abs().max()):.3g} between batched and single calls"
        )
    except Exception as e:
        problem = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        ok = False
    if not ok:
        suspects = _batch_suspects(gm, facts.get("export_batch"))
        where = f" in {', '.join(suspects[:4])}" if suspects else ""
        raise ModelError(
            f"{source} only runs with the batch size it was exported with ({facts.get('export_batch')}){where}: {problem}",
            "use x.flatten(1) or x.view(x.size(0), -1) instead of a fixed batch, or export with "
            "dynamic_shapes=({0: torch.export.Dim('batch')},)",
        )


def _batch_suspects(gm: fx.GraphModule, static_batch: int | None) -> list[str]:
    out = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        for a in node.args:
            if isinstance(a, (list, tuple)) and a and a[0] == static_batch:
                out.append(f"{node.name} ({_op_name(node.target)}{list(a)})")
                break
    return out


def _check_against_program(
    ep: ExportedProgram, gm: fx.GraphModule, facts: dict[str, Any], source: str
) -> None:
    """The lifted module must compute what the program computes, on the export's own example input."""
    if any("training mode" in w for w in facts["warnings"]):
        facts["max_abs_diff"] = None
        return
    x = None
    try:
        x = ep.example_inputs[0][0]
    except Exception:
        pass
    if not isinstance(x, torch.Tensor) or tuple(x.shape[1:]) != tuple(facts["input_shape"]):
        batch = facts.get("export_batch") or 2
        x = torch.randn(batch, *facts["input_shape"], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ep.module()(x)
        got = gm(x)
    diff = float((expected - got).abs().max())
    scale = float(expected.abs().max()) or 1.0
    facts["max_abs_diff"] = diff
    if not diff <= 1e-4 * max(1.0, scale):
        raise ModelError(
            f"{source}: the rebuilt model differs from the exported program (max difference {diff:.3g})",
            "this is an engine limitation for this model; please report it with the file",
        )


# --------------------------------------------------------------------------------------------------
# what pruning cannot pass through


_ELEMENTWISE = {
    "relu", "relu_", "relu6", "hardtanh", "hardtanh_", "sigmoid", "tanh", "gelu", "silu", "silu_", "hardswish",
    "hardswish_", "hardsigmoid", "leaky_relu", "leaky_relu_", "elu", "selu", "celu", "mish", "softplus", "clone",
    "contiguous", "alias", "detach", "_to_copy", "to", "abs", "neg", "exp", "log", "sqrt", "rsqrt", "clamp",
    "clamp_min", "clamp_max", "square", "erf", "add", "sub", "mul", "div", "rsub", "maximum", "minimum", "where",
    "pow", "reciprocal", "sign", "floor", "ceil", "round", "trunc", "dropout", "identity", "lift_fresh_copy",
}  # fmt: skip
_SPATIAL = {
    "max_pool2d", "max_pool2d_with_indices", "avg_pool2d", "adaptive_avg_pool2d", "_adaptive_avg_pool2d",
    "adaptive_max_pool2d", "upsample_nearest2d", "upsample_bilinear2d", "_upsample_nearest_exact2d",
    "_upsample_bilinear2d_aa", "pad", "constant_pad_nd", "reflection_pad2d", "replication_pad2d",
}  # fmt: skip
_REDUCTIONS = {"mean", "sum", "amax", "amin", "max", "min", "var", "std", "logsumexp"}
_RECURRENT = {
    "lstm", "gru", "rnn_tanh", "rnn_relu", "lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell",
    "_thnn_fused_lstm_cell", "_thnn_fused_gru_cell", "quantized_lstm", "quantized_gru",
}  # fmt: skip
_RANDOM = {
    "rand", "randn", "randint", "rand_like", "randn_like", "randint_like", "bernoulli", "normal", "uniform",
    "randperm", "multinomial", "exponential", "native_dropout",
}  # fmt: skip


def _classify(
    node: fx.Node, downstream: set[fx.Node], layer_modules: set[str], module: fx.GraphModule
) -> tuple[str, str] | None:
    target = node.target
    name = _op_name(target).split(".")[0] if isinstance(target, torch._ops.OpOverload) else ""
    if target in (operator.getitem, aten.sym_size.int) or not isinstance(target, torch._ops.OpOverload):
        return None
    if name in _RANDOM:
        return ("draws random numbers, so the model's output is not repeatable", REFUSED)
    if name in _RECURRENT:
        # refused before anything runs: run at another batch size, the exported hidden state (sized for the
        # export's batch) crashed PyTorch natively (free(): invalid next size), killing the worker process
        return (
            "is a recurrent layer (LSTM/GRU/RNN), whose hidden state is sized for the export's batch; this tool "
            "compresses convolutional image models",
            REFUSED,
        )
    uses_layer_weight = [
        a.target
        for a in node.all_input_nodes
        if a.op == "get_attr" and a.target.rsplit(".", 1)[0] in layer_modules
    ]
    if uses_layer_weight:
        return (
            f"reads the weights of layer {uses_layer_weight[0].rsplit('.', 1)[0]} directly",
            KEPT_UNPRUNED,
        )
    if node not in downstream:
        return None
    rank = _rank(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
    if name in _ELEMENTWISE:
        per_channel = _per_channel_buffer(node, module)
        if per_channel:
            return (
                f"combines the channels with the tensor {per_channel}, which has one value per channel",
                KEPT_UNPRUNED,
            )
        return None
    if name in _SPATIAL:
        return None
    if name in _REDUCTIONS:
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dims = [dims] if isinstance(dims, int) else list(dims or [])
        if rank and dims and all(d % rank != 1 for d in dims) and all(d % rank != 0 for d in dims):
            return None
        return ("reduces over the channel dimension", KEPT_UNPRUNED)
    if name == "cat":
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        first = node.args[0][0] if node.args and node.args[0] else None
        r = _rank(first) if isinstance(first, fx.Node) else None
        if r and dim % r == 1:
            return None
        return ("concatenates along a dimension other than channels", KEPT_UNPRUNED)
    if name == "flatten":
        start = node.args[1] if len(node.args) > 1 else 0
        end = node.args[2] if len(node.args) > 2 else -1
        if rank and start % rank == 1 and end % rank == rank - 1:
            return None
        return ("flattens dimensions other than (C, H, W) together", KEPT_UNPRUNED)
    if name in ("softmax", "_softmax", "log_softmax", "_log_softmax") and rank == 2:
        return None
    if name in ("view", "_unsafe_view", "reshape", "view_copy", "unflatten", "expand"):
        return ("reshapes with a fixed channel count (e.g. a channel shuffle)", KEPT_UNPRUNED)
    if name in ("transpose", "permute", "t", "movedim", "swapaxes"):
        return ("moves the channel dimension", KEPT_UNPRUNED)
    if name in (
        "split",
        "split_with_sizes",
        "chunk",
        "narrow",
        "slice",
        "select",
        "index_select",
        "index",
        "gather",
    ):
        return ("selects a fixed part of the channels", KEPT_UNPRUNED)
    if name in (
        "convolution",
        "conv1d",
        "conv2d",
        "conv3d",
        "conv_transpose2d",
        "linear",
        "addmm",
        "mm",
        "matmul",
        "bmm",
    ):
        return (
            "is a layer the engine could not lift into a module (weights computed in forward, transposed or non-2-D)",
            KEPT_UNPRUNED,
        )
    return (f"is not known to keep channels independent ({name})", KEPT_UNPRUNED)


def _per_channel_buffer(node: fx.Node, module: fx.GraphModule) -> str | None:
    """A buffer/constant operand with one value per channel: torch-pruning prunes parameters it finds
    outside layers (such as a learnable per-channel scale) but never buffers, so those pin the channels."""
    out_rank = _rank(node)
    if not out_rank or out_rank < 2:
        return None
    for a in node.all_input_nodes:
        if a.op != "get_attr":
            continue
        try:
            tensor = _fetch_attr(module, a.target)
        except AttributeError:
            continue
        if not isinstance(tensor, torch.Tensor) or isinstance(tensor, nn.Parameter):
            continue
        shape = tuple(tensor.shape)
        # Broadcasting aligns trailing dims: the channel dim of a rank-r result is r-1 places from the end.
        if len(shape) >= out_rank - 1 and shape[len(shape) - (out_rank - 1)] > 1:
            return str(a.target)
    return None


def _fetch_attr(module: nn.Module, target: str) -> Any:
    obj: Any = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


# --------------------------------------------------------------------------------------------------
# helpers


def _bind(node: fx.Node) -> dict[str, Any]:
    """Arguments of an ATen call by schema name, with defaults filled in."""
    schema = node.target._schema
    out: dict[str, Any] = {}
    for i, a in enumerate(schema.arguments):
        if i < len(node.args):
            out[a.name] = node.args[i]
        elif a.name in node.kwargs:
            out[a.name] = node.kwargs[a.name]
        elif a.has_default_value():
            out[a.name] = a.default_value
        else:
            out[a.name] = None
    return out


def _rank(node: Any) -> int | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val.dim() if isinstance(val, torch.Tensor) else None


def _dim0(node: Any) -> Any:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val.shape[0] if isinstance(val, torch.Tensor) and val.dim() > 0 else None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return str(a) == str(b)


def _is_flatten(node: fx.Node) -> bool:
    """Whether a view/reshape turns (N, *rest) into (N, prod(rest)): it is then ``flatten(x, 1)``."""
    src, dst = (
        node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None,
        node.meta.get("val"),
    )
    if not isinstance(src, torch.Tensor) or not isinstance(dst, torch.Tensor):
        return False
    if src.dim() < 2 or dst.dim() != 2 or not _same(src.shape[0], dst.shape[0]):
        return False
    rest = list(src.shape[1:])
    if not all(isinstance(s, int) for s in rest) or not isinstance(dst.shape[1], int):
        return False
    return math.prod(rest) == dst.shape[1]


def _is_2d_transpose(node: fx.Node) -> bool:
    if node.target in (aten.t.default, aten.numpy_T.default):
        return True
    if node.target == aten.permute.default:
        return list(node.args[1]) == [1, 0]
    if node.target == aten.transpose.int:
        return sorted(int(d) % 2 for d in node.args[1:3]) == [0, 1]
    return False


def _tuple_output(node: fx.Node) -> fx.Node | None:
    """For ops returning a tuple whose only used element is [0]: that getitem node."""
    first = None
    for user in node.users:
        if user.op != "call_function" or user.target is not operator.getitem:
            return None
        if user.args[1] == 0:
            first = user
        elif user.users and any(u.op != "output" for u in user.users):
            # A statistic (saved mean, new running stats) used by the computation: cannot replace.
            return None
    return first


def _functional_variant(target: Any) -> Any:
    """The out-of-place overload of an in-place aten op (``relu_`` -> ``relu``), or None."""
    if not isinstance(target, torch._ops.OpOverload):
        return None
    name = target._schema.name.split("::")[-1]
    if not name.endswith("_"):
        return None
    packet = getattr(torch.ops.aten, name[:-1], None)
    if packet is None:
        return None
    overload = target._overloadname
    return getattr(packet, overload, None) or getattr(packet, "default", None)


def _is_inplace(node: fx.Node) -> bool:
    target = node.target
    return isinstance(target, torch._ops.OpOverload) and target._schema.is_mutable


def _op_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.overloadpacket.__name__}.{target._overloadname}"
    return getattr(target, "__name__", str(target))


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = list(v)
    return (int(v[0]), int(v[0])) if len(v) == 1 else (int(v[0]), int(v[1]))


_IDENT_BAD = re.compile(r"[^A-Za-z0-9_]")


def _sanitize_ident(part: str) -> str:
    """One attribute name that is safe inside fx's generated code (it quotes names without escaping)."""
    part = _IDENT_BAD.sub("_", str(part))[:100]
    if keyword.iskeyword(part):
        part += "_"
    return part


def _sanitize_path(fqn: str) -> str:
    parts = [_sanitize_ident(p) for p in str(fqn).split(".") if p != ""]
    return ".".join(p for p in parts if p)


def _set_param(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    t = tensor.detach().clone()
    if t.is_floating_point():
        t = t.float()
    setattr(module, name, nn.Parameter(t, requires_grad=True))


def _install(root: nn.Module, path: str, obj: Any, *, buffer: bool = False, persistent: bool = True) -> None:
    """Put a module, parameter or buffer at a dotted path, creating empty containers on the way."""
    *parents, leaf = path.split(".")
    mod = root
    for p in parents:
        nxt = getattr(mod, p, None) if p in mod._modules else None
        if nxt is None:
            if hasattr(mod, p):
                raise ModelError(
                    f"cannot place {path}: {p} is already a tensor", "rename the model's attributes"
                )
            nxt = nn.Module()
            mod.add_module(p, nxt)
        mod = nxt
    if isinstance(obj, nn.Module):
        mod.add_module(leaf, obj)
    elif buffer:
        mod.register_buffer(leaf, obj, persistent=persistent)
    else:
        mod.register_parameter(leaf, obj)
