#!/usr/bin/env bash
# Installs adapterops with its test tools into the current Python.
# torch first: a plain `torch` requirement on a machine without it pulls a multi-GB CUDA build,
# so where none is importable we ask for the CPU release pinned here. An existing torch is kept if it
# meets the floor in pyproject.toml; an older one stops here rather than letting pip replace it.
set -euo pipefail
PY=${PYTHON:-python3}
floor=$(sed -n 's/^ *"torch>=\([0-9.]*\)".*/\1/p' pyproject.toml)
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install --quiet "torch==${ADAPTEROPS_TORCH_VERSION:-2.13.0}"
elif ! "$PY" - "$floor" <<'EOF'
import sys
import torch
have = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2] if part.isdigit())
need = tuple(int(part) for part in sys.argv[1].split(".")[:2])
if have < need:
    sys.exit(f"torch {torch.__version__} is older than adapterops needs (torch>={sys.argv[1]}): upgrade it, "
             "choosing the build for your CUDA (https://pytorch.org/get-started/locally/), then rerun")
EOF
then
  exit 1
fi
"$PY" -m pip install --quiet -e ".[test]"
