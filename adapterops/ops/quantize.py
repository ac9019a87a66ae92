"""Writing block-scaled quantized weights (FP8 or int8 with scales): round to nearest, error measured. Pure.

The convention (DeepSeek-V3's, and transformers' ``FP8Linear``); ``io.quantization.dequantize``
reads it:

    W[..., i, j] = q[..., i, j] * s[..., i // bm, j // bn]      q: (..., rows, cols)
                                                                s: (..., ceil(rows / bm), ceil(cols / bn))

Blocks at the bottom and right edges are partial. Per-tensor scaling is one block (rows, cols),
per-channel scaling the block (1, cols).

``quantize`` writes an exact float64 ``X`` in that form the way a quantizer would: each block's
scale is its largest magnitude over the format's largest value (rounded *up* to the scale's
dtype, so no element saturates), and each element is rounded once, to nearest, onto its block's
grid. Its report says how far the result is from ``X``: that error is what an in-format merge
costs, and ``merge`` reports it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from adapterops.ops.rounding import round_to, ulp

# the largest finite value of each quantized dtype (int8 is symmetric: -128 is never used)
QMAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0, torch.int8: 127.0}


@dataclass(frozen=True)
class QuantizationError:
    """How far a quantized tensor is from the exact values it stands for.

    ``rel_error`` is ||D - X||_F / ||X||_F (D the dequantized result, X exact), ``max_abs_error``
    the largest |D - X|, ``max_step`` the largest |D - X| in steps of the block's grid (at most 0.5:
    rounded to nearest), ``update_ratio`` ||D - X||_F / ||dW||_F: the error against the size of
    the update that was merged (above 1, the rounding moved the weights more than the update did).
    """

    rel_error: float
    max_abs_error: float
    max_step: float
    update_ratio: float | None = None

    def as_dict(self) -> dict[str, float | None]:
        return dict(self.__dict__)


# elements per pass: scratch stays a few MB, whatever the tensor's size, and its buffers are reused
CHUNK = 1 << 20


def row_chunks(rows: int, cols: int) -> list[tuple[int, int]]:
    """[start, end) row ranges of about ``CHUNK`` elements each."""
    step = max(1, CHUNK // max(cols, 1))
    return [(r, min(r + step, rows)) for r in range(0, rows, step)]


def expand(scales: torch.Tensor, shape: tuple[int, ...], block: tuple[int, int]) -> torch.Tensor:
    """The (..., rows, cols) tensor holding each element's block scale (partial edge blocks)."""
    *_, rows, cols = shape
    full = scales.repeat_interleave(block[0], dim=-2)[..., :rows, :]
    return full.repeat_interleave(block[1], dim=-1)[..., :cols]


