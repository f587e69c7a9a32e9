"""Hardware targets: registry and validation, the PyTorch / ONNX Runtime / analytic backends, ONNX export,
timeouts, and the device lock that keeps two measurements from timing each other's noise."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import compression.targets as targets
from compression.errors import PolicyError, TargetError
from compression.targets import (
    LatencyTable,
    TargetSpec,
    bench_model,
    extract_workloads,
    get_target,
    load_targets_file,
    make_backend,
    register_target,
    validate_target,
)
from compression.targets.onnx_io import export_onnx
from compression.targets.workloads import build_workload_module

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ models
class Block(nn.Module):
    """ResNet basic block whose inner width (``mid``) is what channel pruning shrinks."""

    def __init__(self, cin: int, mid: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, mid, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class SmallResNet(nn.Module):
    """Stem, two stages of two blocks, pooling, linear head; ``mids`` are the four blocks' inner widths."""

    def __init__(
        self, mids: tuple[int, int, int, int] = (16, 16, 32, 32), width: int = 16, inplace: bool = True
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=inplace)
        self.layer1 = nn.Sequential(Block(width, mids[0], width), Block(width, mids[1], width))
        self.layer2 = nn.Sequential(Block(width, mids[2], 2 * width, 2), Block(2 * width, mids[3], 2 * width))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, 10)
        g = torch.Generator().manual_seed(0)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                with torch.no_grad():
                    m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                    m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def small_input(batch: int = 1) -> torch.Tensor:
    return torch.randn((batch, 3, 16, 16), generator=torch.Generator().manual_seed(0))


def layer_names(module: nn.Module) -> list[str]:
    return [w.name for w in extract_workloads(module, small_input()) if w.is_layer]


def unique_lock() -> str:
    return f"test-{uuid.uuid4().hex[:10]}"


