"""Models out: the compressed model as ``.pt2`` and ONNX (float and real int8), plus ``report.json``.

- ``model.pt2``: ``torch.export`` of the compressed model, loadable with ``torch.export.load`` and runnable
  with ``.module()``. Pruned layers are really smaller; quantized weights are stored on their quantization
  grid and activation quantizers appear as ``fake_quantize_per_tensor_affine`` ops, so it reproduces the
  searched model's accuracy exactly.
- ``model.onnx``: opset 18, dynamic batch, float activations (ONNX has no sub-8-bit activation type every
  runtime runs); weights on their quantization grid.
- ``model.int8.onnx``: when some layers have both bit-widths at 8 or fewer, ONNX Runtime's static QDQ
  quantization (int8 weights per channel, uint8 activations calibrated on training samples) of those layers
  and only those: the format that really runs in int8, with the layers the search left float (or at bits
  ONNX Runtime has no int8 kernel for) in float, as ONNX Runtime ran the model when the search measured it.
  Bit-widths below 8 run as int8 there; the report says so.
- ``report.json``: policy, costs before/after, accuracies, bit-widths per layer and what each file runs
  at, seed, library versions.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from compression.policy import FLOAT_BITS, Policy
from compression.quant import bit_widths, quantization_plan, strip_act_quantizers

HOW_TO_LOAD = {
    "pt2": "import torch; m = torch.export.load('model.pt2').module(); m(x)  # x: float32 (N, C, H, W), normalised",
    "onnx": "import onnxruntime as ort; s = ort.InferenceSession('model.onnx'); s.run(None, {'input': x})",
    "int8.onnx": "import onnxruntime as ort; s = ort.InferenceSession('model.int8.onnx'); s.run(None, {'input': x})",
    "report": "json.load(open('report.json')): policy, costs, accuracies, bit-widths, versions",
}


def export_onnx_float(model: nn.Module, example_input: torch.Tensor, path: str) -> dict[str, Any]:
    """ONNX (dynamic batch, verified against PyTorch in ONNX Runtime) of ``model`` without activation quantizers."""
    from compression.targets.onnx_io import export_onnx

    float_model = copy.deepcopy(model).eval()
    strip_act_quantizers(float_model)
    res = export_onnx(float_model, example_input, path)
    return {
        "path": path,
        "bytes": os.path.getsize(path),
        "opset": res.opset,
        "max_abs_diff": res.max_abs_diff,
    }


def export_onnx_int8(
    onnx_path: str,
    calib: torch.Tensor,
    out_path: str,
    *,
    model: nn.Module | None = None,
    example_input: torch.Tensor | None = None,
    int8_layers: list[str] | None = None,
) -> dict[str, Any]:
    """Static QDQ int8 quantization of an ONNX model with ONNX Runtime, calibrated on ``calib``.

    With ``int8_layers`` (names of ``model``'s layers, the float model ``onnx_path`` was exported from), only
    those layers (and an activation each one alone feeds) are quantized; the others stay float, as ONNX Runtime
    ran them when the search measured the model. Without, every operation the quantizer supports is.
    """
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader

    input_name = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"]).get_inputs()[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(
                [{input_name: calib[i : i + 16].numpy().astype(np.float32)} for i in range(0, len(calib), 16)]
            )

        def get_next(self):
            return next(self._it, None)

    nodes = None
    src = onnx_path
    with tempfile.TemporaryDirectory(prefix="compression-int8-") as tmp:
        if int8_layers is not None:
            from compression.targets.ort_backend import int8_node_names
            from compression.targets.workloads import extract_workloads

            if model is None or example_input is None:
                raise ValueError(
                    "export_onnx_int8 needs the model and an example input to quantize some layers"
                )
            graph = onnx.load(onnx_path)
            workloads = extract_workloads(model, example_input[:1], quantization_plan(model))
            nodes = int8_node_names(graph, workloads, int8_layers)
            src = os.path.join(tmp, "named.onnx")
            onnx.save(graph, src)
        # onnxruntime's quantizer logs advice on the root logger at WARNING; keep the user's logs clean
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)
        try:
            _quantize(src, out_path, Reader(), nodes)
        finally:
            root.setLevel(level)
    return {"path": out_path, "bytes": os.path.getsize(out_path)}


def _quantize(onnx_path: str, out_path: str, reader, nodes: list[str] | None = None) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    quantize_static(
        onnx_path,
        out_path,
        reader,
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        weight_type=QuantType.QInt8,
        activation_type=QuantType.QUInt8,
        nodes_to_quantize=nodes,
    )


def write_artifacts(
    model: nn.Module,
    example_input: torch.Tensor,
    out_dir: str,
    *,
    policy: Policy | None,
    calib: torch.Tensor | None,
    report: dict[str, Any],
    formats: tuple[str, ...] = ("pt2", "onnx"),
    meta: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Write the compressed model in the requested formats and ``report.json``; returns the file list."""
    from compression.pipeline import save_pt2

    os.makedirs(out_dir, exist_ok=True)
    files: list[dict[str, Any]] = []
    bits = bit_widths(model)
    if "pt2" in formats:
        saved = save_pt2(model, example_input, os.path.join(out_dir, "model.pt2"), meta)
        note = (
            "torch.export program, dynamic batch"
            if saved["dynamic_batch"]
            else "torch.export program, batch fixed"
        )
        files.append(
            {
                "path": saved["path"],
                "bytes": saved["bytes"],
                "format": "pt2",
                "note": note,
                "how": HOW_TO_LOAD["pt2"],
            }
        )
    if "onnx" in formats:
        onnx_path = os.path.join(out_dir, "model.onnx")
        saved = export_onnx_float(model, example_input, onnx_path)
        diff = saved["max_abs_diff"]
        files.append(
            {
                **saved,
                "format": "onnx",
                "note": f"ONNX opset {saved['opset']}, float activations, dynamic batch"
                + (f" (max |diff| vs PyTorch {diff:.1e})" if diff is not None else ""),
                "how": HOW_TO_LOAD["onnx"],
            }
        )
        # the layers ONNX Runtime runs as int8 kernels (both bit-widths <= 8), as the search measured the model
        # there: those, and only those, are int8 in the file; a layer searched at other bits stays float
        from compression.targets.ort_backend import int8_bits

        plan = quantization_plan(model)
        int8_layers = sorted(n for n, (w, a) in plan.items() if int8_bits(w, a))
        if int8_layers and calib is not None:
            float_model = copy.deepcopy(model).eval()
            strip_act_quantizers(float_model)
            int8 = export_onnx_int8(
                onnx_path,
                calib,
                os.path.join(out_dir, "model.int8.onnx"),
                model=float_model,
                example_input=example_input,
                int8_layers=int8_layers,
            )
            layers = sum(1 for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
            note = (
                f"ONNX Runtime static int8 (QDQ): {len(int8_layers)} of {layers} layers in real int8 kernels"
                + ("" if len(int8_layers) == layers else ", the others float as searched")
            )
            below = [n for n in int8_layers if min(plan[n]) < 8]
            if below:
                note += f"; {len(below)} layers searched below 8 bits run as int8"
            files.append(
                {
                    **int8,
                    "format": "int8.onnx",
                    "int8_layers": int8_layers,
                    "note": note,
                    "how": HOW_TO_LOAD["int8.onnx"],
                }
            )
    report = {
        **report,
        "policy": policy.to_dict() if policy is not None else None,
        "bit_widths": bits,
        "files": [
            {k: v for k, v in f.items() if k != "how"} | {"name": os.path.basename(f["path"])} for f in files
        ],
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    report_path = os.path.join(out_dir, "report.json")
    with open(report_path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, default=str)
    files.append(
        {
            "path": report_path,
            "bytes": os.path.getsize(report_path),
            "format": "report",
            "note": "report",
            "how": HOW_TO_LOAD["report"],
        }
    )
    return files


def _min_bits(b: dict[str, Any]) -> int:
    w = b["w_bits"]
    w_min = min(w) if isinstance(w, list) else w
    return min(w_min, b["a_bits"] if b["a_bits"] else FLOAT_BITS)


def compress_and_export(
    model_spec: str,
    dataset_spec: str,
    policy: Policy | None,
    out_dir: str,
    *,
    seed: int = 0,
    round_to: int = 1,
    fine_tune_epochs: int = 0,
    distill: bool = True,
    augment: bool = False,
    reconstruct: bool = True,
    formats: tuple[str, ...] = ("pt2", "onnx"),
    input_shape: tuple[int, int, int] | None = None,
    progress=None,
    extra_report: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Apply ``policy`` (None: export as is), optionally fine-tune, evaluate on the test split, export.

    Returns the report (also written to ``out_dir/report.json``) with the list of files written.
    """
    from compression.apply import apply_policy
    from compression.pipeline import costs_summary, open_workspace, versions
    from compression.training import evaluate, fine_tune

    ws = open_workspace(model_spec, dataset_spec, seed=seed, input_shape=input_shape)
    original = ws.artifact.module
    calib = ws.calibration_batch(seed=seed)
    acc_before = evaluate(original, ws.data.test)
    t0 = time.perf_counter()
    if policy is not None:
        model = apply_policy(ws.graph, policy, calib, round_to=round_to, reconstruct=reconstruct)
    else:
        model = copy.deepcopy(original)
    acc_applied = evaluate(model, ws.data.test)
    history: list[dict] = []
    if fine_tune_epochs > 0:
        history = fine_tune(
            model,
            ws.data.train,
            epochs=fine_tune_epochs,
            teacher=original if distill else None,
            seed=seed,
            progress=progress,
            augment=augment,
        )
    acc_after = evaluate(model, ws.data.test)
    params_before = sum(p.numel() for p in original.parameters())
    params_after = sum(p.numel() for p in model.parameters())
    report = {
        "model": model_spec,
        "dataset": dataset_spec,
        "seed": seed,
        "round_to": round_to,
        "input_shape": list(ws.artifact.input_shape),
        "num_classes": ws.artifact.num_classes,
        "accuracy": {
            "original": acc_before.to_dict(),
            "applied": acc_applied.to_dict(),
            "compressed": acc_after.to_dict(),
        },
        "fine_tune": {"epochs": fine_tune_epochs, "distill": distill, "augment": augment, "history": history},
        "costs": costs_summary(ws.graph, policy, round_to),
        "params": {"original": params_before, "compressed": params_after},
        "seconds": time.perf_counter() - t0,
        "versions": versions(),
        "warnings": ws.warnings,
        **(extra_report or {}),
    }
    meta = {
        "input_shape": list(ws.artifact.input_shape),
        "num_classes": ws.artifact.num_classes,
        "mean": list(ws.data.mean),
        "std": list(ws.data.std),
        "class_names": list(ws.data.class_names),
        "dataset": dataset_spec,
        "compressed_from": model_spec,
    }
    example = ws.data.test.tensors[0][:2].clone()
    files = write_artifacts(
        model, example, out_dir, policy=policy, calib=calib, report=report, formats=formats, meta=meta
    )
    report["files"] = files
    return report
