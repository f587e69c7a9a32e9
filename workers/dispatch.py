"""Scheduling work from the web side: the only way views start, cancel or resume anything.

Tasks are sent by name (``app.send_task``), so the web process imports neither the task module's engine
calls nor torch. Each function records the task id on the row and returns it; when the broker (Redis) does
not answer, ``BrokerUnavailable`` says so in one line (the row keeps its queued state and the reaper sends
it again once Redis is back, see ``workers.reaper``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from webapp import events
from webapp.models import Benchmark, Dataset, Run, RunArtifact, RunLog, Target, UploadedModel

log = logging.getLogger(__name__)


class BrokerUnavailable(Exception):
    """The task queue (Redis) does not answer."""


def _app():
    from workers.celery_app import app

    return app


def send(name: str, args: list[Any], queue: str, kwargs: dict[str, Any] | None = None) -> str:
    """Send a task by name to a queue; returns its id. Raises BrokerUnavailable with a clear message."""
    try:
        result = _app().send_task(
            name,
            args=args,
            kwargs=kwargs or {},
            queue=queue,
            retry=True,
            retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1},
        )
    except Exception as exc:  # kombu raises OperationalError subclasses, redis its own
        raise BrokerUnavailable(
            f"the task queue at {settings.CELERY_BROKER_URL} does not answer ({type(exc).__name__}): "
            "start Redis (scripts/ensure_redis.sh) and try again"
        ) from exc
    return result.id


def device_queue(target: Target) -> str:
    """The queue serialising measurements on a target's device."""
    return target.queue_name


def enqueue_run(run: Run) -> str:
    """Queue a run's search (status ``queued``). Call after the run row is saved."""
    Run.objects.filter(pk=run.pk).update(status="queued", error="", out_dir=run.out_dir or f"run-{run.pk}")
    task_id = send("workers.tasks.run_search", [run.pk], "celery")
    Run.objects.filter(pk=run.pk).update(task_id=task_id)
    run.refresh_from_db()
    RunLog.append(run, "queued")
    events.publish_status(run)
    return task_id


def request_cancel(run: Run) -> None:
    """Ask a run to stop: a queued run is cancelled at once, a running one stops within seconds (the worker
    polls the flag between episodes and the heartbeat notices it) and keeps its checkpoint."""
    with transaction.atomic():
        Run.objects.filter(pk=run.pk).update(cancel_requested=True)
        Run.objects.filter(pk=run.pk, status="queued").update(status="cancelled", finished_at=timezone.now())
    run.refresh_from_db()
    if run.status == "cancelled" and run.episodes_done:  # a requeued run (its worker died) had episodes
        from workers.tasks import store_partial_artifacts

        store_partial_artifacts(run)
    line = RunLog.append(run, "cancel requested")
    events.publish_log(run, [line])
    events.publish_status(run)


def resume_run(run: Run) -> str:
    """Queue a failed or cancelled run again; the search continues from its last checkpoint if it has one."""
    if run.status not in ("failed", "cancelled"):
        raise ValueError(f"run {run.pk} is {run.status}; only failed or cancelled runs can be resumed")
    stopped_s = 0.0
    if run.started_at and run.finished_at:  # the time it stood stopped does not count as the run's time
        stopped_s = max(0.0, (timezone.now() - run.finished_at).total_seconds())
    # only a run that is still stopped: two resumes at once (a double click, the page and the API) queue it once
    resumed = Run.objects.filter(pk=run.pk, status__in=("failed", "cancelled")).update(
        status="queued",
        cancel_requested=False,
        error="",
        error_kind="",
        finished_at=None,
        attempts=0,
        lease="",
        idle_s=F("idle_s") + stopped_s,
    )
    run.refresh_from_db()
    if not resumed:
        return run.task_id
    _drop_partial_artifacts(run)
    return enqueue_run(run)


def _drop_partial_artifacts(run: Run) -> None:
    """Forget what a stopped run offered as downloads (``RunArtifact.PARTIAL_NOTE``): the resumed run will offer
    its own. The best-so-far ``best_policy.json`` goes too (a finalize step that fails later must not find it and
    take it for its own choice); the engine's files (episodes.jsonl, the checkpoint) stay."""
    partial = RunArtifact.objects.filter(run=run, note__startswith=RunArtifact.PARTIAL_NOTE)
    for a in partial:
        if a.kind == "policy" and "the finalize step chose" not in a.note:
            try:
                (run.out_path / a.path).unlink(missing_ok=True)
            except OSError:
                log.warning("run %s: could not remove %s", run.pk, a.path)
    partial.delete()


def enqueue_inspect(model: UploadedModel) -> str:
    """Inspect an uploaded model (layer table) in a worker (a fresh count of attempts: ``tasks.inspect_model``)."""
    progress = {k: v for k, v in (model.progress or {}).items() if k != "_inspect_attempts"}
    UploadedModel.objects.filter(pk=model.pk).update(status="pending", error="", progress=progress)
    task_id = send("workers.tasks.inspect_model", [model.pk], "quick")
    UploadedModel.objects.filter(pk=model.pk).update(task_id=task_id)
    return task_id


def enqueue_train(model: UploadedModel, dataset: Dataset, **params: Any) -> str:
    """Train the model's zoo architecture on ``dataset`` (params: epochs, lr, batch_size, seed, input_shape)."""
    cfg = {**(model.train_config or {}), **params, "dataset_id": dataset.pk, "arch": model.zoo_arch}
    UploadedModel.objects.filter(pk=model.pk).update(status="pending", error="", train_config=cfg)
    task_id = send("workers.tasks.train_baseline", [model.pk, dataset.pk], "celery")
    UploadedModel.objects.filter(pk=model.pk).update(task_id=task_id)
    return task_id


def enqueue_inspect_dataset(dataset: Dataset) -> str:
    """Read an uploaded dataset's metadata in a worker."""
    Dataset.objects.filter(pk=dataset.pk).update(status="pending", error="")
    return send("workers.tasks.inspect_dataset", [dataset.pk], "quick")


def enqueue_benchmark(bench: Benchmark) -> str:
    """Measure a model on a target, on the target's device queue (one measurement at a time per device)."""
    task_id = send("workers.tasks.benchmark", [bench.pk], device_queue(bench.target))
    Benchmark.objects.filter(pk=bench.pk).update(task_id=task_id)
    return task_id


def enqueue_check_target(target: Target) -> str:
    """Check whether a target's device answers (stores ``target.health``)."""
    return send("workers.tasks.check_target", [target.pk], "quick")


def target_queues() -> list[str]:
    """The device queue of every target."""
    return [t.queue_name for t in Target.objects.order_by("name")]


def follow_target_queues(app, hostname: str, every_s: float = 30.0) -> None:
    """Make the worker ``hostname`` consume the device queue of every target, including targets added later
    (runs in a thread of a device worker started with WORKER_FOLLOW_TARGETS=1)."""
    from django.db import connection

    consumed: set[str] = set()
    while True:
        try:
            for queue in target_queues():
                if queue not in consumed:
                    app.control.add_consumer(queue, destination=[hostname], reply=False)
                    consumed.add(queue)
        except Exception as exc:
            log.warning("could not update the device queues of %s: %s", hostname, exc)
        finally:
            connection.close()
        time.sleep(every_s)
