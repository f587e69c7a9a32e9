"""Celery tasks: each takes ids, calls one engine function, writes the result to the database, then
publishes it. All are idempotent: running one twice (redelivery after a crash, a duplicate from the reaper)
does no harm.

- ``run_search(run_id)``: the search and its finalize phase; episodes are written with
  ``update_or_create`` on (run, number), so episodes replayed after a resume overwrite themselves with the
  same values; a per-run lease (``workers.lease``) keeps a second copy from running beside a live one.
- ``inspect_model(model_id)``, ``train_baseline(model_id, dataset_id, ...)``, ``inspect_dataset(dataset_id)``,
  ``benchmark(benchmark_id)``, ``check_target(target_id)``: short jobs that restart from scratch when
  redelivered.

The engine is imported inside the tasks: the worker's main process (and the web process, which imports
this module to send tasks by name only through ``workers.dispatch``) never loads torch.
"""

from __future__ import annotations

import csv
import logging
import os
import socket
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from celery import shared_task
from django.db import close_old_connections, transaction
from django.utils import timezone

from webapp import events
from webapp.models import Benchmark, Dataset, Episode, Run, RunArtifact, RunLog, Target, UploadedModel
from workers import lease as leases
from workers.lease import LeaseLost

log = logging.getLogger(__name__)

# A run whose worker crashed this many times in a row is failed instead of resumed again (a model that
# crashes the process, e.g. a native segfault, would otherwise loop forever).
MAX_ATTEMPTS = int(os.environ.get("RUN_MAX_ATTEMPTS", "5"))
# starts of one model's inspection before it is marked failed (the first, and one redelivery after a lost worker)
INSPECT_MAX_ATTEMPTS = 2
NO_CHECKPOINT_MESSAGE = (
    "the worker running this search stopped (killed or crashed) before the first checkpoint; start it again"
)
TASK_OPTIONS = {"acks_late": True, "reject_on_worker_lost": True, "ignore_result": True}


def worker_name(task=None) -> str:
    """``host:pid`` (plus Celery's node name when known): which process holds a run."""
    node = getattr(getattr(task, "request", None), "hostname", None) or socket.gethostname()
    return f"{node}:{os.getpid()}"


# --------------------------------------------------------------------------------------------------------
# run_search
# --------------------------------------------------------------------------------------------------------
class _LogCapture(logging.Handler):
    """Collects the engine's log records (any thread) until the run's recorder writes them to RunLog."""

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.lock_ = threading.Lock()
        self.pending: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
        except Exception:
            msg = str(record.msg)
        level = record.levelname.lower()
        if level not in ("debug", "info", "warning", "error"):
            level = "error" if record.levelno >= logging.ERROR else "info"
        with self.lock_:
            self.pending.append((level, msg))

    def take(self) -> list[tuple[str, str]]:
        with self.lock_:
            out, self.pending = self.pending, []
        return out


