"""LoRA-native merging: methods computed on one module's factors, never on an out x in matrix.

Each function takes the module's inputs as float64 factors, ``Ps[i]`` (out, r_i) and ``As[i]``
(r_i, in), and returns factors ``(B, A)`` whose product is the merged update exactly;
``ops.combine`` picks the rank and writes the module (``from_factors``). Cost: QRs and SVDs of
stacked factors and small cores, O((out + in) R^2) for R = sum of the input ranks; the largest
matrices formed are (out, R), (R, in) and, for ``knots``, one (R, in) per input (docs/math.md).

- ``core_space``: a sparsifying method on the coordinates M_i = U^T dW_i V of each update in a
  shared basis (Core Space merging, Panariello et al., NeurIPS 2025), mapped back as U M V^T.
- ``knots``: a sparsifying method on the per-input blocks S V_i^T of the SVD of the stacked
  updates [dW_1 | ... | dW_n] = U S [V_1^T | ... | V_n^T] (KnOTS, Stoica et al., ICLR 2025).
- ``peft_factors``: a sparsifying method on A and B separately, PEFT's non-svd
  ``add_weighted_adapter``: not a function of the updates.
- ``tsv``: Task Singular Vectors merging, TSV-M (Gargiulo et al., CVPR 2025).
- ``iso_c``, ``iso_cts``: isotropic merging (Marczak et al., ICML 2025).

The bases come from the updates dW_i = P_i A_i alone, never from how they are split into factors:
a change of gauge (P_i Q, Q^-1 A_i) changes nothing but rounding. Singular vectors are defined up to
sign, and the elementwise methods do not all commute with a sign flip: TIES elects + where a vote is
exactly zero (with ``frequency``, wherever as many inputs are positive as negative). So every basis
vector gets a canonical sign: its entry of largest magnitude is positive (``canonical_signs``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from adapterops.errors import IncompatibleAdaptersError
from adapterops.ops.lowrank import RankPolicy, frobenius_norm_of_product, numerical_rank, svd_of_product
from adapterops.ops.sparsify import Sparsity, sparsified_sum
from adapterops.options import Method

Factors = tuple[torch.Tensor, torch.Tensor]  # (B (out, k), A (k, in)): the update is B @ A


def core_space(
    method: Method,
    name: str,
    Ps: Sequence[torch.Tensor],
    As: Sequence[torch.Tensor],
    weights: Sequence[float],
    sparsity: Sparsity,
) -> Factors:
    """``method`` applied to the core matrices M_i = U^T dW_i V, dW_i = Ps[i] @ As[i] (unweighted).

    U: left singular vectors of [dW_1 | ... | dW_n] (the span of every update's columns), V: right
    singular vectors of [dW_1; ...; dW_n] (the span of their rows), the nonzero directions only, so
    dW_i = U M_i V^T exactly. Returns ``(U M, V^T)`` for the merged M (at most R x R).
    """
    U, _ = _stacked_basis(Ps, As)
    V, _ = _stacked_basis([a.T for a in As], [p.T for p in Ps])
    U, V = U * canonical_signs(U), V * canonical_signs(V)
    if U.shape[1] == 0 or V.shape[1] == 0:
        return _zero(Ps[0].shape[0], As[0].shape[1], Ps[0])
    cores = [(U.T @ p) @ (a @ V) for p, a in zip(Ps, As, strict=True)]
    merged = sparsified_sum(method, name, cores, weights, sparsity)
    return U @ merged, V.T


def knots(
    method: Method,
    name: str,
    Ps: Sequence[torch.Tensor],
    As: Sequence[torch.Tensor],
    weights: Sequence[float],
    sparsity: Sparsity,
) -> Factors:
    """``method`` applied to X_i = S V_i^T, from [dW_1 | ... | dW_n] = U S [V_1^T | ... | V_n^T].

    As KnOTS's code does (``s_on_V``): the singular values scale each input's block before it is
    sparsified, the weights enter the merge, and the result is ``(U, X_merged)`` (K x in, K <= R).
    """
    U, S, blocks = _stacked_svd(Ps, As)
    if U.shape[1] == 0:
        return _zero(Ps[0].shape[0], As[0].shape[1], Ps[0])
    signs = canonical_signs(U)
    U, scale = U * signs, (S * signs)[:, None]
    parts = [scale * block for block in blocks]
    return U, sparsified_sum(method, name, parts, weights, sparsity)


def peft_factors(
    method: Method,
    name: str,
    Bs: Sequence[torch.Tensor],
    As: Sequence[torch.Tensor],
    coeffs: Sequence[float],
    sparsity: Sparsity,
) -> Factors:
    """PEFT's ``_generalized_task_arithmetic_weighted_adapter``: ``method`` on the A_i with weights
    sign(c_i) sqrt|c_i| and on the B_i with weights sqrt|c_i| (c_i = w_i s_i), result scale 1.

    Not the weighted sum (the product of two merged factors has cross terms B_i A_j). The random
    drops of A and B use two generators, seeded from ``name + ".lora_A"`` and ``".lora_B"``.
    """
    ranks = sorted({a.shape[0] for a in As})
    if len(ranks) > 1:
        raise IncompatibleAdaptersError(
            f"module {name}: space peft-factors merges A and B entry by entry, so it needs equal ranks, got "
            f"{ranks} (PEFT refuses them too); use space dense, core or knots"
        )
    roots = [math.sqrt(abs(c)) for c in coeffs]
    signs = [1.0 if c >= 0 else -1.0 for c in coeffs]  # PEFT's rule: the sign goes on A only
    A = sparsified_sum(
        method, f"{name}.lora_A", As, [s * r for s, r in zip(signs, roots, strict=True)], sparsity
    )
    B = sparsified_sum(method, f"{name}.lora_B", Bs, roots, sparsity)
    return B, A


def tsv(Ps: Sequence[torch.Tensor], As: Sequence[torch.Tensor]) -> Factors:
    """TSV-M of the weighted updates T_i = Ps[i] @ As[i] = U_i S_i V_i^T (numerical rank each).

    U = [U_1 | ... | U_n] and V = [V_1 | ... | V_n] are replaced by their polar factors (the nearest
    matrices with orthonormal columns), and the result is U_perp diag(S_1, ..., S_n) V_perp^T.
    """
    Us, Ss, Vs = [], [], []
    for p, a in zip(Ps, As, strict=True):
        U, S, V = _svd(p, a)
        Us.append(U)
        Ss.append(S)
        Vs.append(V)
    S = torch.cat(Ss)
    if S.numel() == 0:
        return _zero(Ps[0].shape[0], As[0].shape[1], Ps[0])
    return polar(torch.cat(Us, dim=1)) * S[None, :], polar(torch.cat(Vs, dim=1)).T


@dataclass(frozen=True)
class Isotropic:
    """An isotropic merge: factors of sigma * U V^T, and the share of the input spectrum it spans."""

    B: torch.Tensor
    A: torch.Tensor
    energy_kept: float  # of the spectrum the directions were chosen from (1 without a rank target)
    note: str | None = None  # why k is not what the rank target asked (``RankPolicy.pick``)


def iso_c(
    Ps: Sequence[torch.Tensor],
    As: Sequence[torch.Tensor],
    policy: RankPolicy,
    shape: tuple[int, int],
    reference: float | None,
) -> Isotropic:
    """Iso-C: the weighted sum sum_i T_i = U S V^T with S replaced by its mean, on the nonzero spectrum.

    A rank target picks the k leading directions of the sum (k from ``policy`` on its singular
    values), and the mean is over those k: Iso-C of the sum's best rank-k approximation.
    """
    factored = svd_of_product(torch.cat(list(Ps), dim=1), torch.cat(list(As), dim=0))
    S = factored.S
    r = numerical_rank(S, shape, reference)
    pick = policy.pick(S, shape, reference)
    k = r if policy.is_exact else min(r, pick.k)
    if k == 0:
        return Isotropic(*_zero(shape[0], shape[1], Ps[0]), 1.0)
    U = factored.Qb @ factored.U[:, :k]
    V = factored.Qa @ factored.Vh[:k].T
    root = float(S[:k].mean()) ** 0.5
    return Isotropic(root * U, root * V.T, _share(S, k, r), None if policy.is_exact else pick.note)


def iso_cts(
    Ps: Sequence[torch.Tensor],
    As: Sequence[torch.Tensor],
    policy: RankPolicy,
    common_fraction: float,
    shape: tuple[int, int],
    reference: float | None,
) -> Isotropic:
    """Iso-CTS on the nonzero spectrum of the stacked weighted updates [T_1 | ... | T_n].

    Of the k directions (the stack's numerical rank, or fewer by ``policy``), c = int(k f) come from
    the sum's leading singular vectors (the common subspace) and the rest, split evenly, from each
    input's residual T_i - U_c U_c^T T_i; as in the paper's code, (k - c) / n is rounded and c takes
    the remainder. U and V of all of them are orthogonalized (polar factors) and every singular
    value is replaced by the mean. Inputs whose update is zero take no share.
    """
    live = [(p, a) for p, a in zip(Ps, As, strict=True) if frobenius_norm_of_product(p, a) > 0.0]
    if not live:
        return Isotropic(*_zero(shape[0], shape[1], Ps[0]), 1.0)
    _, stacked = _stacked_basis([p for p, _ in live], [a for _, a in live])
    available = stacked.numel()
    pick = policy.pick(stacked, shape)
    k = available if policy.is_exact else min(available, pick.k)
    n = len(live)
    specific = min(round((k - int(k * common_fraction)) / n) * n, (k // n) * n)
    per_input = specific // n

    total = svd_of_product(torch.cat([p for p, _ in live], dim=1), torch.cat([a for _, a in live], dim=0))
    c = min(k - specific, numerical_rank(total.S, shape, reference))
    U_c = total.Qb @ total.U[:, :c]
    Us, Ss, Vs = [U_c], [total.S[:c]], [total.Qa @ total.Vh[:c].T]
    for p, a in live:
        U, S, V = _svd(p - U_c @ (U_c.T @ p), a, frobenius_norm_of_product(p, a))
        Us.append(U[:, :per_input])
        Ss.append(S[:per_input])
        Vs.append(V[:, :per_input])
    S = torch.cat(Ss)
    if S.numel() == 0:
        return Isotropic(*_zero(shape[0], shape[1], Ps[0]), 1.0)
    root = float(S.mean()) ** 0.5
    return Isotropic(
        root * polar(torch.cat(Us, dim=1)),
        root * polar(torch.cat(Vs, dim=1)).T,
        _share(stacked, k, available),
        None if policy.is_exact else pick.note,
    )


# ------------------------------------------------------------------------------------------ helpers


def polar(X: torch.Tensor) -> torch.Tensor:
    """The polar factor of X (d, m): P Q^T from X = P S Q^T, over the nonzero singular values only.

    For X of full column rank, the matrix with orthonormal columns nearest to X; otherwise the
    partial isometry on X's range, which is unique where P Q^T over all values would not be.
    """
    Q, R = torch.linalg.qr(X)
    P, S, Qh = torch.linalg.svd(R, full_matrices=False)
    keep = numerical_rank(S, (X.shape[0], X.shape[1]))
    return Q @ (P[:, :keep] @ Qh[:keep])


def canonical_signs(U: torch.Tensor) -> torch.Tensor:
    """+1 or -1 per column of U: the sign that makes the column's entry of largest magnitude positive
    (the first such entry where magnitudes tie), as scikit-learn's ``svd_flip`` does."""
    if U.shape[1] == 0:
        return U.new_ones(0)
    largest = U.gather(0, U.abs().argmax(dim=0, keepdim=True))[0]
    return torch.where(largest < 0, -1.0, 1.0).to(U.dtype)


def _svd(
    p: torch.Tensor, a: torch.Tensor, reference: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U (out, k), S (k,), V (in, k) of ``p @ a`` at its numerical rank k."""
    f = svd_of_product(p, a)
    k = numerical_rank(f.S, (p.shape[0], a.shape[1]), reference)
    return f.Qb @ f.U[:, :k], f.S[:k], f.Qa @ f.Vh[:k].T


def _stacked_svd(
    Ps: Sequence[torch.Tensor], As: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """SVD of H = [P_1 A_1 | ... | P_n A_n] from its factors, at its numerical rank K:
    U (out, K), S (K,) and each input's block V_i^T (K, in) of the right singular vectors.

    H = [P_1 | ... | P_n] blockdiag(A_1, ..., A_n); with [P_i] = Q_b R_b and A_i^T = Q_i R_i, the
    SVD of the small core R_b blockdiag(R_i^T) = W S Z^T gives U = Q_b W and V_i^T = Z_i^T Q_i^T.
    """
    U, S, Z, Qs = _stacked_core(Ps, As)
    sizes = [q.shape[1] for q in Qs]
    blocks = [z.T @ q.T for z, q in zip(torch.split(Z, sizes, dim=0), Qs, strict=True)]
    return U, S, blocks


def _stacked_basis(
    Ps: Sequence[torch.Tensor], As: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """U (out, K) and S (K,) of [P_1 A_1 | ... | P_n A_n] at its numerical rank (``_stacked_svd``)."""
    U, S, _, _ = _stacked_core(Ps, As)
    return U, S


def _stacked_core(
    Ps: Sequence[torch.Tensor], As: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    Qb, Rb = torch.linalg.qr(torch.cat(list(Ps), dim=1))
    qrs = [torch.linalg.qr(a.T) for a in As]
    core = Rb @ torch.block_diag(*(r.T for _, r in qrs))
    W, S, Zh = torch.linalg.svd(core, full_matrices=False)
    shape = (Ps[0].shape[0], len(As) * As[0].shape[1])
    k = numerical_rank(S, shape)
    return Qb @ W[:, :k], S[:k], Zh[:k].T, [q for q, _ in qrs]


def _share(S: torch.Tensor, k: int, of: int) -> float:
    """sum_{j<k} S_j^2 / sum_{j<of} S_j^2: the share of the spectrum's energy in its first k values."""
    total = float((S[:of] ** 2).sum())
    return 1.0 if total == 0.0 else float((S[:k] ** 2).sum()) / total


def _zero(out: int, inp: int, like: torch.Tensor) -> Factors:
    return like.new_zeros(out, 1), like.new_zeros(1, inp)
