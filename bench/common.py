"""What the benchmarks share: paths, the run context, machine facts, load average, progress lines, the
trained models every benchmark uses, search helpers and statistics.

Timing on a shared machine: every timing result is stored with the load average sampled while it was
taken (``LoadSampler``), and comparisons are made side by side in one run rather than against numbers
from another day.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compression.search.results import SearchCallback

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "var" / "bench"
RESULTS = ROOT / "bench" / "results"

# The DDPG agents' default warm-up (100 random episodes for AMC) is longer than a benchmark's whole
# search; scaling it to a quarter of the episodes keeps AMC's 1:3 warm-up:learning proportion.
DDPG_AGENTS = ("amc", "haq", "galen", "galen-pq", "ajpq")


@dataclass
class Context:
    """One invocation of ``bench/run.py``: mode, threads, where files go, options from the command line."""

    quick: bool = True
    threads: int = 2
    results_dir: Path = RESULTS
    work_dir: Path = WORK
    options: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    def opt(self, name: str, quick: Any, full: Any) -> Any:
        """A command-line override if given, else the quick or full default."""
        v = self.options.get(name)
        if v is not None:
            return v
        return quick if self.quick else full

    @property
    def mode(self) -> str:
        return "quick" if self.quick else "full"


def log(ctx: Context | None, message: str) -> None:
    """A progress line: wall clock, minutes since start, 1-minute load average, message."""
    elapsed = (time.monotonic() - ctx.started) / 60 if ctx else 0.0
    load1 = os.getloadavg()[0]
    print(f"[{time.strftime('%H:%M:%S')} +{elapsed:5.1f}m load {load1:5.2f}] {message}", flush=True)


def load_average() -> dict[str, float]:
    """The 1-, 5- and 15-minute load averages right now."""
    a, b, c = os.getloadavg()
    return {"load1": round(a, 2), "load5": round(b, 2), "load15": round(c, 2)}


class LoadSampler:
    """Samples the 1-minute load average in the background while a measurement runs.

    Use as a context manager; ``summary()`` gives min/mean/max of the samples plus the load at start and
    end, which is what a timing result is reported with.
    """

    def __init__(self, every_s: float = 5.0) -> None:
        self.every_s = every_s
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.start: dict[str, float] = {}
        self.end: dict[str, float] = {}

    def __enter__(self) -> LoadSampler:
        self.start = load_average()
        self.samples.append(self.start["load1"])
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self.samples.append(os.getloadavg()[0])

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.end = load_average()
        self.samples.append(self.end["load1"])

    def summary(self) -> dict[str, Any]:
        """Load during the measurement: start/end averages and min/mean/max of the 1-minute samples."""
        s = self.samples or [os.getloadavg()[0]]
        return {
            "start": self.start,
            "end": self.end or load_average(),
            "load1_min": round(min(s), 2),
            "load1_mean": round(sum(s) / len(s), 2),
            "load1_max": round(max(s), 2),
            "samples": len(s),
        }


def set_threads(n: int) -> None:
    """Pin torch's intra-op threads (and inter-op where still allowed) to ``n``."""
    import torch

    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:  # only settable before the first parallel work; intra-op is what matters here
        pass


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or platform's guess elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(ctx: Context) -> dict[str, Any]:
    """CPU, cores, memory, load, library versions and thread settings: stored with every result file."""
    import torch

    from compression.pipeline import versions

    mem_total = None
    try:
        import psutil

        mem_total = psutil.virtual_memory().total
    except ImportError:
        pass
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_bytes": mem_total,
        "platform": platform.platform(),
        "load": load_average(),
        "torch_threads": torch.get_num_threads(),
        "bench_threads": ctx.threads,
        "versions": versions(),
        "cache_dir": os.environ.get("COMPRESSION_CACHE_DIR"),
    }


def write_result(ctx: Context, name: str, data: dict[str, Any]) -> Path:
    """Write ``bench/results/<name>[-quick].json`` with the machine facts; returns the path."""
    ctx.results_dir.mkdir(parents=True, exist_ok=True)
    path = ctx.results_dir / f"{name}{'-quick' if ctx.quick else ''}.json"
    payload = {
        "benchmark": name,
        "mode": ctx.mode,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": machine_info(ctx),
        **data,
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=_json_default), encoding="utf-8")
    os.replace(tmp, path)
    return path


