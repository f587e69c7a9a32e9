"""What leaves the search loop: its configuration, one ``EpisodeResult`` per episode, and the callbacks.

Callbacks are the one way to observe a search from outside (the CLI's progress bar, the Celery task that
writes episodes to the database and publishes them, the tests): the loop never knows who listens.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from compression.errors import SearchError

OBJECTIVES = ("latency", "macs", "bops", "params", "bytes")
REWARDS = ("acc", "acc-log-cost", "galen", "haq")


@dataclass
class SearchConfig:
    """Everything that defines a search run (plain data; stored with the run, JSON round-trip).

    model / dataset: specs as the CLI takes them (``zoo:resnet20@w.pth`` or a ``.pt2``; ``digits`` or a file).
    input_shape: (C, H, W) for zoo models (a ``.pt2`` carries its own).
    agent: a name from ``compression.agents.AGENTS`` (amc, haq, galen-pq, ajpq, two-stage, random, uniform, ...).
    target: a hardware target name or description (see ``compression.targets``).
    objective: the cost the budget applies to: latency, macs, bops, params or bytes.
    budget: the allowed cost as a fraction of the original model's (0 < budget <= 1).
    reward: acc | acc-log-cost | galen | haq; ``reward_params`` e.g. ``{"beta": -5, "rho": 0.5}`` for galen.
    episodes: search episodes; seed: makes the run reproducible.
    val_samples: images per accuracy estimate (the search set), from the validation split and, with
        ``train_top_up`` when that split holds fewer, from training images the calibration batch does not use
        (``Workspace.search_set``); calib_samples: samples for batch-norm re-estimation, activation calibration
        and the least-squares re-fit.
    round_to: channel rounding (None: the target's own).
    agent_config: the agent's hyper-parameters (see the agent's ``config_schema``).
    layout: what the agent decides per layer (prune | bits | joint | ajpq); None: the agent's own (random and
        uniform default to joint). min_keep / min_bits / max_bits bound the actions. float_bits: with the latency
        objective, a bits action may also leave a layer float (the top bin); on runtimes where a quantized layer
        is no faster (TVM computes in float here) that is how the bits and joint layouts stay usable.
        free_precision: with the latency objective, each decided (w_bits, a_bits) is raised to the most precise pair
        that costs no more time on the target at the layer's shape (fewer bits that buy no time only lose accuracy).
        free_precision_groups: with free_precision, AJPQ's kept groups are raised the same way, together (on TVM to
        float: AJPQ then prunes by its 0-bit groups instead of being refused there).
    reconstruct: re-fit the layers that read pruned channels to the original's outputs by least squares
        (``compression/reconstruct.py``) whenever a candidate is applied; off: slicing and batch-norm only.
    tune_steps: steps of a short distillation fine-tune every candidate gets before it is scored, on the training
        images the search set does not use (``Workspace.tune_set``); 0 (default): scored as applied. Measured at 10%
        of the MACs (docs/BENCHMARKS.md, 1i and 1): no better models than without it since the final fine-tune no
        longer shifts its inputs; each step costs about a tenth of a second on ResNet-20 at 2 cores.
    budget_mode: cap (AMC: each action capped so the budget stays reachable) or repair (HAQ: bits lowered
        from the last layer after the episode). enforce_budget: None means on for the acc and haq rewards and
        off for galen and acc-log-cost, which price the cost in the reward instead.
    top_k / fine_tune_epochs: after the search, the best ``top_k`` policies within budget are fine-tuned
        for ``fine_tune_epochs`` and scored on the validation and test splits; the best on validation is exported.
        fine_tune_augment: that fine-tune shifts its inputs at random (off: a short distillation does better
        without, docs/BENCHMARKS.md 1j).
    device_check_rounds: with a latency budget on a measuring target, the candidates are first measured end to
        end on the device against the original in this many interleaved rounds, and those over the budget are
        replaced by the next policies by reward (``compression/search/finalize.py``); 0 turns the check off.
    checkpoint_every: episodes between checkpoints.
    """

    model: str
    dataset: str = "digits"
    input_shape: tuple[int, int, int] | None = None
    agent: str = "amc"
    target: str = "local-tvm"
    objective: str = "latency"
    budget: float = 0.5
    reward: str = "acc"
    reward_params: dict[str, Any] = field(default_factory=dict)
    episodes: int = 100
    seed: int = 0
    val_samples: int = 1000
    train_top_up: bool = True
    calib_samples: int = 256
    round_to: int | None = None
    agent_config: dict[str, Any] = field(default_factory=dict)
    layout: str | None = None
    min_keep: float = 0.1
    min_bits: int = 2
    max_bits: int = 8
    float_bits: bool = True
    free_precision: bool = True
    free_precision_groups: bool = True
    reconstruct: bool = True
    tune_steps: int = 0
    budget_mode: str = "cap"
    enforce_budget: bool | None = None
    top_k: int = 3
    device_check_rounds: int = 3
    fine_tune_epochs: int = 2
    fine_tune_augment: bool = False
    checkpoint_every: int = 5
    export_formats: tuple[str, ...] = ("pt2", "onnx")

    def validate(self) -> None:
        """Refuse values out of range with a SearchError naming the field."""
        if self.objective not in OBJECTIVES:
            raise SearchError(
                f"objective {self.objective!r} is unknown", f"use one of {', '.join(OBJECTIVES)}"
            )
        if self.reward not in REWARDS:
            raise SearchError(f"reward {self.reward!r} is unknown", f"use one of {', '.join(REWARDS)}")
        if not (
            isinstance(self.budget, (int, float)) and 0 < self.budget <= 1 and math.isfinite(self.budget)
        ):
            raise SearchError(
                f"budget {self.budget!r} must be in (0, 1]", "e.g. 0.5 for half the original cost"
            )
        if not (isinstance(self.episodes, int) and 1 <= self.episodes <= 100_000):
            raise SearchError(f"episodes {self.episodes!r} must be an integer in 1..100000")
        if self.val_samples < 10:
            raise SearchError("val_samples must be at least 10")
        if self.top_k < 1:
            raise SearchError("top_k must be at least 1")
        if (
            isinstance(self.device_check_rounds, bool)
            or not isinstance(self.device_check_rounds, int)
            or not 0 <= self.device_check_rounds <= 20
        ):
            raise SearchError(
                f"device_check_rounds {self.device_check_rounds!r} must be an integer in 0..20",
                "0 turns the device check off; 3 is the default",
            )
        if (
            isinstance(self.tune_steps, bool)
            or not isinstance(self.tune_steps, int)
            or not 0 <= self.tune_steps <= 500
        ):
            raise SearchError(
                f"tune_steps {self.tune_steps!r} must be an integer in 0..500",
                "0 scores candidates as applied; 8-16 steps rank them by how they take to the fine-tune",
            )
        if self.fine_tune_epochs < 0 or self.checkpoint_every < 1:
            raise SearchError("fine_tune_epochs must be >= 0 and checkpoint_every >= 1")
        if self.round_to is not None and self.round_to < 1:
            raise SearchError("round_to must be at least 1")
        if self.layout is not None and self.layout not in ("prune", "bits", "joint", "ajpq"):
            raise SearchError(f"layout {self.layout!r} is unknown", "use prune, bits, joint or ajpq")
        if not 0 < self.min_keep <= 1:
            raise SearchError("min_keep must be in (0, 1]")
        if not 1 <= self.min_bits <= self.max_bits <= 8:
            raise SearchError("bits must satisfy 1 <= min_bits <= max_bits <= 8")
        if self.budget_mode not in ("cap", "repair"):
            raise SearchError(f"budget_mode {self.budget_mode!r} is unknown", "use cap or repair")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["export_formats"] = list(self.export_formats)
        d["input_shape"] = list(self.input_shape) if self.input_shape else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SearchConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise SearchError(f"unknown search settings: {', '.join(sorted(unknown))}")
        d = dict(d)
        if "export_formats" in d:
            d["export_formats"] = tuple(d["export_formats"])
        if d.get("input_shape"):
            d["input_shape"] = tuple(int(v) for v in d["input_shape"])
        cfg = cls(**d)
        cfg.validate()
        return cfg


@dataclass
class EpisodeResult:
    """One search episode: the policy tried and what it scored.

    latency_ms is the target's latency for the policy (from the latency table, or measured); None for the
    analytic target. cost_ratio is the objective's cost over the original's. meets_budget says whether the
    budget held. raw_actions are the agent's outputs, enforced_actions what the environment applied.
    """

    episode: int
    reward: float
    accuracy: float
    latency_ms: float | None
    macs: int
    bops: int
    params: int
    bytes: float
    cost_ratio: float
    meets_budget: bool
    policy: dict[str, Any]
    raw_actions: list[list[float]]
    enforced_actions: list[list[float]]
    wall_time_s: float
    timings: dict[str, float] = field(default_factory=dict)
    is_best: bool = False
    stage: str = ""
    # False for an episode the agent played as a probe, not as a policy it offers (the uniform baseline's
    # bisection trials that did not fit: the environment's budget cap changed them, so they are not uniform)
    candidate: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EpisodeResult:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class SearchCallback:
    """Hooks the search loop calls; override what you need. Exceptions raised in a hook stop the search."""

    def on_start(self, info: dict[str, Any]) -> None:
        """Once, before the first episode (also on resume): model summary, baseline accuracy and cost."""

    def on_episode(self, result: EpisodeResult) -> None:
        """After every episode, in episode order."""

    def on_checkpoint(self, episode: int, path: str) -> None:
        """After a checkpoint is written; episodes up to ``episode`` are safe."""

    def on_phase(self, phase: str, info: dict[str, Any]) -> None:
        """Entering a phase: ``search``, ``finalize`` (fine-tune + test of the best), ``export``, ``measure``."""

    def on_finish(self, summary: dict[str, Any]) -> None:
        """Once, at the end, with the final report."""

    def should_stop(self) -> bool:
        """Polled between episodes and phases; True stops the search (cancel)."""
        return False
