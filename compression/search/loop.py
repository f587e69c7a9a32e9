"""The search loop: episodes, checkpoints and resume, then the finalize phase (fine-tune, test, export).

``run_search(config, out_dir, callbacks)`` is what the CLI and the Celery task both call. Files in ``out_dir``:

- ``episodes.jsonl``: one ``EpisodeResult`` per line, in episode order (the record of the search);
- ``checkpoint.pt``: agent (networks, optimisers, replay buffer, noise, RNG), episode count, best so far;
  written every ``checkpoint_every`` episodes, atomically, loadable with ``weights_only=True``;
- ``best_policy.json``, ``report.json``, ``model.pt2``, ``model.onnx`` (+ ``model.int8.onnx``) at the end;
- ``sensitivity.json``: the per-layer sensitivity features (computed once, reused on resume).

Resume: with a checkpoint present, the agent and counters are restored and ``episodes.jsonl`` is cut back
to the checkpoint; the episodes after it are played again, and because every source of randomness is in
the checkpoint they are the same episodes an uninterrupted run would have played.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from compression.errors import SearchError
from compression.memory import release_freed_memory
from compression.policy import Policy
from compression.search.env import CompressionEnvironment, EnvSettings, layer_sensitivity, tune_tensors
from compression.search.results import EpisodeResult, SearchCallback, SearchConfig

log = logging.getLogger("compression.search")

CHECKPOINT = "checkpoint.pt"
EPISODES = "episodes.jsonl"
CHECKPOINT_FORMAT = 1


@dataclass
class Stage:
    """One phase of a search: an agent over an action layout, for a number of episodes."""

    name: str
    agent: str
    layout: str
    episodes: int
    budget: float


def plan_stages(config: SearchConfig) -> list[Stage]:
    """The stages of a run: one for every agent, two for ``two-stage`` (prune, then quantize)."""
    from compression.agents import agent_class

    if config.agent == "two-stage":
        first = max(1, config.episodes // 2)
        prune_budget = float(config.agent_config.get("prune_budget", config.budget**0.5))
        return [
            Stage(
                "prune",
                str(config.agent_config.get("prune_agent", "amc")),
                "prune",
                first,
                max(prune_budget, config.budget),
            ),
            Stage(
                "quantize",
                str(config.agent_config.get("quant_agent", "haq")),
                "bits",
                config.episodes - first,
                config.budget,
            ),
        ]
    cls = agent_class(config.agent)
    layout = config.layout or (cls.layouts[0] if cls.layouts and len(cls.layouts) == 1 else "joint")
    if cls.layouts is not None and layout not in cls.layouts:
        raise SearchError(f"agent {config.agent} cannot decide {layout} actions", f"use one of {cls.layouts}")
    return [Stage("search", config.agent, layout, config.episodes, config.budget)]


def _agent_config(config: SearchConfig, stage: Stage) -> dict[str, Any]:
    if config.agent != "two-stage":
        return dict(config.agent_config)
    prefix = "prune_" if stage.layout == "prune" else "quant_"
    return {
        k[len(prefix) :]: v
        for k, v in config.agent_config.items()
        if k.startswith(prefix) and k not in ("prune_agent", "quant_agent", "prune_budget")
    }


def _stage_agent_config(config: SearchConfig, stage: Stage) -> tuple[dict[str, Any], str | None]:
    """The settings the stage's agent is built with: the user's, its warm-up fitted to the stage's length
    (``agents.schedule_config``), and the log's note when that changed it."""
    from compression.agents import schedule_config

    return schedule_config(stage.agent, _agent_config(config, stage), stage.episodes)


def _enforce(config: SearchConfig) -> bool:
    if config.enforce_budget is not None:
        return bool(config.enforce_budget)
    return config.reward in ("acc", "haq")


class _Emit:
    """Fan a call out to every callback."""

    def __init__(self, callbacks: Sequence[SearchCallback]) -> None:
        self.callbacks = list(callbacks)

    def __getattr__(self, name: str):
        def call(*args, **kwargs):
            for cb in self.callbacks:
                getattr(cb, name)(*args, **kwargs)

        return call

    def should_stop(self) -> bool:
        return any(cb.should_stop() for cb in self.callbacks)


