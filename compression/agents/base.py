"""The agent base class: what every search agent implements, and one helper that plays an episode.

An agent lives across the episodes of a run::

    obs = env.reset()
    while not done:
        action = agent.act(obs)                              # values in [0, 1], shape (action_dim,)
        next_obs, reward, done, info = env.step(action)
        agent.observe(obs, info["action"], next_obs, done)   # the ENFORCED action
        obs = next_obs
    stats = agent.end_episode(reward, info)                  # learning happens here

``state_dict()`` captures everything needed for an exact resume (networks, optimisers, target nets,
replay buffer, noise, baseline, episode counter, RNG states) in types ``torch.load(weights_only=True)``
accepts; ``load_state_dict`` into a fresh agent of the same name, environment spec and config continues
bit-identically. Agents draw randomness only from their own generators, never the global ones.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from compression.errors import SearchError
from compression.search.spaces import CompressionEnv, EnvSpec

STATE_FORMAT = 1


@dataclass(frozen=True)
class Param:
    """One configurable hyper-parameter, described so that a form can be rendered from it.

    kind: ``int``, ``float``, ``bool`` or ``choice``. low / high: inclusive range for numbers.
    log: the range is best explored on a log scale (learning rates). choices: allowed values of a choice.
    """

    name: str
    kind: str
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description."""
        d: dict[str, Any] = {"name": self.name, "type": self.kind, "default": self.default, "help": self.help}
        if self.low is not None:
            d["min"] = self.low
        if self.high is not None:
            d["max"] = self.high
        if self.log:
            d["log"] = True
        if self.choices is not None:
            d["choices"] = list(self.choices)
        return d

    def coerce(self, value: Any, agent: str) -> Any:
        """Check and convert a user-supplied value; raise SearchError saying what is wrong."""
        where = f"agent {agent}: {self.name}={value!r}"
        if self.kind == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            raise SearchError(f"{where} is not a boolean", "use true or false")
        if self.kind == "choice":
            if value not in (self.choices or ()):
                raise SearchError(f"{where} is not allowed", f"use one of {list(self.choices or ())}")
            return value
        try:
            if self.kind == "int":
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError
                out: float = int(value)
            else:
                out = float(value)
        except (TypeError, ValueError):
            raise SearchError(f"{where} is not a{'n integer' if self.kind == 'int' else ' number'}") from None
        if isinstance(value, bool) or not math.isfinite(out):
            raise SearchError(f"{where} is not a valid {self.kind}")
        if (self.low is not None and out < self.low) or (self.high is not None and out > self.high):
            raise SearchError(f"{where} is out of range", f"use a value in [{self.low}, {self.high}]")
        return out


@dataclass
class EpisodeRecord:
    """What ``run_episode`` returns: the final reward, the final info of the environment, agent stats."""

    reward: float
    info: dict[str, Any]
    stats: dict[str, Any] = field(default_factory=dict)