def publish(
    ctx: Context, name: str, data: dict[str, Any], summarize: Callable[[dict[str, Any]], str]
) -> Path:
    """Write the result (``write_result``), print its tables (``summarize``) and log where it went."""
    path = write_result(ctx, name, data)
    print(summarize(data))
    log(ctx, f"wrote {path}")
    return path


def _json_default(o: Any) -> Any:
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


# ---------------------------------------------------------------------------------------------- statistics
def mean_std(values: Iterable[float | None]) -> dict[str, Any]:
    """Mean, sample standard deviation, min, max and count of the non-missing values."""
    v = [float(x) for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not v:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {
        "mean": statistics.fmean(v),
        "std": statistics.stdev(v) if len(v) > 1 else 0.0,
        "min": min(v),
        "max": max(v),
        "n": len(v),
    }


def rank_correlations(a: Sequence[float], b: Sequence[float]) -> dict[str, float | None]:
    """Spearman's rho and Kendall's tau-b between two score lists (None when undefined)."""
    from scipy.stats import kendalltau, spearmanr

    if len(a) < 3 or len(set(a)) < 2 or len(set(b)) < 2:
        return {"spearman": None, "kendall": None}
    rho = spearmanr(a, b).statistic
    tau = kendalltau(a, b).statistic
    return {"spearman": float(rho), "kendall": float(tau)}


def random_pools(n: int, size: int, draws: int, seed: int = 0) -> list[Any]:
    """``draws`` random pools of ``size`` out of ``n`` candidates, each as sorted indices (a search that saw those
    candidates in that order keeps the first of equal scores)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [np.sort(rng.choice(n, size=min(size, n), replace=False)) for _ in range(draws)]


def picked(score: Sequence[float], outcome: Sequence[float], pools: Sequence[Any]) -> float:
    """The mean ``outcome`` of the candidate ``score`` ranks first in each pool (ties go to the earlier one):
    what a search that picks by ``score`` ends with."""
    import numpy as np

    s, o = np.asarray(score), np.asarray(outcome)
    return float(np.mean([o[p[int(np.argmax(s[p]))]] for p in pools]))


def fmt(value: float | None, spec: str = ".3f", none: str = "n/a") -> str:
    """Format a number for a table cell, or ``none`` when missing."""
    return none if value is None else format(value, spec)


def fmt_ms(stat: dict[str, Any], spec: str = ".3f") -> str:
    """``mean ± std`` of a ``mean_std`` dict."""
    if not stat or stat.get("mean") is None:
        return "n/a"
    return f"{stat['mean']:{spec}} ± {stat['std']:{spec}}"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (also readable in a terminal)."""
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------- models
@dataclass
class BenchModel:
    """A trained model the benchmarks use: its ``.pt2`` spec, the training facts, a rebuildable module."""

    key: str
    spec: str  # what SearchConfig.model takes (a .pt2 path)
    input_shape: tuple[int, int, int]
    info: dict[str, Any]


RESNET20_EPOCHS = 12
DWNET_EPOCHS = 12
INPUT_SHAPE = (1, 32, 32)


def resnet20_digits(ctx: Context) -> BenchModel:
    """ResNet-20 trained on digits at 1x32x32 (``train_baseline``), trained once and cached in var/bench."""
    from compression.pipeline import train_baseline

    models = ctx.work_dir / "models"
    models.mkdir(parents=True, exist_ok=True)
    stem = f"resnet20-digits-1x32x32-e{RESNET20_EPOCHS}-s0"
    path, facts = models / f"{stem}.pt2", models / f"{stem}.json"
    if not (path.exists() and facts.exists()):
        log(ctx, f"training ResNet-20 on digits for {RESNET20_EPOCHS} epochs (cached afterwards in {models})")
        r = train_baseline(
            "resnet20",
            "digits",
            str(path),
            epochs=RESNET20_EPOCHS,
            input_shape=INPUT_SHAPE,
            seed=0,
            progress=_epoch_progress(ctx, "resnet20"),
        )
        r.pop("history", None)
        facts.write_text(json.dumps(r, indent=1), encoding="utf-8")
    info = json.loads(facts.read_text(encoding="utf-8"))
    return BenchModel("resnet20", str(path), INPUT_SHAPE, info)


def _epoch_progress(ctx: Context, what: str):
    state = {"epoch": 0}

    def fn(done: int, total: int, stats: dict) -> None:
        if stats.get("epoch") != state["epoch"]:
            state["epoch"] = stats.get("epoch")
            log(ctx, f"{what}: epoch {state['epoch']} (step {done}/{total}, loss {stats.get('loss', 0):.3f})")

    return fn


def build_dwnet(num_classes: int = 10, in_channels: int = 1, width: int = 16):
    """A small MobileNet-like network: a stem, depthwise-separable blocks (depthwise 3x3 + BN + ReLU, then
    pointwise 1x1 + BN + ReLU), strides 2 at 32->16->8, global pooling, a linear head.

    It is the benchmark's "different shape" model (depthwise convolutions, no residuals), written here so
    that it reaches the engine as a ``torch.export`` ``.pt2`` like any user upload.
    """
    from torch import nn

    def dw_sep(cin: int, cout: int, stride: int) -> list[nn.Module]:
        return [
            nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False),
            nn.BatchNorm2d(cin),
            nn.ReLU(inplace=True),
            nn.Conv2d(cin, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        ]

    w = width
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, w * 2, 3, 1, 1, bias=False),
        nn.BatchNorm2d(w * 2),
        nn.ReLU(inplace=True),
    ]
    for cin, cout, stride in ((2 * w, 4 * w, 1), (4 * w, 8 * w, 2), (8 * w, 8 * w, 1), (8 * w, 16 * w, 2)):
        layers += dw_sep(cin, cout, stride)
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16 * w, num_classes)]
    return nn.Sequential(*layers)