class RunRecorder:
    """The search callback of a Celery run: writes each event to the database (under the lease), then
    publishes it to the run's live stream."""

    CANCEL_POLL_S = 0.5

    def __init__(self, run: Run, token: str, heartbeat: leases.Heartbeat, capture: _LogCapture) -> None:
        self.run = run
        self.token = token
        self.heartbeat = heartbeat
        self.capture = capture
        self._last_cancel_check = 0.0
        self._flush_lock = threading.Lock()

    # -- helpers ------------------------------------------------------------------------------------------
    def update(self, **fields) -> None:
        """Write run fields under the lease and mirror them on the in-memory run."""
        leases.update_run(self.run.pk, self.token, **fields)
        for name, value in fields.items():
            setattr(self.run, name, value)

    def log(self, message: str, level: str = "info") -> None:
        """Append a line to the run's log and stream it."""
        self.flush_logs()
        line = RunLog.append(self.run, message, level)
        events.publish_log(self.run, [line])

    def flush_logs(self) -> None:
        """Write the engine's captured log lines (safe from any thread)."""
        with self._flush_lock:
            pending = self.capture.take()
            if not pending:
                return
            lines = [RunLog.append(self.run, msg, level) for level, msg in pending]
        events.publish_log(self.run, lines)

    def publish_status(self) -> None:
        """Send the run's status to viewers."""
        events.publish_status(self.run)

    # -- SearchCallback hooks -----------------------------------------------------------------------------
    def on_start(self, info: dict[str, Any]) -> None:
        """Store the baseline facts; on a resume, say from where."""
        resumed = int(info.get("resumed_from") or 0)
        clean = _jsonable(info)
        self.update(start_info=clean, episodes_done=resumed, phase="search")
        acc = info.get("original_accuracy")
        text = f"setup done in {info.get('setup_s', 0):.1f} s on {self.run.worker}"
        if acc is not None:
            sizes = info.get("search_set") or {}
            where = (
                f"{sizes.get('validation', 0)} validation + {sizes.get('training', 0)} training images"
                if sizes.get("training")
                else "the validation images"
            )
            text += f"; original accuracy {acc:.4f} on the search set ({where})"
        if resumed:
            text += f"; resumed from the checkpoint at episode {resumed}"
        self.log(text)
        for warning in info.get("warnings") or []:
            self.log(str(warning), "warning")
        self.publish_status()

    def on_episode(self, result) -> None:
        """Write the episode (idempotent on (run, number)), update progress and best, then publish."""
        d = result.to_dict() if hasattr(result, "to_dict") else dict(result)
        number = int(d["episode"])
        with transaction.atomic():
            episode, _ = Episode.objects.update_or_create(
                run=self.run, number=number, defaults=Episode.defaults_from_result(_jsonable(d))
            )
            event = episode.to_event()
            fields: dict[str, Any] = {"episodes_done": number}
            if episode.is_best or self.run.best is None:
                fields["best"] = event
            self.update(**fields)  # raises LeaseLost (rolling the episode back) if the run is not ours
        self.flush_logs()
        events.publish_episode(self.run, event)
        self.publish_status()

    def on_checkpoint(self, episode: int, path: str) -> None:
        """Remember how far a resume would start."""
        self.update(checkpoint_episode=int(episode))

    def on_phase(self, phase: str, info: dict[str, Any]) -> None:
        """Search, then finalize / measure / export (status ``finalizing``)."""
        status = "running" if phase == "search" else "finalizing"
        self.update(phase=phase, status=status)
        if phase != "search":
            detail = ", ".join(f"{k}={v}" for k, v in (info or {}).items())
            self.log(f"phase {phase}" + (f": {detail}" if detail else ""))
        self.publish_status()

    def on_finish(self, summary: dict[str, Any]) -> None:
        """Nothing here: the task stores the summary after run_search returns."""

    def should_stop(self) -> bool:
        """True when cancel was requested or the lease was lost (checked at most every 0.5 s)."""
        if self.heartbeat.stop_requested:
            return True
        now = time.monotonic()
        if now - self._last_cancel_check >= self.CANCEL_POLL_S:
            self._last_cancel_check = now
            self.heartbeat.beat()
        return self.heartbeat.stop_requested


def _shipped_best(run: Run, report: dict[str, Any]) -> dict[str, Any]:
    """``best`` for a finished run: the episode the finalize step chose and exported (``chosen``), not the highest
    reward of the search, which the device check may have dropped as over the budget or the fine-tune may have
    ranked below another candidate. Empty when the report names no episode that was recorded."""
    number = report.get("best_episode")
    episode = Episode.objects.filter(run=run, number=number).first() if number is not None else None
    if episode is None:
        return {}
    event = episode.to_event()
    event["chosen"] = True
    if number != (run.best or {}).get("number"):
        event["highest_reward_episode"] = (run.best or {}).get("number")
    return {"best": event}


def _jsonable(value: Any) -> Any:
    """Plain JSON types (tuples to lists, numpy scalars to Python numbers, NaN/inf to None)."""
    import math

    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "item"):
        return _jsonable(value.item())
    return str(value)


