"""Benchmark 3, latency fidelity: the search's latency-table prediction against end-to-end measurement.

For random policies on ResNet-20/digits (a third channel pruning only, a third pruning plus 2..8-bit layers, a
third pruning with 2..8 bits on half the layers and float on the others: the kinds of policy the searches
produce), the latency the search uses (``TableLatency.total``: per-layer
table entries at the pruned shapes and bits plus a constant residual, see ``compression/search/latency.py``)
is compared with the applied policy measured end to end on the same target: by default in groups of five policies
side by side with the original (``targets.compare_models``, ``--rounds`` blocks, default 3; session 8), or with
``--measure separate`` each policy on its own by ``bench_model`` in interleaved rounds, the original every five
policies (the median of the rounds is the policy's latency). Reported: mean, median and
worst relative error, the signed mean (bias), the rank correlation of predicted with measured (what the
search's choices depend on), and the measurement's own spread: the within-measurement coefficient of
variation of every measurement, and the spread of the original model measured repeatedly through the run.
"""

from __future__ import annotations

import statistics
from typing import Any

from bench.common import (
    BENCH_MODELS,
    Context,
    LoadSampler,
    bench_model,
    fmt,
    log,
    mean_std,
    publish,
    rank_correlations,
    table,
    write_result,
)

POLICY_KINDS = ("prune", "joint", "mixed")  # see random_policy


def random_policy(graph, rng, kind: str, min_keep: float = 0.1, max_keep: float = 1.0):
    """A random policy: keep ratios uniform in [min_keep, max_keep] per prunable group; for ``joint`` also
    weight/activation bits uniform in 2..8 on every layer (as the joint search produces); for ``mixed`` such
    bits on half the layers, the others float (a model mixing int8 and float kernels on ONNX Runtime)."""
    from compression.policy import LayerPolicy, Policy

    layers = {}
    for name in graph.prunable_leaders:
        layers[name] = LayerPolicy(keep_ratio=float(rng.uniform(min_keep, max_keep)))
    if kind in ("joint", "mixed"):
        for name in graph.quantizable:
            if kind == "mixed" and rng.random() < 0.5:
                continue
            lp = layers.get(name, LayerPolicy())
            lp.w_bits = int(rng.integers(2, 9))
            lp.a_bits = int(rng.integers(2, 9))
            layers[name] = lp
    return Policy(layers=layers)


