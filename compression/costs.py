"""Costs of a model under a policy: MACs, BOPs, parameters and bytes, from one function.

``compute_costs(graph, policy)`` is analytic: it needs the layer graph (shapes measured once on the
original model) and the policy, not a forward pass, so the search can call it at every step. Counting rules:

- MACs: multiply-accumulates of convolutions and linear layers (the usual convention; pooling, additions
  and activations are not counted). A pruned layer's MACs use its kept input and output channels.
- BOPs: MACs x w_bits x a_bits (float layers count as 32 x 32), as in Galen / "bit operations".
- params: every parameter of the pruned model (conv/linear weights and biases, batch-norm affine
  parameters of pruned channels removed, other parameters as they are).
- bytes: storage at the chosen bit-widths: conv/linear weights at ``w_bits`` (times 1 - sparsity for
  fine-grained sparsity; index overhead of a sparse format is not counted), everything else at 32 bits.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from compression.models.graph import LayerGraph
from compression.policy import FLOAT_BITS, Policy
from compression.prune import group_keeps


@dataclass
class LayerCost:
    """One layer's shape and costs under a policy."""

    in_channels: int
    out_channels: int
    macs: int
    bops: int
    params: int
    bytes: float
    w_bits: float
    a_bits: int


@dataclass
class Costs:
    """Whole-model costs under a policy (see module docstring for the counting rules)."""

    macs: int
    bops: int
    params: int
    bytes: float
    layers: dict[str, LayerCost] = field(default_factory=dict)

    def to_dict(self, per_layer: bool = False) -> dict[str, Any]:
        d = {"macs": self.macs, "bops": self.bops, "params": self.params, "bytes": self.bytes}
        if per_layer:
            d["layers"] = {n: asdict(c) for n, c in self.layers.items()}
        return d

    def get(self, objective: str) -> float:
        """The cost named by an objective (macs, bops, params, bytes)."""
        if objective not in ("macs", "bops", "params", "bytes"):
            raise KeyError(objective)
        return float(getattr(self, objective))


def _layer_w_bits(graph: LayerGraph, name: str, policy: Policy, out_kept: int) -> float:
    """Mean weight bits over the layer's kept output channels (AJPQ's per-group bits, else w_bits)."""
    lp = policy[name]
    if lp.channel_bits is None:
        return float(lp.w_bits)
    kept_bits = [b for b in lp.channel_bits if b > 0]
    return sum(kept_bits) / len(kept_bits) if kept_bits else float(FLOAT_BITS)


def _pruned_inputs(graph: LayerGraph, keeps: dict[int, int]) -> dict[str, float]:
    """Per consumer layer, how many of its input channels (or features) the groups' pruning removes."""
    pruned_in: dict[str, float] = {}
    for g in graph.groups:
        removed = g.channels - keeps[g.id]
        if removed <= 0:
            continue
        for consumer, n_in in g.consumers.items():
            # n_in / channels is the fan-out of each channel into the consumer (H*W after a flatten)
            pruned_in[consumer] = pruned_in.get(consumer, 0.0) + removed * n_in / g.channels
    return pruned_in


def _kept_shape(layer, keeps: dict[int, int], pruned_in: dict[str, float]) -> tuple[int, int, int]:
    """(in_channels, out_channels, groups) of a layer after pruning."""
    out_c = keeps[layer.group] if layer.group is not None else layer.out_channels
    if layer.op == "dwconv2d":
        return out_c, out_c, out_c
    return int(round(layer.in_channels - pruned_in.get(layer.name, 0.0))), out_c, layer.groups


def layer_shape(
    graph: LayerGraph, policy: Policy, name: str, round_to: int = 1
) -> tuple[int, int, float, int]:
    """(in_channels, out_channels, w_bits, a_bits) of one layer under ``policy``, as ``compute_costs`` gives them,
    without pricing the whole model (the search asks this for many candidate entries of one layer)."""
    keeps = group_keeps(graph, policy, round_to)
    in_c, out_c, _ = _kept_shape(graph[name], keeps, _pruned_inputs(graph, keeps))
    return in_c, out_c, _layer_w_bits(graph, name, policy, out_c), policy[name].a_bits


def compute_costs(graph: LayerGraph, policy: Policy | None = None, round_to: int = 1) -> Costs:
    """MACs, BOPs, params and bytes of ``graph``'s model after applying ``policy`` (None: the original)."""
    policy = policy or Policy()
    keeps = group_keeps(graph, policy, round_to)
    pruned_in = _pruned_inputs(graph, keeps)

    total = Costs(macs=0, bops=0, params=0, bytes=0.0)
    conv_linear_params = 0
    for layer in graph.layers:
        in_c, out_c, groups = _kept_shape(layer, keeps, pruned_in)
        kh, kw = layer.kernel
        if layer.op == "linear":
            rows = layer.macs // max(1, layer.in_channels * layer.out_channels)
            macs = rows * in_c * out_c
            weights = in_c * out_c
        else:
            oh, ow = layer.output_hw
            weights = out_c * (in_c // max(1, groups)) * kh * kw
            macs = weights * oh * ow
        bias = out_c if layer.has_bias else 0
        lp = policy[layer.name]
        w_bits = _layer_w_bits(graph, layer.name, policy, out_c)
        a_bits = lp.a_bits
        nbytes = weights * (1.0 - lp.sparsity) * w_bits / 8.0 + bias * 4.0
        bops = int(round(macs * w_bits * a_bits))
        total.layers[layer.name] = LayerCost(
            in_c, out_c, int(macs), bops, weights + bias, nbytes, w_bits, a_bits
        )
        total.macs += int(macs)
        total.bops += bops
        total.params += weights + bias
        total.bytes += nbytes
        conv_linear_params += layer.params

    # parameters outside conv/linear layers (batch norms, ...): those tied to pruned channels go with them
    other = graph.total_params - conv_linear_params
    for g in graph.groups:
        other -= (g.channels - keeps[g.id]) * g.extra_params_per_channel
    other = int(round(other))
    total.params += other
    total.bytes += other * 4.0
    return total
