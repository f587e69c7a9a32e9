"""Publishing a run's changes to its live stream (the Channels group ``run-<id>`` on Redis).

Workers call these AFTER writing to the database: the database is the source of truth and the stream is a
copy, so a publish that fails (Redis restarting, say) is logged and dropped, never raised into the task —
a browser that reconnects reads the history from the database and misses nothing.

Group messages (consumed by ``webapp.consumers.RunConsumer``):
``{"type": "run.episode", "episode": {...}}``, ``{"type": "run.status", "run": {...}}``,
``{"type": "run.log", "lines": [...]}``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

log = logging.getLogger(__name__)

# How long one publish may take before it is given up (a Redis that does not answer must not stall a search).
PUBLISH_TIMEOUT_S = 3.0
_last_warning = 0.0
_failures = 0


def _send(group: str, message: dict[str, Any]) -> bool:
    """group_send with a timeout; returns False (and logs, at most every 10 s) when it fails."""
    global _last_warning, _failures
    layer = get_channel_layer()
    if layer is None:
        return False
    try:
        async_to_sync(_send_with_timeout)(layer, group, message)
        return True
    except Exception as exc:  # any broker trouble: the DB already has the data
        _failures += 1
        now = time.monotonic()
        if now - _last_warning > 10:
            log.warning("live stream publish to %s failed (%d failures so far): %s", group, _failures, exc)
            _last_warning = now
        return False


async def _send_with_timeout(layer, group: str, message: dict[str, Any]) -> None:
    import asyncio

    await asyncio.wait_for(layer.group_send(group, message), PUBLISH_TIMEOUT_S)


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
