"""The synthetic environment and the env/agent interface (compression.search.spaces), tested on their own."""

from __future__ import annotations

import numpy as np
import pytest

from compression.errors import SearchError
from compression.policy import Policy
from compression.search.spaces import (
    ActionSpec,
    EnvSpec,
    action_to_bits,
    action_to_keep_ratio,
    action_to_pruned_groups,
    bits_to_action,
    check_env,
    keep_ratio_to_action,
    pruned_groups_to_action,
)
from compression.search.synthetic import SyntheticCompressionEnv

LAYOUTS = {"prune": 0.5, "bits": 0.4, "joint": 0.3, "ajpq": 0.4}


def play(env: SyntheticCompressionEnv, actions: list[np.ndarray]) -> tuple[float, dict]:
    env.reset()
    reward, info = 0.0, {}
    for a in actions:
        _, reward, _, info = env.step(np.asarray(a))
    return reward, info


# --- spaces ------------------------------------------------------------------------------------------------


def test_action_specs_of_every_layout():
    assert ActionSpec.for_layout("prune").names == ("keep_ratio",)
    assert ActionSpec.for_layout("bits").names == ("w_bits", "a_bits")
    assert ActionSpec.for_layout("joint").names == ("keep_ratio", "w_bits", "a_bits")
    ajpq = ActionSpec.for_layout("ajpq", groups=3)
    assert ajpq.names == ("sparsity", "group_bits_0", "group_bits_1", "group_bits_2")
    assert (ajpq.layout, ajpq.groups, ajpq.dim) == ("ajpq", 3, 4)
    assert ajpq.inverted_mask().tolist() == [True, False, False, False]
    for bad in [(), ("keep_ratio", "keep_ratio"), ("w_bits",), ("sparsity", "group_bits_1")]:
        with pytest.raises(SearchError):
            ActionSpec(bad)
    with pytest.raises(SearchError):
        ActionSpec.for_layout("nope")


def test_env_spec_round_trip_and_validation():
    spec = EnvSpec(4, 2, ActionSpec.for_layout("bits"), ("a", "b"), ("f0", "f1", "f2", "f3"))
    assert EnvSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(SearchError):
        EnvSpec(4, 3, ActionSpec.for_layout("bits"), ("a", "b"))
    with pytest.raises(SearchError):
        EnvSpec(0, 2, ActionSpec.for_layout("bits"), ("a", "b"))


def test_action_mappings_cover_ranges_and_invert():
    bins = [action_to_bits(a, 2, 8) for a in np.linspace(0, 1, 701)]
    assert sorted(set(bins)) == list(range(2, 9))
    # Equal-width bins: each bit-width gets 1/7 of the action range (within the grid resolution).
    counts = np.bincount(bins)[2:]
    assert counts.max() - counts.min() <= 2
    for b in range(2, 9):
        assert action_to_bits(bits_to_action(b, 2, 8), 2, 8) == b
    assert action_to_keep_ratio(0.0, 0.2) == pytest.approx(0.2)
    assert action_to_keep_ratio(1.0, 0.2) == pytest.approx(1.0)
    assert keep_ratio_to_action(action_to_keep_ratio(0.37, 0.2), 0.2) == pytest.approx(0.37)
    assert [action_to_pruned_groups(a, 4) for a in (0.0, 0.3, 0.6, 0.99, 1.0)] == [0, 1, 2, 3, 3]
    for p in range(4):
        assert action_to_pruned_groups(pruned_groups_to_action(p, 4), 4) == p
    with pytest.raises(SearchError):
        action_to_bits(float("nan"), 2, 8)


# --- the environment protocol --------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_check_env_passes_for_every_layout(layout):
    check_env(SyntheticCompressionEnv(layout=layout, budget=LAYOUTS[layout], num_layers=6), episodes=3)


def test_check_env_catches_a_broken_env():
    class EarlyReward(SyntheticCompressionEnv):
        def step(self, action):
            obs, reward, done, info = super().step(action)
            return obs, 0.5 if not done else reward, done, info

    with pytest.raises(SearchError, match="reward"):
        check_env(EarlyReward(num_layers=4))


def test_observation_features_are_normalised_and_named():
    env = SyntheticCompressionEnv(layout="joint", budget=0.3)
    assert len(env.spec.feature_names) == env.spec.obs_dim
    rng = np.random.default_rng(0)
    obs = env.reset()
    seen = [obs]
    done = False
    while not done:
        obs, _, done, _ = env.step(rng.random(3))
        seen.append(obs)
    seen = np.array(seen)
    assert seen.dtype == np.float32
    assert seen.min() >= 0.0 and seen.max() <= 1.0
    idx = env.spec.feature_names.index("layer_index")
    assert seen[0, idx] == 0.0 and seen[-2, idx] == 1.0
    # The previous-action features carry the enforced action of the step before.
    prev = env.spec.feature_names.index("prev_keep_ratio")
    assert seen[0, prev] == 0.0 and seen[1, prev] > 0.0


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_budget_is_met_by_construction_and_enforcement_is_recorded(layout):
    env = SyntheticCompressionEnv(layout=layout, budget=LAYOUTS[layout], num_layers=8)
    rng = np.random.default_rng(1)
    dim = env.spec.action_spec.dim
    capped_episodes = 0
    for _ in range(30):
        reward, info = play(env, [rng.random(dim) for _ in range(8)])
        m = info["metrics"]
        assert m["cost_ratio"] <= env.budget + 1e-9
        assert reward == pytest.approx(m["accuracy"])
        raw, enforced = np.array(info["raw_actions"]), np.array(info["enforced_actions"])
        capped_episodes += int(not np.array_equal(raw, enforced))
        info["policy"].validate(env.spec.layer_names)
        assert Policy.from_json(info["policy"].to_json()).to_dict() == info["policy"].to_dict()
    assert capped_episodes > 0  # random actions do hit the budget, and it shows in the enforced actions
    # Asking for no compression at all: the first layer gets it, later ones are capped.
    no_compression = np.where(env.spec.action_spec.inverted_mask(), 0.0, 1.0)
    _, info = play(env, [no_compression] * 8)
    assert info["metrics"]["cost_ratio"] <= env.budget + 1e-9
    assert info["enforced_actions"][0] == info["raw_actions"][0]
    assert info["enforced_actions"][1:] != info["raw_actions"][1:]


