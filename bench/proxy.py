"""Benchmark 1i, reward proxies: which score of a candidate, cheap enough for every episode, tells which policy is
best after the fine-tune?

Section 1 (session 12) found that at a tight budget the search's reward, top-1 on the search set after the
least-squares re-fit, ranks the policies a search finds above uniform pruning, and the fine-tune reversed that:
the searched policies squeeze a few layers to a tenth of their channels, which the re-fit patches and that
fine-tune (with random shifts, 1j) could not mend. This benchmark scores one pool of candidates at one budget in several ways, side by side, and
measures each score against what counts, test top-1 after the quality benchmark's fine-tune (2 epochs of
distillation on the whole training split, seed 0):

- ``refit top1`` (the reward now), ``refit KL`` (minus the KL divergence to the original's outputs): the candidate
  applied with the re-fit, scored on the search set (1000 images);
- ``plain top1``, ``plain KL``: applied without the re-fit (slice and batch-norm re-estimation only);
- ``ft<k> top1``, ``ft<k> KL``: the re-fitted candidate after ``k`` steps of the same distillation fine-tune
  (``fine_tune(steps=k)``, augmented inputs, the teacher run per batch) on the training images that are not in the
  search set (the calibration batch and the rest), so the search set stays held out (``--steps``);
- ``tune<k> top1``, ``tune<k> KL``: what the engine does with ``tune_steps=k`` (``CompressionEnvironment`` with
  its ``tune_set``, ``training.quick_tune``: the same images and loss, the teacher's outputs computed once, no
  augmentation, batch norms re-estimated over 256 images), scored as a search scores (``--tune-steps``);
- ``min keep`` and ``geo keep``: the smallest and the geometric mean keep ratio over the prunable groups (no
  accuracy at all), to see how much of the answer is structure.

Candidates (``--policies``, default 36): a third random actions through the environment (the pool random search and
a DDPG warm-up draw from; the budget enforced by AMC's cap), the rest the uniform action that fits the budget
(``CompressionEnvironment.uniform_action``) plus Gaussian noise of three sizes (the neighbourhood a search that starts
from uniform explores), and the uniform policy itself. Per score: Spearman's rho with the fine-tuned test accuracy
and the fine-tuned test accuracy of the candidate it picks from random pools of 20 (section 1f's measure), and the
time a score adds to an episode.
"""

from __future__ import annotations

import copy
import math
import time
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

CALIB = 256
SEARCH_SET = 1000
POOL = 20
DRAWS = 2000
NOISE = (0.05, 0.1, 0.2)


def _kl(model, x, ref_logp) -> float:
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        out = F.log_softmax(model(x), 1)
    return -float(F.kl_div(out, ref_logp, log_target=True, reduction="batchmean"))


