"""The native form of a dataset, as a reader returns it, before splitting and normalisation."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from compression.errors import DatasetError


@dataclass
class RawDataset:
    """Images and labels exactly as read, plus what is needed to turn them into float tensors.

    x: ``(N, C, H, W)`` array, uint8 or float (kept in the stored dtype so CIFAR-sized data stays at one
        byte per value until the splits are built).
    y: ``(N,)`` int64 labels in ``0 .. len(class_names) - 1``.
    value_scale: multiply ``x`` by this to get the working range (1/255 for uint8 images, 1/16 for the
        digits, 1 for float arrays, which are taken as they are).
    test_x, test_y: a fixed test set shipped with the dataset (CIFAR-10's test batch, an npz with
        ``x_test``); ``None`` when the test split is drawn from ``x``.
    resized: the reader already resized the images (image folders of mixed sizes), so ``x``'s shape is
        the requested one, not a native one.
    """

    x: np.ndarray
    y: np.ndarray
    class_names: list[str]
    source: str
    format: str
    value_scale: float
    test_x: np.ndarray | None = None
    test_y: np.ndarray | None = None
    warnings: list[str] = field(default_factory=list)
    resized: bool = False  # images of mixed sizes were already resized to the requested (H, W)

    @property
    def native_shape(self) -> tuple[int, int, int]:
        """One sample's ``(C, H, W)`` as stored."""
        c, h, w = self.x.shape[1:]
        return int(c), int(h), int(w)

    @property
    def num_classes(self) -> int:
        """Number of classes (labels are ``0 .. num_classes - 1``)."""
        return len(self.class_names)


def check_labels(y: np.ndarray, num_classes: int | None, what: str) -> np.ndarray:
    """Validate a label array and return it as int64.

    Refuses non-integer dtypes (including floats that happen to hold whole numbers: a float label array
    usually means the wrong array was saved), anything not 1-D, negative labels, and labels that are not
    below ``num_classes`` when the class count is known.
    """
    if y.ndim != 1:
        raise DatasetError(
            f"{what} must be a 1-D array of class indices, got shape {tuple(y.shape)}",
            "save one integer label per sample, e.g. y.reshape(-1)",
        )
    if y.dtype == np.bool_ or not np.issubdtype(y.dtype, np.integer):
        raise DatasetError(
            f"{what} must hold integer class indices, got dtype {y.dtype}",
            "save the labels as integers, e.g. y.astype(np.int64)",
        )
    if y.size and int(y.min()) < 0:
        raise DatasetError(
            f"{what} has a negative label ({int(y.min())})",
            "labels must be class indices 0 .. num_classes - 1",
        )
    if num_classes is not None and y.size and int(y.max()) >= num_classes:
        raise DatasetError(
            f"{what} has label {int(y.max())}, out of range for {num_classes} classes",
            "labels must be class indices 0 .. num_classes - 1",
        )
    return y.astype(np.int64, copy=False)
