"""Channel pruning (dependency-aware, from the layer graph's plan) and fine-grained magnitude sparsity.

Channel pruning really removes channels: the returned module is smaller (fewer parameters, fewer MACs, a
smaller file). It works on a copy; the original module is never modified. Which channels go is decided by
magnitude importance computed once per group when the ``LayerGraph`` is built, so pruning a candidate is a
deep copy plus a few tensor slices, with no tracing.
"""

from __future__ import annotations

import copy
from collections import defaultdict

import torch
from torch import nn

from compression.models.graph import LayerGraph
from compression.policy import Policy


def group_keeps(graph: LayerGraph, policy: Policy, round_to: int = 1) -> dict[int, int]:
    """Channels kept per prunable group under ``policy`` (the group leader's keep_ratio decides).

    With AJPQ-style ``channel_bits`` on the leader, the kept fraction is the share of non-zero groups.
    """
    keeps: dict[int, int] = {}
    for g in graph.groups:
        if not g.prunable:
            keeps[g.id] = g.channels
            continue
        lp = policy[g.leader]
        ratio = lp.keep_ratio
        if lp.channel_bits is not None:
            ratio = sum(1 for b in lp.channel_bits if b > 0) / len(lp.channel_bits)
        keeps[g.id] = graph.kept_channels(g, ratio, round_to)
    return keeps


def prune_module(graph: LayerGraph, keeps: dict[int, int]) -> nn.Module:
    """Return a pruned deep copy of ``graph.module`` keeping ``keeps[group_id]`` channels per group.

    All indices come from the plan in the original numbering, so operations on the same layer and dimension
    (a layer reading a concatenation of several groups) are merged and applied once.
    """
    merged: dict[tuple[str, object], set[int]] = defaultdict(set)
    order: list[tuple[str, object]] = []
    for gid, keep in keeps.items():
        g = graph.groups[gid]
        if not g.prunable or keep >= g.channels:
            continue
        for name, handler, idxs in graph.prune_ops(gid, keep):
            key = (name, handler)
            if key not in merged:
                order.append(key)
            merged[key].update(idxs)
    model = copy.deepcopy(graph.module)
    for name, handler in order:
        handler(model.get_submodule(name), sorted(merged[(name, handler)]))
    return model


def prune(graph: LayerGraph, policy: Policy, round_to: int = 1) -> nn.Module:
    """Channel-prune a copy of the graph's model according to ``policy``."""
    return prune_module(graph, group_keeps(graph, policy, round_to))


@torch.no_grad()
def apply_sparsity(model: nn.Module, sparsity: dict[str, float]) -> None:
    """Zero the smallest-magnitude fraction of each named layer's weights, in place.

    Fine-grained (unstructured) sparsity shrinks the stored model when compressed, not its dense latency.
    """
    for name, s in sparsity.items():
        if s <= 0:
            continue
        w = model.get_submodule(name).weight
        k = int(s * w.numel())
        if k <= 0:
            continue
        threshold = w.abs().flatten().kthvalue(k).values
        w.masked_fill_(w.abs() <= threshold, 0.0)
