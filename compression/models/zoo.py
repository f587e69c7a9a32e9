"""Built-in model zoo: CIFAR-style architectures written without torchvision.

Every architecture takes ``num_classes``, ``in_channels`` and ``input_size`` (square H = W) and works for
inputs from 8x8 upward: the classifier always sits behind an adaptive average pool, and VGG-style max-pools
that would shrink the feature map below 1x1 are replaced by ``nn.Identity`` (in place, so parameter names
do not depend on the input size and a state dict trained at 32x32 loads into the 8x8 build).

Design choices that matter to the rest of the engine:
- Every convolution is followed by a BatchNorm and every activation is a separate, non-inplace module, so
  tracing (torch.fx / torch.export), channel pruning and activation quantization see plain, named layers.
- CIFAR ResNets use 1x1 conv + BN projection shortcuts wherever the shape changes (He et al.'s option B),
  so the shortcut is a real prunable layer instead of a zero-padding trick.
- Attribute names follow the usual conventions (``conv1``, ``bn1``, ``layer1.0.conv1``, ``shortcut``,
  ``features``, ``classifier``, ``fc``), since layer names are what users see in policies and heatmaps.

The MAC counter here (``_count_macs``) only fills the zoo listing; ``compression.costs`` is the engine's
one MAC function.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from compression.errors import ModelError

MIN_INPUT_SIZE = 8
DEFAULT_INPUT_SHAPE = (3, 32, 32)
DEFAULT_NUM_CLASSES = 10
# Arguments every builder takes; anything else a builder accepts is an architecture option.
_CORE_ARGS = ("num_classes", "in_channels", "input_size")


# --------------------------------------------------------------------------------------------------------
# Initialisation and shared pieces


def _init_weights(model: nn.Module) -> None:
    """Kaiming-normal convs (fan-out, as in He et al.), unit BN, small-normal linear layers."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


def _conv_bn_relu_stack(
    in_channels: int, plan: Sequence[int | str], input_size: int
) -> tuple[nn.Sequential, int]:
    """Build a torchvision-VGG-style flat ``features`` stack from a plan of widths and ``"M"`` pools.

    Returns the stack and its output channel count. A pool that would take the map below 1x1 becomes an
    ``nn.Identity`` at the same index, keeping parameter names independent of ``input_size``.
    """
    layers: list[nn.Module] = []
    channels = in_channels
    size = input_size
    for item in plan:
        if item == "M":
            if size // 2 >= 1:
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                size //= 2
            else:
                layers.append(nn.Identity())
        else:
            width = int(item)
            layers += [
                nn.Conv2d(channels, width, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=False),
            ]
            channels = width
    return nn.Sequential(*layers), channels


# --------------------------------------------------------------------------------------------------------
# Small plain CNN

_SMALL_CNN_PLAN: tuple[int | str, ...] = (32, 32, "M", 64, 64, "M", 64)


class SmallCNN(nn.Module):
    """A small plain CNN (~100k parameters): five conv-BN-ReLU blocks, two max-pools, a linear head."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, input_size: int = 32) -> None:
        super().__init__()
        self.features, channels = _conv_bn_relu_stack(in_channels, _SMALL_CNN_PLAN, input_size)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(channels, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map a batch ``(N, C, H, W)`` to this block's or model's output."""
        x = self.features(x)
        x = self.avgpool(x)
        return self.classifier(torch.flatten(x, 1))


