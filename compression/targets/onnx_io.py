"""Export a PyTorch module to ONNX, verified against PyTorch with ONNX Runtime.

What works with torch 2.13 (measured on these machines, see ``docs/targets.md``):

- the TorchScript exporter (``torch.onnx.export(..., dynamo=False)``, deprecated but present) handles plain
  modules and fx ``GraphModule``s made of aten ``call_function`` nodes plus ``nn.Conv2d`` submodules, folds
  batch norms into convolutions, and is fast (0.06 s for one layer, 2 s for a ResNet-20);
- it refuses the modules ``torch.export.ExportedProgram.module()`` returns (they forbid ``train()``);
- the dynamo exporter (``dynamo=True``, via onnxscript) handles all three but takes 1-12 s, and needs an
  example batch of at least 2 for a dynamic batch axis (a batch of 1 is specialised to a constant). It
  writes opset 18; asking for 17 fails inside the version converter (``ReduceMean`` axes), so 18 is the
  default here (ONNX Runtime 1.32 runs it).

``export_onnx`` tries TorchScript first and falls back to dynamo (``exporter="auto"``), and checks that
ONNX Runtime loads the file and reproduces PyTorch's outputs within ``atol`` (relative to the output scale)
at the example batch and, for a dynamic batch axis, at a second batch size.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from compression.errors import ModelError

DEFAULT_OPSET = 18
EXPORTERS = ("auto", "torchscript", "dynamo")
_MAX_BATCH = 4096


@dataclass
class OnnxExport:
    """What ``export_onnx`` produced: the file, which exporter made it, and how well it matches PyTorch."""

    path: Path
    exporter: str
    opset: int
    input_names: list[str]
    output_names: list[str]
    dynamic_batch: bool
    export_s: float
    max_abs_diff: float | None = None
    attempts: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["path"] = str(self.path)
        return d


def as_inputs(
    example_input: torch.Tensor | tuple[torch.Tensor, ...] | list[torch.Tensor],
) -> tuple[torch.Tensor, ...]:
    """Normalise an example input (one tensor or a sequence of tensors) to a tuple of tensors."""
    if isinstance(example_input, torch.Tensor):
        return (example_input,)
    if (
        isinstance(example_input, (tuple, list))
        and example_input
        and all(isinstance(t, torch.Tensor) for t in example_input)
    ):
        return tuple(example_input)
    raise ModelError(
        f"example input must be a tensor or a tuple of tensors, got {type(example_input).__name__}",
        "pass a batch of inputs shaped like the model's input",
    )


def _flatten_outputs(out: Any) -> list[torch.Tensor]:
    flat, _ = torch.utils._pytree.tree_flatten(out)
    return [t for t in flat if isinstance(t, torch.Tensor)]


@contextlib.contextmanager
def _quiet() -> Any:
    """Silence the exporters' progress prints, deprecation warnings and registry log lines."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Any:
    """Export in eval mode without changing the caller's module for good (some modules refuse train())."""
    was_training = bool(getattr(module, "training", False))
    if was_training:
        try:
            module.eval()
        except NotImplementedError:
            # torch.export's unlifted modules refuse eval()/train(); their graph already fixes the mode
            was_training = False
    try:
        yield
    finally:
        if was_training:
            module.train(True)


def _export_torchscript(
    module: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    path: Path,
    opset: int,
    names: tuple[list[str], list[str]],
    dynamic_batch: bool,
) -> None:
    in_names, out_names = names
    dynamic_axes = {n: {0: "batch"} for n in in_names + out_names} if dynamic_batch else None
    torch.onnx.export(
        module,
        inputs,
        str(path),
        dynamo=False,
        opset_version=opset,
        input_names=in_names,
        output_names=out_names,
        dynamic_axes=dynamic_axes,
        do_constant_folding=True,
    )


def _export_dynamo(
    module: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    path: Path,
    opset: int,
    names: tuple[list[str], list[str]],
    dynamic_batch: bool,
) -> None:
    in_names, out_names = names
    dynamic_shapes = None
    if dynamic_batch:
        # a batch of 1 would be specialised to a constant, so trace with a batch of 2
        if inputs[0].shape[0] == 1:
            inputs = tuple(t.expand(2, *t.shape[1:]).contiguous() for t in inputs)
        batch = torch.export.Dim("batch", min=1, max=_MAX_BATCH)
        dynamic_shapes = tuple({0: batch} for _ in inputs)
    program = torch.onnx.export(
        module,
        inputs,
        None,
        dynamo=True,
        opset_version=opset,
        input_names=in_names,
        output_names=out_names,
        dynamic_shapes=dynamic_shapes,
        optimize=True,
        verbose=False,
    )
    program.save(str(path))


