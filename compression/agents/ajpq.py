"""AJPQ (Tang, Wei, Li, "Automated Model Compression by Jointly Applied Pruning and Quantization", 2020).

Pruning is quantization to 0 bits. A hierarchical agent decides each layer in one step:

- the LAYER controller (an actor: state -> sparsity) chooses the layer's sparsity, i.e. how many of its G
  output-channel groups are pruned (least important groups first);
- the CHANNEL controller (a second actor: state + the chosen sparsity -> G bit-widths) chooses the bits
  of each group, groups in importance order (most important first). Groups the sparsity prunes get 0 bits
  (the environment does that, following the same importance order, so both controllers agree on which
  channels go).

One critic, Q(state, [sparsity, group bits]). Both controllers act in the same step and share one reward,
so a joint critic is the natural value: the layer controller's gradient flows through the critic's
sparsity input AND through the channel controller's response to the sparsity (chain rule), which is how
the two collaborate. Two critics would need a split of the reward the environment does not give.
Exploration: truncated normal noise on the sparsity first; the channel controller is then conditioned on
the noisy sparsity actually proposed, and its bits get their own noise. Other defaults follow AMC (AJPQ
builds on AMC/HAQ's DDPG).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from compression.agents.common.networks import Actor, Critic, hard_update, soft_update
from compression.agents.ddpg import AMC_DEFAULTS, DDPGAgent


class AJPQAgent(DDPGAgent):
    """Hierarchical joint pruning-quantization agent (actions: ``sparsity``, ``group_bits_0..G-1``)."""

    name: ClassVar[str] = "ajpq"
    layouts: ClassVar[tuple[str, ...] | None] = ("ajpq",)
    summary: ClassVar[str] = (
        "AJPQ: a layer controller picks sparsity, a channel controller the bits of each group"
    )
    DEFAULTS = dict(AMC_DEFAULTS)

    def _build_networks(self) -> None:
        c, g = self.config, self.torch_gen
        h1, h2, w = c["hidden1"], c["hidden2"], c["init_w"]
        groups = self.act_dim - 1
        for prefix in ("", "_target"):
            self.nets["layer_actor" + prefix] = Actor(self.obs_dim, 1, h1, h2, w, g)
            self.nets["channel_actor" + prefix] = Actor(self.obs_dim + 1, groups, h1, h2, w, g)
            self.nets["critic" + prefix] = Critic(self.obs_dim, self.act_dim, h1, h2, w, g)
        for name in ("layer_actor", "channel_actor", "critic"):
            hard_update(self.nets[name + "_target"], self.nets[name])
        self.optims["layer_actor"] = torch.optim.Adam(self.nets["layer_actor"].parameters(), lr=c["lr_actor"])
        self.optims["channel_actor"] = torch.optim.Adam(
            self.nets["channel_actor"].parameters(), lr=c["lr_actor"]
        )
        self.optims["critic"] = torch.optim.Adam(
            self.nets["critic"].parameters(), lr=c["lr_critic"], weight_decay=c["critic_weight_decay"]
        )

    def _joint_action(self, obs: torch.Tensor, suffix: str) -> torch.Tensor:
        sparsity = self.nets["layer_actor" + suffix](obs)
        bits = self.nets["channel_actor" + suffix](torch.cat([obs, sparsity], dim=-1))
        return torch.cat([sparsity, bits], dim=-1)

    def _policy_action(self, obs: torch.Tensor, sigma: float | None) -> np.ndarray:
        with torch.no_grad():
            x = obs.unsqueeze(0)
            sparsity = self.nets["layer_actor"](x)[0].double().numpy()
            if sigma is not None:
                sparsity = self.noise.sample(sparsity, sigma, self.rng)
            cond = torch.cat([x, torch.from_numpy(sparsity).float().unsqueeze(0)], dim=-1)
            bits = self.nets["channel_actor"](cond)[0].double().numpy()
        if sigma is not None:
            bits = self.noise.sample(bits, sigma, self.rng)
        return np.concatenate([sparsity, bits])

    def _target_action(self, next_obs: torch.Tensor) -> torch.Tensor:
        return self._joint_action(next_obs, "_target")

    def _actor_loss(self, obs: torch.Tensor) -> torch.Tensor:
        return -self.nets["critic"](obs, self._joint_action(obs, "")).mean()

    def _actor_optims(self) -> list[torch.optim.Optimizer]:
        return [self.optims["layer_actor"], self.optims["channel_actor"]]

    def _online_action(self, obs: torch.Tensor) -> torch.Tensor:
        return self._joint_action(obs, "")

    def _actor_names(self) -> list[str]:
        return ["layer_actor", "channel_actor"]

    def _soft_update_targets(self) -> None:
        tau = self.config["tau"]
        for name in ("layer_actor", "channel_actor", "critic"):
            soft_update(self.nets[name + "_target"], self.nets[name], tau)
