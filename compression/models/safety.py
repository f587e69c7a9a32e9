"""Safe ingestion of uploaded model files: nothing in an upload is unpickled or evaluated unchecked.

Two kinds of upload reach the engine:

- a ``state_dict`` file (``.pt``/``.pth``), read with ``torch.load(..., weights_only=True)`` and accepted only
  when it is a flat ``{name: Tensor}`` mapping (or a checkpoint holding one under ``state_dict`` /
  ``model_state_dict``);
- a ``.pt2`` archive from ``torch.export.save``. ``torch.export.load`` is *not* safe on its own in torch 2.13
  (see ``docs/ingestion.md`` for the code paths and the reproduced attacks): pickled weights and tensor
  constants are read with ``torch.load(weights_only=False)``, sample inputs fall back to it when the safe
  load fails, opaque constants go through ``pickle.loads``, TorchScript objects through the TorchScript
  unpickler, AOTInductor members are loaded as shared libraries, symbolic shape strings in the graph JSON
  are parsed by ``sympy.sympify`` (which calls ``eval``), and ``guards_code`` strings are ``exec``'d when
  the program's module is called. ``vet_pt2_archive`` checks every one of those inputs first and raises
  ``UnsafeFileError`` (or ``ModelError`` for files that are merely broken) before torch sees the file.

Vetting reads the archive into memory once; ``load_pt2`` hands those exact bytes to ``torch.export.load``,
so the file cannot change between the check and the load.
"""

from __future__ import annotations

import ast
import io
import json
import os
import pickletools
import re
import stat
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from compression.errors import ModelError, UnsafeFileError

DEFAULT_MAX_TOTAL_BYTES = 1 << 30  # 1 GiB: uploads are read into memory; far above any model we compress
DEFAULT_MAX_MEMBERS = 10_000
# A state_dict file is a torch.save zip; the same limits stop a compressed bomb inside it.
DEFAULT_MAX_STATE_DICT_BYTES = DEFAULT_MAX_TOTAL_BYTES

_ZIP_MAGIC = b"PK\x03\x04"
_READ_CHUNK = 1 << 20

# Layout of an archive written by torch.export.save in torch 2.13 (torch/export/pt2_archive/constants.py).
ARCHIVE_FORMAT_PATH = "archive_format"
ARCHIVE_FORMAT_VALUE = b"pt2"
ARCHIVE_VERSION_PATH = "archive_version"
ARCHIVE_VERSION_VALUE = b"0"
MODEL_NAME = "model"
MODEL_JSON = f"models/{MODEL_NAME}.json"
SAMPLE_INPUTS = f"data/sample_inputs/{MODEL_NAME}.pt"
WEIGHTS_DIR = "data/weights/"
CONSTANTS_DIR = "data/constants/"
WEIGHTS_CONFIG = f"{WEIGHTS_DIR}{MODEL_NAME}_weights_config.json"
CONSTANTS_CONFIG = f"{CONSTANTS_DIR}{MODEL_NAME}_constants_config.json"
LEGACY_WEIGHTS = f"{WEIGHTS_DIR}{MODEL_NAME}.pt"
LEGACY_CONSTANTS = f"{CONSTANTS_DIR}{MODEL_NAME}.pt"
WEIGHT_PREFIX = "weight_"
TENSOR_CONSTANT_PREFIX = "tensor_"
CUSTOM_OBJ_PREFIX = "custom_obj_"
OPAQUE_OBJ_PREFIX = "opaque_obj_"
EXTRA_DIR = "extra/"
_BOOKKEEPING = {
    ".data/version",
    ".data/serialization_id",
    "byteorder",
    ARCHIVE_FORMAT_PATH,
    ARCHIVE_VERSION_PATH,
}
# Directories whose contents torch loads as native code or that this engine has no use for.
_NATIVE_CODE_DIRS = ("data/aotinductor/",)
_FOREIGN_DIRS = ("data/executorch/", "data/mtia", "xl_model_weights/")

_PAYLOAD_NAME = re.compile(r"[A-Za-z0-9_.-]{1,200}")
_SYMBOL_NAME = re.compile(r"[a-z]{1,8}[0-9]{1,9}")

STATE_DICT_HINT = "save model.state_dict(), not the model object: torch.save(model.state_dict(), path)"
REEXPORT_HINT = (
    "export the model with torch.export.export(model.eval(), (x,)) and torch.export.save(ep, 'model.pt2')"
)


@dataclass(frozen=True)
class Pt2Member:
    """One member of a vetted archive.

    name: path inside the archive root (e.g. ``data/weights/weight_0``).
    role: what torch does with it: ``bookkeeping`` / ``json`` / ``extra`` (read as text), ``raw_tensor``
        (copied into a tensor's storage, never unpickled) or ``pickle`` (unpickled by torch.load).
    size: uncompressed bytes.
    check: how it was checked.
    """

    name: str
    role: str
    size: int
    check: str


