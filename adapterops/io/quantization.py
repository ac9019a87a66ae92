"""Quantized safetensors checkpoints: which tensors are quantized, how, and what values they stand for.

Told from ``config.json``'s ``quantization_config`` and from the tensors themselves (their dtypes
and companion tensors), so a checkpoint without the config is recognized too:

- **scaled FP8 / int8** (``QuantFormat.SCALED``): a float8 or int8 weight ``<m>.weight`` with
  ``<m>.weight_scale_inv`` (DeepSeek-V3, Qwen3-FP8, transformers' ``quant_method: fp8``: one
  scale per ``weight_block_size`` block, or per tensor) or ``<m>.weight_scale`` (fbgemm_fp8,
  compressed-tensors, ModelOpt: per tensor, per output row, or per group of columns). Both
  scales *multiply*: ``W = q * s`` per block, blocks at the edges partial (``dequantize``);
- **bitsandbytes** 4-bit (``weight.absmax``, ``weight.quant_map``, ``weight.quant_state.*``,
  ``weight.nested_*``) and 8-bit (``SCB``, ``weight_format``): decoded by bitsandbytes itself
  (``pip install bitsandbytes``), never by a reimplementation.

Refused with what to do instead: packed int4 (GPTQ, AWQ and the like: ``qweight``, ``qzeros``,
``scales``, ``g_idx``, ``weight_packed``), zero points, two-level scales, ``ue8m0`` scales, and
every quantization method not listed above. Activation-side scales (``input_scale``,
``activation_scale``, ``k_scale``, ...) belong to the quantization: they are kept with it and
dropped when the weights are dequantized.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch

from adapterops.errors import AdapterFormatError, UnsupportedAdapterError

Reader = Callable[[str], torch.Tensor]  # tensor name -> the stored tensor


class QuantFormat(str, Enum):
    SCALED = "scaled"  # float8 or int8 times a block, channel or tensor scale
    BNB_4BIT = "bitsandbytes-4bit"
    BNB_8BIT = "bitsandbytes-8bit"


@dataclass(frozen=True)
class Scaling:
    """How a scale tensor covers its weight: ``block`` (rows, cols) per scale, partial at the edges.

    ``scale_shape`` is the stored scale tensor's shape: its grid may be stored flat, ``(out,)`` or ``()``.
    """

    block: tuple[int, int]
    scale_dtype: torch.dtype
    scale_shape: tuple[int, ...]

    def grid(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The scale grid of a weight of ``shape``: (..., ceil(rows / bm), ceil(cols / bn))."""
        *lead, rows, cols = shape
        return (*lead, math.ceil(rows / self.block[0]), math.ceil(cols / self.block[1]))


@dataclass(frozen=True)
class QuantizedTensor:
    """One quantized weight: its key, format, the shape and stored dtype of the values it stands
    for, and its companion tensors (the scale first, for ``SCALED``)."""

    key: str
    format: QuantFormat
    dtype: torch.dtype  # the stored weight's (float8, int8, or bitsandbytes' storage)
    shape: tuple[int, ...]  # of the dequantized weight
    companions: tuple[str, ...]
    scaling: Scaling | None = None  # SCALED only

    @property
    def scale_key(self) -> str:
        return self.companions[0]

    def describe(self) -> str:
        """``float8_e4m3fn, scaled 128x128 blocks``, ``nf4 4-bit``, ``int8 8-bit (LLM.int8)``."""
        if self.format is QuantFormat.BNB_4BIT:
            return f"{self.companions[0].rpartition('__')[2]} 4-bit"
        if self.format is QuantFormat.BNB_8BIT or self.scaling is None:
            return "int8 8-bit (LLM.int8)"
        dtype = str(self.dtype).removeprefix("torch.")
        rows, cols = self.shape[-2:]
        bm, bn = self.scaling.block
        if (bm, bn) == (rows, cols):
            return f"{dtype}, scaled per tensor"
        return f"{dtype}, scaled per row" if (bm, bn) == (1, cols) else f"{dtype}, scaled {bm}x{bn} blocks"


