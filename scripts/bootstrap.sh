#!/usr/bin/env bash
# Create .venv and install the pinned requirements (idempotent: skipped when requirements.txt is unchanged).
# Sourced by scripts/run.sh and scripts/test.sh; works on a machine with nothing but Python 3.11.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
stamp=".venv/.requirements.sha256"
want="$(sha256sum requirements.txt | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing pinned requirements (first run takes a few minutes)"
  extra=()
  # The CPU build of torch 2.13.0 lies in /opt/wheels on these machines; PyPI's default is a CUDA build.
  [ -d /opt/wheels ] && extra+=(--find-links /opt/wheels)
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet "${extra[@]}" -r requirements.txt
  echo "$want" > "$stamp"
fi
export PATH="$ROOT/.venv/bin:$PATH"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
