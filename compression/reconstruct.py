"""Least-squares reconstruction of the layers that read pruned channels (the channel-pruning step of AMC).

Removing input channels of a convolution changes its output; batch-norm re-estimation only re-centres what is
left. Following He et al. (channel pruning, 2017; AMC prunes this way), every layer whose inputs were pruned gets
its remaining weights re-fitted so that, on calibration samples, its output in the pruned network matches the
original network's output of the same layer (for the output channels it keeps):

    W = argmin ||X W - Y||^2 + lam ||W - W0||^2,   X: the pruned network's input patches to the layer,
                                                   Y: the original layer's output at the same positions,
                                                   W0: the sliced original weights (the starting point).

X comes from the *pruned* network in one forward pass, layer after layer (a forward pre-hook solves each layer
before it runs), so a layer also corrects what the layers before it got wrong. Batch norms use batch statistics
during that pass (in both networks), as the re-estimation afterwards will. The ridge term ``lam`` (relative to the mean diagonal of
``X^T X``) keeps an under-determined layer (few samples, many inputs) near its original weights.

Only dense convolutions (``groups == 1``) and linear layers are re-fitted; a depthwise convolution's inputs are its
outputs, so pruning removes whole filters there and nothing is left to re-fit. The original network's outputs at
the sampled positions are computed once per calibration batch and cached on the ``LayerGraph``.

Measured effect (``bench/run.py throughput`` and ``quality``; docs/BENCHMARKS.md): on ResNet-20/digits at half the
channels, accuracy before fine-tuning goes from near chance to most of the original's, for ~0.1 s per candidate.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compression.models.graph import LayerGraph

log = logging.getLogger(__name__)

IMAGES = 256  # calibration images the reconstruction pass uses at most (the first ones of the batch)
ROWS_PER_UNKNOWN = 4  # sampled output positions per input unknown of a layer ...
MAX_ROWS = 4096  # ... at most this many (the solve is O(rows * unknowns^2))
MIN_ROWS_PER_UNKNOWN = (
    1  # fewer fitting rows than unknowns: the layer is left as it is (a fit would memorise them)
)
HOLDOUT = 5  # every HOLDOUT-th image's rows are held out: a fit is kept only if it also helps on them
RIDGE = 1e-2  # lam relative to the mean diagonal of X^T X


def _kept_outputs(graph: LayerGraph, name: str, keeps: dict[int, int]) -> list[int] | None:
    """Original indices of the output channels ``name`` keeps (None: all of them)."""
    g = graph.group_of(name)
    if g is None or not g.prunable or keeps.get(g.id, g.channels) >= g.channels:
        return None
    keep = keeps[g.id]
    drop = set(g.order[: g.channels - keep])
    return [c for c in range(g.channels) if c not in drop]


def _layer_shape(layer: nn.Module) -> tuple[int, int] | None:
    """(inputs, outputs) of a layer that can be re-fitted, or None."""
    if isinstance(layer, nn.Conv2d):
        plain = layer.groups == 1 and layer.padding_mode == "zeros" and not isinstance(layer.padding, str)
        return (layer.in_channels, layer.out_channels) if plain else None
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    return None


def _rows(
    layer: nn.Module, x: torch.Tensor, idx: torch.Tensor | None, out_hw: tuple[int, int]
) -> torch.Tensor:
    """The layer's input at the sampled output positions ``idx`` (flat over N x H_out x W_out; None: all) as
    (positions, unknowns) rows: the im2col patches of a convolution (channel-major, like its weight), the features
    of a linear layer. Only the sampled patches are gathered, never the whole im2col matrix."""
    if not isinstance(layer, nn.Conv2d):
        rows = x.reshape(-1, x.shape[-1])
        return rows if idx is None else rows[idx]
    if idx is None:
        cols = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)  # N, C*k*k, L
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    ho, wo = out_hw
    n, rem = idx // (ho * wo), idx % (ho * wo)
    oy, ox = rem // wo, rem % wo
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel_size, layer.stride, layer.dilation
    ph, pw = layer.padding
    xp = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x
    patches = [
        xp[n, :, oy * sh + i * dh, ox * sw + j * dw] for i in range(kh) for j in range(kw)
    ]  # each R x C
    return torch.stack(patches, dim=2).reshape(len(idx), -1)


def _outputs(y: torch.Tensor) -> torch.Tensor:
    """A layer's output as (N * positions, channels) rows, in the same order as ``_rows``."""
    if y.dim() == 4:
        return y.flatten(2).transpose(1, 2).reshape(-1, y.shape[1])
    return y.reshape(-1, y.shape[-1])


