"""The reaper: finds runs whose worker is gone and puts them right.

- A run ``running``/``finalizing`` whose heartbeat is older than ``RUN_STALE_S`` lost its worker (SIGKILL,
  crash, machine gone). With a checkpoint it is queued again and the next worker resumes it from there; the
  episodes after the checkpoint are replayed identically and overwrite their own rows. Without one it is
  failed with a reason the user can act on.
- A run ``queued`` whose task message is nowhere in the broker (Redis restarted without persistence, or
  the send failed) for longer than ``grace_s`` is sent again. Duplicates are harmless: the run's lease lets
  one copy execute and the others return.

It runs when a worker starts, and every ``--every`` seconds from ``manage.py reap_runs --every 30`` (the
``reaper`` process of ``scripts/run.sh`` and the Procfile). Every change is a conditional UPDATE, so several
reapers on several machines do not trip over each other.
"""

from __future__ import annotations

import json
import logging
from datetime import timedelta

from django.conf import settings
from django.db.models import Q
from django.utils import timezone

from webapp import events
from webapp.models import Run, RunLog
from workers.lease import stale_before

log = logging.getLogger(__name__)

QUEUED_GRACE_S = 60.0


def _resume_or_fail(run: Run) -> str | None:
    checkpoint = run.out_path / "checkpoint.pt"
    stale = Q(heartbeat_at__lt=stale_before()) | Q(heartbeat_at__isnull=True)
    base = Run.objects.filter(pk=run.pk, status__in=("running", "finalizing")).filter(stale)
    if checkpoint.exists():
        if not base.update(status="queued", lease="", phase=""):
            return None
        run.refresh_from_db()
        RunLog.append(
            run,
            f"the worker {run.worker or '?'} stopped answering (no heartbeat for {settings.RUN_STALE_S:.0f} s);"
            f" queued again to resume from the checkpoint at episode {run.checkpoint_episode or '?'}",
            "warning",
        )
        from workers.dispatch import BrokerUnavailable, send

        try:
            task_id = send("workers.tasks.run_search", [run.pk], "celery")
            Run.objects.filter(pk=run.pk).update(task_id=task_id)
        except BrokerUnavailable as exc:
            log.warning("run %s: %s (the next reaper pass sends it)", run.pk, exc)
        events.publish_status(run)
        return f"run {run.pk}: worker gone, resuming from checkpoint"
    from workers.tasks import NO_CHECKPOINT_MESSAGE, store_partial_artifacts

    if not base.update(
        status="failed",
        error=NO_CHECKPOINT_MESSAGE,
        error_kind="worker",
        finished_at=timezone.now(),
        lease="",
        phase="",
    ):
        return None
    run.refresh_from_db()
    line = RunLog.append(run, NO_CHECKPOINT_MESSAGE, "error")
    store_partial_artifacts(run)
    events.publish_log(run, [line])
    events.publish_status(run)
    return f"run {run.pk}: worker gone before the first checkpoint, failed"


def broker_task_ids() -> set[str] | None:
    """Ids of every task message in the broker (waiting in a queue or delivered and unacknowledged);
    None when the broker cannot be read (then nothing is re-sent)."""
    import redis

    try:
        client = redis.Redis.from_url(settings.CELERY_BROKER_URL, socket_timeout=5, socket_connect_timeout=5)
        ids: set[str] = set()

        def add(raw: bytes) -> None:
            try:
                msg = json.loads(raw)
                if isinstance(msg, list):  # unacked entries are [message, exchange, routing_key]
                    msg = msg[0]
                task_id = (msg.get("headers") or {}).get("id") or (msg.get("properties") or {}).get(
                    "correlation_id"
                )
                if task_id:
                    ids.add(task_id)
            except (ValueError, AttributeError, IndexError, TypeError):
                pass

        for key in client.scan_iter(count=500):
            kind = client.type(key)
            if kind == b"list":
                for raw in client.lrange(key, 0, -1):
                    add(raw)
            elif key == b"unacked" and kind == b"hash":
                for raw in client.hvals(key):
                    add(raw)
        return ids
    except Exception as exc:
        log.warning("reaper cannot read the broker: %s", exc)
        return None


def _resend_orphans(grace_s: float) -> list[str]:
    cutoff = timezone.now() - timedelta(seconds=grace_s)
    queued = list(
        Run.objects.filter(status="queued", lease="", created_at__lt=cutoff, cancel_requested=False)
    )
    if not queued:
        return []
    present = broker_task_ids()
    if present is None:
        return []
    out = []
    from workers.dispatch import BrokerUnavailable, send

    for run in queued:
        if run.task_id and run.task_id in present:
            continue
        try:
            task_id = send("workers.tasks.run_search", [run.pk], "celery")
        except BrokerUnavailable:
            break
        Run.objects.filter(pk=run.pk, status="queued").update(task_id=task_id)
        RunLog.append(run, "its task was no longer in the queue (Redis restarted?); queued again", "warning")
        out.append(f"run {run.pk}: task message lost, sent again")
    return out


def reap_runs(grace_s: float = QUEUED_GRACE_S) -> list[str]:
    """One pass; returns a line per run it changed."""
    out = []
    stale = Q(heartbeat_at__lt=stale_before()) | Q(heartbeat_at__isnull=True)
    for run in Run.objects.filter(status__in=("running", "finalizing")).filter(stale):
        line = _resume_or_fail(run)
        if line:
            out.append(line)
    out += _resend_orphans(grace_s)
    return out
