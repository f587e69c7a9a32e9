"""The compression policy: per-layer decisions, plain data with a JSON round-trip.

A ``Policy`` is the one thing every part of the product shares. Agents produce it, ``apply`` consumes it,
the dashboard draws it, reports and exports store it. It maps a layer name (the module's qualified name in
the model, e.g. ``layer1.0.conv1``) to a ``LayerPolicy``. Layers absent from the policy stay untouched
(keep everything, float weights and activations).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from compression.errors import PolicyError

FLOAT_BITS = 32
VALID_BITS = frozenset(range(1, 9)) | {FLOAT_BITS}


@dataclass
class LayerPolicy:
    """What to do with one layer.

    keep_ratio: fraction of output channels kept by channel pruning (1.0 keeps all). Channels are pruned
        in groups coupled by the dependency graph, so the ratio is applied to the layer's group.
    w_bits / a_bits: weight and input-activation bit-widths, 1..8, or 32 for float.
    sparsity: fraction of the remaining weights zeroed by fine-grained magnitude pruning (size objectives).
    channel_bits: optional bit-width per output-channel group (AJPQ); 0 means the group is pruned. When
        set, ``keep_ratio`` is derived from it and ``w_bits`` is the widest group's bits.
    """

    keep_ratio: float = 1.0
    w_bits: int = FLOAT_BITS
    a_bits: int = FLOAT_BITS
    sparsity: float = 0.0
    channel_bits: list[int] | None = None

    def validate(self, name: str = "?") -> None:
        """Raise PolicyError if a field is out of range."""
        if not (isinstance(self.keep_ratio, (int, float)) and math.isfinite(self.keep_ratio)):
            raise PolicyError(f"layer {name}: keep_ratio must be a number", "use a value in (0, 1]")
        if not 0.0 < self.keep_ratio <= 1.0:
            raise PolicyError(
                f"layer {name}: keep_ratio {self.keep_ratio} is out of range", "use a value in (0, 1]"
            )
        for label, bits in (("w_bits", self.w_bits), ("a_bits", self.a_bits)):
            if bits not in VALID_BITS:
                raise PolicyError(
                    f"layer {name}: {label}={bits} is not supported", "use 1..8, or 32 for float"
                )
        if not 0.0 <= self.sparsity < 1.0:
            raise PolicyError(
                f"layer {name}: sparsity {self.sparsity} is out of range", "use a value in [0, 1)"
            )
        if self.channel_bits is not None:
            if not self.channel_bits or any(b != 0 and b not in VALID_BITS for b in self.channel_bits):
                raise PolicyError(
                    f"layer {name}: channel_bits must be a non-empty list of 0 (pruned), 1..8 or 32",
                    "fix the per-group bit-widths",
                )
            if all(b == 0 for b in self.channel_bits):
                raise PolicyError(f"layer {name}: every channel group is pruned", "keep at least one group")

    @property
    def is_identity(self) -> bool:
        """True when this entry changes nothing."""
        return (
            self.keep_ratio >= 1.0
            and self.w_bits == FLOAT_BITS
            and self.a_bits == FLOAT_BITS
            and self.sparsity == 0.0
            and self.channel_bits is None
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["channel_bits"] is None:
            del d["channel_bits"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], name: str = "?") -> LayerPolicy:
        if not isinstance(d, dict):
            raise PolicyError(f"layer {name}: expected an object, got {type(d).__name__}")
        unknown = set(d) - {"keep_ratio", "w_bits", "a_bits", "sparsity", "channel_bits"}
        if unknown:
            raise PolicyError(f"layer {name}: unknown fields {sorted(unknown)}")
        try:
            lp = cls(
                keep_ratio=float(d.get("keep_ratio", 1.0)),
                w_bits=int(d.get("w_bits", FLOAT_BITS)),
                a_bits=int(d.get("a_bits", FLOAT_BITS)),
                sparsity=float(d.get("sparsity", 0.0)),
                channel_bits=None if d.get("channel_bits") is None else [int(b) for b in d["channel_bits"]],
            )
        except (TypeError, ValueError) as exc:
            raise PolicyError(f"layer {name}: {exc}") from exc
        lp.validate(name)
        return lp


@dataclass
class Policy:
    """Per-layer compression decisions for one model (layer name -> LayerPolicy)."""

    layers: dict[str, LayerPolicy] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> LayerPolicy:
        return self.layers.get(name, LayerPolicy())

    def __setitem__(self, name: str, value: LayerPolicy) -> None:
        self.layers[name] = value

    def __contains__(self, name: object) -> bool:
        return name in self.layers

    def __len__(self) -> int:
        return len(self.layers)

    def validate(self, layer_names: Iterable[str] | None = None) -> None:
        """Check every entry; with ``layer_names``, also refuse entries for layers the model lacks."""
        for name, lp in self.layers.items():
            lp.validate(name)
        if layer_names is not None:
            known = set(layer_names)
            missing = [n for n in self.layers if n not in known]
            if missing:
                raise PolicyError(
                    f"policy names layers the model does not have: {', '.join(missing[:5])}"
                    + (" ..." if len(missing) > 5 else ""),
                    "inspect the model to list its compressible layers",
                )

    def to_dict(self) -> dict[str, Any]:
        return {"layers": {n: lp.to_dict() for n, lp in self.layers.items()}, "meta": dict(self.meta)}

    def to_json(self, **kwargs: Any) -> str:
        """Serialise to JSON (layer order is preserved)."""
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Policy:
        if not isinstance(d, dict) or not isinstance(d.get("layers", {}), dict):
            raise PolicyError("a policy is an object with a 'layers' object", "see docs/policy.md")
        layers = {str(n): LayerPolicy.from_dict(v, str(n)) for n, v in d.get("layers", {}).items()}
        meta = d.get("meta", {})
        if not isinstance(meta, dict):
            raise PolicyError("policy 'meta' must be an object")
        return cls(layers=layers, meta=dict(meta))

    @classmethod
    def from_json(cls, text: str) -> Policy:
        """Parse JSON written by ``to_json``; raise PolicyError on anything malformed."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PolicyError(f"policy is not valid JSON: {exc}") from exc
        return cls.from_dict(data)

    @classmethod
    def uniform(cls, layer_names: Iterable[str], **fields: Any) -> Policy:
        """The same decision for every named layer."""
        return cls(layers={n: LayerPolicy(**fields) for n in layer_names})
