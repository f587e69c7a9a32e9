"""``python -m compression``: the engine from the command line (the same functions the workers call).

Every command prints a readable table by default and JSON with ``--json``. Long work draws a progress
bar on stderr. Every user error is one line on stderr and exit code 2; an internal error exits with 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from compression.errors import CompressionError


# ---------------------------------------------------------------------------------------------- helpers
def _shape(text: str | None) -> tuple[int, int, int] | None:
    if text is None:
        return None
    parts = text.lower().replace(",", "x").split("x")
    try:
        vals = tuple(int(p) for p in parts)
    except ValueError:
        vals = ()
    if len(vals) != 3 or min(vals) < 1:
        raise CompressionError(f"input shape {text!r} is not CxHxW", "e.g. --input-shape 3x32x32")
    return vals  # type: ignore[return-value]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return "x".join(str(x) for x in v)
    if v is None:
        return "-"
    return str(v)


def _si(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def print_table(rows: list[dict[str, Any]], columns: Sequence[str], out=None) -> None:
    """A plain aligned text table."""
    out = out or sys.stdout
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)), file=out)


class Bar:
    """A tqdm progress bar as a ``(done, total, stats)`` callback; silent when stderr is not a terminal
    unless forced, so logs stay readable."""

    def __init__(self, desc: str, enabled: bool = True) -> None:
        self.desc = desc
        self.enabled = enabled and sys.stderr.isatty()
        self._bar = None

    def __call__(self, done: int, total: int, stats: dict) -> None:
        if not self.enabled:
            return
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=self.desc, file=sys.stderr, leave=False, dynamic_ncols=True)
        self._bar.n = done
        self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in stats.items()})
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _emit(args: argparse.Namespace, data: Any, human) -> None:
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    else:
        human(data)


# ---------------------------------------------------------------------------------------------- commands
def cmd_zoo(args: argparse.Namespace) -> None:
    from compression.models.zoo import list_zoo

    rows = list_zoo()

    def human(rows):
        print_table(
            [{**r, "params": _si(r["params"]), "macs": _si(r["macs"])} for r in rows],
            ["name", "params", "macs", "description"],
        )

    _emit(args, rows, human)


def cmd_inspect(args: argparse.Namespace) -> None:
    from compression.pipeline import inspect_model

    info = inspect_model(args.model, num_classes=args.num_classes, input_shape=_shape(args.input_shape))

    def human(info):
        s = info["summary"]
        print(
            f"{info['model']}: input {_fmt(info['input_shape'])}, {info['num_classes']} classes, "
            f"{_si(s['params'])} params, {_si(s['macs'])} MACs, {s['layers']} layers, "
            f"{s['prunable_groups']}/{s['groups']} prunable groups"
        )
        rows = []
        for r in info["layers"]:
            rows.append(
                {
                    "layer": r["name"],
                    "op": r["op"],
                    "in": r["in_channels"],
                    "out": r["out_channels"],
                    "kernel": r["kernel"],
                    "stride": r["stride"],
                    "input": r["input_hw"],
                    "params": _si(r["params"]),
                    "MACs": _si(r["macs"]),
                    "group": ("*" if r["group_leader"] else "") + str(r["group"])
                    if r["group"] is not None
                    else "-",
                    "prune": "yes" if r["prunable"] else "no",
                    "quant": "yes" if r["quantizable"] else "no",
                    "note": r["note"],
                }
            )
        print_table(
            rows,
            [
                "layer",
                "op",
                "in",
                "out",
                "kernel",
                "stride",
                "input",
                "params",
                "MACs",
                "group",
                "prune",
                "quant",
                "note",
            ],
        )
        print("(* = group leader: its keep_ratio decides the group)")
        for u in s["unsupported"]:
            print(f"unsupported op {u['op']}: {u['action']} ({', '.join(u['layers'])})")

    _emit(args, info, human)


def cmd_train(args: argparse.Namespace) -> None:
    from compression.pipeline import train_baseline

    if not args.model.startswith("zoo:") or "@" in args.model:
        raise CompressionError("train takes a zoo architecture", "e.g. --model zoo:resnet20")
    bar = Bar("train", enabled=not args.quiet)
    try:
        res = train_baseline(
            args.model[4:],
            args.dataset,
            args.out,
            epochs=args.epochs,
            lr=args.lr,
            batch_size=args.batch_size,
            seed=args.seed,
            input_shape=_shape(args.input_shape),
            progress=bar,
        )
    finally:
        bar.close()

    def human(r):
        print(
            f"trained {r['arch']} on {r['dataset']} ({_fmt(r['input_shape'])}) for {r['epochs']} epochs "
            f"in {r['train_seconds']:.0f}s: val top-1 {r['val']['top1']:.2%}, test top-1 {r['test']['top1']:.2%}"
        )
        print(f"saved {r['model']} ({_si(r['file_bytes'])}B) and weights {r['weights']}")

    _emit(args, res, human)


def _policy_arg(args: argparse.Namespace):
    from compression.pipeline import load_policy

    return load_policy(args.policy) if args.policy else None


def cmd_evaluate(args: argparse.Namespace) -> None:
    from compression.apply import apply_policy
    from compression.pipeline import costs_summary, open_workspace
    from compression.training import evaluate

    ws = open_workspace(args.model, args.dataset, seed=args.seed, input_shape=_shape(args.input_shape))
    policy = _policy_arg(args)
    model = ws.artifact.module
    if policy is not None:
        model = apply_policy(
            ws.graph,
            policy,
            ws.calibration_batch(),
            round_to=args.round_to,
            reconstruct=not args.no_reconstruct,
        )
    split = getattr(ws.data, args.split)
    acc = evaluate(model, split, max_samples=args.max_samples)
    res = {
        "model": args.model,
        "dataset": args.dataset,
        "split": args.split,
        "accuracy": acc.to_dict(),
        "costs": costs_summary(ws.graph, policy, args.round_to),
        "warnings": ws.warnings,
    }

    def human(r):
        a = r["accuracy"]
        top5 = f", top-5 {a['top5']:.2%}" if a["top5"] is not None else ""
        print(f"{r['split']} top-1 {a['top1']:.2%}{top5} on {a['samples']} samples (loss {a['loss']:.4f})")
        _print_costs(r["costs"])
        for w in r["warnings"]:
            print(f"warning: {w}")

    _emit(args, res, human)


def _print_costs(c: dict) -> None:
    rows = [
        {
            "cost": k,
            "before": _si(c["before"][k]),
            "after": _si(c["after"][k]),
            "ratio": f"{c['ratio'][k]:.3f}",
        }
        for k in ("macs", "bops", "params", "bytes")
    ]
    print_table(rows, ["cost", "before", "after", "ratio"])


def cmd_apply(args: argparse.Namespace) -> None:
    from compression.export import compress_and_export

    bar = Bar("fine-tune", enabled=not args.quiet)
    try:
        res = compress_and_export(
            args.model,
            args.dataset,
            _policy_arg(args),
            args.out,
            seed=args.seed,
            round_to=args.round_to,
            fine_tune_epochs=args.fine_tune_epochs,
            distill=not args.no_distill,
            augment=args.fine_tune_augment,
            reconstruct=not args.no_reconstruct,
            formats=tuple(args.formats.split(",")),
            input_shape=_shape(args.input_shape),
            progress=bar,
        )
    finally:
        bar.close()

    def human(r):
        b, a = r["accuracy"]["original"], r["accuracy"]["compressed"]
        print(f"test top-1: original {b['top1']:.2%} -> compressed {a['top1']:.2%}")
        _print_costs(r["costs"])
        for f in r["files"]:
            print(f"wrote {f['path']} ({_si(f['bytes'])}B) — {f['note']}")

    _emit(args, res, human)


def cmd_export(args: argparse.Namespace) -> None:
    args.fine_tune_epochs = 0
    args.no_distill = True
    args.fine_tune_augment = False
    cmd_apply(args)


def cmd_bench(args: argparse.Namespace) -> None:
    from compression.models import load_model
    from compression.targets import bench_model, get_target

    art = load_model(args.model, input_shape=_shape(args.input_shape))
    target = get_target(args.target)
    m = bench_model(
        art.module,
        art.example_input(args.batch),
        target,
        warmup=args.warmup,
        repeats=args.repeats,
        timeout_s=args.timeout,
    )
    res = m.to_dict()

    def human(r):
        if r["details"].get("analytic"):
            from compression.targets.analytic import describe_value

            print(f"{args.model} on {r['target']} (analytic, not a time): {describe_value(m)}")
            return
        print(
            f"{args.model} on {r['target']} ({r['backend']}), batch {r['batch']}: "
            f"median {r['median_ms']:.3f} ms, mean {r['mean_ms']:.3f} ms, std {r['std_ms']:.3f} ms "
            f"(cv {r['cv']:.1%}), {r['runs']} runs after {r['warmup']} warm-up, compile {r['compile_s']:.1f}s"
        )
        for k, v in r["details"].items():
            print(f"  {k}: {v}")

    _emit(args, res, human)


def cmd_search(args: argparse.Namespace) -> None:
    from compression.search.loop import run_search
    from compression.search.results import SearchCallback, SearchConfig

    out_dir = args.resume or args.out
    if not out_dir:
        raise CompressionError("say where the run goes", "--out DIR for a new search, or --resume DIR")
    cfg_path = os.path.join(out_dir, "config.json")
    if args.resume:
        if not os.path.exists(cfg_path):
            raise CompressionError(
                f"{out_dir} holds no search to resume (no config.json)", "check the directory"
            )
        with open(cfg_path, encoding="utf-8") as f:
            config = SearchConfig.from_dict(json.load(f))
    else:
        try:
            agent_config = json.loads(args.agent_config) if args.agent_config else {}
        except json.JSONDecodeError as exc:
            raise CompressionError(f"--agent-config is not valid JSON: {exc}") from exc
        reward_params = {k: v for k, v in (("beta", args.beta), ("rho", args.rho)) if v is not None}
        config = SearchConfig(
            model=args.model,
            dataset=args.dataset,
            input_shape=_shape(args.input_shape),
            agent=args.agent,
            target=args.target,
            objective=args.objective,
            budget=args.budget,
            reward=args.reward,
            reward_params=reward_params,
            episodes=args.episodes,
            seed=args.seed,
            val_samples=args.val_samples,
            train_top_up=not args.no_train_top_up,
            round_to=args.round_to,
            agent_config=agent_config,
            layout=args.layout,
            float_bits=not args.no_float_bits,
            free_precision=not args.no_free_precision,
            reconstruct=not args.no_reconstruct,
            tune_steps=args.tune_steps,
            top_k=args.top_k,
            device_check_rounds=args.device_check_rounds,
            fine_tune_epochs=args.fine_tune_epochs,
            fine_tune_augment=args.fine_tune_augment,
        )
        config.validate()
        if os.path.exists(os.path.join(out_dir, "checkpoint.pt")):
            raise CompressionError(
                f"{out_dir} already holds a search", f"--resume {out_dir}, or pick a new --out"
            )
        os.makedirs(out_dir, exist_ok=True)
        with open(cfg_path, "w", encoding="utf-8") as f:
            json.dump(config.to_dict(), f, indent=2)

    class Progress(SearchCallback):
        def __init__(self) -> None:
            self.bar = None
            self.best = None

        def on_start(self, info):
            if not args.quiet:
                print(
                    f"searching {config.model} on {info['target']}: {len(info['layers'])} layers, "
                    f"original accuracy {info['original_accuracy']:.2%} on the search set"
                    + (
                        f", resuming after episode {info['resumed_from']}" if info.get("resumed_from") else ""
                    ),
                    file=sys.stderr,
                )

        def on_episode(self, r):
            if r.is_best or self.best is None:
                self.best = max(self.best or r.reward, r.reward)
            if args.quiet:
                return
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(
                    total=config.episodes,
                    initial=r.episode - 1,
                    desc="search",
                    file=sys.stderr,
                    dynamic_ncols=True,
                    disable=not sys.stderr.isatty(),
                )
            self.bar.update(1)
            self.bar.set_postfix(
                reward=f"{r.reward:.4f}",
                acc=f"{r.accuracy:.3f}",
                cost=f"{r.cost_ratio:.2f}",
                best=f"{self.best:.4f}",
            )
            if not sys.stderr.isatty():
                print(
                    f"episode {r.episode}: reward {r.reward:.4f} acc {r.accuracy:.3f} cost {r.cost_ratio:.3f}"
                    + (" (best)" if r.is_best else ""),
                    file=sys.stderr,
                )

        def on_phase(self, phase, info):
            if self.bar is not None:
                self.bar.close()
                self.bar = None
            if not args.quiet and phase != "search":
                print(f"{phase}...", file=sys.stderr)

    report = run_search(config, out_dir, [Progress()], resume=True)

    def human(r):
        if r["status"] != "finished":
            print(
                f"search {r['status']} after {r['episodes_done']} of {r['episodes_total']} episodes; "
                f"continue with --resume {out_dir}"
            )
            return
        a = r["accuracy"]
        print(
            f"best episode {r['best_episode']}: test top-1 {a['original_test']:.2%} -> {a['compressed_test']:.2%}"
            + ("" if r["within_budget"] else " (no episode met the budget)")
        )
        _print_costs(r["costs"])
        lat = r.get("latency") or {}
        if lat.get("original"):
            print(
                f"latency on {r['target']['name']}: {lat['original']['median_ms']:.3f} ms -> "
                f"{lat['compressed']['median_ms']:.3f} ms (x{lat['speedup']:.2f})"
            )
        dc = lat.get("device_check")
        if dc and dc.get("error"):
            print(f"device check failed, the latency table's choice was kept: {dc['error']}")
        elif dc:
            print(
                f"device check: {len(dc['measured'])} policies measured in {dc['rounds']} rounds"
                + (
                    f"; over the budget and replaced: episodes {', '.join(map(str, dc['dropped_over_budget']))}"
                    if dc["dropped_over_budget"]
                    else ""
                )
            )
        if lat.get("over_budget"):
            print(f"warning: {lat['over_budget']}")
        for f in r["files"]:
            print(f"wrote {f['path']} ({_si(f['bytes'])}B)")

    _emit(args, report, human)


# ---------------------------------------------------------------------------------------------- parser
AUGMENT_HELP = (
    "shift the inputs at random during the fine-tune (off: a short distillation recovers more without them)"
)
NO_RECONSTRUCT_HELP = (
    "apply pruning by slicing and batch-norm re-estimation only, without re-fitting the layers that read pruned "
    "channels to the original's outputs (compression/reconstruct.py)"
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m compression", description=__doc__.split("\n")[0])
    p.add_argument("-v", "--verbose", action="store_true", help="log what the engine does")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, fn, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.add_argument("--json", action="store_true", help="print JSON instead of a table")
        sp.set_defaults(fn=fn)
        return sp

    def model_args(sp, dataset: bool = True) -> None:
        sp.add_argument("--model", required=True, help="zoo:NAME, zoo:NAME@weights.pth, or a .pt2 file")
        if dataset:
            sp.add_argument(
                "--dataset", default="digits", help="digits, or a .npz / CIFAR-10 archive / image-folder zip"
            )
        sp.add_argument("--input-shape", help="CxHxW for zoo models (default 3x32x32, or from the weights)")
        sp.add_argument("--seed", type=int, default=0)

    add("zoo", cmd_zoo, "list the built-in architectures")

    sp = add(
        "inspect", cmd_inspect, "per-layer table: shapes, params, MACs, prunable groups, quantizable layers"
    )
    sp.add_argument("model", help="zoo:NAME[@weights.pth] or a .pt2 file")
    sp.add_argument("--input-shape")
    sp.add_argument("--num-classes", type=int)

    sp = add("train", cmd_train, "train a zoo model on a dataset into a baseline .pt2")
    model_args(sp)
    sp.add_argument("--epochs", type=int, default=15)
    sp.add_argument("--lr", type=float, default=0.05)
    sp.add_argument("--batch-size", type=int, default=64)
    sp.add_argument("--out", required=True, help="where to write the .pt2")
    sp.add_argument("--quiet", action="store_true", help="no progress bar")

    sp = add("evaluate", cmd_evaluate, "accuracy and costs of a model, optionally under a policy")
    model_args(sp)
    sp.add_argument("--policy", help="policy JSON file (or inline JSON)")
    sp.add_argument("--split", choices=["train", "val", "test"], default="test")
    sp.add_argument("--max-samples", type=int)
    sp.add_argument("--round-to", type=int, default=1)
    sp.add_argument("--no-reconstruct", action="store_true", help=NO_RECONSTRUCT_HELP)

    for name, fn, help_ in (
        ("apply", cmd_apply, "apply a policy, fine-tune, evaluate and write the compressed model"),
        ("export", cmd_export, "write a model (optionally under a policy) as .pt2 / ONNX with report.json"),
    ):
        sp = add(name, fn, help_)
        model_args(sp)
        sp.add_argument("--policy", required=(name == "apply"), help="policy JSON file (or inline JSON)")
        sp.add_argument("--out", required=True, help="output directory")
        sp.add_argument("--round-to", type=int, default=1)
        sp.add_argument("--formats", default="pt2,onnx", help="comma-separated: pt2,onnx")
        sp.add_argument("--quiet", action="store_true", help="no progress bar")
        sp.add_argument("--no-reconstruct", action="store_true", help=NO_RECONSTRUCT_HELP)
        if name == "apply":
            sp.add_argument("--fine-tune-epochs", type=int, default=2)
            sp.add_argument(
                "--no-distill", action="store_true", help="fine-tune without the original as teacher"
            )
            sp.add_argument("--fine-tune-augment", action="store_true", help=AUGMENT_HELP)

    sp = add("search", cmd_search, "search a per-layer compression policy with an RL agent, then export")
    sp.add_argument("--model", help="zoo:NAME@weights.pth or a .pt2 file")
    sp.add_argument("--dataset", default="digits")
    sp.add_argument("--input-shape", help="CxHxW for zoo models")
    sp.add_argument("--agent", default="amc", help="amc, haq, galen-pq, ajpq, two-stage, random, uniform")
    sp.add_argument("--target", default="local-tvm")
    sp.add_argument("--objective", default="latency", choices=["latency", "macs", "bops", "params", "bytes"])
    sp.add_argument("--budget", type=float, default=0.5, help="allowed cost as a fraction of the original")
    sp.add_argument("--reward", default="acc", choices=["acc", "acc-log-cost", "galen", "haq"])
    sp.add_argument("--beta", type=float, help="galen reward: weight of the cost term (negative)")
    sp.add_argument("--rho", type=float, help="galen reward: target cost ratio (default: the budget)")
    sp.add_argument("--episodes", type=int, default=100)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument(
        "--val-samples",
        type=int,
        default=1000,  # SearchConfig's default (not imported here: the parser loads no torch)
        help="images per accuracy estimate (the search set; validation images first)",
    )
    sp.add_argument(
        "--no-train-top-up",
        action="store_true",
        help="score candidates on validation images only, even when the validation split holds fewer than --val-samples",
    )
    sp.add_argument("--round-to", type=int)
    sp.add_argument("--layout", choices=["prune", "bits", "joint", "ajpq"], help="for random/uniform agents")
    sp.add_argument(
        "--no-float-bits",
        action="store_true",
        help="latency objective: every layer a bits/joint search decides is quantized (2..8 bits, no float choice)",
    )
    sp.add_argument(
        "--no-free-precision",
        action="store_true",
        help="latency objective: keep the bits the agent chose even where more bits cost no more time on the target",
    )
    sp.add_argument("--no-reconstruct", action="store_true", help=NO_RECONSTRUCT_HELP)
    sp.add_argument(
        "--tune-steps",
        type=int,
        default=0,
        help="steps of a short distillation fine-tune each candidate gets before it is scored (0: scored as "
        "applied; see docs/search.md)",
    )
    sp.add_argument("--agent-config", help="agent hyper-parameters as JSON")
    sp.add_argument("--top-k", type=int, default=3)
    sp.add_argument(
        "--device-check-rounds",
        type=int,
        default=3,
        help="measure the best policies on the device against the original in this many interleaved rounds and "
        "replace those over a latency budget by the next ones (0: off, trust the latency table)",
    )
    sp.add_argument("--fine-tune-epochs", type=int, default=2)
    sp.add_argument("--fine-tune-augment", action="store_true", help=AUGMENT_HELP)
    sp.add_argument("--out", help="new run directory")
    sp.add_argument("--resume", metavar="DIR", help="continue the search in DIR")
    sp.add_argument("--quiet", action="store_true")

    sp = add("bench", cmd_bench, "measure a model's latency on a hardware target")
    sp.add_argument("--model", required=True)
    sp.add_argument("--target", default="local-ort")
    sp.add_argument("--input-shape")
    sp.add_argument("--batch", type=int, default=1)
    sp.add_argument("--warmup", type=int, default=10)
    sp.add_argument("--repeats", type=int, default=50)
    sp.add_argument("--timeout", type=float, default=600.0)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        args.fn(args)
    except CompressionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get("COMPRESSION_DEBUG"):
            raise
        print(
            f"internal error: {type(exc).__name__}: {exc} (set COMPRESSION_DEBUG=1 for a traceback)",
            file=sys.stderr,
        )
        return 1
    return 0
