"""Low-rank algebra on factors: the SVD of ``B @ A`` without forming it.

For B (out, R) and A (R, in), thin QR gives B = Qb Rb and A^T = Qa Ra, so

    B @ A = Qb (Rb Ra^T) Qa^T

and the SVD of the small core ``Rb Ra^T = U S V^T`` (at most R x R) is the SVD of B @ A:
left vectors Qb U, singular values S, right vectors Qa V. Truncating S gives the best rank-k
approximation in Frobenius and spectral norm (Eckart-Young), with error sqrt(sum of dropped S^2).
Cost: O((out + in) R^2), memory O((out + in) R). No (out, in) matrix is ever formed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from adapterops.errors import InvalidInputError


@dataclass(frozen=True)
class RankPolicy:
    """How many singular values to keep; at most one of the three may be set.

    - ``rank``: keep the top k.
    - ``energy``: keep the fewest whose squared sum reaches this fraction of the total (0 < e <= 1).
    - ``sv_ratio``: keep those within this factor of the largest (S_0 / S_i <= ratio), as kohya's resize does.
    None of them: keep the numerical rank (values above the rounding level of the compute dtype).
    """

    rank: int | None = None
    energy: float | None = None
    sv_ratio: float | None = None

    def __post_init__(self) -> None:
        given = [n for n in ("rank", "energy", "sv_ratio") if getattr(self, n) is not None]
        if len(given) > 1:
            raise InvalidInputError(f"give one of rank, energy, sv_ratio, not {' and '.join(given)}")
        if self.rank is not None and self.rank < 1:
            raise InvalidInputError(f"rank must be a positive integer, got {self.rank}")
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise InvalidInputError(f"energy must be in (0, 1], got {self.energy}")
        if self.sv_ratio is not None and not self.sv_ratio >= 1.0:
            raise InvalidInputError(f"sv_ratio must be >= 1, got {self.sv_ratio}")

    @property
    def is_exact(self) -> bool:
        return self.rank is None and self.energy is None and self.sv_ratio is None

    def describe(self) -> str:
        if self.rank is not None:
            return f"rank {self.rank}"
        if self.energy is not None:
            return f"energy {self.energy}"
        if self.sv_ratio is not None:
            return f"sv_ratio {self.sv_ratio}"
        return "numerical rank"

    def choose(self, S: torch.Tensor, shape: tuple[int, int], reference: float | None = None) -> int:
        """Number of singular values to keep from the descending ``S`` of a ``shape`` matrix.

        ``reference`` is the size of the terms the matrix was summed from (see ``numerical_rank``).
        Returns 0 only when the matrix is zero to rounding.
        """
        if S.numel() == 0 or numerical_rank(S, shape, reference) == 0:
            return 0
        if self.rank is not None:
            return min(self.rank, S.numel())
        if self.energy is not None:
            sq = S.double() ** 2
            reached = torch.cumsum(sq, 0) >= self.energy * float(sq.sum()) * (1 - 1e-12)
            return int(torch.nonzero(reached)[0]) + 1
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
