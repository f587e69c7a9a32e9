"""The ``tvm`` backend: compile a model with TVM (Relax) for a target and time it, locally or on a remote device.

Settings (all optional; ``registry.validate_target`` calls ``validate_settings``):

- ``target``: the TVM target, a dict such as ``{"kind": "llvm", "mcpu": "cortex-a72", "mtriple":
  "aarch64-linux-gnu", "num-cores": 4}`` (default: ``default_local_target()``, this machine's CPU).
- ``rpc``: ``{"host", "port", "key", "timeout_s", "priority", "session_timeout_s"}``: measure on a device
  registered under ``key`` at a TVM RPC tracker. The model is cross-compiled here, exported as a shared
  library (``cc`` links it), uploaded, loaded and timed on the device. Without ``rpc`` it runs on this CPU.
- ``cc``: the compiler that links the library for an RPC device (default: the system ``g++``; e.g.
  ``aarch64-linux-gnu-g++`` for a Raspberry Pi).
- ``tuning``: ``{"mode", "trials_per_task", "db_dir", "builder_timeout_s", "runner_timeout_s"}``, where
  ``mode`` is one of
    - ``default`` (the default): this package's CPU schedules (``tvm_schedules``), compiled in seconds,
      no tuning;
    - ``database``: like ``default``, but workloads with MetaSchedule records in the target's database use
      them (nothing is tuned);
    - ``metaschedule``: workloads without records are tuned first (``trials_per_task`` trials each, default
      64), the records are saved in the database, and every later measurement in any process reuses them;
    - ``untuned``: TVM's naive lowering, for comparison only: ``details["representative"]`` is false.
  ``db_dir`` defaults to ``~/.cache/compression/tvm/<target fingerprint>`` (``$COMPRESSION_TVM_DB_ROOT``
  replaces ``~/.cache/compression/tvm``).
- ``threads`` (TVM runtime threads on this CPU; default the target's ``num-cores``), ``lock`` / ``wait_s``
  (the local device lock shared with the other local backends, see ``measure.py``), ``min_run_ms`` (each
  timed run averages enough calls to last this long, default 1 ms, so microsecond layers are not timer
  noise).

A measurement: ``torch.export`` -> ``from_exported_program`` -> batch-norm decomposition, legalization and
operator fusion -> schedules (database records, then default rules) -> ``tvm.compile`` -> a Relax
``VirtualMachine`` -> ``time_evaluator`` (C++ timing loop). The output is checked against PyTorch once
(``details["max_abs_diff"]``). ``details["tuning"]`` says how the code was scheduled; a measurement of
naive code is never passed off as the device's speed. TVM here compiles float32 kernels only: a bits plan
is recorded as run in float32 (``details["bits_run"]``).

Numbers, costs of each tuning mode and the recommendation: ``docs/targets-tvm.md``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from compression.errors import ModelError, TargetError
from compression.targets.base import Measurement, TargetSpec
from compression.targets.contention import BUSY_CORES, CpuWatch, quiet_wait_s, wait_for_quiet
from compression.targets.measure import (
    DEFAULT_DEVICE,
    DEFAULT_WAIT_S,
    DeadlineExceeded,
    device_lock,
    make_measurement,
    measure_interleaved_locked,
    run_with_deadline,
    summarize,
)
from compression.targets.onnx_io import as_inputs
from compression.targets.tvm_compile import build, compile_module, first_line
from compression.targets.workloads import FLOAT_BITS, normalize_bits

log = logging.getLogger(__name__)

TUNING_MODES = ("default", "database", "metaschedule", "untuned")
DEFAULT_TRIALS_PER_TASK = 64
DB_ROOT_ENV = "COMPRESSION_TVM_DB_ROOT"
FLOAT_NOTE = "TVM compiles float32 kernels here; the bits plan affects the analytic cost only"

_SETTINGS = {"target", "rpc", "tuning", "threads", "lock", "wait_s", "min_run_ms", "cc"}
_RPC_FIELDS = {"host", "port", "key", "timeout_s", "priority", "session_timeout_s"}
_TUNING_FIELDS = {"mode", "trials_per_task", "db_dir", "builder_timeout_s", "runner_timeout_s"}
# the TVM output must match PyTorch to this (relative to the output's magnitude) or the measurement is refused
_OUTPUT_RTOL = 1e-3


# ------------------------------------------------------------------------------------------ targets
def host_cpu_name() -> str | None:
    """The CPU name LLVM uses for this machine (e.g. ``skylake-avx512``), or None if LLVM cannot tell."""
    try:
        from tvm.target import codegen

        name = str(codegen.llvm_get_system_cpu())
    except Exception:  # an LLVM-less TVM build, or an old TVM without the query
        return None
    return name if name and name != "generic" else None


def default_local_target() -> dict[str, Any]:
    """The TVM target dict for this machine's CPU: ``{"kind": "llvm", "mcpu": <host cpu>, "num-cores": 2}``.

    ``mcpu`` is LLVM's name for the host CPU (so vector units such as AVX-512 are used); it is left out
    when LLVM cannot detect it. ``num-cores`` is what MetaSchedule tunes parallel loops for; it is 2 (the
    machines this project runs on) or fewer on a smaller machine.
    """
    target: dict[str, Any] = {"kind": "llvm"}
    cpu = host_cpu_name()
    if cpu:
        target["mcpu"] = cpu
    target["num-cores"] = max(1, min(2, os.cpu_count() or 1))
    return target


def tvm_target(target: Mapping[str, Any] | str, name: str = "tvm") -> Any:
    """A ``tvm.target.Target`` from a dict (or string); ``TargetError`` naming the problem when TVM refuses it."""
    import tvm

    try:
        return tvm.target.Target(dict(target) if isinstance(target, Mapping) else target)
    except Exception as exc:  # TVM raises ValueError/TVMError with a long C++ trace; keep one line
        raise TargetError(
            f"target {name}: TVM does not accept the target {json.dumps(target, default=str)}: {first_line(exc)}",
            'use a dict like {"kind": "llvm", "mcpu": "cortex-a72", "mtriple": "aarch64-linux-gnu", "num-cores": 4}',
        ) from exc


def _target_json(target: Any) -> dict[str, Any]:
    # str(Target) is its canonical JSON in TVM 0.27 (export() returns FFI containers)
    try:
        data = json.loads(str(target))
    except ValueError:
        data = None
    return data if isinstance(data, dict) else {"kind": target.kind.name, "str": str(target)}


def target_fingerprint(target: Mapping[str, Any] | str) -> str:
    """A directory-safe name for a target and this TVM version, e.g. ``llvm-skylake-avx512-2c-1a2b3c4d5e6f``.

    Tuning records are valid only for the exact target and TVM version they were tuned with, so both are
    hashed.
    """
    import tvm

    t = tvm_target(target)
    data = _target_json(t)
    digest = hashlib.sha256(
        json.dumps({"target": data, "tvm": tvm.__version__}, sort_keys=True).encode()
    ).hexdigest()[:12]
    parts = [t.kind.name]
    for attr in ("mtriple", "mcpu"):
        v = data.get(attr)
        if v:
            parts.append(str(v).split("-")[0] if attr == "mtriple" else str(v))
    if data.get("num-cores"):
        parts.append(f"{data['num-cores']}c")
    safe = "-".join("".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in p) for p in parts)
    return f"{safe}-{digest}"


def default_db_dir(target: Mapping[str, Any] | str) -> Path:
    """Where the MetaSchedule database of ``target`` lives unless ``tuning.db_dir`` says otherwise."""
    root = os.environ.get(DB_ROOT_ENV) or os.path.join(
        os.path.expanduser("~"), ".cache", "compression", "tvm"
    )
    return Path(root) / target_fingerprint(target)


# ------------------------------------------------------------------------------------------ settings
def _positive(label: str, value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise TargetError(f"{label} must be a positive number, got {value!r}")
    return float(value)


def _positive_int(label: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TargetError(f"{label} must be an integer >= 1, got {value!r}")
    return value


def validate_settings(name: str, settings: Mapping[str, Any]) -> None:
    """Check a ``tvm`` target's settings; raise ``TargetError`` saying what is wrong and how to fix it."""
    unknown = sorted(set(settings) - _SETTINGS)
    if unknown:
        raise TargetError(f"target {name}: unknown tvm settings {unknown}", f"allowed: {sorted(_SETTINGS)}")
    target = settings.get("target")
    if target is not None:
        if not isinstance(target, (Mapping, str)):
            raise TargetError(f"target {name}: the TVM target must be a dict, got {type(target).__name__}")
        t = tvm_target(target, name)
        if t.kind.name not in ("llvm", "c") and "rpc" not in settings:
            # a GPU target would need a local GPU; this backend times on CPU devices or through RPC
            raise TargetError(
                f"target {name}: TVM target kind {t.kind.name!r} cannot run on this machine",
                "use kind llvm for CPUs, or add rpc settings for a remote device of that kind",
            )
    rpc = settings.get("rpc")
    if rpc is not None:
        if not isinstance(rpc, Mapping):
            raise TargetError(f"target {name}: rpc must be an object with host, port and key")
        unknown = sorted(set(rpc) - _RPC_FIELDS)
        if unknown:
            raise TargetError(
                f"target {name}: unknown rpc fields {unknown}", f"allowed: {sorted(_RPC_FIELDS)}"
            )
        for required in ("host", "port", "key"):
            if required not in rpc:
                raise TargetError(
                    f"target {name}: rpc is missing {required!r}",
                    "give the tracker host, port and device key",
                )
        if isinstance(rpc["port"], bool) or not isinstance(rpc["port"], int) or not 1 <= rpc["port"] <= 65535:
            raise TargetError(f"target {name}: rpc port must be an integer in 1..65535, got {rpc['port']!r}")
        for t_field in ("timeout_s", "session_timeout_s"):
            if t_field in rpc:
                _positive(f"target {name}: rpc {t_field}", rpc[t_field])
    tuning = settings.get("tuning")
    if tuning is not None:
        if not isinstance(tuning, Mapping):
            raise TargetError(f"target {name}: tuning must be an object", f"fields: {sorted(_TUNING_FIELDS)}")
        unknown = sorted(set(tuning) - _TUNING_FIELDS)
        if unknown:
            raise TargetError(
                f"target {name}: unknown tuning fields {unknown}", f"allowed: {sorted(_TUNING_FIELDS)}"
            )
        mode = tuning.get("mode", "default")
        if mode not in TUNING_MODES:
            raise TargetError(
                f"target {name}: unknown tuning mode {mode!r}", f"use one of {', '.join(TUNING_MODES)}"
            )
        if "trials_per_task" in tuning:
            _positive_int(f"target {name}: tuning trials_per_task", tuning["trials_per_task"])
        for t_field in ("builder_timeout_s", "runner_timeout_s"):
            if t_field in tuning:
                _positive(f"target {name}: tuning {t_field}", tuning[t_field])
        if "db_dir" in tuning and not (isinstance(tuning["db_dir"], str) and tuning["db_dir"].strip()):
            raise TargetError(f"target {name}: tuning db_dir must be a directory path")
    if "threads" in settings:
        _positive_int(f"target {name}: threads", settings["threads"])
    if "min_run_ms" in settings:
        _positive(f"target {name}: min_run_ms", settings["min_run_ms"])
    if "cc" in settings and not (isinstance(settings["cc"], str) and settings["cc"].strip()):
        raise TargetError(f"target {name}: cc must be a compiler command, e.g. aarch64-linux-gnu-g++")


