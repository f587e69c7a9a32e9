"""Tests for the datasets package (compression/data/).

CIFAR-10 cannot be downloaded here, so a small archive is written in the exact format of the original:
Python 2 pickles (protocol 2, byte strings as BINSTRING, numpy arrays referenced as
``numpy.core.multiarray._reconstruct``), the same keys and dtypes, data_batch_1..5, test_batch and
batches.meta inside ``cifar-10-batches-py/``.
"""

from __future__ import annotations

import io
import os
import pickle
import stat
import struct
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from compression.data import (
    DatasetError,
    DatasetSplits,
    check_compatible,
    describe_dataset,
    imagezip,
    load_dataset,
    make_loader,
)
from compression.data import cifar as cifar_mod
from compression.data.safe_pickle import load_array_pickle
from compression.data.splits import allocate

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct

CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
IDENTITY1 = ((0.0,), (1.0,))
IDENTITY3 = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


# ----------------------------------------------------------------------------------------------- helpers


class _Py2Pickler(pickle._Pickler):  # the pure-Python pickler lets us choose opcodes
    """Writes what Python 2's cPickle wrote for CIFAR: every str/bytes as a BINSTRING, numpy 1 globals."""

    dispatch = pickle._Pickler.dispatch.copy()
    _GLOBALS = {
        id(_reconstruct): (b"numpy.core.multiarray", b"_reconstruct"),
        id(np.ndarray): (b"numpy", b"ndarray"),
        id(np.dtype): (b"numpy", b"dtype"),
    }

    def save_py2_str(self, obj: bytes | str) -> None:
        data = obj.encode("latin-1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str

    def save_global(self, obj: object, name: str | None = None) -> None:
        module, qual = self._GLOBALS[id(obj)]
        self.write(pickle.GLOBAL + module + b"\n" + qual + b"\n")
        self.memoize(obj)


def py2_dumps(obj: object) -> bytes:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def cifar_batches(per_class_train: int = 3, per_class_test: int = 2, seed: int = 0) -> dict[str, bytes]:
    """The pickled members of a small CIFAR-10: each train batch holds ``per_class_train`` per class."""
    rng = np.random.default_rng(seed)
    out: dict[str, bytes] = {}
    for name, per_class in [(f"data_batch_{i}", per_class_train) for i in range(1, 6)] + [
        ("test_batch", per_class_test)
    ]:
        labels = [c for c in range(10) for _ in range(per_class)]
        rng.shuffle(labels)
        data = rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
        batch = {
            b"batch_label": f"{name} of fake".encode(),
            b"labels": [int(v) for v in labels],
            b"data": data,
            b"filenames": [f"img_{name}_{i}.png".encode() for i in range(len(labels))],
        }
        out[name] = py2_dumps(batch)
    meta = {b"num_cases_per_batch": per_class_train * 10, b"label_names": [n.encode() for n in CIFAR_NAMES]}
    out["batches.meta"] = py2_dumps({**meta, b"num_vis": 3072})
    return out


def write_cifar_dir(root: Path, members: dict[str, bytes]) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name, data in members.items():
        (folder / name).write_bytes(data)
    return folder


def write_cifar_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        readme = b"<html>fake</html>"
        info = tarfile.TarInfo("cifar-10-batches-py/readme.html")
        info.size = len(readme)
        tar.addfile(info, io.BytesIO(readme))
    return path


def png_bytes(color: tuple[int, ...] | int, size: tuple[int, int] = (12, 10), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def write_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


COLORS = {"cat": (255, 0, 0), "dog": (0, 255, 0), "fox": (0, 0, 255)}


def folder_zip(path: Path, per_class: int = 5, top: str = "animals/") -> Path:
    members = {}
    for cls, color in COLORS.items():
        for i in range(per_class):
            members[f"{top}{cls}/{i:03d}.png"] = png_bytes(color)
    members["__MACOSX/._junk"] = b"resource fork"
    members[f"{top}.DS_Store"] = b"finder"
    return write_zip(path, members)


def malicious_pickle(marker: Path) -> bytes:
    class Payload:
        def __reduce__(self) -> tuple:
            return (exec, (f"open({str(marker)!r}, 'w').write('pwned')",))

    # protocol 4 writes bytes natively, so the first global the unpickler meets is the payload's
    return pickle.dumps({b"data": Payload(), b"labels": [0]}, protocol=4)


# ---------------------------------------------------------------------------------------------- digits


def test_digits_loads_normalised_and_complete() -> None:
    s = load_dataset("digits")
    assert isinstance(s, DatasetSplits)
    assert s.num_classes == 10 and s.input_shape == (1, 8, 8) and s.class_names == [str(i) for i in range(10)]
    sizes = [len(s.train), len(s.val), len(s.test)]
    assert sum(sizes) == 1797 and sizes == [1258, 180, 359]
    x, y = s.train.tensors
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (1258, 1, 8, 8)
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1.0) < 1e-3  # normalised on train
    assert float(s.val.tensors[0].mean()) != pytest.approx(0.0, abs=1e-6)  # val is not normalised by itself
    # the original pixel values come back through mean/std: digits are counts 0..16 scaled to 0..1
    raw = (x * s.std[0] + s.mean[0]) * 16
    assert torch.allclose(raw, raw.round(), atol=1e-4) and raw.min() >= -1e-4 and raw.max() <= 16 + 1e-4


def test_splits_disjoint_deterministic_and_seed_dependent() -> None:
    a, b, c = load_dataset("digits", seed=0), load_dataset("digits", seed=0), load_dataset("digits", seed=1)
    parts = [set(a.indices[k].tolist()) for k in ("train", "val", "test")]
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    assert set().union(*parts) == set(range(1797))
    for k in ("train", "val", "test"):
        assert np.array_equal(a.indices[k], b.indices[k])
        assert not np.array_equal(a.indices[k], c.indices[k])
    assert torch.equal(a.test.tensors[0], b.test.tensors[0]) and torch.equal(
        a.train.tensors[1], b.train.tensors[1]
    )
    assert a.mean != c.mean  # statistics come from the train split, which changed


def test_splits_are_stratified() -> None:
    from sklearn.datasets import load_digits

    counts = np.bincount(load_digits().target)
    s = load_dataset("digits", val_fraction=0.15, test_fraction=0.25, seed=3)
    for ds, frac in ((s.val, 0.15), (s.test, 0.25)):
        got = torch.bincount(ds.tensors[1], minlength=10).numpy()
        assert np.all(np.abs(got - counts * frac) <= 1.0), got
    assert len(s.val) == round(0.15 * 1797) and len(s.test) == round(0.25 * 1797)


def test_max_samples_is_stratified_and_deterministic() -> None:
    s = load_dataset("digits", max_samples=200, seed=5)
    assert len(s.train) + len(s.val) + len(s.test) == 200
    all_y = torch.cat([s.train.tensors[1], s.val.tensors[1], s.test.tensors[1]])
    from sklearn.datasets import load_digits

    share = np.bincount(load_digits().target) * 200 / 1797
    assert np.all(np.abs(torch.bincount(all_y, minlength=10).numpy() - share) < 1.0)
    s2 = load_dataset("digits", max_samples=200, seed=5)
    assert np.array_equal(s.indices["train"], s2.indices["train"])


def test_allocate_largest_remainder_is_exact() -> None:
    rng = np.random.default_rng(0)
    q = allocate(np.array([5, 5, 5, 1]), 3, rng)
    assert q.sum() == 3 and np.all(q <= [5, 5, 5, 1]) and q[3] == 0
    assert allocate(np.array([3, 4]), 10, rng).tolist() == [3, 4]


def test_adapt_to_rgb_32() -> None:
    s = load_dataset("digits", input_shape=(3, 32, 32), max_samples=300)
    x = s.train.tensors[0]
    assert x.shape[1:] == (3, 32, 32) and s.input_shape == (3, 32, 32) and s.native_shape == (1, 8, 8)
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])  # gray replicated
    assert len(s.mean) == 3


