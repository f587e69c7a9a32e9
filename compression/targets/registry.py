"""Which targets exist, how a target description is checked, and which backend measures it.

Built-in targets:

- ``local-tvm``: TVM on this CPU (``{"kind": "llvm", ...}`` from ``tvm_backend.default_local_target()``),
- ``local-ort``: ONNX Runtime, 2 threads,
- ``local-torch``: PyTorch eager, 2 threads,
- ``analytic``: BOPs from shapes and bits, no hardware (not a time; see ``analytic.py``).

Users add targets as data: ``register_target(dict)``, or ``load_targets_file(path)`` with a JSON (or, when
PyYAML is installed, YAML) file holding a list of descriptions or ``{"targets": [...]}``. A description is
``{"name", "backend", "settings", "round_to", "description"}``; ``validate_target`` refuses anything else
with a ``TargetError`` that says what is wrong and how to fix it.

TVM is loaded lazily (``compression.targets.tvm_backend``) and only for TVM targets, so a missing or broken
TVM never stops ONNX Runtime or PyTorch targets from working.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from compression.errors import TargetError
from compression.targets.base import BACKENDS, Backend, TargetSpec

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_TOP_FIELDS = {"name", "backend", "settings", "round_to", "description"}
_LOCAL_COMMON = {"threads", "lock", "wait_s"}
_SETTINGS = {
    "torch": _LOCAL_COMMON,
    "onnxruntime": _LOCAL_COMMON | {"optimization", "spinning"},
    "analytic": {"metric"},
}
_TVM_RPC_FIELDS = {"host", "port", "key", "timeout_s", "priority", "session_timeout_s"}

_user_targets: dict[str, TargetSpec] = {}


# Channel rounding a backend needs by default. ONNX Runtime's float convolutions run in its blocked layout (NCHWc)
# only when the channel counts are multiples of its block, 16 floats with AVX-512 and 8 with AVX2 (MLAS's NCHWc
# block size). Measured on ResNet-20/digits on an AVX-512 machine (session 6, interleaved, 5 rounds): groups at
# multiples of 16 (16/16/48 channels) 0.65 of the original, at multiples of 8 only (8/24/56) 1.03, one channel fewer
# in every group 2.3x slower.
def ort_block_channels(cpuinfo: str | None = None) -> int:
    """ONNX Runtime's NCHWc block on this CPU: 16 where AVX-512F is available, else 8."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return 8
    flags = next((ln.split(":", 1)[1].split() for ln in cpuinfo.splitlines() if ln.startswith("flags")), [])
    return 16 if "avx512f" in flags else 8


def default_round_to(backend: str) -> int:
    """The channel rounding a target of this backend gets unless it sets its own."""
    return ort_block_channels() if backend == "onnxruntime" else 1


def _builtin(name: str) -> TargetSpec | None:
    if name == "local-ort":
        return TargetSpec(
            "local-ort",
            "onnxruntime",
            {"threads": 2},
            round_to=default_round_to("onnxruntime"),
            description="ONNX Runtime on this machine's CPU, 2 threads",
        )
    if name == "local-torch":
        return TargetSpec(
            "local-torch",
            "torch",
            {"threads": 2},
            description="PyTorch eager on this machine's CPU, 2 threads",
        )
    if name == "analytic":
        return TargetSpec(
            "analytic",
            "analytic",
            {"metric": "bops"},
            description="BOPs from shapes and bit-widths (no hardware, not a time)",
        )
    if name == "local-tvm":
        tvm_backend = _tvm_module()
        target = tvm_backend.default_local_target()
        return TargetSpec(
            "local-tvm", "tvm", {"target": target}, description="TVM (llvm) on this machine's CPU"
        )
    return None


BUILTIN_NAMES = ("local-tvm", "local-ort", "local-torch", "analytic")


def _tvm_module() -> Any:
    try:
        from compression.targets import tvm_backend
    except Exception as exc:  # an ImportError, or TVM's own failure while loading its library
        raise TargetError(
            f"the TVM backend is not available: {type(exc).__name__}: {exc}",
            "install apache-tvm (see requirements.txt) or use local-ort / local-torch",
        ) from exc
    return tvm_backend


