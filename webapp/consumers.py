"""The live stream of one run: history first, then increments, each episode exactly once.

On connect the consumer joins the run's group, THEN reads the history from the database (sent in parts
under Daphne's 1 MiB message limit: "history", then "history_more" until ``more`` is false), so an episode
written in between is either in the history or arrives as an increment; increments whose number is not
above the last one already sent are dropped (they also occur when a resumed search recomputes episodes
after its checkpoint). The browser drops any number it already has, so after a reconnect nothing is lost
or drawn twice. The consumer computes nothing: it reads, filters by sequence number and forwards.
"""

from __future__ import annotations

import json
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings

from webapp.models import Episode, Run, RunLog

CLOSE_FORBIDDEN = 4403
LOG_TAIL = 200
# Daphne refuses to send a websocket message over 1 MiB (websocket_max_message_size) and closes the socket:
# a run of ~500 episodes has a bigger history. It goes out in parts of at most this many bytes of episodes.
HISTORY_CHUNK_BYTES = 512 * 1024


def chunk_episodes(
    episodes: list[dict[str, Any]], limit: int = HISTORY_CHUNK_BYTES
) -> list[list[dict[str, Any]]]:
    """Split episode events into consecutive parts whose JSON stays under ``limit`` bytes (at least one part)."""
    parts: list[list[dict[str, Any]]] = [[]]
    size = 0
    for e in episodes:
        n = len(json.dumps(e, separators=(",", ":"))) + 2
        if parts[-1] and size + n > limit:
            parts.append([])
            size = 0
        parts[-1].append(e)
        size += n
    return parts


def downsample_numbers(rows: list[tuple], limit: int) -> tuple[list[int], bool]:
    """Which episode numbers to send when a run has more than ``limit`` episodes.

    ``rows`` are ``(number, reward[, is_best])`` in episode order. Kept: the first and last episode, every
    episode marked best (the best reward within budget so far) and every one that raised the best reward
    (so both best-so-far lines stay exact), and an even sample of the rest up to ``limit`` in total.
    Returns the sorted numbers and whether anything was dropped.
    """
    if len(rows) <= limit:
        return [r[0] for r in rows], False
    keep: set[int] = {rows[0][0], rows[-1][0]}
    best = float("-inf")
    for row in rows:
        number, reward = row[0], row[1]
        if len(row) > 2 and row[2]:
            keep.add(number)
        if reward is not None and reward > best:
            best = reward
            keep.add(number)
    room = max(0, limit - len(keep))
    if room:
        step = len(rows) / room
        keep.update(rows[int(i * step)][0] for i in range(room))
    return sorted(keep), True


@database_sync_to_async
def _load_run(run_id: int, user) -> Run | None:
    """The run if ``user`` may watch it (owner or staff), else None."""
    if not user or not user.is_authenticated:
        return None
    run = Run.objects.filter(pk=run_id).first()
    if run is None or not (user.is_staff or run.owner_id == user.pk):
        return None
    return run


@database_sync_to_async
def _history(run_id: int) -> dict[str, Any]:
    """The run's status, episodes (downsampled when long) and log tail, read in one go."""
    run = Run.objects.get(pk=run_id)
    rows = list(
        Episode.objects.filter(run_id=run_id).order_by("number").values_list("number", "reward", "is_best")
    )
    numbers, downsampled = downsample_numbers(rows, settings.STREAM_HISTORY_MAX)
    if downsampled:
        qs = Episode.objects.filter(run_id=run_id, number__in=numbers)
    else:
        qs = Episode.objects.filter(run_id=run_id)
    episodes = [e.to_event() for e in qs.order_by("number")]
    logs = list(RunLog.objects.filter(run_id=run_id).order_by("-seq")[:LOG_TAIL])
    logs.reverse()
    return {
        "type": "history",
        "episodes": episodes,
        "downsampled": downsampled,
        "total": len(rows),
        "last_number": rows[-1][0] if rows else 0,
        "run": run.status_event(),
        "logs": [line.to_event() for line in logs],
    }


class RunConsumer(AsyncJsonWebsocketConsumer):
    """``/ws/runs/<id>/``: the run's owner (or staff) receives history, then episodes, status and log lines."""

    async def connect(self) -> None:
        """Check access, join the group, send the history."""
        self.run_id = int(self.scope["url_route"]["kwargs"]["run_id"])
        self.group = None
        self.last_number = 0
        self.last_log_seq = 0
        run = await _load_run(self.run_id, self.scope.get("user"))
        # Accept before closing so browsers see the 4403 code (a close before accept is an HTTP 403 that
        # JavaScript cannot tell apart from a network error).
        await self.accept()
        if run is None:
            await self.close(code=CLOSE_FORBIDDEN)
            return
        self.group = run.group_name
        await self.channel_layer.group_add(self.group, self.channel_name)
        history = await _history(self.run_id)
        self.last_number = history["last_number"]
        if history["logs"]:
            self.last_log_seq = history["logs"][-1]["seq"]
        # the first part carries status, logs and totals; "more" says further "history_more" parts follow
        parts = chunk_episodes(history["episodes"])
        await self.send_json({**history, "episodes": parts[0], "more": len(parts) > 1})
        for i, part in enumerate(parts[1:], start=2):
            await self.send_json({"type": "history_more", "episodes": part, "more": i < len(parts)})

    async def disconnect(self, code: int) -> None:
        """Leave the group."""
        if self.group:
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        """The stream is one-way; a ``ping`` is answered so clients can check liveness."""
        if isinstance(content, dict) and content.get("type") == "ping":
            await self.send_json({"type": "pong"})

    async def run_episode(self, event: dict[str, Any]) -> None:
        """Forward an episode unless the client already has its number."""
        episode = event["episode"]
        number = int(episode["number"])
        if number <= self.last_number:
            return
        self.last_number = number
        await self.send_json({"type": "episode", "episode": episode})

    async def run_status(self, event: dict[str, Any]) -> None:
        """Forward the run's status."""
        await self.send_json({"type": "status", "run": event["run"]})

    async def run_log(self, event: dict[str, Any]) -> None:
        """Forward log lines the client has not seen."""
        lines = [line for line in event["lines"] if int(line.get("seq", 0)) > self.last_log_seq]
        if not lines:
            return
        self.last_log_seq = max(int(line["seq"]) for line in lines)
        await self.send_json({"type": "log", "lines": lines})
