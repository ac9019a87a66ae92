"""Rank choice: a global budget over all modules, --max-rank, and caps instead of errors or padding.

The references are brute force (every rank tuple of 3-4 small modules), dense float64 SVDs of each
module's update, and PEFT loading and merging the written adapters.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import adapterops as ao
from adapterops.adapter import Adapter, LoraModule
from adapterops.ops import budget
from adapterops.ops.budget import Item, allocate_error, allocate_params
from adapterops.options import parse_count
from tests.conftest import Zoo
from tests.support.factories import (
    make_adapter,
    peft_deltas,
    peft_merged_state_dict,
    save_base_checkpoint,
    tiny_llama,
)
from tests.test_cli import run

# (out, in, rank): different shapes and ranks, so the costs per rank (out + in) differ
SHAPES = {
    "model.layers.0.self_attn.q_proj": (12, 10, 5),
    "model.layers.0.mlp.down_proj": (6, 40, 4),
    "model.layers.1.self_attn.q_proj": (20, 8, 5),
    "model.layers.1.mlp.up_proj": (9, 9, 3),
}


def adapter_of(
    shapes: dict[str, tuple[int, int, int]], seed: int, *, same_A: Adapter | None = None
) -> Adapter:
    """Random float64 modules whose singular values spread over a decade (so ranks matter)."""
    gen = torch.Generator().manual_seed(seed)
    modules = {}
    for name, (out, inp, r) in shapes.items():
        decay = torch.logspace(0, -1, r, dtype=torch.float64)
        B = torch.randn(out, r, generator=gen, dtype=torch.float64) * decay
        A = same_A.modules[name].A if same_A else torch.randn(r, inp, generator=gen, dtype=torch.float64)
        modules[name] = LoraModule(name, A, B, 0.5 + seed % 3)
    return Adapter(modules)


def dense(adapter: Adapter) -> dict[str, torch.Tensor]:
    return {name: m.delta(torch.float64) for name, m in adapter.modules.items()}


def squared_errors(got: Adapter, want: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(sum ||dW - dW_got||^2, sum ||dW||^2) over the modules, dense float64."""
    error = sum(float((got.modules[n].delta(torch.float64) - w).pow(2).sum()) for n, w in want.items())
    return error, sum(float(w.pow(2).sum()) for w in want.values())


def stored_params(adapter: Adapter) -> int:
    return sum(m.A.numel() + m.B.numel() for m in adapter.modules.values())


def brute_force(want: dict[str, torch.Tensor]) -> list[tuple[int, float]]:
    """(params, squared error) of every rank tuple, each module from 1 to its rank."""
    spectra = [torch.linalg.svdvals(w).pow(2) for w in want.values()]
    ranks = [int(torch.linalg.matrix_rank(w)) for w in want.values()]
    costs = [sum(w.shape) for w in want.values()]
    return [
        (
            sum(k * c for k, c in zip(ks, costs, strict=True)),
            sum(float(s[k:].sum()) for k, s in zip(ks, spectra, strict=True)),
        )
        for ks in itertools.product(*(range(1, r + 1) for r in ranks))
    ]


BUDGETS = [114, 130, 150, 177, 200, 230, 251, 300, 333, 400, 450, 487, 488, 10**6]


@pytest.mark.parametrize("greedy_only", [False, True])
def test_budget_params_is_the_least_total_error_brute_force(greedy_only: bool, monkeypatch) -> None:
    """Every budget: the allocation's error (dense float64) is the brute-force optimum, or, where only
    the greedy runs, it says it is not proven optimal and its bound is below the optimum."""
    if greedy_only:
        monkeypatch.setattr(budget, "MAX_WORK", 0)
    adapter = adapter_of(SHAPES, 1)
    want = dense(adapter)
    options = brute_force(want)
    unproven = 0
    for limit in BUDGETS:
        out = ao.resize(adapter, budget_params=limit)
        error, total = squared_errors(out, want)
        best = min(e for p, e in options if p <= limit)
        totals = out.provenance["budget"]
        assert stored_params(out) == totals["params"] <= limit
        assert totals["rel_error"] == pytest.approx((error / total) ** 0.5, rel=1e-9, abs=1e-12)
        if totals["optimal"]:
            assert error == pytest.approx(best, rel=1e-9, abs=1e-12), limit
            assert totals["rel_error_bound"] == totals["rel_error"]
        else:
            unproven += 1
            assert greedy_only and totals["solver"] == "greedy"
            assert error >= best * (1 - 1e-9) and totals["rel_error_bound"] ** 2 * total <= best * (1 + 1e-9)
    assert unproven > 0 if greedy_only else unproven == 0  # both paths are exercised


