"""The layer graph: what the engine knows about a model's compressible layers and how they are coupled.

``LayerGraph.build(module, input_shape)`` traces the model once and gathers:

- every convolution and linear layer in execution order, with its shapes, parameters and MACs
  (``LayerInfo``);
- the **prunable groups** (``PruneGroup``): sets of output channels that must be removed together, found by
  torch-pruning's dependency graph (residual additions tie the channels of every layer feeding them,
  concatenations map channel ranges, depthwise convolutions tie their input and output channels);
- a **pruning plan** per group: the channel order by magnitude importance and, for any number of channels
  kept, which channel indices each coupled layer loses. ``compression.prune`` replays that plan on a copy
  of the model without tracing again, which is what makes applying a policy cheap.

Each group is **verified** when the graph is built: half of its channels are pruned on a copy and the
result must equal the original model with the same channels masked out (their weights in every consuming
layer set to zero). A group whose pruning would change the function in any other way (an op the
dependency graph does not understand, such as a channel shuffle) fails that check and is kept unpruned,
with the reason recorded. A layer the engine cannot prune is never silently broken.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from compression.errors import ModelError

log = logging.getLogger(__name__)

PRUNABLE_TYPES = (nn.Conv2d, nn.Linear)


@dataclass
class LayerInfo:
    """One convolution or linear layer of the model, as measured on the original (uncompressed) model."""

    name: str
    op: str  # conv2d | dwconv2d | gconv2d | linear
    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    groups: int
    input_hw: tuple[int, int]
    output_hw: tuple[int, int]
    params: int
    macs: int
    group: int | None  # id of the PruneGroup its output channels belong to (None: not prunable)
    group_leader: bool  # True for the layer whose keep_ratio decides its group
    prunable: bool
    quantizable: bool
    note: str = ""
    has_bias: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PruneGroup:
    """Output channels that are pruned together.

    channels: number of prunable channels in the group (the leader's output channels).
    members: layers whose output channels are this group's channels (the leader first).
    consumers: layer name -> number of that layer's input channels (or features) that carry this group's
        channels; a linear layer after a flatten sees ``channels * H * W`` of them.
    """

    id: int
    leader: str
    members: list[str]
    consumers: dict[str, int]
    channels: int
    prunable: bool
    reason: str = ""
    extra_params_per_channel: float = 0.0  # batch-norm (and similar) parameters removed with each channel
    order: list[int] = field(default_factory=list, repr=False)  # channel indices, least important first

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("order")
        return d


PruneOps = list[tuple[str, Callable[[nn.Module, list[int]], Any], list[int]]]


class LayerGraph:
    """Compressible layers, prunable groups and the pruning plan of one model (see module docstring)."""

    def __init__(
        self,
        module: nn.Module,
        input_shape: tuple[int, int, int],
        layers: list[LayerInfo],
        groups: list[PruneGroup],
        unsupported: list[dict[str, Any]],
        dg: tp.DependencyGraph,
        roots: dict[int, tuple[nn.Module, Callable]],
    ) -> None:
        self.module = module
        self.input_shape = tuple(input_shape)
        self.layers = layers
        self.groups = groups
        self.unsupported = unsupported
        self._dg = dg
        self._roots = roots
        self._by_name = {layer.name: layer for layer in layers}
        self._plan_cache: dict[tuple[int, int], PruneOps] = {}
        self._conv_bn: list[tuple[str, str]] | None = None  # conv_bn_pairs, found on first use

    # ------------------------------------------------------------------ queries
    def __getitem__(self, name: str) -> LayerInfo:
        return self._by_name[name]

    @property
    def layer_names(self) -> list[str]:
        """All convolution / linear layers in execution order."""
        return [layer.name for layer in self.layers]

    @property
    def quantizable(self) -> list[str]:
        return [layer.name for layer in self.layers if layer.quantizable]

    @property
    def prunable_leaders(self) -> list[str]:
        """Layers whose keep_ratio decides a prunable group, in execution order."""
        return [layer.name for layer in self.layers if layer.group_leader and layer.prunable]

    def group_of(self, name: str) -> PruneGroup | None:
        gid = self._by_name[name].group
        return None if gid is None else self.groups[gid]

    @property
    def total_macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    @property
    def total_params(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    def kept_channels(self, group: PruneGroup, keep_ratio: float, round_to: int = 1) -> int:
        """Number of channels a group keeps for a keep ratio, rounded to a multiple of ``round_to``.

        At least one rounding unit is always kept (or all channels when the group is smaller than it).
        """
        c = group.channels
        if not group.prunable or keep_ratio >= 1.0:
            return c
        r = max(1, int(round_to))
        if c <= r:
            return c
        k = int(round(keep_ratio * c / r)) * r
        return int(min(c, max(r, k)))

    def conv_bn_pairs(self) -> list[tuple[str, str]]:
        """(convolution, batch norm) module names where the batch norm is the convolution's only consumer and
        reads nothing else: the pairs a batch norm can be folded into (``apply.fold_batch_norms``)."""
        if self._conv_bn is not None:
            return self._conv_bn
        names = {m: n for n, m in self.module.named_modules()}
        pairs: list[tuple[str, str]] = []
        for node in self._dg.module2node.values():
            conv = node.module
            if not isinstance(conv, nn.Conv2d) or conv not in names or len(node.outputs) != 1:
                continue
            nxt = node.outputs[0]
            bn = nxt.module
            if (
                isinstance(bn, nn.BatchNorm2d)
                and bn in names
                and len(nxt.inputs) == 1
                and bn.num_features == conv.out_channels
                and bn.track_running_stats
            ):
                pairs.append((names[conv], names[bn]))
        self._conv_bn = pairs
        return pairs

    def prune_ops(self, group_id: int, keep: int) -> PruneOps:
        """The (layer name, pruning function, indices) operations that cut a group down to ``keep`` channels.

        Indices are in the original model's numbering; cached per (group, keep).
        """
        key = (group_id, keep)
        if key not in self._plan_cache:
            g = self.groups[group_id]
            drop = sorted(g.order[: g.channels - keep])
            ops: PruneOps = []
            if drop:
                module, fn = self._roots[group_id]
                pg = self._dg.get_pruning_group(module, fn, drop)
                names = self._dg._module2name
                for item in pg.items:
                    target = item.dep.target.module
                    if isinstance(target, nn.Module) and target in names:
                        ops.append((names[target], item.dep.handler, list(item.idxs)))
            self._plan_cache[key] = ops
        return self._plan_cache[key]

    def producers(self) -> dict[str, list[str]]:
        """Per layer, the layers whose outputs reach its input through parameter-free operations (additions,
        activations, pooling, reshapes), in execution order; an empty list means the model's input feeds it.

        A runtime that runs some layers as int8 and others as float pays a conversion on every such edge whose
        two ends run differently (``TableLatency``'s transition term). Cached; computed from the dependency graph.
        """
        cached = getattr(self, "_producers", None)
        if cached is not None:
            return cached
        order = {n: i for i, n in enumerate(self.layer_names)}
        names = self._dg._module2name
        out: dict[str, list[str]] = {}
        modules = dict(self.module.named_modules())
        for name in self.layer_names:
            node = self._dg.module2node.get(modules.get(name))
            found: set[str] = set()
            if node is not None:
                for nb in node.inputs:
                    found |= _reach(nb, names, depth=64)
            out[name] = sorted((n for n in found if n in order and n != name), key=order.__getitem__)
        self._producers = out
        return out

    def rows(self) -> list[dict[str, Any]]:
        """The per-layer inspection table."""
        return [layer.to_dict() for layer in self.layers]

    def summary(self) -> dict[str, Any]:
        return {
            "input_shape": list(self.input_shape),
            "layers": len(self.layers),
            "prunable_groups": sum(1 for g in self.groups if g.prunable),
            "groups": len(self.groups),
            "quantizable_layers": len(self.quantizable),
            "params": self.total_params,
            "macs": self.total_macs,
            "unsupported": self.unsupported,
        }

    # ------------------------------------------------------------------ building
    @classmethod
    def build(
        cls,
        module: nn.Module,
        input_shape: tuple[int, int, int],
        *,
        num_classes: int | None = None,
        verify: bool = True,
    ) -> LayerGraph:
        """Trace ``module`` (float, eval mode) and build its layer graph; see the module docstring.

        ``num_classes`` marks the classifier (its outputs are never pruned). Raises ModelError when the
        model has no convolution or linear layer, or cannot be traced.
        """
        module.eval()
        x = torch.randn((2, *input_shape), generator=torch.Generator().manual_seed(0))
        layers, out_shape = _trace_layers(module, x)
        if not layers:
            raise ModelError(
                "the model has no convolution or linear layer the engine can compress",
                "upload a CNN-style model (Conv2d / Linear layers)",
            )
        names = {m: n for n, m in module.named_modules()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                dg = tp.DependencyGraph().build_dependency(module, example_inputs=x, verbose=False)
            except Exception as exc:  # torch-pruning raises bare exceptions on graphs it cannot trace
                raise ModelError(
                    f"the dependency graph of the model cannot be built: {type(exc).__name__}: {exc}",
                    "the model may use ops the pruning engine cannot trace; see docs/ingestion.md",
                ) from exc

        unsupported = _unsupported_ops(dg)
        classifier = layers[-1].name if isinstance(module.get_submodule(layers[-1].name), nn.Linear) else None
        if num_classes is None and out_shape is not None and len(out_shape) == 2:
            num_classes = out_shape[1]

        importance = tp.importance.GroupMagnitudeImportance(p=2)
        groups: list[PruneGroup] = []
        roots: dict[int, tuple[nn.Module, Callable]] = {}
        layer_by_name = {info.name: info for info in layers}
        seen: set[str] = set()
        for info in layers:
            if info.name in seen:
                continue
            mod = module.get_submodule(info.name)
            if mod not in dg.module2node:
                info.note = "not reached by tracing"
                continue
            pruner = dg.get_pruner_of_module(mod)
            channels = pruner.get_out_channels(mod)
            group = dg.get_pruning_group(mod, pruner.prune_out_channels, list(range(channels)))
            members, consumers = [], defaultdict(int)
            has_param_target = False
            extra, extra_seen = 0.0, set()
            for item in group.items:
                target, handler = item.dep.target.module, item.dep.handler
                if isinstance(target, nn.Parameter):
                    has_param_target = True
                    continue
                name = names.get(target)
                if name is None or name not in layer_by_name:
                    if (
                        name is not None
                        and dg.is_out_channel_pruning_fn(handler)
                        and id(target) not in extra_seen
                    ):
                        extra_seen.add(id(target))
                        own = sum(p.numel() for p in target.parameters(recurse=False))
                        extra += own / max(1, channels)
                    continue
                if dg.is_out_channel_pruning_fn(handler):
                    if name not in members:
                        members.append(name)
                    if isinstance(target, nn.Conv2d) and target.groups == target.out_channels > 1:
                        # a depthwise conv is both a member and a consumer of its group's channels
                        consumers[name] += len(item.idxs)
                elif dg.is_in_channel_pruning_fn(handler):
                    consumers[name] += len(item.idxs)
            if info.name not in members:
                members.insert(0, info.name)
            gid = len(groups)
            prunable, reason = True, ""
            if classifier is not None and classifier in members:
                prunable, reason = False, "its channels are the model's outputs"
            elif has_param_target:
                prunable, reason = False, "coupled to a free parameter the engine does not prune"
            elif channels < 2:
                prunable, reason = False, "a single channel"
            touched = [u for u in unsupported if set(u.get("layers", [])) & set(members)]
            if prunable and touched:
                prunable = False
                reason = "coupled through " + ", ".join(sorted({u["op"] for u in touched}))
            order: list[int] = []
            if prunable:
                with torch.no_grad():
                    imp = importance(group)
                order = torch.argsort(imp, stable=True).tolist() if imp is not None else list(range(channels))
            g = PruneGroup(
                id=gid,
                leader=info.name,
                members=members,
                consumers=dict(consumers),
                channels=channels,
                prunable=prunable,
                reason=reason,
                extra_params_per_channel=extra,
                order=order,
            )
            groups.append(g)
            roots[gid] = (mod, pruner.prune_out_channels)
            for i, name in enumerate(members):
                seen.add(name)
                member = layer_by_name[name]
                member.group = gid
                member.group_leader = i == 0
                member.prunable = prunable
                if not prunable:
                    member.note = f"kept unpruned: {reason}"

        graph = cls(module, input_shape, layers, groups, unsupported, dg, roots)
        if verify:
            graph._verify_groups(x)
        return graph

    def _verify_groups(self, x: torch.Tensor) -> None:
        """Prune half of every prunable group and compare with masking; demote groups that disagree."""
        candidates = [g for g in self.groups if g.prunable]
        if not candidates:
            return
        if self._check(candidates, x):
            return
        for g in candidates:  # something is wrong: find which groups, one at a time
            if not self._check([g], x):
                g.prunable = False
                g.reason = "pruning it would change the model beyond removing channels (unsupported op)"
                for name in g.members:
                    self._by_name[name].prunable = False
                    self._by_name[name].note = f"kept unpruned: {g.reason}"
                log.warning("group led by %s is kept unpruned: verification failed", g.leader)

    def _check(self, groups: list[PruneGroup], x: torch.Tensor) -> bool:
        from compression.prune import prune_module  # local: prune imports this module

        keeps = {g.id: max(1, g.channels // 2) for g in groups}
        try:
            pruned = prune_module(self, keeps)
            with torch.no_grad():
                y_pruned = pruned(x)
        except Exception as exc:
            log.info("verification: pruning groups %s raised %s", [g.leader for g in groups], exc)
            return False
        masked = copy.deepcopy(self.module)
        with torch.no_grad():
            for g in groups:
                for name, handler, idxs in self.prune_ops(g.id, keeps[g.id]):
                    layer = masked.get_submodule(name)
                    if not isinstance(layer, PRUNABLE_TYPES):
                        continue
                    if self._dg.is_in_channel_pruning_fn(handler) or (
                        isinstance(layer, nn.Conv2d) and layer.groups == layer.out_channels > 1
                    ):
                        _zero_inputs(layer, idxs)
            y_masked = masked(x)
        if y_pruned.shape != y_masked.shape:
            return False
        scale = y_masked.abs().max().clamp_min(1e-6)
        return bool(((y_pruned - y_masked).abs().max() / scale) < 1e-4)


def _zero_inputs(layer: nn.Module, idxs: list[int]) -> None:
    """Zero the weights that read the given input channels (what pruning them removes)."""
    w = layer.weight
    if isinstance(layer, nn.Linear):
        w[:, idxs] = 0
    elif layer.groups == layer.out_channels > 1:  # depthwise: channel i reads input i
        w[idxs] = 0
        if layer.bias is not None:
            layer.bias[idxs] = 0
    elif layer.groups == 1:
        w[:, idxs] = 0
    else:  # grouped: input channel c is column c % (in/groups) of its group's filters
        per = layer.in_channels // layer.groups
        out_per = layer.out_channels // layer.groups
        for c in idxs:
            g, j = divmod(c, per)
            w[g * out_per : (g + 1) * out_per, j] = 0


def _pair(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def _trace_layers(module: nn.Module, x: torch.Tensor) -> tuple[list[LayerInfo], tuple[int, ...] | None]:
    """Run one forward with hooks; list conv/linear layers in execution order with their shapes."""
    found: list[LayerInfo] = []
    seen: set[str] = set()
    handles = []

    def hook(name: str) -> Callable:
        def fn(mod: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if name in seen:
                return  # a layer called twice (weight sharing) is listed once
            seen.add(name)
            inp = inputs[0]
            params = sum(p.numel() for p in mod.parameters(recurse=False))
            if isinstance(mod, nn.Conv2d):
                k = _pair(mod.kernel_size)
                oh, ow = int(output.shape[-2]), int(output.shape[-1])
                macs = mod.out_channels * (mod.in_channels // mod.groups) * k[0] * k[1] * oh * ow
                if mod.groups == 1:
                    op = "conv2d"
                elif mod.groups == mod.in_channels == mod.out_channels:
                    op = "dwconv2d"
                else:
                    op = "gconv2d"
                found.append(
                    LayerInfo(
                        name=name,
                        op=op,
                        in_channels=mod.in_channels,
                        out_channels=mod.out_channels,
                        kernel=k,
                        stride=_pair(mod.stride),
                        padding=_pair(mod.padding) if not isinstance(mod.padding, str) else (0, 0),
                        groups=mod.groups,
                        input_hw=(int(inp.shape[-2]), int(inp.shape[-1])),
                        output_hw=(oh, ow),
                        params=params,
                        macs=int(macs),
                        group=None,
                        group_leader=False,
                        prunable=False,
                        quantizable=True,
                        has_bias=mod.bias is not None,
                    )
                )
            else:
                rows = int(inp.numel() // inp.shape[-1] // inp.shape[0])
                found.append(
                    LayerInfo(
                        name=name,
                        op="linear",
                        in_channels=mod.in_features,
                        out_channels=mod.out_features,
                        kernel=(1, 1),
                        stride=(1, 1),
                        padding=(0, 0),
                        groups=1,
                        input_hw=(1, 1),
                        output_hw=(1, 1),
                        params=params,
                        macs=int(mod.in_features * mod.out_features * rows),
                        group=None,
                        group_leader=False,
                        prunable=False,
                        quantizable=True,
                        has_bias=mod.bias is not None,
                    )
                )

        return fn

    for name, mod in module.named_modules():
        if isinstance(mod, PRUNABLE_TYPES):
            handles.append(mod.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            out = module(x)
    except Exception as exc:
        raise ModelError(
            f"the model fails on an input of shape {tuple(x.shape)}: {type(exc).__name__}: {exc}",
            "check the input shape (channels, height, width) the model expects",
        ) from exc
    finally:
        for h in handles:
            h.remove()
    out_shape = tuple(out.shape) if isinstance(out, torch.Tensor) else None
    return found, out_shape


# Autograd nodes torch-pruning maps to elementwise pass-through by default although they mix channels.
_CHANNEL_MIXING = ("Permute", "Transpose", "Roll", "Gather", "Index", "Scatter", "Flip", "PixelShuffle")


def _unsupported_ops(dg: tp.DependencyGraph) -> list[dict[str, Any]]:
    """Ops in the traced graph that pruning cannot pass through, with the layers they touch."""
    out = []
    names = dg._module2name
    for node in dg.module2node.values():
        mod = node.module
        kind = type(mod).__name__
        grad_fn = getattr(node, "grad_fn", None)
        label = type(grad_fn).__name__ if grad_fn is not None else kind
        if isinstance(mod, nn.Parameter):
            continue
        if kind in ("_CustomizedOp",) or any(s in label for s in _CHANNEL_MIXING):
            touched = set()
            for nb in node.inputs:  # the producers whose output channels it rearranges
                touched |= _reach(nb, names)
            out.append(
                {
                    "op": label.replace("Backward0", "").replace("Backward1", ""),
                    "layers": sorted(touched),
                    "action": "layers coupled through it are kept unpruned",
                }
            )
    return out


def _reach(node: Any, names: dict, depth: int = 8) -> set[str]:
    """Conv/linear layers upstream of a node, reached through parameter-free ops."""
    found: set[str] = set()
    stack = [(node, 0)]
    visited = set()
    while stack:
        n, d = stack.pop()
        if id(n) in visited or d > depth:
            continue
        visited.add(id(n))
        if isinstance(n.module, PRUNABLE_TYPES) and n.module in names:
            found.add(names[n.module])
            continue
        for nb in n.inputs:
            stack.append((nb, d + 1))
    return found