def test_uncapped_actions_come_back_unchanged():
    env = SyntheticCompressionEnv(layout="bits", budget=1.0, num_layers=5)
    actions = [np.array([0.33, 0.71])] * 5
    _, info = play(env, actions)
    assert info["enforced_actions"] == info["raw_actions"]


def test_too_small_budget_and_bad_settings_raise():
    with pytest.raises(SearchError, match="below the smallest reachable"):
        SyntheticCompressionEnv(layout="prune", budget=0.05)
    with pytest.raises(SearchError):
        SyntheticCompressionEnv(layout="prune", pin_first_last_bits=8)
    with pytest.raises(SearchError):
        SyntheticCompressionEnv(layout="bits", pin_first_last_bits=9)
    env = SyntheticCompressionEnv(num_layers=3)
    env.reset()
    with pytest.raises(SearchError):
        env.step(np.array([1.5]))
    with pytest.raises(SearchError):
        env.step(np.array([0.5, 0.5]))


def test_pinned_first_and_last_layers():
    env = SyntheticCompressionEnv(layout="bits", budget=0.4, num_layers=6, pin_first_last_bits=8)
    _, info = play(env, [np.array([0.0, 0.0])] * 6)
    policy = info["policy"]
    names = env.spec.layer_names
    assert (policy[names[0]].w_bits, policy[names[0]].a_bits) == (8, 8)
    assert (policy[names[-1]].w_bits, policy[names[-1]].a_bits) == (8, 8)
    assert policy[names[1]].w_bits == 2
    # The pin shows in the enforced action, which maps back to 8 bits.
    assert action_to_bits(info["enforced_actions"][0][0], 2, 8) == 8
    assert info["raw_actions"][0] == [0.0, 0.0]


def test_ajpq_prunes_least_important_groups_first():
    env = SyntheticCompressionEnv(layout="ajpq", budget=1.0, num_layers=4, groups=4)
    # sparsity in the bin of 2 pruned groups, every group asks for 5 bits
    action = np.array([pruned_groups_to_action(2, 4), *[bits_to_action(5, 2, 8)] * 4])
    _, info = play(env, [action] * 4)
    lp = info["policy"][env.spec.layer_names[1]]
    assert lp.channel_bits == [5, 5, 0, 0]
    assert lp.keep_ratio == pytest.approx(0.5)


# --- the optimum ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_optimum_is_feasible_certified_and_reachable(layout):
    env = SyntheticCompressionEnv(layout=layout, budget=LAYOUTS[layout])
    opt = env.optimum()
    assert opt.cost_ratio <= env.budget + 1e-9
    assert opt.upper_bound - opt.reward < 1e-3  # the DP grid is fine enough to certify the optimum
    reward, info = play(env, [np.array(a) for a in opt.actions])
    assert reward == pytest.approx(opt.reward, abs=1e-12)
    assert info["enforced_actions"] == info["raw_actions"]  # the optimum fits without any cap
    assert env.distance_to_optimum(info["enforced_actions"]) == 0.0
    # Nothing a random search finds beats it.
    rng = np.random.default_rng(0)
    for _ in range(50):
        r, info = play(env, [rng.random(env.spec.action_spec.dim) for _ in range(env.spec.num_steps)])
        assert r <= opt.upper_bound + 1e-12
        assert env.distance_to_optimum(info["enforced_actions"]) > 0.0


@pytest.mark.parametrize("layout,budget", [("prune", 0.45), ("bits", 0.35)])
def test_optimum_equals_brute_force_on_a_small_instance(layout, budget):
    env = SyntheticCompressionEnv(layout=layout, budget=budget, num_layers=3, problem_seed=3)
    c0, c1, c2 = (t["cost"] for t in env._tables)
    d0, d1, d2 = (t["drop"] for t in env._tables)
    cost = c0[:, None, None] + c1[None, :, None] + c2[None, None, :]
    drop = d0[:, None, None] + d1[None, :, None] + d2[None, None, :]
    best_drop = drop[cost <= budget * env.original_cost * (1 + 1e-12)].min()
    best = env.base_accuracy * np.exp(-best_drop)
    opt = env.optimum()
    assert opt.reward == pytest.approx(best, abs=1e-9)
    assert opt.upper_bound >= best - 1e-12


def test_problem_seed_changes_the_problem_but_not_the_layout():
    a = SyntheticCompressionEnv(problem_seed=0)
    b = SyntheticCompressionEnv(problem_seed=1)
    assert a.spec.action_spec == b.spec.action_spec
    assert a.optimum().reward != b.optimum().reward
