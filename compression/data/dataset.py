"""The public entry points: resolve a dataset spec, split it, normalise it, check it fits a model."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from compression.data import splits as _splits
from compression.data.cifar import describe_cifar, is_cifar_dir, read_cifar
from compression.data.imagezip import describe_image_zip, read_image_zip
from compression.data.npz import describe_npz, read_npz
from compression.data.raw import RawDataset
from compression.data.transforms import build_tensor, channel_stats, check_conversion, normalise_
from compression.errors import DatasetError

BUILTIN = "digits"
_SPEC_HINT = (
    "give 'digits', or the path of a .npz (x, y), a CIFAR-10 python archive (cifar-10-python.tar.gz or "
    "cifar-10-batches-py/), or a .zip of an image folder"
)


@dataclass
class DatasetSplits:
    """A dataset split three ways, as normalised float32 images and int64 labels.

    train, val, test: ``TensorDataset(x, y)`` with x ``(n, C, H, W)`` float32 normalised by the train
        split's per-channel mean and std, y ``(n,)`` int64.
    input_shape: ``(C, H, W)`` of the tensors (the requested shape, or the native one).
    class_names: name of each label index; ``num_classes == len(class_names)``.
    source: the spec it was loaded from (``digits`` or a path).
    mean, std: per-channel statistics used to normalise (computed on train, in the 0..1 value range).
    native_shape: ``(C, H, W)`` as stored (``None`` for image folders of mixed sizes).
    indices: the sample positions of each split in the source (for a fixed test split such as
        CIFAR-10's, ``test`` indexes the test set and ``train``/``val`` the training pool).
    warnings: things the user should know that did not prevent loading.
    """

    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    num_classes: int
    input_shape: tuple[int, int, int]
    class_names: list[str]
    source: str
    mean: list[float]
    std: list[float]
    native_shape: tuple[int, int, int] | None = None
    seed: int = 0
    indices: dict[str, np.ndarray] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """JSON-ready description: sizes, class counts per split, shapes and normalisation."""
        return {
            "source": self.source,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "input_shape": list(self.input_shape),
            "native_shape": list(self.native_shape) if self.native_shape else None,
            "seed": self.seed,
            "sizes": {name: len(ds) for name, ds in self._named()},
            "class_counts": {
                name: torch.bincount(ds.tensors[1], minlength=self.num_classes).tolist()
                for name, ds in self._named()
            },
            "mean": list(self.mean),
            "std": list(self.std),
            "warnings": list(self.warnings),
        }

    def _named(self) -> list[tuple[str, TensorDataset]]:
        return [("train", self.train), ("val", self.val), ("test", self.test)]


@dataclass
class Compatibility:
    """Outcome of ``check_compatible`` when the dataset can be used with the model.

    needs_adaptation: the images must be loaded with ``input_shape=model_input_shape`` (resize and/or
        gray<->RGB conversion) to feed the model.
    warnings: accepted mismatches the user should see (fewer classes than outputs, resizing).
    """

    dataset_shape: tuple[int, int, int] | None
    model_input_shape: tuple[int, int, int]
    dataset_classes: int
    model_classes: int
    needs_adaptation: bool
    warnings: list[str] = field(default_factory=list)


def _resolve(spec: str) -> tuple[str, Path | None]:
    """Map a spec to (kind, path); kinds: digits, npz, cifar10, image-zip."""
    if not isinstance(spec, str) or not spec.strip():
        raise DatasetError(f"dataset spec must be a non-empty string, got {spec!r}", _SPEC_HINT)
    if spec == BUILTIN:
        return "digits", None
    path = Path(spec).expanduser()
    if not path.exists():
        raise DatasetError(f"dataset {spec!r} does not exist", _SPEC_HINT)
    if path.is_dir():
        if is_cifar_dir(path):
            return "cifar10", path
        raise DatasetError(
            f"folder {spec!r} is not a CIFAR-10 batches folder (no batches.meta in it)",
            "zip image folders and give the .zip; " + _SPEC_HINT,
        )
    name = path.name.lower()
    if name.endswith(".npz"):
        return "npz", path
    if name.endswith((".tar.gz", ".tgz", ".tar")):
        return "cifar10", path
    if name.endswith(".zip"):
        return "image-zip", path
    raise DatasetError(f"dataset {path.name!r} has an unsupported extension", _SPEC_HINT)


def _read_digits() -> RawDataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # The pixels are counts 0..16 (an 8x8 grid of 4x4 blocks of a 32x32 bitmap): exact in uint8.
    x = bunch.images.astype(np.uint8)[:, None]
    y = bunch.target.astype(np.int64)
    return RawDataset(x, y, [str(c) for c in bunch.target_names], BUILTIN, "digits", 1.0 / 16.0)


def _read(spec: str, input_shape: tuple[int, int, int] | None) -> RawDataset:
    kind, path = _resolve(spec)
    if kind == "digits":
        return _read_digits()
    assert path is not None
    if kind == "npz":
        return read_npz(path)
    if kind == "cifar10":
        return read_cifar(path)
    return read_image_zip(path, input_shape)


def _round(v: float) -> int:
    return int(math.floor(v + 0.5))  # half up: Python's round() sends 0.5 to 0


def _check_args(
    input_shape: Any, val_fraction: float, test_fraction: float, max_samples: int | None
) -> tuple[int, int, int] | None:
    for label, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not isinstance(frac, int | float) or not 0.0 <= frac < 1.0:
            raise DatasetError(
                f"{label} must be in [0, 1), got {frac!r}", "e.g. val_fraction=0.1, test_fraction=0.2"
            )
    if val_fraction + test_fraction >= 1.0:
        raise DatasetError(
            f"val_fraction + test_fraction is {val_fraction + test_fraction:g}, nothing is left to train on",
            "keep their sum below 1",
        )
    if max_samples is not None and (
        isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1
    ):
        raise DatasetError(
            f"max_samples must be a positive integer or None, got {max_samples!r}", "e.g. max_samples=2000"
        )
    if input_shape is None:
        return None
    try:
        shape = tuple(int(v) for v in input_shape)
        ok = len(shape) == 3 and all(v >= 1 for v in shape) and all(float(v) == int(v) for v in input_shape)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise DatasetError(
            f"input_shape must be three positive integers (C, H, W), got {input_shape!r}",
            "e.g. input_shape=(3, 32, 32)",
        )
    return shape  # type: ignore[return-value]


def _check_normalization(
    normalization: tuple[Sequence[float], Sequence[float]] | None, channels: int
) -> tuple[list[float], list[float]] | None:
    if normalization is None:
        return None
    try:
        mean, std = ([float(v) for v in part] for part in normalization)
    except (TypeError, ValueError):
        mean = std = []
    if len(mean) != channels or len(std) != channels or not all(s > 0 and math.isfinite(s) for s in std):
        raise DatasetError(
            f"normalization must be (mean, std) with {channels} values each and std > 0, got {normalization!r}",
            "pass the mean and std the model was trained with, or None to compute them on train",
        )
    return mean, std


def load_dataset(
    spec: str,
    *,
    input_shape: tuple[int, int, int] | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    max_samples: int | None = None,
    normalization: tuple[Sequence[float], Sequence[float]] | None = None,
) -> DatasetSplits:
    """Load a dataset and return deterministic, stratified, disjoint, normalised train/val/test splits.

    spec: ``digits`` (built in), or the path of a ``.npz``, a CIFAR-10 python archive or folder, or a
        ``.zip`` of an image folder.
    input_shape: ``(C, H, W)`` to adapt the images to (bilinear resize; gray -> RGB by replication,
        RGB -> gray by luminance); ``None`` keeps the native shape.
    seed: drives subsampling and splitting; the same seed gives the same splits.
    val_fraction, test_fraction: shares of the (subsampled) samples. For datasets with a fixed test
        set (CIFAR-10's test batch, an npz with ``x_test``) the test split is that set, ``test_fraction``
        is not used, and ``val_fraction`` is a share of the training pool.
    max_samples: cap on the total number of samples, drawn stratified by class; with a fixed test set
        the cap is shared between the training pool and the test set in proportion to their sizes.
    normalization: ``(mean, std)`` per channel to use instead of the train statistics (to feed a model
        exactly what it was trained on); values are in the 0..1 range of the scaled images.

    Raises ``DatasetError`` for anything wrong with the spec, the file or the arguments.
    """
    shape_req = _check_args(input_shape, val_fraction, test_fraction, max_samples)
    raw = _read(spec, shape_req)
    native = raw.native_shape
    shape = shape_req or native
    check_conversion(native, shape, raw.source)
    stats = _check_normalization(normalization, shape[0])
    k = raw.num_classes
    rng = np.random.default_rng(seed)
    warnings = list(raw.warnings)

    test_x = raw.x
    if raw.test_x is None:
        pool = np.arange(len(raw.y)) if max_samples is None else _splits.subsample(raw.y, max_samples, k, rng)
        n = len(pool)
        tr, va, te = _splits.split(raw.y[pool], k, _round(val_fraction * n), _round(test_fraction * n), rng)
        idx = {"train": pool[tr], "val": pool[va], "test": pool[te]}
        test_y = raw.y
    else:
        assert raw.test_y is not None
        n_tr, n_te = len(raw.y), len(raw.test_y)
        cap_tr, cap_te = n_tr, n_te
        if max_samples is not None and max_samples < n_tr + n_te:
            cap_tr = _round(max_samples * n_tr / (n_tr + n_te))
            cap_te = max_samples - cap_tr
        pool = _splits.subsample(raw.y, cap_tr, k, rng)
        tr, va, _ = _splits.split(raw.y[pool], k, _round(val_fraction * len(pool)), 0, rng)
        idx = {"train": pool[tr], "val": pool[va], "test": _splits.subsample(raw.test_y, cap_te, k, rng)}
        test_x, test_y = raw.test_x, raw.test_y
        warnings.append(
            f"the test split is the dataset's own test set ({n_te} samples); test_fraction is not used"
        )
    if len(idx["train"]) == 0:
        raise DatasetError(
            f"the train split of {raw.source} is empty",
            "raise max_samples or lower val_fraction/test_fraction",
        )
    absent = np.flatnonzero(np.bincount(raw.y[idx["train"]], minlength=k) == 0)
    if absent.size:
        warnings.append(f"classes {[raw.class_names[i] for i in absent]} have no training samples")

    # Train first: its statistics normalise all three splits.
    x_train = build_tensor(raw.x, idx["train"], raw.value_scale, shape)
    mean, std = stats or channel_stats(x_train)
    normalise_(x_train, mean, std)
    x_val = normalise_(build_tensor(raw.x, idx["val"], raw.value_scale, shape), mean, std)
    x_test = normalise_(build_tensor(test_x, idx["test"], raw.value_scale, shape), mean, std)

    def labels(y: np.ndarray, positions: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(y[positions].astype(np.int64))

    return DatasetSplits(
        train=TensorDataset(x_train, labels(raw.y, idx["train"])),
        val=TensorDataset(x_val, labels(raw.y, idx["val"])),
        test=TensorDataset(x_test, labels(test_y, idx["test"])),
        num_classes=k,
        input_shape=tuple(int(v) for v in shape),  # type: ignore[arg-type]
        class_names=list(raw.class_names),
        source=raw.source,
        mean=[float(v) for v in mean],
        std=[float(v) for v in std],
        native_shape=None if raw.resized else native,
        seed=seed,
        indices=idx,
        warnings=warnings,
    )


def describe_dataset(spec: str) -> dict[str, Any]:
    """Cheap metadata of a dataset without building tensors.

    Returns a JSON-ready dict with ``source``, ``format``, ``num_samples`` (all samples, test set
    included), ``num_test_samples`` and ``fixed_test_split`` (for datasets shipping a test set),
    ``num_classes``, ``class_names``, ``class_counts``, ``input_shape`` (native ``(C, H, W)``, ``None``
    for image folders of mixed sizes) and ``dtype``. Validates the file as far as the metadata goes; a
    file that describes fine can still be refused by ``load_dataset`` for its pixel values (NaN, an
    image that does not decode past its header).
    """
    kind, path = _resolve(spec)
    if kind == "digits":
        raw = _read_digits()
        return {
            "source": BUILTIN,
            "format": "digits",
            "num_samples": int(len(raw.y)),
            "num_test_samples": None,
            "fixed_test_split": False,
            "num_classes": raw.num_classes,
            "class_names": raw.class_names,
            "class_counts": np.bincount(raw.y, minlength=raw.num_classes).tolist(),
            "input_shape": raw.native_shape,
            "dtype": "uint8",
        }
    assert path is not None
    if kind == "npz":
        return describe_npz(path)
    if kind == "cifar10":
        return describe_cifar(path)
    return describe_image_zip(path)


def check_compatible(
    splits_or_meta: DatasetSplits | dict[str, Any],
    *,
    model_input_shape: tuple[int, int, int],
    model_num_classes: int,
) -> Compatibility:
    """Check that a dataset (loaded splits, or ``describe_dataset`` metadata) can feed a model.

    Refused with ``DatasetError``: more classes than the model outputs; channels that cannot be
    adapted (only 1 <-> 3 can); for loaded splits, any shape other than the model's (they must be
    loaded with ``input_shape=model_input_shape``). Accepted with a warning: fewer classes than the
    model outputs (the extra outputs are never a target); resizing.
    """
    model_shape = tuple(int(v) for v in model_input_shape)
    if len(model_shape) != 3 or min(model_shape) < 1 or int(model_num_classes) < 1:
        raise DatasetError(
            f"model input shape {model_input_shape!r} / classes {model_num_classes!r} are invalid",
            "the model must take (C, H, W) and output at least one class",
        )
    if isinstance(splits_or_meta, DatasetSplits):
        k, shape, loaded = splits_or_meta.num_classes, splits_or_meta.input_shape, True
    elif isinstance(splits_or_meta, dict) and "num_classes" in splits_or_meta:
        k, loaded = int(splits_or_meta["num_classes"]), False
        shape = splits_or_meta.get("input_shape")
        shape = tuple(int(v) for v in shape) if shape is not None else None
    else:
        raise TypeError("check_compatible takes DatasetSplits or the dict from describe_dataset")
    m = int(model_num_classes)
    if k > m:
        raise DatasetError(
            f"dataset has {k} classes but the model outputs {m}",
            f"train a model for {k} classes, or pick a dataset that matches",
        )
    warnings = []
    if k < m:
        warnings.append(
            f"dataset has {k} classes but the model outputs {m}: outputs {k}..{m - 1} are never a target"
        )
    src_c = shape[0] if shape is not None else None
    dst_c = model_shape[0]
    if src_c is None and dst_c not in (1, 3):
        raise DatasetError(
            f"the model takes {dst_c}-channel input but image folders are read as gray or RGB",
            "use a model that takes 1 or 3 input channels",
        )
    if src_c is not None and src_c != dst_c and (src_c, dst_c) not in ((1, 3), (3, 1)):
        raise DatasetError(
            f"dataset has {src_c}-channel images but the model takes {dst_c} channels; only gray <-> RGB can be adapted",
            f"use a model that takes {src_c}-channel input, or convert the images before uploading",
        )
    needs = shape != model_shape
    if loaded and needs:
        raise DatasetError(
            f"the dataset was loaded as {shape} but the model takes {model_shape}",
            f"load it with input_shape={model_shape}",
        )
    if shape is not None and needs:
        if src_c != dst_c:
            warnings.append(f"images are converted from {src_c} to {dst_c} channels")
        if shape[1:] != model_shape[1:]:
            warnings.append(
                f"images are resized from {shape[1]}x{shape[2]} to {model_shape[1]}x{model_shape[2]} (bilinear)"
            )
    elif shape is None:
        warnings.append(
            f"images of mixed sizes are each resized to {model_shape[1]}x{model_shape[2]} (bilinear)"
        )
    return Compatibility(shape, model_shape, k, m, needs, warnings)  # type: ignore[arg-type]


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    """A single-process ``DataLoader`` whose shuffling order depends only on ``seed``.

    The generator is seeded once here, so iterating the loader again gives the next epoch's order
    (different from the first, identical across runs with the same seed).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DatasetError(
            f"batch_size must be a positive integer, got {batch_size!r}", "e.g. batch_size=128"
        )
    generator = torch.Generator().manual_seed(int(seed))
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=0)
