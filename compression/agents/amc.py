"""AMC (He et al., "AMC: AutoML for Model Compression and Acceleration on Mobile Devices", ECCV 2018).

One continuous action per layer: the keep (preserve) ratio of its output channels. DDPG with AMC's
defaults: actor and critic 300-300, Adam 1e-4 (actor) / 1e-3 (critic), tau 0.01, discount 1, 100
warm-up episodes of random actions, truncated normal noise sigma 0.5 decaying by 0.95 per episode,
batch 64, replay of 100 episodes (AMC's ``rmsize`` of 100 per layer), one update per step of each
episode, every step stored with the episode's reward and a moving baseline subtracted. The budget is the
environment's job (AMC caps each action so the remaining layers can still meet it).
"""

from __future__ import annotations

from typing import ClassVar

from compression.agents.ddpg import AMC_DEFAULTS, DDPGAgent


class AMCAgent(DDPGAgent):
    """AMC's DDPG channel-pruning agent (action: ``keep_ratio``)."""

    name: ClassVar[str] = "amc"
    layouts: ClassVar[tuple[str, ...] | None] = ("prune",)
    summary: ClassVar[str] = "AMC: DDPG choosing each layer's channel keep ratio"
    DEFAULTS = dict(AMC_DEFAULTS)