def expand_rows(grid: torch.Tensor, r0: int, r1: int, cols: int, block: tuple[int, int]) -> torch.Tensor:
    """Rows [r0, r1) of ``expand`` for one (R, C) scale grid: each element's block scale."""
    rows = grid[torch.arange(r0, r1, device=grid.device) // block[0]]
    return rows.repeat_interleave(block[1], dim=-1)[:, :cols]


def block_amax(X: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """The largest |X| of each block, on the scale grid (edge blocks partial)."""
    *lead, rows, cols = X.shape
    bm, bn = block
    R, C = math.ceil(rows / bm), math.ceil(cols / bn)
    full, rest = divmod(cols, bn)
    flat = X.reshape(-1, rows, cols)
    out = torch.empty(flat.shape[0], R, C, dtype=X.dtype, device=X.device)
    for i, matrix in enumerate(flat):
        per_row = torch.zeros(R * bm, C, dtype=X.dtype, device=X.device)  # padded rows stay 0
        for r0, r1 in row_chunks(rows, cols):
            chunk = matrix[r0:r1].abs()
            if full:
                per_row[r0:r1, :full] = chunk[:, : full * bn].reshape(r1 - r0, full, bn).amax(dim=-1)
            if rest:
                per_row[r0:r1, full] = chunk[:, full * bn :].amax(dim=-1)
        out[i] = per_row.reshape(R, bm, C).amax(dim=1)
    return out.reshape(*lead, R, C)


def grid_step(values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of the quantized grid at ``values`` (float64), each element's block scale given in full."""
    if dtype.is_floating_point:
        return ulp(values / scales, dtype) * scales
    return scales


def quantize(
    X: torch.Tensor,
    dtype: torch.dtype,
    block: tuple[int, int],
    scale_dtype: torch.dtype,
    base: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, QuantizationError]:
    """Exact float64 ``X`` (..., rows, cols) as (q in ``dtype``, scales on the block grid in
    ``scale_dtype``, the error), the scales recomputed per ``block``.

    ``base`` (the dequantized weight before the update, float64) only serves the report's
    ``update_ratio``. ``X`` must be finite: float8_e4m3fn has no infinity. Works through the rows
    ``CHUNK`` elements at a time: beyond ``X`` and the result, memory stays a few MB.

    Example (float8_e4m3fn, one block): X = [[8.0, -1.0, 0.3]] gives s = 8 / 448 = 1/56 and
    X / s = [448, -56, 16.8]; float8 steps by 2 between 16 and 32, so q = [448, -56, 16] and
    D = q * s ≈ [8.0, -1.0, 0.2857]: 0.3 is off by 0.0143, 0.4 of a step.
    """
    qmax = QMAX[dtype]
    amax = block_amax(X, block)
    exact = amax / qmax
    scales = round_to(exact, scale_dtype)
    low = scales.double() < exact  # rounded up instead: no element lands beyond qmax
    scales = torch.where(low, torch.nextafter(scales, torch.full_like(scales, math.inf)), scales)
    scales = torch.where(amax > 0, scales, torch.ones_like(scales))
    *_, rows, cols = X.shape
    q = torch.empty(X.shape, dtype=dtype, device=X.device)
    grids = scales.double().reshape(-1, *scales.shape[-2:])
    flat_q, flat_x = q.view(-1, rows, cols), X.reshape(-1, rows, cols)
    flat_base = base.reshape(-1, rows, cols) if base is not None else None
    sums = torch.zeros(3, dtype=torch.float64)  # ||X||^2, ||D - X||^2, ||X - base||^2
    worst = torch.zeros(2, dtype=torch.float64)  # max |D - X|, max |D - X| / step
    for i in range(flat_x.shape[0]):
        for r0, r1 in row_chunks(rows, cols):
            x = flat_x[i, r0:r1]
            S = expand_rows(grids[i], r0, r1, cols, block)
            t = x / S
            step = ulp(t, dtype).mul_(S) if dtype.is_floating_point else S  # the grid's spacing at x
            t.clamp_(-qmax, qmax)
            # torch.round rounds half to even, as the float casts do
            chunk = round_to(t, dtype) if dtype.is_floating_point else torch.round(t).to(dtype)
            flat_q[i, r0:r1] = chunk
            diff = chunk.double().mul_(S).sub_(x).abs_()
            sums[0] += torch.linalg.vector_norm(x).square()
            sums[1] += torch.linalg.vector_norm(diff).square()
            if flat_base is not None:
                sums[2] += torch.linalg.vector_norm(x - flat_base[i, r0:r1]).square()
            if diff.numel():
                worst[0] = torch.maximum(worst[0], diff.max())
                worst[1] = torch.maximum(worst[1], diff.div_(step).max())
    norm, err_norm, delta = (math.sqrt(float(v)) for v in sums)
    update = None
    if base is not None:
        update = err_norm / delta if delta > 0 else (0.0 if err_norm == 0 else math.inf)
    error = QuantizationError(
        rel_error=err_norm / norm if norm > 0 else 0.0,
        max_abs_error=float(worst[0]),
        max_step=float(worst[1]),
        update_ratio=update,
    )
    return q, scales, error
