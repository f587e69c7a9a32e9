"""The studio's data: uploaded models, datasets, hardware targets, runs with their episodes, logs and
artifacts, and stand-alone benchmarks.

The database is the source of truth; the live stream (``webapp.events``) is a copy of what is written here.
Files live in private storage (``webapp.storage``): uploads under ``settings.PRIVATE_MEDIA_ROOT``, run
outputs under ``settings.RUNS_ROOT`` (``Run.out_path``); paths stored on ``RunArtifact`` are relative to
the run's output directory so that machines mounting the shared directories at different places agree.

Work is scheduled through ``workers.dispatch`` (``enqueue_run``, ``request_cancel``, ...), never by calling
the engine from a view.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.conf import settings as dj_settings
from django.db import IntegrityError, models, transaction
from django.db.models import Max
from django.utils import timezone

from webapp.storage import dataset_upload_to, model_upload_to, private_storage

# The built-in targets (created by migration 0002; their backend settings come from the engine's registry,
# so a built-in is handed to the engine by name).
BUILTIN_TARGETS = {
    "local-tvm": ("tvm", "TVM (LLVM) on this machine's CPU: compiled, optionally tuned kernels."),
    "local-ort": ("onnxruntime", "ONNX Runtime on this machine's CPU (float and int8 QDQ kernels)."),
    "local-torch": ("torch", "PyTorch eager on this machine's CPU."),
    "analytic": ("analytic", "No measurement: costs are MACs / BOPs / parameters / bytes only."),
}


DIGITS_META = {
    "source": "digits",
    "format": "digits",
    "num_samples": 1797,
    "num_test_samples": None,
    "fixed_test_split": False,
    "num_classes": 10,
    "class_names": [str(i) for i in range(10)],
    "class_counts": [178, 182, 177, 183, 181, 182, 181, 179, 174, 180],
    "input_shape": [1, 8, 8],
    "dtype": "uint8",
}


def ensure_builtin_rows() -> None:
    """Create the built-in dataset and targets if missing (migration 0002 does it once; tests that flush
    the database call this)."""
    Dataset.objects.get_or_create(
        owner=None, name="digits", defaults={"kind": "builtin", "status": "ready", "meta": DIGITS_META}
    )
    for name, (backend, description) in BUILTIN_TARGETS.items():
        Target.objects.get_or_create(
            name=name, defaults={"owner": None, "backend": backend, "description": description}
        )


class UploadedModel(models.Model):
    """A model to compress: an uploaded ``.pt2``, or a zoo architecture with optional weights.

    A baseline trained in the studio is a ``pt2`` model whose file the worker wrote (``train_config`` says
    how it was trained). ``inspection`` is the engine's layer table (``compression.pipeline.inspect_model``).
    """

    KIND_CHOICES = [("pt2", "torch.export .pt2"), ("zoo", "zoo architecture")]
    STATUS_CHOICES = [
        ("pending", "pending"),
        ("training", "training"),
        ("inspecting", "inspecting"),
        ("ready", "ready"),
        ("failed", "failed"),
    ]

    owner = models.ForeignKey(dj_settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="models")
    name = models.CharField(max_length=200)
    kind = models.CharField(max_length=8, choices=KIND_CHOICES)
    zoo_arch = models.CharField(max_length=64, blank=True)
    file = models.FileField(storage=private_storage, upload_to=model_upload_to, max_length=500, blank=True)
    weights_file = models.FileField(
        storage=private_storage, upload_to=model_upload_to, max_length=500, blank=True
    )
    input_shape = models.JSONField(null=True, blank=True, help_text="[C, H, W]")
    num_classes = models.PositiveIntegerField(null=True, blank=True)
    status = models.CharField(max_length=16, choices=STATUS_CHOICES, default="pending")
    error = models.TextField(blank=True)
    inspection = models.JSONField(null=True, blank=True)
    train_config = models.JSONField(null=True, blank=True)
    progress = models.JSONField(
        null=True, blank=True, help_text="training progress: epoch, epochs, loss, ..."
    )
    size_bytes = models.BigIntegerField(default=0)
    task_id = models.CharField(max_length=64, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "model"

    def __str__(self) -> str:
        return self.name

    def spec(self) -> str:
        """The engine's model spec: the ``.pt2`` path, or ``zoo:ARCH`` / ``zoo:ARCH@weights.pth``."""
        if self.kind == "pt2":
            if not self.file:
                raise ValueError(f"model {self.pk} has no file yet")
            return self.file.path
        spec = f"zoo:{self.zoo_arch}"
        if self.weights_file:
            spec += "@" + self.weights_file.path
        return spec

    def engine_kwargs(self) -> dict[str, Any]:
        """``num_classes`` / ``input_shape`` for ``load_model`` (zoo only: a ``.pt2`` knows its own)."""
        if self.kind != "zoo":
            return {"num_classes": None, "input_shape": None}
        shape = tuple(int(v) for v in self.input_shape) if self.input_shape else None
        return {"num_classes": self.num_classes, "input_shape": shape}

    def delete_everything(self) -> str | None:
        """Delete the model, its files, its runs and their output directories; or, while one of its runs is
        queued or running, nothing, and say why (deleting under a worker left its directory behind)."""
        import shutil

        active = list(self.runs.filter(status__in=Run.ACTIVE).values_list("pk", flat=True))
        if active:
            listing = ", ".join(f"#{pk}" for pk in active)
            return f"{self.name} has runs still queued or running ({listing}): cancel them first"
        root = Path(dj_settings.RUNS_ROOT).resolve()
        dirs = [r.out_path.resolve() for r in self.runs.all()]
        for f in (self.file, self.weights_file):
            if f:
                f.delete(save=False)
        self.delete()
        for d in dirs:
            if d != root and root in d.parents:  # never outside the runs root
                shutil.rmtree(d, ignore_errors=True)
        return None


