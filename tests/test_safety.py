"""Safe ingestion: nothing in an upload is unpickled or evaluated unchecked (compression/models/safety.py).

Hostile files are built from a real ``torch.export.save`` archive by replacing or adding members. Each
payload would create a marker file when unpickled or evaluated; the tests assert the marker never appears
when our loader handles the file, and (in a subprocess) that raw ``torch.export.load`` does run it, which
is why the vetting exists.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import subprocess
import sys
import time
import zipfile
import zlib

import pytest
import torch
from torch import nn

from compression.errors import ModelError, UnsafeFileError
from compression.models.pt2 import load_pt2
from compression.models.safety import (
    load_state_dict_file,
    safe_torch_load,
    scan_pickle,
    vet_pt2_archive,
)

# --------------------------------------------------------------------------------------------------
# payloads


class TouchMarker:
    """Unpickling this calls open(marker, "w"): the file appearing proves code ran during loading."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def torch_save_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def read_members(path: str) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {i.filename: zf.read(i) for i in zf.infolist()}


def write_members(path: str, members: dict[str, bytes]) -> str:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


@pytest.fixture(scope="module")
def clean_pt2(tmp_path_factory) -> str:
    """A real archive: TinyNet exported with a dynamic batch (so the JSON holds sympy expressions)."""
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("clean") / "model.pt2")
    ep = torch.export.export(
        TinyNet().eval(),
        (torch.randn(2, 3, 8, 8),),
        dynamic_shapes=({0: torch.export.Dim("batch", max=512)},),
    )
    torch.export.save(ep, path)
    return path


def edit_archive(src: str, dst: str, edit) -> str:
    members = read_members(src)
    root = next(iter(members)).split("/")[0]
    edit(members, root)
    return write_members(dst, members)


def _set_config(members: dict, root: str, config_name: str, update) -> None:
    name = f"{root}/{config_name}"
    cfg = json.loads(members[name])
    update(cfg["config"])
    members[name] = json.dumps(cfg).encode()


def hostile_sample_inputs(marker):
    def edit(m, root):
        m[f"{root}/data/sample_inputs/model.pt"] = torch_save_bytes(TouchMarker(marker))

    return edit


def hostile_weight(marker):
    def edit(m, root):
        def upd(cfg):
            cfg["fc.bias"]["use_pickle"] = True
            m[f"{root}/data/weights/{cfg['fc.bias']['path_name']}"] = torch_save_bytes(TouchMarker(marker))

        _set_config(m, root, "data/weights/model_weights_config.json", upd)

    return edit


def hostile_constant(marker):
    def edit(m, root):
        def upd(cfg):
            cfg["evil"] = {
                "path_name": "tensor_constant0",
                "is_param": False,
                "use_pickle": True,
                "tensor_meta": None,
            }

        _set_config(m, root, "data/constants/model_constants_config.json", upd)
        m[f"{root}/data/constants/tensor_constant0"] = torch_save_bytes(TouchMarker(marker))

    return edit


def hostile_opaque_constant(marker):
    def edit(m, root):
        def upd(cfg):
            cfg["evil"] = {
                "path_name": "opaque_obj_0",
                "is_param": False,
                "use_pickle": True,
                "tensor_meta": None,
            }

        _set_config(m, root, "data/constants/model_constants_config.json", upd)
        m[f"{root}/data/constants/opaque_obj_0"] = pickle.dumps(TouchMarker(marker), protocol=2)

    return edit


def hostile_sympy(marker):
    def edit(m, root):
        name = f"{root}/models/model.json"
        text = m[name].decode()
        sym = "Symbol('s77', positive=True, integer=True)"
        assert f'"expr_str": "{sym}"' in text, "the export no longer writes this expression; update the test"
        evil = f"(open('{marker}', 'w'), {sym})[1]"
        m[name] = text.replace(f'"expr_str": "{sym}"', json.dumps({"expr_str": evil})[1:-1]).encode()

    return edit