@pytest.mark.parametrize("greedy_only", [False, True])
def test_budget_error_is_the_fewest_params_brute_force(greedy_only: bool, monkeypatch) -> None:
    if greedy_only:
        monkeypatch.setattr(budget, "MAX_WORK", 0)
    adapter = adapter_of(SHAPES, 2)
    want = dense(adapter)
    options = brute_force(want)
    total = sum(float(w.pow(2).sum()) for w in want.values())
    for target in (0.9, 0.5, 0.3, 0.2, 0.1, 0.05, 0.01, 1e-6):
        out = ao.resize(adapter, budget_error=target)
        error, _ = squared_errors(out, want)
        fewest = min(p for p, e in options if e <= target**2 * total)
        totals = out.provenance["budget"]
        assert (error / total) ** 0.5 <= target * (1 + 1e-9)
        assert stored_params(out) == totals["params"]
        if totals["optimal"]:
            assert totals["params"] == fewest == totals["params_bound"], target
        else:
            assert greedy_only and totals["params_bound"] <= fewest <= totals["params"]


def test_the_allocators_match_brute_force_on_random_non_concave_errors() -> None:
    """Errors measured on randomized factors need not be convex in k: the DP does not care, and the
    greedy's LP bound (over each item's convex hull) still bounds the optimum."""
    rng = random.Random(0)
    for case in range(40):
        items = []
        for _ in range(rng.randint(2, 4)):
            top = rng.randint(1, 4)
            steps = sorted((rng.random() for _ in range(top)), reverse=case % 2 == 0)  # odd: not convex
            tails = [sum(steps)]
            for s in steps:
                tails.append(tails[-1] - s)
            items.append(Item((("m", tuple(tails)),), rng.randint(1, 6)))
        errors = [it.errors() for it in items]
        choices = [
            (
                sum(k * it.cost for k, it in zip(ks, items, strict=True)),
                sum(e[k] for k, e in zip(ks, errors, strict=True)),
            )
            for ks in itertools.product(*(range(1, it.top + 1) for it in items))
        ]
        least, most = min(p for p, _ in choices), max(p for p, _ in choices)
        total = sum(e[0] for e in errors)
        for limit in range(least, most + 1):
            best = min(e for p, e in choices if p <= limit)
            exact = allocate_params(items, limit)
            assert exact.optimal and exact.error == pytest.approx(best, abs=1e-12) and exact.params <= limit
            greedy = allocate_params(items, limit, max_work=0)
            assert greedy.params <= limit and greedy.error >= best - 1e-12
            assert greedy.bound <= best + 1e-12
            if greedy.optimal:
                assert greedy.error == pytest.approx(best, abs=1e-12)
        for target in (0.9, 0.6, 0.3, 0.1):
            allowed = target**2 * total
            fewest = min((p for p, e in choices if e <= allowed + 1e-12 * total), default=None)
            if fewest is None:
                with pytest.raises(ao.InvalidInputError, match="cannot be met"):
                    allocate_error(items, target)
                continue
            exact = allocate_error(items, target)
            assert exact.optimal and exact.params == fewest
            greedy = allocate_error(items, target, max_work=0)
            assert greedy.bound <= fewest <= greedy.params


