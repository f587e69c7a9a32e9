"""Benchmark 1f, the search set: which images should a search score its candidates on?

A search keeps the candidate with the best reward, and the reward is top-1 accuracy on the search set. On digits
the validation split holds 180 images (one image = 0.56 points) while re-fitted candidates at one budget differ by a
point or two, so the choice is close to a coin toss. This benchmark measures, side by side on the same candidates,
how well each scoring set ranks them by what counts (test accuracy after the quality benchmark's fine-tune):

- ``val``: the 180 validation images (the engine's search set before ``train_top_up``);
- ``val+train 500`` / ``val+train 1000``: the validation images topped up with training images that the calibration
  batch does not use (``Workspace.search_set``; 1000 is the default now);
- ``train 1000``: training images only (AMC's practice), for comparison;
- ``val KL``: the validation images scored by the KL divergence to the original's outputs instead of top-1
  (a smoother signal on the same images; not what the engine uses).

Candidates: ``--policies`` episodes of random pruning actions through the search environment (layout prune, budget
``MACS_BUDGET`` of the original MACs by AMC's cap, channels rounded to 8): the pool a search at one budget chooses
from. Each is applied once (with the least-squares re-fit), scored by every set, then fine-tuned (2 epochs of
distillation, seed 0, as in section 1) and tested. Per set: Spearman's rho between score and fine-tuned test accuracy,
and the fine-tuned test accuracy of the candidate the set would pick out of ``POOL`` candidates, averaged over
``DRAWS`` random pools (what a search that saw those candidates would end with), against the best in each pool.
"""

from __future__ import annotations

from typing import Any

from bench.common import (
    Context,
    LoadSampler,
    bench_model,
    fmt,
    log,
    mean_std,
    picked,
    publish,
    random_pools,
    rank_correlations,
    table,
)

MACS_BUDGET = 0.35
ROUND_TO = 8
CALIB = 256
POOL = 20
DRAWS = 2000
SETS = ("val", "val+train 500", "val+train 1000", "train 1000", "val KL")


def _model(ctx: Context, key: str, policies: int, ft_epochs: int) -> dict[str, Any]:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch.utils.data import TensorDataset

    from compression.apply import apply_policy
    from compression.pipeline import open_workspace
    from compression.search.env import CompressionEnvironment, EnvSettings
    from compression.training import evaluate, fine_tune

    bm = bench_model(ctx, key)
    ws = open_workspace(bm.spec, "digits", seed=0)
    calib = ws.calibration_batch(CALIB, seed=0)
    original = ws.artifact.module.eval()
    sets = {
        "val": ws.data.val,
        "val+train 500": ws.search_set(500, CALIB, seed=0)[0],
        "val+train 1000": ws.search_set(1000, CALIB, seed=0)[0],
    }
    xt, yt = ws.data.train.tensors
    rest = torch.randperm(len(xt), generator=torch.Generator().manual_seed(0))[CALIB:][:1000]
    sets["train 1000"] = TensorDataset(xt[rest], yt[rest])
    with torch.no_grad():
        ref_val = F.log_softmax(original(ws.data.val.tensors[0]), 1)
    env = CompressionEnvironment(
        ws.graph,
        ws.data.val,
        calib,
        EnvSettings(layout="prune", objective="macs", budget=MACS_BUDGET, round_to=ROUND_TO),
    )
    rng = np.random.default_rng(1)
    rows: list[dict[str, Any]] = []
    with LoadSampler() as load:
        for i in range(policies):
            env.reset()
            done = False
            while not done:
                _, _, done, info = env.step(rng.uniform(0.0, 1.0, size=(env.action_spec.dim,)))
            policy = info["policy"]
            model = apply_policy(ws.graph, policy, calib, round_to=ROUND_TO).eval()
            row: dict[str, Any] = {"policy": i, "macs_ratio": info["metrics"]["cost_ratio"]}
            for name, data in sets.items():
                row[name] = evaluate(model, data).top1
            with torch.no_grad():
                out = F.log_softmax(model(ws.data.val.tensors[0]), 1)
            row["val KL"] = -float(F.kl_div(out, ref_val, log_target=True, reduction="batchmean"))
            row["test_before"] = evaluate(model, ws.data.test).top1
            fine_tune(model, ws.data.train, epochs=ft_epochs, teacher=original, seed=0)
            row["test_after"] = evaluate(model, ws.data.test).top1
            rows.append(row)
            log(
                ctx,
                f"{key} candidate {i + 1}/{policies}: val {row['val']:.3f}, val+train 1000 "
                f"{row['val+train 1000']:.3f}, test after fine-tune {row['test_after']:.3f}",
            )
    images = {name: len(sets[name]) if name in sets else len(ws.data.val) for name in SETS}
    return {
        "model": bm.info,
        "original_test_accuracy": evaluate(original, ws.data.test).top1,
        "rows": rows,
        **selection(rows, images),
        "load": load.summary(),
    }


