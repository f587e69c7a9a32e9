"""The random-search baseline: every action uniform in [0, 1], independently per step and dimension.

Give it the same number of episodes as the agent it is compared with; the search loop keeps the best
episode. It does not learn (``end_episode`` only counts). Its one piece of state is its generator.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from compression.agents.base import Agent
from compression.agents.common.rng import make_generators, numpy_state, set_numpy_state
from compression.search.spaces import EnvSpec


class RandomAgent(Agent):
    """Uniform random actions (any layout)."""

    name: ClassVar[str] = "random"
    summary: ClassVar[str] = "Random search: uniform random actions for every layer"

    def __init__(self, env_spec: EnvSpec, config: dict[str, Any] | None = None, seed: int = 0) -> None:
        super().__init__(env_spec, config, seed)
        self.rng, _ = make_generators(self.seed)

    def act(self, obs: np.ndarray, explore: bool = True) -> np.ndarray:
        """A fresh uniform action (also with ``explore=False``, from a copy of the generator, so no state changes)."""
        self._check_obs(obs)
        if explore:
            return self.rng.random(self.env_spec.action_spec.dim)
        # Random search has no "current best guess"; answer a sample without consuming the generator.
        peek = np.random.Generator(np.random.PCG64())
        peek.bit_generator.state = self.rng.bit_generator.state
        return peek.random(self.env_spec.action_spec.dim)

    def observe(self, obs: np.ndarray, action: np.ndarray, next_obs: np.ndarray, done: bool) -> None:
        """Random search keeps nothing per step."""

    def end_episode(self, reward: float, info: dict[str, Any] | None = None) -> dict[str, Any]:
        """Count the episode."""
        self._check_reward(reward)
        stats = {"episode": self.episode}
        self.episode += 1
        return stats

    def _state(self) -> dict[str, Any]:
        return {"rng": numpy_state(self.rng)}

    def _load_state(self, state: dict[str, Any]) -> None:
        set_numpy_state(self.rng, state["rng"])
