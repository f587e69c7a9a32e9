"""Benchmark 1h, learning within a search: does an agent find better policies than random search in the same
number of episodes, before any fine-tune?

Section 1 compares methods after a fine-tune on 359 test images, where a point of accuracy is three images and
the fine-tune moves single results by a point or two. This benchmark removes both: it runs only the search
(stopped when it enters finalize) and compares what each method optimises, the reward on the search set
(1000 images), episode by episode, on the same model, budget and seed. It is also where an agent's
hyper-parameters are tried: a method may carry settings, ``amc+lr_actor=0.001+updates_per_episode=100``.

Per cell (model, budget, seed, method): the best reward among the policies the method offers (meeting the budget;
for ``uniform``, only its bisection trials that fitted as proposed: the others were changed by the budget cap and are
not uniform), the episode it came in, the mean reward of the first and last quarter of the episodes and the whole
reward curve. ``uniform`` runs 15 episodes (its bisection converges in about 11). Defaults: the ``analytic`` target
with the MACs objective (no device, so tight budgets are reachable and nothing is timed); ``--target`` picks a
device target (latency objective), ``--objective`` another count.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.common import (
    Context,
    agent_config,
    bench_model,
    bench_search,
    fmt,
    log,
    mean_std,
    publish,
    table,
    write_result,
)

UNIFORM_EPISODES = 15
METHODS = ("amc", "random", "uniform")  # the MACs objective: bits buy nothing, so the pruning agents


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    """``agent[+key=value...]`` -> (agent, settings); values are read as true/false, int, float or text."""
    agent, *pairs = spec.split("+")
    settings: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"{spec!r}: settings are key=value, joined with '+'")
        value: Any = {"true": True, "false": False}.get(raw.lower(), raw)
        for kind in () if isinstance(value, bool) else (int, float):
            try:
                value = kind(raw)
                break
            except ValueError:
                pass
        settings[key] = value
    return agent, settings


def _search(
    ctx: Context,
    bm: Any,
    spec: str,
    target: str,
    objective: str,
    budget: float,
    seed: int,
    episodes: int,
    out: Path,
) -> dict[str, Any]:
    from compression.search.results import SearchConfig

    agent, settings = parse_method(spec)
    layout = "prune" if agent in ("random", "uniform") else None
    cfg = SearchConfig(
        model=bm.spec,
        agent=agent,
        target=target,
        objective=objective,
        budget=budget,
        # uniform bisects its one value in about 11 episodes, then repeats it
        episodes=min(episodes, UNIFORM_EPISODES) if agent == "uniform" else episodes,
        seed=seed,
        layout=layout,
        agent_config={**agent_config(agent, episodes), **settings},
        top_k=1,
        tune_steps=int(ctx.options.get("tune_steps_search") or 0),
        fine_tune_epochs=0,
        checkpoint_every=max(5, episodes),
    )
    # the per-layer sensitivity is computed once per model and seed
    run = bench_search(ctx, cfg, out, f"{bm.key}/{spec}/b{budget}/s{seed}", stop_at_finalize=True)
    rec = run.recorder
    rewards = [float(e.reward) for e in rec.episodes]
    q = max(1, len(rewards) // 4)
    # the best the method offers: uniform's bisection probes that the budget cap changed are not uniform
    offered = [i for i, e in enumerate(rec.episodes) if e.candidate and e.meets_budget]
    best = max(offered, key=lambda i: rewards[i]) if offered else None
    return {
        "method": spec,
        "agent": agent,
        "settings": settings,
        "agent_config": [st.get("agent_config") for st in rec.start_info.get("stages", [])],
        "original_accuracy": rec.start_info.get("original_accuracy"),  # on the search set: the ceiling
        "episodes": len(rewards),
        "best_reward": rewards[best] if best is not None else None,
        "best_episode": best,
        "best_cost_ratio": float(rec.episodes[best].cost_ratio) if best is not None else None,
        "first_quarter_mean": sum(rewards[:q]) / q if rewards else None,
        "last_quarter_mean": sum(rewards[-q:]) / q if rewards else None,
        "rewards": rewards,
        "cost_ratios": [float(e.cost_ratio) for e in rec.episodes],
        "candidates": [bool(e.candidate) for e in rec.episodes],
        "seconds": run.seconds,
        "load": run.load,
    }


def run(ctx: Context) -> dict[str, Any]:
    target = ctx.opt("target", "analytic", "analytic")
    objective = ctx.options.get("objective") or ("macs" if target == "analytic" else "latency")
    episodes = int(ctx.opt("episodes", 20, 60))
    seeds = list(range(int(ctx.opt("seeds", 1, 3))))
    budgets = ctx.opt("budgets", [0.25], [0.25, 0.1])
    methods = ctx.opt("agents", list(METHODS), list(METHODS))
    models = ctx.opt("models", ["resnet20"], ["resnet20"])
    for spec in methods:
        agent, _ = parse_method(spec)  # fail before any search on a malformed method
    result: dict[str, Any] = {
        "target": target,
        "objective": objective,
        "episodes": episodes,
        "seeds": seeds,
        "budgets": budgets,
        "methods": methods,
        "tune_steps": int(ctx.options.get("tune_steps_search") or 0),
        "models": {},
    }
    base = ctx.work_dir / "learning"
    for key in models:
        bm = bench_model(ctx, key)
        cells: dict[str, dict[str, Any]] = {}
        result["models"][key] = {"model": bm.info, "cells": cells}
        for budget in budgets:
            for seed in seeds:
                cell = cells.setdefault(f"{budget}/{seed}", {})
                for spec in methods:
                    out = base / key / target / f"b{budget}" / spec.replace("=", "-") / f"s{seed}"
                    try:
                        cell[spec] = _search(ctx, bm, spec, target, objective, budget, seed, episodes, out)
                    except Exception as exc:  # a refused budget or a bad setting: recorded, the grid goes on
                        log(ctx, f"  {key}/{spec}/b{budget}/s{seed}: {type(exc).__name__}: {exc}")
                        cell[spec] = {"method": spec, "error": f"{type(exc).__name__}: {exc}"}
                    write_result(ctx, "learning", result)
    result["summary"] = summarize_cells(result)
    publish(ctx, "learning", result, summarize)
    return result


def summarize_cells(result: dict[str, Any]) -> dict[str, Any]:
    """Per model, budget and method: best reward and last-quarter mean over seeds, and seeds ahead of random."""
    out: dict[str, Any] = {}
    for key, m in result["models"].items():
        for budget in result["budgets"]:
            rows: dict[str, Any] = {}
            for spec in result["methods"]:
                cells = [m["cells"].get(f"{budget}/{s}", {}).get(spec, {}) for s in result["seeds"]]
                rand = [m["cells"].get(f"{budget}/{s}", {}).get("random", {}) for s in result["seeds"]]
                ok = [(c, r) for c, r in zip(cells, rand, strict=True) if "best_reward" in c]
                rows[spec] = {
                    "best_reward": mean_std(c["best_reward"] for c, _ in ok),
                    "last_quarter_mean": mean_std(c["last_quarter_mean"] for c, _ in ok),
                    "best_episode": [c["best_episode"] for c, _ in ok],
                    "ahead_of_random": sum(
                        1 for c, r in ok if "best_reward" in r and c["best_reward"] > r["best_reward"]
                    ),
                    "seeds": len(ok),
                    "errors": [c["error"] for c in cells if "error" in c],
                }
            out[f"{key}/{budget}"] = rows
    return out


def summarize(result: dict[str, Any]) -> str:
    summary = result.get("summary") or summarize_cells(result)
    lines = [
        f"learning within a search: {result['target']} ({result['objective']}), {result['episodes']} episodes, "
        f"seeds {result['seeds']}"
    ]
    for name, rows in summary.items():
        body = []
        for spec, r in rows.items():
            b, last = r["best_reward"], r["last_quarter_mean"]
            body.append(
                [
                    spec,
                    f"{fmt(b.get('mean'), '.4f')} ± {fmt(b.get('std'), '.4f')}",
                    f"{fmt(last.get('mean'), '.4f')} ± {fmt(last.get('std'), '.4f')}",
                    " / ".join(str(e) for e in r["best_episode"]),
                    f"{r['ahead_of_random']}/{r['seeds']}" if spec != "random" else "",
                    "; ".join(r["errors"])[:80],
                ]
            )
        lines.append(f"\n{name}")
        lines.append(
            table(
                [
                    "method",
                    "best reward",
                    "last-quarter mean",
                    "best at episode",
                    "ahead of random",
                    "errors",
                ],
                body,
            )
        )
    return "\n".join(lines)
