"""The certified half-precision kernel (``kernels.add_updates`` on bfloat16 / float16), against
exact references: ``fractions.Fraction`` sums rounded by exact distance, and an enumeration of
every half-precision value for the midpoint distances. Shapes cross block and group edges
(the block size is shrunk), layouts are plain, transposed (Conv1D) and flattened (conv)."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adapterops.adapter import LoraModule
from adapterops.ops import kernels, rounding
from tests.support.rounding import nearest

HALF = [torch.bfloat16, torch.float16]


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of ~64 elements, so that small tensors span several blocks and a partial last one."""
    monkeypatch.setattr(kernels, "_BLOCK", 64)


def grid(dtype: torch.dtype) -> tuple[list[Fraction], torch.Tensor]:
    """Every finite value of ``dtype`` (ascending, exact) and the rounding midpoints (float64)."""
    values = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype).double()
    values = torch.unique(values[torch.isfinite(values)])  # sorted; -0 and +0 merge
    top = 2.0 ** math.frexp(torch.finfo(dtype).max)[1]  # the overflow threshold is halfway to it
    extended = torch.cat(
        [torch.tensor([-top], dtype=torch.float64), values, torch.tensor([top], dtype=torch.float64)]
    )
    return [Fraction(v) for v in values.tolist()], (extended[1:] + extended[:-1]) / 2


def round_exact(value: Fraction, dtype: torch.dtype) -> float:
    """``value`` rounded to nearest, ties to even, by exact comparison; overflow to +-inf."""
    finite, _ = GRIDS[dtype]
    top = Fraction(2) ** math.frexp(torch.finfo(dtype).max)[1]
    if abs(value) >= (finite[-1] + top) / 2:
        return math.copysign(math.inf, value)
    lo, hi = 0, len(finite) - 1
    while hi - lo > 1:  # finite[lo] <= value < finite[hi]
        mid = (lo + hi) // 2
        if finite[mid] <= value:
            lo = mid
        else:
            hi = mid
    below, above = finite[lo], finite[hi]
    if value - below != above - value:
        return float(below if value - below < above - value else above)
    even = torch.tensor([float(below)]).to(dtype).view(torch.int16).item() % 2 == 0
    return float(below if even else above)


GRIDS = {dtype: grid(dtype) for dtype in HALF}


def exact_reference(W: torch.Tensor, terms, sign: float = 1.0) -> torch.Tensor:
    """W + sign sum_t c_t dW_t, every element an exact Fraction, rounded once."""
    out = torch.empty(W.shape, dtype=torch.float64)
    flat_out = out.view(-1)
    base = W.double().reshape(-1).tolist()
    deltas = []
    for weight, m in terms:
        alpha = Fraction(sign * weight * m.scale)
        B, A = m.B.double().tolist(), m.A.double().tolist()
        rows, cols = len(B), len(A[0])
        exact = [
            [alpha * sum(Fraction(B[i][k]) * Fraction(A[k][j]) for k in range(len(A))) for j in range(cols)]
            for i in range(rows)
        ]
        # into storage layout: transposed modules store (in, out); conv weights are (out, in, *kernel)
        stored = (
            [exact[i][j] for j in range(cols) for i in range(rows)]
            if m.transposed
            else [v for row in exact for v in row]
        )
        deltas.append(stored)
    for index, w in enumerate(base):
        total = Fraction(w) + sum(delta[index] for delta in deltas)
        flat_out[index] = round_exact(total, W.dtype)
    return out.to(W.dtype)


def module(
    out: int,
    inp: int,
    rank: int,
    gen: torch.Generator,
    *,
    scale: float = 0.5,
    transposed: bool = False,
    magnitude: float = 0.1,
) -> LoraModule:
    return LoraModule(
        "m",
        torch.randn(rank, inp, generator=gen) * magnitude,
        torch.randn(out, rank, generator=gen) * magnitude,
        scale,
        transposed=transposed,
    )