@dataclass(frozen=True)
class Pt2Manifest:
    """What vetting found in a ``.pt2`` archive; every member passed its check."""

    source: str
    root: str
    members: tuple[Pt2Member, ...]
    total_bytes: int
    pickled_members: tuple[str, ...]
    graph_targets: tuple[str, ...]
    symbolic_expressions: int
    extra_files: tuple[str, ...] = field(default_factory=tuple)

    def member(self, name: str) -> Pt2Member:
        """The member called ``name`` (path inside the root)."""
        for m in self.members:
            if m.name == name:
                return m
        raise KeyError(name)


# --------------------------------------------------------------------------------------------------
# state_dict files


def load_state_dict_file(
    path: str, *, max_bytes: int = DEFAULT_MAX_STATE_DICT_BYTES
) -> dict[str, torch.Tensor]:
    """Read a ``state_dict`` saved with ``torch.save`` without unpickling anything but tensors.

    Accepts a flat ``{str: Tensor}`` mapping, or a checkpoint dict holding one under ``state_dict`` or
    ``model_state_dict``. A ``module.`` prefix on every key (from ``nn.DataParallel``) is removed. Anything
    else, in particular a pickled model object, is refused with ``UnsafeFileError`` / ``ModelError`` and
    nothing in the file is executed.
    """
    name = os.path.basename(path)
    data = _read_capped(path, max_bytes, what=name)
    if not data:
        raise ModelError(f"{name} is empty", "save the weights with torch.save(model.state_dict(), path)")
    obj = safe_torch_load(data, what=name, max_bytes=max_bytes, hint=STATE_DICT_HINT)
    state = _extract_state_dict(obj, name)
    keys = list(state)
    if keys and all(k.startswith("module.") for k in keys):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _extract_state_dict(obj: Any, name: str) -> dict[str, torch.Tensor]:
    hint = STATE_DICT_HINT
    if isinstance(obj, dict):
        if _is_flat_tensor_dict(obj):
            if not obj:
                raise ModelError(f"{name} holds an empty state_dict", hint)
            return dict(obj)
        for key in ("state_dict", "model_state_dict"):
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and _is_flat_tensor_dict(inner):
                return dict(inner)
        bad = next(
            (f"{k!r}: {type(v).__name__}" for k, v in obj.items() if not isinstance(v, torch.Tensor)),
            "no tensors",
        )
        raise ModelError(f"{name} is a dict but not a flat name -> tensor state_dict (found {bad})", hint)
    if isinstance(obj, torch.Tensor):
        raise ModelError(f"{name} holds a single tensor, not a state_dict", hint)
    raise ModelError(f"{name} holds a {type(obj).__name__}, not a state_dict", hint)


def _is_flat_tensor_dict(d: dict) -> bool:
    return all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items())


# --------------------------------------------------------------------------------------------------
# checking one pickled payload


def safe_torch_load(
    data: bytes, *, what: str, max_bytes: int = DEFAULT_MAX_TOTAL_BYTES, hint: str = REEXPORT_HINT
) -> Any:
    """Load a ``torch.save`` payload with torch's ``weights_only`` unpickler, after checking it statically.

    Three layers, each able to refuse on its own: the payload's zip container is vetted (size caps,
    paths, CRCs), every pickle stream in it is scanned opcode by opcode and refused if it names a global
    that is not on torch's ``weights_only`` allow-list or instantiates classes the old way (``INST``,
    ``OBJ``, extension codes), and only then ``torch.load(weights_only=True)`` runs. Raises
    ``UnsafeFileError`` naming ``what``, with ``hint`` as the advice.
    """
    for stream_name, stream in _pickle_streams(data, what=what, max_bytes=max_bytes, hint=hint):
        scan_pickle(stream, what=f"{what} ({stream_name})", hint=hint)
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # the weights_only unpickler raises UnpicklingError and others; all mean "refuse"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsafeFileError(
            f"{what} holds objects that torch's safe (weights_only) loader refuses: {first[:300]}", hint
        ) from None


def _pickle_streams(data: bytes, *, what: str, max_bytes: int, hint: str) -> Iterator[tuple[str, bytes]]:
    """The pickle streams ``torch.load`` reads from a ``torch.save`` zip (its ``data.pkl``).

    Bare pickle streams (legacy ``torch.save`` before torch 1.6, ``pickle.dump``) are refused: nothing
    torch.export.save or a current ``torch.save`` writes looks like that.
    """
    if not data.startswith(_ZIP_MAGIC):
        if _sniff_pickle(data):
            raise UnsafeFileError(
                f"{what} is a bare pickle stream, not a torch.save zip; it is not read",
                "re-save with a current torch: torch.save(model.state_dict(), path)",
            )
        raise ModelError(f"{what} is not a file written by torch.save", hint)
    zf, infos = _open_zip(data, what=what, max_total_bytes=max_bytes, max_members=DEFAULT_MAX_MEMBERS)
    pkls = [i for i in infos if i.filename.endswith(".pkl")]
    if not any(i.filename.endswith("/data.pkl") for i in pkls):
        raise UnsafeFileError(f"{what} is a zip without the data.pkl a torch.save file has", hint)
    for info in pkls:
        yield info.filename, zf.read(info)


