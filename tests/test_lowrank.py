"""The factor-only SVD against dense float64 linear algebra, rank policies, and a worked example."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adapterops.errors import InvalidInputError
from adapterops.ops.lowrank import RankPolicy, frobenius_norm_of_product, numerical_rank, svd_of_product


def random_factors(out: int, rank: int, inp: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(out, rank, generator=gen, dtype=torch.float64), torch.randn(
        rank, inp, generator=gen, dtype=torch.float64
    )


def test_worked_example_by_hand() -> None:
    """B = [[2], [0]], A = [[0, 3]]: B @ A = [[0, 6], [0, 0]], one singular value 6.

    Split evenly, the rank-1 factors are B' = [[sqrt 6], [0]] and A' = [[0, sqrt 6]] up to a shared sign.
    """
    B = torch.tensor([[2.0], [0.0]], dtype=torch.float64)
    A = torch.tensor([[0.0, 3.0]], dtype=torch.float64)
    factored = svd_of_product(B, A)
    assert factored.S.tolist() == pytest.approx([6.0])
    A1, B1 = factored.truncate(1)
    sign = math.copysign(1.0, float(B1[0, 0]))
    assert (sign * B1).flatten().tolist() == pytest.approx([math.sqrt(6), 0.0])
    assert (sign * A1).flatten().tolist() == pytest.approx([0.0, math.sqrt(6)])
    assert frobenius_norm_of_product(B, A) == pytest.approx(6.0)


@settings(max_examples=40, deadline=None)
@given(
    out=st.integers(1, 40),
    inp=st.integers(1, 40),
    rank=st.integers(1, 12),
    seed=st.integers(0, 10_000),
)
def test_singular_values_match_dense_svd(out: int, inp: int, rank: int, seed: int) -> None:
    B, A = random_factors(out, rank, inp, seed)
    dense = torch.linalg.svdvals(B @ A)
    factored = svd_of_product(B, A)
    n = min(len(dense), len(factored.S))
    torch.testing.assert_close(factored.S[:n], dense[:n], rtol=1e-10, atol=1e-10 * float(dense[0]))
    # everything beyond what the factors can hold is zero in the dense SVD
    assert all(float(v) <= 1e-10 * float(dense[0]) for v in dense[n:])


@settings(max_examples=40, deadline=None)
@given(out=st.integers(2, 30), inp=st.integers(2, 30), rank=st.integers(2, 10), seed=st.integers(0, 10_000))
def test_truncation_error_is_the_tail(out: int, inp: int, rank: int, seed: int) -> None:
    """Eckart-Young: the rank-k error in Frobenius norm is sqrt(sum of dropped S^2), and it is optimal."""
    B, A = random_factors(out, rank, inp, seed)
    dense = B @ A
    S = torch.linalg.svdvals(dense)
    factored = svd_of_product(B, A)
    for k in range(1, min(rank, out, inp) + 1):
        Ak, Bk = factored.truncate(k)
        error = float(torch.linalg.matrix_norm(dense - Bk @ Ak))
        optimal = float(S[k:].pow(2).sum().sqrt())
        assert error == pytest.approx(optimal, rel=1e-7, abs=1e-9 * float(S[0]))
        assert factored.tail_energy(k) == pytest.approx(optimal**2, rel=1e-7, abs=1e-12 * float(S[0]) ** 2)


def test_full_rank_truncation_reproduces_the_product() -> None:
    B, A = random_factors(50, 6, 70, seed=3)
    Ak, Bk = svd_of_product(B, A).truncate(6)
    torch.testing.assert_close(Bk @ Ak, B @ A, rtol=0, atol=1e-12)


def test_numerical_rank_sees_cancellation() -> None:
    """[B, -B] @ [A; A] is exactly zero; [B, B] @ [A; A] has the rank of B @ A."""
    B, A = random_factors(30, 4, 20, seed=5)
    assert numerical_rank(svd_of_product(torch.cat([B, B], 1), torch.cat([A, A], 0)).S, (30, 20)) == 4
    S = svd_of_product(torch.cat([B, -B], 1), torch.cat([A, A], 0)).S
    assert float(S[0]) < 1e-12


def test_policies_choose_as_documented() -> None:
    S = torch.tensor([10.0, 5.0, 1.0, 0.1], dtype=torch.float64)
    shape = (8, 8)
    assert RankPolicy(rank=2).choose(S, shape) == 2
    assert RankPolicy(rank=10).choose(S, shape) == 4
    total = 100 + 25 + 1 + 0.01
    assert RankPolicy(energy=125 / total).choose(S, shape) == 2
    assert RankPolicy(energy=125.5 / total).choose(S, shape) == 3
    assert RankPolicy(energy=1.0).choose(S, shape) == 4
    assert RankPolicy(sv_ratio=2).choose(S, shape) == 2
    assert RankPolicy(sv_ratio=10).choose(S, shape) == 3
    assert RankPolicy().choose(S, shape) == 4
    assert RankPolicy(rank=3).choose(torch.zeros(4, dtype=torch.float64), shape) == 0  # zero matrix


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 0}, "rank must be >= 1, got 0"),
        ({"energy": 1.5}, "energy must be in (0, 1]"),
        ({"sv_ratio": 0.5}, "sv_ratio must be >= 1"),
        ({"rank": 4, "energy": 0.9}, "give one of rank=K, energy=F or sv_ratio=R, not rank and energy"),
    ],
)
def test_policy_rejects_bad_targets(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        RankPolicy(**kwargs)  # type: ignore[arg-type]
    assert message in str(info.value)
