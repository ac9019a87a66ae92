"""DoRA conversions and DoRA-aware arithmetic, judged by PEFT's merges and dense float64 SVDs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import adapterops as ao
from adapterops.cli import cli
from adapterops.verbs import combine, to_dora, to_lora
from tests.conftest import Zoo
from tests.support.factories import (
    peft_deltas,
    peft_merged_state_dict,
    save_base_checkpoint,
    tiny_conv,
    tiny_gpt2,
    tiny_llama,
)

FACTORIES = {"llama": tiny_llama, "gpt2": tiny_gpt2, "conv": tiny_conv}


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dora-bases")
    return {name: save_base_checkpoint(f, root / name, dtype=torch.float32) for name, f in FACTORIES.items()}


@pytest.fixture(scope="module")
def doras(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tests.support.factories import make_adapter

    root = tmp_path_factory.mktemp("doras")
    return {
        "llama": make_adapter(
            tiny_llama,
            root / "llama",
            seed=21,
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "down_proj"],
            use_dora=True,
        ),
        "gpt2": make_adapter(
            tiny_gpt2,
            root / "gpt2",
            seed=22,
            r=3,
            lora_alpha=6,
            target_modules=["c_attn", "c_fc"],
            fan_in_fan_out=True,
            use_dora=True,
        ),
        "conv": make_adapter(
            tiny_conv,
            root / "conv",
            seed=23,
            r=2,
            lora_alpha=4,
            target_modules=["conv1", "conv2"],
            use_dora=True,
        ),
    }


def effective(name: str, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """PEFT's own effective update per module: merge_and_unload in float64 minus the base."""
    merged = peft_merged_state_dict(FACTORIES[name], adapter_dir, dtype=torch.float64)
    base = FACTORIES[name]().double().state_dict()
    names = ao.load_adapter(adapter_dir).modules
    return {m: merged[f"{m}.weight"] - base[f"{m}.weight"] for m in names}


def as_matrix(delta: torch.Tensor, name: str, family: str) -> torch.Tensor:
    """(out, in) view of a stored-layout delta: GPT-2 Conv1D is stored transposed, conv flattened."""
    if family == "gpt2":
        return delta.T
    return delta.reshape(delta.shape[0], -1)


