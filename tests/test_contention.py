"""Other processes' CPU use during a measurement (``compression.targets.contention``), read from the real /proc."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from compression.errors import TargetError
from compression.targets import contention
from compression.targets.contention import CpuWatch, quiet_wait_s, wait_for_quiet

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads Linux's /proc")

_SPIN = "import time\nend = time.monotonic() + 30\nwhile time.monotonic() < end: pass"


def _orphan_spinner() -> int:
    """A busy loop that is not this process's descendant (double fork), as another program would be; its pid."""
    out = subprocess.run(
        ["bash", "-c", f'{sys.executable} -c "{_SPIN}" >/dev/null 2>&1 & echo $!'],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.strip())


def _watch(seconds: float = 1.0) -> CpuWatch:
    with CpuWatch() as w:
        time.sleep(seconds)
    return w


def test_another_programs_busy_loop_reads_as_about_a_core() -> None:
    pid = _orphan_spinner()
    try:
        time.sleep(0.3)
        w = _watch()
    finally:
        os.kill(pid, 9)
    assert w.others is not None and 0.5 < w.others < (os.cpu_count() or 2) + 0.2 and w.seconds >= 1.0


def test_this_processs_own_children_are_not_other_processes() -> None:
    child = subprocess.Popen([sys.executable, "-c", _SPIN])
    try:
        time.sleep(0.3)
        w = _watch()
    finally:
        child.kill()
        child.wait()
    # the child spins a whole core; it is ours (a compile worker, a measuring thread pool), so it does not count
    assert w.others is not None and w.others < 0.5


def test_waiting_for_quiet_gives_up_at_its_limit_and_says_how_busy() -> None:
    pid = _orphan_spinner()
    try:
        time.sleep(0.3)
        t0 = time.monotonic()
        quiet, seen = wait_for_quiet(1.5, limit=0.25, window_s=0.5)
        took = time.monotonic() - t0
    finally:
        os.kill(pid, 9)
    assert quiet is False and seen is not None and seen > 0.25 and took < 3.0


def test_quiet_wait_setting(monkeypatch) -> None:
    monkeypatch.delenv("COMPRESSION_TABLE_QUIET_WAIT_S", raising=False)
    assert quiet_wait_s() == contention.QUIET_WAIT_S
    monkeypatch.setenv("COMPRESSION_TABLE_QUIET_WAIT_S", "0")
    assert quiet_wait_s() == 0.0
    monkeypatch.setenv("COMPRESSION_TABLE_QUIET_WAIT_S", "soon")
    with pytest.raises(TargetError, match="COMPRESSION_TABLE_QUIET_WAIT_S must be a number"):
        quiet_wait_s()


def test_without_proc_nothing_is_watched(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(contention, "_PROC", tmp_path / "no-proc")
    w = _watch(0.05)
    assert w.others is None
    assert wait_for_quiet(5.0, window_s=0.05) == (True, None)