def _one_target(
    ctx: Context, spec: str, target: str, n: int, rounds: int, round_to: int | None = None
) -> dict[str, Any]:
    import numpy as np

    from compression.apply import apply_policy
    from compression.costs import compute_costs
    from compression.errors import CompressionError
    from compression.pipeline import open_workspace
    from compression.search.latency import build_latency_model
    from compression.targets import bench_model, compare_models, get_target

    tspec = get_target(target)
    round_to = int(round_to or getattr(tspec, "round_to", 1) or 1)
    ws = open_workspace(spec, "digits", seed=0)
    calib = ws.calibration_batch(256, seed=0)
    x = ws.artifact.example_input(1)
    log(ctx, f"fidelity on {target}: building the search's latency model")
    latency = build_latency_model(tspec, ws.graph, ws.artifact, round_to=round_to)
    # the statistic the table sums and calibrates on (TVM: each entry's fastest run, the others the median): the
    # absolute errors compare a prediction with the same statistic of the end-to-end runs
    stat = getattr(getattr(latency, "table", None), "statistic", "median")
    # on runtimes with int8 kernels, the same measurements fitted with each transition weighted by the activation
    # it converts (``transition_weight="elements"``; the search counts each as 1): both predict every policy below
    weighted = None
    if getattr(latency, "prices_transitions", False):
        weighted = build_latency_model(
            tspec, ws.graph, ws.artifact, round_to=round_to, transition_weight="elements"
        )
    rng = np.random.default_rng(0)
    # joint on a float runtime: the quantizers' arithmetic is real work there; mixed: int8 beside float kernels
    kinds = ctx.options.get("kinds") or list(POLICY_KINDS)
    # --max-keep below 1 draws policies near the floor, where the tight budgets' searches end up
    max_keep = float(ctx.options.get("max_keep") or 1.0)
    original_runs: list[dict[str, float]] = []

    def measure_original() -> None:
        m = bench_model(ws.artifact.module, x, tspec)
        original_runs.append({"median_ms": m.median_ms, "cv": m.cv})

    drawn = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        policy = random_policy(ws.graph, rng, kind, max_keep=max_keep)
        drawn.append((kind, policy, compute_costs(ws.graph, policy, round_to)))
    if hasattr(latency, "prefetch"):
        # the policies' missing entries measured together (TVM compiles them in batches), as a search asks; the
        # fit weighted by elements reads the same table
        latency.prefetch(
            (name, c.in_channels, c.out_channels, c.w_bits, c.a_bits)
            for _, _, costs in drawn
            for name, c in costs.layers.items()
        )
    items = []
    for kind, policy, costs in drawn:
        items.append(
            {
                "kind": kind,
                "policy": policy,
                "predicted": latency.total(costs),
                "predicted_elements": weighted.total(costs) if weighted is not None else None,
                "layers": _layer_parts(latency, costs),
                "transitions": latency.transitions(costs) if hasattr(latency, "transitions") else 0.0,
                "model": apply_policy(ws.graph, policy, calib, round_to=round_to),
                "runs": [],
            }
        )
    every = 5
    side_by_side = ctx.options.get("measure", "side-by-side") != "separate"
    with LoadSampler() as load:
        if side_by_side:
            # each group of ``every`` policies with the original, side by side (``targets.compare_models``: the
            # models alternate run by run, so a slow stretch of the machine slows them alike), ``rounds`` blocks;
            # a policy's ratio is the median over blocks of its ratio to the original within the block
            for g in range(0, len(items), every):
                group = items[g : g + every]
                try:
                    c = compare_models(
                        [ws.artifact.module, *(it["model"] for it in group)],
                        x,
                        tspec,
                        bits=[None, *(it["policy"] if it["kind"] != "prune" else None for it in group)],
                        blocks=rounds,
                    )
                except CompressionError as exc:
                    for it in group:
                        it["error"] = str(exc)
                    continue
                original_runs.append({"median_ms": c.measurements[0].median_ms, "cv": c.measurements[0].cv})
                for i, it in enumerate(group, start=1):
                    it["per_round"] = list(c.block_ms[i])
                    it["stat_ms"] = c.measurements[i].statistic(stat)  # by block, as the calibration
                    it["ratios"] = list(c.block_ratios[i])
                    it["cv"] = c.measurements[i].cv
                    it["bits_run"] = str(c.measurements[i].details.get("bits_run"))
                log(
                    ctx, f"  policies {g + 1}-{g + len(group)} of {n} measured side by side with the original"
                )
        else:
            # interleaved rounds of separate measurements: a busy window of the machine costs each policy one
            # round at most, and the median of the rounds is the policy's latency. The original is measured every
            # ``every`` policies: each policy's latency is also taken relative to the mean of the original's two
            # measurements around it (the search works in such ratios: a budget is a fraction of the original)
            for r in range(rounds):
                before = len(original_runs)
                measure_original()
                for j, it in enumerate(items):
                    if "error" not in it:
                        try:
                            m = bench_model(
                                it["model"], x, tspec, bits=it["policy"] if it["kind"] != "prune" else None
                            )
                        except CompressionError as exc:
                            it["error"] = str(exc)
                        else:
                            it["runs"].append(m)
                            it.setdefault("ref", []).append(len(original_runs) - 1)
                    if (j + 1) % every == 0 or j + 1 == len(items):
                        measure_original()
                log(
                    ctx,
                    f"  round {r + 1}/{rounds}: {n} policies and {len(original_runs) - before} originals measured",
                )
            orig_ms = [o["median_ms"] for o in original_runs]
            for it in items:
                if "error" in it:
                    continue
                it["per_round"] = [m.median_ms for m in it["runs"]]
                it["stat_ms"] = statistics.median(getattr(m, f"{stat}_ms") for m in it["runs"])
                # the original's measurements just before and just after this policy's, per round
                it["ratios"] = [
                    m / ((orig_ms[k] + orig_ms[k + 1]) / 2)
                    for m, k in zip(it["per_round"], it["ref"], strict=True)
                ]
                it["cv"] = statistics.fmean(m.cv for m in it["runs"])
                it["bits_run"] = str(it["runs"][0].details.get("bits_run"))
    orig_pred = latency.total(compute_costs(ws.graph, None, round_to))
    rows: list[dict[str, Any]] = []
    for it in items:
        if "error" in it:
            rows.append({"kind": it["kind"], "predicted_ms": it["predicted"], "error": it["error"]})
            continue
        per_round = it["per_round"]
        med = statistics.median(per_round)
        stat_ms = it["stat_ms"]
        ratio = statistics.median(it["ratios"])
        pred_ratio = it["predicted"] / orig_pred
        pe = it["predicted_elements"]
        rows.append(
            {
                "kind": it["kind"],
                "predicted_ms": it["predicted"],
                "measured_ms": med,
                "measured_stat_ms": stat_ms,
                "rounds_ms": per_round,
                "round_spread": (max(per_round) - min(per_round)) / med,
                "rel_error": (it["predicted"] - stat_ms) / stat_ms,
                **({"rel_error_elements": (pe - stat_ms) / stat_ms} if pe is not None else {}),
                "predicted_ratio": pred_ratio,
                "measured_ratio": ratio,
                "ratio_rel_error": (pred_ratio - ratio) / ratio,
                "cv": it["cv"],
                "bits_run": it["bits_run"],
                "layers": it["layers"],
                "transitions": it["transitions"],
            }
        )
    ok = [r for r in rows if "rel_error" in r]
    out: dict[str, Any] = {
        "target": target,
        "round_to": round_to,
        "statistic": stat,
        "measure": "side by side" if side_by_side else "separate",
        "kinds": kinds,
        "max_keep": max_keep,
        "policies": len(rows),
        "measured": len(ok),
        "original_predicted_ms": getattr(latency, "original_ms", None),
        "calibration": _calibration_summary(getattr(latency, "calibration", None)),
        "transitions_elements_fit": (
            weighted.calibration.get("search_fit") if weighted is not None else None
        ),
        "original_measured": original_runs,
        "original_between_runs_cv": (
            statistics.stdev(r["median_ms"] for r in original_runs)
            / statistics.fmean(r["median_ms"] for r in original_runs)
            if len(original_runs) > 1
            else None
        ),
        "rows": rows,
        "load": load.summary(),
    }
    out["fits"] = compare_fits(out)
    for kind in [*kinds, "all"]:
        sel = [r for r in ok if kind == "all" or r["kind"] == kind]
        if not sel:
            continue
        abs_err = [abs(r["rel_error"]) for r in sel]
        out[kind] = {
            "n": len(sel),
            "mean_abs_rel_error": statistics.fmean(abs_err),
            "median_abs_rel_error": statistics.median(abs_err),
            "worst_abs_rel_error": max(abs_err),
            "mean_rel_error": statistics.fmean(r["rel_error"] for r in sel),
            "within_5pct": sum(1 for e in abs_err if e <= 0.05) / len(sel),
            "cv": mean_std(r["cv"] for r in sel),
            "round_spread": mean_std(r["round_spread"] for r in sel),
            "ratio_to_original": {
                "mean_abs_rel_error": statistics.fmean(abs(r["ratio_rel_error"]) for r in sel),
                "median_abs_rel_error": statistics.median(abs(r["ratio_rel_error"]) for r in sel),
                "worst_abs_rel_error": max(abs(r["ratio_rel_error"]) for r in sel),
                "mean_rel_error": statistics.fmean(r["ratio_rel_error"] for r in sel),
                "within_5pct": sum(1 for r in sel if abs(r["ratio_rel_error"]) <= 0.05) / len(sel),
                **rank_correlations([r["predicted_ratio"] for r in sel], [r["measured_ratio"] for r in sel]),
            },
            **rank_correlations([r["predicted_ms"] for r in sel], [r["measured_stat_ms"] for r in sel]),
        }
        if weighted is not None:
            err_c = [r["rel_error_elements"] for r in sel]
            out[kind]["transitions_elements"] = {
                "mean_abs_rel_error": statistics.fmean(abs(e) for e in err_c),
                "worst_abs_rel_error": max(abs(e) for e in err_c),
                "mean_rel_error": statistics.fmean(err_c),
            }
    return out


