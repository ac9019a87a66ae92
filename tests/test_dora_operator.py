"""DoRA -> LoRA above ``exact_limit``: the sum is never formed (``ops.dora.effective_operator``).

Judged by float64 dense references written here from PEFT's DoRA merge (W' = m (W + s B A) / ||W + s B A||
per output row), their float64 SVD (Eckart-Young: the optimal rank-k error) and direct measurement of
the written factors' error.
"""

from __future__ import annotations

import math

import pytest
import torch

from adapterops.adapter import LoraModule, Solver
from adapterops.ops.dora import effective_operator, sum_as_lora
from adapterops.ops.lowrank import RankPolicy, best_low_rank, full_svd

OUT, IN, R = 360, 240, 4


def spectrum_weight(seed: int, decay: float = 0.97) -> torch.Tensor:
    """W = U diag(sigma) V^T with a known, slowly decaying spectrum sigma_j = decay^j (no gap)."""
    gen = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(OUT, IN, generator=gen, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(IN, IN, generator=gen, dtype=torch.float64))[0]
    sigma = decay ** torch.arange(IN, dtype=torch.float64)
    return (U * sigma) @ V.T


def dora_module(W: torch.Tensor, seed: int, *, jitter: float = 0.05, magnitude: bool = True) -> LoraModule:
    """A trained-looking DoRA (or LoRA) module on W: magnitudes the row norms of W + s B A, moved by
    ``jitter`` per row, as training moves them."""
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(R, IN, generator=gen, dtype=torch.float64) / math.sqrt(IN)
    B = torch.randn(OUT, R, generator=gen, dtype=torch.float64) * 0.05
    scale = 2.0
    m = None
    if magnitude:
        norms = torch.linalg.vector_norm(W + scale * B @ A, dim=1)
        m = norms * (1 + jitter * torch.randn(OUT, generator=gen, dtype=torch.float64))
    return LoraModule(name="layer.proj", A=A, B=B, scale=scale, magnitude=m)


def peft_delta(W: torch.Tensor, module: LoraModule) -> torch.Tensor:
    """PEFT's effective update, float64: m / ||W + s B A||_row * (W + s B A) - W (s B A for a LoRA)."""
    update = module.scale * module.B @ module.A
    if module.magnitude is None:
        return update
    V = W + update
    return (module.magnitude / torch.linalg.vector_norm(V, dim=1))[:, None] * V - W


def optimal_error(D: torch.Tensor, k: int) -> float:
    S = torch.linalg.svdvals(D)
    return math.sqrt(float((S[k:] ** 2).sum() / (S**2).sum()))


def direct_error(D: torch.Tensor, module: LoraModule) -> float:
    approx = module.scale * module.B.double() @ module.A.double()
    return float(torch.linalg.matrix_norm(D - approx) / torch.linalg.matrix_norm(D))


@pytest.mark.parametrize(("decay", "excess"), [(0.97, 1e-6), (0.995, 1e-4)])  # slow decay, nearly flat
def test_randomized_to_lora_is_near_optimal_and_its_error_is_the_measured_one(
    decay: float, excess: float
) -> None:
    """Within ``excess`` of the optimal error (a flat spectrum leaves a randomized solver some), never
    worse than the range finder on the formed float64 sum (the solver before the operator), and the
    reported error is the error of the written factors."""
    W = spectrum_weight(1, decay)
    module = dora_module(W, 2)
    D = peft_delta(W, module)
    k = 8
    out, report = sum_as_lora(W, [(1.0, module)], RankPolicy(rank=k), exact_limit=64)
    assert report.solver is Solver.RANDOMIZED and out.rank == k
    optimal, achieved = optimal_error(D, k), direct_error(D, out)
    assert achieved <= optimal * (1 + excess)
    formed = best_low_rank(D, RankPolicy(rank=k), exact_limit=64)
    assert formed.solver is Solver.RANDOMIZED
    assert achieved <= formed.rel_error * (1 + 1e-9)
    assert report.rel_error == pytest.approx(achieved, rel=1e-9)
    # the dense path (full float64 SVD) is the optimum
    _, dense = sum_as_lora(W, [(1.0, module)], RankPolicy(rank=k), exact_limit=1024)
    assert dense.solver is Solver.DENSE
    assert dense.rel_error == pytest.approx(optimal, rel=1e-9)


