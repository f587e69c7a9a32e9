"""Benchmark 4, deployed speedup: the exported best model against the original, on the target and across
runtimes.

A search (AMC, or the first of ``--agents``, at 50% latency or the first of ``--budgets``, on ``--target``,
default ``local-tvm`` with channels rounded to 8) runs end to end with its finalize
phase (fine-tune, export of ``model.pt2`` and ``model.onnx``, end-to-end measurement). The original is
exported by the same exporter (``compress_and_export`` with no policy) so file sizes compare like for like.
Then the exported compressed ``.pt2`` and the original ``.pt2`` are loaded back through the engine's
loader (as a user's download would be) and measured side by side (interleaved rounds) on TVM, ONNX
Runtime and PyTorch; the test accuracy of the reloaded files is checked against the report.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from bench.common import (
    Context,
    LoadSampler,
    agent_config,
    bench_search,
    fmt,
    fresh_dir,
    log,
    publish,
    resnet20_digits,
    table,
)
from bench.quality import measure_side_by_side

RUNTIMES = ("local-tvm", "local-ort", "local-torch")


def _sizes(directory: Path) -> dict[str, int]:
    return {f.name: f.stat().st_size for f in directory.iterdir() if f.suffix in (".pt2", ".onnx")}


def run(ctx: Context) -> dict[str, Any]:
    """Run the deployed-speedup benchmark and write ``bench/results/speedup[-quick].json``."""
    from compression.export import compress_and_export
    from compression.models import load_model
    from compression.pipeline import open_workspace
    from compression.policy import Policy
    from compression.search.results import SearchConfig
    from compression.training import evaluate

    target = ctx.opt("target", "local-tvm", "local-tvm")
    round_to = ctx.options.get("round_to")  # None: the target's own rounding, as a user's search gets
    agent = (ctx.options.get("agents") or ["amc"])[0]
    # the first of --budgets (default 50%): an int8 search on ONNX Runtime cannot reach 50% on every CPU
    budget = float((ctx.options.get("budgets") or [0.5])[0])
    episodes = int(ctx.opt("episodes", 10, 100))
    ft = int(ctx.opt("fine_tune_epochs", 1, 3))
    rounds = 3 if ctx.quick else 5
    bm = resnet20_digits(ctx)
    base = ctx.work_dir / "speedup"
    out = base / f"{agent}-{target}"
    cfg = SearchConfig(
        model=bm.spec,
        agent=agent,
        target=target,
        objective="latency",
        budget=budget,
        episodes=episodes,
        seed=0,
        agent_config=agent_config(agent, episodes),
        round_to=round_to,
        top_k=1,
        fine_tune_epochs=ft,
        export_formats=("pt2", "onnx"),
        checkpoint_every=max(5, episodes),
    )
    log(
        ctx,
        f"speedup: {agent} at {budget:.0%} latency on {target}, {episodes} episodes, {ft} fine-tune epoch(s)",
    )
    run = bench_search(ctx, cfg, out, agent, sensitivity=None)
    report = run.report
    orig_dir = fresh_dir(base / "original-export")
    log(ctx, "exporting the original with the same exporter")
    orig_report = compress_and_export(bm.spec, "digits", None, str(orig_dir), formats=("pt2", "onnx"))
    sizes_c, sizes_o = _sizes(out), _sizes(orig_dir)
    result: dict[str, Any] = {
        "target": target,
        "round_to": round_to,
        "agent": agent,
        "budget": budget,
        "episodes": episodes,
        "fine_tune_epochs": ft,
        "search_load": run.load,
        "finalize_latency": report.get("latency"),
        "accuracy": report["accuracy"],
        "original_export_accuracy": orig_report["accuracy"]["compressed"]["top1"],
        "costs": report["costs"],
        "file_bytes": {"compressed": sizes_c, "original": sizes_o, "uploaded_pt2": os.path.getsize(bm.spec)},
        "file_ratio": {k: sizes_c[k] / sizes_o[k] for k in sizes_c if k in sizes_o},
    }
    log(ctx, "reloading both .pt2 files through the engine's loader")
    comp = load_model(str(out / "model.pt2"))
    orig = load_model(str(orig_dir / "model.pt2"))
    ws = open_workspace(str(out / "model.pt2"), "digits", seed=0)
    result["reloaded_test_accuracy"] = {
        "compressed": evaluate(comp.module, ws.data.test).top1,
        "original": evaluate(orig.module, ws.data.test).top1,
    }
    policy = Policy.from_json((out / "best_policy.json").read_text(encoding="utf-8"))
    quantized = any(lp.w_bits < 32 or lp.a_bits < 32 for lp in policy.layers.values())
    models = {"original": (orig.module, None), "compressed": (comp.module, policy if quantized else None)}
    x = comp.example_input(1)
    runtimes = {}
    for rt in ctx.options.get("runtimes") or RUNTIMES:
        log(ctx, f"measuring original and compressed on {rt} ({rounds} interleaved rounds)")
        try:
            runtimes[rt] = measure_side_by_side(ctx, models, x, rt, rounds)
        except Exception as exc:
            runtimes[rt] = {"error": f"{type(exc).__name__}: {exc}"}
    result["runtimes"] = runtimes
    if (out / "model.int8.onnx").exists():
        # the file a user deploys on ONNX Runtime: timed and scored as shipped, beside the original's model.onnx
        log(ctx, f"measuring the shipped model.int8.onnx against the original's model.onnx ({rounds} rounds)")
        result["int8_onnx"] = _shipped_onnx(
            {"original": orig_dir / "model.onnx", "compressed int8": out / "model.int8.onnx"},
            x,
            ws.data.test,
            rounds,
        )
    publish(ctx, "speedup" if agent == "amc" else f"speedup-{agent}", result, summarize)
    return result


def _shipped_onnx(files: dict[str, Path], x, test_set, rounds: int) -> dict[str, Any]:
    """Test accuracy and latency of exported ONNX files in ONNX Runtime with ``local-ort``'s session settings
    (threads, optimization, spinning): interleaved rounds of 10 warm-up and 50 timed runs, median of medians."""
    import statistics

    import numpy as np
    import onnxruntime as ort

    from compression.targets import get_target
    from compression.targets.measure import DEFAULT_DEVICE, measure_locked
    from compression.targets.ort_backend import session_options

    st = get_target("local-ort").settings
    so = session_options(
        int(st.get("threads", 2)), str(st.get("optimization", "all")), bool(st.get("spinning", True))
    )
    sessions = {
        k: ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]) for k, p in files.items()
    }
    xs, ys = test_set.tensors[0].numpy(), test_set.tensors[1].numpy()
    out: dict[str, Any] = {}
    for k, sess in sessions.items():
        name = sess.get_inputs()[0].name
        pred = np.concatenate(
            [sess.run(None, {name: xs[i : i + 128]})[0].argmax(1) for i in range(0, len(xs), 128)]
        )
        out[k] = {
            "file": files[k].name,
            "bytes": files[k].stat().st_size,
            "test_top1": float((pred == ys).mean()),
        }
    times: dict[str, list[float]] = {k: [] for k in sessions}
    with LoadSampler() as load:
        for _ in range(rounds):
            for k, sess in sessions.items():
                feed = {sess.get_inputs()[0].name: x.numpy()}

                def prepare(sess=sess, feed=feed):
                    return (lambda: sess.run(None, feed)), {}

                stats, _, _ = measure_locked(
                    prepare,
                    what=f"shipped {files[k].name}",
                    device=str(st.get("lock", DEFAULT_DEVICE)),
                    warmup=10,
                    repeats=50,
                    timeout_s=120.0,
                )
                times[k].append(stats["median_ms"])
    for k, ts in times.items():
        out[k]["median_ms"] = statistics.median(ts)
        out[k]["rounds_ms"] = ts
    out["load"] = load.summary()
    return out


def summarize(r: dict[str, Any]) -> str:
    """Markdown tables of a speedup result."""
    acc = r["accuracy"]
    fr = r["file_ratio"]
    lines = [
        table(
            ["", "original", "compressed", "ratio"],
            [
                [
                    "test accuracy",
                    f"{acc['original_test']:.4f}",
                    f"{acc['compressed_test']:.4f}",
                    f"{acc['compressed_test'] - acc['original_test']:+.4f}",
                ],
                *[
                    [
                        f"{name} bytes",
                        r["file_bytes"]["original"][name],
                        r["file_bytes"]["compressed"][name],
                        f"{ratio:.3f}",
                    ]
                    for name, ratio in fr.items()
                ],
                [
                    "MACs",
                    r["costs"]["before"]["macs"],
                    r["costs"]["after"]["macs"],
                    f"{r['costs']['ratio']['macs']:.3f}",
                ],
            ],
        ),
        "",
    ]
    rows = []
    for rt, m in r["runtimes"].items():
        if "error" in m:
            rows.append([rt, "error: " + m["error"][:80], "", "", "", ""])
            continue
        o, c = m["models"].get("original", {}), m["models"].get("compressed", {})
        if "median_ms" not in o or "median_ms" not in c:
            rows.append([rt, o.get("error", ""), c.get("error", ""), "", "", ""])
            continue
        rows.append(
            [
                rt,
                f"{o['median_ms']:.3f}",
                f"{c['median_ms']:.3f}",
                f"{o['median_ms'] / c['median_ms']:.2f}x",
                f"{o.get('cv', o.get('cv_mean', float('nan'))):.2f} / {c.get('cv', c.get('cv_mean', float('nan'))):.2f}",
                f"{m['load']['load1_mean']:.1f}",
            ]
        )
    lines.append(table(["runtime", "original ms", "compressed ms", "speedup", "CV o/c", "load"], rows))
    shipped = r.get("int8_onnx")
    if shipped:
        o, c = shipped["original"], shipped["compressed int8"]
        lines.append(
            "\n"
            + table(
                ["shipped file (ONNX Runtime)", "test accuracy", "bytes", "median ms", "speedup"],
                [
                    [
                        o["file"] + " (original)",
                        f"{o['test_top1']:.4f}",
                        o["bytes"],
                        f"{o['median_ms']:.3f}",
                        "",
                    ],
                    [
                        c["file"],
                        f"{c['test_top1']:.4f}",
                        c["bytes"],
                        f"{c['median_ms']:.3f}",
                        f"{o['median_ms'] / c['median_ms']:.2f}x",
                    ],
                ],
            )
        )
    fl = r.get("finalize_latency") or {}
    if fl.get("speedup"):
        lines.append(
            f"\nfinalize phase on {r['target']}: speedup {fmt(fl['speedup'], '.2f')}x, "
            f"table prediction error {fmt(fl.get('prediction_error'), '+.1%')}"
        )
    return "\n".join(lines)