def search_config(run: Run) -> dict[str, Any]:
    """The run's SearchConfig dict with this machine's model, dataset and target specs filled in."""
    config = dict(run.config or {})
    config["model"] = run.model.spec()
    config["dataset"] = run.dataset.spec()
    config["target"] = run.target.engine_spec()
    config.setdefault("agent", run.agent)
    return config


def error_kind(exc: BaseException) -> str:
    """``Run.error_kind`` of an exception: ``device`` for a target's error (it may pass once the device is back),
    ``input`` for the model, dataset or settings (the same run fails the same way again), else ``internal``."""
    from compression.errors import CompressionError, TargetError

    if isinstance(exc, TargetError):
        return "device"
    if isinstance(exc, CompressionError):
        return "input"
    return "internal"


def _fail(run_id: int, message: str, token: str | None = None, kind: str = "internal") -> None:
    """Mark a run failed (under the lease when one is held), keep what it found so far, and tell viewers."""
    qs = Run.objects.filter(pk=run_id)
    if token:
        qs = qs.filter(lease=token)
    failed = qs.update(status="failed", error=message, error_kind=kind, finished_at=timezone.now(), phase="")
    run = Run.objects.get(pk=run_id)
    line = RunLog.append(run, message, "error")
    if failed:  # not when another worker holds the run now: its directory is that worker's
        store_partial_artifacts(run)
    events.publish_log(run, [line])
    events.publish_status(run)


@shared_task(bind=True, name="workers.tasks.run_search", **TASK_OPTIONS)
def run_search(self, run_id: int) -> str:
    """Run (or resume) a run's search and finalize phase; returns what happened, in words."""
    run = Run.objects.select_related("model", "dataset", "target").filter(pk=run_id).first()
    if run is None:
        return f"run {run_id} does not exist"
    if run.status in Run.TERMINAL:
        return f"run {run_id} is already {run.status}"
    me = worker_name(self)
    token = leases.acquire(run_id, me)
    if token is None:
        return f"run {run_id} is being executed by {Run.objects.get(pk=run_id).worker}"
    try:
        return _run_search_holding(self, run_id, token, me)
    finally:
        leases.release(run_id, token)