@pytest.fixture(autouse=True)
def private_lock_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Device locks of these tests live in a private directory (child processes inherit it), so they
    neither wait for real measurements on this machine (a TVM tuning holds ``local-cpu`` for minutes) nor
    leave lock files behind."""
    monkeypatch.setenv("COMPRESSION_LOCK_DIR", str(tmp_path_factory.getbasetemp() / "locks"))


# one thread: the test suite runs beside other processes on 2 cores
TORCH_1 = {"name": "test-torch", "backend": "torch", "settings": {"threads": 1}}
ORT_1 = {"name": "test-ort", "backend": "onnxruntime", "settings": {"threads": 1}}


# ------------------------------------------------------------------------------------------ registry
def test_builtin_targets() -> None:
    ort = get_target("local-ort")
    assert (ort.backend, ort.settings["threads"]) == ("onnxruntime", 2)
    assert get_target("local-torch").backend == "torch"
    assert get_target("analytic").backend == "analytic"
    with pytest.raises(TargetError, match="unknown target 'nope'"):
        get_target("nope")


def test_local_tvm_is_a_tvm_target_or_a_clear_error() -> None:
    try:
        spec = get_target("local-tvm")
    except TargetError as exc:
        assert "TVM backend is not available" in str(exc)
    else:
        assert spec.backend == "tvm" and isinstance(spec.settings["target"], (dict, str))


def test_broken_tvm_does_not_break_other_targets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(targets, "tvm_backend", raising=False)
    monkeypatch.setitem(sys.modules, "compression.targets.tvm_backend", None)  # import now fails
    with pytest.raises(TargetError, match="TVM backend is not available"):
        get_target("local-tvm")
    assert make_backend("local-ort").check()["reachable"]
    assert {s.name for s in targets.list_targets()} >= {"local-ort", "local-torch", "analytic"}


@pytest.mark.parametrize(
    "desc, message",
    [
        ({"name": "x", "backend": "cuda-magic"}, "unknown backend"),
        ({"name": "x", "backend": "torch", "colour": "red"}, "unknown target fields"),
        ({"name": "bad name!", "backend": "torch"}, "invalid target name"),
        ({"name": "x", "backend": "torch", "settings": {"threads": 0}}, "threads=0 is out of range"),
        ({"name": "x", "backend": "torch", "settings": {"threads": "2"}}, "threads must be an integer"),
        ({"name": "x", "backend": "torch", "settings": {"threads": 4096}}, "threads=4096 is out of range"),
        ({"name": "x", "backend": "torch", "settings": {"thread": 2}}, "unknown torch settings"),
        ({"name": "x", "backend": "torch", "settings": [1, 2]}, "settings must be an object"),
        ({"name": "x", "backend": "torch", "round_to": 0}, "round_to=0 is out of range"),
        ({"name": "x", "backend": "torch", "round_to": 2.5}, "round_to must be an integer"),
        (
            {"name": "x", "backend": "onnxruntime", "settings": {"optimization": "max"}},
            "unknown optimization",
        ),
        ({"name": "x", "backend": "analytic", "settings": {"metric": "flops!"}}, "unknown analytic metric"),
        (
            {"name": "x", "backend": "tvm", "settings": {"rpc": {"host": "h", "port": 9190}}},
            "rpc is missing 'key'",
        ),
        (
            {"name": "x", "backend": "tvm", "settings": {"rpc": {"host": "h", "key": "rpi"}}},
            "rpc is missing 'port'",
        ),
        (
            {"name": "x", "backend": "tvm", "settings": {"rpc": {"host": "h", "port": 70000, "key": "k"}}},
            "rpc port=70000 is out of range",
        ),
        ({"name": "x", "backend": "tvm", "settings": {"target": {"mcpu": "x"}}}, 'needs a "kind"'),
        ({"name": "x", "backend": "torch", "settings": {"wait_s": -1}}, "wait_s must be a positive number"),
        ("local-ort", "must be an object"),
    ],
)
def test_invalid_target_descriptions_are_refused(desc: object, message: str) -> None:
    with pytest.raises(TargetError, match=message):
        validate_target(desc)  # type: ignore[arg-type]


def test_valid_remote_description_and_round_trip() -> None:
    d = {
        "name": "rpi4-farm",
        "backend": "tvm",
        "settings": {
            "target": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "num-cores": 4},
            "rpc": {"host": "tracker.lan", "port": 9190, "key": "rpi4", "timeout_s": 60},
            "threads": 4,
        },
        "round_to": 8,
        "description": "Raspberry Pi 4 behind the tracker",
    }
    spec = validate_target(d)
    assert spec.round_to == 8 and spec.settings["rpc"]["key"] == "rpi4"
    assert validate_target(spec.to_dict()) == spec


def test_targets_file(tmp_path: Path) -> None:
    name = f"file-ort-{uuid.uuid4().hex[:6]}"
    good = tmp_path / "targets.json"
    good.write_text(
        json.dumps({"targets": [{"name": name, "backend": "onnxruntime", "settings": {"threads": 1}}]})
    )
    specs = load_targets_file(good)
    assert [s.name for s in specs] == [name]
    assert get_target(name).settings == {"threads": 1}

    other = f"file-bad-{uuid.uuid4().hex[:6]}"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"name": other, "backend": "torch"}, {"name": "y", "backend": "nope"}]))
    with pytest.raises(TargetError, match=r"bad.json, target #2: .*unknown backend"):
        load_targets_file(bad)
    with pytest.raises(TargetError, match="unknown target"):
        get_target(other)  # nothing of an invalid file is registered
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(TargetError, match="not valid JSON"):
        load_targets_file(tmp_path / "broken.json")
    with pytest.raises(TargetError, match="built in"):
        register_target({"name": "local-ort", "backend": "torch"})


def test_yaml_targets_need_pyyaml(tmp_path: Path) -> None:
    p = tmp_path / "t.yaml"
    p.write_text(f"- name: yaml-{uuid.uuid4().hex[:6]}\n  backend: torch\n")
    try:
        import yaml  # noqa: F401
    except ImportError:
        with pytest.raises(TargetError, match="PyYAML is not installed"):
            load_targets_file(p)
    else:
        assert load_targets_file(p)[0].backend == "torch"


# ------------------------------------------------------------------------------------------ backends
def test_torch_backend_measures_a_small_resnet() -> None:
    spec = validate_target({**TORCH_1, "settings": {"threads": 1, "lock": unique_lock()}})
    m = make_backend(spec).measure(SmallResNet(), small_input(), warmup=3, repeats=20, timeout_s=60)
    assert m.backend == "torch" and m.target == "test-torch" and m.runs == 20 and m.batch == 1
    assert 0 < m.min_ms <= m.median_ms and m.std_ms >= 0 and m.details["threads"] == 1
    assert m.details["p10_ms"] <= m.details["p90_ms"]


def test_torch_backend_says_it_runs_float_for_quantized_plans() -> None:
    model = SmallResNet()
    bits = {n: (4, 4) for n in layer_names(model)}
    m = bench_model(model, small_input(), TORCH_1, warmup=1, repeats=5, bits=bits)
    assert m.details["bits_run"] == "float" and "bits affect the analytic cost only" in m.details["note"]


def test_ort_backend_float_and_int8() -> None:
    model = SmallResNet()
    x = small_input()
    f = bench_model(model, x, ORT_1, warmup=3, repeats=20)
    assert f.details["exporter"] == "torchscript" and f.details["onnx_max_abs_diff"] < 1e-4
    assert "int8_kernels" not in f.details and f.compile_s > 0

    names = layer_names(model)
    q = bench_model(model, x, ORT_1, warmup=3, repeats=20, bits={n: (8, 8) for n in names})
    assert set(q.details["bits_run"].values()) == {"int8"}
    # every conv and the linear layer really run as int8 kernels in ONNX Runtime's optimized graph
    assert q.details["int8_kernels"] >= len(names)
    assert q.details["optimized_ops"].get("Conv", 0) == 0
    assert q.median_ms > 0

    mixed = {names[0]: (4, 4), names[1]: (8, 32)}
    qm = bench_model(model, x, ORT_1, warmup=1, repeats=5, bits=mixed)
    assert qm.details["bits_run"][names[0]] == "int8"
    assert qm.details["bits_run"][names[1]].startswith("float")
    assert "no kernels below 8 bits" in qm.details["note"]


def test_bits_plan_naming_unknown_layers_is_refused() -> None:
    with pytest.raises(PolicyError, match="not convolution/linear layers"):
        bench_model(SmallResNet(), small_input(), ORT_1, repeats=1, bits={"no.such.layer": (8, 8)})


def test_pt2_model_on_torch_and_ort(tmp_path: Path) -> None:
    from compression.models import load_model

    model = SmallResNet(inplace=False)  # the .pt2 lifter refuses an in-place ReLU after a batch norm
    ep = torch.export.export(
        model, (small_input(2),), dynamic_shapes=({0: torch.export.Dim("batch", max=64)},)
    )
    torch.export.save(ep, tmp_path / "m.pt2")
    art = load_model(str(tmp_path / "m.pt2"))
    x = art.example_input()
    assert [w.name for w in extract_workloads(art.module, x) if w.is_layer] == layer_names(model)
    for target in (TORCH_1, ORT_1):
        m = bench_model(art.module, x, target, warmup=2, repeats=10)
        assert m.median_ms > 0
    q = bench_model(art.module, x, ORT_1, warmup=2, repeats=10, bits={n: (8, 8) for n in layer_names(model)})
    assert q.details["int8_kernels"] >= 10


def test_zoo_resnet20_on_every_local_target() -> None:
    zoo = pytest.importorskip("compression.models.zoo")
    model = zoo.build_zoo_model("resnet20").eval()
    x = torch.randn(1, 3, 32, 32)
    for target in (TORCH_1, ORT_1):
        m = bench_model(model, x, target, warmup=2, repeats=10)
        assert m.median_ms > 0 and m.runs == 10
    a = bench_model(model, x, "analytic")
    assert a.details["analytic"] and a.details["unit"] == "GBOPs"
    assert a.details["macs"] == pytest.approx(40.8e6, rel=0.01)  # ResNet-20 at 32x32: 40.8 MMACs


# ------------------------------------------------------------------------------------------ analytic
def test_analytic_agrees_with_compression_costs() -> None:
    from compression.costs import compute_costs
    from compression.models.graph import LayerGraph
    from compression.policy import LayerPolicy, Policy

    model = SmallResNet()
    graph = LayerGraph.build(model, (3, 16, 16), num_classes=10)
    names = layer_names(model)
    policy = Policy({names[0]: LayerPolicy(w_bits=4, a_bits=8), names[3]: LayerPolicy(w_bits=2, a_bits=2)})
    costs = compute_costs(graph, policy)
    m = bench_model(model, small_input(), "analytic", bits=policy)
    assert m.details["macs"] == costs.macs
    assert m.details["bops"] == costs.bops
    assert m.median_ms == pytest.approx(costs.bops / 1e9)
    assert m.runs == 0 and "not a time" in m.details["note"]
    macs = bench_model(
        model, small_input(), {"name": "a-macs", "backend": "analytic", "settings": {"metric": "macs"}}
    )
    assert macs.details["unit"] == "MMACs" and macs.median_ms == pytest.approx(costs.macs / 1e6)


# ------------------------------------------------------------------------------------------ workloads
def test_workloads_fuse_bn_and_activation_and_keep_the_rest() -> None:
    ws = extract_workloads(SmallResNet(), small_input())
    by_name = {w.name: w for w in ws}
    assert by_name["conv1"].fused == ("bn", "relu")  # nn.ReLU(inplace=True) after the stem
    assert by_name["layer1.0.conv1"].fused == ("bn", "relu")  # functional relu
    # conv2's batch norm output also feeds the residual addition's relu? no: bn2 -> add, so only bn fuses
    assert by_name["layer1.0.conv2"].fused == ("bn",)
    assert by_name["layer2.0.shortcut.0"].stride == (2, 2) and by_name["layer2.0.shortcut.0"].kernel == (1, 1)
    ops = [w.op for w in ws if w.kind == "op"]
    assert ops.count("aten.add.Tensor") == 4 and "aten.adaptive_avg_pool2d.default" in ops
    assert by_name["fc"].kind == "linear" and by_name["fc"].in_channels == 32
    # identical blocks share keys; different names
    assert by_name["layer1.0.conv1"].key == by_name["layer1.1.conv1"].key
    for w in ws:  # every workload can be rebuilt and run
        module, inputs, _ = build_workload_module(w)
        with torch.no_grad():
            out = module(*inputs)
        assert tuple(out.shape) == w.out_shape


# ------------------------------------------------------------------------------------------ ONNX export
def _lifted(model: nn.Module) -> nn.Module:
    from compression.models.pt2 import lift_exported_program

    ep = torch.export.export(
        model, (small_input(2),), dynamic_shapes=({0: torch.export.Dim("batch", max=64)},)
    )
    return lift_exported_program(ep)[0]


@pytest.mark.parametrize("kind", ["plain", "lifted"])
def test_export_onnx_matches_torch_with_a_dynamic_batch(kind: str, tmp_path: Path) -> None:
    import onnxruntime as ort

    model = SmallResNet() if kind == "plain" else _lifted(SmallResNet(inplace=False))
    res = export_onnx(model, small_input(), tmp_path / "m.onnx")
    assert res.exporter == "torchscript" and res.max_abs_diff is not None and res.max_abs_diff < 1e-4
    sess = ort.InferenceSession(str(res.path), providers=["CPUExecutionProvider"])
    x = small_input(5)
    got = sess.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), atol=1e-4)


@pytest.mark.slow
def test_export_onnx_falls_back_to_dynamo_for_exported_program_modules(tmp_path: Path) -> None:
    ep = torch.export.export(
        SmallResNet(), (small_input(2),), dynamic_shapes=({0: torch.export.Dim("batch", max=64)},)
    )
    res = export_onnx(ep.module(), small_input(), tmp_path / "m.onnx")
    assert res.exporter == "dynamo" and res.attempts[0].startswith("torchscript:")
    assert res.max_abs_diff < 1e-4


# ------------------------------------------------------------------------------------------ timeouts
class Sleeper(nn.Module):
    """A model that takes ``delay`` seconds per call (a device that does not answer in time)."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.delay)
        return x


