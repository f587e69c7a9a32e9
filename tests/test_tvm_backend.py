"""The TVM backend: local measurements, schedules, settings, and remote devices through an RPC tracker.

The RPC tests start a real ``tvm.exec.rpc_tracker`` and a ``tvm.exec.rpc_server`` registered under a key
on loopback (free ports), measure through them end to end, and check that every way a device can fail to
answer ends in a ``TargetError`` within the timeout.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("tvm")

from compression.errors import ModelError, TargetError  # noqa: E402
from compression.targets.base import TargetSpec  # noqa: E402
from compression.targets.registry import validate_target  # noqa: E402
from compression.targets.tvm_backend import (  # noqa: E402
    TvmBackend,
    default_local_target,
    host_cpu_name,
    make_backend,
    target_fingerprint,
    validate_settings,
)
from compression.targets.tvm_loopback import LoopbackFarm, free_port, kill, wait_for_server  # noqa: E402

pytestmark = pytest.mark.tvm

REPO = Path(__file__).resolve().parents[1]


def _spec(name: str = "tvm-test", **settings) -> TargetSpec:
    return TargetSpec(name, "tvm", settings)


def _conv_block(cin: int = 8, cout: int = 16) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())
    with torch.no_grad():  # non-trivial batch-norm statistics, so folding them wrongly would show
        m[1].running_mean.uniform_(-0.5, 0.5)
        m[1].running_var.uniform_(0.5, 2.0)
    return m.eval()


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv(x)) + x)
        return self.fc(y.mean(dim=(2, 3)))


def test_a_tvm_measurement_leaves_every_thread_free_to_use_every_core() -> None:
    """TVM pins the threads that run a module to cores by default; ONNX Runtime sessions made later in the same
    process (a worker measures both) inherited the pin and ran 1.8x slower (0.214 -> 0.39 ms on ResNet-20). In a
    fresh process without any TVM setting: after a TVM measurement no thread is pinned narrower than the process."""
    script = textwrap.dedent(
        """
        import glob, os, torch
        from torch import nn
        from compression.targets import bench_model
        from compression.targets.base import TargetSpec
        allowed = os.sched_getaffinity(0)
        m = nn.Sequential(nn.Conv2d(8, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1)).eval()
        bench_model(m, torch.randn(1, 8, 32, 32), TargetSpec("tvm-pin", "tvm", {}))
        pinned = []
        for task in glob.glob(f"/proc/{os.getpid()}/task/*"):
            tid = int(task.rsplit("/", 1)[1])
            try:
                if os.sched_getaffinity(tid) != allowed:
                    pinned.append(tid)
            except OSError:
                pass  # the thread ended
        print("THREADS", len(glob.glob(f"/proc/{os.getpid()}/task/*")), "PINNED", len(pinned))
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("TVM_BIND")}
    env["PYTHONPATH"] = str(REPO)
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one core: nothing to pin")
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600, cwd=str(REPO)
    )
    assert out.returncode == 0, out.stderr[-2000:]
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("THREADS"))
    threads, pinned = int(line.split()[1]), int(line.split()[3])
    assert threads > 1 and pinned == 0, line


# ------------------------------------------------------------------------------------------ targets, settings
def test_default_local_target_names_the_host_cpu() -> None:
    import tvm

    t = default_local_target()
    assert t["kind"] == "llvm"
    assert 1 <= t["num-cores"] <= 2
    cpu = host_cpu_name()
    if cpu is not None:
        from tvm.target import codegen

        assert t["mcpu"] == cpu == str(codegen.llvm_get_system_cpu())
    tvm.target.Target(t)  # TVM accepts it


def test_target_fingerprint_is_stable_and_tells_targets_apart() -> None:
    a = {"kind": "llvm", "mcpu": "skylake-avx512", "num-cores": 2}
    assert target_fingerprint(a) == target_fingerprint(dict(a))
    assert target_fingerprint(a).startswith("llvm-skylake-avx512-2c-")
    assert target_fingerprint(a) != target_fingerprint({**a, "num-cores": 4})
    arm = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72", "num-cores": 4}
    assert target_fingerprint(arm).startswith("llvm-aarch64-cortex-a72-4c-")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"bogus": 1}, "unknown tvm settings"),
        ({"target": {"kind": "no-such-kind"}}, "TVM does not accept the target"),
        ({"target": {"kind": "llvm", "num-cores": "two"}}, "TVM does not accept the target"),
        ({"target": {"kind": "cuda"}}, "cannot run on this machine"),
        ({"tuning": {"mode": "fast"}}, "unknown tuning mode"),
        ({"tuning": {"trials_per_task": 0}}, "trials_per_task"),
        ({"tuning": {"tials": 3}}, "unknown tuning fields"),
        ({"rpc": {"host": "h", "port": 9190}}, "missing 'key'"),
        ({"rpc": {"host": "h", "port": 9190, "key": "k", "timeout_s": -1}}, "timeout_s"),
        ({"threads": 0}, "threads"),
        ({"min_run_ms": 0}, "min_run_ms"),
    ],
)
def test_invalid_settings_are_refused_clearly(settings: dict, message: str) -> None:
    with pytest.raises(TargetError, match=message):
        validate_settings("x", settings)
    # the registry asks the backend too, so the same description is refused there
    with pytest.raises(TargetError):
        validate_target({"name": "x", "backend": "tvm", "settings": settings})


