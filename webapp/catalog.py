"""What the engine offers (agents and their settings, zoo architectures, target backends), without torch.

The engine's registries (``compression.agents.AGENTS``, ``compression.models.zoo.ZOO``,
``compression.targets.base.BACKENDS``) import torch, and a page must never import torch while it is
served. So the dashboard reads a JSON snapshot of them, ``webapp/catalog.json``, written by

    python -m webapp.catalog            # regenerate after adding an agent, a zoo model or a backend

``tests/test_views.py`` checks that the snapshot equals the live registries, so a stale snapshot fails CI
instead of silently hiding a new agent.
"""

from __future__ import annotations

import json
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

CATALOG_PATH = Path(__file__).with_name("catalog.json")


def build_catalog() -> dict[str, Any]:
    """Read the live engine registries (imports torch: call only from the command line or tests)."""
    from compression.agents import AGENTS, ALIASES
    from compression.models import zoo
    from compression.search.spaces import LAYOUTS
    from compression.targets.base import BACKENDS

    agents = []
    for name, cls in AGENTS.items():
        doc = (cls.__doc__ or "").strip().splitlines()
        agents.append(
            {
                "name": name,
                "summary": cls.summary or (doc[0] if doc else name),
                "layouts": list(cls.layouts) if cls.layouts is not None else None,
                "params": cls.config_schema(),
            }
        )
    agents.append(_two_stage(agents))
    return {
        "agents": agents,
        "layouts": list(LAYOUTS),
        "aliases": dict(ALIASES),
        "zoo": sorted(zoo.ZOO),
        "zoo_default_input_shape": list(zoo.DEFAULT_INPUT_SHAPE),
        "zoo_default_num_classes": int(zoo.DEFAULT_NUM_CLASSES),
        "backends": list(BACKENDS),
    }


def _two_stage(agents: list[dict[str, Any]]) -> dict[str, Any]:
    """The search loop's ``two-stage`` agent (``compression.search.loop.plan_stages``): it has no class in
    ``AGENTS``, so its settings are described here, as the loop reads them."""
    prune = [a["name"] for a in agents if a["layouts"] and "prune" in a["layouts"]]
    bits = [a["name"] for a in agents if a["layouts"] and "bits" in a["layouts"]]
    return {
        "name": "two-stage",
        "summary": "Two-stage DRL: a pruning agent on half the episodes, then a bit-width agent on the pruned model",
        "layouts": ["prune", "bits"],
        "params": [
            {
                "name": "prune_agent",
                "type": "choice",
                "default": "amc",
                "choices": prune,
                "help": "stage 1 agent",
            },
            {
                "name": "quant_agent",
                "type": "choice",
                "default": "haq",
                "choices": bits,
                "help": "stage 2 agent",
            },
            {
                "name": "prune_budget",
                "type": "float",
                "default": None,
                "min": 0.01,
                "max": 1.0,
                "help": "stage 1 budget (blank: the square root of the run's budget)",
            },
        ],
    }


@lru_cache(maxsize=1)
def catalog() -> dict[str, Any]:
    """The snapshot as a dict (read once per process)."""
    with open(CATALOG_PATH, encoding="utf-8") as fh:
        return json.load(fh)


def agent_names() -> list[str]:
    """Names a user may pick for ``SearchConfig.agent``, in registry order."""
    return [a["name"] for a in catalog()["agents"]]


def agent_info(name: str) -> dict[str, Any] | None:
    """The snapshot entry of agent ``name`` (aliases resolved), or None if unknown."""
    name = catalog()["aliases"].get(name, name)
    for a in catalog()["agents"]:
        if a["name"] == name:
            return a
    return None


def coerce_agent_config(name: str, config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Check user-supplied agent settings against the agent's schema, the way ``Param.coerce`` does.

    Returns (clean config with only the keys given, errors by setting name). The worker re-checks with the
    engine's own ``resolve_config``; this copy only lets the form show errors beside the fields.
    """
    info = agent_info(name)
    if info is None:
        return {}, {"agent": f"unknown agent {name!r}"}
    params = {p["name"]: p for p in info["params"]}
    clean: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for key, raw in config.items():
        p = params.get(key) or _stage_param(info["name"], key, config)
        if p is None:
            errors[key] = f"agent {name} has no setting {key!r}"
            continue
        try:
            clean[key] = _coerce(p, raw)
        except ValueError as exc:
            errors[key] = str(exc)
    return clean, errors


def _stage_param(agent: str, key: str, config: dict[str, Any]) -> dict[str, Any] | None:
    """two-stage passes ``prune_<setting>`` / ``quant_<setting>`` to its stage agents: look those up."""
    if agent != "two-stage":
        return None
    for prefix, default in (("prune_", "amc"), ("quant_", "haq")):
        if key.startswith(prefix):
            stage = agent_info(str(config.get(prefix + "agent", default)))
            for p in stage["params"] if stage else []:
                if p["name"] == key[len(prefix) :]:
                    return {**p, "name": key}
    return None


def _coerce(p: dict[str, Any], raw: Any) -> Any:
    kind = p["type"]
    if raw is None and p.get("default") is None:
        return None
    if kind == "bool":
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off", ""):
            return False
        raise ValueError(f"{p['name']} must be true or false")
    if kind == "choice":
        for c in p.get("choices", []):
            if str(c) == str(raw):
                return c
        raise ValueError(f"{p['name']} must be one of {', '.join(map(str, p.get('choices', [])))}")
    try:
        value: float | int = int(raw) if kind == "int" else float(raw)
    except (TypeError, ValueError):
        raise ValueError(f"{p['name']} must be {'an integer' if kind == 'int' else 'a number'}") from None
    if kind == "int" and isinstance(raw, float) and not raw.is_integer():
        raise ValueError(f"{p['name']} must be an integer")
    lo, hi = p.get("min"), p.get("max")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{p['name']} must be in [{lo}, {hi}]")
    return value


def main(argv: list[str] | None = None) -> int:
    """Write ``catalog.json`` from the live registries; ``--check`` only compares and exits 1 if stale."""
    argv = list(sys.argv[1:] if argv is None else argv)
    fresh = build_catalog()
    text = json.dumps(fresh, indent=1, sort_keys=True) + "\n"
    if "--check" in argv:
        current = CATALOG_PATH.read_text(encoding="utf-8") if CATALOG_PATH.exists() else ""
        if current != text:
            print(f"{CATALOG_PATH} is stale: run python -m webapp.catalog", file=sys.stderr)
            return 1
        return 0
    CATALOG_PATH.write_text(text, encoding="utf-8")
    print(f"wrote {CATALOG_PATH} ({len(fresh['agents'])} agents, {len(fresh['zoo'])} zoo models)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