def test_a_target_that_does_not_answer_fails_within_its_timeout() -> None:
    target = {"name": "stuck", "backend": "torch", "settings": {"threads": 1, "lock": unique_lock()}}
    t0 = time.monotonic()
    with pytest.raises(TargetError, match="did not answer within its timeout of 1 s"):
        bench_model(Sleeper(4.0), small_input(), target, warmup=1, repeats=5, timeout_s=1.0)
    assert time.monotonic() - t0 < 2.0


def test_a_measurement_too_slow_for_its_timeout_fails_early() -> None:
    target = {"name": "slow", "backend": "torch", "settings": {"threads": 1, "lock": unique_lock()}}
    t0 = time.monotonic()
    with pytest.raises(TargetError, match="would take about"):
        bench_model(Sleeper(0.05), small_input(), target, warmup=2, repeats=1000, timeout_s=3.0)
    assert time.monotonic() - t0 < 2.5


def test_a_busy_device_is_a_clear_error() -> None:
    from compression.targets.measure import device_lock

    lock = unique_lock()
    target = {"name": "busy", "backend": "torch", "settings": {"threads": 1, "lock": lock, "wait_s": 0.3}}
    with device_lock(lock):
        with pytest.raises(TargetError, match="is busy"):
            bench_model(SmallResNet(), small_input(), target, repeats=2, timeout_s=5)


