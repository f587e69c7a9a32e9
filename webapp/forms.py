"""Forms of the dashboard and the JSON API: they validate input, create the row, and queue the work.

The same form serves a page and the API (the API passes its JSON body as the form's data), so there is
one way to create a model, a dataset, a target, a benchmark or a run. Validation here is the cheap part
(types, ranges, sizes, file types, ownership, obvious mismatches); the worker validates fully with the
engine and reports its verdict on the object (status "failed" with the engine's one-line message).
Nothing here imports torch.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from django import forms
from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.core.files.uploadedfile import UploadedFile
from django.db import transaction

from compression.search.results import OBJECTIVES, REWARDS, SearchConfig
from webapp import catalog
from webapp.models import BUILTIN_TARGETS, Benchmark, Dataset, Run, Target, UploadedModel
from webapp.permissions import visible

log = logging.getLogger(__name__)

_SEARCH_DEFAULTS = SearchConfig(model="-")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")

OBJECTIVE_HELP = {
    "latency": "measured latency on the target (needs a measuring backend)",
    "macs": "multiply-accumulates (FLOPs / 2)",
    "bops": "bit operations: MACs x weight bits x activation bits",
    "params": "parameter count",
    "bytes": "model size in bytes at the chosen bit-widths",
}
REWARD_HELP = {
    "acc": "accuracy; the budget is enforced by construction (AMC resource-constrained)",
    "acc-log-cost": "-error x log(cost) (AMC accuracy-guaranteed)",
    "galen": "accuracy + beta x |cost / (rho x cost_ref) - 1| (Galen)",
    "haq": "accuracy with the budget repaired after the episode (HAQ)",
}


def _mib(n: int) -> str:
    return f"{n / (1024 * 1024):.0f} MiB"


def check_upload(
    f: UploadedFile, *, what: str, suffixes: tuple[str, ...], max_bytes: int, magic: tuple[bytes, ...] = ()
) -> None:
    """Refuse an upload by name, size and first bytes, with a message that says what to do instead."""
    name = f.name or "upload"
    lower = name.lower()
    if not any(lower.endswith(s) for s in suffixes):
        raise forms.ValidationError(
            f"{name} is not a {what}: expected a file ending in {' or '.join(suffixes)}"
        )
    if f.size == 0:
        raise forms.ValidationError(f"{name} is empty")
    if f.size > max_bytes:
        raise forms.ValidationError(f"{name} is {_mib(f.size)}; the limit for a {what} is {_mib(max_bytes)}")
    if magic:
        head = f.read(8)
        f.seek(0)
        if not any(head.startswith(m) for m in magic):
            raise forms.ValidationError(
                f"{name} does not look like a {what} (its content does not match its name)"
            )


def parse_shape(text: str) -> list[int]:
    """'3,32,32' or '3x32x32' -> [3, 32, 32] (C, H, W); ValidationError when malformed or out of range."""
    parts = [p for p in re.split(r"[\s,x×]+", text.strip().strip("[]()")) if p]
    try:
        shape = [int(p) for p in parts]
    except ValueError:
        raise forms.ValidationError(f"{text!r} is not a shape: write C,H,W such as 3,32,32") from None
    if len(shape) != 3:
        raise forms.ValidationError(
            "the input shape has three numbers: channels, height, width (e.g. 3,32,32)"
        )
    c, h, w = shape
    if not (1 <= c <= 64 and 1 <= h <= 4096 and 1 <= w <= 4096):
        raise forms.ValidationError("channels must be 1..64 and height/width 1..4096")
    return shape


def _default_name(f: UploadedFile | None, fallback: str) -> str:
    if f is None or not f.name:
        return fallback
    name = Path(f.name).name
    for suffix in (".tar.gz", ".pt2", ".npz", ".zip", ".tgz", ".pth", ".pt"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)] or fallback
    return name


class OwnedForm(forms.Form):
    """A form that knows the signed-in user (querysets are limited to what the user may see).

    ``save`` creates the row and hands the work to ``workers.dispatch`` once the row is committed (a worker
    must find it). When the task queue does not answer, the row stays and ``queue_error`` says why.
    """

    def __init__(self, *args: Any, user: AbstractBaseUser, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.user = user
        self.queue_error: str | None = None

    def queue(self, action: str, *args: Any, **kwargs: Any) -> None:
        """Call ``workers.dispatch.<action>(*args)`` after the commit (a Celery client call; no engine import)."""
        from workers import dispatch

        def send() -> None:
            try:
                getattr(dispatch, action)(*args, **kwargs)
            except dispatch.BrokerUnavailable as exc:
                log.warning("%s: %s", action, exc)
                self.queue_error = str(exc)

        transaction.on_commit(send)


# --- models ---------------------------------------------------------------------------------------------


class ModelUploadForm(OwnedForm):
    """Upload a ``.pt2`` written by ``torch.export.save``; the worker vets and inspects it."""

    name = forms.CharField(max_length=200, required=False, help_text="defaults to the file name")
    file = forms.FileField(
        label=".pt2 file", help_text="written by torch.export.save(torch.export.export(model, (x,)))"
    )

    def clean_file(self) -> UploadedFile:
        f = self.cleaned_data["file"]
        check_upload(
            f,
            what=".pt2 model",
            suffixes=(".pt2",),
            max_bytes=settings.MAX_MODEL_UPLOAD_BYTES,
            magic=(b"PK\x03\x04",),
        )
        return f

    def save(self) -> UploadedModel:
        """Create the model row (status pending) and queue its inspection."""
        f = self.cleaned_data["file"]
        m = UploadedModel(
            owner=self.user,
            name=self.cleaned_data["name"] or _default_name(f, "model"),
            kind="pt2",
            status="pending",
            size_bytes=f.size,
        )
        m.file.save(f.name, f, save=False)
        m.save()
        self.queue("enqueue_inspect", m)
        return m


class ZooModelForm(OwnedForm):
    """A built-in architecture, optionally with a ``state_dict`` (loaded by the worker with weights_only)."""

    name = forms.CharField(max_length=200, required=False, help_text="defaults to the architecture")
    zoo_arch = forms.ChoiceField(label="architecture", choices=())
    weights_file = forms.FileField(
        label="weights",
        required=False,
        help_text="a state_dict saved with torch.save (.pth / .pt)",
    )
    num_classes = forms.IntegerField(min_value=1, max_value=100_000, required=False, help_text="default 10")
    input_shape = forms.CharField(required=False, help_text="C,H,W (default 3,32,32)")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["zoo_arch"].choices = [(a, a) for a in catalog.catalog()["zoo"]]

    def clean_weights_file(self) -> UploadedFile | None:
        f = self.cleaned_data.get("weights_file")
        if f:
            # torch.save writes a zip archive (new format) or a bare pickle (legacy): both are vetted later.
            check_upload(
                f,
                what="state_dict file",
                suffixes=(".pth", ".pt", ".bin", ".ckpt"),
                max_bytes=settings.MAX_WEIGHTS_UPLOAD_BYTES,
                magic=(b"PK\x03\x04", b"\x80"),
            )
        return f

    def clean_input_shape(self) -> list[int] | None:
        text = self.cleaned_data.get("input_shape") or ""
        return parse_shape(text) if text.strip() else None

    def save(self) -> UploadedModel:
        """Create the zoo model row and queue its inspection."""
        arch = self.cleaned_data["zoo_arch"]
        w = self.cleaned_data.get("weights_file")
        m = UploadedModel(
            owner=self.user,
            name=self.cleaned_data["name"] or arch,
            kind="zoo",
            zoo_arch=arch,
            num_classes=self.cleaned_data.get("num_classes"),
            input_shape=self.cleaned_data.get("input_shape"),
            status="pending",
            size_bytes=w.size if w else 0,
        )
        if w:
            m.weights_file.save(w.name, w, save=False)
        m.save()
        self.queue("enqueue_inspect", m)
        return m


class TrainBaselineForm(OwnedForm):
    """Train a zoo architecture on a dataset in a worker; the result becomes a ``.pt2`` model."""

    name = forms.CharField(max_length=200, required=False)
    zoo_arch = forms.ChoiceField(label="architecture", choices=())
    dataset = forms.ModelChoiceField(queryset=Dataset.objects.none())
    epochs = forms.IntegerField(min_value=1, max_value=500, initial=10)
    lr = forms.FloatField(label="learning rate", min_value=1e-6, max_value=10.0, initial=0.05)
    batch_size = forms.IntegerField(min_value=1, max_value=4096, initial=128)
    seed = forms.IntegerField(min_value=0, max_value=2**31 - 1, initial=0)
    input_shape = forms.CharField(required=False, help_text="C,H,W to train at (default: the dataset's own)")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["zoo_arch"].choices = [(a, a) for a in catalog.catalog()["zoo"]]
        self.fields["dataset"].queryset = visible(Dataset, self.user).filter(status="ready")

    def clean_input_shape(self) -> list[int] | None:
        text = self.cleaned_data.get("input_shape") or ""
        return parse_shape(text) if text.strip() else None

    def save(self) -> UploadedModel:
        """Create the model row (status training) and queue the training task."""
        d = self.cleaned_data
        m = UploadedModel.objects.create(
            owner=self.user,
            name=d["name"] or f"{d['zoo_arch']}-{d['dataset'].name}",
            kind="pt2",
            zoo_arch=d["zoo_arch"],
            input_shape=d.get("input_shape"),
            status="training",
            train_config={
                "arch": d["zoo_arch"],
                "dataset_id": d["dataset"].pk,
                "epochs": d["epochs"],
                "lr": d["lr"],
                "batch_size": d["batch_size"],
                "seed": d["seed"],
                "input_shape": d.get("input_shape"),
            },
        )
        self.queue("enqueue_train", m, d["dataset"])
        return m


# --- datasets -------------------------------------------------------------------------------------------

DATASET_FILES = {
    "npz": (".npz arrays (x, y)", (".npz",), (b"PK\x03\x04",)),
    "cifar": ("CIFAR-10 python archive", (".tar.gz", ".tgz"), (b"\x1f\x8b",)),
    "imagezip": ("zip of class folders", (".zip",), (b"PK\x03\x04",)),
}


class DatasetUploadForm(OwnedForm):
    """Upload a dataset file; the worker reads its metadata (``describe_dataset``)."""

    name = forms.CharField(max_length=200, required=False, help_text="defaults to the file name")
    kind = forms.ChoiceField(choices=[(k, v[0]) for k, v in DATASET_FILES.items()], initial="npz")
    file = forms.FileField(
        help_text=".npz with x and y; cifar-10-python.tar.gz; or a zip of one folder per class"
    )

    def clean(self) -> dict[str, Any]:
        d = super().clean()
        f, kind = d.get("file"), d.get("kind")
        if f and kind:
            what, suffixes, magic = DATASET_FILES[kind]
            try:
                check_upload(
                    f, what=what, suffixes=suffixes, max_bytes=settings.MAX_DATASET_UPLOAD_BYTES, magic=magic
                )
            except forms.ValidationError as exc:
                self.add_error("file", exc)
        return d

    def save(self) -> Dataset:
        """Create the dataset row (status pending) and queue the metadata read."""
        f = self.cleaned_data["file"]
        ds = Dataset(
            owner=self.user,
            name=self.cleaned_data["name"] or _default_name(f, "dataset"),
            kind=self.cleaned_data["kind"],
            status="pending",
            size_bytes=f.size,
        )
        ds.file.save(f.name, f, save=False)
        ds.save()
        self.queue("enqueue_inspect_dataset", ds)
        return ds


# --- targets --------------------------------------------------------------------------------------------


class TargetForm(OwnedForm):
    """A hardware target as data. Light checks here; the worker runs ``validate_target`` and a health check."""

    name = forms.CharField(max_length=100, help_text="letters, digits, . _ - (e.g. rpi4-farm)")
    backend = forms.ChoiceField(choices=Target.BACKEND_CHOICES, initial="tvm")
    description = forms.CharField(required=False, widget=forms.Textarea(attrs={"rows": 2}))
    tvm_target = forms.CharField(
        label="TVM target (JSON)",
        required=False,
        widget=forms.Textarea(attrs={"rows": 3}),
        help_text='e.g. {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72", "num-cores": 4}',
    )
    rpc_host = forms.CharField(label="RPC tracker host", required=False, max_length=255)
    rpc_port = forms.IntegerField(label="RPC tracker port", required=False, min_value=1, max_value=65535)
    rpc_key = forms.CharField(label="device key", required=False, max_length=100)
    rpc_timeout_s = forms.FloatField(label="RPC timeout (s)", required=False, min_value=1, max_value=3600)
    threads = forms.IntegerField(
        required=False, min_value=1, max_value=256, help_text="CPU threads to measure with"
    )
    round_to = forms.IntegerField(
        min_value=1,
        max_value=256,
        required=False,
        help_text="kept channels are rounded to a multiple of this (blank: the backend's own, decided where it "
        "measures: ONNX Runtime's block, 16 with AVX-512 and 8 without; 1 for the others)",
    )

    def clean_name(self) -> str:
        name = self.cleaned_data["name"].strip()
        if not _NAME_RE.match(name):
            raise forms.ValidationError(
                "use letters, digits, '.', '_' and '-' (start with a letter or digit)"
            )
        if name in BUILTIN_TARGETS or Target.objects.filter(name=name).exists():
            raise forms.ValidationError(f"a target named {name!r} exists already; pick another name")
        return name

    def clean_tvm_target(self) -> dict[str, Any] | None:
        text = (self.cleaned_data.get("tvm_target") or "").strip()
        if not text:
            return None
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise forms.ValidationError(
                f"not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
            ) from None
        if isinstance(value, str):
            value = {"kind": value.split()[0]} if value.strip() else None
        if not isinstance(value, dict) or not isinstance(value.get("kind"), str) or not value["kind"]:
            raise forms.ValidationError('a TVM target is a JSON object with a "kind", e.g. {"kind": "llvm"}')
        return value

    def clean(self) -> dict[str, Any]:
        d = super().clean()
        backend = d.get("backend")
        rpc = [d.get("rpc_host"), d.get("rpc_port"), d.get("rpc_key")]
        if any(rpc) and not all(rpc):
            for field, value in zip(("rpc_host", "rpc_port", "rpc_key"), rpc, strict=True):
                if not value:
                    self.add_error(
                        field, "a remote device needs the tracker host, port and device key together"
                    )
        if any(rpc) and backend != "tvm":
            self.add_error(
                "rpc_host", "remote devices are reached through TVM's RPC tracker: choose the tvm backend"
            )
        if backend == "tvm" and not d.get("tvm_target") and "tvm_target" not in self.errors:
            self.add_error("tvm_target", 'the tvm backend needs a TVM target, e.g. {"kind": "llvm"}')
        if backend != "tvm" and d.get("tvm_target"):
            self.add_error("tvm_target", "only the tvm backend takes a TVM target")
        return d

    def settings_dict(self) -> dict[str, Any]:
        """The backend settings in the engine's ``TargetSpec.settings`` layout."""
        d = self.cleaned_data
        out: dict[str, Any] = {}
        if d["backend"] == "tvm":
            out["target"] = d["tvm_target"]
            if d.get("rpc_host"):
                rpc = {"host": d["rpc_host"], "port": d["rpc_port"], "key": d["rpc_key"]}
                if d.get("rpc_timeout_s"):
                    rpc["timeout_s"] = d["rpc_timeout_s"]
                out["rpc"] = rpc
        if d.get("threads"):
            out["threads"] = d["threads"]
        return out

    def save(self) -> Target:
        """Create the target and queue its health check (which also validates it with the engine)."""
        d = self.cleaned_data
        t = Target.objects.create(
            owner=self.user,
            name=d["name"],
            backend=d["backend"],
            settings=self.settings_dict(),
            round_to=d["round_to"] or 0,  # 0: the backend's own (``Target.spec_dict``)
            description=d.get("description") or "",
            health={"status": "checking"},
        )
        self.queue("enqueue_check_target", t)
        return t


