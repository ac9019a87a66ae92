"""Low-rank algebra on factors: the SVD of ``B @ A`` without forming it.

For B (out, R) and A (R, in), thin QR gives B = Qb Rb and A^T = Qa Ra, so

    B @ A = Qb (Rb Ra^T) Qa^T

and the SVD of the small core ``Rb Ra^T = U S V^T`` (at most R x R) is the SVD of B @ A:
left vectors Qb U, singular values S, right vectors Qa V. Truncating S gives the best rank-k
approximation in Frobenius and spectral norm (Eckart-Young), with error sqrt(sum of dropped S^2).
Cost: O((out + in) R^2), memory O((out + in) R). No (out, in) matrix is ever formed.

``best_low_rank`` is the dense counterpart, for updates that exist only densely (DoRA's, and the
merged updates of TIES/DARE/magnitude pruning): an exact SVD for small matrices, a randomized range
finder for large ones. A ``Dense`` lets a large matrix be held in float32 while its error is still
measured against its exact float64 rows, recomputed tile by tile. An ``Operator`` is a large matrix
never formed at all (DoRA's diag(g) W + B A): the range finder only multiplies by it in float32, the
Rayleigh-Ritz step and the error use its exact float64 form.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import torch

from adapterops.adapter import Solver
from adapterops.options import RankTarget

POWER_ITERATIONS = 4  # of the range finder on an ``Operator`` (``_operator_svd``), as ``_randomized_svd``
FULL_RANK = "capped at full rank"  # how a module's note starts when rank K asked for more than it holds


@dataclass(frozen=True)
class Pick:
    """A chosen rank, and why it is not what was asked for (None when it is)."""

    k: int
    note: str | None = None


@dataclass(frozen=True)
class RankPolicy(RankTarget):
    """``RankTarget`` (one rule at most, checked there) as a rule for one module's rank.

    - ``rank``: keep the top k; capped at what the module holds (its full rank, or the numerical
      rank of a result exact on factors), with a note.
    - ``energy``: keep the fewest whose squared sum reaches this fraction of the total (0 < e <= 1).
    - ``sv_ratio``: keep those within this factor of the largest (S_0 / S_i <= ratio), as kohya's resize does.
    - a budget (``budget_params``, ``budget_error``): keep every direction the result has; the ranks
      are chosen later over all modules together (``ops.budget``).
    None of them: keep the numerical rank (values above the rounding level of the compute dtype), or a
    caller's default. ``max_rank`` caps whichever applies. No rule ever keeps a direction beyond the
    numerical rank: outputs are never padded with zero singular values.

    Example: S = [3, 2, 1], energy 0.9: squares 9, 4, 1 of 14; 9 + 4 = 13 >= 12.6, so k = 2.
    """

    def describe(self) -> str:
        target = self.target()
        return " ".join(f"{k} {v}" for k, v in target.items()) if target else "numerical rank"

    def bound(self, full: int, default: int | None = None) -> tuple[int | None, bool]:
        """The most singular values this rule can keep of a matrix of rank at most ``full``, before
        its spectrum is known, and whether that bound is the answer (up to the numerical rank).

        ``(None, False)``: only the spectrum tells (energy or sv_ratio without max_rank).
        """
        if self.rank is not None:
            return min(self.rank, full), True
        cap = min(self.max_rank or full, full)
        if self.energy is not None or self.sv_ratio is not None:
            return (cap, False) if self.max_rank is not None else (None, False)
        if default is not None and self.max_rank is None:
            cap = min(default, full)
        return cap, True

    def pick(
        self,
        S: torch.Tensor,
        shape: tuple[int, int],
        reference: float | None = None,
        total: float | None = None,
        *,
        default: int | None = None,
    ) -> Pick:
        """How many singular values to keep from the descending ``S`` of a ``shape`` matrix.

        ``reference`` is the size of the terms the matrix was summed from (see ``numerical_rank``).
        ``total`` is ||M||_F^2 when ``S`` holds only the leading values (randomized solvers); the
        energy rule then may not be met within ``S``, and all of ``S`` is kept. ``default``: the rank
        when no rule is set (a budget without max_rank keeps at most this many, too).
        k is 0 only when the matrix is zero to rounding.
        """
        limit = numerical_rank(S, shape, reference)
        if limit == 0:
            return Pick(0)
        if self.rank is not None:
            return (
                Pick(self.rank)
                if self.rank <= limit
                else Pick(limit, full_rank_note(self.rank, limit, shape))
            )
        rule = None
        if self.energy is not None:
            sq = S.double() ** 2
            whole = float(sq.sum()) if total is None else total
            reached = torch.nonzero(torch.cumsum(sq, 0) >= self.energy * whole * (1 - 1e-12))
            k, rule = (int(reached[0]) + 1 if reached.numel() else S.numel()), f"energy {self.energy:g}"
        elif self.sv_ratio is not None:
            k, rule = int((S[0] / self.sv_ratio <= S).sum()), f"sv_ratio {self.sv_ratio:g}"
        elif default is not None and self.max_rank is None:
            k = default
        else:
            k = limit
        k = max(1, min(k, limit))
        if self.max_rank is not None and k > self.max_rank:
            return Pick(
                self.max_rank, f"max_rank {self.max_rank} kept: {rule} needs rank {k}" if rule else None
            )
        return Pick(k)

    def choose(
        self,
        S: torch.Tensor,
        shape: tuple[int, int],
        reference: float | None = None,
        total: float | None = None,
    ) -> int:
        """``pick(...).k``: the number of singular values to keep."""
        return self.pick(S, shape, reference, total).k


def full_rank_note(asked: int, k: int, shape: tuple[int, int]) -> str:
    """The note of a module whose asked rank was above what it holds.

    Example: ``full_rank_note(16, 6, (6, 40))`` -> ``capped at full rank 6: asked rank 16, a 6x40
    update has rank at most 6``.
    """
    if k == min(shape):
        return f"{FULL_RANK} {k}: asked rank {asked}, a {shape[0]}x{shape[1]} update has rank at most {k}"
    return f"{FULL_RANK} {k}: asked rank {asked}, the result has rank {k}"


def suffix_energies(S: torch.Tensor, k: int) -> tuple[float, ...]:
    """``(sum_{j>=i} S_j^2 for i = 0..k)``: the squared error of keeping i values, from the whole spectrum."""
    sq = S.double() ** 2
    tails = torch.cat([sq.flip(0).cumsum(0).flip(0), sq.new_zeros(1)])
    return tuple(float(x) for x in tails[: k + 1])


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

    def tails(self, k: int) -> tuple[float, ...]:
        """The squared error of the best rank-i approximation for i = 0..k (``suffix_energies``)."""
        return suffix_energies(self.S, k)

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
    """Factors of a rank-k approximation of a dense M, in SVD order, and how good it is."""

    A: torch.Tensor  # (k, in)
    B: torch.Tensor  # (out, k)
    energy_kept: float  # ||B A||_F^2 / ||M||_F^2
    rel_error: float  # ||M - B A||_F / ||M||_F, computed exactly
    solver: Solver
    note: str | None = None  # why k is not what was asked for (``Pick.note``)
    tails: tuple[float, ...] = ()  # budgets: ||M - B[:, :i] A[:i]||_F^2 for i = 0..k, exact


@dataclass(frozen=True)
class Dense:
    """A dense matrix M for ``best_low_rank``: ``held`` (float64, or float32 where a float64 copy is
    not affordable), ``total`` = ||M||_F^2 of the exact float64 M, and ``rows()``: the exact float64
    rows of M, tile by tile as (first row, rows), to measure the error against."""

    held: torch.Tensor
    total: float
    rows: Callable[[], Iterable[tuple[int, torch.Tensor]]]

    @classmethod
    def of(cls, M: torch.Tensor) -> Dense:
        """A float64 matrix, held as it is."""
        return cls(M, float(M.pow(2).sum()), lambda: [(0, M)])

    def left(self, B: torch.Tensor) -> torch.Tensor:
        """``B.T @ M`` (k, in) for a float64 B (out, k), against the exact M, accumulated in float64."""
        return _left(self.rows(), B, self.held.shape[1])


@dataclass(frozen=True)
class Operator:
    """A large matrix M (``shape``) known by its products, never formed: ``times(X)`` = M @ X and
    ``times_t(Y)`` = M^T @ Y on float32 blocks (the range finder); ``left(B)`` = B.T @ M in float64
    against the exact M (the Rayleigh-Ritz step and the error); ``total`` = ||M||_F^2 of the exact
    M; ``dense()`` the exact float64 M, for when a full SVD is cheaper."""

    shape: tuple[int, int]
    total: float
    times: Callable[[torch.Tensor], torch.Tensor]
    times_t: Callable[[torch.Tensor], torch.Tensor]
    left: Callable[[torch.Tensor], torch.Tensor]
    dense: Callable[[], torch.Tensor]


def _left(tiles: Iterable[tuple[int, torch.Tensor]], B: torch.Tensor, inp: int) -> torch.Tensor:
    product = B.new_zeros(B.shape[1], inp)
    for r0, rows in tiles:
        product += B[r0 : r0 + rows.shape[0]].T @ rows
    return product


def best_low_rank(
    M: torch.Tensor | Dense | Operator,
    policy: RankPolicy,
    *,
    exact_limit: int = 1024,
    seed: int = 0,
    default: int | None = None,
) -> LowRank:
    """Best rank-k approximation of a dense matrix (float64, or a ``Dense``), k chosen by ``policy``
    (``default``: the rank when the policy sets no rule, e.g. the sum of the input ranks).

    Matrices with min(out, in) <= ``exact_limit`` get a full SVD in the held dtype (float64: exact
    Eckart-Young). Larger ones get a randomized range finder with 4 power iterations in float32 (Halko,
    Martinsson, Tropp 2011), widened until the target is met, or replaced by the full SVD once the
    sketch would be a quarter of the smaller side wide; the reported error is measured exactly either
    way, in float64 against the exact float64 M.
    With a budget (``policy.is_global``) the factors hold the leading directions up to max_rank (else
    ``default``, else the full rank) and ``tails`` the exact squared error at every rank up to there:
    the caller chooses k over all modules and slices the factors (``ops.budget``).
    An ``Operator`` above ``exact_limit`` gets the same range finder on its float32 products, then a
    float64 Rayleigh-Ritz step against its exact rows (``_operator_svd``); at or below, or where the
    sketch would grow too wide, the full SVD of its exact ``dense()``.
    """
    if isinstance(M, Operator):
        return _operator_low_rank(M, policy, exact_limit, seed, default)
    dense = M if isinstance(M, Dense) else Dense.of(M)
    held, total = dense.held, dense.total
    out, inp = held.shape
    full = min(out, inp)
    if total == 0.0:
        tails = (0.0, 0.0) if policy.is_global else ()
        zeros = torch.zeros((), dtype=torch.float64)
        return LowRank(zeros.new_zeros(1, inp), zeros.new_zeros(out, 1), 1.0, 0.0, Solver.DENSE, tails=tails)
    bound, fixed = policy.bound(full, default)
    if full <= exact_limit:
        return _result(dense, policy, full_svd(held), Solver.DENSE, default)
    width = (bound or 32) + 16
    generator = torch.Generator(device=held.device).manual_seed(seed)
    M32 = held.float()
    while True:
        width = min(width, full)
        if not fixed and 4 * width >= full:  # as costly as the exact SVD by now
            del M32
            return _result(dense, policy, full_svd(held), Solver.DENSE, default)
        U, S, Vh = _randomized_svd(M32, width, generator)
        k = policy.pick(S, (out, inp), total=total, default=default).k
        if fixed or k < width - 8:
            return _result(dense, policy, (U, S, Vh), Solver.RANDOMIZED, default)
        width *= 2


def full_svd(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.linalg.svd(M, full_matrices=False)``, through M^T where M is wide: LAPACK takes a
    row-major wide M as a column-major tall one about three times faster (256x2048: 35 ms, not 110)."""
    if M.shape[0] >= M.shape[1]:
        return torch.linalg.svd(M, full_matrices=False)
    U, S, Vh = torch.linalg.svd(M.mT, full_matrices=False)
    return Vh.mT, S, U.mT