# ------------------------------------------------------------------------------------------ device lock
_LOCK_CHILD = textwrap.dedent(
    """
    import importlib.util, json, sys, time
    from pathlib import Path

    # load the timing module on its own: the package would import torch, which is slow to start
    spec = importlib.util.spec_from_file_location("measure", "compression/targets/measure.py")
    measure = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(measure)
    assert "torch" not in sys.modules

    ready, me, device, out = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    (ready / me).touch()
    while len(list(ready.iterdir())) < 2:  # start both measurements together
        time.sleep(0.005)
    stamps = []

    def prepare():
        stamps.append(time.time())

        def run():
            time.sleep(0.002)
            stamps.append(time.time())

        return run, {}

    stats, _, _ = measure.measure_locked(prepare, what="test", device=device, warmup=5, repeats=80, timeout_s=60)
    Path(out).write_text(json.dumps({"start": stamps[0], "end": stamps[-1], "waited": stats["lock_wait_s"]}))
    """
)


def test_device_lock_serialises_two_processes(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    ready.mkdir()
    device = unique_lock()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _LOCK_CHILD, str(ready), f"p{i}", device, str(tmp_path / f"p{i}.json")],
            cwd=REPO,
        )
        for i in range(2)
    ]
    for p in procs:
        assert p.wait(timeout=120) == 0
    a, b = (json.loads((tmp_path / f"p{i}.json").read_text()) for i in range(2))
    first, second = sorted((a, b), key=lambda r: r["start"])
    assert first["end"] <= second["start"], "the two measurements overlapped"
    assert second["waited"] > 0.05  # the second really queued behind the first