def _run_search_holding(task, run_id: int, token: str, me: str) -> str:
    run = Run.objects.select_related("model", "dataset", "target").get(pk=run_id)
    if run.status in Run.TERMINAL:
        return f"run {run_id} is already {run.status}"
    out = run.out_path
    checkpoint = out / "checkpoint.pt"
    if run.status in ("running", "finalizing") and not checkpoint.exists():
        # The previous holder vanished (its heartbeat went stale) before writing a checkpoint.
        _fail(run_id, NO_CHECKPOINT_MESSAGE, token, "worker")
        return "failed: " + NO_CHECKPOINT_MESSAGE
    if run.attempts >= MAX_ATTEMPTS:
        msg = (
            f"the worker stopped {run.attempts} times while running this search (a crash inside PyTorch, or the "
            "machine ran out of memory); it is not resumed automatically again: Resume continues it from its "
            "last checkpoint"
        )
        _fail(run_id, msg, token, "worker")
        return "failed: " + msg
    if run.cancel_requested:
        leases.update_run(run_id, token, status="cancelled", finished_at=timezone.now(), phase="")
        run.refresh_from_db()
        store_partial_artifacts(run)  # a requeued run (its worker died) may have episodes already
        events.publish_status(run)
        return "cancelled before it started"

    resuming = checkpoint.exists()
    now = timezone.now()
    leases.update_run(
        run_id,
        token,
        status="running",
        attempts=run.attempts + 1,
        started_at=run.started_at or now,
        finished_at=None,
        error="",
        task_id=getattr(task.request, "id", None) or run.task_id,
        worker=me,
        out_dir=run.out_dir or f"run-{run_id}",
        episodes_total=int((run.config or {}).get("episodes") or run.episodes_total or 0),
    )
    run.refresh_from_db()
    capture = _LogCapture()
    engine_log = logging.getLogger("compression")
    engine_log.addHandler(capture)
    if engine_log.level == logging.NOTSET or engine_log.level > logging.INFO:
        engine_log.setLevel(logging.INFO)
    heartbeat = leases.Heartbeat(run_id, token)
    recorder = RunRecorder(run, token, heartbeat, capture)
    flusher = _PeriodicFlush(recorder)
    try:
        with heartbeat, flusher:
            recorder.log(
                ("resuming" if resuming else "starting")
                + f" on {me} (attempt {run.attempts}); output in {out}"
            )
            events.publish_status(run)
            from compression.search.loop import run_search as engine_run_search
            from compression.search.results import SearchConfig

            config = SearchConfig.from_dict(search_config(run))
            report = engine_run_search(config, str(out), [recorder], resume=True)
            recorder.flush_logs()
            if heartbeat.lost.is_set():
                raise LeaseLost(f"run {run_id}: lease lost")
            if report.get("status") == "cancelled":
                recorder.update(status="cancelled", finished_at=timezone.now(), phase="")
                recorder.log(
                    f"cancelled after episode {report.get('episodes_done')} of {report.get('episodes_total')}"
                    " (the checkpoint is kept: resume continues from it)"
                )
                run.refresh_from_db()
                store_partial_artifacts(run)
                recorder.publish_status()
                return "cancelled"
            store_artifacts(run, report)
            recorder.update(
                status="finished",
                summary=_jsonable(report),
                finished_at=timezone.now(),
                phase="",
                episodes_done=run.episodes_total or run.episodes_done,
                **_shipped_best(run, report),
            )
            recorder.log("finished")
            write_log_artifact(run)
            recorder.publish_status()
            return "finished"
    except LeaseLost:
        log.warning("run %s: another worker took over; this copy stops", run_id)
        return "lease lost"
    except Exception as exc:
        from compression.errors import CompressionError

        recorder.flush_logs()
        if isinstance(exc, CompressionError):
            message = str(exc)
        else:
            log.exception("run %s failed", run_id)
            RunLog.append(run, traceback.format_exc()[-8000:], "error")
            message = f"internal error in the worker: {type(exc).__name__}: {exc}"
        _fail(run_id, message, token, error_kind(exc))
        write_log_artifact(run)
        return "failed: " + message
    finally:
        engine_log.removeHandler(capture)


class _PeriodicFlush:
    """Streams the engine's log lines every second while the search runs (setup can take a while before
    the first episode, and its progress lines should not wait for it)."""

    def __init__(self, recorder: RunRecorder, interval_s: float = 1.0) -> None:
        self.recorder = recorder
        self.interval_s = interval_s
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="log-flush", daemon=True)

    def __enter__(self) -> _PeriodicFlush:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        from django.db import connection

        try:
            while not self._done.wait(self.interval_s):
                try:
                    close_old_connections()
                    self.recorder.flush_logs()
                except Exception as exc:
                    log.warning("log flush failed: %s", exc)
        finally:
            connection.close()


# --------------------------------------------------------------------------------------------------------
# artifacts
# --------------------------------------------------------------------------------------------------------
KIND_BY_NAME = {
    "model.pt2": "pt2",
    "model.onnx": "onnx",
    "model.int8.onnx": "int8.onnx",
    "model.tvm.tar": "tvm",
    "report.json": "report",
    "best_policy.json": "policy",
    "episodes.csv": "episodes.csv",
    "episodes.jsonl": "episodes.jsonl",
    "run.log": "log",
}
HOW_TO_LOAD = {
    "policy": "compression.policy.Policy.from_json(open('best_policy.json').read()); "
    "python -m compression apply MODEL --policy best_policy.json",
    "episodes.csv": "pandas.read_csv('episodes.csv') or any spreadsheet; one row per search episode",
    "episodes.jsonl": "[json.loads(line) for line in open('episodes.jsonl')]: the engine's EpisodeResult records",
    "log": "plain text",
    "report": "json.load(open('report.json'))",
}
CSV_COLUMNS = [
    "number", "stage", "reward", "accuracy", "latency_ms", "macs", "bops", "params", "bytes",
    "cost_ratio", "meets_budget", "is_best", "wall_time_s",
]  # fmt: skip


