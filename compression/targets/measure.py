"""Timing shared by the local backends: warm-up, repeats, robust statistics, one measurement per device.

Three rules make a local latency number trustworthy, and every local backend goes through this module:

- **one measurement at a time per device.** Two processes timing on the same CPU time each other's noise.
  ``device_lock`` takes an exclusive ``flock`` on ``<lock dir>/<device>.lock`` (the directory is
  ``$COMPRESSION_LOCK_DIR``, else ``<tmp>/compression-target-locks``). All local targets share the device
  name ``local-cpu`` unless their settings name another ``lock``, because ``local-ort`` and ``local-torch``
  run on the same cores. The lock covers preparation (export, quantization, session creation) too: that
  work loads the same cores.
- **warm-up, then repeats, then robust statistics.** The median is the number to use; mean, std, min and
  percentiles are reported so a noisy machine is visible (``cv``), not hidden.
- **a deadline.** ``run_with_deadline`` runs the measurement on a measuring thread and gives the caller a
  ``TargetError`` when ``timeout_s`` passes. The timing loop checks the deadline after every run, so a
  measurement that is merely slow stops after at most one more run; one that never returns (a hung
  kernel) cannot be killed from Python, so its thread is abandoned and keeps the device lock until it
  ends; later measurements then fail with a clear "device busy" error after their wait time instead of
  timing alongside it. Subprocess isolation was measured and rejected: forking after OpenMP was used hangs
  the child (libgomp), and spawning costs 2-4 s of ``import torch`` per measurement.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import queue
import re
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from compression.errors import TargetError

if TYPE_CHECKING:
    from compression.targets.base import Measurement, TargetSpec

T = TypeVar("T")

LOCK_DIR_ENV = "COMPRESSION_LOCK_DIR"
DEFAULT_DEVICE = "local-cpu"
DEFAULT_WAIT_S = 600.0
_POLL_S = (0.002, 0.05)  # lock polling starts fast (measurements are short) and backs off


class DeadlineExceeded(TargetError):
    """A measurement ran past its deadline."""


def lock_dir() -> Path:
    """Directory holding the per-device lock files (created on first use)."""
    d = Path(os.environ.get(LOCK_DIR_ENV) or Path(tempfile.gettempdir()) / "compression-target-locks")
    d.mkdir(parents=True, exist_ok=True)
    return d


def lock_path(device: str) -> Path:
    """The lock file of one device; the name is sanitised so any device string is a safe file name."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", device) or "device"
    return lock_dir() / f"{safe}.lock"


@contextmanager
def device_lock(device: str, wait_s: float = DEFAULT_WAIT_S) -> Iterator[float]:
    """Hold the device exclusively (across processes and threads); yields the seconds spent waiting.

    Raises ``TargetError`` when another measurement holds the device for longer than ``wait_s``.
    """
    path = lock_path(device)
    # flock locks belong to the open file description, so each holder opens its own descriptor: two
    # threads of one process exclude each other exactly like two processes do.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    start = time.monotonic()
    try:
        pause = _POLL_S[0]
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = time.monotonic() - start
                if waited >= wait_s:
                    raise TargetError(
                        f"device {device!r} is busy: another measurement has held it for more than {wait_s:.0f} s",
                        f"wait for it to finish, or check for a stuck measurement holding {path}",
                    ) from None
                time.sleep(min(pause, max(0.0, wait_s - waited)))
                pause = min(pause * 2, _POLL_S[1])
        waited = time.monotonic() - start
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {threading.get_ident()} {time.time():.3f}\n".encode())
        try:
            yield waited
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def time_runs(
    run: Callable[[], Any],
    *,
    warmup: int,
    repeats: int,
    deadline: float | None = None,
    cancel: threading.Event | None = None,
    timeout_s: float | None = None,
) -> list[float]:
    """Call ``run`` ``warmup`` times untimed, then ``repeats`` times timed; returns the times in ms.

    ``deadline`` is a ``time.monotonic()`` value: past it (or when ``cancel`` is set) the loop stops with
    ``DeadlineExceeded``. After the warm-up, a run time that cannot fit the remaining repeats before the
    deadline fails at once rather than at the deadline. ``timeout_s`` only words the error message.
    """
    if warmup < 0 or repeats < 1:
        raise TargetError(
            f"bad timing protocol: warmup={warmup}, repeats={repeats}", "use warmup >= 0, repeats >= 1"
        )

    def check(done: int, total: int) -> None:
        if cancel is not None and cancel.is_set():
            raise DeadlineExceeded("measurement cancelled after its deadline")
        if deadline is not None and time.monotonic() > deadline:
            raise DeadlineExceeded(
                f"measurement exceeded its timeout{f' of {timeout_s:g} s' if timeout_s else ''} "
                f"after {done} of {total} runs",
                "raise the target's timeout, use fewer repeats, or a smaller model/batch",
            )

    t_warm = time.perf_counter()
    for i in range(warmup):
        run()
        check(i + 1, warmup + repeats)
    if warmup and deadline is not None:
        per_run = (time.perf_counter() - t_warm) / warmup
        remaining = deadline - time.monotonic()
        if per_run * repeats > remaining:
            raise DeadlineExceeded(
                f"measurement would take about {per_run * repeats:.1f} s ({per_run * 1e3:.1f} ms per run), "
                f"more than the {max(0.0, remaining):.1f} s left of its timeout",
                "raise the target's timeout, use fewer repeats, or a smaller model/batch",
            )
    times: list[float] = []
    clock = time.perf_counter
    for i in range(repeats):
        t0 = clock()
        run()
        times.append((clock() - t0) * 1e3)
        check(warmup + i + 1, warmup + repeats)
    return times


