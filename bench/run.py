"""Run the benchmarks: ``python bench/run.py [quality learning reconstruction search_set proxy finetune throughput fidelity busy schedules
speedup streaming memory]``.

Without names every benchmark runs, in the order above. ``--quick`` is the minutes-long variant (fewer
episodes, seeds, policies and epochs); without it the full protocol runs (hours on 2 cores). Each benchmark
writes ``bench/results/<name>[-quick].json`` and prints its tables; ``docs/BENCHMARKS.md`` holds the
reading. Work files go to ``var/bench/`` (trained models, runs, and the latency-table cache, kept apart
from the user cache in ``~/.cache/compression`` unless ``--cache-dir`` says otherwise).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BENCHMARKS = (
    "quality",
    "learning",
    "reconstruction",
    "search_set",
    "proxy",
    "finetune",
    "throughput",
    "fidelity",
    "busy",
    "repeatability",
    "schedules",
    "speedup",
    "streaming",
    "memory",
)


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run the chosen benchmarks; returns the exit code (1 if any failed)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", help=f"benchmarks to run: {' '.join(BENCHMARKS)} (default: all)")
    p.add_argument("--quick", action="store_true", help="the minutes-long variant")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--target", help="hardware target for quality/throughput/speedup (default local-ort)")
    p.add_argument("--episodes", type=int, help="search episodes per run")
    p.add_argument("--seeds", type=int, help="seeds per configuration (quality)")
    p.add_argument("--fine-tune-epochs", type=int, help="fine-tune epochs (quality, speedup)")
    p.add_argument(
        "--policies", type=int, help="random policies (fidelity, reconstruction, search_set, proxy, busy)"
    )
    p.add_argument(
        "--steps",
        help="proxy: comma-separated lengths of fine_tune(steps=...) scored per candidate (default 16; none: skip)",
    )
    p.add_argument("--recipes", help="finetune: comma-separated recipes, aug<epochs> or plain<epochs>")
    p.add_argument(
        "--tune-steps",
        help="proxy: comma-separated tune_steps of the search's own per-candidate fine-tune (default 4,8,16; none: skip)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        help="fidelity: interleaved measurement rounds per policy (default 3); busy: busy fills of each kind",
    )
    p.add_argument(
        "--measure",
        choices=("side-by-side", "separate"),
        help="fidelity: time each group of policies side by side with the original (default), or each on its own",
    )
    p.add_argument(
        "--device-check-rounds",
        type=int,
        help="quality: the finalize step's device check, in interleaved rounds (default 3; 0: trust the table)",
    )
    p.add_argument(
        "--kinds",
        help="fidelity: comma-separated kinds of random policy: prune,joint,mixed (default all three)",
    )
    p.add_argument(
        "--max-keep", type=float, help="fidelity: random keep ratios are drawn in [0.1, this] (default 1)"
    )
    p.add_argument(
        "--rounding",
        action="store_true",
        help="fidelity: also run the channel-rounding study (1, 8, 16) on --target (without --target it runs on "
        "local-ort)",
    )
    p.add_argument(
        "--objective",
        choices=("latency", "macs", "bops", "params", "bytes"),
        help="quality, learning: the cost the budget applies to (default: latency; on --target analytic, "
        "bops for quality and macs for learning)",
    )
    p.add_argument(
        "--top-k",
        type=int,
        help="quality: how many of a search's best policies the finalize phase fine-tunes (default 1)",
    )
    p.add_argument(
        "--search-tune-steps",
        type=int,
        help="quality, learning: every search scores its candidates after this many fine-tune steps (tune_steps; "
        "default 0)",
    )
    p.add_argument("--agents", help="comma-separated agents (quality, throughput)")
    p.add_argument(
        "--load-on", type=float, help="busy: seconds of each burst of the load process (default 3)"
    )
    p.add_argument("--load-off", type=float, help="busy: seconds between its bursts (default 3)")
    p.add_argument(
        "--models",
        help="comma-separated models (quality, learning, reconstruction, search_set, proxy): resnet20,dwnet",
    )
    p.add_argument(
        "--model",
        help="use this .pt2 instead of the trained ResNet-20 (throughput, fidelity); fidelity also takes the "
        "benchmarks' own models by name: resnet20, dwnet",
    )
    p.add_argument(
        "--budgets",
        help="comma-separated latency budgets for quality (speedup: the first), e.g. 0.5,0.25,0.1",
    )
    p.add_argument("--round-to", type=int, help="quality: channel rounding (default: the target's own)")
    p.add_argument(
        "--fresh", action="store_true", help="quality: do not reuse finished cells of a stored result"
    )
    p.add_argument(
        "--skip-extra", action="store_true", help="quality: skip the layout and cross-target experiments"
    )
    p.add_argument(
        "--extra-only",
        action="store_true",
        help="quality: only the layout and cross-target experiments (the per-model cells are kept as stored)",
    )
    p.add_argument(
        "--cross-budget",
        type=float,
        help="quality: the latency budget of the cross-target experiment (default 0.5; it must be reachable on "
        "both local-tvm and local-ort)",
    )
    p.add_argument(
        "--parts",
        help="memory: comma-separated parts to run: web,worker; throughput: quantizer runs only the activation "
        "quantizer's side-by-side measurement, layout only channels-last against NCHW scoring, apply only the apply "
        "step's batch-norm re-estimation in the re-fit's pass against a calibration pass, tvm-fill only a cold TVM "
        "latency table filled with workloads compiled together against one by one (and a cold Galen search each way), "
        "tvm-fill-rpc the same fill on an RPC device (a tracker and server started on loopback), "
        "tvm-cap a cold AMC search whose cap measures probe by probe against probes together",
    )
    p.add_argument(
        "--tiles", help="schedules: comma-separated register tiles CxR (channels x rows) to compare"
    )
    p.add_argument("--tables", action="store_true", help="print the tables of stored results, run nothing")
    p.add_argument(
        "--shared-lock",
        action="store_true",
        help="take the machine-wide device lock (default: a lock of the benchmarks' own in var/bench/locks)",
    )
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--results-dir", default=str(ROOT / "bench" / "results"))
    p.add_argument(
        "--cache-dir",
        default=str(ROOT / "var" / "bench" / "cache"),
        help="latency tables and TVM databases (COMPRESSION_CACHE_DIR)",
    )
    raw = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(raw)
    names = args.names or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        p.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")

    if args.tables:
        return print_tables(names, Path(args.results_dir), args.quick)
    os.environ["COMPRESSION_CACHE_DIR"] = args.cache_dir
    if not args.shared_lock:
        # Another process (a TVM tuning session, say) may hold the shared device lock for many minutes;
        # the benchmarks serialise their own measurements and record the load average instead.
        os.environ["COMPRESSION_LOCK_DIR"] = str(ROOT / "var" / "bench" / "locks")
    # quieter logs from the engine; progress comes from the benchmarks' own lines
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from bench.common import Context, load_average, log, set_threads

    kinds = args.kinds.split(",") if args.kinds else None
    if kinds:
        from bench.fidelity import POLICY_KINDS

        unknown = sorted(set(kinds) - set(POLICY_KINDS))
        if unknown:
            p.error(f"--kinds: unknown {', '.join(unknown)}; choose from {', '.join(POLICY_KINDS)}")
    set_threads(args.threads)
    options = {
        "target": args.target,
        "episodes": args.episodes,
        "seeds": args.seeds,
        "fine_tune_epochs": args.fine_tune_epochs,
        "policies": args.policies,
        "steps": args.steps,
        "tune_steps": args.tune_steps,
        "recipes": args.recipes,
        "tune_steps_search": args.search_tune_steps,
        "rounds": args.rounds,
        "device_check_rounds": args.device_check_rounds,
        "measure": args.measure,
        "agents": args.agents.split(",") if args.agents else None,
        "objective": args.objective,
        "top_k": args.top_k,
        "max_keep": args.max_keep,
        "rounding": args.rounding,
        "kinds": kinds,
        "model": args.model,
        "load_on": args.load_on,
        "load_off": args.load_off,
        "round_to": args.round_to,
        "fresh": args.fresh,
        "skip_extra": args.skip_extra,
        "extra_only": args.extra_only,
        "cross_budget": args.cross_budget,
        "parts": args.parts.split(",") if args.parts else None,
        "tiles": args.tiles.split(",") if args.tiles else None,
        "models": args.models.split(",") if args.models else None,
        "budgets": [float(b) for b in args.budgets.split(",")] if args.budgets else None,
    }
    ctx = Context(quick=args.quick, threads=args.threads, results_dir=Path(args.results_dir), options=options)
    log(
        ctx,
        f"benchmarks {', '.join(names)} ({ctx.mode}), {args.threads} torch threads, load {load_average()}",
    )
    failed = []
    for name in names:
        module = __import__(f"bench.{name}", fromlist=["run"])
        t0 = time.perf_counter()
        log(ctx, f"=== {name} ===")
        try:
            if getattr(module, "SUBPROCESS", False) and not args.child:
                # Django is configured once per process: the web benchmarks get a process of their own
                rest = [a for a in raw if a not in BENCHMARKS]
                code = subprocess.call(
                    [sys.executable, str(Path(__file__).resolve()), name, "--child", *rest]
                )
                if code != 0:
                    failed.append(name)
            else:
                module.run(ctx)
        except KeyboardInterrupt:
            raise
        except Exception:
            traceback.print_exc()
            failed.append(name)
        log(ctx, f"=== {name} done in {(time.perf_counter() - t0) / 60:.1f} min ===")
    if failed:
        log(ctx, f"failed: {', '.join(failed)}")
        return 1
    return 0


def print_tables(names: list[str], results_dir: Path, quick: bool) -> int:
    """Print the Markdown tables of the stored results (what docs/BENCHMARKS.md shows)."""
    import json

    for name in names:
        path = results_dir / f"{name}{'-quick' if quick else ''}.json"
        if not path.exists():
            print(f"## {name}: no results in {path}\n")
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        module = __import__(f"bench.{name}", fromlist=["summarize"])
        m = data["machine"]
        print(f"## {name} ({data['mode']}, {data['finished_at']}, load at the end {m['load']})\n")
        print(module.summarize(data))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