def test_onnx_runtime_rounds_channels_to_its_kernel_block_unless_told() -> None:
    """ONNX Runtime's blocked float kernels need channel counts in multiples of its block (16 floats with AVX-512, 8
    with AVX2); other channel counts made ResNet-20 slower than the unpruned model (docs/targets.md)."""
    from compression.targets.registry import default_round_to, ort_block_channels

    assert ort_block_channels("processor : 0\nflags : fpu sse2 avx2 avx512f avx512dq\n") == 16
    assert ort_block_channels("processor : 0\nflags : fpu sse2 avx avx2 fma\n") == 8
    assert ort_block_channels("no flags line\n") == 8
    here = ort_block_channels()
    assert here in (8, 16) and default_round_to("onnxruntime") == here
    assert default_round_to("tvm") == default_round_to("torch") == 1
    assert get_target("local-ort").round_to == here
    assert validate_target({"name": "x", "backend": "onnxruntime"}).round_to == here
    assert validate_target({"name": "x", "backend": "onnxruntime", "round_to": None}).round_to == here
    assert (
        validate_target({"name": "x", "backend": "onnxruntime", "round_to": 4}).round_to == 4
    )  # the user's own
    assert validate_target({"name": "x", "backend": "torch"}).round_to == 1


def test_spec_objects_are_revalidated() -> None:
    with pytest.raises(TargetError, match="round_to"):
        get_target(TargetSpec("x", "torch", {}, round_to=0))


