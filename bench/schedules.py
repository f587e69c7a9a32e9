"""TVM's default schedules on this CPU: the register tile of ``AnchorTiling``, whole models side by side.

``compression/targets/tvm_schedules.py`` schedules every convolution with one template: an output tile of
(channels x rows x one vector of columns) accumulates in registers while the reduction runs. How big a tile
fits depends on the register file (16 vector registers with AVX2, 32 with AVX-512), and the vector length on
the SIMD width. This benchmark compiles whole models under several tiles and times them **interleaved, run by
run**, so that a slow stretch of the machine slows every variant alike:

- **default**: what the backend ships (``register_tile`` and ``vector_lanes`` of the target);
- **before**: the tile every TVM number before session 17 was measured with, 8 rows of one vector of the width
  LLVM reports (TVM 0.27 reports 512 bits for every x86 CPU, so 16 floats, two registers on AVX2);
- **CxR**: C output channels x R rows of one native vector (``--tiles``, default 1x8, 2x4, 4x2, 8x2, 4x4).

Models: the benchmarks' ResNet-20 (the original and uniformly pruned copies, channels in multiples of 8) and the
depthwise net (``--models``). Each variant's output is checked against PyTorch before it is timed. Reported per
model: the median of ``--rounds`` timed runs (each the mean of enough calls to last 20 ms) and each variant's
ratio to **default** within the same rounds (median of per-round ratios).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from bench.common import BENCH_MODELS, Context, LoadSampler, bench_model, fmt, log, publish, table

DEFAULT_TILES = ((1, 8), (2, 4), (4, 2), (8, 2), (4, 4))


def _variants(target: Any, tiles: list[tuple[int, int]]) -> dict[str, Any]:
    from compression.targets.tvm_schedules import AnchorTiling, InjectiveFallback

    try:
        from tvm.target.codegen import llvm_get_vector_width

        reported = max(int(llvm_get_vector_width(target)) // 32, 4)
    except Exception:  # what the schedules assumed when LLVM could not tell
        reported = 4
    out: dict[str, Any] = {
        "default": None,
        "before": (AnchorTiling(channels=1, rows=8, lanes=reported), InjectiveFallback()),
    }
    for c, r in tiles:
        out[f"{c}x{r}"] = (AnchorTiling(channels=c, rows=r), InjectiveFallback())
    return out


def _models(ctx: Context, keys: list[str]) -> list[tuple[str, Any, Any]]:
    from compression.pipeline import open_workspace
    from compression.policy import LayerPolicy, Policy
    from compression.prune import group_keeps, prune_module

    out = []
    for key in keys:
        spec = bench_model(ctx, key).spec if key in BENCH_MODELS else key
        ws = open_workspace(spec, "digits", seed=0)
        x = ws.artifact.example_input(1)
        out.append((f"{key} original", ws.artifact.module.eval(), x))
        if key == "resnet20":
            for k in (0.5, 0.25):
                pol = Policy(layers={n: LayerPolicy(keep_ratio=k) for n in ws.graph.prunable_leaders})
                out.append(
                    (f"{key} keep {k}", prune_module(ws.graph, group_keeps(ws.graph, pol, 8)).eval(), x)
                )
    return out


def run(ctx: Context) -> dict[str, Any]:
    """Run the schedules benchmark and write ``bench/results/schedules[-quick].json``."""
    import numpy as np
    import torch
    import tvm
    from tvm import relax

    from compression.targets import get_target
    from compression.targets.registry import make_backend
    from compression.targets.tvm_backend import _config_threads
    from compression.targets.tvm_compile import build, compile_module
    from compression.targets.tvm_schedules import register_tile, schedule_module, vector_lanes

    rounds = int(ctx.opt("rounds", 7, 21))
    backend = make_backend(get_target(ctx.options.get("target") or "local-tvm"))
    target = backend.target
    _config_threads(backend.threads)
    tiles = [tuple(int(v) for v in t.split("x")) for t in (ctx.options.get("tiles") or [])] or list(
        DEFAULT_TILES
    )
    variants = _variants(target, tiles)
    keys = ctx.options.get("models") or (["resnet20"] if ctx.quick else ["resnet20", "dwnet"])
    dev = tvm.cpu()
    result: dict[str, Any] = {
        "target": str(target),
        "vector_lanes": vector_lanes(target),
        "register_tile": list(register_tile(target)),
        "threads": backend.threads,
        "rounds": rounds,
        "variants": list(variants),
        "models": {},
    }
    timers: dict[tuple[str, str], Any] = {}
    for label, module, x in _models(ctx, keys):
        with torch.no_grad():
            ref = module(x).numpy()
        inp = tvm.runtime.tensor(x.numpy(), dev)
        result["models"][label] = {"compile_s": {}, "max_abs_diff": {}}
        for name, rules in variants.items():
            t0 = time.perf_counter()
            mod, _ = schedule_module(compile_module(module, (x,), target), target, rules=rules)
            vm = relax.VirtualMachine(build(mod, target), dev)
            result["models"][label]["compile_s"][name] = time.perf_counter() - t0
            out = vm["main"](inp)
            out = out if hasattr(out, "numpy") else out[0]
            diff = float(np.abs(out.numpy() - ref).max())
            result["models"][label]["max_abs_diff"][name] = diff
            if diff > 1e-3 * max(1.0, float(np.abs(ref).max())):
                raise RuntimeError(f"{label}, schedule {name}: output differs from PyTorch by {diff:.2e}")
            vm.save_function("main", "timed", inp, include_return=False)
            per_call = float(np.median(vm.time_evaluator("timed", dev, number=1, repeat=20)().results))
            number = max(1, int(0.02 / max(per_call, 1e-7)))
            timers[(label, name)] = vm.time_evaluator("timed", dev, number=number, repeat=1)
        log(ctx, f"  {label}: {len(variants)} schedules compiled and checked")
    times: dict[tuple[str, str], list[float]] = {k: [] for k in timers}
    with LoadSampler() as load:
        for r in range(rounds):
            order = list(timers) if r % 2 == 0 else list(reversed(list(timers)))
            for k in order:
                times[k].append(float(timers[k]().results[0]) * 1e3)
            log(ctx, f"  round {r + 1}/{rounds}")
    for label, entry in result["models"].items():
        base = times[(label, "default")]
        entry["ms"] = {n: statistics.median(times[(label, n)]) for n in variants}
        entry["min_ms"] = {n: min(times[(label, n)]) for n in variants}
        entry["ratio_to_default"] = {
            n: statistics.median(a / b for a, b in zip(times[(label, n)], base, strict=True))
            for n in variants
        }
        entry["rounds_ms"] = {n: times[(label, n)] for n in variants}
    result["load"] = load.summary()
    publish(ctx, "schedules", result, summarize)
    return result


def summarize(r: dict[str, Any]) -> str:
    """Markdown table of a schedules result: ms (ratio to the default) per model and variant."""
    names = r["variants"]
    rows = []
    for label, e in r["models"].items():
        rows.append([label] + [f"{fmt(e['ms'][n])} ({fmt(e['ratio_to_default'][n], '.2f')})" for n in names])
    head = (
        f"TVM default schedules on {r['target']}: {r['vector_lanes']} floats per vector, register tile "
        f"{r['register_tile'][0]} channels x {r['register_tile'][1]} rows; median ms of {r['rounds']} interleaved "
        f"rounds (ratio to default, same rounds)\n\n"
    )
    return head + table(["model", *names], rows)
