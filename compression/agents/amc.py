"""AMC (He et al., "AMC: AutoML for Model Compression and Acceleration on Mobile Devices", ECCV 2018).

One continuous action per layer: the keep (preserve) ratio of its output channels. DDPG with AMC's
defaults: actor and critic 300-300, Adam 1e-4 (actor) / 1e-3 (critic), tau 0.01, discount 1, 100
warm-up episodes of random actions, truncated normal noise sigma 0.5 decaying by 0.95 per episode,
batch 64, replay of 100 episodes (AMC's ``rmsize`` of 100 per layer), one update per step of each
episode, every step stored with the episode's reward and a moving baseline subtracted. The budget is the
environment's job (AMC caps each action so the remaining layers can still meet it).

Two additions of this project are on by default (``elite_episodes=1``, ``uniform_start=True``; set
``elite_episodes=0, uniform_start=False`` for the published agent): the first warm-up episode plays the
uniform policy that fits the budget, and the actor is fitted to the best episode so far at the end of the
warm-up and whenever a better one comes (self-imitation). Measured in docs/BENCHMARKS.md section 1h: at 10%
of ResNet-20's MACs, 60 episodes, three seeds, they took AMC's best reward from 0.837 +- 0.080 (behind
random search and uniform pruning) to 0.889 +- 0.016 (ahead of both in every seed). That is the search's reward,
before fine-tuning; after the benchmark's 2-epoch fine-tune uniform pruning's models were still the better ones
there (section 1, session 12).
"""

from __future__ import annotations

from typing import ClassVar

from compression.agents.ddpg import AMC_DEFAULTS, DDPGAgent


class AMCAgent(DDPGAgent):
    """AMC's DDPG channel-pruning agent (action: ``keep_ratio``)."""

    name: ClassVar[str] = "amc"
    layouts: ClassVar[tuple[str, ...] | None] = ("prune",)
    summary: ClassVar[str] = "AMC: DDPG choosing each layer's channel keep ratio"
    DEFAULTS = {**AMC_DEFAULTS, "elite_episodes": 1, "uniform_start": True}
