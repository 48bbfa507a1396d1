#!/usr/bin/env bash
# Create .venv and install stagebudget with its dev tools. Idempotent.
#
# torch: CPU machines get the pinned CPU build (TORCH_SPEC=torch==2.13.0, served locally here);
# GPU users set TORCH_SPEC (and, if needed, PIP_EXTRA_INDEX_URL for their CUDA build), e.g.
#   TORCH_SPEC="torch==2.13.0" PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cu130 bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# constraints.txt pins every package that moves results (torch, transformers, trl, peft, optuna,
# ray, datasets, accelerate, ...) to the versions the README's numbers were measured with;
# STAGEBUDGET_UNPINNED=1 installs the newest versions pyproject.toml allows instead.
if [ "${STAGEBUDGET_UNPINNED:-0}" = 1 ]; then
  .venv/bin/python -m pip install -q "$TORCH_SPEC" -e ".[dev]"
else
  .venv/bin/python -m pip install -q -c constraints.txt "$TORCH_SPEC" -e ".[dev]"
fi
.venv/bin/python -c "import stagebudget, torch; print('stagebudget ready; torch', torch.__version__)"
