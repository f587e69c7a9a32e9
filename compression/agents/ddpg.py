"""A small DDPG core shared by the AMC, HAQ, Galen and AJPQ agents.

What it does per episode, as AMC does:

- Warm-up: the first ``warmup_episodes`` episodes act uniformly at random (no learning), filling the
  replay buffer.
- After that the actor (sigmoid MLP) acts, with truncated normal noise of sigma ``noise_sigma *
  noise_decay ** (episodes since warm-up)``.
- Every step of an episode is stored with the episode's FINAL reward (the environment gives it only at
  the end) and the ENFORCED action. A moving average of episode rewards (``baseline_alpha``) is the
  baseline: it is subtracted from every sampled reward at update time, so one batch is always measured
  against one baseline. (HAQ's and Galen's code keep a moving average of batch means with alpha 0.5
  instead; an average of episode rewards does not depend on which transitions a batch happened to
  draw.)
- With ``uniform_start``, the first warm-up episode plays the start action the search hands over
  (``set_start_action``: the uniform policy that fits the budget).
- With ``elite_episodes`` > 0, at the end of the warm-up the actor is fitted (full-batch MSE, Adam 1e-3,
  ``imitation_steps`` steps) to the steps of the best ``elite_episodes`` episodes so far, so that learning and
  exploration start from the best policy the warm-up found instead of an untrained actor's (nearly uniform)
  one; with ``elite_refresh`` it is fitted again whenever a later episode joins them (self-imitation).
  Both are this project's additions, on by default for AMC only (docs/agents.md).
- At the end of each episode after the warm-up, ``updates_per_episode`` gradient steps (0: one per step
  of the episode, AMC's choice): critic on the TD target ``r - baseline + discount * (1 - done) *
  Q'(s', mu'(s'))``, actor on ``-Q(s, mu(s))``, then soft target updates with ``tau``.

Subclasses change the defaults (``DEFAULTS``) and, for AJPQ, how actions are produced from the actors.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from compression.agents.base import Agent, Param
from compression.agents.common.buffers import Pending, ReplayBuffer, load_pending, pending_state
from compression.agents.common.networks import Actor, Critic, hard_update, soft_update
from compression.agents.common.noise import TruncatedNormalNoise
from compression.agents.common.rng import make_generators, numpy_state, set_numpy_state
from compression.search.spaces import EnvSpec

# AMC's defaults (He et al., ECCV 2018, and the authors' amc_search.py); subclasses override some.
AMC_DEFAULTS: dict[str, Any] = {
    "hidden1": 300,
    "hidden2": 300,
    "lr_actor": 1e-4,
    "lr_critic": 1e-3,
    "tau": 0.01,
    "discount": 1.0,
    "warmup_episodes": 100,
    "noise_sigma": 0.5,
    "noise_decay": 0.95,
    "batch_size": 64,
    "buffer_episodes": 100,
    "updates_per_episode": 0,
    "baseline_alpha": 0.95,
    "critic_weight_decay": 0.0,
    "init_w": 3e-3,
    "elite_episodes": 0,
    "imitation_steps": 300,
    "elite_refresh": True,
    "uniform_start": False,
}
# the Adam rate of the imitation at the end of the warm-up (a few hundred full-batch steps on a few dozen rows)
IMITATION_LR = 1e-3


def ddpg_params(defaults: dict[str, Any]) -> list[Param]:
    """The DDPG hyper-parameters with the given defaults."""
    d = defaults
    return [
        Param("hidden1", "int", d["hidden1"], "units of the first hidden layer (actor and critic)", 4, 2048),
        Param("hidden2", "int", d["hidden2"], "units of the second hidden layer (actor and critic)", 4, 2048),
        Param("lr_actor", "float", d["lr_actor"], "Adam learning rate of the actor", 1e-6, 1e-1, log=True),
        Param("lr_critic", "float", d["lr_critic"], "Adam learning rate of the critic", 1e-6, 1e-1, log=True),
        Param("tau", "float", d["tau"], "soft update rate of the target networks", 1e-4, 1.0, log=True),
        Param("discount", "float", d["discount"], "discount between steps (1: episodic, as AMC)", 0.0, 1.0),
        Param(
            "warmup_episodes",
            "int",
            d["warmup_episodes"],
            "episodes of random actions before learning (unset: at most a quarter of the search's episodes)",
            0,
            100000,
        ),
        Param(
            "noise_sigma", "float", d["noise_sigma"], "initial sigma of the truncated normal noise", 0.0, 2.0
        ),
        Param(
            "noise_decay", "float", d["noise_decay"], "sigma multiplier per episode after warm-up", 0.5, 1.0
        ),
        Param("batch_size", "int", d["batch_size"], "transitions per gradient step", 1, 4096),
        Param("buffer_episodes", "int", d["buffer_episodes"], "replay capacity, in episodes", 1, 100000),
        Param(
            "updates_per_episode",
            "int",
            d["updates_per_episode"],
            "gradient steps after each episode (0: one per step of the episode)",
            0,
            100000,
        ),
        Param(
            "baseline_alpha",
            "float",
            d["baseline_alpha"],
            "moving-average factor of the reward baseline",
            0.0,
            1.0,
        ),
        Param(
            "critic_weight_decay",
            "float",
            d["critic_weight_decay"],
            "L2 weight decay of the critic",
            0.0,
            1.0,
        ),
        Param(
            "init_w",
            "float",
            d["init_w"],
            "initial output-layer weights are U(-init_w, init_w)",
            1e-6,
            1.0,
            log=True,
        ),
        Param(
            "elite_episodes",
            "int",
            d["elite_episodes"],
            "at the end of the warm-up the actor is fitted to the steps of the best this many episodes so far, "
            "so learning starts from the best policy found (0: off, the actor starts untrained)",
            0,
            1000,
        ),
        Param(
            "elite_refresh",
            "bool",
            d["elite_refresh"],
            "after the warm-up, fit the actor again whenever an episode joins the best elite_episodes "
            "(self-imitation: exploration stays around the best policies found)",
        ),
        Param(
            "uniform_start",
            "bool",
            d["uniform_start"],
            "the first warm-up episode plays the uniform policy that fits the budget (found on costs alone), "
            "so the best uniform compression is among the policies the agent learns from",
        ),
        Param(
            "imitation_steps",
            "int",
            d["imitation_steps"],
            "gradient steps of that fit (full batch, Adam 1e-3)",
            1,
            100000,
        ),
    ]


class DDPGAgent(Agent):
    """DDPG over the environment's action vector (one actor output per action dimension)."""

    name: ClassVar[str] = "ddpg"
    summary: ClassVar[str] = "DDPG over any action layout (the core of amc, haq, galen and ajpq)"
    DEFAULTS: ClassVar[dict[str, Any]] = AMC_DEFAULTS
    LEGACY_SETTINGS: ClassVar[dict[str, Any]] = {
        "elite_episodes": 0,
        "imitation_steps": 300,
        "elite_refresh": True,
        "uniform_start": False,
    }

    def __init__(self, env_spec: EnvSpec, config: dict[str, Any] | None = None, seed: int = 0) -> None:
        super().__init__(env_spec, config, seed)
        c = self.config
        self.obs_dim = env_spec.obs_dim
        self.act_dim = env_spec.action_spec.dim
        self.rng, self.torch_gen = make_generators(self.seed)
        self.nets: dict[str, nn.Module] = {}
        self.optims: dict[str, torch.optim.Optimizer] = {}
        self._build_networks()
        self.buffer = ReplayBuffer(c["buffer_episodes"] * env_spec.num_steps, self.obs_dim, self.act_dim)
        self.noise = TruncatedNormalNoise(c["noise_sigma"], c["noise_decay"])
        self.baseline: float | None = None
        self._pending: Pending = []
        # the best episodes so far (reward, episode, steps), which the actor imitates (elite_episodes)
        self._elite: list[tuple[float, int, Pending]] = []
        self.imitation_loss: float | None = None
        self.start_action: np.ndarray | None = None  # played in episode 0 (uniform_start)

    @classmethod
    def params(cls) -> list[Param]:
        return ddpg_params(cls.DEFAULTS)

    # --- networks (AJPQ overrides these three) --------------------------------------------------------------

    def _build_networks(self) -> None:
        c, g = self.config, self.torch_gen
        h1, h2, w = c["hidden1"], c["hidden2"], c["init_w"]
        self.nets["actor"] = Actor(self.obs_dim, self.act_dim, h1, h2, w, g)
        self.nets["critic"] = Critic(self.obs_dim, self.act_dim, h1, h2, w, g)
        self.nets["actor_target"] = Actor(self.obs_dim, self.act_dim, h1, h2, w, g)
        self.nets["critic_target"] = Critic(self.obs_dim, self.act_dim, h1, h2, w, g)
        hard_update(self.nets["actor_target"], self.nets["actor"])
        hard_update(self.nets["critic_target"], self.nets["critic"])
        self.optims["actor"] = torch.optim.Adam(self.nets["actor"].parameters(), lr=c["lr_actor"])
        self.optims["critic"] = torch.optim.Adam(
            self.nets["critic"].parameters(), lr=c["lr_critic"], weight_decay=c["critic_weight_decay"]
        )

    def _policy_action(self, obs: torch.Tensor, sigma: float | None) -> np.ndarray:
        """Actor output for one observation, with truncated normal noise when ``sigma`` is given."""
        with torch.no_grad():
            mu = self.nets["actor"](obs.unsqueeze(0))[0].double().numpy()
        return mu if sigma is None else self.noise.sample(mu, sigma, self.rng)

    def _target_action(self, next_obs: torch.Tensor) -> torch.Tensor:
        return self.nets["actor_target"](next_obs)

    def _actor_loss(self, obs: torch.Tensor) -> torch.Tensor:
        return -self.nets["critic"](obs, self.nets["actor"](obs)).mean()

    def _actor_optims(self) -> list[torch.optim.Optimizer]:
        return [self.optims["actor"]]

    def _soft_update_targets(self) -> None:
        tau = self.config["tau"]
        soft_update(self.nets["actor_target"], self.nets["actor"], tau)
        soft_update(self.nets["critic_target"], self.nets["critic"], tau)

    def _online_action(self, obs: torch.Tensor) -> torch.Tensor:
        """The online actor's (noise-free) action for a batch of observations, with gradients."""
        return self.nets["actor"](obs)

    def _actor_names(self) -> list[str]:
        """The online actors (each has a ``<name>_target`` copy)."""
        return ["actor"]

    # --- imitation of the best warm-up episodes ----------------------------------------------------------------

    def _keep_elite(self, reward: float, steps: Pending) -> bool:
        """Add the episode to the elite if it is among the best ``elite_episodes``; True if it joined."""
        k = int(self.config["elite_episodes"])
        if k <= 0 or not (self.in_warmup or self.config["elite_refresh"]):
            return False
        self._elite.append((reward, self.episode, steps))
        self._elite.sort(key=lambda e: (-e[0], e[1]))  # best reward first; ties: the earlier episode
        del self._elite[k:]
        return any(e == self.episode for _, e, _ in self._elite)

    def _imitate_elite(self) -> float | None:
        """Fit the actor(s) to the elite episodes' (observation, enforced action) pairs; targets copy them.

        Full-batch Adam, deterministic given the weights (no sampling), so a resumed run repeats it exactly.
        """
        if not self._elite:
            return None
        obs = torch.from_numpy(np.stack([o for _, _, steps in self._elite for o, _, _, _ in steps]))
        act = torch.from_numpy(np.stack([a for _, _, steps in self._elite for _, a, _, _ in steps])).float()
        params = [p for name in self._actor_names() for p in self.nets[name].parameters()]
        opt = torch.optim.Adam(params, lr=IMITATION_LR)
        loss = torch.zeros(())
        for _ in range(int(self.config["imitation_steps"])):
            loss = torch.nn.functional.mse_loss(self._online_action(obs), act)
            opt.zero_grad()
            loss.backward()
            opt.step()
        for name in self._actor_names():
            hard_update(self.nets[name + "_target"], self.nets[name])
        if not self.config["elite_refresh"]:
            self._elite = []  # done with: the replay buffer keeps every step
        return float(loss.item())

    # --- the protocol -------------------------------------------------------------------------------------

    @property
    def in_warmup(self) -> bool:
        """True while the agent still acts at random."""
        return self.episode < self.config["warmup_episodes"]

    def current_sigma(self) -> float:
        """Exploration noise of the current episode (0 during warm-up, where actions are uniform)."""
        if self.in_warmup:
            return 0.0
        return self.noise.sigma(self.episode - self.config["warmup_episodes"])

    @property
    def wants_start_action(self) -> bool:
        return bool(self.config["uniform_start"]) and self.episode == 0

    def set_start_action(self, action: np.ndarray) -> None:
        a = np.clip(np.asarray(action, dtype=np.float64).reshape(-1), 0.0, 1.0)
        if a.shape != (self.act_dim,):
            raise ValueError(f"start action has shape {a.shape}, expected ({self.act_dim},)")
        self.start_action = a

    def act(self, obs: np.ndarray, explore: bool = True) -> np.ndarray:
        """Random during warm-up (the start action in episode 0, when given); then the actor's output, with
        decaying truncated normal noise when exploring."""
        obs_t = torch.from_numpy(self._check_obs(obs))
        if explore and self.episode == 0 and self.start_action is not None and self.in_warmup:
            return self.start_action.copy()
        if explore and self.in_warmup:
            return self.rng.random(self.act_dim)
        return np.clip(self._policy_action(obs_t, self.current_sigma() if explore else None), 0.0, 1.0)

    def observe(self, obs: np.ndarray, action: np.ndarray, next_obs: np.ndarray, done: bool) -> None:
        """Hold the step until the episode's reward is known."""
        a = np.clip(np.asarray(action, dtype=np.float64).reshape(-1), 0.0, 1.0)
        if a.shape != (self.act_dim,):
            raise ValueError(f"action has shape {a.shape}, expected ({self.act_dim},)")
        self._pending.append((self._check_obs(obs).copy(), a, self._check_obs(next_obs).copy(), bool(done)))

    def end_episode(self, reward: float, info: dict[str, Any] | None = None) -> dict[str, Any]:
        """Store the episode's steps with its reward, update the baseline, and learn (after warm-up)."""
        r = self._check_reward(reward)
        self._take_final_actions(info)
        c = self.config
        sigma = self.current_sigma()
        self.baseline = (
            r
            if self.baseline is None
            else c["baseline_alpha"] * self.baseline + (1 - c["baseline_alpha"]) * r
        )
        for obs, action, next_obs, done in self._pending:
            self.buffer.add(obs, action, r, next_obs, done)
        steps = len(self._pending)
        joined = self._keep_elite(r, self._pending)
        self._pending = []
        stats: dict[str, Any] = {
            "episode": self.episode,
            "warmup": self.in_warmup,
            "sigma": sigma,
            "baseline": self.baseline,
            "updates": 0,
        }
        warmup_done = self.episode + 1 >= c["warmup_episodes"]
        if c["elite_episodes"] > 0 and (
            self.episode + 1 == c["warmup_episodes"]
            or (joined and c["elite_refresh"] and self.episode + 1 > c["warmup_episodes"])
        ):
            self.imitation_loss = self._imitate_elite()
            stats["imitation_loss"] = self.imitation_loss
        if warmup_done and len(self.buffer) >= min(c["batch_size"], self.buffer.capacity):
            n = c["updates_per_episode"] or max(1, steps)
            critic_losses, actor_losses = [], []
            for _ in range(n):
                cl, al = self._update()
                critic_losses.append(cl)
                actor_losses.append(al)
            stats.update(
                updates=n, critic_loss=float(np.mean(critic_losses)), actor_loss=float(np.mean(actor_losses))
            )
        self.episode += 1
        return stats

    def _update(self) -> tuple[float, float]:
        c = self.config
        batch = self.buffer.sample(c["batch_size"], self.rng)
        reward = batch["reward"] - float(self.baseline or 0.0)
        with torch.no_grad():
            next_q = self.nets["critic_target"](batch["next_obs"], self._target_action(batch["next_obs"]))
            target = reward + c["discount"] * (1.0 - batch["done"]) * next_q
        critic_loss = torch.nn.functional.mse_loss(self.nets["critic"](batch["obs"], batch["action"]), target)
        self.optims["critic"].zero_grad()
        critic_loss.backward()
        self.optims["critic"].step()

        actor_loss = self._actor_loss(batch["obs"])
        for opt in self._actor_optims():
            opt.zero_grad()
        actor_loss.backward()
        for opt in self._actor_optims():
            opt.step()
        self._soft_update_targets()
        return float(critic_loss.item()), float(actor_loss.item())

    # --- checkpoints --------------------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        return {
            "rng": numpy_state(self.rng),
            "torch_gen": self.torch_gen.get_state(),
            "nets": {k: m.state_dict() for k, m in self.nets.items()},
            "optims": {k: o.state_dict() for k, o in self.optims.items()},
            "buffer": self.buffer.state_dict(),
            "baseline": self.baseline,
            "sigma": self.current_sigma(),
            "pending": pending_state(self._pending),
            "elite": [
                {"reward": r, "episode": e, "steps": pending_state(steps)} for r, e, steps in self._elite
            ],
            "imitation_loss": self.imitation_loss,
            "start_action": None if self.start_action is None else torch.from_numpy(self.start_action),
        }

    def _load_state(self, state: dict[str, Any]) -> None:
        set_numpy_state(self.rng, state["rng"])
        self.torch_gen.set_state(state["torch_gen"])
        for k, m in self.nets.items():
            m.load_state_dict(state["nets"][k])
        for k, o in self.optims.items():
            o.load_state_dict(state["optims"][k])
        self.buffer.load_state_dict(state["buffer"])
        self.baseline = None if state["baseline"] is None else float(state["baseline"])
        self._pending = load_pending(state["pending"])
        self._elite = [
            (float(e["reward"]), int(e["episode"]), load_pending(e["steps"])) for e in state.get("elite", [])
        ]
        self.imitation_loss = state.get("imitation_loss")
        start = state.get("start_action")
        self.start_action = None if start is None else start.numpy().copy()
