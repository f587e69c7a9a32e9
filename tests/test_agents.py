"""The search agents: interface, configuration, exact resume, the uniform baseline, and proof that the RL
agents learn (on the synthetic environment, whose best policy is known)."""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from compression.agents import AGENTS, SB3_AVAILABLE, Agent, make_agent, restore_agent, run_episode
from compression.errors import SearchError
from compression.search.spaces import ActionSpec, EnvSpec
from compression.search.synthetic import SyntheticCompressionEnv

# The layout and budget each agent is tested on.
SETUPS = {
    "amc": ("prune", 0.5),
    "haq": ("bits", 0.4),
    "galen": ("joint", 0.3),
    "ajpq": ("ajpq", 0.4),
    "random": ("bits", 0.4),
    "uniform": ("prune", 0.5),
    "sb3-td3": ("joint", 0.3),
    "sb3-sac": ("prune", 0.5),
}
RL_AGENTS = ("amc", "haq", "galen", "ajpq")
SB3_AGENTS = ("sb3-td3", "sb3-sac")
# Every agent the generic tests cover (Stable-Baselines3 only when it is installed).
ALL_AGENTS = sorted(n for n in SETUPS if SB3_AVAILABLE or n not in SB3_AGENTS)

# Small and quick, for the interface tests.
TINY = {"hidden1": 16, "hidden2": 16, "warmup_episodes": 3, "batch_size": 8, "buffer_episodes": 20}

# The learning test compresses AMC's schedule (100 warm-up + 300 episodes, 300-300 networks) into 300
# episodes on 2 cores: smaller networks, a 30-episode warm-up, slower noise decay so exploration lasts
# the shorter run, a faster actor, and discount 0 (every step already carries the episode's final
# reward, so the critic regresses it directly instead of bootstrapping through the layers). Everything
# else (batch size, tau, replay size, baseline, one update per step) is each agent's own default.
# docs/agents.md reports the agents with their untouched defaults as well.
LEARN_CONFIG = {
    "hidden1": 64,
    "hidden2": 64,
    "warmup_episodes": 30,
    "noise_decay": 0.98,
    "lr_actor": 1e-3,
    "discount": 0.0,
}
# AJPQ's two actors both climb one critic each step; with the 1e-3 actor step its final greedy policy
# (seed 0) ended only 0.012 above random's best, with 5e-4 it was 0.07 above (seeds 1, 2 alike).
LEARN_OVERRIDES = {"ajpq": {"lr_actor": 5e-4}}
LEARN_EPISODES = 300
RANDOM_SEEDS = (0, 1, 2, 3, 4)


