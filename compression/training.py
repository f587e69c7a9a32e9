"""Accuracy, training and fine-tuning (optionally distilling from the uncompressed model).

All loops run on the CPU with deterministic shuffling from a seed. ``progress`` is an optional callback
``(done, total, stats)`` so the CLI can draw a progress bar and the workers can log, without this module
knowing who listens.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

Progress = Callable[[int, int, dict], None]


@dataclass
class Accuracy:
    """Top-1 (and top-5 when there are more than 5 classes) on ``samples`` inputs."""

    top1: float
    top5: float | None
    loss: float
    samples: int

    def to_dict(self) -> dict:
        return {"top1": self.top1, "top5": self.top5, "loss": self.loss, "samples": self.samples}


BN_SAMPLES = 1024  # training inputs the batch-norm statistics are re-estimated on after a fine-tune


def subset(dataset: TensorDataset, max_samples: int | None, seed: int = 0) -> TensorDataset:
    """A deterministic random subset of at most ``max_samples`` samples (the whole set when None)."""
    n = len(dataset)
    if max_samples is None or max_samples >= n:
        return dataset
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_samples]
    return TensorDataset(*(t[idx] for t in dataset.tensors))


def channels_last_works(module: nn.Module, x: torch.Tensor, probe: int = 8) -> bool:
    """Whether ``module`` runs on 4-D inputs in the channels-last memory format and computes what it computes on
    contiguous ones (to float rounding).

    A search scores its candidates that way when it can (``CompressionEnvironment``): oneDNN's convolutions run
    a third faster on channels-last tensors on the CPU (docs/BENCHMARKS.md, 2, session 14). A model that cannot,
    e.g. one that ``view``-s a feature map flat, raises here and is scored as it is.
    """
    if x.dim() != 4 or len(x) == 0:
        return False
    sample = x[:probe]
    try:
        with torch.no_grad():
            ref = module.eval()(sample)
            out = copy.deepcopy(module).to(memory_format=torch.channels_last)(
                sample.contiguous(memory_format=torch.channels_last)
            )
    except (RuntimeError, ValueError, TypeError):
        return False
    return (
        isinstance(ref, torch.Tensor)
        and isinstance(out, torch.Tensor)
        and ref.shape == out.shape
        and bool(torch.allclose(ref, out, rtol=1e-3, atol=1e-4))
    )


def channels_last(dataset: TensorDataset) -> TensorDataset:
    """``dataset`` with its inputs stored channels-last (a copy; labels shared)."""
    x, *rest = dataset.tensors
    return TensorDataset(x.contiguous(memory_format=torch.channels_last), *rest)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: TensorDataset,
    *,
    max_samples: int | None = None,
    batch_size: int = 128,
    seed: int = 0,
) -> Accuracy:
    """Top-1 / top-5 accuracy and mean cross-entropy of ``model`` on (a subset of) ``dataset``."""
    data = subset(dataset, max_samples, seed)
    x_all, y_all = data.tensors[0], data.tensors[1]
    model.eval()
    correct1 = correct5 = 0
    loss_sum = 0.0
    num_classes = None
    for i in range(0, len(x_all), batch_size):
        x, y = x_all[i : i + batch_size], y_all[i : i + batch_size]
        out = model(x)
        num_classes = out.shape[1]
        loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
        correct1 += int((out.argmax(1) == y).sum())
        if num_classes > 5:
            top5 = out.topk(5, dim=1).indices
            correct5 += int((top5 == y[:, None]).any(1).sum())
    n = len(x_all)
    if n == 0:
        return Accuracy(0.0, None, float("nan"), 0)
    return Accuracy(
        top1=correct1 / n,
        top5=(correct5 / n) if num_classes and num_classes > 5 else None,
        loss=loss_sum / n,
        samples=n,
    )


def train(
    model: nn.Module,
    train_set: TensorDataset,
    *,
    epochs: int = 10,
    lr: float = 0.05,
    batch_size: int = 64,
    weight_decay: float = 5e-4,
    seed: int = 0,
    teacher: nn.Module | None = None,
    distill_weight: float = 0.7,
    temperature: float = 4.0,
    augment: bool = True,
    progress: Progress | None = None,
    steps: int | None = None,
) -> list[dict]:
    """Train ``model`` in place with SGD + momentum and a cosine schedule; returns per-epoch stats.

    ``steps``, if given, replaces ``epochs``: exactly that many optimizer steps (the data reshuffled each pass),
    the schedule decaying over them. A search uses a few dozen steps to see how a candidate takes to fine-tuning.

    With ``teacher``, the loss mixes cross-entropy with the KL divergence to the teacher's softened outputs
    (knowledge distillation), which recovers a compressed model's accuracy faster. ``augment`` applies
    random shifts by up to 1/8 of the image size with zero padding (and horizontal flips only for inputs
    of 32 pixels or more, where the data is natural images rather than digits).
    """
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, generator=g, drop_last=False)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)
    total_steps = max(1, steps if steps is not None else epochs * len(loader))
    if steps is not None:
        epochs = math.ceil(total_steps / max(1, len(loader)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total_steps)))
    if teacher is not None:
        teacher.eval()
    history = []
    step = 0
    for epoch in range(epochs):
        model.train()
        t0 = time.perf_counter()
        loss_sum, correct, seen = 0.0, 0, 0
        for x, y in loader:
            if step >= total_steps:
                break
            if augment:
                x = _augment(x, g)
            out = model(x)
            loss = F.cross_entropy(out, y)
            if teacher is not None:
                with torch.no_grad():
                    t_out = teacher(x)
                kd = F.kl_div(
                    F.log_softmax(out / temperature, 1),
                    F.softmax(t_out / temperature, 1),
                    reduction="batchmean",
                ) * (temperature**2)
                loss = (1 - distill_weight) * loss + distill_weight * kd
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            loss_sum += float(loss.detach()) * len(y)
            correct += int((out.argmax(1) == y).sum())
            seen += len(y)
            if progress is not None:
                progress(step, total_steps, {"epoch": epoch + 1, "loss": loss_sum / seen})
        history.append(
            {
                "epoch": epoch + 1,
                "loss": loss_sum / max(1, seen),
                "train_acc": correct / max(1, seen),
                "seconds": time.perf_counter() - t0,
            }
        )
    model.eval()
    return history


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random translation (zero padded) and, for natural-image sizes, random horizontal flip."""
    n, _, h, w = x.shape
    pad = max(1, h // 8)
    padded = F.pad(x, (pad, pad, pad, pad))
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None].expand(n, x.shape[1], h, w + 2 * pad)
    out = torch.gather(padded, 2, rows)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :].expand(n, x.shape[1], h, w)
    out = torch.gather(out, 3, cols)
    if h >= 32:
        flip = torch.rand(n, generator=g) < 0.5
        out[flip] = out[flip].flip(3)
    return out