def _allowed_globals() -> set[str]:
    from torch import _weights_only_unpickler as wou

    allowed = set(wou._get_allowed_globals())
    # Globals registered by the application with torch.serialization.add_safe_globals are honoured by
    # torch's loader too; mirror them so the two checks agree.
    for g in torch.serialization.get_safe_globals():
        obj = g[0] if isinstance(g, tuple) else g
        mod, name = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
        if mod and name:
            allowed.add(f"{mod}.{name}")
    return allowed


_REFUSED_OPCODES = {"INST", "OBJ", "EXT1", "EXT2", "EXT4"}
_STRING_OPCODES = {
    "SHORT_BINUNICODE",
    "BINUNICODE",
    "BINUNICODE8",
    "UNICODE",
    "STRING",
    "BINSTRING",
    "SHORT_BINSTRING",
}


def scan_pickle(stream: bytes, *, what: str, hint: str = REEXPORT_HINT) -> list[str]:
    """Scan one pickle stream without executing it; return the globals it imports.

    Refuses (``UnsafeFileError``) a stream that imports any global outside torch's ``weights_only``
    allow-list, builds objects with ``INST``/``OBJ``/extension codes, names a global it cannot resolve
    statically, or is malformed.
    """
    allowed = _allowed_globals()
    found: list[str] = []
    # Enough of the unpickler's stack and memo to resolve STACK_GLOBAL's two string operands; anything
    # that is not a plain string push is tracked as None, so an obfuscated name is refused, not missed.
    recent: list[str | None] = []
    memo: dict[int, str | None] = {}
    try:
        for op, arg, _pos in pickletools.genops(io.BytesIO(stream)):
            name = op.name
            if name in _REFUSED_OPCODES:
                raise UnsafeFileError(
                    f"{what} uses pickle opcode {name}, which builds arbitrary objects", REEXPORT_HINT
                )
            if name == "GLOBAL":
                module, _, attr = str(arg).partition(" ")
                module, attr = _py3_name(module, attr)
                found.append(_check_global(f"{module}.{attr}", allowed, what, hint))
                recent.append(None)
            elif name == "STACK_GLOBAL":
                if len(recent) < 2 or not isinstance(recent[-1], str) or not isinstance(recent[-2], str):
                    raise UnsafeFileError(
                        f"{what} imports a global whose name cannot be read statically", REEXPORT_HINT
                    )
                found.append(_check_global(f"{recent[-2]}.{recent[-1]}", allowed, what, hint))
                del recent[-2:]
                recent.append(None)
            elif name in _STRING_OPCODES:
                recent.append(arg if isinstance(arg, str) else arg.decode("latin-1"))
            elif name == "MEMOIZE":
                memo[len(memo)] = recent[-1] if recent else None
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[int(arg)] = recent[-1] if recent else None
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                recent.append(memo.get(int(arg)))
            elif name in ("PROTO", "FRAME", "STOP"):
                pass
            else:
                recent.append(None)
    except UnsafeFileError:
        raise
    except Exception as e:
        raise UnsafeFileError(f"{what} is not a well-formed pickle stream: {e}", REEXPORT_HINT) from None
    return found


def _py3_name(module: str, attr: str) -> tuple[str, str]:
    """The Python 3 name of a GLOBAL written by protocol <= 2 (``__builtin__.set`` -> ``builtins.set``).

    torch's weights_only unpickler applies exactly this mapping when it reads a GLOBAL opcode, so the scan
    must too, or every pickle torch itself writes with protocol 2 (sample inputs holding a set) is refused.
    """
    from torch._utils import IMPORT_MAPPING, NAME_MAPPING

    if (module, attr) in NAME_MAPPING:
        return NAME_MAPPING[(module, attr)]
    return IMPORT_MAPPING.get(module, module), attr


def _check_global(dotted: str, allowed: set[str], what: str, hint: str) -> str:
    if dotted not in allowed:
        raise UnsafeFileError(
            f"{what} imports {dotted}, which is not on torch's weights_only allow-list: "
            "loading it could run arbitrary code",
            hint,
        )
    return dotted


def _sniff_pickle(data: bytes) -> bool:
    """Whether ``data`` starts with a pickle stream (any protocol), found without executing anything.

    Protocols 2..5 announce themselves with ``PROTO n``; protocols 0 and 1 have no header, so the first
    megabyte is parsed opcode by opcode: a pickle is whatever parses cleanly up to a ``STOP``.
    """
    if len(data) >= 2 and data[0] == 0x80 and 2 <= data[1] <= 5:
        return True
    try:
        for op, _arg, _pos in pickletools.genops(io.BytesIO(data[: 1 << 20])):
            if op.name == "STOP":
                return True
    except Exception:
        return False
    return False


# --------------------------------------------------------------------------------------------------
# zip containers


def _read_capped(path: str, max_bytes: int, *, what: str) -> bytes:
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise ModelError(f"cannot read {what}: {e.strerror or e}", "check the path") from None
    if size > max_bytes:
        raise ModelError(
            f"{what} is {size} bytes, above the {max_bytes} byte limit",
            "upload a smaller model or raise the limit",
        )
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ModelError(
            f"{what} grew above the {max_bytes} byte limit while reading", "upload the file again"
        )
    return data