def compare_fits(res: dict[str, Any]) -> dict[str, Any] | None:
    """The same measurements priced by the fit the search uses and by the one it replaced (session 10).

    Up to session 9 the search's line ``overhead + a * F + b * Q + t * T + rest`` was one least-squares fit (in
    milliseconds) over every calibration copy; since, the float line is fitted on the float copies alone, in
    relative terms, and ``b``, ``t`` on what the quantized copies add (``TableLatency``). From the calibration's
    points and each row's per-layer parts, both predict every measured policy as a fraction of the original;
    returned per kind of policy: mean and worst |error| of that ratio, and its bias."""
    from compression.targets.table import fit_scales

    sf = (res.get("calibration") or {}).get("search_fit")
    rows = [r for r in res.get("rows", []) if "measured_ratio" in r and r.get("layers")]
    if not sf or not rows:
        return None
    fs, qs, ts = sf["float_ms"], sf["quant_delta_ms"], sf["transitions"]
    base = sf["overhead_ms"]
    ys = [m - base for m in sf["measured_ms"]]
    has_q, has_t = any(abs(q) > 1e-9 for q in qs), any(ts)
    found = fit_scales([fs] + ([qs] if has_q else []) + ([ts] if has_t else []), ys)
    fits: dict[str, tuple[float, float, float, float]] = {
        "as used": (sf["scale"], sf["quant_scale"], sf["transition_ms"], sf["rest_ms"])
    }
    if found is not None:
        sc, rest = found
        fits["one fit over all copies"] = (sc[0], sc[1] if has_q else sc[0], sc[-1] if has_t else 0.0, rest)
    out: dict[str, Any] = {}
    for name, (a, b, t, rest) in fits.items():

        def price(f: float, q: float, tr: float, a=a, b=b, t=t, rest=rest) -> float:
            return base + a * f + b * q + t * tr + rest

        original = price(fs[0], 0.0, 0.0)
        errs: dict[str, list[float]] = {}
        for r in rows:
            f = sum(v[4] for v in r["layers"].values())
            q = sum(v[5] for v in r["layers"].values())
            e = (price(f, q, r.get("transitions", 0.0)) / original - r["measured_ratio"]) / r[
                "measured_ratio"
            ]
            errs.setdefault(r["kind"], []).append(e)
            errs.setdefault("all", []).append(e)
        out[name] = {
            "fit": {"scale": a, "quant_scale": b, "transition_ms": t, "rest_ms": rest},
            **{
                k: {
                    "n": len(v),
                    "mean_abs_rel_error": statistics.fmean(abs(e) for e in v),
                    "worst_abs_rel_error": max(abs(e) for e in v),
                    "mean_rel_error": statistics.fmean(v),
                }
                for k, v in errs.items()
            },
        }
    return out


