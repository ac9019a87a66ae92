"""Low-rank algebra on factors: the SVD of ``B @ A`` without forming it.

For B (out, R) and A (R, in), thin QR gives B = Qb Rb and A^T = Qa Ra, so

    B @ A = Qb (Rb Ra^T) Qa^T

and the SVD of the small core ``Rb Ra^T = U S V^T`` (at most R x R) is the SVD of B @ A:
left vectors Qb U, singular values S, right vectors Qa V. Truncating S gives the best rank-k
approximation in Frobenius and spectral norm (Eckart-Young), with error sqrt(sum of dropped S^2).
Cost: O((out + in) R^2), memory O((out + in) R). No (out, in) matrix is ever formed.

``best_low_rank`` is the dense counterpart, for updates that exist only densely (DoRA's):
an exact SVD for small matrices, a randomized range finder for large ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from adapterops.adapter import Solver
from adapterops.errors import InvalidInputError, param
from adapterops.options import RankTarget


@dataclass(frozen=True)
class RankPolicy(RankTarget):
    """``RankTarget`` (at most one of ``rank``, ``energy``, ``sv_ratio``; checked there) as a rule.

    - ``rank``: keep the top k.
    - ``energy``: keep the fewest whose squared sum reaches this fraction of the total (0 < e <= 1).
    - ``sv_ratio``: keep those within this factor of the largest (S_0 / S_i <= ratio), as kohya's resize does.
    None of them: keep the numerical rank (values above the rounding level of the compute dtype).

    Example: S = [3, 2, 1], energy 0.9: squares 9, 4, 1 of 14; 9 + 4 = 13 >= 12.6, so k = 2.
    """

    def describe(self) -> str:
        target = self.target()
        return " ".join(f"{k} {v}" for k, v in target.items()) if target else "numerical rank"

    def choose(
        self,
        S: torch.Tensor,
        shape: tuple[int, int],
        reference: float | None = None,
        total: float | None = None,
    ) -> int:
        """Number of singular values to keep from the descending ``S`` of a ``shape`` matrix.

        ``reference`` is the size of the terms the matrix was summed from (see ``numerical_rank``).
        ``total`` is ||M||_F^2 when ``S`` holds only the leading values (randomized solvers); the
        energy rule then may not be met within ``S``, and all of ``S`` is kept.
        Returns 0 only when the matrix is zero to rounding.
        """
        if S.numel() == 0 or numerical_rank(S, shape, reference) == 0:
            return 0
        if self.rank is not None:
            return min(self.rank, S.numel())
        if self.energy is not None:
            sq = S.double() ** 2
            whole = float(sq.sum()) if total is None else total
            reached = torch.nonzero(torch.cumsum(sq, 0) >= self.energy * whole * (1 - 1e-12))
            return int(reached[0]) + 1 if reached.numel() else S.numel()
        if self.sv_ratio is not None:
            return max(1, int((S[0] / self.sv_ratio <= S).sum()))
        return max(1, numerical_rank(S, shape, reference))


def numerical_rank(S: torch.Tensor, shape: tuple[int, int], reference: float | None = None) -> int:
    """Count of singular values above max(shape) * eps * max(S_0, reference).

    ``reference`` should be the norm of the largest term of a sum: when terms cancel, S_0 itself is
    rounding noise and must not set the threshold.
    """
    if S.numel() == 0:
        return 0
    tol = max(shape) * torch.finfo(S.dtype).eps * max(float(S[0]), reference or 0.0)
    return int((tol < S).sum())


@dataclass(frozen=True)
class Factored:
    """``B @ A = Qb U diag(S) Vh Qa^T``, kept in pieces so truncation multiplies only k columns."""

    Qb: torch.Tensor  # (out, R') orthonormal columns
    U: torch.Tensor  # (R', K)
    S: torch.Tensor  # (K,) descending
    Vh: torch.Tensor  # (K, R'')
    Qa: torch.Tensor  # (in, R'') orthonormal columns

    def truncate(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Factors (A (k, in), B (out, k)) of the best rank-k approximation; S split evenly."""
        root = self.S[:k].sqrt()
        B = self.Qb @ (self.U[:, :k] * root[None, :])
        A = (root[:, None] * self.Vh[:k]) @ self.Qa.T
        return A, B

    def tail_energy(self, k: int) -> float:
        return float((self.S[k:].double() ** 2).sum())

    @property
    def energy(self) -> float:
        return float((self.S.double() ** 2).sum())


