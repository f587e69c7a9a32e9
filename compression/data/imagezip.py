"""A ``.zip`` of an image folder: one folder per class, optionally inside one top-level folder.

    animals.zip
      animals/            (optional single top-level folder)
        cat/001.png       (class "cat"; files may sit in sub-folders of a class folder)
        dog/001.jpg

The archive is read in memory and never extracted. It is refused as a whole when any member name could
escape a target folder (absolute, ``..``, backslashes, drive letters), is a symlink or encrypted, when it
has more than ``MAX_MEMBERS`` entries, or when a member inflates beyond ``MAX_MEMBER_BYTES`` (or all of
them beyond ``MAX_TOTAL_BYTES``): the actual inflated size is enforced while reading, not the size the
header claims. Images are decoded by Pillow, restricted to common formats; any file that does not decode
is refused with its member name. ``__MACOSX/`` entries and hidden files (``.DS_Store``) are skipped, and
so are folders without files. Classes are the folder names, sorted. Alpha channels are dropped; 16-bit
gray images are reduced to 8 bits.
"""

from __future__ import annotations

import io
import re
import stat
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compression.data.raw import RawDataset
from compression.data.transforms import adapt
from compression.errors import DatasetError

MAX_MEMBERS = 200_000
MAX_MEMBER_BYTES = 32 * 1024 * 1024
MAX_TOTAL_BYTES = 4 * 1024 * 1024 * 1024
MAX_IMAGE_PIXELS = 4096 * 4096
FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM")
_GRAY_MODES = {"1", "L", "LA", "La"}
_HINT_LAYOUT = "zip a folder with one sub-folder per class, e.g. cat/001.png, dog/001.png"
_DRIVE = re.compile(r"^[A-Za-z]:")


def _pil() -> Any:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency of the project
        raise DatasetError("reading image folders needs Pillow", "pip install pillow") from None
    return Image


def _check_name(info: zipfile.ZipInfo, zname: str) -> None:
    name = info.filename
    parts = name.split("/")
    if name.startswith("/") or "\\" in name or _DRIVE.match(name) or ".." in parts or "\x00" in name:
        raise DatasetError(
            f"{zname} has member {name!r} whose path escapes the archive; refused",
            "zip the folder with a standard tool, with paths relative to it",
        )
    if stat.S_ISLNK(info.external_attr >> 16):
        raise DatasetError(
            f"{zname} has member {name!r} that is a symbolic link; refused", "zip real files only"
        )
    if info.flag_bits & 0x1:
        raise DatasetError(f"{zname} has encrypted member {name!r}", "zip the images without a password")


def _skipped(parts: list[str]) -> bool:
    return parts[0] == "__MACOSX" or any(p.startswith(".") for p in parts)


def _index(zf: zipfile.ZipFile, zname: str) -> tuple[list[str], list[tuple[int, zipfile.ZipInfo]]]:
    """Validate the archive and return (class names, [(class index, member)]) sorted by class, name."""
    infos = zf.infolist()
    if len(infos) > MAX_MEMBERS:
        raise DatasetError(
            f"{zname} has {len(infos)} entries, more than the {MAX_MEMBERS} allowed",
            "split the dataset or use the .npz format",
        )
    claimed = 0
    files: list[tuple[list[str], zipfile.ZipInfo]] = []
    for info in infos:
        _check_name(info, zname)
        if info.is_dir():
            continue
        if info.file_size > MAX_MEMBER_BYTES:
            raise DatasetError(
                f"{zname}: member {info.filename!r} inflates to {info.file_size} bytes, more than the "
                f"{MAX_MEMBER_BYTES} allowed per image",
                "use smaller images",
            )
        claimed += info.file_size
        parts = info.filename.split("/")
        if not _skipped(parts):
            files.append((parts, info))
    if claimed > MAX_TOTAL_BYTES:
        raise DatasetError(
            f"{zname} inflates to {claimed} bytes, more than the {MAX_TOTAL_BYTES} allowed",
            "split the dataset or use the .npz format",
        )
    if not files:
        raise DatasetError(f"{zname} holds no files", _HINT_LAYOUT)
    firsts = {parts[0] for parts, _ in files}
    if len(firsts) == 1 and all(len(parts) >= 3 for parts, _ in files):
        files = [(parts[1:], info) for parts, info in files]  # strip the single top-level folder
    for parts, info in files:
        if len(parts) < 2:
            raise DatasetError(
                f"{zname}: member {info.filename!r} is not inside a class folder", _HINT_LAYOUT
            )
    class_names = sorted({parts[0] for parts, _ in files})
    if len(class_names) < 2:
        raise DatasetError(
            f"{zname} has a single class folder ({class_names[0]!r}); a classifier needs at least two",
            _HINT_LAYOUT,
        )
    lookup = {c: i for i, c in enumerate(class_names)}
    members = sorted(((lookup[parts[0]], info) for parts, info in files), key=lambda t: (t[0], t[1].filename))
    return class_names, members


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, zname: str) -> bytes:
    try:
        with zf.open(info) as f:
            # Read one byte past the cap: a header that lies about the size is caught by what inflates.
            data = f.read(MAX_MEMBER_BYTES + 1)
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, NotImplementedError, RuntimeError) as exc:
        raise DatasetError(
            f"{zname}: member {info.filename!r} cannot be read ({exc})", "zip it again"
        ) from None
    if len(data) > MAX_MEMBER_BYTES:
        raise DatasetError(
            f"{zname}: member {info.filename!r} inflates beyond the {MAX_MEMBER_BYTES} bytes allowed per image",
            "use smaller images",
        )
    return data