def summarize(times_ms: list[float]) -> dict[str, float]:
    """Robust statistics of timed runs (ms): median, mean, std, min, p10/p90, MAD and outlier count.

    Outliers are runs above median + 5 MAD (scaled to a normal std); they are counted, not dropped, so
    ``mean``/``std`` still show how noisy the device was.
    """
    if not times_ms:
        raise TargetError("no timed runs to summarise")
    xs = sorted(times_ms)
    n = len(xs)
    med = statistics.median(xs)
    mad = statistics.median(abs(x - med) for x in xs) * 1.4826
    mean = statistics.fmean(xs)
    std = statistics.pstdev(xs) if n > 1 else 0.0

    def pct(p: float) -> float:
        k = (n - 1) * p
        lo, hi = math.floor(k), math.ceil(k)
        return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)

    return {
        "median_ms": med,
        "mean_ms": mean,
        "std_ms": std,
        "min_ms": xs[0],
        "p10_ms": pct(0.10),
        "p90_ms": pct(0.90),
        "mad_ms": mad,
        "outliers": float(sum(1 for x in xs if mad > 0 and x > med + 5 * mad)),
    }


class _MeasuringThread:
    """One long-lived daemon thread that runs measurements in order.

    Reusing one thread keeps the OpenMP / ONNX Runtime thread pools it creates warm across measurements
    (a fresh thread per measurement would rebuild them). When a measurement overruns its deadline the
    thread is abandoned and a new one takes over.
    """

    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future] | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, name="compression-measure", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            fn, fut = job
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller as is
                fut.set_exception(exc)

    def submit(self, fn: Callable[[], T]) -> Future:
        fut: Future = Future()
        self.jobs.put((fn, fut))
        return fut


_worker_lock = threading.Lock()
_worker: _MeasuringThread | None = None


def _get_worker() -> _MeasuringThread:
    global _worker
    with _worker_lock:
        if _worker is None or not _worker.thread.is_alive():
            _worker = _MeasuringThread()
        return _worker


def _abandon(worker: _MeasuringThread) -> None:
    global _worker
    with _worker_lock:
        if _worker is worker:
            _worker = None
    worker.jobs.put(None)  # it exits once the stuck job returns, if ever


def run_with_deadline(
    fn: Callable[[threading.Event], T],
    timeout_s: float,
    what: str,
    *,
    started: threading.Event | None = None,
    wait_s: float = DEFAULT_WAIT_S,
) -> T:
    """Run ``fn(cancel)`` on the measuring thread and return its result within ``timeout_s``.

    ``fn`` should poll ``cancel`` (``time_runs`` does). When ``started`` is given, the timeout counts from
    the moment ``fn`` sets it (i.e. after it got the device lock), and waiting for that is bounded by
    ``wait_s`` plus ``timeout_s`` (queueing is not "not answering"). Raises ``TargetError`` naming ``what``.
    """
    if not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
        raise TargetError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    cancel = threading.Event()
    worker = _get_worker()
    fut = worker.submit(lambda: fn(cancel))
    if started is not None:
        limit = time.monotonic() + wait_s + timeout_s
        while not started.is_set() and not fut.done():
            if time.monotonic() > limit:
                cancel.set()
                _abandon(worker)
                raise TargetError(f"{what}: the measurement did not start within {wait_s + timeout_s:.0f} s")
            started.wait(0.01)
    try:
        return fut.result(timeout=timeout_s)
    except TimeoutError:
        cancel.set()
        _abandon(worker)
        raise TargetError(
            f"{what} did not answer within its timeout of {timeout_s:g} s",
            "the target is too slow for this model or stuck; raise its timeout or check the device",
        ) from None


