#!/usr/bin/env bash
# The released artifacts at the lowest declared versions (`make test-lowest`; CI runs it after `make test`).
#
# In a fresh virtual environment under $TMPDIR:
#   1. build the sdist, and the wheel from it (python -m build), and check both against the source tree
#      (scripts/check_dist.py);
#   2. install the wheel with every runtime dependency pinned to its floor in pyproject.toml
#      (`name>=X` becomes `name==X`), plus the test extras. torch is the exception: its floor is chosen
#      from the APIs adapterops uses (tests/test_packaging.py), and the build CI has is installed:
#      torch==$ADAPTEROPS_TORCH_VERSION (default 2.13.0, the CPU build scripts/setup.sh installs too);
#   3. unpack the sdist and run the test suite there, against the installed wheel.
# A floor that pip cannot install together with the test extras fails step 2: raise it.
# ADAPTEROPS_KEEP=1 keeps the environment and prints where it is.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
work=$(mktemp -d "${TMPDIR:-/tmp}/adapterops-lowest.XXXXXX")
if [[ -z "${ADAPTEROPS_KEEP:-}" ]]; then trap 'rm -rf "$work"' EXIT; else echo "environment: $work"; fi
pip_quiet=(--quiet --disable-pip-version-check)

"$PY" -m venv "$work/venv"
venv="$work/venv/bin/python"
"$venv" -m pip install "${pip_quiet[@]}" "torch==${ADAPTEROPS_TORCH_VERSION:-2.13.0}"

"$venv" -m pip install "${pip_quiet[@]}" "build>=1.2"
"$venv" -m build --outdir "$work/dist" . >"$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
"$venv" scripts/check_dist.py "$work/dist"

mapfile -t floors < <("$venv" - <<'EOF'
import re, tomllib
for requirement in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]:
    match = re.fullmatch(r"([A-Za-z0-9._-]+)>=([0-9][0-9.]*)", requirement)
    if not match:
        raise SystemExit(f"{requirement}: only `name>=X` floors can be pinned here")
    if match[1] != "torch":
        print(f"{match[1]}=={match[2]}")
EOF
)
wheel=$(ls "$work"/dist/adapterops-*.whl)
"$venv" -m pip install "${pip_quiet[@]}" "${floors[@]}" "${wheel}[test]"
"$venv" -m pip check
"$venv" - "${floors[@]}" <<'EOF'
import sys
from importlib.metadata import version
names = ["torch", *(pin.split("==")[0] for pin in sys.argv[1:]), "peft", "transformers"]
print("testing with", ", ".join(f"{name} {version(name)}" for name in names))
EOF

# the suite from the unpacked sdist, against the installed wheel: the pytest script (not `python -m`, which
# would put the sdist's adapterops/ first on sys.path) with --import-mode=append
tar -xzf "$work"/dist/adapterops-*.tar.gz -C "$work"
src=$(ls -d "$work"/adapterops-*/)
(cd "$work" && "$venv" - <<'EOF'
import importlib.util, sys
import adapterops
if "site-packages" not in adapterops.__file__ or importlib.util.find_spec("tests") is not None:
    sys.exit(f"not testing the installed wheel: {adapterops.__file__}, or a package `tests` is installed")
EOF
)
cd "$src"
"$work/venv/bin/pytest" -q -p no:cacheprovider --import-mode=append