def _sample(layer: nn.Module, ys: torch.Tensor, seed: int, images: int) -> dict[str, Any]:
    """The rows of a layer's output the fit uses: a seeded sample, enough for its unknowns, held-out marked."""
    shape = _layer_shape(layer)
    assert shape is not None
    k = layer.kernel_size[0] * layer.kernel_size[1] if isinstance(layer, nn.Conv2d) else 1
    rows = min(ys.shape[0], MAX_ROWS, max(ROWS_PER_UNKNOWN * shape[0] * k, 256))
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(ys.shape[0], generator=g)[:rows] if rows < ys.shape[0] else None
    y = ys if idx is None else ys[idx]
    if getattr(layer, "bias", None) is not None:
        y = y - layer.bias.detach()
    per_image = max(1, ys.shape[0] // images)
    image = (idx if idx is not None else torch.arange(ys.shape[0])) // per_image
    return {"idx": idx, "y": y.contiguous(), "held": image % HOLDOUT == 0}


def _targets(graph: LayerGraph, names: list[str], calib: torch.Tensor) -> dict[str, dict[str, Any]]:
    """The original layers' outputs at sampled positions (cached on the graph per calibration batch)."""
    cache: dict = graph.__dict__.setdefault("_reconstruction_targets", {})
    key = (calib.data_ptr(), tuple(calib.shape), float(calib[:4].double().sum()))
    entry = cache.get(key)
    if entry is None:
        cache.clear()  # one calibration batch per search
        entry = cache[key] = {}
    if all(n in entry for n in names):
        return entry
    # every layer that can be re-fitted, whatever this policy prunes: the sampled positions then depend on the
    # layer alone, so the same policy gives the same weights in every process (search, finalize, export)
    todo = [n for n in graph.layer_names if _layer_shape(graph.module.get_submodule(n)) is not None]
    hooks = []
    for n in todo:
        layer = graph.module.get_submodule(n)

        def grab(mod: nn.Module, inputs: tuple, output: torch.Tensor, n: str = n) -> None:
            if n in entry:
                return  # a layer called twice in one forward (shared weights): its first call is the target
            # only the sampled rows are kept, so the pass never holds every layer's whole output at once
            entry[n] = _sample(mod, _outputs(output.detach()), graph.layer_names.index(n), len(calib))
            entry[n]["out_hw"] = tuple(output.shape[2:]) if output.dim() == 4 else (1, 1)

        hooks.append(layer.register_forward_hook(grab))
    try:
        with torch.no_grad(), _batch_statistics(graph.module):
            graph.module(calib)
    finally:
        for h in hooks:
            h.remove()
    return entry


@torch.no_grad()
def reconstruct(
    graph: LayerGraph,
    model: nn.Module,
    keeps: dict[int, int],
    calib: torch.Tensor,
    *,
    images: int = IMAGES,
    keep_statistics: bool = False,
) -> dict[str, float]:
    """Re-fit, in place, the layers of the pruned ``model`` whose inputs were pruned (see the module docstring).

    ``keeps`` is the kept channel count per group (``prune.group_keeps``). Returns the relative output error
    ``||XW - Y|| / ||Y||`` on held-out calibration images per layer after the fit (and with the sliced original
    weights, under ``"<name>:before"``); a layer whose fit does not lower it keeps the sliced weights.

    With ``keep_statistics`` the batch norms keep what they measured in the pass (each layer runs with its final
    weights, as it is solved just before it runs): their running statistics are then re-estimated on
    ``calib[:images]``, the batch-norm half of ``apply.recalibrate``, and the pass runs even if no layer needs a
    fit. ``model`` is left in eval mode.
    """
    calib = calib[:images]
    todo: list[str] = []
    outs: dict[str, list[int] | None] = {}
    for name in graph.layer_names:
        layer = model.get_submodule(name)
        shape = _layer_shape(layer)
        if shape is None:
            continue
        orig = _layer_shape(graph.module.get_submodule(name))
        if orig is None or shape[0] >= orig[0]:
            continue  # its inputs were not pruned
        kept = _kept_outputs(graph, name, keeps)
        if (len(kept) if kept is not None else orig[1]) != shape[1]:
            log.debug("reconstruction skips %s: its kept outputs are not known", name)
            continue
        todo.append(name)
        outs[name] = kept
    if not todo:
        if keep_statistics:
            with _batch_statistics(model, keep=True):
                model(calib)
        return {}
    targets = _targets(graph, todo, calib)
    errors: dict[str, float] = {}
    solved: set[str] = set()

    def solve(mod: nn.Module, inputs: tuple, name: str) -> None:
        if name in solved:
            return  # shared weights: fitted at their first call only
        solved.add(name)
        t = targets[name]
        x = _rows(mod, inputs[0].detach(), t["idx"], t["out_hw"])
        y = t["y"] if outs[name] is None else t["y"][:, outs[name]]
        held = t["held"]
        xf, yf, xh, yh = x[~held], y[~held], x[held], y[held]
        if xf.shape[0] < MIN_ROWS_PER_UNKNOWN * x.shape[1] or xh.shape[0] == 0:
            return  # too few samples to determine this layer: a fit would only memorise them
        w0 = mod.weight.detach().reshape(mod.weight.shape[0], -1).t()  # unknowns x outputs
        xtx = xf.t() @ xf
        lam = RIDGE * float(xtx.diagonal().mean()) + 1e-8
        xtx.diagonal().add_(lam)
        rhs = xf.t() @ yf + lam * w0
        try:
            w = torch.linalg.solve(xtx, rhs)
        except RuntimeError:  # singular even with the ridge (all-zero inputs): keep the sliced weights
            return
        # judged on the held-out images' rows, so a fit that only memorised the others is not kept
        den = float(yh.norm()) or 1.0
        errors[f"{name}:before"] = float((xh @ w0 - yh).norm()) / den
        errors[name] = float((xh @ w - yh).norm()) / den
        if errors[name] < errors[f"{name}:before"]:
            mod.weight.copy_(w.t().reshape(mod.weight.shape))

    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda m, i, n=n: solve(m, i, n)) for n in todo]
    try:
        with _batch_statistics(model, keep=keep_statistics):
            model(calib)
    finally:
        for h in hooks:
            h.remove()
    return errors


@contextmanager
def _batch_statistics(model: nn.Module, keep: bool = False) -> Iterator[None]:
    """Run ``model`` in eval mode but with its batch norms on batch statistics; everything restored after.

    Both networks run like this during reconstruction: the pruned one because its running statistics are
    stale until re-estimated (and the re-estimation will find these batch statistics), the original so that
    its outputs are computed the same way (for a trained model they match its running statistics anyway).

    With ``keep`` the running statistics start empty and accumulate as a plain average over the pass (as
    ``apply.recalibrate`` does); they are kept, and the model ends in eval mode.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    was_training = model.training
    saved = [] if keep else [(bn, {k: v.clone() for k, v in bn.named_buffers()}) for bn in bns]
    model.eval()
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        if keep:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over the pass
        bn.train()
    try:
        yield
    finally:
        if keep:
            for bn, momentum in zip(bns, momenta, strict=True):
                bn.momentum = momentum
            model.eval()
        else:
            model.train(was_training)
        for bn, buffers in saved:
            for k, v in buffers.items():
                getattr(bn, k).copy_(v)