class Agent(ABC):
    """Base class of every search agent (see the module docstring for the protocol).

    Subclasses set ``name`` (the registry key), ``layouts`` (the action layouts they can drive, or None for
    any), ``summary`` (one line for the dashboard), override ``params`` to declare hyper-parameters, and
    implement ``act``, ``observe``, ``end_episode``, ``_state`` and ``_load_state``.
    """

    name: ClassVar[str] = ""
    layouts: ClassVar[tuple[str, ...] | None] = None
    summary: ClassVar[str] = ""
    # settings added after checkpoints were written, at the value that reproduces how such a checkpoint ran
    LEGACY_SETTINGS: ClassVar[dict[str, Any]] = {}

    def __init__(self, env_spec: EnvSpec, config: dict[str, Any] | None = None, seed: int = 0) -> None:
        if not isinstance(env_spec, EnvSpec):
            raise SearchError(f"agent {self.name} needs an EnvSpec, got {type(env_spec).__name__}")
        layout = env_spec.action_spec.layout
        if self.layouts is not None and layout not in self.layouts:
            raise SearchError(
                f"agent {self.name} decides {' or '.join(self.layouts)} actions, but the environment asks for "
                f"{layout} actions {env_spec.action_spec.names}",
                "pick an agent that matches the objective, or build the environment for this agent's layout",
            )
        self.env_spec = env_spec
        self.config = self.resolve_config(config)
        self.seed = int(seed)
        self.episode = 0

    # --- configuration -----------------------------------------------------------------------------------

    @classmethod
    def params(cls) -> list[Param]:
        """The agent's hyper-parameters with defaults and ranges (override in subclasses)."""
        return []

    @classmethod
    def config_schema(cls) -> list[dict[str, Any]]:
        """JSON-ready list of hyper-parameters: name, type, default, min, max, log, choices, help."""
        return [p.to_dict() for p in cls.params()]

    @classmethod
    def resolve_config(cls, config: dict[str, Any] | None) -> dict[str, Any]:
        """Defaults overlaid with ``config``; unknown keys and bad values raise SearchError."""
        params = {p.name: p for p in cls.params()}
        config = dict(config or {})
        unknown = sorted(set(config) - set(params))
        if unknown:
            raise SearchError(
                f"agent {cls.name} has no setting(s) {', '.join(unknown)}",
                f"known settings: {', '.join(params) or 'none'}",
            )
        return {
            name: p.coerce(config[name], cls.name) if name in config else p.default
            for name, p in params.items()
        }

    def env_options(self) -> dict[str, Any]:
        """Behaviours the agent asks of the environment (see ``compression.search.spaces.ENV_OPTIONS``)."""
        return {}

    # --- the protocol --------------------------------------------------------------------------------------

    @abstractmethod
    def act(self, obs: np.ndarray, explore: bool = True) -> np.ndarray:
        """The action for ``obs``: float64 values in [0, 1], shape ``(action_dim,)``.

        ``explore=False`` gives the agent's current best guess and leaves its state (RNG included) untouched.
        """

    @abstractmethod
    def observe(self, obs: np.ndarray, action: np.ndarray, next_obs: np.ndarray, done: bool) -> None:
        """Record one step of the current episode; ``action`` is the environment's enforced action."""

    @abstractmethod
    def end_episode(self, reward: float, info: dict[str, Any] | None = None) -> dict[str, Any]:
        """Close the episode with its final reward (and the environment's final info), learn, return stats.

        ``stats["candidate"]`` False marks the episode as a probe the agent does not offer as a result (the
        search never picks it as the best policy); absent means True.
        """

    # --- checkpoints -----------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue this agent exactly (weights_only-loadable types only)."""
        return {
            "format": STATE_FORMAT,
            "agent": self.name,
            "env_spec": self.env_spec.to_dict(),
            "config": dict(self.config),
            "seed": self.seed,
            "episode": self.episode,
            "agent_state": self._state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict()`` output; refuses a checkpoint of another agent, env or config."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise SearchError(
                "not an agent checkpoint of a known format", "resume from a checkpoint this version wrote"
            )
        if state["agent"] != self.name:
            raise SearchError(
                f"checkpoint is for agent {state['agent']}, not {self.name}", "resume with the same agent"
            )
        if EnvSpec.from_dict(state["env_spec"]) != self.env_spec:
            raise SearchError(
                "checkpoint was written for another environment (layers, features or actions differ)",
                "resume with the same model, objective and settings",
            )
        if self.checkpoint_config(state["config"]) != self.config:
            raise SearchError(
                f"checkpoint was written with another {self.name} configuration",
                "create the agent with the checkpoint's config (restore_agent does this)",
            )
        self.seed = int(state["seed"])
        self.episode = int(state["episode"])
        self._load_state(state["agent_state"])

    @property
    def wants_start_action(self) -> bool:
        """Whether the search should hand this agent a start action (``set_start_action``) before it plays."""
        return False

    def set_start_action(self, action: np.ndarray) -> None:
        """An action to play in the first episode: the uniform policy that fits the budget
        (``CompressionEnvironment.uniform_action``). Agents that do not want one ignore it."""
        return None

    @classmethod
    def checkpoint_config(cls, stored: dict[str, Any]) -> dict[str, Any]:
        """A checkpoint's config, with the settings added since it was written at the values it ran with."""
        return {**cls.LEGACY_SETTINGS, **dict(stored)}

    @abstractmethod
    def _state(self) -> dict[str, Any]:
        """Agent-specific part of ``state_dict``."""

    @abstractmethod
    def _load_state(self, state: dict[str, Any]) -> None:
        """Restore the agent-specific part."""

    # --- helpers for subclasses --------------------------------------------------------------------------------

    def _check_obs(self, obs: np.ndarray) -> np.ndarray:
        obs = np.asarray(obs, dtype=np.float32).reshape(-1)
        if obs.shape != (self.env_spec.obs_dim,):
            raise SearchError(
                f"agent {self.name}: observation has {obs.size} features, expected {self.env_spec.obs_dim}"
            )
        return obs

    def _take_final_actions(self, info: dict[str, Any] | None) -> None:
        """Replace the pending steps' actions with the final info's ``enforced_actions`` when present.

        They differ from the per-step ``info["action"]`` only when the environment changed decisions after
        the last step (HAQ's repair); then the final ones are what happened. Expects ``self._pending`` as
        a list of (obs, action, next_obs, done).
        """
        final = (info or {}).get("enforced_actions")
        pending = getattr(self, "_pending", None)
        if final is None or pending is None or len(final) != len(pending):
            return
        self._pending = [
            (obs, np.clip(np.asarray(a, dtype=np.float64).reshape(-1), 0.0, 1.0), next_obs, done)
            for (obs, _, next_obs, done), a in zip(pending, final, strict=True)
        ]

    def _check_reward(self, reward: float) -> float:
        r = float(reward)
        if not math.isfinite(r):
            raise SearchError(
                f"agent {self.name}: episode reward {reward!r} is not finite", "check the reward"
            )
        return r


def run_episode(env: CompressionEnv, agent: Agent, explore: bool = True, learn: bool = True) -> EpisodeRecord:
    """Play one episode of ``agent`` in ``env``.

    With ``learn=False`` the agent is only asked for actions (use with ``explore=False`` to evaluate its
    current policy without changing its state); otherwise it observes every step (with the enforced
    action) and learns at the end.
    """
    obs = env.reset()
    done = False
    reward, info = 0.0, {}
    while not done:
        action = agent.act(obs, explore=explore)
        next_obs, reward, done, info = env.step(action)
        if learn:
            agent.observe(obs, np.asarray(info.get("action", action), dtype=np.float64), next_obs, done)
        obs = next_obs
    stats = agent.end_episode(reward, info) if learn else {}
    return EpisodeRecord(reward=float(reward), info=info, stats=stats)