def hostile_guards(marker):
    def edit(m, root):
        name = f"{root}/models/model.json"
        program = json.loads(m[name])
        program["guards_code"] = [f"open('{marker}', 'w') is not None"]
        m[name] = json.dumps(program).encode()

    return edit


HOSTILE = {
    "sample_inputs": hostile_sample_inputs,
    "weight": hostile_weight,
    "constant": hostile_constant,
    "opaque_constant": hostile_opaque_constant,
    "sympy_expr": hostile_sympy,
}


# --------------------------------------------------------------------------------------------------
# state_dict files


def test_state_dict_roundtrip(tmp_path):
    model = TinyNet()
    path = tmp_path / "w.pth"
    torch.save(model.state_dict(), path)
    state = load_state_dict_file(str(path))
    assert set(state) == set(model.state_dict())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_state_dict_inside_checkpoint_and_dataparallel_prefix(tmp_path):
    model = TinyNet()
    path = tmp_path / "ckpt.pt"
    prefixed = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"epoch": 3, "model_state_dict": prefixed, "best_acc": 0.9}, path)
    state = load_state_dict_file(str(path))
    assert set(state) == set(model.state_dict())


def test_pickled_model_object_is_refused_with_advice(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(TinyNet(), path)
    with pytest.raises(UnsafeFileError) as info:
        load_state_dict_file(str(path))
    assert "state_dict" in str(info.value)
    assert "TinyNet" in str(info.value)


def test_reduce_payload_in_pt_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"conv.weight": torch.zeros(1), "x": TouchMarker(str(marker))}, path)
    with pytest.raises(UnsafeFileError) as info:
        load_state_dict_file(str(path))
    assert "allow-list" in str(info.value)
    assert not marker.exists()


def test_bare_pickle_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    for proto in (0, 2, 4):
        path = tmp_path / f"evil{proto}.pt"
        path.write_bytes(pickle.dumps(TouchMarker(str(marker)), protocol=proto))
        with pytest.raises(UnsafeFileError):
            load_state_dict_file(str(path))
    assert not marker.exists()


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"", "empty"),
        (os.urandom(4096), "not a file written by torch.save"),
    ],
)
def test_broken_state_dict_files(tmp_path, payload, message):
    path = tmp_path / "w.pt"
    path.write_bytes(payload)
    with pytest.raises(ModelError, match=message):
        load_state_dict_file(str(path))


def test_state_dict_that_is_not_flat_is_refused(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"layers": [torch.zeros(2)], "name": "x"}, path)
    with pytest.raises(ModelError, match="not a flat name -> tensor state_dict"):
        load_state_dict_file(str(path))
    torch.save(torch.zeros(3), path)
    with pytest.raises(ModelError, match="single tensor"):
        load_state_dict_file(str(path))


def test_scan_pickle_names_the_forbidden_global():
    stream = pickle.dumps(TouchMarker("/nonexistent/x"), protocol=4)
    with pytest.raises(UnsafeFileError, match="builtins.open|io.open"):
        scan_pickle(stream, what="t")
    # torch's own tensors pass the scan
    data = torch_save_bytes({"w": torch.ones(2)})
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        pkl = next(n for n in zf.namelist() if n.endswith("data.pkl"))
        found = scan_pickle(zf.read(pkl), what="t")
    assert "torch._utils._rebuild_tensor_v2" in found
    assert torch.equal(safe_torch_load(data, what="t")["w"], torch.ones(2))


# --------------------------------------------------------------------------------------------------
# .pt2 archives: the clean case


def test_clean_archive_manifest(clean_pt2):
    manifest = vet_pt2_archive(clean_pt2)
    roles = {m.name: m.role for m in manifest.members}
    assert roles["archive_format"] == "bookkeeping"
    assert roles["models/model.json"] == "json"
    assert roles["data/sample_inputs/model.pt"] == "pickle"
    assert all(r == "raw_tensor" for n, r in roles.items() if n.startswith("data/weights/weight_"))
    assert manifest.pickled_members == ("data/sample_inputs/model.pt",)
    assert manifest.symbolic_expressions > 0  # dynamic batch: the expressions were checked, not skipped
    assert "torch.ops.aten.conv2d.default" in manifest.graph_targets