def test_adapt_to_gray_16_matches_bilinear_resize() -> None:
    native = load_dataset("digits", max_samples=300, normalization=IDENTITY1)
    small = load_dataset("digits", input_shape=(1, 16, 16), max_samples=300, normalization=IDENTITY1)
    assert small.train.tensors[0].shape[1:] == (1, 16, 16)
    expected = torch.nn.functional.interpolate(native.train.tensors[0], size=(16, 16), mode="bilinear")
    assert torch.allclose(small.train.tensors[0], expected, atol=1e-6)
    assert torch.equal(native.train.tensors[1], small.train.tensors[1])


def test_bad_arguments_refused() -> None:
    with pytest.raises(DatasetError, match="val_fraction"):
        load_dataset("digits", val_fraction=1.5)
    with pytest.raises(DatasetError, match="nothing is left"):
        load_dataset("digits", val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(DatasetError, match="input_shape"):
        load_dataset("digits", input_shape=(3, 32))
    with pytest.raises(DatasetError, match="max_samples"):
        load_dataset("digits", max_samples=0)
    with pytest.raises(DatasetError, match="normalization"):
        load_dataset("digits", normalization=((0.5, 0.5), (1.0, 1.0)))
    with pytest.raises(DatasetError, match="only gray -> RGB"):
        load_dataset("digits", input_shape=(2, 8, 8))


# ------------------------------------------------------------------------------------------------- npz


def test_npz_uint8_loads_with_class_names(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(60, 3, 6, 6), dtype=np.uint8)
    y = np.repeat(np.arange(3), 20)
    path = tmp_path / "d.npz"
    np.savez(path, x=x, y=y, class_names=np.array(["a", "b", "c"]))
    s = load_dataset(str(path), normalization=IDENTITY3, val_fraction=0.2, test_fraction=0.2)
    assert s.class_names == ["a", "b", "c"] and s.input_shape == (3, 6, 6)
    assert [len(s.train), len(s.val), len(s.test)] == [36, 12, 12]
    i = s.indices["test"][0]
    assert torch.allclose(s.test.tensors[0][0], torch.from_numpy(x[i]).float() / 255)
    meta = describe_dataset(str(path))
    assert (
        meta["num_samples"] == 60
        and meta["input_shape"] == (3, 6, 6)
        and meta["class_counts"] == [20, 20, 20]
    )


def test_npz_rgb_to_gray_uses_luminance(tmp_path: Path) -> None:
    x = np.zeros((20, 3, 4, 4), dtype=np.float32)
    x[:, 0], x[:, 1], x[:, 2] = 0.2, 0.6, 1.0
    path = tmp_path / "rgb.npz"
    np.savez(path, x=x, y=np.arange(20) % 2)
    s = load_dataset(str(path), input_shape=(1, 4, 4), normalization=IDENTITY1)
    assert torch.allclose(
        s.train.tensors[0], torch.full_like(s.train.tensors[0], 0.299 * 0.2 + 0.587 * 0.6 + 0.114)
    )


def test_npz_fixed_test_layout(tmp_path: Path) -> None:
    path = tmp_path / "k.npz"
    xt = np.random.default_rng(1).random((10, 1, 5, 5)).astype(np.float32)
    np.savez(
        path,
        x_train=np.zeros((40, 1, 5, 5), np.float32),
        y_train=np.arange(40) % 4,
        x_test=xt,
        y_test=np.arange(10) % 4,
    )
    s = load_dataset(str(path), normalization=IDENTITY1, val_fraction=0.25)
    assert len(s.test) == 10 and len(s.val) == 10 and len(s.train) == 30
    assert torch.allclose(s.test.tensors[0], torch.from_numpy(xt))
    assert describe_dataset(str(path))["fixed_test_split"] is True
    assert any("test_fraction is not used" in w for w in s.warnings)


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"images": np.zeros((4, 1, 4, 4)), "labels": np.zeros(4, int)}, "expected x and y"),
        ({"x": np.zeros((4, 1, 4, 4)), "y": np.zeros(4, int), "extra": np.zeros(1)}, "expected x and y"),
        (
            {"x": np.zeros((4, 8, 8, 3), np.uint8), "y": np.zeros(4, int)},
            r"np\.transpose\(x, \(0, 3, 1, 2\)\)",
        ),
        ({"x": np.zeros((4, 8, 8)), "y": np.zeros(4, int)}, r"x\[:, None\]"),
        ({"x": np.full((4, 1, 4, 4), np.nan), "y": np.zeros(4, int)}, "NaN"),
        ({"x": np.zeros((4, 1, 4, 4)), "y": np.array([0.0, 1.0, 1.0, 0.0])}, "integer class indices"),
        ({"x": np.zeros((4, 1, 4, 4)), "y": np.array([0, 1, -1, 0])}, "negative label"),
        (
            {"x": np.zeros((4, 1, 4, 4)), "y": np.array([0, 1, 2, 0]), "class_names": np.array(["a", "b"])},
            "out of range for 2 classes",
        ),
        ({"x": np.zeros((4, 1, 4, 4)), "y": np.zeros(3, int)}, "4 images in x but 3 labels"),
        ({"x": np.zeros((4, 1, 4, 4), np.int32), "y": np.zeros(4, int)}, "uint8"),
        ({"x": np.empty((4, 1, 4, 4), dtype=object), "y": np.zeros(4, int)}, "without unpickling"),
    ],
)
def test_npz_bad_files_refused(tmp_path: Path, arrays: dict, match: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DatasetError, match=match):
        load_dataset(str(path))


