"""How much CPU other processes took while this one measured, from Linux's ``/proc``.

A latency table times one-layer workloads in batches of a few seconds each. When another process works hard
during a batch (seen here: the test suite compiling TVM modules beside a benchmark), every entry of that batch
can come out 20-100% slow, its fastest run included, while the batches before and after are right; a table
whose original-model entries caught such a stretch priced a pruned policy at 50% of the original that measured
67% side by side (docs/BENCHMARKS.md, section 3c). ``CpuWatch`` tells such a stretch: the CPU time all other
processes used during the window, in cores (``/proc/stat``'s busy time of every CPU, less this process's and
its descendants'). A plain busy loop on another core barely moves a fastest run (measured: 0.0644 ms either
way), so a busy window is a reason to look again, not proof of a wrong entry: the backend waits for a quiet
moment and times the batch again, keeping each entry's faster timing (a disturbance only ever slows).

Elsewhere than Linux (no ``/proc``) nothing is watched: ``CpuWatch.others`` stays None.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

# other processes using more than this many cores on average during a batch's timing make it "busy"
BUSY_CORES = 0.25
# how long a busy batch waits for a quiet second before it is timed again (COMPRESSION_TABLE_QUIET_WAIT_S)
QUIET_WAIT_S = 10.0

_PROC = Path("/proc")
try:
    _HZ = float(os.sysconf("SC_CLK_TCK"))
except (AttributeError, ValueError, OSError):  # not a POSIX system
    _HZ = 100.0


def quiet_wait_s() -> float:
    """The wait for a quiet moment before a busy batch is timed again (``COMPRESSION_TABLE_QUIET_WAIT_S``; 0: do
    not wait or time again, only record how busy the machine was)."""
    raw = os.environ.get("COMPRESSION_TABLE_QUIET_WAIT_S", "").strip()
    if not raw:
        return QUIET_WAIT_S
    try:
        return max(0.0, float(raw))
    except ValueError:
        from compression.errors import TargetError

        raise TargetError(
            f"COMPRESSION_TABLE_QUIET_WAIT_S must be a number of seconds, not {raw!r}",
            "unset it, or set it to 0 to time each batch once",
        ) from None


def _busy_jiffies() -> int | None:
    """Busy time of all CPUs since boot (``/proc/stat``: user, nice, system, irq, softirq, steal), in ticks."""
    try:
        with open(_PROC / "stat", encoding="ascii") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 9:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    return user + nice + system + irq + softirq + steal


def _own_jiffies(root: int) -> int:
    """CPU time (user + system, in ticks) of process ``root`` and every descendant alive now."""
    stats: dict[int, tuple[int, int]] = {}  # pid -> (parent, ticks)
    try:
        entries = os.listdir(_PROC)
    except OSError:
        return 0
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(_PROC / name / "stat", encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError:  # gone meanwhile
            continue
        # "pid (comm) state ppid ..."; comm may hold spaces and parentheses: split after the last ')'
        rest = text[text.rfind(")") + 2 :].split()
        try:
            stats[int(name)] = (int(rest[1]), int(rest[11]) + int(rest[12]))
        except (IndexError, ValueError):
            continue
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in stats.items():
        children.setdefault(parent, []).append(pid)
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            total += stats[pid][1]
        todo.extend(children.get(pid, ()))
    return total


def _sample() -> tuple[float, int, int] | None:
    busy = _busy_jiffies()
    if busy is None:
        return None
    return time.monotonic(), busy, _own_jiffies(os.getpid())


class CpuWatch:
    """A window in which to count other processes' CPU use: ``with CpuWatch() as w: ...``, then ``w.others``
    (cores, averaged over the window; None where ``/proc`` is missing) and ``w.seconds``.

    Resolution: one clock tick (10 ms) per CPU, so windows under about half a second read coarsely. A descendant
    that exited inside the window takes its time with it and reads as another process's."""

    def __init__(self) -> None:
        self.others: float | None = None
        self.seconds = 0.0
        self._start: tuple[float, int, int] | None = None

    def __enter__(self) -> CpuWatch:
        self._start = _sample()
        return self

    def __exit__(self, *exc: object) -> None:
        end = _sample()
        if self._start is None or end is None:
            return
        wall = end[0] - self._start[0]
        self.seconds = wall
        if wall <= 0:
            return
        others = (end[1] - self._start[1]) - (end[2] - self._start[2])
        self.others = max(0.0, others / _HZ / wall)


def wait_for_quiet(
    max_wait_s: float, limit: float = BUSY_CORES, window_s: float = 1.0
) -> tuple[bool, float | None]:
    """Wait, one ``window_s`` at a time, until other processes use at most ``limit`` cores over a window, at most
    ``max_wait_s``: (quiet, the last window's reading)."""
    end = time.monotonic() + max_wait_s
    seen: float | None = None
    while True:
        with CpuWatch() as w:
            time.sleep(window_s)
        seen = w.others
        if seen is None or seen <= limit:
            return True, seen
        if time.monotonic() + window_s > end:
            return False, seen
