"""Shaping stored run data for display: layer order, best policy rows, Pareto fronts, the summary figures.

Plain functions over the JSON the workers stored (``Run.summary`` is the engine's report, ``Run.start_info``
its ``on_start`` info, episodes their ``to_event()`` dicts). No compression is computed here: these only
pick, order and label numbers that the engine produced. Shared by the pages and the API.
"""

from __future__ import annotations

import math
from typing import Any

from webapp.consumers import downsample_numbers
from webapp.models import Episode, Run

# Episodes drawn in the overview of one run (and per run in a comparison); more are downsampled.
OVERVIEW_MAX = 2000
COMPARE_MAX = 600


def layer_names(run: Run) -> list[str]:
    """The run's compressible layers in model order (what the heatmaps' rows are)."""
    info = run.start_info or {}
    if info.get("layers"):
        return [str(n) for n in info["layers"]]
    inspection = run.model.inspection or {}
    rows = inspection.get("layers") or []
    names = [r["name"] for r in rows if r.get("prunable") or r.get("quantizable")]
    if names:
        return names
    best = (run.best or {}).get("policy") or {}
    return list((best.get("layers") or {}).keys())


def policy_rows(
    policy: dict[str, Any] | None, names: list[str], inspection: dict[str, Any] | None
) -> list[dict]:
    """One row per layer of a policy dict: keep ratio, bits, sparsity, and the channels that remain; none without
    a policy (a run with no episode yet: not a table of unpruned float layers)."""
    if not policy:
        return []
    layers = policy.get("layers") or {}
    by_name = {r["name"]: r for r in (inspection or {}).get("layers") or []}
    order = list(names) + [n for n in layers if n not in names]
    rows = []
    for name in order:
        lp = layers.get(name) or {}
        info = by_name.get(name, {})
        keep = float(lp.get("keep_ratio", 1.0))
        out_ch = info.get("out_channels")
        rows.append(
            {
                "name": name,
                "op": info.get("op", ""),
                "keep_ratio": keep,
                "w_bits": int(lp.get("w_bits", 32)),
                "a_bits": int(lp.get("a_bits", 32)),
                "sparsity": float(lp.get("sparsity", 0.0)),
                "channels": out_ch,
                # Display only: the engine rounds to its channel multiple; report.json has the exact counts.
                "channels_kept": max(1, round(out_ch * keep)) if out_ch else None,
                "changed": bool(lp)
                and (keep < 1.0 or lp.get("w_bits", 32) != 32 or lp.get("a_bits", 32) != 32),
            }
        )
    return rows


def cost_axis(run: Run) -> tuple[str, str]:
    """(episode field, label) for the cost axis of the Pareto plot: latency when measured, else the ratio."""
    if run.target.backend != "analytic" and (run.config or {}).get("objective", "latency") == "latency":
        return "latency_ms", "latency (ms)"
    return "cost_ratio", f"{(run.config or {}).get('objective', 'cost')} / original"


def pareto_front(points: list[tuple[float, float, int]]) -> list[int]:
    """Numbers of the points (cost, accuracy, number) no other point beats in both (lower cost, higher acc)."""
    pts = sorted((p for p in points if _finite(p[0]) and _finite(p[1])), key=lambda p: (p[0], -p[1]))
    front, best_acc = [], -math.inf
    for _cost, acc, number in pts:
        if acc > best_acc:
            front.append(number)
            best_acc = acc
    return front


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def overview_episodes(run: Run, limit: int = OVERVIEW_MAX) -> tuple[list[dict[str, Any]], bool, int]:
    """The run's episodes for an overview, downsampled like the live stream does; (episodes, downsampled, total)."""
    rows = list(Episode.objects.filter(run=run).order_by("number").values_list("number", "reward", "is_best"))
    numbers, downsampled = downsample_numbers([(n, r) for n, r, _ in rows], limit)
    qs = Episode.objects.filter(run=run)
    if downsampled:
        # Every "best so far" episode (within budget) stays, so the best-so-far line and policy are exact.
        keep = set(numbers) | {n for n, _, best in rows if best}
        qs = qs.filter(number__in=keep)
    return [e.to_event() for e in qs.order_by("number")], downsampled, len(rows)


def _search_set_label(sizes: dict[str, int] | None) -> str:
    """What the search scored candidates on, e.g. "180 validation + 820 training images"."""
    if not sizes:
        return "validation subset"
    v, t = int(sizes.get("validation", 0)), int(sizes.get("training", 0))
    return f"{v} validation + {t} training images" if t else f"{v} validation images"