def test_table_rejects_unknown_statistic(tmp_path: Path) -> None:
    with pytest.raises(TargetError, match="unknown table statistic"):
        LatencyTable(TORCH_1, tmp_path / "t.sqlite", statistic="p99")


def test_a_tvm_table_sums_each_entrys_fastest_run(tmp_path: Path) -> None:
    """TVM's entries are read by their minimum (a disturbance moves a short measurement's median); other backends'
    by their median; an explicit statistic wins. A statistic other than the median is part of the table's
    fingerprint: calibrations stored with a table were fitted on it."""
    pytest.importorskip("tvm")
    from compression.targets.base import Measurement

    tvm_spec = {"name": "tvm-min", "backend": "tvm", "settings": {}}
    table = LatencyTable(tvm_spec, tmp_path / "t.sqlite")
    assert table.statistic == "min" and table.fingerprint_data["table_statistic"] == "min"
    assert LatencyTable(TORCH_1, tmp_path / "u.sqlite").statistic == "median"
    median = LatencyTable(tvm_spec, tmp_path / "v.sqlite", statistic="median")
    assert median.statistic == "median" and "table_statistic" not in median.fingerprint_data
    assert median.fingerprint != table.fingerprint  # their calibrations are fitted on different statistics
    w = table.normalize(table.required(SmallResNet(), small_input())[0])
    table._store(w, Measurement("tvm-min", "tvm", 2.0, 1.5, 0.2, 1.0, 40, 5, 0.0))
    assert table.lookup(w) == 1.0


# ------------------------------------------------------------------------------------------ side by side
def test_time_interleaved_alternates_the_models_and_rotates_their_order() -> None:
    from compression.targets.measure import time_interleaved

    calls: list[str] = []

    def run(label: str, own_ms: float | None = None):
        def f():
            calls.append(label)
            return own_ms

        return f

    times = time_interleaved([run("a"), run("b"), run("c", 7.5)], warmup=1, repeats=2, blocks=2)
    # warm-up, then each repeat runs every model once, the order rotating
    assert calls == ["a", "b", "c"] + ["a", "b", "c", "b", "c", "a"] * 2
    assert [len(b) for per in times for b in per] == [2] * 6
    assert times[2] == [[7.5, 7.5], [7.5, 7.5]]  # a run that reports its own time (a device timer)
    assert all(t >= 0 for b in times[0] for t in b)

    calls.clear()
    times = time_interleaved([run("a"), run("b")], warmup=0, repeats=3, blocks=1, chunk=2)
    # turns of 2 timed runs (the last one shorter), each after one untimed run that settles the device
    assert calls == ["a"] * 3 + ["b"] * 3 + ["b"] * 2 + ["a"] * 2
    assert [len(per[0]) for per in times] == [3, 3]
    with pytest.raises(TargetError, match="bad timing protocol"):
        time_interleaved([], warmup=0, repeats=1, blocks=1)


ORT_1_NO_SPIN = {**ORT_1, "settings": {"threads": 1, "spinning": False}}


