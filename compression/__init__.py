"""The compression engine: a plain Python library (no Django, no Celery).

It may import torch, torch-pruning, ONNX, ONNX Runtime and TVM; it never imports ``webapp`` or ``workers``.
The user-facing API is a handful of calls::

    from compression import load_model, load_dataset, LayerGraph, Policy, apply_policy, compute_costs

Subpackages: ``models`` (ingestion, zoo, layer graph), ``data`` (datasets), ``targets`` (hardware and latency),
``search`` (environment, loop, checkpoints), ``agents`` (AMC, HAQ, Galen, AJPQ, baselines).
"""

__version__ = "0.1.0"