@dataclass(frozen=True)
class Quantization:
    """What is quantized in a checkpoint: ``tensors`` by weight key, and every tensor that belongs
    to the quantization (``dropped`` when the weights are written dequantized)."""

    method: str  # quantization_config.quant_method, or what the tensors show
    tensors: Mapping[str, QuantizedTensor]
    dropped: frozenset[str]

    @property
    def bitsandbytes(self) -> bool:
        return any(t.format is not QuantFormat.SCALED for t in self.tensors.values())

    def describe(self) -> str:
        kinds = sorted({t.describe() for t in self.tensors.values()})
        return f"{self.method} ({'; '.join(kinds)})" if kinds else self.method


# ------------------------------------------------------------------------------------------ detection

SCALED_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2, torch.int8)
SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
HANDLED_METHODS = ("fp8", "fbgemm_fp8", "compressed-tensors", "modelopt", "bitsandbytes")
# last name components that only activation or kv-cache quantization uses
ACTIVATION_SCALES = (
    "input_scale",
    "activation_scale",
    "input_scale_ub",
    "output_scale",
    "k_scale",
    "v_scale",
)
PACKED_MARKERS = ("qweight", "qzeros", "g_idx", "weight_packed", "weight_shape")
OTHER_MARKERS = (
    "weight_zero_point",
    "weight_scale_2",
    "weight_global_scale",
    "weight_g_idx",
    "input_global_scale",
)
BNB4_PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
_REQUANTIZE = (
    "merge the adapter into the original 16-bit checkpoint (the one that was quantized), then quantize "
    "the merged model again"
)


def detect(
    config: Mapping[str, Any], tensors: Mapping[str, Any], read: Reader, where: str
) -> Quantization | None:
    """The quantization of a checkpoint (``tensors``: name -> (shard, entry)), or None if it has none.

    ``read`` fetches the few small tensors detection needs (bitsandbytes' packed quant states).
    Formats adapterops cannot decode exactly are an ``UnsupportedAdapterError`` that says what to do.
    """
    qc = config.get("quantization_config") or config.get("compression_config") or {}
    if not isinstance(qc, Mapping):
        raise AdapterFormatError(
            f"{where}: config.json's quantization_config is a {type(qc).__name__}, not an object; fix config.json"
        )
    method = str(qc.get("quant_method") or "").lower()
    names = set(tensors)
    leaves = {name.rpartition(".")[2] for name in names}
    if method in ("gptq", "awq") or leaves & set(PACKED_MARKERS):
        marker = sorted(n for n in names if n.rpartition(".")[2] in PACKED_MARKERS)
        what = method.upper() if method else "packed int4"
        raise UnsupportedAdapterError(
            f"{where} is {what}-quantized (packed 4-bit weights, e.g. {marker[0] if marker else 'qweight'}): "
            f"a LoRA update is far below a 4-bit step and the packing cannot be rewritten exactly; {_REQUANTIZE}"
        )
    if method and method not in HANDLED_METHODS:
        raise UnsupportedAdapterError(
            f"{where} is quantized with {method!r} (config.json quantization_config), which adapterops cannot "
            f"decode exactly; it merges FP8/int8 scaled and bitsandbytes checkpoints. Otherwise, {_REQUANTIZE}"
        )
    if method == "compressed-tensors" and str(qc.get("format", "")).endswith(("pack-quantized", "24")):
        raise UnsupportedAdapterError(
            f"{where} is compressed-tensors {qc.get('format')!r} (packed or sparse weights); {_REQUANTIZE}"
        )
    if method == "fp8" and (qc.get("scale_fmt") not in (None, "float") or qc.get("expert_dtype") == "fp4"):
        raise UnsupportedAdapterError(
            f"{where}: FP8 checkpoints with scale_fmt {qc.get('scale_fmt')!r} or FP4 experts are not supported "
            f"(only float32 block scales); {_REQUANTIZE}"
        )
    odd = sorted(n for n in names if n.rpartition(".")[2] in OTHER_MARKERS)
    if odd:
        raise UnsupportedAdapterError(
            f"{where}: {odd[0]} is a zero point or second-level scale, a quantization adapterops cannot decode "
            f"exactly; {_REQUANTIZE}"
        )
    found: dict[str, QuantizedTensor] = {}
    block = qc.get("weight_block_size") if method == "fp8" else None
    if block is not None and not (
        isinstance(block, list | tuple)
        and len(block) == 2
        and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
    ):
        raise AdapterFormatError(
            f"{where}: config.json's weight_block_size is {block!r}, not two positive integers; fix config.json"
        )
    states = {n.partition(".quant_state.")[0]: n for n in names if ".quant_state.bitsandbytes__" in n}
    for name in sorted(names):
        quantized = _bnb(name, names, states, tensors, read, where) or _scaled(
            name, names, tensors, block, where
        )
        if quantized is not None:
            found[name] = quantized
    if not found and not method:
        return None
    dropped = {c for t in found.values() for c in t.companions}
    dropped |= {n for n in names if n.rpartition(".")[2] in ACTIVATION_SCALES}
    if not method:
        method = (
            "bitsandbytes" if any(t.format is not QuantFormat.SCALED for t in found.values()) else "scaled"
        )
    return Quantization(method, found, frozenset(dropped))


