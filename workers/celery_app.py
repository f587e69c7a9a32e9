"""The Celery application (Redis broker), configured from Django's settings (``CELERY_*``).

Start a worker: ``celery -A workers.celery_app worker -Q celery -c 1`` (searches, training) and a device
worker: ``celery -A workers.celery_app worker -Q quick,device.local-tvm,... -c 1`` (inspections, health
checks, benchmarks); ``scripts/run.sh`` starts both. See docs/operations.md.
"""

from __future__ import annotations

import logging
import os
import threading

from celery import Celery
from celery.signals import worker_ready

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "webapp.settings")

# Torch's default thread pool spin-waits; with two workers on a 2-core machine that halves both.
os.environ.setdefault("OMP_NUM_THREADS", os.environ.get("WORKER_TORCH_THREADS", "1"))

app = Celery("compression_studio")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.conf.task_routes = {
    "workers.tasks.run_search": {"queue": "celery"},
    "workers.tasks.train_baseline": {"queue": "celery"},
    "workers.tasks.inspect_model": {"queue": "quick"},
    "workers.tasks.inspect_dataset": {"queue": "quick"},
    "workers.tasks.check_target": {"queue": "quick"},
    # benchmark: routed per call to the target's device queue (workers.dispatch.enqueue_benchmark)
}
# Imported when a worker starts (after Celery's Django fix-up has set Django up), not at import time.
app.conf.include = ["workers.tasks"]

log = logging.getLogger(__name__)


@worker_ready.connect
def _on_worker_ready(sender=None, **kwargs) -> None:
    """When a worker starts: reap runs whose worker died (resume from checkpoint or fail with a reason),
    and, when WORKER_FOLLOW_TARGETS is set, keep consuming the device queue of every target."""
    hostname = getattr(sender, "hostname", None)

    def reap() -> None:
        from django.db import connection

        from workers.reaper import reap_runs

        try:
            for line in reap_runs():
                log.info("reaper: %s", line)
        except Exception:
            log.exception("reaper pass at worker start failed")
        finally:
            connection.close()

    threading.Thread(target=reap, name="reaper-at-start", daemon=True).start()
    if os.environ.get("WORKER_FOLLOW_TARGETS") and hostname:
        from workers.dispatch import follow_target_queues

        threading.Thread(
            target=follow_target_queues, args=(app, hostname), name="follow-targets", daemon=True
        ).start()


def use_broker(url: str, transport_options: dict | None = None) -> None:
    """Point this process's Celery app at another broker, dropping pooled connections to the old one
    (tests start their own Redis; ``Celery.close`` would also unregister the app)."""
    pool = app._pool
    if pool is not None:
        try:
            pool.force_close_all()
        except Exception:  # connections to a Redis that is already gone
            pass
    app._pool = None
    amqp = app.__dict__.get("amqp")
    if amqp is not None:
        amqp._producer_pool = None
    app.conf.broker_url = url
    if transport_options is not None:
        app.conf.broker_transport_options = transport_options
