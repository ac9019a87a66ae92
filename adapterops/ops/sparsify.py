"""TIES, DARE and magnitude pruning of one module's dense updates (docs/math.md).

Each function takes the effective updates dW_i = s_i B_i A_i of one module, in math layout
(out, in) and float64, with their weights w_i, and returns the dense merged update:

- ``trim``: keep the int(density * numel) entries of largest magnitude (TIES's trim; ties broken
  by ``torch.topk``), zero the rest.
- ``drop``: keep each entry with probability ``density`` and divide the kept ones by it (DARE's
  drop and rescale, unbiased: E[drop(x)] = x).
- ``elect``: per entry, the sign of sum_i t_i (``total``) or of sum_i sign(t_i) (``frequency``) of
  the trimmed, unweighted updates t_i; a zero sum elects +.
- ``disjoint_mean``: per entry, the mean of the weighted values w_i t_i whose sign is the elected
  one, over their count (0 where none agrees).

``ties`` = trim, elect, disjoint mean (Yadav et al. 2023, TIES-Merging); ``dare_ties`` = drop,
elect, disjoint mean and ``dare_linear`` = drop, weighted sum (Yu et al. 2024, DARE);
``magnitude_prune`` = trim, weighted sum. Worked example (one entry each, density 1, total):
t = (3, -1, 2), w = (1, 1, 0.5): the sum is 4 > 0, so + is elected; the values that agree are
3 and 0.5 * 2 = 1, and their mean (3 + 1) / 2 = 2 is the merged entry.

The random drop of module ``name`` uses a generator seeded by ``module_seed(seed, name)``: results
are reproducible and do not depend on which other modules exist or the order they are visited in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from adapterops.options import MajoritySign, Method, Space


@dataclass(frozen=True)
class Sparsity:
    """The parameters of a sparsifying method: the fraction kept, how signs are elected, the seed,
    and the space it acts in (``Space``; ``ops.native`` for all but ``dense``)."""

    density: float = 1.0
    majority_sign: MajoritySign = MajoritySign.TOTAL
    seed: int = 0
    space: Space = Space.DENSE


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """``delta`` with all but its int(density * numel) largest-magnitude entries set to zero."""
    keep = int(density * delta.numel())
    if keep >= delta.numel():
        return delta.clone()
    flat = delta.reshape(-1)
    out = torch.zeros_like(flat)
    if keep > 0:
        index = torch.topk(flat.abs(), keep, largest=True).indices
        out[index] = flat[index]
    return out.reshape(delta.shape)


def drop(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """Each entry kept with probability ``density`` and divided by it, the others set to zero."""
    if density >= 1.0:
        return delta.clone()
    kept = torch.rand(delta.shape, generator=generator, dtype=torch.float64) < density
    return torch.where(kept, delta / density, torch.zeros_like(delta))


def elect(trimmed: torch.Tensor, how: MajoritySign) -> torch.Tensor:
    """The elected sign (+1 or -1) per entry of the stacked (n, ...) trimmed updates."""
    votes = trimmed.sum(0) if how is MajoritySign.TOTAL else trimmed.sign().sum(0)
    return torch.where(votes >= 0, 1.0, -1.0).to(trimmed.dtype)


def disjoint_mean(trimmed: torch.Tensor, weights: Sequence[float], sign: torch.Tensor) -> torch.Tensor:
    """Mean of the weighted entries w_i t_i whose (unweighted) sign equals ``sign``, 0 where none does."""
    agree = trimmed.sign() == sign
    w = torch.tensor(list(weights), dtype=trimmed.dtype).reshape(-1, *([1] * (trimmed.dim() - 1)))
    total = torch.where(agree, w * trimmed, torch.zeros_like(trimmed)).sum(0)
    return total / agree.sum(0).clamp(min=1)


def weighted_sum(parts: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    w = torch.tensor(list(weights), dtype=parts.dtype).reshape(-1, *([1] * (parts.dim() - 1)))
    return (w * parts).sum(0)


def module_seed(seed: int, name: str) -> int:
    """A 63-bit generator seed from ``seed`` and the module name, stable across runs and platforms."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def sparsified_sum(
    method: Method, name: str, deltas: Sequence[torch.Tensor], weights: Sequence[float], sparsity: Sparsity
) -> torch.Tensor:
    """The dense merged update of one module by ``method`` (module docstring).

    ``deltas``: the inputs' effective updates s_i B_i A_i, each (out, in) float64; ``weights``: w_i.
    """
    if method in (Method.DARE_LINEAR, Method.DARE_TIES):
        generator = torch.Generator().manual_seed(module_seed(sparsity.seed, name))
        parts = torch.stack([drop(d, sparsity.density, generator) for d in deltas])
    else:
        parts = torch.stack([trim(d, sparsity.density) for d in deltas])
    if method in (Method.TIES, Method.DARE_TIES):
        return disjoint_mean(parts, weights, elect(parts, sparsity.majority_sign))
    return weighted_sum(parts, weights)
