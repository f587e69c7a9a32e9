"""A TVM latency table filled beside other work: does timing a busy batch again in a quiet moment keep it right?

Session 20 found a table whose entries had been timed while the test suite compiled TVM modules beside the
benchmark: whole batches 1.2-2x slow, fastest runs included, and a pruned depthwise net priced at 50% of the
original that measured 65% side by side. Since then a local batch timed while other processes used over 0.25
cores waits for a quiet second and is timed again (``TvmBackend._time_again_when_quiet``; docs/targets-tvm.md).

This benchmark fills fresh tables (each in its own file) with the entries of the depthwise net and ``--policies``
random pruning policies of it (keep 0.1-1 per group, channels rounded to 8 as the quality benchmark's), in one
run:

- **alone**: nothing else running, filled first and last (the two fills' disagreement is the measurement's own
  noise; each entry's reference is the faster of the two);
- **busy, watched** (the default): beside a load, each busy batch timed again when the machine is quiet;
- **busy, timed once** (``COMPRESSION_TABLE_QUIET_WAIT_S=0``, as before session 20): beside the same load.

The busy fills alternate which goes first, ``--rounds`` each (default 3). The load is another process training
a convolution on 2 threads in bursts (``--load-on`` seconds on, ``--load-off`` off; default 3 and 3): what a test
suite or a second search beside a search does. Per fill: each entry's fastest run against its reference (mean
absolute error, share of entries more than 10% off); each policy's ratio to the original as the table's raw sums
price it, against the reference tables' (mean and worst absolute error, in points); how many entries were timed
busy and kept; seconds to fill.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import Context, LoadSampler, bench_model, fmt, fresh_dir, log, publish, table

_LOAD = """
import sys, time, torch
torch.set_num_threads(2)
on, off = float(sys.argv[1]), float(sys.argv[2])
m = torch.nn.Conv2d(64, 64, 3, padding=1)
x = torch.randn(16, 64, 32, 32)
while True:
    end = time.monotonic() + on
    while time.monotonic() < end:
        m(x).sum().backward()
    time.sleep(off)
"""


def _workloads(ctx: Context, spec: str, n: int):
    """The original and ``n`` random pruning policies of it, applied: [(label, module)], the example input."""
    import numpy as np

    from bench.fidelity import random_policy
    from compression.apply import apply_policy
    from compression.pipeline import open_workspace

    ws = open_workspace(spec, "digits", seed=0)
    calib = ws.calibration_batch(64, seed=0)
    rng = np.random.default_rng(0)
    models = [("original", ws.artifact.module.eval())]
    for i in range(n):
        policy = random_policy(ws.graph, rng, "prune")
        models.append((f"policy {i + 1}", apply_policy(ws.graph, policy, calib, round_to=8)))
    return models, ws.artifact.example_input(1)


def _fill(path: Path, models, x, wait: bool) -> dict[str, Any]:
    """A fresh table at ``path`` filled with every entry the models need; its entries and the policies' ratios."""
    from compression.targets import LatencyTable, get_target

    saved = os.environ.get("COMPRESSION_TABLE_QUIET_WAIT_S")
    if wait:
        os.environ.pop("COMPRESSION_TABLE_QUIET_WAIT_S", None)
    else:
        os.environ["COMPRESSION_TABLE_QUIET_WAIT_S"] = "0"
    try:
        # the search's own protocol (``build_latency_model``): 5 warm-up runs, 40 timed
        t = LatencyTable(get_target("local-tvm"), path, warmup=5, repeats=40)
        need: dict[str, Any] = {}
        for _, m in models:
            for w in t.required(m, x):
                need.setdefault(w.key, w)
        t0 = time.perf_counter()
        t.fill_workloads(list(need.values()))
        seconds = time.perf_counter() - t0
    finally:
        if saved is None:
            os.environ.pop("COMPRESSION_TABLE_QUIET_WAIT_S", None)
        else:
            os.environ["COMPRESSION_TABLE_QUIET_WAIT_S"] = saved
    entries = {e["key"]: e for e in t.entries()}
    sums = [sum(t.lookup(w) or 0.0 for w in t.workloads(m, x)) for _, m in models]
    return {
        "seconds": seconds,
        "measured": t.measured,
        "busy_entries": t.busy_entries,
        "timed_again": sum(1 for e in entries.values() if (e.get("details") or {}).get("timed_again")),
        "min_ms": {k: e["min_ms"] for k, e in entries.items()},
        "ratios": [s / sums[0] for s in sums[1:]],
    }


def _score(fill: dict[str, Any], ref_ms: dict[str, float], ref_ratios: list[float]) -> dict[str, Any]:
    keys = [k for k, v in ref_ms.items() if k in fill["min_ms"] and v > 0]
    errs = [fill["min_ms"][k] / ref_ms[k] - 1 for k in keys]
    # weighted by the entry's time: the overhead entries (a few microseconds) swing by tens of percent and
    # weigh nothing in a prediction
    weighted = sum(abs(fill["min_ms"][k] - ref_ms[k]) for k in keys) / sum(ref_ms[k] for k in keys)
    ratio_err = [abs(a - b) for a, b in zip(fill["ratios"], ref_ratios, strict=True)]
    return {
        "entries": len(errs),
        "entry_error_mean": statistics.fmean(abs(e) for e in errs),
        "entry_error_weighted": weighted,
        "entries_off_10pct": sum(1 for e in errs if abs(e) > 0.10) / len(errs),
        "entry_error_worst": max(errs, key=abs),
        "ratio_error_mean": statistics.fmean(ratio_err),
        "ratio_error_worst": max(ratio_err),
        "seconds": fill["seconds"],
        "busy_entries": fill["busy_entries"],
        "timed_again": fill["timed_again"],
    }


