"""Actor and critic MLPs of the DDPG agents (AMC/HAQ shape), initialised from the agent's own generator."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import skip_init


def _linear(n_in: int, n_out: int, gen: torch.Generator, bound: float | None = None) -> nn.Linear:
    """A linear layer initialised U(-b, b), b = 1/sqrt(fan_in) unless given.

    ``skip_init`` avoids nn.Linear's own initialisation, which would draw from the global torch RNG.
    """
    layer = skip_init(nn.Linear, n_in, n_out)
    b = 1.0 / math.sqrt(n_in) if bound is None else bound
    with torch.no_grad():
        layer.weight.uniform_(-b, b, generator=gen)
        layer.bias.uniform_(-b, b, generator=gen)
    return layer


class Actor(nn.Module):
    """obs -> hidden1 -> hidden2 -> sigmoid actions in [0, 1] (the output layer starts near 0: U(-init_w, init_w))."""

    def __init__(
        self, obs_dim: int, act_dim: int, hidden1: int, hidden2: int, init_w: float, gen: torch.Generator
    ):
        super().__init__()
        self.fc1 = _linear(obs_dim, hidden1, gen)
        self.fc2 = _linear(hidden1, hidden2, gen)
        self.fc3 = _linear(hidden2, act_dim, gen, init_w)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(obs))
        h = torch.relu(self.fc2(h))
        return torch.sigmoid(self.fc3(h))


class Critic(nn.Module):
    """Q(obs, action): state and action enter the first hidden layer through separate weights (AMC/HAQ)."""

    def __init__(
        self, obs_dim: int, act_dim: int, hidden1: int, hidden2: int, init_w: float, gen: torch.Generator
    ):
        super().__init__()
        self.fc_obs = _linear(obs_dim, hidden1, gen)
        self.fc_act = _linear(act_dim, hidden1, gen)
        self.fc2 = _linear(hidden1, hidden2, gen)
        self.fc3 = _linear(hidden2, 1, gen, init_w)

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc_obs(obs) + self.fc_act(action))
        h = torch.relu(self.fc2(h))
        return self.fc3(h).squeeze(-1)


@torch.no_grad()
def soft_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    """target <- tau * source + (1 - tau) * target, parameter by parameter."""
    for t, s in zip(target.parameters(), source.parameters(), strict=True):
        t.mul_(1.0 - tau).add_(s, alpha=tau)


@torch.no_grad()
def hard_update(target: nn.Module, source: nn.Module) -> None:
    """target <- source."""
    for t, s in zip(target.parameters(), source.parameters(), strict=True):
        t.copy_(s)
