"""Benchmark 1d, least-squares reconstruction (``compression/reconstruct.py``) against plain pruning, side by side.

The same random pruning policies (keep ratio per group uniform in [0.2, 0.9], channels rounded to 8) of the trained
ResNet-20 and (full mode) the depthwise net on digits, applied twice in the same process, with and without the
re-fit (``apply_policy(..., reconstruct=...)``). Per policy and variant:

- ``apply_s``: the time ``apply_policy`` takes (what a search episode pays), measured in alternating order;
- the reward a search would see (validation top-1 before any fine-tuning) and test top-1 before fine-tuning;
- test top-1 after the same short distillation fine-tune (``--fine-tune-epochs``, default 1, seed 0), at the
  engine's default rate (SGD 0.01) and, for the re-fitted model, also at ``LOW_LR`` (does a re-fitted candidate,
  which starts close to the original, want a gentler fine-tune?).

And per variant: the rank correlation between the reward and the fine-tuned test accuracy over the policies (does
the search's reward tell which policy ends up best?).
"""

from __future__ import annotations

import copy
import time
from typing import Any

from bench.common import (
    Context,
    LoadSampler,
    bench_model,
    fmt,
    log,
    mean_std,
    publish,
    rank_correlations,
    table,
)

ROUND_TO = 8
LOW_LR = 0.001


def _model(ctx: Context, key: str, policies: int, ft_epochs: int) -> dict[str, Any]:
    import numpy as np

    from compression.apply import apply_policy
    from compression.pipeline import open_workspace
    from compression.policy import LayerPolicy, Policy
    from compression.training import evaluate, fine_tune

    bm = bench_model(ctx, key)
    ws = open_workspace(bm.spec, "digits", seed=0)
    calib = ws.calibration_batch(256, seed=0)
    original = ws.artifact.module
    apply_policy(
        ws.graph, Policy.uniform(ws.graph.prunable_leaders, keep_ratio=0.5), calib, round_to=ROUND_TO
    )
    rng = np.random.default_rng(0)
    rows: list[dict[str, Any]] = []
    with LoadSampler() as load:
        for i in range(policies):
            keeps = {n: float(rng.uniform(0.2, 0.9)) for n in ws.graph.prunable_leaders}
            policy = Policy(layers={n: LayerPolicy(keep_ratio=k) for n, k in keeps.items()})
            row: dict[str, Any] = {"policy": i, "mean_keep": float(np.mean(list(keeps.values())))}
            order = (True, False) if i % 2 else (False, True)  # alternate, so drift hits both alike
            for rec in order:
                t0 = time.perf_counter()
                model = apply_policy(ws.graph, policy, calib, round_to=ROUND_TO, reconstruct=rec)
                apply_s = time.perf_counter() - t0
                tag = "refit" if rec else "plain"
                row[tag] = {
                    "apply_s": apply_s,
                    "reward": evaluate(model, ws.data.val).top1,
                    "test_before": evaluate(model, ws.data.test).top1,
                }
                if ft_epochs > 0:
                    if rec:  # the gentler rate first, on a copy of the same applied model
                        low = copy.deepcopy(model)
                        fine_tune(low, ws.data.train, epochs=ft_epochs, lr=LOW_LR, teacher=original, seed=0)
                        row[tag]["test_after_low_lr"] = evaluate(low, ws.data.test).top1
                    fine_tune(model, ws.data.train, epochs=ft_epochs, teacher=original, seed=0)
                    row[tag]["test_after"] = evaluate(model, ws.data.test).top1
            rows.append(row)
            log(
                ctx,
                f"{key} policy {i + 1}/{policies}: before fine-tune {row['plain']['test_before']:.3f} -> "
                f"{row['refit']['test_before']:.3f}, after {row['plain'].get('test_after', 0):.3f} -> "
                f"{row['refit'].get('test_after', 0):.3f}",
            )
    out: dict[str, Any] = {
        "model": bm.info,
        "original_test_accuracy": evaluate(original, ws.data.test).top1,
        "rows": rows,
        "load": load.summary(),
    }
    for tag in ("plain", "refit"):
        cells = [r[tag] for r in rows]
        out[tag] = {
            "apply_s": mean_std(c["apply_s"] for c in cells),
            "reward": mean_std(c["reward"] for c in cells),
            "test_before": mean_std(c["test_before"] for c in cells),
            "test_after": mean_std(c.get("test_after") for c in cells),
            "test_after_low_lr": mean_std(c.get("test_after_low_lr") for c in cells),
            "reward_vs_test_after": rank_correlations(
                [c["reward"] for c in cells], [c.get("test_after", 0.0) for c in cells]
            )
            if ft_epochs > 0
            else None,
        }
    return out


def run(ctx: Context) -> dict[str, Any]:
    models = ctx.options.get("models") or (["resnet20"] if ctx.quick else ["resnet20", "dwnet"])
    policies = int(ctx.options.get("policies") or (6 if ctx.quick else 16))
    ft_epochs = int(ctx.opt("fine_tune_epochs", 1, 1))
    result: dict[str, Any] = {"policies": policies, "fine_tune_epochs": ft_epochs, "round_to": ROUND_TO}
    result["models"] = {k: _model(ctx, k, policies, ft_epochs) for k in models}
    publish(ctx, "reconstruction", result, summarize)
    return result


def summarize(result: dict[str, Any]) -> str:
    rows = []
    for key, m in result["models"].items():
        for tag, label in (("plain", "slice + batch-norm only"), ("refit", "with least-squares re-fit")):
            c = m[tag]
            corr = c.get("reward_vs_test_after") or {}
            rows.append(
                [
                    key,
                    label,
                    f"{c['test_before']['mean']:.3f} ± {c['test_before']['std']:.3f}",
                    f"{fmt(c['test_after']['mean'])} ± {fmt(c['test_after']['std'])}",
                    fmt(corr.get("spearman"), ".2f"),
                    f"{c['apply_s']['mean']:.3f}",
                ]
            )
    head = (
        f"\n{result['policies']} random pruning policies per model (keep 0.2-0.9 per group), "
        f"{result['fine_tune_epochs']}-epoch distillation fine-tune:\n"
    )
    low = [
        f"{key}: {m['refit']['test_after_low_lr']['mean']:.3f} ± {m['refit']['test_after_low_lr']['std']:.3f}"
        for key, m in result["models"].items()
        if m["refit"].get("test_after_low_lr", {}).get("mean") is not None
    ]
    tail = f"\nre-fitted, fine-tuned at lr {LOW_LR} instead: {'; '.join(low)}\n" if low else ""
    return (
        head
        + table(
            [
                "model",
                "applied",
                "test acc. before fine-tune",
                "after fine-tune",
                "Spearman(reward, after)",
                "apply s",
            ],
            rows,
        )
        + tail
    )