@pytest.mark.parametrize("target", [TORCH_1, ORT_1_NO_SPIN, ORT_1])
def test_compare_models_times_models_side_by_side(target: dict) -> None:
    big, small = SmallResNet(), SmallResNet(mids=(4, 4, 8, 8))
    bits = None
    if target["backend"] == "onnxruntime":
        bits = [None, {n: (8, 8) for n in layer_names(small)}]
    spec = {**target, "settings": {**target["settings"], "lock": unique_lock()}}
    c = targets.compare_models([big, small], small_input(), spec, bits=bits, warmup=2, repeats=10, blocks=3)
    if target is ORT_1:
        # ONNX Runtime's spinning pool threads read the original slow beside its copies: one model at a time
        assert c.method == "rounds" and len(c.block_ratios[1]) == 3 and c.ratios[0] == 1.0
        assert set(c.measurements[1].details["bits_run"].values()) == {"int8"}
        return
    assert c.method == "interleaved" and c.ratios[0] == 1.0
    assert len(c.block_ms) == 2 and all(len(b) == 3 for b in c.block_ms + c.block_ratios)
    for i in (0, 1):
        m = c.measurements[i]
        assert m.runs == 30 and m.details["blocks"] == 3 and 0 < m.min_ms <= m.median_ms
        # a blocked measurement's minimum is its blocks' median minimum (as a table calibrates), not the lowest run
        blocks = m.details["block_min_ms"]
        assert len(blocks) == 3 and min(blocks) == m.min_ms
        assert m.details["busy_cores"] >= 0  # timed on this machine: other processes' CPU use meanwhile
        assert m.statistic("min") == pytest.approx(sorted(blocks)[1]) and m.statistic("median") == m.median_ms
        assert c.block_ratios[i] == pytest.approx(
            [v / r for v, r in zip(c.block_ms[i], c.block_ms[0], strict=True)]
        )
    assert sorted(c.block_ratios[1])[1] == pytest.approx(c.ratios[1]) and c.spread(1) >= 0
    if bits:
        assert set(c.measurements[1].details["bits_run"].values()) == {"int8"}
        assert "bits_run" not in c.measurements[0].details
    assert not big.training and not small.training


def test_compare_models_falls_back_to_rounds_where_models_cannot_alternate() -> None:
    # the analytic target has no timer to alternate (a device behind an RPC tracker neither): model by model
    big, small = SmallResNet(), SmallResNet(mids=(4, 4, 8, 8))
    c = targets.compare_models([big, small], small_input(), "analytic", blocks=2)
    assert c.method == "rounds" and len(c.block_ms[1]) == 2
    assert 0 < c.ratios[1] < 1  # BOPs: the narrower blocks cost less
    assert len(c.measurements[1].details["block_min_ms"]) == 2  # every round's minimum, for ``statistic``


def test_a_measurement_reads_the_statistic_a_table_sums() -> None:
    from compression.targets.base import Measurement

    one = Measurement("t", "torch", 2.0, 1.8, 0.3, 1.2, 50, 5, 0.0)
    assert (one.statistic("median"), one.statistic("min"), one.statistic("mean")) == (1.8, 1.2, 2.0)
    blocked = Measurement(
        "t", "torch", 2.0, 1.8, 0.3, 0.9, 150, 5, 0.0, details={"block_min_ms": [1.3, 0.9, 1.1]}
    )
    assert blocked.statistic("min") == 1.1  # the median block's minimum: 0.9 is the luckiest of 150 runs
    with pytest.raises(ValueError, match="unknown statistic"):
        one.statistic("p90")


def test_compare_models_that_does_not_answer_fails_within_its_timeout() -> None:
    target = {"name": "stuck", "backend": "torch", "settings": {"threads": 1, "lock": unique_lock()}}
    t0 = time.monotonic()
    with pytest.raises(TargetError, match="did not answer within its timeout of 1 s"):
        targets.compare_models([SmallResNet(), Sleeper(4.0)], small_input(), target, repeats=5, timeout_s=1.0)
    assert time.monotonic() - t0 < 2.0
    with pytest.raises(TargetError, match="2 bit plans for 1 models"):
        targets.compare_models([SmallResNet()], small_input(), TORCH_1, bits=[None, None])
