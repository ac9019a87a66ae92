"""LoRA-native merging (ops/native.py): TIES/DARE/magnitude pruning in the core, knots and
peft-factors spaces, TSV-M, Iso-C and Iso-CTS.

Each method is checked against a float64 dense reference written from its paper (numpy, never the
code under test), for invariance under a change of gauge of the inputs' factors, for its cost on a
module no dense update of which fits in memory, against PEFT (its loader, and its own
``add_weighted_adapter`` for the peft-factors space), and for the options it refuses.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import adapterops as ao
from adapterops.adapter import LoraModule, ParameterTarget
from adapterops.cli import cli
from adapterops.ops import native
from adapterops.ops.combine import combine_module
from adapterops.ops.lowrank import RankPolicy
from adapterops.ops.sparsify import Sparsity
from adapterops.options import MajoritySign, Method, Space
from tests.conftest import Zoo
from tests.support.factories import make_adapter, peft_deltas, tiny_llama

ROOT = Path(__file__).resolve().parent.parent

# ------------------------------------------------------------------------------ small random modules


def random_modules(seed: int, ranks: tuple[int, ...], out: int = 28, inp: int = 33) -> list[LoraModule]:
    """Float64 LoRA modules of one (out, in) shape with unbalanced factors and scales != 1."""
    gen = torch.Generator().manual_seed(seed)
    modules = []
    for i, r in enumerate(ranks):
        A = torch.randn(r, inp, generator=gen, dtype=torch.float64) * (0.5 + i)
        B = torch.randn(out, r, generator=gen, dtype=torch.float64) / (1.0 + i)
        modules.append(LoraModule("layers.0.proj", A, B, scale=[0.5, 2.0, 1.25][i]))
    return modules


def merged(
    modules: list[LoraModule],
    weights: list[float],
    method: str,
    *,
    space: str = "dense",
    density: float = 1.0,
    sign: str = "total",
    seed: int = 0,
    fraction: float = 0.8,
    policy: RankPolicy | None = None,
) -> tuple[np.ndarray, ao.ModuleReport]:
    sparsity = Sparsity(density, MajoritySign(sign), seed, Space(space))
    module, report = combine_module(
        list(zip(weights, modules, strict=True)),
        Method(method),
        policy or RankPolicy(),
        sparsity,
        common_fraction=fraction,
    )
    return module.delta(torch.float64).numpy(), report


def deltas(modules: list[LoraModule]) -> list[np.ndarray]:
    """Each input's dW_i = s_i B_i A_i, dense (the references start from these)."""
    return [m.scale * (m.B.numpy() @ m.A.numpy()) for m in modules]


def close(got: np.ndarray, want: np.ndarray, tol: float = 1e-10) -> bool:
    return float(np.abs(got - want).max()) <= tol * float(np.abs(want).max())


# ------------------------------------------------------------- float64 references from the papers


def ref_trim(x: np.ndarray, density: float) -> np.ndarray:
    k = int(density * x.size)
    if k == 0:
        return np.zeros_like(x)
    threshold = np.sort(np.abs(x).ravel())[::-1][k - 1]
    return np.where(np.abs(x) >= threshold, x, 0.0)


def ref_merge(method: str, parts: list[np.ndarray], w: list[float], density: float, how: str) -> np.ndarray:
    """TIES (Yadav et al. 2023) and magnitude pruning; DARE only at density 1, where it drops nothing."""
    t = np.stack([ref_trim(p, density) if method in ("ties", "magnitude_prune") else p for p in parts])
    if method in ("magnitude_prune", "dare_linear"):
        return sum(wi * ti for wi, ti in zip(w, t, strict=True))
    votes = t.sum(0) if how == "total" else np.sign(t).sum(0)
    gamma = np.where(votes >= 0, 1.0, -1.0)
    agree = np.sign(t) == gamma
    weighted = np.array(w)[:, None, None] * t
    return np.where(agree, weighted, 0.0).sum(0) / np.maximum(agree.sum(0), 1)


def ref_rank(S: np.ndarray) -> int:
    return int((1e-9 * S[0] < S).sum()) if S.size else 0