class Dataset(models.Model):
    """A dataset: the built-in ``digits`` (owner null, visible to all) or an uploaded file."""

    KIND_CHOICES = [
        ("builtin", "built-in"),
        ("npz", ".npz arrays"),
        ("cifar", "CIFAR-10 archive"),
        ("imagezip", "image-folder zip"),
    ]
    STATUS_CHOICES = [("pending", "pending"), ("ready", "ready"), ("failed", "failed")]

    owner = models.ForeignKey(
        dj_settings.AUTH_USER_MODEL, on_delete=models.CASCADE, null=True, blank=True, related_name="datasets"
    )
    name = models.CharField(max_length=200)
    kind = models.CharField(max_length=16, choices=KIND_CHOICES)
    file = models.FileField(storage=private_storage, upload_to=dataset_upload_to, max_length=500, blank=True)
    meta = models.JSONField(null=True, blank=True, help_text="compression.data.describe_dataset()")
    status = models.CharField(max_length=16, choices=STATUS_CHOICES, default="pending")
    error = models.TextField(blank=True)
    size_bytes = models.BigIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["owner_id", "name"]

    def __str__(self) -> str:
        return self.name

    @property
    def is_builtin(self) -> bool:
        """Built-in datasets belong to nobody and are visible to everybody."""
        return self.kind == "builtin"

    def spec(self) -> str:
        """The engine's dataset spec: ``digits`` for the built-in, else the stored file's path."""
        if self.kind == "builtin":
            return self.name
        if not self.file:
            raise ValueError(f"dataset {self.pk} has no file")
        return self.file.path


class Target(models.Model):
    """A hardware target as data: a backend and its settings (TVM target dict, RPC tracker and key, ...).

    Built-ins (owner null) are visible to all and resolved by name by the engine's registry; user targets
    are passed to the engine as a dict (``spec_dict``).
    """

    BACKEND_CHOICES = [
        ("tvm", "TVM"),
        ("onnxruntime", "ONNX Runtime"),
        ("torch", "PyTorch"),
        ("analytic", "analytic (no measurement)"),
    ]

    owner = models.ForeignKey(
        dj_settings.AUTH_USER_MODEL, on_delete=models.CASCADE, null=True, blank=True, related_name="targets"
    )
    name = models.CharField(max_length=100, unique=True)
    backend = models.CharField(max_length=16, choices=BACKEND_CHOICES)
    settings = models.JSONField(default=dict, blank=True)
    round_to = models.PositiveIntegerField(default=1)
    description = models.TextField(blank=True)
    health = models.JSONField(default=dict, blank=True, help_text="reachable, checked_at, detail / error")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["owner_id", "name"]

    def __str__(self) -> str:
        return self.name

    @property
    def is_builtin(self) -> bool:
        """Built-in targets belong to nobody and come from the engine's registry."""
        return self.owner_id is None and self.name in BUILTIN_TARGETS

    @property
    def queue_name(self) -> str:
        """The Celery queue of this device: one consumer with concurrency 1 serialises its measurements."""
        return f"{dj_settings.DEVICE_QUEUE_PREFIX}{self.name}"

    def spec_dict(self) -> dict[str, Any]:
        """The target as the engine's ``TargetSpec`` dict."""
        return {
            "name": self.name,
            "backend": self.backend,
            "settings": self.settings or {},
            # 0: none set, the engine uses the backend's own (it depends on the measuring machine's CPU)
            "round_to": self.round_to or None,
            "description": self.description,
        }

    def engine_spec(self) -> str | dict[str, Any]:
        """What to hand ``compression.targets.get_target``: the name for built-ins, else ``spec_dict()``."""
        return self.name if self.is_builtin else self.spec_dict()


