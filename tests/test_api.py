"""The Python API does what the CLI does: paths or loaded objects everywhere, dry-run plans, DoRA
verbs, the version in every record, and recipes that accept every option the CLI has."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import adapterops as ao
from adapterops.io.peft import SAFETENSORS_NAME
from adapterops.io.safetensors_file import read_header

INPUTS = Path(__file__).parent.parent / "recipes" / "inputs"
BASE = INPUTS / "tiny-llama-64"


def record_of(directory: Path) -> dict:
    return json.loads(read_header(directory / SAFETENSORS_NAME).metadata["adapterops"])


def test_verbs_take_paths_or_adapters_alike() -> None:
    paths = [INPUTS / "style-a", str(INPUTS / "style-b")]
    loaded = [ao.load_adapter(p) for p in paths]
    by_path, by_object = ao.combine(paths, [0.7, 0.3]), ao.combine(loaded, [0.7, 0.3])
    for name, module in by_path.modules.items():
        assert torch.equal(module.A, by_object.modules[name].A) and torch.equal(
            module.B, by_object.modules[name].B
        )
    assert torch.equal(ao.negate(paths[0]).modules[name].B, -loaded[0].modules[name].B)
    assert ao.describe(paths[0])["modules_count"] == len(loaded[0].modules)


def test_api_outputs_record_the_version_and_their_inputs(tmp_path: Path) -> None:
    ao.save_adapter(ao.scale(INPUTS / "style-a", 0.5), tmp_path / "half")
    record = record_of(tmp_path / "half")
    assert record["adapterops_version"] == ao.__version__
    assert record["operation"] == "scale" and record["by"] == 0.5
    assert record["inputs"][0]["sha256"] == ao.load_adapter(INPUTS / "style-a").source.sha256


def test_dora_verbs_are_in_the_api_and_round_trip(tmp_path: Path) -> None:
    dora = ao.to_dora(INPUTS / "style-a", BASE)
    assert dora.is_dora and record_of_provenance(dora)["base"]["path"] == str(BASE)
    back = ao.to_lora(dora, BASE, energy=1.0)
    assert max(r.rel_error for r in back.report) < 1e-6  # full rank: exact up to rounding


def record_of_provenance(adapter: ao.Adapter) -> dict:
    assert adapter.provenance is not None
    return dict(adapter.provenance)


def test_merge_dry_run_plans_without_writing(tmp_path: Path) -> None:
    result = ao.merge(BASE, [INPUTS / "style-a"], out=tmp_path / "merged", dry_run=True)
    assert result.dry_run and not (tmp_path / "merged").exists()
    assert result.plan is not None and result.plan["tensors_updated"] == result.tensors_updated > 0
    assert set(result.plan["shards"]) == {p.name for p in BASE.glob("*.safetensors")}


def test_python_errors_name_parameters_not_flags(tmp_path: Path) -> None:
    with pytest.raises(
        ao.InvalidInputError,
        match=r"^resize needs a target: give rank=K, energy=F or sv_ratio=R; or max_rank=K alone, or a budget "
        r"over all modules: budget_params=N or budget_error=E$",
    ):
        ao.resize(INPUTS / "style-a")
    with pytest.raises(ao.UnsupportedAdapterError, match=r"pass the base checkpoint \(base\)$"):
        ao.negate(INPUTS / "style-dora")
    ao.merge(BASE, [INPUTS / "style-a"], out=tmp_path / "once")
    with pytest.raises(ao.InvalidInputError, match="pass remerge=True to merge it again"):
        ao.merge(tmp_path / "once", [INPUTS / "style-a"], out=tmp_path / "twice")


def test_recipes_take_every_option_the_cli_has(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
inputs: {{a: {INPUTS / "style-a"}, b: {INPUTS / "style-b"}, dora: {INPUTS / "style-dora"}, base: {BASE}}}
steps:
  - name: mix
    combine: {{inputs: [a, b], weights: [1, 1], allow_different_bases: true, method: svd, rank: 2}}
    output: mix
    dtype: bfloat16
  - name: flat
    to_lora: {{input: dora, base: base, rank: 8, exact_limit: 16}}
  - name: merged
    merge: {{base: base, inputs: [mix], device: cpu, remerge: true}}
    output: merged
""")
    results = ao.run_recipe(recipe)
    assert [r.name for r in results] == ["mix", "flat", "merged"]
    mix = ao.load_adapter(tmp_path / "mix")
    assert mix.dtype == torch.bfloat16 and {m.rank for m in mix.modules.values()} == {2}
    assert (tmp_path / "merged" / "config.json").is_file()


def test_recipe_option_errors_give_the_line(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"inputs: {{a: {INPUTS / 'style-a'}}}\nsteps:\n  - name: m\n    resize: {{input: a}}\n")
    with pytest.raises(ao.RecipeError, match=r"r\.yaml:4: step 'm': resize needs a target: give rank=K"):
        ao.load_recipe(recipe)


def test_plan_merge_takes_paths_and_describes_without_touching_the_disk(tmp_path: Path) -> None:
    plan = ao.plan_merge(BASE, [INPUTS / "style-a"])
    assert plan.describe()["tensors_updated"] == len(ao.load_adapter(INPUTS / "style-a").modules)
    assert plan.output_bytes >= plan.checkpoint.file_size


def test_plan_recipe_takes_a_path(tmp_path: Path) -> None:
    recipe = Path(__file__).parent.parent / "recipes" / "blend-and-merge.yaml"
    rows = ao.plan_recipe(recipe, tmp_path)
    assert [r["step"] for r in rows if "verb" in r] == ["mix", "merged"]
    assert not any(tmp_path.iterdir())