def dwnet_digits(ctx: Context) -> BenchModel:
    """The depthwise network trained on digits and saved as a ``.pt2`` (torch.export.save), cached."""
    import torch

    from compression.data import load_dataset
    from compression.pipeline import save_pt2
    from compression.training import evaluate, train

    models = ctx.work_dir / "models"
    models.mkdir(parents=True, exist_ok=True)
    stem = f"dwnet-digits-1x32x32-e{DWNET_EPOCHS}-s0"
    path, facts = models / f"{stem}.pt2", models / f"{stem}.json"
    if not (path.exists() and facts.exists()):
        log(ctx, f"training the depthwise net on digits for {DWNET_EPOCHS} epochs (cached in {models})")
        data = load_dataset("digits", input_shape=INPUT_SHAPE, seed=0)
        torch.manual_seed(0)
        model = build_dwnet(data.num_classes, INPUT_SHAPE[0])
        t0 = time.perf_counter()
        train(model, data.train, epochs=DWNET_EPOCHS, seed=0, progress=_epoch_progress(ctx, "dwnet"))
        seconds = time.perf_counter() - t0
        val, test = evaluate(model, data.val), evaluate(model, data.test)
        meta = {
            "arch": "dwnet (bench/common.py build_dwnet)",
            "dataset": "digits",
            "input_shape": list(INPUT_SHAPE),
            "num_classes": data.num_classes,
            "class_names": list(data.class_names),
            "mean": list(data.mean),
            "std": list(data.std),
            "seed": 0,
            "val_top1": val.top1,
            "test_top1": test.top1,
        }
        saved = save_pt2(model, torch.zeros((1, *INPUT_SHAPE)), str(path), meta)
        info = {
            "model": str(path),
            "arch": "dwnet",
            "epochs": DWNET_EPOCHS,
            "train_seconds": seconds,
            "val": val.to_dict(),
            "test": test.to_dict(),
            "file_bytes": saved["bytes"],
            "params": sum(p.numel() for p in model.parameters()),
        }
        facts.write_text(json.dumps(info, indent=1), encoding="utf-8")
    info = json.loads(facts.read_text(encoding="utf-8"))
    return BenchModel("dwnet", str(path), INPUT_SHAPE, info)