def _open_zip(
    data: bytes, *, what: str, max_total_bytes: int, max_members: int
) -> tuple[zipfile.ZipFile, list]:
    """Open ``data`` as a zip and check every member; returns the reader and its members.

    Checks: it is a complete zip (central directory found), member count, safe member names, no
    duplicates, no encryption/symlinks/unknown compression, declared sizes under the cap, and then every
    member is decompressed as a stream with a running total against the cap and its CRC verified, so a
    header that lies about sizes does not help.
    """
    if not data:
        raise ModelError(f"{what} is empty", REEXPORT_HINT)
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError) as e:
        raise ModelError(f"{what} is not a readable zip archive ({e})", REEXPORT_HINT) from None
    if len(infos) > max_members:
        raise UnsafeFileError(
            f"{what} has {len(infos)} members, above the limit of {max_members}", REEXPORT_HINT
        )
    seen: set[str] = set()
    declared = 0
    for info in infos:
        _check_member_name(info.filename, what)
        if info.filename in seen:
            raise UnsafeFileError(f"{what} has two members named {info.filename!r}", REEXPORT_HINT)
        seen.add(info.filename)
        if info.flag_bits & 0x1:
            raise UnsafeFileError(f"{what}: member {info.filename!r} is encrypted", REEXPORT_HINT)
        if stat.S_ISLNK(info.external_attr >> 16):
            raise UnsafeFileError(f"{what}: member {info.filename!r} is a symbolic link", REEXPORT_HINT)
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise UnsafeFileError(
                f"{what}: member {info.filename!r} uses compression method {info.compress_type}",
                REEXPORT_HINT,
            )
        declared += info.file_size
        if declared > max_total_bytes:
            raise UnsafeFileError(
                f"{what} declares more than {max_total_bytes} bytes once unpacked (zip bomb?)",
                "upload a smaller model or raise the limit",
            )
    total = 0
    for info in infos:
        got = 0
        crc = 0
        try:
            with zf.open(info) as f:
                while chunk := f.read(_READ_CHUNK):
                    got += len(chunk)
                    total += len(chunk)
                    crc = zlib.crc32(chunk, crc)
                    if total > max_total_bytes:
                        raise UnsafeFileError(
                            f"{what} unpacks to more than {max_total_bytes} bytes (zip bomb?)",
                            "upload a smaller model or raise the limit",
                        )
        except UnsafeFileError:
            raise
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, NotImplementedError) as e:
            raise ModelError(
                f"{what}: member {info.filename!r} is corrupt or truncated ({e})", REEXPORT_HINT
            ) from None
        if got != info.file_size or (crc & 0xFFFFFFFF) != info.CRC:
            raise ModelError(
                f"{what}: member {info.filename!r} does not match its header (size or CRC); the file is damaged",
                REEXPORT_HINT,
            )
    return zf, infos


def _check_member_name(name: str, what: str) -> None:
    bad = (
        not name
        or name.startswith(("/", "\\"))
        or "\\" in name
        or "\x00" in name
        or re.match(r"^[A-Za-z]:", name) is not None
        or any(part in ("..", ".", "") for part in name.rstrip("/").split("/"))
    )
    if bad:
        raise UnsafeFileError(f"{what} has a member with an unsafe path {name!r}", REEXPORT_HINT)


# --------------------------------------------------------------------------------------------------
# .pt2 archives


def vet_pt2_archive(
    path: str, *, max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES, max_members: int = DEFAULT_MAX_MEMBERS
) -> Pt2Manifest:
    """Check a ``.pt2`` file completely before ``torch.export.load`` may see it; return what it holds.

    Raises ``UnsafeFileError`` for anything that could execute code or exhaust memory while loading, and
    ``ModelError`` for files that are broken or not a ``torch.export`` archive. See ``vet_pt2_bytes``.
    """
    data = _read_capped(path, max_total_bytes, what=os.path.basename(path))
    return vet_pt2_bytes(data, source=path, max_total_bytes=max_total_bytes, max_members=max_members)