def ref_signs(U: np.ndarray) -> np.ndarray:
    """The documented sign convention: each column's entry of largest magnitude is positive."""
    return np.sign(U[np.abs(U).argmax(axis=0), np.arange(U.shape[1])])


def ref_core(dWs: list[np.ndarray], merge: object) -> np.ndarray:
    """Core Space merging with the canonical basis: U from [dW_1 | ... | dW_n], V from [dW_1; ...; dW_n]."""
    U, S, _ = np.linalg.svd(np.hstack(dWs), full_matrices=False)
    U = U[:, : ref_rank(S)]
    _, S2, Vh = np.linalg.svd(np.vstack(dWs), full_matrices=False)
    V = Vh[: ref_rank(S2)].T
    U, V = U * ref_signs(U), V * ref_signs(V)
    return U @ merge([U.T @ d @ V for d in dWs]) @ V.T  # type: ignore[operator]


def ref_knots(dWs: list[np.ndarray], merge: object) -> np.ndarray:
    """KnOTS (Stoica et al.): [dW_1 | ... | dW_n] = U S [V_1^T | ...]; merge the S V_i^T; U times that."""
    U, S, Vh = np.linalg.svd(np.hstack(dWs), full_matrices=False)
    k, inp = ref_rank(S), dWs[0].shape[1]
    signs = ref_signs(U[:, :k])
    U, Vh = U[:, :k] * signs, Vh[:k] * signs[:, None]
    blocks = [S[:k, None] * Vh[:, i * inp : (i + 1) * inp] for i in range(len(dWs))]
    return U @ merge(blocks)  # type: ignore[operator]


def ref_polar(X: np.ndarray) -> np.ndarray:
    P, _, Qh = np.linalg.svd(X, full_matrices=False)
    return P @ Qh


def ref_tsv(Ts: list[np.ndarray]) -> np.ndarray:
    """TSV-M (Gargiulo et al. 2025, Alg. 1) keeping every nonzero direction of each input."""
    Us, Ss, Vs = [], [], []
    for T in Ts:
        U, S, Vh = np.linalg.svd(T, full_matrices=False)
        r = ref_rank(S)
        Us.append(U[:, :r])
        Ss.append(S[:r])
        Vs.append(Vh[:r].T)
    return ref_polar(np.hstack(Us)) @ np.diag(np.concatenate(Ss)) @ ref_polar(np.hstack(Vs)).T


def ref_iso_c(Ts: list[np.ndarray], k: int | None = None) -> np.ndarray:
    """Iso-C (Marczak et al. 2025): the sum's singular values replaced by their mean (nonzero ones)."""
    U, S, Vh = np.linalg.svd(sum(Ts), full_matrices=False)
    k = k or ref_rank(S)
    return S[:k].mean() * U[:, :k] @ Vh[:k]


def ref_iso_cts(Ts: list[np.ndarray], fraction: float) -> np.ndarray:
    """Iso-CTS (Marczak et al. 2025, danielm1405/iso-merging ``iso_cts``) with min(shape) replaced by
    the numerical rank of the stacked updates, and an input's residual giving only its nonzero
    directions (the paper's code would take zero ones, arbitrary vectors, where it has fewer)."""
    n = len(Ts)
    k = ref_rank(np.linalg.svd(np.hstack(Ts), compute_uv=False))
    common = int(k * fraction)
    specific = round((k - common) / n) * n
    common, per = k - specific, specific // n
    u, s, vh = np.linalg.svd(sum(Ts), full_matrices=False)
    Us, Ss, Vs = [u[:, :common]], [s[:common]], [vh[:common].T]
    for T in Ts:
        ut, st, vht = np.linalg.svd(T - u[:, :common] @ u[:, :common].T @ T, full_matrices=False)
        kept = min(per, int((st > 1e-9 * np.abs(T).max()).sum()))
        Us.append(ut[:, :kept])
        Ss.append(st[:kept])
        Vs.append(vht[:kept].T)
    return np.concatenate(Ss).mean() * ref_polar(np.hstack(Us)) @ ref_polar(np.hstack(Vs)).T


# ------------------------------------------------------------------------------ methods vs papers