class BenchmarkForm(OwnedForm):
    """Measure one of the user's models on a target now ("measure now")."""

    model = forms.ModelChoiceField(queryset=UploadedModel.objects.none())
    target = forms.ModelChoiceField(queryset=Target.objects.none(), to_field_name="name")
    repeats = forms.IntegerField(min_value=1, max_value=1000, initial=20)
    warmup = forms.IntegerField(min_value=0, max_value=100, initial=3)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["model"].queryset = visible(UploadedModel, self.user).filter(status="ready")
        self.fields["target"].queryset = visible(Target, self.user)

    def save(self) -> Benchmark:
        """Create the benchmark row (queued) and queue the measurement on the target's device queue."""
        d = self.cleaned_data
        b = Benchmark.objects.create(
            owner=self.user,
            model=d["model"],
            target=d["target"],
            params={"repeats": d["repeats"], "warmup": d["warmup"]},
        )
        self.queue("enqueue_benchmark", b)
        return b


# --- runs -----------------------------------------------------------------------------------------------


def agent_field_name(agent: str, param: str) -> str:
    """The form field holding one agent hyper-parameter (one set of fields per agent; JS shows one)."""
    return f"agent_{agent}__{param}"


def _default_on(label: str, off: str, help_text: str) -> forms.ChoiceField:
    """A yes/no engine switch that is on unless "false" is posted (a client that omits it gets the default)."""
    return forms.ChoiceField(
        required=False,
        choices=[("true", "yes (default)"), ("false", off)],
        initial="true",
        label=label,
        help_text=help_text,
    )