class _FakeQuantSTE(nn.Module):
    """Weight parametrization: forward sees quantized weights, gradients reach the float ones (STE)."""

    def __init__(self, bits: object) -> None:
        super().__init__()
        self.bits = bits

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        from compression.quant import fake_quantize_weight

        return w + (fake_quantize_weight(w, self.bits) - w).detach()


def fine_tune(
    model: nn.Module,
    train_set: TensorDataset,
    *,
    epochs: int = 3,
    lr: float = 0.01,
    teacher: nn.Module | None = None,
    seed: int = 0,
    progress: Progress | None = None,
    augment: bool = False,
    **kwargs,
) -> list[dict]:
    """Fine-tune a compressed model in place (a short, low learning-rate ``train``).

    ``augment`` (off by default, unlike ``train``): the random shifts slow a short distillation down. Measured on
    pruned ResNet-20s at 10% of the MACs, 2 epochs: 4-8 points lower test accuracy with them than without
    (docs/BENCHMARKS.md, 1j); the original's soft outputs already regularise.

    Quantized layers train with a straight-through estimator: their float weights are updated while the
    forward pass uses the quantized values, and the result is snapped back onto the quantization grid.
    """
    with _quantized_weights_trainable(model):
        history = train(
            model,
            train_set,
            epochs=epochs,
            lr=lr,
            teacher=teacher,
            seed=seed,
            progress=progress,
            augment=augment,
            **kwargs,
        )
    reestimate_batch_norm(model, train_set)
    return history


