"""Benchmark 2, search throughput: episodes per minute per agent on ResNet-20/digits, where the time goes,
and what the validation subset size does to speed and to ranking quality.

Parts:

- **per agent**: ``run_search`` for every agent (same model, target, seed, episodes), stopped when it
  enters the finalize phase. Episodes per minute = episodes / (sum of episode wall times); the episode
  time is broken down with ``EpisodeResult.timings`` (``apply_s`` prune + fake-quantize + batch-norm
  re-estimation, ``accuracy_s`` validation, ``cost_s`` the episode-end cost, ``agent_s`` act/observe/learn,
  ``env_s`` the rest of the environment: observations, and the budget cap, which prices candidate
  actions through the latency table and measures missing entries). Setup (model, data, latency table
  of the original) and the per-layer sensitivity pass are timed separately: they are paid once per run.
- **cold vs warm latency table**: the same AMC search twice with the same seed (identical episodes), first
  with an empty table cache, then with the table it filled; the difference is the cost of measuring
  table entries during a search.
- **validation subset size**: (a) ranking quality: policies from a random search are scored on validation
  subsets of several sizes, and the scores are rank-correlated (Spearman, Kendall) with accuracy on the
  disjoint test split; (b) speed: ``apply_policy`` + ``evaluate`` timed at 100/250/500/1000 samples.
- **profile**: ``cProfile`` of a few AMC episodes, the top functions by cumulative time.
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import time
from pathlib import Path
from typing import Any

from bench.common import (
    Context,
    LoadSampler,
    Recorder,
    agent_config,
    bench_search,
    fmt,
    fresh_dir,
    log,
    mean_std,
    publish,
    rank_correlations,
    resnet20_digits,
    search_floors,
    table,
    write_result,
)

AGENTS = ("amc", "haq", "galen-pq", "ajpq", "two-stage", "random", "uniform")
LAYOUT = {
    "amc": "prune",
    "haq": "bits",
    "galen-pq": "joint",
    "ajpq": "ajpq",
    "random": "prune",
    "uniform": "prune",
}
TIMING_KEYS = ("apply_s", "accuracy_s", "cost_s", "agent_s", "env_s")
BUDGET_STEPS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def pick_budget(floor: float) -> float:
    """The first of 50%, 60%, ... 100% that the layout can reach (a budget below the floor is refused)."""
    for b in BUDGET_STEPS:
        if b >= floor * 1.02:
            return b
    return 1.0


def _search(
    ctx: Context,
    model: str,
    agent: str,
    target: str,
    budget: float,
    episodes: int,
    out: Path,
    seed: int = 0,
    val_samples: int = 1000,
    round_to: int | None = None,
    sensitivity_from: Path | None = None,
) -> dict[str, Any]:
    from compression.search.results import SearchConfig

    layout = None if agent in ("two-stage", "amc", "haq", "galen-pq", "ajpq") else LAYOUT[agent]
    cfg = SearchConfig(
        model=model,
        agent=agent,
        target=target,
        objective="latency",
        budget=budget,
        episodes=episodes,
        seed=seed,
        val_samples=val_samples,
        round_to=round_to,
        layout=layout,
        agent_config=agent_config(agent, episodes),
        top_k=1,
        fine_tune_epochs=0,
        checkpoint_every=max(5, episodes),
    )
    entries_before = _table_entries(target)
    # a warm sensitivity cache: the same files, computed by an earlier run
    run = bench_search(ctx, cfg, out, agent, stop_at_finalize=True, sensitivity=sensitivity_from)
    rec, total_s, load = run.recorder, run.seconds, run.load
    eps = rec.episodes
    walls = [e.wall_time_s for e in eps]
    breakdown = {k: mean_std(e.timings.get(k) for e in eps) for k in TIMING_KEYS}
    search_start = next((t for p, t in rec.phases if p == "search"), rec.t_start)
    first_ep_wall = walls[0] if walls else 0.0
    # time from "search" phase to the end of the first episode = sensitivity pass + env build + episode 1
    pre_s = (
        (rec.t_first_episode - search_start - first_ep_wall) if rec.t_first_episode and search_start else None
    )
    return {
        "agent": agent,
        "round_to": round_to,
        "sensitivity_cached": sensitivity_from is not None,
        "layout": layout or "agent default",
        "budget": budget,
        "episodes": len(eps),
        "episodes_per_min": 60.0 * len(eps) / sum(walls) if walls and sum(walls) > 0 else None,
        "episodes_per_min_incl_setup": 60.0 * len(eps) / total_s if total_s > 0 else None,
        "episode_s": mean_std(walls),
        "breakdown_s": breakdown,
        "setup_s": rec.start_info.get("setup_s"),
        "sensitivity_and_env_build_s": pre_s,
        "total_s": total_s,
        "table_entries_measured": _table_entries(target) - entries_before,
        "meets_budget": sum(1 for e in eps if e.meets_budget),
        "load": load,
        "rewards": [e.reward for e in eps],
    }


def _table_entries(target: str) -> int:
    from compression.search.latency import table_path
    from compression.targets import LatencyTable

    return len(LatencyTable(target, table_path()))


def _ranking(
    ctx: Context, model: str, target: str, n_policies: int, sizes: list[int], draws: int, budget: float = 0.5
) -> dict[str, Any]:
    """Rank quality of validation subsets: per-sample correctness of each policy on val and test."""
    import torch

    from compression.apply import apply_policy
    from compression.pipeline import open_workspace
    from compression.policy import Policy
    from compression.search.results import SearchConfig

    # candidate policies as a search produces them: a random pruning search at the first budget the target reaches
    out = ctx.work_dir / "throughput" / "ranking-policies"
    cfg = SearchConfig(
        model=model,
        agent="random",
        layout="prune",
        target=target,
        budget=budget,
        episodes=n_policies,
        seed=7,
        top_k=1,
        fine_tune_epochs=0,
        checkpoint_every=n_policies,
    )
    rec = bench_search(ctx, cfg, out, "ranking policies", stop_at_finalize=True, sensitivity=None).recorder
    policies = [Policy.from_dict(e.policy) for e in rec.episodes]
    ws = open_workspace(model, "digits", seed=0)
    calib = ws.calibration_batch(256, seed=0)
    val_x, val_y = ws.data.val.tensors
    test_x, test_y = ws.data.test.tensors
    val_correct, test_acc = [], []
    calib_sizes = (32, 64, 128)
    calib_val: dict[int, list[float]] = {n: [] for n in calib_sizes}
    calib_s: dict[int, float] = {n: 0.0 for n in (*calib_sizes, 256)}
    for i, pol in enumerate(policies):
        t0 = time.perf_counter()
        m = apply_policy(ws.graph, pol, calib)
        calib_s[256] += time.perf_counter() - t0
        with torch.no_grad():
            val_correct.append((m(val_x).argmax(1) == val_y).float())
            test_acc.append(float((m(test_x).argmax(1) == test_y).float().mean()))
            # fewer batch-norm re-estimation samples: cheaper apply, noisier statistics
            for n in calib_sizes:
                t0 = time.perf_counter()
                mc = apply_policy(ws.graph, pol, calib[:n])
                calib_s[n] += time.perf_counter() - t0
                calib_val[n].append(float((mc(val_x).argmax(1) == val_y).float().mean()))
        if (i + 1) % 10 == 0:
            log(ctx, f"  ranking: scored {i + 1}/{len(policies)} policies")
    n_val = len(val_y)
    results = []
    for n in sizes:
        if n > n_val:
            results.append({"val_samples": n, "note": f"digits has only {n_val} validation samples"})
            continue
        rhos, taus = [], []
        for d in range(draws if n < n_val else 1):
            idx = torch.randperm(n_val, generator=torch.Generator().manual_seed(d))[:n]
            accs = [float(c[idx].mean()) for c in val_correct]
            rc = rank_correlations(accs, test_acc)
            if rc["spearman"] is not None:
                rhos.append(rc["spearman"])
                taus.append(rc["kendall"])
        results.append(
            {"val_samples": n, "draws": len(rhos), "spearman": mean_std(rhos), "kendall": mean_std(taus)}
        )
    calib_rows = [
        {
            "calib_samples": n,
            "apply_s": calib_s[n] / len(policies),
            **rank_correlations(calib_val[n], test_acc),
        }
        for n in calib_sizes
    ]
    full_val = [float(c.mean()) for c in val_correct]
    calib_rows.append(
        {
            "calib_samples": 256,
            "apply_s": calib_s[256] / len(policies),
            **rank_correlations(full_val, test_acc),
        }
    )
    return {
        "policies": len(policies),
        "calibration": calib_rows,
        "reference": f"test split ({len(test_y)} samples, disjoint from validation)",
        "validation_size": n_val,
        "test_accuracy_range": [min(test_acc), max(test_acc)],
        "sizes": results,
    }


def _timing_set(ws, n: int | None = None):
    """Images to time scoring on: the validation split, then test and training images (timing only: which
    images does not matter, only how many), the first ``n``."""
    import torch

    x = torch.cat([ws.data.val.tensors[0], ws.data.test.tensors[0], ws.data.train.tensors[0]])[:n]
    y = torch.cat([ws.data.val.tensors[1], ws.data.test.tensors[1], ws.data.train.tensors[1]])[:n]
    return torch.utils.data.TensorDataset(x, y)


def _val_speed(ctx: Context, model: str, sizes: list[int], policies: int = 4) -> dict[str, Any]:
    """apply_policy (256 calibration samples) and evaluate() timed at several validation sizes."""
    import torch

    from compression.apply import apply_policy
    from compression.pipeline import open_workspace
    from compression.policy import LayerPolicy, Policy
    from compression.training import evaluate

    ws = open_workspace(model, "digits", seed=0)
    calib = ws.calibration_batch(256, seed=0)
    full = _timing_set(ws)
    x, y = full.tensors
    leaders = ws.graph.prunable_leaders
    g = torch.Generator().manual_seed(3)
    pols = [
        Policy(
            layers={n: LayerPolicy(keep_ratio=float(0.3 + 0.7 * torch.rand(1, generator=g))) for n in leaders}
        )
        for _ in range(policies)
    ]
    rows = []
    with LoadSampler() as load:
        models = []
        t0 = time.perf_counter()
        for p in pols:
            models.append(apply_policy(ws.graph, p, calib))
        apply_s = (time.perf_counter() - t0) / len(pols)
        for n in sizes:
            # timing only: beyond the 180 validation samples, test and training images stand in (the
            # accuracy value is not used, only how long evaluating n samples takes)
            data = torch.utils.data.TensorDataset(x[:n], y[:n])
            t0 = time.perf_counter()
            for m in models:
                evaluate(m, data)
            rows.append({"val_samples": n, "accuracy_s": (time.perf_counter() - t0) / len(models)})
    return {"apply_s": apply_s, "sizes": rows, "load": load.summary()}


def _quantizer_speed(ctx: Context, model: str, policies: int = 4, rounds: int = 5) -> dict[str, Any]:
    """Scoring joint policies (every layer 2..8 bits, keep 0.3..1) on the 1000-image search set with the
    activation quantizer as it is, against the straight-through form ``x + (q - x)`` it computed at inference
    until session 11 (two more passes over each quantized layer's input; the reference below), side by side:
    the two alternate model by model, ``rounds`` times; the accuracies must agree."""
    import statistics

    import torch

    from compression.apply import apply_policy
    from compression.pipeline import open_workspace
    from compression.policy import LayerPolicy, Policy
    from compression.quant import ActQuantizer
    from compression.training import evaluate

    def straight_through(self, x):  # the inference path before session 11, kept here as the reference
        if self.bypass or self.observing:
            return ActQuantizer.forward(self, x)
        z = float(self.zero_point)
        q = x / self.scale
        q.round_().clamp_(-z, self.qmax - z).mul_(self.scale)
        return q.sub_(x).add_(x)

    ws = open_workspace(model, "digits", seed=0)
    calib = ws.calibration_batch(256, seed=0)
    data = _timing_set(ws, 1000)
    g = torch.Generator().manual_seed(5)

    def rnd(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    models = []
    for _ in range(policies):
        layers = {n: LayerPolicy(w_bits=rnd(2, 8), a_bits=rnd(2, 8)) for n in ws.graph.quantizable}
        for n in ws.graph.prunable_leaders:
            layers.setdefault(n, LayerPolicy()).keep_ratio = float(0.3 + 0.7 * torch.rand(1, generator=g))
        models.append(apply_policy(ws.graph, Policy(layers=layers), calib))
    times: dict[str, list[float]] = {"current": [], "straight-through": []}
    accs: dict[str, list[float]] = {"current": [], "straight-through": []}
    original = ActQuantizer.forward
    with LoadSampler() as load:
        for r in range(rounds):
            for m in models:
                for kind in (
                    ("current", "straight-through") if r % 2 == 0 else ("straight-through", "current")
                ):
                    ActQuantizer.forward = straight_through if kind == "straight-through" else original
                    try:
                        t0 = time.perf_counter()
                        acc = evaluate(m, data)
                        times[kind].append(time.perf_counter() - t0)
                    finally:
                        ActQuantizer.forward = original
                    if r == 0:
                        accs[kind].append(float(acc.top1))
    cur, ref = statistics.median(times["current"]), statistics.median(times["straight-through"])
    log(
        ctx,
        f"quantizer: scoring {cur:.3f} s (current) vs {ref:.3f} s (straight-through), ratio {cur / ref:.3f}",
    )
    return {
        "policies": policies,
        "rounds": rounds,
        "samples": len(data),
        "current_s": cur,
        "straight_through_s": ref,
        "ratio": cur / ref,
        "accuracies_equal": accs["current"] == accs["straight-through"],
        "accuracies": accs,
        "load": load.summary(),
    }


def _alternate(models: list[dict[str, tuple[Any, Any]]], rounds: int) -> tuple[dict[str, float], float]:
    """Score each model's variants (``{variant: (model, dataset)}``) side by side: the variants alternate model by
    model, their order flipped every round, ``rounds`` times. Returns each variant's median seconds and the largest
    top-1 difference between two variants of one model (first round)."""
    import statistics

    from compression.training import evaluate

    names = list(models[0])
    times: dict[str, list[float]] = {v: [] for v in names}
    accs: dict[str, list[float]] = {v: [] for v in names}
    for r in range(rounds):
        for pair in models:
            for v in names if r % 2 == 0 else names[::-1]:
                m, d = pair[v]
                t0 = time.perf_counter()
                acc = evaluate(m, d)
                times[v].append(time.perf_counter() - t0)
                if r == 0:
                    accs[v].append(float(acc.top1))
    diff = max(abs(p - q) for p, q in zip(*accs.values(), strict=True))
    return {v: statistics.median(t) for v, t in times.items()}, diff


def _fold_speed(ctx: Context, model: str, policies: int = 4, rounds: int = 5) -> dict[str, Any]:
    """Scoring with the batch norms folded into their convolutions (``apply.fold_batch_norms``, what the search
    does since session 11) against the model as applied, side by side (alternating, ``rounds`` times), for
    pruning policies and joint ones (every layer 2..8 bits), on the 1000-image search set."""
    import copy

    import torch

    from compression.apply import apply_policy, fold_batch_norms
    from compression.pipeline import open_workspace
    from compression.policy import LayerPolicy, Policy

    ws = open_workspace(model, "digits", seed=0)
    calib = ws.calibration_batch(256, seed=0)
    data = _timing_set(ws, 1000)
    pairs = ws.graph.conv_bn_pairs()
    g = torch.Generator().manual_seed(7)
    out: dict[str, Any] = {"pairs": len(pairs), "policies": policies, "rounds": rounds, "kinds": {}}
    with LoadSampler() as load:
        for kind in ("prune", "joint"):
            models = []
            for _ in range(policies):
                layers = {}
                if kind == "joint":
                    for n in ws.graph.quantizable:
                        b = torch.randint(2, 9, (2,), generator=g)
                        layers[n] = LayerPolicy(w_bits=int(b[0]), a_bits=int(b[1]))
                for n in ws.graph.prunable_leaders:
                    layers.setdefault(n, LayerPolicy()).keep_ratio = float(
                        0.3 + 0.7 * torch.rand(1, generator=g)
                    )
                m = apply_policy(ws.graph, Policy(layers=layers), calib)
                f = copy.deepcopy(m)
                fold_batch_norms(f, pairs)
                models.append({"as applied": (m, data), "folded": (f, data)})
            medians, diff = _alternate(models, rounds)
            a, f = medians["as applied"], medians["folded"]
            out["kinds"][kind] = {"as_applied_s": a, "folded_s": f, "ratio": f / a, "max_accuracy_diff": diff}
            log(
                ctx,
                f"fold: {kind} scoring {f:.3f} s folded vs {a:.3f} s, ratio {f / a:.3f}, accuracy diff {diff}",
            )
    out["load"] = load.summary()
    return out


def _layout_speed(ctx: Context, model: str, policies: int = 4, rounds: int = 5) -> dict[str, Any]:
    """Scoring in the channels-last memory format (what the search does since session 14 where the model allows
    it, ``training.channels_last_works``) against contiguous (NCHW) tensors, side by side: for each kind of
    policy (pruning only; joint: every layer 2..8 bits and pruned; bits only: every layer 4..8 bits, unpruned, as
    HAQ's) the same folded models are scored on the 1000-image search set both ways, alternating, ``rounds`` times,
    at the run's torch threads."""
    import copy

    import torch

    from compression.apply import apply_policy, fold_batch_norms
    from compression.pipeline import open_workspace
    from compression.policy import LayerPolicy, Policy
    from compression.training import channels_last, channels_last_works

    ws = open_workspace(model, "digits", seed=0)
    calib = ws.calibration_batch(256, seed=0)
    data = _timing_set(ws, 1000)
    data_cl = channels_last(data)
    pairs = ws.graph.conv_bn_pairs()
    g = torch.Generator().manual_seed(11)
    out: dict[str, Any] = {
        "policies": policies,
        "rounds": rounds,
        "threads": torch.get_num_threads(),
        "channels_last_works": channels_last_works(ws.graph.module, data.tensors[0]),
        "kinds": {},
    }
    with LoadSampler() as load:
        for kind in ("prune", "joint", "bits"):
            models = []
            for _ in range(policies):
                layers = {}
                if kind != "prune":
                    lo = 2 if kind == "joint" else 4
                    for n in ws.graph.quantizable:
                        b = torch.randint(lo, 9, (2,), generator=g)
                        layers[n] = LayerPolicy(w_bits=int(b[0]), a_bits=int(b[1]))
                if kind != "bits":
                    for n in ws.graph.prunable_leaders:
                        layers.setdefault(n, LayerPolicy()).keep_ratio = float(
                            0.3 + 0.7 * torch.rand(1, generator=g)
                        )
                m = apply_policy(ws.graph, Policy(layers=layers), calib)
                fold_batch_norms(m, pairs)
                cl = copy.deepcopy(m).to(memory_format=torch.channels_last)
                models.append({"nchw": (m, data), "channels-last": (cl, data_cl)})
            medians, diff = _alternate(models, rounds)
            a, c = medians["nchw"], medians["channels-last"]
            out["kinds"][kind] = {
                "nchw_s": a,
                "channels_last_s": c,
                "ratio": c / a,
                "max_accuracy_diff": diff,
            }
            log(
                ctx,
                f"layout: {kind} scoring {c:.3f} s channels-last vs {a:.3f} s NCHW, ratio {c / a:.3f}, "
                f"accuracy diff {diff}",
            )
    out["load"] = load.summary()
    return out


def _apply_speed(ctx: Context, model: str, policies: int = 8, rounds: int = 5) -> dict[str, Any]:
    """The apply step of pruning-only policies (AMC's, random search's, uniform's) as the engine runs it since
    session 15, the batch norms re-estimated in the re-fit's own pass (``apply_policy``), against the separate
    calibration pass it ran before (the same re-fit, then ``recalibrate`` over the same 256 images in batches of
    128), side by side: alternating policy by policy, the order flipped every round, ``rounds`` times. Both models
    of each policy are then scored on the 1000-image search set (top-1 and cross-entropy)."""
    import statistics

    import torch

    from compression.apply import apply_policy, recalibrate
    from compression.pipeline import open_workspace
    from compression.policy import LayerPolicy, Policy
    from compression.prune import group_keeps, prune_module
    from compression.reconstruct import reconstruct
    from compression.training import evaluate

    ws = open_workspace(model, "digits", seed=0)
    calib = ws.calibration_batch(256, seed=0)
    data = _timing_set(ws, 1000)
    g = torch.Generator().manual_seed(13)

    def separate(policy: Policy) -> torch.nn.Module:
        keeps = group_keeps(ws.graph, policy)
        m = prune_module(ws.graph, keeps)
        reconstruct(ws.graph, m, keeps, calib)
        recalibrate(m, calib)
        return m.eval()

    variants = {
        "separate calibration pass": separate,
        "in the re-fit's pass": lambda p: apply_policy(ws.graph, p, calib),
    }
    pols = []
    for _ in range(policies):
        lo = float(0.15 + 0.35 * torch.rand(1, generator=g))  # from uneven and deep to mild
        pols.append(
            Policy(
                layers={
                    n: LayerPolicy(keep_ratio=float(lo + (1 - lo) * torch.rand(1, generator=g)))
                    for n in ws.graph.prunable_leaders
                }
            )
        )
    apply_policy(ws.graph, pols[0], calib)  # the original's outputs, cached on the graph for both
    times: dict[str, list[float]] = {v: [] for v in variants}
    models: dict[str, list[Any]] = {v: [] for v in variants}
    with LoadSampler() as load:
        for r in range(rounds):
            for p in pols:
                for v in list(variants) if r % 2 == 0 else list(variants)[::-1]:
                    t0 = time.perf_counter()
                    m = variants[v](p)
                    times[v].append(time.perf_counter() - t0)
                    if r == 0:
                        models[v].append(m)
    a, b = (statistics.median(times[v]) for v in variants)
    scores = {v: [evaluate(m, data) for m in ms] for v, ms in models.items()}
    old, new = scores.values()
    out = {
        "policies": policies,
        "rounds": rounds,
        "separate_s": a,
        "in_fit_s": b,
        "ratio": b / a,
        "max_accuracy_diff": max(abs(x.top1 - y.top1) for x, y in zip(old, new, strict=True)),
        "max_loss_diff": max(abs(x.loss - y.loss) for x, y in zip(old, new, strict=True)),
        "top1": {v: [x.top1 for x in sc] for v, sc in scores.items()},
        "load": load.summary(),
    }
    log(
        ctx,
        f"apply: {b:.3f} s with the batch norms from the re-fit's pass vs {a:.3f} s with a calibration pass, "
        f"ratio {b / a:.3f}, accuracy diff {out['max_accuracy_diff']:.4f}, loss diff {out['max_loss_diff']:.4f}",
    )
    return out


def _apply_table(ap: dict[str, Any]) -> str:
    return table(
        [
            "apply step, pruning policies",
            "calibration pass s",
            "batch norms in the re-fit's pass s",
            "ratio",
            "largest accuracy change",
            "largest loss change",
            "load",
        ],
        [
            [
                f"{ap['policies']} policies x {ap['rounds']} rounds, alternating",
                f"{ap['separate_s']:.3f}",
                f"{ap['in_fit_s']:.3f}",
                f"{ap['ratio']:.3f}",
                f"{ap['max_accuracy_diff']:.4f}",
                f"{ap['max_loss_diff']:.4f}",
                f"{ap['load']['load1_mean']:.1f}",
            ]
        ],
    )


def _env_batch(value: str | None) -> Any:
    """Set COMPRESSION_TABLE_BATCH (None: unset); returns the previous value for ``_env_batch`` to restore."""
    saved = os.environ.get("COMPRESSION_TABLE_BATCH")
    if value is None:
        os.environ.pop("COMPRESSION_TABLE_BATCH", None)
    else:
        os.environ["COMPRESSION_TABLE_BATCH"] = value
    return saved


def _tvm_fill_speed(
    ctx: Context,
    model: str,
    rounds: int = 3,
    per_round: int = 3,
    episodes: int = 8,
    budget: float = 0.6,
    target: Any = "local-tvm",
    label: str = "tvm-fill",
) -> dict[str, Any]:
    """A cold TVM latency table, filled with the workloads compiled together (``TvmBackend.measure_many``, since
    session 16; on an RPC device since session 18) against one at a time as before (``COMPRESSION_TABLE_BATCH=1``).

    (a) Side by side: per round, ``per_round`` random pruning policies of the model at rounding 1 (what a TVM
    search meets) and their workloads; each method fills them into an empty table of its own, with the search's
    protocol (5 warm-up, 40 runs), the order flipped every round. Seconds per workload, and how far the two
    tables' entries for the same workloads differ (both are measurements of the same compiled code).
    (b) A cold Galen search (joint pruning and quantization: every candidate of a step is priced) of ``episodes``
    episodes on local-tvm, once each way, each from an empty table: wall time and entries measured."""
    import statistics

    import torch

    from compression.pipeline import open_workspace
    from compression.policy import LayerPolicy, Policy
    from compression.prune import group_keeps, prune_module
    from compression.targets import LatencyTable

    ws = open_workspace(model, "digits", seed=0)
    x = ws.artifact.example_input(1)
    g = torch.Generator().manual_seed(16)
    methods = {"one by one": "1", "together": None}
    base = fresh_dir(ctx.work_dir / "throughput" / label)

    def workloads_of(policies: list[Policy]) -> list[Any]:
        probe = LatencyTable(target, base / "probe.sqlite")
        out: dict[str, Any] = {}
        for p in policies:
            m = prune_module(ws.graph, group_keeps(ws.graph, p, 1))
            for w in probe.required(m, x):
                out.setdefault(w.key, w)
        return list(out.values())

    def policy() -> Policy:
        lo = float(0.15 + 0.6 * torch.rand(1, generator=g))
        return Policy(
            layers={
                n: LayerPolicy(keep_ratio=float(lo + (1 - lo) * torch.rand(1, generator=g)))
                for n in ws.graph.prunable_leaders
            }
        )

    # the process's first export and compile pay one-off warm-ups: not part of either side
    LatencyTable(target, base / "warm.sqlite", warmup=1, repeats=2).fill_workloads(
        workloads_of([policy()])[:4]
    )
    seconds: dict[str, list[float]] = {m: [] for m in methods}
    counts: list[int] = []
    diffs: list[float] = []
    with LoadSampler() as load:
        for r in range(rounds):
            ws_round = workloads_of([policy() for _ in range(per_round)])
            values: dict[str, dict[str, float]] = {}
            for name in list(methods) if r % 2 == 0 else list(methods)[::-1]:
                saved = _env_batch(methods[name])
                try:
                    t = LatencyTable(target, base / f"r{r}-{name}.sqlite", warmup=5, repeats=40)
                    t0 = time.perf_counter()
                    n = t.fill_workloads(ws_round)
                    seconds[name].append((time.perf_counter() - t0) / max(1, n))
                finally:
                    _env_batch(saved)
                values[name] = {w.key: t.lookup(t.normalize(w)) for w in ws_round}
                log(ctx, f"{label} round {r + 1}: {name}, {n} workloads, {seconds[name][-1]:.3f} s each")
            counts.append(n)
            a, b = values.values()
            diffs += [b[k] / a[k] - 1 for k in a if a[k] and b.get(k)]
    alone = statistics.median(seconds["one by one"])
    together = statistics.median(seconds["together"])
    abs_diffs = sorted(abs(d) for d in diffs)
    out: dict[str, Any] = {
        "target": target if isinstance(target, str) else {"name": target.name, **target.settings},
        "rounds": rounds,
        "workloads_per_round": counts,
        "one_by_one_s_per_workload": alone,
        "together_s_per_workload": together,
        "ratio": together / alone,
        "per_round_s": seconds,
        "entry_diff_median_abs": abs_diffs[len(abs_diffs) // 2],
        "entry_diff_p90_abs": abs_diffs[int(0.9 * (len(abs_diffs) - 1))],
        "entry_diff_mean": statistics.fmean(diffs),
        "load": load.summary(),
    }
    log(
        ctx,
        f"{label}: {together:.3f} s per workload together vs {alone:.3f} s one by one, ratio {together / alone:.3f}; "
        f"entries differ by {out['entry_diff_median_abs']:.1%} (median), {out['entry_diff_p90_abs']:.1%} (p90)",
    )
    if episodes:
        searches = {}
        saved_cache = os.environ.get("COMPRESSION_CACHE_DIR")
        for name, value in methods.items():
            os.environ["COMPRESSION_CACHE_DIR"] = str(fresh_dir(base / f"cache-{name.replace(' ', '-')}"))
            saved = _env_batch(value)
            try:
                r = _search(ctx, model, "galen-pq", "local-tvm", budget, episodes, base / f"search-{name}")
            finally:
                _env_batch(saved)
            searches[name] = {
                k: r[k]
                for k in ("total_s", "episodes", "episodes_per_min", "table_entries_measured", "meets_budget")
            }
            log(
                ctx,
                f"cold Galen search on TVM, {name}: {r['total_s']:.0f} s for {r['episodes']} episodes, "
                f"{r['table_entries_measured']} entries",
            )
        if saved_cache is None:
            os.environ.pop("COMPRESSION_CACHE_DIR", None)
        else:
            os.environ["COMPRESSION_CACHE_DIR"] = saved_cache
        out["cold_search"] = {"agent": "galen-pq", "budget": budget, **searches}
        out["cold_search"]["ratio"] = searches["together"]["total_s"] / searches["one by one"]["total_s"]
    return out


def _tvm_fill_rpc_speed(ctx: Context, model: str) -> dict[str, Any]:
    """``_tvm_fill_speed``'s side-by-side fill on an RPC device: a TVM tracker and one ``rpc_server`` started on
    loopback (the device is this CPU, reached the way a board on the network is: each batch, or each workload
    one by one, is linked into a library, uploaded, loaded and timed in a session of its own)."""
    from compression.targets.tvm_loopback import LoopbackFarm

    key = "bench-device"
    with LoopbackFarm(fresh_dir(ctx.work_dir / "throughput" / "tvm-fill-rpc-logs")) as farm:
        farm.add_server(key, timeout_s=60.0)
        log(ctx, f"tvm-fill-rpc: tracker on 127.0.0.1:{farm.port}, device {key!r} registered")
        spec = farm.spec("bench-rpc-tvm", key, timeout_s=120.0)
        return _tvm_fill_speed(ctx, model, episodes=0, target=spec, label="tvm-fill-rpc")


def _tvm_cap_speed(ctx: Context, model: str, episodes: int = 8, budget: float = 0.5) -> dict[str, Any]:
    """A cold AMC search on TVM, its binary-search cap measuring probe by probe (session 16: each probe's missing
    entries as it is asked; emulated by telling the environment every probe is priced, so it never measures ahead)
    against probes together (session 17: a probe not priced yet is measured with the probes that can follow it),
    each from an empty table, the order alternating between the two runs of each (``--rounds``, default 1 pair).
    Both fill their tables in batches where a batch has more than one entry. Wall time, entries measured, and
    whether the two searches chose the same policies (same rewards)."""
    from compression.search import env as env_module

    methods = ("probe by probe", "probes together")
    base = fresh_dir(ctx.work_dir / "throughput" / "tvm-cap")
    pairs = int(ctx.options.get("rounds") or 1)
    saved_cache = os.environ.get("COMPRESSION_CACHE_DIR")
    original = env_module.CompressionEnvironment._priced
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    try:
        for r in range(pairs):
            for name in methods if r % 2 == 0 else methods[::-1]:
                slug = f"{name.replace(' ', '-')}-{r}"
                os.environ["COMPRESSION_CACHE_DIR"] = str(fresh_dir(base / f"cache-{slug}"))
                env_module.CompressionEnvironment._priced = (
                    (lambda self, costs: True) if name == "probe by probe" else original
                )
                try:
                    res = _search(ctx, model, "amc", "local-tvm", budget, episodes, base / f"search-{slug}")
                finally:
                    env_module.CompressionEnvironment._priced = original
                runs[name].append(
                    {
                        k: res[k]
                        for k in ("total_s", "episodes", "table_entries_measured", "meets_budget", "rewards")
                    }
                )
                log(
                    ctx,
                    f"cold AMC search on TVM, {name}: {res['total_s']:.0f} s for {res['episodes']} episodes, "
                    f"{res['table_entries_measured']} entries",
                )
    finally:
        if saved_cache is None:
            os.environ.pop("COMPRESSION_CACHE_DIR", None)
        else:
            os.environ["COMPRESSION_CACHE_DIR"] = saved_cache
    one, two = runs[methods[0]], runs[methods[1]]
    return {
        "agent": "amc",
        "budget": budget,
        "episodes": episodes,
        "runs": runs,
        "total_s": {m: [x["total_s"] for x in runs[m]] for m in methods},
        "entries": {m: [x["table_entries_measured"] for x in runs[m]] for m in methods},
        "ratio": sum(x["total_s"] for x in two) / sum(x["total_s"] for x in one),
        "same_rewards": all(a["rewards"] == b["rewards"] for a, b in zip(one, two, strict=True)),
    }


def _tvm_cap_table(tc: dict[str, Any]) -> str:
    one, two = (tc["runs"][m] for m in ("probe by probe", "probes together"))
    rows = [
        [
            f"cold AMC search, {tc['episodes']} episodes, {tc['budget']:.0%} budget, run {i + 1}",
            f"{a['total_s']:.0f} s ({a['table_entries_measured']} entries)",
            f"{b['total_s']:.0f} s ({b['table_entries_measured']} entries)",
            f"{b['total_s'] / a['total_s']:.3f}",
        ]
        for i, (a, b) in enumerate(zip(one, two, strict=True))
    ]
    rows.append(["all runs", "", "", f"{tc['ratio']:.3f} (same rewards: {tc['same_rewards']})"])
    return table(["TVM, AMC's cap", "probe by probe", "probes together", "ratio"], rows)


def _tvm_fill_table(tf: dict[str, Any]) -> str:
    rows = [
        [
            f"fill a cold table, {tf['rounds']} rounds of {'/'.join(map(str, tf['workloads_per_round']))} workloads",
            f"{tf['one_by_one_s_per_workload']:.3f} s/workload",
            f"{tf['together_s_per_workload']:.3f} s/workload",
            f"{tf['ratio']:.3f}",
            f"entries differ {tf['entry_diff_median_abs']:.1%} median, {tf['entry_diff_p90_abs']:.1%} p90",
        ]
    ]
    cs = tf.get("cold_search")
    if cs:
        one, two = cs["one by one"], cs["together"]
        rows.append(
            [
                f"cold Galen search, {one['episodes']} episodes, {cs['budget']:.0%} budget",
                f"{one['total_s']:.0f} s ({one['table_entries_measured']} entries)",
                f"{two['total_s']:.0f} s ({two['table_entries_measured']} entries)",
                f"{cs['ratio']:.3f}",
                "",
            ]
        )
    where = tf.get("target", "local-tvm")
    where = where if isinstance(where, str) else f"{where['name']} (RPC)"
    return table([f"TVM latency table, {where}", "one by one", "compiled together", "ratio", ""], rows)


def _profile(ctx: Context, model: str, target: str, episodes: int, budget: float = 0.5) -> dict[str, Any]:
    """cProfile of a short AMC search (warm table and sensitivity), top functions by cumulative time."""
    from compression.search.loop import run_search
    from compression.search.results import SearchConfig

    out = ctx.work_dir / "throughput" / "profile"
    cfg = SearchConfig(
        model=model,
        agent="amc",
        target=target,
        budget=budget,
        episodes=episodes,
        seed=0,
        agent_config=agent_config("amc", episodes),
        top_k=1,
        fine_tune_epochs=0,
        checkpoint_every=episodes,
    )
    rec = Recorder(None, "profile", stop_at_finalize=True)
    fresh_dir(out)
    prof = cProfile.Profile()
    prof.enable()
    run_search(cfg, str(out), [rec], resume=False)
    prof.disable()
    s = io.StringIO()
    st = pstats.Stats(prof, stream=s)
    st.sort_stats("cumulative").print_stats(40)
    top = []
    for (file, line, fn), (_cc, nc, tt, ct, _) in sorted(st.stats.items(), key=lambda kv: -kv[1][3])[:60]:
        if "compression" in file or "torch_pruning" in file:
            top.append(
                {"function": f"{Path(file).name}:{line}:{fn}", "calls": nc, "cumulative_s": ct, "own_s": tt}
            )
    return {
        "episodes": len(rec.episodes),
        "episode_s": mean_std(e.wall_time_s for e in rec.episodes),
        "top": top[:25],
    }


def run(ctx: Context) -> dict[str, Any]:
    """Run the throughput benchmark and write ``bench/results/throughput[-quick].json``.

    The whole benchmark uses a latency-table cache of its own, emptied at the start, so the "cold" run
    really starts from nothing and every later run finds what the earlier ones measured (as a user's
    second run would).
    """
    saved = os.environ.get("COMPRESSION_CACHE_DIR")
    os.environ["COMPRESSION_CACHE_DIR"] = str(fresh_dir(ctx.work_dir / "throughput" / "cache"))
    try:
        return _run(ctx)
    finally:
        if saved is None:
            os.environ.pop("COMPRESSION_CACHE_DIR", None)
        else:
            os.environ["COMPRESSION_CACHE_DIR"] = saved


def _run(ctx: Context) -> dict[str, Any]:
    from compression.errors import SearchError

    target = ctx.opt("target", "local-ort", "local-ort")
    episodes = int(ctx.opt("episodes", 10, 40))
    agents = ctx.options.get("agents") or list(AGENTS)
    model = ctx.options.get("model") or resnet20_digits(ctx).spec
    # --parts layout / apply / quantizer / tvm-fill / tvm-fill-rpc / tvm-cap: only that side-by-side measurement (minutes), in a result of its own
    only = {
        "layout": {"layout": _layout_speed},
        "apply": {"apply": _apply_speed},
        "quantizer": {"quantizer": _quantizer_speed, "fold": _fold_speed},
        "tvm-fill": {"tvm_fill": _tvm_fill_speed},
        "tvm-fill-rpc": {"tvm_fill": _tvm_fill_rpc_speed},
        "tvm-cap": {"tvm_cap": _tvm_cap_speed},
    }
    parts = ctx.options.get("parts") or []
    if len(parts) == 1 and parts[0] in only:
        result = {"model": model, **{k: f(ctx, model) for k, f in only[parts[0]].items()}}
        publish(ctx, f"throughput-{parts[0]}", result, summarize)
        return result
    base = ctx.work_dir / "throughput"
    log(ctx, f"throughput: {model} on {target}, {episodes} episodes per agent")
    result: dict[str, Any] = {"target": target, "model": model, "episodes": episodes}

    # the pruning floor decides the budget (a budget below it is refused); found with a table of its own so
    # the cold run below really starts from an empty one
    saved_cache = os.environ["COMPRESSION_CACHE_DIR"]
    os.environ["COMPRESSION_CACHE_DIR"] = str(fresh_dir(base / "cache-floors"))
    try:
        floors = search_floors(model, target, None, ["prune", "bits", "joint", "ajpq"])
        floors8 = search_floors(model, target, 8, ["prune"])
    finally:
        os.environ["COMPRESSION_CACHE_DIR"] = saved_cache
    result["floors"] = floors
    budget = pick_budget(floors["prune"])
    log(
        ctx,
        f"cold latency table: AMC with an empty table (budget {budget:.0%}, the prune floor is {floors['prune']:.1%})",
    )
    cold = _search(ctx, model, "amc", target, budget, episodes, base / "cold")
    log(ctx, "warm latency table: the same search again")
    warm = _search(ctx, model, "amc", target, budget, episodes, base / "warm")
    log(ctx, "warm table and the sensitivity files of the warm run (what caching them would give)")
    cached = _search(
        ctx, model, "amc", target, budget, episodes, base / "cached", sensitivity_from=base / "warm"
    )
    result["table_cold_vs_warm"] = {"cold": cold, "warm": warm, "warm + cached sensitivity": cached}
    # channel rounding bounds the distinct layer shapes, hence the table entries a cold search measures
    saved = os.environ["COMPRESSION_CACHE_DIR"]
    os.environ["COMPRESSION_CACHE_DIR"] = str(fresh_dir(base / "cache-round8"))
    try:
        log(ctx, "cold latency table with round_to=8")
        try:
            result["table_cold_round_to_8"] = _search(
                ctx, model, "amc", target, pick_budget(floors8["prune"]), episodes, base / "cold8", round_to=8
            )
        except Exception as exc:
            result["table_cold_round_to_8"] = {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        os.environ["COMPRESSION_CACHE_DIR"] = saved

    log(
        ctx,
        "latency floors per layout: "
        + ", ".join(f"{k} {v:.1%}" for k, v in floors.items() if k in ("prune", "bits", "joint", "ajpq")),
    )
    per_agent = []
    for agent in agents:
        layout = LAYOUT.get(agent, "prune")
        budget = (
            pick_budget(floors[layout]) if agent != "two-stage" else max(0.5, pick_budget(floors["prune"]))
        )
        refused: list[float] = []
        while True:
            log(ctx, f"agent {agent} ({layout}) at budget {budget:.0%}")
            try:
                row = _search(ctx, model, agent, target, budget, episodes, base / agent)
            except SearchError as exc:
                # the search's own calibration may put the floor above this pass's (ONNX Runtime's measurements
                # are bimodal): the next budget up, so the agent's speed is still measured
                nxt = [b for b in BUDGET_STEPS if b > budget + 1e-9]
                if "cannot be reached" not in str(exc) or not nxt:
                    log(ctx, f"  {agent} failed: {exc}")
                    row = {"agent": agent, "budget": budget, "error": f"{type(exc).__name__}: {exc}"}
                else:
                    log(
                        ctx,
                        f"  {agent}: budget {budget:.0%} refused by its own calibration; trying {nxt[0]:.0%}",
                    )
                    refused.append(budget)
                    budget = nxt[0]
                    continue
            except Exception as exc:  # a failing agent is a result, not a crash
                log(ctx, f"  {agent} failed: {exc}")
                row = {"agent": agent, "budget": budget, "error": f"{type(exc).__name__}: {exc}"}
            break
        per_agent.append({**row, "refused_budgets": refused} if refused else row)
        write_result(ctx, "throughput", {**result, "agents": per_agent})
    result["agents"] = per_agent

    sizes_rank = [25, 50, 100, 180, 250, 500, 1000]
    n_pol = int(ctx.opt("policies", 20, 60))
    log(ctx, f"validation subsets: ranking quality over {n_pol} policies")
    prune_budget = pick_budget(
        floors["prune"]
    )  # 50% is below the pruning floor on some targets (ORT, rounding 16)
    result["val_ranking"] = _ranking(
        ctx, model, target, n_pol, sizes_rank, draws=5 if ctx.quick else 20, budget=prune_budget
    )
    log(ctx, "validation subsets: speed")
    result["val_speed"] = _val_speed(ctx, model, [100, 250, 500, 1000])
    log(ctx, "the activation quantizer: scoring joint policies, side by side with the straight-through form")
    result["quantizer"] = _quantizer_speed(ctx, model)
    log(ctx, "batch norms folded for scoring, side by side with the model as applied")
    result["fold"] = _fold_speed(ctx, model)
    log(ctx, "scoring channels-last, side by side with NCHW")
    result["layout"] = _layout_speed(ctx, model)
    log(ctx, "the apply step: batch norms from the re-fit's pass, side by side with a calibration pass")
    result["apply"] = _apply_speed(ctx, model)
    log(ctx, "profile of a short AMC search")
    result["profile"] = _profile(ctx, model, target, 5 if ctx.quick else 10, budget=prune_budget)
    publish(ctx, "throughput", result, summarize)
    return result


def _quantizer_table(qs: dict[str, Any]) -> str:
    return table(
        [
            "scoring joint policies (1000 images)",
            "current s",
            "straight-through s",
            "ratio",
            "same accuracies",
            "load",
        ],
        [
            [
                f"{qs['policies']} policies x {qs['rounds']} rounds, alternating",
                f"{qs['current_s']:.3f}",
                f"{qs['straight_through_s']:.3f}",
                f"{qs['ratio']:.3f}",
                "yes" if qs["accuracies_equal"] else "no",
                f"{qs['load']['load1_mean']:.1f}",
            ]
        ],
    )


def _side_by_side_table(r: dict[str, Any], first: tuple[str, str], second: tuple[str, str], what: str) -> str:
    """A side-by-side scoring result (``_fold_speed``, ``_layout_speed``) as a table; ``first``/``second`` are
    (column, key) of the two variants' seconds, ``what`` the run's setting shown per row."""
    return table(
        [
            f"scoring (1000 images{', folded' if 'threads' in r else ''})",
            first[0],
            second[0],
            "ratio",
            "largest accuracy change",
        ],
        [
            [
                f"{k} ({r['policies']} policies x {r['rounds']} rounds, {r[what]} {what})",
                f"{v[first[1]]:.3f}",
                f"{v[second[1]]:.3f}",
                f"{v['ratio']:.3f}",
                f"{v['max_accuracy_diff']:.4f}",
            ]
            for k, v in r["kinds"].items()
        ],
    )


def _fold_table(fd: dict[str, Any]) -> str:
    return _side_by_side_table(
        fd, ("as applied s", "as_applied_s"), ("batch norms folded s", "folded_s"), "pairs"
    )


def _layout_table(ly: dict[str, Any]) -> str:
    return _side_by_side_table(ly, ("NCHW s", "nchw_s"), ("channels-last s", "channels_last_s"), "threads")


def summarize(r: dict[str, Any]) -> str:
    """The Markdown tables of a throughput result."""
    if "agents" not in r:  # --parts layout, quantizer (with fold) or apply
        parts = {
            "quantizer": _quantizer_table,
            "fold": _fold_table,
            "layout": _layout_table,
            "apply": _apply_table,
            "tvm_fill": _tvm_fill_table,
            "tvm_cap": _tvm_cap_table,
        }
        return "\n\n".join(f(r[k]) for k, f in parts.items() if r.get(k))
    rows = []
    for a in r["agents"]:
        if "error" in a:
            rows.append([a["agent"], f"{a['budget']:.0%}", "error: " + a["error"][:80]] + [""] * 8)
            continue
        b = a["breakdown_s"]
        rows.append(
            [
                a["agent"],
                f"{a['budget']:.0%}",
                fmt(a["episodes_per_min"], ".1f"),
                fmt(a["episodes_per_min_incl_setup"], ".1f"),
                fmt(a["episode_s"]["mean"], ".2f"),
                *(fmt(b[k]["mean"], ".2f") for k in TIMING_KEYS),
                f"{a['load']['load1_mean']:.1f}",
            ]
        )
    out = [
        table(["agent", "budget", "ep/min", "ep/min incl. setup", "episode s", *TIMING_KEYS, "load"], rows)
    ]
    cw = dict(r["table_cold_vs_warm"])
    if r.get("table_cold_round_to_8") and "error" not in r["table_cold_round_to_8"]:
        cw["cold, round_to=8"] = r["table_cold_round_to_8"]
    out.append("")
    out.append(
        table(
            [
                "AMC run",
                "ep/min",
                "ep/min incl. setup",
                "episode s",
                "env_s",
                "entries measured",
                "setup s",
                "sensitivity s",
                "total s",
                "load",
            ],
            [
                [
                    k,
                    fmt(v["episodes_per_min"], ".1f"),
                    fmt(v["episodes_per_min_incl_setup"], ".1f"),
                    fmt(v["episode_s"]["mean"], ".2f"),
                    fmt(v["breakdown_s"]["env_s"]["mean"], ".2f"),
                    v["table_entries_measured"],
                    fmt(v["setup_s"], ".1f"),
                    fmt(v["sensitivity_and_env_build_s"], ".1f"),
                    fmt(v["total_s"], ".1f"),
                    f"{v['load']['load1_mean']:.1f}",
                ]
                for k, v in cw.items()
            ],
        )
    )
    out.append("")
    rk = r["val_ranking"]
    out.append(
        table(
            ["val samples", "Spearman", "Kendall", "draws"],
            [
                [
                    s["val_samples"],
                    s.get("note") or f"{s['spearman']['mean']:.3f} ± {s['spearman']['std']:.3f}",
                    "" if "note" in s else f"{s['kendall']['mean']:.3f} ± {s['kendall']['std']:.3f}",
                    s.get("draws", ""),
                ]
                for s in rk["sizes"]
            ],
        )
    )
    if rk.get("calibration"):
        out.append("")
        out.append(
            table(
                ["calib samples", "apply s", "Spearman (val 180 vs test)", "Kendall"],
                [
                    [
                        c["calib_samples"],
                        f"{c['apply_s']:.3f}",
                        fmt(c["spearman"], ".3f"),
                        fmt(c["kendall"], ".3f"),
                    ]
                    for c in rk["calibration"]
                ],
            )
        )
    sp = r["val_speed"]
    out.append("")
    out.append(
        table(
            ["val samples", "evaluate s", "apply s"],
            [[s["val_samples"], f"{s['accuracy_s']:.3f}", f"{sp['apply_s']:.3f}"] for s in sp["sizes"]],
        )
    )
    if r.get("quantizer"):
        out += ["", _quantizer_table(r["quantizer"])]
    if r.get("fold"):
        out += ["", _fold_table(r["fold"])]
    if r.get("layout"):
        out += ["", _layout_table(r["layout"])]
    if r.get("apply"):
        out += ["", _apply_table(r["apply"])]
    return "\n".join(out)
