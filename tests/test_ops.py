"""combine / negate / scale / resize on in-memory adapters against dense float64 math.

PEFT-made adapters and PEFT's own loading are checked in test_peft_roundtrip.py; here the
algebra is checked on random factors, fast enough for property tests.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import adapterops as ao
from adapterops import Adapter, LoraModule, ModuleKind

SHAPES = {"layers.0.q_proj": (12, 10), "layers.0.v_proj": (6, 10), "layers.1.q_proj": (12, 10)}


def random_adapter(
    seed: int,
    *,
    names: tuple[str, ...] = tuple(SHAPES),
    rank: int = 3,
    scale: float = 2.0,
    dtype: torch.dtype = torch.float64,
    bias: bool = False,
    config: dict | None = None,
    full: dict | None = None,
) -> Adapter:
    gen = torch.Generator().manual_seed(seed)
    modules = {}
    for name in names:
        out, inp = SHAPES[name]
        modules[name] = LoraModule(
            name=name,
            A=torch.randn(rank, inp, generator=gen, dtype=torch.float64).to(dtype),
            B=torch.randn(out, rank, generator=gen, dtype=torch.float64).to(dtype),
            scale=scale,
            bias=torch.randn(out, generator=gen, dtype=torch.float64).to(dtype) if bias else None,
        )
    return Adapter(modules=modules, config=config or {}, full_tensors=full or {})


def dense(adapter: Adapter) -> dict[str, torch.Tensor]:
    return {name: m.delta(torch.float64) for name, m in adapter.modules.items()}


def dense_bias(adapter: Adapter) -> dict[str, torch.Tensor]:
    return {n: m.scale * m.bias.double() for n, m in adapter.modules.items() if m.bias is not None}


def assert_deltas(got: Adapter, expected: dict[str, torch.Tensor], rtol: float = 1e-10) -> None:
    assert set(got.modules) == set(expected)
    for name, want in expected.items():
        scale = float(want.abs().max()) or 1.0
        torch.testing.assert_close(got.modules[name].delta(torch.float64), want, rtol=0, atol=rtol * scale)


weights_st = st.lists(
    st.floats(-3, 3, allow_nan=False).filter(lambda w: abs(w) > 1e-3), min_size=1, max_size=3
)


@settings(max_examples=30, deadline=None)
@given(weights=weights_st, seed=st.integers(0, 1000), method=st.sampled_from(["exact", "cat"]))
def test_combine_is_the_weighted_sum(weights: list[float], seed: int, method: str) -> None:
    adapters = [random_adapter(seed + i, rank=2 + i, scale=0.5 + i) for i in range(len(weights))]
    mix = ao.combine(adapters, weights, method=method)
    expected = {
        name: sum(w * dense(a)[name] for w, a in zip(weights, adapters, strict=True)) for name in SHAPES
    }
    assert_deltas(mix, expected)


@settings(max_examples=20, deadline=None)
@given(w1=st.floats(-2, 2), w2=st.floats(-2, 2), seed=st.integers(0, 1000))
def test_combine_is_linear_in_its_inputs(w1: float, w2: float, seed: int) -> None:
    """combine([a, b], [w1, w2]) == combine([combine([a],[w1]), combine([b],[w2])])."""
    a, b = random_adapter(seed), random_adapter(seed + 1, rank=4)
    direct = ao.combine([a, b], [w1, w2])
    staged = ao.combine([ao.combine([a], [w1]), ao.combine([b], [w2])])
    assert_deltas(direct, dense(staged))


def test_single_input_at_weight_one_is_that_adapter_bit_for_bit() -> None:
    a = random_adapter(0, dtype=torch.bfloat16)
    same = ao.combine([a], [1.0])
    for name, m in a.modules.items():
        assert torch.equal(same.modules[name].A, m.A) and torch.equal(same.modules[name].B, m.B)
        assert same.modules[name].scale == m.scale


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 1000), by=st.floats(-5, 5, allow_nan=False))
def test_negate_twice_is_identity_and_scale_multiplies(seed: int, by: float) -> None:
    a = random_adapter(seed, bias=True, dtype=torch.float32)
    twice = ao.negate(ao.negate(a))
    for name, m in a.modules.items():
        assert torch.equal(twice.modules[name].B, m.B) and torch.equal(twice.modules[name].A, m.A)
        assert torch.equal(twice.modules[name].bias, m.bias)
        assert twice.modules[name].scale == m.scale
    scaled = ao.scale(a, by)
    assert_deltas(scaled, {n: by * d for n, d in dense(a).items()}, rtol=1e-6)
    for name, want in dense_bias(a).items():
        got = dense_bias(scaled).get(name, torch.zeros_like(want))
        torch.testing.assert_close(got, by * want, rtol=1e-6, atol=1e-6)


def test_scale_keeps_the_factors_and_moves_the_factor_into_the_scale() -> None:
    a = random_adapter(1, dtype=torch.bfloat16)
    half = ao.scale(a, 0.5)
    for name, m in a.modules.items():
        assert torch.equal(half.modules[name].B, m.B)
        assert half.modules[name].scale == 0.5 * m.scale


def test_modules_only_some_inputs_touch_get_only_their_terms() -> None:
    a = random_adapter(0, names=("layers.0.q_proj", "layers.0.v_proj"))
    b = random_adapter(1, names=("layers.0.q_proj", "layers.1.q_proj"), rank=5)
    mix = ao.combine([a, b], [0.7, -0.3])
    da, db = dense(a), dense(b)
    assert_deltas(
        mix,
        {
            "layers.0.q_proj": 0.7 * da["layers.0.q_proj"] - 0.3 * db["layers.0.q_proj"],
            "layers.0.v_proj": 0.7 * da["layers.0.v_proj"],
            "layers.1.q_proj": -0.3 * db["layers.1.q_proj"],
        },
    )


def test_exact_combine_drops_to_the_numerical_rank() -> None:
    """a + a has the rank of a; a - a is zero (kept as a rank-1 zero update PEFT can load)."""
    a = random_adapter(2, rank=3)
    double = ao.combine([a, a], [1.0, 1.0])
    assert {m.rank for m in double.modules.values()} == {3}
    assert_deltas(double, {n: 2 * d for n, d in dense(a).items()})
    zero = ao.combine([a, a], [1.0, -1.0])
    assert {m.rank for m in zero.modules.values()} == {1}
    assert all(float(m.delta().abs().max()) < 1e-12 for m in zero.modules.values())
    kept = ao.combine([a, random_adapter(3)], [1.0, 1.0])
    assert {r.rank_out for r in kept.report} == {6}


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 1000), k=st.integers(1, 6), w=st.floats(0.1, 2))
def test_svd_combine_is_the_best_rank_k_of_the_sum(seed: int, k: int, w: float) -> None:
    a, b = random_adapter(seed, rank=3), random_adapter(seed + 7, rank=4)
    mix = ao.combine([a, b], [w, 1.0 - w], method="svd", rank=k)
    reports = {r.name: r for r in mix.report}
    for name in SHAPES:
        exact = w * dense(a)[name] + (1 - w) * dense(b)[name]
        S = torch.linalg.svdvals(exact)
        kk = min(k, len(S))
        optimal = float(S[kk:].pow(2).sum().sqrt())
        got = mix.modules[name]
        held = int(torch.linalg.matrix_rank(exact))  # 7, or 3 when w = 1 drops b: never padded with zeros
        assert got.rank == min(k, held) and (reports[name].note is not None) == (k > held)
        error = float(torch.linalg.matrix_norm(got.delta(torch.float64) - exact))
        assert error == pytest.approx(optimal, rel=1e-6, abs=1e-9)
        assert reports[name].rel_error == pytest.approx(
            optimal / float(S.pow(2).sum().sqrt()), rel=1e-6, abs=1e-9
        )


def test_resize_to_full_rank_changes_nothing_and_reports_the_tail() -> None:
    a = random_adapter(4, rank=5)
    full = ao.resize(a, rank=5)
    assert_deltas(full, dense(a))
    assert all(r.rel_error < 1e-12 for r in full.report)
    small = ao.resize(a, rank=2)
    for r in small.report:
        S = torch.linalg.svdvals(dense(a)[r.name])
        assert r.rel_error == pytest.approx(
            float(S[2:].pow(2).sum().sqrt() / S.pow(2).sum().sqrt()), rel=1e-8
        )
        assert r.energy_kept == pytest.approx(float(S[:2].pow(2).sum() / S.pow(2).sum()), rel=1e-10)


def test_resize_by_energy_and_sv_ratio_meet_their_targets() -> None:
    a = random_adapter(5, rank=6)
    for r in ao.resize(a, energy=0.9).report:
        assert r.energy_kept >= 0.9
        S = torch.linalg.svdvals(dense(a)[r.name])
        assert float(S[: r.rank_out - 1].pow(2).sum() / S.pow(2).sum()) < 0.9  # one fewer would not do
    ratio = ao.resize(a, sv_ratio=3.0)
    for r in ratio.report:
        S = torch.linalg.svdvals(dense(a)[r.name])
        assert r.rank_out == int((S[0] / 3.0 <= S).sum())


def test_linear_method_is_peft_linear_and_reports_its_error() -> None:
    """A = sum sign(c) sqrt|c| A_i, B = sum sqrt|c| B_i with c = w * scale, as PEFT computes it."""
    a, b = random_adapter(6, scale=2.0), random_adapter(7, scale=0.5)
    with pytest.warns(ao.ApproximationWarning, match="not the weighted sum"):
        lin = ao.combine([a, b], [0.6, -0.4], method="linear")
    for name in SHAPES:
        ca, cb = 0.6 * 2.0, -0.4 * 0.5
        A = ca**0.5 * a.modules[name].A - abs(cb) ** 0.5 * b.modules[name].A
        B = ca**0.5 * a.modules[name].B + abs(cb) ** 0.5 * b.modules[name].B
        torch.testing.assert_close(lin.modules[name].delta(torch.float64), B @ A)
        exact = 0.6 * dense(a)[name] - 0.4 * dense(b)[name]
        rel = torch.linalg.matrix_norm(B @ A - exact) / torch.linalg.matrix_norm(exact)
        assert {r.name: r for r in lin.report}[name].rel_error == pytest.approx(float(rel), rel=1e-8)


def test_biases_add_like_the_updates() -> None:
    a, b = random_adapter(8, bias=True), random_adapter(9, bias=False)
    for method in ("exact", "svd"):
        extra = {"rank": 2} if method == "svd" else {}
        mix = ao.combine([a, b], [0.25, 3.0], method=method, **extra)
        for name, want in dense_bias(a).items():
            torch.testing.assert_close(dense_bias(mix)[name], 0.25 * want)


def test_bf16_inputs_are_computed_in_float32_and_stored_in_bf16() -> None:
    a, b = random_adapter(10, dtype=torch.bfloat16), random_adapter(11, dtype=torch.bfloat16)
    mix = ao.combine([a, b], [0.5, 0.5], method="svd", rank=4)
    assert {m.A.dtype for m in mix.modules.values()} == {torch.bfloat16}
    for name in SHAPES:
        exact = 0.5 * dense(a)[name] + 0.5 * dense(b)[name]
        S = torch.linalg.svdvals(exact)
        error = float(torch.linalg.matrix_norm(mix.modules[name].delta(torch.float64) - exact))
        # optimal tail plus bf16 storage rounding of the factors (8 bits of mantissa)
        assert error <= float(S[4:].pow(2).sum().sqrt()) + 2**-7 * float(S.pow(2).sum().sqrt())


def test_conv_and_embedding_layouts_survive_combination() -> None:
    gen = torch.Generator().manual_seed(0)
    conv = LoraModule(
        "conv",
        torch.randn(2, 3 * 9, generator=gen),
        torch.randn(8, 2, generator=gen),
        1.5,
        ModuleKind.CONV,
        kernel_size=(3, 3),
    )
    emb = LoraModule(
        "emb",
        torch.randn(2, 50, generator=gen),
        torch.randn(16, 2, generator=gen),
        2.0,
        ModuleKind.EMBEDDING,
        transposed=True,
    )
    a = Adapter({"conv": conv, "emb": emb})
    mix = ao.combine([a, a], [1.0, 0.5], method="svd", rank=2)
    assert mix.modules["conv"].weight_shape == (8, 3, 3, 3)
    assert mix.modules["emb"].weight_shape == (50, 16)
    torch.testing.assert_close(mix.modules["conv"].delta(), 1.5 * conv.delta(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mix.modules["emb"].delta(), 1.5 * emb.delta(), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ refusals


def test_weights_must_match_inputs() -> None:
    with pytest.raises(
        ao.InvalidInputError, match="got 1 weights for 2 adapters; give one weight per adapter"
    ):
        ao.combine([random_adapter(0), random_adapter(1)], [1.0])


def test_mismatched_shapes_name_the_module() -> None:
    a = random_adapter(0, names=("layers.0.q_proj",))
    wide = LoraModule("layers.0.q_proj", torch.randn(3, 11, dtype=torch.float64), torch.randn(12, 3), 1.0)
    with pytest.raises(
        ao.IncompatibleAdaptersError, match=r"module layers.0.q_proj: shapes differ.*\(12, 10\).*\(12, 11\)"
    ):
        ao.combine([a, Adapter({"layers.0.q_proj": wide})])


def test_different_base_models_need_force() -> None:
    a = random_adapter(0, config={"base_model_name_or_path": "org/base-a"})
    b = random_adapter(1, config={"base_model_name_or_path": "org/base-b"})
    with pytest.raises(ao.IncompatibleAdaptersError, match="different base models.*org/base-a.*org/base-b"):
        ao.combine([a, b])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ao.combine([a, b], allow_different_bases=True)
    assert any("different base models" in str(w.message) for w in caught)


def test_rank_beyond_the_module_is_capped_at_its_full_rank_with_a_note() -> None:
    with pytest.warns(
        ao.RankCapWarning, match=r"^1 module capped at its full rank \(rank=7 asked for more\)"
    ):
        out = ao.combine([random_adapter(0, rank=4), random_adapter(1, rank=4)], method="svd", rank=7)
    notes = {r.name: (r.rank_out, r.note) for r in out.report}
    assert notes["layers.0.v_proj"] == (
        6,
        "capped at full rank 6: asked rank 7, a 6x10 update has rank at most 6",
    )
    assert all(note is None for name, (k, note) in notes.items() if name != "layers.0.v_proj")


def test_dora_inputs_are_refused_until_base_aware_arithmetic_exists() -> None:
    a = random_adapter(0)
    m = a.modules["layers.0.q_proj"]
    dora = Adapter({m.name: LoraModule(m.name, m.A, m.B, m.scale, magnitude=torch.ones(12))})
    with pytest.raises(ao.UnsupportedAdapterError, match="DoRA adapter .* depends on the base weights"):
        ao.negate(dora)


def test_modules_to_save_conflicts_are_refused_and_identical_copies_kept() -> None:
    head = torch.randn(4, 4)
    a = random_adapter(0, full={"lm_head.weight": head})
    b = random_adapter(1, full={"lm_head.weight": head.clone()})
    assert torch.equal(ao.combine([a, b]).full_tensors["lm_head.weight"], head)
    c = random_adapter(2, full={"lm_head.weight": head + 1})
    with pytest.raises(
        ao.IncompatibleAdaptersError, match="both carry a full replacement for lm_head.weight"
    ):
        ao.combine([a, c])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "svd"}, "method svd needs a target"),
        (
            {"method": "cat", "rank": 2},
            "rank applies to methods svd, ties, dare_linear, dare_ties, magnitude_prune, tsv, iso_c, iso_cts, not cat",
        ),
        ({"method": "knots"}, "unknown method 'knots'; choose one of exact, cat, svd, linear, ties"),
        ({"weights": [1.0, float("nan")]}, "weights must be finite numbers"),
    ],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ao.InvalidInputError) as info:
        ao.combine([random_adapter(0), random_adapter(1)], **kwargs)
    assert message in str(info.value)