def vet_pt2_bytes(
    data: bytes,
    *,
    source: str = "<upload>",
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
    max_members: int = DEFAULT_MAX_MEMBERS,
) -> Pt2Manifest:
    """Vet the bytes of a ``.pt2`` archive (see ``docs/ingestion.md`` for the full list of checks).

    1. The zip container (``_open_zip``): complete, bounded, safe names, CRCs, no zip bomb.
    2. The layout torch 2.13 writes: one root folder, ``archive_format`` = ``pt2``, the archive version
       torch reads, exactly one program (``models/model.json``), its sample inputs and payload configs; no
       AOTInductor libraries, TorchScript or opaque pickled objects, or members torch.export does not write.
    3. Every member torch would unpickle (sample inputs, weights and constants marked ``use_pickle``,
       legacy ``model.pt`` payloads) and every other member whose first bytes look like a pickle or a
       ``torch.save`` zip: static opcode scan, then torch's ``weights_only`` loader (``safe_torch_load``).
    4. The program JSON: symbolic shape strings (fed to ``sympy.sympify``) must be plain arithmetic over
       shape symbols, ``guards_code`` (``exec``'d by ``ep.module()``) must be simple shape comparisons, and
       every graph call target must be an ATen operator or shape arithmetic.
    5. torch's own zip reader must see the same members with the same sizes, and the bytes of each pickled
       member it would read must equal the bytes that were checked.
    """
    what = os.path.basename(source) or "upload"
    if not data:
        raise ModelError(f"{what} is empty", REEXPORT_HINT)
    if not data.startswith(_ZIP_MAGIC):
        if _sniff_pickle(data):
            raise UnsafeFileError(f"{what} is a pickle stream, not a torch.export archive", REEXPORT_HINT)
        raise ModelError(f"{what} is not a .pt2 archive (not a zip file)", REEXPORT_HINT)
    zf, infos = _open_zip(data, what=what, max_total_bytes=max_total_bytes, max_members=max_members)

    names = [i.filename for i in infos if not i.filename.endswith("/")]
    roots = {n.split("/", 1)[0] for n in names}
    if len(roots) != 1 or any("/" not in n for n in names):
        raise ModelError(
            f"{what} is not a torch.export archive (members are not under one folder)", REEXPORT_HINT
        )
    root = roots.pop()
    infos_by_rel = {i.filename[len(root) + 1 :]: i for i in infos if not i.filename.endswith("/")}

    def read(rel: str) -> bytes:
        return zf.read(infos_by_rel[rel])

    if ARCHIVE_FORMAT_PATH not in infos_by_rel:
        if "data.pkl" in infos_by_rel:
            raise UnsafeFileError(
                f"{what} is a torch.save pickle archive (e.g. a .pt renamed to .pt2), not a torch.export archive",
                REEXPORT_HINT,
            )
        raise ModelError(f"{what} is a zip but not a torch.export archive (no archive_format)", REEXPORT_HINT)
    if read(ARCHIVE_FORMAT_PATH) != ARCHIVE_FORMAT_VALUE:
        raise ModelError(
            f"{what} has archive_format {read(ARCHIVE_FORMAT_PATH)[:20]!r}, not 'pt2'", REEXPORT_HINT
        )
    version = read(ARCHIVE_VERSION_PATH) if ARCHIVE_VERSION_PATH in infos_by_rel else None
    if version != ARCHIVE_VERSION_VALUE:
        raise ModelError(
            f"{what} has archive version {version!r}; torch {torch.__version__} reads version {ARCHIVE_VERSION_VALUE!r}",
            "export with torch 2.13",
        )
    models = sorted(n for n in infos_by_rel if n.startswith("models/"))
    if models != [MODEL_JSON]:
        if not models:
            raise ModelError(f"{what} holds no exported program (no {MODEL_JSON})", REEXPORT_HINT)
        raise ModelError(
            f"{what} holds {len(models)} programs ({', '.join(models)}); one is expected", REEXPORT_HINT
        )
    missing = [
        n
        for n, alt in (
            (SAMPLE_INPUTS, None),
            (WEIGHTS_CONFIG, LEGACY_WEIGHTS),
            (CONSTANTS_CONFIG, LEGACY_CONSTANTS),
        )
        if n not in infos_by_rel and (alt is None or alt not in infos_by_rel)
    ]
    if missing:
        raise ModelError(f"{what} is missing {', '.join(missing)}", REEXPORT_HINT)

    roles: dict[str, tuple[str, str]] = {}  # rel name -> (role, check)
    for rel in infos_by_rel:
        if rel in _BOOKKEEPING:
            roles[rel] = ("bookkeeping", "read as text by torch")
        elif any(rel.startswith(d) for d in _NATIVE_CODE_DIRS):
            raise UnsafeFileError(
                f"{what} contains AOTInductor code ({rel}); torch.export.load would load it as a shared library",
                REEXPORT_HINT,
            )
        elif any(rel.startswith(d) for d in _FOREIGN_DIRS):
            raise ModelError(
                f"{what} contains {rel}, which is not part of a torch.export program", REEXPORT_HINT
            )
        elif rel.startswith(EXTRA_DIR):
            roles[rel] = ("extra", "read as text by torch")
    roles[MODEL_JSON] = ("json", "graph JSON vetted")
    roles[SAMPLE_INPUTS] = ("pickle", "")
    for legacy in (LEGACY_WEIGHTS, LEGACY_CONSTANTS):
        if legacy in infos_by_rel:
            roles[legacy] = ("pickle", "")
    for config_name, directory, kind in (
        (WEIGHTS_CONFIG, WEIGHTS_DIR, "weights"),
        (CONSTANTS_CONFIG, CONSTANTS_DIR, "constants"),
    ):
        if config_name not in infos_by_rel:
            continue
        roles[config_name] = ("json", "payload config parsed")
        config = _parse_json(read(config_name), f"{what}:{config_name}")
        for fqn, meta in _payload_entries(config, f"{what}:{config_name}"):
            path_name = meta.get("path_name")
            if not isinstance(path_name, str) or not _PAYLOAD_NAME.fullmatch(path_name):
                raise UnsafeFileError(
                    f"{what}: {kind} entry {fqn!r} has an invalid path {path_name!r}", REEXPORT_HINT
                )
            rel = directory + path_name
            if path_name.startswith(CUSTOM_OBJ_PREFIX):
                raise UnsafeFileError(
                    f"{what}: constant {fqn!r} is a TorchScript object, which loading would unpickle",
                    "models with custom (torchbind) objects are not accepted",
                )
            if path_name.startswith(OPAQUE_OBJ_PREFIX):
                raise UnsafeFileError(
                    f"{what}: constant {fqn!r} is an opaque Python object that torch loads with pickle.loads",
                    "models with opaque Python constants are not accepted",
                )
            expected = WEIGHT_PREFIX if kind == "weights" else TENSOR_CONSTANT_PREFIX
            if not path_name.startswith(expected):
                raise ModelError(f"{what}: {kind} entry {fqn!r} points at {path_name!r}", REEXPORT_HINT)
            if rel not in infos_by_rel:
                raise ModelError(
                    f"{what}: {kind} entry {fqn!r} points at missing member {rel}", REEXPORT_HINT
                )
            use_pickle = meta.get("use_pickle")
            if not isinstance(use_pickle, bool):
                raise ModelError(f"{what}: {kind} entry {fqn!r} has no use_pickle flag", REEXPORT_HINT)
            if not use_pickle and not isinstance(meta.get("tensor_meta"), dict):
                raise ModelError(f"{what}: {kind} entry {fqn!r} has no tensor_meta", REEXPORT_HINT)
            role = "pickle" if use_pickle else "raw_tensor"
            # A file can back several aliasing tensors, but it cannot be both raw bytes and a pickle.
            if rel in roles and roles[rel][0] != role:
                raise UnsafeFileError(f"{what}: member {rel} is declared both raw and pickled", REEXPORT_HINT)
            roles[rel] = (role, "" if use_pickle else "copied into tensor storage by torch, never unpickled")

    unexpected = sorted(set(infos_by_rel) - set(roles))
    if unexpected:
        raise ModelError(
            f"{what} contains members torch.export.save does not write: {', '.join(unexpected[:5])}",
            REEXPORT_HINT,
        )

    # Anything that looks like a pickle or a torch.save zip and is not declared raw tensor data is checked
    # as a pickle, whatever its name: torch's loader is not the only reader that might unpickle it.
    for rel, (role, _check) in list(roles.items()):
        if role in ("bookkeeping", "extra"):
            body = read(rel)
            if body.startswith(_ZIP_MAGIC) or _sniff_pickle(body):
                if role == "bookkeeping":
                    raise UnsafeFileError(
                        f"{what}: {rel} holds a pickle/zip where torch writes text", REEXPORT_HINT
                    )
                roles[rel] = ("pickle", "")

    pickled: list[str] = []
    for rel, (role, _check) in roles.items():
        if role != "pickle":
            continue
        obj = safe_torch_load(read(rel), what=f"{what}:{rel}", max_bytes=max_total_bytes)
        _check_pickled_content(rel, obj, what)
        pickled.append(rel)
        roles[rel] = ("pickle", "opcode scan + torch weights_only load")

    program = _parse_json(read(MODEL_JSON), f"{what}:{MODEL_JSON}")
    targets, n_expr = _vet_program_json(program, f"{what}:{MODEL_JSON}")

    _cross_check_with_torch_reader(data, infos_by_rel, pickled, zf, what)

    members = tuple(
        Pt2Member(rel, roles[rel][0], infos_by_rel[rel].file_size, roles[rel][1])
        for rel in sorted(infos_by_rel)
    )
    return Pt2Manifest(
        source=source,
        root=root,
        members=members,
        total_bytes=sum(m.size for m in members),
        pickled_members=tuple(sorted(pickled)),
        graph_targets=tuple(sorted(targets)),
        symbolic_expressions=n_expr,
        extra_files=tuple(sorted(r[len(EXTRA_DIR) :] for r in infos_by_rel if r.startswith(EXTRA_DIR))),
    )


