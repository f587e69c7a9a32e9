"""Agent-owned random number generators and their checkpointable state.

Agents never touch the global numpy or torch RNG: each owns a ``np.random.Generator`` (action sampling,
replay sampling, exploration noise) and a ``torch.Generator`` (network initialisation). Their states are
converted to types ``torch.load(weights_only=True)`` accepts (strings, ints, tensors).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from compression.errors import SearchError


def make_generators(seed: int) -> tuple[np.random.Generator, torch.Generator]:
    """Independent numpy and torch generators derived from one seed."""
    np_seq, torch_seq = np.random.SeedSequence(int(seed)).spawn(2)
    gen = torch.Generator()
    gen.manual_seed(int(torch_seq.generate_state(1, dtype=np.uint64)[0] & 0x7FFF_FFFF_FFFF_FFFF))
    return np.random.Generator(np.random.PCG64(np_seq)), gen


def numpy_state(rng: np.random.Generator) -> dict[str, Any]:
    """The state of a PCG64 generator with its 128-bit integers written as strings."""
    st = rng.bit_generator.state
    if st["bit_generator"] != "PCG64":
        raise SearchError(f"unsupported bit generator {st['bit_generator']}", "agents use PCG64")
    return {
        "bit_generator": "PCG64",
        "state": str(st["state"]["state"]),
        "inc": str(st["state"]["inc"]),
        "has_uint32": int(st["has_uint32"]),
        "uinteger": int(st["uinteger"]),
    }


def set_numpy_state(rng: np.random.Generator, state: dict[str, Any]) -> None:
    """Restore what ``numpy_state`` saved."""
    rng.bit_generator.state = {
        "bit_generator": "PCG64",
        "state": {"state": int(state["state"]), "inc": int(state["inc"])},
        "has_uint32": int(state["has_uint32"]),
        "uinteger": int(state["uinteger"]),
    }
