"""Small helpers the model-family tests share: build a seeded tiny transformers model, read a
checkpoint back with the safetensors library, load one with transformers, and bf16's spacing.

They read outputs with the real clients (safetensors, transformers), never with adapterops.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open


def build_seeded(make: Callable[[], Any], seed: int = 0) -> Any:
    """``make()`` under ``torch.manual_seed(seed)``, the global RNG left as it was, transformers quiet."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return make().eval()
    finally:
        transformers.logging.set_verbosity(verbosity)


def stored(path: Path) -> dict[str, torch.Tensor]:
    """Every weight of a checkpoint, by stored name, read with the safetensors library (proves the files).

    Files named ``adapterops_*`` (an old place for DoRA row norms) are records, not weights.
    """
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        if file.name.startswith("adapterops_"):
            continue
        with safe_open(file, "pt") as handle:
            out.update({k: handle.get_tensor(k) for k in handle.keys()})
    return out


def from_pretrained(path: Path) -> Any:
    """The checkpoint loaded by transformers in float32, refusing any key it could not place."""
    import transformers

    cls = getattr(transformers, json.loads((path / "config.json").read_text())["architectures"][0])
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        model, info = cls.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    finally:
        transformers.logging.set_verbosity(verbosity)
    unplaced = {k: sorted(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys") and v}
    assert not unplaced, unplaced
    return model.eval()


def ulp_bf16(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 at |x| (float64), at least the smallest normal's."""
    exponent = torch.floor(torch.log2(x.abs().clamp_min(torch.finfo(torch.bfloat16).tiny)))
    return torch.pow(2.0, exponent - 7)