def _parse_json(raw: bytes, what: str) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: JSON errors, 4300-digit ints
        raise ModelError(f"{what} is not valid JSON ({e})", REEXPORT_HINT) from None


def _payload_entries(config: Any, what: str) -> list[tuple[str, dict]]:
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict) or not all(isinstance(v, dict) for v in entries.values()):
        raise ModelError(f"{what} is not a payload config", REEXPORT_HINT)
    return list(entries.items())


def _check_pickled_content(rel: str, obj: Any, what: str) -> None:
    """The safe load succeeded; also insist on the shape torch expects so a lax payload is not accepted."""
    if rel == SAMPLE_INPUTS:
        if not (isinstance(obj, (tuple, dict))):
            raise UnsafeFileError(
                f"{what}:{rel} holds a {type(obj).__name__}, not sample inputs", REEXPORT_HINT
            )
    elif rel.startswith((WEIGHTS_DIR + WEIGHT_PREFIX, CONSTANTS_DIR + TENSOR_CONSTANT_PREFIX)):
        if not isinstance(obj, torch.Tensor):
            raise UnsafeFileError(f"{what}:{rel} holds a {type(obj).__name__}, not a tensor", REEXPORT_HINT)


def _cross_check_with_torch_reader(
    data: bytes, infos_by_rel: dict[str, zipfile.ZipInfo], pickled: list[str], zf: zipfile.ZipFile, what: str
) -> None:
    """torch reads the archive with its own (miniz) zip reader: make sure it sees what we checked."""
    try:
        reader = torch._C.PyTorchFileReader(io.BytesIO(data))
        records = set(reader.get_all_records())
    except Exception as e:
        raise ModelError(
            f"torch cannot read {what} as an archive: {str(e).splitlines()[0][:200]}", REEXPORT_HINT
        ) from None
    if records != set(infos_by_rel):
        diff = sorted(records ^ set(infos_by_rel))[:5]
        raise UnsafeFileError(
            f"{what} looks different to torch's zip reader ({', '.join(diff)})", REEXPORT_HINT
        )
    for rel, info in infos_by_rel.items():
        if reader.get_record_size(rel) != info.file_size:
            raise UnsafeFileError(f"{what}: torch's zip reader sees another size for {rel}", REEXPORT_HINT)
    for rel in pickled:
        if bytes(reader.get_record(rel)) != zf.read(infos_by_rel[rel]):
            raise UnsafeFileError(f"{what}: torch's zip reader sees other bytes for {rel}", REEXPORT_HINT)