def _check_int(label: str, value: Any, lo: int, hi: int | None, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TargetError(f"{label} must be an integer, got {value!r}", hint)
    if value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise TargetError(f"{label}={value} is out of range", f"use a value {rng}; {hint}")
    return value


def _check_seconds(label: str, value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise TargetError(f"{label} must be a positive number of seconds, got {value!r}")
    return float(value)


def _check_local(name: str, settings: dict[str, Any], local: bool = True) -> None:
    cores = os.cpu_count() or 1
    if "threads" in settings:
        hint = f"this machine has {cores} cores" if local else "the device's core count"
        _check_int(f"target {name}: threads", settings["threads"], 1, cores if local else None, hint)
    if "lock" in settings and not (isinstance(settings["lock"], str) and settings["lock"].strip()):
        raise TargetError(f"target {name}: lock must be a non-empty device name", "e.g. local-cpu")
    if "wait_s" in settings:
        _check_seconds(f"target {name}: wait_s", settings["wait_s"])


def _check_tvm(name: str, settings: dict[str, Any]) -> None:
    target = settings.get("target")
    if target is not None:
        if isinstance(target, str):
            if not target.strip():
                raise TargetError(f"target {name}: the TVM target string is empty", 'e.g. {"kind": "llvm"}')
        elif isinstance(target, Mapping):
            if not isinstance(target.get("kind"), str) or not target["kind"]:
                raise TargetError(
                    f'target {name}: the TVM target dict needs a "kind"',
                    'e.g. {"kind": "llvm", "num-cores": 2}',
                )
        else:
            raise TargetError(
                f"target {name}: the TVM target must be a dict or a string, got {type(target).__name__}"
            )
    rpc = settings.get("rpc")
    if rpc is not None:
        if not isinstance(rpc, Mapping):
            raise TargetError(f"target {name}: rpc must be an object with host, port and key")
        unknown = sorted(set(rpc) - _TVM_RPC_FIELDS)
        if unknown:
            raise TargetError(
                f"target {name}: unknown rpc fields {unknown}", f"allowed: {sorted(_TVM_RPC_FIELDS)}"
            )
        for required in ("host", "port", "key"):
            if required not in rpc:
                raise TargetError(
                    f"target {name}: rpc is missing {required!r}",
                    "a remote device needs the tracker's host and port and the device key it registered",
                )
        if not isinstance(rpc["host"], str) or not rpc["host"].strip():
            raise TargetError(f"target {name}: rpc host must be a host name or address, got {rpc['host']!r}")
        _check_int(f"target {name}: rpc port", rpc["port"], 1, 65535, "the TVM RPC tracker's port, e.g. 9190")
        if not isinstance(rpc["key"], str) or not rpc["key"].strip():
            raise TargetError(
                f"target {name}: rpc key must be the device key, got {rpc['key']!r}", "e.g. rpi4"
            )
        for t in ("timeout_s", "session_timeout_s"):
            if t in rpc:
                _check_seconds(f"target {name}: rpc {t}", rpc[t])
    # a TVM target may be a remote device: its thread count is not bounded by this machine's cores
    _check_local(name, {k: v for k, v in settings.items() if k in _LOCAL_COMMON}, local=rpc is None)
    # the TVM backend may check its own settings further (tuning options ...); a broken TVM install must not
    # make a description invalid, so only a loaded backend is asked
    try:
        from compression.targets import tvm_backend
    except Exception:
        return
    validate = getattr(tvm_backend, "validate_settings", None)
    if callable(validate):
        validate(name, settings)


def validate_target(d: Mapping[str, Any]) -> TargetSpec:
    """Check a target description and return it as a ``TargetSpec``; raise ``TargetError`` if it is invalid."""
    if isinstance(d, TargetSpec):
        d = d.to_dict()
    if not isinstance(d, Mapping):
        raise TargetError(f"a target description must be an object, got {type(d).__name__}")
    unknown = sorted(set(d) - _TOP_FIELDS)
    if unknown:
        raise TargetError(f"unknown target fields {unknown}", f"allowed: {sorted(_TOP_FIELDS)}")
    name = d.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise TargetError(
            f"invalid target name {name!r}",
            "use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit",
        )
    backend = d.get("backend")
    if backend not in BACKENDS:
        raise TargetError(f"target {name}: unknown backend {backend!r}", f"use one of {', '.join(BACKENDS)}")
    settings = d.get("settings", {}) or {}
    if not isinstance(settings, Mapping):
        raise TargetError(f"target {name}: settings must be an object, got {type(settings).__name__}")
    settings = json.loads(json.dumps(settings))  # plain data only (also copies it)
    round_to = _check_int(
        f"target {name}: round_to",
        d["round_to"] if d.get("round_to") is not None else default_round_to(backend),
        1,
        1024,
        "channels are kept in multiples of it",
    )
    description = d.get("description", "")
    if not isinstance(description, str):
        raise TargetError(f"target {name}: description must be text")
    if backend == "tvm":
        _check_tvm(name, settings)
    else:
        allowed = _SETTINGS[backend]
        extra = sorted(set(settings) - allowed)
        if extra:
            raise TargetError(
                f"target {name}: unknown {backend} settings {extra}", f"allowed: {sorted(allowed)}"
            )
        if backend in ("torch", "onnxruntime"):
            _check_local(name, settings)
        if backend == "onnxruntime":
            from compression.targets.ort_backend import OPTIMIZATION_LEVELS

            if settings.get("optimization", "all") not in OPTIMIZATION_LEVELS:
                raise TargetError(
                    f"target {name}: unknown optimization {settings['optimization']!r}",
                    f"use one of {', '.join(OPTIMIZATION_LEVELS)}",
                )
            if not isinstance(settings.get("spinning", True), bool):
                raise TargetError(f"target {name}: spinning must be true or false")
        if backend == "analytic":
            from compression.targets.analytic import METRICS

            if settings.get("metric", "bops") not in METRICS:
                raise TargetError(
                    f"target {name}: unknown analytic metric {settings['metric']!r}",
                    f"use one of {', '.join(METRICS)}",
                )
    return TargetSpec(
        name=name, backend=backend, settings=dict(settings), round_to=round_to, description=description
    )


def register_target(d: Mapping[str, Any] | TargetSpec, *, replace: bool = False) -> TargetSpec:
    """Validate and add a user target for this process; built-in names cannot be redefined."""
    spec = validate_target(d)
    if spec.name in BUILTIN_NAMES:
        raise TargetError(f"target name {spec.name!r} is built in", "choose another name")
    if spec.name in _user_targets and not replace and _user_targets[spec.name] != spec:
        raise TargetError(
            f"target {spec.name!r} is already defined differently", "rename it, or pass replace=True"
        )
    _user_targets[spec.name] = spec
    return spec


def load_targets_file(path: str | Path) -> list[TargetSpec]:
    """Read target descriptions from a JSON (or YAML, with PyYAML) file, validate and register them all.

    The file holds a list of descriptions or ``{"targets": [...]}``. Nothing is registered unless every
    description is valid.
    """
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise TargetError(f"cannot read targets file {p}: {exc.strerror or exc}") from exc
    if p.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as exc:
            raise TargetError(
                f"{p} is YAML but PyYAML is not installed", "write the targets as JSON"
            ) from exc
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise TargetError(f"{p} is not valid YAML: {exc}") from exc
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TargetError(f"{p} is not valid JSON: {exc.msg} at line {exc.lineno}") from exc
    if isinstance(data, Mapping) and set(data) == {"targets"}:
        data = data["targets"]
    if not isinstance(data, list):
        raise TargetError(f'{p} must hold a list of targets or {{"targets": [...]}}')
    specs = []
    for i, d in enumerate(data):
        try:
            specs.append(validate_target(d))
        except TargetError as exc:
            raise TargetError(f"{p}, target #{i + 1}: {exc.what}", exc.hint) from exc
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise TargetError(f"{p} defines targets more than once: {', '.join(dup)}")
    for s in specs:
        register_target(s, replace=True)
    return specs


def list_targets() -> list[TargetSpec]:
    """Built-in targets (``local-tvm`` only when TVM loads) and the registered user targets."""
    out = []
    for name in BUILTIN_NAMES:
        try:
            spec = _builtin(name)
        except TargetError:
            continue
        if spec is not None:
            out.append(spec)
    return out + list(_user_targets.values())


def get_target(target: str | Mapping[str, Any] | TargetSpec) -> TargetSpec:
    """A ``TargetSpec`` from a name (built-in or registered), a description dict, or a spec (re-validated)."""
    if isinstance(target, TargetSpec):
        return validate_target(target.to_dict())
    if isinstance(target, Mapping):
        return validate_target(target)
    if not isinstance(target, str):
        raise TargetError(f"a target is a name, a description or a TargetSpec, got {type(target).__name__}")
    if target in _user_targets:
        return _user_targets[target]
    spec = _builtin(target)
    if spec is None:
        known = list(BUILTIN_NAMES) + sorted(_user_targets)
        raise TargetError(
            f"unknown target {target!r}", f"known targets: {', '.join(known)}; or add one (docs/targets.md)"
        )
    return spec


def make_backend(spec: TargetSpec | str | Mapping[str, Any]) -> Backend:
    """The backend object that measures on ``spec`` (TVM is imported only for TVM targets)."""
    spec = get_target(spec)
    if spec.backend == "onnxruntime":
        from compression.targets.ort_backend import OrtBackend

        return OrtBackend(spec)
    if spec.backend == "torch":
        from compression.targets.torch_backend import TorchBackend

        return TorchBackend(spec)
    if spec.backend == "analytic":
        from compression.targets.analytic import AnalyticBackend

        return AnalyticBackend(spec)
    if spec.backend == "tvm":
        return _tvm_module().make_backend(spec)
    raise TargetError(f"target {spec.name}: unknown backend {spec.backend!r}")
