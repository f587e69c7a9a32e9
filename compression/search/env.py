"""The compression environment: one episode walks the compressible layers and builds a ``Policy``.

It implements the protocol of ``compression.search.spaces`` (``reset`` / ``step``), so any agent drives it
and ``check_env`` tests it without one. Per step the observation describes the layer (normalised index,
type, channels, kernel, stride, input size, params, MACs, BOPs), how much of the objective's cost is
already removed and how much lies ahead, the previous action, and the layer's sensitivity (accuracy drop
when only that layer is compressed, measured once per model). The action fills that layer's policy entry.

Budgets (AMC's construction): when ``enforce_budget`` is on, each action is capped so that the remaining
layers, compressed as far as the action space allows, can still bring the whole model within budget. The
cap is found on the discrete choices the target really distinguishes (kept channels are multiples of
``round_to``; bits are integers), so an episode always ends within budget when the budget is reachable at
all. With ``budget_mode="repair"`` (HAQ) actions are free and, after the last step, bits are lowered from
the last layer backwards until the policy fits. The agent's raw actions and the enforced ones are both
recorded.

At the end of the episode the policy is applied (prune + re-fit + fake-quantize + batch-norm re-estimation),
accuracy is estimated on the fixed search set (``val_set``: validation images, topped up with training images the
calibration batch does not use; ``Workspace.search_set``), costs are computed, and the reward is given.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from compression.apply import apply_policy, fold_batch_norms
from compression.costs import Costs, compute_costs, layer_shape
from compression.errors import SearchError
from compression.models.graph import LayerGraph
from compression.policy import LayerPolicy, Policy
from compression.search import spaces
from compression.search.spaces import ActionSpec, EnvSpec
from compression.training import channels_last, channels_last_works, evaluate, quick_tune

OP_CODES = {"conv2d": 0.0, "gconv2d": 0.33, "dwconv2d": 0.66, "linear": 1.0}


@dataclass
class EnvSettings:
    """How the environment maps actions and scores policies."""

    layout: str = "prune"  # prune | bits | joint | ajpq
    objective: str = "macs"  # latency | macs | bops | params | bytes
    budget: float = 0.5  # fraction of the original cost
    reward: str = "acc"  # acc | acc-log-cost | galen | haq
    reward_params: dict[str, Any] = field(default_factory=dict)
    enforce_budget: bool = True
    budget_mode: str = "cap"  # cap (AMC, per step) | repair (HAQ, after the episode)
    round_to: int = 1
    min_keep: float = 0.1
    min_bits: int = 2
    max_bits: int = 8
    # latency objective, bits/joint layouts: the top bin of a bits action is float (32 bits), because on most
    # runtimes some bit-widths are no faster than float (TVM computes in float here; ORT has no kernels below 8)
    float_bits: bool = True
    # latency objective, bits/joint layouts: a layer's (w_bits, a_bits) is raised to the most precise pair that costs
    # no more time at its shape (on TVM quantizing buys nothing, on ONNX Runtime 2..7 bits run as int8 kernels)
    free_precision: bool = True
    # with free_precision, AJPQ's per-group bits too (added later: a checkpoint without it resumes without it)
    free_precision_groups: bool = True
    reconstruct: bool = (
        True  # least-squares re-fit of the layers reading pruned channels (compression/reconstruct.py)
    )
    # steps of a short distillation fine-tune each candidate gets before it is scored (``training.quick_tune``, on
    # the environment's ``tune_set``); 0: scored as applied. It ranked candidates far better while the final
    # fine-tune shifted its inputs; with the final fine-tune as it is now, no better (docs/BENCHMARKS.md, 1i)
    tune_steps: int = 0
    groups: int = spaces.DEFAULT_GROUPS
    pin_first_last_bits: int | None = None
    val_samples: int = 1000
    calib_samples: int = 256
    seed: int = 0


class LatencyModel:
    """Per-layer latency of a policy on a target (additive), plus a constant for everything else.

    ``layer_ms(layer, in_c, out_c, w_bits, a_bits) -> ms`` gives one layer's latency at its pruned shape
    and bit-widths (from a per-target latency table); ``residual_ms`` is the rest of the model (pooling,
    additions, the runtime's fixed overhead), fitted once against an end-to-end measurement.
    """

    # a model whose layers run different kinds of kernels (int8 and float) pays for each edge between them:
    # ``total`` then includes ``transition_ms`` per such edge (``transitions``), and only a choice within the
    # layer's kind of kernel is a local one
    prices_transitions = False
    transition_ms = 0.0

    def __init__(
        self, layer_ms: Callable[[str, int, int, float, int], float], residual_ms: float = 0.0
    ) -> None:
        self.layer_ms = layer_ms
        self.residual_ms = residual_ms

    def run_class(self, w_bits: float, a_bits: int) -> str:
        """The kind of kernel a layer at these bits runs as (one kind here: no transitions)."""
        return "float"

    def transitions(self, costs: Costs) -> float:
        """Edges between layers of different kinds of kernel in a policy's model (none with one kind); a model
        may weigh each one (``TableLatency``'s ``transition_weight``)."""
        return 0.0

    def prefetch(self, shapes: Iterable[tuple[str, int, int, float, int]]) -> int:
        """Get ready to price these ``(layer, in_c, out_c, w_bits, a_bits)`` (a table measures its missing entries
        together); how many entries that measured. Nothing to do here."""
        return 0

    def priced(self, shapes: Iterable[tuple[str, int, int, float, int]]) -> bool:
        """Have these ``(layer, in_c, out_c, w_bits, a_bits)`` been priced before (nothing to measure)? Always here."""
        return True

    def per_layer(self, costs: Costs) -> dict[str, float]:
        return {
            name: self.layer_ms(name, c.in_channels, c.out_channels, c.w_bits, c.a_bits)
            for name, c in costs.layers.items()
        }

    def total(self, costs: Costs) -> float:
        extra = self.transition_ms * self.transitions(costs) if self.transition_ms else 0.0
        return sum(self.per_layer(costs).values()) + self.residual_ms + extra


def _precision_shapes(
    name: str, in_c: int, out_c: int, w_now: float, a_now: int, levels: list[int], w_min: float, a_min: int
) -> list[tuple[str, int, int, float, int]]:
    """The shapes free precision prices for one layer at one shape: its own bits, and every (w, a) from the minimum
    up (``CompressionEnvironment._most_precise_no_slower``)."""
    return [(name, in_c, out_c, w_now, a_now)] + [
        (name, in_c, out_c, w, a) for w in levels for a in levels if w >= w_min and a >= a_min
    ]


def count_transitions(
    producers: dict[str, list[str]],
    int8: dict[str, bool],
    size: dict[str, tuple[float, float]] | None = None,
) -> float:
    """Int8/float transitions of a model: ``producers`` from ``LayerGraph.producers``, ``int8`` per layer.

    A layer counts once when any layer feeding it (or the model's input, which is float) runs the other kind of
    kernel; an int8 layer no other layer consumes counts once for the conversion back to the float output.
    With ``size`` (layer -> (input weight, output weight)) each transition counts the weight of the activation
    converted there (its input, or for that last conversion its output) instead of 1.
    """
    consumed: set[str] = set()
    t = 0.0
    for n, ps in producers.items():
        consumed.update(ps)
        mine = int8.get(n, False)
        if any(int8.get(p, False) != mine for p in ps) if ps else mine:
            t += size[n][0] if size is not None else 1.0
    for n, q in int8.items():
        if q and n not in consumed:
            t += size[n][1] if size is not None else 1.0
    return t


def tune_tensors(
    module: torch.nn.Module, tune_set: torch.utils.data.TensorDataset
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inputs, labels and the original's outputs a candidate's short fine-tune distils from (``tune_steps``).

    ``tune_set`` holds (inputs, labels), or (inputs, labels, the original's outputs) when a caller that builds
    several environments over one model (``SearchRun``) has computed them once already; then they are used as given.
    """
    tensors = tune_set.tensors
    if len(tensors) == 3:
        return tensors[0], tensors[1], tensors[2]
    x, y = tensors[0], tensors[1]
    with torch.no_grad():  # the teacher's outputs, once: every candidate's tune distils from them
        return x, y, module.eval()(x)


class CompressionEnvironment:
    """The search environment over one model and dataset (see the module docstring)."""

    def __init__(
        self,
        graph: LayerGraph,
        val_set: torch.utils.data.TensorDataset,
        calib: torch.Tensor,
        settings: EnvSettings,
        *,
        latency: LatencyModel | None = None,
        base_policy: Policy | None = None,
        sensitivity: dict[str, list[float]] | None = None,
        original_accuracy: float | None = None,
        tune_set: torch.utils.data.TensorDataset | None = None,
    ) -> None:
        self.graph = graph
        self.settings = s = settings
        self._tune: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        if s.tune_steps > 0:
            if tune_set is None or len(tune_set) == 0:
                raise SearchError(
                    "a short fine-tune per candidate (tune_steps) needs training images outside the search set",
                    "set tune_steps to 0, or lower val_samples so that training images are left over",
                )
            self._tune = tune_tensors(graph.module, tune_set)
        if s.objective == "latency" and latency is None:
            raise SearchError(
                "the latency objective needs a hardware target with a latency table",
                "pick a target that measures latency (local-ort, local-torch, local-tvm, a device), "
                "or optimise macs/bops/bytes on the analytic target",
            )
        if s.layout not in spaces.LAYOUTS:
            raise SearchError(f"unknown layout {s.layout!r}")
        if s.budget_mode not in ("cap", "repair"):
            raise SearchError(f"budget_mode {s.budget_mode!r} is unknown", "use cap or repair")
        self.latency = latency
        self.base_policy = base_policy or Policy()
        self.val = val_set
        self.calib = calib
        # candidates are scored channels-last where the model allows it (a third faster on the CPU, the same
        # accuracies to float rounding; docs/BENCHMARKS.md 2, session 14)
        self.channels_last = channels_last_works(graph.module, val_set.tensors[0])
        self._scoring_set = channels_last(val_set) if self.channels_last else val_set
        self.action_spec = ActionSpec.for_layout(s.layout, s.groups)
        self._float_top = bool(s.float_bits and s.objective == "latency" and s.layout in ("bits", "joint"))
        self._levels = spaces.bit_levels(s.min_bits, s.max_bits, self._float_top)
        if s.layout == "prune":
            self.steps = list(graph.prunable_leaders)
        else:
            self.steps = list(graph.quantizable)
        if not self.steps:
            raise SearchError(
                f"the model has no layer the {s.layout} search can act on",
                "inspect the model: no prunable group was found"
                if s.layout == "prune"
                else "no quantizable layer",
            )
        self.sensitivity = sensitivity or {}
        self._sens_dim = max((len(v) for v in self.sensitivity.values()), default=0)
        self.original_costs = compute_costs(graph, None)
        self.original_cost = self._objective(self.base_policy_costs(None))
        self._reference_cost = self._objective(self.original_costs)
        self.original_accuracy = original_accuracy
        self._x_val, self._y_val = val_set.tensors
        names = self._feature_names()
        self.spec = EnvSpec(
            obs_dim=len(names),
            num_steps=len(self.steps),
            action_spec=self.action_spec,
            layer_names=tuple(self.steps),
            feature_names=tuple(names),
        )
        self._static = self._static_features()
        self._decoded_bits: dict[str, tuple[int, int]] = {}
        # per step, the most compressed entry of each later layer (the cap prices every candidate against them)
        self._most_compressed_memo: dict[tuple[str, int], LayerPolicy] = {}
        self._cheap_bits = self._cheapest_bits()
        self.reset()
        self.min_cost_ratio = self._min_cost_ratio()
        if s.enforce_budget and self.min_cost_ratio > s.budget * (1 + 1e-9):
            what = "latency on this target" if s.objective == "latency" else s.objective
            raise SearchError(
                f"a budget of {s.budget:.0%} of the original {what} cannot be reached: the most compressed policy "
                f"this search may produce still costs {self.min_cost_ratio:.1%}",
                "raise the budget above that, lower min_keep / min_bits, or (for latency) use a larger model or "
                "input: the target's fixed per-call overhead does not shrink with the model",
            )

    @property
    def _costs_fall_with_bits(self) -> bool:
        """False when fewer bits can cost more (latency: a fake-quantized layer on a float runtime, tiny int8 layers
        on ONNX Runtime); the budget cap and HAQ's repair then compare costs instead of assuming an order."""
        quantizes = "w_bits" in self.action_spec.names or self.action_spec.layout == "ajpq"
        return not (quantizes and self.settings.objective == "latency")

    def _cheapest_bits(self) -> dict[str, tuple[int, int]]:
        """Per layer, the (w_bits, a_bits) of the bits action that cost least, at the most pruned shape.

        For MACs / BOPs / bytes that is the fewest bits; for latency it is measured (the most bits among equally
        cheap choices): on TVM (float compute) float itself, on ONNX Runtime usually 8 bits. The most compressed
        policy (the floor, the cap's look-ahead) uses it.
        """
        s = self.settings
        if "w_bits" not in self.action_spec.names:
            return {}
        if self._costs_fall_with_bits:
            return {n: (s.min_bits, s.min_bits) for n in self.steps}
        assert self.latency is not None
        thin = Policy(layers={n: LayerPolicy(**lp.to_dict()) for n, lp in self.base_policy.layers.items()})
        if "keep_ratio" in self.action_spec.names:
            for n in self.steps:
                if self._is_leader(n):
                    thin.layers.setdefault(n, LayerPolicy()).keep_ratio = self._snap_keep(n, s.min_keep)
        costs = self.base_policy_costs(thin)
        lat = self.latency
        lat.prefetch(
            (n, costs.layers[n].in_channels, costs.layers[n].out_channels, w, a)
            for n in self.steps
            for w in self._levels
            for a in self._levels
        )
        kinds = [None] + (
            sorted({lat.run_class(w, a) for w in self._levels for a in self._levels})
            if lat.prices_transitions
            else []
        )
        choices: list[dict[str, tuple[int, int]]] = []
        for kind in kinds:
            out: dict[str, tuple[int, int]] = {}
            for n in self.steps:
                c = costs.layers[n]
                best: tuple[float, int, int] | None = None
                # most bits first, so a tie keeps the more precise choice: on TVM weight bits cost no time (it
                # computes in float), and 2-bit weights would only lose accuracy for nothing
                for w in reversed(self._levels):
                    for a in reversed(self._levels):
                        if kind is not None and lat.run_class(w, a) != kind:
                            continue
                        ms = lat.layer_ms(n, c.in_channels, c.out_channels, w, a)
                        if best is None or ms < best[0] - 1e-12:
                            best = (ms, w, a)
                if best is not None:
                    out[n] = (best[1], best[2])
            if len(out) == len(self.steps):
                choices.append(out)
        if len(choices) == 1:
            return choices[0]

        # with int8/float transitions, each layer's cheapest kind can make a slower model than one kind throughout:
        # the cheapest of the per-layer choice and the one-kind choices, priced whole
        def whole(bits: dict[str, tuple[int, int]]) -> float:
            p = Policy(layers={n: LayerPolicy(**lp.to_dict()) for n, lp in thin.layers.items()})
            for n, (w, a) in bits.items():
                lp = p.layers.setdefault(n, LayerPolicy())
                lp.w_bits, lp.a_bits = w, a
                self._pin(n, lp)  # HAQ's pinned first and last layers run int8 whatever the rest does
            return lat.total(self.base_policy_costs(p))

        return min(choices, key=whole)

    def _min_cost_ratio(self) -> float:
        """Cost of the most compressed policy the action space allows, over the original cost."""
        most = Policy(layers=dict(self.base_policy.layers))
        for name in self.steps:
            most.layers[name] = self._most_compressed(name)
        cost, _ = self.cost_of(most)
        return cost / self._reference_cost if self._reference_cost else 1.0

    # ------------------------------------------------------------------ costs
    def base_policy_costs(self, policy: Policy | None) -> Costs:
        return compute_costs(
            self.graph, policy if policy is not None else self.base_policy, self.settings.round_to
        )

    def _objective(self, costs: Costs) -> float:
        if self.settings.objective == "latency":
            assert self.latency is not None
            return self.latency.total(costs)
        return costs.get(self.settings.objective)

    def cost_of(self, policy: Policy) -> tuple[float, Costs]:
        """(objective cost, all costs) of a policy."""
        costs = compute_costs(self.graph, policy, self.settings.round_to)
        return self._objective(costs), costs

    @property
    def budget_cost(self) -> float:
        return self.settings.budget * self._reference_cost

    # ------------------------------------------------------------------ features
    def _feature_names(self) -> list[str]:
        names = [
            "index",
            "op",
            "in_channels",
            "out_channels",
            "kernel",
            "stride",
            "input_size",
            "params",
            "macs",
            "bops",
            "removed_so_far",
            "cost_ahead",
            "budget",
        ]
        names += [f"prev_{n}" for n in self.action_spec.names]
        names += [f"sensitivity_{i}" for i in range(self._sens_dim)]
        return names

    def _static_features(self) -> list[list[float]]:
        infos = [self.graph[n] for n in self.steps]
        max_c = max(max(i.in_channels, i.out_channels) for i in infos)
        max_hw = max(max(i.input_hw) for i in infos)
        max_params = max(i.params for i in infos)
        total_macs = max(1, self.graph.total_macs)
        rows = []
        for t, info in enumerate(infos):
            rows.append(
                [
                    t / max(1, len(infos) - 1),
                    OP_CODES.get(info.op, 0.0),
                    info.in_channels / max_c,
                    info.out_channels / max_c,
                    info.kernel[0] / 7.0,
                    info.stride[0] / 2.0,
                    info.input_hw[0] / max_hw,
                    math.log1p(info.params) / math.log1p(max_params),
                    info.macs / total_macs,
                    info.macs / total_macs,  # BOPs share of the float model equals the MACs share
                ]
            )
        return rows

    def _observe(self) -> np.ndarray:
        t = min(self._t, len(self.steps) - 1)
        row = list(self._static[t])
        costs = compute_costs(self.graph, self._partial_policy(), self.settings.round_to)
        done_cost = sum(self._layer_objective(costs, n) for n in self.steps[:t])
        ahead = sum(self._layer_objective(costs, n) for n in self.steps[t:])
        ref = max(1e-12, self._reference_cost)
        orig_done = sum(self._layer_objective(self.original_costs, n) for n in self.steps[:t])
        row += [max(0.0, (orig_done - done_cost) / ref), ahead / ref, self.settings.budget]
        row += list(self._prev_action)
        sens = self.sensitivity.get(self.steps[t], [])
        row += list(sens) + [0.0] * (self._sens_dim - len(sens))
        return np.asarray(row, dtype=np.float32)

    def _layer_objective(self, costs: Costs, name: str) -> float:
        c = costs.layers[name]
        obj = self.settings.objective
        if obj == "latency":
            assert self.latency is not None
            return self.latency.layer_ms(name, c.in_channels, c.out_channels, c.w_bits, c.a_bits)
        return float(getattr(c, obj))

    # ------------------------------------------------------------------ protocol
    def reset(self, seed: int | None = None) -> np.ndarray:
        """Start an episode (the environment itself is deterministic: ``seed`` changes nothing)."""
        self._t = 0
        self._policy = Policy(
            layers={n: LayerPolicy(**lp.to_dict()) for n, lp in self.base_policy.layers.items()}
        )
        self._most_compressed_memo.clear()
        self._raw: list[list[float]] = []
        self._enforced: list[list[float]] = []
        self._asked: dict[str, LayerPolicy] = {}
        self._prev_action = [1.0] * self.action_spec.dim
        return self._observe()

    def _partial_policy(self) -> Policy:
        return self._policy

    def step(self, action: np.ndarray) -> spaces.StepResult:
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        if a.shape != (self.action_spec.dim,):
            raise SearchError(f"action has shape {a.shape}, expected ({self.action_spec.dim},)")
        if not np.all(np.isfinite(a)):
            raise SearchError("action has non-finite values", "agents must output values in [0, 1]")
        a = np.clip(a, 0.0, 1.0)
        name = self.steps[self._t]
        self._raw.append(a.tolist())
        asked = self._decode(name, a)
        entry = self._decide(name, a)
        enforced = self._enforced_action(name, a, asked, entry)
        self._asked[name] = asked
        self._policy.layers[name] = entry
        self._enforced.append(enforced)
        self._prev_action = enforced
        self._t += 1
        done = self._t == len(self.steps)
        info: dict[str, Any] = {"action": np.asarray(enforced)}
        if not done:
            return self._observe(), 0.0, False, info
        if self.settings.enforce_budget and self.settings.budget_mode == "repair":
            self._repair()
            self._enforced = [
                self._enforced_action(n, np.asarray(raw), self._asked[n], self._policy[n])
                for n, raw in zip(self.steps, self._raw, strict=True)
            ]
            info["action"] = np.asarray(self._enforced[-1])
        reward, metrics = self._score(self._policy)
        info.update(
            policy=Policy(layers=dict(self._policy.layers), meta={"layout": self.settings.layout}),
            raw_actions=[list(r) for r in self._raw],
            enforced_actions=[list(e) for e in self._enforced],
            metrics=metrics,
        )
        self._t = len(self.steps) - 1  # observation of the terminal step; reset() starts over
        obs = self._observe()
        self._t = len(self.steps)
        return obs, float(reward), True, info

    def uniform_action(self, tolerance: float = 1e-3) -> np.ndarray | None:
        """The uniform action that fits the budget as tightly as a uniform policy can, found on costs alone.

        The same value ``v`` in every action dimension (``1 - v`` where larger means more compression), the
        largest for which the environment changes nothing (no cap, no repair, cost within budget; the layers
        an agent asked to pin keep their pinned bits), bisected like the ``uniform`` agent but without
        applying or scoring a single policy (milliseconds). None when not even ``v = 0`` fits. The
        environment is left reset.
        """
        inverted = self.action_spec.inverted_mask()
        pinned = (
            {self.steps[0], self.steps[-1]}
            if self.settings.pin_first_last_bits and self.action_spec.layout != "prune"
            else set()
        )

        def action(v: float) -> np.ndarray:
            return np.where(inverted, 1.0 - v, v).astype(np.float64)

        def fits(v: float) -> bool:
            self.reset()
            a = action(v)
            for name in self.steps:
                asked = self._decode(name, a)
                entry = self._decide(name, a)
                if name not in pinned and self._enforced_action(name, a, asked, entry) != a.tolist():
                    return False  # (a pinned layer's bits are the agent's request, not a budget change)
                self._asked[name] = asked
                self._policy.layers[name] = entry
                self._prev_action = a.tolist()
                self._t += 1
            if self.settings.enforce_budget and self.settings.budget_mode == "repair":
                before = {n: lp.to_dict() for n, lp in self._policy.layers.items()}
                self._repair()
                if {n: lp.to_dict() for n, lp in self._policy.layers.items()} != before:
                    return False
            return self.cost_of(self._policy)[0] <= self.budget_cost * (1 + 1e-6)

        try:
            if fits(1.0):
                return action(1.0)
            if not fits(0.0):
                return None
            lo, hi = 0.0, 1.0
            while hi - lo >= tolerance:
                mid = 0.5 * (lo + hi)
                lo, hi = (mid, hi) if fits(mid) else (lo, mid)
            return action(lo)
        finally:
            self.reset()

    # ------------------------------------------------------------------ action mapping and budget
    def _group_keep_fixed(self, name: str) -> float | None:
        """For a non-leader layer, the keep ratio its group leader already decided (None for leaders)."""
        g = self.graph.group_of(name)
        if g is None or not g.prunable:
            return 1.0
        if g.leader == name:
            return None
        return self._policy[g.leader].keep_ratio

    def _decode(self, name: str, a: np.ndarray) -> LayerPolicy:
        """An action mapped to a layer policy, before any budget cap."""
        s = self.settings
        base = self.base_policy[name]
        entry = LayerPolicy(**base.to_dict())
        names = self.action_spec.names
        if "keep_ratio" in names:
            fixed = self._group_keep_fixed(name)
            keep = spaces.action_to_keep_ratio(float(a[names.index("keep_ratio")]), s.min_keep)
            entry.keep_ratio = self._snap_keep(name, keep) if fixed is None else fixed
        if "w_bits" in names:
            ft = self._float_top
            entry.w_bits = spaces.action_to_bits(float(a[names.index("w_bits")]), s.min_bits, s.max_bits, ft)
            entry.a_bits = spaces.action_to_bits(float(a[names.index("a_bits")]), s.min_bits, s.max_bits, ft)
            self._decoded_bits[name] = (entry.w_bits, entry.a_bits)  # the agent's bits, before free precision
            self._free_precision(name, entry)
        if s.layout == "ajpq":
            fixed = self._group_keep_fixed(name)
            bits = [spaces.action_to_bits(float(x), s.min_bits, s.max_bits) for x in a[1:]]
            pruned = spaces.action_to_pruned_groups(float(a[0]), s.groups) if fixed is None else 0
            if fixed is not None and fixed < 1.0:
                pruned = min(s.groups - 1, int(round((1.0 - fixed) * s.groups)))
            entry.channel_bits = bits[: s.groups - pruned] + [0] * pruned
            entry.w_bits = max(bits[: s.groups - pruned])
            entry.a_bits = max(bits[: s.groups - pruned])
            entry.keep_ratio = (s.groups - pruned) / s.groups
            self._free_group_precision(name, entry)
        self._pin(name, entry)
        return entry

    def _free_precision(self, name: str, entry: LayerPolicy, *, pinned_ok: bool = False) -> None:
        """Raise ``entry``'s (w_bits, a_bits) to the most precise pair that costs no more time at its shape.

        Only where fewer bits are not always cheaper (the latency objective): fewer bits that buy no time only lose
        accuracy. On TVM (float compute) every quantized choice costs at least float, so layers stay float; on
        ONNX Runtime 2..7 bits run as the same int8 kernels as 8 bits, so they become 8 bits (never float there: with
        transitions priced, only bits within the layer's kind of kernel are considered). Part of decoding the action,
        like rounding to whole channels: not recorded as a change.
        """
        s = self.settings
        if not s.free_precision or self._costs_fall_with_bits or "w_bits" not in self.action_spec.names:
            return
        if not pinned_ok and s.pin_first_last_bits and name in (self.steps[0], self.steps[-1]):
            return  # the agent's pin decides these (``_pin`` raises them from the pinned width)
        raised = self._most_precise_no_slower(name, entry, self._levels, entry.w_bits, entry.a_bits)
        if raised is not None:
            entry.w_bits, entry.a_bits = raised

    def _most_precise_no_slower(
        self, name: str, entry: LayerPolicy, levels: list[int], w_min: int, a_min: int
    ) -> tuple[int, int] | None:
        """The most precise (w, a) >= (w_min, a_min) from ``levels`` that the table prices no higher than ``entry``
        as decided, at the layer's shape with the rest of the episode's policy (None: nothing qualifies)."""
        assert self.latency is not None
        trial = Policy(layers=dict(self._policy.layers))
        trial.layers[name] = entry
        in_c, out_c, w_now, a_now = layer_shape(self.graph, trial, name, self.settings.round_to)

        def ms(w: float, a: int) -> float:
            return self.latency.layer_ms(name, in_c, out_c, w, a)  # type: ignore[union-attr]

        # every pair from the minimum up is priced below: a cold table measures them in one go
        self.latency.prefetch(_precision_shapes(name, in_c, out_c, w_now, a_now, levels, w_min, a_min))

        here = ms(w_now, a_now)
        # where int8 and float layers convert at every edge between them, switching kinds is not a local choice
        # (the layer's own entry may be cheaper while the model gets slower): raise only within the layer's kind
        kind = self.latency.run_class(w_now, a_now) if self.latency.prices_transitions else None
        best: tuple[int, float, int, int] | None = None
        for w in levels:
            for a in levels:
                if w < w_min or a < a_min:
                    continue
                if kind is not None and self.latency.run_class(w, a) != kind:
                    continue
                t = ms(w, a)
                if t <= here * (1 + 1e-9) + 1e-12:
                    cand = (w + a, -t, w, a)
                    best = cand if best is None else max(best, cand)
        return None if best is None else (best[2], best[3])

    def _prefetch_precision(self, name: str, entries: Sequence[LayerPolicy], w_min: int, a_min: int) -> None:
        """Before free precision prices a layer's bit choices at each of these entries' shapes
        (``_most_precise_no_slower``: every (w, a) from the minimum up, and the entry's own), let a cold table measure
        them together. Nothing where free precision does not price (then nothing is measured for nothing)."""
        s = self.settings
        if (
            not entries
            or not s.free_precision
            or self._costs_fall_with_bits
            or self.settings.objective != "latency"
            or self.latency is None
        ):
            return
        levels = sorted(set(self._levels) | set(spaces.bit_levels(s.min_bits, s.max_bits, s.float_bits)))
        shapes: set[tuple[str, int, int, float, int]] = set()
        for entry in entries:
            trial = Policy(layers=dict(self._policy.layers))
            trial.layers[name] = entry
            in_c, out_c, w_now, a_now = layer_shape(self.graph, trial, name, s.round_to)
            shapes.update(_precision_shapes(name, in_c, out_c, w_now, a_now, levels, w_min, a_min))
        self.latency.prefetch(shapes)

    def _free_group_precision(self, name: str, entry: LayerPolicy) -> None:
        """AJPQ: raise the kept groups' bits together to the most precise width that costs no more time.

        A layer of mixed group bits runs as one kernel priced at its mean width; raising every kept group to one
        width ``w`` >= the widest group (and the activations to ``a`` >= theirs) never lowers a group's precision,
        and is done only where the table prices ``(w, a)`` no higher than the layer as decided. On TVM that is
        float (quantizing buys no time there), so AJPQ keeps its 0-bit groups (pruning) and drops bits that only
        cost accuracy; on ONNX Runtime 2..7 bits run as int8 kernels and become 8.
        """
        s = self.settings
        if not (s.free_precision and s.free_precision_groups) or self._costs_fall_with_bits:
            return
        if s.pin_first_last_bits and name in (self.steps[0], self.steps[-1]):
            return
        assert entry.channel_bits is not None
        kept = [b for b in entry.channel_bits if b > 0]
        levels = spaces.bit_levels(s.min_bits, s.max_bits, s.float_bits)
        raised = self._most_precise_no_slower(name, entry, levels, max(kept), entry.a_bits)
        if raised is None:
            return
        w, a = raised
        entry.channel_bits = [w if b > 0 else 0 for b in entry.channel_bits]
        entry.w_bits, entry.a_bits = w, a

    def _pin(self, name: str, entry: LayerPolicy) -> None:
        pin = self.settings.pin_first_last_bits
        if pin and self.action_spec.layout != "prune" and name in (self.steps[0], self.steps[-1]):
            entry.w_bits = entry.a_bits = int(pin)
            if entry.channel_bits is not None:
                entry.channel_bits = [pin if b > 0 else 0 for b in entry.channel_bits]
            else:
                # HAQ pins these layers for precision: where more bits (float on TVM) cost no more time, at least
                # the pinned width means float; pinning 8 bits on a float runtime would only cost time
                self._free_precision(name, entry, pinned_ok=True)

    def _snap_keep(self, name: str, keep: float) -> float:
        """The keep ratio of the channel count the target will really keep (a multiple of round_to)."""
        g = self.graph.group_of(name)
        if g is None or not g.prunable:
            return 1.0
        k = self.graph.kept_channels(g, keep, self.settings.round_to)
        return k / g.channels

    def _enforced_action(
        self, name: str, raw: np.ndarray, asked: LayerPolicy, done: LayerPolicy
    ) -> list[float]:
        """The enforced action: the agent's own values where its decision stood, the applied decision in
        [0, 1] units where the environment changed it (budget cap or repair, a pinned layer, a group keep
        ratio its leader decided). Rounding to whole channels or bits is not a change."""
        applied = self._encode(name, done)
        wanted = self._encode(name, asked)
        return [float(r) if w == e else e for r, w, e in zip(raw.tolist(), wanted, applied, strict=True)]

    def apply_options(self, options: dict[str, Any]) -> None:
        """Behaviours an agent asks of the environment (``compression.search.spaces.ENV_OPTIONS``)."""
        pin = options.get("pin_first_last_bits")
        if pin is not None:
            if not 1 <= int(pin) <= 8:
                raise SearchError(f"pin_first_last_bits={pin} is out of range", "use 1..8")
            self.settings.pin_first_last_bits = int(pin)
            self._most_compressed_memo.clear()
            self._cheap_bits = (
                self._cheapest_bits()
            )  # with transitions priced, the pinned layers change the best kind
            self.min_cost_ratio = self._min_cost_ratio()
            s = self.settings
            if s.enforce_budget and self.min_cost_ratio > s.budget * (1 + 1e-9):
                raise SearchError(
                    f"with the first and last layer pinned to {pin} bits, a budget of {s.budget:.0%} cannot be "
                    f"reached (the most compressed policy costs {self.min_cost_ratio:.1%})",
                    "raise the budget, or turn off the agent's pin_first_last_8bit",
                )

    def _encode(self, name: str, entry: LayerPolicy) -> list[float]:
        """A layer policy expressed back in [0, 1] action units (the enforced action)."""
        s = self.settings
        out = []
        for dim in self.action_spec.names:
            if dim == "keep_ratio":
                out.append(spaces.keep_ratio_to_action(entry.keep_ratio, s.min_keep))
            elif dim == "w_bits":
                out.append(spaces.bits_to_action(entry.w_bits, s.min_bits, s.max_bits, self._float_top))
            elif dim == "a_bits":
                out.append(spaces.bits_to_action(entry.a_bits, s.min_bits, s.max_bits, self._float_top))
            elif dim == "sparsity":
                pruned = sum(1 for b in (entry.channel_bits or []) if b == 0)
                out.append(spaces.pruned_groups_to_action(pruned, s.groups))
            else:  # group_bits_i
                i = int(dim.rsplit("_", 1)[1])
                bits = (entry.channel_bits or [entry.w_bits] * s.groups)[i]
                out.append(spaces.bits_to_action(bits, s.min_bits, s.max_bits) if bits > 0 else 0.0)
        return out

    def _most_compressed(self, name: str) -> LayerPolicy:
        """The most compressed entry the action space allows for a layer not decided yet.

        Memoised per step: it depends on the layers decided so far (AJPQ's free precision prices the layer at the
        shape they leave it), which change only between steps; the cap asks for it once per candidate and later
        layer (measured: AJPQ's environment spent ~1 s per episode re-deriving the same entries). Callers only read
        the entry."""
        key = (name, self._t)
        hit = self._most_compressed_memo.get(key)
        if hit is None:
            hit = self._most_compressed_memo[key] = self._derive_most_compressed(name)
        return hit

    def _derive_most_compressed(self, name: str) -> LayerPolicy:
        s = self.settings
        entry = LayerPolicy(**self.base_policy[name].to_dict())
        names = self.action_spec.names
        if "keep_ratio" in names and self._is_leader(name):
            entry.keep_ratio = self._snap_keep(name, s.min_keep)
        if "w_bits" in names:
            entry.w_bits, entry.a_bits = self._cheap_bits[name]
        if s.layout == "ajpq":
            pruned = s.groups - 1 if self._is_leader(name) else 0
            entry.channel_bits = [s.min_bits] * (s.groups - pruned) + [0] * pruned
            entry.w_bits = entry.a_bits = s.min_bits
            entry.keep_ratio = (s.groups - pruned) / s.groups
            self._free_group_precision(name, entry)
        self._pin(name, entry)
        return entry

    def _is_leader(self, name: str) -> bool:
        g = self.graph.group_of(name)
        return g is not None and g.prunable and g.leader == name

    def _lookahead_costs(self, name: str, entry: LayerPolicy) -> Costs:
        """Costs of the policy so far with ``entry`` here and the layers after it compressed as far as allowed."""
        trial = Policy(layers=dict(self._policy.layers))
        trial.layers[name] = entry
        idx = self.steps.index(name)
        for later in self.steps[idx + 1 :]:
            trial.layers[later] = self._most_compressed(later)
        return compute_costs(self.graph, trial, self.settings.round_to)

    def _prefetch(self, all_costs: Sequence[Costs]) -> None:
        """Let the latency model measure the entries these costs will be priced with in one go (a cold table)."""
        if self.settings.objective != "latency" or self.latency is None:
            return
        self.latency.prefetch(
            {
                (n, c.in_channels, c.out_channels, c.w_bits, c.a_bits)
                for costs in all_costs
                for n, c in costs.layers.items()
            }
        )

    def _priced(self, costs: Costs) -> bool:
        """Has the latency model priced every layer of these costs before (nothing to measure)?"""
        if self.settings.objective != "latency" or self.latency is None:
            return True
        return self.latency.priced(
            (n, c.in_channels, c.out_channels, c.w_bits, c.a_bits) for n, c in costs.layers.items()
        )

    def _lower_bits(self, w: int, a: int) -> tuple[int, int] | None:
        """One bit level less for the wider of (w, a) (weights first on a tie), or None at the lowest level."""

        def below(b: int) -> int | None:
            return max((x for x in self._levels if x < b), default=None)

        lw, la = below(w), below(a)
        if w >= a and lw is not None:
            return lw, a
        if la is not None:
            return w, la
        return (lw, a) if lw is not None else None

    def _candidates(self, name: str, entry: LayerPolicy) -> list[LayerPolicy]:
        """Entries from the proposed one towards more compression, in the order the cap tries them."""
        s = self.settings
        out = [entry]
        layout = self.action_spec.layout
        can_prune = self._is_leader(name) and layout in ("prune", "joint", "ajpq")
        if layout == "ajpq":
            cur = LayerPolicy(**entry.to_dict())
            walk: list[LayerPolicy] = []
            while True:
                bits = list(cur.channel_bits or [])
                nonzero = [i for i, b in enumerate(bits) if b > 0]
                widest = max((bits[i] for i in nonzero), default=0)
                if widest > s.min_bits:
                    i = max(i for i in nonzero if bits[i] == widest)  # least important of the widest
                    bits[i] = max(
                        b for b in range(s.min_bits, s.max_bits + 1) if b < widest
                    )  # float -> max_bits
                elif can_prune and len(nonzero) > 1:
                    bits[nonzero[-1]] = 0
                else:
                    break
                nz = [b for b in bits if b > 0]
                cur = LayerPolicy(
                    keep_ratio=len(nz) / len(bits),
                    w_bits=max(nz),
                    a_bits=max(nz),
                    channel_bits=bits,
                    sparsity=cur.sparsity,
                )
                self._pin(name, cur)
                walk.append(cur)
            # with free precision, bits that buy no time at each shape are raised again (on copies: the walk goes on
            # from the lowered bits, towards pruning groups); on a cold table the shapes are measured together first
            if s.free_precision_groups:
                self._prefetch_precision(name, walk, s.min_bits, s.min_bits)
            for cur in walk:
                emitted = LayerPolicy(**cur.to_dict())
                self._free_group_precision(name, emitted)
                if emitted not in out:
                    out.append(emitted)
            return out
        keeps = [entry.keep_ratio]
        if can_prune:
            g = self.graph.group_of(name)
            assert g is not None
            r = max(1, s.round_to)
            k = self.graph.kept_channels(g, entry.keep_ratio, r)
            floor_k = self.graph.kept_channels(g, s.min_keep, r)
            keeps = [c / g.channels for c in range(k, floor_k - 1, -r)] or [entry.keep_ratio]
        bit_steps: list[tuple[int, int]] = [(entry.w_bits, entry.a_bits)]
        pinned = bool(s.pin_first_last_bits and name in (self.steps[0], self.steps[-1]))
        if layout in ("bits", "joint") and not pinned:
            step = self._lower_bits(entry.w_bits, entry.a_bits)
            while step is not None:
                bit_steps.append(step)
                step = self._lower_bits(*step)
            cheap = self._cheap_bits[name]
            if not self._costs_fall_with_bits and cheap not in bit_steps:
                bit_steps.append(cheap)  # fewer bits can cost more: the cheapest choice may lie elsewhere
        # prune first at the chosen bits (AMC), then lower bits at the lowest keep (HAQ-style); with free precision
        # the agent's own bits are raised again at each narrower shape (what costs no more time changes with it)
        w0, a0 = self._decoded_bits.get(name, (entry.w_bits, entry.a_bits))
        if pinned or (w0, a0) != (entry.w_bits, entry.a_bits):
            # free precision prices the layer's bit choices at every narrower shape below: measured together first
            pin = int(s.pin_first_last_bits or 0)
            lo_w, lo_a = (pin, pin) if pinned else (w0, a0)
            self._prefetch_precision(
                name, [LayerPolicy(k, lo_w, lo_a, entry.sparsity) for k in keeps[1:]], lo_w, lo_a
            )
        for keep in keeps[1:]:
            cand = LayerPolicy(keep, entry.w_bits, entry.a_bits, entry.sparsity)
            if pinned:
                self._pin(
                    name, cand
                )  # the pinned width, raised again where more bits cost no more at this shape
            elif (w0, a0) != (entry.w_bits, entry.a_bits):
                cand.w_bits, cand.a_bits = w0, a0
                self._free_precision(name, cand)
            out.append(cand)
        for w, a in bit_steps[1:]:
            out.append(LayerPolicy(keeps[-1], w, a, entry.sparsity))
        return out

    def _decide(self, name: str, a: np.ndarray) -> LayerPolicy:
        entry = self._decode(name, a)
        s = self.settings
        if not (s.enforce_budget and s.budget_mode == "cap"):
            return entry
        chosen = self._cap(name, entry)
        if chosen is not entry and chosen.channel_bits is None:
            # capped to another shape: the bits that cost no more time may differ there (never costs more)
            self._free_precision(name, chosen)
        return chosen

    def _cap(self, name: str, entry: LayerPolicy) -> LayerPolicy:
        """AMC's cap: the least compressed of ``_candidates`` with which the budget stays reachable."""
        candidates = self._candidates(name, entry)
        if not self._costs_fall_with_bits:
            # the cap: the first candidate (least changed) with which the budget stays reachable; costs are not
            # monotone along the list here, so every candidate is priced (a few dictionary look-ups each)
            looks = [self._lookahead_costs(name, c) for c in candidates]
            # every candidate is priced: on a cold table their entries are measured together
            self._prefetch(looks)
            costs = [self._objective(c) for c in looks]
            for c, cost in zip(candidates, costs, strict=True):
                if cost <= self.budget_cost * (1 + 1e-9):
                    return c
            return candidates[min(range(len(costs)), key=costs.__getitem__)]  # unreachable: the cheapest
        # the cap: the least-compressed candidate with which the budget stays reachable (binary search on
        # a list ordered from least to most compressed; cost is monotone along it). Each answer picks the next
        # probe, so on a table still filling the probes' entries would be measured one probe at a time: a probe
        # not priced yet is measured together with the probes that can follow it (a batch costs a fraction of
        # one-by-one measurements on TVM), and a warm table pays one look-up per probe for this
        looks: dict[int, Costs] = {}

        def look(i: int) -> Costs:
            if i not in looks:
                looks[i] = self._lookahead_costs(name, candidates[i])
            return looks[i]

        def fits(i: int, *then: int) -> bool:
            if not self._priced(look(i)):
                self._prefetch([look(i), *(look(j) for j in then)])
            return self._objective(look(i)) <= self.budget_cost * (1 + 1e-9)

        lo, hi = 0, len(candidates) - 1
        if fits(lo, hi):
            return candidates[lo]
        if not fits(hi):
            return candidates[hi]  # unreachable budget: compress as far as allowed
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if fits(mid, *({(lo + mid) // 2, (mid + hi) // 2} - {lo, mid, hi})):
                hi = mid
            else:
                lo = mid
        return candidates[hi]

    def _repair(self) -> None:
        """HAQ's repair: lower bits from the last layer backwards until the policy fits the budget."""
        s = self.settings
        pinned = {self.steps[0], self.steps[-1]} if s.pin_first_last_bits else set()
        for _ in range(64 * len(self.steps)):
            cost, _ = self.cost_of(self._policy)
            if cost <= self.budget_cost * (1 + 1e-9):
                return
            changed = False
            for name in reversed(self.steps):
                if name in pinned:
                    continue
                lp = self._policy[name]
                options = [self._lower_bits(lp.w_bits, lp.a_bits)]
                if not self._costs_fall_with_bits:
                    # one level less may cost more here: then the layer's cheapest bits, if that is cheaper
                    options.append(self._cheap_bits[name])
                for opt in options:
                    if opt is None or opt == (lp.w_bits, lp.a_bits):
                        continue
                    before = (lp.w_bits, lp.a_bits, lp.channel_bits)
                    lp.w_bits, lp.a_bits = opt
                    if lp.channel_bits is not None:
                        lp.channel_bits = [min(b, lp.w_bits) if b > 0 else 0 for b in lp.channel_bits]
                    if not self._costs_fall_with_bits and self.cost_of(self._policy)[0] >= cost - 1e-12:
                        lp.w_bits, lp.a_bits, lp.channel_bits = before  # no cheaper: try the next option
                        continue
                    changed = True
                    break
                if changed:
                    break
            if not changed:
                return

    # ------------------------------------------------------------------ scoring
    def evaluate_policy(self, policy: Policy) -> tuple[float, dict[str, float]]:
        """Accuracy of a policy on the search set (applied with re-fit and batch-norm re-estimation, then given
        ``tune_steps`` of fine-tuning if set)."""
        t0 = time.perf_counter()
        s = self.settings
        model = apply_policy(self.graph, policy, self.calib, round_to=s.round_to, reconstruct=s.reconstruct)
        timings: dict[str, float] = {}
        if self._tune is not None:
            t_tune = time.perf_counter()
            quick_tune(model, *self._tune, steps=s.tune_steps, seed=s.seed)
            timings["tune_s"] = time.perf_counter() - t_tune
        # scored only, then dropped: the batch norms folded into their convolutions, as the runtimes run them
        fold_batch_norms(model, self.graph.conv_bn_pairs())
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        t1 = time.perf_counter()
        acc = evaluate(model, self._scoring_set).top1
        t2 = time.perf_counter()
        # apply_s includes tune_s (an episode's parts add up to its time)
        return acc, {"apply_s": t1 - t0, "accuracy_s": t2 - t1, **timings}

    def reward_of(self, accuracy: float, cost: float) -> float:
        """The configured reward for an accuracy and an objective cost."""
        s = self.settings
        p = s.reward_params
        ref = self._reference_cost
        if s.reward == "acc":
            return accuracy
        if s.reward == "acc-log-cost":
            # AMC's accuracy-guaranteed reward: -error * log(cost); cost in MACs/BOPs/params/bytes or in
            # microseconds for latency, so the logarithm stays positive
            units = cost * 1000.0 if s.objective == "latency" else cost
            return -(1.0 - accuracy) * math.log(max(units, 1.0 + 1e-9))
        if s.reward == "galen":
            beta = float(p.get("beta", -5.0))
            rho = float(p.get("rho", s.budget))
            return accuracy + beta * abs(cost / (rho * ref) - 1.0)
        if s.reward == "haq":
            base = self.original_accuracy if self.original_accuracy is not None else 0.0
            return 0.1 * (accuracy - base)
        raise SearchError(f"unknown reward {s.reward!r}")

    def _score(self, policy: Policy) -> tuple[float, dict[str, Any]]:
        t0 = time.perf_counter()
        cost, costs = self.cost_of(policy)
        latency_ms = self.latency.total(costs) if self.latency is not None else None
        t_cost = time.perf_counter() - t0
        acc, timings = self.evaluate_policy(policy)
        timings["cost_s"] = t_cost
        reward = self.reward_of(acc, cost)
        metrics = {
            "accuracy": acc,
            "cost": cost,
            "cost_ratio": cost / self._reference_cost if self._reference_cost else 1.0,
            "budget": self.settings.budget,
            "meets_budget": cost <= self.budget_cost * (1 + 1e-6),
            "latency_ms": latency_ms,
            "macs": costs.macs,
            "bops": costs.bops,
            "params": costs.params,
            "bytes": costs.bytes,
            "timings": timings,
        }
        return reward, metrics


def layer_sensitivity(
    graph: LayerGraph,
    val_set: torch.utils.data.TensorDataset,
    calib: torch.Tensor,
    layers: list[str],
    layout: str,
    *,
    round_to: int = 1,
    samples: int = 200,
    progress: Callable[[int, int, dict], None] | None = None,
    reconstruct: bool = True,
) -> tuple[dict[str, list[float]], float]:
    """Accuracy drop when only one layer is compressed, at a few settings (Galen's sensitivity features).

    Pruning layouts try keep ratios 0.5 and 0.25; bit layouts 4 and 2 weight bits (8-bit activations);
    joint/AJPQ layouts both. Returns ({layer: [drops]}, accuracy of the original on the same subset).
    """
    from compression.training import subset

    data = subset(val_set, samples, seed=1)
    base = evaluate(graph.module, data).top1
    trials: list[dict[str, Any]] = []
    if layout in ("prune", "joint", "ajpq"):
        trials += [{"keep_ratio": 0.5}, {"keep_ratio": 0.25}]
    if layout in ("bits", "joint", "ajpq"):
        trials += [{"w_bits": 4, "a_bits": 8}, {"w_bits": 2, "a_bits": 8}]
    out: dict[str, list[float]] = {}
    total = len(layers) * len(trials)
    done = 0
    for name in layers:
        drops = []
        leader = graph.group_of(name)
        for trial in trials:
            if "keep_ratio" in trial and (leader is None or not leader.prunable or leader.leader != name):
                drops.append(0.0)
            else:
                pol = Policy(layers={name: LayerPolicy(**trial)})
                model = apply_policy(graph, pol, calib, round_to=round_to, reconstruct=reconstruct)
                drops.append(max(0.0, base - evaluate(model, data).top1))
            done += 1
            if progress is not None:
                progress(done, total, {"layer": name})
        out[name] = drops
    return out, base