# --------------------------------------------------------------------------------------------------
# .pt2 archives: hostile payloads


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_archive_is_refused_and_nothing_runs(clean_pt2, tmp_path, kind):
    marker = tmp_path / "pwned"
    path = edit_archive(clean_pt2, str(tmp_path / f"{kind}.pt2"), HOSTILE[kind](str(marker)))
    with pytest.raises(UnsafeFileError):
        vet_pt2_archive(path)
    with pytest.raises(UnsafeFileError):
        load_pt2(path)
    assert not marker.exists()


def test_hostile_guards_code_is_refused(clean_pt2, tmp_path):
    marker = tmp_path / "pwned"
    path = edit_archive(clean_pt2, str(tmp_path / "guards.pt2"), hostile_guards(str(marker)))
    with pytest.raises(UnsafeFileError, match="guards_code"):
        load_pt2(path)
    assert not marker.exists()


def test_raw_torch_export_load_runs_the_payloads_but_we_do_not(clean_pt2, tmp_path):
    """The reason for all of the above: torch.export.load in torch 2.13 executes these payloads."""
    cases = {}
    for kind, make in sorted(HOSTILE.items()) + [("guards_code", hostile_guards)]:
        marker = tmp_path / f"pwned_{kind}"
        cases[kind] = (edit_archive(clean_pt2, str(tmp_path / f"raw_{kind}.pt2"), make(str(marker))), marker)
    for kind, (path, marker) in cases.items():
        with pytest.raises(UnsafeFileError):
            load_pt2(path)
        assert not marker.exists(), kind
    # One subprocess loads them all with plain torch.export.load (and calls the module for guards_code).
    script = (
        "import sys, torch\n"
        "for path in sys.argv[1:]:\n"
        "    try:\n"
        "        ep = torch.export.load(path)\n"
        "        if 'guards_code' in path:\n"
        "            ep.module()(torch.randn(2, 3, 8, 8))\n"
        "    except Exception:\n"
        "        pass\n"
    )
    subprocess.run(
        [sys.executable, "-c", script, *(p for p, _ in cases.values())],
        capture_output=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    ran = {kind for kind, (_, marker) in cases.items() if marker.exists()}
    assert ran == set(cases), (
        f"raw torch.export.load no longer runs {sorted(set(cases) - ran)}; update docs/ingestion.md"
    )


def test_graph_calling_a_non_aten_function_is_refused(clean_pt2, tmp_path):
    def edit(m, root):
        name = f"{root}/models/model.json"
        program = json.loads(m[name])
        program["graph_module"]["graph"]["nodes"][0]["target"] = "torch.save"
        m[name] = json.dumps(program).encode()

    path = edit_archive(clean_pt2, str(tmp_path / "target.pt2"), edit)
    with pytest.raises(UnsafeFileError, match="torch.save"):
        vet_pt2_archive(path)


def test_aotinductor_member_is_refused(clean_pt2, tmp_path):
    def edit(m, root):
        m[f"{root}/data/aotinductor/model/model.so"] = b"\x7fELF" + os.urandom(64)

    path = edit_archive(clean_pt2, str(tmp_path / "aoti.pt2"), edit)
    with pytest.raises(UnsafeFileError, match="shared library"):
        vet_pt2_archive(path)


def test_pickle_hidden_in_extra_file_is_checked(clean_pt2, tmp_path):
    marker = tmp_path / "pwned"

    def edit(m, root):
        m[f"{root}/extra/notes.txt"] = torch_save_bytes(TouchMarker(str(marker)))

    path = edit_archive(clean_pt2, str(tmp_path / "extra.pt2"), edit)
    with pytest.raises(UnsafeFileError, match="extra/notes.txt"):
        vet_pt2_archive(path)
    assert not marker.exists()


def test_plain_text_extra_file_is_accepted(clean_pt2, tmp_path):
    def edit(m, root):
        m[f"{root}/extra/compression.json"] = json.dumps({"dataset": "digits"}).encode()

    path = edit_archive(clean_pt2, str(tmp_path / "extra_ok.pt2"), edit)
    assert vet_pt2_archive(path).extra_files == ("compression.json",)


@pytest.mark.parametrize(
    "name",
    ["/etc/evil", "../evil", "{root}/../../evil", "{root}/data/./x", "C:/evil", "{root}\\evil"],
)
def test_unsafe_member_paths_are_refused(clean_pt2, tmp_path, name):
    members = read_members(clean_pt2)
    root = next(iter(members)).split("/")[0]
    members[name.format(root=root)] = b"x"
    path = write_members(str(tmp_path / "paths.pt2"), members)
    with pytest.raises(UnsafeFileError, match="unsafe path"):
        vet_pt2_archive(path)


def test_duplicate_member_is_refused(clean_pt2, tmp_path):
    members = read_members(clean_pt2)
    path = str(tmp_path / "dup.pt2")
    with pytest.warns(UserWarning), zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        sample = next(n for n in members if n.endswith("sample_inputs/model.pt"))
        zf.writestr(sample, torch_save_bytes((torch.zeros(1),)))
    with pytest.raises(UnsafeFileError, match="two members"):
        vet_pt2_archive(path)


# --------------------------------------------------------------------------------------------------
# .pt2 archives: broken and foreign files


def test_truncated_archive(clean_pt2, tmp_path):
    data = open(clean_pt2, "rb").read()
    path = tmp_path / "cut.pt2"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="not a readable zip"):
        vet_pt2_archive(str(path))