class RunForm(OwnedForm):
    """A new search run. Defaults are ``SearchConfig``'s; agent settings default to the agent's own."""

    name = forms.CharField(max_length=200, required=False, help_text="defaults to model · agent · target")
    model = forms.ModelChoiceField(
        queryset=UploadedModel.objects.none(), help_text="models that are inspected"
    )
    dataset = forms.ModelChoiceField(
        queryset=Dataset.objects.none(), required=False, help_text="blank: the built-in digits"
    )
    target = forms.ModelChoiceField(queryset=Target.objects.none(), to_field_name="name")
    agent = forms.ChoiceField(choices=())
    objective = forms.ChoiceField(choices=[(o, o) for o in OBJECTIVES], initial=_SEARCH_DEFAULTS.objective)
    budget = forms.FloatField(
        min_value=0.01,
        max_value=1.0,
        initial=_SEARCH_DEFAULTS.budget,
        help_text="allowed cost as a fraction of the original (0.5 = half)",
    )
    reward = forms.ChoiceField(choices=[(r, r) for r in REWARDS], initial=_SEARCH_DEFAULTS.reward)
    beta = forms.FloatField(required=False, initial=-5.0, help_text="galen reward: weight of the cost term")
    rho = forms.FloatField(
        required=False,
        initial=0.5,
        min_value=0.01,
        max_value=1.0,
        help_text="galen reward: target cost ratio",
    )
    episodes = forms.IntegerField(min_value=1, max_value=100_000, initial=_SEARCH_DEFAULTS.episodes)
    seed = forms.IntegerField(min_value=0, max_value=2**31 - 1, initial=_SEARCH_DEFAULTS.seed)
    val_samples = forms.IntegerField(
        min_value=10,
        max_value=1_000_000,
        initial=_SEARCH_DEFAULTS.val_samples,
        label="Search-set images",
        help_text="images per accuracy estimate (the reward): validation images first",
    )
    train_top_up = _default_on(
        "Top up from training images",
        "no: validation images only",
        "when the validation split holds fewer images than that, add training images the calibration batch "
        "does not use (AMC's practice): 180 validation images cannot rank candidates a point apart",
    )
    calib_samples = forms.IntegerField(
        min_value=1, max_value=1_000_000, initial=_SEARCH_DEFAULTS.calib_samples
    )
    round_to = forms.IntegerField(
        min_value=1, max_value=256, required=False, help_text="channel rounding (blank: the target's own)"
    )
    top_k = forms.IntegerField(
        min_value=1,
        max_value=50,
        initial=_SEARCH_DEFAULTS.top_k,
        help_text="best policies fine-tuned after the search",
    )
    device_check_rounds = forms.IntegerField(
        min_value=0,
        max_value=20,
        initial=_SEARCH_DEFAULTS.device_check_rounds,
        required=False,
        label="Device check rounds",
        help_text="with a latency budget: measure the best policies on the device against the original in this "
        "many interleaved rounds and replace those over the budget by the next ones (0: trust the latency table)",
    )
    fine_tune_epochs = forms.IntegerField(
        min_value=0, max_value=500, initial=_SEARCH_DEFAULTS.fine_tune_epochs
    )
    fine_tune_augment = forms.BooleanField(
        required=False,
        initial=_SEARCH_DEFAULTS.fine_tune_augment,
        label="Augment the fine-tune",
        help_text="shift the inputs at random while fine-tuning; a short distillation recovers more without "
        "(4-8 points at 2 epochs on a pruned ResNet-20), a long one may want it",
    )
    checkpoint_every = forms.IntegerField(
        min_value=1, max_value=10_000, initial=_SEARCH_DEFAULTS.checkpoint_every
    )
    layout = forms.ChoiceField(
        required=False,
        choices=(),
        help_text="what the agent decides per layer (blank: the agent's own; random/uniform: joint)",
    )
    min_keep = forms.FloatField(
        min_value=0.01,
        max_value=1.0,
        initial=_SEARCH_DEFAULTS.min_keep,
        help_text="smallest keep ratio per layer",
    )
    min_bits = forms.IntegerField(min_value=1, max_value=8, initial=_SEARCH_DEFAULTS.min_bits)
    max_bits = forms.IntegerField(min_value=1, max_value=8, initial=_SEARCH_DEFAULTS.max_bits)
    float_bits = _default_on(
        "Layers may stay float",
        "no: quantize every layer it decides",
        "latency objective, bits/joint actions: the top choice leaves a layer float; on runtimes that "
        "compute in float (TVM here) quantizing a layer only slows it down",
    )
    free_precision = _default_on(
        "Take precision that costs no time",
        "no: keep the bits the agent chose",
        "latency objective, bits/joint actions: a layer's bits are raised to the most precise choice that is no "
        "slower on the target (on TVM quantizing buys no time; ONNX Runtime runs 2-7 bits as int8 kernels)",
    )
    reconstruct = _default_on(
        "Re-fit layers after pruned ones",
        "no: slice and re-estimate batch norms only",
        "least-squares re-fit of every layer that reads pruned channels to the original's outputs "
        "(AMC's channel pruning); far better accuracy before fine-tuning for ~0.1 s per candidate",
    )
    tune_steps = forms.IntegerField(
        min_value=0,
        max_value=500,
        initial=_SEARCH_DEFAULTS.tune_steps,
        required=False,
        label="Fine-tune steps per candidate",
        help_text="score every candidate after this many steps of fine-tuning on training images the search set "
        "does not use (0: as applied), so the reward is what a little fine-tuning makes of a policy; ~0.1 s per "
        "step on a small CNN. Measured on ResNet-20 at 10% of the MACs: no better final models than 0",
    )
    budget_mode = forms.ChoiceField(
        choices=[
            ("cap", "cap (AMC: cap each action)"),
            ("repair", "repair (HAQ: lower bits after the episode)"),
        ],
        initial=_SEARCH_DEFAULTS.budget_mode,
    )
    enforce_budget = forms.ChoiceField(
        required=False,
        choices=[("", "auto (on for acc / haq rewards)"), ("true", "always"), ("false", "never")],
        initial="",
    )
    export_formats = forms.MultipleChoiceField(
        choices=[("pt2", ".pt2 (torch.export)"), ("onnx", "ONNX (+ int8 ONNX when <= 8 bits)")],
        initial=list(_SEARCH_DEFAULTS.export_formats),
        widget=forms.CheckboxSelectMultiple,
    )
    agent_config = forms.JSONField(
        required=False, help_text="agent settings as JSON (the API's way; the page uses the fields below)"
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["model"].queryset = visible(UploadedModel, self.user).filter(status="ready")
        self.fields["dataset"].queryset = visible(Dataset, self.user).filter(status="ready")
        self.fields["target"].queryset = visible(Target, self.user)
        agents = catalog.catalog()["agents"]
        self.fields["agent"].choices = [(a["name"], f"{a['name']} — {a['summary']}") for a in agents]
        self.fields["agent"].initial = _SEARCH_DEFAULTS.agent
        self.fields["layout"].choices = [("", "agent default")] + [
            (x, x) for x in catalog.catalog()["layouts"]
        ]
        self.fields["target"].initial = _SEARCH_DEFAULTS.target
        self.agent_fields: dict[str, list[str]] = {}
        for a in agents:
            names = []
            for p in a["params"]:
                fname = agent_field_name(a["name"], p["name"])
                self.fields[fname] = _param_field(p)
                names.append(fname)
            self.agent_fields[a["name"]] = names

    def agent_groups(self) -> list[tuple[dict[str, Any], list[forms.BoundField]]]:
        """(agent info, its bound fields) per agent, for rendering one fieldset per agent."""
        return [(a, [self[f] for f in self.agent_fields[a["name"]]]) for a in catalog.catalog()["agents"]]

    def full_clean(self) -> None:
        # an agent's other name (the CLI's and the README's galen-pq) is the agent itself
        if self.is_bound and hasattr(self.data, "get"):
            agent = self.data.get("agent")
            canonical = catalog.catalog()["aliases"].get(agent) if isinstance(agent, str) else None
            if canonical:
                self.data = self.data.copy()
                self.data["agent"] = canonical
        super().full_clean()

    def clean_dataset(self) -> Dataset | None:
        ds = self.cleaned_data.get("dataset")
        if ds is None:
            ds = Dataset.objects.filter(kind="builtin", name="digits").first()
            if ds is None:
                raise forms.ValidationError("choose a dataset")
        return ds

    def clean(self) -> dict[str, Any]:
        d = super().clean()
        agent = d.get("agent")
        # The page sends every agent's fields (one set is shown); only the chosen agent's count.
        for name, fnames in self.agent_fields.items():
            if name != agent:
                for fname in fnames:
                    self._errors.pop(fname, None)
                    d.pop(fname, None)
        if agent:
            config: dict[str, Any] = dict(d.get("agent_config") or {})
            if not isinstance(d.get("agent_config") or {}, dict):
                self.add_error("agent_config", "agent settings are a JSON object")
                config = {}
            info = catalog.agent_info(agent) or {"params": []}
            for p in info["params"]:
                fname = agent_field_name(agent, p["name"])
                # Only fields the request actually sent count: an API call sends agent_config instead. An
                # unticked checkbox sends nothing, so the page marks that its agent fields were rendered.
                sent = fname in self.data or (p["type"] == "bool" and "agent_fields" in self.data)
                if sent and d.get(fname) not in (None, "") and d.get(fname) != p["default"]:
                    config[p["name"]] = d[fname]
            clean, errors = catalog.coerce_agent_config(agent, config)
            for key, message in errors.items():
                fname = agent_field_name(agent, key)
                self.add_error(
                    fname if fname in self.fields and fname in self.data else "agent_config", message
                )
            d["agent_config"] = clean
            layouts = info.get("layouts") or []
            if layouts == ["bits"] and d.get("objective") in ("macs", "params"):
                self.add_error(
                    "objective",
                    f"{agent} changes bit-widths only, and {d['objective']} do not depend on bits: "
                    "choose bops, bytes or latency",
                )
        target = d.get("target")
        if d.get("objective") == "latency" and target is not None and target.backend == "analytic":
            self.add_error(
                "objective",
                f"target {target.name} computes costs and measures no time: pick a hardware target for a latency "
                "budget, or the macs, bops, params or bytes objective",
            )
        if d.get("reward") == "galen":
            for key in ("beta", "rho"):
                if d.get(key) is None:
                    self.add_error(key, f"the galen reward needs {key}")
        if d.get("min_bits") and d.get("max_bits") and d["min_bits"] > d["max_bits"]:
            self.add_error("max_bits", "max bits must be at least min bits")
        self._check_model_dataset(d.get("model"), d.get("dataset"))
        if not self.errors:
            try:
                SearchConfig.from_dict(self.search_config())
            except Exception as exc:  # the engine's SearchError: show its one-line message
                self.add_error(None, str(exc))
        return d

    def _check_model_dataset(self, model: UploadedModel | None, dataset: Dataset | None) -> None:
        """Refuse the obvious mismatches early (the engine re-checks with ``check_compatible``)."""
        if not model or not dataset or not model.inspection or not dataset.meta:
            return
        m_classes = model.inspection.get("num_classes")
        d_classes = dataset.meta.get("num_classes")
        if m_classes and d_classes and int(d_classes) > int(m_classes):
            self.add_error(
                "dataset", f"{dataset.name} has {d_classes} classes but {model.name} outputs {m_classes}"
            )
        m_shape, d_shape = model.inspection.get("input_shape"), dataset.meta.get("input_shape")
        if m_shape and d_shape and m_shape[0] != d_shape[0] and {m_shape[0], d_shape[0]} != {1, 3}:
            self.add_error(
                "dataset",
                f"{dataset.name} has {d_shape[0]} channels but {model.name} takes {m_shape[0]} (only 1 <-> 3 adapt)",
            )

    def search_config(self) -> dict[str, Any]:
        """The ``SearchConfig`` dict stored with the run (model/dataset/target as the engine spells them)."""
        d = self.cleaned_data
        reward_params: dict[str, Any] = {}
        if d["reward"] == "galen":
            reward_params = {"beta": d["beta"], "rho": d["rho"]}
        cfg = SearchConfig(
            model=d["model"].spec(),
            dataset=d["dataset"].spec(),
            agent=d["agent"],
            target=d["target"].name,
            objective=d["objective"],
            budget=d["budget"],
            reward=d["reward"],
            reward_params=reward_params,
            episodes=d["episodes"],
            seed=d["seed"],
            val_samples=d["val_samples"],
            train_top_up=d.get("train_top_up") != "false",
            calib_samples=d["calib_samples"],
            round_to=d.get("round_to"),
            agent_config=d.get("agent_config") or {},
            layout=d.get("layout") or None,
            min_keep=d["min_keep"],
            min_bits=d["min_bits"],
            max_bits=d["max_bits"],
            float_bits=d.get("float_bits") != "false",
            free_precision=d.get("free_precision") != "false",
            reconstruct=d.get("reconstruct") != "false",
            tune_steps=d["tune_steps"] if d.get("tune_steps") is not None else _SEARCH_DEFAULTS.tune_steps,
            budget_mode=d["budget_mode"],
            enforce_budget={"true": True, "false": False}.get(d.get("enforce_budget") or ""),
            export_formats=tuple(d["export_formats"]),
            top_k=d["top_k"],
            device_check_rounds=(
                _SEARCH_DEFAULTS.device_check_rounds
                if d.get("device_check_rounds") is None
                else d["device_check_rounds"]
            ),
            fine_tune_epochs=d["fine_tune_epochs"],
            fine_tune_augment=bool(d.get("fine_tune_augment")),
            checkpoint_every=d["checkpoint_every"],
        )
        return cfg.to_dict()

    def save(self) -> Run:
        """Create the run (queued) and queue the search."""
        d = self.cleaned_data
        run = Run.objects.create(
            owner=self.user,
            name=d["name"] or f"{d['model'].name} · {d['agent']} · {d['target'].name}",
            model=d["model"],
            dataset=d["dataset"],
            target=d["target"],
            agent=d["agent"],
            config=self.search_config(),
            episodes_total=d["episodes"],
        )
        self.queue("enqueue_run", run)
        return run


def _param_field(p: dict[str, Any]) -> forms.Field:
    """A form field for one agent hyper-parameter from its JSON schema."""
    label = p["name"].replace("_", " ")
    common = {"required": False, "initial": p["default"], "help_text": p.get("help", ""), "label": label}
    kind = p["type"]
    if kind == "bool":
        return forms.BooleanField(**common)
    if kind == "choice":
        return forms.TypedChoiceField(
            choices=[(c, str(c)) for c in p.get("choices", [])], coerce=str, **common
        )
    bounds = {k: p[k] for k in ("min", "max") if k in p}
    limits = {"min_value": bounds.get("min"), "max_value": bounds.get("max")}
    if kind == "int":
        return forms.IntegerField(**limits, **common)
    widget = forms.NumberInput(attrs={"step": "any"})
    return forms.FloatField(widget=widget, **limits, **common)