def _open_image(fp: Any, name: str, zname: str) -> Any:
    image_mod = _pil()
    try:
        im = image_mod.open(fp, formats=FORMATS)
    except (
        image_mod.UnidentifiedImageError,
        image_mod.DecompressionBombError,
        OSError,
        SyntaxError,
        ValueError,
    ) as exc:
        raise DatasetError(
            f"{zname}: member {name!r} is not a readable image ({type(exc).__name__})",
            f"keep only {', '.join(FORMATS)} images in the class folders",
        ) from None
    w, h = im.size
    if w * h > MAX_IMAGE_PIXELS:
        raise DatasetError(
            f"{zname}: member {name!r} is {w}x{h} pixels, more than the {MAX_IMAGE_PIXELS} allowed",
            "resize the images before zipping them",
        )
    if im.mode == "F":
        raise DatasetError(f"{zname}: member {name!r} is a 32-bit float image", "save it as 8 or 16-bit")
    return im


def _decode(data: bytes, name: str, zname: str, channels: int | None) -> np.ndarray:
    """One image as uint8 (C, H, W): C is ``channels``, or 1 for gray images and 3 for others."""
    im = _open_image(io.BytesIO(data), name, zname)
    try:
        if im.mode.startswith("I"):  # 16/32-bit gray: Pillow's convert("L") would clip, not rescale
            arr = np.asarray(im).astype(np.float64) / 257.0
            arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)[None]
            if channels == 3:
                arr = np.repeat(arr, 3, axis=0)
        else:
            want = channels or (1 if im.mode in _GRAY_MODES else 3)
            arr = np.asarray(im.convert("L" if want == 1 else "RGB"))
            arr = arr[None] if want == 1 else arr.transpose(2, 0, 1)
    except (OSError, SyntaxError, ValueError, _pil().DecompressionBombError) as exc:
        raise DatasetError(
            f"{zname}: member {name!r} is not a readable image ({type(exc).__name__}: {exc})",
            "re-save the image or remove it from the archive",
        ) from None
    return np.ascontiguousarray(arr)


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise DatasetError(
            f"{path.name} is not a readable zip archive ({exc})", "zip the image folder again"
        ) from None


def read_image_zip(path: Path, input_shape: tuple[int, int, int] | None) -> RawDataset:
    """Decode every image of the archive; with ``input_shape``, convert channels (by Pillow) to its C.

    Images of different sizes need ``input_shape`` (each is then resized on its own to H x W);
    same-sized images stay uint8 at their size and are resized later, with the other formats.
    """
    zname = path.name
    channels = None
    if input_shape is not None:
        channels = int(input_shape[0])
        if channels not in (1, 3):
            raise DatasetError(
                f"image folders are read as gray (1 channel) or RGB (3 channels), not {channels}",
                "use a model that takes 1 or 3 input channels",
            )
    with _open_zip(path) as zf:
        class_names, members = _index(zf, zname)
        images: list[np.ndarray] = []
        total = 0
        for _, info in members:
            data = _read_member(zf, info, zname)
            total += len(data)
            if total > MAX_TOTAL_BYTES:
                raise DatasetError(
                    f"{zname} inflates beyond the {MAX_TOTAL_BYTES} bytes allowed", "split the dataset"
                )
            images.append(_decode(data, info.filename, zname, channels))
    y = np.array([c for c, _ in members], dtype=np.int64)
    if channels is None and len({a.shape[0] for a in images}) > 1:
        # Mixed gray and colour: gray ones become RGB, as Pillow's convert("RGB") would make them.
        images = [np.repeat(a, 3, axis=0) if a.shape[0] == 1 else a for a in images]
    sizes = sorted({a.shape[1:] for a in images})
    if len(sizes) == 1:
        return RawDataset(np.stack(images), y, class_names, str(path), "image-zip", 1.0 / 255.0)
    if input_shape is None:
        raise DatasetError(
            f"{zname} has images of {len(sizes)} different sizes (e.g. {sizes[0]} and {sizes[-1]} as H x W)",
            "give input_shape so every image is resized to it",
        )
    c, h, w = (int(v) for v in input_shape)
    x = np.empty((len(images), images[0].shape[0], h, w), dtype=np.float32)
    for i, a in enumerate(images):
        t = torch.from_numpy(a).to(torch.float32).div_(255.0)[None]
        x[i] = adapt(t, (a.shape[0], h, w))[0].numpy()
    return RawDataset(x, y, class_names, str(path), "image-zip", 1.0, resized=True)


def describe_image_zip(path: Path) -> dict[str, Any]:
    """Metadata of an image-folder zip from the image headers (pixels are not decoded)."""
    zname = path.name
    sizes: set[tuple[int, int]] = set()
    gray = True
    with _open_zip(path) as zf:
        class_names, members = _index(zf, zname)
        for _, info in members:
            try:
                with zf.open(info) as f:
                    im = _open_image(f, info.filename, zname)
                    sizes.add((im.size[1], im.size[0]))
                    gray = gray and (im.mode in _GRAY_MODES or im.mode.startswith("I"))
            except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as exc:
                raise DatasetError(
                    f"{zname}: member {info.filename!r} cannot be read ({exc})", "zip it again"
                ) from None
    y = np.array([c for c, _ in members], dtype=np.int64)
    c = 1 if gray else 3
    return {
        "source": str(path),
        "format": "image-zip",
        "num_samples": len(members),
        "num_test_samples": None,
        "fixed_test_split": False,
        "num_classes": len(class_names),
        "class_names": class_names,
        "class_counts": np.bincount(y, minlength=len(class_names)).tolist(),
        "input_shape": (c, *next(iter(sizes))) if len(sizes) == 1 else None,
        "image_sizes": sorted(sizes)[:20],
        "dtype": "uint8",
    }