def _save_checkpoint(path: str, state: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(buf.getvalue())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# Settings added after checkpoints of this format were written, with the value that reproduces how a search ran
# before them: a run checkpointed by an older version resumes exactly as it ran (its stored configuration, in
# config.json or the database, lacks the key and would otherwise get today's default and be refused).
ADDED_SETTINGS: dict[str, Any] = {
    "float_bits": False,
    "reconstruct": False,
    "free_precision": False,
    "train_top_up": False,
    "free_precision_groups": False,
    "tune_steps": 0,
    "fine_tune_augment": True,
}


def as_checkpointed(config: SearchConfig, stored: dict[str, Any]) -> SearchConfig:
    """``config`` as the checkpoint's search ran it (``ADDED_SETTINGS`` it predates take their old values), or a
    SearchError when the checkpoint belongs to another configuration."""
    # missing (an older version wrote it) or at the old value (a checkpoint written by an earlier resume of such a
    # run, whose stored settings still lack the key): the run goes on as it ran
    old = {k: v for k, v in ADDED_SETTINGS.items() if stored.get(k, v) == v}
    resumed = replace(config, **old) if old else config
    if {**stored, **old} != resumed.to_dict():
        raise SearchError(
            "the checkpoint in this directory belongs to a different search configuration",
            "resume with the same settings, or use a new output directory",
        )
    off = sorted(k for k in old if getattr(config, k) != old[k])
    if off:
        log.warning("resuming a search that ran without %s: it continues without them", ", ".join(off))
    return resumed


def _load_checkpoint(path: str) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise SearchError(
            f"checkpoint {path} cannot be read: {exc}", "delete it to start the search over"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise SearchError(f"{path} is not a search checkpoint of this version", "delete it to start over")
    return state


def _read_episodes(path: str, upto: int | None = None) -> list[EpisodeResult]:
    out = []
    if not os.path.exists(path):
        return out
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                ep = EpisodeResult.from_dict(json.loads(line))
            except (json.JSONDecodeError, TypeError):
                break  # a torn last line from a crash
            if upto is not None and ep.episode > upto:
                break
            out.append(ep)
    return out


def _rewrite_episodes(path: str, episodes: list[EpisodeResult]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for ep in episodes:
            f.write(json.dumps(ep.to_dict()) + "\n")
    os.replace(tmp, path)


class SearchRun:
    """A search in progress: the workspace, the environment(s), the agent, the record of episodes."""

    def __init__(self, config: SearchConfig, out_dir: str, callbacks: Sequence[SearchCallback] = ()) -> None:
        config.validate()
        self.config = config
        self.out_dir = out_dir
        os.makedirs(out_dir, exist_ok=True)
        self.emit = _Emit(callbacks)
        self.stages = plan_stages(config)
        from compression.pipeline import open_workspace
        from compression.search.latency import build_latency_model
        from compression.targets import get_target

        self.target = get_target(config.target)
        self.round_to = int(config.round_to or getattr(self.target, "round_to", 1) or 1)
        t0 = time.perf_counter()
        self.ws = open_workspace(
            config.model, config.dataset, seed=config.seed, input_shape=config.input_shape
        )
        self.val, self.search_set_sizes = self.ws.search_set(
            config.val_samples, config.calib_samples, config.seed, top_up=config.train_top_up
        )
        self.calib = self.ws.calibration_batch(config.calib_samples, seed=config.seed)
        # with tune_steps, the original's outputs on the tune set are computed here once and shared by every
        # environment this run builds (two per stage, and one per later stage's reachability check)
        self.tune_set = None
        if config.tune_steps > 0:
            tune = self.ws.tune_set(
                config.val_samples, config.calib_samples, config.seed, top_up=config.train_top_up
            )
            self.tune_set = (
                torch.utils.data.TensorDataset(*tune_tensors(self.ws.graph.module, tune))
                if len(tune)
                else tune
            )
        self.latency = build_latency_model(
            self.target,
            self.ws.graph,
            self.ws.artifact,
            round_to=self.round_to,
            quantized=any(st.layout != "prune" for st in self.stages),
            progress=self._progress("latency table"),
        )
        if config.objective == "latency" and self.latency is None:
            raise SearchError(
                f"target {self.target.name} does not measure latency",
                "pick a hardware target, or the macs/bops/bytes objective",
            )
        from compression.training import evaluate

        self.original_accuracy = evaluate(self.ws.artifact.module, self.val).top1
        self.setup_s = time.perf_counter() - t0

    def _progress(self, what: str):
        def fn(done: int, total: int, stats: dict) -> None:
            if done == total or done % max(1, total // 10) == 0:
                log.info("%s: %d/%d", what, done, total)

        return fn

    def _sensitivity(self, layout: str, steps: list[str]) -> dict[str, list[float]]:
        path = os.path.join(self.out_dir, f"sensitivity-{layout}.json")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            if set(data) >= set(steps):
                return data
        sens, _ = layer_sensitivity(
            self.ws.graph,
            self.val,
            self.calib,
            steps,
            layout,
            round_to=self.round_to,
            progress=self._progress("sensitivity"),
            reconstruct=self.config.reconstruct,
        )
        with open(path, "w", encoding="utf-8") as f:
            json.dump(sens, f)
        return sens

    def check_stage_budgets(self) -> None:
        """Refuse a multi-stage run whose later stage cannot reach its budget even after the most pruning
        the first stage may do: found before the first stage runs, not after it (e.g. quantization on a
        runtime that computes in float, where bits cost latency instead of saving it)."""
        from compression.policy import LayerPolicy

        if len(self.stages) < 2 or not _enforce(self.config):
            return
        graph = self.ws.graph
        most = None
        if self.stages[0].layout == "prune":
            most = Policy(
                layers={n: LayerPolicy(keep_ratio=self.config.min_keep) for n in graph.prunable_leaders}
            )
        for stage in self.stages[1:]:
            try:
                CompressionEnvironment(
                    graph,
                    self.val,
                    self.calib,
                    self._settings(stage),
                    latency=self.latency,
                    base_policy=most,
                    original_accuracy=self.original_accuracy,
                    tune_set=self.tune_set,
                )
            except SearchError as exc:
                raise SearchError(
                    f"the {stage.name} stage ({stage.agent}, {stage.layout} actions) cannot reach its budget even "
                    f"after the most pruning the first stage may do: {exc.what}",
                    exc.hint,
                ) from exc

    def _settings(self, stage: Stage) -> EnvSettings:
        c = self.config
        return EnvSettings(
            layout=stage.layout,
            objective=c.objective,
            budget=stage.budget,
            reward=c.reward,
            reward_params=dict(c.reward_params),
            enforce_budget=_enforce(c),
            budget_mode=c.budget_mode,
            round_to=self.round_to,
            min_keep=c.min_keep,
            min_bits=c.min_bits,
            max_bits=c.max_bits,
            float_bits=c.float_bits,
            free_precision=c.free_precision,
            free_precision_groups=c.free_precision_groups,
            reconstruct=c.reconstruct,
            tune_steps=c.tune_steps,
            val_samples=c.val_samples,
            calib_samples=c.calib_samples,
            seed=c.seed,
        )

    def make_env(self, stage: Stage, base_policy: Policy | None) -> CompressionEnvironment:
        settings = self._settings(stage)
        env = CompressionEnvironment(
            self.ws.graph,
            self.val,
            self.calib,
            settings,
            latency=self.latency,
            base_policy=base_policy,
            original_accuracy=self.original_accuracy,
            tune_set=self.tune_set,
        )
        sens = self._sensitivity(stage.layout, env.steps)
        return CompressionEnvironment(
            self.ws.graph,
            self.val,
            self.calib,
            settings,
            latency=self.latency,
            base_policy=base_policy,
            sensitivity={k: sens[k] for k in env.steps},
            original_accuracy=self.original_accuracy,
            tune_set=self.tune_set,
        )

    def start_info(self) -> dict[str, Any]:
        g = self.ws.graph
        return {
            "model": self.config.model,
            "dataset": self.config.dataset,
            "target": self.target.name,
            "round_to": self.round_to,
            "layers": g.layer_names,
            "prunable": g.prunable_leaders,
            "original_accuracy": self.original_accuracy,
            "search_set": dict(self.search_set_sizes),
            "original_costs": self._original_costs(),
            # each stage with the settings its agent is built with (the warm-up fitted to the stage's length)
            "stages": [
                {**s.__dict__, "agent_config": _stage_agent_config(self.config, s)[0]} for s in self.stages
            ],
            "setup_s": self.setup_s,
            "warnings": self.ws.warnings,
        }

    def _original_costs(self) -> dict[str, Any]:
        from compression.costs import compute_costs

        c = compute_costs(self.ws.graph, None).to_dict()
        if self.latency is not None:
            c["latency_ms"] = self.latency.total(compute_costs(self.ws.graph, None))
        return c


def run_search(
    config: SearchConfig,
    out_dir: str,
    callbacks: Sequence[SearchCallback] = (),
    resume: bool = True,
) -> dict[str, Any]:
    """Run (or resume) a search and its finalize phase; return the report (see the module docstring).

    Returns ``{"status": "cancelled", ...}`` when a callback asked to stop; the checkpoint then allows a
    resume. Raises CompressionError subclasses for bad input (model, dataset, target, settings).
    """
    from compression.agents import make_agent, restore_agent

    ckpt_path = os.path.join(out_dir, CHECKPOINT)
    ep_path = os.path.join(out_dir, EPISODES)
    state = _load_checkpoint(ckpt_path) if resume and os.path.exists(ckpt_path) else None
    if state is not None:
        config = as_checkpointed(config, json.loads(state["config"]))
    run = SearchRun(config, out_dir, callbacks)
    emit = run.emit
    done = int(state["episodes_done"]) if state else 0
    episodes = _read_episodes(ep_path, upto=done) if state else []
    if len(episodes) != done:
        raise SearchError(
            f"episodes.jsonl holds {len(episodes)} episodes but the checkpoint says {done}",
            "the run directory is damaged; start a new search",
        )
    _rewrite_episodes(ep_path, episodes)
    emit.on_start({**run.start_info(), "resumed_from": done})
    emit.on_phase("search", {"episodes_done": done, "episodes_total": config.episodes})

    if state is None:
        run.check_stage_budgets()
    stage_idx = int(state["stage"]) if state else 0
    stage_base = Policy.from_json(state["base_policy"]) if state and state.get("base_policy") else None
    agent = None
    if state is not None:
        agent = restore_agent(state["agent"])
    offset = sum(s.episodes for s in run.stages[:stage_idx])
    cancelled = False
    t_search = time.perf_counter()
    while stage_idx < len(run.stages):
        stage = run.stages[stage_idx]
        env = run.make_env(stage, stage_base)
        if agent is None:
            agent_cfg, note = _stage_agent_config(config, stage)
            if note:
                log.info("stage %s: %s", stage.name, note)
            agent = make_agent(stage.agent, env.spec, agent_cfg, seed=config.seed + stage_idx)
        env.apply_options(agent.env_options())
        if agent.wants_start_action and hasattr(env, "uniform_action"):
            start = env.uniform_action()  # costs only: milliseconds
            if start is not None:
                agent.set_start_action(start)
                log.info(
                    "stage %s: the first episode plays the uniform policy that fits the budget", stage.name
                )
        stage_end = offset + stage.episodes
        best_reward = max(
            (e.reward for e in episodes if e.stage == stage.name and e.meets_budget and e.candidate),
            default=None,
        )
        while done < stage_end:
            if emit.should_stop():
                cancelled = True
                break
            result, stage_ok = _play(env, agent, done + 1, stage.name, config.budget)
            if stage_ok and result.candidate and (best_reward is None or result.reward > best_reward):
                best_reward = result.reward
                result.is_best = True
            episodes.append(result)
            with open(ep_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(result.to_dict()) + "\n")
            done += 1
            release_freed_memory()  # each episode's pruned copy leaves fragmented heap behind (memory.py)
            emit.on_episode(result)
            if done % config.checkpoint_every == 0 or done == stage_end:
                _save_checkpoint(ckpt_path, _state(config, stage_idx, done, agent, stage_base))
                emit.on_checkpoint(done, ckpt_path)
        if cancelled:
            break
        # next stage: the best policy of this one is its base (two-stage: prune, then quantize)
        stage_eps = [
            e
            for e in episodes
            if e.stage == stage.name and e.candidate and e.cost_ratio <= stage.budget * (1 + 1e-6)
        ]
        best = max(stage_eps, key=lambda e: e.reward) if stage_eps else None
        stage_base = Policy.from_dict(best.policy) if best is not None else stage_base
        stage_idx += 1
        offset = stage_end
        agent = None
        if stage_idx < len(run.stages):
            _save_checkpoint(ckpt_path, _state(config, stage_idx, done, None, stage_base))
    search_s = time.perf_counter() - t_search
    if cancelled:
        _save_checkpoint(ckpt_path, _state(config, stage_idx, done, agent, stage_base))
        summary = {"status": "cancelled", "episodes_done": done, "episodes_total": config.episodes}
        emit.on_finish(summary)
        return summary

    from compression.search.finalize import Cancelled, finalize

    try:
        report = finalize(run, episodes, search_s=search_s)
    except Cancelled:
        summary = {
            "status": "cancelled",
            "episodes_done": done,
            "episodes_total": config.episodes,
            "phase": "finalize",
        }
        emit.on_finish(summary)
        return summary
    report["status"] = "finished"
    emit.on_finish(report)
    return report


def _state(config: SearchConfig, stage: int, done: int, agent, base: Policy | None) -> dict[str, Any]:
    return {
        "format": CHECKPOINT_FORMAT,
        "config": json.dumps(config.to_dict()),
        "stage": stage,
        "episodes_done": done,
        "agent": agent.state_dict() if agent is not None else None,
        "base_policy": base.to_json() if base is not None else None,
        "saved_at": time.time(),
    }


def _play(
    env: CompressionEnvironment, agent, number: int, stage: str, budget: float
) -> tuple[EpisodeResult, bool]:
    """One episode of the agent in the environment, timed; also whether it met its stage's budget.

    ``meets_budget`` of the result is against the run's budget (a two-stage run's pruning stage has a
    looser budget of its own).
    """
    t0 = time.perf_counter()
    t_agent = 0.0
    obs = env.reset()
    done = False
    reward, info = 0.0, {}
    while not done:
        ta = time.perf_counter()
        action = agent.act(obs)
        t_agent += time.perf_counter() - ta
        next_obs, reward, done, info = env.step(action)
        ta = time.perf_counter()
        agent.observe(obs, np.asarray(info["action"], dtype=np.float64), next_obs, done)
        t_agent += time.perf_counter() - ta
        obs = next_obs
    ta = time.perf_counter()
    stats = agent.end_episode(float(reward), info)
    t_agent += time.perf_counter() - ta
    m = info["metrics"]
    wall = time.perf_counter() - t0
    timings = dict(m["timings"])
    timings["agent_s"] = t_agent
    timings["env_s"] = wall - t_agent - sum(v for k, v in m["timings"].items())
    result = EpisodeResult(
        episode=number,
        reward=float(reward),
        accuracy=float(m["accuracy"]),
        latency_ms=m["latency_ms"],
        macs=int(m["macs"]),
        bops=int(m["bops"]),
        params=int(m["params"]),
        bytes=float(m["bytes"]),
        cost_ratio=float(m["cost_ratio"]),
        meets_budget=bool(m["cost_ratio"] <= budget * (1 + 1e-6)),
        policy=info["policy"].to_dict(),
        raw_actions=info["raw_actions"],
        enforced_actions=info["enforced_actions"],
        wall_time_s=wall,
        timings=timings,
        stage=stage,
        candidate=bool((stats or {}).get("candidate", True)),
    )
    return result, bool(m["meets_budget"])