def test_a_weighted_mix_of_dora_and_lora_terms() -> None:
    """w_1 dW_eff(DoRA) + w_2 dW(LoRA) + w_3 dW_eff(DoRA): the operator's products, norm and exact
    rows are those of the float64 sum, and its best rank-k form is optimal."""
    W = spectrum_weight(3)
    terms = [(0.7, dora_module(W, 4)), (-0.4, dora_module(W, 5, magnitude=False)), (1.3, dora_module(W, 6))]
    D = sum(w * peft_delta(W, m) for w, m in terms)
    assert isinstance(D, torch.Tensor)
    op = effective_operator(W, terms)
    assert op.shape == (OUT, IN)
    assert op.total == pytest.approx(float((D**2).sum()), rel=1e-12)
    torch.testing.assert_close(op.dense(), D, rtol=0, atol=1e-13 * float(D.abs().max()))
    gen = torch.Generator().manual_seed(7)
    X, Y = torch.randn(IN, 5, generator=gen), torch.randn(OUT, 5, generator=gen)
    torch.testing.assert_close(op.times(X).double(), D @ X.double(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(op.times_t(Y).double(), D.T @ Y.double(), rtol=1e-4, atol=1e-4)
    Q = torch.randn(OUT, 3, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(op.left(Q), Q.T @ D, rtol=1e-12, atol=1e-12)
    out, report = sum_as_lora(W, terms, RankPolicy(rank=6), exact_limit=64)
    achieved = direct_error(D, out)
    assert achieved <= optimal_error(D, 6) * (1 + 1e-6)
    assert report.rel_error == pytest.approx(achieved, rel=1e-9)


def test_energy_target_and_budget_tails_on_the_operator() -> None:
    """The widening loop (energy) and the per-rank tails of a budget, measured against the exact sum."""
    W = spectrum_weight(8, 0.9)
    module = dora_module(W, 9, jitter=0.2)
    D = peft_delta(W, module)
    S = torch.linalg.svdvals(D)
    energy = 0.95
    needed = int(torch.nonzero(torch.cumsum(S**2, 0) >= energy * (S**2).sum())[0]) + 1
    out, report = sum_as_lora(W, [(1.0, module)], RankPolicy(energy=energy), exact_limit=16)
    assert out.rank == needed
    assert report.rel_error == pytest.approx(direct_error(D, out), rel=1e-9)
    assert report.rel_error <= optimal_error(D, needed) * (1 + 1e-6)
    low = best_low_rank(
        effective_operator(W, [(1.0, module)]), RankPolicy(budget_params=1, max_rank=5), exact_limit=16
    )
    assert low.solver is Solver.RANDOMIZED and len(low.tails) == 6
    for i, tail in enumerate(low.tails):
        rest = D - low.B[:, :i] @ low.A[:i]
        assert tail == pytest.approx(float((rest**2).sum()), rel=1e-9)


@pytest.mark.parametrize("shape", [(7, 30), (30, 7), (12, 12)])
def test_full_svd_of_wide_tall_and_square(shape: tuple[int, int]) -> None:
    M = torch.randn(*shape, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    U, S, Vh = full_svd(M)
    n = min(shape)
    assert U.shape == (shape[0], n) and Vh.shape == (n, shape[1])
    torch.testing.assert_close((U * S) @ Vh, M, rtol=0, atol=1e-12)
    torch.testing.assert_close(S, torch.linalg.svdvals(M), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(U.T @ U, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