class Run(models.Model):
    """One search: model x dataset x target x agent, its progress, best result, summary and lifecycle.

    Lifecycle: queued -> running -> finalizing -> finished | failed | cancelled. ``lease``/``worker``/
    ``heartbeat_at`` say which worker holds the run; a heartbeat older than ``settings.RUN_STALE_S`` means
    the worker is gone (the reaper then resumes the run from its checkpoint, or fails it with a reason).
    """

    STATUS_CHOICES = [
        ("queued", "queued"),
        ("running", "running"),
        ("finalizing", "finalizing"),
        ("finished", "finished"),
        ("failed", "failed"),
        ("cancelled", "cancelled"),
    ]
    ACTIVE = ("queued", "running", "finalizing")
    TERMINAL = ("finished", "failed", "cancelled")
    # what a failure was: the same input fails the same way again (start a new run with other settings), the
    # others may pass on a resume (the device is back, the worker restarted, a bug was fixed)
    ERROR_KINDS = [
        ("input", "the model, dataset or settings"),
        ("device", "the hardware target"),
        ("worker", "the worker stopped"),
        ("internal", "an internal error"),
    ]

    owner = models.ForeignKey(dj_settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="runs")
    name = models.CharField(max_length=200, blank=True)
    model = models.ForeignKey(UploadedModel, on_delete=models.CASCADE, related_name="runs")
    dataset = models.ForeignKey(Dataset, on_delete=models.CASCADE, related_name="runs")
    # PROTECT: a target that runs were measured on cannot vanish from under their results.
    target = models.ForeignKey(Target, on_delete=models.PROTECT, related_name="runs")
    agent = models.CharField(max_length=32)
    config = models.JSONField(default=dict, help_text="compression.search.SearchConfig.to_dict()")
    status = models.CharField(max_length=16, choices=STATUS_CHOICES, default="queued", db_index=True)
    phase = models.CharField(
        max_length=16, blank=True, help_text="search | device check | finalize | measure | export"
    )
    episodes_done = models.PositiveIntegerField(default=0)
    episodes_total = models.PositiveIntegerField(default=0)
    best = models.JSONField(null=True, blank=True, help_text="the best episode so far (Episode.to_event())")
    start_info = models.JSONField(null=True, blank=True, help_text="baseline accuracy and cost (on_start)")
    summary = models.JSONField(null=True, blank=True, help_text="the final report")
    error = models.TextField(blank=True)
    error_kind = models.CharField(
        max_length=16,
        blank=True,
        choices=ERROR_KINDS,
        help_text="why a failed run failed: resuming helps after device, worker and internal errors, not input",
    )
    cancel_requested = models.BooleanField(default=False)
    task_id = models.CharField(max_length=64, blank=True)
    worker = models.CharField(max_length=200, blank=True)
    lease = models.CharField(max_length=64, blank=True)
    attempts = models.PositiveIntegerField(default=0, help_text="times a worker started (or resumed) the run")
    checkpoint_episode = models.PositiveIntegerField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    out_dir = models.CharField(max_length=500, blank=True, help_text="relative to settings.RUNS_ROOT")
    idle_s = models.FloatField(
        default=0.0, help_text="seconds the run spent stopped (cancelled or failed) before a resume"
    )

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return self.name or f"run {self.pk}"

    @property
    def group_name(self) -> str:
        """The Channels group of this run's live stream."""
        return f"run-{self.pk}"

    @property
    def out_path(self) -> Path:
        """The run's output directory (absolute)."""
        rel = self.out_dir or f"run-{self.pk}"
        path = Path(rel)
        return path if path.is_absolute() else Path(dj_settings.RUNS_ROOT) / path

    @property
    def is_active(self) -> bool:
        """Queued, running or finalizing."""
        return self.status in self.ACTIVE

    def elapsed_s(self) -> float | None:
        """Seconds the run has been going: since it started (until it ended), less the time it spent stopped
        between a cancel or a failure and a resume."""
        if not self.started_at:
            return None
        end = self.finished_at or timezone.now()
        return max(0.0, (end - self.started_at).total_seconds() - (self.idle_s or 0.0))

    def status_event(self) -> dict[str, Any]:
        """The run's state as the live stream and the API send it."""
        return {
            "id": self.pk,
            "name": str(self),
            "status": self.status,
            "phase": self.phase,
            "episodes_done": self.episodes_done,
            "episodes_total": self.episodes_total,
            "best": self.best,
            "error": self.error,
            "error_kind": self.error_kind,
            "cancel_requested": self.cancel_requested,
            "attempts": self.attempts,
            "checkpoint_episode": self.checkpoint_episode,
            "created_at": _iso(self.created_at),
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
            "heartbeat_at": _iso(self.heartbeat_at),
            "elapsed_s": self.elapsed_s(),
            "has_summary": self.summary is not None,
        }

    def log(self, message: str, level: str = "info") -> RunLog:
        """Append a line to the run's log (the caller publishes it with ``webapp.events.publish_log``)."""
        return RunLog.append(self, message, level)