def measure_locked(
    prepare: Callable[[], tuple[Callable[[], Any], dict[str, Any]]],
    *,
    what: str,
    device: str,
    warmup: int,
    repeats: int,
    timeout_s: float,
    wait_s: float = DEFAULT_WAIT_S,
    setup_thread: Callable[[], Callable[[], None]] | None = None,
) -> tuple[dict[str, float], float, dict[str, Any]]:
    """Hold ``device``, build the runnable with ``prepare()``, time it; all within ``timeout_s``.

    ``prepare`` returns ``(run, details)``; its duration is reported as the compile time. ``setup_thread``
    runs first on the measuring thread (e.g. setting torch's thread count) and returns an undo function.
    Returns ``(stats, compile_s, details)`` with ``stats`` from ``summarize`` plus ``lock_wait_s``.
    """
    started = threading.Event()

    def job(cancel: threading.Event) -> tuple[dict[str, float], float, dict[str, Any]]:
        with device_lock(device, wait_s) as waited:
            started.set()
            deadline = time.monotonic() + timeout_s
            undo = setup_thread() if setup_thread is not None else None
            try:
                t0 = time.perf_counter()
                run, details = prepare()
                compile_s = time.perf_counter() - t0
                if cancel.is_set() or time.monotonic() > deadline:
                    raise DeadlineExceeded(
                        f"{what}: preparing took longer than the timeout of {timeout_s:g} s"
                    )
                times = time_runs(
                    run, warmup=warmup, repeats=repeats, deadline=deadline, cancel=cancel, timeout_s=timeout_s
                )
            finally:
                if undo is not None:
                    undo()
            stats = summarize(times)
            stats["lock_wait_s"] = waited
            return stats, compile_s, details

    return run_with_deadline(job, timeout_s, what, started=started, wait_s=wait_s)