def _layer_parts(latency, costs) -> dict[str, list[float]] | None:
    """Per layer of a policy: [in channels, out channels, weight bits, activation bits, float part, quantization
    part] (the parts unscaled, as ``TableLatency._parts``), for studying where predictions go wrong."""
    parts = getattr(latency, "_parts", None)
    if parts is None:
        return None
    return {
        n: [
            c.in_channels,
            c.out_channels,
            c.w_bits,
            c.a_bits,
            *parts(n, c.in_channels, c.out_channels, c.w_bits, c.a_bits),
        ]
        for n, c in costs.layers.items()
    }


def _calibration_summary(cal: dict[str, Any] | None) -> dict[str, Any] | None:
    """The latency model's calibration: the models measured, the fitted line and its residuals."""
    if not cal:
        return None
    keep = ("scale", "offset_ms", "points", "residuals", "search_fit", "warning")
    return {k: cal[k] for k in keep if k in cal}


def rounding(ctx: Context, spec: str, target: str, n: int, rounds: int) -> dict[str, Any]:
    """Does channel rounding change real latency? The same random keep ratios applied with round_to 1, 8
    and 16, every model measured side by side (interleaved rounds) with the original."""
    import numpy as np

    from compression.apply import apply_policy
    from compression.costs import compute_costs
    from compression.pipeline import open_workspace
    from compression.search.latency import build_latency_model
    from compression.targets import bench_model, get_target

    tspec = get_target(target)
    ws = open_workspace(spec, "digits", seed=0)
    calib = ws.calibration_batch(256, seed=0)
    x = ws.artifact.example_input(1)
    rng = np.random.default_rng(1)
    steps = (1, 8, 16)
    lat = {rt: build_latency_model(tspec, ws.graph, ws.artifact, round_to=rt) for rt in steps}
    # predictions are of the statistic the table sums (TVM: the fastest run): errors compare like with like
    stat = getattr(getattr(lat[1], "table", None), "statistic", "median")
    models = {"original": ws.artifact.module}
    predicted: dict[str, float] = {"original": lat[1].total(compute_costs(ws.graph, None))}
    macs: dict[str, int] = {"original": compute_costs(ws.graph, None).macs}
    for i in range(n):
        policy = random_policy(ws.graph, rng, "prune")
        for rt in steps:
            costs = compute_costs(ws.graph, policy, rt)
            models[f"p{i}/r{rt}"] = apply_policy(ws.graph, policy, calib, round_to=rt)
            predicted[f"p{i}/r{rt}"] = lat[rt].total(costs)
            macs[f"p{i}/r{rt}"] = costs.macs
    log(ctx, f"rounding: {len(models)} models x {rounds} interleaved rounds on {target}")
    times: dict[str, list[float]] = {k: [] for k in models}
    stat_times: dict[str, list[float]] = {k: [] for k in models}
    with LoadSampler() as load:
        for _ in range(rounds):
            for k, m in models.items():
                meas = bench_model(m, x, tspec)
                times[k].append(meas.median_ms)
                stat_times[k].append(getattr(meas, f"{stat}_ms"))
    med = {k: statistics.median(v) for k, v in times.items()}
    by_stat = {k: statistics.median(v) for k, v in stat_times.items()}
    rows = []
    for rt in steps:
        keys = [f"p{i}/r{rt}" for i in range(n)]
        rows.append(
            {
                "round_to": rt,
                "measured_ratio": mean_std(med[k] / med["original"] for k in keys),
                "predicted_ratio": mean_std(predicted[k] / predicted["original"] for k in keys),
                "mean_abs_rel_error": statistics.fmean(
                    abs(predicted[k] - by_stat[k]) / by_stat[k] for k in keys
                ),
                "macs_ratio": mean_std(macs[k] / macs["original"] for k in keys),
                # the same policies rounded to 1: latency and MACs of this rounding over that one, per policy, and
                # how often this rounding measured faster despite keeping at least as many channels
                "latency_vs_round_1": mean_std(med[k] / med[f"p{i}/r1"] for i, k in enumerate(keys)),
                "macs_vs_round_1": mean_std(macs[k] / macs[f"p{i}/r1"] for i, k in enumerate(keys)),
                "faster_than_round_1": sum(med[k] < med[f"p{i}/r1"] for i, k in enumerate(keys)) / n,
            }
        )
    return {
        "target": target,
        "policies": n,
        "rounds": rounds,
        "statistic": stat,
        "rows": rows,
        "medians_ms": med,
        "load": load.summary(),
    }