BENCH_MODELS = {"resnet20": resnet20_digits, "dwnet": dwnet_digits}  # the benchmarks' models, by name


def bench_model(ctx: Context, key: str) -> BenchModel:
    """One of the benchmarks' own models by name (``--models``/``--model``), trained and cached on first use."""
    if key not in BENCH_MODELS:
        raise ValueError(f"unknown benchmark model {key!r}: choose from {', '.join(BENCH_MODELS)}")
    return BENCH_MODELS[key](ctx)


# ---------------------------------------------------------------------------------------------- searches
def agent_config(agent: str, episodes: int) -> dict[str, Any]:
    """Hyper-parameters for a benchmark search of ``episodes`` episodes: the DDPG warm-up set to a quarter of
    the episodes (for two-stage: of each stage), everything else at the agent's defaults. (The engine caps an
    unset warm-up at a quarter too, ``agents.schedule_config``, but keeps smaller defaults such as Galen's 10;
    the benchmarks set it explicitly so every DDPG agent gets the same share, as in earlier sessions' results.)"""
    from compression.agents import WARMUP_SHARE

    if agent in DDPG_AGENTS:
        return {"warmup_episodes": max(1, int(episodes * WARMUP_SHARE))}
    if agent == "two-stage":
        half = max(1, episodes // 2)
        w = max(1, int(half * WARMUP_SHARE))
        return {"prune_warmup_episodes": w, "quant_warmup_episodes": w}
    return {}


class Recorder(SearchCallback):
    """A search callback that keeps every episode and the phase times, and can stop at the finalize phase.

    ``stop_at_finalize``: the benchmark only wants the search (throughput, memory): the loop is asked to
    stop when it enters ``finalize``, so no fine-tuning or export runs.
    """

    def __init__(self, ctx: Context | None = None, label: str = "", stop_at_finalize: bool = False) -> None:
        self.ctx = ctx
        self.label = label
        self.stop_at_finalize = stop_at_finalize
        self.episodes: list[Any] = []
        self.start_info: dict[str, Any] = {}
        self.phases: list[tuple[str, float]] = []
        self.t0 = time.perf_counter()
        self.t_start: float | None = None
        self.t_first_episode: float | None = None
        self.t_last_episode: float | None = None
        self._stop = False
        self._every = 1

    def on_start(self, info: dict[str, Any]) -> None:
        self.start_info = info
        self.t_start = time.perf_counter()

    def on_episode(self, result: Any) -> None:
        now = time.perf_counter()
        if self.t_first_episode is None:
            self.t_first_episode = now
        self.t_last_episode = now
        self.episodes.append(result)
        n = len(self.episodes)
        if self.ctx is not None and (n == 1 or n % max(1, self._every) == 0):
            log(
                self.ctx,
                f"  {self.label} episode {result.episode}: reward {result.reward:.4f} acc {result.accuracy:.3f} "
                f"cost {result.cost_ratio:.3f} ({result.wall_time_s:.1f} s)",
            )
            self._every = 5 if n >= 5 else 1

    def on_phase(self, phase: str, info: dict[str, Any]) -> None:
        self.phases.append((phase, time.perf_counter()))
        if phase == "finalize" and self.stop_at_finalize:
            self._stop = True

    def should_stop(self) -> bool:
        return self._stop


def sensitivity_key(config: Any) -> str:
    """What the per-layer sensitivity of a search depends on (model, data, seed, rounding, sample counts)."""
    parts = [
        config.model,
        config.dataset,
        str(config.input_shape),
        str(config.seed),
        str(config.round_to),
        str(config.val_samples),
        str(config.calib_samples),
        config.target,
    ]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def seed_sensitivity(ctx: Context, config: Any, out_dir: Path) -> None:
    """Copy cached ``sensitivity-<layout>.json`` files into a fresh run directory.

    The search computes them per run directory; they depend only on ``sensitivity_key``, so the quality
    benchmark computes them once per model/seed instead of once per method (their cost is measured by the
    throughput benchmark).
    """
    cache = ctx.work_dir / "sensitivity" / sensitivity_key(config)
    if cache.is_dir():
        out_dir.mkdir(parents=True, exist_ok=True)
        for f in cache.glob("sensitivity-*.json"):
            shutil.copy(f, out_dir / f.name)


def keep_sensitivity(ctx: Context, config: Any, out_dir: Path) -> None:
    """Store a run directory's sensitivity files for ``seed_sensitivity``."""
    cache = ctx.work_dir / "sensitivity" / sensitivity_key(config)
    cache.mkdir(parents=True, exist_ok=True)
    for f in Path(out_dir).glob("sensitivity-*.json"):
        if not (cache / f.name).exists():
            shutil.copy(f, cache / f.name)


def fresh_dir(path: Path) -> Path:
    """An empty directory at ``path`` (a previous run's files removed)."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


@dataclass
class BenchSearch:
    """What ``bench_search`` returns: the search's report (None when it stopped at finalize), the recorder with
    every episode and phase, the wall time and the load average while it ran."""

    report: dict[str, Any] | None
    recorder: Recorder
    seconds: float
    load: dict[str, Any]


def bench_search(
    ctx: Context | None,
    config: Any,
    out: Path,
    label: str,
    *,
    stop_at_finalize: bool = False,
    sensitivity: str | Path | None = "cache",
) -> BenchSearch:
    """One search as the benchmarks run it: a fresh run directory, the per-layer sensitivity seeded, a
    ``Recorder`` (progress lines under ``label`` when ``ctx`` is given), the load sampled while it runs.

    ``sensitivity``: ``"cache"`` seeds the sensitivity files from the benchmarks' cache and stores them there
    afterwards (``seed_sensitivity``/``keep_sensitivity``); a directory copies them from an earlier run (what a
    warm cache gives, as the throughput benchmark measures it); None computes them in the search.
    """
    from compression.search.loop import run_search

    fresh_dir(out)
    if sensitivity == "cache" and ctx is not None:
        seed_sensitivity(ctx, config, out)
    elif sensitivity is not None and sensitivity != "cache":
        for f in Path(sensitivity).glob("sensitivity-*.json"):
            shutil.copy(f, out / f.name)
    rec = Recorder(ctx, label, stop_at_finalize=stop_at_finalize)
    t0 = time.perf_counter()
    with LoadSampler() as load:
        report = run_search(config, str(out), [rec], resume=False)
    seconds = time.perf_counter() - t0
    if sensitivity == "cache" and ctx is not None:
        keep_sensitivity(ctx, config, out)
    return BenchSearch(report=report, recorder=rec, seconds=seconds, load=load.summary())


def search_floors(
    model_spec: str, target: str, round_to: int | None, layouts: Sequence[str], objective: str = "latency"
) -> dict[str, Any]:
    """The lowest cost ratio (latency, or ``objective``) each action layout can reach on a target (the
    environment's floor).

    Built from the search's own environment (``min_cost_ratio``: every layer as compressed as the layout
    allows), with the search's latency table; budgets below a floor are refused by the search.
    """
    from compression.search.env import CompressionEnvironment, EnvSettings
    from compression.search.loop import SearchRun
    from compression.search.results import SearchConfig

    cfg = SearchConfig(
        model=model_spec, target=target, objective=objective, budget=1.0, episodes=1, round_to=round_to
    )
    run = SearchRun(cfg, str(WORK / "tmp" / "floors"))
    out: dict[str, Any] = {"original_ms": getattr(run.latency, "original_ms", None), "round_to": run.round_to}
    for layout in layouts:
        pin = 8 if layout in ("bits",) else None  # HAQ pins the first and last layer to 8 bits
        # enforce_budget off: the environment then reports its floor instead of refusing a budget below it
        settings = EnvSettings(
            layout=layout, objective=objective, budget=1.0, round_to=run.round_to, enforce_budget=False
        )
        settings.pin_first_last_bits = pin
        env = CompressionEnvironment(run.ws.graph, run.val, run.calib, settings, latency=run.latency)
        out[layout] = env.min_cost_ratio
    return out