def test_cross_target_without_rpc_is_refused_at_measure_time() -> None:
    backend = make_backend(
        _spec(target={"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72", "num-cores": 4})
    )
    with pytest.raises(TargetError, match="has no rpc device"):
        backend.check()


def test_local_check_reports_the_device() -> None:
    info = make_backend(_spec()).check()
    assert info["reachable"] is True and info["device"] == "local"
    assert info["target"]["kind"] == "llvm" and info["llvm_version"] >= 10


# ------------------------------------------------------------------------------------------ measuring
def test_measure_conv_block_with_default_schedules() -> None:
    backend = make_backend(_spec())
    m = backend.measure(_conv_block(), torch.randn(1, 8, 16, 16), warmup=3, repeats=20, timeout_s=120)
    d = m.details
    assert d["tuning"] == "default schedules" and d["representative"] is True
    assert d["unscheduled"] == 0 and d["default_schedules"] == d["functions"] >= 1
    assert d["max_abs_diff"] < 1e-3
    assert m.runs == 20 and m.warmup == 3 and m.batch == 1
    assert 0 < m.min_ms <= m.median_ms and m.compile_s > 0
    assert d["calls_per_run"] >= 1 and d["dtype"] == "float32"


def test_measure_graph_module_with_aten_calls_and_tuple_input() -> None:
    gm = torch.fx.symbolic_trace(_Residual().eval())
    x = torch.randn(2, 4, 8, 8)
    m = make_backend(_spec()).measure(gm, (x,), warmup=2, repeats=10, timeout_s=120)
    assert m.batch == 2 and m.details["max_abs_diff"] < 1e-3 and m.details["unscheduled"] == 0