def run(ctx: Context) -> dict[str, Any]:
    """Run the fidelity benchmark and write ``bench/results/fidelity[-quick].json``."""
    n = int(ctx.opt("policies", 16, 50))
    rounds = int(ctx.opt("rounds", 2, 3))
    # (target, channel rounding): the target's own rounding, and multiples of 8 / 16 (ONNX Runtime's blocked
    # NCHWc layout works in blocks of 8 channels on AVX2 and 16 on AVX-512; TVM's default schedules
    # vectorise by 8 or more)
    if ctx.options.get("target"):
        configs = [(ctx.options["target"], ctx.options.get("round_to"))]
    elif ctx.quick:
        configs = [("local-ort", None), ("local-ort", 16)]
    else:
        configs = [("local-ort", None), ("local-ort", 8), ("local-ort", 16), ("local-tvm", 8)]
    # --model: a .pt2 path, or one of the benchmarks' own trained models by name (resnet20, dwnet)
    model = ctx.options.get("model") or "resnet20"
    spec = bench_model(ctx, model).spec if model in BENCH_MODELS else model
    result: dict[str, Any] = {"model": spec, "policies": n, "rounds": rounds, "targets": {}}
    for t, rt in configs:
        label = t if rt is None else f"{t} round_to={rt}"
        try:
            result["targets"][label] = _one_target(ctx, spec, t, n, rounds, round_to=rt)
        except Exception as exc:
            log(ctx, f"fidelity on {label} failed: {type(exc).__name__}: {exc}")
            result["targets"][label] = {"error": f"{type(exc).__name__}: {exc}"}
        write_result(ctx, "fidelity", result)
    if not ctx.options.get("target") or ctx.options.get("rounding"):
        # the channel-rounding study: on ONNX Runtime by default, on --target with --rounding
        where = ctx.options.get("target") or "local-ort"
        try:
            result["rounding"] = rounding(ctx, spec, where, 6 if ctx.quick else 12, 3 if ctx.quick else 5)
        except Exception as exc:
            result["rounding"] = {"error": f"{type(exc).__name__}: {exc}"}
    publish(ctx, "fidelity", result, summarize)
    return result