# --------------------------------------------------------------------------------------------------
# the program JSON

# torch/_export/serde/serialize.py passes every "expr_str" to sympy.sympify (an eval) with these names in
# scope; an expression may only call them and build shape arithmetic.
_SYMPY_CALLABLES = {
    "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Max", "Min", "Mod", "Abs", "floor", "ceiling",
    "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or", "Not", "Pow",
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv",
    "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv",
    "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal",
    "ToFloat", "OpaqueUnaryFn_sqrt", "BitwiseFn_bitwise_and", "BitwiseFn_bitwise_or", "Identity",
}  # fmt: skip
_POW_CALLABLES = {"Pow", "PowByNatural", "FloatPow"}
_SYMPY_NAMES = {"True", "False", "oo", "zoo", "nan"}
_ASSUMPTIONS = {
    "positive", "negative", "integer", "nonnegative", "nonpositive", "real", "finite", "nonzero", "zero",
    "commutative", "even", "odd", "extended_real", "rational", "infinite", "prime", "composite",
}  # fmt: skip
_MAX_EXPR_CHARS = 2000
_MAX_INT = 1 << 63
_MAX_POW_EXPONENT = 64

# Node targets resolved by torch's deserializer with getattr on torch / operator / math and called when the
# graph runs. ATen ops and shape arithmetic are all a model needs.
_OPERATOR_TARGETS = {
    "getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "neg", "pos", "pow",
    "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "not_", "abs",
}  # fmt: skip
_TORCH_SYM_TARGETS = {
    "sym_int",
    "sym_float",
    "sym_max",
    "sym_min",
    "sym_not",
    "sym_ite",
    "sym_sqrt",
    "sym_sum",
}
_MATH_TARGETS = {"floor", "ceil", "trunc", "sqrt"}
_REFUSED_ATEN = {"from_file", "_print"}  # read files / write to the console
_GUARD = re.compile(
    r"L\['[A-Za-z_][A-Za-z0-9_]*'\](\[[0-9]+\])*(\.(size|stride)\(\)\[[0-9]+\])? (==|!=|>=|<=|<|>) -?[0-9]+"
)


def _vet_program_json(program: Any, what: str) -> tuple[set[str], int]:
    """Check the strings torch evaluates or resolves while loading and running the program."""
    if not isinstance(program, dict) or not isinstance(program.get("graph_module"), dict):
        raise ModelError(f"{what} is not a serialized ExportedProgram", REEXPORT_HINT)
    guards = program.get("guards_code", [])
    if not isinstance(guards, list) or not all(isinstance(g, str) and _GUARD.fullmatch(g) for g in guards):
        bad = (
            guards
            if not isinstance(guards, list)
            else next(g for g in guards if not (isinstance(g, str) and _GUARD.fullmatch(g)))
        )
        raise UnsafeFileError(
            f"{what} has guards_code that is not a plain shape check ({str(bad)[:120]!r}); torch would exec it",
            REEXPORT_HINT,
        )
    ranges = program.get("range_constraints", {})
    if not isinstance(ranges, dict):
        raise ModelError(f"{what} has malformed range_constraints", REEXPORT_HINT)
    for key, rng in ranges.items():
        ok = (
            _SYMBOL_NAME.fullmatch(str(key))
            and isinstance(rng, dict)
            and all(type(rng.get(k)) is int or rng.get(k) is None for k in ("min_val", "max_val"))
        )
        if not ok:
            raise UnsafeFileError(f"{what} has a malformed range constraint {str(key)[:60]!r}", REEXPORT_HINT)

    targets: set[str] = set()
    n_expr = 0
    stack: list[Any] = [program]
    while stack:
        obj = stack.pop()
        if isinstance(obj, dict):
            if isinstance(obj.get("target"), str) and isinstance(obj.get("inputs"), list):
                targets.add(_check_target(obj["target"], what))
            for key, value in obj.items():
                if key == "expr_str":
                    _check_sym_expr(value, what)
                    n_expr += 1
                else:
                    stack.append(value)
        elif isinstance(obj, list):
            stack.extend(obj)
    return targets, n_expr