def _candidates(env, rng, n: int) -> list[tuple[str, Any]]:
    """(kind, policy): random actions through the env, uniform plus noise, and uniform."""
    import numpy as np

    out: list[tuple[str, Any]] = []

    def play(actions) -> Any:
        env.reset()
        done, t, info = False, 0, {}
        while not done:
            _, _, done, info = env.step(actions(t))
            t += 1
        return info["policy"]

    dim = env.action_spec.dim
    uniform = env.uniform_action()
    out.append(("uniform", play(lambda t: uniform)))
    n_random = max(1, (n - 1) // 3)
    for _ in range(n_random):
        out.append(("random", play(lambda t: rng.uniform(0.0, 1.0, size=(dim,)))))
    i = 0
    while len(out) < n:
        sigma = NOISE[i % len(NOISE)]
        noise = [rng.normal(0.0, sigma, size=(dim,)) for _ in env.steps]
        out.append((f"uniform+N(0,{sigma})", play(lambda t, n=noise: np.clip(uniform + n[t], 0.0, 1.0))))
        i += 1
    return out


def _model(
    ctx: Context,
    key: str,
    budget: float,
    policies: int,
    steps: list[int],
    tune_steps: list[int],
    ft_epochs: int,
    round_to: int,
):
    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch.utils.data import TensorDataset

    from compression.apply import apply_policy
    from compression.pipeline import open_workspace
    from compression.search.env import CompressionEnvironment, EnvSettings
    from compression.training import evaluate, fine_tune, quick_tune

    bm = bench_model(ctx, key)
    ws = open_workspace(bm.spec, "digits", seed=0)
    calib = ws.calibration_batch(CALIB, seed=0)
    original = ws.artifact.module.eval()
    search, split = ws.search_set(SEARCH_SET, CALIB, seed=0)
    # the training images outside the search set: the calibration batch and whatever the top-up left
    xt, yt = ws.data.train.tensors
    perm = torch.randperm(len(xt), generator=torch.Generator().manual_seed(0))
    rest = torch.cat([perm[:CALIB], perm[CALIB + split["training"] :]])
    tune = TensorDataset(xt[rest], yt[rest])
    xs = search.tensors[0]
    with torch.no_grad():
        ref = F.log_softmax(original(xs), 1)
    tune_set = ws.tune_set(SEARCH_SET, CALIB, seed=0)
    assert len(tune_set) == len(rest)  # the engine's tune set is the bench's

    def settings(k: int = 0) -> EnvSettings:
        return EnvSettings(layout="prune", objective="macs", budget=budget, round_to=round_to, tune_steps=k)

    env = CompressionEnvironment(ws.graph, search, calib, settings())
    tuners = {
        k: CompressionEnvironment(ws.graph, search, calib, settings(k), tune_set=tune_set) for k in tune_steps
    }
    rng = np.random.default_rng(1)
    pool = _candidates(env, rng, policies)
    rows: list[dict[str, Any]] = []
    leaders = ws.graph.prunable_leaders
    with LoadSampler() as load:
        for i, (kind, policy) in enumerate(pool):
            keeps = [policy.layers[n].keep_ratio if n in policy.layers else 1.0 for n in leaders]
            row: dict[str, Any] = {
                "policy": i,
                "kind": kind,
                "keeps": keeps,
                "macs_ratio": env.cost_of(policy)[0] / env.cost_of(type(policy)())[0],
                "min keep": min(keeps),
                "geo keep": math.exp(sum(math.log(max(k, 1e-6)) for k in keeps) / len(keeps)),
                "seconds": {},
            }
            t0 = time.perf_counter()
            plain = apply_policy(ws.graph, policy, calib, round_to=round_to, reconstruct=False).eval()
            row["plain top1"] = evaluate(plain, search).top1
            row["plain KL"] = _kl(plain, xs, ref)
            row["seconds"]["plain"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            refit = apply_policy(ws.graph, policy, calib, round_to=round_to, reconstruct=True).eval()
            row["refit top1"] = evaluate(refit, search).top1
            row["refit KL"] = _kl(refit, xs, ref)
            row["seconds"]["refit"] = time.perf_counter() - t0
            for k in steps:
                t0 = time.perf_counter()
                m = copy.deepcopy(refit)
                fine_tune(m, tune, steps=k, teacher=original, seed=0)
                row[f"ft{k} top1"] = evaluate(m, search).top1
                row[f"ft{k} KL"] = _kl(m, xs, ref)
                row["seconds"][f"ft{k}"] = time.perf_counter() - t0
            for k, tenv in tuners.items():
                t0 = time.perf_counter()
                # the search's own scoring (it folds the batch norms; KL from the same tuned model, unfolded)
                row[f"tune{k} top1"] = tenv.evaluate_policy(policy)[0]
                row["seconds"][f"tune{k}"] = time.perf_counter() - t0
                m = apply_policy(ws.graph, policy, calib, round_to=round_to, reconstruct=True)
                quick_tune(m, *tenv._tune, steps=k, seed=0)
                row[f"tune{k} KL"] = _kl(m, xs, ref)
            row["test_before"] = evaluate(refit, ws.data.test).top1
            t0 = time.perf_counter()
            fine_tune(refit, ws.data.train, epochs=ft_epochs, teacher=original, seed=0)
            row["seconds"]["fine_tune"] = time.perf_counter() - t0
            row["test_after"] = evaluate(refit, ws.data.test).top1
            row["val_after"] = evaluate(refit, ws.data.val).top1
            rows.append(row)
            log(
                ctx,
                f"{key} candidate {i + 1}/{len(pool)} ({kind}, min keep {row['min keep']:.2f}): refit "
                f"{row['refit top1']:.3f}, plain {row['plain top1']:.3f}, "
                + ", ".join(f"ft{k} {row[f'ft{k} top1']:.3f}" for k in steps)
                + "".join(f", tune{k} {row[f'tune{k} top1']:.3f}" for k in tune_steps)
                + f" -> test after fine-tune {row['test_after']:.3f}",
            )
    scores = ["refit top1", "refit KL", "plain top1", "plain KL"]
    scores += [f"ft{k} {s}" for k in steps for s in ("top1", "KL")]
    scores += [f"tune{k} {s}" for k in tune_steps for s in ("top1", "KL")]
    scores += ["min keep", "geo keep"]
    return {
        "model": bm.info,
        "original_test_accuracy": evaluate(original, ws.data.test).top1,
        "search_set": split,
        "tune_images": len(rest),
        "rows": rows,
        **selection(rows, scores),
        "load": load.summary(),
    }


def selection(rows: list[dict[str, Any]], scores: list[str], pool: int = POOL) -> dict[str, Any]:
    """Per score: rank correlations with the fine-tuned test accuracy, the fine-tuned test accuracy of the
    candidate it picks from random pools of ``pool`` (ties to the earlier one), and the seconds it costs.
    Also the same over the candidates near uniform alone (``near``, pools of half the size): the neighbourhood
    a search that starts from uniform explores, where the random actions' easy losers do not count."""
    import numpy as np

    after = np.array([r["test_after"] for r in rows])
    pools = random_pools(len(rows), pool, DRAWS)
    per: dict[str, Any] = {}
    for name in scores:
        score = np.array([r[name] for r in rows])
        key = name.split(" ")[0]
        secs = [r["seconds"][key] for r in rows] if key in rows[0]["seconds"] else []
        if key.startswith("ft"):  # this short fine-tune comes on top of applying with the re-fit
            secs = [r["seconds"][key] + r["seconds"]["refit"] for r in rows]
        per[name] = {
            "vs_test_after": rank_correlations(score.tolist(), after.tolist()),
            "picked_test_after": picked(score, after, pools),
            "seconds": mean_std(secs)["mean"],
        }
    uniform = [r["test_after"] for r in rows if r["kind"] == "uniform"]
    near = [r for r in rows if r["kind"] != "random"]
    return {
        "scores": per,
        **({"near": selection(near, scores, pool // 2)} if len(near) < len(rows) and len(near) >= 4 else {}),
        "pool": {
            "size": pool,
            "draws": DRAWS,
            "best_in_pool": picked(after, after, pools),
            "mean": float(after.mean()),
        },
        "uniform_test_after": uniform[0] if uniform else None,
        "test_after_by_kind": {
            kind: mean_std([r["test_after"] for r in rows if r["kind"] == kind])
            for kind in {r["kind"] for r in rows}
        },
    }


def run(ctx: Context) -> dict[str, Any]:
    models = ctx.options.get("models") or ["resnet20"]
    budgets = ctx.options.get("budgets") or [0.1]
    policies = int(ctx.options.get("policies") or (10 if ctx.quick else 36))
    steps = [int(s) for s in (ctx.options.get("steps") or "16").split(",") if s and s != "none"]
    tune_steps = [int(s) for s in (ctx.options.get("tune_steps") or "4,8,16").split(",") if s and s != "none"]
    ft_epochs = int(ctx.opt("fine_tune_epochs", 1, 2))
    round_to = int(ctx.options.get("round_to") or 1)
    result: dict[str, Any] = {
        "policies": policies,
        "steps": steps,
        "tune_steps": tune_steps,
        "fine_tune_epochs": ft_epochs,
        "fine_tune_augment": False,  # the engine's default since session 13 (1j); runs before it augmented
        "objective": "macs",
        "round_to": round_to,
        "search_set_images": SEARCH_SET,
        "calib_samples": CALIB,
        "cells": {},
    }
    for key in models:
        for b in budgets:
            log(ctx, f"{key} at {b:.0%} of the MACs: {policies} candidates")
            result["cells"][f"{key}@{b:g}"] = _model(
                ctx, key, float(b), policies, steps, tune_steps, ft_epochs, round_to
            )
    publish(ctx, "proxy", result, summarize)
    return result


def summarize(result: dict[str, Any]) -> str:
    out = []
    for cell, m in result["cells"].items():
        pool = m["pool"]
        kinds = ", ".join(
            f"{k} {v['mean']:.3f} (n={v['n']})" for k, v in sorted(m["test_after_by_kind"].items())
        )
        out.append(
            f"\n{cell}: {len(m['rows'])} candidates, {result['fine_tune_epochs']}-epoch fine-tune; test after "
            f"fine-tune by kind: {kinds}; original {m['original_test_accuracy']:.4f}; best in a pool of "
            f"{pool['size']}: {pool['best_in_pool']:.4f}, pool mean {pool['mean']:.4f}\n"
        )
        near = m.get("near")
        rows = []
        for name, sc in m["scores"].items():
            row = [
                name,
                fmt(sc["vs_test_after"]["spearman"], ".2f"),
                f"{sc['picked_test_after']:.4f}",
            ]
            if near:
                nr = near["scores"][name]
                row += [fmt(nr["vs_test_after"]["spearman"], ".2f"), f"{nr['picked_test_after']:.4f}"]
            rows.append([*row, fmt(sc["seconds"], ".2f")])
        headers = ["score", "Spearman(score, test after FT)", f"picked from {pool['size']}: test after FT"]
        if near:
            out[-1] += (
                f"near uniform ({len(m['rows']) - m['test_after_by_kind']['random']['n']} candidates): best in a "
                f"pool of {near['pool']['size']}: {near['pool']['best_in_pool']:.4f}, mean {near['pool']['mean']:.4f}\n"
            )
            headers += ["near uniform: Spearman", f"near uniform: picked from {near['pool']['size']}"]
        out.append(table([*headers, "seconds per candidate"], rows))
    return "\n".join(out)
