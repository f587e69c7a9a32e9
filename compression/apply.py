"""Apply a policy: the one function that turns (model, policy) into a compressed model.

Steps, in order: channel pruning (dependency-aware, rounded per target) -> least-squares reconstruction of
the layers reading pruned channels (``compression.reconstruct``) -> fine-grained sparsity ->
weight fake quantization -> activation quantizers -> one calibration pass over training samples that
re-estimates batch-norm statistics of the pruned model and observes activation ranges -> eval mode. A policy that
only prunes changes no weight after the re-fit, so the re-fit's own pass (over the same images, each layer with its
final weights) re-estimates the batch norms and the calibration pass is skipped: 0.63x the apply step's time on
ResNet-20/digits, the same accuracies to one image in 1000 (``bench/run.py throughput --parts apply``).

Re-estimating batch-norm statistics matters: removing channels shifts the distributions the remaining
batch norms were fitted to, and without it the accuracy of an un-fine-tuned candidate says little.
"""

from __future__ import annotations

import torch
from torch import nn

from compression.models.graph import LayerGraph
from compression.policy import FLOAT_BITS, Policy
from compression.prune import apply_sparsity, group_keeps, prune_module
from compression.quant import act_quantizers, attach_act_quantizer, quantize_layer_weights
from compression.reconstruct import IMAGES as RECONSTRUCTION_IMAGES
from compression.reconstruct import reconstruct as reconstruct_layers


def _channel_bits(graph: LayerGraph, name: str, bits: list[int], keep: int) -> list[int]:
    """Expand AJPQ per-group bits (most important group first) to the layer's kept output channels."""
    g = graph.group_of(name)
    channels = graph[name].out_channels
    if g is None or not g.prunable:
        ranked = list(range(channels))  # no importance order known: keep the layer's own order
        kept = ranked
    else:
        kept = g.order[g.channels - keep :]  # least important first
        ranked = list(reversed(kept))  # most important first
    nonzero = [b for b in bits if b > 0]
    per_rank = {}
    for pos, ch in enumerate(ranked):
        slice_idx = min(len(nonzero) - 1, pos * len(nonzero) // max(1, len(ranked)))
        per_rank[ch] = nonzero[slice_idx]
    return [per_rank[ch] for ch in sorted(kept)]  # pruned layer keeps channels in original order


def _changes_after_fit(policy: Policy) -> bool:
    """Whether applying ``policy`` changes weights or activations after the re-fit (sparsity, quantization)."""
    for lp in policy.layers.values():
        if lp.sparsity > 0 or lp.a_bits < FLOAT_BITS:
            return True
        if lp.channel_bits is not None:
            if any(0 < b < FLOAT_BITS for b in lp.channel_bits):
                return True
        elif lp.w_bits < FLOAT_BITS:
            return True
    return False


@torch.no_grad()
def recalibrate(model: nn.Module, calib: torch.Tensor, batch_size: int = 128) -> None:
    """Re-estimate batch-norm statistics and observe activation ranges on ``calib`` (N, C, H, W)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    model.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the calibration pass
        bn.train()
    for i in range(0, len(calib), batch_size):
        model(calib[i : i + batch_size])
    for bn in bns:
        bn.momentum = 0.1
    model.eval()
    for q in act_quantizers(model):
        q.finish_calibration()


@torch.no_grad()
def fold_batch_norms(model: nn.Module, pairs: list[tuple[str, str]]) -> int:
    """Fold each (conv, batch norm) pair's batch norm, in its running statistics, into the convolution, in place;
    the batch norm becomes an identity. For scoring only: the model then computes what a runtime that folds them
    (TVM, ONNX Runtime) computes, one pass over each activation fewer, and can no longer be trained. ``pairs``
    from ``LayerGraph.conv_bn_pairs`` (names in the original model, which a pruned copy keeps). Returns how many
    were folded (a pair whose shapes no longer match is skipped)."""
    folded = 0
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        if not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.BatchNorm2d):
            continue
        if bn.num_features != conv.out_channels or bn.running_mean is None or bn.running_var is None:
            continue
        scale = (
            bn.weight / torch.sqrt(bn.running_var + bn.eps)
            if bn.affine
            else 1.0 / torch.sqrt(bn.running_var + bn.eps)
        )
        shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        conv.weight.mul_(scale.reshape(-1, *([1] * (conv.weight.dim() - 1))))
        conv.bias = nn.Parameter((bias - bn.running_mean) * scale + shift, requires_grad=False)
        parent, _, attr = bn_name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, nn.Identity())
        folded += 1
    return folded


def apply_policy(
    graph: LayerGraph,
    policy: Policy,
    calib: torch.Tensor | None = None,
    *,
    round_to: int = 1,
    batch_size: int = 128,
    reconstruct: bool = True,
) -> nn.Module:
    """Return a compressed copy of ``graph.module`` under ``policy``; the original is not modified.

    ``calib`` is a batch of training inputs for batch-norm re-estimation and activation calibration
    (a few hundred samples is enough). Policies that prune or quantize activations need it. With
    ``reconstruct`` (the default) the layers that read pruned channels are re-fitted by least squares to the
    original's outputs on ``calib`` (``compression.reconstruct``) before anything is quantized.
    """
    policy.validate(graph.layer_names)
    keeps = group_keeps(graph, policy, round_to)
    model = prune_module(graph, keeps)
    pruned = any(keeps[g.id] < g.channels for g in graph.groups)
    # a pruning-only policy changes no weight after the re-fit, whose pass then re-estimates the batch norms on
    # the same images; the calibration pass is skipped (a third of the apply step on ResNet-20)
    fit_recalibrates = (
        pruned
        and reconstruct
        and calib is not None
        and len(calib) <= RECONSTRUCTION_IMAGES
        and not _changes_after_fit(policy)
    )
    if pruned and reconstruct and calib is not None:
        reconstruct_layers(graph, model, keeps, calib, keep_statistics=fit_recalibrates)
    apply_sparsity(model, {n: lp.sparsity for n, lp in policy.layers.items() if lp.sparsity > 0})
    needs_calibration = pruned and not fit_recalibrates
    for name, lp in policy.layers.items():
        layer = model.get_submodule(name)
        # per-group bits (AJPQ) whose kept groups are all float quantize nothing: the layer stays a float layer
        if lp.channel_bits is not None and any(0 < b < FLOAT_BITS for b in lp.channel_bits):
            gid = graph[name].group
            keep = keeps[gid] if gid is not None else graph[name].out_channels
            quantize_layer_weights(layer, _channel_bits(graph, name, lp.channel_bits, keep))
        elif lp.channel_bits is None and lp.w_bits < FLOAT_BITS:
            quantize_layer_weights(layer, lp.w_bits)
        if lp.a_bits < FLOAT_BITS:
            attach_act_quantizer(layer, lp.a_bits)
            needs_calibration = True
    if needs_calibration:
        if calib is None:
            raise ValueError(
                "apply_policy needs calibration samples for pruned or activation-quantized models"
            )
        recalibrate(model, calib, batch_size)
    model.eval()
    return model