def test_the_worked_example_of_the_docstring() -> None:
    items = [Item((("a", (10.0, 1.0, 0.0)),), 4), Item((("b", (8.0, 4.0, 0.0)),), 4)]
    found = allocate_params(items, 12)
    assert (found.ranks, found.params, found.error, found.total) == ((1, 2), 12, 1.0, 18.0)


def test_budget_on_combine_svd_sparsifying_and_dense_errors_are_exact() -> None:
    """The totals equal a dense float64 computation for the factor path and the dense path."""
    a, b = adapter_of(SHAPES, 3), adapter_of(SHAPES, 4)
    exact = {
        n: 0.7 * a.modules[n].delta(torch.float64) - 0.4 * b.modules[n].delta(torch.float64) for n in SHAPES
    }
    for kwargs in ({"method": "svd"}, {"method": "magnitude_prune", "density": 1.0}):
        out = ao.combine([a, b], [0.7, -0.4], budget_params=300, **kwargs)
        error, total = squared_errors(out, exact)
        totals = out.provenance["budget"]
        assert totals["params"] == stored_params(out) <= 300 and totals["optimal"]
        assert totals["rel_error"] == pytest.approx((error / total) ** 0.5, rel=1e-9)
        for r in out.report:
            want = exact[r.name]
            got = float((out.modules[r.name].delta(torch.float64) - want).norm() / want.norm())
            assert (
                r.rel_error == pytest.approx(got, rel=1e-9, abs=1e-12)
                and r.rank_out == out.modules[r.name].rank
            )
        assert out.provenance["budget_params"] == 300


def test_max_rank_caps_every_rule() -> None:
    adapter = adapter_of(SHAPES, 5)
    rules = [
        {"energy": 0.9999},
        {"sv_ratio": 100.0},
        {"budget_params": 10**6},
        {"budget_error": 0.3},
        {},  # alone: each module's exact rank, capped
    ]
    for rule in rules:
        out = ao.resize(adapter, max_rank=2, **rule)
        assert {m.rank for m in out.modules.values()} <= {1, 2}, rule
        assert out.provenance["max_rank"] == 2
    bound = ao.resize(adapter, energy=0.9999, max_rank=2)
    for r in bound.report:
        S = torch.linalg.svdvals(adapter.modules[r.name].delta(torch.float64)).pow(2)
        needs = int((torch.cumsum(S, 0) < 0.9999 * S.sum()).sum()) + 1
        assert r.note == f"max_rank 2 kept: energy 0.9999 needs rank {needs}" and needs > 2
    alone = ao.resize(adapter, max_rank=4)
    assert {n: m.rank for n, m in alone.modules.items()} == {n: min(r, 4) for n, (_, _, r) in SHAPES.items()}
    assert all(r.note is None for r in alone.report)
    # the sparsifying methods' default rank (the sum of the input ranks) is capped too
    pruned = ao.combine([adapter, adapter_of(SHAPES, 6)], method="ties", density=0.5, max_rank=3)
    assert {m.rank for m in pruned.modules.values()} == {3}
    with pytest.raises(ao.InvalidInputError, match=r"budget_error=0.01 cannot be met: .* raise max_rank"):
        ao.resize(adapter, budget_error=0.01, max_rank=1)


