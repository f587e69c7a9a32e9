"""Benchmark 1j, the fine-tune recipe: what the finalize phase's short fine-tune makes of a compressed model.

Every method's final model gets the same fine-tune (``fine_tune``: distillation from the original, SGD at 0.01 with
a cosine decay, ``fine_tune_epochs`` epochs, batch norms re-estimated at the end). This benchmark compares recipes
side by side on the same compressed models: with and without the random-shift augmentation, for 1, 2 and 4 epochs
(``--recipes``, default ``aug2,plain2,aug4,plain4``). Models: the pool of proxy (1i), i.e. the uniform policy that
fits the budget, uniform plus noise, and random actions through the environment (``--policies`` per cell), per
``--models`` and ``--budgets`` (MACs, default 10% and 35%). Per recipe: test and validation top-1 after it (mean,
and per kind of policy), how often it is the best recipe for a model, and its seconds.
"""

from __future__ import annotations

import copy
import time
from typing import Any

from bench.common import Context, LoadSampler, bench_model, fmt, log, mean_std, publish, table

CALIB = 256


def parse_recipe(spec: str) -> tuple[bool, int]:
    """``aug2`` -> (augment, epochs)."""
    for prefix, augment in (("aug", True), ("plain", False)):
        if spec.startswith(prefix) and spec[len(prefix) :].isdigit():
            return augment, int(spec[len(prefix) :])
    raise ValueError(f"recipe {spec!r}: use aug<epochs> or plain<epochs>")


def _cell(ctx: Context, key: str, budget: float, policies: int, recipes: list[str]) -> dict[str, Any]:
    import numpy as np

    from bench.proxy import _candidates
    from compression.apply import apply_policy
    from compression.pipeline import open_workspace
    from compression.search.env import CompressionEnvironment, EnvSettings
    from compression.training import evaluate, fine_tune

    bm = bench_model(ctx, key)
    ws = open_workspace(bm.spec, "digits", seed=0)
    calib = ws.calibration_batch(CALIB, seed=0)
    original = ws.artifact.module.eval()
    search, _ = ws.search_set(1000, CALIB, seed=0)
    env = CompressionEnvironment(
        ws.graph, search, calib, EnvSettings(layout="prune", objective="macs", budget=budget)
    )
    pool = _candidates(env, np.random.default_rng(2), policies)
    rows: list[dict[str, Any]] = []
    with LoadSampler() as load:
        for i, (kind, policy) in enumerate(pool):
            applied = apply_policy(ws.graph, policy, calib).eval()
            row: dict[str, Any] = {
                "policy": i,
                "kind": kind,
                "test_before": evaluate(applied, ws.data.test).top1,
            }
            for spec in recipes:
                augment, epochs = parse_recipe(spec)
                m = copy.deepcopy(applied)
                t0 = time.perf_counter()
                fine_tune(m, ws.data.train, epochs=epochs, teacher=original, seed=0, augment=augment)
                row[f"{spec} s"] = time.perf_counter() - t0
                row[f"{spec} test"] = evaluate(m, ws.data.test).top1
                row[f"{spec} val"] = evaluate(m, ws.data.val).top1
            rows.append(row)
            log(
                ctx,
                f"{key}@{budget:g} model {i + 1}/{len(pool)} ({kind}): before {row['test_before']:.3f}, "
                + ", ".join(f"{s} {row[f'{s} test']:.3f}" for s in recipes),
            )
    per: dict[str, Any] = {}
    for spec in recipes:
        best = sum(1 for r in rows if r[f"{spec} test"] >= max(r[f"{o} test"] for o in recipes))
        per[spec] = {
            "test": mean_std(r[f"{spec} test"] for r in rows),
            "val": mean_std(r[f"{spec} val"] for r in rows),
            "best_for": best,
            "seconds": mean_std(r[f"{spec} s"] for r in rows)["mean"],
            "test_by_kind": {
                k: mean_std(r[f"{spec} test"] for r in rows if r["kind"] == k)["mean"]
                for k in sorted({r["kind"] for r in rows})
            },
        }
    return {
        "model": bm.info,
        "original_test_accuracy": evaluate(original, ws.data.test).top1,
        "rows": rows,
        "recipes": per,
        "load": load.summary(),
    }


def run(ctx: Context) -> dict[str, Any]:
    models = ctx.options.get("models") or ["resnet20", "dwnet"]
    budgets = ctx.options.get("budgets") or [0.1, 0.35]
    policies = int(ctx.options.get("policies") or (4 if ctx.quick else 8))
    recipes = (ctx.options.get("recipes") or "aug2,plain2,aug4,plain4").split(",")
    for spec in recipes:
        parse_recipe(spec)
    result: dict[str, Any] = {"policies": policies, "recipes": recipes, "objective": "macs", "cells": {}}
    for key in models:
        for b in budgets:
            log(ctx, f"{key} at {b:.0%} of the MACs: {policies} models, recipes {', '.join(recipes)}")
            result["cells"][f"{key}@{b:g}"] = _cell(ctx, key, float(b), policies, recipes)
    publish(ctx, "finetune", result, summarize)
    return result


def summarize(result: dict[str, Any]) -> str:
    out = []
    for cell, m in result["cells"].items():
        n = len(m["rows"])
        out.append(
            f"\n{cell}: {n} compressed models (original test {m['original_test_accuracy']:.4f}), test before "
            f"fine-tune {mean_std(r['test_before'] for r in m['rows'])['mean']:.4f}\n"
        )
        kinds = sorted(next(iter(m["recipes"].values()))["test_by_kind"])
        rows = [
            [
                spec,
                f"{r['test']['mean']:.4f} ± {r['test']['std']:.4f}",
                f"{r['val']['mean']:.4f}",
                *(fmt(r["test_by_kind"][k], ".3f") for k in kinds),
                f"{r['best_for']}/{n}",
                fmt(r["seconds"], ".1f"),
            ]
            for spec, r in m["recipes"].items()
        ]
        out.append(
            table(
                ["recipe", "test after", "val after", *(f"test: {k}" for k in kinds), "best for", "seconds"],
                rows,
            )
        )
    return "\n".join(out)