@pytest.mark.usefixtures("small_blocks")
@settings(max_examples=30, deadline=None)
@given(
    dtype=st.sampled_from(HALF),
    seed=st.integers(0, 2**16),
    out=st.sampled_from([1, 3, 7, 16]),
    inp=st.sampled_from([1, 5, 8, 24, 67]),
    layout=st.sampled_from(["plain", "transposed"]),
    weights=st.lists(
        st.floats(-3, 3, allow_nan=False).filter(lambda w: abs(w) > 1e-3), min_size=1, max_size=3
    ),
    exponent=st.integers(-30, 12),
    sign=st.sampled_from([1.0, -1.0]),
)
def test_equals_exact_fraction_rounding(dtype, seed, out, inp, layout, weights, exponent, sign) -> None:
    """Random shapes, layouts, several terms, merge and unmerge, magnitudes from 2**-30 to 2**12
    (float16's subnormals and overflow included): every element equals the exact sum rounded once."""
    gen = torch.Generator().manual_seed(seed)
    transposed = layout == "transposed"
    scale = 2.0**exponent
    W = (torch.randn((inp, out) if transposed else (out, inp), generator=gen) * scale).to(dtype)
    W.view(-1)[::5] = 0  # zeros too
    terms = [
        (w, module(out, inp, 1 + i, gen, scale=0.5, transposed=transposed, magnitude=scale**0.5 * 0.3))
        for i, w in enumerate(weights)
    ]
    got = kernels.add_updates(W, terms, sign=sign)
    assert torch.equal(got, exact_reference(W, terms, sign))


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("dtype", HALF)
def test_conv_weight_flattened(dtype) -> None:
    """A conv weight (out, in, kh, kw) merges as (out, in*kh*kw) and keeps its shape."""
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(6, 3, 3, 3, generator=gen).to(dtype)
    m = module(6, 27, 2, gen)
    got = kernels.add_updates(W, [(1.0, m)])
    assert got.shape == W.shape
    assert torch.equal(got, exact_reference(W.reshape(6, 27), [(1.0, m)]).reshape(W.shape))


def near_midpoints(
    dtype: torch.dtype, rows: int, cols: int, seed: int
) -> tuple[torch.Tensor, LoraModule, torch.Tensor]:
    """W in [1, 2) and a rank-1 update of half a step plus an offset from -2 to +2 float32 ulps
    (2**-23 on [1, 2)) in 2**-26 steps, exact ties included: W + dW sits at or within a float32
    ulp of a rounding midpoint, where the float32 sum cannot decide."""
    step = 2.0 ** -rounding.MANTISSA_BITS[dtype]
    gen = torch.Generator().manual_seed(seed)
    W = (1 + torch.rand(rows, cols, generator=gen)).to(dtype)
    offsets = torch.randint(-16, 17, (rows,), generator=gen).double() * 2.0**-26
    offsets[::4] = 0
    B = (step / 2 + offsets)[:, None].float()  # exact in float32 (24 bits suffice)
    m = LoraModule("m", torch.ones(1, cols), B, 1.0)
    return W, m, offsets


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_adversarial_near_ties(dtype, sign) -> None:
    W, m, offsets = near_midpoints(dtype, 40, 33, seed=4)
    expected = exact_reference(W, [(1.0, m)], sign)
    naive = (W.float() + sign * m.delta(torch.float32)).to(dtype)
    assert not torch.equal(naive, expected)  # float32 alone gets some wrong
    assert (offsets == 0).any()  # exact ties, settled to even
    assert torch.equal(kernels.add_updates(W, [(1.0, m)], sign=sign), expected)


@pytest.mark.parametrize("dtype", HALF)
def test_near_ties_transposed_and_tiny(dtype) -> None:
    """The same on a transposed weight, scaled into float16's subnormals and bfloat16's 2**-130s."""
    W, m, _ = near_midpoints(dtype, 12, 9, seed=5)
    factor = 2.0**-20 if dtype == torch.float16 else 2.0**-130
    W = (W.double() * factor).to(dtype).T.contiguous()
    m = LoraModule("m", m.A, m.B * factor, 1.0, transposed=True)
    assert torch.equal(kernels.add_updates(W, [(1.0, m)]), exact_reference(W, [(1.0, m)]))


@pytest.mark.parametrize("dtype", HALF)
def test_overflow_and_non_finite_inputs(dtype) -> None:
    """Sums past the largest finite value round to Inf exactly as the exact sum does (the threshold
    is the midpoint above the largest value); Inf and NaN in W stay Inf and NaN, as before."""
    big = torch.finfo(dtype).max
    W = torch.tensor([[big, big, -big, 1.0], [float("inf"), float("nan"), 2.0, -float("inf")]]).to(dtype)
    ulp_top = rounding.ulp(torch.tensor([big], dtype=torch.float64), dtype).item()
    B = torch.tensor([[ulp_top / 2], [1.0]])  # W + dW on the threshold exactly, ties to even: Inf
    m = LoraModule("m", torch.tensor([[1.0, 0.49, -0.51, 0.25]]), B, 1.0)
    got = kernels.add_updates(W, [(1.0, m)])
    assert torch.equal(got[0], exact_reference(W[:1], [(1.0, LoraModule("m", m.A, B[:1], 1.0))])[0])
    assert got[0, 0].item() == math.inf and math.isfinite(got[0, 1].item())
    assert got[1, 0].item() == math.inf and math.isnan(got[1, 1].item()) and got[1, 3].item() == -math.inf
    assert got[1, 2].item() == round_exact(Fraction(2) - Fraction(float(torch.tensor(0.51))), dtype)


