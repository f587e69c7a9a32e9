"""The tree passes the linter and the formatter it is written to (ruff, pinned in requirements.txt; settings in
pyproject.toml). A change that breaks either fails here rather than in the next person's diff."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _ruff() -> list[str]:
    exe = Path(sys.executable).with_name("ruff")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("ruff")
    if found is None:
        pytest.fail(
            "ruff is not installed: it is pinned in requirements.txt (scripts/bootstrap.sh installs it)"
        )
    return [found]


@pytest.mark.parametrize(
    "args", [["check", "--no-cache"], ["format", "--check", "--no-cache"]], ids=["check", "format"]
)
def test_ruff(args):
    r = subprocess.run([*_ruff(), *args, "."], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"ruff {' '.join(args)} found problems:\n{r.stdout[-4000:]}{r.stderr[-2000:]}"