def test_npz_not_a_zip_refused(tmp_path: Path) -> None:
    path = tmp_path / "junk.npz"
    path.write_bytes(b"not an npz at all")
    with pytest.raises(DatasetError, match="not a readable .npz"):
        load_dataset(str(path))


# ----------------------------------------------------------------------------------------------- CIFAR


def test_fake_cifar_is_in_the_python2_format() -> None:
    data = cifar_batches()["data_batch_1"]
    assert data.startswith(b"\x80\x02")
    assert b"cnumpy.core.multiarray\n_reconstruct\n" in data and b"_codecs" not in data
    plain = pickle.loads(data, encoding="bytes")  # what every CIFAR tutorial does
    assert (
        set(plain) == {b"batch_label", b"labels", b"data", b"filenames"} and plain[b"data"].dtype == np.uint8
    )


@pytest.mark.parametrize("form", ["tar", "dir", "parent-dir"])
def test_cifar_loads(tmp_path: Path, form: str) -> None:
    members = cifar_batches(per_class_train=3, per_class_test=2)
    if form == "tar":
        spec = write_cifar_tar(tmp_path / "cifar-10-python.tar.gz", members)
    else:
        folder = write_cifar_dir(tmp_path, members)
        spec = folder if form == "dir" else tmp_path
    s = load_dataset(str(spec), val_fraction=0.2, normalization=IDENTITY3)
    assert s.class_names == CIFAR_NAMES and s.input_shape == (3, 32, 32) and s.num_classes == 10
    assert len(s.test) == 20 and len(s.train) + len(s.val) == 150 and len(s.val) == 30
    assert torch.bincount(s.val.tensors[1], minlength=10).tolist() == [3] * 10
    # test split is the official test batch, in the documented (R plane, G plane, B plane) layout
    batch = pickle.loads(members["test_batch"], encoding="bytes")
    for row, i in enumerate(s.indices["test"][:3]):
        want = torch.from_numpy(batch[b"data"][i].reshape(3, 32, 32)).float() / 255
        assert torch.allclose(s.test.tensors[0][row], want)
        assert int(s.test.tensors[1][row]) == batch[b"labels"][i]
    meta = describe_dataset(str(spec))
    assert meta["num_samples"] == 170 and meta["num_test_samples"] == 20 and meta["class_counts"] == [17] * 10


