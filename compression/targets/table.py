"""Per-target latency tables: a model's latency as a sum of measured layer workloads.

Measuring every candidate of a search end to end is slow. A ``LatencyTable`` stores, per target, the latency
of each layer workload (see ``workloads.py``: a conv/linear with its fused batch norm and activation, or any
other operation, keyed by shapes and the bits the backend really runs). ``predict`` sums the entries of a
model's workloads; ``fill`` measures the missing ones on the target by running a one-layer module per
workload; ``confirm`` measures a model end to end and records the table's error against it.

**Per-call overhead.** Each entry is timed as a separate model, so each includes one call's overhead
(Python and module dispatch for PyTorch, ``session.run`` and input copies for ONNX Runtime). The table also
measures the empty model (identity) for each input shape it meets, subtracts that from each entry, and adds
the overhead of the model's own input once:
``predicted = overhead(model input) + sum(max(0, entry - overhead(entry input)))``.

**What the table cannot see**: fusions the runtime makes across workloads (ONNX Runtime folds residual
additions and ReLUs into the preceding convolution and keeps the whole graph in its blocked NCHWc layout,
while a one-layer model pays the layout conversion at its boundaries; int8 models keep activations
quantized between layers), cache effects between consecutive layers, thread-pool wake-ups. Hence:

- ``calibrate(reference)`` measures one model end to end and stores the factor that makes the table's
  per-workload sum match it, for that model's *structure* (operations, kernels, strides, fusions,
  resolution; not channel counts or bits). Predictions of every pruned/quantized variant of it use the
  factor: one end-to-end measurement per model, not per candidate;
- ``confirm(candidate)`` measures a candidate end to end and records both errors (calibrated and raw);
  ``error_report`` summarises them. ``docs/targets.md`` reports the errors measured.

**Storage.** One SQLite file (WAL mode), safe for concurrent processes; entries are keyed by (target name,
backend fingerprint, workload key). The fingerprint hashes what a latency depends on (backend, its
settings, runtime version, CPU model), so a changed setting or an upgraded runtime starts fresh entries
instead of reusing stale ones. The same workload in another model or another run is the same entry.

For the ``analytic`` target the table stores nothing and measures nothing: each workload's value is
computed (BOPs by default), in the unit ``table.unit``.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import sqlite3
import time
from collections.abc import Sequence
from contextlib import closing
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compression.errors import ModelError, TargetError
from compression.targets.base import Backend, Measurement, TargetSpec
from compression.targets.contention import BUSY_CORES
from compression.targets.registry import get_target, make_backend
from compression.targets.workloads import (
    FLOAT_BITS,
    LayerWorkload,
    build_workload_module,
    extract_workloads,
    normalize_bits,
    overhead_workload,
)

log = logging.getLogger(__name__)

STATISTICS = ("median", "min", "mean")
# workloads compiled together by a backend that can (``measure_many``): the compile cost is mostly fixed, and a
# batch holds the device lock while all of it is timed (about 2 s for 32 small layers). COMPRESSION_TABLE_BATCH
# overrides it (1 measures one by one, as before session 16: bench/throughput.py --parts tvm-fill compares)
BATCH = 32
NOISY_CV = 0.3  # std/mean above which an end-to-end measurement is flagged as too noisy to calibrate on

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    target TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    key TEXT NOT NULL,
    kind TEXT NOT NULL,
    median_ms REAL NOT NULL,
    mean_ms REAL NOT NULL,
    min_ms REAL NOT NULL,
    std_ms REAL NOT NULL,
    runs INTEGER NOT NULL,
    details TEXT NOT NULL,
    measured_at REAL NOT NULL,
    PRIMARY KEY (target, fingerprint, key)
);
CREATE TABLE IF NOT EXISTS fingerprints (
    fingerprint TEXT PRIMARY KEY,
    description TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS confirmations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    target TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    model TEXT NOT NULL,
    predicted_ms REAL NOT NULL,
    measured_ms REAL NOT NULL,
    rel_error REAL NOT NULL,
    raw_rel_error REAL NOT NULL,
    calibrated INTEGER NOT NULL,
    at REAL NOT NULL,
    details TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS memos (
    target TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    key TEXT NOT NULL,
    data TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (target, fingerprint, key)
);
CREATE TABLE IF NOT EXISTS calibrations (
    target TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    structure TEXT NOT NULL,
    scale REAL NOT NULL,
    predicted_ms REAL NOT NULL,
    measured_ms REAL NOT NULL,
    at REAL NOT NULL,
    offset_ms REAL NOT NULL DEFAULT 0,
    details TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (target, fingerprint, structure)
);
"""


class UnmeasurableWorkload(TargetError):
    """An operation that cannot be rebuilt or run on its own on this backend (e.g. no ONNX export for it)."""


@dataclass
class _Entry:
    median_ms: float
    mean_ms: float
    min_ms: float

    def value(self, statistic: str) -> float:
        return {"median": self.median_ms, "min": self.min_ms, "mean": self.mean_ms}[statistic]


