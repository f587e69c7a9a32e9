"""How repeatable is a measured latency ratio? Separate measurements against models timed side by side.

The search's device check, the finalize report and the fidelity and quality benchmarks all ask one question of
a device: a compressed model's latency as a ratio to the original's. This benchmark asks it ``--rounds`` times
(default 6) for the same models and reports how much the answers disagree, for two ways of measuring, in one
run, alternating which goes first:

- **separate**: ``bench_model`` of each model in turn, three rounds (the original, then every policy, per round),
  a policy's ratio the median over rounds of its ratio to the original of the same round (the device check's
  method before session 8, and the fidelity benchmark's);
- **side by side**: ``targets.compare_models`` with three blocks (the models prepared once, alternating run by
  run; ``docs/targets.md``).

Models: the trained ResNet-20 on digits and four random policies of it (``fidelity.random_policy``: two pruned
only, two pruned with 2-8 bits on half of the layers), channels rounded to the target's default. Reported per
target and method: the spread of each policy's ratio over the repeats ((max - min) / median, and the standard
deviation over the mean), averaged over the policies; the mean ratio (the two methods should agree on it); and
the seconds one comparison takes.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from bench.common import Context, LoadSampler, fmt, log, publish, resnet20_digits, table

TARGETS = ("local-ort", "local-torch", "local-tvm")


def _models(spec: str, target: str, n: int):
    import numpy as np

    from bench.fidelity import random_policy
    from compression.apply import apply_policy
    from compression.pipeline import open_workspace
    from compression.targets import get_target

    ws = open_workspace(spec, "digits", seed=0)
    t = get_target(target)
    round_to = int(getattr(t, "round_to", 1) or 1)
    calib = ws.calibration_batch(64, seed=0)
    rng = np.random.default_rng(0)
    models = [ws.artifact.module.eval()]
    kinds = []
    for i in range(n):
        kind = "prune" if i < n // 2 else "mixed"
        models.append(
            apply_policy(ws.graph, random_policy(ws.graph, rng, kind, 0.3), calib, round_to=round_to)
        )
        kinds.append(kind)
    return models, kinds, ws.artifact.example_input(1)


def _separate(models, x, target: str, rounds: int) -> tuple[list[float], str]:
    from compression.targets import bench_model

    per: list[list[float]] = [[] for _ in models[1:]]
    for _ in range(rounds):
        ref = bench_model(models[0], x, target).median_ms
        for i, m in enumerate(models[1:]):
            per[i].append(bench_model(m, x, target).median_ms / ref)
    return [statistics.median(v) for v in per], "separate"


def _side_by_side(models, x, target: str, blocks: int) -> tuple[list[float], str]:
    """``compare_models``; on a target that cannot alternate (ONNX Runtime with spinning threads since session 8)
    it measures model by model, and the method it used is recorded."""
    from compression.targets import compare_models

    c = compare_models(models, x, target, blocks=blocks)
    return c.ratios[1:], c.method


def _one_target(ctx: Context, spec: str, target: str, repeats: int, n: int) -> dict[str, Any]:
    models, kinds, x = _models(spec, target, n)
    methods = {"separate": _separate, "side by side": _side_by_side}
    ratios: dict[str, list[list[float]]] = {k: [] for k in methods}
    seconds: dict[str, list[float]] = {k: [] for k in methods}
    used: dict[str, str] = {}
    with LoadSampler() as load:
        for r in range(repeats):
            order = list(methods) if r % 2 == 0 else list(methods)[::-1]
            for name in order:
                t0 = time.perf_counter()
                found, used[name] = methods[name](models, x, target, 3)
                ratios[name].append(found)
                seconds[name].append(time.perf_counter() - t0)
            log(
                ctx,
                f"  {target} repeat {r + 1}/{repeats}: "
                + "; ".join(f"{k} {' '.join(f'{v:.3f}' for v in ratios[k][-1])}" for k in methods),
            )
    out: dict[str, Any] = {"policies": kinds, "repeats": repeats, "load": load.summary(), "methods": {}}
    for name in methods:
        per_policy = list(zip(*ratios[name], strict=True))  # policy -> its ratio in each repeat
        spreads = [(max(v) - min(v)) / statistics.median(v) for v in per_policy]
        cvs = [statistics.stdev(v) / statistics.fmean(v) for v in per_policy]
        out["methods"][name] = {
            "ratios": ratios[name],
            "spread_mean": statistics.fmean(spreads),
            "spread_worst": max(spreads),
            "cv_mean": statistics.fmean(cvs),
            "ratio_mean": statistics.fmean(statistics.median(v) for v in per_policy),
            "seconds_mean": statistics.fmean(seconds[name]),
            "measured": used.get(name),
        }
    return out


def run(ctx: Context) -> dict[str, Any]:
    """Run the repeatability benchmark and write ``bench/results/repeatability[-quick].json``."""
    repeats = int(ctx.opt("rounds", 3, 6))
    n = int(ctx.opt("policies", 2, 4))
    targets = [ctx.options["target"]] if ctx.options.get("target") else list(TARGETS)
    spec = ctx.options.get("model") or resnet20_digits(ctx).spec
    result: dict[str, Any] = {"model": spec, "repeats": repeats, "policies": n, "targets": {}}
    for t in targets:
        log(ctx, f"repeatability on {t}: {n} policies, {repeats} repeats of each method")
        try:
            result["targets"][t] = _one_target(ctx, spec, t, repeats, n)
        except Exception as exc:
            log(ctx, f"repeatability on {t} failed: {type(exc).__name__}: {exc}")
            result["targets"][t] = {"error": f"{type(exc).__name__}: {exc}"}
    publish(ctx, "repeatability", result, summarize)
    return result


def summarize(r: dict[str, Any]) -> str:
    """Markdown table of a repeatability result."""
    rows = []
    for t, res in r["targets"].items():
        if "error" in res:
            rows.append([t, "error", res["error"], "", "", "", ""])
            continue
        for name, m in res["methods"].items():
            rows.append(
                [
                    t,
                    name,
                    f"{m['spread_mean']:.1%}",
                    f"{m['spread_worst']:.1%}",
                    f"{m['cv_mean']:.1%}",
                    fmt(m["ratio_mean"]),
                    f"{m['seconds_mean']:.1f}",
                ]
            )
    return table(
        [
            "target",
            "method",
            "spread of a policy's ratio over repeats (mean)",
            "worst",
            "std/mean",
            "mean ratio",
            "s per comparison",
        ],
        rows,
    )