@contextlib.contextmanager
def _quantized_weights_trainable(model: nn.Module) -> Iterator[None]:
    """While inside, quantized layers train through a straight-through estimator; on leaving, their weights
    are snapped back onto the quantization grid."""
    from torch.nn.utils import parametrize

    quantized = [
        m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and getattr(m, "w_bits", 32) != 32
    ]
    for m in quantized:
        parametrize.register_parametrization(m, "weight", _FakeQuantSTE(m.w_bits))
    try:
        yield
    finally:
        for m in quantized:
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)


def quick_tune(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    steps: int,
    lr: float = 0.01,
    batch_size: int = 64,
    seed: int = 0,
    distill_weight: float = 0.7,
    temperature: float = 4.0,
    bn_samples: int = 256,
) -> None:
    """A few steps of ``fine_tune``'s distillation, lean enough to run on every search candidate (in place).

    What a search uses to see how a candidate takes to fine-tuning (``EnvSettings.tune_steps``; docs/BENCHMARKS.md,
    1i, measures how well it ranks candidates). Against ``fine_tune``: the teacher's outputs are computed
    once by the caller (``teacher_logits`` for ``x``), so the inputs are not augmented; SGD with Nesterov momentum
    and a cosine decay over ``steps``; batch norms re-estimated over the first ``bn_samples`` inputs at the end.
    Deterministic for a seed: the same candidate always scores the same.
    """
    g = torch.Generator().manual_seed(seed)
    n = len(x)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    soft = F.softmax(teacher_logits / temperature, 1)
    order = torch.randperm(n, generator=g)
    at = 0
    model.train()
    with _quantized_weights_trainable(model):
        for step in range(steps):
            if at + batch_size > n and at > 0:
                order, at = torch.randperm(n, generator=g), 0
            idx = order[at : at + batch_size]
            at += batch_size
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
            out = model(x[idx])
            kd = (
                F.kl_div(F.log_softmax(out / temperature, 1), soft[idx], reduction="batchmean")
                * temperature**2
            )
            loss = (1 - distill_weight) * F.cross_entropy(out, y[idx]) + distill_weight * kd
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    reestimate_batch_norm(model, TensorDataset(x, y), samples=bn_samples)


@torch.no_grad()
def reestimate_batch_norm(
    model: nn.Module, train_set: TensorDataset, samples: int = BN_SAMPLES, batch_size: int = 128
) -> None:
    """Replace batch-norm running statistics by a plain average over ``samples`` training inputs, in place.

    Training leaves momentum averages of the last few dozen batches: after a short fine-tune (one or two epochs
    of a small dataset) they are off enough to cost points. Measured on re-fitted depthwise nets after a
    1-epoch fine-tune: test accuracy 0.755 with the momentum statistics, 0.876 after this pass (0.871 before
    the fine-tune; docs/BENCHMARKS.md, 1d). Activation quantizers keep their calibrated ranges.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    x = train_set.tensors[0][:samples]
    was_training = model.training
    model.eval()
    saved = [(bn, bn.momentum) for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
        bn.train()
    try:
        for i in range(0, len(x), batch_size):
            model(x[i : i + batch_size])
    finally:
        for bn, momentum in saved:
            bn.momentum = momentum
        model.train(was_training)
        if not was_training:
            model.eval()


def clone_model(model: nn.Module) -> nn.Module:
    """A deep copy (teacher for distillation, or an untouched reference)."""
    return copy.deepcopy(model)