@pytest.fixture(autouse=True)
def one_thread():
    """Small networks run faster on one thread, and results do not depend on the machine's core count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_env(name: str, agent: Agent | None = None, **kwargs) -> SyntheticCompressionEnv:
    layout, budget = SETUPS[name]
    options = agent.env_options() if agent is not None else {}
    return SyntheticCompressionEnv(layout=layout, budget=budget, **{**kwargs, **options})


def make(
    name: str, config: dict | None = None, seed: int = 0, **env_kwargs
) -> tuple[SyntheticCompressionEnv, Agent]:
    probe = make_env(name, **env_kwargs)
    cfg = dict(TINY if name in RL_AGENTS + SB3_AGENTS else {}, **(config or {}))
    agent = make_agent(name, probe.spec, cfg, seed)
    return make_env(name, agent, **env_kwargs), agent


def play(env: SyntheticCompressionEnv, agent: Agent, episodes: int) -> list[np.ndarray]:
    """Run episodes; return every action the agent proposed."""
    actions = []
    for _ in range(episodes):
        obs, done = env.reset(), False
        while not done:
            a = agent.act(obs, explore=True)
            actions.append(a)
            next_obs, reward, done, info = env.step(a)
            agent.observe(obs, info["action"], next_obs, done)
            obs = next_obs
        agent.end_episode(reward, info)
    return actions


def checkpoint(agent: Agent) -> dict:
    """Round-trip through bytes the way the search checkpoints: torch.save, then a weights_only load."""
    buf = io.BytesIO()
    torch.save(agent.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# --- registry and configuration ------------------------------------------------------------------------------


def test_registry_and_schemas():
    assert set(AGENTS) >= {"amc", "haq", "galen", "ajpq", "random", "uniform", "sb3-td3", "sb3-sac"}
    for name, cls in AGENTS.items():
        assert cls.name == name and cls.summary
        schema = cls.config_schema()
        defaults = cls.resolve_config({})
        assert [p["name"] for p in schema] == list(defaults)
        for p in schema:
            assert p["type"] in ("int", "float", "bool", "choice") and p["help"]
            if "min" in p:
                assert p["min"] <= p["default"] <= p["max"]


def test_amc_defaults_are_amcs():
    d = AGENTS["amc"].resolve_config({})
    assert (d["hidden1"], d["hidden2"]) == (300, 300)
    assert (d["lr_actor"], d["lr_critic"], d["tau"], d["discount"]) == (1e-4, 1e-3, 0.01, 1.0)
    assert (d["warmup_episodes"], d["noise_sigma"], d["noise_decay"], d["batch_size"]) == (100, 0.5, 0.95, 64)
    assert d["updates_per_episode"] == 0  # one update per step of the episode
    # this project's additions, on for AMC (docs/BENCHMARKS.md 1h); off means the published agent
    assert (d["elite_episodes"], d["elite_refresh"], d["uniform_start"]) == (1, True, True)
    assert AGENTS["galen"].resolve_config({})["elite_episodes"] == 0
    h = AGENTS["haq"].resolve_config({})
    assert (h["warmup_episodes"], h["noise_decay"], h["buffer_episodes"], h["pin_first_last_8bit"]) == (
        20,
        0.99,
        128,
        True,
    )


def test_bad_configuration_and_layouts_raise_clear_errors():
    spec = SyntheticCompressionEnv(layout="prune").spec
    with pytest.raises(SearchError, match="no setting"):
        make_agent("amc", spec, {"learning_rate": 0.1})
    with pytest.raises(SearchError, match="out of range"):
        make_agent("amc", spec, {"tau": 5.0})
    with pytest.raises(SearchError, match="integer"):
        make_agent("amc", spec, {"hidden1": 2.5})
    with pytest.raises(SearchError, match="bits actions"):
        make_agent("haq", spec)
    with pytest.raises(SearchError, match="unknown agent"):
        make_agent("ppo", spec)
    assert make_agent("galen-pq", SyntheticCompressionEnv(layout="joint").spec).name == "galen"
    assert make_agent("amc", spec, {"warmup_episodes": "7"}).config["warmup_episodes"] == 7


@pytest.mark.skipif(SB3_AVAILABLE, reason="Stable-Baselines3 is installed")
def test_sb3_agents_explain_what_to_install_when_missing():
    with pytest.raises(SearchError, match="stable-baselines3"):
        make_agent("sb3-td3", SyntheticCompressionEnv().spec)


def test_haq_asks_for_pinned_first_and_last_layers():
    spec = SyntheticCompressionEnv(layout="bits").spec
    assert make_agent("haq", spec).env_options() == {"pin_first_last_bits": 8}
    assert make_agent("haq", spec, {"pin_first_last_8bit": False}).env_options() == {}
    env, agent = make("haq", seed=0)
    record = run_episode(env, agent)
    names = env.spec.layer_names
    for name in (names[0], names[-1]):
        assert (record.info["policy"][name].w_bits, record.info["policy"][name].a_bits) == (8, 8)


# --- the protocol ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_AGENTS)
def test_actions_in_range_with_the_right_shape(name):
    env, agent = make(name, seed=3)
    dim = env.spec.action_spec.dim
    for _ in range(8):  # through the warm-up into learning
        obs, done = env.reset(), False
        while not done:
            for explore in (True, False):
                a = agent.act(obs, explore=explore)
                assert isinstance(a, np.ndarray) and a.shape == (dim,) and a.dtype == np.float64
                assert np.all(a >= 0.0) and np.all(a <= 1.0)
            obs, reward, done, info = env.step(agent.act(obs))
            agent.observe(obs, info["action"], obs, done)
        stats = agent.end_episode(reward, info)
        assert isinstance(stats, dict)


@pytest.mark.parametrize("name", ALL_AGENTS)
def test_greedy_actions_leave_the_agent_untouched(name):
    env_a, a = make(name, seed=5)
    env_b, b = make(name, seed=5)
    for _ in range(6):
        for env, agent, peek in ((env_a, a, True), (env_b, b, False)):
            obs, done = env.reset(), False
            while not done:
                if peek:
                    agent.act(obs, explore=False)
                action = agent.act(obs)
                next_obs, reward, done, info = env.step(action)
                agent.observe(obs, info["action"], next_obs, done)
                obs = next_obs
            agent.end_episode(reward, info)
        assert np.array_equal(np.concatenate(play(env_a, a, 1)), np.concatenate(play(env_b, b, 1)))


def test_agents_never_touch_the_global_rngs():
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()
    for name in ALL_AGENTS:
        env, agent = make(name, seed=1)
        play(env, agent, 5)
        restore_agent(checkpoint(agent))
    assert torch.equal(torch_state, torch.get_rng_state())
    after = np.random.get_state()
    assert np_state[0] == after[0] and np.array_equal(np_state[1], after[1]) and np_state[2:] == after[2:]


# --- exact resume ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_AGENTS)
def test_resume_is_bit_identical(name):
    n = 6  # crosses the end of the 3-episode warm-up, so networks, optimisers and buffer all matter
    env, straight = make(name, seed=11)
    expected = play(env, straight, 2 * n)

    env, first = make(name, seed=11)
    got = play(env, first, n)
    state = checkpoint(first)
    resumed = restore_agent(state)
    assert type(resumed) is type(first) and resumed.episode == n
    got += play(make_env(name, resumed), resumed, n)
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("name", RL_AGENTS)
def test_resume_with_elite_imitation_is_bit_identical(name):
    # checkpointed in the middle of the warm-up: the elite episodes must survive for the fit at its end
    cfg = {"elite_episodes": 2, "imitation_steps": 20}
    env, straight = make(name, cfg, seed=5)
    expected = play(env, straight, 6)
    env, first = make(name, cfg, seed=5)
    got = play(env, first, 2)
    assert len(first._elite) == 2
    resumed = restore_agent(checkpoint(first))
    got += play(make_env(name, resumed), resumed, 4)
    assert resumed.imitation_loss is not None and len(resumed._elite) == 2  # kept: refreshed on new bests
    assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))


@pytest.mark.parametrize("name", RL_AGENTS)
def test_after_the_warmup_the_actor_replays_the_best_warmup_episode(name):
    cfg = {"elite_episodes": 1, "imitation_steps": 400, "warmup_episodes": 8}
    env, agent = make(name, cfg, seed=3)
    episodes = []
    for _ in range(8):
        obs, done, steps = env.reset(), False, []
        while not done:
            a = agent.act(obs)
            next_obs, reward, done, info = env.step(a)
            agent.observe(obs, info["action"], next_obs, done)
            steps.append((obs, np.asarray(info["action"])))
            obs = next_obs
        agent.end_episode(reward, info)
        episodes.append((reward, steps))
    best = max(episodes, key=lambda e: e[0])[1]
    greedy = np.array([agent.act(o, explore=False) for o, _ in best])
    fitted = np.abs(greedy - np.array([a for _, a in best]))
    assert agent.imitation_loss is not None and agent.imitation_loss < 0.01
    # without the fit the untrained actor answers about 0.5 everywhere
    _, plain = make(name, {"warmup_episodes": 8, "elite_episodes": 0}, seed=3)
    play(make_env(name, plain), plain, 8)
    untrained = np.abs(
        np.array([plain.act(o, explore=False) for o, _ in best]) - np.array([a for _, a in best])
    )
    # the fitted actor answers the best episode's observations with its actions (mean error 0.03 with these
    # 16-unit networks), where the untrained one answers about 0.5 everywhere (mean error 0.2-0.25)
    assert fitted.mean() < 0.05 and fitted.mean() < untrained.mean() / 4


@pytest.mark.parametrize("name", RL_AGENTS)
def test_a_start_action_is_played_first_and_survives_a_checkpoint(name):
    cfg = {"uniform_start": True}
    env, straight = make(name, cfg, seed=6)
    start = np.full(straight.act_dim, 0.37)
    assert straight.wants_start_action
    straight.set_start_action(start)
    expected = play(env, straight, 5)
    assert np.array_equal(expected[0], start) and not straight.wants_start_action
    env, first = make(name, cfg, seed=6)
    first.set_start_action(start)
    obs = env.reset()
    a = first.act(obs)
    env.step(a)  # checkpointed in the middle of the first episode
    resumed = restore_agent(checkpoint(first))
    assert np.array_equal(resumed.start_action, start)


def test_a_checkpoint_from_before_a_setting_existed_resumes_as_it_ran():
    before = {"elite_episodes": 0, "uniform_start": False}  # how AMC ran before these settings existed
    env, straight = make("amc", before, seed=4)
    expected = play(env, straight, 6)
    env, first = make("amc", before, seed=4)
    got = play(env, first, 3)
    state = checkpoint(first)
    for key in ("elite_episodes", "imitation_steps", "elite_refresh", "uniform_start"):  # not yet in it
        del state["config"][key]
    for key in ("elite", "imitation_loss", "start_action"):
        del state["agent_state"][key]
    resumed = restore_agent(state)
    assert resumed.config["elite_episodes"] == 0
    got += play(make_env("amc", resumed), resumed, 3)
    assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))


def test_resume_mid_episode_keeps_the_pending_steps():
    env, straight = make("galen", seed=2)
    expected = play(env, straight, 6)

    env, agent = make("galen", seed=2)
    got = play(env, agent, 4)
    obs, done, steps = env.reset(), False, 0
    while not done:
        if steps == 3:
            agent = restore_agent(checkpoint(agent))
        a = agent.act(obs)
        got.append(a)
        next_obs, reward, done, info = env.step(a)
        agent.observe(obs, info["action"], next_obs, done)
        obs, steps = next_obs, steps + 1
    agent.end_episode(reward, info)
    got += play(env, agent, 1)
    assert len(got) == len(expected)
    assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))


def test_checkpoints_of_another_agent_or_env_are_refused():
    env, agent = make("amc", seed=0)
    play(env, agent, 2)
    state = checkpoint(agent)
    other_env = SyntheticCompressionEnv(layout="prune", num_layers=6)
    with pytest.raises(SearchError, match="another environment"):
        make_agent("amc", other_env.spec, TINY).load_state_dict(state)
    with pytest.raises(SearchError, match="configuration"):
        make_agent("amc", env.spec, {**TINY, "tau": 0.5}).load_state_dict(state)
    with pytest.raises(SearchError, match="for agent amc"):
        make_agent("random", env.spec).load_state_dict(state)


# --- the uniform baseline ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout,budget", [("prune", 0.5), ("bits", 0.4), ("joint", 0.3), ("ajpq", 0.4)])
def test_uniform_meets_the_budget_as_tightly_as_a_uniform_policy_can(layout, budget):
    env = SyntheticCompressionEnv(layout=layout, budget=budget)
    agent = make_agent("uniform", env.spec, {}, 0)
    stats = [run_episode(env, agent).stats for _ in range(14)]
    assert stats[-1]["converged"] and len([s for s in stats if not s["converged"]]) <= 12
    record = run_episode(env, agent, explore=False, learn=False)
    raw, enforced = record.info["raw_actions"], record.info["enforced_actions"]
    assert raw == enforced  # nothing was capped: the policy really is uniform
    assert all(a == raw[0] for a in raw)
    assert record.info["metrics"]["cost_ratio"] <= budget + 1e-9
    # Tight: the value just above the bracket does not fit any more.
    over = [agent.action_for(agent.hi)] * env.spec.num_steps
    env.reset()
    for a in over:
        _, _, _, info = env.step(a)
    assert info["raw_actions"] != info["enforced_actions"]


class MeasureOnly(SyntheticCompressionEnv):
    """No cap: the budget is only reported (as for an objective measured after the episode)."""

    def __init__(self, report_budget: float, **kwargs):
        super().__init__(budget=1.0, **kwargs)
        self.report_budget = report_budget

    def step(self, action):
        obs, reward, done, info = super().step(action)
        if done:
            info["metrics"]["budget"] = self.report_budget
        return obs, reward, done, info


class RepairLast(MeasureOnly):
    """No cap during the episode; an over-budget policy gets its last action changed afterwards (a repair)."""

    def step(self, action):
        obs, reward, done, info = super().step(action)
        if done and info["metrics"]["cost_ratio"] > self.report_budget:
            info["enforced_actions"][-1] = [0.0] * len(info["enforced_actions"][-1])
            info["metrics"]["cost_ratio"] = self.report_budget
        return obs, reward, done, info


def test_ddpg_agents_store_the_decisions_of_a_repair():
    env = RepairLast(0.3, layout="prune", num_layers=4)
    agent = make_agent("amc", env.spec, TINY, 0)
    record = run_episode(env, agent)
    assert record.info["enforced_actions"][-1] == [0.0]  # all-random actions at a 30% budget get repaired
    stored = agent.buffer.action[: env.spec.num_steps].numpy()
    assert np.allclose(stored, np.array(record.info["enforced_actions"]), atol=1e-6)


@pytest.mark.parametrize("env_cls", [MeasureOnly, RepairLast])
def test_uniform_reads_measured_budgets_and_repairs(env_cls):
    env = env_cls(0.5, layout="prune")
    agent = make_agent("uniform", env.spec, {}, 0)
    for _ in range(14):
        run_episode(env, agent)
    assert agent.converged
    fits = run_episode(env, agent, explore=False, learn=False).info
    assert fits["raw_actions"] == fits["enforced_actions"] and fits["metrics"]["cost_ratio"] <= 0.5
    env.reset()
    for _ in range(env.spec.num_steps):
        _, _, _, over = env.step(agent.action_for(agent.hi))
    assert over["raw_actions"] != over["enforced_actions"] or over["metrics"]["cost_ratio"] > 0.5


def test_uniform_without_budget_pressure_keeps_everything():
    env = SyntheticCompressionEnv(layout="bits", budget=1.0)
    agent = make_agent("uniform", env.spec, {}, 0)
    first = run_episode(env, agent).stats
    assert first["fits"] and first["converged"] and agent.lo == 1.0


# --- the agents learn ---------------------------------------------------------------------------------------------


@dataclass
class SearchOutcome:
    best_reward: float
    best_distance: float
    final_reward: float
    final_distance: float


def learning_env_kwargs(name: str) -> dict:
    """The synthetic environment an agent is measured on, with what the agent asks of it (HAQ's pin)."""
    layout, budget = SETUPS[name]
    probe = make_agent(name, SyntheticCompressionEnv(layout=layout, budget=budget).spec, LEARN_CONFIG, 0)
    return {"layout": layout, "budget": budget, **probe.env_options()}


def search(name: str, env_kwargs: dict, seed: int, config: dict, reward_of=None) -> SearchOutcome:
    """``LEARN_EPISODES`` episodes; the best episode (by true reward) and the final greedy policy."""
    env = SyntheticCompressionEnv(**env_kwargs)
    agent = make_agent(name, env.spec, config, seed)
    best = (-1.0, 1.0)
    for episode in range(LEARN_EPISODES):
        obs, done = env.reset(), False
        while not done:
            action = agent.act(obs)
            next_obs, reward, done, info = env.step(action)
            agent.observe(obs, info["action"], next_obs, done)
            obs = next_obs
        agent.end_episode(reward if reward_of is None else reward_of(episode, reward), info)
        if reward > best[0]:
            best = (reward, env.distance_to_optimum(info["enforced_actions"]))
    final = run_episode(env, agent, explore=False, learn=False)
    final_distance = env.distance_to_optimum(final.info["enforced_actions"])
    return SearchOutcome(best[0], best[1], final.reward, final_distance)


@functools.cache
def _random_baseline(env_items: tuple) -> tuple[float, float]:
    outcomes = [search("random", dict(env_items), s, {}) for s in RANDOM_SEEDS]
    rewards = [o.best_reward for o in outcomes]
    distances = [o.best_distance for o in outcomes]
    return float(np.median(rewards)), float(np.median(distances))


def random_baseline(env_kwargs: dict) -> tuple[float, float]:
    """Median over seeds of random search's best reward and of its best policy's distance to the optimum."""
    return _random_baseline(tuple(sorted(env_kwargs.items())))


def learned(outcome: SearchOutcome, optimum: float, random_reward: float, random_distance: float) -> bool:
    """The learning criterion: well beyond what random search finds with the same number of episodes.

    The best episode closes at least 40% of random search's gap to the optimum; the final greedy policy is
    at least as good as random search's best; both are closer to the optimal policy than random's best
    (the best one by at least 10%).
    """
    closed = (outcome.best_reward - random_reward) / (optimum - random_reward)
    return (
        closed >= 0.4
        and outcome.final_reward >= random_reward
        and outcome.best_distance <= 0.9 * random_distance
        and outcome.final_distance <= random_distance
    )


@pytest.mark.parametrize("name", RL_AGENTS)
def test_rl_agent_learns_beyond_random_search(name):
    """The criterion must hold in at least 2 of 3 seeds (seeds run until that is decided). One seed is one RL
    run, and its trajectory depends on the CPU's floating-point kernels: on an Emerald Rapids Xeon AMC's seed 0
    closed only 18% of the gap (seeds 1 and 2: 77% and 55%) where on the machines before it passed."""
    env_kwargs = learning_env_kwargs(name)
    optimum = SyntheticCompressionEnv(**env_kwargs).optimum().reward
    random_reward, random_distance = random_baseline(env_kwargs)
    outcomes = []
    for seed in (0, 1, 2):
        outcome = search(name, env_kwargs, seed, {**LEARN_CONFIG, **LEARN_OVERRIDES.get(name, {})})
        ok = learned(outcome, optimum, random_reward, random_distance)
        print(
            f"{name} seed {seed}: optimum {optimum:.4f} random {random_reward:.4f}/{random_distance:.3f} -> {outcome}"
        )
        outcomes.append((ok, outcome))
        passed = sum(o for o, _ in outcomes)
        if passed >= 2 or len(outcomes) - passed >= 2:
            break
    assert sum(o for o, _ in outcomes) >= 2, outcomes


def test_the_learning_check_fails_for_an_agent_that_ignores_its_rewards():
    """Control: AMC fed a reward unrelated to its episodes (noise) must NOT pass the same check."""
    env_kwargs = learning_env_kwargs("amc")
    optimum = SyntheticCompressionEnv(**env_kwargs).optimum().reward
    random_reward, random_distance = random_baseline(env_kwargs)
    noise = np.random.default_rng(123).random(LEARN_EPISODES)
    outcome = search("amc", env_kwargs, 0, LEARN_CONFIG, reward_of=lambda episode, _: float(noise[episode]))
    print(f"control: optimum {optimum:.4f} random {random_reward:.4f}/{random_distance:.3f} -> {outcome}")
    assert not learned(outcome, optimum, random_reward, random_distance), outcome


def test_env_spec_mismatch_is_refused_at_act():
    spec = EnvSpec(3, 2, ActionSpec.for_layout("prune"), ("a", "b"))
    agent = make_agent("amc", spec, TINY)
    with pytest.raises(SearchError, match="features"):
        agent.act(np.zeros(4, dtype=np.float32))
