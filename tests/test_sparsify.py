"""TIES, DARE and magnitude pruning: worked examples, invariants, a float64 reference written from
the papers' formulas, and parity with PEFT's ``add_weighted_adapter(..., "*_svd")``."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import adapterops as ao
from adapterops.cli import cli
from adapterops.ops.sparsify import (
    Sparsity,
    block_seed,
    disjoint_mean,
    drop,
    elect,
    sparsified_sum,
    trim,
)
from adapterops.options import MajoritySign, Method
from adapterops.recipe import run_recipe
from tests.conftest import Zoo
from tests.support import sparsified as reference
from tests.support.factories import make_adapter, peft_deltas, tiny_gpt2, tiny_llama

# ------------------------------------------------------------------------------ worked by hand


def test_trim_keeps_the_largest_magnitudes() -> None:
    x = torch.tensor([[3.0, -1.0], [0.5, -4.0]], dtype=torch.float64)
    # int(0.5 * 4) = 2 entries kept: |-4| and |3|
    assert torch.equal(trim(x, 0.5), torch.tensor([[3.0, 0.0], [0.0, -4.0]], dtype=torch.float64))
    # int(0.6 * 4) = 2 as well; int(0.2 * 4) = 0: nothing kept
    assert torch.equal(trim(x, 0.6), trim(x, 0.5))
    assert torch.equal(trim(x, 0.2), torch.zeros_like(x))
    assert torch.equal(trim(x, 1.0), x)


def test_trim_keeps_ties_at_the_threshold_in_flat_order() -> None:
    """docs/math.md's example: k = int(0.34 * 6) = 2 of three entries of magnitude 2; the first two in
    row-major order are kept (-2 and 2 of row 0), row 1's 2 is not. k = 3 keeps all three."""
    x = torch.tensor([[1.0, -2.0, 2.0], [2.0, 0.0, -1.0]], dtype=torch.float64)
    assert trim(x, 0.34).tolist() == [[0.0, -2.0, 2.0], [0.0, 0.0, 0.0]]
    assert trim(x, 0.5).tolist() == [[0.0, -2.0, 2.0], [2.0, 0.0, 0.0]]
    # k = 4: the three 2s, then the first of the two 1s
    assert trim(x, 0.67).tolist() == [[1.0, -2.0, 2.0], [2.0, 0.0, 0.0]]


def test_elect_by_total_and_by_frequency() -> None:
    # three inputs, two entries: entry 0 = (3, -1, -1), entry 1 = (1, -1, 0)
    t = torch.tensor([[3.0, 1.0], [-1.0, -1.0], [-1.0, 0.0]], dtype=torch.float64)
    # total: sums 1 and 0 -> + and + (a zero sum elects +)
    assert elect(t, MajoritySign.TOTAL).tolist() == [1.0, 1.0]
    # frequency: sign sums -1 and 0 -> - and +
    assert elect(t, MajoritySign.FREQUENCY).tolist() == [-1.0, 1.0]


def test_disjoint_mean_averages_the_agreeing_weighted_values() -> None:
    t = torch.tensor([[3.0, 1.0], [-1.0, -1.0], [2.0, 0.0]], dtype=torch.float64)
    sign = torch.tensor([1.0, -1.0], dtype=torch.float64)
    # entry 0: 1*3 and 0.5*2 agree with +: (3 + 1) / 2 = 2; entry 1: only 1*(-1) agrees: -1
    assert disjoint_mean(t, [1.0, 1.0, 0.5], sign).tolist() == [2.0, -1.0]
    # no agreeing value: 0, not a division by zero
    assert disjoint_mean(t[2:], [1.0], -sign).tolist() == [0.0, 0.0]


def test_ties_and_magnitude_prune_worked_by_hand() -> None:
    d1 = torch.tensor([[4.0, -1.0], [2.0, 0.5]], dtype=torch.float64)
    d2 = torch.tensor([[-3.0, 2.0], [1.0, -6.0]], dtype=torch.float64)
    w = [0.5, 1.0]
    # density 0.5 keeps 2 of 4: t1 = [[4, 0], [2, 0]], t2 = [[-3, 0], [0, -6]]
    # signs by total: 4-3 = 1 -> +; 0 -> +; 2 -> +; -6 -> -
    # disjoint mean: [[0.5*4 / 1, 0], [0.5*2 / 1, 1*(-6) / 1]]
    ties = sparsified_sum(Method.TIES, "m", [d1, d2], w, Sparsity(0.5))
    assert ties.tolist() == [[2.0, 0.0], [1.0, -6.0]]
    # frequency: entry (0, 0) has one + and one -: sum 0 -> +, same result here
    freq = sparsified_sum(Method.TIES, "m", [d1, d2], w, Sparsity(0.5, MajoritySign.FREQUENCY))
    assert freq.tolist() == [[2.0, 0.0], [1.0, -6.0]]
    # magnitude_prune: 0.5 t1 + t2
    pruned = sparsified_sum(Method.MAGNITUDE_PRUNE, "m", [d1, d2], w, Sparsity(0.5))
    assert pruned.tolist() == [[-1.0, 0.0], [1.0, -6.0]]