def _kind(rel: str, fmt: str | None) -> str:
    name = Path(rel).name
    if name in KIND_BY_NAME:
        return KIND_BY_NAME[name]
    valid = {k for k, _ in RunArtifact.KIND_CHOICES}
    return fmt if fmt in valid else "other"


def _record_artifact(run: Run, path: Path, kind: str | None = None, note: str = "", how: str = "") -> None:
    out = run.out_path.resolve()
    path = path.resolve()
    if not path.is_file() or out not in path.parents:
        return
    rel = str(path.relative_to(out))
    kind = kind or _kind(rel, None)
    RunArtifact.objects.update_or_create(
        run=run,
        path=rel,
        defaults={
            "kind": kind,
            "bytes": path.stat().st_size,
            "note": note,
            "how_to_load": how or HOW_TO_LOAD.get(kind, ""),
        },
    )


def write_episodes_csv(run: Run) -> Path:
    """``episodes.csv`` from the database rows (one per episode, in order) into the run's directory."""
    path = run.out_path / "episodes.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS + ["policy"])
        for ep in Episode.objects.filter(run=run).order_by("number").iterator():
            import json

            writer.writerow([getattr(ep, c) for c in CSV_COLUMNS] + [json.dumps(ep.policy, sort_keys=True)])
    os.replace(tmp, path)
    return path


def write_log_artifact(run: Run) -> None:
    """The run's log as ``run.log`` in its directory (also a download)."""
    path = run.out_path / "run.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for line in RunLog.objects.filter(run=run).order_by("seq").iterator():
            f.write(
                f"{line.created_at.isoformat(timespec='seconds')} {line.level.upper():7} {line.message}\n"
            )
    _record_artifact(run, path, "log", "the run's log")


def store_artifacts(run: Run, report: dict[str, Any]) -> None:
    """RunArtifact rows for the report's files, the standard outputs and ``episodes.csv`` (real sizes)."""
    out = run.out_path
    seen: set[Path] = set()
    for f in report.get("files") or []:
        p = Path(f["path"])
        p = p if p.is_absolute() else out / p
        seen.add(p.resolve())
        _record_artifact(
            run, p, _kind(p.name, f.get("format")), str(f.get("note") or ""), str(f.get("how") or "")
        )
    write_episodes_csv(run)
    for name, note in (
        ("report.json", "the final report: configuration, accuracy, costs, latency, timings"),
        ("best_policy.json", "the chosen per-layer policy"),
        ("episodes.csv", "every search episode (from the database)"),
        ("episodes.jsonl", "every search episode as the engine wrote it"),
    ):
        p = (out / name).resolve()
        if p not in seen:
            _record_artifact(run, p, KIND_BY_NAME[name], note)


def _partial_policy_note(best: dict[str, Any]) -> str:
    """What the best-so-far ``best_policy.json`` of a stopped run is (``RunArtifact.PARTIAL_NOTE`` first)."""
    number = best.get("number")
    if best.get("is_best") or best.get("meets_budget"):
        what = f"the highest-reward policy within the budget so far (episode {number})"
    else:
        what = f"episode {number}'s policy: no episode had met the budget yet"
    return f"{RunArtifact.PARTIAL_NOTE}: {what}; not checked on the device, fine-tuned or exported"