class Episode(models.Model):
    """One search episode of a run (a copy of the engine's ``EpisodeResult``); unique per (run, number)."""

    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="episodes")
    number = models.PositiveIntegerField()
    stage = models.CharField(max_length=32, blank=True)
    reward = models.FloatField()
    accuracy = models.FloatField()
    latency_ms = models.FloatField(null=True, blank=True)
    macs = models.BigIntegerField()
    bops = models.BigIntegerField()
    params = models.BigIntegerField()
    bytes = models.FloatField()
    cost_ratio = models.FloatField()
    meets_budget = models.BooleanField()
    is_best = models.BooleanField(default=False)
    policy = models.JSONField(default=dict)
    raw_actions = models.JSONField(default=list)
    enforced_actions = models.JSONField(default=list)
    timings = models.JSONField(default=dict)
    wall_time_s = models.FloatField(default=0.0)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["run_id", "number"]
        constraints = [models.UniqueConstraint(fields=["run", "number"], name="episode_unique_per_run")]

    def __str__(self) -> str:
        return f"run {self.run_id} episode {self.number}"

    # EpisodeResult field -> model field (the engine calls the sequence number "episode").
    RESULT_FIELDS = (
        "stage",
        "reward",
        "accuracy",
        "latency_ms",
        "macs",
        "bops",
        "params",
        "bytes",
        "cost_ratio",
        "meets_budget",
        "is_best",
        "policy",
        "raw_actions",
        "enforced_actions",
        "timings",
        "wall_time_s",
    )

    @classmethod
    def defaults_from_result(cls, result: dict[str, Any]) -> dict[str, Any]:
        """Model field values from an ``EpisodeResult.to_dict()`` (for ``update_or_create``)."""
        out = {name: result[name] for name in cls.RESULT_FIELDS if name in result}
        out["stage"] = out.get("stage") or ""
        return out

    def to_event(self, full: bool = False) -> dict[str, Any]:
        """The episode as the stream and the API send it; ``full`` adds the raw and enforced actions."""
        d = {
            "number": self.number,
            "stage": self.stage,
            "reward": self.reward,
            "accuracy": self.accuracy,
            "latency_ms": self.latency_ms,
            "macs": self.macs,
            "bops": self.bops,
            "params": self.params,
            "bytes": self.bytes,
            "cost_ratio": self.cost_ratio,
            "meets_budget": self.meets_budget,
            "is_best": self.is_best,
            "policy": self.policy,
            "wall_time_s": self.wall_time_s,
        }
        if full:
            d.update(
                raw_actions=self.raw_actions, enforced_actions=self.enforced_actions, timings=self.timings
            )
        return d


