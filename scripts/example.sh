#!/usr/bin/env bash
# The main job on the bundled example: combine two tiny PEFT adapters, then inspect the result.
set -euo pipefail
out=${1:-out/mix}
mkdir -p "$(dirname "$out")"
adapterops combine recipes/inputs/style-a recipes/inputs/style-b --weights 0.7 0.3 -o "$out" --force
adapterops info "$out"
