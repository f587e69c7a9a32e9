"""``.npz`` datasets: arrays ``x`` (N, C, H, W) and ``y`` (N,), optionally a fixed test set.

Accepted layouts (anything else is refused with the keys that were found):
- ``x``, ``y`` and optionally ``class_names``: the test split is drawn from ``x``;
- ``x_train``, ``y_train``, ``x_test``, ``y_test`` and optionally ``class_names``: the test split is
  ``x_test`` as given (the Keras-style layout).

Images must be NCHW with 1 to 4 channels, uint8 (0..255, scaled to 0..1) or float (taken as stored,
NaN and infinity refused). Channels-last arrays are refused with the transpose that fixes them rather
than guessed: a (N, 32, 32, 3) array is unambiguous, but (N, 3, 32, 3) is not, and a wrong guess would
silently train on scrambled images. The file is read with ``allow_pickle=False``: object arrays are refused.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from compression.data.raw import RawDataset, check_labels
from compression.errors import DatasetError

_LAYOUTS = ({"x", "y"}, {"x_train", "y_train", "x_test", "y_test"})
_OPTIONAL = {"class_names"}
_CHUNK = 4096


def _open(path: Path) -> Any:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DatasetError(
            f"{path.name} is not a readable .npz file ({exc})", "save it with numpy.savez"
        ) from None


def _layout(keys: set[str], name: str) -> tuple[str, str, str | None, str | None]:
    for required in _LAYOUTS:
        if required <= keys and not (keys - required - _OPTIONAL):
            if "x" in required:
                return "x", "y", None, None
            return "x_train", "y_train", "x_test", "y_test"
    raise DatasetError(
        f"{name} has arrays {sorted(keys)}; expected x and y (optionally class_names), "
        "or x_train, y_train, x_test and y_test",
        "save it with numpy.savez(path, x=images_nchw, y=labels)",
    )


def _get(npz: Any, key: str, name: str) -> np.ndarray:
    try:
        return npz[key]
    except ValueError as exc:  # object arrays need pickle, which is off
        raise DatasetError(
            f"array {key!r} in {name} cannot be read without unpickling ({exc})",
            "save plain numeric arrays (no dtype=object)",
        ) from None
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise DatasetError(f"array {key!r} in {name} is unreadable ({exc})", "the file is corrupt") from None


def check_image_layout(shape: tuple[int, ...], dtype: np.dtype, what: str) -> None:
    """Refuse image arrays that are not NCHW uint8/float with 1 to 4 channels (before loading the data)."""
    if len(shape) != 4:
        hint = "add the channel axis: x[:, None]" if len(shape) == 3 else "images must be (N, C, H, W)"
        raise DatasetError(f"{what} has shape {shape}; expected (N, C, H, W)", hint)
    n, c, h, w = shape
    if n == 0:
        raise DatasetError(f"{what} holds no samples", "save at least one image per class")
    if not 1 <= c <= 4:
        if 1 <= w <= 4:
            raise DatasetError(
                f"{what} has shape {shape}, which looks channels-last (N, H, W, C)",
                "transpose it before saving: x = np.transpose(x, (0, 3, 1, 2))",
            )
        raise DatasetError(f"{what} has {c} channels; 1 to 4 are supported", "images must be (N, C, H, W)")
    if h < 1 or w < 1:
        raise DatasetError(f"{what} has empty images {shape}", "images must be (N, C, H, W)")
    if dtype != np.uint8 and not np.issubdtype(dtype, np.floating):
        raise DatasetError(
            f"{what} has dtype {dtype}; expected uint8 (0..255) or float",
            "convert it: x.astype(np.float32) or x.astype(np.uint8)",
        )


def _check_finite(x: np.ndarray, what: str) -> None:
    if x.dtype == np.uint8:
        return
    for start in range(0, len(x), _CHUNK):  # chunked so the check never doubles memory
        if not np.isfinite(x[start : start + _CHUNK]).all():
            raise DatasetError(f"{what} contains NaN or infinite values", "clean or drop those samples")


def _class_names(npz: Any, keys: set[str], name: str) -> list[str] | None:
    if "class_names" not in keys:
        return None
    names = _get(npz, "class_names", name)
    if names.ndim != 1 or names.dtype.kind not in "US" or names.size == 0:
        raise DatasetError(
            f"class_names in {name} must be a non-empty 1-D array of strings",
            "save it as np.array(['cat', 'dog', ...])",
        )
    out = [n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in names.tolist()]
    if len(set(out)) != len(out):
        raise DatasetError(f"class_names in {name} has duplicates", "give every class a distinct name")
    return out


def read_npz(path: Path) -> RawDataset:
    """Load and validate an ``.npz`` dataset (see the module docstring for the accepted layouts)."""
    name = path.name
    with _open(path) as npz:
        keys = set(npz.files)
        kx, ky, ktx, kty = _layout(keys, name)
        names = _class_names(npz, keys, name)
        parts = [(kx, ky)] + ([(ktx, kty)] if ktx else [])
        arrays: list[tuple[np.ndarray, np.ndarray]] = []
        for key_x, key_y in parts:
            x = _get(npz, key_x, name)
            check_image_layout(tuple(x.shape), x.dtype, f"{key_x} in {name}")
            _check_finite(x, f"{key_x} in {name}")
            y = check_labels(_get(npz, key_y, name), len(names) if names else None, f"{key_y} in {name}")
            if len(y) != len(x):
                raise DatasetError(
                    f"{name} has {len(x)} images in {key_x} but {len(y)} labels in {key_y}",
                    "save one label per image",
                )
            arrays.append((x, y))
    if len(arrays) == 2 and arrays[0][0].shape[1:] != arrays[1][0].shape[1:]:
        raise DatasetError(
            f"{name}: train images are {arrays[0][0].shape[1:]} but test images are {arrays[1][0].shape[1:]}",
            "save both sets at the same (C, H, W)",
        )
    if len(arrays) == 2 and arrays[0][0].dtype != arrays[1][0].dtype:
        raise DatasetError(
            f"{name}: train images are {arrays[0][0].dtype} but test images are {arrays[1][0].dtype}",
            "save both sets with the same dtype",
        )
    all_y = np.concatenate([y for _, y in arrays])
    num_classes = len(names) if names else int(all_y.max()) + 1
    names = names or [str(i) for i in range(num_classes)]
    warnings = []
    missing = np.flatnonzero(np.bincount(all_y, minlength=num_classes) == 0)
    if missing.size:
        warnings.append(f"classes {missing.tolist()} have no samples")
    x, y = arrays[0]
    test_x, test_y = arrays[1] if len(arrays) == 2 else (None, None)
    scale = 1.0 / 255.0 if x.dtype == np.uint8 else 1.0
    return RawDataset(x, y, names, str(path), "npz", scale, test_x, test_y, warnings)


def _header(npz: Any, key: str) -> tuple[tuple[int, ...], np.dtype] | None:
    """Shape and dtype of one array from its .npy header, without reading the data."""
    try:
        with npz.zip.open(key + ".npy") as fp:
            version = np.lib.format.read_magic(fp)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(fp)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(fp)
            else:
                return None
            return tuple(int(s) for s in shape), dtype
    except (KeyError, ValueError, OSError, zipfile.BadZipFile):
        return None


def describe_npz(path: Path) -> dict[str, Any]:
    """Metadata of an ``.npz`` dataset reading only the labels and the image headers."""
    name = path.name
    with _open(path) as npz:
        keys = set(npz.files)
        kx, ky, ktx, kty = _layout(keys, name)
        names = _class_names(npz, keys, name)
        counts: dict[str, int] = {}
        labels = []
        shape = dtype = None
        for key_x, key_y in [(kx, ky)] + ([(ktx, kty)] if ktx else []):
            header = _header(npz, key_x)
            if header is None:  # unusual .npy version: fall back to loading the array
                arr = _get(npz, key_x, name)
                header = (tuple(arr.shape), arr.dtype)
            check_image_layout(header[0], header[1], f"{key_x} in {name}")
            shape, dtype = header
            y = check_labels(_get(npz, key_y, name), len(names) if names else None, f"{key_y} in {name}")
            if len(y) != header[0][0]:
                raise DatasetError(
                    f"{name} has {header[0][0]} images in {key_x} but {len(y)} labels in {key_y}",
                    "save one label per image",
                )
            counts[key_x] = len(y)
            labels.append(y)
    all_y = np.concatenate(labels)
    num_classes = len(names) if names else int(all_y.max()) + 1
    assert shape is not None
    return {
        "source": str(path),
        "format": "npz",
        "num_samples": int(len(all_y)),
        "num_test_samples": counts.get("x_test"),
        "fixed_test_split": ktx is not None,
        "num_classes": num_classes,
        "class_names": names or [str(i) for i in range(num_classes)],
        "class_counts": np.bincount(all_y, minlength=num_classes).tolist(),
        "input_shape": tuple(shape[1:]),
        "dtype": str(dtype),
    }