def _entry(tensors: Mapping[str, Any], name: str) -> Any:
    return tensors[name][1]


def _scale_names(name: str) -> tuple[str, str]:
    """Where a weight's scale lives: ``<m>.weight_scale_inv`` / ``<m>.weight_scale`` for ``<m>.weight``,
    ``<name>_scale_inv`` / ``<name>_scale`` for fused expert tensors (``gate_up_proj``)."""
    return f"{name}_scale_inv", f"{name}_scale"


def _scaled(
    name: str, names: set[str], tensors: Mapping[str, Any], block: Any, where: str
) -> QuantizedTensor | None:
    inv, plain = _scale_names(name)
    scale = inv if inv in names else plain if plain in names else None
    if scale is None or name.endswith(("_scale", "_scale_inv")):
        return None
    entry, scale_entry = _entry(tensors, name), _entry(tensors, scale)
    dtype, shape = entry.torch_dtype, tuple(entry.shape)
    if dtype not in SCALED_DTYPES or len(shape) < 2 or (scale == inv and dtype == torch.int8):
        raise UnsupportedAdapterError(
            f"{where}: {name} is stored as {entry.dtype} with a scale ({scale}); adapterops decodes float8 and "
            f"int8 weights with a float scale (int8 with weight_scale_inv is packed FP4); {_REQUANTIZE}"
        )
    if scale_entry.torch_dtype not in SCALE_DTYPES:
        raise UnsupportedAdapterError(
            f"{where}: the scale {scale} is stored as {scale_entry.dtype}; adapterops reads float32, bfloat16 and "
            f"float16 scales only; {_REQUANTIZE}"
        )
    scale_shape = tuple(scale_entry.shape)
    size = _block_size(shape, scale_shape, block if scale == inv else None)
    scaling = Scaling(size or (1, 1), scale_entry.torch_dtype, scale_shape)
    grid = scaling.grid(shape)
    if (
        size is None
        or math.prod(grid) != math.prod(scale_shape)
        or (len(scale_shape) == len(shape) and scale_shape != grid)
    ):
        raise UnsupportedAdapterError(
            f"{where}: the scale {scale} has shape {scale_shape}, which is no block grid of {name} {shape} "
            f"(weight_block_size: {block}); the checkpoint is inconsistent"
        )
    return QuantizedTensor(name, QuantFormat.SCALED, dtype, shape, (scale,), scaling)