def test_random_bytes_and_empty_file(tmp_path):
    path = tmp_path / "r.pt2"
    path.write_bytes(os.urandom(10_000))
    with pytest.raises(ModelError, match="not a zip"):
        vet_pt2_archive(str(path))
    path.write_bytes(b"")
    with pytest.raises(ModelError, match="empty"):
        vet_pt2_archive(str(path))


def test_zip_that_is_not_a_pt2(tmp_path):
    path = write_members(str(tmp_path / "z.pt2"), {"photos/cat.jpg": b"\xff\xd8" + os.urandom(100)})
    with pytest.raises(ModelError, match="no archive_format"):
        vet_pt2_archive(path)


def test_pt2_missing_expected_members(clean_pt2, tmp_path):
    def edit(m, root):
        del m[f"{root}/data/sample_inputs/model.pt"]

    path = edit_archive(clean_pt2, str(tmp_path / "missing.pt2"), edit)
    with pytest.raises(ModelError, match="missing .*sample_inputs"):
        vet_pt2_archive(path)


def test_state_dict_renamed_to_pt2(tmp_path):
    path = tmp_path / "weights.pt2"
    torch.save(TinyNet().state_dict(), path)
    with pytest.raises(UnsafeFileError, match="renamed"):
        vet_pt2_archive(str(path))
    with pytest.raises(UnsafeFileError):
        load_pt2(str(path))


def test_unexpected_member_is_refused(clean_pt2, tmp_path):
    def edit(m, root):
        m[f"{root}/data/weights/weight_999"] = b"\x00" * 16  # not referenced by the weights config

    path = edit_archive(clean_pt2, str(tmp_path / "unexpected.pt2"), edit)
    with pytest.raises(ModelError, match="does not write"):
        vet_pt2_archive(path)


# --------------------------------------------------------------------------------------------------
# zip bombs

BOMB_BYTES = 2 << 30  # 2 GiB of zeros
CHUNK = 1 << 20


@pytest.fixture(scope="module")
def zeros_deflate() -> tuple[bytes, int]:
    """Raw deflate of 2 GiB of zeros (about 2 MB) and its CRC-32, built from one repeated 1 MiB block.

    A full flush resets the compressor, so every 1 MiB of zeros compresses to the same bytes.
    """
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = comp.compress(bytes(CHUNK)) + comp.flush(zlib.Z_FULL_FLUSH)
    again = comp.compress(bytes(CHUNK)) + comp.flush(zlib.Z_FULL_FLUSH)
    assert block == again
    n = BOMB_BYTES // CHUNK
    stream = block * n + comp.flush(zlib.Z_FINISH)
    crc = 0
    zero = bytes(CHUNK)
    for _ in range(n):
        crc = zlib.crc32(zero, crc)
    assert zlib.decompressobj(-15).decompress(stream[: len(block) * 2]) == bytes(2 * CHUNK)
    return stream, crc


