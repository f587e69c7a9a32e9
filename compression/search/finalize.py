"""After the search: fine-tune the best policies, pick by validation accuracy, export, measure on the target.

The top ``top_k`` distinct policies by reward that meet the budget are applied, fine-tuned for
``fine_tune_epochs`` (distilling from the uncompressed model) and scored on the validation and test splits; the
chosen one is the best on validation (the test split only reports). A fine-tune that lowers a candidate's
validation accuracy is undone: with reconstruction a candidate can start close to the original, and a short
fine-tune at the default learning rate sometimes disturbs it more than it helps (docs/BENCHMARKS.md, 1d). It is
exported (``.pt2``, ONNX, int8 ONNX where it applies, the TVM library
for TVM targets) and both the original and the compressed model are measured end to end on the target,
which also checks the latency table's prediction for that policy.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from typing import TYPE_CHECKING, Any

from compression.apply import apply_policy
from compression.errors import CompressionError
from compression.policy import Policy
from compression.search.results import EpisodeResult
from compression.training import evaluate, fine_tune

if TYPE_CHECKING:
    from compression.search.loop import SearchRun

log = logging.getLogger("compression.search")

# measured end to end, the compressed model may exceed a latency budget by this much (measurement noise) before the
# report says the budget was not met on the device
BUDGET_SLACK = 0.10


class Cancelled(Exception):
    """A callback asked the finalize phase to stop."""


def pick_candidates(episodes: list[EpisodeResult], k: int) -> tuple[list[EpisodeResult], bool]:
    """The top-k distinct policies by reward; (candidates, within_budget)."""
    ok = [e for e in episodes if e.meets_budget]
    within = bool(ok)
    pool = sorted(ok or episodes, key=lambda e: (-e.reward, e.episode))
    seen, out = set(), []
    for e in pool:
        key = json.dumps(e.policy["layers"], sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        out.append(e)
        if len(out) == k:
            break
    return out, within


def finalize(run: SearchRun, episodes: list[EpisodeResult], *, search_s: float) -> dict[str, Any]:
    """Fine-tune, test, export and measure the best policies of a finished search; write report.json."""
    cfg = run.config
    emit = run.emit
    ws = run.ws
    out_dir = run.out_dir
    candidates, within_budget = pick_candidates(episodes, cfg.top_k)
    emit.on_phase("finalize", {"candidates": [c.episode for c in candidates], "within_budget": within_budget})
    original = ws.artifact.module
    orig_test = evaluate(original, ws.data.test)
    scored = []
    best_model = None
    t0 = time.perf_counter()
    for cand in candidates:
        if emit.should_stop():
            raise Cancelled()
        policy = Policy.from_dict(cand.policy)
        model = apply_policy(ws.graph, policy, run.calib, round_to=run.round_to, reconstruct=cfg.reconstruct)
        before = evaluate(model, ws.data.test).top1
        val_before = evaluate(model, ws.data.val).top1
        kept_fine_tune = None
        if cfg.fine_tune_epochs > 0:
            start = copy.deepcopy(model.state_dict())
            fine_tune(model, ws.data.train, epochs=cfg.fine_tune_epochs, teacher=original, seed=cfg.seed)
            kept_fine_tune = evaluate(model, ws.data.val).top1 >= val_before
            if not kept_fine_tune:
                model.load_state_dict(start)
                log.info(
                    "candidate episode %d: fine-tuning lowered validation accuracy; kept as applied",
                    cand.episode,
                )
        val = evaluate(model, ws.data.val).top1
        test = evaluate(model, ws.data.test)
        entry = {
            "episode": cand.episode,
            "reward": cand.reward,
            "search_accuracy": cand.accuracy,  # what the reward saw: the search set (validation + top-up)
            "val_accuracy_after_fine_tune": val,
            "val_accuracy_before_fine_tune": val_before,
            "fine_tune_kept": kept_fine_tune,
            "test_accuracy_before_fine_tune": before,
            "test_accuracy": test.top1,
            "test_top5": test.top5,
            "cost_ratio": cand.cost_ratio,
            "latency_ms_predicted": cand.latency_ms,
        }
        scored.append(entry)
        log.info(
            "candidate episode %d: validation top-1 %.4f, test top-1 %.4f after fine-tuning",
            cand.episode,
            val,
            test.top1,
        )
        # chosen on the validation split; the test split only reports (choosing on it would overstate it)
        if best_model is None or val > max(s["val_accuracy_after_fine_tune"] for s in scored[:-1]):
            best_model, best_cand = model, cand
    finalize_s = time.perf_counter() - t0
    if best_model is None:
        raise CompressionError("the search produced no episode to finalize", "run at least one episode")
    chosen = next(s for s in scored if s["episode"] == best_cand.episode)
    policy = Policy.from_dict(best_cand.policy)
    with open(os.path.join(out_dir, "best_policy.json"), "w", encoding="utf-8") as f:
        f.write(policy.to_json(indent=2))

    measured = {}
    if run.latency is not None:
        emit.on_phase("measure", {"target": run.target.name})
        measured = _measure(run, original, best_model, best_cand)

    emit.on_phase("export", {"formats": list(cfg.export_formats)})
    from compression.export import write_artifacts
    from compression.pipeline import costs_summary, versions

    report = {
        "config": cfg.to_dict(),
        "target": run.target.to_dict(),
        "round_to": run.round_to,
        "search_set": dict(run.search_set_sizes),
        "episodes": len(episodes),
        "best_episode": best_cand.episode,
        "within_budget": within_budget,
        "accuracy": {
            "original_test": orig_test.top1,
            "original_search_set": run.original_accuracy,
            "compressed_test": chosen["test_accuracy"],
            "compressed_test_before_fine_tune": chosen["test_accuracy_before_fine_tune"],
        },
        "candidates": scored,
        "costs": costs_summary(ws.graph, policy, run.round_to),
        "latency": measured,
        "timing": {"setup_s": run.setup_s, "search_s": search_s, "finalize_s": finalize_s},
        "versions": versions(),
    }
    meta = {
        "input_shape": list(ws.artifact.input_shape),
        "num_classes": ws.artifact.num_classes,
        "mean": list(ws.data.mean),
        "std": list(ws.data.std),
        "class_names": list(ws.data.class_names),
        "dataset": cfg.dataset,
        "compressed_from": cfg.model,
    }
    example = ws.data.test.tensors[0][:2].clone()
    files = write_artifacts(
        best_model,
        example,
        out_dir,
        policy=policy,
        calib=run.calib,
        report=report,
        formats=tuple(cfg.export_formats),
        meta=meta,
    )
    files += _target_library(run, best_model, example)
    report["files"] = [{k: v for k, v in f.items()} for f in files]
    with open(os.path.join(out_dir, "report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, default=str)
    return report


def _measure(run: SearchRun, original, compressed, cand: EpisodeResult) -> dict[str, Any]:
    """End-to-end latency of the original and the compressed model on the target (and table error)."""
    from compression.targets import bench_model

    x = run.ws.artifact.example_input(1)
    out: dict[str, Any] = {}
    try:
        before = bench_model(original, x, run.target)
        after = bench_model(compressed, x, run.target)
    except CompressionError as exc:
        log.warning("end-to-end measurement failed: %s", exc)
        return {"error": str(exc)}
    out["original"] = before.to_dict()
    out["compressed"] = after.to_dict()
    out["speedup"] = before.median_ms / after.median_ms if after.median_ms > 0 else None
    if cand.latency_ms:
        out["predicted_ms"] = cand.latency_ms
        out["prediction_error"] = (cand.latency_ms - after.median_ms) / after.median_ms
    cfg = run.config
    if cfg.objective == "latency" and before.median_ms > 0:
        ratio = after.median_ms / before.median_ms
        out["measured_ratio"] = ratio
        if ratio > cfg.budget * (1 + BUDGET_SLACK):
            # the search met the budget by its latency table; the device disagrees: say so, never claim it was met
            out["over_budget"] = (
                f"measured end to end at {ratio:.0%} of the original's latency, over the {cfg.budget:.0%} budget "
                f"(the latency table predicted {cand.cost_ratio:.0%}): the table is off for this model on "
                f"{run.target.name}; check the target's latency fidelity (docs/BENCHMARKS.md, section 3)"
            )
            log.warning("finalize: %s", out["over_budget"])
    return out


def _target_library(run: SearchRun, model, example) -> list[dict[str, Any]]:
    """The compiled library for a TVM target (others deploy the ONNX / .pt2 files)."""
    if run.target.backend != "tvm":
        return []
    try:
        from compression.targets.tvm_backend import export_library
    except ImportError:
        return []
    path = os.path.join(run.out_dir, "model.tvm.tar")
    try:
        info = export_library(model, example[:1], run.target, path)
    except CompressionError as exc:
        log.warning("TVM library export failed: %s", exc)
        return []
    return [
        {
            "path": path,
            "bytes": os.path.getsize(path),
            "format": "tvm",
            "note": f"TVM library for {run.target.name}" + (f" ({info})" if info else ""),
            "how": "tvm.runtime.load_module('model.tvm.tar'); relax.VirtualMachine(lib, tvm.cpu())['main'](x)",
        }
    ]