def make_backend(spec: TargetSpec) -> TvmBackend:
    """The TVM backend for ``spec`` (settings are validated first)."""
    validate_settings(spec.name, spec.settings)
    return TvmBackend(spec)


# ------------------------------------------------------------------------------------------ backend
@dataclass
class Compiled:
    """A compiled model and what it took: the executable, seconds, and how it was scheduled."""

    executable: Any
    compile_s: float
    tuning_s: float
    details: dict[str, Any] = field(default_factory=dict)


class TvmBackend:
    """Measures latency of models compiled by TVM, on this CPU or on an RPC device (see module docstring)."""

    # A latency table on TVM sums each entry's fastest run, not its median. Compiled code does the same work every
    # run, and a disturbance only adds time; an entry is timed for a fraction of a second, so a disturbance of that
    # length moves its median, not its minimum. On a cloud Xeon whose TVM timings moved 13-16% within a run, the
    # same entries measured twice differed by 5-37% at the 90th percentile by median and 4-9% by minimum, and
    # section 3 (docs/BENCHMARKS.md, session 18) measured 15.9% and 17.7% by median, 5.4% and 7.9% by minimum.
    # The table's calibration measures its end-to-end models by the same statistic, so its calibrated predictions
    # estimate a model's fastest runs; the search compares them as ratios to the original's.
    table_statistic = "min"

    def __init__(self, spec: TargetSpec) -> None:
        self.spec = spec
        s = spec.settings
        self.rpc: dict[str, Any] | None = dict(s["rpc"]) if s.get("rpc") else None
        self.target_dict: dict[str, Any] | str = s.get("target") or default_local_target()
        self.target = tvm_target(self.target_dict, spec.name)
        tuning = dict(s.get("tuning") or {})
        self.mode: str = tuning.get("mode", "default")
        self.trials_per_task = int(tuning.get("trials_per_task", DEFAULT_TRIALS_PER_TASK))
        self.builder_timeout_s = float(tuning.get("builder_timeout_s", 120.0))
        self.runner_timeout_s = float(tuning.get("runner_timeout_s", 60.0))
        self.db_dir = (
            Path(tuning["db_dir"]).expanduser() if tuning.get("db_dir") else default_db_dir(self.target_dict)
        )
        cores = self.target.attrs.get("num-cores")
        self.threads = int(s.get("threads") or (int(cores) if cores else 2))
        self.device = str(s.get("lock", DEFAULT_DEVICE))
        self.wait_s = float(s.get("wait_s", DEFAULT_WAIT_S))
        self.min_run_ms = float(s.get("min_run_ms", 1.0))
        self._stays_busy = False  # the last busy batch found no quiet moment (``_time_again_when_quiet``)
        self._busy_kept = 0  # workloads timed busy and kept since then
        self.cc: str | None = s.get("cc")
        if self.rpc is None and self.mode == "metaschedule" and self.target.kind.name != "llvm":
            raise TargetError(
                f"target {spec.name}: MetaSchedule tuning here needs an llvm target or an RPC device"
            )

    # ---------------------------------------------------------------------------------- facts
    @property
    def interleaves(self) -> bool:
        """Models can be timed side by side here (``measure_interleaved``): local targets only."""
        return self.rpc is None

    @property
    def remote(self) -> bool:
        """True when measurements go through an RPC tracker."""
        return self.rpc is not None

    def bits_run(self, w_bits: int, a_bits: int) -> tuple[int, int]:
        """The bit-widths TVM really runs for a request here: always float32."""
        return (FLOAT_BITS, FLOAT_BITS)

    def fingerprint(self) -> dict[str, Any]:
        """What a latency measured here depends on (keys a latency table)."""
        import tvm

        from compression.targets.torch_backend import cpu_model

        fp: dict[str, Any] = {
            "backend": "tvm",
            "tvm": tvm.__version__,
            "target": _target_json(self.target),
            "tuning": self.mode,
            "schedules": "tvm_schedules-4",
        }
        if self.mode == "metaschedule":
            fp["trials_per_task"] = self.trials_per_task
        if self.mode in ("database", "metaschedule"):
            # which records apply depends on the database: entries measured against another one differ
            fp["db_dir"] = str(self.db_dir)
        if self.rpc:
            fp["device"] = f"rpc:{self.rpc['key']}"
        else:
            fp["device"] = f"local:{cpu_model()}"
            fp["threads"] = self.threads
        return fp

    def check(self) -> dict[str, Any]:
        """Health: local CPU facts, or the tracker's queue for the key after a short device request."""
        import tvm

        info: dict[str, Any] = {
            "backend": "tvm",
            "tvm": tvm.__version__,
            "target": _target_json(self.target),
            "tuning": self.mode,
        }
        if self.rpc is None:
            from tvm.target import codegen

            from compression.targets.torch_backend import cpu_model

            self._check_local_target()
            dev = tvm.cpu(0)
            if not dev.exist:
                raise TargetError(f"target {self.spec.name}: TVM sees no CPU device")
            info.update(
                reachable=True,
                device="local",
                cpu=cpu_model(),
                llvm_cpu=host_cpu_name(),
                llvm_version=int(codegen.llvm_version_major()),
                threads=self.threads,
                db_dir=str(self.db_dir),
                db_records=_n_records(self.db_dir),
            )
            return info
        from compression.targets import tvm_rpc

        host, port, key = self.rpc["host"], int(self.rpc["port"]), self.rpc["key"]
        timeout = min(float(self.rpc.get("timeout_s", tvm_rpc.DEFAULT_TIMEOUT_S)), 10.0)
        summary = tvm_rpc.tracker_summary(host, port, timeout_s=timeout)

        def probe(sess: Any) -> dict[str, Any]:
            dev = sess.cpu(0)
            return {"device_cpu_exists": bool(dev.exist)}

        probed = tvm_rpc.run_on_device(self.rpc, probe, timeout_s=timeout, what="health check")
        q = summary.get("queue_info", {}).get(key, {})
        info.update(
            reachable=True,
            device=f"rpc://{host}:{port}/{key}",
            servers=tvm_rpc.servers_for_key(summary, key),
            free=q.get("free"),
            pending=q.get("pending"),
            **probed,
        )
        return info

    def _check_local_target(self) -> None:
        from tvm.target import codegen

        if self.target.kind.name != "llvm":
            raise TargetError(
                f"target {self.spec.name}: kind {self.target.kind.name!r} cannot run on this CPU"
            )
        triple = self.target.attrs.get("mtriple")
        if triple:
            host_arch = str(codegen.llvm_get_system_triple()).split("-")[0]
            if str(triple).split("-")[0] != host_arch:
                raise TargetError(
                    f"target {self.spec.name}: compiles for {triple} but has no rpc device; this machine is {host_arch}",
                    "add rpc settings (tracker host, port, device key) to measure on that device",
                )

    # ---------------------------------------------------------------------------------- compile
    def _import(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Any:
        return compile_module(module, inputs, self.target)

    def tune(
        self, module: nn.Module, example_input: torch.Tensor | tuple[torch.Tensor, ...]
    ) -> dict[str, Any]:
        """Tune the model's workloads that the database has not seen (MetaSchedule); a report.

        Runs in any tuning mode (it is how a database is filled ahead of time). Tuning on this CPU holds
        the local device lock: it measures candidates, and must not time alongside other measurements.
        """
        inputs = as_inputs(example_input)
        mod = self._import(module, inputs)
        return self._tune_fused(mod)

    def _tune_fused(self, mod: Any) -> dict[str, Any]:
        from compression.targets.tvm_tuning import TuningDatabase, tune_missing

        # tuning on this CPU times candidates: it must hold the device like any measurement
        lock = contextlib.nullcontext(0.0) if self.rpc else device_lock(self.device, self.wait_s)
        with lock:
            return tune_missing(
                mod,
                self.target,
                TuningDatabase(self.db_dir),
                trials_per_task=self.trials_per_task,
                builder_timeout_s=self.builder_timeout_s,
                runner_timeout_s=self.runner_timeout_s,
                rpc=self.rpc,
                what=f"target {self.spec.name}",
            )

    def _schedule(self, mod: Any) -> tuple[Any, dict[str, Any]]:
        """Apply database records (modes database/metaschedule) and default schedules; report the counts."""
        from compression.targets.tvm_schedules import count_scheduled, schedule_module

        total = count_scheduled(mod)[1]
        info: dict[str, Any] = {"functions": total}
        if self.mode == "untuned":
            info.update(
                tuning="untuned",
                representative=False,
                from_database=0,
                default_schedules=0,
                unscheduled=total,
            )
            return mod, info
        from_db = 0
        if (
            self.mode in ("database", "metaschedule")
            and (self.db_dir / "database_tuning_record.json").exists()
        ):
            import tvm
            from tvm import relax

            from compression.targets.tvm_tuning import TuningDatabase

            with (
                TuningDatabase(self.db_dir).locked() as jdb,
                self.target,
                jdb,
                tvm.transform.PassContext(opt_level=3),
            ):
                mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
            from_db = count_scheduled(mod)[0]
            info["db_dir"] = str(self.db_dir)
        mod, counts = schedule_module(mod, self.target)
        unscheduled = counts["unscheduled"]
        default = counts["anchor"] + counts["fallback"]
        if from_db and default == 0 and unscheduled == 0:
            state = f"tuned ({from_db} records, from database)"
        elif from_db:
            state = f"tuned ({from_db} records, from database) + default schedules ({default})"
        else:
            state = "default schedules"
        if unscheduled:
            state += f"; {unscheduled} of {total} functions untuned"
        info.update(
            tuning=state,
            representative=unscheduled == 0,
            from_database=from_db,
            default_schedules=default,
            unscheduled=unscheduled,
        )
        return mod, info

    def compile(
        self, module: nn.Module, example_input: torch.Tensor | tuple[torch.Tensor, ...], *, fused: Any = None
    ) -> Compiled:
        """Compile ``module`` for the target (tuning first in ``metaschedule`` mode); the executable and facts."""
        inputs = as_inputs(example_input)
        tuning_s = 0.0
        t0 = time.perf_counter()
        mod = fused if fused is not None else self._import(module, inputs)
        import_s = time.perf_counter() - t0 if fused is None else 0.0
        details: dict[str, Any] = {}
        if self.mode == "metaschedule" and fused is None:
            report = self._tune_fused(mod)
            tuning_s = report["seconds"]
            details["tuning_report"] = report
        built = self._build_fused(mod)
        details.update(built.details)
        return Compiled(built.executable, import_s + built.compile_s, tuning_s, details)

    def _build_fused(self, mod: Any) -> Compiled:
        """Schedule and build a fused module (``tvm_compile.fuse``); its executable, seconds and schedule facts."""
        t1 = time.perf_counter()
        mod, info = self._schedule(mod)
        try:
            ex = build(mod, self.target)
        except Exception as exc:
            raise TargetError(
                f"target {self.spec.name}: TVM failed to compile the model: {type(exc).__name__}: {first_line(exc)}"
            ) from exc
        return Compiled(ex, time.perf_counter() - t1, 0.0, info)

    # ---------------------------------------------------------------------------------- measure
    def measure(
        self,
        module: nn.Module,
        example_input: torch.Tensor | tuple[torch.Tensor, ...],
        *,
        warmup: int = 10,
        repeats: int = 50,
        timeout_s: float = 120.0,
        bits: Any = None,
    ) -> Measurement:
        """Compile ``module`` for the target and time it there (see the module docstring).

        ``timeout_s`` bounds compiling and timing (and, for an RPC device, waiting for it in the tracker's
        queue); MetaSchedule tuning of new workloads (mode ``metaschedule``) happens before and is bounded by
        its trial budget instead. Raises ``TargetError`` when the target fails or does not answer in time.
        """
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise TargetError(f"warmup must be an integer >= 0, got {warmup!r}")
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise TargetError(f"repeats must be an integer >= 1, got {repeats!r}")
        _positive("timeout_s", timeout_s)
        inputs = as_inputs(example_input)
        bits_details = _bits_details(bits)
        reference, rtol = _reference(module, inputs)

        fused = None
        tuning_details: dict[str, Any] = {}
        tuning_s = 0.0
        if self.mode == "metaschedule":
            # tuning is bounded by its trial budget, not by the measurement's timeout
            t0 = time.perf_counter()
            fused = self._import(module, inputs)
            import_s = time.perf_counter() - t0
            report = self._tune_fused(fused)
            tuning_s = report["seconds"]
            tuning_details["tuning_report"] = report
        else:
            import_s = 0.0

        if self.rpc:
            stats, compile_s, details = self._measure_remote(
                module, inputs, fused, warmup, repeats, timeout_s, reference, rtol
            )
        else:
            stats, compile_s, details = self._measure_local(
                module, inputs, fused, warmup, repeats, timeout_s, reference, rtol
            )
        details.update(tuning_details)
        details.update(bits_details)
        details["tuning_s"] = tuning_s
        details["dtype"] = "float32"
        details["target_fingerprint"] = target_fingerprint(self.target_dict)
        return make_measurement(
            self.spec, stats, compile_s + import_s, details, warmup, repeats, inputs[0].shape[0]
        )

    def measure_many(
        self,
        items: Sequence[tuple[nn.Module, torch.Tensor | tuple[torch.Tensor, ...], Any]],
        *,
        warmup: int = 10,
        repeats: int = 50,
        timeout_s: float = 120.0,
    ) -> list[Measurement | Exception]:
        """Measure many small models (``(module, example_input, bits)``): compiled together, timed one by one.

        What a latency table measures: one-layer modules, most of whose compile time is fixed (PyTorch's
        decomposition tables are rebuilt on every import, LLVM and the pass pipeline start once per build). They
        are exported, imported, fused, scheduled and built as one module with one function each
        (``tvm_compile.import_many``), then each function is checked against PyTorch and timed on its own, as
        ``measure`` would time it: on this CPU under the device lock, or on an RPC device in one session (one
        library linked, uploaded and loaded for the batch). ``compile_s`` is the batch's compile time shared
        equally (``details["compiled_with"]`` says among how many). Returns one result per item, in order: a
        ``Measurement``, or the exception measuring that item raised (others still get measured; when an RPC
        session fails part way, the items it had not measured get its error). In ``metaschedule`` mode each
        item is measured with ``measure`` instead (``timeout_s`` is per item throughout).
        """

        def one_by_one(indices: Sequence[int]) -> dict[int, Measurement | Exception]:
            out: dict[int, Measurement | Exception] = {}
            for i in indices:
                module, example, bits = items[i]
                try:
                    out[i] = self.measure(
                        module, example, warmup=warmup, repeats=repeats, timeout_s=timeout_s, bits=bits
                    )
                except (TargetError, ModelError) as exc:
                    out[i] = exc
            return out

        if len(items) < 2 or self.mode == "metaschedule":
            done = one_by_one(range(len(items)))
            return [done[i] for i in range(len(items))]
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise TargetError(f"warmup must be an integer >= 0, got {warmup!r}")
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise TargetError(f"repeats must be an integer >= 1, got {repeats!r}")
        _positive("timeout_s", timeout_s)
        if not self.rpc:
            self._check_local_target()
        results: dict[int, Measurement | Exception] = {}
        prepared: list[_Prepared] = []
        for i, (module, example, bits) in enumerate(items):
            inputs = as_inputs(example)
            try:
                reference, rtol = _reference(module, inputs)
            except Exception:  # the module itself fails: its own measurement says how
                results.update(one_by_one([i]))
                continue
            prepared.append(_Prepared(i, module, inputs, reference, rtol, _bits_details(bits)))
        if len(prepared) < 2:
            results.update(one_by_one([p.index for p in prepared]))
            return [results[i] for i in range(len(items))]
        if self.rpc:
            done, failed = self._measure_many_remote(prepared, warmup, repeats, timeout_s)
        else:
            done, failed = self._measure_many_local(prepared, warmup, repeats, timeout_s)
        if done is None:
            # one operation TVM cannot take spoils the batch: measuring each alone says which, with its own error
            log.info(
                "%s: %d workloads did not compile together (%s); measuring them one by one",
                self.spec.name,
                len(prepared),
                failed,
            )
            done = one_by_one([p.index for p in prepared])
        results.update(done)
        return [results[i] for i in range(len(items))]

    def _compile_many(self, prepared: Sequence[_Prepared]) -> tuple[Compiled, list[str], float] | str:
        """Import, fuse and build the batch as one module: (compiled, function names, compile seconds per item),
        or why the batch could not be compiled together."""
        from compression.targets.tvm_compile import fuse, import_many

        t0 = time.perf_counter()
        try:
            mod, names = import_many(
                [(p.module, p.inputs) for p in prepared], [len(p.reference) for p in prepared]
            )
            fused = fuse(mod, self.target)
        except Exception as exc:
            return first_line(exc)
        import_s = time.perf_counter() - t0
        try:
            compiled = self._build_fused(fused)
        except TargetError as exc:  # one function LLVM cannot build: measured alone, each gets its own error
            return exc.what
        return compiled, names, (import_s + compiled.compile_s) / len(prepared)

    def _batch_measurement(
        self,
        p: _Prepared,
        stats: dict[str, float],
        details: dict[str, Any],
        compile_s: float,
        n: int,
        warmup: int,
        repeats: int,
    ) -> Measurement:
        details.update(
            compiled_with=n,
            tuning_s=0.0,
            dtype="float32",
            target_fingerprint=target_fingerprint(self.target_dict),
        )
        details.update(p.bits_details)
        return make_measurement(self.spec, stats, compile_s, details, warmup, repeats, p.inputs[0].shape[0])

    def _measure_many_local(
        self, prepared: Sequence[_Prepared], warmup: int, repeats: int, timeout_s: float
    ) -> tuple[dict[int, Measurement | Exception] | None, str]:
        import tvm
        from tvm import relax

        what = f"target {self.spec.name}"
        started = threading.Event()

        def job(cancel: threading.Event) -> tuple[dict[int, Measurement | Exception] | None, str]:
            # compiling holds the device like timing does: it would disturb another process's measurement
            with device_lock(self.device, self.wait_s) as waited:
                started.set()
                job_deadline = time.monotonic() + timeout_s * len(prepared)
                built = self._compile_many(prepared)
                if isinstance(built, str):
                    return None, built
                compiled, names, compile_s = built
                _config_threads(self.threads)
                dev = tvm.cpu(0)
                vm = relax.VirtualMachine(compiled.executable, dev)

                def time_all(todo: Sequence[tuple[_Prepared, str]]) -> tuple[dict[int, Any], float | None]:
                    """Check and time each function; (index -> (stats, details) or its error, other processes'
                    CPU use meanwhile in cores)."""
                    timed: dict[int, Any] = {}
                    with CpuWatch() as watch:
                        for p, name in todo:
                            if cancel.is_set():
                                raise DeadlineExceeded(
                                    f"{what}: measuring {len(prepared)} workloads was cancelled"
                                )
                            try:
                                timed[p.index] = self._check_and_time(
                                    vm,
                                    dev,
                                    compiled,
                                    p.inputs,
                                    p.reference,
                                    p.rtol,
                                    warmup,
                                    repeats,
                                    time.monotonic() + timeout_s,
                                    cancel,
                                    timeout_s,
                                    func=name,
                                )
                            except TargetError as exc:
                                timed[p.index] = exc
                    return timed, watch.others

                pairs = list(zip(prepared, names, strict=True))
                t_timing = time.monotonic()
                timed, busy = time_all(pairs)
                busy_info: dict[str, Any] = {} if busy is None else {"busy_cores": round(busy, 3)}
                if busy is not None and busy > BUSY_CORES:
                    # what is left of the batch's deadline bounds the wait and the second timing
                    busy_info = self._time_again_when_quiet(
                        pairs, timed, busy, time_all, time.monotonic() - t_timing, job_deadline
                    )
                elif busy is not None:
                    self._quiet_again()
                out: dict[int, Measurement | Exception] = {}
                for p in prepared:
                    got = timed[p.index]
                    if isinstance(got, Exception):
                        out[p.index] = got
                        continue
                    stats, details = got
                    stats["lock_wait_s"] = waited
                    out[p.index] = self._batch_measurement(
                        p, stats, {**details, **busy_info}, compile_s, len(prepared), warmup, repeats
                    )
                return out, ""

        return run_with_deadline(job, timeout_s * len(prepared), what, started=started, wait_s=self.wait_s)

    def _measure_many_remote(
        self, prepared: Sequence[_Prepared], warmup: int, repeats: int, timeout_s: float
    ) -> tuple[dict[int, Measurement | Exception] | None, str]:
        """The batch on the RPC device: built and linked here, then one session uploads the library once and
        checks and times each function on the device."""
        from compression.targets import tvm_rpc

        assert self.rpc is not None
        what = f"target {self.spec.name}"
        deadline = time.monotonic() + timeout_s * len(prepared)
        built = self._compile_many(prepared)
        if isinstance(built, str):
            return None, built
        compiled, names, compile_s = built
        timed: dict[int, tuple[list[float], int, float, float] | TargetError] = {}
        stop = (
            threading.Event()
        )  # set when the session is abandoned at its deadline: the loop stops between items
        with tempfile.TemporaryDirectory(prefix="compression-tvm-") as tmp:
            lib_path = Path(tmp) / "batch.so"
            try:
                self._export_library(compiled.executable, lib_path)
            except TargetError as exc:
                return None, exc.what
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                late = DeadlineExceeded(
                    f"{what}: compiling {len(prepared)} workloads took longer than their timeout of "
                    f"{timeout_s * len(prepared):g} s"
                )
                return {p.index: late for p in prepared}, ""

            def remote_job(sess: Any) -> None:
                vm, dev = _load_on_device(sess, lib_path)
                for p, name in zip(prepared, names, strict=True):
                    if stop.is_set():
                        return
                    t_item = time.monotonic()
                    try:
                        times, number, diff = self._check_then_time(
                            vm,
                            dev,
                            p,
                            what,
                            warmup,
                            repeats,
                            t_item + timeout_s,
                            stop,
                            timeout_s,
                            name,
                        )
                        timed[p.index] = (times, number, diff, time.monotonic() - t_item)
                    except TargetError as exc:  # this workload's own failure; the session goes on
                        timed[p.index] = exc
                    except Exception as exc:
                        if not _session_alive(dev):
                            # the device died: this item and the rest get the session's error, which names
                            # the workload it died on (a kernel that crashes the device shows which); what was
                            # measured before stays
                            raise RuntimeError(
                                f"the session ended during workload {p.index}: {type(exc).__name__}: "
                                f"{first_line(exc)}"
                            ) from exc
                        # a remote error in this function alone: named, and the session goes on
                        timed[p.index] = TargetError(
                            f"{what}: workload {p.index} failed on the device: {type(exc).__name__}: {first_line(exc)}"
                        )

            # the session lasts the whole batch: a session timeout sized for one model must not cut it short
            settings = dict(self.rpc)
            settings["session_timeout_s"] = max(
                float(settings.get("session_timeout_s", 0.0)), remaining + 30.0
            )
            t_wait = time.monotonic()
            session_error: TargetError | None = None
            try:
                tvm_rpc.run_on_device(settings, remote_job, timeout_s=remaining, what=what)
            except TargetError as exc:  # the device died or did not answer: what it measured before stays
                session_error = exc
            finally:
                stop.set()
            session_s = time.monotonic() - t_wait
        done = dict(timed)  # what the session measured by now (an abandoned one stops at its next item)
        out: dict[int, Measurement | Exception] = {}
        for p in prepared:
            got = done.get(p.index)
            if got is None:
                assert session_error is not None
                out[p.index] = session_error
            elif isinstance(got, TargetError):
                out[p.index] = got
            else:
                times, number, diff, item_s = got
                # this item's check and timing on the device, and the batch's whole session (the wait for the
                # device, the upload and every item), shared by its items
                details = self._remote_details(
                    compiled, number, diff, on_device_s=item_s, batch_session_s=session_s
                )
                out[p.index] = self._batch_measurement(
                    p, summarize(times), details, compile_s, len(prepared), warmup, repeats
                )
        return out, ""

    def measure_interleaved(
        self,
        modules: Sequence[nn.Module],
        example_input: torch.Tensor | tuple[torch.Tensor, ...],
        *,
        bits: Sequence[Any] | None = None,
        warmup: int = 10,
        repeats: int = 50,
        blocks: int = 3,
        timeout_s: float = 300.0,
    ) -> tuple[list[list[list[float]]], list[float], list[dict[str, Any]]]:
        """Time ``modules`` side by side on this machine's CPU (``measure.time_interleaved``).

        Each model is compiled (and checked against PyTorch's output) once; a run is one call of TVM's timer
        averaging as many calls as ``min_run_ms`` takes, the models in turn. Local targets only: a remote
        device is measured model by model (``compare_models`` falls back). ``bits`` only annotates (float).
        """
        if self.rpc:
            raise TargetError(f"target {self.spec.name}: side-by-side timing runs on local targets only")
        import tvm
        from tvm import relax

        self._check_local_target()
        inputs = as_inputs(example_input)
        prepares = []
        for module in modules:
            reference, rtol = _reference(module, inputs)
            fused = None
            if self.mode == "metaschedule":
                fused = self._import(module, inputs)
                self._tune_fused(fused)

            def prepare(
                module=module, reference=reference, rtol=rtol, fused=fused
            ) -> tuple[Any, dict[str, Any]]:
                what = f"target {self.spec.name}"
                compiled = self.compile(module, inputs, fused=fused)
                _config_threads(self.threads)
                dev = tvm.cpu(0)
                vm = relax.VirtualMachine(compiled.executable, dev)
                args = [tvm.runtime.tensor(t.detach().cpu().numpy(), dev) for t in inputs]
                diff = _check_output(vm, args, reference, what, rtol)
                vm.save_function("main", "compression_timed", *args, include_return=False)
                first = vm.time_evaluator("compression_timed", dev, number=1, repeat=max(1, warmup))()
                per_call_ms = float(np.median(first.results)) * 1e3
                number = max(1, math.ceil(self.min_run_ms / max(per_call_ms, 1e-6)))
                timer = vm.time_evaluator("compression_timed", dev, number=number, repeat=1)

                def run() -> float:
                    return float(timer().results[0]) * 1e3

                details = self._local_details(compiled, number, diff, "tvm time_evaluator, interleaved")
                details["dtype"] = "float32"
                return run, details

            prepares.append(prepare)
        times, compile_s, details, _ = measure_interleaved_locked(
            prepares,
            what=f"target {self.spec.name}",
            device=self.device,
            warmup=1,  # the per-call calibration above warmed each model up
            repeats=repeats,
            blocks=blocks,
            timeout_s=timeout_s,
            wait_s=self.wait_s,
            watch=CpuWatch,  # local: other processes' CPU use is recorded
        )
        return times, compile_s, details

    def _measure_local(
        self,
        module: nn.Module,
        inputs: tuple[torch.Tensor, ...],
        fused: Any,
        warmup: int,
        repeats: int,
        timeout_s: float,
        reference: list[np.ndarray],
        rtol: float = _OUTPUT_RTOL,
    ) -> tuple[dict[str, float], float, dict[str, Any]]:
        import tvm
        from tvm import relax

        self._check_local_target()
        started = threading.Event()
        what = f"target {self.spec.name}"

        def job(cancel: threading.Event) -> tuple[dict[str, float], float, dict[str, Any]]:
            with device_lock(self.device, self.wait_s) as waited:
                started.set()
                deadline = time.monotonic() + timeout_s
                compiled = self.compile(module, inputs, fused=fused)
                if cancel.is_set() or time.monotonic() > deadline:
                    raise DeadlineExceeded(
                        f"{what}: compiling took longer than the timeout of {timeout_s:g} s"
                    )
                _config_threads(self.threads)
                dev = tvm.cpu(0)
                vm = relax.VirtualMachine(compiled.executable, dev)
                stats, details = self._check_and_time(
                    vm, dev, compiled, inputs, reference, rtol, warmup, repeats, deadline, cancel, timeout_s
                )
                stats["lock_wait_s"] = waited
                return stats, compiled.compile_s, details

        return run_with_deadline(job, timeout_s, what, started=started, wait_s=self.wait_s)

    def _time_again_when_quiet(
        self,
        pairs: Sequence[tuple[_Prepared, str]],
        timed: dict[int, Any],
        busy: float,
        time_all: Any,
        timing_s: float,
        deadline: float,
    ) -> dict[str, Any]:
        """Other processes used ``busy`` cores while the batch was timed: wait for a quiet second (at most
        ``contention.quiet_wait_s()``) and time the batch again, each entry keeping the faster of its two timings
        by its fastest run (a disturbance only slows). Updates ``timed``; returns what the entries' details record.

        A machine that stays busy is not waited on batch after batch: after a wait that found no quiet second the
        next busy batches are kept as timed (and logged) until one is timed quiet."""
        info: dict[str, Any] = {"busy_cores": round(busy, 3)}
        # the second timing takes about as long as the first: leave it (and a margin) out of the deadline
        wait_s = min(quiet_wait_s(), deadline - time.monotonic() - 2 * timing_s - 1.0)
        if self._stays_busy:  # said once already: one warning per busy stretch, not one per batch
            self._busy_kept += len(pairs)
            log.debug("%s: %d workloads timed busy (%.2f cores), kept", self.spec.name, len(pairs), busy)
            return info
        if wait_s < 1.0:
            self._warn_busy(len(pairs), busy, "; too little of the batch's time was left to wait")
            return info
        quiet, seen = wait_for_quiet(wait_s)
        if not quiet or deadline - time.monotonic() < 1.5 * timing_s + 0.5:
            self._stays_busy = not quiet
            why = ""
            if not quiet:
                why = (
                    f"; no quiet second came within {wait_s:.0f} s ({seen:.2f} cores), so busy batches are kept as "
                    "timed, without waiting, until one is timed quiet"
                )
            self._warn_busy(len(pairs), busy, why)
            return info
        again, busy2 = time_all([(p, n) for p, n in pairs if not isinstance(timed[p.index], Exception)])
        faster = 0
        for index, got in again.items():
            if isinstance(got, Exception):
                continue  # it passed its check the first time; keep that timing
            if got[0]["min_ms"] < timed[index][0]["min_ms"]:
                timed[index] = got
                faster += 1
        log.info(
            "%s: other processes used %.2f cores while %d workloads were timed; timed again in a quiet moment "
            "(%.2f cores): %d of them faster the second time",
            self.spec.name,
            busy,
            len(pairs),
            busy2 if busy2 is not None else float("nan"),
            faster,
        )
        if busy2 is not None and busy2 <= BUSY_CORES:
            self._quiet_again()
        return {**info, "timed_again": True, "busy_cores_again": None if busy2 is None else round(busy2, 3)}

    def _quiet_again(self) -> None:
        if self._stays_busy and self._busy_kept:
            log.info(
                "%s: the machine is quiet again; %d more workloads were timed busy and kept meanwhile",
                self.spec.name,
                self._busy_kept,
            )
        self._stays_busy, self._busy_kept = False, 0

    def _warn_busy(self, n: int, busy: float, why: str) -> None:
        log.warning(
            "%s: other processes used %.2f of this machine's cores while %d workloads were timed%s: their "
            "latencies may read slow (a search's device check measures its chosen policies end to end)",
            self.spec.name,
            busy,
            n,
            why,
        )

    def _check_and_time(
        self,
        vm: Any,
        dev: Any,
        compiled: Compiled,
        inputs: tuple[torch.Tensor, ...],
        reference: list[np.ndarray],
        rtol: float,
        warmup: int,
        repeats: int,
        deadline: float,
        cancel: threading.Event | None,
        timeout_s: float,
        func: str = "main",
    ) -> tuple[dict[str, float], dict[str, Any]]:
        """Check the VM's function ``func`` against PyTorch once, then time it here: (statistics, details)."""
        item = _Prepared(0, None, inputs, reference, rtol, {})
        times, number, diff = self._check_then_time(
            vm, dev, item, f"target {self.spec.name}", warmup, repeats, deadline, cancel, timeout_s, func
        )
        return summarize(times), self._local_details(compiled, number, diff, "tvm time_evaluator")

    def _local_details(self, compiled: Compiled, number: int, diff: float, timer: str) -> dict[str, Any]:
        """A local measurement's details: how the code was compiled, and how it was checked and timed."""
        details = dict(compiled.details)
        details.update(
            device="local", threads=self.threads, calls_per_run=number, max_abs_diff=diff, timer=timer
        )
        return details

    def _remote_details(
        self, compiled: Compiled, number: int, diff: float, **session: float
    ) -> dict[str, Any]:
        """An RPC measurement's details: how the code was compiled, the device, how it was checked and timed."""
        assert self.rpc is not None
        details = dict(compiled.details)
        details.update(
            device=f"rpc://{self.rpc['host']}:{self.rpc['port']}/{self.rpc['key']}",
            calls_per_run=number,
            max_abs_diff=diff,
            timer="tvm time_evaluator (on the device)",
            **session,
        )
        return details

    def _check_then_time(
        self,
        vm: Any,
        dev: Any,
        item: _Prepared,
        what: str,
        warmup: int,
        repeats: int,
        deadline: float,
        stop: threading.Event | None,
        timeout_s: float,
        func: str = "main",
    ) -> tuple[list[float], int, float]:
        """Check one function of a loaded library against PyTorch once, then time it on ``dev`` (this CPU or an
        RPC device): (times in ms, calls averaged per run, largest absolute difference)."""
        import tvm

        args = [tvm.runtime.tensor(t.detach().cpu().numpy(), dev) for t in item.inputs]
        diff = _check_output(vm, args, item.reference, what, item.rtol, func=func)
        times, number = _time_vm(
            vm, dev, args, warmup, repeats, self.min_run_ms, deadline, stop, timeout_s, func=func
        )
        return times, number, diff

    def _export_library(self, executable: Any, path: Path) -> None:
        kwargs: dict[str, Any] = {}
        if self.cc:
            from tvm.contrib import cc as tvm_cc

            kwargs["fcompile"] = tvm_cc.cross_compiler(self.cc)
        try:
            executable.export_library(str(path), **kwargs)
        except Exception as exc:
            raise TargetError(
                f"target {self.spec.name}: exporting the compiled library failed: {first_line(exc)}",
                "set the target's cc to a compiler that links for the device, e.g. aarch64-linux-gnu-g++",
            ) from exc

    def _measure_remote(
        self,
        module: nn.Module,
        inputs: tuple[torch.Tensor, ...],
        fused: Any,
        warmup: int,
        repeats: int,
        timeout_s: float,
        reference: list[np.ndarray],
        rtol: float = _OUTPUT_RTOL,
    ) -> tuple[dict[str, float], float, dict[str, Any]]:
        from compression.targets import tvm_rpc

        assert self.rpc is not None
        what = f"target {self.spec.name}"
        deadline = time.monotonic() + timeout_s
        compiled = self.compile(module, inputs, fused=fused)
        with tempfile.TemporaryDirectory(prefix="compression-tvm-") as tmp:
            lib_path = Path(tmp) / "model.so"
            self._export_library(compiled.executable, lib_path)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TargetError(f"{what}: compiling took longer than the timeout of {timeout_s:g} s")

            def remote_job(sess: Any) -> tuple[list[float], int, float]:
                vm, dev = _load_on_device(sess, lib_path)
                item = _Prepared(0, module, inputs, reference, rtol, {})
                return self._check_then_time(vm, dev, item, what, warmup, repeats, deadline, None, timeout_s)

            t_wait = time.monotonic()
            times, number, diff = tvm_rpc.run_on_device(self.rpc, remote_job, timeout_s=remaining, what=what)
            session_s = time.monotonic() - t_wait
        stats = summarize(times)
        details = self._remote_details(compiled, number, diff, session_s=session_s)
        return stats, compiled.compile_s, details

    # ---------------------------------------------------------------------------------- deploy
    def export_library(
        self, module: nn.Module, example_input: torch.Tensor | tuple[torch.Tensor, ...], path: str | Path
    ) -> dict[str, Any]:
        """Compile ``module`` for the target and write the deployable library to ``path``; what was built.

        Load it with ``relax.VirtualMachine(tvm.runtime.load_module(path), dev)["main"](x)``.
        """
        inputs = as_inputs(example_input)
        compiled = self.compile(module, inputs)
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        self._export_library(compiled.executable, p)
        return {
            "target": _target_json(self.target),
            **{k: compiled.details[k] for k in ("tuning",) if k in compiled.details},
        }


def _n_records(db_dir: Path) -> int:
    from compression.targets.tvm_tuning import TuningDatabase

    return TuningDatabase(db_dir).n_records()


def export_library(
    module: nn.Module,
    example_input: torch.Tensor | tuple[torch.Tensor, ...],
    target: TargetSpec,
    path: str | Path,
) -> str:
    """Compile ``module`` for the TVM ``target`` and write its library to ``path``; a one-line description."""
    info = make_backend(target).export_library(module, example_input, path)
    return f"{json.dumps(info['target'], sort_keys=True)}, {info.get('tuning', '')}".rstrip(", ")


# ------------------------------------------------------------------------------------------ timing
def _load_on_device(sess: Any, lib_path: Path) -> tuple[Any, Any]:
    """Upload the library to the RPC session's device and load it: (virtual machine, device)."""
    from tvm import relax

    sess.upload(str(lib_path))
    lib = sess.load_module(lib_path.name)
    dev = sess.cpu(0)
    return relax.VirtualMachine(lib, dev), dev


def _session_alive(dev: Any) -> bool:
    """Whether the RPC session behind ``dev`` still answers: a one-element allocation on the device (a device
    attribute such as ``exist`` is answered locally, and reads True after the server died)."""
    import tvm

    try:
        tvm.runtime.empty((1,), "float32", dev)
    except RuntimeError:  # TVM's errors (a broken socket: InternalError); anything else is a bug, raised
        return False
    return True


def _bits_details(bits: Any) -> dict[str, Any]:
    """What a measurement records of a bits plan: every quantized layer ran in float32 here."""
    plan = normalize_bits(bits)
    if not plan:
        return {}
    return {
        "bits_run": {n: "float32" for n, (w, a) in plan.items() if (w, a) != (FLOAT_BITS, FLOAT_BITS)},
        "note": FLOAT_NOTE,
    }


def _reference(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[list[np.ndarray], float]:
    """PyTorch's outputs for ``inputs`` (eval mode, restored after) and the tolerance a runtime must meet."""
    from compression.quant import output_tolerance

    with torch.no_grad():
        was_training = module.training
        module.eval()
        try:
            reference = [o.detach().cpu().numpy() for o in _flatten(module(*inputs))]
        finally:
            module.train(was_training)
    return reference, output_tolerance(module, _OUTPUT_RTOL)


def _flatten(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flatten(o)]
    if isinstance(out, Mapping):
        return [t for o in out.values() for t in _flatten(o)]
    return []


def _tvm_outputs(out: Any) -> list[np.ndarray]:
    if isinstance(out, (tuple, list)):
        return [a for o in out for a in _tvm_outputs(o)]
    return [out.numpy()] if hasattr(out, "numpy") else []


def _config_threads(threads: int) -> None:
    import tvm

    # affinity mode 0 = default: the pool is resized for the calling thread (the measuring thread)
    tvm.get_global_func("runtime.config_threadpool")(0, int(threads))


@dataclass
class _Prepared:
    """One item of ``measure_many``: its position, the module, its inputs and PyTorch's outputs."""

    index: int
    module: Any
    inputs: tuple[Any, ...]
    reference: list[np.ndarray]
    rtol: float
    bits_details: dict[str, Any]


def _check_output(
    vm: Any,
    args: list[Any],
    reference: list[np.ndarray],
    what: str,
    rtol: float = _OUTPUT_RTOL,
    func: str = "main",
) -> float:
    """Run once and compare with PyTorch; the largest absolute difference (TargetError when wrong).

    ``rtol`` is relative to the output scale (``compression.quant.output_tolerance`` for quantized models).
    """
    # the stateful API is the one that works over RPC too (a remote call cannot return a tuple object)
    vm.set_input(func, *args)
    vm.invoke_stateful(func)
    outs = _tvm_outputs(vm.get_outputs(func))
    if len(outs) != len(reference):
        raise TargetError(f"{what}: TVM returned {len(outs)} outputs, PyTorch {len(reference)}")
    worst = 0.0
    for got, want in zip(outs, reference, strict=True):
        if got.shape != want.shape:
            raise TargetError(f"{what}: TVM output shape {got.shape} differs from PyTorch's {want.shape}")
        if want.size == 0:
            continue
        diff = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64))))
        scale = float(np.max(np.abs(want))) + 1e-6
        if not np.isfinite(diff) or diff > rtol * scale + 1e-5:
            raise TargetError(
                f"{what}: TVM's output differs from PyTorch's by {diff:.3g} (output scale {scale:.3g})",
                "this is a compiler or schedule bug; report it, and measure with local-ort meanwhile",
            )
        worst = max(worst, diff)
    return worst