def selection(rows: list[dict[str, Any]], images: dict[str, int]) -> dict[str, Any]:
    """Per scoring set: rank correlations with the test accuracies, and the fine-tuned test accuracy of the
    candidate it picks from random pools of ``POOL`` (ties go to the earlier candidate, as a search keeps its first
    best episode); and the pools' best and mean."""
    import numpy as np

    after = np.array([r["test_after"] for r in rows])
    pools = random_pools(len(rows), POOL, DRAWS)
    oracle = picked(after, after, pools)
    per_set: dict[str, Any] = {}
    for name in SETS:
        score = np.array([r[name] for r in rows])
        per_set[name] = {
            "vs_test_after": rank_correlations(score.tolist(), after.tolist()),
            "vs_test_before": rank_correlations(score.tolist(), [r["test_before"] for r in rows]),
            "picked_test_after": picked(score, after, pools),
            "images": images[name],
        }
    return {
        "sets": per_set,
        "pool": {"size": POOL, "draws": DRAWS, "best_in_pool": oracle, "mean": float(after.mean())},
        "test_after": mean_std(after.tolist()),
    }


def run(ctx: Context) -> dict[str, Any]:
    models = ctx.options.get("models") or (["resnet20"] if ctx.quick else ["resnet20", "dwnet"])
    policies = int(ctx.options.get("policies") or (12 if ctx.quick else 40))
    ft_epochs = int(ctx.opt("fine_tune_epochs", 1, 2))
    result: dict[str, Any] = {
        "policies": policies,
        "fine_tune_epochs": ft_epochs,
        "macs_budget": MACS_BUDGET,
        "round_to": ROUND_TO,
        "calib_samples": CALIB,
    }
    result["models"] = {k: _model(ctx, k, policies, ft_epochs) for k in models}
    publish(ctx, "search_set", result, summarize)
    return result


def summarize(result: dict[str, Any]) -> str:
    out = []
    for key, m in result["models"].items():
        pool = m["pool"]
        rows = [
            [
                name,
                s["images"],
                fmt(s["vs_test_after"]["spearman"], ".2f"),
                fmt(s["vs_test_before"]["spearman"], ".2f"),
                f"{s['picked_test_after']:.4f}",
            ]
            for name, s in m["sets"].items()
        ]
        out.append(
            f"\n{key}: {result['policies']} candidates at {result['macs_budget']:.0%} MACs, "
            f"{result['fine_tune_epochs']}-epoch fine-tune; test after fine-tune {m['test_after']['mean']:.4f} "
            f"± {m['test_after']['std']:.4f} (original {m['original_test_accuracy']:.4f}); best in a pool of "
            f"{pool['size']}: {pool['best_in_pool']:.4f}\n"
        )
        out.append(
            table(
                [
                    "scored on",
                    "images",
                    "Spearman(score, test after FT)",
                    "Spearman(score, test before FT)",
                    f"picked from {pool['size']}: test after FT",
                ],
                rows,
            )
        )
    return "\n".join(out)
