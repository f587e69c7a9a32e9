"""HAQ (Wang et al., "HAQ: Hardware-Aware Automated Quantization with Mixed Precision", CVPR 2019).

DDPG over two actions per layer: weight bits and activation bits (the environment maps [0, 1] to its bit
range, HAQ's 2..8 by default, in equal bins). Defaults from the authors' ``rl_quantize.py``: 300-300
networks, Adam 1e-4 / 1e-3, tau 0.01, discount 1, 20 warm-up episodes, truncated normal noise 0.5
decaying by 0.99 per episode, batch 64, replay of 128 episodes (``rmsize`` 128 per layer), one update
per step. (HAQ's released code decides one bit-width per step; here both bit-widths of a layer are
decided in one step, which keeps one step per layer like every other agent.)

First and last layer at 8 bits: HAQ keeps them at 8 bits. ``pin_first_last_8bit`` (default on) makes
the agent ask the environment for it through ``env_options()`` (``{"pin_first_last_bits": 8}``). The
environment does the pinning because only it knows the bit mapping; it reports the pinned decision as
the enforced action, which is what the agent stores, so the critic never learns from actions that did
not happen.
"""

from __future__ import annotations

from typing import Any, ClassVar

from compression.agents.base import Param
from compression.agents.ddpg import AMC_DEFAULTS, DDPGAgent, ddpg_params

HAQ_DEFAULTS: dict[str, Any] = {
    **AMC_DEFAULTS,
    "warmup_episodes": 20,
    "noise_decay": 0.99,
    "buffer_episodes": 128,
}


class HAQAgent(DDPGAgent):
    """HAQ's DDPG mixed-precision agent (actions: ``w_bits``, ``a_bits``)."""

    name: ClassVar[str] = "haq"
    layouts: ClassVar[tuple[str, ...] | None] = ("bits",)
    summary: ClassVar[str] = "HAQ: DDPG choosing each layer's weight and activation bit-widths"
    DEFAULTS = HAQ_DEFAULTS

    @classmethod
    def params(cls) -> list[Param]:
        return [
            *ddpg_params(cls.DEFAULTS),
            Param("pin_first_last_8bit", "bool", True, "keep the first and last layer at 8 bits (HAQ)"),
        ]

    def env_options(self) -> dict[str, Any]:
        """Ask the environment to pin the first and last layer to 8 bits when configured."""
        return {"pin_first_last_bits": 8} if self.config["pin_first_last_8bit"] else {}
