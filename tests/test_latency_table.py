"""Latency tables: filled lazily, persisted, reused across objects, processes and models, and their error
against end-to-end measurement computed (reported, not bounded: see docs/targets.md for the numbers)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_targets import ORT_1, TORCH_1, SmallResNet, layer_names, private_lock_dir, small_input

from compression.targets import LatencyTable, bench_model, extract_workloads

REPO = Path(__file__).resolve().parents[1]
__all__ = ["private_lock_dir"]  # the autouse fixture: device locks in a private directory here too
PRUNED = [(16, 16, 32, 32), (8, 8, 16, 16), (4, 12, 8, 24)]  # inner widths of the four blocks

_CHILD = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, "tests")
    import torch
    torch.set_num_threads(1)
    from test_targets import TORCH_1, SmallResNet, small_input
    from compression.targets import LatencyTable

    path, mids, out = sys.argv[1], tuple(json.loads(sys.argv[2])), sys.argv[3]
    table = LatencyTable(TORCH_1, path, warmup=2, repeats=10)
    measured = table.fill(SmallResNet(mids), small_input())
    total, _, missing = table.predict(SmallResNet(mids), small_input())
    with open(out, "w") as f:
        json.dump({"measured": measured, "total": total, "missing": len(missing)}, f)
    """
)


def _children(path: Path, tmp: Path, variants: list[tuple[int, ...]]) -> list[dict]:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(path), json.dumps(v), str(tmp / f"c{i}.json")], cwd=REPO
        )
        for i, v in enumerate(variants)
    ]
    for p in procs:
        assert p.wait(timeout=180) == 0
    return [json.loads((tmp / f"c{i}.json").read_text()) for i in range(len(variants))]


def test_fill_persist_and_reuse_across_objects_processes_and_models(tmp_path: Path) -> None:
    path = tmp_path / "latency.sqlite"
    model, x = SmallResNet(), small_input()
    table = LatencyTable(TORCH_1, path, warmup=2, repeats=10)
    total0, rows0, missing0 = table.predict(model, x)
    assert missing0 and table.misses > 0 and table.measured == 0  # nothing known yet, nothing measured

    measured = table.fill(model, x)
    assert measured == len(table.required(model, x))  # every distinct workload and per-shape overhead once
    assert measured > len({w.key for w in table.workloads(model, x)})
    assert len(table) == measured == table.stats()["measured"]
    assert table.fill(model, x) == 0

    total, rows, missing = table.predict(model, x)
    assert not missing and total > 0
    assert [r["name"] for r in rows if r["kind"] in ("conv2d", "linear")] == layer_names(model)
    assert rows[-1]["name"] == "overhead" and all(r["ms"] >= 0 for r in rows)

    # a new object on the same file: everything is a hit, nothing is measured
    again = LatencyTable(TORCH_1, path, warmup=2, repeats=10)
    total2, _, missing2 = again.predict(model, x)
    assert not missing2 and again.measured == 0 and again.misses == 0
    assert again.hits == len(extract_workloads(model, x))
    assert total2 == pytest.approx(total)

    # two new processes at once: one reuses everything, one adds a pruned variant's new workloads only
    same, pruned = _children(path, tmp_path, [PRUNED[0], PRUNED[1]])
    assert same["measured"] == 0 and same["missing"] == 0 and same["total"] == pytest.approx(total)
    pruned_model = SmallResNet(PRUNED[1])
    new_keys = {w.key for w in again.required(pruned_model, x)} - {w.key for w in again.required(model, x)}
    assert pruned["measured"] == len(new_keys) > 0  # shared workloads (stem, head, ...) were reused
    assert pruned["missing"] == 0
    assert not again.predict(pruned_model, x)[2]


def test_bits_map_to_what_the_backend_runs(tmp_path: Path) -> None:
    model, x = SmallResNet(), small_input()
    names = layer_names(model)
    ort_table = LatencyTable(ORT_1, tmp_path / "ort.sqlite", warmup=2, repeats=10)
    ort_table.fill(model, x, {n: (8, 8) for n in names})
    # 4-bit layers run as int8 on ONNX Runtime: the int8 entries serve them
    total4, rows4, missing4 = ort_table.predict(model, x, {n: (4, 4) for n in names})
    assert not missing4 and {r["w_bits"] for r in rows4 if r["kind"] == "conv2d"} == {8}
    # float is a different workload
    assert ort_table.predict(model, x)[2]

    torch_table = LatencyTable(TORCH_1, tmp_path / "torch.sqlite", warmup=2, repeats=10)
    torch_table.fill(model, x)
    # eager runs float: 4-bit weights alone change nothing (they are stored in float)...
    assert not torch_table.predict(model, x, {n: (4, 32) for n in names})[2]
    # ...but a quantized input is round/clamp arithmetic before the layer: its own entries, measured
    # on their own (which one is faster is a timing question, left to the benchmarks)
    float_rows = torch_table.predict(model, x)[1]
    fq_plan = {n: (4, 4) for n in names}
    fq_missing = torch_table.predict(model, x, fq_plan)[2]
    assert fq_missing and all(w.act_fq and w.a_bits == 32 for w in fq_missing)
    torch_table.fill(model, x, fq_plan)
    _, fq_rows, still_missing = torch_table.predict(model, x, fq_plan)
    assert not still_missing
    fq_keys = {w.key for w in fq_missing}
    assert fq_keys <= {r["key"] for r in fq_rows}
    assert not fq_keys & {r["key"] for r in float_rows}
    assert all(r["raw_ms"] > 0 for r in fq_rows if r["key"] in fq_keys)