def store_partial_artifacts(run: Run) -> None:
    """What a cancelled or failed run found before it stopped, as downloads: the best policy so far
    (``best_policy.json``, unless the finalize step already wrote the chosen one), every episode as CSV, the
    engine's ``episodes.jsonl`` and the log. Their notes start with ``RunArtifact.PARTIAL_NOTE``; a resume removes
    them (``dispatch.resume_run``) and a finished run records its own. Never raises: a run that stops must stop
    even when its directory cannot be written, and one download that fails does not take the others with it."""
    out = run.out_path
    best = run.best or {}
    path = out / "best_policy.json"

    def policy() -> None:
        if path.exists():
            # the finalize step had chosen (and written) its policy when the run stopped
            _record_artifact(
                run, path, "policy", f"{RunArtifact.PARTIAL_NOTE}: the policy the finalize step chose"
            )
        elif best.get("policy"):
            from compression.policy import Policy

            out.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(Policy.from_dict(best["policy"]).to_json(indent=2), encoding="utf-8")
            os.replace(tmp, path)
            _record_artifact(run, path, "policy", _partial_policy_note(best))

    def episodes() -> None:
        if Episode.objects.filter(run=run).exists():
            note = f"{RunArtifact.PARTIAL_NOTE}: every episode up to the stop (from the database)"
            _record_artifact(run, write_episodes_csv(run), "episodes.csv", note)
        note = f"{RunArtifact.PARTIAL_NOTE}: every episode as the engine wrote it"
        _record_artifact(run, out / "episodes.jsonl", "episodes.jsonl", note)

    for step in (policy, episodes, lambda: write_log_artifact(run)):
        try:
            step()
        except Exception:  # a stop must not fail on its downloads
            log.exception("run %s: could not store a download of what it found so far", run.pk)


# --------------------------------------------------------------------------------------------------------
# models, datasets, targets, benchmarks
# --------------------------------------------------------------------------------------------------------
def _model_fail(model_id: int, message: str) -> None:
    UploadedModel.objects.filter(pk=model_id).update(status="failed", error=message)


@shared_task(bind=True, name="workers.tasks.inspect_model", **TASK_OPTIONS)
def inspect_model(self, model_id: int) -> str:
    """Load the model safely and store its layer table (``compression.pipeline.inspect_model``)."""
    model = UploadedModel.objects.filter(pk=model_id).first()
    if model is None:
        return f"model {model_id} does not exist"
    # a model that kills the worker process (a native crash inside PyTorch) comes back redelivered: count the
    # starts, and give up with a message instead of crashing worker after worker for ever
    progress = dict(model.progress or {})
    attempts = int(progress.get("_inspect_attempts", 0)) + 1
    if attempts > INSPECT_MAX_ATTEMPTS:
        message = (
            f"the worker process died {attempts - 1} times while inspecting this model (a crash inside PyTorch, "
            "or the machine ran out of memory): it cannot be inspected here; the workers are unaffected"
        )
        _model_fail(model_id, message)
        log.error("model %s: %s", model_id, message)
        return "failed: " + message
    progress["_inspect_attempts"] = attempts
    UploadedModel.objects.filter(pk=model_id).update(status="inspecting", error="", progress=progress)
    from compression.errors import CompressionError
    from compression.pipeline import inspect_model as engine_inspect

    try:
        table = engine_inspect(model.spec(), **model.engine_kwargs())
    except CompressionError as exc:
        _model_fail(model_id, str(exc))
        return f"failed: {exc}"
    except Exception as exc:
        log.exception("inspection of model %s failed", model_id)
        _model_fail(model_id, f"internal error while inspecting: {type(exc).__name__}: {exc}")
        return "failed"
    _store_inspection(model, table)
    return "ready"


def _store_inspection(model: UploadedModel, table: dict[str, Any]) -> None:
    size = 0
    for f in (model.file, model.weights_file):
        if f:
            try:
                size += f.size
            except OSError:
                pass
    UploadedModel.objects.filter(pk=model.pk).update(
        status="ready",
        error="",
        inspection=_jsonable(table),
        input_shape=list(table.get("input_shape") or model.input_shape or []) or None,
        num_classes=table.get("num_classes") or model.num_classes,
        size_bytes=size,
    )


