"""A cheap synthetic compression environment with a known best policy, to prove that agents learn.

It implements the protocol of ``compression.search.spaces`` exactly like the real environment does, but
an episode costs microseconds instead of a validation pass:

- A made-up network of ``num_layers`` layers (a small CNN-like chain: channels grow, the feature map
  shrinks, the last layer is fully connected). Each layer has a cost (its MACs), a pruning sensitivity
  with its own exponent, weight and activation quantization sensitivities, and, for AJPQ, the
  importance share of each output-channel group (most important first).
- Decisions are discrete like the real ones: whole channels (keep ratio rounded to channels), whole bits
  in ``[min_bits, max_bits]``, whole groups (AJPQ; a pruned group is 0 bits).
- Accuracy falls with compression in a known nonlinear way::

      accuracy = base_accuracy * exp(-sum over layers of drop_l)
      prune drop   = prune_sens_l * r ** prune_exp_l          r = (1 - keep) / (1 - min_keep)
      quant drop   = w_sens_l * e(w_bits) + a_sens_l * e(a_bits),   e(b) = 4 ** -(b - min_bits)
      AJPQ drop    = prune_sens_l * P ** prune_exp_l + w_sens_l * sum_kept_groups m_g * e(b_g)
                     (P: importance share of the pruned groups, m_g: importance share of group g)

- Cost is additive over layers (MACs scaled by the kept share and the bit-widths, i.e. BOPs relative to
  the ``max_bits`` model), and the budget (a fraction of the original cost) is met by construction as in
  AMC: each step's decision is capped so that the remaining layers, at their minimum, can still fit.
  When the agent's decision does not fit, the environment takes, among the decisions that compress every
  dimension at least as much, the most expensive one that fits (ties: the closest to the agent's).
- The reward is the accuracy of the enforced policy (AMC's resource-constrained protocol).

Because accuracy is a monotone function of a sum of per-layer drops and cost is a sum of per-layer
costs, the best policy is a multiple-choice knapsack: ``optimum()`` solves it by dynamic programming on
a fine cost grid, with costs rounded up (so the answer is feasible) and rounded down (which bounds the
true optimum from above); the gap between the two is reported.

The state features mirror the real environment's: layer index, type, in/out channels, kernel, stride,
input size, params, the layer's share of the cost, the share of cost already removed and still ahead,
the previous (enforced) action, and the layer's sensitivity probes.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from compression.errors import SearchError
from compression.policy import FLOAT_BITS, LayerPolicy, Policy
from compression.search.spaces import (
    LAYOUTS,
    ActionSpec,
    EnvSpec,
    StepResult,
    action_to_bits,
    action_to_keep_ratio,
    action_to_pruned_groups,
    bits_to_action,
    keep_ratio_to_action,
    pruned_groups_to_action,
)

_STATIC_FEATURES = (
    "layer_index",
    "is_conv",
    "in_channels",
    "out_channels",
    "kernel",
    "stride",
    "input_size",
    "params",
    "cost_share",
)
_DYNAMIC_FEATURES = ("cost_removed", "cost_ahead")


@dataclass(frozen=True)
class SyntheticLayer:
    """One made-up layer: its shape, its cost, and how accuracy reacts to compressing it."""

    name: str
    kind: str
    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    input_size: int
    params: int
    macs: int
    prune_sens: float
    prune_exp: float
    w_sens: float
    a_sens: float
    group_importance: tuple[float, ...]


@dataclass(frozen=True)
class SyntheticOptimum:
    """The best policy of a synthetic environment.

    reward: its accuracy (the reward). upper_bound: no policy can do better than this (from the relaxed
    grid); ``upper_bound - reward`` is the solver's certified gap. choices: per layer, the index of the
    chosen decision. actions: per layer, an action that maps to it. cost_ratio: its cost over the original.
    """

    reward: float
    upper_bound: float
    cost_ratio: float
    choices: tuple[int, ...]
    actions: tuple[tuple[float, ...], ...]


class SyntheticCompressionEnv:
    """The synthetic environment (see the module docstring).

    layout: ``prune``, ``bits``, ``joint`` or ``ajpq``. num_layers: steps per episode. budget: allowed cost
    as a fraction of the original. problem_seed: draws the network and its sensitivities (the episode
    itself is deterministic). groups: AJPQ's output-channel groups. min_keep, min_bits, max_bits: action
    ranges. pin_first_last_bits: HAQ's pin of the first and last layer's bits (bits and joint layouts).
    base_accuracy: accuracy of the uncompressed network. sensitivity_scale: multiplies every drop.
    """

    def __init__(
        self,
        layout: str = "prune",
        num_layers: int = 10,
        budget: float = 0.5,
        problem_seed: int = 0,
        groups: int = 4,
        min_keep: float = 0.2,
        min_bits: int = 2,
        max_bits: int = 8,
        pin_first_last_bits: int | None = None,
        base_accuracy: float = 0.9,
        sensitivity_scale: float = 1.0,
    ) -> None:
        if layout not in LAYOUTS:
            raise SearchError(f"unknown layout {layout!r}", f"use one of {', '.join(LAYOUTS)}")
        if num_layers < 2:
            raise SearchError(f"num_layers must be at least 2, got {num_layers}")
        if not 0.0 < budget <= 1.0:
            raise SearchError(
                f"budget {budget} is out of range", "use a fraction of the original cost in (0, 1]"
            )
        if not 0.0 < min_keep < 1.0:
            raise SearchError(f"min_keep {min_keep} is out of range", "use a value in (0, 1)")
        if not 1 <= min_bits < max_bits <= 8:
            raise SearchError(
                f"bit range {min_bits}..{max_bits} is invalid", "use 1 <= min_bits < max_bits <= 8"
            )
        if pin_first_last_bits is not None:
            if layout not in ("bits", "joint"):
                raise SearchError(
                    f"pinning bits needs a layout with w_bits and a_bits, not {layout!r}",
                    "use the bits or joint layout, or drop pin_first_last_bits",
                )
            if not min_bits <= pin_first_last_bits <= max_bits:
                raise SearchError(
                    f"pinned bits {pin_first_last_bits} are outside {min_bits}..{max_bits}",
                    "widen the bit range or change the pin",
                )
        self.layout = layout
        self.budget = float(budget)
        self.problem_seed = int(problem_seed)
        self.min_keep = float(min_keep)
        self.min_bits = int(min_bits)
        self.max_bits = int(max_bits)
        self.pin_first_last_bits = pin_first_last_bits
        self.base_accuracy = float(base_accuracy)
        self.action_spec = ActionSpec.for_layout(layout, groups)
        self.groups = self.action_spec.groups or int(groups)
        self.layers = self._make_layers(num_layers, np.random.default_rng(problem_seed), sensitivity_scale)
        self.original_cost = float(sum(layer.macs for layer in self.layers))
        self._tables = [self._choice_table(i, layer) for i, layer in enumerate(self.layers)]
        self._min_costs = np.array([t["cost"].min() for t in self._tables])
        min_ratio = float(self._min_costs.sum() / self.original_cost)
        if self.budget < min_ratio - 1e-12:
            raise SearchError(
                f"budget {self.budget:.4f} is below the smallest reachable cost ratio {min_ratio:.4f}",
                "raise the budget or widen the action ranges",
            )
        self._sens = self._sensitivity_features()
        self._static = self._static_features()
        feature_names = (
            *_STATIC_FEATURES,
            *_DYNAMIC_FEATURES,
            *(f"prev_{n}" for n in self.action_spec.names),
            *self._sensitivity_names(),
        )
        self.spec = EnvSpec(
            obs_dim=len(feature_names),
            num_steps=num_layers,
            action_spec=self.action_spec,
            layer_names=tuple(layer.name for layer in self.layers),
            feature_names=feature_names,
        )
        self._t = 0
        self._done = True
        self._costs: list[float] = []
        self._choices: list[int] = []
        self._raw: list[list[float]] = []
        self._enforced: list[list[float]] = []

    # --- the made-up network ---------------------------------------------------------------------------

    def _make_layers(self, n: int, rng: np.random.Generator, scale: float) -> list[SyntheticLayer]:
        """A CNN-like chain: three stages of convolutions (16, 32, 64 channels, stride 2 between stages,
        mostly 3x3 kernels) on a 32x32 input, then a fully connected classifier over 10 classes."""
        layers = []
        in_ch, size = 3, 32
        widths = (16, 32, 64)
        n_conv = n - 1
        for i in range(n):
            if i == n - 1:
                # After global pooling: a 1x1 "feature map" of in_ch features.
                kind, out_ch, kernel, stride, in_size = "linear", 10, 1, 1, 1
            else:
                stage = (3 * i) // n_conv
                first_of_stage = i > 0 and stage != (3 * (i - 1)) // n_conv
                kind, out_ch = "conv", widths[stage]
                kernel = 3 if rng.random() < 0.75 else 1
                stride = 2 if first_of_stage else 1
                in_size = size
            out_size = max(1, in_size // stride)
            params = out_ch * in_ch * kernel * kernel
            macs = params * out_size * out_size
            importance = np.sort(rng.dirichlet(np.full(self.groups, 1.5)))[::-1]
            layers.append(
                SyntheticLayer(
                    name=f"fc{i}" if kind == "linear" else f"conv{i}",
                    kind=kind,
                    in_channels=in_ch,
                    out_channels=out_ch,
                    kernel=kernel,
                    stride=stride,
                    input_size=in_size,
                    params=params,
                    macs=macs,
                    prune_sens=float(scale * math.exp(rng.uniform(math.log(0.03), math.log(1.0)))),
                    prune_exp=float(rng.uniform(1.5, 3.0)),
                    w_sens=float(scale * math.exp(rng.uniform(math.log(0.05), math.log(1.5)))),
                    a_sens=float(scale * math.exp(rng.uniform(math.log(0.02), math.log(0.8)))),
                    group_importance=tuple(float(m) for m in importance),
                )
            )
            in_ch, size = out_ch, out_size
        return layers

    # --- decisions, costs and drops per layer ----------------------------------------------------------

    def _quant_error(self, bits: np.ndarray) -> np.ndarray:
        return np.power(4.0, -(bits.astype(np.float64) - self.min_bits))

    def _pinned(self, index: int) -> bool:
        return self.pin_first_last_bits is not None and index in (0, len(self.layers) - 1)

    def _choice_table(self, index: int, layer: SyntheticLayer) -> dict[str, Any]:
        """Every decision of one layer: integer values, cost, drop, and a normalised vector for distances."""
        bits = np.arange(self.min_bits, self.max_bits + 1)
        if self._pinned(index):
            bits_w = bits_a = np.array([self.pin_first_last_bits])
        else:
            bits_w = bits_a = bits
        n = layer.out_channels
        n_min = max(1, math.ceil(self.min_keep * n - 1e-9))
        keeps = np.arange(n_min, n + 1)
        if self.layout == "prune":
            vals = keeps[:, None]
        elif self.layout == "bits":
            vals = np.array(list(itertools.product(bits_w, bits_a)))
        elif self.layout == "joint":
            vals = np.array(list(itertools.product(keeps, bits_w, bits_a)))
        else:
            rows = []
            for pruned in range(self.groups):
                for kept_bits in itertools.product(bits, repeat=self.groups - pruned):
                    rows.append((*kept_bits, *([0] * pruned)))
            vals = np.array(rows)
        vals = vals.astype(np.int64)
        span_bits = float(self.max_bits - self.min_bits)
        if self.layout == "ajpq":
            sizes = np.array([len(c) for c in np.array_split(np.arange(n), self.groups)], dtype=np.float64)
            share = sizes / n
            m = np.array(layer.group_importance)
            kept = vals > 0
            cost = layer.macs * (share * vals / self.max_bits).sum(axis=1)
            pruned_importance = (m * ~kept).sum(axis=1)
            quant = (m * kept * np.where(kept, self._quant_error(np.maximum(vals, self.min_bits)), 0.0)).sum(
                1
            )
            drop = layer.prune_sens * pruned_importance**layer.prune_exp + layer.w_sens * quant
            norm = vals / self.max_bits
        else:
            cost = np.full(len(vals), float(layer.macs))
            drop = np.zeros(len(vals))
            norm_cols = []
            col = 0
            if self.layout in ("prune", "joint"):
                keep = vals[:, col] / n
                cost = cost * keep
                drop = drop + layer.prune_sens * ((1.0 - keep) / (1.0 - self.min_keep)) ** layer.prune_exp
                norm_cols.append((keep - self.min_keep) / (1.0 - self.min_keep))
                col += 1
            if self.layout in ("bits", "joint"):
                w, a = vals[:, col], vals[:, col + 1]
                cost = cost * (w / self.max_bits) * (a / self.max_bits)
                drop = drop + layer.w_sens * self._quant_error(w) + layer.a_sens * self._quant_error(a)
                norm_cols += [(w - self.min_bits) / span_bits, (a - self.min_bits) / span_bits]
            norm = np.stack(norm_cols, axis=1)
        # Decision values -> row, through a mixed-radix code (a dict of tuples is slow to build).
        radix = int(vals.max()) + 1
        strides = radix ** np.arange(vals.shape[1] - 1, -1, -1, dtype=np.int64)
        codes = vals @ strides
        lookup = np.full(int(codes.max()) + 1, -1, dtype=np.int64)
        lookup[codes] = np.arange(len(vals))
        return {
            "vals": vals,
            "cost": cost,
            "drop": drop,
            "norm": norm,
            "lookup": lookup,
            "strides": strides,
            "n": n,
            "n_min": n_min,
        }

    def _row(self, index: int, values: tuple[int, ...]) -> int:
        """Row of a layer's choice table holding ``values``."""
        table = self._tables[index]
        row = int(table["lookup"][int(np.dot(values, table["strides"]))])
        assert row >= 0, f"no decision {values} for layer {index}"
        return row

    def _values_of(self, index: int, action: np.ndarray, pin: bool = True) -> tuple[int, ...]:
        """The decision an action stands for, before any budget cap (with ``pin``, pins applied)."""
        table = self._tables[index]
        vals: list[int] = []
        if self.layout == "ajpq":
            pruned = action_to_pruned_groups(float(action[0]), self.groups)
            for g in range(self.groups):
                kept = g < self.groups - pruned
                vals.append(action_to_bits(float(action[1 + g]), self.min_bits, self.max_bits) if kept else 0)
            return tuple(vals)
        for name, a in zip(self.action_spec.names, action, strict=True):
            if name == "keep_ratio":
                keep = action_to_keep_ratio(float(a), self.min_keep)
                vals.append(int(min(table["n"], max(table["n_min"], round(keep * table["n"])))))
            elif pin and self._pinned(index):
                vals.append(int(self.pin_first_last_bits))  # type: ignore[arg-type]
            else:
                vals.append(action_to_bits(float(a), self.min_bits, self.max_bits))
        return tuple(vals)

    def _action_of(self, index: int, chosen: tuple[int, ...], raw: np.ndarray) -> list[float]:
        """Express a decision as an action: the agent's value wherever that value alone already means the
        decision taken (so rounding is not a change), the canonical value elsewhere (cap or pin)."""
        own = self._values_of(index, raw, pin=False)
        out = [float(x) for x in raw]
        if self.layout == "ajpq":
            n_pruned = sum(1 for b in chosen if b == 0)
            if n_pruned != sum(1 for b in own if b == 0):
                out[0] = pruned_groups_to_action(n_pruned, self.groups)
            for g, (c, o) in enumerate(zip(chosen, own, strict=True)):
                # A pruned group's bits are ignored by the environment: the agent's value stays.
                if c != 0 and c != o:
                    out[1 + g] = bits_to_action(c, self.min_bits, self.max_bits)
            return out
        return [
            float(raw[d]) if c == o else self._canonical_action(index, chosen)[d]
            for d, (c, o) in enumerate(zip(chosen, own, strict=True))
        ]

    # --- features --------------------------------------------------------------------------------------

    def _sensitivity_names(self) -> tuple[str, ...]:
        return {
            "prune": ("sens_prune",),
            "bits": ("sens_w_bits", "sens_a_bits"),
            "joint": ("sens_prune", "sens_w_bits", "sens_a_bits"),
            "ajpq": ("sens_prune", "sens_w_bits"),
        }[self.layout]

    def _sensitivity_features(self) -> np.ndarray:
        """Accuracy drop when only one layer is compressed at a probe point, as the real env measures it."""
        probe_bits = np.array([4])
        cols = []
        for name in self._sensitivity_names():
            col = []
            for layer in self.layers:
                if name == "sens_prune":
                    drop = layer.prune_sens * 0.5**layer.prune_exp
                elif name == "sens_w_bits":
                    drop = layer.w_sens * float(self._quant_error(probe_bits)[0])
                else:
                    drop = layer.a_sens * float(self._quant_error(probe_bits)[0])
                col.append(self.base_accuracy * (1.0 - math.exp(-drop)))
            col_arr = np.array(col)
            cols.append(col_arr / max(col_arr.max(), 1e-12))
        return np.stack(cols, axis=1)

    def _static_features(self) -> np.ndarray:
        n = len(self.layers)
        raw = np.array(
            [
                [
                    i / (n - 1),
                    1.0 if layer.kind == "conv" else 0.0,
                    layer.in_channels,
                    layer.out_channels,
                    layer.kernel,
                    layer.stride,
                    layer.input_size,
                    layer.params,
                    layer.macs / self.original_cost,
                ]
                for i, layer in enumerate(self.layers)
            ],
            dtype=np.float64,
        )
        lo, hi = raw.min(axis=0), raw.max(axis=0)
        scaled = np.where(hi > lo, (raw - lo) / np.where(hi > lo, hi - lo, 1.0), 0.0)
        # Index and type are already in [0, 1]; min-max scaling would only blur them.
        scaled[:, :2] = raw[:, :2]
        return scaled

    def _observation(self) -> np.ndarray:
        t = min(self._t, len(self.layers) - 1)
        removed = sum(self.layers[j].macs - self._costs[j] for j in range(self._t)) / self.original_cost
        ahead = sum(layer.macs for layer in self.layers[t + 1 :]) / self.original_cost
        prev = self._enforced[-1] if self._enforced else [0.0] * self.action_spec.dim
        obs = np.concatenate([self._static[t], [removed, ahead], prev, self._sens[t]])
        return obs.astype(np.float32)

    # --- the protocol ----------------------------------------------------------------------------------

    def reset(self, seed: int | None = None) -> np.ndarray:
        """Start an episode at the first layer. ``seed`` is accepted for the protocol; episodes are deterministic."""
        self._t = 0
        self._done = False
        self._costs, self._choices, self._raw, self._enforced = [], [], [], []
        return self._observation()

    def step(self, action: np.ndarray) -> StepResult:
        """Decide the current layer; see ``compression.search.spaces`` for the contract."""
        if self._done:
            raise SearchError("step() after the episode ended", "call reset() first")
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        if a.shape != (self.action_spec.dim,):
            raise SearchError(f"action has shape {a.shape}, expected ({self.action_spec.dim},)")
        if not np.all(np.isfinite(a)) or np.any(a < -1e-9) or np.any(a > 1 + 1e-9):
            raise SearchError(f"action {a} is outside [0, 1]", "agents must output values in [0, 1]")
        a = np.clip(a, 0.0, 1.0)
        t = self._t
        table = self._tables[t]
        desired = self._values_of(t, a)
        spent = sum(self._costs)
        allowance = self.budget * self.original_cost - spent - self._min_costs[t + 1 :].sum()
        idx = self._row(t, desired)
        if table["cost"][idx] > allowance + 1e-9 * self.original_cost:
            idx = self._cap(t, desired, allowance)
        chosen = tuple(int(v) for v in table["vals"][idx])
        enforced = self._action_of(t, chosen, a)
        self._costs.append(float(table["cost"][idx]))
        self._choices.append(idx)
        self._raw.append([float(x) for x in a])
        self._enforced.append(enforced)
        self._t += 1
        done = self._t == len(self.layers)
        info: dict[str, Any] = {"action": np.array(enforced), "layer": self.layers[t].name}
        reward = 0.0
        if done:
            self._done = True
            accuracy, cost_ratio = self.evaluate(self._choices)
            reward = accuracy
            info.update(
                policy=self._policy(self._choices),
                raw_actions=[list(r) for r in self._raw],
                enforced_actions=[list(e) for e in self._enforced],
                metrics={
                    "accuracy": accuracy,
                    "cost_ratio": cost_ratio,
                    "budget": self.budget,
                    "cost": float(sum(self._costs)),
                },
            )
        return self._observation(), float(reward), done, info

    def _cap(self, t: int, desired: tuple[int, ...], allowance: float) -> int:
        table = self._tables[t]
        vals, cost = table["vals"], table["cost"]
        dominated = np.all(vals <= np.array(desired), axis=1)
        fits = cost <= allowance + 1e-9 * self.original_cost
        candidates = np.flatnonzero(dominated & fits)
        if candidates.size == 0:
            # Cannot happen while the budget is above the minimum (checked in __init__): the all-minimum
            # decision is dominated by every decision and always fits. Kept as a guard against bugs.
            raise SearchError(
                f"no decision of layer {self.layers[t].name} fits the budget", "raise the budget"
            )
        best_cost = cost[candidates].max()
        top = candidates[cost[candidates] >= best_cost - 1e-12 * self.original_cost]
        want = table["norm"][self._row(t, desired)]
        dist = np.abs(table["norm"][top] - want).sum(axis=1)
        return int(top[int(np.argmin(dist))])

    # --- evaluation, the policy, the optimum ------------------------------------------------------------

    def evaluate(self, choices: list[int] | tuple[int, ...]) -> tuple[float, float]:
        """Accuracy and cost ratio of a decision per layer (indices into the layers' choice tables)."""
        drop = sum(float(self._tables[i]["drop"][c]) for i, c in enumerate(choices))
        cost = sum(float(self._tables[i]["cost"][c]) for i, c in enumerate(choices))
        return self.base_accuracy * math.exp(-drop), cost / self.original_cost

    def choices_of(self, actions: list[list[float]] | np.ndarray) -> list[int]:
        """The decision indices that enforced actions (one per layer) stand for."""
        return [self._row(i, self._values_of(i, np.asarray(a))) for i, a in enumerate(actions)]

    def _policy(self, choices: list[int]) -> Policy:
        policy = Policy(meta={"source": "synthetic", "layout": self.layout})
        for i, c in enumerate(choices):
            layer, table = self.layers[i], self._tables[i]
            vals = [int(v) for v in table["vals"][c]]
            if self.layout == "prune":
                lp = LayerPolicy(keep_ratio=vals[0] / table["n"])
            elif self.layout == "bits":
                lp = LayerPolicy(w_bits=vals[0], a_bits=vals[1])
            elif self.layout == "joint":
                lp = LayerPolicy(keep_ratio=vals[0] / table["n"], w_bits=vals[1], a_bits=vals[2])
            else:
                sizes = [len(g) for g in np.array_split(np.arange(table["n"]), self.groups)]
                kept = sum(s for s, b in zip(sizes, vals, strict=True) if b > 0)
                lp = LayerPolicy(
                    keep_ratio=kept / table["n"], w_bits=max(vals), a_bits=FLOAT_BITS, channel_bits=vals
                )
            policy[layer.name] = lp
        return policy

    def distance(self, choices: list[int] | tuple[int, ...], other: list[int] | tuple[int, ...]) -> float:
        """Mean absolute difference of two policies' normalised decisions (0 = same, 1 = opposite ends)."""
        diffs = [
            np.abs(self._tables[i]["norm"][a] - self._tables[i]["norm"][b]).mean()
            for i, (a, b) in enumerate(zip(choices, other, strict=True))
        ]
        return float(np.mean(diffs))

    def distance_to_optimum(self, enforced_actions: list[list[float]] | np.ndarray) -> float:
        """``distance`` between the policy of an episode's enforced actions and the best policy."""
        return self.distance(self.choices_of(enforced_actions), self.optimum().choices)

    @cached_property
    def _optimum(self) -> SyntheticOptimum:
        return self._solve(grid=20000)

    def optimum(self) -> SyntheticOptimum:
        """The best policy under the budget (computed once; see the module docstring)."""
        return self._optimum

    def _solve(self, grid: int) -> SyntheticOptimum:
        budget = self.budget * self.original_cost
        unit = budget / grid
        fronts = []
        for table in self._tables:
            order = np.lexsort((table["drop"], table["cost"]))
            keep, best = [], math.inf
            for i in order:
                if table["drop"][i] < best - 1e-15:
                    keep.append(int(i))
                    best = float(table["drop"][i])
            fronts.append(np.array(keep))

        def dp(round_up: bool) -> tuple[float, list[int]]:
            best = np.zeros(grid + 1)
            picks = []
            for table, front in zip(self._tables, fronts, strict=True):
                scaled = table["cost"][front] / unit
                units = (np.ceil(scaled - 1e-9) if round_up else np.floor(scaled + 1e-9)).astype(np.int64)
                new = np.full(grid + 1, math.inf)
                arg = np.full(grid + 1, -1, dtype=np.int64)
                for j, (u, i) in enumerate(zip(units, front, strict=True)):
                    if u > grid:
                        continue
                    cand = best[: grid + 1 - u] + table["drop"][i]
                    better = cand < new[u:]
                    new[u:][better] = cand[better]
                    arg[u:][better] = j
                best = new
                picks.append((arg, units, front))
            u = grid
            chosen = []
            for arg, units, front in reversed(picks):
                j = int(arg[u])
                chosen.append(int(front[j]))
                u -= int(units[j])
            chosen.reverse()
            return float(best[grid]), chosen

        feasible_drop, choices = dp(round_up=True)
        relaxed_drop, _ = dp(round_up=False)
        reward, cost_ratio = self.evaluate(choices)
        actions = []
        for i, c in enumerate(choices):
            vals = tuple(int(v) for v in self._tables[i]["vals"][c])
            actions.append(tuple(self._canonical_action(i, vals)))
        assert cost_ratio <= self.budget + 1e-9
        return SyntheticOptimum(
            reward=reward,
            upper_bound=self.base_accuracy * math.exp(-relaxed_drop),
            cost_ratio=cost_ratio,
            choices=tuple(choices),
            actions=tuple(actions),
        )

    def _canonical_action(self, index: int, vals: tuple[int, ...]) -> list[float]:
        table = self._tables[index]
        if self.layout == "ajpq":
            pruned = sum(1 for b in vals if b == 0)
            bits = [bits_to_action(b, self.min_bits, self.max_bits) if b else 0.0 for b in vals]
            return [pruned_groups_to_action(pruned, self.groups), *bits]
        out = []
        for name, v in zip(self.action_spec.names, vals, strict=True):
            if name == "keep_ratio":
                out.append(keep_ratio_to_action(v / table["n"], self.min_keep))
            else:
                out.append(bits_to_action(v, self.min_bits, self.max_bits))
        return out
