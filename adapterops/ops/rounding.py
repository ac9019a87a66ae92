"""Rounding float64 values once to a storage dtype, and the spacing of a dtype (ulp)."""

from __future__ import annotations

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
    """The spacing of ``dtype`` at each value of ``x`` (float64), subnormals included."""
    bits = MANTISSA_BITS[dtype]
    info = torch.finfo(dtype)
    _, exponent = torch.frexp(x.double().abs())
    # frexp: |x| = f * 2**e with f in [0.5, 1), so the spacing is 2**(e - 1 - bits)
    spacing = torch.ldexp(torch.ones_like(x, dtype=torch.float64), exponent - 1 - bits)
    return torch.clamp(spacing, min=info.smallest_normal * 2.0**-bits)
