"""The merge kernels: correct rounding of W + dW on adversarial values, DoRA round trips, ulp."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adapterops.adapter import LoraModule
from adapterops.ops import dora as dora_ops
from adapterops.ops import kernels, rounding
from tests.support.rounding import nearest


def module(
    out: int, inp: int, rank: int, seed: int, *, transposed: bool = False, scale: float = 0.5
) -> LoraModule:
    gen = torch.Generator().manual_seed(seed)
    return LoraModule(
        "m",
        torch.randn(rank, inp, generator=gen) * 0.1,
        torch.randn(out, rank, generator=gen) * 0.1,
        scale,
        transposed=transposed,
    )


def exact_round(W: torch.Tensor, terms, sign: float = 1.0) -> torch.Tensor:
    """The reference: float64 sum, rounded once."""
    X = W.double().clone()
    for weight, m in terms:
        X += sign * weight * m.delta(torch.float64)
    return nearest(X, W.dtype)


@settings(max_examples=25, deadline=None)
@given(
    dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
    seed=st.integers(0, 10_000),
    transposed=st.booleans(),
    weights=st.lists(st.floats(-2, 2, allow_nan=False), min_size=1, max_size=3),
)
def test_add_updates_is_correctly_rounded(dtype, seed, transposed, weights) -> None:
    gen = torch.Generator().manual_seed(seed)
    terms = [(w, module(24, 40, 4, seed + i, transposed=transposed)) for i, w in enumerate(weights)]
    shape = (40, 24) if transposed else (24, 40)
    W = torch.randn(shape, generator=gen).to(dtype)
    assert torch.equal(kernels.add_updates(W, terms), exact_round(W, terms))
    assert torch.equal(kernels.add_updates(W, terms, sign=-1.0), exact_round(W, terms, sign=-1.0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_values_next_to_rounding_boundaries_are_settled_in_float64(dtype) -> None:
    """W in [1, 2) and dW = half a step +- 2^-22 of a step: W + dW sits a hair off a rounding boundary,
    closer than float32 can see at that magnitude, so float32 alone rounds half of them wrongly."""
    step = 2.0 ** -rounding.MANTISSA_BITS[dtype]  # spacing on [1, 2)
    gen = torch.Generator().manual_seed(3)
    W = (1 + torch.rand(32, 48, generator=gen)).to(dtype)
    side = torch.where(torch.rand(32, generator=gen) < 0.5, -1.0, 1.0)
    B = (step / 2 * (1 + side * 2.0**-22))[:, None].float()  # exactly representable in float32
    m = LoraModule("m", torch.ones(1, 48), B, 1.0)
    expected = exact_round(W, [(1.0, m)])
    naive = (W.float() + m.delta(torch.float32)).to(dtype)
    assert not torch.equal(naive, expected)  # the case is hard enough to matter
    assert torch.equal(kernels.add_updates(W, [(1.0, m)]), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_round_to_rounds_once(dtype) -> None:
    """Values a hair off half-precision midpoints: torch's cast (through float32) rounds twice."""
    step = 2.0 ** -rounding.MANTISSA_BITS[dtype]
    base = (1 + torch.rand(1000, generator=torch.Generator().manual_seed(0))).to(dtype).double()
    side = torch.where(torch.arange(1000) % 2 == 0, -1.0, 1.0).double()
    x = base + step / 2 + side * step * 2.0**-30
    assert not torch.equal(x.to(dtype), nearest(x, dtype))
    assert torch.equal(rounding.round_to(x, dtype), nearest(x, dtype))


def test_dora_unmerge_inverts_merge() -> None:
    m = module(16, 12, 3, seed=2)
    gen = torch.Generator().manual_seed(0)
    magnitude = torch.rand(16, generator=gen) + 0.5
    dora = LoraModule(m.name, m.A, m.B, m.scale, magnitude=magnitude)
    W = torch.randn(16, 12, generator=gen, dtype=torch.float64)
    merged, norm = dora_ops.dora_merge(W, dora)
    combined = W + m.delta(torch.float64)
    torch.testing.assert_close(norm, torch.linalg.vector_norm(combined, dim=1))
    torch.testing.assert_close(merged, magnitude.double()[:, None] * combined / norm[:, None])
    torch.testing.assert_close(dora_ops.dora_unmerge(merged, dora, norm), W)


def test_ulp_worked_examples() -> None:
    """bf16 keeps 8 significant bits: spacing 2^-7 on [1, 2), 2^-6 on [2, 4); float32 2^-23 on [1, 2)."""
    x = torch.tensor([1.0, 1.5, 2.0, 3.0, -1.0], dtype=torch.float64)
    assert rounding.ulp(x, torch.bfloat16).tolist() == [2**-7, 2**-7, 2**-6, 2**-6, 2**-7]
    assert rounding.ulp(torch.tensor([1.0], dtype=torch.float64), torch.float32).tolist() == [2**-23]