def test_compressed_model_is_recorded_with_its_own_bits() -> None:
    """A model from apply_policy carries its plan; its quantizers are not separate operations."""
    from compression.apply import apply_policy
    from compression.models.graph import LayerGraph
    from compression.policy import LayerPolicy, Policy
    from compression.targets.workloads import extract_workloads

    model, x = SmallResNet(), small_input()
    graph = LayerGraph.build(model.eval(), tuple(x.shape[1:]))
    names = graph.layer_names
    policy = Policy(layers={n: LayerPolicy(w_bits=4, a_bits=6) for n in names})
    compressed = apply_policy(graph, policy, torch.randn(32, *x.shape[1:]))
    plain = extract_workloads(model, x)
    recorded = extract_workloads(compressed, x)
    assert [w.op for w in recorded] == [w.op for w in plain]  # no round/clamp/div ops of the quantizers
    assert {(w.w_bits, w.a_bits) for w in recorded if w.is_layer} == {(4, 6)}


def test_fingerprint_separates_target_settings(tmp_path: Path) -> None:
    path = tmp_path / "t.sqlite"
    model, x = SmallResNet((4, 4, 4, 4)), small_input()
    one = LatencyTable(TORCH_1, path, warmup=1, repeats=5)
    one.fill(model, x)
    two = LatencyTable({**TORCH_1, "settings": {"threads": 2}}, path, warmup=1, repeats=5)
    assert two.fingerprint != one.fingerprint
    assert two.predict(model, x)[2]  # entries timed with 1 thread are not reused for 2 threads


def test_analytic_table_computes_instead_of_measuring(tmp_path: Path) -> None:
    model, x = SmallResNet(), small_input()
    bits = {layer_names(model)[0]: (4, 4)}
    table = LatencyTable("analytic", tmp_path / "a.sqlite")
    total, rows, missing = table.predict(model, x, bits)
    assert not missing and table.unit == "GBOPs" and len(table) == 0
    assert total == pytest.approx(bench_model(model, x, "analytic", bits=bits).median_ms)


@pytest.mark.parametrize("target", [TORCH_1, ORT_1], ids=["torch", "onnxruntime"])
def test_prediction_error_against_end_to_end(target: dict, tmp_path: Path) -> None:
    table = LatencyTable(target, tmp_path / "t.sqlite", warmup=5, repeats=30)
    x = small_input()
    cal = table.calibrate(SmallResNet(PRUNED[0]), x)
    assert cal["scale"] > 0 and cal["measured_ms"] > 0
    _, rows, _ = table.predict(SmallResNet(PRUNED[1]), x)  # a pruned variant shares the calibration
    conv = next(r for r in rows if r["kind"] == "conv2d")
    assert conv["ms"] == pytest.approx(conv["raw_ms"] * cal["scale"])
    results = []
    for mids in PRUNED[1:]:
        c = table.confirm(SmallResNet(mids), x, label=f"mids={mids}")
        assert c["calibrated"] and not c["missing"]
        assert c["predicted_ms"] > 0 and c["measured_ms"] > 0 and math.isfinite(c["rel_error"])
        results.append((mids, c))
    report = table.error_report()
    assert report["n"] == len(PRUNED) - 1 and report["calibrated"] == report["n"]
    assert report["max_abs_rel_error"] == pytest.approx(max(abs(c["rel_error"]) for _, c in results))
    print(
        f"\n{target['backend']}: reference {cal['measured_ms']:.3f} ms, calibration factor {cal['scale']:.2f}"
    )
    for mids, c in results:
        print(
            f"  mids={mids}: measured {c['measured_ms']:.3f} ms, predicted {c['predicted_ms']:.3f} ms "
            f"({c['rel_error']:+.1%}), uncalibrated {c['raw_predicted_ms']:.3f} ms ({c['raw_rel_error']:+.1%})"
        )


