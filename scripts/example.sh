#!/usr/bin/env bash
# The main job on the bundled example, from its recipe: blend two tiny PEFT adapters 70/30, merge the
# blend into their base checkpoint, then inspect the blend.
set -euo pipefail
adapterops run recipes/blend-and-merge.yaml --force
adapterops info recipes/out/mix