def backend_fingerprint(
    spec: TargetSpec, backend: Backend, statistic: str = "median"
) -> tuple[str, dict[str, Any]]:
    """A short hash of what latencies on this target depend on, and the data it hashes. A table that sums another
    statistic than the median has its own fingerprint: the calibrations stored with it are fitted on that one."""
    fp = getattr(backend, "fingerprint", None)
    data = fp() if callable(fp) else {"backend": spec.backend, "settings": spec.settings}
    if statistic != "median":
        data = {**data, "table_statistic": statistic}
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16], data


class LatencyTable:
    """A persistent per-target latency table (see the module docstring).

    target: a target name, description or ``TargetSpec``. path: the SQLite file (created if missing).
    backend: measure with this backend object instead of ``make_backend(target)`` (tests, custom setups).
    warmup / repeats / timeout_s: the timing protocol of each entry. statistic: which statistic of an entry
    is summed (``median``, ``min`` or ``mean``); default the backend's ``table_statistic`` (TVM: ``min``, see
    ``tvm_backend``), else ``median``. Calibration measurements use the same statistic.
    Counters: ``hits`` and ``misses`` (lookups of workload occurrences by ``predict``), ``measured`` (entries
    measured by this object) and ``measure_s`` (seconds spent measuring).
    """

    def __init__(
        self,
        target: str | dict[str, Any] | TargetSpec,
        path: str | Path,
        *,
        backend: Backend | None = None,
        warmup: int = 10,
        repeats: int = 100,
        timeout_s: float = 120.0,
        statistic: str | None = None,
    ) -> None:
        self.spec = get_target(target)
        self.backend = backend if backend is not None else make_backend(self.spec)
        if statistic is None:  # the backend's choice (TVM: min), else the median
            statistic = getattr(self.backend, "table_statistic", "median")
        if statistic not in STATISTICS:
            raise TargetError(f"unknown table statistic {statistic!r}", f"use one of {', '.join(STATISTICS)}")
        self.statistic = statistic
        self.warmup, self.repeats, self.timeout_s = int(warmup), int(repeats), float(timeout_s)
        self.path = Path(path)
        self.analytic = self.spec.backend == "analytic"
        self.unit = getattr(self.backend, "unit", "ms") if self.analytic else "ms"
        self.fingerprint, self.fingerprint_data = backend_fingerprint(self.spec, self.backend, self.statistic)
        # calibrations time their models side by side where the backend can (``_measure_rounds``);
        # COMPRESSION_SIDE_BY_SIDE=0 measures them one by one instead (to compare the two, bench/fidelity.py)
        self.side_by_side = os.environ.get("COMPRESSION_SIDE_BY_SIDE", "1") != "0" and bool(
            getattr(self.backend, "interleaves", False)
        )
        self.hits = 0
        self.misses = 0
        self.measured = 0
        self.measure_s = 0.0
        self.busy_entries = 0
        self._cache: dict[str, _Entry] = {}
        self.unmeasurable: dict[str, str] = {}
        self._loaded = False
        self._bits_run = getattr(self.backend, "bits_run", None)
        try:
            self._measure_takes_bits = "bits" in inspect.signature(self.backend.measure).parameters
        except (TypeError, ValueError):
            self._measure_takes_bits = False
        if not self.analytic:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with closing(self._connect()) as db:
                db.executescript(_SCHEMA)
                cols = {r[1] for r in db.execute("PRAGMA table_info(calibrations)")}
                for col, decl in (
                    ("offset_ms", "REAL NOT NULL DEFAULT 0"),
                    ("details", "TEXT NOT NULL DEFAULT '{}'"),
                ):
                    if col not in cols:  # a table file written before the affine calibration
                        db.execute(f"ALTER TABLE calibrations ADD COLUMN {col} {decl}")
                db.execute(
                    "INSERT OR IGNORE INTO fingerprints VALUES (?, ?)",
                    (self.fingerprint, json.dumps(self.fingerprint_data, sort_keys=True, default=str)),
                )

    # ------------------------------------------------------------------ storage
    def _connect(self) -> sqlite3.Connection:
        try:
            db = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
        except sqlite3.Error as exc:
            raise TargetError(
                f"cannot open latency table {self.path}: {exc}", "check the path and its permissions"
            ) from exc
        return db

    def _load(self, keys: list[str] | None = None) -> None:
        """Read entries from the file: all of them the first time, then only ``keys`` (misses)."""
        with closing(self._connect()) as db:
            q = "SELECT key, median_ms, mean_ms, min_ms FROM entries WHERE target=? AND fingerprint=?"
            params: list[Any] = [self.spec.name, self.fingerprint]
            if keys is not None:
                rows = []
                for i in range(0, len(keys), 500):
                    chunk = keys[i : i + 500]
                    rows += db.execute(
                        q + f" AND key IN ({','.join('?' * len(chunk))})", params + chunk
                    ).fetchall()
            else:
                rows = db.execute(q, params).fetchall()
        for key, med, mean, mn in rows:
            self._cache[key] = _Entry(med, mean, mn)
        self._loaded = True

    def _store(self, w: LayerWorkload, m: Measurement) -> None:
        if timed_busy(m.details):
            self.busy_entries += 1
        with closing(self._connect()) as db:
            db.execute(
                "INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    self.spec.name,
                    self.fingerprint,
                    w.key,
                    w.kind,
                    m.median_ms,
                    m.mean_ms,
                    m.min_ms,
                    m.std_ms,
                    m.runs,
                    json.dumps(m.details, default=str),
                    time.time(),
                ),
            )
        self._cache[w.key] = _Entry(m.median_ms, m.mean_ms, m.min_ms)

    def __len__(self) -> int:
        if self.analytic:
            return 0
        with closing(self._connect()) as db:
            (n,) = db.execute(
                "SELECT COUNT(*) FROM entries WHERE target=? AND fingerprint=?",
                (self.spec.name, self.fingerprint),
            ).fetchone()
        return int(n)

    def entries(self) -> list[dict[str, Any]]:
        """Every stored entry of this target and fingerprint (workload, statistics, when measured)."""
        if self.analytic:
            return []
        with closing(self._connect()) as db:
            rows = db.execute(
                "SELECT key, kind, median_ms, mean_ms, min_ms, std_ms, runs, details, measured_at FROM entries "
                "WHERE target=? AND fingerprint=? ORDER BY measured_at",
                (self.spec.name, self.fingerprint),
            ).fetchall()
        cols = ("key", "kind", "median_ms", "mean_ms", "min_ms", "std_ms", "runs", "details", "measured_at")
        out = []
        for r in rows:
            d = dict(zip(cols, r, strict=True))
            d["details"] = json.loads(d["details"])
            out.append(d)
        return out

    # ------------------------------------------------------------------ workloads
    def normalize(self, w: LayerWorkload) -> LayerWorkload:
        """The workload as this target runs it (bits replaced by the bits the backend really runs)."""
        if not w.is_layer:
            return w
        if self._bits_run is not None:
            wb, ab = self._bits_run(w.w_bits, w.a_bits)
        else:  # a backend that does not say how it runs bits runs float
            wb, ab = FLOAT_BITS, FLOAT_BITS
        # computed in float, yet the deployed model fake-quantizes the layer's input: that arithmetic runs
        fq = (wb, ab) == (FLOAT_BITS, FLOAT_BITS) and (w.a_bits < FLOAT_BITS or w.act_fq)  # idempotent
        return replace(w.with_bits(wb, ab), act_fq=fq)

    def workloads(
        self, module: nn.Module, example_input: torch.Tensor | tuple[torch.Tensor, ...], bits: Any = None
    ) -> list[LayerWorkload]:
        """The model's workloads as this target runs them (no overhead entries)."""
        return [self.normalize(w) for w in extract_workloads(module, example_input, bits)]

    def required(
        self, module: nn.Module, example_input: torch.Tensor | tuple[torch.Tensor, ...], bits: Any = None
    ) -> list[LayerWorkload]:
        """Every distinct entry a prediction for this model needs: its workloads and the per-shape overheads."""
        ws = self.workloads(module, example_input, bits)
        unique: dict[str, LayerWorkload] = {}
        for w in self._overheads(ws, example_input) + ws:
            unique.setdefault(w.key, w)
        return list(unique.values())

    def _overheads(self, workloads: list[LayerWorkload], example_input: Any) -> list[LayerWorkload]:
        shapes = [overhead_workload(example_input)]
        shapes += [overhead_workload(torch.empty(w.in_shape)) for w in workloads]
        unique: dict[str, LayerWorkload] = {}
        for o in shapes:
            unique.setdefault(o.key, o)
        return list(unique.values())

    def lookup(self, w: LayerWorkload) -> float | None:
        """The stored value of one (normalised) workload, or None (the file is re-read on a miss)."""
        if self.analytic:
            return self.backend.workload_value(w)  # type: ignore[attr-defined]
        if not self._loaded:
            self._load()
        e = self._cache.get(w.key)
        if e is None:
            self._load([w.key])
            e = self._cache.get(w.key)
        return None if e is None else e.value(self.statistic)

    def measure_workload(self, w: LayerWorkload) -> Measurement:
        """Measure one workload on the target (a one-layer module) and store it.

        Raises ``TargetError`` when the target fails; an ``op`` workload that cannot be rebuilt or exported
        for this backend raises ``UnmeasurableWorkload`` (``fill`` skips and reports those).
        """
        module, inputs, plan = self._workload_module(w)
        kwargs: dict[str, Any] = {"warmup": self.warmup, "repeats": self.repeats, "timeout_s": self.timeout_s}
        if plan and self._measure_takes_bits:
            kwargs["bits"] = plan
        t0 = time.perf_counter()
        try:
            m = self.backend.measure(module, inputs if len(inputs) > 1 else inputs[0], **kwargs)
        except (ModelError, TargetError) as exc:
            raise self._failure(w, exc) from exc
        self.measure_s += time.perf_counter() - t0
        self.measured += 1
        self._store(w, m)
        return m

    @staticmethod
    def _workload_module(w: LayerWorkload) -> tuple[nn.Module, tuple[torch.Tensor, ...], dict[str, Any]]:
        try:
            return build_workload_module(w)
        except TargetError as exc:
            raise UnmeasurableWorkload(f"workload {w.name} ({w.op}) cannot be rebuilt: {exc.what}") from exc

    def _failure(self, w: LayerWorkload, exc: ModelError | TargetError) -> Exception:
        """What measuring ``w`` raises when the backend raised ``exc``: an operation the target cannot run is
        ``UnmeasurableWorkload``; a layer it cannot run, or a failing target, stays an error (with context)."""
        if isinstance(exc, ModelError):
            if w.is_layer:
                return exc
            return UnmeasurableWorkload(
                f"workload {w.name} ({w.op}) cannot run on {self.spec.name}: {exc.what}"
            )
        return TargetError(
            f"measuring workload {w.name or w.kind} ({w.op}, input {list(w.in_shape)}): {exc.what}", exc.hint
        )

    def _measure_batch(self, ws: list[LayerWorkload]) -> int:
        """Measure workloads with the backend's ``measure_many`` (compiled together); how many were stored.

        Raises the first failure ``measure_workload`` would raise, after storing every entry that was measured;
        an operation that cannot be rebuilt or run is recorded in ``unmeasurable`` and skipped."""
        items, kept = [], []
        for w in ws:
            try:
                module, inputs, plan = self._workload_module(w)
            except UnmeasurableWorkload as exc:
                self._skip(w, exc)
                continue
            kept.append(w)
            items.append(
                (module, inputs if len(inputs) > 1 else inputs[0], plan if self._measure_takes_bits else None)
            )
        t0 = time.perf_counter()
        results = self.backend.measure_many(  # type: ignore[attr-defined]
            items, warmup=self.warmup, repeats=self.repeats, timeout_s=self.timeout_s
        )
        self.measure_s += time.perf_counter() - t0
        n = 0
        error: Exception | None = None
        for w, r in zip(kept, results, strict=True):
            if isinstance(r, Measurement):
                self.measured += 1
                self._store(w, r)
                n += 1
                continue
            failure = self._failure(w, r) if isinstance(r, (ModelError, TargetError)) else r
            if isinstance(failure, UnmeasurableWorkload):
                self._skip(w, failure)
            elif error is None:
                error = failure
                if failure is not r:
                    error.__cause__ = r
        if error is not None:
            raise error
        return n

    def _skip(self, w: LayerWorkload, exc: UnmeasurableWorkload) -> None:
        self.unmeasurable[w.key] = str(exc)
        log.warning("%s: %s; it counts as 0 ms and stays in `missing`", self.spec.name, exc)

    def fill_workloads(self, workloads: list[LayerWorkload]) -> int:
        """Measure the workloads (normalised first) that have no entry yet; returns how many were measured.

        Where the backend can compile many workloads together (``measure_many``: TVM, on this CPU or an RPC device), they are
        measured in batches of up to ``BATCH`` (each timed on its own); elsewhere one by one. Operations that
        cannot be rebuilt or exported for this backend are skipped, logged once and kept in
        ``self.unmeasurable`` (key -> reason); ``predict`` keeps listing them as missing.
        """
        if self.analytic:
            return 0
        pending: list[LayerWorkload] = []
        done: set[str] = set()
        for w in workloads:
            w = self.normalize(w)
            if w.key in done or w.key in self.unmeasurable:
                continue
            done.add(w.key)
            if self.lookup(w) is None:
                pending.append(w)
        n = 0
        many = getattr(self.backend, "measure_many", None) is not None
        batch = _batch_size()
        while pending:
            # re-read right before measuring (``lookup`` reads the file for an entry not seen yet): another process
            # may have measured some meanwhile
            size = batch if many else 1
            chunk = [w for w in pending[:size] if self.lookup(w) is None]
            pending = pending[size:]
            if len(chunk) > 1:
                n += self._measure_batch(chunk)
                continue
            for w in chunk:
                try:
                    self.measure_workload(w)
                except UnmeasurableWorkload as exc:
                    self._skip(w, exc)
                    continue
                n += 1
        return n

    def fill(
        self, module: nn.Module, example_input: torch.Tensor | tuple[torch.Tensor, ...], bits: Any = None
    ) -> int:
        """Measure every missing workload of the model (and the overheads); returns how many were measured."""
        return self.fill_workloads(self.required(module, example_input, bits))

    # ------------------------------------------------------------------ prediction
    def predict(
        self,
        module: nn.Module,
        example_input: torch.Tensor | tuple[torch.Tensor, ...],
        bits: Any = None,
        *,
        measure_missing: bool = False,
        calibrated: bool = True,
    ) -> tuple[float, list[dict[str, Any]], list[LayerWorkload]]:
        """Predicted latency of the model: ``(total_ms, per_layer, missing)``.

        ``per_layer`` lists every workload occurrence in execution order (``name``, ``kind``, ``op``, ``ms``,
        ``raw_ms`` before calibration, ``fused``, the bits run, ``key``), plus a final ``overhead`` row; the
        rows sum to ``total_ms``. When the model's structure was calibrated (``calibrate``) and
        ``calibrated`` is true, the workload rows are scaled by the stored factor. ``missing`` holds the
        (unique) workloads without an entry; they count as 0 unless ``measure_missing`` measures them first.
        For the analytic target the values are in ``self.unit``.
        """
        ws = self.workloads(module, example_input, bits)
        if self.analytic:
            rows = [self._row(w, self.backend.workload_value(w), 1.0) for w in ws]  # type: ignore[attr-defined]
            return sum(r["ms"] for r in rows), rows, []
        overheads = self._overheads(ws, example_input)
        if measure_missing:
            self.fill_workloads(overheads + ws)
        missing: dict[str, LayerWorkload] = {}
        over: dict[str, float] = {}
        for o in overheads:
            v = self.lookup(o)
            if v is None:
                missing.setdefault(o.key, o)
            else:
                over[o.key] = v
        cal = self._calibration(structure_key(ws)) if calibrated else None
        factor, offset = (1.0, 0.0) if cal is None else cal
        rows: list[dict[str, Any]] = []
        for w in ws:
            v = self.lookup(w)
            if v is None:
                self.misses += 1
                missing.setdefault(w.key, w)
                rows.append(self._row(w, None, factor))
                continue
            self.hits += 1
            o = over.get(overhead_workload(torch.empty(w.in_shape)).key, 0.0)
            rows.append(self._row(w, max(0.0, v - o), factor))
        base = over.get(overhead_workload(example_input).key, 0.0)
        if offset:
            rows.append(
                {
                    "name": "calibration offset",
                    "kind": "offset",
                    "op": "calibration",
                    "ms": offset,
                    "raw_ms": 0.0,
                    "fused": [],
                    "key": "",
                }
            )
        rows.append(
            {
                "name": "overhead",
                "kind": "overhead",
                "op": "identity",
                "ms": base,
                "raw_ms": base,
                "fused": [],
                "key": "",
            }
        )
        total = sum(r["ms"] for r in rows if r["ms"] is not None)
        return total, rows, list(missing.values())

    @staticmethod
    def _row(w: LayerWorkload, raw_ms: float | None, factor: float) -> dict[str, Any]:
        return {
            "name": w.name,
            "kind": w.kind,
            "op": w.op,
            "ms": None if raw_ms is None else raw_ms * factor,
            "raw_ms": raw_ms,
            "fused": list(w.fused),
            "w_bits": w.w_bits,
            "a_bits": w.a_bits,
            "key": w.key,
        }

    def _calibration(self, structure: str) -> tuple[float, float] | None:
        """(scale, offset_ms) stored for a structure, or None."""
        with closing(self._connect()) as db:
            row = db.execute(
                "SELECT scale, offset_ms FROM calibrations WHERE target=? AND fingerprint=? AND structure=?",
                (self.spec.name, self.fingerprint, structure),
            ).fetchone()
        return None if row is None else (float(row[0]), float(row[1]))

    def _measure_model(
        self,
        module: nn.Module,
        example_input: Any,
        plan: dict[str, tuple[int, int]],
        warmup: int | None,
        repeats: int | None,
        timeout_s: float | None,
    ) -> tuple[Measurement, float]:
        kwargs: dict[str, Any] = {
            "warmup": self.warmup if warmup is None else warmup,
            "repeats": self.repeats if repeats is None else repeats,
            "timeout_s": self.timeout_s if timeout_s is None else timeout_s,
        }
        if plan and self._measure_takes_bits:
            kwargs["bits"] = plan
        m = self.backend.measure(module, example_input, **kwargs)
        return m, {"median": m.median_ms, "min": m.min_ms, "mean": m.mean_ms}[self.statistic]

    def _measure_rounds(
        self,
        models: list[tuple[nn.Module, Any]],
        example_input: Any,
        rounds: int,
        warmup: int | None,
        repeats: int | None,
        timeout_s: float | None,
    ) -> list[list[tuple[Measurement, float]]]:
        """``rounds`` measurements of every model: ``[model][round] -> (Measurement, statistic)``.

        Where the backend can, the models are timed side by side (prepared once, alternating run by run, a round
        being a block of ``repeats`` runs each; ``targets.compare_models``): on a machine that changes speed for
        seconds at a time, separate measurements of the reference and a variant disagree by that much, and every
        prediction inherits it. Elsewhere the rounds interleave the models, each measured on its own.
        """
        w = self.warmup if warmup is None else warmup
        r = self.repeats if repeats is None else repeats
        t = self.timeout_s if timeout_s is None else timeout_s
        if self.side_by_side:
            side_by_side = self.backend.measure_interleaved
            from compression.targets.measure import make_measurement, summarize

            times, compile_s, details = side_by_side(
                [m for m, _ in models],
                example_input,
                bits=[p or None for _, p in models],
                warmup=w,
                repeats=r,
                blocks=rounds,
                timeout_s=t * len(models),
            )
            inputs = example_input if isinstance(example_input, tuple) else (example_input,)
            stat = {"median": "median_ms", "min": "min_ms", "mean": "mean_ms"}[self.statistic]
            measured = [
                [make_measurement(self.spec, summarize(b), c, d, w, r, inputs[0].shape[0]) for b in per]
                for per, c, d in zip(times, compile_s, details, strict=True)
            ]
            # each block is read in the reference's median state: a model's value in block b is its ratio to the
            # reference within the block times the reference's median over blocks (the blocks' states differ; a
            # ratio within one block does not carry it)
            ref = [getattr(m, stat) for m in measured[0]]
            ref_median = sorted(ref)[(len(ref) - 1) // 2]
            return [
                [
                    (m, getattr(m, stat) * ref_median / rb if rb > 0 else getattr(m, stat))
                    for m, rb in zip(per, ref, strict=True)
                ]
                for per in measured
            ]
        all_runs: list[list[tuple[Measurement, float]]] = [[] for _ in models]
        for _ in range(rounds):
            for i, (m, mplan) in enumerate(models):
                all_runs[i].append(
                    self._measure_model(m, example_input, mplan or {}, warmup, repeats, timeout_s)
                )
        return all_runs

    def calibrate(
        self,
        module: nn.Module,
        example_input: torch.Tensor | tuple[torch.Tensor, ...],
        bits: Any = None,
        *,
        variants: Sequence[nn.Module] = (),
        rounds: int = 3,
        warmup: int | None = None,
        repeats: int | None = None,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        """Measure a reference model (and variants of it) end to end and store how the table maps onto them.

        The mapping applies to every model of the same *structure* (the same sequence of operations, kernels,
        strides, fusions and input resolution, whatever the channel counts and bits): i.e. to the pruned
        and quantized variants a search tries. It absorbs what per-workload timing cannot see (runtime
        fusions, per-layer boundary costs).

        With the reference alone, one factor: ``measured - overhead = scale * layers``. That factor is wrong
        for variants much smaller than the reference, because part of what it absorbs is a per-operation
        cost that does not shrink with the channels (measured: a ResNet-20 pruned to half was predicted
        ~25% too fast). Hence ``variants``: models of the same structure at other sizes (e.g. uniformly
        pruned copies); with them a line is fitted by least squares over all the models,
        ``measured - overhead = scale * layers + offset_ms``, and a prediction is
        ``overhead + scale * layers + offset_ms``. Each model is measured ``rounds`` times and the median of
        the rounds is used (one bad window on a shared machine would skew every later prediction); where the
        backend can, all of them side by side, alternating run by run (``_measure_rounds``).

        Returns ``scale``, ``offset_ms``, ``raw_predicted_ms`` / ``measured_ms`` of the reference, the
        ``points`` fitted (layers, measured, rounds per model), the fit's ``residuals`` and, when the
        measurements were noisy or the fit had to fall back to one factor, a ``warning``.
        """
        if self.analytic:
            return {"scale": 1.0, "offset_ms": 0.0, "raw_predicted_ms": None, "measured_ms": None}
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise TargetError(f"calibration rounds must be an integer >= 1, got {rounds!r}")
        plan = normalize_bits(bits)
        structure = structure_key(self.workloads(module, example_input, plan))
        models: list[tuple[nn.Module, Any]] = [(module, plan)]
        for v in variants:
            if structure_key(self.workloads(v, example_input)) != structure:
                raise TargetError(
                    "a calibration variant differs from the reference in structure (operations, kernels, "
                    "strides or resolution), not only in channels and bits",
                    "calibrate with pruned or quantized copies of the same model",
                )
            models.append((v, None))
        points: list[dict[str, Any]] = []
        warnings: list[str] = []
        ref_m: Measurement | None = None
        base = 0.0
        raws: list[tuple[float, float]] = []  # per model: the table's sum, and its call-overhead row
        for m, mplan in models:
            raw, rows, _ = self.predict(m, example_input, mplan, measure_missing=True, calibrated=False)
            raws.append((raw, rows[-1]["ms"]))
        # The models are timed side by side, or in rounds that interleave them (reference, variants, reference,
        # ...): a disturbed window of the machine then costs each model at most a round, which the median
        # discards, instead of all of one model's rounds (measured: the reference's three back-to-back rounds
        # after a table build read 1.17/1.11/1.33 ms for a model that measured 1.08-1.14 ms all through the run,
        # and every prediction inherited the +4%).
        all_runs = self._measure_rounds(models, example_input, rounds, warmup, repeats, timeout_s)
        for i, ((raw, base), runs) in enumerate(zip(raws, all_runs, strict=True)):
            values = sorted(v for _, v in runs)
            measured = values[len(values) // 2]
            mm = next(x for x, v in runs if v == measured)
            if i == 0:
                ref_m = mm
            spread = (values[-1] - values[0]) / measured if measured > 0 else 0.0
            # robust signs of a disturbed measurement: the rounds' medians disagree, or the median sits far
            # above the fastest run. (std/mean is not one: ONNX Runtime's runs have rare 10x outliers that
            # give cv > 1 while the median is stable to 1%.)
            above_min = (mm.median_ms - mm.min_ms) / mm.median_ms if mm.median_ms > 0 else 0.0
            if spread > NOISY_CV or above_min > NOISY_CV:
                warnings.append(
                    f"model {i}: rounds spread {spread:.0%}, median {above_min:.0%} above the fastest run"
                )
            points.append(
                {
                    "raw_ms": raw,
                    "layers_ms": raw - base,
                    "measured_ms": measured,
                    "rounds_ms": [v for _, v in runs],
                }
            )
        xs = [p["layers_ms"] for p in points]
        ys = [p["measured_ms"] - base for p in points]
        fit = fit_scales([xs], ys)
        scale, offset = (fit[0][0], fit[1]) if fit else (None, 0.0)
        if scale is None:
            # one point, or points too close together / a non-increasing fit: one factor from the reference
            if len(points) > 1:
                warnings.append("the variants did not give an increasing line; one factor from the reference")
            scale = ys[0] / xs[0] if xs[0] > 0 else 1.0
            offset = 0.0
        scale = max(scale, 1e-3)  # a non-positive factor would mean noise swamped the measurement
        residuals = [
            (base + scale * x + offset - (y + base)) / (y + base) for x, y in zip(xs, ys, strict=True)
        ]
        with closing(self._connect()) as db:
            db.execute(
                "INSERT OR REPLACE INTO calibrations (target, fingerprint, structure, scale, predicted_ms, "
                "measured_ms, at, offset_ms, details) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    self.spec.name,
                    self.fingerprint,
                    structure,
                    scale,
                    points[0]["raw_ms"],
                    points[0]["measured_ms"],
                    time.time(),
                    offset,
                    json.dumps({"points": points, "residuals": residuals}),
                ),
            )
        result = {
            "scale": scale,
            "offset_ms": offset,
            "raw_predicted_ms": points[0]["raw_ms"],
            "measured_ms": points[0]["measured_ms"],
            "rounds_ms": points[0]["rounds_ms"],
            "points": points,
            "residuals": residuals,
            "measurement": ref_m,
        }
        # other processes' CPU use while the models were timed side by side on this machine (the backend's
        # measurement records it: contention.CpuWatch); not known for models measured one by one
        busy = [
            float(m.details["busy_cores"])
            for runs in all_runs
            for m, _ in runs
            if isinstance(m.details, dict) and m.details.get("busy_cores") is not None
        ]
        if busy:
            result["busy_cores"] = round(max(busy), 3)
        if warnings:
            # a calibration from a noisy measurement skews every variant's prediction: say so
            result["warning"] = (
                "the calibration measurements were noisy or inconsistent ("
                + "; ".join(warnings)
                + f"); scale {scale:.2f}, offset {offset:.3f} ms may be off: calibrate again on a quieter device"
            )
            log.warning("%s: %s", self.spec.name, result["warning"])
        return result

    def confirm(
        self,
        module: nn.Module,
        example_input: torch.Tensor | tuple[torch.Tensor, ...],
        bits: Any = None,
        *,
        warmup: int | None = None,
        repeats: int | None = None,
        timeout_s: float | None = None,
        label: str = "",
    ) -> dict[str, Any]:
        """Measure the model end to end, compare with the table's prediction, and record the error.

        Missing entries are measured first so the prediction is complete. Returns ``predicted_ms`` (with
        the structure's calibration when there is one), ``raw_predicted_ms`` (without), ``measured_ms`` (the
        table's statistic), ``rel_error`` = (predicted - measured) / measured, ``raw_rel_error``,
        ``calibrated``, the end-to-end ``measurement`` and the per-layer rows.
        """
        plan = normalize_bits(bits)
        predicted, rows, missing = self.predict(module, example_input, plan, measure_missing=True)
        raw = sum(r["raw_ms"] for r in rows if r["raw_ms"] is not None)
        calibrated = any(r["ms"] != r["raw_ms"] for r in rows)
        m, measured = self._measure_model(module, example_input, plan, warmup, repeats, timeout_s)
        rel = (predicted - measured) / measured if measured > 0 else 0.0
        raw_rel = (raw - measured) / measured if measured > 0 else 0.0
        model_sig = label or hashlib.sha256("|".join(r["key"] for r in rows).encode()).hexdigest()[:16]
        if not self.analytic:
            with closing(self._connect()) as db:
                db.execute(
                    "INSERT INTO confirmations (target, fingerprint, model, predicted_ms, measured_ms, rel_error, "
                    "raw_rel_error, calibrated, at, details) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        self.spec.name,
                        self.fingerprint,
                        model_sig,
                        predicted,
                        measured,
                        rel,
                        raw_rel,
                        int(calibrated),
                        time.time(),
                        json.dumps({"statistic": self.statistic, "cv": m.cv, "missing": len(missing)}),
                    ),
                )
        return {
            "predicted_ms": predicted,
            "raw_predicted_ms": raw,
            "measured_ms": measured,
            "rel_error": rel,
            "raw_rel_error": raw_rel,
            "calibrated": calibrated,
            "measurement": m,
            "per_layer": rows,
            "missing": missing,
            "model": model_sig,
        }

    def error_report(self) -> dict[str, Any]:
        """The table's recorded errors against end-to-end measurements on this target (all ``confirm`` calls).

        ``rel_error`` statistics are those of the predictions as made (calibrated where a calibration
        existed); ``raw_*`` of the uncalibrated sums.
        """
        if self.analytic:
            return {"n": 0}
        with closing(self._connect()) as db:
            rows = db.execute(
                "SELECT rel_error, raw_rel_error, calibrated FROM confirmations WHERE target=? AND fingerprint=?",
                (self.spec.name, self.fingerprint),
            ).fetchall()
        if not rows:
            return {"n": 0}

        def summary(errs: list[float], prefix: str) -> dict[str, float]:
            abs_errs = sorted(abs(e) for e in errs)
            return {
                f"{prefix}mean_abs_rel_error": sum(abs_errs) / len(errs),
                f"{prefix}median_abs_rel_error": abs_errs[len(errs) // 2],
                f"{prefix}max_abs_rel_error": abs_errs[-1],
                f"{prefix}mean_rel_error": sum(errs) / len(errs),
            }

        return {
            "n": len(rows),
            "calibrated": sum(r[2] for r in rows),
            **summary([r[0] for r in rows], ""),
            **summary([r[1] for r in rows], "raw_"),
        }

    def remember(self, key: str, data: dict[str, Any]) -> None:
        """Store a JSON record for this target (e.g. a search's calibration measurements) under ``key``."""
        if self.analytic:
            return
        with closing(self._connect()) as db:
            db.execute(
                "INSERT OR REPLACE INTO memos VALUES (?, ?, ?, ?, ?)",
                (self.spec.name, self.fingerprint, key, json.dumps(data, default=str), time.time()),
            )

    def recall(self, key: str, max_age_s: float) -> tuple[dict[str, Any], float] | None:
        """The record stored under ``key`` and its age in seconds, if younger than ``max_age_s``."""
        if self.analytic or max_age_s <= 0:
            return None
        with closing(self._connect()) as db:
            row = db.execute(
                "SELECT data, at FROM memos WHERE target=? AND fingerprint=? AND key=?",
                (self.spec.name, self.fingerprint, key),
            ).fetchone()
        if row is None:
            return None
        age = time.time() - float(row[1])
        return (json.loads(row[0]), age) if 0 <= age < max_age_s else None

    def stats(self) -> dict[str, Any]:
        """Counters of this object: hits, misses, entries measured, seconds spent measuring, and how many of the
        entries it measured were timed while other programs kept the machine busy (``timed_busy``)."""
        return {
            "hits": self.hits,
            "misses": self.misses,
            "measured": self.measured,
            "measure_s": self.measure_s,
            "busy_entries": self.busy_entries,
        }


def timed_busy(details: dict[str, Any]) -> bool:
    """Whether a measurement's kept timing ran while other processes used more than ``contention.BUSY_CORES``
    (a busy batch timed again in a quiet moment keeps the faster timing; ``TvmBackend._time_again_when_quiet``)."""
    busy = details.get("busy_cores_again") if details.get("timed_again") else details.get("busy_cores")
    return isinstance(busy, (int, float)) and busy > BUSY_CORES


def _batch_size() -> int:
    raw = os.environ.get("COMPRESSION_TABLE_BATCH", "")
    try:
        return max(1, int(raw)) if raw.strip() else BATCH
    except ValueError:
        raise TargetError(
            f"COMPRESSION_TABLE_BATCH must be a whole number of workloads, not {raw!r}",
            "unset it, or set it to 1 to measure one workload at a time",
        ) from None


def fit_scales(
    columns: list[list[float]],
    ys: list[float],
    *,
    weights: list[float] | None = None,
    offset: bool = True,
) -> tuple[list[float], float] | None:
    """Least squares ``y = sum(scale_i * column_i) + offset``: (scales, offset), or None when the fit is not
    determined (fewer points than unknowns, or the first column too alike across points to separate its scale
    from the offset) or a scale is not positive (time cannot fall as work grows).

    ``weights`` weigh each point's residual (``1 / y`` fits relative errors); ``offset=False`` fits no offset
    (returned as 0.0)."""
    import numpy as np

    n, k = len(ys), len(columns)
    if k == 0 or n < k + int(offset):
        return None
    first = np.asarray(columns[0], dtype=float)
    if offset and float(first.std()) <= 0.05 * abs(float(first.mean())):
        return None
    cols = [np.asarray(c, dtype=float) for c in columns] + ([np.ones(n)] if offset else [])
    a = np.column_stack(cols)
    y = np.asarray(ys, dtype=float)
    if weights is not None:
        w = np.asarray(weights, dtype=float)
        a, y = a * w[:, None], y * w
    if np.linalg.matrix_rank(a) < a.shape[1]:
        return None
    sol, *_ = np.linalg.lstsq(a, y, rcond=None)
    scales = [float(v) for v in sol[:k]]
    if min(scales) <= 0:
        return None
    return scales, float(sol[k]) if offset else 0.0


def structure_key(workloads: list[LayerWorkload]) -> str:
    """A hash of a model's structure that pruning and quantization leave unchanged.

    Operations, kernels, strides, paddings, dilations, fusions, depthwise-ness, batch and spatial sizes are
    kept; channel counts and bits are dropped, so every pruned/quantized variant of a model shares it.
    """
    items = []
    for w in workloads:
        spatial = list(w.in_shape[2:]) if len(w.in_shape) > 2 else []
        items.append(
            [
                w.kind,
                w.op,
                list(w.kernel),
                list(w.stride),
                w.padding if isinstance(w.padding, str) else list(w.padding),
                list(w.dilation),
                list(w.fused),
                w.groups > 1 and w.groups == w.in_channels,
                w.groups > 1,
                w.batch,
                spatial,
                len(w.in_shape),
            ]
        )
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]