def test_two_input_op_module() -> None:
    class Add(nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return torch.relu(a + b)

    a, b = torch.randn(1, 8, 8, 8), torch.randn(1, 8, 8, 8)
    m = make_backend(_spec()).measure(Add(), (a, b), warmup=2, repeats=10, timeout_s=60)
    assert m.median_ms > 0 and m.details["max_abs_diff"] == 0.0


def test_untuned_code_is_marked_not_representative() -> None:
    backend = make_backend(_spec(tuning={"mode": "untuned"}))
    m = backend.measure(_conv_block(4, 4), torch.randn(1, 4, 8, 8), warmup=1, repeats=5, timeout_s=60)
    assert m.details["tuning"] == "untuned" and m.details["representative"] is False


def test_default_schedules_beat_naive_lowering() -> None:
    """The default schedules are the reason TVM numbers are usable; a regression to naive loops shows here."""
    model, x = _conv_block(32, 32), torch.randn(1, 32, 32, 32)
    fast = make_backend(_spec()).measure(model, x, warmup=3, repeats=15, timeout_s=120)
    slow = make_backend(_spec(tuning={"mode": "untuned"})).measure(
        model, x, warmup=1, repeats=5, timeout_s=120
    )
    # measured ~10x on an idle 2-core machine; min times and a 3x bar keep a busy machine from flaking
    assert slow.min_ms > 3 * fast.min_ms, (fast.min_ms, slow.min_ms)


def test_bits_plan_is_recorded_as_float32() -> None:
    backend = make_backend(_spec())
    assert backend.bits_run(4, 8) == (32, 32)
    m = backend.measure(
        _conv_block(4, 4), torch.randn(1, 4, 8, 8), warmup=1, repeats=3, timeout_s=60, bits={"0": (4, 8)}
    )
    assert m.details["bits_run"] == {"0": "float32"} and "float32" in m.details["note"]


def test_unexportable_model_is_a_model_error() -> None:
    class DataDependent(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2 if x.sum() > 0 else x

    with pytest.raises(ModelError, match="torch.export"):
        make_backend(_spec()).measure(DataDependent(), torch.ones(1, 3), warmup=1, repeats=2, timeout_s=60)


class _Add(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.relu(a + b)


class _DataDependent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.sum() > 0 else x


def test_modules_imported_together_are_cut_into_what_each_imports_alone() -> None:
    """``import_many`` shares one export and import among many modules; each function it cuts out must be the
    program importing that module alone gives (same operations, constants and result tuple), or a batched table
    entry would time other code."""
    import tvm

    from compression.targets.tvm_backend import _reference
    from compression.targets.tvm_compile import export_program, import_many, import_relax

    items = [
        (_conv_block(4, 8), (torch.randn(1, 4, 8, 8),)),
        (_Add(), (torch.randn(1, 8, 4, 4), torch.randn(1, 8, 4, 4))),
        (nn.Sequential(nn.Flatten(), nn.Linear(32, 5)).eval(), (torch.randn(2, 2, 4, 4),)),
    ]
    mod, names = import_many(items, [len(_reference(m, x)[0]) for m, x in items])
    assert names == ["w0", "w1", "w2"] and "main" not in [gv.name_hint for gv in mod.get_global_vars()]
    for (module, inputs), name in zip(items, names, strict=True):
        alone = import_relax(export_program(module, inputs))["main"]
        tvm.ir.assert_structural_equal(
            mod[name].without_attr("global_symbol"), alone.without_attr("global_symbol")
        )


def test_a_batch_is_compiled_once_and_each_workload_checked_and_timed_alone() -> None:
    backend = make_backend(_spec())
    items = [
        (_conv_block(4, 8), torch.randn(1, 4, 8, 8), None),
        (_Add(), (torch.randn(1, 8, 4, 4), torch.randn(1, 8, 4, 4)), None),
        (_conv_block(8, 8), torch.randn(1, 8, 8, 8), {"0": (4, 8)}),
    ]
    results = backend.measure_many(items, warmup=2, repeats=10, timeout_s=60)
    assert all(r.__class__.__name__ == "Measurement" for r in results), results
    for r in results:
        d = r.details
        assert d["compiled_with"] == 3 and d["max_abs_diff"] < 1e-3 and d["representative"] is True
        assert r.runs == 10 and 0 < r.min_ms <= r.median_ms and r.compile_s > 0
    assert results[1].details["max_abs_diff"] == 0.0  # the addition, exactly
    assert results[2].details["bits_run"] == {"0": "float32"} and "bits_run" not in results[0].details
    # a larger layer measures slower than a smaller one, though both came out of one build
    big = backend.measure_many(
        [
            (_conv_block(32, 32), torch.randn(1, 32, 16, 16), None),
            (_conv_block(4, 4), torch.randn(1, 4, 4, 4), None),
        ],
        warmup=2,
        repeats=10,
        timeout_s=60,
    )
    assert big[0].min_ms > 3 * big[1].min_ms, (big[0].min_ms, big[1].min_ms)


def test_a_workload_that_cannot_compile_does_not_spoil_its_batch() -> None:
    backend = make_backend(_spec())
    items = [
        (_conv_block(4, 8), torch.randn(1, 4, 8, 8), None),
        (_DataDependent(), torch.ones(1, 3), None),
        (_Add(), (torch.randn(1, 8, 4, 4), torch.randn(1, 8, 4, 4)), None),
    ]
    good, bad, also_good = backend.measure_many(items, warmup=1, repeats=3, timeout_s=60)
    assert isinstance(bad, ModelError) and "torch.export" in str(bad)
    # measured one by one after the batch failed to export: each on its own
    assert good.median_ms > 0 and also_good.median_ms > 0 and "compiled_with" not in good.details


def test_a_latency_table_on_tvm_fills_a_model_in_batches(tmp_path: Path) -> None:
    from compression.models.zoo import build_zoo_model
    from compression.targets import LatencyTable

    model = build_zoo_model("resnet20", num_classes=10, in_channels=1, input_size=8).eval()
    x = torch.randn(1, 1, 8, 8)
    table = LatencyTable(_spec(), tmp_path / "t.sqlite", warmup=2, repeats=5)
    required = table.required(model, x)
    assert table.fill(model, x) == len(required) == len(table.entries()) > 20
    sizes = [e["details"]["compiled_with"] for e in table.entries()]
    assert min(sizes) > 1 and all(e["details"]["max_abs_diff"] < 1e-3 for e in table.entries())
    total, _, missing = table.predict(model, x)
    assert total > 0 and not missing
    assert table.fill(model, x) == 0  # all there: nothing compiled again


def test_all_resnet20_functions_get_default_schedules() -> None:
    from compression.models.zoo import build_zoo_model
    from compression.targets.tvm_compile import compile_module
    from compression.targets.tvm_schedules import schedule_module

    backend = make_backend(_spec())
    mod = compile_module(build_zoo_model("resnet20"), (torch.randn(1, 3, 32, 32),), backend.target)
    _, counts = schedule_module(mod, backend.target)
    # 19 convolutions fuse with their batch norm, ReLU and residual add into 13 distinct conv functions
    assert counts == {"anchor": 13, "fallback": 1, "unscheduled": 0}


@pytest.mark.parametrize("kernel", [3, 1])
def test_strided_convolutions_get_the_tiled_schedule_and_stay_exact(kernel: int) -> None:
    """Stride-2 convolutions are de-interleaved (not left to the fallback rule, which is 6x slower)."""
    from compression.targets.tvm_compile import compile_module
    from compression.targets.tvm_schedules import schedule_module

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, kernel, stride=2, padding=kernel // 2), nn.BatchNorm2d(16)).eval()
    x = torch.randn(1, 8, 16, 16)
    backend = make_backend(_spec())
    _, counts = schedule_module(compile_module(model, (x,), backend.target), backend.target)
    assert counts["anchor"] == 1 and counts["unscheduled"] == 0
    m = backend.measure(model, x, warmup=1, repeats=3, timeout_s=60)
    assert m.details["max_abs_diff"] < 1e-4


def _host_has(flag: str) -> bool:
    try:
        return f" {flag}" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def _scheduled_loops(model: nn.Module, x: torch.Tensor, target: dict) -> tuple[list[int], list[int]]:
    """(unrolled extents, vectorized extents) of the scheduled convolution of ``model`` for ``target``."""
    import re

    from compression.targets.tvm_compile import compile_module
    from compression.targets.tvm_schedules import schedule_module

    backend = make_backend(_spec(target=target))
    mod, counts = schedule_module(compile_module(model, (x,), backend.target), backend.target)
    assert counts["anchor"] == 1 and counts["unscheduled"] == 0
    text = "".join(f.script() for gv, f in mod.functions_items() if "conv2d" in gv.name_hint)
    unrolled = [int(n) for n in re.findall(r"T\.unroll\(T\.int64\((\d+)\)\)", text)]
    vectorized = [int(n) for n in re.findall(r"T\.vectorized\(T\.int64\((\d+)\)\)", text)]
    return unrolled, vectorized


def test_vector_width_and_register_tile_follow_the_instruction_set() -> None:
    """TVM's LLVM query says 512 bits for every x86 CPU; AVX2 has 256-bit registers, 16 of them; AVX-512 32."""
    import tvm

    from compression.targets.tvm_schedules import register_tile, vector_lanes

    def target(mcpu: str, triple: str | None = None):
        return tvm.target.Target({"kind": "llvm", "mcpu": mcpu, **({"mtriple": triple} if triple else {})})

    for mcpu in ("haswell", "znver3"):
        assert (vector_lanes(target(mcpu)), register_tile(target(mcpu))) == (8, (4, 2))
    for mcpu in ("skylake-avx512", "znver4", "emeraldrapids"):
        assert (vector_lanes(target(mcpu)), register_tile(target(mcpu))) == (16, (4, 4))
    arm = target("cortex-a72", "aarch64-linux-gnu")
    assert (vector_lanes(arm), register_tile(arm)) == (4, (1, 8))


def test_x86_convolutions_are_tiled_over_channels_and_rows() -> None:
    """At batch 1 the batch loop is gone from the scheduled block: the tile must still block output channels
    (it blocked rows twice over, with vectors of 16 floats, before session 17) and fit the registers: 8
    accumulators of AVX2's 16 registers, 16 of AVX-512's 32."""
    x = torch.randn(1, 8, 16, 16)
    unrolled, vectorized = _scheduled_loops(_conv_block(8, 16), x, {"kind": "llvm", "mcpu": "haswell"})
    assert sorted(set(unrolled)) == [2, 4] and set(vectorized) == {8}
    unrolled, vectorized = _scheduled_loops(_conv_block(8, 16), x, {"kind": "llvm", "mcpu": "skylake-avx512"})
    assert sorted(set(unrolled)) == [4] and set(vectorized) == {16}
    # a pruned width that 4 does not divide: the largest divisor instead, no tail
    unrolled, _ = _scheduled_loops(_conv_block(8, 6), x, {"kind": "llvm", "mcpu": "haswell"})
    assert sorted(set(unrolled)) == [2, 3]


@pytest.mark.parametrize("cout", [16, 13, 24])
@pytest.mark.parametrize("mcpu, feature", [("haswell", "avx2"), ("skylake-avx512", "avx512f")])
def test_x86_tiled_convolutions_stay_exact(mcpu: str, feature: str, cout: int) -> None:
    if not _host_has(feature):
        pytest.skip(f"runs {feature} code")
    backend = make_backend(_spec(target={"kind": "llvm", "mcpu": mcpu}, threads=2))
    m = backend.measure(_conv_block(8, cout), torch.randn(1, 8, 16, 16), warmup=1, repeats=3, timeout_s=60)
    assert m.details["max_abs_diff"] < 1e-4


def test_fingerprint_changes_with_what_latency_depends_on() -> None:
    a = make_backend(_spec()).fingerprint()
    b = make_backend(_spec(tuning={"mode": "untuned"})).fingerprint()
    c = make_backend(_spec(threads=1)).fingerprint()
    assert a != b and a != c and a["backend"] == "tvm" and a["device"].startswith("local:")


# ------------------------------------------------------------------------------------------ RPC tracker
@pytest.fixture(scope="module")
def farm(tmp_path_factory):
    """A TVM RPC tracker and one device server under the key ``test-device``, on loopback."""
    with LoopbackFarm(tmp_path_factory.mktemp("rpc")) as f:
        f.add_server("test-device")
        yield f


def test_rpc_measurement_goes_through_the_tracker(farm: LoopbackFarm) -> None:
    backend = make_backend(farm.spec("rpc-test", "test-device"))
    assert isinstance(backend, TvmBackend) and backend.remote
    m = backend.measure(_conv_block(), torch.randn(1, 8, 16, 16), warmup=2, repeats=10, timeout_s=120)
    d = m.details
    assert d["device"] == f"rpc://127.0.0.1:{farm.port}/test-device"
    assert d["tuning"] == "default schedules" and d["max_abs_diff"] < 1e-3
    assert m.runs == 10 and m.median_ms > 0 and "on the device" in d["timer"]


def test_rpc_batch_is_uploaded_once_and_each_workload_timed_on_the_device(
    farm: LoopbackFarm, monkeypatch
) -> None:
    from compression.targets import tvm_rpc

    sessions: list[str] = []
    real = tvm_rpc.run_on_device

    def counted(settings, fn, **kw):  # the real session, counted
        sessions.append(settings["key"])
        return real(settings, fn, **kw)

    monkeypatch.setattr(tvm_rpc, "run_on_device", counted)
    backend = make_backend(farm.spec("rpc-test", "test-device"))
    items = [
        (_conv_block(4, 8), torch.randn(1, 4, 8, 8), None),
        (_Add(), (torch.randn(1, 8, 4, 4), torch.randn(1, 8, 4, 4)), None),
        (_conv_block(32, 32), torch.randn(1, 32, 16, 16), {"0": (4, 8)}),
    ]
    results = backend.measure_many(items, warmup=2, repeats=10, timeout_s=60)
    assert all(r.__class__.__name__ == "Measurement" for r in results), results
    assert sessions == ["test-device"]  # one session (one upload) for the three
    for r in results:
        d = r.details
        assert d["compiled_with"] == 3 and d["device"] == f"rpc://127.0.0.1:{farm.port}/test-device"
        assert "on the device" in d["timer"] and d["max_abs_diff"] < 1e-3 and d["representative"] is True
        assert r.runs == 10 and 0 < r.min_ms <= r.median_ms and r.compile_s > 0
        # each item's own time on the device covers its timed runs; the batch's session covers them all
        assert r.min_ms * 10 / 1000 < d["on_device_s"] < d["batch_session_s"]
    assert sum(r.details["on_device_s"] for r in results) < results[0].details["batch_session_s"]
    assert results[1].details["max_abs_diff"] == 0.0  # the addition, exactly
    assert results[2].details["bits_run"] == {"0": "float32"} and "bits_run" not in results[0].details
    assert results[2].min_ms > 3 * results[0].min_ms  # each function timed on its own


def test_rpc_batch_without_a_device_gives_each_item_the_error(farm: LoopbackFarm) -> None:
    # 6 s per item: the batch's compile comes out of its 12 s before the tracker is asked
    backend = make_backend(farm.spec("rpc-test", "nobody-here", timeout_s=6.0))
    items = [
        (_conv_block(4, 4), torch.randn(1, 4, 8, 8), None),
        (_conv_block(4, 8), torch.randn(1, 4, 8, 8), None),
    ]
    t0 = time.monotonic()
    results = backend.measure_many(items, warmup=1, repeats=2, timeout_s=6.0)
    assert time.monotonic() - t0 < 60
    assert len(results) == 2
    for r in results:
        assert isinstance(r, TargetError) and "no device server is registered under key 'nobody-here'" in str(
            r
        )


def test_rpc_device_dying_mid_batch_keeps_what_it_measured(
    farm: LoopbackFarm, tmp_path: Path, monkeypatch
) -> None:
    """The device is killed after the batch's first workload is timed: that entry is stored, the table fill
    raises the session's error naming the device, and a fill on a new device measures only the rest."""
    from compression.targets import tvm_backend, tvm_rpc
    from compression.targets.table import LatencyTable

    key = "dies-mid-batch"
    proc = farm.add_server(key)
    real = tvm_backend._time_vm
    timed: list[str] = []

    def time_then_kill(*args, **kw):  # the real timing; after the first workload the device dies
        out = real(*args, **kw)
        timed.append(kw.get("func", "main"))
        if len(timed) == 1:
            kill(proc)  # the server and its session process
            proc.wait(10)
        return out

    monkeypatch.setattr(tvm_backend, "_time_vm", time_then_kill)
    monkeypatch.delenv("COMPRESSION_TABLE_BATCH", raising=False)  # the default batch: all in one session
    sessions: list[str] = []
    real_session = tvm_rpc.run_on_device

    def counted(settings, fn, **kw):
        sessions.append(settings["key"])
        return real_session(settings, fn, **kw)

    monkeypatch.setattr(tvm_rpc, "run_on_device", counted)
    table = LatencyTable(
        farm.spec("rpc-test", key, timeout_s=60.0), tmp_path / "t.sqlite", warmup=1, repeats=5, timeout_s=60.0
    )
    model = nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 8, 1),
    ).eval()
    need = [table.normalize(w) for w in table.required(model, torch.randn(1, 4, 8, 8))]
    need = list({w.key: w for w in need}.values())
    assert len(need) >= 3
    t0 = time.monotonic()
    with pytest.raises(TargetError, match=f"device '{key}' failed") as err:
        table.fill_workloads(need)
    assert time.monotonic() - t0 < 120  # the dead session fails at once, not at its timeout
    assert "may have died" in (err.value.hint or "") and "the session ended during workload 1" in str(
        err.value
    )
    assert len(timed) == 1 and sessions == [key]  # one session for the batch; nothing timed after the death
    stored = [w for w in need if table.lookup(w) is not None]
    assert len(stored) == 1 and table.measured == 1  # the entry measured before the death is kept

    monkeypatch.setattr(tvm_backend, "_time_vm", real)
    wait_for_server(farm.port, key, present=False, timeout_s=30)
    farm.add_server(key)  # the device comes back
    assert table.fill_workloads(need) == len(need) - 1  # only what was lost is measured again
    assert all(table.lookup(w) is not None for w in need)


def test_rpc_batch_goes_on_after_one_workload_fails_on_a_live_device(farm: LoopbackFarm, monkeypatch) -> None:
    """A remote error in one function (the device still answers) is that workload's error alone: the session
    goes on and measures the others."""
    from compression.targets import tvm_backend

    real = tvm_backend._check_output
    calls: list[str] = []

    def fails_once(vm, args, reference, what, rtol=1e-4, func="main"):
        calls.append(func)
        if len(calls) == 2:  # the second workload: a remote error raised by TVM, the device alive
            vm.invoke_stateful("no_such_function")
        return real(vm, args, reference, what, rtol, func=func)

    monkeypatch.setattr(tvm_backend, "_check_output", fails_once)
    backend = make_backend(farm.spec("rpc-test", "test-device"))
    items = [(_conv_block(4, c), torch.randn(1, 4, 8, 8), None) for c in (4, 8, 16)]
    results = backend.measure_many(items, warmup=1, repeats=3, timeout_s=60)
    assert len(calls) == 3  # the session went on after the failure
    assert isinstance(results[1], TargetError) and "workload 1 failed on the device" in str(results[1])
    assert [r.__class__.__name__ for r in (results[0], results[2])] == ["Measurement", "Measurement"]


def test_rpc_check_reports_the_queue(farm: LoopbackFarm) -> None:
    from compression.targets.tvm_rpc import tracker_summary

    # a server re-registers as free a moment after its previous session ends (slower on a loaded machine)
    end = time.monotonic() + 60
    while not tracker_summary("127.0.0.1", farm.port)["queue_info"].get("test-device", {}).get("free"):
        assert time.monotonic() < end, "the device never became free after the previous session"
        time.sleep(0.2)
    info = make_backend(farm.spec("rpc-test", "test-device")).check()
    assert info["reachable"] is True and info["servers"] == 1 and info["device_cpu_exists"] is True


def test_rpc_key_without_a_device_fails_within_its_timeout(farm: LoopbackFarm) -> None:
    backend = make_backend(farm.spec("rpc-test", "nobody-here", timeout_s=3.0))
    t0 = time.monotonic()
    with pytest.raises(TargetError, match="no device server is registered under key 'nobody-here'"):
        backend.measure(_conv_block(4, 4), torch.randn(1, 4, 8, 8), warmup=1, repeats=2, timeout_s=3.0)
    # compile happens first (a few seconds), then the tracker request gets what is left of the 3 s
    assert time.monotonic() - t0 < 30


def test_rpc_check_of_a_missing_key_fails_fast(farm: LoopbackFarm) -> None:
    t0 = time.monotonic()
    with pytest.raises(TargetError, match="within 2 s"):
        make_backend(farm.spec("rpc-test", "nobody-here", timeout_s=2.0)).check()
    assert time.monotonic() - t0 < 10


def test_rpc_killed_device_is_a_clear_error(farm: LoopbackFarm) -> None:
    proc = farm.add_server("doomed")
    kill(proc)  # the device dies: server and its session process
    proc.wait(10)
    wait_for_server(farm.port, "doomed", present=False, timeout_s=30)
    t0 = time.monotonic()
    with pytest.raises(TargetError, match="no device server is registered under key 'doomed'"):
        make_backend(farm.spec("rpc-test", "doomed", timeout_s=2.0)).check()
    assert time.monotonic() - t0 < 10


def test_rpc_tracker_down_is_a_clear_error() -> None:
    port = free_port()  # nothing listens there
    backend = make_backend(_spec(rpc={"host": "127.0.0.1", "port": port, "key": "k", "timeout_s": 5.0}))
    t0 = time.monotonic()
    with pytest.raises(TargetError, match="tracker at 127.0.0.1:.* is not reachable"):
        backend.check()
    assert time.monotonic() - t0 < 5


def test_rpc_port_that_is_not_a_tracker_is_a_clear_error() -> None:
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        port = srv.getsockname()[1]
        backend = make_backend(_spec(rpc={"host": "127.0.0.1", "port": port, "key": "k", "timeout_s": 2.0}))
        with pytest.raises(TargetError, match="did not answer as a TVM RPC tracker"):
            backend.check()


# ------------------------------------------------------------------------------------------ tuning database
_TUNE_SCRIPT = textwrap.dedent(
    """
    import json, sys, time, torch
    from torch import nn
    from compression.targets.base import TargetSpec
    from compression.targets.tvm_backend import make_backend
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU()).eval()
    spec = TargetSpec("tune-test", "tvm", {"tuning": {"mode": "metaschedule", "db_dir": sys.argv[1],
                                                       "trials_per_task": 4}})
    t0 = time.time()
    m = make_backend(spec).measure(model, torch.randn(1, 4, 8, 8), warmup=2, repeats=5, timeout_s=120)
    print(json.dumps({"wall_s": time.time() - t0, "details": m.details}, default=str))
    """
)


@pytest.mark.slow
def test_tuned_workloads_are_reused_by_another_process(tmp_path: Path) -> None:
    """A workload tuned in one process is found in the database by the next one and never tuned again."""
    db = tmp_path / "db"

    def run() -> dict:
        out = subprocess.run(
            [sys.executable, "-c", _TUNE_SCRIPT, str(db)],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=900,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    first = run()
    assert first["details"]["tuning_report"]["tuned"] >= 1
    assert (db / "database_tuning_record.json").stat().st_size > 0
    second = run()
    report = second["details"]["tuning_report"]
    assert report["tuned"] == 0 and report["tasks"] == first["details"]["tuning_report"]["tasks"]
    assert (
        second["details"]["tuning"].startswith("tuned (") and "from database" in second["details"]["tuning"]
    )
    assert second["details"]["from_database"] >= 1
    assert second["details"]["tuning_s"] < first["details"]["tuning_s"]


def test_models_compiled_once_and_timed_side_by_side() -> None:
    from compression.targets import compare_models

    spec = _spec("tvm-side-by-side", lock="tvm-side-by-side-test")
    wide, narrow = _conv_block(8, 32), _conv_block(8, 8)
    c = compare_models([wide, narrow], torch.randn(1, 8, 16, 16), spec, warmup=2, repeats=10, blocks=2)
    assert c.method == "interleaved" and c.ratios[0] == 1.0
    for m in c.measurements:
        d = m.details
        assert m.runs == 20 and d["timer"] == "tvm time_evaluator, interleaved" and d["calls_per_run"] >= 1
        assert d["max_abs_diff"] < 1e-3 and m.compile_s > 0 and d["busy_cores"] >= 0  # local: watched
    assert c.ratios[1] < 1.0  # a quarter of the output channels: the C++ timer tells them apart


def test_a_remote_device_cannot_alternate_models_locally() -> None:
    backend = make_backend(_spec("tvm-remote", rpc={"host": "127.0.0.1", "port": 9, "key": "x"}))
    with pytest.raises(TargetError, match="local targets only"):
        backend.measure_interleaved([_conv_block()], torch.randn(1, 8, 16, 16))


def test_rpc_device_that_never_registers_is_a_clear_error(farm: LoopbackFarm) -> None:
    t0 = time.monotonic()
    with pytest.raises(TargetError, match="device 'never-here' never registered at the tracker on 127.0.0.1"):
        wait_for_server(farm.port, "never-here", present=True, timeout_s=1.0)
    assert time.monotonic() - t0 < 10


# ------------------------------------------------------------------------------------------ a busy machine
class _Readings:
    """Stands in for ``CpuWatch`` (the boundary: what /proc says other programs did): one reading per window."""

    def __init__(self, values: list[float]) -> None:
        self.values = list(values)
        self.used: list[float] = []

    def __call__(self):
        readings = self

        class Watch:
            others: float | None = None
            seconds = 0.0

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.others = readings.values.pop(0) if readings.values else 0.0
                readings.used.append(self.others)

        return Watch()


def _batch():
    return [(_conv_block(4, c), torch.randn(1, 4, 8, 8), None) for c in (4, 8, 16)]


def test_a_batch_timed_while_the_machine_was_busy_is_timed_again_when_it_is_quiet(
    monkeypatch, caplog
) -> None:
    from compression.targets import tvm_backend

    readings = _Readings([1.4, 0.05])  # busy during the first timing, quiet during the second
    waits: list[float] = []
    monkeypatch.setattr(tvm_backend, "CpuWatch", readings)
    monkeypatch.setattr(tvm_backend, "wait_for_quiet", lambda s: (waits.append(s), (True, 0.1))[1])
    monkeypatch.delenv("COMPRESSION_TABLE_QUIET_WAIT_S", raising=False)
    calls: list[str] = []
    real = TvmBackend._check_and_time

    def counted(self, *args, **kw):
        calls.append(kw["func"])
        return real(self, *args, **kw)

    monkeypatch.setattr(TvmBackend, "_check_and_time", counted)
    backend = make_backend(_spec())
    with caplog.at_level("INFO", logger="compression.targets.tvm_backend"):
        results = backend.measure_many(_batch(), warmup=1, repeats=5, timeout_s=60)
    assert len(calls) == 6 and calls[:3] == calls[3:]  # every workload timed twice, in the same order
    assert waits and 1.0 <= waits[0] <= 10.0
    for r in results:
        assert r.details["busy_cores"] == 1.4 and r.details["timed_again"] is True
        assert r.details["busy_cores_again"] == 0.05 and r.min_ms > 0
    assert "other processes used 1.40 cores while 3 workloads were timed; timed again" in caplog.text


def test_a_machine_that_stays_busy_is_not_waited_on_batch_after_batch(monkeypatch, caplog) -> None:
    from compression.targets import tvm_backend

    readings = _Readings([1.2, 1.3, 0.1, 1.1])
    waits: list[float] = []
    monkeypatch.setattr(tvm_backend, "CpuWatch", readings)
    monkeypatch.setattr(tvm_backend, "wait_for_quiet", lambda s: (waits.append(s), (False, 1.5))[1])
    monkeypatch.delenv("COMPRESSION_TABLE_QUIET_WAIT_S", raising=False)
    backend = make_backend(_spec())
    with caplog.at_level("INFO", logger="compression.targets.tvm_backend"):
        first = backend.measure_many(_batch(), warmup=1, repeats=3, timeout_s=60)
        second = backend.measure_many(_batch(), warmup=1, repeats=3, timeout_s=60)
        # the first busy batch waited and found no quiet second; the next busy one is kept as timed, without a
        # wait, and without another warning (one per busy stretch: a search times hundreds of small batches)
        assert len(waits) == 1 and readings.used == [1.2, 1.3]
        assert "no quiet second came within" in caplog.text and "(1.50 cores)" in caplog.text
        assert caplog.text.count("other processes used") == 1
        assert all("timed_again" not in r.details for r in first + second)
        assert [r.details["busy_cores"] for r in second] == [1.3] * 3
        third = backend.measure_many(_batch(), warmup=1, repeats=3, timeout_s=60)  # a quiet batch resets it
        assert [r.details["busy_cores"] for r in third] == [0.1] * 3
        assert "quiet again; 3 more workloads were timed busy and kept meanwhile" in caplog.text
    backend.measure_many(_batch(), warmup=1, repeats=3, timeout_s=60)  # busy again: waits again
    assert len(waits) == 2


def test_a_short_deadline_or_a_zero_wait_keeps_the_first_timing(monkeypatch) -> None:
    from compression.targets import tvm_backend

    waits: list[float] = []
    monkeypatch.setattr(tvm_backend, "wait_for_quiet", lambda s: (waits.append(s), (True, 0.0))[1])
    monkeypatch.setattr(tvm_backend, "CpuWatch", _Readings([2.0]))
    monkeypatch.setenv("COMPRESSION_TABLE_QUIET_WAIT_S", "0")
    results = make_backend(_spec()).measure_many(_batch(), warmup=1, repeats=3, timeout_s=60)
    assert not waits and all(
        r.details["busy_cores"] == 2.0 and "timed_again" not in r.details for r in results
    )


def test_a_real_busy_program_is_recorded_in_the_entries(monkeypatch) -> None:
    """No stand-in: another program spins while a batch is timed, and the entries say how busy it was."""
    from test_contention import _orphan_spinner

    # record only: the spinner would never let it be quiet
    monkeypatch.setenv("COMPRESSION_TABLE_QUIET_WAIT_S", "0")
    pid = _orphan_spinner()
    try:
        items = [(_conv_block(16, 16), torch.randn(1, 16, 16, 16), None) for _ in range(3)]
        results = make_backend(_spec()).measure_many(items, warmup=2, repeats=100, timeout_s=60)
    finally:
        os.kill(pid, 9)
    assert all(r.details["busy_cores"] > 0.25 for r in results), [r.details["busy_cores"] for r in results]