def test_a_rank_above_a_modules_full_rank_is_capped_with_a_note_everywhere(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    name = "model.layers.0.mlp.down_proj"
    small = Adapter(
        {name: LoraModule(name, torch.randn(8, 40, generator=g), torch.randn(6, 8, generator=g), 0.5)}
    )
    note = "capped at full rank 6: asked rank 16, a 6x40 update has rank at most 6"
    with pytest.warns(
        ao.RankCapWarning, match=r"^1 module capped at its full rank \(rank=16 asked for more\)"
    ):
        out = ao.resize(small, rank=16)
    assert out.modules[name].rank == 6 and out.report[0].note == note
    torch.testing.assert_close(
        out.modules[name].delta(torch.float64), small.modules[name].delta(torch.float64)
    )
    ao.save_adapter(small, tmp_path / "small")
    code, stdout, stderr = run("resize", tmp_path / "small", "--rank", "16", "-o", tmp_path / "r", "-v")
    assert code == 0
    assert f"{name}: rank 8 -> 6, energy kept 100.0000%, relative error " in stdout and f"({note})" in stdout
    assert stderr.startswith("warning: 1 module capped at its full rank (--rank 16 asked for more): ")
    assert f"{name} (6)" in stderr and stderr.count("\n") == 1
    code, stdout, _ = run("resize", tmp_path / "small", "--rank", "16", "-o", tmp_path / "j", "--json")
    assert code == 0 and json.loads(stdout)["per_module"][0]["note"] == note


def test_no_output_is_padded_with_zero_directions() -> None:
    """a + b with equal A's has rank r: asked 2r, svd stores rank r (with a note); the dense path too."""
    a = adapter_of(SHAPES, 7)
    b = adapter_of(SHAPES, 8, same_A=a)
    with pytest.warns(ao.RankCapWarning, match="4 modules capped at their full rank"):
        out = ao.combine([a, b], method="svd", rank=10)
    pruned = ao.combine([a, b], method="magnitude_prune", density=1.0)  # default rank: 2r
    for result in (out, pruned):
        for r in result.report:
            module = result.modules[r.name]
            S = torch.linalg.svdvals(module.B.double() @ module.A.double())
            assert module.rank == SHAPES[r.name][2] == r.rank_out
            assert float(S[module.rank - 1]) > 1e-6 * float(S[0])  # every stored direction carries the update
    for r in out.report:
        assert r.note == f"capped at full rank {r.rank_out}: asked rank 10, the result has rank {r.rank_out}"
    assert all(r.note is None for r in pruned.report)  # a default is not a request: no note
    budgeted = ao.combine([a, b], method="svd", budget_params=10**6)
    assert {n: m.rank for n, m in budgeted.modules.items()} == {n: r for n, (_, _, r) in SHAPES.items()}


@pytest.mark.slow  # builds three zoo adapters when run alone
def test_budgets_count_the_real_parameters_of_every_layer_kind(zoo: Zoo, tmp_path: Path) -> None:
    """Conv (kernel in lora_A), embeddings, GPT-2 Conv1D: the reported params are the written ones."""
    for name in ("conv_a", "llama_emb", "gpt2_a"):
        source = ao.load_adapter(zoo[name])
        full = stored_params(source)
        out = ao.resize(source, budget_params=full * 2 // 3)
        ao.save_adapter(out, tmp_path / name)
        assert written_params(tmp_path / name) == out.provenance["budget"]["params"] <= full * 2 // 3, name


def written_params(path: Path) -> int:
    """The LoRA factors' elements in a written adapter, as PEFT stores them (experts joined, padded)."""
    with safe_open(path / "adapter_model.safetensors", "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if "lora_" in k)


def test_experts_of_one_parameter_share_one_rank(tmp_path: Path) -> None:
    from tests.support.moe import EXPERTS, tiny_mixtral

    path = make_adapter(
        tiny_mixtral, tmp_path / "moe", seed=2, r=4, lora_alpha=8, target_modules="all-linear"
    )
    source = ao.load_adapter(path)
    full = stored_params(source)
    out = ao.resize(source, budget_params=full // 2)
    ranks: dict[str, set[int]] = {}
    for module in out.modules.values():
        if module.target is not None and module.target.expert is not None:
            ranks.setdefault(module.target.tensor, set()).add(module.rank)
    assert len(ranks) > 1 and all(len(r) == 1 for r in ranks.values())
    ao.save_adapter(out, tmp_path / "out")
    assert written_params(tmp_path / "out") == out.provenance["budget"]["params"] <= full // 2
    # each expert parameter's rank costs E (out + in): its E experts are one item of the allocation
    cost = {
        t: EXPERTS * (m.out_features + m.in_features)
        for m in out.modules.values()
        if (t := m.target and m.target.tensor)
    }
    assert cost


def test_resize_with_a_budget_loads_in_peft_and_merges_to_the_truncated_reference(
    zoo: Zoo, tmp_path: Path
) -> None:
    source = zoo["llama_b"]
    out = ao.resize(source, budget_params="2.5K")
    ao.save_adapter(out, tmp_path / "small")
    ranks = {r.name: r.rank_out for r in out.report}
    assert len(set(ranks.values())) > 1  # the budget gives modules different ranks
    reference = {}
    for name, delta in peft_deltas(tiny_llama, source).items():
        U, S, Vh = torch.linalg.svd(delta)
        k = ranks[name]
        reference[name] = U[:, :k] @ torch.diag(S[:k]) @ Vh[:k]
    got = peft_deltas(tiny_llama, tmp_path / "small")
    assert set(got) == set(reference)
    for name, want in reference.items():
        assert float((got[name] - want).abs().max()) <= 1e-5 * float(want.abs().max()), name
    merged = peft_merged_state_dict(tiny_llama, tmp_path / "small")
    base = {k: v.double() for k, v in tiny_llama().state_dict().items()}
    for name, want in reference.items():
        key = f"{name}.weight"
        assert float((merged[key] - base[key] - want).abs().max()) <= 1e-5 * float(want.abs().max()), key
    assert out.provenance["budget"]["params"] <= 2500 and out.provenance["budget_params"] == 2500


def test_to_lora_with_a_budget_matches_the_dense_effective_updates(tmp_path: Path) -> None:
    base = save_base_checkpoint(tiny_llama, tmp_path / "base", dtype=torch.float32)
    dora = make_adapter(
        tiny_llama,
        tmp_path / "dora",
        seed=21,
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "down_proj"],
        use_dora=True,
    )
    effective = peft_deltas(tiny_llama, dora)
    for exact_limit in (1024, 4):  # the exact SVD, and the randomized solver's measured errors
        out = ao.to_lora(dora, base, budget_params=1000, max_rank=6, exact_limit=exact_limit)
        error, total = squared_errors(out, effective)
        totals = out.provenance["budget"]
        assert (
            totals["params"] == stored_params(out) <= 1000 and max(m.rank for m in out.modules.values()) <= 6
        )
        assert totals["rel_error"] == pytest.approx((error / total) ** 0.5, rel=1e-5)
        assert {r.solver.value for r in out.report} == {"dense" if exact_limit > 4 else "randomized"}
    # combine with a DoRA input, written as a LoRA: the same dense path under a budget
    mixed = ao.combine([dora], [0.5], method="svd", base=base, budget_params=1000)
    error, total = squared_errors(mixed, {n: 0.5 * d for n, d in effective.items()})
    assert mixed.provenance["budget"]["params"] == stored_params(mixed) <= 1000
    assert mixed.provenance["budget"]["rel_error"] == pytest.approx((error / total) ** 0.5, rel=1e-5)


def test_cli_budget_with_a_suffix_and_json(zoo: Zoo, tmp_path: Path) -> None:
    code, stdout, stderr = run(
        "resize", zoo["llama_b"], "--budget-params", "2.5K", "--max-rank", "6", "-o", tmp_path / "j", "--json"
    )
    assert (code, stderr) == (0, "")
    payload = json.loads(stdout)
    totals = payload["budget"]
    assert totals["budget_params"] == 2500 and totals["max_rank"] == 6 and totals["params"] <= 2500
    assert totals["params"] == written_params(tmp_path / "j")
    assert totals["optimal"] is True and 0 < totals["rel_error"] < 1
    record = ao.load_adapter(tmp_path / "j").provenance
    assert record["budget"] == totals and record["budget_params"] == 2500
    assert "--budget-params 2.5K" in record["command"]
    code, stdout, _ = run("resize", zoo["llama_b"], "--budget-error", "0.3", "-o", tmp_path / "t")
    assert code == 0 and "; budget relative error 0.3: " in stdout and "(optimal)" in stdout


def test_recipes_take_budgets_with_suffixes(zoo: Zoo, tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"inputs: {{a: {zoo['llama_b']}, b: {zoo['llama_a']}}}\n"
        "steps:\n"
        "  - name: small\n"
        "    resize: {input: a, budget_params: 2.5K, max_rank: 6}\n"
        "    output: small\n"
        "  - name: mix\n"
        "    combine: {inputs: [a, b], method: svd, budget_error: 0.2}\n"
    )
    results = ao.run_recipe(recipe)
    assert (
        "budget 2,500 parameters: " in results[0].summary
        and "budget relative error 0.2" in results[1].summary
    )
    record = ao.load_adapter(tmp_path / "small").provenance
    assert record["budget_params"] == 2500 and record["budget"]["params"] <= 2500
    recipe.write_text(
        f"inputs: {{a: {zoo['llama_b']}}}\nsteps:\n  - name: s\n    resize:\n      input: a\n      budget_params: 2.5Q\n"
    )
    with pytest.raises(
        ao.RecipeError, match=r"r\.yaml:6: step 's': budget_params: budget_params must be a whole number"
    ):
        ao.load_recipe(recipe)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"budget_params": 0}, "budget_params must be >= 1, got 0"),
        (
            {"budget_params": "20Q"},
            "budget_params must be a whole number, optionally with a suffix K, M or G",
        ),
        ({"budget_params": "1.0005K"}, "budget_params must be a whole number"),
        ({"budget_params": 1.5}, "budget_params must be a whole number, got 1.5"),
        ({"budget_error": 0.0}, "budget_error must be in (0, 1], got 0.0"),
        (
            {"budget_params": 100, "budget_error": 0.1},
            "give one of budget_params=N or budget_error=E, not both",
        ),
        (
            {"budget_params": 100, "rank": 4},
            "budget_params chooses every module's rank over the whole adapter: drop rank (only max_rank=K combines",
        ),
        (
            {"rank": 4, "max_rank": 8},
            "max_rank caps energy, sv_ratio, a budget or the exact rank; with rank=4",
        ),
        (
            {"budget_params": 10},
            "budget_params=10 is below the smallest output: 114 parameters, every module at rank 1",
        ),
    ],
)
def test_bad_budgets_are_one_clear_error(kwargs, message) -> None:
    with pytest.raises(ao.InvalidInputError) as info:
        ao.resize(adapter_of(SHAPES, 9), **kwargs)
    assert message in str(info.value)