def _block_size(shape: tuple[int, ...], scale_shape: tuple[int, ...], block: Any) -> tuple[int, int] | None:
    """The block each scale covers: one scale per tensor, ``weight_block_size`` where the config gives
    it, else what the scale's shape says: (..., R, C), (..., R, 1) or (..., R) scales over (..., rows, cols)."""
    *lead, rows, cols = shape
    if math.prod(scale_shape) == 1:
        return (rows, cols)
    if block is not None:
        return (int(block[0]), int(block[1]))
    if tuple(scale_shape[: len(lead)]) != tuple(lead):
        return None
    tail = tuple(scale_shape[len(lead) :]) or (1, 1)
    if len(tail) == 1:
        tail = (tail[0], 1)
    if len(tail) != 2 or rows % tail[0] or cols % tail[1]:
        return None
    return (rows // tail[0], cols // tail[1])


def _bnb(
    name: str,
    names: set[str],
    states: Mapping[str, str],
    tensors: Mapping[str, Any],
    read: Reader,
    where: str,
) -> QuantizedTensor | None:
    """A bitsandbytes weight: 4-bit (``states``: weight name -> its packed quant state) or 8-bit (``SCB``)."""
    if not name.endswith(".weight"):
        return None
    state_key = states.get(name)
    if state_key is not None:
        parts = tuple(f"{name}.{p}" for p in BNB4_PARTS if f"{name}.{p}" in names)
        try:
            packed = read(state_key)
            state = json.loads(bytes(packed.reshape(-1).to(torch.uint8).tolist()).decode())
            shape = tuple(int(d) for d in state["shape"])
        except (ValueError, KeyError, TypeError) as exc:
            raise UnsupportedAdapterError(
                f"{where}: {state_key} is not a readable bitsandbytes quant state ({exc}); the checkpoint is damaged"
            ) from None
        dtype = _entry(tensors, name).torch_dtype
        return QuantizedTensor(name, QuantFormat.BNB_4BIT, dtype, shape, (state_key, *parts))
    module = name.removesuffix(".weight")
    if f"{module}.SCB" in names:
        extra = (f"{module}.weight_format",) if f"{module}.weight_format" in names else ()
        entry = _entry(tensors, name)
        return QuantizedTensor(
            name, QuantFormat.BNB_8BIT, entry.torch_dtype, tuple(entry.shape), (f"{module}.SCB", *extra)
        )
    return None


# ------------------------------------------------------------------------------------------- decoding


def dequantize(quantized: QuantizedTensor, read: Reader) -> torch.Tensor:
    """The values a quantized weight stands for, float64, in its stored layout.

    Scaled: ``q * s`` with each block's scale (exact in float64: a float8 or int8 times a float32).
    bitsandbytes: what ``bitsandbytes.functional.dequantize_4bit`` / ``int8_vectorwise_dequant``
    return (the weights PEFT merges into and bitsandbytes computes with).
    """
    q = read(quantized.key)
    if quantized.format is QuantFormat.SCALED:
        assert quantized.scaling is not None  # set for every SCALED tensor
        bm, bn = quantized.scaling.block
        *_, rows, cols = q.shape
        grids = read(quantized.scale_key).double().reshape(-1, *quantized.scaling.grid(tuple(q.shape))[-2:])
        out = torch.empty(q.shape, dtype=torch.float64)
        flat_q, flat_out = q.reshape(-1, rows, cols), out.view(-1, rows, cols)
        step = max(1, (1 << 20) // max(cols, 1))  # a few MB of scratch at a time
        for i in range(flat_q.shape[0]):
            for r0 in range(0, rows, step):
                r1 = min(r0 + step, rows)
                scales = grids[i][torch.arange(r0, r1) // bm].repeat_interleave(bn, dim=-1)[:, :cols]
                torch.mul(flat_q[i, r0:r1].double(), scales, out=flat_out[i, r0:r1])
        return out
    functional = _bitsandbytes(quantized)
    if quantized.format is QuantFormat.BNB_8BIT:
        return functional.int8_vectorwise_dequant(q, read(quantized.companions[0]).float()).double()
    parts = {name.removeprefix(f"{quantized.key}."): read(name) for name in quantized.companions}
    state = functional.QuantState.from_dict(parts, device=torch.device("cpu"))
    return functional.dequantize_4bit(q, state).double().reshape(quantized.shape)


def _bitsandbytes(quantized: QuantizedTensor) -> Any:
    try:
        import bitsandbytes.functional as functional  # optional: only bitsandbytes checkpoints need it
    except ImportError:
        raise UnsupportedAdapterError(
            f"{quantized.key} is quantized by bitsandbytes, which decodes it: pip install bitsandbytes "
            "(or merge into the original 16-bit checkpoint instead)"
        ) from None
    return functional
