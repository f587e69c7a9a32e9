"""Deterministic stratified sampling: subsample and train/val/test split by class.

All draws come from one ``numpy.random.Generator`` seeded by the caller, consumed in a fixed order, so
the same labels and seed always give the same indices. Per-class counts are the exact proportional
shares rounded by largest remainder (integer arithmetic, no float ties), so every split's class mix
matches the whole to within one sample per class, and the totals are exactly what was asked for.
"""

from __future__ import annotations

import numpy as np


def allocate(counts: np.ndarray, total: int, rng: np.random.Generator) -> np.ndarray:
    """Share ``total`` out across classes in proportion to ``counts``; never more than a class has.

    Leftover units after flooring go to the classes with the largest remainders; equal remainders are
    ordered by a random draw so no class (e.g. class 0) is systematically favoured.
    """
    counts = np.asarray(counts, dtype=np.int64)
    n = int(counts.sum())
    if total >= n:
        return counts.copy()
    if total <= 0:
        return np.zeros_like(counts)
    quota = counts * total // n
    remainder = counts * total % n
    rest = total - int(quota.sum())
    tie = rng.random(len(counts))
    order = np.lexsort((tie, -remainder))  # last key sorts first: largest remainder, then random
    quota[order[:rest]] += 1
    return quota


def _by_class(y: np.ndarray, num_classes: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Positions of each class in ``y``, each list shuffled."""
    order = np.argsort(y, kind="stable")
    bounds = np.cumsum(np.bincount(y, minlength=num_classes))[:-1]
    return [rng.permutation(group) for group in np.split(order, bounds)]


def subsample(y: np.ndarray, n: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted positions of ``n`` samples of ``y`` keeping the class proportions (all if ``n >= len(y)``)."""
    if n >= len(y):
        return np.arange(len(y))
    groups = _by_class(y, num_classes, rng)
    quota = allocate(np.array([len(g) for g in groups]), n, rng)
    return np.sort(np.concatenate([g[:q] for g, q in zip(groups, quota, strict=True)]))


def split(
    y: np.ndarray, num_classes: int, val_n: int, test_n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Disjoint sorted positions (train, val, test) of ``y`` with ``val_n`` and ``test_n`` samples.

    Test is allocated first over the class counts, val over what each class has left, train is the rest.
    """
    groups = _by_class(y, num_classes, rng)
    counts = np.array([len(g) for g in groups], dtype=np.int64)
    test_q = allocate(counts, test_n, rng)
    val_q = allocate(counts - test_q, val_n, rng)
    train, val, test = [], [], []
    for g, t, v in zip(groups, test_q, val_q, strict=True):
        test.append(g[:t])
        val.append(g[t : t + v])
        train.append(g[t + v :])
    return tuple(np.sort(np.concatenate(parts)).astype(np.int64) for parts in (train, val, test))  # type: ignore[return-value]
