"""An independent float64 reference for TIES, DARE and magnitude pruning, written from the papers'
formulas and the definitions in docs/math.md (tie order, DARE's seeded grid blocks), in numpy.

Everything works on one module's updates in math layout, (out, in): ``math_layout`` turns PEFT's
storage-layout deltas (GPT-2 Conv1D (in, out), conv kernels (out, in, kh, kw)) into it.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch


def math_layout(delta: torch.Tensor, transposed: bool) -> np.ndarray:
    """A PEFT delta in math layout: conv kernels flattened to (out, in*kh*kw), Conv1D transposed."""
    d = delta.double().numpy()
    if d.ndim > 2:
        return d.reshape(d.shape[0], -1)
    return d.T if transposed else d


def kept(x: np.ndarray, density: float) -> np.ndarray:
    """The int(density * size) largest magnitudes (a mask); equal magnitudes in flat (row-major) order."""
    k = int(density * x.size)
    flat = x.ravel()
    order = np.lexsort((np.arange(flat.size), -np.abs(flat)))  # by magnitude down, then index up
    keep = np.zeros(flat.size, dtype=bool)
    keep[order[:k]] = True
    return keep.reshape(x.shape)


def trim(x: np.ndarray, density: float) -> np.ndarray:
    return np.where(kept(x, density), x, 0.0)


def dare_mask(seed: int, name: str, index: int, shape: tuple[int, int], density: float) -> np.ndarray:
    """docs/math.md: grid blocks of G = max(1, 65536 // in) rows, block b drawn by torch.rand (float32)
    from a generator seeded with sha256("{seed}:{name}:{index}:{b}")[:8] (little-endian) >> 1."""
    out, inp = shape
    grid = max(1, 65536 // inp)
    blocks = []
    for b, b0 in enumerate(range(0, out, grid)):
        digest = hashlib.sha256(f"{seed}:{name}:{index}:{b}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        blocks.append(torch.rand((min(grid, out - b0), inp), generator=generator, dtype=torch.float32))
    return (torch.cat(blocks) < density).numpy()


def merge(
    method: str,
    name: str,
    deltas: list[np.ndarray],
    weights: list[float],
    density: float,
    *,
    majority_sign: str = "total",
    seed: int = 0,
) -> np.ndarray:
    """The merged update of one module (Yadav et al. 2023, Alg. 1; Yu et al. 2024), float64."""
    if method in ("ties", "magnitude_prune"):
        parts = np.stack([trim(d, density) for d in deltas])
    else:
        masks = [dare_mask(seed, name, i, d.shape, density) for i, d in enumerate(deltas)]
        parts = np.stack([np.where(m, d / density, 0.0) for m, d in zip(masks, deltas, strict=True)])
    w = np.asarray(weights, dtype=np.float64).reshape(-1, 1, 1)
    if method in ("magnitude_prune", "dare_linear"):
        return np.asarray((w * parts).sum(0))
    votes = parts.sum(0) if majority_sign == "total" else np.sign(parts).sum(0)
    gamma = np.where(votes >= 0, 1.0, -1.0)
    agree = np.sign(parts) == gamma
    return np.asarray(np.where(agree, w * parts, 0.0).sum(0) / np.maximum(agree.sum(0), 1))
