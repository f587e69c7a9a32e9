"""Which worker holds a run: a lease in the run's row, kept alive by a heartbeat.

Redis redelivers an unacknowledged task after the visibility timeout even when the first worker is still
running it, and the reaper may queue a run again; the lease makes sure only one worker executes a run at a
time. A worker takes the lease with one conditional UPDATE (free, or its holder's heartbeat older than
``RUN_STALE_S``), which is atomic on SQLite and PostgreSQL alike. While it holds the lease a thread refreshes
the heartbeat every ``RUN_HEARTBEAT_S``; every write the task makes to the run is conditional on the lease,
so a worker that lost its lease (it stalled for longer than the stale time and another took over) stops
instead of writing beside the new holder.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from datetime import timedelta

from django.conf import settings
from django.db import close_old_connections, connection
from django.db.models import Q
from django.utils import timezone

from webapp.models import Run

log = logging.getLogger(__name__)


class LeaseLost(Exception):
    """Another worker took over the run (this one was presumed dead); stop without touching the run."""


def stale_before():
    """Heartbeats older than this belong to a worker that is gone."""
    return timezone.now() - timedelta(seconds=settings.RUN_STALE_S)


def try_acquire(run_id: int, worker: str) -> str | None:
    """Take the run's lease if it is free or stale; returns the lease token, or None if held."""
    token = uuid.uuid4().hex
    taken = (
        Run.objects.filter(pk=run_id)
        .filter(Q(lease="") | Q(heartbeat_at__isnull=True) | Q(heartbeat_at__lt=stale_before()))
        .update(lease=token, worker=worker, heartbeat_at=timezone.now())
    )
    return token if taken else None


def acquire(run_id: int, worker: str, wait_s: float | None = None) -> str | None:
    """Take the lease, waiting up to ``wait_s`` (default: long enough for a dead holder to go stale).

    Returns None when the holder kept its heartbeat alive all that time: the run is being executed.
    """
    if wait_s is None:
        wait_s = settings.RUN_STALE_S + 2 * settings.RUN_HEARTBEAT_S
    deadline = time.monotonic() + wait_s
    while True:
        token = try_acquire(run_id, worker)
        if token or time.monotonic() >= deadline:
            return token
        time.sleep(min(settings.RUN_HEARTBEAT_S, max(0.05, deadline - time.monotonic())))


def release(run_id: int, token: str) -> None:
    """Give the lease back (only if still ours)."""
    Run.objects.filter(pk=run_id, lease=token).update(lease="")


def update_run(run_id: int, token: str, **fields) -> None:
    """Write fields of the run only while holding its lease (refreshing the heartbeat too)."""
    fields.setdefault("heartbeat_at", timezone.now())
    if not Run.objects.filter(pk=run_id, lease=token).update(**fields):
        raise LeaseLost(f"run {run_id}: lease lost")


class Heartbeat:
    """A thread that refreshes the lease and watches for cancel; ``stop_requested`` tells the search to stop.

    ``stop_requested`` becomes true when the run's ``cancel_requested`` is set or the lease is lost.
    """

    def __init__(self, run_id: int, token: str, interval_s: float | None = None) -> None:
        self.run_id = run_id
        self.token = token
        self.interval_s = interval_s if interval_s is not None else settings.RUN_HEARTBEAT_S
        self.cancelled = threading.Event()
        self.lost = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-run-{run_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join(timeout=10)

    @property
    def stop_requested(self) -> bool:
        """Cancel asked for, or the run is no longer ours."""
        return self.cancelled.is_set() or self.lost.is_set()

    def beat(self) -> None:
        """One refresh (also called from the task thread between episodes)."""
        n = Run.objects.filter(pk=self.run_id, lease=self.token).update(heartbeat_at=timezone.now())
        if not n:
            self.lost.set()
            return
        if Run.objects.filter(pk=self.run_id, cancel_requested=True).exists():
            self.cancelled.set()

    def _loop(self) -> None:
        try:
            while not self._done.wait(self.interval_s):
                try:
                    close_old_connections()
                    self.beat()
                except Exception as exc:  # a locked or restarting database: try again next beat
                    log.warning("heartbeat of run %s failed: %s", self.run_id, exc)
        finally:
            connection.close()