# ------------------------------------------------------------------------------------ invariants


def test_dare_drop_is_unbiased_keeps_density_and_is_seeded_per_block() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 64, generator=gen, dtype=torch.float64)

    def draws(seed: int) -> torch.Tensor:
        return torch.rand(x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    dropped = drop(x, 0.3, draws(1))
    kept = dropped != 0
    assert abs(float(kept.double().mean()) - 0.3) < 0.03
    assert torch.allclose(dropped[kept], x[kept] / 0.3, rtol=0, atol=0)
    # E[drop(x)] = x: the mean of many drops converges at ~ sqrt((1 - p) / (p n))
    mean = torch.stack([drop(x, 0.3, draws(s)) for s in range(400)]).mean(0)
    assert float((mean - x).norm() / x.norm()) < 0.1
    assert torch.equal(drop(x, 1.0, draws(0)), x)
    # the generator seed depends on the seed, the name, the input and the block, nothing else
    assert block_seed(0, "q", 0, 0) == block_seed(0, "q", 0, 0)
    seeds = {
        block_seed(*key)
        for key in [(0, "q", 0, 0), (1, "q", 0, 0), (0, "k", 0, 0), (0, "q", 1, 0), (0, "q", 0, 1)]
    }
    assert len(seeds) == 5 and all(0 <= s < 2**63 for s in seeds)


@pytest.fixture(scope="module")
def unit_scale(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two llama adapters with scale 1 (lora_alpha = r), where PEFT's svd path is right."""
    root = tmp_path_factory.mktemp("unit")
    kwargs = dict(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"])
    return (
        make_adapter(tiny_llama, root / "a", seed=21, **kwargs),
        make_adapter(tiny_llama, root / "b", seed=22, **kwargs),
    )


@pytest.mark.parametrize("method", ["magnitude_prune", "dare_linear"])
def test_density_one_is_the_weighted_sum(zoo: Zoo, method: str, tmp_path: Path) -> None:
    a, b = zoo["llama_a"], zoo["llama_b"]
    got = ao.combine([a, b], [0.7, -0.4], method=method, density=1.0)
    exact = ao.combine([a, b], [0.7, -0.4])
    for name, module in got.modules.items():
        want = exact.modules[name].delta(torch.float64)
        assert float((module.delta(torch.float64) - want).norm()) <= 1e-6 * float(want.norm()), name
    # the default rank (sum of input ranks) holds the sum exactly: the reported error says so
    assert max(r.rel_error for r in got.report) < 1e-6


# ---------------------------------------------------------- float64 reference from the papers


@pytest.mark.parametrize(
    ("pair", "methods", "how", "tol"),
    [
        (("llama_a", "llama_b"), ("ties", "magnitude_prune", "dare_ties"), "total", 1e-6),
        (("gpt2_a", "gpt2_b"), ("ties", "magnitude_prune", "dare_ties", "dare_linear"), "frequency", 1e-6),
        (("conv_a", "conv_b"), ("ties", "magnitude_prune", "dare_ties", "dare_linear"), "total", 1e-6),
        (("llama_emb", "llama_emb_b"), ("ties", "magnitude_prune"), "frequency", 1e-6),
        (("llama_bf16", "llama_bf16_b"), ("ties", "magnitude_prune", "dare_ties"), "total", 1e-2),
        (
            ("llama_fp16", "llama_fp16_b"),
            ("ties", "magnitude_prune", "dare_ties", "dare_linear"),
            "total",
            2e-3,
        ),
    ],
)
def test_every_method_matches_a_float64_reference(
    zoo: Zoo, pair: tuple[str, str], methods: tuple[str, ...], how: str, tol: float, tmp_path: Path
) -> None:
    """Linear, GPT-2 Conv1D (fan_in_fan_out), Conv2d, embeddings, bfloat16 and float16 inputs (computed in
    float64, stored in the inputs' dtype), each result loaded by PEFT: PEFT's own deltas of the inputs, the
    papers' formulas (tests/support/sparsified.py, in math layout; DARE's masks from docs/math.md)."""
    factory = zoo.factory(pair[0])
    refs = [peft_deltas(factory, zoo[p]) for p in pair]
    stored = next(iter(ao.load_adapter(zoo[pair[0]]).modules.values())).A.dtype
    w = [0.6, 1.3]
    for method in methods:
        extra = {"majority_sign": how} if method in ("ties", "dare_ties") else {}
        seed = {"seed": 5} if method.startswith("dare") else {}
        out = ao.combine([zoo[p] for p in pair], w, method=method, density=0.3, energy=1.0, **extra, **seed)
        ao.save_adapter(out, tmp_path / method)
        got = peft_deltas(factory, tmp_path / method)
        for name, delta in got.items():
            present = [(wi, r[name]) for wi, r in zip(w, refs, strict=True) if name in r]
            flip = factory is tiny_gpt2 or name.endswith("embed_tokens")  # stored (in, out)
            ds = [reference.math_layout(d, flip) for _, d in present]
            want = reference.merge(method, name, ds, [p[0] for p in present], 0.3, majority_sign=how, seed=5)
            mine = reference.math_layout(delta, flip)
            err = np.abs(mine - want).max()
            assert err <= tol * np.abs(want).max(), (method, name, err)
        assert all(m.A.dtype == m.B.dtype == stored for m in out.modules.values())


# ------------------------------------------------------------------------------------ PEFT parity


@pytest.mark.parametrize(
    ("ours", "theirs", "how"),
    [
        ("ties", "ties_svd", "total"),
        ("ties", "ties_svd", "frequency"),
        ("magnitude_prune", "magnitude_prune_svd", None),
    ],
)
@pytest.mark.parametrize("inputs", ["unit-scale", "zoo"])
def test_parity_with_peft_svd_variants(
    zoo: Zoo,
    unit_scale: tuple[Path, Path],
    inputs: str,
    ours: str,
    theirs: str,
    how: str | None,
    tmp_path: Path,
) -> None:
    """PEFT's rank 8 is ours; our outputs load in PEFT. ``zoo``: scales 2, 4, 0.75 and rsLoRA, ranks
    4, 2 and 8, modules only one input has (PEFT 0.21.2's svd path applies each scale once, as we do).
    Factors are stored in float32: the tolerance is its rounding.

    DARE is left out: PEFT draws its masks from the global RNG with ``torch.bernoulli`` in its own
    storage layout, which no seeded, order-independent drop can reproduce; it is checked above
    statistically (unbiased, density kept) instead.
    """
    from peft import PeftModel

    a, b = unit_scale if inputs == "unit-scale" else (zoo["llama_a"], zoo["llama_b"])
    weights = [0.7, 0.5]
    model = PeftModel.from_pretrained(tiny_llama().double(), a, adapter_name="a")
    model.load_adapter(b, adapter_name="b")
    kwargs = {"majority_sign_method": how} if how else {}
    model.add_weighted_adapter(
        ["a", "b"], weights, "mix", combination_type=theirs, svd_rank=8, density=0.3, **kwargs
    )
    extra = {"majority_sign": how} if how else {}
    mine = ao.combine([a, b], weights, method=ours, density=0.3, rank=8, **extra)
    ao.save_adapter(mine, tmp_path / "mix")
    got = peft_deltas(tiny_llama, tmp_path / "mix")  # loads with PeftModel.from_pretrained
    compared = 0
    for module_name, module in model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "mix" in module.lora_A:
            want = module.get_delta_weight("mix")
            assert float((got[module_name] - want).abs().max()) <= 1e-6 * float(want.abs().max()), module_name
            compared += 1
    assert compared == len(got) == len(mine.modules) >= 6
    assert all(0 < r.rel_error < 1 and r.rank_out == 8 for r in mine.report)


# -------------------------------------------------------------------------------------- DARE API


def test_dare_is_reproducible_and_independent_of_other_modules(zoo: Zoo) -> None:
    a, b = ao.load_adapter(zoo["llama_a"]), ao.load_adapter(zoo["llama_a"])
    b = replace(b, modules={n: m for n, m in b.modules.items()})
    one = ao.combine([a, b], [1.0, 1.0], method="dare_ties", density=0.4, seed=3)
    two = ao.combine([a, b], [1.0, 1.0], method="dare_ties", density=0.4, seed=3)
    other = ao.combine([a, b], [1.0, 1.0], method="dare_ties", density=0.4, seed=4)
    name = sorted(a.modules)[-1]
    alone = replace(a, modules={name: a.modules[name]})
    single = ao.combine([alone, alone], [1.0, 1.0], method="dare_ties", density=0.4, seed=3)
    for n in a.modules:
        assert torch.equal(one.modules[n].A, two.modules[n].A) and torch.equal(
            one.modules[n].B, two.modules[n].B
        )
        assert not torch.equal(one.modules[n].delta(), other.modules[n].delta())
    assert torch.equal(single.modules[name].delta(), one.modules[name].delta())
    assert one.provenance["seed"] == 3 and one.provenance["density"] == 0.4
    assert one.provenance["majority_sign"] == "total"


# -------------------------------------------------------------------------------- refusals, CLI


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "ties"}, "method ties needs density=D"),
        ({"method": "ties", "density": 0}, "density must be in (0, 1], got 0"),
        (
            {"method": "ties", "density": 0.5, "seed": 1},
            "seed applies to method dare_linear, dare_ties, not ties",
        ),
        (
            {"method": "magnitude_prune", "density": 0.5, "majority_sign": "frequency"},
            "majority_sign applies",
        ),
        ({"method": "svd", "rank": 2, "density": 0.5}, "density applies to method ties"),
    ],
)
def test_bad_options_are_refused(zoo: Zoo, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ao.InvalidInputError, match=message.replace("(", r"\(").replace("]", r"\]")):
        ao.combine([zoo["llama_a"]], **kwargs)  # type: ignore[arg-type]


