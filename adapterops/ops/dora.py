"""DoRA math on one module at a time, given its base weight W (float64, math layout (out, in)).

    V = W + s B A,   n = ||V||_row,   W' = m / n * V
    dW_eff = W' - W = (m/n - 1) * W + (m/n) * s B A        (row scaling)

LoRA -> DoRA is exact: m = n keeps W' = V. DoRA -> LoRA is not: dW_eff is full rank in general,
so the best rank-k approximation is taken (``best_low_rank``), and its error is reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adapterops.adapter import LoraModule
from adapterops.errors import InvalidInputError
from adapterops.ops.lowrank import RankPolicy


def row_norms(W: torch.Tensor, module: LoraModule) -> torch.Tensor:
    """n = ||W + s B A|| per output row, float64."""
    V = torch.addmm(W, module.B.double(), module.A.double(), alpha=module.scale)
    return torch.linalg.vector_norm(V, dim=1)


def effective_delta(W: torch.Tensor, module: LoraModule) -> torch.Tensor:
    """dW_eff = W' - W for a DoRA module, or s B A for a LoRA module; dense float64 (out, in)."""
    V = torch.addmm(W, module.B.double(), module.A.double(), alpha=module.scale)
    if module.magnitude is None:
        return V.sub_(W)
    n = torch.linalg.vector_norm(V, dim=1)
    V.mul_((module.magnitude.double() / n)[:, None])
    return V.sub_(W)


@dataclass(frozen=True)
class LowRank:
    """Factors of a rank-k approximation of a dense M, and how good it is."""

    A: torch.Tensor  # (k, in)
    B: torch.Tensor  # (out, k)
    energy_kept: float  # ||B A||_F^2 / ||M||_F^2
    rel_error: float  # ||M - B A||_F / ||M||_F, computed exactly
    solver: str


def best_low_rank(M: torch.Tensor, policy: RankPolicy, *, exact_limit: int = 1024, seed: int = 0) -> LowRank:
    """Best rank-k approximation of a dense float64 matrix, k chosen by ``policy``.

    Matrices with min(out, in) <= ``exact_limit`` get a full float64 SVD (exact Eckart-Young).
    Larger ones get a randomized range finder with 4 power iterations in float32 (Halko, Martinsson,
    Tropp 2011), widened until the target is met, or replaced by the exact SVD once the sketch would
    be a quarter of the smaller side wide; the reported error is measured exactly either way.
    """
    out, inp = M.shape
    if policy.rank is not None and policy.rank > min(out, inp):
        raise InvalidInputError(
            f"rank {policy.rank} exceeds what a {out}x{inp} update can have ({min(out, inp)})"
        )
    total = float(M.pow(2).sum())
    if total == 0.0:
        return LowRank(M.new_zeros(1, inp), M.new_zeros(out, 1), 1.0, 0.0, "dense")
    if min(out, inp) <= exact_limit:
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        k = _choose(policy, S, total, (out, inp))
        return _factors(M, U[:, :k], S[:k], Vh[:k], total, "dense")
    width = (policy.rank or 32) + 16
    generator = torch.Generator(device=M.device).manual_seed(seed)
    M32 = M.float()
    while True:
        width = min(width, min(out, inp))
        if policy.rank is None and 4 * width >= min(out, inp):  # as costly as the exact SVD by now
            U, S, Vh = torch.linalg.svd(M, full_matrices=False)
            k = _choose(policy, S, total, (out, inp))
            return _factors(M, U[:, :k], S[:k], Vh[:k], total, "dense")
        U, S, Vh = _randomized_svd(M32, width, generator)
        k = _choose(policy, S, total, (out, inp))
        if k < width - 8 or policy.rank is not None:
            return _factors(M, U[:, :k].double(), S[:k].double(), Vh[:k].double(), total, "randomized")
        width *= 2


def _randomized_svd(M: torch.Tensor, width: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    omega = torch.randn(M.shape[1], width, generator=generator, dtype=M.dtype, device=M.device)
    Q = torch.linalg.qr(M @ omega)[0]
    for _ in range(4):
        Q = torch.linalg.qr(M.T @ Q)[0]
        Q = torch.linalg.qr(M @ Q)[0]
    Ub, S, Vh = torch.linalg.svd(Q.T @ M, full_matrices=False)
    return Q @ Ub, S, Vh


def _choose(policy: RankPolicy, S: torch.Tensor, total: float, shape: tuple[int, int]) -> int:
    """k from singular values S (possibly only the leading ones) and the exact total energy."""
    if policy.energy is not None:
        cumulative = torch.cumsum(S.double() ** 2, 0) / total
        reached = torch.nonzero(cumulative >= policy.energy * (1 - 1e-12))
        return int(reached[0]) + 1 if reached.numel() else S.numel()
    return max(1, policy.choose(S, shape))


def _factors(
    M: torch.Tensor, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, total: float, solver: str
) -> LowRank:
    root = S.sqrt()
    B, A = U * root[None, :], root[:, None] * Vh
    # ||M - B A||^2 = ||M||^2 - 2 <M, B A> + ||B A||^2, all in float64 and exact whether or not
    # U and Vh are orthonormal to the last bit (the randomized path computes them in float32)
    inner = float(((B.T @ M) * A).sum())
    kept = float(((B.T @ B) * (A @ A.T)).sum())
    error = max(total - 2 * inner + kept, 0.0)
    return LowRank(A, B, kept / total, (error / total) ** 0.5, solver)
