"""An independent reference for correct rounding of float64 to half precision, for the tests.

Takes torch's cast as a first guess, then compares it with its two neighbours (found by stepping
the bit pattern) in float64 and keeps the nearest, ties to the even bit pattern.
"""

from __future__ import annotations

import torch


def nearest(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    x = x.double()
    if dtype not in (torch.bfloat16, torch.float16):
        return x.to(dtype)
    guess = x.to(dtype)
    bits = guess.view(torch.int16).to(torch.int32)
    candidates = [guess]
    for step in (-1, 1):
        neighbour = (bits + step).clamp(-32768, 32767).to(torch.int16).view(dtype)
        candidates.append(neighbour)
    best = guess
    best_distance = (guess.double() - x).abs()
    for candidate in candidates[1:]:
        distance = (candidate.double() - x).abs()
        even = (candidate.view(torch.int16) % 2) == 0
        better = (distance < best_distance) | ((distance == best_distance) & even & torch.isfinite(candidate))
        better &= torch.isfinite(candidate) & (torch.sign(candidate.double()) * torch.sign(x) >= 0)
        best = torch.where(better, candidate, best)
        best_distance = torch.where(better, distance, best_distance)
    return best