@shared_task(bind=True, name="workers.tasks.train_baseline", **TASK_OPTIONS)
def train_baseline(
    self,
    model_id: int,
    dataset_id: int | None = None,
    epochs: int = 15,
    lr: float = 0.05,
    batch_size: int = 64,
    seed: int = 0,
    input_shape: list[int] | None = None,
) -> str:
    """Train the model's zoo architecture on a dataset, save a ``.pt2`` (+ ``.pth``) and inspect it.

    Arguments not given are read from ``model.train_config`` (which the dashboard fills). A redelivered
    task trains again from scratch (training is minutes; a half-written file is replaced).
    """
    model = UploadedModel.objects.filter(pk=model_id).first()
    if model is None:
        return f"model {model_id} does not exist"
    cfg = dict(model.train_config or {})
    dataset_id = dataset_id or cfg.get("dataset_id")
    dataset = (
        Dataset.objects.filter(pk=dataset_id).first() if dataset_id else Dataset.objects.get(kind="builtin")
    )
    arch = model.zoo_arch or cfg.get("arch")
    shape = input_shape or cfg.get("input_shape") or model.input_shape
    params = {
        "epochs": int(cfg.get("epochs", epochs)),
        "lr": float(cfg.get("lr", lr)),
        "batch_size": int(cfg.get("batch_size", batch_size)),
        "seed": int(cfg.get("seed", seed)),
    }
    from compression.errors import CompressionError
    from compression.pipeline import inspect_model as engine_inspect
    from compression.pipeline import train_baseline as engine_train
    from webapp.storage import private_storage, upload_path

    rel = upload_path("models", model.owner_id, f"{arch}-{dataset.name}.pt2")
    out_path = Path(private_storage().path(rel))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    UploadedModel.objects.filter(pk=model_id).update(
        status="training",
        error="",
        progress={"epoch": 0, "epochs": params["epochs"]},
        train_config={**cfg, **params, "arch": arch, "dataset_id": dataset.pk, "input_shape": shape},
    )
    last = [0.0]

    def progress(step: int, total: int, stats: dict) -> None:
        # the engine reports optimiser steps (``training.train``); the page shows the epoch among the epochs
        now = time.monotonic()
        if now - last[0] < 1.0 and step < total:
            return
        last[0] = now
        close_old_connections()
        stats = _jsonable(stats or {})
        UploadedModel.objects.filter(pk=model_id).update(
            progress={
                "epoch": stats.pop("epoch", None),
                "epochs": params["epochs"],
                "step": step,
                "steps": total,
                **stats,
            }
        )

    try:
        result = engine_train(
            arch,
            dataset.spec(),
            str(out_path),
            input_shape=tuple(shape) if shape else None,
            progress=progress,
            **params,
        )
        weights_rel = str(Path(rel).with_suffix(".pth"))
        UploadedModel.objects.filter(pk=model_id).update(
            kind="pt2",
            zoo_arch=arch,
            file=rel,
            weights_file=weights_rel,
            status="inspecting",
            progress={"epoch": params["epochs"], "epochs": params["epochs"], "result": _jsonable(result)},
        )
        model.refresh_from_db()
        table = engine_inspect(model.spec())
    except CompressionError as exc:
        _model_fail(model_id, str(exc))
        return f"failed: {exc}"
    except Exception as exc:
        log.exception("training model %s failed", model_id)
        _model_fail(model_id, f"internal error while training: {type(exc).__name__}: {exc}")
        return "failed"
    _store_inspection(model, table)
    return "ready"