def _check_target(target: str, what: str) -> str:
    if target.startswith("torch.ops.aten."):
        op = target[len("torch.ops.aten.") :].split(".")[0]
        if op in _REFUSED_ATEN:
            raise UnsafeFileError(f"{what} calls {target}, which touches files or the console", REEXPORT_HINT)
        if not re.fullmatch(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)?", target[len("torch.ops.aten.") :]):
            raise UnsafeFileError(f"{what} has a malformed operator name {target[:80]!r}", REEXPORT_HINT)
        return target
    if target.startswith("torch.ops.higher_order."):
        raise ModelError(
            f"{what} uses {target} (control flow or another higher-order op), which the engine cannot prune",
            "remove data-dependent control flow from forward() and export again",
        )
    if target.startswith("torch.ops."):
        raise ModelError(
            f"{what} calls the custom operator {target}, which is not available here",
            "export a model built from standard PyTorch layers",
        )
    head, _, name = target.partition(".")
    if (
        (head == "_operator" and name in _OPERATOR_TARGETS)
        or (head == "torch" and name in _TORCH_SYM_TARGETS)
        or (head == "math" and name in _MATH_TARGETS)
    ):
        return target
    raise UnsafeFileError(
        f"{what} calls {target[:80]!r}, which is not an ATen operator or shape arithmetic", REEXPORT_HINT
    )


def _check_sym_expr(expr: Any, what: str) -> None:
    """Accept only what ``sympy.sympify`` can evaluate without running anything but shape arithmetic."""
    if not isinstance(expr, str) or len(expr) > _MAX_EXPR_CHARS:
        raise UnsafeFileError(f"{what} has an oversized or non-text symbolic expression", REEXPORT_HINT)
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError, RecursionError):
        raise UnsafeFileError(
            f"{what} has a symbolic expression that is not arithmetic: {expr[:120]!r}", REEXPORT_HINT
        ) from None
    _check_expr_node(tree.body, expr, what, in_pow=False)


def _check_expr_node(node: ast.AST, expr: str, what: str, *, in_pow: bool) -> None:
    def refuse(reason: str) -> None:
        raise UnsafeFileError(
            f"{what} has a symbolic expression torch would eval that is not shape arithmetic "
            f"({reason}): {expr[:120]!r}",
            REEXPORT_HINT,
        )

    if isinstance(node, ast.Constant):
        v = node.value
        if isinstance(v, bool) or v is None:
            return
        if isinstance(v, int):
            if abs(v) > _MAX_INT:
                refuse("integer too large")
            return
        if isinstance(v, float):
            return
        if isinstance(v, str) and _SYMBOL_NAME.fullmatch(v):
            return
        refuse(f"constant {v!r}")
    elif isinstance(node, ast.Name):
        if node.id in _SYMPY_CALLABLES or node.id in _SYMPY_NAMES or _SYMBOL_NAME.fullmatch(node.id):
            return
        refuse(f"name {node.id!r}")
    elif isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name) or node.func.id not in _SYMPY_CALLABLES:
            refuse("call of something other than a sympy shape function")
        is_pow = node.func.id in _POW_CALLABLES  # type: ignore[union-attr]
        if is_pow:
            if in_pow:
                refuse("nested power")
            if len(node.args) == 2:
                exp = node.args[1]
                lit = exp.args[0] if isinstance(exp, ast.Call) and exp.args else exp
                if (
                    isinstance(lit, ast.Constant)
                    and isinstance(lit.value, int)
                    and abs(lit.value) > _MAX_POW_EXPONENT
                ):
                    refuse("exponent too large")
        for a in node.args:
            _check_expr_node(a, expr, what, in_pow=in_pow or is_pow)
        for kw in node.keywords:
            if kw.arg not in _ASSUMPTIONS or not (
                isinstance(kw.value, ast.Constant) and isinstance(kw.value.value, bool)
            ):
                refuse(f"keyword {kw.arg!r}")
    elif isinstance(node, ast.BinOp):
        if not isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod)):
            refuse(f"operator {type(node.op).__name__}")
        _check_expr_node(node.left, expr, what, in_pow=in_pow)
        _check_expr_node(node.right, expr, what, in_pow=in_pow)
    elif isinstance(node, ast.UnaryOp):
        if not isinstance(node.op, (ast.USub, ast.UAdd, ast.Not)):
            refuse(f"operator {type(node.op).__name__}")
        _check_expr_node(node.operand, expr, what, in_pow=in_pow)
    elif isinstance(node, ast.Compare):
        _check_expr_node(node.left, expr, what, in_pow=in_pow)
        for c in node.comparators:
            _check_expr_node(c, expr, what, in_pow=in_pow)
    elif isinstance(node, ast.BoolOp):
        for v in node.values:
            _check_expr_node(v, expr, what, in_pow=in_pow)
    else:
        refuse(type(node).__name__)
