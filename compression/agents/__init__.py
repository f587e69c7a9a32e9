"""Search agents: one module per agent over a shared base (``base.Agent``), shared pieces in ``common/``.

``AGENTS`` maps the name a user picks to the agent class; ``make_agent`` builds one for an environment;
``restore_agent`` rebuilds one from a checkpoint. Agents meet environments only through
``compression.search.spaces`` (``EnvSpec``, actions in [0, 1]). This package imports neither the
environment implementations nor anything outside ``compression``.

Adding an agent: write ``compression/agents/<name>.py`` with a subclass of ``Agent`` (or ``DDPGAgent``)
and add it to ``AGENTS`` below; see docs/agents.md.
"""

from __future__ import annotations

from typing import Any

from compression.agents.ajpq import AJPQAgent
from compression.agents.amc import AMCAgent
from compression.agents.base import Agent, EpisodeRecord, Param, run_episode
from compression.agents.galen import GalenAgent
from compression.agents.haq import HAQAgent
from compression.agents.random_agent import RandomAgent
from compression.agents.sb3 import SB3_AVAILABLE, SB3SACAgent, SB3TD3Agent
from compression.agents.uniform import UniformAgent
from compression.errors import SearchError
from compression.search.spaces import EnvSpec

# The Stable-Baselines3 agents are always listed; without the package they refuse to start with a hint
# (``SB3_AVAILABLE`` tells a dashboard whether to offer them).
AGENTS: dict[str, type[Agent]] = {
    cls.name: cls
    for cls in (
        AMCAgent,
        HAQAgent,
        GalenAgent,
        AJPQAgent,
        RandomAgent,
        UniformAgent,
        SB3TD3Agent,
        SB3SACAgent,
    )
}
# Other names users may type for the same agent (the issue calls Galen's joint agent "galen-pq").
ALIASES: dict[str, str] = {"galen-pq": "galen"}


# An agent's warm-up (episodes of random actions before it learns), when the user leaves it unset, is at most
# this share of the episodes it gets: AMC's published schedule is 100 warm-up episodes of 400, and its default of
# 100 in a search of 100 episodes (the dashboard's default) would be random search under AMC's name.
WARMUP_SHARE = 0.25


def schedule_config(
    name: str, config: dict[str, Any] | None, episodes: int
) -> tuple[dict[str, Any], str | None]:
    """The settings agent ``name`` gets for a search (or stage) of ``episodes`` episodes.

    A ``warmup_episodes`` the user set is kept as given; unset, it is the agent's default capped at
    ``WARMUP_SHARE`` of ``episodes`` (at least 1), so every learning agent learns for most of its search.
    Returns (config, a sentence for the log when the cap applied, else None).
    """
    cls = agent_class(name)
    config = dict(config or {})
    default = next((p.default for p in cls.params() if p.name == "warmup_episodes"), None)
    if default is None or "warmup_episodes" in config:
        return config, None
    cap = max(1, int(episodes * WARMUP_SHARE))
    if int(default) <= cap:
        return config, None
    config["warmup_episodes"] = cap
    return config, (
        f"{cls.name}: {cap} warm-up episodes of random actions, then learning (its default of {default} is "
        f"capped at {WARMUP_SHARE:.0%} of this search's {episodes} episodes; set warmup_episodes to override)"
    )


def agent_class(name: str) -> type[Agent]:
    """The agent class registered under ``name`` (or an alias); SearchError if unknown."""
    key = ALIASES.get(name, name)
    if key not in AGENTS:
        raise SearchError(f"unknown agent {name!r}", f"choose one of {', '.join(sorted(AGENTS))}")
    return AGENTS[key]


def make_agent(name: str, env_spec: EnvSpec, config: dict[str, Any] | None = None, seed: int = 0) -> Agent:
    """Build the agent ``name`` for an environment; ``config`` overrides its defaults (see ``config_schema``)."""
    return agent_class(name)(env_spec, config, seed)


def restore_agent(state: dict[str, Any]) -> Agent:
    """Rebuild an agent from ``Agent.state_dict()`` output (its name, env spec, config and seed are in it)."""
    if not isinstance(state, dict) or "agent" not in state:
        raise SearchError("not an agent checkpoint", "resume from a checkpoint written by the search")
    cls = agent_class(state["agent"])
    config = cls.checkpoint_config(state["config"])
    agent = make_agent(state["agent"], EnvSpec.from_dict(state["env_spec"]), config, int(state["seed"]))
    agent.load_state_dict(state)
    return agent


__all__ = [
    "AGENTS",
    "ALIASES",
    "SB3_AVAILABLE",
    "Agent",
    "EpisodeRecord",
    "Param",
    "agent_class",
    "make_agent",
    "restore_agent",
    "run_episode",
    "schedule_config",
]