@pytest.mark.parametrize("dtype", HALF)
def test_midpoint_distance_matches_enumeration(dtype) -> None:
    """``midpoint_distance`` against every midpoint of the dtype. ``midpoint_gap`` is at most twice
    the true distance (the binade-edge factor the kernel's test relies on), and not below it up
    to the largest finite value (past it, float16's cells are not real ones but the factor holds)."""
    gen = torch.Generator().manual_seed(0)
    exponents = torch.randint(-149, 128, (20000,), generator=gen).double()
    x = (torch.rand(20000, generator=gen, dtype=torch.float64) * 2 - 1) * torch.pow(2.0, exponents)
    x = torch.cat([x, torch.tensor([0.0, -0.0, 1.0, 2.0**-14, 2.0**-126, 65504.0, 65520.0, 3e38])]).float()
    x = x[torch.isfinite(x)]
    _, midpoints = GRIDS[dtype]
    x64 = x.double()
    at = torch.searchsorted(midpoints, x64).clamp(1, len(midpoints) - 1)
    reference = torch.minimum((x64 - midpoints[at - 1]).abs(), (x64 - midpoints[at]).abs())
    assert torch.equal(rounding.midpoint_distance(x, dtype), reference)
    gap = rounding.midpoint_gap(x.clone(), dtype).double()
    aligned = x64.abs() >= (2.0**-14 if dtype == torch.float16 else 0.0)
    assert (gap[aligned] <= 2 * reference[aligned]).all()
    within = aligned & (x64.abs() <= torch.finfo(dtype).max)
    assert (gap[within] >= reference[within]).all()
    assert (x64.abs() > 65520).any() and aligned.sum() > 10000


def test_midpoint_gap_worked_example() -> None:
    """bfloat16 steps by 2**-7 on [1, 2): 1 + 2**-9 is in the cell of 1, whose midpoint is 1 + 2**-8."""
    x = torch.tensor([1 + 2**-9, 1.0, 1 + 2**-8], dtype=torch.float32)
    assert rounding.midpoint_gap(x, torch.bfloat16).tolist() == [2**-9, 2**-8, 0.0]