@shared_task(bind=True, name="workers.tasks.inspect_dataset", **TASK_OPTIONS)
def inspect_dataset(self, dataset_id: int) -> str:
    """Read an uploaded dataset's metadata (``compression.data.describe_dataset``) and mark it ready."""
    ds = Dataset.objects.filter(pk=dataset_id).first()
    if ds is None:
        return f"dataset {dataset_id} does not exist"
    from compression.data import describe_dataset
    from compression.errors import CompressionError

    try:
        meta = describe_dataset(ds.spec())
    except CompressionError as exc:
        Dataset.objects.filter(pk=dataset_id).update(status="failed", error=str(exc))
        return f"failed: {exc}"
    except Exception as exc:
        log.exception("describing dataset %s failed", dataset_id)
        Dataset.objects.filter(pk=dataset_id).update(
            status="failed", error=f"internal error while reading: {type(exc).__name__}: {exc}"
        )
        return "failed"
    size = ds.file.size if ds.file else 0
    Dataset.objects.filter(pk=dataset_id).update(
        status="ready", error="", meta=_jsonable(meta), size_bytes=size
    )
    return "ready"


@shared_task(bind=True, name="workers.tasks.check_target", **TASK_OPTIONS)
def check_target(self, target_id: int) -> str:
    """Ask the target's backend whether the device answers; store ``health``."""
    target = Target.objects.filter(pk=target_id).first()
    if target is None:
        return f"target {target_id} does not exist"
    from compression.errors import CompressionError
    from compression.targets import get_target, make_backend

    checked = timezone.now().isoformat()
    try:
        detail = make_backend(get_target(target.engine_spec())).check()
        health = {"reachable": True, "checked_at": checked, "detail": _jsonable(detail)}
    except CompressionError as exc:
        health = {"reachable": False, "checked_at": checked, "error": str(exc)}
    except Exception as exc:
        log.exception("health check of target %s failed", target_id)
        health = {"reachable": False, "checked_at": checked, "error": f"{type(exc).__name__}: {exc}"}
    Target.objects.filter(pk=target_id).update(health=health)
    return "reachable" if health["reachable"] else "unreachable"


@shared_task(bind=True, name="workers.tasks.benchmark", **TASK_OPTIONS)
def benchmark(self, benchmark_id: int) -> str:
    """Measure a model's latency on a target (``compression.targets.bench_model``); runs on the target's
    device queue so measurements on one device never overlap."""
    bench = Benchmark.objects.select_related("model", "target").filter(pk=benchmark_id).first()
    if bench is None:
        return f"benchmark {benchmark_id} does not exist"
    if bench.status in ("finished", "failed"):
        return f"benchmark {benchmark_id} is already {bench.status}"
    Benchmark.objects.filter(pk=benchmark_id).update(status="running", started_at=timezone.now(), error="")
    from compression.errors import CompressionError
    from compression.models import load_model
    from compression.targets import bench_model, get_target

    p = bench.params or {}
    try:
        artifact = load_model(bench.model.spec(), **bench.model.engine_kwargs())
        measurement = bench_model(
            artifact.module,
            artifact.example_input(int(p.get("batch", 1))),
            get_target(bench.target.engine_spec()),
            warmup=int(p.get("warmup", 5)),
            repeats=int(p.get("repeats", 30)),
            timeout_s=float(p.get("timeout_s", 120)),
        )
    except CompressionError as exc:
        Benchmark.objects.filter(pk=benchmark_id).update(
            status="failed", error=str(exc), finished_at=timezone.now()
        )
        return f"failed: {exc}"
    except Exception as exc:
        log.exception("benchmark %s failed", benchmark_id)
        Benchmark.objects.filter(pk=benchmark_id).update(
            status="failed", error=f"internal error: {type(exc).__name__}: {exc}", finished_at=timezone.now()
        )
        return "failed"
    Benchmark.objects.filter(pk=benchmark_id).update(
        status="finished", result=_jsonable(measurement.to_dict()), finished_at=timezone.now()
    )
    return "finished"


@shared_task(name="workers.tasks.reap_runs", **TASK_OPTIONS)
def reap_runs_task() -> list[str]:
    """One reaper pass (see ``workers.reaper``), for deployments that schedule it with celery beat."""
    from workers.reaper import reap_runs

    return reap_runs()


__all__ = [
    "run_search",
    "inspect_model",
    "train_baseline",
    "inspect_dataset",
    "check_target",
    "benchmark",
    "reap_runs_task",
]