def test_cifar_normalised_adapted_and_capped(tmp_path: Path) -> None:
    spec = write_cifar_tar(tmp_path / "c.tar.gz", cifar_batches(per_class_train=4, per_class_test=4))
    s = load_dataset(str(spec), input_shape=(1, 16, 16), max_samples=120, seed=2)
    assert s.train.tensors[0].shape[1:] == (1, 16, 16)
    assert len(s.train) + len(s.val) + len(s.test) == 120 and len(s.test) == 20  # 200:40 shared 100:20
    assert abs(float(s.train.tensors[0].mean())) < 1e-4
    again = load_dataset(str(spec), input_shape=(1, 16, 16), max_samples=120, seed=2)
    assert np.array_equal(s.indices["val"], again.indices["val"])


def test_cifar_repickled_with_protocol_4_loads(tmp_path: Path) -> None:
    members = {
        k: pickle.dumps(pickle.loads(v, encoding="bytes"), protocol=4) for k, v in cifar_batches().items()
    }
    assert b"numpy._core" in members["test_batch"] or b"numpy.core" in members["test_batch"]
    s = load_dataset(str(write_cifar_dir(tmp_path, members)))
    assert len(s.test) == 20


def test_truncated_cifar_archive_refused(tmp_path: Path) -> None:
    good = write_cifar_tar(tmp_path / "c.tar.gz", cifar_batches())
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DatasetError, match="truncated"):
        load_dataset(str(cut))