def time_interleaved(
    runs: list[Callable[[], Any]],
    *,
    warmup: int,
    repeats: int,
    blocks: int,
    deadline: float | None = None,
    cancel: threading.Event | None = None,
    timeout_s: float | None = None,
    chunk: int = 1,
) -> list[list[list[float]]]:
    """Time several runnables side by side, in turn; ``times[model][block]`` in ms.

    Each model is warmed up ``warmup`` times, then ``blocks`` blocks of ``repeats`` runs each follow, the models
    alternating every ``chunk`` runs (the order rotates, so no model always runs right after the same one; with
    ``chunk`` > 1 each turn starts with one untimed run, which settles what the previous model left behind, e.g.
    ONNX Runtime's spinning pool threads). Runs of different models are then milliseconds apart: a slower stretch
    of the machine (seen here lasting 1-15 s, and making everything 30-70% slower) slows all of them alike, and
    their ratio stays. A run that returns a float reports its own time in ms (a device timer); otherwise the wall
    clock around it counts.
    """
    if warmup < 0 or repeats < 1 or blocks < 1 or chunk < 1 or not runs:
        raise TargetError(
            f"bad timing protocol: warmup={warmup}, repeats={repeats}, blocks={blocks}, {len(runs)} models",
            "use warmup >= 0, repeats >= 1, blocks >= 1 and at least one model",
        )
    n = len(runs)
    total = n * (warmup + repeats * blocks)

    def check(done: int) -> None:
        if cancel is not None and cancel.is_set():
            raise DeadlineExceeded("measurement cancelled after its deadline")
        if deadline is not None and time.monotonic() > deadline:
            raise DeadlineExceeded(
                f"measurement exceeded its timeout{f' of {timeout_s:g} s' if timeout_s else ''} "
                f"after {done} of {total} runs",
                "raise the target's timeout, use fewer repeats, or a smaller model/batch",
            )

    for i in range(warmup):
        for run in runs:
            run()
        check(n * (i + 1))
    out: list[list[list[float]]] = [[[] for _ in range(blocks)] for _ in range(n)]
    clock = time.perf_counter
    done = n * warmup
    turns = -(-repeats // chunk)
    for b in range(blocks):
        for i in range(turns):
            timed = min(chunk, repeats - i * chunk)
            for j in range(n):
                k = (i + j) % n
                if chunk > 1:
                    runs[k]()  # settle: untimed
                for _ in range(timed):
                    t0 = clock()
                    v = runs[k]()
                    dt = (clock() - t0) * 1e3
                    out[k][b].append(float(v) if isinstance(v, float) else dt)
            done += n * timed
            check(done)
    return out


def measure_interleaved_locked(
    prepares: list[Callable[[], tuple[Callable[[], Any], dict[str, Any]]]],
    *,
    what: str,
    device: str,
    warmup: int,
    repeats: int,
    blocks: int,
    timeout_s: float,
    wait_s: float = DEFAULT_WAIT_S,
    setup_thread: Callable[[], Callable[[], None]] | None = None,
    chunk: int = 1,
    watch: Callable[[], Any] | None = None,
) -> tuple[list[list[list[float]]], list[float], list[dict[str, Any]], float]:
    """``measure_locked`` for several models timed side by side (``time_interleaved``).

    Holds ``device`` once for all of them; returns ``(times[model][block], compile_s per model, details per
    model, lock wait s)``. ``watch`` (``contention.CpuWatch``, passed by the backends that time on this machine;
    this module imports nothing of the package) counts other processes' CPU use over the timing alone, not the
    lock wait or the compiles, into each model's ``details["busy_cores"]``.
    """
    started = threading.Event()

    def job(
        cancel: threading.Event,
    ) -> tuple[list[list[list[float]]], list[float], list[dict[str, Any]], float]:
        with device_lock(device, wait_s) as waited:
            started.set()
            deadline = time.monotonic() + timeout_s
            undo = setup_thread() if setup_thread is not None else None
            try:
                runs, compile_s, details = [], [], []
                for prepare in prepares:
                    t0 = time.perf_counter()
                    run, d = prepare()
                    compile_s.append(time.perf_counter() - t0)
                    runs.append(run)
                    details.append(d)
                    if cancel.is_set() or time.monotonic() > deadline:
                        raise DeadlineExceeded(
                            f"{what}: preparing {len(prepares)} models took longer than the timeout of {timeout_s:g} s"
                        )
                with watch() if watch is not None else contextlib.nullcontext() as window:
                    times = time_interleaved(
                        runs,
                        warmup=warmup,
                        repeats=repeats,
                        blocks=blocks,
                        deadline=deadline,
                        cancel=cancel,
                        timeout_s=timeout_s,
                        chunk=chunk,
                    )
                if window is not None and window.others is not None:
                    for d in details:
                        d["busy_cores"] = round(window.others, 3)
            finally:
                if undo is not None:
                    undo()
            return times, compile_s, details, waited

    return run_with_deadline(job, timeout_s, what, started=started, wait_s=wait_s)


def measure_with_cleanup(
    make: Callable[
        [Any, Any], tuple[Callable[[], tuple[Callable[[], Any], dict[str, Any]]], Callable[[], None]]
    ],
    modules: list[Any],
    plans: list[Any],
    **kwargs: Any,
) -> tuple[list[list[list[float]]], list[float], list[dict[str, Any]]]:
    """``measure_interleaved_locked`` over ``make(module, plan) -> (prepare, cleanup)`` of each model; every
    cleanup runs afterwards, also when making a later one or the measurement fails."""
    made: list[tuple[Any, Callable[[], None]]] = []
    try:
        for m, b in zip(modules, plans, strict=True):
            made.append(make(m, b))
        times, compile_s, details, _ = measure_interleaved_locked([p for p, _ in made], **kwargs)
    finally:
        for _, cleanup in made:
            cleanup()
    return times, compile_s, details


def make_measurement(
    spec: TargetSpec,
    stats: dict[str, float],
    compile_s: float,
    details: dict[str, Any],
    warmup: int,
    repeats: int,
    batch: int,
) -> Measurement:
    """A ``Measurement`` from ``measure_locked``'s statistics (the extra statistics go to ``details``)."""
    # imported here so this module stays free of torch (base imports it) for light measuring processes
    from compression.targets.base import Measurement

    details = dict(details)
    for k in ("p10_ms", "p90_ms", "mad_ms", "outliers", "lock_wait_s"):
        if k in stats:
            details[k] = stats[k]
    return Measurement(
        target=spec.name,
        backend=spec.backend,
        mean_ms=stats["mean_ms"],
        median_ms=stats["median_ms"],
        std_ms=stats["std_ms"],
        min_ms=stats["min_ms"],
        runs=repeats,
        warmup=warmup,
        compile_s=compile_s,
        batch=int(batch),
        details=details,
    )