def test_bad_budgets_on_the_command_line_and_other_methods(zoo: Zoo, tmp_path: Path) -> None:
    code, _, err = run("resize", zoo["llama_b"], "--budget-params", "0", "-o", tmp_path / "x")
    assert (code, err) == (2, "error: --budget-params must be >= 1, got 0\n")
    code, _, err = run("resize", zoo["llama_b"], "--budget-params", "1M", "--rank", "2", "-o", tmp_path / "x")
    assert (
        code == 2 and "--budget-params chooses every module's rank over the whole adapter: drop --rank" in err
    )
    with pytest.raises(
        ao.InvalidInputError, match="budget_params applies to methods svd, ties, .* not exact"
    ):
        ao.combine([zoo["llama_a"], zoo["llama_b"]], budget_params=1000)
    assert parse_count("1.5G", "budget_params") == 1_500_000_000 and parse_count("20M", "x") == 20_000_000
    assert (
        parse_count("500k", "x") == 500_000 and parse_count(7, "x") == 7 and parse_count("2e3", "x") == 2000
    )


def test_a_count_is_bounded_before_it_becomes_an_int() -> None:
    """A recipe is untrusted: "1e999999999" must be refused at once, not turned into a billion-digit int."""
    with pytest.raises(ao.InvalidInputError, match="budget_params must be at most 1e\\+18"):
        parse_count("1e999999999", "budget_params")
    with pytest.raises(ao.InvalidInputError, match="whole number"):
        parse_count("1.0005K", "budget_params")
    assert parse_count("1e18", "x") == 10**18
