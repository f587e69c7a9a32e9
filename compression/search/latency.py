"""Latency of a candidate policy on the target, as a sum of per-layer table lookups (for the search).

The per-target ``LatencyTable`` (``compression.targets.table``) stores measured layer workloads. For the
search, a layer's workload is the original layer's workload with its channel counts replaced by the kept
ones and its bits by the policy's, so the latency of a candidate needs no model to be built: it is a few
dictionary look-ups, and a missing entry is measured once on the target and stored for every later run.
The sum is mapped onto end-to-end time by a fit over a few measured copies of the model (``TableLatency``);
everything that is not a convolution or linear layer (additions, pooling, the runtime's per-call overhead)
is in the fit's constant. ``finalize`` confirms the chosen model end to end; ``bench/fidelity.py`` measures
the error over random policies (2% on local-tvm, docs/BENCHMARKS.md).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from compression.models.artifact import ModelArtifact
from compression.models.graph import LayerGraph
from compression.search.env import LatencyModel
from compression.targets.base import TargetSpec
from compression.targets.contention import BUSY_CORES, quiet_wait_s, wait_for_quiet

if TYPE_CHECKING:
    from compression.targets.workloads import LayerWorkload

log = logging.getLogger("compression.search")


def cache_dir() -> Path:
    """Where latency tables and tuning databases live (``COMPRESSION_CACHE_DIR``, default ~/.cache/compression)."""
    return Path(os.environ.get("COMPRESSION_CACHE_DIR", Path.home() / ".cache" / "compression"))


def table_path() -> Path:
    return cache_dir() / "latency.sqlite"


CALIBRATION_KEEPS = (0.5, 0.25)  # uniformly pruned copies measured beside the original to fit the line
CALIBRATION_BITS = 8  # the quantized copies (original and half-pruned) run every layer at this many bits
MIN_KEEP = 0.1  # the search's default min_keep: the most pruned model the line must still predict sensibly
# End-to-end measurements per calibration model (the median is kept). ONNX Runtime's sessions of one model differ by
# 10-20% (measured: the original ResNet-20 0.65-0.96 ms over five interleaved rounds), TVM's by ~1%.
CALIBRATION_ROUNDS = {"onnxruntime": 5}
CALIBRATION_REUSE_S = 3600.0  # a search reuses calibration measurements this recent (same model, same target)
# how TableLatency weighs an int8/float transition (see TableLatency.transitions); the first is the default
TRANSITION_WEIGHTS = ("count", "elements")


class TableLatency(LatencyModel):
    """``LatencyModel`` backed by a per-target ``LatencyTable`` (see the module docstring).

    A layer's latency is split into its float part ``F`` (the float entry at the pruned shape, less the
    per-call overhead) and, when quantized, the difference ``Q`` its bits make on this target (the entry at
    the bits the backend runs, minus the float entry: int8 kernels on ONNX Runtime, or the fake-quantizer's
    arithmetic on a runtime that computes in float; negative when quantizing is faster).

    Per-entry timings miss what the runtime does across layers (fusions, boundary costs, per-operation
    costs that do not shrink with the channels), so the table is calibrated in the search's own terms:
    the original model, uniformly pruned copies (``CALIBRATION_KEEPS``, rounded like the search) and, for a
    search that quantizes, copies at ``CALIBRATION_BITS`` bits are measured end to end once, and
    ``measured = overhead + a * F + b * Q + rest`` is fitted over them in two steps, in relative terms (each
    point weighted by 1 / measured: the search prices a policy as a fraction of the original): the float line
    ``a``, ``rest`` from the float copies alone, then ``b`` from what the quantized copies measure beyond that
    line. (One fit over all the copies let the quantized ones bend the float line, and a joint search priced
    pruned policies ~4% low as fractions of the original on TVM; docs/BENCHMARKS.md 3, session 10.) ``rest``
    holds the residual operations (additions, pooling) and per-operation costs.

    **Runtimes with int8 kernels** (ONNX Runtime: ``bits_run`` gives int8 for <= 8 bits) run a model in two
    kinds of kernels, and the per-layer sum misses what ties them: a one-layer int8 entry pays its own
    quantize/dequantize and layout conversions at both ends, which a layer inside a run of int8 layers does
    not, while every edge from a float layer to an int8 one (or back, or from the input / to the output) pays
    them once. Measured on ResNet-20/digits: every layer int8 0.60 ms, the float original 0.76 ms, every other
    layer int8 1.23 ms, which the per-layer sum priced below the original. There, ``F`` is the float entries of
    the float layers, ``Q`` the int8 entries of the int8 layers, and ``T`` the number of such transitions
    (``transitions``, from ``LayerGraph.producers``): ``measured = overhead + a * F + b * Q + t * T + rest``
    (``b`` and ``t`` in the second step), fitted with two more calibration copies whose layers alternate between
    int8 and float. A float line that is not determined or not increasing falls back to one factor through the
    original. ``calibration`` keeps the points, the fit and its residuals. The measurements are stored in the table and reused by searches of the same
    model on the same target for ``reuse_s`` seconds (``COMPRESSION_CALIBRATION_REUSE_S``, default one
    hour; 0 always measures).
    """

    def __init__(
        self,
        table,
        graph: LayerGraph,
        example_input: torch.Tensor,
        *,
        round_to: int = 1,
        quantized: bool = True,
        reuse_s: float | None = None,
        transition_weight: str = "count",
    ) -> None:
        from compression.apply import apply_policy
        from compression.costs import compute_costs
        from compression.policy import LayerPolicy, Policy
        from compression.prune import group_keeps, prune_module
        from compression.targets.workloads import extract_workloads

        if reuse_s is None:
            reuse_s = float(os.environ.get("COMPRESSION_CALIBRATION_REUSE_S", CALIBRATION_REUSE_S))
        self.table = table
        self.graph = graph
        x = example_input[:1]
        templates = {w.name: w for w in extract_workloads(graph.module, x) if w.is_layer}
        missing = [n for n in graph.layer_names if n not in templates]
        if missing:
            raise RuntimeError(f"no workload found for layers {missing[:5]}")
        self.templates = templates
        if transition_weight not in TRANSITION_WEIGHTS:
            raise ValueError(
                f"transition_weight must be one of {TRANSITION_WEIGHTS}, not {transition_weight!r}"
            )
        self.transition_weight = transition_weight
        # per layer: (input, output) activation elements per channel; with ``transition_weight="elements"`` a
        # transition weighs the elements it converts, in units of the original model's mean layer input (so
        # ``transition_ms`` is the cost of a transition at an average layer's input)
        self._per_channel = {
            n: (_per_channel(t.in_shape, t.kind), _per_channel(t.out_shape, t.kind))
            for n, t in templates.items()
        }
        inputs = [t.in_channels * self._per_channel[n][0] for n, t in templates.items()]
        self._elements_unit = (sum(inputs) / len(inputs)) if inputs and sum(inputs) > 0 else 1.0
        self.scale = 1.0
        self.q_scale = 1.0
        self.transition_ms = 0.0
        bits_run = getattr(table.backend, "bits_run", None)
        # kernel classes: a runtime that runs <= 8 bits as int8 kernels, in a search that quantizes
        self.prices_transitions = bool(
            quantized and graph.quantizable and bits_run is not None and tuple(bits_run(8, 8)) != (32, 32)
        )
        self._bits_run = bits_run
        self._kinds: dict[tuple, str] = {}
        self._cache: dict[tuple, float] = {}
        self._entry_ms: dict[
            Any, float
        ] = {}  # normalized workload -> entry less overhead (bits that run alike share)
        self._ms_memo: dict[
            tuple, float
        ] = {}  # (layer, in, out, w_bits, a_bits) -> scaled ms; filled after the fit
        _, rows, _ = table.predict(graph.module, x, measure_missing=True, calibrated=False)
        base = float(rows[-1]["ms"] or 0.0)  # the runtime's per-call overhead
        layer_kinds = ("conv2d", "linear")
        rest_raw = sum(r["ms"] for r in rows[:-1] if r.get("kind") not in layer_kinds and r["ms"] is not None)

        policies: list[Policy] = [Policy()]
        kinds = ["original"]
        if graph.prunable_leaders:
            for k in CALIBRATION_KEEPS:
                policies.append(Policy(layers={n: LayerPolicy(keep_ratio=k) for n in graph.prunable_leaders}))
                kinds.append(f"keep {k}")
        n_float = len(policies)  # the float copies: the first step of the fit (below) uses these alone
        if quantized and graph.quantizable:
            b = CALIBRATION_BITS
            for k in (1.0, CALIBRATION_KEEPS[0]) if graph.prunable_leaders else (1.0,):
                layers = {n: LayerPolicy(w_bits=b, a_bits=b) for n in graph.quantizable}
                for n in graph.prunable_leaders:
                    layers.setdefault(n, LayerPolicy()).keep_ratio = k
                policies.append(Policy(layers=layers))
                kinds.append(f"keep {k}, {b} bits")
            if self.prices_transitions:
                # layers alternating between int8 and float: many transitions, at two sizes, so that their cost
                # is told apart from the kernels' (the two copies quantize complementary layers)
                for parity, k in ((0, 1.0), (1, CALIBRATION_KEEPS[0])):
                    layers = {
                        n: LayerPolicy(w_bits=b, a_bits=b)
                        for i, n in enumerate(graph.quantizable)
                        if i % 2 == parity
                    }
                    for n in graph.prunable_leaders if k < 1.0 else ():
                        layers.setdefault(n, LayerPolicy()).keep_ratio = k
                    policies.append(Policy(layers=layers))
                    kinds.append(f"keep {k}, {b} bits on alternate layers")
        from compression.targets.table import fit_scales, structure_key

        memo_key = "search-calibration|" + json.dumps(
            [structure_key(table.workloads(graph.module, x)), round_to, kinds, CALIBRATION_BITS]
            + (["side by side"] if getattr(table, "side_by_side", False) else [])
        )
        recalled = table.recall(memo_key, reuse_s)
        if recalled is not None:
            # measured on this target (same backend fingerprint) minutes ago: the device has not changed
            self.calibration = {**recalled[0], "reused": True, "age_s": recalled[1]}
            log.info("%s: calibration measurements reused (%.0f s old)", table.spec.name, recalled[1])
        else:
            variants = []
            g = torch.Generator().manual_seed(0)
            calib = torch.randn((16, *x.shape[1:]), generator=g)  # ranges matter to accuracy, not to time
            for p in policies[1:]:
                if any(lp.a_bits < 32 or lp.w_bits < 32 for lp in p.layers.values()):
                    variants.append(apply_policy(graph, p, calib, round_to=round_to))
                else:
                    variants.append(prune_module(graph, group_keeps(graph, p, round_to)))
            rounds = CALIBRATION_ROUNDS.get(table.spec.backend, 3)
            self.calibration = table.calibrate(graph.module, x, variants=variants, rounds=rounds)
            if _disturbed(self.calibration) and quiet_wait_s() > 0:
                # noisy or inconsistent, or timed while other processes were busy (seen beside a test suite: a
                # scale of 0.52 where a quiet machine gives 1.06, every later prediction skewed): wait for a
                # quiet moment and measure once more
                first = self.calibration
                quiet, seen = wait_for_quiet(quiet_wait_s())
                log.info(
                    "%s: calibrating again (%s) after %s",
                    table.spec.name,
                    _why_disturbed(first),
                    "a quiet second"
                    if quiet
                    else f"waiting {quiet_wait_s():g} s ({seen:.2f} cores still busy)",
                )
                self.calibration = {
                    **table.calibrate(graph.module, x, variants=variants, rounds=rounds),
                    "calibrated_twice": True,
                    "first": {k: first[k] for k in ("scale", "warning", "busy_cores") if k in first},
                }
                if _disturbed(self.calibration):
                    log.warning(
                        "%s: the calibration is still disturbed after a second measurement (%s): it is used for "
                        "this search only; predictions may be off until the machine is quiet",
                        table.spec.name,
                        _why_disturbed(self.calibration),
                    )
            self.calibration.pop("measurement", None)
            if not _disturbed(self.calibration):  # a disturbed calibration is not handed to the next search
                table.remember(memo_key, {k: v for k, v in self.calibration.items() if k != "measurement"})
        measured = [float(pt["measured_ms"]) for pt in self.calibration["points"]]
        thin = Policy(layers={n: LayerPolicy(keep_ratio=MIN_KEEP) for n in graph.prunable_leaders})
        all_costs = [compute_costs(graph, p, round_to) for p in policies]
        # the entries the fit prices (float and at the copies' bits, and the most pruned model's), measured together
        self.prefetch(
            (n, c.in_channels, c.out_channels, bits, bits_a)
            for costs in [*all_costs, compute_costs(graph, thin, round_to)]
            for n, c in costs.layers.items()
            for bits, bits_a in ((32, 32), (c.w_bits, c.a_bits))
        )
        fs, qs, ts = [], [], []
        for costs in all_costs:
            parts = [
                self._parts(n, c.in_channels, c.out_channels, c.w_bits, c.a_bits)
                for n, c in costs.layers.items()
            ]
            fs.append(sum(f for f, _ in parts))
            qs.append(sum(q for _, q in parts))
            ts.append(self.transitions(costs))
        ys = [m - base for m in measured]
        # relative weights: the search prices a policy as a fraction of the original, so a 2% miss on a small
        # copy matters as much as one on the original
        weights = [1.0 / m if m > 0 else 1.0 for m in measured]
        # 1. the float line, from the float copies alone (the original and the uniformly pruned ones)
        line = fit_scales([fs[:n_float]], ys[:n_float], weights=weights[:n_float])
        if line is not None and graph.prunable_leaders:
            # a line fitted between keep 1 and 0.25 must not predict the most pruned model (keep MIN_KEEP) at or
            # below the bare call overhead: measured on ONNX Runtime, whose times are not linear in the layer sums
            # at this size, the extrapolation went negative and candidates got latencies <= 0
            f_min = sum(
                self._parts(n, c.in_channels, c.out_channels, 32, 32)[0]
                for n, c in compute_costs(graph, thin, round_to).layers.items()
            )
            if line[0][0] * f_min + line[1] <= 0:
                log.warning(
                    "%s: the calibration line predicts the most pruned model at no cost (scale %.2f, rest %.3f ms); "
                    "using one factor instead",
                    table.spec.name,
                    line[0][0],
                    line[1],
                )
                line = None
        if line is not None:
            a, rest = line[0][0], line[1]
        else:
            # one factor through the original alone, the residual operations scaled alike: never below zero
            whole = fs[0] + rest_raw
            a = (measured[0] - base) / whole if whole > 0 and measured[0] > base else 1.0
            rest = a * rest_raw
        # 2. what the bits add, from the quantized copies, the float line held: their time less the float line's
        # for their float parts, fitted as b * Q (+ t * T). One fit over all the copies let the quantized ones
        # bend the float line: on TVM it priced the original 1.6% high and the pruned copies 2% low, so a joint
        # search under-priced every pruned policy by ~4% as a fraction of the original (docs/BENCHMARKS.md 3,
        # session 10), while a pruning-only search, fitted on the float copies alone, priced them within 1%.
        b, t_ms = a, 0.0
        quant = range(n_float, len(policies))
        if len(quant):
            extra = [ys[i] - a * fs[i] - rest for i in quant]
            qcol, tcol, wq = [qs[i] for i in quant], [ts[i] for i in quant], [weights[i] for i in quant]
            has_q = any(abs(q) > 1e-9 for q in qcol)
            has_t = any(tcol)
            cols = ([qcol] if has_q else []) + ([tcol] if has_t else [])
            found = fit_scales(cols, extra, weights=wq, offset=False)
            if found is None and has_t:
                # the transitions' own factor did not come out positive (noise): fit the kernels alone
                log.warning(
                    "%s: no positive cost per int8/float transition in the calibration fit", table.spec.name
                )
                has_t = False
                found = fit_scales([qcol], extra, weights=wq, offset=False) if has_q else None
            if found is not None:
                b = found[0][0] if has_q else a
                t_ms = found[0][-1] if has_t else 0.0
            elif self.prices_transitions:
                log.warning(
                    "%s: the calibration did not separate int8 kernels and int8/float transitions; models mixing "
                    "int8 and float layers are priced without their conversions and may measure slower",
                    table.spec.name,
                )
        self.scale, self.q_scale = max(a, 1e-3), b
        self.transition_ms = t_ms
        self._ms_memo.clear()
        super().__init__(self._layer_ms, residual_ms=base + rest)
        self.original_ms = base + self.scale * fs[0] + rest
        predicted = [
            base + self.scale * f + self.q_scale * q + t_ms * t + rest
            for f, q, t in zip(fs, qs, ts, strict=True)
        ]
        self.calibration["search_fit"] = {
            "models": kinds,
            "float_models": n_float,  # the first n_float models fit the float line; the others what bits add
            "float_ms": fs,
            "quant_delta_ms": qs,
            "transitions": ts,
            "measured_ms": measured,
            "predicted_ms": predicted,
            "scale": self.scale,
            "quant_scale": self.q_scale,
            "transition_ms": t_ms,
            "rest_ms": rest,
            "overhead_ms": base,
            "residuals": [(pr - m) / m if m > 0 else 0.0 for pr, m in zip(predicted, measured, strict=True)],
        }
        log.info(
            "latency table for %s: original %.3f ms predicted, %.3f ms measured (scale %.2f, quantized %.2f, "
            "%srest %.3f ms; fit over %d models, worst residual %.1f%%)",
            table.spec.name,
            self.original_ms,
            measured[0],
            self.scale,
            self.q_scale,
            f"{1000 * t_ms:.1f} us per int8/float transition, " if self.prices_transitions else "",
            self.residual_ms,
            len(measured),
            100 * max(abs(r) for r in self.calibration["search_fit"]["residuals"]),
        )

    def _layer_ms(self, name: str, in_c: int, out_c: int, w_bits: float, a_bits: int) -> float:
        # memoised: the environment asks for the same few shapes and bits tens of thousands of times per search
        key = (name, in_c, out_c, w_bits, a_bits)
        v = self._ms_memo.get(key)
        if v is None:
            f, q = self._parts(name, in_c, out_c, w_bits, a_bits)
            v = self._ms_memo[key] = self.scale * f + self.q_scale * q
        return v

    def run_class(self, w_bits: float, a_bits: int) -> str:
        """The kind of kernel the target runs a layer at these bits with: ``int8`` or ``float``."""
        key = (w_bits, a_bits)
        kind = self._kinds.get(key)
        if kind is None:
            run = None if self._bits_run is None else tuple(self._bits_run(int(round(w_bits)), int(a_bits)))
            kind = self._kinds[key] = "float" if run in (None, (32, 32)) else "int8"
        return kind

    def transitions(self, costs) -> float:
        """Int8/float transitions in a policy's model (``count_transitions``; 0 where the target runs one kind of
        kernel), each counted as 1. With ``transition_weight="elements"``, each is weighted by the activation it
        converts (elements at the pruned shape over the original model's mean layer input): a conversion is a pass
        over that tensor, so one at a 16x32x32 input would cost four times one at 64x8x8. Measured on ResNet-20 on
        ONNX Runtime (docs/BENCHMARKS.md 3, session 7) the weighting predicted no better than counting (4.9% vs
        4.7% mean error on the same measurements): the fixed part of a conversion dominates at these sizes."""
        if not self.prices_transitions:
            return 0.0
        from compression.search.env import count_transitions

        int8 = {n: self.run_class(c.w_bits, c.a_bits) == "int8" for n, c in costs.layers.items()}
        if self.transition_weight == "count":
            return count_transitions(self.graph.producers(), int8)
        unit = self._elements_unit
        pc = self._per_channel
        size = {
            n: (c.in_channels * pc[n][0] / unit, c.out_channels * pc[n][1] / unit)
            for n, c in costs.layers.items()
        }
        return count_transitions(self.graph.producers(), int8, size)

    def _parts(self, name: str, in_c: int, out_c: int, w_bits: float, a_bits: int) -> tuple[float, float]:
        """(float part, quantization part) of one layer, unscaled (see the class docstring).

        With kernel classes (``prices_transitions``): (float entry, 0) for a float layer and (0, int8 entry) for an
        int8 one; otherwise (float entry, entry at the bits - float entry)."""
        if self.prices_transitions:
            if self.run_class(w_bits, a_bits) == "int8":
                return 0.0, self._raw_layer_ms(name, in_c, out_c, w_bits, a_bits)
            return self._raw_layer_ms(name, in_c, out_c, 32, 32), 0.0
        f = self._raw_layer_ms(name, in_c, out_c, 32, 32)
        if int(round(w_bits)) >= 32 and int(a_bits) >= 32:
            return f, 0.0
        return f, self._raw_layer_ms(name, in_c, out_c, w_bits, a_bits) - f

    def _layer_workload(self, name: str, in_c: int, out_c: int, w_bits: float, a_bits: int) -> LayerWorkload:
        """The table entry (normalised workload) of one layer at this shape and bits."""
        t = self.templates[name]
        if t.kind == "conv2d":
            depthwise = t.groups > 1 and t.groups == t.in_channels == t.out_channels
            w = replace(
                t,
                in_channels=in_c,
                out_channels=out_c,
                groups=in_c if depthwise else t.groups,
                in_shape=(t.in_shape[0], in_c, *t.in_shape[2:]),
                out_shape=(t.out_shape[0], out_c, *t.out_shape[2:]),
            )
        else:
            w = replace(
                t,
                in_channels=in_c,
                out_channels=out_c,
                in_shape=(*t.in_shape[:-1], in_c),
                out_shape=(*t.out_shape[:-1], out_c),
            )
        return self.table.normalize(w.with_bits(int(round(w_bits)), int(a_bits)))

    @staticmethod
    def _key(shape: tuple[str, int, int, float, int]) -> tuple[str, int, int, int, int]:
        """The ``_cache`` key of a ``(layer, in_c, out_c, w_bits, a_bits)``."""
        return shape[0], shape[1], shape[2], int(round(shape[3])), int(shape[4])

    def priced(self, shapes: Iterable[tuple[str, int, int, float, int]]) -> bool:
        """Has every one of these shapes been priced by this model before (a set look-up each)?"""
        cache, key = self._cache, self._key
        return all(key(sh) in cache for sh in shapes)

    def prefetch(self, shapes: Iterable[tuple[str, int, int, float, int]]) -> int:
        """Measure, together, the table entries ``_layer_ms`` will need for these ``(layer, in_c, out_c, w_bits,
        a_bits)``; how many were measured.

        A missing entry is otherwise measured when first asked for, alone. Where the target compiles many
        workloads at once (TVM: ``LatencyTable.fill_workloads``) a batch costs a fraction of one-by-one, so a
        caller that knows it will price several shapes (every candidate of a step) asks for them first."""
        from compression.targets.workloads import overhead_workload

        cache, key = self._cache, self._key
        # the common case, a warm table: every shape was priced before (a set look-up each, nothing else)
        todo = [sh for sh in shapes if key(sh) not in cache]
        if not todo:
            return 0
        need: dict[str, LayerWorkload] = {}
        for name, in_c, out_c, w_bits, a_bits in self._entries_for(todo):
            if key((name, in_c, out_c, w_bits, a_bits)) in cache:
                continue
            w = self._layer_workload(name, in_c, out_c, w_bits, a_bits)
            if w in self._entry_ms:
                continue
            for x in (w, overhead_workload(torch.empty(w.in_shape))):
                need.setdefault(x.key, x)
        return self.table.fill_workloads(list(need.values())) if need else 0

    def _entries_for(
        self, shapes: Iterable[tuple[str, int, int, float, int]]
    ) -> set[tuple[str, int, int, float, int]]:
        """The entries ``_parts`` reads to price these shapes: the float one and/or the one at the bits."""
        out: set[tuple[str, int, int, float, int]] = set()
        for name, in_c, out_c, w_bits, a_bits in shapes:
            quantized = int(round(w_bits)) < 32 or int(a_bits) < 32
            if self.prices_transitions:
                int8 = self.run_class(w_bits, a_bits) == "int8"
                out.add((name, in_c, out_c, w_bits, a_bits) if int8 else (name, in_c, out_c, 32, 32))
                continue
            out.add((name, in_c, out_c, 32, 32))
            if quantized:
                out.add((name, in_c, out_c, w_bits, a_bits))
        return out

    def _raw_layer_ms(self, name: str, in_c: int, out_c: int, w_bits: float, a_bits: int) -> float:
        """One layer's table entry at this shape and bits, less the per-call overhead (measured if missing)."""
        key = self._key((name, in_c, out_c, w_bits, a_bits))
        v = self._cache.get(key)
        if v is not None:
            return v
        from compression.targets.workloads import overhead_workload

        w = self._layer_workload(name, in_c, out_c, w_bits, a_bits)
        shared = self._entry_ms.get(w)
        if shared is not None:  # the same entry under other bits (2..8 all run int8 on ONNX Runtime)
            self._cache[key] = shared
            return shared
        ms = self.table.lookup(w)
        if ms is None:
            self.table.measure_workload(w)
            ms = self.table.lookup(w)
        over = overhead_workload(torch.empty(w.in_shape))
        o = self.table.lookup(over)
        if o is None:
            self.table.measure_workload(over)
            o = self.table.lookup(over)
        v = max(0.0, float(ms) - float(o or 0.0))
        self._cache[key] = v
        self._entry_ms[w] = v
        return v


def _disturbed(calibration: dict) -> bool:
    """Whether a calibration is suspect: the table flagged it noisy or inconsistent, or other processes used more
    than ``BUSY_CORES`` while its models were timed side by side on this machine (``busy_cores``, recorded by the
    measurement; a device behind RPC and models timed one by one record none)."""
    return "warning" in calibration or float(calibration.get("busy_cores") or 0.0) > BUSY_CORES


def _why_disturbed(calibration: dict) -> str:
    reasons = []
    if "warning" in calibration:
        reasons.append(str(calibration["warning"]))
    busy = float(calibration.get("busy_cores") or 0.0)
    if busy > BUSY_CORES:
        reasons.append(f"other processes used {busy:.2f} cores while it was measured")
    return "; ".join(reasons)


def _per_channel(shape: tuple[int, ...], kind: str) -> int:
    """Elements per channel of an activation (batch first): the spatial size of a conv's NCHW tensor, the
    leading dimensions of a linear layer's (..., features) one."""
    dims = shape[2:] if kind == "conv2d" else shape[1:-1]
    n = 1
    for d in dims:
        n *= int(d)
    return n


def build_latency_model(
    target: TargetSpec,
    graph: LayerGraph,
    artifact: ModelArtifact,
    *,
    round_to: int = 1,
    quantized: bool = True,
    progress: Callable[[int, int, dict], None] | None = None,
    transition_weight: str = "count",
) -> LatencyModel | None:
    """The search's latency model for a target (None for the analytic target, which has no time).

    ``quantized=False`` (a pruning-only search) skips measuring the quantized calibration models.
    """
    if target.backend == "analytic":
        return None
    from compression.targets import LatencyTable

    # fewer repeats than a benchmark: an entry is measured once and reused by every later run
    table = LatencyTable(target, table_path(), warmup=5, repeats=40)
    return TableLatency(
        table,
        graph,
        artifact.example_input(1),
        round_to=round_to,
        quantized=quantized,
        transition_weight=transition_weight,
    )
