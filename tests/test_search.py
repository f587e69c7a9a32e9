"""The search: the real environment, every agent end to end, budgets, checkpoint and resume."""

from __future__ import annotations

import copy
import json
import math
import os

import numpy as np
import pytest
import torch

from compression.costs import compute_costs
from compression.errors import SearchError
from compression.pipeline import open_workspace
from compression.search.env import CompressionEnvironment, EnvSettings
from compression.search.loop import run_search
from compression.search.results import SearchCallback, SearchConfig
from compression.search.spaces import check_env
from compression.training import subset


@pytest.fixture(scope="module")
def workspace(trained_small_cnn):
    return open_workspace(trained_small_cnn["weights_spec"], "digits", input_shape=(1, 8, 8))


@pytest.mark.parametrize("layout", ["prune", "bits", "joint", "ajpq"])
def test_real_environment_follows_the_protocol_and_meets_budgets(workspace, layout):
    ws = workspace
    objective = "macs" if layout == "prune" else "bops"
    env = CompressionEnvironment(
        ws.graph,
        subset(ws.data.val, 100),
        ws.calibration_batch(64),
        EnvSettings(layout=layout, objective=objective, budget=0.3),
    )
    check_env(env, episodes=1)
    rng = np.random.default_rng(0)
    for _ in range(3):
        env.reset()
        done = False
        while not done:
            # an agent that asks for no compression at all: the cap must still bring the model within budget
            _, reward, done, info = env.step(np.ones(env.spec.action_spec.dim) * rng.uniform(0.9, 1.0))
        assert info["metrics"]["meets_budget"], info["metrics"]["cost_ratio"]
        assert info["metrics"]["cost_ratio"] <= 0.3 + 1e-6
        if layout == "prune":  # keeping everything is over a 30% MAC budget: the cap changed the actions
            assert info["raw_actions"] != info["enforced_actions"]
        else:  # 8 bits everywhere is 6% of the float BOPs: nothing to change, the agent's values stand
            assert info["raw_actions"] == info["enforced_actions"]
        assert 0.0 <= reward <= 1.0


@pytest.mark.parametrize(
    "layout,objective,mode,pin",
    [
        ("prune", "macs", "cap", None),
        ("joint", "bops", "cap", None),
        ("bits", "bops", "repair", None),
        ("bits", "bops", "repair", 8),  # HAQ: the first and last layer pinned to 8 bits
    ],
)
def test_the_environment_finds_the_tightest_uniform_action_on_costs_alone(
    workspace, layout, objective, mode, pin
):
    ws = workspace
    env = CompressionEnvironment(
        ws.graph,
        subset(ws.data.val, 100),
        ws.calibration_batch(64),
        EnvSettings(
            layout=layout,
            objective=objective,
            budget={"prune": 0.3, "joint": 0.03, "bits": 0.02}[layout],
            budget_mode=mode,
        ),
    )
    if pin:
        env.apply_options({"pin_first_last_bits": pin})
    free = slice(1, -1) if pin else slice(None)  # the pinned layers' bits are not the agent's to choose
    scored = []
    env._score = lambda policy: scored.append(policy) or (0.0, {})  # nothing may be applied or scored
    a = env.uniform_action()
    assert (
        not scored
        and a is not None
        and len(set(np.round(np.where(env.action_spec.inverted_mask(), 1 - a, a), 12))) == 1
    )
    del env._score

    def play(action):
        env.reset()
        done = False
        while not done:
            _, _, done, info = env.step(action)
        return info

    info = play(a)  # played for real: unchanged and within budget
    assert info["raw_actions"][free] == info["enforced_actions"][free] and info["metrics"]["meets_budget"]
    # one notch less compression (v + 2 * tolerance) no longer fits as proposed
    inv = env.action_spec.inverted_mask()
    v = float(a[~inv][0]) if (~inv).any() else 1.0 - float(a[0])
    assert v < 0.99  # (the budgets are tight enough that keeping everything does not fit)
    looser = np.where(inv, 1.0 - (v + 2e-3), v + 2e-3)
    info = play(np.clip(looser, 0, 1))
    assert info["raw_actions"][free] != info["enforced_actions"][free] or not info["metrics"]["meets_budget"]


def test_haq_repair_mode_lowers_bits_from_the_last_layer(workspace):
    ws = workspace
    env = CompressionEnvironment(
        ws.graph,
        subset(ws.data.val, 100),
        ws.calibration_batch(64),
        EnvSettings(layout="bits", objective="bops", budget=0.2, budget_mode="repair"),
    )
    env.reset()
    done = False
    while not done:
        _, _, done, info = env.step(np.ones(2))  # 8 bits everywhere: over budget until repaired
    policy = info["policy"]
    bits = [policy[n].w_bits for n in env.steps]
    assert info["metrics"]["meets_budget"]
    assert bits[-1] <= bits[0]  # lowered from the back first


def test_unreachable_budget_is_refused_with_a_reason(workspace):
    ws = workspace
    with pytest.raises(SearchError, match="cannot be reached"):
        CompressionEnvironment(
            ws.graph,
            subset(ws.data.val, 50),
            ws.calibration_batch(32),
            EnvSettings(layout="prune", objective="macs", budget=0.001),
        )


def _config(spec, agent, **kw):
    base = dict(
        model=spec,
        input_shape=(1, 8, 8),
        agent=agent,
        target="analytic",
        objective="bops",
        budget=0.25,
        episodes=6,
        seed=3,
        val_samples=100,
        calib_samples=64,
        fine_tune_epochs=0,
        top_k=1,
        checkpoint_every=2,
        export_formats=("pt2",),
    )
    if agent in ("amc", "haq", "galen", "ajpq"):
        base["agent_config"] = {"warmup_episodes": 3, "batch_size": 16}
    base.update(kw)
    return SearchConfig(**base)


class Record(SearchCallback):
    def __init__(self, stop_after: int | None = None) -> None:
        self.episodes = []
        self.phases = []
        self.stop_after = stop_after

    def on_episode(self, result):
        self.episodes.append(result)

    def on_phase(self, phase, info):
        self.phases.append(phase)

    def should_stop(self):
        return self.stop_after is not None and len(self.episodes) >= self.stop_after