SPARSE_CASES = [
    ("ties", 0.3, "total"),
    ("ties", 0.5, "frequency"),
    ("magnitude_prune", 0.4, "total"),
    ("dare_linear", 1.0, "total"),
    ("dare_ties", 1.0, "frequency"),
]


@pytest.mark.parametrize("space", ["core", "knots"])
@pytest.mark.parametrize(("method", "density", "how"), SPARSE_CASES)
@pytest.mark.parametrize("ranks", [(2, 4), (3, 2, 4)])
def test_sparsifying_in_core_and_knots_space_match_the_papers(
    space: str, method: str, density: float, how: str, ranks: tuple[int, ...]
) -> None:
    """Core-space TIES is dense TIES applied to U^T dW_i V; KnOTS-TIES is dense TIES on S V_i^T."""
    modules = random_modules(len(ranks), ranks)
    w = [0.6, -1.1, 0.9][: len(ranks)]
    got, report = merged(modules, w, method, space=space, density=density, sign=how)
    reference = ref_core if space == "core" else ref_knots
    want = reference(deltas(modules), lambda parts: ref_merge(method, parts, w, density, how))
    assert close(got, want)
    assert report.rel_error == 0.0 and report.energy_kept == 1.0
    assert report.rank_out == np.linalg.matrix_rank(want) <= sum(ranks)


@pytest.mark.parametrize("ranks", [(2, 4), (3, 2, 4), (4, 4)])
def test_tsv_matches_the_paper(ranks: tuple[int, ...]) -> None:
    modules = random_modules(10 + len(ranks), ranks)
    w = [0.8, -0.5, 1.2][: len(ranks)]
    got, report = merged(modules, w, "tsv")
    want = ref_tsv([wi * d for wi, d in zip(w, deltas(modules), strict=True)])
    assert close(got, want) and report.rank_out == sum(ranks)


@pytest.mark.parametrize("ranks", [(2, 4), (3, 2, 4)])
def test_iso_c_matches_the_paper(ranks: tuple[int, ...]) -> None:
    modules = random_modules(20 + len(ranks), ranks)
    w = [0.8, -0.5, 1.2][: len(ranks)]
    got, report = merged(modules, w, "iso_c")
    Ts = [wi * d for wi, d in zip(w, deltas(modules), strict=True)]
    assert close(got, ref_iso_c(Ts))
    # isotropic: every nonzero singular value is the mean
    S = np.linalg.svd(got, compute_uv=False)[: report.rank_out]
    assert np.ptp(S) <= 1e-10 * S[0] and report.rank_out == sum(ranks)


@pytest.mark.parametrize("fraction", [0.8, 0.5, 0.0])
@pytest.mark.parametrize("ranks", [(2, 4), (3, 2, 4), (4, 4)])
def test_iso_cts_matches_the_paper(ranks: tuple[int, ...], fraction: float) -> None:
    modules = random_modules(30 + len(ranks), ranks)
    w = [0.8, -0.5, 1.2][: len(ranks)]
    got, _ = merged(modules, w, "iso_cts", fraction=fraction)
    assert close(got, ref_iso_cts([wi * d for wi, d in zip(w, deltas(modules), strict=True)], fraction))


def test_worked_examples() -> None:
    """By hand. Iso-C of diag(3, 1) is diag(2, 2): singular values 3 and 1, mean 2. TSV of two rank-1
    updates with orthogonal directions is their sum (the concatenated U and V are orthonormal
    already). Iso-CTS with common fraction 1 is Iso-C."""
    eye = torch.eye(2, dtype=torch.float64)
    one = LoraModule("m", eye, torch.tensor([[3.0, 0.0], [0.0, 1.0]], dtype=torch.float64), 1.0)
    got, _ = merged([one], [1.0], "iso_c")
    assert np.allclose(got, [[2.0, 0.0], [0.0, 2.0]], rtol=0, atol=1e-14)

    a = LoraModule(
        "m", torch.tensor([[1.0, 0.0]], dtype=torch.float64), torch.tensor([[2.0], [0.0]]).double(), 1.0
    )
    b = LoraModule(
        "m", torch.tensor([[0.0, 1.0]], dtype=torch.float64), torch.tensor([[0.0], [5.0]]).double(), 1.0
    )
    got, _ = merged([a, b], [1.0, 1.0], "tsv")
    assert np.allclose(got, [[2.0, 0.0], [0.0, 5.0]], rtol=0, atol=1e-14)

    modules = random_modules(3, (3, 2))
    assert close(
        merged(modules, [1.0, 0.7], "iso_cts", fraction=1.0)[0], merged(modules, [1.0, 0.7], "iso_c")[0]
    )


