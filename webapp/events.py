"""Publishing a run's changes to its live stream (the Channels group ``run-<id>`` on Redis).

Workers call these AFTER writing to the database: the database is the source of truth and the stream is a
copy, so a publish that fails (Redis restarting, say) is logged and dropped, never raised into the task —
a browser that reconnects reads the history from the database and misses nothing.

Group messages (consumed by ``webapp.consumers.RunConsumer``):
``{"type": "run.episode", "episode": {...}}``, ``{"type": "run.status", "run": {...}}``,
``{"type": "run.log", "lines": [...]}``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Iterable
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

log = logging.getLogger(__name__)

# How long one publish may take before it is given up (a Redis that does not answer must not stall a search).
PUBLISH_TIMEOUT_S = 3.0
# After a failed publish, publishes are skipped for this long (the viewers reload the history on reconnect).
BACKOFF_S = 2.0
_down_until = 0.0
_last_warning = 0.0
_failures = 0


def _send(group: str, message: dict[str, Any]) -> bool:
    """group_send with a timeout; returns False (and logs, at most every 10 s) when it fails."""
    global _last_warning, _failures, _down_until
    layer = get_channel_layer()
    if layer is None:
        return False
    if time.monotonic() < _down_until:
        return False  # Redis failed a moment ago: do not slow every episode down by a connect timeout
    try:
        if type(layer).__module__.startswith("channels_redis"):
            future = asyncio.run_coroutine_threadsafe(layer.group_send(group, message), _publisher_loop())
            try:
                future.result(PUBLISH_TIMEOUT_S)
            except BaseException:
                future.cancel()
                raise
        else:  # the in-memory layer (tests) is not thread-safe: publish on a loop of this thread
            async_to_sync(_send_with_timeout)(layer, group, message)
        return True
    except Exception as exc:  # any broker trouble: the DB already has the data
        _failures += 1
        now = time.monotonic()
        _down_until = now + BACKOFF_S
        if now - _last_warning > 10:
            log.warning("live stream publish to %s failed (%d failures so far): %s", group, _failures, exc)
            _last_warning = now
        return False


async def _send_with_timeout(layer, group: str, message: dict[str, Any]) -> None:
    await asyncio.wait_for(layer.group_send(group, message), PUBLISH_TIMEOUT_S)


_loop: asyncio.AbstractEventLoop | None = None
_loop_pid = 0
_loop_lock = threading.Lock()


def _publisher_loop() -> asyncio.AbstractEventLoop:
    """One event loop per process, in a daemon thread, for every publish: the Redis layer keeps its
    connections per loop, so a long-lived loop reuses them (a fresh loop per call costs ~50 ms). Created
    lazily and again after a fork (Celery's prefork children)."""
    global _loop, _loop_pid
    with _loop_lock:
        if _loop is None or _loop_pid != os.getpid() or _loop.is_closed():
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="live-stream-publisher", daemon=True).start()
            _loop, _loop_pid = loop, os.getpid()
        return _loop


def group_name(run_or_id) -> str:
    """``run-<id>`` for a Run or an id."""
    return f"run-{getattr(run_or_id, 'pk', run_or_id)}"


def publish_episode(run, episode) -> bool:
    """Send one recorded episode (an ``Episode`` or its ``to_event()`` dict) to the run's viewers."""
    event = episode if isinstance(episode, dict) else episode.to_event()
    return _send(group_name(run), {"type": "run.episode", "episode": event})


def publish_status(run) -> bool:
    """Send the run's current status (progress, best, phase, error) to its viewers."""
    return _send(group_name(run), {"type": "run.status", "run": run.status_event()})


def publish_log(run, lines: Iterable) -> bool:
    """Send new log lines (``RunLog`` rows or their ``to_event()`` dicts) to the run's viewers."""
    events = [line if isinstance(line, dict) else line.to_event() for line in lines]
    if not events:
        return True
    return _send(group_name(run), {"type": "run.log", "lines": events})