class RunArtifact(models.Model):
    """A file a run produced (compressed model, report, episodes.csv, log), with its real size."""

    # how the notes of a stopped (cancelled or failed) run's downloads begin; a resume removes those rows
    PARTIAL_NOTE = "found before the run stopped"

    KIND_CHOICES = [
        ("pt2", ".pt2 (torch.export)"),
        ("onnx", "ONNX"),
        ("int8.onnx", "ONNX int8"),
        ("tvm", "TVM library"),
        ("report", "report.json"),
        ("policy", "best_policy.json"),
        ("episodes.csv", "episodes.csv"),
        ("episodes.jsonl", "episodes.jsonl"),
        ("log", "log"),
        ("other", "other"),
    ]

    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="artifacts")
    kind = models.CharField(max_length=16, choices=KIND_CHOICES)
    path = models.CharField(max_length=500, help_text="relative to the run's output directory")
    bytes = models.BigIntegerField(default=0)
    note = models.TextField(blank=True)
    how_to_load = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["run_id", "kind", "path"]
        constraints = [models.UniqueConstraint(fields=["run", "path"], name="artifact_unique_path_per_run")]

    def __str__(self) -> str:
        return f"{self.run_id}:{self.path}"

    @property
    def abspath(self) -> Path:
        """Where the file is; always inside the run's output directory."""
        base = self.run.out_path.resolve()
        full = (base / self.path).resolve()
        if base != full and base not in full.parents:
            raise ValueError(f"artifact path {self.path!r} leaves the run directory")
        return full

    @property
    def filename(self) -> str:
        """The file's name for a download."""
        return Path(self.path).name


class RunLog(models.Model):
    """One line of a run's log; ``seq`` orders lines within a run (1, 2, ...)."""

    LEVEL_CHOICES = [("debug", "debug"), ("info", "info"), ("warning", "warning"), ("error", "error")]

    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="logs")
    seq = models.PositiveIntegerField()
    level = models.CharField(max_length=8, choices=LEVEL_CHOICES, default="info")
    message = models.TextField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["run_id", "seq"]
        constraints = [models.UniqueConstraint(fields=["run", "seq"], name="log_unique_seq_per_run")]

    def __str__(self) -> str:
        return f"{self.run_id}#{self.seq} {self.message[:60]}"

    @classmethod
    def append(cls, run: Run, message: str, level: str = "info") -> RunLog:
        """Add a line with the next sequence number (retries if another process took the same number)."""
        for _ in range(5):
            try:
                with transaction.atomic():
                    last = cls.objects.filter(run=run).aggregate(m=Max("seq"))["m"] or 0
                    return cls.objects.create(
                        run=run, seq=last + 1, level=level, message=str(message)[:10_000]
                    )
            except IntegrityError:
                continue
        raise RuntimeError(f"could not append a log line to run {run.pk}")

    def to_event(self) -> dict[str, Any]:
        """The line as the stream sends it."""
        return {"seq": self.seq, "level": self.level, "message": self.message, "at": _iso(self.created_at)}


class Benchmark(models.Model):
    """A stand-alone measurement of a model on a target (the "measure now" button)."""

    STATUS_CHOICES = [
        ("queued", "queued"),
        ("running", "running"),
        ("finished", "finished"),
        ("failed", "failed"),
    ]

    owner = models.ForeignKey(
        dj_settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="benchmarks"
    )
    model = models.ForeignKey(UploadedModel, on_delete=models.CASCADE, related_name="benchmarks")
    target = models.ForeignKey(Target, on_delete=models.CASCADE, related_name="benchmarks")
    params = models.JSONField(default=dict, blank=True, help_text="warmup, repeats, timeout_s, batch")
    status = models.CharField(max_length=16, choices=STATUS_CHOICES, default="queued")
    result = models.JSONField(null=True, blank=True, help_text="Measurement.to_dict()")
    error = models.TextField(blank=True)
    task_id = models.CharField(max_length=64, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"benchmark {self.pk} of {self.model_id} on {self.target_id}"


def _iso(value) -> str | None:
    return value.isoformat() if value else None