def test_cifar_missing_batch_refused(tmp_path: Path) -> None:
    members = cifar_batches()
    del members["data_batch_4"]
    with pytest.raises(DatasetError, match="missing data_batch_4"):
        load_dataset(str(write_cifar_tar(tmp_path / "c.tar.gz", members)))


def test_cifar_wrong_array_refused(tmp_path: Path) -> None:
    members = cifar_batches()
    members["data_batch_2"] = py2_dumps(
        {b"data": np.zeros((10, 3072), np.float32), b"labels": list(range(10))}
    )
    with pytest.raises(DatasetError, match="uint8"):
        load_dataset(str(write_cifar_dir(tmp_path, members)))


def test_cifar_member_size_capped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = write_cifar_tar(tmp_path / "c.tar.gz", cifar_batches())
    monkeypatch.setattr(cifar_mod, "MAX_MEMBER_BYTES", 1000)
    with pytest.raises(DatasetError, match="more than a CIFAR-10 batch"):
        load_dataset(str(spec))


def test_malicious_pickle_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = malicious_pickle(marker)
    pickle.loads(payload)  # proof the payload is live: a plain load runs it
    assert marker.exists()
    marker.unlink()
    with pytest.raises(DatasetError, match="builtins.exec is not allowed"):
        load_array_pickle(payload, "evil")
    assert not marker.exists()


@pytest.mark.parametrize("form", ["tar", "dir"])
@pytest.mark.parametrize("route", ["exec-in-batch", "system-in-meta"])
def test_malicious_cifar_archive_refused(tmp_path: Path, form: str, route: str) -> None:
    marker = tmp_path / "pwned"
    members = cifar_batches()
    if route == "exec-in-batch":
        members["data_batch_3"], expected = malicious_pickle(marker), "builtins.exec"
    else:
        payload = {b"label_names": [_SystemCall(f"touch {marker}")]}
        members["batches.meta"], expected = (
            pickle.dumps(payload, protocol=4),
            f"{os.system.__module__}.system",
        )
    spec = (
        write_cifar_tar(tmp_path / "c.tar.gz", members)
        if form == "tar"
        else write_cifar_dir(tmp_path, members)
    )
    with pytest.raises(DatasetError, match=f"would run code.*{expected} is not allowed"):
        load_dataset(str(spec))
    with pytest.raises(DatasetError, match="would run code"):
        describe_dataset(str(spec))
    assert not marker.exists()


class _SystemCall:
    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def __reduce__(self) -> tuple:
        return (os.system, (self.cmd,))


# ------------------------------------------------------------------------------------------ image zips


def test_image_zip_loads(tmp_path: Path) -> None:
    spec = folder_zip(tmp_path / "animals.zip", per_class=10)
    s = load_dataset(str(spec), normalization=IDENTITY3)
    assert s.class_names == ["cat", "dog", "fox"] and s.input_shape == (3, 10, 12)
    assert len(s.train) + len(s.val) + len(s.test) == 30
    for x, y in zip(*s.train.tensors, strict=True):
        color = torch.tensor(COLORS[s.class_names[int(y)]], dtype=torch.float32) / 255
        assert torch.allclose(x.mean(dim=(1, 2)), color)
    meta = describe_dataset(str(spec))
    assert meta["input_shape"] == (3, 10, 12) and meta["class_counts"] == [10, 10, 10]


def test_image_zip_without_top_folder_to_gray(tmp_path: Path) -> None:
    spec = folder_zip(tmp_path / "flat.zip", per_class=4, top="")
    s = load_dataset(
        str(spec), input_shape=(1, 16, 16), normalization=IDENTITY1, val_fraction=0.0, test_fraction=0.25
    )
    assert s.input_shape == (1, 16, 16) and len(s.val) == 0 and len(s.test) == 3
    cat = s.class_names.index("cat")
    x = s.train.tensors[0][s.train.tensors[1] == cat]
    assert torch.allclose(x, torch.full_like(x, round(0.299 * 255) / 255), atol=1 / 255)


