"""Fixtures for tests with real services (registered by ``tests/conftest.py``; see ``tests/services.py``).

- ``services``: an own Redis on a free port; settings (channel layer, Celery broker, RUNS_ROOT,
  PRIVATE_MEDIA_ROOT, short heartbeat timings) pointed at it and at per-test directories; the test database
  is transactional (committed rows, so subprocesses see them) and has the built-in rows.
- ``celery_worker``: one Celery worker subprocess (queues ``celery`` and ``quick``) on that database.
- ``live_stack``: ``celery_worker`` plus a daphne server; ``live_stack.url`` is its base URL.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.services import ServiceProcess, Services, close_services, make_services


@pytest.fixture
def services(tmp_path: Path, settings, transactional_db) -> Services:
    """Redis + settings + transactional test database (see the module docstring)."""
    from webapp.models import ensure_builtin_rows

    ensure_builtin_rows()
    svc = make_services(tmp_path, settings)
    try:
        yield svc
    finally:
        close_services(svc)


@pytest.fixture
def celery_worker(services: Services) -> ServiceProcess:
    """A running Celery worker subprocess (prefork, concurrency 1, queues celery + quick)."""
    return services.start_worker("celery,quick,device.analytic,device.local-torch,device.local-ort")


@dataclass
class LiveStack:
    """Web server + worker + Redis on the test database."""

    url: str
    ws_url: str
    services: Services
    worker: ServiceProcess
    web: ServiceProcess


@pytest.fixture
def live_stack(services: Services, celery_worker: ServiceProcess) -> LiveStack:
    """daphne (the product's ASGI app) + a Celery worker + Redis, all on the test database."""
    web, url = services.start_web()
    return LiveStack(
        url=url, ws_url=url.replace("http://", "ws://"), services=services, worker=celery_worker, web=web
    )


# A dead address: tests that forget to start their own Redis fail fast instead of using the machine's.
NO_REDIS = "redis://127.0.0.1:9/0"


@pytest.fixture(autouse=True)
def _keep_off_the_machines_redis():
    """Every test publishes to an in-memory channel layer and sends tasks to a dead address unless it
    asked for ``services`` (which points both at its own Redis): the machine's Redis is never touched."""
    from django.conf import settings as django_settings

    if not django_settings.configured:
        yield
        return
    from django.test.utils import override_settings

    from workers.celery_app import app, use_broker

    memory = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    with override_settings(CHANNEL_LAYERS=memory, CELERY_BROKER_URL=NO_REDIS, REDIS_URL=NO_REDIS):
        options = dict(app.conf.broker_transport_options or {})
        use_broker(NO_REDIS)
        yield
        use_broker(NO_REDIS, options)
