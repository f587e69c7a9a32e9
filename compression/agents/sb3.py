"""TD3 and SAC from Stable-Baselines3, driven through the agent interface (optional dependency).

Measured with ``stable-baselines3==2.9.2`` and ``gymnasium==1.4.0`` (neither changes the torch pin). Without
them, the agents stay registered and their construction raises SearchError with the install hint.

How they fit: Stable-Baselines3 normally owns the loop (``learn()`` steps a gymnasium environment and trains
every step). Here the search loop owns it, so the model is built around a spaces-only gymnasium stub and
used piece by piece: its policy proposes actions, its replay buffer receives each step of an episode once
the episode's final reward is known (every step carries it, with the enforced action, as for the DDPG
agents), and ``model.train`` runs after each episode (one gradient step per step of the episode by
default) instead of after each environment step. Warm-up episodes act uniformly at random.

Randomness: Stable-Baselines3 draws from the GLOBAL torch and numpy generators (initialisation, SAC's
sampling, TD3's target noise, replay sampling). Every call into it runs inside a scope that swaps in the
agent's own generator states and restores the global ones afterwards, so the agent is reproducible and
checkpointable and leaves the rest of the process untouched.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import numpy as np
import torch

from compression.agents.base import Agent, Param
from compression.agents.common.buffers import Pending, load_pending, pending_state
from compression.agents.common.rng import make_generators, numpy_state, set_numpy_state
from compression.errors import SearchError
from compression.search.spaces import EnvSpec

try:
    import gymnasium
    from stable_baselines3 import SAC, TD3
    from stable_baselines3.common.logger import Logger
    from stable_baselines3.common.vec_env import DummyVecEnv

    SB3_AVAILABLE = True
except ImportError:  # the agents below then refuse to start, with an install hint
    SB3_AVAILABLE = False

INSTALL_HINT = "pip install stable-baselines3==2.9.2 gymnasium==1.4.0 (they keep torch==2.13.0)"
_BUFFER_KEYS = ("observations", "next_observations", "actions", "rewards", "dones", "timeouts")


def _spec_only_env(obs_dim: int, act_dim: int) -> Any:
    """A gymnasium environment with the right spaces that is never stepped (the search loop steps the real one)."""

    class SpecOnlyEnv(gymnasium.Env):
        observation_space = gymnasium.spaces.Box(0.0, 1.0, (obs_dim,), np.float32)
        action_space = gymnasium.spaces.Box(0.0, 1.0, (act_dim,), np.float32)

        def reset(self, *, seed: int | None = None, options: dict | None = None) -> Any:
            raise RuntimeError("this stub only carries spaces; the compression search loop drives the agent")

        def step(self, action: Any) -> Any:
            raise RuntimeError("this stub only carries spaces; the compression search loop drives the agent")

    return SpecOnlyEnv()


class SB3Agent(Agent):
    """Base of the Stable-Baselines3 agents (any action layout)."""

    algo: ClassVar[str] = ""
    DEFAULTS: ClassVar[dict[str, Any]] = {}

    def __init__(self, env_spec: EnvSpec, config: dict[str, Any] | None = None, seed: int = 0) -> None:
        if not SB3_AVAILABLE:
            raise SearchError(
                f"agent {self.name} needs Stable-Baselines3, which is not installed", INSTALL_HINT
            )
        super().__init__(env_spec, config, seed)
        c = self.config
        self.act_dim = env_spec.action_spec.dim
        self.rng, gen = make_generators(self.seed)
        self._torch_state = gen.get_state()
        self._np_legacy = np.random.RandomState(int(self.rng.integers(2**31))).get_state()
        kwargs: dict[str, Any] = {
            "learning_rate": c["learning_rate"],
            "buffer_size": c["buffer_episodes"] * env_spec.num_steps,
            "learning_starts": 0,
            "batch_size": c["batch_size"],
            "tau": c["tau"],
            "gamma": c["gamma"],
            "policy_kwargs": {"net_arch": [c["hidden1"], c["hidden2"]]},
            "device": "cpu",
            "seed": None,
        }
        if self.algo == "td3":
            kwargs["policy_delay"] = c["policy_delay"]
        env = DummyVecEnv([lambda: _spec_only_env(env_spec.obs_dim, self.act_dim)])
        with self._own_rng():
            self.model = (TD3 if self.algo == "td3" else SAC)("MlpPolicy", env, **kwargs)
        self.model.set_logger(Logger(folder=None, output_formats=[]))
        self._pending: Pending = []

    @classmethod
    def params(cls) -> list[Param]:
        d = cls.DEFAULTS
        params = [
            Param("hidden1", "int", d["hidden1"], "units of the first hidden layer", 4, 2048),
            Param("hidden2", "int", d["hidden2"], "units of the second hidden layer", 4, 2048),
            Param("learning_rate", "float", d["learning_rate"], "Adam learning rate", 1e-6, 1e-1, log=True),
            Param("batch_size", "int", d["batch_size"], "transitions per gradient step", 1, 4096),
            Param("buffer_episodes", "int", d["buffer_episodes"], "replay capacity, in episodes", 1, 100000),
            Param(
                "warmup_episodes",
                "int",
                d["warmup_episodes"],
                "episodes of random actions first (unset: at most a quarter of the search's episodes)",
                0,
                100000,
            ),
            Param("gamma", "float", d["gamma"], "discount between steps", 0.0, 1.0),
            Param("tau", "float", d["tau"], "soft update rate of the target networks", 1e-4, 1.0, log=True),
            Param(
                "updates_per_episode",
                "int",
                d["updates_per_episode"],
                "gradient steps after each episode (0: one per step of the episode)",
                0,
                100000,
            ),
        ]
        if cls.algo == "td3":
            params += [
                Param(
                    "action_noise",
                    "float",
                    d["action_noise"],
                    "exploration noise sigma (actions scaled to [-1, 1])",
                    0.0,
                    2.0,
                ),
                Param("policy_delay", "int", d["policy_delay"], "critic updates per actor update", 1, 100),
            ]
        return params

    @contextmanager
    def _own_rng(self) -> Iterator[None]:
        """Run Stable-Baselines3 code on the agent's generator states, then put the global ones back."""
        saved_torch, saved_np = torch.get_rng_state(), np.random.get_state()
        torch.set_rng_state(self._torch_state)
        np.random.set_state(self._np_legacy)
        try:
            yield
        finally:
            self._torch_state = torch.get_rng_state()
            self._np_legacy = np.random.get_state()
            torch.set_rng_state(saved_torch)
            np.random.set_state(saved_np)

    def act(self, obs: np.ndarray, explore: bool = True) -> np.ndarray:
        """Random during warm-up; then the policy (TD3: plus Gaussian noise; SAC: a sample) when exploring."""
        obs = self._check_obs(obs)
        if explore and self.episode < self.config["warmup_episodes"]:
            return self.rng.random(self.act_dim)
        with self._own_rng():
            action, _ = self.model.policy.predict(obs, deterministic=not explore or self.algo == "td3")
        action = np.asarray(action, dtype=np.float64).reshape(-1)
        if explore and self.algo == "td3":
            scaled = self.model.policy.scale_action(action)
            scaled = np.clip(
                scaled + self.rng.normal(0.0, self.config["action_noise"], self.act_dim), -1.0, 1.0
            )
            action = self.model.policy.unscale_action(scaled)
        return np.clip(action, 0.0, 1.0)

    def observe(self, obs: np.ndarray, action: np.ndarray, next_obs: np.ndarray, done: bool) -> None:
        """Hold the step (with the enforced action) until the episode's reward is known."""
        a = np.clip(np.asarray(action, dtype=np.float64).reshape(-1), 0.0, 1.0)
        self._pending.append((self._check_obs(obs).copy(), a, self._check_obs(next_obs).copy(), bool(done)))

    def end_episode(self, reward: float, info: dict[str, Any] | None = None) -> dict[str, Any]:
        """Store the episode's steps with its final reward; train after the warm-up."""
        r = self._check_reward(reward)
        self._take_final_actions(info)
        buffer = self.model.replay_buffer
        for obs, action, next_obs, done in self._pending:
            scaled = self.model.policy.scale_action(action.astype(np.float32))
            buffer.add(obs[None], next_obs[None], scaled[None], np.array([r]), np.array([done]), [{}])
        steps = len(self._pending)
        self.model.num_timesteps += steps
        self._pending = []
        stats: dict[str, Any] = {"episode": self.episode, "updates": 0}
        c = self.config
        if self.episode + 1 >= c["warmup_episodes"] and buffer.size() >= c["batch_size"]:
            n = c["updates_per_episode"] or max(1, steps)
            with self._own_rng():
                self.model.train(gradient_steps=n, batch_size=c["batch_size"])
            values = self.model.logger.name_to_value
            stats.update(updates=n, critic_loss=float(values.get("train/critic_loss", float("nan"))))
        self.episode += 1
        return stats

    def _state(self) -> dict[str, Any]:
        m, buf = self.model, self.model.replay_buffer
        np_legacy = self._np_legacy
        state: dict[str, Any] = {
            "rng": numpy_state(self.rng),
            "torch_rng": self._torch_state.clone(),
            "np_legacy": {
                "keys": torch.from_numpy(np_legacy[1].astype(np.int64)),
                "pos": int(np_legacy[2]),
                "has_gauss": int(np_legacy[3]),
                "cached_gaussian": float(np_legacy[4]),
            },
            "policy": m.policy.state_dict(),
            "actor_optimizer": m.actor.optimizer.state_dict(),
            "critic_optimizer": m.critic.optimizer.state_dict(),
            "n_updates": int(m._n_updates),
            "num_timesteps": int(m.num_timesteps),
            "buffer": {
                "pos": int(buf.pos),
                "full": bool(buf.full),
                **{k: torch.from_numpy(getattr(buf, k).copy()) for k in _BUFFER_KEYS},
            },
            "pending": pending_state(self._pending),
        }
        if self.algo == "sac" and m.ent_coef_optimizer is not None:
            state["log_ent_coef"] = m.log_ent_coef.detach().clone()
            state["ent_coef_optimizer"] = m.ent_coef_optimizer.state_dict()
        return state

    def _load_state(self, state: dict[str, Any]) -> None:
        m, buf = self.model, self.model.replay_buffer
        set_numpy_state(self.rng, state["rng"])
        self._torch_state = state["torch_rng"].clone()
        legacy = state["np_legacy"]
        self._np_legacy = (
            "MT19937",
            legacy["keys"].numpy().astype(np.uint32),
            int(legacy["pos"]),
            int(legacy["has_gauss"]),
            float(legacy["cached_gaussian"]),
        )
        m.policy.load_state_dict(state["policy"])
        m.actor.optimizer.load_state_dict(state["actor_optimizer"])
        m.critic.optimizer.load_state_dict(state["critic_optimizer"])
        m._n_updates = int(state["n_updates"])
        m.num_timesteps = int(state["num_timesteps"])
        buf.pos, buf.full = int(state["buffer"]["pos"]), bool(state["buffer"]["full"])
        for k in _BUFFER_KEYS:
            getattr(buf, k)[...] = state["buffer"][k].numpy()
        if "log_ent_coef" in state:
            with torch.no_grad():
                m.log_ent_coef.copy_(state["log_ent_coef"])
            m.ent_coef_optimizer.load_state_dict(state["ent_coef_optimizer"])
        self._pending = load_pending(state["pending"])