def test_gray_image_zip_is_one_channel_and_mixed_sizes_need_shape(tmp_path: Path) -> None:
    members = {
        f"{c}/{i}.png": png_bytes(40 * (i + 1), size=(8 + i, 8), mode="L") for c in "ab" for i in range(3)
    }
    spec = write_zip(tmp_path / "gray.zip", members)
    with pytest.raises(DatasetError, match="different sizes"):
        load_dataset(str(spec))
    s = load_dataset(
        str(spec), input_shape=(3, 8, 8), test_fraction=0.0, val_fraction=0.0, normalization=IDENTITY3
    )
    assert s.train.tensors[0].shape == (6, 3, 8, 8) and s.native_shape is None
    meta = describe_dataset(str(spec))
    assert meta["input_shape"] is None and meta["num_classes"] == 2
    comp = check_compatible(meta, model_input_shape=(1, 8, 8), model_num_classes=2)
    assert comp.needs_adaptation and "mixed sizes" in comp.warnings[0]


@pytest.mark.parametrize(
    "bad_name",
    ["../evil.png", "cats/../../evil.png", "/etc/evil.png", "cats\\..\\evil.png", "C:/evil.png"],
)
def test_image_zip_path_traversal_refused(tmp_path: Path, bad_name: str) -> None:
    spec = tmp_path / "t.zip"
    with zipfile.ZipFile(spec, "w") as zf:
        zf.writestr("cats/1.png", png_bytes(1))
        zf.writestr("dogs/1.png", png_bytes(2))
        info = zipfile.ZipInfo("placeholder")
        info.filename = bad_name  # ZipInfo() normalises some names; set the raw one on purpose
        zf.writestr(info, png_bytes(3))
    with pytest.raises(DatasetError, match="escapes the archive"):
        load_dataset(str(spec))
    with pytest.raises(DatasetError, match="escapes the archive"):
        describe_dataset(str(spec))


def test_image_zip_symlink_refused(tmp_path: Path) -> None:
    spec = tmp_path / "s.zip"
    with zipfile.ZipFile(spec, "w") as zf:
        zf.writestr("cats/1.png", png_bytes(1))
        info = zipfile.ZipInfo("dogs/link.png")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(DatasetError, match="symbolic link"):
        load_dataset(str(spec))


def test_image_zip_too_many_files_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = folder_zip(tmp_path / "a.zip", per_class=4)
    monkeypatch.setattr(imagezip, "MAX_MEMBERS", 10)
    with pytest.raises(DatasetError, match="more than the 10 allowed"):
        load_dataset(str(spec))


def test_image_zip_inflation_capped(tmp_path: Path) -> None:
    # 33 MB of zeros deflates to ~32 KB: a small upload that would inflate past the per-image cap.
    members = {
        "cats/1.png": png_bytes(1),
        "dogs/1.png": png_bytes(2),
        "dogs/bomb.png": bytes(33 * 1024 * 1024),
    }
    spec = write_zip(tmp_path / "bomb.zip", members)
    assert spec.stat().st_size < 200_000
    with pytest.raises(DatasetError, match="'dogs/bomb.png' inflates"):
        load_dataset(str(spec))


def test_image_zip_member_read_is_capped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = write_zip(
        tmp_path / "a.zip", {"cats/1.png": png_bytes(1), "dogs/1.png": png_bytes(2, size=(200, 200))}
    )
    with zipfile.ZipFile(spec) as zf:
        info = zf.getinfo("dogs/1.png")
        # the cap holds on the bytes actually inflated, whatever the index check let through
        monkeypatch.setattr(imagezip, "MAX_MEMBER_BYTES", info.file_size - 1)
        with pytest.raises(DatasetError, match="'dogs/1.png' inflates beyond"):
            imagezip._read_member(zf, info, "a.zip")
        # a header that under-reports the size cannot smuggle bytes past it: the read fails its CRC
        monkeypatch.setattr(imagezip, "MAX_MEMBER_BYTES", 32 * 1024 * 1024)
        info.file_size = 10
        with pytest.raises(DatasetError, match="'dogs/1.png' cannot be read.*CRC"):
            imagezip._read_member(zf, info, "a.zip")


def test_non_image_in_zip_refused_with_member_name(tmp_path: Path) -> None:
    spec = folder_zip(tmp_path / "a.zip", per_class=3)
    with zipfile.ZipFile(spec, "a") as zf:
        zf.writestr("animals/dog/notes.txt", b"these are my dogs")
    with pytest.raises(DatasetError, match="'animals/dog/notes.txt' is not a readable image"):
        load_dataset(str(spec))