def _run_torch(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
    with torch.inference_mode():
        return [t.detach().cpu().numpy() for t in _flatten_outputs(module(*inputs))]


def verify_onnx(
    path: Path | str,
    module: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    *,
    atol: float = 1e-4,
    second_batch: int | None = None,
    input_names: list[str] | None = None,
) -> float:
    """Run ``path`` in ONNX Runtime and compare with ``module``; returns the largest absolute difference.

    Differences are judged against ``atol * max(1, |reference|)``; raises ``ModelError`` when they exceed it
    or when ONNX Runtime cannot load or run the file.
    """
    import onnxruntime as ort

    try:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ModelError(f"ONNX Runtime cannot load the exported model: {exc}") from exc
    names = {i.name for i in sess.get_inputs()}
    in_names = input_names or _input_names(len(inputs))
    batches = [inputs]
    if second_batch:
        g = torch.Generator().manual_seed(1)
        batches.append(
            tuple(
                torch.randn((second_batch, *t.shape[1:]), generator=g, dtype=t.dtype)
                if t.is_floating_point()
                else t[:1].expand(second_batch, *t.shape[1:]).contiguous()
                for t in inputs
            )
        )
    worst = 0.0
    for xs in batches:
        ref = _run_torch(module, xs)
        try:
            got = sess.run(
                None, {n: t.detach().cpu().numpy() for n, t in zip(in_names, xs, strict=True) if n in names}
            )
        except Exception as exc:
            raise ModelError(
                f"ONNX Runtime cannot run the exported model at batch {xs[0].shape[0]}: {exc}"
            ) from exc
        if len(got) != len(ref):
            raise ModelError(f"the exported model has {len(got)} outputs, PyTorch gives {len(ref)}")
        for r, o in zip(ref, got, strict=True):
            if r.shape != o.shape:
                raise ModelError(f"exported output shape {o.shape} differs from PyTorch's {r.shape}")
            if r.size == 0:
                continue
            diff = float(np.max(np.abs(r.astype(np.float64) - o.astype(np.float64))))
            worst = max(worst, diff)
            scale = max(1.0, float(np.max(np.abs(r))))
            if not diff <= atol * scale:
                raise ModelError(
                    f"the exported model differs from PyTorch by {diff:.3g} (allowed {atol * scale:.3g}) "
                    f"at batch {xs[0].shape[0]}"
                )
    return worst


def export_onnx(
    module: nn.Module,
    example_input: torch.Tensor | tuple[torch.Tensor, ...],
    path: Path | str,
    opset: int = DEFAULT_OPSET,
    *,
    dynamic_batch: bool = True,
    exporter: str = "auto",
    verify: bool = True,
    atol: float | None = None,
) -> OnnxExport:
    """Export ``module`` (called as ``module(*inputs)``) to an ONNX file at ``path`` and verify it.

    ``exporter``: ``"torchscript"``, ``"dynamo"`` or ``"auto"`` (TorchScript, then dynamo if TorchScript fails
    or does not match). ``dynamic_batch`` makes axis 0 of every input and output symbolic. With ``verify``,
    ONNX Runtime must reproduce PyTorch's outputs within ``atol`` (relative to the output scale), at the
    example batch and at another batch size when the batch is dynamic. The module's train/eval mode is left
    as it was; ``atol`` defaults to 1e-4, wider for a model with activation quantizers
    (``compression.quant.output_tolerance``). Raises ``ModelError`` (with every exporter's reason) when no exporter produces a valid file.
    """
    if exporter not in EXPORTERS:
        raise ModelError(f"unknown ONNX exporter {exporter!r}", f"use one of {', '.join(EXPORTERS)}")
    if not isinstance(opset, int) or opset < 13:
        raise ModelError(
            f"ONNX opset {opset!r} is not supported", f"use an opset >= 13 (default {DEFAULT_OPSET})"
        )
    inputs = tuple(t.detach() for t in as_inputs(example_input))
    if atol is None:
        from compression.quant import output_tolerance

        atol = output_tolerance(module, 1e-4)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    in_names = _input_names(len(inputs))
    with _eval_mode(module):
        n_out = len(_flatten_outputs(_run_torch_outputs(module, inputs)))
        out_names = ["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)]
        order = ["torchscript", "dynamo"] if exporter == "auto" else [exporter]
        attempts: list[str] = []
        for name in order:
            fn = _export_torchscript if name == "torchscript" else _export_dynamo
            t0 = time.perf_counter()
            try:
                with _quiet():
                    fn(module, inputs, path, opset, (in_names, out_names), dynamic_batch)
                export_s = time.perf_counter() - t0
                diff = None
                if verify:
                    second = (inputs[0].shape[0] % 3) + 2 if dynamic_batch else None
                    diff = verify_onnx(
                        path, module, inputs, atol=atol, second_batch=second, input_names=in_names
                    )
            except Exception as exc:  # each exporter fails in its own ways; keep every reason
                first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                attempts.append(f"{name}: {type(exc).__name__}: {first_line[:300]}")
                continue
            attempts.append(f"{name}: ok")
            return OnnxExport(path, name, opset, in_names, out_names, dynamic_batch, export_s, diff, attempts)
    raise ModelError(
        "the model cannot be exported to ONNX: " + "; ".join(attempts), "see docs/targets.md, ONNX export"
    )


def _input_names(n: int) -> list[str]:
    return ["input"] if n == 1 else [f"input_{i}" for i in range(n)]


def _run_torch_outputs(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Any:
    with torch.inference_mode():
        return module(*inputs)
