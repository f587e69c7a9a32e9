"""Small CNNs with the structures real uploads have, for ingestion and pruning tests.

Each model takes (N, 3, 16, 16) images (``INPUT_SHAPE``) and returns (N, 10) logits, is small enough that
exporting and pruning it takes well under a second, and covers one structure the dependency graph must
understand: residual additions, concatenation of parallel branches, depthwise and grouped convolutions,
global mean pooling, and a flatten of a fixed-size feature map into a linear head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

INPUT_SHAPE = (3, 16, 16)
NUM_CLASSES = 10


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """Conv2d (no bias) + BatchNorm2d + ReLU, the block every CNN is made of."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


class BasicBlock(nn.Module):
    """ResNet basic block; a 1x1 projection on the shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        short = x if self.downsample is None else self.downsample(x)
        return F.relu(out + short)


class ResNetLike(nn.Module):
    """Stem, two stages of residual blocks, global average pooling, linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = nn.Sequential(BasicBlock(16, 16), BasicBlock(16, 16))
        self.layer2 = nn.Sequential(BasicBlock(16, 32, stride=2), BasicBlock(32, 32))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class InceptionBlock(nn.Module):
    """Four parallel branches concatenated along channels."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.b1 = conv_bn(cin, 8, 1)
        self.b3 = nn.Sequential(conv_bn(cin, 8, 1), conv_bn(8, 12, 3))
        self.b5 = nn.Sequential(conv_bn(cin, 4, 1), conv_bn(4, 6, 3), conv_bn(6, 6, 3))
        self.pool = nn.Sequential(nn.MaxPool2d(3, 1, 1), conv_bn(cin, 6, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b1(x), self.b3(x), self.b5(x), self.pool(x)], dim=1)


class InceptionLike(nn.Module):
    """Stem, two inception blocks, a 1x1 conv after the concatenation, mean pooling, linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.inc1 = InceptionBlock(16)
        self.inc2 = InceptionBlock(32)
        self.mix = conv_bn(32, 24, 1)
        self.fc = nn.Linear(24, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inc2(F.max_pool2d(self.inc1(self.stem(x)), 2))
        return self.fc(self.mix(x).mean(dim=(2, 3)))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 project, residual when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int = 4) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.expand = conv_bn(cin, hidden, 1)
        self.dw = conv_bn(hidden, hidden, 3, stride, groups=hidden)
        self.project = nn.Sequential(nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.dw(self.expand(x)))
        return x + out if self.use_res else out


class MobileNetLike(nn.Module):
    """Depthwise-separable stem and inverted residual blocks, ReLU6 classifier with dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 16, 3, 2)
        self.sep = nn.Sequential(conv_bn(16, 16, 3, groups=16), conv_bn(16, 16, 1))
        self.blocks = nn.Sequential(InvertedResidual(16, 24, 2), InvertedResidual(24, 24, 1))
        self.head = conv_bn(24, 48, 1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(48, NUM_CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.sep(self.stem(x))))
        x = F.adaptive_avg_pool2d(F.relu6(x), 1).flatten(1)
        return self.classifier(x)


class GroupedConvNet(nn.Module):
    """ResNeXt-style: 1x1 reduce, grouped 3x3 (4 groups), 1x1 expand, with a residual addition."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 32)
        self.reduce = conv_bn(32, 32, 1)
        self.grouped = conv_bn(32, 32, 3, groups=4)
        self.expand = nn.Sequential(nn.Conv2d(32, 32, 1, bias=False), nn.BatchNorm2d(32))
        self.fc = nn.Linear(32, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = F.relu(x + self.expand(self.grouped(self.reduce(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class MeanPoolMLPHead(nn.Module):
    """Two convs, spatial mean, then an MLP head with BatchNorm1d."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(conv_bn(3, 16), nn.MaxPool2d(2), conv_bn(16, 32))
        self.hidden = nn.Linear(32, 64)
        self.bn = nn.BatchNorm1d(64)
        self.out = nn.Linear(64, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x).mean(dim=[-2, -1])
        return self.out(F.relu(self.bn(self.hidden(x))))


class FlattenHead(nn.Module):
    """LeNet-style: the last feature map has a fixed size (8 x 4 x 4) and is flattened into the head.

    ``view_style`` picks how user code flattens: ``flatten`` (``torch.flatten(x, 1)``), ``size0``
    (``x.view(x.size(0), -1)``) or ``hardcoded`` (``x.view(-1, 8 * 4 * 4)``, which names the feature count).
    """

    def __init__(self, view_style: str = "flatten") -> None:
        super().__init__()
        self.view_style = view_style
        self.conv1 = nn.Conv2d(3, 12, 3, padding=1)
        self.conv2 = nn.Conv2d(12, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        if self.view_style == "flatten":
            x = torch.flatten(x, 1)
        elif self.view_style == "size0":
            x = x.view(x.size(0), -1)
        else:
            x = x.view(-1, 8 * 4 * 4)
        return self.fc2(F.relu(self.fc1(x)))


class ChannelShuffleNet(nn.Module):
    """ShuffleNet's channel shuffle: a view/transpose/view that hard-codes the channel layout."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = conv_bn(3, 16)
        self.gconv = conv_bn(16, 16, 1, groups=4)
        self.conv2 = conv_bn(16, 16)
        self.fc = nn.Linear(16, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.gconv(self.conv1(x))
        n, c, h, w = x.shape
        x = x.view(n, 4, c // 4, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.fc(self.conv2(x).mean((2, 3)))


class ScaledResidual(nn.Module):
    """A learnable per-channel scale used by a functional op (not a layer): it must stay a parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = conv_bn(3, 16)
        self.scale = nn.Parameter(torch.ones(1, 16, 1, 1) * 0.5)
        self.register_buffer("mean", torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1))
        self.fc = nn.Linear(16, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x - self.mean)
        return self.fc((x * self.scale).mean((2, 3)))


PRUNABLE_MODELS = {
    "resnet": ResNetLike,
    "inception": InceptionLike,
    "mobilenet": MobileNetLike,
    "grouped": GroupedConvNet,
    "meanpool_mlp": MeanPoolMLPHead,
    "flatten": lambda: FlattenHead("flatten"),
    "flatten_size0": lambda: FlattenHead("size0"),
    "flatten_hardcoded": lambda: FlattenHead("hardcoded"),
    "scaled": ScaledResidual,
}


def make_model(name: str, seed: int = 0) -> nn.Module:
    """A freshly initialised eval-mode model with non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    model = PRUNABLE_MODELS[name]() if name in PRUNABLE_MODELS else ChannelShuffleNet()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            # Random running stats and affine terms, so a BatchNorm lifted with the wrong buffers shows.
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def export_to(
    model: nn.Module, path: str, *, batch: int = 1, dynamic_batch: bool = False, decompose: bool = False
) -> torch.export.ExportedProgram:
    """``torch.export`` the model on a random input, ``torch.export.save`` it to ``path``; return the program."""
    x = torch.randn(batch, *INPUT_SHAPE)
    dynamic = ({0: torch.export.Dim("batch", min=1, max=1024)},) if dynamic_batch else None
    ep = torch.export.export(model, (x,), dynamic_shapes=dynamic)
    if decompose:
        ep = ep.run_decompositions()
    torch.export.save(ep, path)
    return ep