def _randomized_svd(M: torch.Tensor, width: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    omega = torch.randn(M.shape[1], width, generator=generator, dtype=M.dtype, device=M.device)
    Q = torch.linalg.qr(M @ omega)[0]
    for _ in range(4):
        Q = torch.linalg.qr(M.T @ Q)[0]
        Q = torch.linalg.qr(M @ Q)[0]
    Ub, S, Vh = torch.linalg.svd(Q.T @ M, full_matrices=False)
    return Q @ Ub, S, Vh


def _operator_low_rank(
    op: Operator, policy: RankPolicy, exact_limit: int, seed: int, default: int | None
) -> LowRank:
    """``best_low_rank`` of an ``Operator``: the same widening range finder, on its products."""
    out, inp = op.shape
    full = min(out, inp)
    bound, fixed = policy.bound(full, default)
    if op.total == 0.0 or full <= exact_limit:
        return best_low_rank(
            Dense.of(op.dense()), policy, exact_limit=exact_limit, seed=seed, default=default
        )
    width = (bound or 32) + 16
    generator = torch.Generator().manual_seed(seed)
    while True:
        width = min(width, full)
        if not fixed and 4 * width >= full:  # as costly as the exact SVD by now
            return best_low_rank(Dense.of(op.dense()), policy, exact_limit=full, default=default)
        Q, U, S, Vh, left = _operator_svd(op, width, generator)
        k = policy.pick(S, (out, inp), total=op.total, default=default).k
        if fixed or k < width - 8:
            # B.T M for B = (Q U)[:, :k] sqrt(S[:k]) is sqrt(S[:k]) (U.T Q.T M)[:k]: no further pass over M
            return _result(op, policy, (Q @ U, S, Vh), Solver.RANDOMIZED, default, U.T @ left)
        width *= 2


def _operator_svd(op: Operator, width: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """The leading SVD of M from a float32 range finder on its products (4 power iterations, as
    ``_randomized_svd``), then Rayleigh-Ritz in float64: Q.T M against the exact rows of M and the
    SVD of that small (width, in) core, so the factors are the best within span(Q) to float64.

    Returns (Q, U, S, Vh, Q.T M): M ~ (Q U) diag(S) Vh, all float64.
    """
    omega = torch.randn(op.shape[1], width, generator=generator, dtype=torch.float32)
    Q = torch.linalg.qr(op.times(omega))[0]
    for _ in range(POWER_ITERATIONS):
        Q = torch.linalg.qr(op.times_t(Q))[0]
        Q = torch.linalg.qr(op.times(Q))[0]
    Q64 = Q.double()
    core = op.left(Q64)
    U, S, Vh = full_svd(core)
    return Q64, U, S, Vh, core


def _result(
    dense: Dense | Operator,
    policy: RankPolicy,
    svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    solver: Solver,
    default: int | None,
    unit_left: torch.Tensor | None = None,
) -> LowRank:
    """The rank ``policy`` picks from the (possibly leading part of the) SVD, its factors and errors.

    ``unit_left``: ``U.T @ M`` when it is known already (else measured through ``dense.left``).
    """
    U, S, Vh = svd
    shape = (int(U.shape[0]), int(Vh.shape[1]))
    pick = policy.pick(S, shape, total=dense.total, default=default)
    k = max(1, pick.k)
    root = S[:k].double().sqrt()
    left = None if unit_left is None else root[:, None] * unit_left[:k]
    low = _factors(dense, U[:, :k].double(), S[:k].double(), Vh[:k].double(), solver, left)
    if not policy.is_global:
        return replace(low, note=pick.note)
    # a whole float64 spectrum gives every tail at once; a leading part, or one computed in float32,
    # needs them measured against the exact M
    exact = solver is Solver.DENSE and isinstance(dense, Dense) and dense.held.dtype == torch.float64
    tails = suffix_energies(S, k) if exact else _tails(dense, low.B, low.A, left)
    return replace(low, note=pick.note, tails=tails)


def _tails(
    dense: Dense | Operator, B: torch.Tensor, A: torch.Tensor, left: torch.Tensor | None = None
) -> tuple[float, ...]:
    """``||M - B[:, :i] A[:i]||_F^2`` for i = 0..k, exactly: ||M||^2 - 2 sum_{j<i} <M, b_j a_j>
    + sum_{j,l<i} <b_j a_j, b_l a_l>, whether or not B and A are orthogonal to the last bit.
    ``left``: ``B.T @ M`` when known already."""
    total = dense.total
    inner = torch.cumsum(((dense.left(B) if left is None else left) * A).sum(1), 0)
    gram = ((B.T @ B) * (A @ A.T)).cumsum(0).cumsum(1).diagonal()
    errors = (total - 2 * inner + gram).clamp(min=0.0)
    return (total, *(float(x) for x in errors))


def _factors(
    dense: Dense | Operator,
    U: torch.Tensor,
    S: torch.Tensor,
    Vh: torch.Tensor,
    solver: Solver,
    left: torch.Tensor | None = None,
) -> LowRank:
    root = S.sqrt()
    B, A = U * root[None, :], root[:, None] * Vh
    # ||M - B A||^2 = ||M||^2 - 2 <M, B A> + ||B A||^2, all in float64 against the exact M (row tiles
    # of it where it is held in float32; ``left`` = B.T M where the caller has it from such tiles),
    # whether or not U and Vh are orthonormal to the last bit
    inner = float(((dense.left(B) if left is None else left) * A).sum())
    kept = float(((B.T @ B) * (A @ A.T)).sum())
    total = dense.total
    error = max(total - 2 * inner + kept, 0.0)
    return LowRank(A, B, kept / total, (error / total) ** 0.5, solver)
