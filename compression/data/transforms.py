"""From stored images to normalised float tensors: scale, channel conversion, resize, statistics.

Everything works in chunks of ``CHUNK`` images written into one preallocated float32 tensor, so building
a split never holds more than the result plus one chunk (CIFAR-10's 50,000 training images: 614 MB of
float32 plus a few MB, while the source stays uint8 at 154 MB).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from compression.errors import DatasetError

CHUNK = 2048
# ITU-R BT.601 luma, the weights Pillow uses for "L", so a zip converted by Pillow and an array converted
# here give the same gray image.
LUMA = (0.299, 0.587, 0.114)


def check_conversion(native: tuple[int, int, int], wanted: tuple[int, int, int], what: str) -> None:
    """Refuse a target shape the images cannot be adapted to (channels other than 1<->3, bad sizes)."""
    if len(wanted) != 3 or not all(isinstance(v, int | np.integer) and v >= 1 for v in wanted):
        raise DatasetError(
            f"input_shape must be three positive integers (C, H, W), got {wanted!r}",
            "e.g. input_shape=(3, 32, 32)",
        )
    src, dst = native[0], wanted[0]
    if src != dst and (src, dst) not in ((1, 3), (3, 1)):
        raise DatasetError(
            f"{what} has {src}-channel images and {dst} channels are asked for; only gray -> RGB "
            "(replicate) and RGB -> gray (luminance) are converted",
            f"use a model that takes {src}-channel input, or convert the images before uploading",
        )


def adapt(x: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """Convert a float batch ``(N, C, H, W)`` to ``shape``: channels (1<->3) then bilinear resize.

    Downscaling uses antialiased bilinear interpolation (plain bilinear would alias: it samples 4 of
    the 16 pixels a 4x reduction covers); for upscaling the two are the same.
    """
    c, h, w = shape
    if x.shape[1] == 3 and c == 1:  # before the resize: fewer values to interpolate
        weights = torch.tensor(LUMA, dtype=x.dtype).view(1, 3, 1, 1)
        x = (x * weights).sum(dim=1, keepdim=True)
    if tuple(x.shape[2:]) != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    if x.shape[1] == 1 and c == 3:
        x = x.expand(-1, 3, -1, -1)
    return x


def build_tensor(
    x: np.ndarray, indices: np.ndarray, value_scale: float, shape: tuple[int, int, int]
) -> torch.Tensor:
    """Gather ``x[indices]``, scale to float32 and adapt to ``shape``, chunk by chunk (not normalised)."""
    out = torch.empty((len(indices), *shape), dtype=torch.float32)
    for start in range(0, len(indices), CHUNK):
        idx = indices[start : start + CHUNK]
        chunk = torch.from_numpy(np.ascontiguousarray(x[idx])).to(torch.float32)
        if value_scale != 1.0:
            chunk.mul_(value_scale)
        out[start : start + len(idx)] = adapt(chunk, shape)
    return out


def channel_stats(x: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) standard deviation of ``(N, C, H, W)`` float32 images.

    Two passes (mean, then squared deviations) so values far from zero do not lose the variance to
    cancellation; each chunk is summed in float32 (torch sums pairwise) and the chunk sums are added
    in float64, which is as accurate here as a float64 copy and 2.5x faster. A channel with zero spread
    gets std 1 so normalising it leaves zeros instead of dividing by zero.
    """
    if len(x) == 0:
        raise DatasetError("the train split is empty", "use more samples or smaller val/test fractions")
    c = x.shape[1]
    count = x.shape[0] * x.shape[2] * x.shape[3]
    total = torch.zeros(c, dtype=torch.float64)
    for start in range(0, len(x), CHUNK):
        total += x[start : start + CHUNK].sum(dim=(0, 2, 3)).to(torch.float64)
    mean = total / count
    centre = mean.to(torch.float32).view(1, c, 1, 1)
    total_sq = torch.zeros(c, dtype=torch.float64)
    for start in range(0, len(x), CHUNK):
        d = x[start : start + CHUNK] - centre
        total_sq += (d * d).sum(dim=(0, 2, 3)).to(torch.float64)
    std = (total_sq / count).sqrt()
    std[std < 1e-8] = 1.0
    return mean.tolist(), std.tolist()


def normalise_(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """In place ``(x - mean) / std`` per channel; returns ``x``."""
    m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    for start in range(0, len(x), CHUNK):
        x[start : start + CHUNK].sub_(m).div_(s)
    return x
