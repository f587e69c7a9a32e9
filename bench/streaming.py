"""Benchmark 5, live streaming: time from an episode being recorded to it reaching connected websocket
clients, with 1 and 50 clients, and how much 50 watchers slow the search.

The product's own processes run (``bench/stack.py``: Redis, SQLite, daphne, a Celery search worker). For
each scenario a run is created, N websocket clients sign in with a session cookie and connect to
``/ws/runs/<id>/`` (history first, then increments), and the run is queued. The worker writes each episode
to the database (``Episode.created_at``: the moment it is recorded) and publishes it through the Redis
channel layer; every client stamps each episode message on arrival. Delivery latency = arrival minus
``created_at`` (one machine, one clock). The search's speed is the episode rate between the first and the
last recorded episode; scenarios with 0, 1 and 50 clients run one after the other with the same search
(same model, seed and settings), so the comparison is side by side; the web process's CPU time per
scenario is recorded too.

The search itself: the trained ResNet-20/digits ``.pt2``, random agent, channel pruning at 50% of the MACs
on the ``analytic`` target (no latency table, so episode times do not depend on which table entries
another run measured first).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from typing import Any

from bench.common import Context, LoadSampler, fmt, log, publish, resnet20_digits, table, write_result
from bench.stack import Stack

SUBPROCESS = True  # Django is configured once per process: run.py starts this benchmark in its own


def _percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * p
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


async def _client(
    url: str,
    cookie: str,
    origin: str,
    arrivals: dict[int, float],
    ready: asyncio.Event,
    done: asyncio.Event,
    timeout_s: float,
) -> dict[str, Any]:
    import websockets

    history = None
    async with websockets.connect(
        url, additional_headers={"Cookie": cookie, "Origin": origin}, max_size=2**24, open_timeout=60
    ) as ws:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                raw = await asyncio.wait_for(ws.recv(), timeout=1.0)
            except TimeoutError:
                if done.is_set():
                    break
                continue
            now = time.time()
            msg = json.loads(raw)
            if msg.get("type") == "history":
                history = len(msg.get("episodes", []))
                ready.set()
            elif msg.get("type") == "episode":
                arrivals.setdefault(int(msg["episode"]["number"]), now)
            elif msg.get("type") == "status" and msg["run"]["status"] in ("finished", "failed", "cancelled"):
                done.set()
                break
    return {"history_episodes": history, "received": len(arrivals)}


async def _scenario(stack: Stack, run, clients: int, cookie: str, timeout_s: float) -> dict[str, Any]:
    from asgiref.sync import sync_to_async

    from workers import dispatch

    url = stack.url.replace("http://", "ws://") + f"/ws/runs/{run.pk}/"
    arrivals = [dict() for _ in range(clients)]
    readies = [asyncio.Event() for _ in range(clients)]
    done = asyncio.Event()
    tasks = [
        asyncio.create_task(_client(url, cookie, stack.url, arrivals[i], readies[i], done, timeout_s))
        for i in range(clients)
    ]
    if clients:
        await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), 120)
    await sync_to_async(dispatch.enqueue_run)(run)

    async def finished() -> None:
        from webapp.models import Run

        while True:
            status = await sync_to_async(lambda: Run.objects.get(pk=run.pk).status)()
            if status in ("finished", "failed", "cancelled"):
                done.set()
                return
            await asyncio.sleep(1.0)

    await asyncio.wait_for(finished(), timeout_s)
    infos = await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "arrivals": arrivals,
        "clients": [i if isinstance(i, dict) else {"error": repr(i)} for i in infos],
    }


def run(ctx: Context) -> dict[str, Any]:
    """Run the streaming benchmark and write ``bench/results/streaming[-quick].json``."""
    import psutil

    episodes = int(ctx.opt("episodes", 12, 60))
    scenarios = [0, 1, 50] if ctx.quick else [0, 1, 50, 0, 50]
    stack = Stack(ctx, "streaming", threads=ctx.threads)
    missing = stack.check()
    result: dict[str, Any] = {"episodes": episodes, "scenarios": []}
    if missing:
        result["status"] = "not measured"
        result["reason"] = "missing: " + ", ".join(missing)
        write_result(ctx, "streaming", result)
        log(ctx, f"streaming not measured: {result['reason']}")
        return result
    bm = resnet20_digits(ctx)
    try:
        stack.start()
        from webapp.models import Episode

        user = stack.user()
        cookie = stack.cookie(user)
        model = stack.uploaded_model(user, bm.spec)
        config = {
            "agent": "random", "layout": "prune", "dataset": "digits", "objective": "macs", "budget": 0.5,
            "episodes": episodes, "seed": 0, "top_k": 1, "fine_tune_epochs": 0, "checkpoint_every": episodes,
            "export_formats": ["pt2"],
        }  # fmt: skip
        web = psutil.Process(stack.web.pid)
        for i, clients in enumerate(scenarios):
            run_row = stack.run_row(
                user, model, {**config, "name": f"stream {clients} clients #{i}"}, "analytic"
            )
            log(ctx, f"scenario {i + 1}/{len(scenarios)}: {clients} client(s), run {run_row.pk}")
            cpu0 = sum(web.cpu_times()[:2])
            with LoadSampler() as load:
                out = asyncio.run(_scenario(stack, run_row, clients, cookie, timeout_s=3600))
            web_cpu = sum(web.cpu_times()[:2]) - cpu0
            run_row.refresh_from_db()
            rows = list(
                Episode.objects.filter(run=run_row)
                .order_by("number")
                .values_list("number", "created_at", "wall_time_s")
            )
            recorded = {n: t.timestamp() for n, t, _ in rows}
            lat = [a[n] - recorded[n] for a in out["arrivals"] for n in a if n in recorded]
            missed = sum(1 for a in out["arrivals"] for n in recorded if n not in a)
            span = rows[-1][1].timestamp() - rows[0][1].timestamp() if len(rows) > 1 else None
            sc = {
                "clients": clients,
                "run": run_row.pk,
                "status": run_row.status,
                "error": run_row.error,
                "episodes": len(rows),
                "deliveries": len(lat),
                "missed": missed,
                "latency_ms": {
                    "p50": _ms(_percentile(lat, 0.5)),
                    "p95": _ms(_percentile(lat, 0.95)),
                    "max": _ms(max(lat) if lat else None),
                    "mean": _ms(statistics.fmean(lat) if lat else None),
                },
                "episodes_per_min": 60.0 * (len(rows) - 1) / span if span else None,
                "mean_episode_wall_s": statistics.fmean(w for _, _, w in rows) if rows else None,
                "web_cpu_s": web_cpu,
                "web_rss_bytes": web.memory_info().rss,
                "client_info": out["clients"][:3],
                "load": load.summary(),
            }
            result["scenarios"].append(sc)
            log(
                ctx,
                f"  {clients} client(s): p50 {fmt(sc['latency_ms']['p50'], '.1f')} ms, "
                f"p95 {fmt(sc['latency_ms']['p95'], '.1f')} ms, {fmt(sc['episodes_per_min'], '.1f')} ep/min",
            )
            write_result(ctx, "streaming", result)
        result["status"] = "measured"
    except Exception as exc:
        result["status"] = "not measured"
        result["reason"] = f"{type(exc).__name__}: {exc}"
        if stack.worker is not None:
            result["worker_log_tail"] = stack.worker.log_text()[-3000:]
        if stack.web is not None:
            result["web_log_tail"] = stack.web.log_text()[-3000:]
        log(ctx, f"streaming failed: {result['reason']}")
    finally:
        stack.stop()
    publish(ctx, "streaming", result, summarize)
    return result


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


def summarize(r: dict[str, Any]) -> str:
    """Markdown table of a streaming result."""
    if r.get("status") != "measured" and not r.get("scenarios"):
        return f"streaming: {r.get('status')}: {r.get('reason')}"
    rows = []
    for s in r["scenarios"]:
        lm = s["latency_ms"]
        rows.append(
            [
                s["clients"],
                s["episodes"],
                s["deliveries"],
                s["missed"],
                fmt(lm["p50"], ".1f"),
                fmt(lm["p95"], ".1f"),
                fmt(lm["max"], ".1f"),
                fmt(s["episodes_per_min"], ".1f"),
                f"{s['web_cpu_s']:.1f}",
                f"{s['load']['load1_mean']:.1f}",
            ]
        )
    return table(
        [
            "clients",
            "episodes",
            "deliveries",
            "missed",
            "p50 ms",
            "p95 ms",
            "max ms",
            "ep/min",
            "web CPU s",
            "load",
        ],
        rows,
    )