# --------------------------------------------------------------------------------------------------------
# ResNets (CIFAR ResNet-20/56 of He et al. 2016, and the CIFAR ResNet-18 variant)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity or 1x1 conv-BN projection shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map a batch ``(N, C, H, W)`` to this block's or model's output."""
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """A ResNet for small images: 3x3 stem at stride 1, no max-pool, stages ``layer1..layerN``, ``fc``."""

    def __init__(
        self,
        blocks_per_stage: Sequence[int],
        widths: Sequence[int],
        num_classes: int = 10,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if len(blocks_per_stage) != len(widths):
            raise ValueError("blocks_per_stage and widths must have the same length")
        stem = widths[0]
        self.conv1 = nn.Conv2d(in_channels, stem, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=False)
        self._stage_names: list[str] = []
        channels = stem
        for i, (count, width) in enumerate(zip(blocks_per_stage, widths, strict=True)):
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(count):
                blocks.append(BasicBlock(channels, width, stride if j == 0 else 1))
                channels = width
            name = f"layer{i + 1}"
            setattr(self, name, nn.Sequential(*blocks))
            self._stage_names.append(name)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(channels, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map a batch ``(N, C, H, W)`` to this block's or model's output."""
        x = self.relu(self.bn1(self.conv1(x)))
        for name in self._stage_names:
            x = getattr(self, name)(x)
        x = self.avgpool(x)
        return self.fc(torch.flatten(x, 1))


def resnet20(num_classes: int = 10, in_channels: int = 3, input_size: int = 32) -> nn.Module:
    """CIFAR ResNet-20: 16/32/64 channels, 3 basic blocks per stage (~0.27M parameters)."""
    del input_size  # the adaptive pool makes the architecture independent of it
    return CifarResNet((3, 3, 3), (16, 32, 64), num_classes, in_channels)


def resnet56(num_classes: int = 10, in_channels: int = 3, input_size: int = 32) -> nn.Module:
    """CIFAR ResNet-56: 16/32/64 channels, 9 basic blocks per stage (~0.86M parameters)."""
    del input_size
    return CifarResNet((9, 9, 9), (16, 32, 64), num_classes, in_channels)


def resnet18(num_classes: int = 10, in_channels: int = 3, input_size: int = 32) -> nn.Module:
    """CIFAR ResNet-18: 3x3 stride-1 stem, no max-pool, 64/128/256/512 channels, 2 blocks per stage."""
    del input_size
    return CifarResNet((2, 2, 2, 2), (64, 128, 256, 512), num_classes, in_channels)


# --------------------------------------------------------------------------------------------------------
# VGG with batch norm (CIFAR style)

_VGG_PLANS: dict[str, tuple[int | str, ...]] = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
}


class VGG(nn.Module):
    """VGG-BN for small images: ``features`` (conv-BN-ReLU, max-pools), adaptive pool, 2-layer classifier."""

    def __init__(
        self,
        plan: Sequence[int | str],
        num_classes: int = 10,
        in_channels: int = 3,
        input_size: int = 32,
        hidden_features: int = 512,
    ) -> None:
        super().__init__()
        self.features, channels = _conv_bn_relu_stack(in_channels, plan, input_size)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        # A hidden linear layer gives the search a prunable fully connected layer, as in AMC's VGG runs.
        self.classifier = nn.Sequential(
            nn.Linear(channels, hidden_features),
            nn.ReLU(inplace=False),
            nn.Linear(hidden_features, num_classes),
        )
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map a batch ``(N, C, H, W)`` to this block's or model's output."""
        x = self.features(x)
        x = self.avgpool(x)
        return self.classifier(torch.flatten(x, 1))


def vgg11(
    num_classes: int = 10, in_channels: int = 3, input_size: int = 32, hidden_features: int = 512
) -> nn.Module:
    """VGG-11 with batch norm; pools that would go below 1x1 are skipped."""
    return VGG(_VGG_PLANS["vgg11"], num_classes, in_channels, input_size, hidden_features)


def vgg16(
    num_classes: int = 10, in_channels: int = 3, input_size: int = 32, hidden_features: int = 512
) -> nn.Module:
    """VGG-16 with batch norm; pools that would go below 1x1 are skipped."""
    return VGG(_VGG_PLANS["vgg16"], num_classes, in_channels, input_size, hidden_features)


# --------------------------------------------------------------------------------------------------------
# MobileNetV2 (CIFAR variant)

# (expansion t, output channels c, repeats n, first stride s). Sandler et al.'s table with the stem and the
# second stage at stride 1, the usual change for 32x32 inputs (total down-sampling 8x instead of 32x).
_MOBILENETV2_PLAN: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _make_divisible(value: float, divisor: int = 8) -> int:
    """Round a scaled width to a multiple of ``divisor`` without dropping more than 10% (MobileNet rule)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class InvertedResidual(nn.Module):
    """1x1 expand (absent when t = 1), 3x3 depthwise, 1x1 linear projection; residual when shapes match."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        self.use_residual = stride == 1 and in_channels == out_channels
        self.conv1: nn.Conv2d | None = None
        self.bn1: nn.BatchNorm2d | None = None
        self.relu1: nn.Module | None = None
        if expansion != 1:
            self.conv1 = nn.Conv2d(in_channels, hidden, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(hidden)
            self.relu1 = nn.ReLU6(inplace=False)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.relu2 = nn.ReLU6(inplace=False)
        self.conv3 = nn.Conv2d(hidden, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map a batch ``(N, C, H, W)`` to this block's or model's output."""
        out = x
        if self.conv1 is not None:
            out = self.relu1(self.bn1(self.conv1(out)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return out + x if self.use_residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2 for small images: stride-1 stem, inverted residual ``layers``, 1x1 head conv, ``classifier``."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0) -> None:
        super().__init__()
        stem = _make_divisible(32 * width_mult)
        last = _make_divisible(1280 * max(1.0, width_mult))
        self.conv1 = nn.Conv2d(in_channels, stem, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu1 = nn.ReLU6(inplace=False)
        blocks: list[nn.Module] = []
        channels = stem
        for expansion, width, repeats, stride in _MOBILENETV2_PLAN:
            out_channels = _make_divisible(width * width_mult)
            for i in range(repeats):
                blocks.append(InvertedResidual(channels, out_channels, stride if i == 0 else 1, expansion))
                channels = out_channels
        self.layers = nn.Sequential(*blocks)
        self.conv2 = nn.Conv2d(channels, last, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(last)
        self.relu2 = nn.ReLU6(inplace=False)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(last, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map a batch ``(N, C, H, W)`` to this block's or model's output."""
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.layers(x)
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.avgpool(x)
        return self.classifier(torch.flatten(x, 1))


def mobilenetv2(
    num_classes: int = 10, in_channels: int = 3, input_size: int = 32, width_mult: float = 1.0
) -> nn.Module:
    """CIFAR MobileNetV2 with a width multiplier (channels scaled and rounded to multiples of 8)."""
    del input_size
    if not (isinstance(width_mult, (int, float)) and math.isfinite(width_mult) and width_mult > 0):
        raise ModelError(f"width_mult={width_mult!r} is not a positive number", "use e.g. 0.5, 0.75 or 1.0")
    return MobileNetV2(num_classes, in_channels, float(width_mult))


def small_cnn(num_classes: int = 10, in_channels: int = 3, input_size: int = 32) -> nn.Module:
    """A small plain CNN (~100k parameters) for quick runs and tests."""
    return SmallCNN(num_classes, in_channels, input_size)


# --------------------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class ZooEntry:
    """One built-in architecture.

    builder: ``builder(num_classes, in_channels, input_size, **options) -> nn.Module``.
    default_input_shape: the (C, H, W) the listing's parameter and MAC figures refer to.
    family: architecture family (``cnn``, ``resnet``, ``vgg``, ``mobilenet``).
    """

    name: str
    builder: Callable[..., nn.Module]
    description: str
    default_input_shape: tuple[int, int, int] = DEFAULT_INPUT_SHAPE
    family: str = ""


ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in (
        ZooEntry(
            "small_cnn",
            small_cnn,
            "Small plain CNN: 5 conv-BN-ReLU blocks, 2 max-pools, linear head",
            family="cnn",
        ),
        ZooEntry(
            "resnet20",
            resnet20,
            "CIFAR ResNet-20 (He et al.): 3 stages of 16/32/64 channels x 3 basic blocks, projection shortcuts",
            family="resnet",
        ),
        ZooEntry(
            "resnet56",
            resnet56,
            "CIFAR ResNet-56 (He et al.): 3 stages of 16/32/64 channels x 9 basic blocks, projection shortcuts",
            family="resnet",
        ),
        ZooEntry(
            "resnet18",
            resnet18,
            "CIFAR ResNet-18: 3x3 stride-1 stem, no max-pool, 4 stages of 64..512 channels x 2 basic blocks",
            family="resnet",
        ),
        ZooEntry("vgg11", vgg11, "VGG-11 with batch norm, CIFAR style, 512-512-classes head", family="vgg"),
        ZooEntry("vgg16", vgg16, "VGG-16 with batch norm, CIFAR style, 512-512-classes head", family="vgg"),
        ZooEntry(
            "mobilenetv2",
            mobilenetv2,
            "CIFAR MobileNetV2: stride-1 stem, inverted residuals with depthwise convs, option width_mult",
            family="mobilenet",
        ),
    )
}


@dataclass(frozen=True)
class ZooSpec:
    """How a zoo model was built; attached to it as ``model.zoo_spec`` so messages can name it."""

    name: str
    num_classes: int
    in_channels: int
    input_size: int
    options: tuple[tuple[str, Any], ...] = ()

    def describe(self) -> str:
        """E.g. ``resnet20 (10 classes, 3x32x32)``."""
        opts = "".join(f", {k}={v}" for k, v in self.options)
        s = self.input_size
        return f"{self.name} ({self.num_classes} classes, {self.in_channels}x{s}x{s}{opts})"


def _check_positive_int(label: str, value: Any, minimum: int, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ModelError(f"{label} must be an integer, got {value!r}", hint)
    if value < minimum:
        raise ModelError(f"{label}={value} is too small (minimum {minimum})", hint)


def build_zoo_model(
    name: str,
    num_classes: int = DEFAULT_NUM_CLASSES,
    in_channels: int = 3,
    input_size: int = 32,
    **kwargs: Any,
) -> nn.Module:
    """Build a freshly initialised zoo architecture (in training mode).

    ``input_size`` is the side of the square input (>= 8). Extra keyword options go to the architecture
    (``mobilenetv2`` takes ``width_mult``; ``vgg11``/``vgg16`` take ``hidden_features``). The returned module
    carries ``zoo_spec`` (a ``ZooSpec``) describing how it was built. Raises ``ModelError`` for an unknown
    name, an unknown option, or sizes out of range.
    """
    entry = ZOO.get(name) if isinstance(name, str) else None
    if entry is None:
        raise ModelError(f"unknown zoo model {name!r}", f"available: {', '.join(sorted(ZOO))}")
    _check_positive_int("num_classes", num_classes, 1, "a classifier needs at least 1 class")
    _check_positive_int("in_channels", in_channels, 1, "use 3 for RGB images, 1 for grayscale")
    _check_positive_int(
        "input_size",
        input_size,
        MIN_INPUT_SIZE,
        f"zoo models need inputs of at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE}; resize or pad the images",
    )
    accepted = [p for p in inspect.signature(entry.builder).parameters if p not in _CORE_ARGS]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        options = ", ".join(accepted) if accepted else "none"
        raise ModelError(f"{name} has no option {', '.join(unknown)}", f"its options: {options}")
    model = entry.builder(num_classes=num_classes, in_channels=in_channels, input_size=input_size, **kwargs)
    model.zoo_spec = ZooSpec(name, num_classes, in_channels, input_size, tuple(sorted(kwargs.items())))
    return model


# --------------------------------------------------------------------------------------------------------
# Listing (parameter and MAC figures at the default input)


def _count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass of one sample, counting conv and linear layers only."""
    total = 0

    def conv_hook(module: nn.Conv2d, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        kh, kw = module.kernel_size
        per_output = (module.in_channels // module.groups) * kh * kw
        total += output[0].numel() * per_output

    def linear_hook(module: nn.Linear, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        total += output[0].numel() * module.in_features

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, *input_shape)))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return int(total)


@functools.cache
def _listing_row(name: str) -> tuple[tuple[str, Any], ...]:
    entry = ZOO[name]
    c, h, w = entry.default_input_shape
    # Building under a fixed seed keeps the listing from disturbing (or depending on) the global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_zoo_model(name, DEFAULT_NUM_CLASSES, c, h)
    params = sum(p.numel() for p in model.parameters())
    macs = _count_macs(model, entry.default_input_shape)
    return (
        ("name", name),
        ("family", entry.family),
        ("description", entry.description),
        ("input_shape", list(entry.default_input_shape)),
        ("num_classes", DEFAULT_NUM_CLASSES),
        ("params", params),
        ("macs", macs),
    )


def list_zoo() -> list[dict[str, Any]]:
    """One row per zoo model: name, family, description, input_shape, num_classes, params and MACs.

    Parameters and MACs (conv + linear multiply-accumulates per sample) are computed, at the default
    3x32x32 input with 10 classes, by building the model once per process.
    """
    return [dict(_listing_row(name)) for name in ZOO]


# --------------------------------------------------------------------------------------------------------
# Loading weights


def _shape(t: Any) -> str:
    return str(tuple(t.shape))


def _join_limited(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def load_state_dict_into(module: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load ``state_dict`` into ``module`` strictly, or raise ModelError naming every tensor that does not fit.

    Missing, unexpected and shape-mismatched tensors are all reported in one message (up to 8 of each),
    with both shapes for a mismatch. The one tolerance: BatchNorm ``num_batches_tracked`` counters missing
    from the file (older checkpoints lack them) keep the module's values.
    """
    spec = getattr(module, "zoo_spec", None)
    target = spec.describe() if isinstance(spec, ZooSpec) else f"the {type(module).__name__} model"
    if not isinstance(state_dict, dict):
        raise ModelError(
            f"expected a state dict (name -> tensor), got {type(state_dict).__name__}",
            "save the weights with torch.save(model.state_dict(), path)",
        )
    not_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ModelError(
            f"the state dict holds non-tensor entries: {_join_limited([str(k) for k in not_tensors])}",
            "save only model.state_dict(), not a training checkpoint with other objects",
        )
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k} has shape {_shape(state_dict[k])} in the file but {_shape(expected[k])} in {target}"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    problems = list(mismatched[:8])
    if len(mismatched) > 8:
        problems.append(f"and {len(mismatched) - 8} more shape mismatches")
    if missing:
        problems.append(f"missing from the file: {_join_limited(missing)}")
    if unexpected:
        problems.append(f"in the file but not in {target}: {_join_limited(unexpected)}")
    if problems:
        hint = "the weights must come from the same architecture, num_classes and in_channels"
        if unexpected and all(k.startswith("module.") for k in state_dict):
            hint = "the keys start with 'module.' (saved from DataParallel); strip that prefix before saving"
        elif mismatched:
            hint += "; check the zoo name and the class/channel counts the weights were trained with"
        raise ModelError(f"the weights do not fit {target}: " + "; ".join(problems), hint)
    try:
        # Our own check above is the strict one; strict=False only lets missing num_batches_tracked pass.
        module.load_state_dict(state_dict, strict=False)
    except RuntimeError as exc:
        raise ModelError(f"the weights could not be loaded into {target}: {exc}", "check the file") from exc