def _time_vm(
    vm: Any,
    dev: Any,
    args: list[Any],
    warmup: int,
    repeats: int,
    min_run_ms: float,
    deadline: float,
    cancel: threading.Event | None,
    timeout_s: float,
    func: str = "main",
) -> tuple[list[float], int]:
    """Warm up, then time ``repeats`` runs with TVM's C++ timer; (times in ms, calls averaged per run).

    Each run averages ``number`` calls, enough to last ``min_run_ms``: one call of a small layer takes a few
    microseconds, where a single-call timing would mostly measure the timer.
    """
    timed = f"compression_timed_{func}"
    vm.save_function(func, timed, *args, include_return=False)
    calib = max(1, warmup)
    # warm-up through the same timer: its results give the per-call time that sizes ``number``
    first = vm.time_evaluator(timed, dev, number=1, repeat=calib)()
    per_call_ms = float(np.median(first.results)) * 1e3
    number = max(1, math.ceil(min_run_ms / max(per_call_ms, 1e-6)))
    remaining = deadline - time.monotonic()
    if per_call_ms * number * repeats / 1e3 > remaining:
        raise DeadlineExceeded(
            f"timing would take about {per_call_ms * number * repeats / 1e3:.1f} s ({per_call_ms:.2f} ms per call), "
            f"more than the {max(0.0, remaining):.1f} s left of the timeout of {timeout_s:g} s",
            "raise the target's timeout, use fewer repeats, or a smaller model",
        )
    # time in chunks so a cancelled or overrunning measurement stops between chunks
    chunk = max(1, min(repeats, int(max(1.0, 200.0 / max(per_call_ms * number, 1e-3)))))
    times: list[float] = []
    evaluators: dict[int, Any] = {}
    while len(times) < repeats:
        if (cancel is not None and cancel.is_set()) or time.monotonic() > deadline:
            raise DeadlineExceeded(
                f"timing exceeded the timeout of {timeout_s:g} s after {len(times)} of {repeats} runs",
                "raise the target's timeout or use fewer repeats",
            )
        n = min(chunk, repeats - len(times))
        if n not in evaluators:
            evaluators[n] = vm.time_evaluator(timed, dev, number=number, repeat=n)
        times.extend(float(r) * 1e3 for r in evaluators[n]().results)
    return times, number
