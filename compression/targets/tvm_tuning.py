"""MetaSchedule tuning with a persistent database per target: a workload is tuned once, ever.

``tune_missing`` extracts the tuning tasks of a fused Relax module (one per distinct fused TIR function),
skips every task the target's database already has a record for (or has tried before), tunes the rest
with MetaSchedule and commits the records. MetaSchedule keys records by the structural hash of the fused
function, so a conv layer tuned inside one model is found for every other model, process and run that has
the same layer at the same shape.

Two problems of TVM 0.27 on these machines are handled here:

- ``apache-tvm-ffi`` 0.1.15.post2 segfaults inside MetaSchedule's ``save_json``; 0.1.14.post0 works
  (pinned in requirements; ``check_ffi_version`` refuses the broken one with a clear message).
- MetaSchedule's builder imports ``tvm.s_tir.tensor_intrin`` in every build worker, and it restarts its
  worker pool for every batch of candidates. That import parses ~500 TVMScript functions, and each parse
  calls ``inspect.stack()``, which resolves source files for every frame: 30-50 s of CPU per import here,
  more than the builder's default 30 s timeout, so every candidate "failed to build" and tuning produced
  nothing. ``_fast_tensor_intrin_import`` swaps in a frame walker that reads source lines only for the few
  frames TVMScript looks at, for the duration of that import only (4 s instead of 50 s), in the tuning
  process and, through the builder's initializer, in each build worker.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from compression.errors import TargetError
from compression.targets.tvm_compile import first_line

BROKEN_FFI_VERSIONS = ("0.1.15.post2",)


def check_ffi_version() -> str:
    """The installed ``apache-tvm-ffi`` version; ``TargetError`` for versions known to crash MetaSchedule."""
    try:
        from importlib.metadata import version

        v = version("apache-tvm-ffi")
    except Exception:  # not installed as a distribution: nothing to check
        return "unknown"
    if v in BROKEN_FFI_VERSIONS:
        raise TargetError(
            f"apache-tvm-ffi {v} crashes MetaSchedule (segfault while saving tuning records)",
            "pip install apache-tvm-ffi==0.1.14.post0 (the version pinned in requirements.txt)",
        )
    return v


def _make_builder_initializer() -> Any:
    """A self-contained function (pickled by value into MetaSchedule's build workers) that pre-imports
    ``tvm.s_tir.tensor_intrin`` with a fast ``inspect.stack`` (see the module docstring)."""

    def initializer() -> None:
        import inspect
        import linecache
        import sys

        def fast_stack(context: int = 1) -> list:
            frame = sys._getframe(1)
            frames = []
            depth = 0
            while frame is not None:
                code = frame.f_code
                line = None
                # TVMScript reads the source line of the first few frames only (is_defined_in_class)
                if context and depth < 4:
                    text = linecache.getline(code.co_filename, frame.f_lineno, frame.f_globals)
                    line = [text] if text else None
                frames.append(
                    inspect.FrameInfo(
                        frame, code.co_filename, frame.f_lineno, code.co_name, line, 0 if line else None
                    )
                )
                frame = frame.f_back
                depth += 1
            return frames

        if "tvm.s_tir.tensor_intrin" in sys.modules:
            return
        original = inspect.stack
        inspect.stack = fast_stack
        try:
            import tvm.s_tir.tensor_intrin  # noqa: F401
        finally:
            inspect.stack = original

    return initializer


def fast_tensor_intrin_import() -> None:
    """Import ``tvm.s_tir.tensor_intrin`` in this process quickly (MetaSchedule's design spaces need it)."""
    _make_builder_initializer()()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def workload_hash(prim_func_mod: Any) -> str:
    """The structural hash of a tuning task's module (what MetaSchedule's database keys records by)."""
    import tvm_ffi

    return str(tvm_ffi.structural_hash(prim_func_mod))


class TuningDatabase:
    """A target's persistent MetaSchedule database plus the list of workloads already tuned.

    ``db_dir`` itself is a MetaSchedule ``JSONDatabase`` holding the best record of each workload only;
    each tuning session's full trial history (and MetaSchedule's logs) goes to ``db_dir/runs/<stamp>``.
    Why: MetaSchedule commits every measured candidate, and loading ResNet-20's 833 records of a 64-trial
    tuning takes 5-14 s here, while the 14 best records load in 0.2-0.5 s; a measurement loads the
    database every time. ``attempted.json`` remembers workloads that were tuned even when no candidate
    built or ran, so a workload is never tuned twice. Every access holds ``db_dir/.lock``: concurrent
    tuners wait for each other and then find each other's records instead of tuning the same workload
    twice.
    """

    def __init__(self, db_dir: str | Path) -> None:
        self.dir = Path(db_dir).expanduser()
        self.lock_path = self.dir / ".lock"
        self.attempted_path = self.dir / "attempted.json"
        self.records_path = self.dir / "database_tuning_record.json"

    @contextlib.contextmanager
    def locked(self) -> Iterator[Any]:
        """Hold the database exclusively; yields the best-records ``JSONDatabase``, loaded under the lock."""
        from tvm.s_tir import meta_schedule as ms

        self.dir.mkdir(parents=True, exist_ok=True)
        with _file_lock(self.lock_path):
            yield ms.database.JSONDatabase(work_dir=str(self.dir), module_equality="structural")

    def attempted(self) -> dict[str, Any]:
        """Workloads tuned before: structural hash -> {name, trials, seconds, at}."""
        try:
            data = json.loads(self.attempted_path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def mark_attempted(self, entries: dict[str, Any]) -> None:
        """Record tuned workloads (call under ``locked``)."""
        data = self.attempted()
        data.update(entries)
        tmp = self.attempted_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, self.attempted_path)

    def n_records(self) -> int:
        """How many tuning records the database holds."""
        try:
            with open(self.records_path) as f:
                return sum(1 for line in f if line.strip())
        except OSError:
            return 0


def tune_missing(
    mod: Any,
    target: Any,
    db: TuningDatabase,
    *,
    trials_per_task: int,
    builder_timeout_s: float = 120.0,
    runner_timeout_s: float = 60.0,
    rpc: dict[str, Any] | None = None,
    what: str = "tuning",
) -> dict[str, Any]:
    """Tune the tasks of the fused module ``mod`` that ``db`` has never seen; a report.

    The report: ``tasks`` (distinct workloads in the model), ``tuned`` (how many were tuned now),
    ``seconds`` (all of it, including waiting for the database lock) and ``db_dir``. With ``rpc`` settings
    the candidates run on the remote device through the tracker (MetaSchedule's ``RPCRunner``).
    """
    from tvm.s_tir import meta_schedule as ms

    check_ffi_version()
    t0 = time.perf_counter()
    with db.locked() as jdb:
        tasks = ms.relax_integration.extract_tasks(mod, target)
        attempted = db.attempted()
        missing = []
        for task in tasks:
            wl = task.dispatched[0]
            h = workload_hash(wl)
            if h in attempted or jdb.query_tuning_record(wl, target, task.task_name) is not None:
                continue
            missing.append((h, task))
        report: dict[str, Any] = {"tasks": len(tasks), "tuned": len(missing), "db_dir": str(db.dir)}
        if missing:
            t_tune = time.perf_counter()
            run_dir = db.dir / "runs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
            run_dir.mkdir(parents=True, exist_ok=True)
            run_db = ms.database.JSONDatabase(work_dir=str(run_dir), module_equality="structural")
            _run_metaschedule(
                [t for _, t in missing],
                target,
                run_db,
                str(run_dir),
                trials_per_task=trials_per_task,
                builder_timeout_s=builder_timeout_s,
                runner_timeout_s=runner_timeout_s,
                rpc=rpc,
                what=what,
            )
            # only the new workloads' best records join the database (the others are not in this run)
            run_db.dump_pruned(jdb)
            per_task = (time.perf_counter() - t_tune) / len(missing)
            stamp = time.time()
            db.mark_attempted(
                {
                    h: {
                        "name": t.task_name,
                        "trials": trials_per_task,
                        "seconds": round(per_task, 2),
                        "at": stamp,
                    }
                    for h, t in missing
                }
            )
    report["seconds"] = time.perf_counter() - t0
    return report


def _run_metaschedule(
    tasks: list[Any],
    target: Any,
    jdb: Any,
    work_dir: str,
    *,
    trials_per_task: int,
    builder_timeout_s: float,
    runner_timeout_s: float,
    rpc: dict[str, Any] | None,
    what: str,
) -> None:
    from tvm.s_tir import meta_schedule as ms

    fast_tensor_intrin_import()
    workers = max(1, os.cpu_count() or 1)
    # MetaSchedule writes its logs to work_dir/logs
    contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
        tasks, work_dir=work_dir, num_threads=workers
    )
    builder = ms.builder.LocalBuilder(
        timeout_sec=builder_timeout_s, max_workers=workers, initializer=_make_builder_initializer()
    )
    if rpc:
        runner: Any = ms.runner.RPCRunner(
            rpc_config=ms.runner.RPCConfig(
                tracker_host=str(rpc["host"]),
                tracker_port=int(rpc["port"]),
                tracker_key=str(rpc["key"]),
                session_timeout_sec=int(rpc.get("timeout_s", 60)),
            ),
            timeout_sec=runner_timeout_s,
        )
    else:
        runner = ms.runner.LocalRunner(timeout_sec=runner_timeout_s)
    try:
        ms.tune.tune_tasks(
            tasks=contexts,
            task_weights=weights,
            work_dir=work_dir,
            max_trials_global=trials_per_task * len(contexts),
            max_trials_per_task=trials_per_task,
            num_trials_per_iter=min(trials_per_task, 64),
            builder=builder,
            runner=runner,
            database=jdb,
            cost_model="xgb",
        )
    except Exception as exc:
        raise TargetError(
            f"{what}: MetaSchedule tuning failed: {type(exc).__name__}: {first_line(exc)}",
            "see the MetaSchedule logs under the database directory, and the pins in docs/targets-tvm.md",
        ) from exc