def test_dora_and_bias_inputs_are_refused(zoo: Zoo) -> None:
    with pytest.raises(ao.UnsupportedAdapterError, match="sparsifies LoRA updates.*to-lora"):
        ao.combine([zoo["llama_dora"], zoo["llama_mts"]], method="ties", density=0.5)
    with pytest.raises(ao.InvalidInputError, match="lora_B bias"):
        ao.combine([zoo["gpt2_bias"]], method="dare_linear", density=0.5)


def test_cli_json_reports_per_module_errors(unit_scale: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = unit_scale
    args = [
        "combine",
        a,
        b,
        "--weights",
        "1",
        "1",
        "--method",
        "ties",
        "--density",
        "0.2",
        "-o",
        tmp_path / "mix",
    ]
    result = CliRunner().invoke(cli, [str(x) for x in [*args, "--json"]])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["modules"] == len(payload["per_module"]) == 6
    assert all(0 < m["rel_error"] < 1 and m["rank_out"] == 8 for m in payload["per_module"])
    assert ao.load_adapter(tmp_path / "mix").provenance["method"] == "ties"
    # the card says how the result was made: the parameters that change it, not only the method
    card = (tmp_path / "mix" / "README.md").read_text()
    for line in ("- method: `ties`", "- density: `0.2`", "- majority_sign: `total`", "- space: `dense`"):
        assert line in card, card


def test_recipe_keys(unit_scale: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = unit_scale
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
version: 1
inputs:
  a: {a}
  b: {b}
steps:
  - name: mix
    combine:
      inputs: [a, b]
      weights: [1.0, 0.5]
      method: dare_ties
      density: 0.5
      majority_sign: frequency
      seed: 7
      rank: 3
    output: mix
""")
    run_recipe(recipe)
    got = ao.load_adapter(tmp_path / "mix")
    want = ao.combine(
        [a, b], [1.0, 0.5], method="dare_ties", density=0.5, majority_sign="frequency", seed=7, rank=3
    )
    assert got.provenance["seed"] == 7 and got.provenance["majority_sign"] == "frequency"
    for name, module in want.modules.items():
        assert torch.equal(got.modules[name].A, module.A) and module.rank == 3


def test_a_rank_above_a_modules_full_rank_is_capped_there_with_a_note(zoo: Zoo) -> None:
    with pytest.warns(
        ao.RankCapWarning, match=r"2 modules capped at their full rank \(rank=20 asked for more\)"
    ):
        out = ao.combine([zoo["llama_a"]], method="ties", density=0.5, rank=20)
    for r in out.report:
        dense = out.modules[r.name].delta(torch.float64)
        assert r.rank_out == int(torch.linalg.matrix_rank(dense)) == out.modules[r.name].rank
        if "v_proj" in r.name:  # 16x32: at most rank 16, and a trimmed row can lower it
            assert r.rank_out <= 16 and r.note == f"capped at full rank {r.rank_out}: " + (
                "asked rank 20, a 16x32 update has rank at most 16"
                if r.rank_out == 16
                else f"asked rank 20, the result has rank {r.rank_out}"
            )
        else:
            assert r.rank_out == 20 and r.note is None
