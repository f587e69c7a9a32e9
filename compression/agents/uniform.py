"""The uniform baseline: one value for every layer and every action dimension, as tight to the budget as
possible.

Episode by episode it bisects a single value ``v`` in [0, 1] (the action of every dimension is ``v``, or
``1 - v`` for dimensions where larger means more compression, e.g. AJPQ's sparsity, so that a larger
``v`` always means less compression):

1. The first episode tries ``v = 1`` (no compression). If that fits, the search is over.
2. Otherwise it keeps a bracket ``[lo, hi]`` with ``lo`` known to fit (``lo = 0`` is the environment's
   minimum) and ``hi`` known not to, tries the middle, and moves the bracket. A trial FITS when the
   environment enforced nothing (every ``info["action"]`` equals what the agent proposed, and so do the
   final info's ``enforced_actions``: with AMC-style capping or HAQ-style repair, an action that does not
   fit is changed) and, when the final info reports them, ``metrics["cost_ratio"] <= metrics["budget"]``
   (for environments that only measure). This relies on the protocol's rule that an environment reports
   the agent's exact values wherever it did not change the decision (``compression.search.spaces``).
3. When ``hi - lo < tolerance`` (about log2(1/tolerance) + 1 episodes: 11 for the default 1e-3) it has
   converged and plays ``lo``, the largest uniform value found to fit, in every later episode.

``act(explore=False)`` always answers ``lo``. Because actions are rounded to whole channels or bits, many
values map to one decision; the bisection finds the edge of the last decision that fits.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from compression.agents.base import Agent, Param
from compression.search.spaces import EnvSpec


class UniformAgent(Agent):
    """Uniform compression of every layer, bisected to meet the budget as tightly as possible."""

    name: ClassVar[str] = "uniform"
    summary: ClassVar[str] = "Uniform: the same ratio/bit-width for every layer, bisected to fit the budget"

    def __init__(self, env_spec: EnvSpec, config: dict[str, Any] | None = None, seed: int = 0) -> None:
        super().__init__(env_spec, config, seed)
        self._inverted = env_spec.action_spec.inverted_mask()
        self.lo = 0.0
        self.hi = 1.0
        self.trial = 1.0
        self.converged = False
        self._changed = False

    @classmethod
    def params(cls) -> list[Param]:
        return [
            Param(
                "tolerance", "float", 1e-3, "stop bisecting when the bracket is narrower", 1e-6, 0.5, log=True
            )
        ]

    def action_for(self, value: float) -> np.ndarray:
        """The uniform action of a value: ``value`` in every dimension (``1 - value`` where inverted)."""
        v = float(np.clip(value, 0.0, 1.0))
        return np.where(self._inverted, 1.0 - v, v).astype(np.float64)

    def act(self, obs: np.ndarray, explore: bool = True) -> np.ndarray:
        """The trial value while searching (``explore``), else the best value known to fit."""
        self._check_obs(obs)
        return self.action_for(self.trial if explore else self.lo)

    def observe(self, obs: np.ndarray, action: np.ndarray, next_obs: np.ndarray, done: bool) -> None:
        """Note whether the environment changed the proposed action (then the trial does not fit)."""
        proposed = self.action_for(self.trial)
        if np.any(np.abs(np.asarray(action, dtype=np.float64).reshape(-1) - proposed) > 1e-9):
            self._changed = True

    def end_episode(self, reward: float, info: dict[str, Any] | None = None) -> dict[str, Any]:
        """Move the bisection bracket according to whether the trial fit."""
        self._check_reward(reward)
        info = info or {}
        metrics = info.get("metrics", {})
        fits = not self._changed
        raw, enforced = info.get("raw_actions"), info.get("enforced_actions")
        if raw is not None and enforced is not None:
            # Catches a repair after the last step (HAQ's budget mode), which no per-step action shows.
            diff = np.abs(np.asarray(raw, dtype=np.float64) - np.asarray(enforced, dtype=np.float64))
            fits = fits and not bool(np.any(diff > 1e-9))
        if "cost_ratio" in metrics and metrics.get("budget") is not None:
            fits = fits and float(metrics["cost_ratio"]) <= float(metrics["budget"]) + 1e-9
        # a trial that did not fit was changed by the environment's budget cap: not a uniform policy, so the
        # search must not offer it as this baseline's result
        stats = {"episode": self.episode, "value": self.trial, "fits": fits, "candidate": fits}
        if not self.converged:
            if fits:
                self.lo = self.trial
            else:
                self.hi = self.trial
            self.converged = self.lo >= self.hi or self.hi - self.lo < self.config["tolerance"]
            self.trial = self.lo if self.converged else 0.5 * (self.lo + self.hi)
        stats.update(low=self.lo, high=self.hi, converged=self.converged)
        self._changed = False
        self.episode += 1
        return stats

    def _state(self) -> dict[str, Any]:
        return {
            "lo": self.lo,
            "hi": self.hi,
            "trial": self.trial,
            "converged": self.converged,
            "changed": self._changed,
        }

    def _load_state(self, state: dict[str, Any]) -> None:
        self.lo = float(state["lo"])
        self.hi = float(state["hi"])
        self.trial = float(state["trial"])
        self.converged = bool(state["converged"])
        self._changed = bool(state["changed"])
