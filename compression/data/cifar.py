"""CIFAR-10, python version: ``cifar-10-python.tar.gz`` or its extracted ``cifar-10-batches-py/`` folder.

Each batch is a Python 2 pickle of ``{b'batch_label', b'labels', b'data', b'filenames'}`` with ``data`` a
``(n, 3072)`` uint8 array (1024 red, 1024 green, 1024 blue values, rows of 32). The pickles are read with
``safe_pickle`` (numpy arrays only, nothing executed) and the archive is read in memory, never extracted.
``data_batch_1`` .. ``data_batch_5`` are the training pool, ``test_batch`` is the fixed test split.
"""

from __future__ import annotations

import tarfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from compression.data.raw import RawDataset, check_labels
from compression.data.safe_pickle import load_array_pickle
from compression.errors import DatasetError

FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META = "batches.meta"
NEEDED = (*TRAIN_BATCHES, TEST_BATCH, META)
# A real batch is 31 MB; the cap stops a crafted archive from making us buffer gigabytes.
MAX_MEMBER_BYTES = 64 * 1024 * 1024
_HINT = "use the CIFAR-10 python version (cifar-10-python.tar.gz) or its extracted cifar-10-batches-py folder"


def is_cifar_dir(path: Path) -> bool:
    """True when ``path`` is ``cifar-10-batches-py`` or a folder that contains it."""
    return (path / META).is_file() or (path / FOLDER / META).is_file()


def _get(d: dict[Any, Any], key: str) -> Any:
    # Python 2 pickles load their str keys as bytes; a re-pickled copy may use str.
    if key.encode() in d:
        return d[key.encode()]
    return d.get(key)


def _members_from_tar(path: Path) -> Iterator[tuple[str, bytes]]:
    try:
        with tarfile.open(path, "r:*") as tar:
            seen: set[str] = set()
            for member in tar:
                parent, _, base = member.name.rstrip("/").rpartition("/")
                if base not in NEEDED or parent not in ("", FOLDER, "./" + FOLDER, "."):
                    continue
                if not member.isfile():
                    raise DatasetError(f"{member.name} in {path.name} is not a regular file", _HINT)
                if base in seen:
                    raise DatasetError(f"{path.name} holds {base} twice", _HINT)
                if member.size > MAX_MEMBER_BYTES:
                    raise DatasetError(
                        f"{member.name} in {path.name} is {member.size} bytes, more than a CIFAR-10 batch",
                        _HINT,
                    )
                seen.add(base)
                f = tar.extractfile(member)
                assert f is not None  # regular file
                data = f.read(MAX_MEMBER_BYTES + 1)
                if len(data) != member.size:
                    raise DatasetError(
                        f"{member.name} in {path.name} is truncated", "download the archive again"
                    )
                yield base, data
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise DatasetError(
            f"{path.name} is truncated or not a valid tar archive ({type(exc).__name__}: {exc})",
            "download the archive again",
        ) from None


def _members_from_dir(path: Path) -> Iterator[tuple[str, bytes]]:
    folder = path if (path / META).is_file() else path / FOLDER
    for base in NEEDED:
        file = folder / base
        if not file.is_file():
            continue
        if file.stat().st_size > MAX_MEMBER_BYTES:
            raise DatasetError(f"{file} is {file.stat().st_size} bytes, more than a CIFAR-10 batch", _HINT)
        yield base, file.read_bytes()


def _parse_batch(obj: Any, what: str, keep_data: bool) -> tuple[np.ndarray | None, np.ndarray]:
    if not isinstance(obj, dict):
        raise DatasetError(f"{what} is not a CIFAR-10 batch (a {type(obj).__name__}, not a dict)", _HINT)
    data, labels = _get(obj, "data"), _get(obj, "labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DatasetError(f"{what}: 'data' must be a uint8 (n, 3072) array, got {desc}", _HINT)
    if isinstance(labels, list) and all(type(v) is int for v in labels):
        y = np.asarray(labels, dtype=np.int64)
    elif isinstance(labels, np.ndarray):
        y = labels
    else:
        raise DatasetError(f"{what}: 'labels' must be a list of ints", _HINT)
    y = check_labels(y, None, f"labels of {what}")
    if len(y) != len(data):
        raise DatasetError(f"{what} has {len(data)} images but {len(y)} labels", _HINT)
    if keep_data:
        # Stored as 3 planes of 32 rows of 32: a reshape is exactly NCHW, no copy.
        return data.reshape(-1, 3, 32, 32), y
    return None, y


def _parse_meta(obj: Any, what: str) -> list[str]:
    names = _get(obj, "label_names") if isinstance(obj, dict) else None
    if not isinstance(names, list) or not names or not all(isinstance(n, bytes | str) for n in names):
        raise DatasetError(f"{what} has no list of label_names", _HINT)
    return [n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names]


def _read(path: Path, keep_data: bool) -> tuple[dict[str, tuple[np.ndarray | None, np.ndarray]], list[str]]:
    members: Callable[[Path], Iterator[tuple[str, bytes]]] = (
        _members_from_dir if path.is_dir() else _members_from_tar
    )
    batches: dict[str, tuple[np.ndarray | None, np.ndarray]] = {}
    names: list[str] | None = None
    # Each member is unpickled as soon as it is read so at most one batch's raw bytes are held.
    for base, data in members(path):
        obj = load_array_pickle(data, f"{base} in {path.name}")
        if base == META:
            names = _parse_meta(obj, f"{base} in {path.name}")
        else:
            batches[base] = _parse_batch(obj, f"{base} in {path.name}", keep_data)
    missing = [b for b in NEEDED if b not in batches and not (b == META and names)]
    if missing:
        raise DatasetError(f"{path.name} is missing {', '.join(missing)}", _HINT)
    assert names is not None
    for base, (_, y) in batches.items():
        if y.size and int(y.max()) >= len(names):
            raise DatasetError(
                f"{base} in {path.name} has label {int(y.max())} but batches.meta names {len(names)} classes",
                _HINT,
            )
    return batches, names


def read_cifar(path: Path) -> RawDataset:
    """Load CIFAR-10 (train pool of 5 batches, fixed test batch) as uint8 NCHW arrays."""
    batches, names = _read(path, keep_data=True)
    train = [batches.pop(b) for b in TRAIN_BATCHES]
    x = np.concatenate([d for d, _ in train if d is not None])
    y = np.concatenate([lab for _, lab in train])
    del train
    test_x, test_y = batches.pop(TEST_BATCH)
    return RawDataset(x, y, names, str(path), "cifar10", 1.0 / 255.0, test_x, test_y)


def describe_cifar(path: Path) -> dict[str, Any]:
    """Metadata of a CIFAR-10 archive or folder (reads the labels; image arrays are dropped as read)."""
    batches, names = _read(path, keep_data=False)
    train_y = np.concatenate([batches[b][1] for b in TRAIN_BATCHES])
    test_y = batches[TEST_BATCH][1]
    all_y = np.concatenate([train_y, test_y])
    return {
        "source": str(path),
        "format": "cifar10",
        "num_samples": int(len(all_y)),
        "num_test_samples": int(len(test_y)),
        "fixed_test_split": True,
        "num_classes": len(names),
        "class_names": names,
        "class_counts": np.bincount(all_y, minlength=len(names)).tolist(),
        "input_shape": (3, 32, 32),
        "dtype": "uint8",
    }