# ------------------------------------------------------------------------------ rank targets


def test_tsv_with_a_rank_target_is_the_best_rank_k_form_of_its_result() -> None:
    modules = random_modules(5, (3, 4))
    full, _ = merged(modules, [1.0, 0.5], "tsv")
    got, report = merged(modules, [1.0, 0.5], "tsv", policy=RankPolicy(rank=3))
    U, S, Vh = np.linalg.svd(full)
    assert close(got, U[:, :3] * S[:3] @ Vh[:3], 1e-9)
    assert report.rank_out == 3
    assert abs(report.energy_kept - (S[:3] ** 2).sum() / (S**2).sum()) < 1e-12
    assert abs(report.rel_error - np.linalg.norm(full - got) / np.linalg.norm(full)) < 1e-9


def test_iso_c_with_a_rank_target_flattens_the_sums_leading_directions() -> None:
    """An isotropic spectrum has no best rank-k form, so the target chooses the directions first:
    Iso-C of the sum's best rank-k approximation; the report gives the share of the sum they span."""
    modules = random_modules(6, (3, 4))
    w = [1.0, -0.4]
    got, report = merged(modules, w, "iso_c", policy=RankPolicy(rank=2))
    Ts = [wi * d for wi, d in zip(w, deltas(modules), strict=True)]
    assert close(got, ref_iso_c(Ts, k=2))
    S = np.linalg.svd(sum(Ts), compute_uv=False)[:7]
    assert report.rank_out == 2 and abs(report.energy_kept - (S[:2] ** 2).sum() / (S**2).sum()) < 1e-12
    # a rank above the numerical rank keeps the nonzero directions only (no arbitrary ones)
    assert close(merged(modules, w, "iso_c", policy=RankPolicy(rank=9))[0], ref_iso_c(Ts))


# ------------------------------------------------------------------------------ gauge invariance