def test_table_counts_every_workload_occurrence(tmp_path: Path) -> None:
    model, x = SmallResNet(), small_input()
    table = LatencyTable(TORCH_1, tmp_path / "t.sqlite", warmup=1, repeats=3)
    table.fill(model, x)
    total, rows, _ = table.predict(model, x)
    assert total == pytest.approx(sum(r["ms"] for r in rows))
    ws = extract_workloads(model, x)
    assert len(rows) == len(ws) + 1  # plus the overhead row
    # identical blocks are one entry but two rows
    by_name = {r["name"]: r for r in rows}
    assert by_name["layer1.0.conv1"]["key"] == by_name["layer1.1.conv1"]["key"]


def test_operations_a_backend_cannot_run_alone_are_reported_not_fatal(tmp_path: Path) -> None:
    from compression.errors import ModelError
    from compression.targets import make_backend
    from compression.targets.workloads import OpModule

    class NoAdd:
        """The torch backend, except that it cannot export additions (as an exporter might refuse an op)."""

        def __init__(self) -> None:
            self.inner = make_backend(TORCH_1)

        def __getattr__(self, name: str):
            return getattr(self.inner, name)

        def measure(self, module, example_input, **kwargs):
            if isinstance(module, OpModule) and module.op_name == "aten.add.Tensor":
                raise ModelError("no export for aten.add.Tensor")
            return self.inner.measure(module, example_input, **kwargs)

    model, x = SmallResNet(), small_input()
    table = LatencyTable(TORCH_1, tmp_path / "t.sqlite", backend=NoAdd(), warmup=1, repeats=3)
    table.fill(model, x)
    assert len(table.unmeasurable) == 2  # the two distinct addition shapes
    total, rows, missing = table.predict(model, x)
    assert {w.op for w in missing} == {"aten.add.Tensor"}
    assert all(r["ms"] is None for r in rows if r["op"] == "aten.add.Tensor") and total > 0


@pytest.mark.slow
@pytest.mark.parametrize("target", ["local-torch", "local-ort"])
def test_resnet20_table_error_on_pruned_and_int8_variants(target: str, tmp_path: Path) -> None:
    """The numbers docs/targets.md reports: ResNet-20 (zoo) calibrated once, then pruned / int8 variants
    predicted and confirmed end to end (run with ``-s`` to see them; quiet machines give meaningful ones)."""
    import random

    from compression.apply import apply_policy
    from compression.models.graph import LayerGraph
    from compression.models.zoo import build_zoo_model
    from compression.policy import LayerPolicy, Policy

    model = build_zoo_model("resnet20").eval()
    x = torch.randn(1, 3, 32, 32)
    graph = LayerGraph.build(model, (3, 32, 32), num_classes=10)
    calib = torch.randn(64, 3, 32, 32)
    rng = random.Random(0)
    keeps = {
        "keep 0.75": lambda: 0.75,
        "keep 0.5": lambda: 0.5,
        "random keeps": lambda: rng.choice([0.25, 0.5, 0.75, 1.0]),
    }
    variants = {
        label: apply_policy(
            graph, Policy({n: LayerPolicy(keep_ratio=k()) for n in graph.prunable_leaders}), calib
        )
        for label, k in keeps.items()
    }
    table = LatencyTable(target, tmp_path / "t.sqlite", warmup=20, repeats=200, timeout_s=900)
    cal = table.calibrate(model, x)
    print(
        f"\n{target}: ResNet-20 {cal['measured_ms']:.3f} ms (cv {cal['measurement'].cv:.2f}), factor {cal['scale']:.2f}"
    )
    plans = [("float", False)] + ([("int8", True)] if target == "local-ort" else [])
    for label, variant in variants.items():
        for plan, int8 in plans:
            bits = {n: (8, 8) for n in layer_names_of(variant, x)} if int8 else None
            c = table.confirm(variant, x, bits, label=f"{label} {plan}")
            assert c["measured_ms"] > 0 and c["predicted_ms"] > 0
            print(
                f"  {label:13s} {plan:5s}: measured {c['measured_ms']:.3f} ms (cv {c['measurement'].cv:.2f}), "
                f"predicted {c['predicted_ms']:.3f} ({c['rel_error']:+.1%}), raw {c['raw_predicted_ms']:.3f} "
                f"({c['raw_rel_error']:+.1%})"
            )
    print("  ", table.error_report())


def layer_names_of(module: torch.nn.Module, x: torch.Tensor) -> list[str]:
    return [w.name for w in extract_workloads(module, x) if w.is_layer]
