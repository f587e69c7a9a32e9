"""The replay buffer of the DDPG agents: a fixed-size ring of transitions held in tensors."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


class ReplayBuffer:
    """Ring buffer of (obs, action, reward, next_obs, done); the oldest transitions are overwritten.

    Storage is preallocated float32 tensors so that ``state_dict`` is plain tensors (checkpoints load with
    ``torch.load(weights_only=True)``). Rewards are stored raw; agents subtract their baseline when they
    sample, so every transition in a batch is measured against the same baseline.
    """

    def __init__(self, capacity: int, obs_dim: int, act_dim: int) -> None:
        self.capacity = int(capacity)
        self.obs_dim = int(obs_dim)
        self.act_dim = int(act_dim)
        self.obs = torch.zeros(self.capacity, self.obs_dim)
        self.action = torch.zeros(self.capacity, self.act_dim)
        self.reward = torch.zeros(self.capacity)
        self.next_obs = torch.zeros(self.capacity, self.obs_dim)
        self.done = torch.zeros(self.capacity)
        self.pos = 0
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def add(
        self, obs: np.ndarray, action: np.ndarray, reward: float, next_obs: np.ndarray, done: bool
    ) -> None:
        """Append one transition."""
        i = self.pos
        self.obs[i] = torch.as_tensor(np.asarray(obs, dtype=np.float32))
        self.action[i] = torch.as_tensor(np.asarray(action, dtype=np.float32))
        self.reward[i] = float(reward)
        self.next_obs[i] = torch.as_tensor(np.asarray(next_obs, dtype=np.float32))
        self.done[i] = 1.0 if done else 0.0
        self.pos = (self.pos + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_size: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """A batch drawn uniformly with replacement, using the caller's generator."""
        idx = torch.as_tensor(rng.integers(0, self.size, size=int(batch_size)))
        return {
            "obs": self.obs[idx],
            "action": self.action[idx],
            "reward": self.reward[idx],
            "next_obs": self.next_obs[idx],
            "done": self.done[idx],
        }

    def state_dict(self) -> dict[str, Any]:
        """Contents and position (only the filled part is saved)."""
        n = self.size
        return {
            "capacity": self.capacity,
            "pos": self.pos,
            "size": n,
            "obs": self.obs[:n].clone(),
            "action": self.action[:n].clone(),
            "reward": self.reward[:n].clone(),
            "next_obs": self.next_obs[:n].clone(),
            "done": self.done[:n].clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` saved (the capacity must match)."""
        if int(state["capacity"]) != self.capacity:
            raise ValueError(f"replay buffer capacity {state['capacity']} != {self.capacity}")
        n = int(state["size"])
        for key in ("obs", "action", "reward", "next_obs", "done"):
            getattr(self, key).zero_()
            getattr(self, key)[:n] = state[key]
        self.size = n
        self.pos = int(state["pos"])


Pending = list[tuple[np.ndarray, np.ndarray, np.ndarray, bool]]


def pending_state(pending: Pending) -> list[dict[str, Any]]:
    """An episode's transitions not yet stored (their reward comes at the episode's end), as checkpoint data."""
    return [
        {
            "obs": torch.from_numpy(o),
            "action": torch.from_numpy(a),
            "next_obs": torch.from_numpy(n),
            "done": d,
        }
        for o, a, n, d in pending
    ]


def load_pending(state: list[dict[str, Any]]) -> Pending:
    """The inverse of ``pending_state``."""
    return [
        (p["obs"].numpy().copy(), p["action"].numpy().copy(), p["next_obs"].numpy().copy(), bool(p["done"]))
        for p in state
    ]
