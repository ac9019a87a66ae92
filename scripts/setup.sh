#!/usr/bin/env bash
# Installs adapterops with its test tools into the current Python.
# torch first: a plain `torch` requirement on a machine without it pulls a multi-GB CUDA build,
# so where none is importable we ask for the CPU release pinned here. An existing torch is kept.
set -euo pipefail
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install --quiet "torch==${ADAPTEROPS_TORCH_VERSION:-2.13.0}"
fi
"$PY" -m pip install --quiet -e ".[test]"