def summarize(r: dict[str, Any]) -> str:
    """Markdown table of a fidelity result."""
    rows = []
    for t, res in r["targets"].items():
        if "error" in res:
            rows.append([t, "error: " + res["error"][:80], *[""] * 13])
            continue
        for kind in ("prune", "joint", "mixed", "all"):
            s = res.get(kind)
            if not s:
                continue
            rows.append(
                [
                    f"{t} (by the {res.get('statistic', 'median')})",
                    kind,
                    s["n"],
                    f"{s['mean_abs_rel_error']:.1%}",
                    f"{s['ratio_to_original']['mean_abs_rel_error']:.1%}"
                    if "ratio_to_original" in s
                    else "-",
                    (
                        f"{s['transitions_elements']['mean_abs_rel_error']:.1%}"
                        if "transitions_elements" in s
                        else "-"
                    ),
                    f"{s['median_abs_rel_error']:.1%}",
                    f"{s['worst_abs_rel_error']:.1%}",
                    f"{s['mean_rel_error']:+.1%}",
                    f"{s['within_5pct']:.0%}",
                    fmt(s["spearman"], ".3f"),
                    f"{s['cv']['mean']:.2f}",
                    f"{s['round_spread']['mean']:.2f}" if "round_spread" in s else "-",
                    fmt(res["original_between_runs_cv"], ".2f"),
                    f"{res['load']['load1_mean']:.1f}",
                ]
            )
    out = table(
        [
            "target",
            "policies",
            "n",
            "mean |err|",
            "mean |err| of the ratio to the original",
            "mean |err|, transitions weighted by elements",
            "median |err|",
            "worst |err|",
            "bias",
            "within 5%",
            "Spearman",
            "CV (within)",
            "spread between rounds",
            "CV (original, between runs)",
            "load",
        ],
        rows,
    )
    rd = r.get("rounding")
    if rd and "rows" in rd:
        out += "\n\n" + table(
            [
                f"round_to ({rd.get('target', 'local-ort')})",
                "measured latency / original",
                "predicted / original",
                "mean |err|",
                "MACs / original",
                "latency / round_to 1's",
                "MACs / round_to 1's",
                "faster than round_to 1",
                "load",
            ],
            [
                [
                    row["round_to"],
                    f"{row['measured_ratio']['mean']:.3f} ± {row['measured_ratio']['std']:.3f}",
                    f"{row['predicted_ratio']['mean']:.3f} ± {row['predicted_ratio']['std']:.3f}",
                    f"{row['mean_abs_rel_error']:.1%}",
                    *(
                        [
                            f"{row['macs_ratio']['mean']:.3f}",
                            f"{row['latency_vs_round_1']['mean']:.3f} ± {row['latency_vs_round_1']['std']:.3f}",
                            f"{row['macs_vs_round_1']['mean']:.3f}",
                            f"{row['faster_than_round_1']:.0%}",
                        ]
                        if "macs_ratio" in row
                        else ["-"] * 4  # results stored before these columns
                    ),
                    f"{rd['load']['load1_mean']:.1f}",
                ]
                for row in rd["rows"]
            ],
        )
    elif rd:
        out += f"\n\nrounding: {rd.get('error')}"
    fit_rows = []
    for t, res in r["targets"].items():
        for name, f in (res.get("fits") or {}).items():
            for kind in ("prune", "joint", "mixed", "all"):
                if kind in f:
                    s = f[kind]
                    fit_rows.append(
                        [
                            t,
                            name,
                            kind,
                            s["n"],
                            f"{s['mean_abs_rel_error']:.1%}",
                            f"{s['worst_abs_rel_error']:.1%}",
                            f"{s['mean_rel_error']:+.1%}",
                        ]
                    )
    if fit_rows:
        out += (
            "\n\nThe same measurements, as ratios to the original, under each calibration fit:\n\n"
            + table(["target", "fit", "policies", "n", "mean |err|", "worst |err|", "bias"], fit_rows)
        )
    return out
