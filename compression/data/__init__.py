"""Datasets: the built-in digits, ``.npz`` arrays, the CIFAR-10 python archive and zipped image folders.

``load_dataset(spec)`` turns any of them into deterministic, stratified, disjoint train/val/test splits
of normalised float32 tensors (``DatasetSplits``); ``describe_dataset`` reads only metadata;
``check_compatible`` says whether a dataset can feed a model; ``make_loader`` batches a split
reproducibly. User files are never unpickled with code execution (CIFAR batches go through an
array-only unpickler, ``.npz`` is read with ``allow_pickle=False``) and never extracted to disk.

This package imports numpy, torch, scikit-learn (for the digits) and Pillow (for image folders), and
``compression.errors``; nothing from ``webapp/`` or ``workers/``. See ``docs/datasets.md``.
"""

from compression.data.dataset import (
    BUILTIN,
    Compatibility,
    DatasetSplits,
    check_compatible,
    describe_dataset,
    load_dataset,
    make_loader,
)
from compression.errors import DatasetError

__all__ = [
    "BUILTIN",
    "Compatibility",
    "DatasetError",
    "DatasetSplits",
    "check_compatible",
    "describe_dataset",
    "load_dataset",
    "make_loader",
]
