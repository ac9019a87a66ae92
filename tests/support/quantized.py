"""Quantized checkpoints made from a float one, the way their quantizers write them, plus float64 references.

* ``fp8_block_checkpoint``: DeepSeek-V3 / Qwen3-FP8 style (transformers ``quant_method: fp8``): every
  linear projection stored as ``float8_e4m3fn`` with a float32 ``weight_scale_inv`` per ``block``
  (partial blocks at the edges), the scale ``amax / 448`` as transformers' ``Fp8Quantize`` computes it.
* ``scaled_checkpoint``: ``weight_scale`` per output row (fbgemm_fp8 / compressed-tensors style), int8
  or float8, with or without a ``quantization_config``.
* ``bnb_checkpoint``: bitsandbytes 4-bit (nf4, double quantization) or 8-bit, saved by transformers itself.
* ``reference_dequantize``: W = q * s per block, written independently of adapterops (float64).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _projections(state: dict[str, torch.Tensor]) -> list[str]:
    return sorted(k for k in state if k.endswith(".weight") and k.split(".")[-2] in PROJECTIONS)


def _copy_other_files(base: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for path in base.iterdir():
        if path.suffix != ".safetensors" and path.name != "model.safetensors.index.json":
            shutil.copy2(path, out / path.name)


def _write(out: Path, state: dict[str, torch.Tensor], quantization_config: dict[str, Any] | None) -> Path:
    save_file(
        {k: v.contiguous() for k, v in state.items()},
        str(out / "model.safetensors"),
        metadata={"format": "pt"},
    )
    config = json.loads((out / "config.json").read_text())
    if quantization_config is None:
        config.pop("quantization_config", None)
    else:
        config["quantization_config"] = quantization_config
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def fp8_block_checkpoint(base: Path, out: Path, block: tuple[int, int] = (16, 16)) -> Path:
    """``base`` (a one-file float checkpoint) with its linear projections block-quantized to FP8."""
    _copy_other_files(base, out)
    state = load_file(str(base / "model.safetensors"))
    for key in _projections(state):
        X = state[key].float()
        rows, cols = X.shape
        R, C = math.ceil(rows / block[0]), math.ceil(cols / block[1])
        padded = torch.zeros(R * block[0], C * block[1])
        padded[:rows, :cols] = X.abs()
        amax = padded.reshape(R, block[0], C, block[1]).amax(dim=(1, 3))
        inv = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax)).float()
        full = inv.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
        state[key] = (X / full).clamp(-448, 448).to(torch.float8_e4m3fn)
        state[key.removesuffix(".weight") + ".weight_scale_inv"] = inv
    config = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": list(block)}
    return _write(out, state, config)


def scaled_checkpoint(base: Path, out: Path, dtype: torch.dtype, *, with_config: bool = True) -> Path:
    """``base`` with its linear projections quantized per output row: ``weight_scale`` of shape (out, 1)."""
    _copy_other_files(base, out)
    state = load_file(str(base / "model.safetensors"))
    qmax = 127.0 if dtype == torch.int8 else 448.0
    for key in _projections(state):
        X = state[key].float()
        scale = (X.abs().amax(dim=1, keepdim=True) / qmax).clamp_min(1e-12)
        q = (X / scale).clamp(-qmax, qmax)
        state[key] = q.round().to(dtype) if dtype == torch.int8 else q.to(dtype)
        state[key.removesuffix(".weight") + ".weight_scale"] = scale
    config = None
    if with_config:
        kind = "int" if dtype == torch.int8 else "float"
        config = {
            "quant_method": "compressed-tensors",
            "format": f"{kind}-quantized",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": kind}}},
        }
    return _write(out, state, config)


def bnb_checkpoint(base: Path, out: Path, bits: int) -> Path:
    """``base`` loaded with bitsandbytes quantization (4-bit nf4 with double quantization, or 8-bit) and
    saved by transformers: the format as bitsandbytes writes it."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if bits == 4:
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=config, device_map="cpu")
    model.save_pretrained(out)
    return out


def reference_dequantize(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """float64 W = q * s, each element times its block's scale (partial edge blocks), by explicit loops
    over the blocks: no adapterops code, no broadcasting tricks."""
    rows, cols = q.shape
    W = torch.empty(rows, cols, dtype=torch.float64)
    grid = scale.double().reshape(math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            rs, cs = slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1])
            W[rs, cs] = q[rs, cs].double() * grid[i, j]
    return W
