"""The one small interface between search environments and agents (gymnasium-style).

An episode walks the compressible layers in order; each step the agent sees an observation (a float32
vector of state features) and answers with an action: a few named numbers, each in [0, 1]. The
environment maps those numbers to a meaning (keep ratio, bit-widths, groups pruned) with the functions
below, so every environment uses the same mapping and an agent never needs to know bit ranges.

Protocol (what every environment implements, and what ``check_env`` verifies):

- ``env.spec`` is an ``EnvSpec``.
- ``env.reset(seed=None) -> obs``: ``np.float32`` array of shape ``(spec.obs_dim,)``.
- ``env.step(action) -> (obs, reward, done, info)`` with ``action`` of shape ``(spec.action_spec.dim,)``
  in [0, 1]. ``done`` is True exactly at step ``spec.num_steps``. ``reward`` is 0.0 on every step but the
  last (AMC/HAQ style: the whole episode shares the final reward).
- ``info["action"]`` on every step is the ENFORCED action: what the environment actually did, expressed
  in the same [0, 1] units. It equals the agent's action exactly (same values) unless the environment
  changed the decision (a budget cap, a pinned layer); rounding an action to whole channels or whole bits
  is not a change. Agents store the enforced action in their transitions, as AMC does.
- On the last step ``info`` also carries ``"policy"`` (a ``compression.policy.Policy``), ``"raw_actions"``
  and ``"enforced_actions"`` (one list of floats per step) and ``"metrics"`` (a dict with at least
  ``"cost_ratio"``: the episode's cost over the original cost, and, where a budget applies, ``"budget"``).
  An environment that changes decisions after the last step (HAQ's repair) reports the final decisions
  in ``"enforced_actions"`` (same rule: the agent's exact values where nothing changed); agents store
  those in place of the per-step ``info["action"]``.

Agents may ask an environment for a behaviour only the environment can implement (for example HAQ's
first and last layer pinned to 8 bits) through ``Agent.env_options()``; see ``ENV_OPTIONS``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from compression.errors import SearchError
from compression.policy import FLOAT_BITS, Policy

# Action layouts an environment can offer; agents declare which ones they can drive.
LAYOUTS = ("prune", "bits", "joint", "ajpq")
DEFAULT_GROUPS = 4

# A larger value of these dimensions means MORE compression (for every other dimension, larger keeps more).
# The uniform agent needs this to move all dimensions in the same direction.
INVERTED_DIMS = frozenset({"sparsity"})

# Options an agent may request through ``Agent.env_options()``; environments honour the ones they support.
ENV_OPTIONS = {
    "pin_first_last_bits": "int: the first and last layer get this many weight and activation bits (HAQ)",
}

END_INFO_KEYS = ("policy", "raw_actions", "enforced_actions", "metrics")


def _group_names(groups: int) -> tuple[str, ...]:
    return tuple(f"group_bits_{g}" for g in range(groups))


@dataclass(frozen=True)
class ActionSpec:
    """Named action dimensions of one step, each in [0, 1] for the agent.

    Known names: ``keep_ratio`` (fraction of output channels kept), ``w_bits`` / ``a_bits`` (weight and
    activation bit-widths), ``sparsity`` (AJPQ: share of output-channel groups pruned, least important
    first) and ``group_bits_0 .. group_bits_{G-1}`` (AJPQ: bits of each output-channel group, groups in
    importance order, most important first).
    """

    names: tuple[str, ...]

    def __post_init__(self) -> None:
        names = tuple(self.names)
        object.__setattr__(self, "names", names)
        if not names:
            raise SearchError("an action spec needs at least one dimension", "use ActionSpec.for_layout")
        if len(set(names)) != len(names):
            raise SearchError(f"action dimensions repeat: {names}", "give each dimension once")
        layout = self._detect_layout(names)
        if layout is None:
            raise SearchError(
                f"action dimensions {names} match no known layout",
                "use ActionSpec.for_layout('prune' | 'bits' | 'joint' | 'ajpq')",
            )

    @staticmethod
    def _detect_layout(names: tuple[str, ...]) -> str | None:
        if names == ("keep_ratio",):
            return "prune"
        if names == ("w_bits", "a_bits"):
            return "bits"
        if names == ("keep_ratio", "w_bits", "a_bits"):
            return "joint"
        if len(names) >= 2 and names[0] == "sparsity" and names[1:] == _group_names(len(names) - 1):
            return "ajpq"
        return None

    @classmethod
    def for_layout(cls, layout: str, groups: int = DEFAULT_GROUPS) -> ActionSpec:
        """The action spec of a layout: ``prune``, ``bits``, ``joint`` or ``ajpq`` (with ``groups`` groups)."""
        if layout == "prune":
            return cls(("keep_ratio",))
        if layout == "bits":
            return cls(("w_bits", "a_bits"))
        if layout == "joint":
            return cls(("keep_ratio", "w_bits", "a_bits"))
        if layout == "ajpq":
            if not isinstance(groups, int) or groups < 2:
                raise SearchError(f"AJPQ needs at least 2 channel groups, got {groups}", "use groups >= 2")
            return cls(("sparsity", *_group_names(groups)))
        raise SearchError(f"unknown action layout {layout!r}", f"use one of {', '.join(LAYOUTS)}")

    @property
    def dim(self) -> int:
        """Number of action dimensions per step."""
        return len(self.names)

    @property
    def layout(self) -> str:
        """``prune``, ``bits``, ``joint`` or ``ajpq``."""
        layout = self._detect_layout(self.names)
        assert layout is not None  # checked in __post_init__
        return layout

    @property
    def groups(self) -> int:
        """Number of output-channel groups (AJPQ layout), 0 otherwise."""
        return self.dim - 1 if self.layout == "ajpq" else 0

    def index(self, name: str) -> int:
        """Position of a named dimension in the action vector."""
        return self.names.index(name)

    def inverted_mask(self) -> np.ndarray:
        """Boolean mask of dimensions where a larger value means more compression."""
        return np.array([n in INVERTED_DIMS for n in self.names], dtype=bool)

    def to_dict(self) -> dict[str, Any]:
        return {"names": list(self.names)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ActionSpec:
        return cls(tuple(str(n) for n in d["names"]))


@dataclass(frozen=True)
class EnvSpec:
    """What an agent needs to know about an environment before the first episode.

    obs_dim: length of every observation. num_steps: steps (compressible layers) per episode.
    action_spec: the action dimensions of each step. layer_names: the layer each step decides, in order.
    feature_names: optional names of the observation features (for dashboards and debugging).
    """

    obs_dim: int
    num_steps: int
    action_spec: ActionSpec
    layer_names: tuple[str, ...]
    feature_names: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer_names", tuple(self.layer_names))
        object.__setattr__(self, "feature_names", tuple(self.feature_names))
        if not isinstance(self.obs_dim, int) or self.obs_dim < 1:
            raise SearchError(f"obs_dim must be a positive integer, got {self.obs_dim!r}")
        if not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise SearchError(
                f"an episode needs at least one step, got num_steps={self.num_steps!r}",
                "the model has no compressible layer; check the model or the layer selection",
            )
        if len(self.layer_names) != self.num_steps:
            raise SearchError(
                f"{len(self.layer_names)} layer names for {self.num_steps} steps", "give one name per step"
            )
        if self.feature_names and len(self.feature_names) != self.obs_dim:
            raise SearchError(f"{len(self.feature_names)} feature names for obs_dim={self.obs_dim}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "obs_dim": self.obs_dim,
            "num_steps": self.num_steps,
            "action_spec": self.action_spec.to_dict(),
            "layer_names": list(self.layer_names),
            "feature_names": list(self.feature_names),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EnvSpec:
        return cls(
            obs_dim=int(d["obs_dim"]),
            num_steps=int(d["num_steps"]),
            action_spec=ActionSpec.from_dict(d["action_spec"]),
            layer_names=tuple(d["layer_names"]),
            feature_names=tuple(d.get("feature_names", ())),
        )


StepResult = tuple[np.ndarray, float, bool, dict[str, Any]]


@runtime_checkable
class CompressionEnv(Protocol):
    """The environment protocol (see the module docstring for the exact contract)."""

    spec: EnvSpec

    def reset(self, seed: int | None = None) -> np.ndarray: ...

    def step(self, action: np.ndarray) -> StepResult: ...


# --- the one mapping from [0, 1] actions to compression decisions --------------------------------------


def _clip01(a: float) -> float:
    if not math.isfinite(a):
        raise SearchError(f"action {a} is not a finite number", "agents must output values in [0, 1]")
    return min(1.0, max(0.0, float(a)))


def action_to_keep_ratio(a: float, min_keep: float) -> float:
    """Map an action in [0, 1] linearly to a keep ratio in [min_keep, 1] (AMC's preserve ratio)."""
    return min_keep + _clip01(a) * (1.0 - min_keep)


def keep_ratio_to_action(keep: float, min_keep: float) -> float:
    """Inverse of ``action_to_keep_ratio``."""
    if min_keep >= 1.0:
        return 1.0
    return _clip01((keep - min_keep) / (1.0 - min_keep))


def bit_levels(min_bits: int, max_bits: int, float_top: bool = False) -> list[int]:
    """The bit-widths a bits action can choose, fewest first; ``float_top`` adds float (``FLOAT_BITS``) on top."""
    levels = list(range(min_bits, max_bits + 1))
    return [*levels, FLOAT_BITS] if float_top and max_bits < FLOAT_BITS else levels


def action_to_bits(a: float, min_bits: int, max_bits: int, float_top: bool = False) -> int:
    """Map an action in [0, 1] to a bit-width in [min_bits, max_bits]: equal-width bins (as HAQ rounds).

    With ``float_top`` the highest bin is float (32 bits): on a runtime where quantizing a layer does not make it
    faster (TVM computes in float here), leaving it unquantized is a choice the search must be able to make.
    """
    levels = bit_levels(min_bits, max_bits, float_top)
    return levels[min(int(math.floor(_clip01(a) * len(levels))), len(levels) - 1)]


def bits_to_action(bits: int, min_bits: int, max_bits: int, float_top: bool = False) -> float:
    """The action at the centre of a bit-width's bin (inverse of ``action_to_bits``)."""
    levels = bit_levels(min_bits, max_bits, float_top)
    if float_top and bits > max_bits:
        return (len(levels) - 0.5) / len(levels)
    return (levels.index(min(max(int(bits), min_bits), max_bits)) + 0.5) / len(levels)


def action_to_pruned_groups(a: float, groups: int) -> int:
    """Map AJPQ's sparsity action to the number of pruned groups, 0 .. groups-1 (one group always stays)."""
    return min(int(math.floor(_clip01(a) * groups)), groups - 1)


def pruned_groups_to_action(pruned: int, groups: int) -> float:
    """The sparsity action at the centre of the bin for ``pruned`` groups."""
    return (min(max(pruned, 0), groups - 1) + 0.5) / groups


# --- an environment checker, in the spirit of Stable-Baselines3's env_checker ---------------------------


def check_env(env: CompressionEnv, episodes: int = 2, seed: int = 0, deterministic: bool = True) -> None:
    """Drive ``env`` with random actions and raise SearchError at the first breach of the protocol.

    Checks shapes and dtypes, that rewards are 0 before the last step and finite at it, that ``done`` comes
    exactly after ``spec.num_steps`` steps, that ``info["action"]`` is a valid action on every step, that
    the end-of-episode info has ``END_INFO_KEYS`` with one raw and one enforced action per step, and (with
    ``deterministic``) that ``reset(seed)`` followed by the same actions reproduces the same episode.
    """
    spec = getattr(env, "spec", None)
    if not isinstance(spec, EnvSpec):
        raise SearchError("env.spec must be an EnvSpec", "set env.spec in the environment's constructor")
    rng = np.random.default_rng(seed)
    dim = spec.action_spec.dim

    def fail(what: str) -> None:
        raise SearchError(f"environment breaks the protocol: {what}", "see compression/search/spaces.py")

    def check_obs(obs: Any, where: str) -> None:
        if not isinstance(obs, np.ndarray) or obs.dtype != np.float32 or obs.shape != (spec.obs_dim,):
            fail(
                f"{where} returned {type(obs).__name__} {getattr(obs, 'dtype', '')} "
                f"{getattr(obs, 'shape', '')}, expected float32 ({spec.obs_dim},)"
            )
        if not np.all(np.isfinite(obs)):
            fail(f"{where} returned a non-finite observation")

    def run(actions: list[np.ndarray]) -> tuple[float, list[list[float]], list[np.ndarray]]:
        obs = env.reset(seed=seed)
        check_obs(obs, "reset()")
        observations = [obs]
        enforced: list[list[float]] = []
        for t, action in enumerate(actions):
            obs, reward, done, info = env.step(action)
            check_obs(obs, f"step {t}")
            observations.append(obs)
            if not isinstance(info, dict) or "action" not in info:
                fail(f"step {t}: info must be a dict with 'action'")
            enforced_a = np.asarray(info["action"], dtype=np.float64)
            if enforced_a.shape != (dim,) or np.any(enforced_a < 0) or np.any(enforced_a > 1):
                fail(f"step {t}: info['action'] must be {dim} values in [0, 1], got {enforced_a}")
            enforced.append(enforced_a.tolist())
            last = t == len(actions) - 1
            if bool(done) != last:
                fail(f"step {t}: done={done}, expected {last}")
            if not last and reward != 0.0:
                fail(f"step {t}: reward {reward} before the last step (must be 0)")
            if last:
                if not isinstance(reward, float) or not math.isfinite(reward):
                    fail(f"final reward must be a finite float, got {reward!r}")
                missing = [k for k in END_INFO_KEYS if k not in info]
                if missing:
                    fail(f"final info lacks {missing}")
                if not isinstance(info["policy"], Policy):
                    fail("final info['policy'] must be a compression.policy.Policy")
                for key in ("raw_actions", "enforced_actions"):
                    if len(info[key]) != spec.num_steps or any(len(a) != dim for a in info[key]):
                        fail(f"final info[{key!r}] must hold {spec.num_steps} actions of {dim} values")
                final = np.asarray(info["enforced_actions"], dtype=np.float64)
                if np.any(final < 0) or np.any(final > 1):
                    fail("final info['enforced_actions'] must be values in [0, 1]")
                if "cost_ratio" not in info["metrics"]:
                    fail("final info['metrics'] lacks 'cost_ratio'")
                return float(reward), enforced, observations
        fail("episode did not end")
        raise AssertionError("unreachable")

    for _ in range(episodes):
        actions = [rng.random(dim) for _ in range(spec.num_steps)]
        first = run(actions)
        if not deterministic:
            continue
        second = run(actions)
        if first[0] != second[0] or first[1] != second[1]:
            fail("the same seed and actions gave a different episode (the environment is not deterministic)")
        if any(not np.array_equal(a, b) for a, b in zip(first[2], second[2], strict=True)):
            fail("the same seed and actions gave different observations")