class SB3TD3Agent(SB3Agent):
    """TD3 (Fujimoto et al. 2018) from Stable-Baselines3."""

    name: ClassVar[str] = "sb3-td3"
    summary: ClassVar[str] = "TD3 from Stable-Baselines3 (twin critics, delayed actor), any action layout"
    algo: ClassVar[str] = "td3"
    # SB3's TD3 defaults, except: a batch of 64 (a search stores a few thousand steps, not millions) and
    # episodes instead of steps for the buffer and warm-up.
    DEFAULTS: ClassVar[dict[str, Any]] = {
        "hidden1": 400,
        "hidden2": 300,
        "learning_rate": 1e-3,
        "batch_size": 64,
        "buffer_episodes": 100,
        "warmup_episodes": 10,
        "gamma": 0.99,
        "tau": 0.005,
        "updates_per_episode": 0,
        "action_noise": 0.1,
        "policy_delay": 2,
    }


class SB3SACAgent(SB3Agent):
    """SAC (Haarnoja et al. 2018) from Stable-Baselines3, with its automatic entropy coefficient."""

    name: ClassVar[str] = "sb3-sac"
    summary: ClassVar[str] = (
        "SAC from Stable-Baselines3 (stochastic policy, learned entropy), any action layout"
    )
    algo: ClassVar[str] = "sac"
    DEFAULTS: ClassVar[dict[str, Any]] = {
        "hidden1": 256,
        "hidden2": 256,
        "learning_rate": 3e-4,
        "batch_size": 64,
        "buffer_episodes": 100,
        "warmup_episodes": 10,
        "gamma": 0.99,
        "tau": 0.005,
        "updates_per_episode": 0,
    }