def regauged(modules: list[LoraModule], seed: int) -> list[LoraModule]:
    """(B_i Q_i, Q_i^-1 A_i) with random Q_i of condition number 4: the same updates, other factors."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for m in modules:
        q1 = torch.linalg.qr(torch.randn(m.rank, m.rank, generator=gen, dtype=torch.float64))[0]
        q2 = torch.linalg.qr(torch.randn(m.rank, m.rank, generator=gen, dtype=torch.float64))[0]
        Q = q1 @ torch.diag(torch.linspace(0.5, 2.0, m.rank, dtype=torch.float64)) @ q2
        out.append(replace(m, A=torch.linalg.solve(Q, m.A), B=m.B @ Q))
    return out


GAUGE_CASES = [
    ("ties", {"density": 0.3}),  # the dense space: a function of the updates by definition
    ("dare_ties", {"density": 0.5, "seed": 3}),
    ("dare_linear", {"density": 0.5}),
    ("magnitude_prune", {"density": 0.2}),
    ("ties", {"space": "core", "density": 0.3}),
    ("ties", {"space": "knots", "density": 0.3, "sign": "frequency"}),
    ("dare_ties", {"space": "core", "density": 0.5, "seed": 3}),
    ("dare_linear", {"space": "knots", "density": 0.5}),
    ("magnitude_prune", {"space": "core", "density": 0.2}),
    ("tsv", {}),
    ("iso_c", {}),
    ("iso_cts", {}),
    ("iso_cts", {"fraction": 0.3}),
]


@pytest.mark.parametrize(("method", "kwargs"), GAUGE_CASES)
def test_results_do_not_depend_on_how_the_updates_are_factored(
    method: str, kwargs: dict[str, object]
) -> None:
    modules = random_modules(7, (3, 4, 2))
    w = [0.7, 1.0, -0.6]
    first, _ = merged(modules, w, method, **kwargs)  # type: ignore[arg-type]
    other, _ = merged(regauged(modules, 8), w, method, **kwargs)  # type: ignore[arg-type]
    assert close(other, first, 1e-9)


def test_peft_factors_depends_on_the_factoring() -> None:
    modules = random_modules(7, (4, 4))
    first, _ = merged(modules, [0.7, 1.0], "ties", space="peft-factors", density=0.5)
    other, _ = merged(regauged(modules, 8), [0.7, 1.0], "ties", space="peft-factors", density=0.5)
    assert float(np.abs(other - first).max()) > 1e-2 * float(np.abs(first).max())


# ------------------------------------------------------------------------------ DARE's draws


def test_dare_in_core_space_draws_the_documented_masks() -> None:
    """Input i's uniforms in grid block b come from a generator seeded with the first 63 bits of
    sha256("{seed}:{name}:{i}:{b}"), as float32 (docs/math.md); a core matrix is one block."""
    modules = random_modules(9, (3, 2))
    w, density, seed = [0.9, 0.6], 0.5, 11
    got, _ = merged(modules, w, "dare_linear", space="core", density=density, seed=seed)

    def merge(parts: list[np.ndarray]) -> np.ndarray:
        masks = []
        for i, p in enumerate(parts):
            digest = hashlib.sha256(f"{seed}:{modules[0].name}:{i}:0".encode()).digest()
            gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
            masks.append(torch.rand(p.shape, generator=gen, dtype=torch.float32).numpy() < density)
        return sum(wi * np.where(m, p / density, 0.0) for wi, m, p in zip(w, masks, parts, strict=True))

    assert close(got, ref_core(deltas(modules), merge))


# ------------------------------------------------------------------------------ real adapters


@pytest.mark.parametrize("space", ["core", "knots"])
@pytest.mark.parametrize("method", ["dare_linear", "magnitude_prune"])
@pytest.mark.parametrize(
    "pair", [("llama_a", "llama_b"), ("gpt2_a", "gpt2_b"), ("conv_a", "conv_b"), ("llama_emb", "llama_emb_b")]
)
def test_density_one_is_the_weighted_sum(zoo: Zoo, space: str, method: str, pair: tuple[str, str]) -> None:
    """Linear, Conv1D, Conv2d and embeddings, scales and ranks that differ, modules only one input has."""
    inputs = [zoo[p] for p in pair]
    got = ao.combine(inputs, [0.7, -0.4], method=method, density=1.0, space=space)
    exact = ao.combine(inputs, [0.7, -0.4])
    for name, module in got.modules.items():
        want = exact.modules[name].delta(torch.float64)
        assert float((module.delta(torch.float64) - want).norm()) <= 1e-6 * float(want.norm()), name
    assert all(r.rel_error == 0.0 for r in got.report)
    assert got.provenance is not None and got.provenance["space"] == space


NATIVE_CALLS = [
    ({"method": "ties", "density": 0.4, "space": "core"}, "core-ties"),
    ({"method": "dare_ties", "density": 1.0, "space": "knots"}, "knots-dare-ties"),
    ({"method": "tsv"}, "tsv"),
    ({"method": "iso_c"}, "iso_c"),
    ({"method": "iso_cts", "common_fraction": 0.6}, "iso_cts"),
]


@pytest.mark.parametrize(("kwargs", "label"), NATIVE_CALLS, ids=[c[1] for c in NATIVE_CALLS])
def test_outputs_load_in_peft_with_the_expected_merged_weights(
    zoo: Zoo, kwargs: dict[str, object], label: str, tmp_path: Path
) -> None:
    """The references start from PEFT's own deltas of the inputs; PEFT loads the output."""
    a, b = zoo["llama_a"], zoo["llama_b"]
    w = [0.8, -0.6]
    out = ao.combine([a, b], w, **kwargs)  # type: ignore[arg-type]
    ao.save_adapter(out, tmp_path / label)
    got = peft_deltas(tiny_llama, tmp_path / label)
    inputs = [peft_deltas(tiny_llama, a), peft_deltas(tiny_llama, b)]
    method = str(kwargs["method"])
    for name, delta in got.items():
        present = [(wi, d[name].numpy()) for wi, d in zip(w, inputs, strict=True) if name in d]
        ws, ds = [p[0] for p in present], [p[1] for p in present]
        Ts = [wi * d for wi, d in present]
        if method == "tsv":
            want = ref_tsv(Ts)
        elif method == "iso_c":
            want = ref_iso_c(Ts)
        elif method == "iso_cts":
            want = ref_iso_cts(Ts, 0.6)
        else:
            reference = ref_core if kwargs["space"] == "core" else ref_knots
            density = float(kwargs["density"])  # type: ignore[arg-type]
            want = reference(ds, lambda parts, ws=ws, d=density: ref_merge(method, parts, ws, d, "total"))
        assert close(delta.numpy(), want, 1e-5), (label, name)
    assert set(got) == set(out.modules) and len(got) >= 6


