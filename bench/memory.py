"""Benchmark 6, memory and scale: peak resident memory of a search worker and of the web process.

**Search worker.** Each configuration runs ``run_search`` in a fresh subprocess (as a worker's task does)
and reports its peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) and an RSS timeline sampled with
psutil. Configurations: ResNet-20 and ResNet-56 (zoo architectures, fresh weights: memory does not depend
on weight values) on digits (1x32x32) and on a CIFAR-sized **synthetic** dataset (50,000 random uint8
images 3x32x32 with random labels, written once as a ``.npz``; only its size matters here). Target
``local-ort``, latency objective, random agent, channel pruning. The digits runs include the finalize
phase (evaluation, export; fine-tuning in full mode); the synthetic runs stop when the search enters
finalize (fine-tuning ResNet-56 on 45,000 images is hours on 2 cores), so they measure the search.
Full mode adds growth series: episodes (5/20/80) and dataset size (10k/50k).

**Web process.** daphne serving run pages: runs with 500 and 5,000 episodes (and 20,000 in full mode)
are written to the database, then the run page, the episodes API and the websocket history are requested
for each; daphne's RSS and peak RSS (VmHWM) are read from /proc, and whether it loaded torch is checked in
its memory map (importing torch maps ``libtorch``). A second check renders the same pages with Django's
test client in a fresh process and reports ``'torch' in sys.modules`` directly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, Context, LoadSampler, log, publish, table, write_result
from bench.stack import Stack

SUBPROCESS = True  # the web part configures Django for this process
GIB = 1024**3
MIB = 1024**2


# ---------------------------------------------------------------------------------------------- worker
def synthetic_cifar(ctx: Context, n: int) -> Path:
    """A CIFAR-sized synthetic ``.npz``: ``n`` random uint8 images (3x32x32) and random labels 0..9."""
    import numpy as np

    path = ctx.work_dir / "data" / f"synthetic-cifar-{n}.npz"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
        y = rng.integers(0, 10, size=n, dtype=np.int64)
        tmp = path.with_name(path.stem + ".tmp.npz")
        np.savez(tmp, x=x, y=y)
        os.replace(tmp, path)
    return path


def child_main(spec_json: str) -> None:
    """Inside the measured subprocess: run one search, print one JSON line with the memory facts."""
    import resource
    import threading

    import psutil

    spec = json.loads(spec_json)
    import torch

    torch.set_num_threads(int(spec["threads"]))
    from bench.common import Recorder
    from compression.search.loop import run_search
    from compression.search.results import SearchConfig

    proc = psutil.Process()
    samples: list[tuple[float, int]] = []
    stop = threading.Event()
    t0 = time.monotonic()

    def sample() -> None:
        while not stop.wait(0.5):
            samples.append((time.monotonic() - t0, proc.memory_info().rss))

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    rec = Recorder(None, "memory", stop_at_finalize=bool(spec["stop_at_finalize"]))
    cfg = SearchConfig(**spec["config"])
    status = "ok"
    try:
        report = run_search(cfg, spec["out"], [rec], resume=False)
        status = report.get("status", "ok")
    except Exception as exc:
        status = f"error: {type(exc).__name__}: {exc}"
    stop.set()
    th.join()
    phases = {p: round(t - rec.t0, 1) for p, t in rec.phases}
    out = {
        "status": status,
        "maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_end_bytes": proc.memory_info().rss,
        "episodes": len(rec.episodes),
        "phases_s": phases,
        "seconds": time.monotonic() - t0,
        "timeline": samples[:: max(1, len(samples) // 60)],
    }
    print("MEMORY-RESULT " + json.dumps(out), flush=True)


def _worker_run(
    ctx: Context,
    label: str,
    arch: str,
    dataset: str,
    shape: list[int],
    episodes: int,
    stop_at_finalize: bool,
    ft_epochs: int,
) -> dict[str, Any]:
    out = ctx.work_dir / "memory" / label
    config = {
        "model": f"zoo:{arch}",
        "dataset": dataset,
        "input_shape": shape,
        "agent": "random",
        "layout": "prune",
        "target": ctx.opt("target", "local-ort", "local-ort"),
        "objective": "latency",
        # 70% unless --budgets says: ONNX Runtime's pruning floor at its kernel block (16 channels on AVX-512) is
        # ~60% for these models, so the earlier 50% made every search refuse to start (memory is hardly a function
        # of the budget)
        "budget": float((ctx.options.get("budgets") or [0.7])[0]),
        "episodes": episodes,
        "seed": 0,
        "top_k": 1,
        "fine_tune_epochs": ft_epochs,
        "checkpoint_every": max(5, episodes),
        "export_formats": ["pt2", "onnx"],
    }
    spec = {"config": config, "out": str(out), "threads": ctx.threads, "stop_at_finalize": stop_at_finalize}
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from bench.memory import child_main; child_main(sys.argv[1])"
    log(ctx, f"worker memory: {label} ({arch}, {Path(dataset).name}, {episodes} episodes)")
    with LoadSampler() as load:
        p = subprocess.run(
            [sys.executable, "-c", code, json.dumps(spec)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": str(ctx.threads)},
        )
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("MEMORY-RESULT ")), None)
    if line is None:
        return {"label": label, "status": f"error: exit {p.returncode}: {p.stderr[-1500:]}"}
    r = json.loads(line[len("MEMORY-RESULT ") :])
    r.update(
        label=label,
        arch=arch,
        dataset=Path(dataset).name,
        episodes_asked=episodes,
        stop_at_finalize=stop_at_finalize,
        fine_tune_epochs=ft_epochs,
        load=load.summary(),
    )
    log(ctx, f"  peak RSS {r['maxrss_bytes'] / MIB:.0f} MiB ({r['status']}, {r['seconds']:.0f} s)")
    return r


def worker_memory(ctx: Context) -> dict[str, Any]:
    """Peak RSS of search subprocesses over models, datasets and episode counts."""
    episodes = int(ctx.opt("episodes", 2, 10))
    ft = 0 if ctx.quick else 1
    synth = str(synthetic_cifar(ctx, 50_000))
    runs = []
    for arch in ("resnet20", "resnet56"):
        runs.append(_worker_run(ctx, f"{arch}-digits", arch, "digits", [1, 32, 32], episodes, False, ft))
        runs.append(_worker_run(ctx, f"{arch}-synthetic50k", arch, synth, [3, 32, 32], episodes, True, 0))
    growth: dict[str, list[dict[str, Any]]] = {}
    if not ctx.quick:
        growth["episodes"] = [
            _worker_run(ctx, f"resnet20-digits-{e}ep", "resnet20", "digits", [1, 32, 32], e, True, 0)
            for e in (5, 20, 80)
        ]
        synth10k = str(synthetic_cifar(ctx, 10_000))
        growth["dataset"] = [
            _worker_run(
                ctx, f"resnet56-synthetic{n // 1000}k", "resnet56", path, [3, 32, 32], episodes, True, 0
            )
            for n, path in ((10_000, synth10k), (50_000, synth))
        ]
    return {"runs": runs, "growth": growth, "synthetic_note": "random uint8 images and labels (synthetic)"}


# ---------------------------------------------------------------------------------------------- web
def _proc_status(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                k, v = line.split(":", 1)
                out[k] = int(v.split()[0]) * 1024
    return out


def _maps_torch(pid: int) -> bool:
    with open(f"/proc/{pid}/maps", encoding="utf-8") as f:
        return any("libtorch" in line or "/torch/_C" in line for line in f)


def _fill_run(stack: Stack, user, n: int):
    """A finished run with ``n`` episodes of a 22-layer ResNet-20 policy (as a real run stores them)."""
    from webapp.models import Dataset, Episode, Run, Target, UploadedModel

    model = UploadedModel.objects.create(
        owner=user,
        name=f"resnet20 ({n})",
        kind="zoo",
        zoo_arch="resnet20",
        status="ready",
        input_shape=[1, 32, 32],
        num_classes=10,
    )
    run = Run.objects.create(
        owner=user,
        name=f"{n} episodes",
        model=model,
        dataset=Dataset.objects.get(name="digits", owner=None),
        target=Target.objects.get(name="local-ort"),
        agent="amc",
        config={"agent": "amc", "objective": "latency", "budget": 0.5, "episodes": n},
        status="finished",
        episodes_total=n,
        episodes_done=n,
    )
    layers = [f"layer{s}.{b}.conv{c}" for s in (1, 2, 3) for b in range(3) for c in (1, 2)]
    layers = ["conv1", *layers, "layer2.0.shortcut.0", "layer3.0.shortcut.0", "fc"]
    rows = []
    for i in range(1, n + 1):
        keep = 0.1 + 0.9 * ((i * 7919) % 1000) / 1000
        policy = {
            "layers": {
                name: {"keep_ratio": keep, "w_bits": 32, "a_bits": 32, "sparsity": 0.0} for name in layers
            },
            "meta": {"layout": "prune"},
        }
        rows.append(Episode(
            run=run, number=i, stage="search", reward=0.9 - keep / 10, accuracy=0.9 - keep / 10, latency_ms=1.0 * keep,
            macs=int(4e7 * keep), bops=int(4e7 * keep * 1024), params=int(2.7e5 * keep), bytes=1.1e6 * keep,
            cost_ratio=keep, meets_budget=keep <= 0.5, is_best=False, policy=policy,
            raw_actions=[[keep]] * 12, enforced_actions=[[keep]] * 12, timings={"apply_s": 0.1}, wall_time_s=1.0,
        ))  # fmt: skip
    Episode.objects.bulk_create(rows, batch_size=1000)
    return run


def _get(url: str, cookie: str) -> tuple[int, int, float]:
    import urllib.request

    req = urllib.request.Request(url, headers={"Cookie": cookie})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=300) as r:
        body = r.read()
        return r.status, len(body), time.perf_counter() - t0


async def _ws_history(url: str, cookie: str, origin: str) -> int:
    import websockets

    async with websockets.connect(
        url, additional_headers={"Cookie": cookie, "Origin": origin}, max_size=2**26
    ) as ws:
        msg = json.loads(await ws.recv())
        n = len(msg.get("episodes", []))
        while msg.get("more"):  # a long history comes in parts under Daphne's 1 MiB message limit
            msg = json.loads(await ws.recv())
            n += len(msg.get("episodes", []))
        return n


_CLIENT_CHECK = """
import json, resource, sys
sys.path.insert(0, {root!r})
import django
django.setup()
from django.contrib.auth import get_user_model
from django.test import Client
c = Client()
c.force_login(get_user_model().objects.get(username="bench"))
codes = [c.get(u).status_code for u in {urls!r}]
print("CLIENT-RESULT " + json.dumps({{"codes": codes, "torch_in_sys_modules": "torch" in sys.modules,
      "maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}}))
"""


def web_memory(ctx: Context) -> dict[str, Any]:
    """daphne's memory serving run pages of growing runs, and whether it (or a view) imports torch."""
    import asyncio

    sizes = [500, 5000] if ctx.quick else [500, 5000, 20000]
    stack = Stack(ctx, "memory-web", threads=ctx.threads)
    missing = stack.check()
    if missing:
        return {"status": "not measured", "reason": "missing: " + ", ".join(missing)}
    out: dict[str, Any] = {"sizes": sizes, "steps": []}
    try:
        stack.start(web=True, worker=False)
        user = stack.user("bench")
        cookie = stack.cookie(user)
        pid = stack.web.pid
        time.sleep(2)
        out["idle"] = _proc_status(pid)
        urls = []
        for n in sizes:
            log(ctx, f"web memory: a run with {n} episodes")
            run = _fill_run(stack, user, n)
            page = f"/runs/{run.pk}/"
            api = f"/api/runs/{run.pk}/episodes/?limit=5000"
            overview = f"/api/runs/{run.pk}/episodes/?overview=1"
            urls += [page, api, overview]
            step: dict[str, Any] = {"episodes": n, "requests": {}}
            for label, u in (("run page", page), ("episodes API", api), ("overview API", overview)):
                code, size, secs = _get(stack.url + u, cookie)
                step["requests"][label] = {
                    "status": code,
                    "bytes": size,
                    "seconds": secs,
                    **_proc_status(pid),
                }
            ws = stack.url.replace("http://", "ws://") + f"/ws/runs/{run.pk}/"
            t0 = time.perf_counter()
            try:
                got: Any = asyncio.run(_ws_history(ws, cookie, stack.url))
            except Exception as exc:  # a failing stream is a finding, not the end of the benchmark
                got = f"failed: {type(exc).__name__}: {exc}"
                tail = stack.web.log_text()
                at = tail.rfind("Error: ")
                step["websocket_error"] = (tail[at:] if at >= 0 else tail[-300:]).splitlines()[0][:300]
            step["requests"]["websocket history"] = {
                "episodes": got,
                "seconds": time.perf_counter() - t0,
                **_proc_status(pid),
            }
            step["after"] = _proc_status(pid)
            out["steps"].append(step)
        out["daphne_maps_torch"] = _maps_torch(pid)
        out["peak_rss_bytes"] = _proc_status(pid)["VmHWM"]
        env = {**os.environ, **stack.env}
        p = subprocess.run(
            [sys.executable, "-c", _CLIENT_CHECK.format(root=str(ROOT), urls=urls)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        line = next((ln for ln in p.stdout.splitlines() if ln.startswith("CLIENT-RESULT ")), None)
        out["test_client"] = (
            json.loads(line[len("CLIENT-RESULT ") :]) if line else {"error": p.stderr[-1500:]}
        )
        out["status"] = "measured"
    except Exception as exc:
        out["status"] = "not measured"
        out["reason"] = f"{type(exc).__name__}: {exc}"
        if stack.web is not None:
            out["web_log_tail"] = stack.web.log_text()[-3000:]
        log(ctx, f"web memory failed: {out['reason']}")
    finally:
        stack.stop()
    return out


def run(ctx: Context) -> dict[str, Any]:
    """Run the memory benchmark and write ``bench/results/memory[-quick].json``."""
    result: dict[str, Any] = {}
    parts = ctx.options.get("parts") or ["web", "worker"]
    stored = ctx.results_dir / f"memory{'-quick' if ctx.quick else ''}.json"
    if stored.exists():  # a part not run now keeps its stored result (e.g. --parts worker after a fix)
        try:
            prev = json.loads(stored.read_text(encoding="utf-8"))
            result.update({k: prev[k] for k in ("web", "worker") if k in prev and k not in parts})
        except (OSError, ValueError):
            pass
    if "web" in parts:
        result["web"] = web_memory(ctx)
        write_result(ctx, "memory", result)
    if "worker" in parts:
        result["worker"] = worker_memory(ctx)
    result["goals"] = goals(result)
    publish(ctx, "memory", result, summarize)
    return result


def _failed(run: dict[str, Any]) -> bool:
    """A worker run whose search failed (refused its budget, crashed)."""
    return str(run.get("status", "")).startswith("error")


def goals(r: dict[str, Any]) -> dict[str, Any]:
    """The issue's memory goals checked against the measurements (None: not measured)."""
    out: dict[str, Any] = {}
    w = r.get("worker") or {}
    # a search that failed (refused its budget, crashed) measured nothing worth a verdict
    failed = [x for x in w.get("runs", []) if _failed(x)]
    r56 = [
        x
        for x in w.get("runs", [])
        if x.get("arch") == "resnet56" and "maxrss_bytes" in x and x not in failed
    ]
    out["worker_runs_failed"] = len(failed)
    out["worker_resnet56_under_2GiB"] = all(x["maxrss_bytes"] < 2 * GIB for x in r56) if r56 else None
    web = r.get("web") or {}
    if web.get("status") == "measured":
        out["web_under_250MiB"] = web["peak_rss_bytes"] < 250 * MIB
        tc = web.get("test_client", {})
        out["web_never_imports_torch"] = (not web["daphne_maps_torch"]) and tc.get(
            "torch_in_sys_modules"
        ) is False
    else:
        out["web_under_250MiB"] = out["web_never_imports_torch"] = None
    return out


def summarize(r: dict[str, Any]) -> str:
    """Markdown tables of a memory result."""
    lines = []
    w = r.get("worker")
    if w:
        rows = []
        for x in w["runs"] + [g for gs in w.get("growth", {}).values() for g in gs]:
            if "maxrss_bytes" not in x:
                rows.append([x["label"], x.get("status", "")[:80], "", "", "", ""])
                continue
            rows.append(
                [
                    x["label"],
                    x["episodes"],
                    ("search only" if x["stop_at_finalize"] else "search + finalize")
                    + (f" ({x['status'][:60]})" if _failed(x) else ""),
                    f"{x['maxrss_bytes'] / MIB:.0f}",
                    f"{x['seconds']:.0f}",
                    f"{x['load']['load1_mean']:.1f}",
                ]
            )
        lines.append(table(["worker run", "episodes", "phases", "peak RSS MiB", "seconds", "load"], rows))
    web = r.get("web")
    if web:
        lines.append("")
        if web.get("status") != "measured":
            lines.append(f"web: {web.get('status')}: {web.get('reason')}")
        else:
            idle = web["idle"]
            rows = [["idle", "", f"{idle['VmRSS'] / MIB:.0f}", f"{idle['VmHWM'] / MIB:.0f}", "", ""]]
            for s in web["steps"]:
                for label, q in s["requests"].items():
                    if "bytes" in q:
                        what = f"HTTP {q['status']}, {q['bytes'] / MIB:.1f} MiB"
                    elif s.get("websocket_error"):
                        what = "failed: " + s["websocket_error"].split("\n")[0][7:110]
                    else:
                        what = f"{q.get('episodes')} episodes"
                    rows.append(
                        [
                            f"{s['episodes']} episodes",
                            label,
                            f"{q['VmRSS'] / MIB:.0f}",
                            f"{q['VmHWM'] / MIB:.0f}",
                            f"{q['seconds']:.2f}",
                            what,
                        ]
                    )
            lines.append(
                table(["web process", "request", "RSS MiB", "peak MiB", "seconds", "response"], rows)
            )
            tc = web.get("test_client", {})
            lines.append(
                f"\ndaphne maps libtorch: {web['daphne_maps_torch']}; test client process has torch in "
                f"sys.modules: {tc.get('torch_in_sys_modules')}"
            )
    lines.append(f"\ngoals: {r.get('goals')}")
    return "\n".join(lines)