def test_truncated_image_refused_with_member_name(tmp_path: Path) -> None:
    spec = write_zip(
        tmp_path / "a.zip",
        {
            "cats/1.png": png_bytes(1),
            "dogs/1.png": png_bytes(2),
            "dogs/2.png": png_bytes(3, size=(64, 64))[:60],
        },
    )
    with pytest.raises(DatasetError, match="'dogs/2.png' is not a readable image"):
        load_dataset(str(spec))


def test_image_zip_layout_refused(tmp_path: Path) -> None:
    loose = write_zip(tmp_path / "loose.zip", {"a.png": png_bytes(1), "cats/1.png": png_bytes(1)})
    with pytest.raises(DatasetError, match="not inside a class folder"):
        load_dataset(str(loose))
    single = write_zip(tmp_path / "one.zip", {"cats/1.png": png_bytes(1), "cats/2.png": png_bytes(1)})
    with pytest.raises(DatasetError, match="single class folder"):
        load_dataset(str(single))
    with pytest.raises(DatasetError, match="1 or 3"):
        load_dataset(str(folder_zip(tmp_path / "z.zip")), input_shape=(4, 8, 8))


# ---------------------------------------------------------------------------------------- spec errors


def test_unknown_extension_and_missing_path_refused(tmp_path: Path) -> None:
    odd = tmp_path / "data.csv"
    odd.write_text("1,2,3\n")
    with pytest.raises(DatasetError, match="unsupported extension"):
        load_dataset(str(odd))
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(str(tmp_path / "nope.npz"))
    with pytest.raises(DatasetError, match="not a CIFAR-10 batches folder"):
        describe_dataset(str(tmp_path))


# -------------------------------------------------------------------------------------- compatibility


def test_check_compatible_refusals_and_warnings() -> None:
    meta = describe_dataset("digits")
    with pytest.raises(
        DatasetError, match=r"dataset has 10 classes but the model outputs 4 \(train a model for 10"
    ):
        check_compatible(meta, model_input_shape=(1, 8, 8), model_num_classes=4)
    ok = check_compatible(meta, model_input_shape=(3, 32, 32), model_num_classes=12)
    assert ok.needs_adaptation and any("never a target" in w for w in ok.warnings)
    assert any("resized from 8x8 to 32x32" in w for w in ok.warnings)
    exact = check_compatible(meta, model_input_shape=(1, 8, 8), model_num_classes=10)
    assert not exact.needs_adaptation and exact.warnings == []
    with pytest.raises(DatasetError, match="only gray <-> RGB"):
        check_compatible(meta, model_input_shape=(4, 8, 8), model_num_classes=10)
    splits = load_dataset("digits", max_samples=100)
    with pytest.raises(DatasetError, match=r"load it with input_shape=\(3, 32, 32\)"):
        check_compatible(splits, model_input_shape=(3, 32, 32), model_num_classes=10)
    assert check_compatible(splits, model_input_shape=(1, 8, 8), model_num_classes=10).warnings == []


def test_check_compatible_four_channel_npz(tmp_path: Path) -> None:
    path = tmp_path / "rgba.npz"
    np.savez(path, x=np.zeros((6, 4, 5, 5), np.uint8), y=np.arange(6) % 2)
    with pytest.raises(DatasetError, match="4-channel images but the model takes 3"):
        check_compatible(describe_dataset(str(path)), model_input_shape=(3, 5, 5), model_num_classes=2)
    with pytest.raises(DatasetError, match="only gray -> RGB"):
        load_dataset(str(path), input_shape=(3, 5, 5))


# -------------------------------------------------------------------------------------------- loaders


def test_make_loader_is_deterministic() -> None:
    s = load_dataset("digits", max_samples=100)

    def order(seed: int) -> list[int]:
        return torch.cat([y for _, y in make_loader(s.train, 16, shuffle=True, seed=seed)]).tolist()

    def first_x(seed: int) -> torch.Tensor:
        return next(iter(make_loader(s.train, 16, shuffle=True, seed=seed)))[0]

    assert torch.equal(first_x(3), first_x(3)) and not torch.equal(first_x(3), first_x(4))
    assert sorted(order(3)) == sorted(s.train.tensors[1].tolist())
    plain = make_loader(s.train, 32, shuffle=False, seed=0)
    assert torch.equal(next(iter(plain))[0], s.train.tensors[0][:32]) and plain.num_workers == 0
    with pytest.raises(DatasetError, match="batch_size"):
        make_loader(s.train, 0, shuffle=False, seed=0)