# ------------------------------------------------------------------------------ peft-factors: PEFT parity


@pytest.fixture(scope="module")
def same_rank(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two llama adapters of one rank (PEFT's factor-wise methods need it), scale 2."""
    root = tmp_path_factory.mktemp("same-rank")
    kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    return (
        make_adapter(tiny_llama, root / "a", seed=31, **kwargs),
        make_adapter(tiny_llama, root / "b", seed=32, **kwargs),
    )


@pytest.mark.parametrize(
    ("method", "density", "how"),
    [
        ("ties", 0.3, "total"),
        ("ties", 0.5, "frequency"),
        ("magnitude_prune", 0.4, None),
        ("dare_linear", 1.0, None),
        ("dare_ties", 1.0, "frequency"),
    ],
)
def test_peft_factors_are_peft_add_weighted_adapter(
    same_rank: tuple[Path, Path], method: str, density: float, how: str | None, tmp_path: Path
) -> None:
    """The same A and B as PEFT's non-svd combination types, a negative weight included (PEFT puts
    its sign on A only). DARE below density 1 cannot match draw for draw: PEFT draws its masks with
    ``torch.bernoulli`` from the global RNG; the seeded draws are checked for their distribution below."""
    from peft import PeftModel

    a, b = same_rank
    w = [0.7, -0.5]
    model = PeftModel.from_pretrained(tiny_llama().double(), a, adapter_name="a")
    model.load_adapter(b, adapter_name="b")
    extra = {"majority_sign_method": how} if how else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that density 1 prunes nothing
        model.add_weighted_adapter(["a", "b"], w, "mix", combination_type=method, density=density, **extra)
    mine_extra = {"majority_sign": how} if how else {}
    with pytest.warns(ao.ApproximationWarning, match="space peft-factors is PEFT's approximation"):
        mine = ao.combine([a, b], w, method=method, density=density, space="peft-factors", **mine_extra)  # type: ignore[arg-type]
    compared = 0
    for name, layer in model.base_model.model.named_modules():
        if hasattr(layer, "lora_A") and "mix" in layer.lora_A:
            module = mine.modules[name]
            assert module.scale == 1.0 and layer.scaling["mix"] == 1.0
            for theirs, ours in (
                (layer.lora_A["mix"].weight, module.A),
                (layer.lora_B["mix"].weight, module.B),
            ):
                assert torch.allclose(ours.double(), theirs, rtol=1e-6, atol=1e-7 * float(theirs.abs().max()))
            compared += 1
    assert compared == len(mine.modules) == 6
    # the report measures how far PEFT's factors are from the weighted sum
    exact = ao.combine([a, b], w)
    for report in mine.report:
        want = exact.modules[report.name].delta(torch.float64)
        error = float((mine.modules[report.name].delta(torch.float64) - want).norm() / want.norm())
        assert abs(report.rel_error - error) < 1e-6 and report.rel_error > 0.01


def test_peft_factors_dare_is_seeded_and_unbiased() -> None:
    gen = torch.Generator().manual_seed(0)
    As = [torch.randn(3, 40, generator=gen, dtype=torch.float64) for _ in range(2)]
    Bs = [torch.randn(30, 3, generator=gen, dtype=torch.float64) for _ in range(2)]
    coeffs = [0.49, -0.25]  # sqrt: 0.7 and 0.5, the sign on A

    def draw(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        return native.peft_factors(Method.DARE_LINEAR, "m", Bs, As, coeffs, Sparsity(0.3, seed=seed))

    B, A = draw(1)
    assert torch.equal(A, draw(1)[1]) and not torch.equal(A, draw(2)[1])
    assert torch.equal(B, draw(1)[0]) and not torch.equal(B, draw(2)[0])
    mean_A = torch.stack([draw(s)[1] for s in range(300)]).mean(0)
    mean_B = torch.stack([draw(s)[0] for s in range(300)]).mean(0)
    want_A, want_B = 0.7 * As[0] - 0.5 * As[1], 0.7 * Bs[0] + 0.5 * Bs[1]
    assert float((mean_A - want_A).norm() / want_A.norm()) < 0.15
    assert float((mean_B - want_B).norm() / want_B.norm()) < 0.15


def test_peft_factors_refusals(zoo: Zoo) -> None:
    with pytest.raises(
        ao.IncompatibleAdaptersError, match=r"space peft-factors .* needs equal ranks, got \[4, 8\]"
    ):
        ao.combine([zoo["llama_a"], zoo["llama_b"]], method="ties", density=0.5, space="peft-factors")
    expert = replace(random_modules(1, (2,))[0], target=ParameterTarget("mlp.experts", "down_proj", 0, 2))
    with pytest.raises(ao.UnsupportedAdapterError, match="target_parameters.*use space dense, core or knots"):
        combine_module([(1.0, expert)], Method.TIES, RankPolicy(), Sparsity(0.5, space=Space.PEFT_FACTORS))


# ------------------------------------------------------------------------------ cost


@pytest.mark.slow
def test_a_huge_module_costs_no_dense_update() -> None:
    """out = in = 20000 at rank 4: one dense update would take 3.2 GB, the process is allowed 1.5 GB."""
    script = textwrap.dedent("""
        import resource, time, torch
        resource.setrlimit(resource.RLIMIT_DATA, (1_500_000_000, 1_500_000_000))
        from adapterops.adapter import LoraModule
        from adapterops.ops.combine import combine_module
        from adapterops.ops.lowrank import RankPolicy
        from adapterops.ops.sparsify import Sparsity
        from adapterops.options import Method, Space
        gen = torch.Generator().manual_seed(0)
        n = 20000
        terms = [(w, LoraModule("m", torch.randn(4, n, generator=gen), torch.randn(n, 4, generator=gen), 2.0))
                 for w in (0.5, -1.0)]
        cases = [(Method.TIES, Space.CORE), (Method.DARE_TIES, Space.KNOTS), (Method.TIES, Space.PEFT_FACTORS),
                 (Method.TSV, Space.DENSE), (Method.ISO_C, Space.DENSE), (Method.ISO_CTS, Space.DENSE)]
        for method, space in cases:
            start = time.perf_counter()
            module, _ = combine_module(terms, method, RankPolicy(), Sparsity(0.5, space=space))
            print(method.value, space.value, module.rank, round(time.perf_counter() - start, 3))
        try:
            torch.empty(n, n, dtype=torch.float64)
            print("a dense update fits")
        except RuntimeError:
            print("a dense update does not fit")
    """)
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT, check=False
    )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[-1] == "a dense update does not fit"
    assert len(lines) == 7 and all(float(line.split()[-1]) < 5.0 for line in lines[:-1])


# ------------------------------------------------------------------------------ CLI, records, refusals


def test_cli_round_trip_with_json(same_rank: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = same_rank
    runs = {
        "core": ["--method", "ties", "--density", "0.3", "--space", "core"],
        "iso": ["--method", "iso_cts", "--common-fraction", "0.5", "--rank", "4"],
    }
    for label, options in runs.items():
        args = ["combine", str(a), str(b), "-w", "1", "0.5", *options, "-o", str(tmp_path / label), "--json"]
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, result.output
        payload = json.loads(result.stdout)
        assert payload["modules"] == len(payload["per_module"]) == 6
        written = ao.load_adapter(tmp_path / label)
        assert written.provenance is not None
        if label == "core":
            assert all(m["rel_error"] < 1e-12 and m["rank_out"] <= 8 for m in payload["per_module"])
            assert written.provenance["space"] == "core" and written.provenance["density"] == 0.3
        else:
            assert all(m["rank_out"] == 4 and 0 < m["energy_kept"] < 1 for m in payload["per_module"])
            assert written.provenance["common_fraction"] == 0.5 and written.provenance["rank"] == 4
        want = ao.combine([a, b], [1.0, 0.5], **_python_options(options))  # type: ignore[arg-type]
        for name, module in want.modules.items():
            assert torch.equal(written.modules[name].A, module.A), name


def _python_options(cli_options: list[str]) -> dict[str, object]:
    pairs = dict(zip(cli_options[::2], cli_options[1::2], strict=True))
    kinds = {"--density": float, "--common-fraction": float, "--rank": int}
    return {k[2:].replace("-", "_"): kinds.get(k, str)(v) for k, v in pairs.items()}


def test_cli_errors_name_the_options(same_rank: tuple[Path, Path], tmp_path: Path) -> None:
    a, _ = same_rank
    result = CliRunner().invoke(cli, ["combine", str(a), "--space", "core", "-o", str(tmp_path / "x")])
    assert result.exit_code != 0
    assert (
        "--space applies to method ties, dare_linear, dare_ties, magnitude_prune, not exact" in result.output
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"space": "core"},
            "space applies to method ties, dare_linear, dare_ties, magnitude_prune, not exact",
        ),
        (
            {"method": "tsv", "density": 0.5},
            "density applies to method ties, dare_linear, dare_ties, magnitude_prune, not tsv",
        ),
        (
            {"method": "iso_c", "majority_sign": "total"},
            "majority_sign applies to method ties, dare_ties, not iso_c",
        ),
        ({"method": "iso_c", "common_fraction": 0.5}, "common_fraction applies to method iso_cts, not iso_c"),
        ({"method": "iso_cts", "common_fraction": 1.5}, "common_fraction must be in [0, 1], got 1.5"),
        (
            {"method": "ties", "density": 0.5, "space": "diagonal"},
            "unknown space 'diagonal'; choose one of dense, core, knots, peft-factors",
        ),
        (
            {"method": "linear", "rank": 2},
            "to methods svd, ties, dare_linear, dare_ties, magnitude_prune, tsv, iso_c, iso_cts, not linear",
        ),
        ({"method": "iso_c", "budget_params": 1000}, "method iso_c gives every kept direction the same"),
        ({"method": "iso_cts", "budget_error": 0.1}, "method iso_cts gives every kept direction the same"),
        (
            {"method": "ties", "density": 0.5, "space": "peft-factors", "budget_params": "1K"},
            "space peft-factors reproduces PEFT's factors, which a budget would change",
        ),
    ],
)
def test_bad_options_are_refused(zoo: Zoo, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ao.InvalidInputError) as raised:
        ao.combine([zoo["llama_a"]], **kwargs)  # type: ignore[arg-type]
    assert message in str(raised.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"method": "tsv"},
        {"method": "iso_c"},
        {"method": "iso_cts"},
        {"method": "ties", "density": 0.5, "space": "core"},
        {"method": "dare_linear", "density": 0.5, "space": "peft-factors"},
    ],
)
def test_dora_and_bias_inputs_are_refused(zoo: Zoo, kwargs: dict[str, object]) -> None:
    with pytest.raises(ao.UnsupportedAdapterError, match="LoRA updates s\\*B@A.*to-lora"):
        ao.combine([zoo["llama_dora"], zoo["llama_mts"]], **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ao.InvalidInputError, match="lora_B bias"):
        ao.combine([zoo["gpt2_bias"]], **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts"])
def test_a_rank_above_the_result_is_capped_with_a_note(zoo: Zoo, method: str) -> None:
    with pytest.warns(ao.RankCapWarning, match="capped at"):
        out = ao.combine([zoo["llama_a"], zoo["llama_b"]], method=method, rank=40)
    for report in out.report:
        assert report.rank_out < 40
        assert report.note is not None and report.note.startswith("capped at full rank")
