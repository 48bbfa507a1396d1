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
OWN_TORCH=${TORCH_SPEC:+yes}  # a torch of one's own (a CUDA build): installed with pip
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# constraints.txt pins every package that moves results (torch, transformers, trl, peft, optuna,
# ray, datasets, accelerate, ...) to the versions the README's numbers were measured with;
# STAGEBUDGET_UNPINNED=1 installs the newest versions pyproject.toml allows instead.
pip_install() {
  .venv/bin/python -m pip install -q --upgrade pip
  if [ "${STAGEBUDGET_UNPINNED:-0}" = 1 ]; then
    .venv/bin/python -m pip install -q "$TORCH_SPEC" -e ".[dev]"
  else
    .venv/bin/python -m pip install -q -c constraints.txt "$TORCH_SPEC" -e ".[dev]"
  fi
}
# The pinned CPU install goes through uv (a pip-compatible installer from PyPI): constraints.txt
# is the whole environment, so uv installs the file as it is, without resolving (~1 min on 2
# cores, where pip takes ~2 min). It byte-compiles at install time, as pip does: where
# PYTHONDONTWRITEBYTECODE is set (CI machines often set it) nothing else would, and every
# process would compile torch and transformers again (the test suite took 56 min instead of
# ~35). uv reads no pip.conf: pip's own find-links, indexes and constraint files (`pip config
# list`) are passed on. Anything else (unpinned, a TORCH_SPEC or an index of your own), or uv
# failing, installs with pip as before.
uv_install() {
  .venv/bin/python -m pip install -q uv || return 1
  local settings
  settings=$(.venv/bin/python scripts/pip_settings_for_uv.py) || return 1
  eval "local args=($settings)"  # shell-quoted by the script
  .venv/bin/uv pip install -q --python .venv/bin/python --no-deps --compile-bytecode "${args[@]}" \
    -r constraints.txt \
    && .venv/bin/uv pip install -q --python .venv/bin/python --no-deps -e . \
    && .venv/bin/uv pip check -q --python .venv/bin/python
}
if [ "${STAGEBUDGET_UNPINNED:-0}" = 1 ] || [ -n "$OWN_TORCH" ] \
   || [ -n "${PIP_EXTRA_INDEX_URL:-}" ] || [ -n "${PIP_INDEX_URL:-}" ] || ! uv_install; then
  pip_install
fi
.venv/bin/python -c "import stagebudget, torch; print('stagebudget ready; torch', torch.__version__)"