@pytest.mark.parametrize("agent", ["amc", "haq", "galen-pq", "ajpq", "two-stage", "random", "uniform"])
def test_every_agent_runs_end_to_end(trained_small_cnn, tmp_path, agent):
    # (uniform on bops would sit at 8 bits everywhere: 6% of the float BOPs, under any budget here)
    objective = "macs" if agent in ("amc", "uniform") else "bops"
    cfg = _config(trained_small_cnn["weights_spec"], agent, objective=objective)
    rec = Record()
    report = run_search(cfg, str(tmp_path), [rec])
    assert report["status"] == "finished"
    assert [e.episode for e in rec.episodes] == list(range(1, 7))
    # (a two-stage run's pruning stage works to a looser budget of its own; the quantization stage meets the run's)
    assert all(e.meets_budget for e in rec.episodes if e.stage != "prune")
    assert rec.phases[0] == "search" and "finalize" in rec.phases and "export" in rec.phases
    loaded = torch.export.load(str(tmp_path / "model.pt2")).module()
    assert loaded(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    lines = (tmp_path / "episodes.jsonl").read_text().splitlines()
    assert len(lines) == 6
    best = json.loads((tmp_path / "best_policy.json").read_text())
    assert best["layers"]
    assert report["costs"]["ratio"][objective] <= 0.25 + 1e-6
    if agent == "two-stage":
        assert {e.stage for e in rec.episodes} == {"prune", "quantize"}
    if agent == "haq":  # HAQ pins the first and last layer to 8 bits (through env_options)
        names = list(rec.episodes[0].policy["layers"])
        for e in rec.episodes:
            assert (
                e.policy["layers"][names[0]]["w_bits"] == 8 and e.policy["layers"][names[-1]]["w_bits"] == 8
            )
    if agent == "uniform":  # bisects towards the budget rather than compressing as far as possible
        assert max(e.cost_ratio for e in rec.episodes) > 0.5 * cfg.budget


def test_the_uniform_baseline_offers_only_uniform_policies(trained_small_cnn, tmp_path):
    # The bisection's first trial (keep everything) is over any budget, so the environment's cap prunes the
    # last layers instead: a policy that meets the budget and may score well, but is not uniform. It is a
    # probe, and the search must ship a trial that fitted as proposed.
    cfg = _config(trained_small_cnn["weights_spec"], "uniform", objective="macs", episodes=8, top_k=2)
    rec = Record()
    report = run_search(cfg, str(tmp_path), [rec])
    probes = [e for e in rec.episodes if not e.candidate]
    assert probes and all(e.raw_actions != e.enforced_actions for e in probes)
    assert all(e.raw_actions == e.enforced_actions for e in rec.episodes if e.candidate)
    assert not any(e.is_best for e in probes)
    offered = {e.episode for e in rec.episodes if e.candidate}
    assert {c["episode"] for c in report["candidates"]} <= offered
    best = next(e for e in rec.episodes if e.episode == report["best_episode"])
    assert best.candidate and best.meets_budget
    assert len({a for step in best.raw_actions for a in step}) == 1  # one value for every layer: uniform
    stored = [json.loads(line) for line in (tmp_path / "episodes.jsonl").read_text().splitlines()]
    assert [e["candidate"] for e in stored] == [e.candidate for e in rec.episodes]


def test_a_ddpg_agent_with_uniform_start_plays_the_fitting_uniform_policy_first(trained_small_cnn, tmp_path):
    cfg = _config(trained_small_cnn["weights_spec"], "amc", objective="macs", episodes=4)
    cfg.agent_config.update(uniform_start=True, elite_episodes=1)
    rec = Record()
    run_search(cfg, str(tmp_path), [rec])
    first = rec.episodes[0]
    assert first.raw_actions == first.enforced_actions and first.meets_budget
    assert len({a for step in first.raw_actions for a in step}) == 1
    assert first.cost_ratio > 0.9 * cfg.budget  # as tight as a uniform policy gets (rounded to channels)
    assert any(e.raw_actions != e.enforced_actions for e in rec.episodes[1:])  # then random warm-up


@pytest.mark.parametrize("agent", ["amc", "haq", "galen-pq", "ajpq", "two-stage", "random", "uniform"])
def test_pt2_model_search(trained_small_cnn, tmp_path, agent):
    objective = "macs" if agent in ("amc", "uniform") else "bops"
    cfg = _config(trained_small_cnn["pt2"], agent, input_shape=None, episodes=4, objective=objective)
    report = run_search(cfg, str(tmp_path), [])
    assert report["status"] == "finished"
    assert report["accuracy"]["original_test"] > 0.8


def test_resume_equals_uninterrupted(trained_small_cnn, tmp_path):
    cfg = _config(trained_small_cnn["weights_spec"], "amc", objective="macs", episodes=7, checkpoint_every=2)
    straight = Record()
    run_search(cfg, str(tmp_path / "straight"), [straight])

    first = Record(stop_after=5)  # stops after episode 5; the last checkpoint is at episode 4
    out = run_search(cfg, str(tmp_path / "resumed"), [first])
    assert out["status"] == "cancelled"
    second = Record()
    run_search(cfg, str(tmp_path / "resumed"), [second])
    # the cancel wrote a checkpoint at episode 5, so the resumed run starts at 6
    assert [e.episode for e in second.episodes] == [6, 7]
    resumed = first.episodes + second.episodes
    assert [e.policy for e in resumed] == [e.policy for e in straight.episodes]
    assert [e.reward for e in resumed] == [e.reward for e in straight.episodes]
    a = [
        json.loads(line)["policy"]
        for line in (tmp_path / "straight" / "episodes.jsonl").read_text().splitlines()
    ]
    b = [
        json.loads(line)["policy"]
        for line in (tmp_path / "resumed" / "episodes.jsonl").read_text().splitlines()
    ]
    assert a == b


def test_resume_after_a_crash_replays_from_the_checkpoint(trained_small_cnn, tmp_path):
    cfg = _config(trained_small_cnn["weights_spec"], "haq", episodes=5, checkpoint_every=2)

    class Crash(Record):
        def on_episode(self, result):
            super().on_episode(result)
            if result.episode == 3:
                raise RuntimeError("worker killed")

    with pytest.raises(RuntimeError):
        run_search(cfg, str(tmp_path), [Crash()])
    # episode 3 reached episodes.jsonl but not a checkpoint: it is played again, not duplicated
    rec = Record()
    run_search(cfg, str(tmp_path), [rec])
    assert [e.episode for e in rec.episodes] == [3, 4, 5]
    numbers = [json.loads(line)["episode"] for line in (tmp_path / "episodes.jsonl").read_text().splitlines()]
    assert numbers == [1, 2, 3, 4, 5]


def test_checkpoint_of_another_config_is_refused(trained_small_cnn, tmp_path):
    cfg = _config(trained_small_cnn["weights_spec"], "random", episodes=2)
    run_search(cfg, str(tmp_path), [Record(stop_after=1)])
    other = _config(trained_small_cnn["weights_spec"], "random", episodes=2, budget=0.5)
    with pytest.raises(SearchError, match="different search configuration"):
        run_search(other, str(tmp_path), [])


def test_latency_objective_on_a_measured_target(trained_small_cnn, tmp_path, monkeypatch):
    # on a model this small ONNX Runtime's per-call overhead is most of the latency: the most pruned model measured
    # 90-97% of the original in different runs, so no budget below 100% is reachable every time (a fresh-clone run
    # refused 95% with a 96.9% floor); the budget cap itself is tested on simulated devices above
    monkeypatch.setenv("COMPRESSION_CACHE_DIR", str(tmp_path / "cache"))
    cfg = _config(
        trained_small_cnn["weights_spec"],
        "amc",
        target="local-ort",
        objective="latency",
        budget=1.0,
        episodes=3,
        round_to=8,
    )
    rec = Record()
    report = run_search(cfg, str(tmp_path / "run"), [rec])
    assert all(e.latency_ms is not None and e.latency_ms > 0 for e in rec.episodes)
    assert all(e.meets_budget for e in rec.episodes)
    lat = report["latency"]
    assert lat["original"]["median_ms"] > 0 and lat["compressed"]["median_ms"] > 0
    assert "prediction_error" in lat
    assert os.path.exists(tmp_path / "cache" / "latency.sqlite")
    # the candidates were measured on the device, side by side with the original, before fine-tuning
    check = lat["device_check"]
    assert check["rounds"] == 3 and check["measured"] and check["original_ms"] > 0
    assert all(len(m["rounds_ratios"]) == 3 for m in check["measured"])
    chosen = next(c for c in report["candidates"] if c["episode"] == report["best_episode"])
    assert chosen["measured_ratio"] == pytest.approx(lat["measured_ratio"])
    assert "device check" in rec.phases and "measure" not in rec.phases  # the check's measurement is reused


def test_without_the_device_check_the_chosen_model_is_measured_side_by_side(
    trained_small_cnn, tmp_path, monkeypatch
):
    """Where no device check measured it (off, or a budget in MACs), finalize measures the exported model against
    the original, the two alternated run by run on the local target (not two separate measurements whose ratio a
    slow stretch skews). A MACs budget: on this tiny model no latency budget is reachable every time (the per-call
    overhead; see the test above)."""
    monkeypatch.setenv("COMPRESSION_CACHE_DIR", str(tmp_path / "cache"))
    cfg = _config(
        trained_small_cnn["weights_spec"],
        "random",
        target="local-torch",
        objective="macs",
        budget=0.5,
        episodes=3,
        round_to=8,
        device_check_rounds=0,
    )
    rec = Record()
    report = run_search(cfg, str(tmp_path / "run"), [rec])
    lat = report["latency"]
    assert "measure" in rec.phases and "device check" not in rec.phases and "device_check" not in lat
    assert lat["method"] == "interleaved" and lat["original"]["details"]["blocks"] == 3
    assert 0.5 < lat["speedup"] < 20  # the median over 3 blocks of the two models' ratio within a block
    assert lat["prediction_statistic"] in ("median", "min") and "prediction_error" in lat
    assert (
        lat["table"]["measured"] >= 0 and lat["table"]["busy_entries"] == 0
    )  # PyTorch entries are not watched


def test_two_stage_run_whose_quantization_stage_cannot_reach_the_budget_is_refused_before_it_starts(
    trained_small_cnn, tmp_path
):
    # 8-bit minimum: the quantization stage cannot go below 64/1024 of the BOPs of what pruning leaves, so a
    # budget of 1e-4 is out of its reach even after the most pruning; the pruning stage (to 50%) alone is fine
    cfg = _config(
        trained_small_cnn["weights_spec"],
        "two-stage",
        budget=1e-4,
        min_bits=8,
        agent_config={"prune_budget": 0.5},
    )
    rec = Record()
    with pytest.raises(SearchError, match="the quantize stage .* cannot reach its budget"):
        run_search(cfg, str(tmp_path), [rec])
    assert rec.episodes == []  # refused before the pruning stage spent any episode


def test_finalize_chooses_among_candidates_on_the_validation_split(trained_small_cnn, tmp_path):
    cfg = _config(trained_small_cnn["weights_spec"], "random", objective="macs", top_k=3, fine_tune_epochs=1)
    report = run_search(cfg, str(tmp_path), [Record()])
    cands = report["candidates"]
    assert len(cands) >= 2 and all("val_accuracy_after_fine_tune" in c for c in cands)
    chosen = next(c for c in cands if c["episode"] == report["best_episode"])
    assert chosen["val_accuracy_after_fine_tune"] == max(c["val_accuracy_after_fine_tune"] for c in cands)
    assert report["accuracy"]["compressed_test"] == chosen["test_accuracy"]
    # the test cross-entropy beside top-1 (finer on a small split), the original's for comparison
    assert report["accuracy"]["compressed_test_loss"] == chosen["test_loss"] > 0
    assert 0 < report["accuracy"]["original_test_loss"] < math.log(10)
    for c in cands:  # a fine-tune is kept only when it does not lower validation accuracy
        if c["fine_tune_kept"]:
            assert c["val_accuracy_after_fine_tune"] >= c["val_accuracy_before_fine_tune"]
        else:
            assert c["val_accuracy_after_fine_tune"] == c["val_accuracy_before_fine_tune"]


def test_a_fine_tune_that_hurts_is_undone(trained_small_cnn, tmp_path, monkeypatch):
    import compression.search.finalize as fin

    def harmful(
        model, *args, **kwargs
    ):  # stands in for a fine-tune that diverges (too high a rate, too few steps)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(-1.0)
        return []

    monkeypatch.setattr(fin, "fine_tune", harmful)
    cfg = _config(trained_small_cnn["weights_spec"], "random", objective="macs", top_k=2, fine_tune_epochs=1)
    report = run_search(cfg, str(tmp_path), [Record()])
    for c in report["candidates"]:
        assert c["fine_tune_kept"] is False
        assert c["val_accuracy_after_fine_tune"] == c["val_accuracy_before_fine_tune"]
        assert c["test_accuracy"] == c["test_accuracy_before_fine_tune"]
    assert report["accuracy"]["compressed_test"] == report["accuracy"]["compressed_test_before_fine_tune"]


# --- latency objective where fewer bits can cost more -------------------------------------------------------


def _device(kind: str):
    """A simulated runtime's per-layer latency (a true boundary: the real tables are tested elsewhere).

    ``float``: computes in float, a fake-quantized input costs extra arithmetic (TVM here): float is cheapest.
    ``int8-kernels``: any width up to 8 bits runs as the same fast int8 kernel (ONNX Runtime's QDQ models).
    ``int8``: 8-bit kernels are fast, below 8 bits the layer is emulated and slower than float (ONNX Runtime's
    shape of costs): 8 bits is cheapest.
    """
    from compression.search.env import LatencyModel

    def layer_ms(name, in_c, out_c, w_bits, a_bits):
        work = in_c * out_c * 1e-4
        if kind == "float":
            return work * (1.5 if a_bits < 32 else 1.0)
        if kind == "int8-kernels" and w_bits <= 8 and a_bits <= 8:
            return work * 0.5  # every width up to 8 runs as the same int8 kernel
        if w_bits == 8 and a_bits == 8:
            return work * 0.5
        return work * (1.3 if (w_bits < 32 or a_bits < 32) else 1.0)

    return LatencyModel(layer_ms, residual_ms=0.01)


def _latency_env(ws, kind, layout, budget, latency=None, **kw):
    return CompressionEnvironment(
        ws.graph,
        subset(ws.data.val, 60),
        ws.calibration_batch(32),
        EnvSettings(layout=layout, objective="latency", budget=budget, **kw),
        latency=latency or _device(kind),
    )


def _run(env, actions):
    env.reset()
    done = False
    while not done:
        _, _, done, info = env.step(np.asarray(actions, dtype=np.float64))
    return info


def test_float_is_the_top_bit_choice_and_the_cheapest_on_a_float_runtime(workspace):
    from compression.search import spaces

    assert spaces.bit_levels(2, 8, True) == [2, 3, 4, 5, 6, 7, 8, 32]
    assert spaces.action_to_bits(1.0, 2, 8, True) == 32 and spaces.action_to_bits(0.9, 2, 8, True) == 32
    assert spaces.action_to_bits(0.8, 2, 8, True) == 8 and spaces.action_to_bits(0.0, 2, 8, True) == 2
    for b in (2, 5, 8, 32):
        assert spaces.action_to_bits(spaces.bits_to_action(b, 2, 8, True), 2, 8, True) == b
    assert spaces.action_to_bits(1.0, 2, 8) == 8  # without float: HAQ's 2..8 bins, as before

    prune = _latency_env(workspace, "float", "prune", 0.9)
    joint = _latency_env(workspace, "float", "joint", 0.9)
    # the joint floor is the pruning floor: its cheapest choice per layer is float, not 2 bits (which costs more)
    assert joint.min_cost_ratio == pytest.approx(prune.min_cost_ratio)
    assert set(joint._cheap_bits.values()) == {(32, 32)}  # weight bits cost no time there: the precise choice
    without = _latency_env(workspace, "float", "joint", 2.0, float_bits=False)
    assert without.min_cost_ratio > prune.min_cost_ratio  # forced to quantize, the floor rises
    # a budget only pruning reaches: the cap prunes and keeps the layers' activations float
    budget = (prune.min_cost_ratio + 1.0) / 2
    # free precision off: the cap itself must find that float is cheaper than the 2 bits asked for
    env = _latency_env(workspace, "float", "joint", budget, free_precision=False)
    info = _run(env, [1.0, 0.0, 0.0])  # keep everything, 2 bits: over budget and slower than float
    assert info["metrics"]["meets_budget"], info["metrics"]
    policy = info["policy"]
    assert any(policy[n].keep_ratio < 1.0 for n in env.steps)
    # the agent's 2 bits were not what made it fit: where the cap changed a layer it chose the cheaper float input
    assert all(policy[n].a_bits in (2, 32) for n in env.steps)


class _Batching:
    """A simulated device (a true boundary) that counts one-layer workloads measured alone and in batches."""

    @staticmethod
    def make():
        from test_latency_calibration import SimulatedDevice

        from compression.targets.workloads import FusedLayer, OpModule, OverheadModule

        class Batching(SimulatedDevice):
            def __init__(self) -> None:
                self.alone = 0
                self.batches: list[int] = []

            def measure(self, module, example_input, **kwargs):
                # one-layer workloads measured alone (the calibration's whole models are measured alone anyway)
                self.alone += isinstance(module, (FusedLayer, OpModule, OverheadModule))
                return super().measure(module, example_input, **kwargs)

            def measure_many(self, items, *, warmup, repeats, timeout_s):
                self.batches.append(len(items))
                return [
                    SimulatedDevice.measure(self, m, x, warmup=warmup, repeats=repeats) for m, x, _ in items
                ]

        return Batching()


def test_amcs_binary_search_measures_its_probes_with_the_ones_that_can_follow(workspace, tmp_path):
    """AMC's cap is a binary search: each answer picks the next probe. On a cold table a probe not priced yet is
    measured together with the two probes that can follow it; before, every probe's entries were measured alone
    as first asked for (170 alone here and none in batches; now 19 alone and 232 in 52 batches). The policies
    the cap picks are the same either way."""
    from test_latency_calibration import SIM

    from compression.search.latency import TableLatency
    from compression.targets import LatencyTable

    x = workspace.artifact.example_input(1)
    picked = []
    for batched_table in (True, False):
        device = _Batching.make()
        if not batched_table:
            device.measure_many = None  # a backend without batches: everything one by one, as a reference
        table = LatencyTable(SIM, tmp_path / f"t{batched_table}.sqlite", backend=device, warmup=0, repeats=1)
        lat = TableLatency(table, workspace.graph, x, quantized=False, reuse_s=0)
        env = _latency_env(workspace, None, "prune", 0.45, latency=lat, round_to=1)
        start_alone, start_batched = device.alone, sum(device.batches)
        dim = env.spec.action_spec.dim
        policies = []
        for actions in (np.ones(dim), np.full(dim, 0.8), np.full(dim, 0.55)):
            info = _run(env, actions)
            assert info["metrics"]["meets_budget"]
            policies.append({n: lp.keep_ratio for n, lp in info["policy"].layers.items()})
        picked.append(policies)
        if batched_table:
            alone, batched = device.alone - start_alone, sum(device.batches) - start_batched
            assert batched > 0 and alone <= batched / 4, (alone, batched, device.batches)
            assert table.measured == len(table.entries())
    assert picked[0] == picked[1]


def test_a_cold_latency_table_measures_each_steps_candidates_together(workspace, tmp_path):
    """Where fewer bits can cost more, the cap prices every candidate of a step, and free precision every bit choice
    at each candidate's shape; on a cold table those entries are measured in batches (a target that compiles many
    workloads at once, TVM, pays its fixed compile cost once), not one by one as each is first asked for (session
    16's first version left free precision's lookups one by one: 507 alone to 622 batched here). The device is
    simulated (a true boundary); the table and the environment are real."""
    from test_latency_calibration import SIM

    from compression.search.latency import TableLatency
    from compression.targets import LatencyTable

    device = _Batching.make()
    table = LatencyTable(SIM, tmp_path / "t.sqlite", backend=device, warmup=0, repeats=1)
    x = workspace.artifact.example_input(1)
    lat = TableLatency(table, workspace.graph, x, quantized=True, reuse_s=0)
    assert device.batches and device.alone == 0  # the calibration models' workloads: in batches
    env = _latency_env(workspace, None, "joint", 0.5, latency=lat)  # free precision on, as by default
    start_alone, start_batched = device.alone, sum(device.batches)
    dim = env.spec.action_spec.dim
    for actions in (np.ones(dim), np.linspace(0.7, 0.3, dim), np.resize([0.9, 0.2, 1.0], dim)):
        info = _run(env, actions)
        assert info["metrics"]["meets_budget"]
    alone, batched = device.alone - start_alone, sum(device.batches) - start_batched
    assert batched > 0 and alone <= batched / 10, (alone, batched, device.batches)
    # nothing was measured twice: every entry measured is one the table now holds
    assert table.measured == len(table.entries())


def test_cap_and_repair_find_the_fast_int8_kernels_when_fewer_bits_cost_more(workspace):
    # bits only, a budget only 8-bit kernels reach: the fewest bits (emulated) would be slower than float
    env = _latency_env(workspace, "int8", "bits", 0.7)
    assert set(env._cheap_bits.values()) == {(8, 8)}
    assert env.min_cost_ratio < 0.7
    for mode in ("cap", "repair"):
        env = _latency_env(workspace, "int8", "bits", 0.7, budget_mode=mode)
        info = _run(env, [1.0, 1.0])  # float everywhere: over budget
        assert info["metrics"]["meets_budget"], (mode, info["metrics"])
        bits = {(info["policy"][n].w_bits, info["policy"][n].a_bits) for n in env.steps}
        assert (8, 8) in bits, (mode, bits)
        assert all(b[0] >= 8 or b == (8, 8) for b in bits), (mode, bits)  # never the slow emulated widths


def test_bits_that_buy_no_time_are_raised_to_the_most_precise_equally_fast_choice(workspace):
    def decided(kind, layout, actions, **kw):
        env = _latency_env(workspace, kind, layout, 2.0, **kw)  # a budget that never caps
        info = _run(env, actions)
        return {(info["policy"][n].w_bits, info["policy"][n].a_bits) for n in env.steps}, info

    # float runtime: any quantized input costs more than float and weight bits cost nothing, so 2 bits become float
    bits, info = decided("float", "joint", [1.0, 0.0, 0.0])
    assert bits == {(32, 32)}
    assert (
        info["enforced_actions"] == info["raw_actions"]
    )  # part of decoding, not a change the agent must learn
    kept, _ = decided("float", "joint", [1.0, 0.0, 0.0], free_precision=False)
    assert kept == {(2, 2)}
    # int8 kernels for every width up to 8: 2 bits cost what 8 bits cost, so the layer gets 8 (not float: slower)
    assert decided("int8-kernels", "bits", [0.0, 0.0])[0] == {(8, 8)}
    # emulated widths below 8 are slower than float: 2 bits become float; 8 bits stay (the fast kernel)
    assert decided("int8", "bits", [0.0, 0.0])[0] == {(32, 32)}
    assert decided("int8", "bits", [0.8, 0.8])[0] == {(8, 8)}
    # MACs / BOPs: fewer bits are always cheaper there, nothing is raised
    env = CompressionEnvironment(
        workspace.graph,
        subset(workspace.data.val, 60),
        workspace.calibration_batch(32),
        EnvSettings(layout="bits", objective="bops", budget=2.0),
    )
    info = _run(env, [0.0, 0.0])
    assert {(info["policy"][n].w_bits, info["policy"][n].a_bits) for n in env.steps} == {(2, 2)}


class _TransitionDevice:
    """A runtime with int8 kernels whose conversions cost (ONNX Runtime's shape, measured in docs/targets.md): int8 is
    half the float time, except one middle layer that alone is faster in float, and every edge between an int8 and a
    float layer costs ``transition`` ms (counted on the model's real data flow, ``LayerGraph.producers``)."""

    def __new__(cls, graph, slow_int8: str, transition: float = 0.05):
        from compression.search.env import LatencyModel, count_transitions

        class Device(LatencyModel):
            prices_transitions = True
            transition_ms = transition

            def run_class(self, w_bits, a_bits):
                return "int8" if w_bits <= 8 and a_bits <= 8 else "float"

            def transitions(self, costs):
                kinds = {n: self.run_class(c.w_bits, c.a_bits) == "int8" for n, c in costs.layers.items()}
                return count_transitions(graph.producers(), kinds)

        def layer_ms(name, in_c, out_c, w_bits, a_bits):
            work = in_c * out_c * 1e-4
            if w_bits <= 8 and a_bits <= 8:
                return work * (1.2 if name == slow_int8 else 0.5)
            return work

        return Device(layer_ms, residual_ms=0.01)


def test_int8_and_float_layers_are_not_mixed_for_a_layer_that_alone_is_cheaper_in_float(workspace):
    """Free precision and the floor compared layers one by one: on ONNX Runtime they turned the layers whose own entry
    was cheaper in float to float, and the mixed model measured slower than the original (HAQ's model in
    docs/BENCHMARKS.md 1g: 55% predicted, 113% measured). With transitions priced, a layer's free precision stays
    within its kind of kernel, and the floor takes one kind throughout when that is cheaper as a whole."""
    from compression.search.env import count_transitions

    steps = workspace.graph.quantizable
    slow = steps[2]

    def env_for(budget, **kw):
        return _latency_env(
            workspace, None, "bits", budget, latency=_TransitionDevice(workspace.graph, slow), **kw
        )

    env = env_for(2.0)
    assert set(env._cheap_bits.values()) == {(8, 8)}  # per layer, the slow layer alone would be float
    info = _run(env, [0.3, 0.3])  # a few bits everywhere: int8 kernels; 8 bits cost no more
    bits = {n: (info["policy"][n].w_bits, info["policy"][n].a_bits) for n in env.steps}
    assert set(bits.values()) == {(8, 8)}, bits
    assert (
        env.latency.transitions(compute_costs(workspace.graph, info["policy"])) == 2
    )  # input and output only
    # the same device without the transitions priced: the slow layer is raised to float, a mixed model
    env.latency.prices_transitions = False
    mixed = _run(env, [0.3, 0.3])["policy"]
    assert (mixed[slow].w_bits, mixed[slow].a_bits) == (32, 32)
    kinds = {n: mixed[n].w_bits <= 8 for n in env.steps}
    assert count_transitions(workspace.graph.producers(), kinds) == 4
    # a budget that needs int8: the cap meets it with the transitions it makes counted
    tight = env_for(0.8)
    info = _run(tight, [1.0, 1.0])  # float everywhere: over budget
    assert info["metrics"]["meets_budget"], info["metrics"]
    costs = compute_costs(workspace.graph, info["policy"])
    layers_only = sum(tight.latency.per_layer(costs).values()) + tight.latency.residual_ms
    assert tight.latency.transitions(costs) >= 1
    assert info["metrics"]["cost_ratio"] * tight._reference_cost == pytest.approx(
        layers_only + 0.05 * tight.latency.transitions(costs)
    )
    assert info["metrics"]["cost_ratio"] <= 0.8 + 1e-9


def test_ajpq_groups_take_the_precision_that_costs_no_time_and_prune_on_a_float_runtime(workspace):
    """AJPQ on a runtime that computes in float (TVM here): any quantized group only costs time, so its kept groups
    become float and its 0-bit groups (pruning) are what meets a latency budget; without the raise it was refused."""

    def env_for(kind, budget, **kw):
        return _latency_env(workspace, kind, "ajpq", budget, **kw)

    never_caps = env_for("float", 2.0)
    low = [0.0] * never_caps.action_spec.dim  # no group pruned, every group at the fewest bits
    info = _run(never_caps, low)
    for n in never_caps.steps:
        lp = info["policy"][n]
        assert set(lp.channel_bits) == {32} and (lp.w_bits, lp.a_bits) == (32, 32), (n, lp)
    assert info["enforced_actions"] == info["raw_actions"]  # part of decoding, as for the bits layouts
    legacy = _run(env_for("float", 2.0, free_precision_groups=False), low)
    assert {b for n in never_caps.steps for b in legacy["policy"][n].channel_bits} == {2}
    # the floor: all but one group pruned, the kept one float, no longer at the fewest bits (which cost more here)
    floor = env_for("float", 2.0).min_cost_ratio
    assert floor < env_for("float", 2.0, free_precision_groups=False).min_cost_ratio / 1.2
    # a budget only pruning meets: the cap prunes groups and leaves the kept ones float
    env = env_for("float", (floor + 1.0) / 2)
    info = _run(env, low)
    assert info["metrics"]["meets_budget"], info["metrics"]
    policy = info["policy"]
    assert any(0 in policy[n].channel_bits for n in env.steps)
    assert {b for n in env.steps for b in policy[n].channel_bits} <= {0, 32}
    # int8 kernels for every width up to 8: the groups' 2 bits become 8 (float would be slower there)
    info = _run(env_for("int8-kernels", 2.0), low)
    assert {b for n in env.steps for b in info["policy"][n].channel_bits} == {8}


def test_capped_layers_keep_the_free_precision_of_their_new_shape(workspace):
    # int8 kernels that lose to float at a layer's full width and win once it is pruned (a runtime whose int8 path
    # has a fixed cost per call): the agent's 2 bits are float at full width, 8 bits where the cap narrows the layer
    from compression.costs import compute_costs
    from compression.search.env import LatencyModel

    full = {n: c.in_channels * c.out_channels for n, c in compute_costs(workspace.graph, None).layers.items()}

    def layer_ms(name, in_c, out_c, w_bits, a_bits):
        work = in_c * out_c * 1e-4
        if w_bits <= 8 and a_bits <= 8:
            return work * (1.2 if in_c * out_c >= full[name] else 0.5)
        return work * (1.5 if a_bits < 32 else 1.0)

    def env_for(budget, **kw):
        return CompressionEnvironment(
            workspace.graph,
            subset(workspace.data.val, 60),
            workspace.calibration_batch(32),
            EnvSettings(layout="joint", objective="latency", budget=budget, **kw),
            latency=LatencyModel(layer_ms, residual_ms=0.01),
        )

    wide = _run(env_for(2.0), [1.0, 0.0, 0.0])[
        "policy"
    ]  # no cap: full width everywhere, float is cheaper there
    assert {(lp.w_bits, lp.a_bits) for lp in wide.layers.values()} == {(32, 32)}
    env = env_for(0.6)
    info = _run(env, [1.0, 0.0, 0.0])
    assert info["metrics"]["meets_budget"], info["metrics"]
    policy = info["policy"]
    narrowed = [n for n in env.steps if policy[n].keep_ratio < 1.0]
    assert narrowed
    # where the cap narrowed a layer it re-decided the agent's 2 bits at the new shape: the int8 kernel, not float
    assert {(policy[n].w_bits, policy[n].a_bits) for n in narrowed} == {(8, 8)}
    # and it pruned no more than needed: float carried over to the narrow shapes would have to prune further
    carried = _run(env_for(0.6, free_precision=False), [1.0, 0.0, 0.0])["policy"]
    assert sum(policy[n].keep_ratio for n in env.steps) >= sum(carried[n].keep_ratio for n in env.steps)


def test_the_search_set_tops_a_small_validation_split_up_with_training_images_the_calibration_does_not_use(
    workspace,
):
    val, train = workspace.data.val, workspace.data.train
    assert len(val) < 400  # digits: a small validation split
    images, sizes = workspace.search_set(1000, 256, seed=3)
    assert sizes == {"validation": len(val), "training": 1000 - len(val)} and len(images) == 1000
    x = images.tensors[0]
    assert torch.equal(x[: len(val)].sort(0).values, val.tensors[0].sort(0).values)  # every validation image
    calib = workspace.calibration_batch(256, seed=3)
    extra = x[len(val) :].flatten(1)
    # none of the added training images is one the re-fit and batch-norm re-estimation saw

    def same(a, b):  # exact distances (the matmul shortcut is off by ~1e-3 for identical rows)
        return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist") < 1e-6

    assert not same(extra, calib.flatten(1)).any()
    assert same(extra, train.tensors[0].flatten(1)).any(1).all()  # all from the training split
    again, _ = workspace.search_set(1000, 256, seed=3)
    assert torch.equal(again.tensors[0], x)  # deterministic
    only_val, sizes = workspace.search_set(1000, 256, seed=3, top_up=False)
    assert sizes == {"validation": len(val), "training": 0} and len(only_val) == len(val)
    small, sizes = workspace.search_set(50, 256, seed=3)
    assert sizes == {"validation": 50, "training": 0} and len(small) == 50


def test_the_tune_set_is_every_training_image_the_search_set_does_not_score(workspace):
    train = workspace.data.train
    images, sizes = workspace.search_set(1000, 256, seed=3)
    tune = workspace.tune_set(1000, 256, seed=3)
    assert len(tune) == len(train) - sizes["training"]
    extra = images.tensors[0][sizes["validation"] :].flatten(1)
    x = tune.tensors[0].flatten(1)

    def same(a, b):
        return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist") < 1e-6

    # the training rows of the two sets are complementary: every training image is in exactly one of them
    both = torch.cat([extra, x])
    assert same(train.tensors[0].flatten(1), both).any(1).all()
    assert not same(extra, x).any()
    assert (
        same(workspace.calibration_batch(256, seed=3).flatten(1), x).any(1).all()
    )  # the calibration batch too
    assert torch.equal(workspace.tune_set(1000, 256, seed=3).tensors[0], tune.tensors[0])  # deterministic
    # without the top-up nothing of the training split is scored: the search may tune on all of it
    assert len(workspace.tune_set(1000, 256, seed=3, top_up=False)) == len(train)


def test_a_candidate_tuned_before_scoring_scores_what_the_short_fine_tune_makes_of_it(workspace):
    from compression.apply import apply_policy, fold_batch_norms
    from compression.policy import Policy
    from compression.training import evaluate, quick_tune

    ws = workspace
    val, calib = subset(ws.data.val, 100), ws.calibration_batch(64)
    tune = ws.tune_set(100, 64)
    policy = Policy.uniform(ws.graph.prunable_leaders, keep_ratio=0.3)

    def env(steps, **kw):
        return CompressionEnvironment(
            ws.graph, val, calib, EnvSettings(objective="macs", budget=0.5, tune_steps=steps), **kw
        )

    tuned_env = env(8, tune_set=tune)
    acc, timings = tuned_env.evaluate_policy(policy)
    assert timings["tune_s"] > 0 and timings["apply_s"] >= timings["tune_s"]
    assert tuned_env.evaluate_policy(policy)[0] == acc  # deterministic: a policy always scores the same
    # what it scores: the candidate as applied, then quick_tune on the tune set against the original's outputs
    model = apply_policy(ws.graph, policy, calib)
    with torch.no_grad():
        teacher = ws.graph.module.eval()(tune.tensors[0])
    quick_tune(model, *tune.tensors, teacher, steps=8, seed=0)
    fold_batch_norms(model, ws.graph.conv_bn_pairs())
    assert evaluate(model, val).top1 == acc
    # given the original's outputs already (what SearchRun does, once for all its environments): the same score
    shared = torch.utils.data.TensorDataset(*tune.tensors, teacher)
    assert env(8, tune_set=shared).evaluate_policy(policy)[0] == acc
    as_applied, timings = env(0).evaluate_policy(policy)
    assert "tune_s" not in timings and as_applied != acc
    with pytest.raises(SearchError, match="training images outside the search set"):
        env(8)


def test_a_search_run_computes_the_originals_outputs_on_the_tune_set_once(
    trained_small_cnn, tmp_path, monkeypatch
):
    from compression.search import env as env_module
    from compression.search.loop import SearchRun

    calls = []
    real = env_module.tune_tensors

    def counting(module, tune_set):
        calls.append(len(tune_set.tensors))
        return real(module, tune_set)

    monkeypatch.setattr(env_module, "tune_tensors", counting)
    monkeypatch.setattr("compression.search.loop.tune_tensors", counting)
    cfg = _config(trained_small_cnn["pt2"], "two-stage", episodes=4, val_samples=300, tune_steps=2)
    run = SearchRun(cfg, str(tmp_path))
    for stage in run.stages:
        run.make_env(stage, None)
    # one forward pass of the original, in SearchRun; every environment after it is handed the outputs
    assert calls[0] == 2 and all(n == 3 for n in calls[1:]) and len(calls) >= 1 + 2 * len(run.stages)
    x, y, logits = run.tune_set.tensors
    with torch.no_grad():
        assert torch.equal(logits, run.ws.graph.module.eval()(x))


def test_a_search_reports_what_it_scored_candidates_on(trained_small_cnn, tmp_path):
    from compression.search.loop import SearchRun

    run = SearchRun(_config(trained_small_cnn["pt2"], "random", episodes=1, val_samples=300), str(tmp_path))
    n_val = len(run.ws.data.val)
    assert run.start_info()["search_set"] == {"validation": n_val, "training": 300 - n_val}
    assert len(run.val) == 300
    run = SearchRun(
        _config(trained_small_cnn["pt2"], "random", episodes=1, val_samples=300, train_top_up=False),
        str(tmp_path / "b"),
    )
    assert run.start_info()["search_set"] == {"validation": n_val, "training": 0}


def test_a_run_checkpointed_before_newer_settings_resumes_as_it_ran(trained_small_cnn, tmp_path):
    from compression.search.loop import ADDED_SETTINGS, CHECKPOINT

    legacy = dict(ADDED_SETTINGS)
    cfg = _config(trained_small_cnn["weights_spec"], "amc", objective="macs", episodes=6, **legacy)
    straight = Record()
    run_search(cfg, str(tmp_path / "straight"), [straight])
    first = Record(stop_after=3)
    run_search(cfg, str(tmp_path / "old"), [first])
    # what an older version wrote: a checkpoint whose configuration has none of the newer settings
    ckpt = tmp_path / "old" / CHECKPOINT
    state = torch.load(ckpt, weights_only=True)
    stored = {k: v for k, v in json.loads(state["config"]).items() if k not in ADDED_SETTINGS}
    state["config"] = json.dumps(stored)
    torch.save(state, ckpt)
    # the stored settings (config.json / the database row) lack them too: today's defaults fill them in
    loaded = SearchConfig.from_dict(stored)
    assert loaded.train_top_up is True and loaded.reconstruct is True
    second = Record(stop_after=1)
    run_search(loaded, str(tmp_path / "old"), [second])
    assert [e.episode for e in second.episodes] == [4]
    # resumed again from the checkpoint that resume wrote (the stored settings still lack the keys)
    third = Record()
    report = run_search(SearchConfig.from_dict(stored), str(tmp_path / "old"), [third])
    assert [e.episode for e in third.episodes] == [5, 6]
    resumed = first.episodes + second.episodes + third.episodes
    assert [e.policy for e in resumed] == [e.policy for e in straight.episodes]
    assert [e.reward for e in resumed] == [e.reward for e in straight.episodes]
    assert report["search_set"]["training"] == 0
    # a real difference is still refused
    other = SearchConfig.from_dict({**stored, "budget": 0.5})
    with pytest.raises(SearchError, match="different search configuration"):
        run_search(other, str(tmp_path / "old"), [])


def test_pinned_first_and_last_layers_take_float_where_8_bits_would_only_cost_time(workspace):
    # HAQ pins the first and last layer to 8 bits for precision; on a float runtime 8 bits is slower than float
    prune = _latency_env(workspace, "float", "prune", 0.9)
    floors = {}
    for free in (True, False):
        env = _latency_env(workspace, "float", "joint", 2.0, free_precision=free)
        env.apply_options({"pin_first_last_bits": 8})
        floors[free] = env.min_cost_ratio
        info = _run(env, [1.0, 1.0, 1.0])  # float everywhere asked
        first, last = env.steps[0], env.steps[-1]
        bits = {(info["policy"][n].w_bits, info["policy"][n].a_bits) for n in (first, last)}
        assert bits == ({(32, 32)} if free else {(8, 8)}), (free, bits)
    # the pin no longer raises the floor above what pruning alone reaches
    assert floors[True] == pytest.approx(prune.min_cost_ratio)
    assert floors[False] > prune.min_cost_ratio


def test_finalize_says_when_the_device_measures_the_chosen_model_over_the_budget(
    trained_small_cnn, monkeypatch
):
    """The search meets a latency budget by its table; the end-to-end measurement is the device's word. A model that
    measures over the budget (the device is the boundary here: side by side it answers 1.0 ms for the original and
    0.9 ms for the compressed model in every block, as ONNX Runtime did for an int8 model its table priced at 55%)
    is reported as such."""
    from types import SimpleNamespace

    import compression.targets as targets
    from compression.pipeline import open_workspace
    from compression.search.finalize import MEASURE_BLOCKS, _measure
    from compression.targets.base import Measurement

    ws = open_workspace(trained_small_cnn["weights_spec"], "digits", seed=0)
    original = ws.artifact.module.eval()
    compressed = copy.deepcopy(original)
    asked: list[tuple[list, int]] = []

    def device(modules, x, target, blocks=3, **kw):
        asked.append((list(modules), blocks))
        ms = [1.0 if m is original else 0.9 for m in modules]
        per = [[v] * blocks for v in ms]
        return targets.Comparison(
            [Measurement(target.name, "simulated", v, v, 0.0, v, 10 * blocks, 1, 0.0) for v in ms],
            per,
            [[v / ms[0] for v in p] for p in per],
            [v / ms[0] for v in ms],
            "interleaved",
        )

    monkeypatch.setattr(targets, "compare_models", device)
    cand = SimpleNamespace(latency_ms=0.55, cost_ratio=0.55)
    for budget, over in ((0.6, True), (0.85, False), (1.0, False)):
        cfg = SimpleNamespace(objective="latency", budget=budget)
        run = SimpleNamespace(ws=ws, target=targets.get_target("local-torch"), config=cfg)
        out = _measure(run, original, compressed, cand)
        # the two models side by side, the original first
        assert (
            asked[-1][0][0] is original and asked[-1][0][1] is compressed and asked[-1][1] == MEASURE_BLOCKS
        )
        assert out["measured_ratio"] == pytest.approx(0.9) and out["method"] == "interleaved"
        assert ("over_budget" in out) is over, (budget, out)
        if over:
            assert "90% of the original" in out["over_budget"] and "over the 60% budget" in out["over_budget"]
            assert "predicted 55%" in out["over_budget"]
    # a table some of whose entries were timed on a busy machine says so beside the verdict
    table = SimpleNamespace(
        statistic="min", busy_entries=4, stats=lambda: {"measured": 30, "busy_entries": 4}
    )
    cfg = SimpleNamespace(objective="latency", budget=0.6)
    run = SimpleNamespace(
        ws=ws, target=targets.get_target("local-torch"), config=cfg, latency=SimpleNamespace(table=table)
    )
    out = _measure(run, original, compressed, cand)
    assert out["table"] == {"measured": 30, "busy_entries": 4}
    assert (
        "4 of the table entries this search measured were timed while other programs kept"
        in out["over_budget"]
    )
    cfg = SimpleNamespace(objective="macs", budget=0.6)  # not a latency budget: nothing to compare
    run = SimpleNamespace(ws=ws, target=targets.get_target("local-torch"), config=cfg)
    assert "over_budget" not in _measure(run, original, compressed, cand)


# --- the device check: candidates measured end to end before fine-tuning ----------------------------------


def _policy_key(policy) -> str:
    from compression.policy import Policy

    if isinstance(policy, dict):
        policy = Policy.from_dict(policy)
    return json.dumps(policy.to_dict()["layers"], sort_keys=True)


class _Device:
    """A device (the true boundary) that answers ``compare_models`` per policy: ``speeds`` maps a policy key to its
    latency over the original's; the original takes 1 ms. Every second block the whole machine is 1.6x slower (as
    this machine's slow stretches), which a ratio within the block cancels. ``fail`` raises instead."""

    def __init__(self, original, speeds, fail=False):
        self.original, self.speeds, self.fail = original, speeds, fail
        self.batches = []

    def __call__(self, modules, x, target, *, blocks=3, **kw):
        import statistics

        from compression.errors import TargetError
        from compression.targets import Comparison
        from compression.targets.base import Measurement

        if self.fail:
            raise TargetError("target local-torch: the device did not answer within 600 s")
        assert modules[0] is self.original
        keys = [m._policy_key for m in modules[1:]]
        self.batches.append(keys)
        slow = [1.6 if b % 2 else 1.0 for b in range(blocks)]
        block_ms = [slow] + [[self.speeds.get(k, 1.0) * f for f in slow] for k in keys]
        block_ratios = [[v / r for v, r in zip(per, slow, strict=True)] for per in block_ms]
        ms = [statistics.median(per) for per in block_ms]
        meas = [Measurement(target.name, "simulated", v, v, 0.0, v, 10, 1, 0.0) for v in ms]
        return Comparison(
            meas, block_ms, block_ratios, [statistics.median(r) for r in block_ratios], "simulated"
        )


@pytest.fixture
def searched(trained_small_cnn, tmp_path_factory, monkeypatch):
    """Real episodes of a short search, the policies ranked by reward, and apply_policy tagging its models."""
    import compression.search.finalize as fin
    from compression.search.finalize import pick_candidates

    cfg = _config(trained_small_cnn["weights_spec"], "random", objective="macs", episodes=10, top_k=2)
    rec = Record()
    run_search(cfg, str(tmp_path_factory.mktemp("searched")), [rec])
    ranked, _ = pick_candidates(rec.episodes, 6)
    assert len(ranked) == 6
    real_apply = fin.apply_policy

    def tagged(graph, policy, *a, **kw):
        model = real_apply(graph, policy, *a, **kw)
        model._policy_key = _policy_key(policy)
        return model

    monkeypatch.setattr(fin, "apply_policy", tagged)
    return rec.episodes, ranked


def _check_run(workspace, budget=0.6, top_k=2, rounds=3):
    from types import SimpleNamespace

    import compression.targets as targets

    cfg = SimpleNamespace(
        objective="latency", budget=budget, top_k=top_k, device_check_rounds=rounds, reconstruct=True
    )
    return SimpleNamespace(
        config=cfg,
        ws=workspace,
        calib=workspace.calibration_batch(64, seed=0),
        round_to=1,
        target=targets.get_target("local-torch"),
        emit=SimpleNamespace(should_stop=lambda: False),
        latency=object(),
    )


def test_device_check_replaces_the_candidates_the_device_measures_over_the_budget(
    searched, workspace, monkeypatch
):
    import compression.targets as targets
    from compression.search.finalize import device_check

    episodes, ranked = searched
    k = [_policy_key(e.policy) for e in ranked]
    # the two best by reward measure over the 60% budget (limit 66% with the slack); of the next two, one fits
    device = _Device(workspace.artifact.module, {k[0]: 0.9, k[1]: 0.8, k[2]: 0.5, k[3]: 0.9})
    monkeypatch.setattr(targets, "compare_models", device)
    check = device_check(_check_run(workspace), workspace.artifact.module, episodes)
    assert check.fits and check.error is None
    assert [c.episode for c in check.candidates] == [ranked[2].episode]
    assert check.dropped == [ranked[0].episode, ranked[1].episode, ranked[3].episode]
    assert check.ratios[ranked[2].episode] == pytest.approx(0.5)  # the slow rounds cancel out
    assert check.rounds_ratios[ranked[0].episode] == pytest.approx([0.9, 0.9, 0.9])
    assert set(check.models) == {ranked[2].episode}  # the applied model is handed to the fine-tune
    # each batch side by side with the original: two batches, then it stops
    assert device.batches == [[k[0], k[1]], [k[2], k[3]]]
    summary = check.summary()
    assert summary["fits"] and summary["original_ms"] == pytest.approx(1.0)
    assert [m["episode"] for m in summary["measured"]] == [e.episode for e in ranked[:4]]


def test_device_check_keeps_the_fastest_when_nothing_fits_and_the_tables_choice_when_the_device_fails(
    searched, workspace, monkeypatch
):
    import compression.targets as targets
    from compression.search.finalize import CHECK_BATCHES, device_check

    episodes, ranked = searched
    speeds = {_policy_key(e.policy): 0.9 for e in ranked}
    speeds[_policy_key(ranked[4].policy)] = 0.7
    speeds[_policy_key(ranked[5].policy)] = 0.8
    monkeypatch.setattr(targets, "compare_models", _Device(workspace.artifact.module, speeds))
    check = device_check(_check_run(workspace), workspace.artifact.module, episodes)
    assert not check.fits and len(check.ratios) == 2 * CHECK_BATCHES  # every batch measured
    assert [c.episode for c in check.candidates] == [ranked[4].episode, ranked[5].episode]
    assert len(check.dropped) == 6

    monkeypatch.setattr(targets, "compare_models", _Device(workspace.artifact.module, {}, fail=True))
    check = device_check(_check_run(workspace), workspace.artifact.module, episodes)
    assert check.candidates == [] and "did not answer" in check.error
    assert check.summary()["error"] == check.error


def test_a_search_whose_candidates_all_measure_over_the_budget_says_so(
    trained_small_cnn, tmp_path, monkeypatch
):
    """End to end on ONNX Runtime (its latency table measured for real); the finalize step's device answers that
    every compressed model is 30% slower than the original: the report names the check and the verdict."""
    import compression.targets as targets

    monkeypatch.setenv("COMPRESSION_CACHE_DIR", str(tmp_path / "cache"))
    cfg = _config(
        trained_small_cnn["weights_spec"],
        "amc",  # pruning only: quantized layers on a model this small can price above 100% (a refused budget)
        target="local-ort",
        objective="latency",
        budget=1.0,
        episodes=4,
        round_to=8,
        top_k=1,
        device_check_rounds=2,
    )

    def device(modules, x, target, *, blocks=3, **kw):
        from compression.targets import Comparison
        from compression.targets.base import Measurement

        ms = [1.0] + [1.3] * (len(modules) - 1)
        meas = [Measurement(target.name, "simulated", v, v, 0.0, v, 10, 1, 0.0) for v in ms]
        return Comparison(meas, [[v] * blocks for v in ms], [[v] * blocks for v in ms], ms, "simulated")

    monkeypatch.setattr(targets, "compare_models", device)
    rec = Record()
    report = run_search(cfg, str(tmp_path / "run"), [rec])
    lat = report["latency"]
    assert lat["measured_ratio"] == pytest.approx(1.3)
    assert "over the 100% budget" in lat["over_budget"] and "None of the" in lat["over_budget"]
    assert lat["device_check"]["fits"] is False and lat["device_check"]["rounds"] == 2
    assert len(lat["device_check"]["measured"]) == len(lat["device_check"]["dropped_over_budget"]) >= 1


def test_tune_steps_are_validated():
    for bad in (-1, 501, 2.5, True):
        with pytest.raises(SearchError, match="tune_steps"):
            SearchConfig(model="m", tune_steps=bad).validate()
    SearchConfig(model="m", tune_steps=16).validate()


def test_a_search_with_a_short_fine_tune_per_candidate_runs_and_reports_its_time(trained_small_cnn, tmp_path):
    cfg = _config(trained_small_cnn["weights_spec"], "random", layout="prune", objective="macs", tune_steps=4)
    rec = Record()
    report = run_search(cfg, str(tmp_path / "run"), [rec])
    assert len(rec.episodes) == cfg.episodes and report["within_budget"]
    assert all(e.timings["tune_s"] > 0 for e in rec.episodes)
    again = Record()
    run_search(cfg, str(tmp_path / "again"), [again])
    assert [e.reward for e in again.episodes] == [e.reward for e in rec.episodes]  # reproducible


def test_device_check_rounds_are_validated():
    for bad in (-1, 21, 1.5, True):
        with pytest.raises(SearchError, match="device_check_rounds"):
            SearchConfig(model="m", device_check_rounds=bad).validate()
    SearchConfig(model="m", device_check_rounds=0).validate()


def test_an_unset_warmup_is_fitted_to_the_search_length(trained_small_cnn, tmp_path):
    """AMC's default warm-up (100 random episodes, of its published 400) would make the dashboard's default
    100-episode AMC search random search under AMC's name: unset, it is capped at a quarter of the episodes
    the agent gets; set, it is kept."""
    from compression.agents import schedule_config
    from compression.search.loop import CHECKPOINT, _load_checkpoint

    assert schedule_config("amc", {}, 100)[0] == {"warmup_episodes": 25}
    assert schedule_config("amc", {}, 400) == ({}, None)  # AMC's own schedule: its default stands
    assert schedule_config("amc", {"warmup_episodes": 100}, 100) == ({"warmup_episodes": 100}, None)
    assert schedule_config("galen", {}, 100)[0] == {}  # its default of 10 is already within a quarter
    assert schedule_config("random", {}, 10) == ({}, None)

    class Start(Record):
        def on_start(self, info):
            self.info = info

    # two-stage: 8 episodes are two stages of 4, each agent's warm-up capped at 1
    for agent, warmups in (("amc", [2]), ("two-stage", [1, 1])):
        objective = "macs" if agent == "amc" else "bops"
        cfg = _config(
            trained_small_cnn["weights_spec"], agent, objective=objective, episodes=8, agent_config={}
        )
        rec = Start()
        out = tmp_path / agent
        assert run_search(cfg, str(out), [rec])["status"] == "finished"
        assert [s["agent_config"]["warmup_episodes"] for s in rec.info["stages"]] == warmups
        # the checkpoint (what a resume rebuilds the agent from) carries the capped warm-up
        state = _load_checkpoint(str(out / CHECKPOINT))["agent"]
        assert state["config"]["warmup_episodes"] == warmups[-1]