def count_settled(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    counted: list[int] = []
    original = kernels.round_to

    def counting(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        counted.append(x.numel())
        return original(x, dtype)

    monkeypatch.setattr(kernels, "round_to", counting)
    return counted


@pytest.mark.parametrize("dtype", HALF)
def test_few_elements_go_to_float64(dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a typical weight and update few elements are recomputed (under 0.5% in bfloat16, 3% in
    float16, whose cells are 8 times finer), and the result is exact."""
    counted = count_settled(monkeypatch)
    gen = torch.Generator().manual_seed(2)
    W = (torch.randn(300, 256, generator=gen) * 0.02).to(dtype)
    m = LoraModule(
        "m", torch.randn(16, 256, generator=gen) / 16, torch.randn(300, 16, generator=gen) * 0.01, 2.0
    )
    got = kernels.add_updates(W, [(1.0, m)])
    X = W.double() + m.delta(torch.float64)
    assert torch.equal(got, nearest(X, dtype))
    assert 0 < sum(counted) < (0.005 if dtype == torch.bfloat16 else 0.03) * W.numel()


def test_float64_factors_and_reused_workspace() -> None:
    """Factors float32 cannot hold exactly (their rounding is bounded, not ignored), and a
    workspace reused from a larger tensor to a smaller one."""
    gen = torch.Generator().manual_seed(3)
    workspace = kernels.Workspace()
    for rows, cols in [(50, 70), (9, 11)]:
        W, m, _ = near_midpoints(torch.bfloat16, rows, cols, seed=rows)
        m = LoraModule(
            "m",
            m.A.double(),
            m.B.double() + 2.0**-40 * torch.randn(rows, 1, generator=gen, dtype=torch.float64),
            1.0,
        )
        X = W.double() + m.delta(torch.float64)
        assert torch.equal(
            kernels.add_updates(W, [(1.0, m)], workspace=workspace).clone(), nearest(X, torch.bfloat16)
        )


def test_lower_matmul_precision_falls_back_to_float64() -> None:
    """With TF32 / bfloat16 matmuls allowed, float32's error bound does not hold: still exact."""
    W, m, _ = near_midpoints(torch.bfloat16, 20, 30, seed=6)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        got = kernels.add_updates(W, [(1.0, m)])
    finally:
        torch.set_float32_matmul_precision(previous)
    assert torch.equal(got, exact_reference(W, [(1.0, m)]))


@pytest.mark.parametrize("seed", range(3))
def test_error_bounds_cover_the_float32_error(seed) -> None:
    """The certificate's premise, checked directly: the float32 sum the kernel computes (addmm
    into U, then W + U) is within the elementwise bound of the exact sum, and that within the row
    bound, for several cancelling terms of mixed magnitudes."""
    gen = torch.Generator().manual_seed(seed)
    rows, cols = 40, 300
    W = (torch.randn(rows, cols, generator=gen) * 0.05).to(torch.bfloat16)
    terms = []
    for t, rank in enumerate([3, 16, 64]):
        A = torch.randn(rank, cols, generator=gen) * 10.0**-t
        B = torch.randn(rows, rank, generator=gen) * 10.0**t
        terms.append(((-1.0) ** t * 0.7, LoraModule("m", A, B, 0.25)))
    factors = kernels._factors(terms, 1.0, torch.device("cpu"))
    norms = kernels._norms(factors)
    U = torch.empty(rows, cols)
    for t, term in enumerate(factors):
        torch.addmm(U, term.L32, term.R32, beta=0 if t == 0 else 1, alpha=term.alpha, out=U)
    X = W.float() + U
    exact = W.double() + sum(w * m.delta(torch.float64) for w, m in terms)
    error = (X.double() - exact).abs()
    flat = torch.arange(rows * cols)
    elementwise = (
        kernels._update_error(
            factors,
            norms,
            lambda v: v.index_select(0, flat // cols),
            lambda v: v.index_select(0, flat % cols),
        ).view(rows, cols)
        + 2.0**-24 * X.double().abs()
    )
    assert (error <= elementwise).all()
    per_row = kernels._row_bounds(factors, norms).double() + 2.0**-24 * X.double().abs().amax(dim=1)
    assert (elementwise <= per_row[:, None]).all()
    assert error.amax() > 0.01 * elementwise.amax()  # the bound is not vacuous


@pytest.mark.parametrize("dtype", HALF)
def test_single_block_path(dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU's route (one block, one ``nonzero``, every flagged element settled), run on the CPU."""
    monkeypatch.setattr(kernels, "_blockwise", lambda device: False)
    W, m, _ = near_midpoints(dtype, 30, 17, seed=7)
    gen = torch.Generator().manual_seed(7)
    W = torch.cat([W, (torch.randn(5, 17, generator=gen) * 2.0**-16).to(dtype)])  # float16 subnormals
    m = LoraModule("m", m.A, torch.cat([m.B, torch.randn(5, 1, generator=gen) * 2.0**-17]), 1.0)
    assert torch.equal(kernels.add_updates(W, [(1.0, m)], sign=-1.0), exact_reference(W, [(1.0, m)], -1.0))


def test_bfloat16_matmuls_on_the_cpu_fall_back_to_float64(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's newer per-backend switch (oneDNN matmuls in bfloat16) voids the bound as well."""
    matmul = torch.backends.mkldnn.matmul
    assert hasattr(matmul, "fp32_precision"), "torch without the per-backend switch: drop this test"
    called = []
    monkeypatch.setattr(kernels, "_add_updates_float64", lambda *args: called.append(1) or torch.zeros(1))
    previous = matmul.fp32_precision
    matmul.fp32_precision = "bf16"
    try:
        kernels.add_updates(
            torch.ones(2, 3, dtype=torch.bfloat16), [(1.0, module(2, 3, 1, torch.Generator()))]
        )
    finally:
        matmul.fp32_precision = previous
    assert called == [1]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn])
def test_ulp_from_the_bit_pattern_equals_frexp_spacing(dtype: torch.dtype) -> None:
    """rounding.ulp reads the binade from float64's bits; the spacing by math.frexp, value by value."""
    from adapterops.ops.rounding import MANTISSA_BITS, ulp

    g = torch.Generator().manual_seed(3)
    scales = torch.exp2(torch.randint(-160, 130, (4000,), generator=g).double())
    x = torch.randn(4000, generator=g, dtype=torch.float64) * scales
    x = torch.cat([x, torch.tensor([0.0, -0.0, 1.0, -2.0, 2.0**-149, 2.0**-1074, 65504.0, 3e38])])
    bits, smallest = MANTISSA_BITS[dtype], torch.finfo(dtype).smallest_normal
    # IEEE spacing: 2**(floor(log2|v|) - bits) for normal values, the subnormal step below (zero too)
    expected = [
        math.ldexp(1.0, math.frexp(abs(v))[1] - 1 - bits) if abs(v) >= smallest else smallest * 2.0**-bits
        for v in x.tolist()
    ]
    assert ulp(x, dtype).tolist() == expected