@pytest.mark.parametrize("family", ["llama", "gpt2", "conv"])
def test_to_dora_merges_to_the_same_weights_in_peft(zoo: Zoo, bases, tmp_path, family) -> None:
    lora = {"llama": "llama_a", "gpt2": "gpt2_a", "conv": "conv_a"}[family]
    dora = to_dora(ao.load_adapter(zoo[lora]), bases[family])
    ao.save_adapter(dora, tmp_path / "dora")
    config = json.loads((tmp_path / "dora" / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    want = peft_merged_state_dict(FACTORIES[family], zoo[lora], dtype=torch.float64)
    got = peft_merged_state_dict(FACTORIES[family], tmp_path / "dora", dtype=torch.float64)
    for key, value in want.items():
        # the magnitude is stored in float32: relative 6e-8 per row
        assert float((got[key] - value).abs().max()) <= 1e-6 * max(float(value.abs().max()), 1.0), key


@pytest.mark.parametrize("family", ["llama", "gpt2", "conv"])
@pytest.mark.parametrize("exact_limit", [1024, 1])  # dense SVD, and the randomized solver
def test_to_lora_is_the_optimal_rank_k_approximation(bases, doras, tmp_path, family, exact_limit) -> None:
    k = 2
    lora = to_lora(ao.load_adapter(doras[family]), bases[family], rank=k, exact_limit=exact_limit)
    assert not lora.is_dora
    ao.save_adapter(lora, tmp_path / "lora")
    got = peft_deltas(FACTORIES[family], tmp_path / "lora")
    reports = {r.name: r for r in lora.report}
    for name, delta in effective(family, doras[family]).items():
        matrix = as_matrix(delta, name, family)
        S = torch.linalg.svdvals(matrix)
        optimal = float(S[k:].pow(2).sum().sqrt() / S.pow(2).sum().sqrt())
        error = float(torch.linalg.matrix_norm(as_matrix(got[name], name, family) - matrix)) / float(
            S.pow(2).sum().sqrt()
        )
        assert error == pytest.approx(optimal, rel=1e-4, abs=1e-6), name
        assert reports[name].rel_error == pytest.approx(optimal, rel=1e-4, abs=1e-6), name
        assert reports[name].solver == ("dense" if exact_limit > 1 else "randomized")


def test_lora_to_dora_to_lora_at_full_rank_is_exact(zoo: Zoo, bases, tmp_path) -> None:
    lora = ao.load_adapter(zoo["llama_a"])
    back = to_lora(to_dora(lora, bases["llama"]), bases["llama"], rank=4)
    ao.save_adapter(back, tmp_path / "back")
    want = peft_deltas(tiny_llama, zoo["llama_a"])
    got = peft_deltas(tiny_llama, tmp_path / "back")
    for name, value in want.items():
        assert float((got[name] - value).abs().max()) <= 1e-5 * float(value.abs().max()), name
    assert max(r.rel_error for r in back.report) < 1e-5


def test_combine_dora_and_lora_with_base_reports_its_error_truthfully(
    zoo: Zoo, bases, doras, tmp_path
) -> None:
    dora, lora = ao.load_adapter(doras["llama"]), ao.load_adapter(zoo["llama_a"])
    mix = ao.combine([dora, lora], [0.6, 0.4], base=bases["llama"], method="svd", rank=3)
    ao.save_adapter(mix, tmp_path / "mix")
    got = peft_deltas(tiny_llama, tmp_path / "mix")
    eff, ref = effective("llama", doras["llama"]), peft_deltas(tiny_llama, zoo["llama_a"])
    reports = {r.name: r for r in mix.report}
    for name in set(eff) | set(ref):
        exact = 0.6 * eff.get(name, 0) + 0.4 * ref.get(name, 0)
        S = torch.linalg.svdvals(exact)
        error = float(torch.linalg.matrix_norm(got[name] - exact) / S.pow(2).sum().sqrt())
        assert reports[name].rel_error == pytest.approx(error, rel=1e-4, abs=1e-6), name
        assert error == pytest.approx(
            float(S[3:].pow(2).sum().sqrt() / S.pow(2).sum().sqrt()), rel=1e-4, abs=1e-6
        )
    # as a LoRA without a rank, DoRA modules keep the sum of the input ranks, and it says it approximates
    with pytest.warns(ao.ApproximationWarning, match="DoRA inputs written as a LoRA are an approximation"):
        as_lora = ao.negate(dora, base=bases["llama"], form="lora")
    assert {r.rank_out for r in as_lora.report} == {4}
    assert all(r.rel_error > 0 for r in as_lora.report)  # DoRA's update is not rank 4
    # by default the result is the exact DoRA
    exact = ao.negate(dora, base=bases["llama"])
    assert exact.is_dora and all(r.rel_error == 0 for r in exact.report)


def test_combine_with_a_base_checks_the_base(doras, bases) -> None:
    with pytest.raises(ao.IncompatibleAdaptersError, match="no tensor model.layers.0.mlp.down_proj.weight"):
        combine([ao.load_adapter(doras["llama"])], [1.0], base=bases["gpt2"])
    with pytest.raises(ao.UnsupportedAdapterError, match="pass the base checkpoint"):
        ao.negate(ao.load_adapter(doras["llama"]))


def test_wrong_magnitude_length_is_refused(doras, tmp_path) -> None:
    import shutil

    path = Path(shutil.copytree(doras["llama"], tmp_path / "bad"))
    tensors = load_file(path / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    tensors[key] = tensors[key][:-1].clone()
    save_file(tensors, path / "adapter_model.safetensors")
    with pytest.raises(
        ao.AdapterFormatError, match="lora_magnitude_vector has 31 entries, expected one per output row"
    ):
        ao.load_adapter(path)


def test_cli_to_dora_to_lora_info(bases, doras, zoo: Zoo, tmp_path) -> None:
    runner = CliRunner()
    result = runner.invoke(
        cli, ["to-dora", str(zoo["llama_a"]), "--base", str(bases["llama"]), "-o", str(tmp_path / "d")]
    )
    assert result.exit_code == 0, result.stderr
    assert ao.load_adapter(tmp_path / "d").is_dora
    result = runner.invoke(
        cli,
        [
            "to-lora",
            str(doras["llama"]),
            "--base",
            str(bases["llama"]),
            "--energy",
            "0.95",
            "-o",
            str(tmp_path / "l"),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.stderr
    payload = json.loads(result.stdout)
    assert all(m["energy_kept"] >= 0.95 for m in payload["per_module"])
    assert {m["solver"] for m in payload["per_module"]} == {"dense"}
    result = runner.invoke(cli, ["to-lora", str(doras["llama"]), "-o", str(tmp_path / "x"), "--rank", "2"])
    assert result.exit_code == 2 and "Missing option '--base'" in result.stderr
    result = runner.invoke(cli, ["info", str(doras["llama"]), "--base", str(bases["llama"]), "--json"])
    modules = json.loads(result.stdout)["modules"]
    assert all(0 < m["magnitude_over_base_min"] <= m["magnitude_over_base_max"] for m in modules)
    assert all(m["norm_delta_effective"] > 0 for m in modules)


def test_randomized_solver_widens_until_the_energy_target_is_met() -> None:
    from adapterops.ops.lowrank import RankPolicy, best_low_rank

    gen = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(400, 300, generator=gen, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(300, 300, generator=gen, dtype=torch.float64))[0]
    S = 0.97 ** torch.arange(300, dtype=torch.float64)  # slow decay: needs a wide sketch
    M = (U * S) @ V.T
    dense = best_low_rank(M, RankPolicy(energy=0.99))
    sketch = best_low_rank(M, RankPolicy(energy=0.99), exact_limit=10)
    assert dense.solver == "dense" and sketch.solver in ("randomized", "dense")
    assert sketch.energy_kept >= 0.99 - 1e-6
    assert abs(sketch.A.shape[0] - dense.A.shape[0]) <= 2
    measured = float(torch.linalg.matrix_norm(M - sketch.B @ sketch.A) / torch.linalg.matrix_norm(M))
    assert sketch.rel_error == pytest.approx(measured, rel=1e-6)


@pytest.mark.parametrize("family", ["llama", "gpt2", "conv"])
def test_dora_output_holds_any_weighted_sum_exactly(zoo: Zoo, bases, doras, tmp_path, family) -> None:
    """W + sum_i w_i dW_eff_i is a DoRA module of rank sum r_i: PEFT's merge of the output equals it."""
    lora = {"llama": "llama_a", "gpt2": "gpt2_a", "conv": "conv_a"}[family]
    inputs, weights = [doras[family], zoo[lora]], [0.7, -0.4]
    mix = ao.combine([ao.load_adapter(p) for p in inputs], weights, base=bases[family], form="dora")
    assert mix.is_dora
    ao.save_adapter(mix, tmp_path / "mix")
    factory = FACTORIES[family]
    base = factory().double().state_dict()
    merged = [peft_merged_state_dict(factory, p, dtype=torch.float64) for p in inputs]
    got = peft_merged_state_dict(factory, tmp_path / "mix", dtype=torch.float64)
    for key, value in got.items():
        want = base[key] + sum(w * (m[key] - base[key]) for w, m in zip(weights, merged, strict=True))
        assert float((value - want).abs().max()) <= 1e-6 * max(float(want.abs().max()), 1.0), key


def test_negated_dora_is_exact_as_dora_and_cli_takes_form(bases, doras, tmp_path) -> None:
    result = CliRunner().invoke(
        cli,
        [
            "negate",
            str(doras["llama"]),
            "--base",
            str(bases["llama"]),
            "--form",
            "dora",
            "-o",
            str(tmp_path / "n"),
        ],
    )
    assert result.exit_code == 0, result.stderr
    base = tiny_llama().double().state_dict()
    before = peft_merged_state_dict(tiny_llama, doras["llama"], dtype=torch.float64)
    after = peft_merged_state_dict(tiny_llama, tmp_path / "n", dtype=torch.float64)
    for key in before:
        want = 2 * base[key] - before[key]
        assert float((after[key] - want).abs().max()) <= 1e-6 * max(float(want.abs().max()), 1.0), key
    with pytest.raises(ao.InvalidInputError, match="a DoRA output needs the base checkpoint"):
        ao.negate(ao.load_adapter(doras["llama"]), form="dora")
    with pytest.raises(ao.InvalidInputError, match="a DoRA output is exact: drop"):
        ao.combine([ao.load_adapter(doras["llama"])], base=bases["llama"], form="dora", method="svd", rank=2)
