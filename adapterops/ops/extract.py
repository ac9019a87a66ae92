"""LoRA factors of a dense difference ``M = W_ft - W_base`` (math layout, float64), measured as stored.

``best_low_rank`` chooses the rank and solves: an exact SVD when min(out, in) <= ``exact_limit``,
else a randomized range finder in float32 (Halko, Martinsson & Tropp 2011). For extraction, where
the difference is all there is and its spectrum may decay slowly, the randomized result is then

- **refined**: power (subspace) iterations in float64 from its left singular vectors Q_0,
  Q_{j+1} = orth(M Mᵀ Q_j), until one lowers the error energy left by at most ``REFINE_TOL`` of it
  (``tail(Q_j) - tail(Q_{j+1}) <= REFINE_TOL * tail(Q_{j+1})``). If ``MAX_REFINE`` iterations do not
  get there (a slowly decaying spectrum), the exact SVD is used instead (the report's solver then
  says ``dense``). This is a convergence test, not a bound: the reported error is always measured,
  never estimated;
- **polished**: the factors are the best rank-k approximation within span(Q), Q Qᵀ M, computed
  in float64 (the sketch ran in float32).

Either way the factors are rounded to their storage dtype and the error ||M - B A||_F is measured
on the rounded factors, in float64, a block of rows at a time (``measured_error``). ``energy_kept``
is the share of ||M||² in the kept singular values (before rounding). Pure: tensors in and out.

For a rank budget over all modules (``spectrum``), each difference's singular values come first:
all of them (``torch.linalg.svdvals``, float64) when min(out, in) <= ``exact_limit``; else the
leading ``cap`` ones, from the same randomized, checked and polished path (exact singular values
of Q Qᵀ M), with the exact ||M||² so that every tail is known: e(k) = ||M||² - sum_{j<k} s_j².

Worked example: M = diag(3, 2, 1) (3 x 3), rank 2: the exact SVD keeps 3 and 2, so B A = diag(3, 2, 0),
energy kept (9 + 4) / 14 and relative error sqrt(1 / 14) ≈ 0.267.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from adapterops.adapter import Solver
from adapterops.ops.lowrank import (
    Dense,
    LowRank,
    RankPolicy,
    best_low_rank,
    numerical_rank,
    suffix_energies,
)

REFINE_TOL = 1e-4  # one more iteration may lower the error energy by at most this share of what is left
MAX_REFINE = 6  # float64 power iterations after the sketch before the exact SVD is used instead
SPECTRUM_CAP = 256  # budgets without max_rank: the most singular values found above exact_limit


def factor_difference(
    M: torch.Tensor, policy: RankPolicy, *, exact_limit: int, dtype: torch.dtype, seed: int = 0
) -> LowRank:
    """Factors (A (k, in), B (out, k), stored in ``dtype``) of the best rank-k approximation of ``M``.

    ``M`` is a nonzero float64 (out, in) matrix. A ``policy.rank`` above what ``M`` holds keeps all of
    it, with a ``note`` (``RankPolicy.pick``). ``rel_error`` is measured on the factors as rounded to
    ``dtype``.
    """
    dense = Dense.of(M)  # ||M||^2 once, for the solver and the checks
    total = dense.total
    low = best_low_rank(dense, policy, exact_limit=exact_limit, seed=seed)
    if low.solver is Solver.RANDOMIZED:
        low = _checked(dense, low, policy)
    A, B = low.A.to(dtype), low.B.to(dtype)
    return replace(
        low, A=A, B=B, energy_kept=min(low.energy_kept, 1.0), rel_error=measured_error(M, A, B, total)
    )


@dataclass(frozen=True)
class Spectrum:
    """What a budget needs of one difference: ``tails`` (||M - M_i||_F^2 for i = 0..k, k at most the
    numerical rank and the cap), whether the cap cut the spectrum short, and the solver."""

    tails: tuple[float, ...]
    capped: bool
    solver: Solver


def spectrum(M: torch.Tensor, *, max_rank: int | None, exact_limit: int, seed: int = 0) -> Spectrum:
    """The squared error of the best rank-i approximation of the nonzero float64 ``M``, i = 0..k.

    Up to ``exact_limit`` (min(out, in)) from every singular value (float64 ``svdvals``), k the
    numerical rank capped at ``max_rank``. Above it from the leading ``max_rank`` ones (else
    ``SPECTRUM_CAP``), found as ``factor_difference`` finds its factors, and the exact ||M||^2:
    e(i) = ||M||^2 - sum_{j<i} s_j^2. ``capped``: ``SPECTRUM_CAP`` cut the spectrum short.

    Example: M = diag(3, 2, 1), max_rank 2: tails (14, 5, 1).
    """
    out, inp = (int(n) for n in M.shape)
    full = min(out, inp)
    if full <= exact_limit:
        S = torch.linalg.svdvals(M)
        limit = numerical_rank(S, (out, inp))
        return Spectrum(suffix_energies(S, max(1, min(limit, max_rank or limit))), False, Solver.DENSE)
    dense = Dense.of(M)
    total = dense.total
    count = min(max_rank or SPECTRUM_CAP, full)
    policy = RankPolicy(rank=count)
    low = best_low_rank(dense, policy, exact_limit=exact_limit, seed=seed)
    if low.solver is Solver.RANDOMIZED:
        low = _checked(dense, low, policy)
    # the factors split each singular value evenly: s_j = ||B[:, j]|| ||A[j]||
    S = (low.B.norm(dim=0) * low.A.norm(dim=1)).sort(descending=True).values
    k = max(1, min(numerical_rank(S, (out, inp)), count))
    kept = torch.cat([S.new_zeros(1), torch.cumsum(S[:k].pow(2), 0)])
    tails = tuple(max(total - float(x), 0.0) for x in kept)
    return Spectrum(tails, max_rank is None and k == count < full, low.solver)


def _checked(dense: Dense, low: LowRank, policy: RankPolicy) -> LowRank:
    """The randomized result refined by float64 power iterations until one more would lower the error
    energy by at most ``REFINE_TOL`` of what is left, or the exact SVD where ``MAX_REFINE`` of them do
    not get there (see the module docstring)."""
    M, total = dense.held, dense.total
    Q = torch.linalg.qr(low.B.double())[0]  # (out, k): the sketch's left singular subspace
    Z = M.T @ Q  # (in, k)
    tail = total - float(Z.pow(2).sum())
    # below float32's resolution of M, no further iteration can matter for the stored factors
    floor = (torch.finfo(torch.float32).eps ** 2) * total
    for _ in range(MAX_REFINE):
        Q = torch.linalg.qr(M @ Z)[0]
        C = Q.T @ M  # (k, in): Q Q^T M = Q C is the best approximation within span(Q)
        previous, tail = tail, total - float(C.pow(2).sum())
        if previous - tail <= REFINE_TOL * max(tail, 0.0) + floor:
            break
        Z = C.T
    else:
        return best_low_rank(dense, policy, exact_limit=min(M.shape))
    U, S, Vh = torch.linalg.svd(C, full_matrices=False)
    root = S.sqrt()
    B = (Q @ U) * root[None, :]
    A = root[:, None] * Vh
    kept = float(S.pow(2).sum())
    return replace(
        low, A=A, B=B, energy_kept=kept / total, rel_error=math.sqrt(max(total - kept, 0.0) / total)
    )


def measured_error(M: torch.Tensor, A: torch.Tensor, B: torch.Tensor, total: float) -> float:
    """``||M - B A||_F / ||M||_F`` (``total`` = ||M||_F² > 0) for factors in any dtype, in float64.

    The residual is formed a block of rows at a time (about 2^24 elements: at most 128 MiB more), not
    expanded as ||M||² - 2<M, BA> + ||BA||², whose cancellation cannot resolve errors below about
    1e-8 of ||M|| (the square root of float64's epsilon) and would misreport near-exact modules.
    """
    A64, B64 = A.to(M.dtype), B.to(M.dtype)
    rows = max(1, (1 << 24) // max(1, int(M.shape[1])))
    squared = 0.0
    for start in range(0, int(M.shape[0]), rows):
        block = M[start : start + rows] - B64[start : start + rows] @ A64
        squared += float(block.pow(2).sum())
    return math.sqrt(squared / total)