class _Load:
    """The load process: started for a busy fill, killed after it. It is started detached (bash starts it in the
    background and exits), so it is another program to ``CpuWatch``, not a descendant of this one, whose CPU time
    counts as the measurement's own."""

    def __init__(self, on_s: float, off_s: float) -> None:
        self.on_s, self.off_s = on_s, off_s
        self.pid: int | None = None

    def __enter__(self) -> _Load:
        script = Path(fresh_dir(Path("/tmp") / f"bench-busy-{os.getpid()}")) / "load.py"
        script.write_text(_LOAD, encoding="utf-8")
        out = subprocess.run(
            [
                "bash",
                "-c",
                f'"{sys.executable}" "{script}" {self.on_s} {self.off_s} >/dev/null 2>&1 & echo $!',
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        self.pid = int(out.stdout.strip())
        time.sleep(1.5)  # torch imported, the first burst under way
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def run(ctx: Context) -> dict[str, Any]:
    """Run the busy-machine benchmark and write ``bench/results/busy[-quick].json``."""
    rounds = int(ctx.opt("rounds", 1, 3))
    n = int(ctx.opt("policies", 4, 10))
    on_s, off_s = float(ctx.options.get("load_on") or 3.0), float(ctx.options.get("load_off") or 3.0)
    bm = bench_model(ctx, ctx.options.get("model") or "dwnet")
    models, x = _workloads(ctx, bm.spec, n)
    work = fresh_dir(ctx.work_dir / "busy")
    fills: dict[str, list[dict[str, Any]]] = {"alone": [], "busy, watched": [], "busy, timed once": []}
    k = 0

    def one(name: str, load: bool, wait: bool) -> None:
        nonlocal k
        k += 1
        path = work / f"{k:02d}.sqlite"
        if load:
            with _Load(on_s, off_s):
                fills[name].append(_fill(path, models, x, wait))
        else:
            fills[name].append(_fill(path, models, x, wait))
        f = fills[name][-1]
        log(
            ctx,
            f"  {name}: {f['measured']} entries in {f['seconds']:.0f} s, {f['busy_entries']} kept busy, "
            f"{f['timed_again']} timed again",
        )

    log(
        ctx,
        f"busy: {bm.key}, {n} random pruning policies, {rounds} rounds; load {on_s:g} s on / {off_s:g} s off",
    )
    with LoadSampler() as sampler:
        one("alone", False, True)
        for r in range(rounds):
            order = [("busy, watched", True), ("busy, timed once", False)]
            for name, wait in order if r % 2 == 0 else order[::-1]:
                one(name, True, wait)
        one("alone", False, True)
    ref_ms = {
        key: min(f["min_ms"][key] for f in fills["alone"] if key in f["min_ms"])
        for key in fills["alone"][0]["min_ms"]
    }
    # the reference ratios: the two alone fills' mean
    ref_ratios = [statistics.fmean(v) for v in zip(*(f["ratios"] for f in fills["alone"]), strict=True)]
    result: dict[str, Any] = {
        "model": bm.spec,
        "policies": n,
        "rounds": rounds,
        "load": {"on_s": on_s, "off_s": off_s, "sampled": sampler.summary()},
        "reference_ratios": ref_ratios,
        "methods": {},
    }
    for name, fs in fills.items():
        scores = [_score(f, ref_ms, ref_ratios) for f in fs]
        result["methods"][name] = {
            "fills": scores,
            "ratios": [f["ratios"] for f in fs],
            **{
                key: statistics.fmean(s[key] for s in scores)
                for key in (
                    "entry_error_mean",
                    "entry_error_weighted",
                    "entries_off_10pct",
                    "ratio_error_mean",
                    "ratio_error_worst",
                    "seconds",
                    "busy_entries",
                    "timed_again",
                )
            },
        }
    publish(ctx, "busy", result, summarize)
    return result


def summarize(r: dict[str, Any]) -> str:
    """Markdown table of a busy-machine result (means over each way's fills)."""
    rows = []
    for name, m in r["methods"].items():
        rows.append(
            [
                name,
                len(m["fills"]),
                f"{m['entry_error_mean']:.1%}",
                f"{m['entry_error_weighted']:.1%}" if "entry_error_weighted" in m else "n/a",
                f"{m['entries_off_10pct']:.1%}",
                fmt(100 * m["ratio_error_mean"], ".2f"),
                fmt(100 * m["ratio_error_worst"], ".2f"),
                fmt(m["busy_entries"], ".1f"),
                fmt(m["timed_again"], ".1f"),
                f"{m['seconds']:.0f}",
            ]
        )
    return table(
        [
            "fill",
            "fills",
            "entries' fastest run vs reference (mean abs)",
            "weighted by time",
            "entries >10% off",
            "policy ratio error, points (mean)",
            "worst",
            "entries kept busy",
            "entries timed again",
            "s per fill",
        ],
        rows,
    )