def svd_of_product(B: torch.Tensor, A: torch.Tensor) -> Factored:
    """SVD of ``B @ A`` (B (out, R), A (R, in)) through QR of both factors and a small core.

    Computes in the factors' dtype: pass float32 or float64.
    """
    Qb, Rb = torch.linalg.qr(B)
    Qa, Ra = torch.linalg.qr(A.T)
    U, S, Vh = torch.linalg.svd(Rb @ Ra.T, full_matrices=False)
    return Factored(Qb=Qb, U=U, S=S, Vh=Vh, Qa=Qa)


def frobenius_norm_of_product(B: torch.Tensor, A: torch.Tensor) -> float:
    """||B @ A||_F without forming it: ||Rb Ra^T||_F from the QRs of B and A^T."""
    if B.shape[1] == 0:
        return 0.0
    Rb = torch.linalg.qr(B, mode="r")[1]
    Ra = torch.linalg.qr(A.T, mode="r")[1]
    return float(torch.linalg.matrix_norm(Rb @ Ra.T).double())


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64, whatever the storage dtype.

    Factor math costs O((out + in) R^2), negligible next to reading and writing the factors, so
    it can afford float64: the only rounding left in an output is the final cast to its dtype.
    """
    return torch.float64


def relative(part: float, whole: float) -> float:
    return 0.0 if whole == 0.0 else math.sqrt(max(part, 0.0) / whole)


@dataclass(frozen=True)
class LowRank:
    """Factors of a rank-k approximation of a dense M, and how good it is."""

    A: torch.Tensor  # (k, in)
    B: torch.Tensor  # (out, k)
    energy_kept: float  # ||B A||_F^2 / ||M||_F^2
    rel_error: float  # ||M - B A||_F / ||M||_F, computed exactly
    solver: Solver


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
            f"rank {policy.rank} exceeds what a {out}x{inp} update can have ({min(out, inp)}); "
            f"choose {param('rank', min(out, inp))} or less"
        )
    total = float(M.pow(2).sum())
    if total == 0.0:
        return LowRank(M.new_zeros(1, inp), M.new_zeros(out, 1), 1.0, 0.0, Solver.DENSE)
    if min(out, inp) <= exact_limit:
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        k = _choose(policy, S, total, (out, inp))
        return _factors(M, U[:, :k], S[:k], Vh[:k], total, Solver.DENSE)
    width = (policy.rank or 32) + 16
    generator = torch.Generator(device=M.device).manual_seed(seed)
    M32 = M.float()
    while True:
        width = min(width, min(out, inp))
        if policy.rank is None and 4 * width >= min(out, inp):  # as costly as the exact SVD by now
            U, S, Vh = torch.linalg.svd(M, full_matrices=False)
            k = _choose(policy, S, total, (out, inp))
            return _factors(M, U[:, :k], S[:k], Vh[:k], total, Solver.DENSE)
        U, S, Vh = _randomized_svd(M32, width, generator)
        k = _choose(policy, S, total, (out, inp))
        if k < width - 8 or policy.rank is not None:
            return _factors(M, U[:, :k].double(), S[:k].double(), Vh[:k].double(), total, Solver.RANDOMIZED)
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
    return max(1, policy.choose(S, shape, total=total))


def _factors(
    M: torch.Tensor, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, total: float, solver: Solver
) -> LowRank:
    root = S.sqrt()
    B, A = U * root[None, :], root[:, None] * Vh
    # ||M - B A||^2 = ||M||^2 - 2 <M, B A> + ||B A||^2, all in float64 and exact whether or not
    # U and Vh are orthonormal to the last bit (the randomized path computes them in float32)
    inner = float(((B.T @ M) * A).sum())
    kept = float(((B.T @ B) * (A @ A.T)).sum())
    error = max(total - 2 * inner + kept, 0.0)
    return LowRank(A, B, kept / total, (error / total) ** 0.5, solver)
