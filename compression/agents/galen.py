"""Galen's joint pruning + quantization agent (Krieger et al., "Towards Hardware-Specific Automatic
Compression of Neural Networks", AAAI-23 workshop; code: UniHD-CEG/galen, ``pq_agent.py``).

DDPG with three actions per layer: keep ratio, weight bits, activation bits. Galen's reward
(``acc + beta * |cost / (rho * cost_ref) - 1|``) and its sensitivity state features belong to the
environment. Defaults from Galen's code where they differ from AMC: hidden 400-300, 10 warm-up episodes,
batch 128 (noise 0.5 decaying by 0.95 per episode after warm-up, as AMC). Galen's code also uses critic weight decay 1e-2, tau 0.001, discount 0.99 and ONE gradient step per
episode; on the synthetic benchmark (docs/agents.md) those learn little within a few hundred episodes
(the weight decay can collapse the policy), so the defaults here keep AMC's update settings. Set
``critic_weight_decay=0.01, tau=0.001, discount=0.99, updates_per_episode=1`` to reproduce Galen's code.
"""

from __future__ import annotations

from typing import Any, ClassVar

from compression.agents.ddpg import AMC_DEFAULTS, DDPGAgent

GALEN_DEFAULTS: dict[str, Any] = {
    **AMC_DEFAULTS,
    "hidden1": 400,
    "hidden2": 300,
    "warmup_episodes": 10,
    "batch_size": 128,
}


class GalenAgent(DDPGAgent):
    """Galen's joint pruning-quantization DDPG agent (actions: ``keep_ratio``, ``w_bits``, ``a_bits``)."""

    name: ClassVar[str] = "galen"
    layouts: ClassVar[tuple[str, ...] | None] = ("joint",)
    summary: ClassVar[str] = "Galen: DDPG choosing each layer's keep ratio, weight bits and activation bits"
    DEFAULTS = GALEN_DEFAULTS
