"""Rounding float64 values once to a storage dtype, and the spacing of a dtype (ulp)."""

from __future__ import annotations

import math

import torch

MANTISSA_BITS = {
    torch.float64: 52,
    torch.float32: 23,
    torch.float16: 10,
    torch.bfloat16: 7,
    torch.float8_e4m3fn: 3,
    torch.float8_e5m2: 2,
}
# dtypes whose every value is a float32: float64 is rounded to them through float32, settling midpoints
_NARROW = (torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2)


def round_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 ``x`` rounded once, to nearest (ties to even), to ``dtype``.

    torch casts float64 to bfloat16/float16 through float32, which rounds twice: a value just
    off a half-precision midpoint lands on it in float32 and then goes to the even neighbour,
    not the nearest. Here such values are settled by which side of the midpoint ``x`` lies on.
    The float8 dtypes are rounded the same way; torch saturates values beyond their range to the
    largest finite value.
    """
    if x.dtype != torch.float64 or dtype not in _NARROW:
        return x.to(dtype)
    if x.numel() > _CHUNK:  # in pieces: the temporaries below stay a few MB (and cache-resident)
        out = torch.empty(x.shape, dtype=dtype, device=x.device)
        flat_x, flat_out = x.reshape(-1), out.view(-1)
        for start in range(0, flat_x.numel(), _CHUNK):
            flat_out[start : start + _CHUNK] = _round_once(flat_x[start : start + _CHUNK], dtype)
        return out
    return _round_once(x, dtype)


_CHUNK = 1 << 20


def _round_once(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    x32 = x.to(torch.float32)
    up = torch.nextafter(x32, torch.tensor(float("inf"), device=x.device)).to(dtype)
    down = torch.nextafter(x32, torch.tensor(float("-inf"), device=x.device)).to(dtype)
    residual = x - x32.double()
    # x32 is exactly halfway between two adjacent values of dtype (both exact in float64)
    at_midpoint = (up != down) & ((up.double() + down.double()) / 2 == x32.double())
    rounded = x32.to(dtype)
    rounded = torch.where(at_midpoint & (residual > 0), up, rounded)
    return torch.where(at_midpoint & (residual < 0), down, rounded)


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` at each value of ``x`` (float64), subnormals included; Inf where
    ``x`` is Inf or NaN.

    ``|x|``'s binade start 2**floor(log2|x|) is x's float64 bit pattern with the sign and mantissa
    cleared (exact, and one integer pass instead of frexp and ldexp); ``dtype`` spaces its values
    2**-bits of that apart, and never closer than its subnormals.
    """
    bits = MANTISSA_BITS[dtype]
    info = torch.finfo(dtype)
    x64 = x.double()
    binade = torch.bitwise_and(x64.view(torch.int64), 0x7FF0000000000000).view(torch.float64)
    return torch.clamp(binade.mul_(2.0**-bits), min=info.smallest_normal * 2.0**-bits)


# float32 bits of one half-precision cell: (mask keeping the cell, the midpoint's offset in it)
_CELLS = {torch.bfloat16: (-(1 << 16), 1 << 15), torch.float16: (-(1 << 13), 1 << 12)}


def midpoint_gap(x: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """``|x - m|`` for float32 ``x``, ``m`` the rounding midpoint inside x's ``dtype`` cell (exact).

    A float32 value's bit pattern, its low 16 (bfloat16) or 13 (float16) bits cleared, is the
    half-precision value below it; the same pattern with those bits ``1000...`` is the midpoint
    ``m`` between it and the next. ``x`` and ``m`` share sign and exponent, so ``x - m`` is exact.
    The nearest midpoint of all is at least half as far (``docs/math.md``, certified kernel):
    the one below the binade's first value sits at least a quarter step under it. Inf and NaN
    give NaN. For float16 this holds only where ``|x| >= 2**-14`` (float16's subnormals are not
    aligned with float32's bits); below that the caller must not trust it. Past float16's range
    the cells are not float16's, yet the factor holds: |x| >= 2**e >= 2**16 lies at least
    2**(e - 12) >= gap / 2 above the overflow threshold 65520.

    ``out``: an int32 buffer of x's shape to compute in (the result is a float32 view of it).
    Worked example (bfloat16, steps of 2**-7 on [1, 2)): x = 1 + 2**-9 lies in the cell of 1,
    whose midpoint is 1 + 2**-8, so the gap is 2**-9.
    """
    mask, half = _CELLS[dtype]
    bits = torch.bitwise_and(x.view(torch.int32), mask, out=out)
    gap = bits.bitwise_or_(half).view(torch.float32)
    return gap.sub_(x).abs_()


def midpoint_distance(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 distance from each float32 ``x`` to the nearest rounding midpoint of ``dtype``.

    Exact for every finite x, subnormals and values past the largest finite one included: the
    midpoints next to ``r = x.to(dtype)`` (the nearest value) are halfway to r's two neighbours,
    found by stepping r's bit pattern; an infinite r or neighbour counts as 2**(emax + 1), where
    the overflow threshold is the midpoint. NaN for Inf or NaN x. For the few elements
    ``midpoint_gap`` leaves uncertain, so it may cost a dozen small passes.
    """
    rounded = x.to(dtype)
    bits = rounded.view(torch.int16).to(torch.int32)
    top = 2.0 ** math.frexp(torch.finfo(dtype).max)[1]  # the value after the largest finite one
    value = _finite(rounded.double(), top)
    negative = bits < 0
    magnitude = bits & 0x7FFF
    # the neighbours of |r| away from and towards zero; zero's neighbour towards zero is -tiny
    away = magnitude + 1
    towards = magnitude - 1
    sign = torch.where(negative, -1.0, 1.0).double()
    far = _from_bits(away, dtype, top) * sign
    tiny = _from_bits(torch.ones_like(magnitude), dtype, top)
    near = torch.where(magnitude == 0, -tiny, _from_bits(towards, dtype, top)) * sign
    x64 = x.double()
    return torch.minimum((x64 - (value + far) / 2).abs(), (x64 - (value + near) / 2).abs())


def _from_bits(magnitude: torch.Tensor, dtype: torch.dtype, top: float) -> torch.Tensor:
    """Non-negative ``dtype`` values from their 15-bit patterns: Inf as ``top``, past it (NaN) Inf,
    so that no midpoint lies above the overflow threshold."""
    values = magnitude.clamp(max=0x7FFF).to(torch.int16).view(dtype).double()
    return _finite(values, top).nan_to_num(nan=math.inf)


def _finite(values: torch.Tensor, top: float) -> torch.Tensor:
    return torch.where(torch.isinf(values), torch.copysign(torch.full_like(values, top), values), values)
