"""After the search: check the best policies on the device, fine-tune them, pick by validation accuracy, export.

The top ``top_k`` distinct policies by reward that meet the budget are the candidates. With a latency budget on a
target that measures (not the analytic one), each candidate is first **measured end to end on the device**,
side by side with the original (alternating run by run, in ``device_check_rounds`` blocks): the search met the budget by its
latency table, and a table can be wrong for some shapes (docs/BENCHMARKS.md 1g: an HAQ model priced at 59%
measured 76% on ONNX Runtime). Candidates that measure over the budget (beyond ``BUDGET_SLACK``) are dropped and
the next policies by reward are measured in their place, up to ``CHECK_BATCHES`` batches of ``top_k``; when none
fits, the ones that measured fastest are kept and the report says the budget was not met on the device.

The candidates are applied, fine-tuned for ``fine_tune_epochs`` (distilling from the uncompressed model) and
scored on the validation and test splits; the chosen one is the best on validation (the test split only
reports). A fine-tune that lowers a candidate's validation accuracy is undone: with reconstruction a candidate
can start close to the original, and a short fine-tune at the default learning rate sometimes disturbs it more
than it helps (docs/BENCHMARKS.md, 1d). It is exported (``.pt2``, ONNX, int8 ONNX where it applies, the TVM
library for TVM targets); its end-to-end latency against the original's (from the device check, or measured
now when there was none) is in the report, which also checks the latency table's prediction for that policy.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from compression.apply import apply_policy
from compression.errors import CompressionError
from compression.policy import Policy
from compression.search.results import EpisodeResult
from compression.training import evaluate, fine_tune

if TYPE_CHECKING:
    from torch import nn

    from compression.search.loop import SearchRun
    from compression.targets.base import Measurement

log = logging.getLogger("compression.search")

# measured end to end, the compressed model may exceed a latency budget by this much (measurement noise) before the
# report says the budget was not met on the device
BUDGET_SLACK = 0.10
# the device check measures at most this many batches of top_k policies (by reward) looking for ones that fit
CHECK_BATCHES = 3
# the end-to-end measurement of the chosen model when no device check measured it: blocks side by side
MEASURE_BLOCKS = 3


@dataclass
class DeviceCheck:
    """What the device said about the search's best policies (see the module docstring).

    ``candidates`` are the policies to fine-tune (those that fit, or the fastest when none did), ``ratios`` the
    measured latency over the original's per episode (median over blocks), ``rounds_ratios`` the blocks' ratios,
    ``measurements`` the (original, policy) Measurements of each episode's batch, ``original`` the original's
    median over batches, ``models`` the applied
    models of the candidates (reused by the fine-tune), ``dropped`` the episodes measured over the budget.
    """

    rounds: int
    limit: float
    candidates: list[EpisodeResult] = field(default_factory=list)
    ratios: dict[int, float] = field(default_factory=dict)
    rounds_ratios: dict[int, list[float]] = field(default_factory=dict)
    measurements: dict[int, tuple[Any, Any]] = field(default_factory=dict)
    original: Any = None
    models: dict[int, Any] = field(default_factory=dict)
    dropped: list[int] = field(default_factory=list)
    fits: bool = False
    error: str | None = None
    seconds: float = 0.0
    method: str = ""

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "rounds": self.rounds,
            "limit": self.limit,
            "measured": [
                {"episode": e, "measured_ratio": r, "rounds_ratios": self.rounds_ratios.get(e, [])}
                for e, r in self.ratios.items()
            ],
            "dropped_over_budget": list(self.dropped),
            "fits": self.fits,
            "seconds": self.seconds,
            "method": self.method,
        }
        if self.original is not None:
            out["original_ms"] = self.original.median_ms
        if self.error:
            out["error"] = self.error
        return out


class Cancelled(Exception):
    """A callback asked the finalize phase to stop."""


def pick_candidates(episodes: list[EpisodeResult], k: int) -> tuple[list[EpisodeResult], bool]:
    """The top-k distinct policies by reward, those within budget first; (candidates, within_budget).

    Episodes an agent played as probes (``candidate`` False: the uniform baseline's bisection trials that the
    budget cap changed) are never candidates, unless nothing else was played.
    """
    offered = [e for e in episodes if e.candidate] or episodes
    ok = [e for e in offered if e.meets_budget]
    within = bool(ok)
    pool = sorted(ok or offered, key=lambda e: (-e.reward, e.episode))
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
    t0 = time.perf_counter()
    original = ws.artifact.module
    candidates, within_budget = pick_candidates(episodes, cfg.top_k)
    check: DeviceCheck | None = None
    if _checks_on_device(run):
        emit.on_phase(
            "device check",
            {"target": run.target.name, "rounds": cfg.device_check_rounds, "budget": cfg.budget},
        )
        check = device_check(run, original, episodes)
        if check.candidates:
            candidates = check.candidates
    emit.on_phase("finalize", {"candidates": [c.episode for c in candidates], "within_budget": within_budget})
    orig_test = evaluate(original, ws.data.test)
    scored = []
    best_model = None
    for cand in candidates:
        if emit.should_stop():
            raise Cancelled()
        policy = Policy.from_dict(cand.policy)
        model = check.models.pop(cand.episode, None) if check is not None else None
        if model is None:
            model = apply_policy(
                ws.graph, policy, run.calib, round_to=run.round_to, reconstruct=cfg.reconstruct
            )
        before = evaluate(model, ws.data.test).top1
        val_before = evaluate(model, ws.data.val).top1
        kept_fine_tune = None
        if cfg.fine_tune_epochs > 0:
            start = copy.deepcopy(model.state_dict())
            fine_tune(
                model,
                ws.data.train,
                epochs=cfg.fine_tune_epochs,
                teacher=original,
                seed=cfg.seed,
                augment=cfg.fine_tune_augment,
            )
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
            "test_loss": test.loss,  # mean cross-entropy: finer than top-1 on a small test split
            "cost_ratio": cand.cost_ratio,
            "latency_ms_predicted": cand.latency_ms,
        }
        if check is not None and cand.episode in check.ratios:
            entry["measured_ratio"] = check.ratios[cand.episode]
        scored.append(entry)
        log.info(
            "candidate episode %d: validation top-1 %.4f, test top-1 %.4f %s",
            cand.episode,
            val,
            test.top1,
            "after fine-tuning" if cfg.fine_tune_epochs > 0 else "as applied (fine_tune_epochs 0)",
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

    measured: dict[str, Any] = {}
    if check is not None and best_cand.episode in check.measurements:
        measured = _latency_summary(
            run, *check.measurements[best_cand.episode], best_cand, ratio=check.ratios[best_cand.episode]
        )
        measured["device_check"] = check.summary()
    elif run.latency is not None:
        emit.on_phase("measure", {"target": run.target.name})
        measured = _measure(run, original, best_model, best_cand)
        if check is not None:
            measured["device_check"] = check.summary()
    if check is not None and check.candidates and not check.fits and "over_budget" in measured:
        measured["over_budget"] += (
            f". None of the {len(check.ratios)} best policies by reward measured within the budget on the device; "
            "this is the best of the fastest of them"
        )

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
            "original_test_loss": orig_test.loss,
            "compressed_test_loss": chosen["test_loss"],
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


def _checks_on_device(run: SearchRun) -> bool:
    """A latency budget on a target that measures, and the check not turned off."""
    cfg = run.config
    return cfg.objective == "latency" and cfg.device_check_rounds > 0 and run.latency is not None


def device_check(run: SearchRun, original: nn.Module, episodes: list[EpisodeResult]) -> DeviceCheck:
    """Measure the best policies by reward on the device, side by side with the original; keep those that fit.

    Policies are measured in batches of ``top_k`` (best reward first); each batch side by side with the original
    (``targets.compare_models``: on a local target the models alternate run by run, so a slow stretch of the
    machine slows them alike), in ``device_check_rounds`` blocks; a policy's ratio is the median over blocks of
    its ratio to the original in the same block.
    The check stops after the first batch with a policy that fits. A failed measurement (a dead device, a
    timeout) ends the check with ``error`` set: the caller then keeps the table's choice.
    """
    import compression.targets as targets

    cfg = run.config
    k = cfg.top_k
    limit = cfg.budget * (1 + BUDGET_SLACK)
    check = DeviceCheck(rounds=cfg.device_check_rounds, limit=limit)
    pool, _ = pick_candidates(episodes, k * CHECK_BATCHES)
    x = run.ws.artifact.example_input(1)
    t0 = time.perf_counter()
    fitting: list[EpisodeResult] = []
    measured: list[EpisodeResult] = []
    originals: list[Measurement] = []
    for start in range(0, len(pool), k):
        batch = pool[start : start + k]
        models = {
            c.episode: apply_policy(
                run.ws.graph,
                Policy.from_dict(c.policy),
                run.calib,
                round_to=run.round_to,
                reconstruct=cfg.reconstruct,
            )
            for c in batch
        }
        if run.emit.should_stop():
            raise Cancelled()
        try:
            comp = targets.compare_models(
                [original, *(models[c.episode] for c in batch)], x, run.target, blocks=check.rounds
            )
        except CompressionError as exc:
            check.error = str(exc)
            log.warning("device check failed, keeping the latency table's choice: %s", exc)
            break
        check.method = comp.method
        log.info(
            "device check: episodes %s measured side by side with the original (%s, %d blocks)",
            list(models),
            comp.method,
            check.rounds,
        )
        originals.append(comp.measurements[0])
        for i, c in enumerate(batch, start=1):
            ratio = comp.ratios[i]
            check.ratios[c.episode] = ratio
            check.rounds_ratios[c.episode] = list(comp.block_ratios[i])
            check.measurements[c.episode] = (comp.measurements[0], comp.measurements[i])
            measured.append(c)
            if ratio <= limit:
                fitting.append(c)
                check.models[c.episode] = models[c.episode]
            else:
                check.dropped.append(c.episode)
                log.info(
                    "device check: episode %d measured %.1f%% of the original (table: %.1f%%), over the %.0f%% "
                    "budget; dropped",
                    c.episode,
                    100 * ratio,
                    100 * c.cost_ratio,
                    100 * cfg.budget,
                )
        if fitting:
            break
    check.seconds = time.perf_counter() - t0
    if originals:
        check.original = sorted(originals, key=lambda m: m.median_ms)[(len(originals) - 1) // 2]
    if check.error is not None and not fitting:
        check.models.clear()
        return check  # nothing usable measured: the caller keeps the table's candidates
    if fitting:
        check.fits = True
        check.candidates = fitting
    else:
        # nothing measured within the budget: the ones closest to it, and the report says so
        check.candidates = sorted(measured, key=lambda c: check.ratios[c.episode])[:k]
        for c in check.candidates:
            check.models[c.episode] = None
        log.warning(
            "device check: none of the %d best policies measured within the %.0f%% budget (fastest: %.1f%%)",
            len(measured),
            100 * cfg.budget,
            100 * min(check.ratios.values()),
        )
    check.models = {e: m for e, m in check.models.items() if m is not None}
    return check


def _measure(run: SearchRun, original, compressed, cand: EpisodeResult) -> dict[str, Any]:
    """End-to-end latency of the original and the compressed model on the target, side by side
    (``targets.compare_models``, ``MEASURE_BLOCKS`` blocks: the ratio is the median over blocks of the two
    models' ratio in the same block, so a slow stretch of the machine slows both alike), and the table's error."""
    import compression.targets as targets

    x = run.ws.artifact.example_input(1)
    try:
        comp = targets.compare_models([original, compressed], x, run.target, blocks=MEASURE_BLOCKS)
    except CompressionError as exc:
        log.warning("end-to-end measurement failed: %s", exc)
        return {"error": str(exc)}
    out = _latency_summary(run, comp.measurements[0], comp.measurements[1], cand, ratio=comp.ratios[1])
    out["method"] = comp.method
    return out


def _latency_summary(
    run: SearchRun, before: Measurement, after: Measurement, cand: EpisodeResult, ratio: float | None = None
) -> dict[str, Any]:
    """The report's latency entry: both measurements, the speed-up, the table's error, the budget verdict.

    ``ratio`` is the compressed model's latency over the original's measured side by side (the device check's,
    or ``_measure``'s); without it, the ratio of the two medians.
    """
    out: dict[str, Any] = {}
    table = getattr(getattr(run, "latency", None), "table", None)
    if table is not None and hasattr(table, "stats"):
        out["table"] = table.stats()  # what this search measured (``busy_entries``: timed on a busy machine)
    out["original"] = before.to_dict()
    out["compressed"] = after.to_dict()
    if ratio is None and before.median_ms > 0:
        ratio = after.median_ms / before.median_ms
    out["speedup"] = 1.0 / ratio if ratio else None
    if cand.latency_ms:
        # the table predicts the statistic it sums and calibrates on (TVM: a model's fastest runs): compare like with like
        stat = getattr(table, "statistic", "median")
        measured = after.statistic(stat)
        out["predicted_ms"] = cand.latency_ms
        out["prediction_statistic"] = stat
        if measured > 0:
            out["prediction_error"] = (cand.latency_ms - measured) / measured
    cfg = run.config
    if cfg.objective == "latency" and ratio is not None:
        out["measured_ratio"] = ratio
        if ratio > cfg.budget * (1 + BUDGET_SLACK):
            # the search met the budget by its latency table; the device disagrees: say so, never claim it was met
            out["over_budget"] = (
                f"measured end to end at {ratio:.0%} of the original's latency, over the {cfg.budget:.0%} budget "
                f"(the latency table predicted {cand.cost_ratio:.0%}): the table is off for this model on "
                f"{run.target.name}; check the target's latency fidelity (docs/BENCHMARKS.md, section 3)"
            )
            if getattr(cand, "episode", None) is not None:
                out["over_budget"] = f"episode {cand.episode} " + out["over_budget"]
            busy = getattr(table, "busy_entries", 0)
            if busy:
                out["over_budget"] += (
                    f"; {busy} of the table entries this search measured were timed while other programs kept "
                    "the machine busy: search again when it is quiet, or on a dedicated device"
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