def raw_zip(entries: list[tuple[str, bytes, int, int, int]]) -> bytes:
    """A zip built by hand: (name, data as stored, method, crc, declared uncompressed size) per member."""
    out = io.BytesIO()
    central = []
    for name, data, method, crc, size in entries:
        offset = out.tell()
        fname = name.encode()
        out.write(
            struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0, crc, len(data), size, len(fname), 0)
        )
        out.write(fname)
        out.write(data)
        central.append(
            struct.pack(
                "<IHHHHHHIIIHHHHHII",
                0x02014B50,
                20,
                20,
                0,
                method,
                0,
                0,
                crc,
                len(data),
                size,
                len(fname),
                0,
                0,
                0,
                0,
                0,
                offset,
            )  # fmt: skip
            + fname
        )
    cd_start = out.tell()
    for c in central:
        out.write(c)
    cd_size = out.tell() - cd_start
    out.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(central), len(central), cd_size, cd_start, 0))
    return out.getvalue()


def _pt2_with_extra_member(clean_pt2: str, member: tuple[str, bytes, int, int, int] | None) -> list:
    entries = []
    for name, data in read_members(clean_pt2).items():
        entries.append((name, data, 0, zlib.crc32(data), len(data)))
    root = entries[0][0].split("/")[0]
    if member is not None:
        name, *rest = member
        entries.append((f"{root}/{name}", *rest))
    return entries


def test_hand_built_zip_helper_is_valid(clean_pt2, tmp_path):
    path = tmp_path / "rebuilt.pt2"
    path.write_bytes(raw_zip(_pt2_with_extra_member(clean_pt2, None)))
    vet_pt2_archive(str(path))


def test_zip_bomb_with_honest_header(clean_pt2, tmp_path, zeros_deflate):
    stream, crc = zeros_deflate
    path = tmp_path / "bomb.pt2"
    path.write_bytes(raw_zip(_pt2_with_extra_member(clean_pt2, ("extra/zeros", stream, 8, crc, BOMB_BYTES))))
    assert path.stat().st_size < 5_000_000
    start = time.perf_counter()
    with pytest.raises(UnsafeFileError, match="zip bomb"):
        vet_pt2_archive(str(path), max_total_bytes=64 << 20)
    assert time.perf_counter() - start < 10


def test_zip_bomb_with_lying_header(clean_pt2, tmp_path, zeros_deflate):
    """The header claims 4 KiB; the stream holds 2 GiB. Reading stops at the claim and the CRC exposes it."""
    stream, _crc = zeros_deflate
    path = tmp_path / "liar.pt2"
    path.write_bytes(raw_zip(_pt2_with_extra_member(clean_pt2, ("extra/zeros", stream, 8, 0x1234, 4096))))
    start = time.perf_counter()
    with pytest.raises(ModelError, match="does not match its header|corrupt"):
        vet_pt2_archive(str(path), max_total_bytes=64 << 20)
    assert time.perf_counter() - start < 10


def test_zip_bomb_inside_a_pickled_member(clean_pt2, tmp_path, zeros_deflate):
    """The sample inputs are themselves a torch.save zip: the same limits apply inside it."""
    stream, crc = zeros_deflate
    pkl = pickle.dumps((), protocol=2)
    inner = raw_zip(
        [
            ("archive/data.pkl", pkl, 0, zlib.crc32(pkl), len(pkl)),
            ("archive/data/0", stream, 8, crc, BOMB_BYTES),
        ]
    )

    def edit(m, root):
        m[f"{root}/data/sample_inputs/model.pt"] = inner

    path = edit_archive(clean_pt2, str(tmp_path / "inner_bomb.pt2"), edit)
    with pytest.raises(UnsafeFileError, match="zip bomb"):
        vet_pt2_archive(path, max_total_bytes=64 << 20)
