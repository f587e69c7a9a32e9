"""Tests for the built-in model zoo (compression/models/zoo.py)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from compression.errors import ModelError
from compression.models.zoo import (
    ZOO,
    ZooEntry,
    _count_macs,
    build_zoo_model,
    list_zoo,
    load_state_dict_into,
)

ALL_NAMES = sorted(ZOO)
# (in_channels, input_size, num_classes): the default CIFAR shape and the smallest supported one.
SHAPES = [(3, 32, 10), (1, 8, 4)]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # On a shared 2-core machine, torch's intra-op threads spin against other processes and a training step
    # runs 30-40x slower than on one thread (measured); these models are too small to gain from two.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_zoo_has_the_promised_architectures() -> None:
    assert set(ZOO) == {"small_cnn", "resnet20", "resnet56", "resnet18", "vgg11", "vgg16", "mobilenetv2"}
    for name, entry in ZOO.items():
        assert isinstance(entry, ZooEntry)
        assert entry.name == name
        assert entry.default_input_shape == (3, 32, 32)
        assert entry.family and entry.description
    with pytest.raises(AttributeError):
        ZOO["resnet20"].name = "other"  # type: ignore[misc]


@pytest.mark.parametrize("name", ALL_NAMES)
@pytest.mark.parametrize("in_channels,size,num_classes", SHAPES)
def test_builds_and_trains_one_step(name: str, in_channels: int, size: int, num_classes: int) -> None:
    model = build_zoo_model(name, num_classes=num_classes, in_channels=in_channels, input_size=size)
    model.train()
    # Batch 4, not 2: once the map is 1x1, training-mode BatchNorm over two values outputs +-1 whatever the
    # conv before it computed, so that conv would get a zero gradient and the "weights change" check fail.
    x = torch.randn(4, in_channels, size, size)
    y = torch.arange(4) % num_classes
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    out = model(x)
    assert out.shape == (4, num_classes)
    loss = nn.functional.cross_entropy(out, y)
    assert math.isfinite(loss.item())
    opt.zero_grad()
    loss.backward()
    # Every parameter takes part in the forward pass: a dead branch would show up as a missing gradient.
    no_grad = [k for k, p in model.named_parameters() if p.grad is None]
    assert not no_grad, f"parameters without gradient: {no_grad}"
    opt.step()
    changed = [k for k, p in model.named_parameters() if not torch.equal(p.detach(), before[k])]
    assert len(changed) == len(before)
    with torch.no_grad():
        assert math.isfinite(nn.functional.cross_entropy(model(x), y).item())


@pytest.mark.parametrize(
    "name,expected",
    [
        # He et al.'s figures (0.27M, 0.85M, with option-A shortcuts) plus the small 1x1 projection convs.
        ("resnet20", 0.27e6),
        ("resnet56", 0.85e6),
        # The widely used CIFAR ResNet-18 (kuangliu/pytorch-cifar): 11,173,962 parameters.
        ("resnet18", 11.17e6),
    ],
)
def test_param_counts_match_published_figures(name: str, expected: float) -> None:
    n = _params(build_zoo_model(name))
    assert abs(n - expected) / expected < 0.03, n


def test_exact_param_counts_of_resnets() -> None:
    # Option-A counts (269,722 / 853,018) + the two projection shortcuts (16->32 and 32->64 1x1 conv + BN).
    projections = (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)
    assert _params(build_zoo_model("resnet20")) == 269_722 + projections
    assert _params(build_zoo_model("resnet56")) == 853_018 + projections
    assert _params(build_zoo_model("resnet18")) == 11_173_962


def test_small_cnn_is_about_100k_params() -> None:
    assert 80_000 < _params(build_zoo_model("small_cnn")) < 130_000


def test_every_conv_is_followed_by_batchnorm_and_relus_are_not_inplace() -> None:
    for name in ALL_NAMES:
        model = build_zoo_model(name)
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        assert len(convs) == len(bns), name
        assert all(m.bias is None for m in convs), name
        for m in model.modules():
            if isinstance(m, (nn.ReLU, nn.ReLU6)):
                assert not m.inplace, name


def test_resnets_use_projection_shortcuts_where_shape_changes() -> None:
    model = build_zoo_model("resnet20")
    names = dict(model.named_modules())
    assert isinstance(names["layer1.0.shortcut"], nn.Identity)
    assert isinstance(names["layer2.0.shortcut.0"], nn.Conv2d)
    assert names["layer2.0.shortcut.0"].kernel_size == (1, 1)
    assert isinstance(names["layer2.0.shortcut.1"], nn.BatchNorm2d)
    assert isinstance(names["layer3.0.shortcut.0"], nn.Conv2d)
    assert "layer4" not in names
    r18 = dict(build_zoo_model("resnet18").named_modules())
    assert r18["conv1"].stride == (1, 1) and r18["conv1"].kernel_size == (3, 3)
    assert not any(isinstance(m, nn.MaxPool2d) for m in r18.values())
    assert r18["layer4.1.conv2"].out_channels == 512


def test_vgg_skips_pools_for_small_inputs_but_keeps_parameter_names() -> None:
    big = build_zoo_model("vgg16", input_size=32)
    small = build_zoo_model("vgg16", input_size=8)
    pools = lambda m: sum(isinstance(x, nn.MaxPool2d) for x in m.modules())  # noqa: E731
    assert pools(big) == 5
    assert pools(small) == 3  # 8 -> 4 -> 2 -> 1, the last two pools are skipped
    assert big.state_dict().keys() == small.state_dict().keys()
    load_state_dict_into(small, big.state_dict())
    assert torch.equal(small.state_dict()["features.0.weight"], big.state_dict()["features.0.weight"])


def test_mobilenetv2_depthwise_and_width_multiplier() -> None:
    model = build_zoo_model("mobilenetv2")
    depthwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert len(depthwise) == 17
    assert all(m.groups == m.in_channels == m.out_channels for m in depthwise)
    assert model.conv1.stride == (1, 1)
    # CIFAR variant: 3 stride-2 stages, so 32x32 reaches the head at 4x4.
    assert sum(m.stride == (2, 2) for m in depthwise) == 3
    half = build_zoo_model("mobilenetv2", width_mult=0.5)
    assert half.conv1.out_channels == 16
    assert all(m.out_channels % 8 == 0 for m in half.modules() if isinstance(m, nn.Conv2d))
    assert _params(half) < _params(model)
    assert half.zoo_spec.describe() == "mobilenetv2 (10 classes, 3x32x32, width_mult=0.5)"
    with pytest.raises(ModelError, match="width_mult"):
        build_zoo_model("mobilenetv2", width_mult=0)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_fx_traceable(name: str) -> None:
    model = build_zoo_model(name, num_classes=4, in_channels=1, input_size=8).eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(traced(x), model(x))


def test_unknown_name_lists_available() -> None:
    with pytest.raises(ModelError) as err:
        build_zoo_model("resnet1000")
    msg = str(err.value)
    assert "resnet1000" in msg
    for name in ALL_NAMES:
        assert name in msg


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"num_classes": 0}, "num_classes"),
        ({"in_channels": 0}, "in_channels"),
        ({"input_size": 7}, "input_size"),
        ({"input_size": 16.0}, "input_size"),
        ({"num_classes": True}, "num_classes"),
        ({"depth": 3}, "depth"),
    ],
)
def test_invalid_arguments_raise_model_error_with_hint(kwargs: dict, field: str) -> None:
    with pytest.raises(ModelError) as err:
        build_zoo_model("resnet20", **kwargs)
    assert field in err.value.what
    assert err.value.hint


def test_list_zoo_rows() -> None:
    rows = list_zoo()
    assert [r["name"] for r in rows] == list(ZOO)
    by_name = {r["name"]: r for r in rows}
    for r in rows:
        assert r["params"] > 0 and r["macs"] > 0 and r["description"]
        assert r["input_shape"] == [3, 32, 32] and r["num_classes"] == 10
    assert by_name["resnet20"]["params"] == _params(build_zoo_model("resnet20"))
    # Published MACs at 32x32: ResNet-20 ~41M, ResNet-56 ~125M, CIFAR VGG-16 ~313M, CIFAR ResNet-18 ~0.56G.
    for name, published in [
        ("resnet20", 40.8e6),
        ("resnet56", 125.5e6),
        ("vgg16", 313.5e6),
        ("resnet18", 556e6),
    ]:
        assert abs(by_name[name]["macs"] - published) / published < 0.03, name
    # Rows are copies: editing one does not change the next listing.
    rows[0]["params"] = -1
    assert list_zoo()[0]["params"] > 0


def test_count_macs_by_hand() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # 8*8*8 outputs x 3*9 = 13,824
        nn.Conv2d(8, 8, 3, padding=1, groups=8),  # 512 outputs x 9 = 4,608
        nn.Flatten(),
        nn.Linear(512, 10),  # 5,120
    )
    assert _count_macs(model, (3, 8, 8)) == 13_824 + 4_608 + 5_120
    assert model.training  # the counter restores the mode it found


def test_state_dict_round_trip() -> None:
    a = build_zoo_model("resnet20")
    with torch.no_grad():
        a(torch.randn(4, 3, 32, 32))  # moves BN statistics away from their initial values
    torch.manual_seed(1)
    b = build_zoo_model("resnet20")
    load_state_dict_into(b, a.state_dict())
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(a.eval()(x), b.eval()(x))


def test_missing_num_batches_tracked_is_tolerated() -> None:
    a = build_zoo_model("small_cnn")
    sd = {k: v for k, v in a.state_dict().items() if not k.endswith("num_batches_tracked")}
    load_state_dict_into(build_zoo_model("small_cnn"), sd)


def test_wrong_shape_is_named_with_both_shapes() -> None:
    model = build_zoo_model("resnet20")
    sd = model.state_dict()
    sd["layer1.0.conv1.weight"] = torch.zeros(8, 16, 3, 3)
    with pytest.raises(ModelError) as err:
        load_state_dict_into(model, sd)
    assert (
        "layer1.0.conv1.weight has shape (8, 16, 3, 3) in the file but (16, 16, 3, 3) "
        "in resnet20 (10 classes, 3x32x32)"
    ) in str(err.value)
    # Nothing was loaded: the module keeps its own weights.
    assert model.layer1[0].conv1.weight.shape == (16, 16, 3, 3)
    assert model.layer1[0].conv1.weight.abs().sum() > 0


def test_wrong_class_count_names_the_classifier() -> None:
    sd = build_zoo_model("resnet20", num_classes=100).state_dict()
    with pytest.raises(ModelError) as err:
        load_state_dict_into(build_zoo_model("resnet20"), sd)
    msg = str(err.value)
    assert "fc.weight has shape (100, 64) in the file but (10, 64)" in msg
    assert "fc.bias has shape (100,)" in msg


def test_missing_and_extra_keys_are_named() -> None:
    model = build_zoo_model("resnet20")
    sd = model.state_dict()
    del sd["layer2.0.shortcut.0.weight"]
    sd["layer4.0.conv1.weight"] = torch.zeros(1)
    with pytest.raises(ModelError) as err:
        load_state_dict_into(model, sd)
    msg = str(err.value)
    assert "missing from the file: layer2.0.shortcut.0.weight" in msg
    assert "not in resnet20 (10 classes, 3x32x32): layer4.0.conv1.weight" in msg


def test_data_parallel_prefix_gets_a_hint() -> None:
    model = build_zoo_model("small_cnn")
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}
    with pytest.raises(ModelError) as err:
        load_state_dict_into(model, sd)
    assert "module." in err.value.hint


def test_non_tensor_entries_are_refused() -> None:
    model = build_zoo_model("small_cnn")
    sd = dict(model.state_dict())
    sd["epoch"] = 3  # type: ignore[assignment]
    with pytest.raises(ModelError, match="epoch"):
        load_state_dict_into(model, sd)


def test_plain_module_is_described_by_class_name() -> None:
    model = nn.Linear(4, 2)
    with pytest.raises(ModelError, match=r"weight has shape \(3, 4\) in the file but \(2, 4\) in the Linear"):
        load_state_dict_into(model, {"weight": torch.zeros(3, 4), "bias": torch.zeros(2)})