def _accuracy_kind(run: Any, acc: dict[str, Any], rep: dict[str, Any]) -> str:
    """What the headline accuracy is: the exported model's test accuracy (fine-tuned or not), or, before the
    search ends, the best episode's on the search set."""
    if "compressed_test" not in acc:
        return "search set, best so far"
    chosen = next((c for c in rep.get("candidates") or [] if c.get("episode") == rep.get("best_episode")), {})
    tuned = (
        int((run.config or {}).get("fine_tune_epochs") or 0) > 0 and chosen.get("fine_tune_kept") is not False
    )
    return "test, fine-tuned" if tuned else "test, not fine-tuned"


def summary_figures(run: Run) -> dict[str, Any]:
    """The headline numbers of a run, from its final report when there is one, else from the search so far.

    Keys: original_accuracy, accuracy (compressed test accuracy, or best validation accuracy while
    searching), accuracy_kind, latency_before_ms / latency_after_ms (measured end to end on the target),
    speedup, cost_ratio, size_before / size_after (bytes), macs_ratio, search_s, total_s, best_episode.
    """
    rep = run.summary or {}
    start = run.start_info or {}
    best = run.best or {}
    acc = rep.get("accuracy") or {}
    lat = rep.get("latency") or {}
    costs = rep.get("costs") or {}
    timing = rep.get("timing") or {}
    before_costs = costs.get("before") or start.get("original_costs") or {}
    after_costs = costs.get("after") or {}
    orig_m, comp_m = lat.get("original") or {}, lat.get("compressed") or {}
    out: dict[str, Any] = {
        "original_accuracy": acc.get("original_test", start.get("original_accuracy")),
        "accuracy": acc.get("compressed_test", best.get("accuracy")),
        "accuracy_kind": _accuracy_kind(run, acc, rep),
        "accuracy_final": "compressed_test" in acc,
        "search_set": _search_set_label(start.get("search_set")),
        "latency_before_ms": orig_m.get("median_ms"),
        "latency_after_ms": comp_m.get("median_ms"),
        "latency_predicted_ms": lat.get("predicted_ms", best.get("latency_ms")),
        "latency_error": lat.get("error"),
        "speedup": lat.get("speedup"),
        "cost_ratio": best.get("cost_ratio"),
        "size_before": before_costs.get("bytes"),
        "size_after": after_costs.get("bytes", best.get("bytes")),
        "macs_ratio": (costs.get("ratio") or {}).get("macs"),
        "search_s": timing.get("search_s"),
        "total_s": run.elapsed_s(),
        "best_episode": rep.get("best_episode", best.get("number")),
        "within_budget": rep.get("within_budget"),
    }
    if out["speedup"] is None and out["latency_before_ms"] and out["latency_after_ms"]:
        out["speedup"] = out["latency_before_ms"] / out["latency_after_ms"]
    if out["size_before"] and out["size_after"]:
        out["size_ratio"] = out["size_after"] / out["size_before"]
    return out


# Settings shown when comparing runs (SearchConfig keys, in display order); model/dataset/target by name.
COMPARE_KEYS = (
    "agent",
    "objective",
    "budget",
    "reward",
    "reward_params",
    "episodes",
    "seed",
    "layout",
    "budget_mode",
    "enforce_budget",
    "min_keep",
    "min_bits",
    "max_bits",
    "float_bits",
    "free_precision",
    "free_precision_groups",
    "reconstruct",
    "tune_steps",
    "round_to",
    "val_samples",
    "train_top_up",
    "calib_samples",
    "top_k",
    "device_check_rounds",
    "fine_tune_epochs",
    "fine_tune_augment",
    "agent_config",
)


def config_table(runs: list[Run]) -> list[dict[str, Any]]:
    """Rows {key, values[], differs} of the runs' settings, model/dataset/target first."""
    rows = [
        _row("model", [r.model.name for r in runs]),
        _row("dataset", [r.dataset.name for r in runs]),
        _row("target", [r.target.name for r in runs]),
    ]
    keys = list(COMPARE_KEYS) + sorted(
        {k for r in runs for k in (r.config or {})} - set(COMPARE_KEYS) - _HIDDEN
    )
    for key in keys:
        rows.append(_row(key, [(r.config or {}).get(key) for r in runs]))
    return rows


_HIDDEN = {"model", "dataset", "target", "checkpoint_every", "export_formats"}


def _row(key: str, values: list[Any]) -> dict[str, Any]:
    shown = [_fmt(v) for v in values]
    return {"key": key, "values": shown, "differs": len(set(shown)) > 1}


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, dict):
        return ", ".join(f"{k}={_fmt(x)}" for k, x in sorted(v.items())) or "—"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)
