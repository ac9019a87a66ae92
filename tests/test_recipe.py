"""Recipes: every bundled recipe runs; weights, filters and gradients mean what they say; bad files
give the line; --dry-run computes nothing; runs are deterministic."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import adapterops as ao
from adapterops.cli import cli
from adapterops.recipe import RecipeError, load_recipe, run_recipe, weight_function
from tests.support.hubserver import FakeHub

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))
INPUTS = Path(__file__).parent.parent / "recipes" / "inputs"


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_every_bundled_recipe_runs_and_its_outputs_load(recipe: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    results = run_recipe(recipe, output_dir=tmp_path)
    written = [Path(r.output) for r in results if r.output]
    assert written and all(p.is_dir() for p in written)
    for path in written:
        if (path / "adapter_config.json").is_file():
            base = AutoModelForCausalLM.from_pretrained(INPUTS / "tiny-llama-64", dtype=torch.float32)
            model = PeftModel.from_pretrained(base, path)
            assert any("lora_A" in n for n, _ in model.named_parameters())
        else:
            model = AutoModelForCausalLM.from_pretrained(path)
            assert model.config.hidden_size == 64


def test_filters_and_gradients_give_each_module_its_weight(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
version: 1
inputs:
  a: {INPUTS / "style-a"}
  b: {INPUTS / "style-b"}
steps:
  - name: mix
    combine:
      inputs: [a, b]
      weights:
        - default: 0.5
          filters: [{{match: "q_proj", value: [2.0, 4.0]}}, {{match: "self_attn", value: -1.0}}]
        - [1.0, 3.0]
    output: mix
""")
    run_recipe(recipe)
    a, b, mix = (ao.load_adapter(p) for p in (INPUTS / "style-a", INPUTS / "style-b", tmp_path / "mix"))
    for name, module in mix.modules.items():
        layer = 0 if ".layers.0." in name else 1
        wa = [2.0, 4.0][layer] if "q_proj" in name else (-1.0 if "self_attn" in name else 0.5)
        wb = [1.0, 3.0][layer]
        want = sum(
            w * x.modules[name].delta(torch.float64) for w, x in ((wa, a), (wb, b)) if name in x.modules
        )
        torch.testing.assert_close(module.delta(torch.float64), want, rtol=1e-5, atol=1e-6)


def test_weight_functions_worked_by_hand() -> None:
    """Gradient [0, 1, 0] over 5 layers: layer 1 sits at t = 0.5 between the first two points."""
    weight = weight_function([0.0, 1.0, 0.0], layers=5)
    assert callable(weight)
    got = [weight(f"model.layers.{i}.mlp.up_proj") for i in range(5)]
    assert got == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.0])
    assert weight("model.embed_tokens") == 0.0
    assert weight_function(0.25, layers=5) == 0.25


BAD = [
    (
        "steps:\n  - name: m\n    combine: {inputs: [a], rnak: 4}\ninputs: {a: x}\n",
        3,
        "unknown key 'rnak' in step 'm' (combine); allowed: allow_different_bases, base, budget_error, budget_params, common_fraction, density, energy, exact_limit, form, inputs, majority_sign, max_rank, method, rank, seed, space, sv_ratio, weights",
    ),
    (
        "inputs: {a: x}\nsteps:\n  - name: m\n    negate: {input: nope}\n",
        4,
        "step 'm': input 'nope' is not an input or an earlier step",
    ),
    (
        "inputs: {a: x, b: y}\nsteps:\n  - name: m\n    combine: {inputs: [a, b], weights: [1]}\n",
        4,
        "step 'm': 1 weights for 2 inputs",
    ),
    (
        "inputs: {a: x}\nsteps:\n  - name: m\n    scale: {input: a, by: twice}\n",
        4,
        "step 'm': by must be float, got 'twice'",
    ),
    (
        "inputs: {a: x}\nsteps:\n  - name: m\n    negate: {input: a}\n    resize: {input: a, rank: 2}\n",
        3,
        "step 'm' needs exactly one of",
    ),
    ("inputs: {a: x}\nsteps:\n  - name: a\n    negate: {input: a}\n", 3, "the name 'a' is used twice"),
    (
        "inputs: {a: x}\nsteps:\n  - name: m\n    combine:\n      inputs: [a]\n      weights: [{filters: [{match: '(', value: 1}]}]\n",
        6,
        "filter '(' is not a regular expression",
    ),
    ("version: 2\nsteps: []\n", 1, "unsupported recipe version"),
    ("inputs: {a: x}\n", 1, "the recipe is missing steps"),
    ("inputs: {a: x}\nsteps: {a: 1}\n", 2, "steps must be a list"),
    ("steps: [\n", 2, "not valid YAML: expected the node content"),
]


@pytest.mark.parametrize(("text", "line", "message"), BAD)
def test_bad_recipes_name_the_line(tmp_path: Path, text: str, line: int, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert str(info.value).startswith(f"{path}:{line}: ")
    assert message in str(info.value)
    result = CliRunner().invoke(cli, ["run", str(path)])
    assert result.exit_code == 2 and result.stderr.startswith(f"error: {path}:{line}: ")


def test_dry_run_plans_without_writing(tmp_path: Path) -> None:
    recipe = Path(__file__).parent.parent / "recipes" / "blend-and-merge.yaml"
    result = CliRunner().invoke(
        cli, ["run", str(recipe), "--dry-run", "--json", "--output-dir", str(tmp_path)]
    )
    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)["plan"]
    steps = {r["step"]: r for r in rows}
    assert steps["mix"]["verb"] == "combine" and steps["mix"]["output"] == str(tmp_path / "out" / "mix")
    a, b = ao.load_adapter(INPUTS / "style-a"), ao.load_adapter(INPUTS / "style-b")
    # the exact combine's output holds at most the concatenated ranks of every module, in float32
    bound = 0
    for name in set(a.modules) | set(b.modules):
        modules = [x.modules[name] for x in (a, b) if name in x.modules]
        bound += sum(m.rank for m in modules) * (modules[0].out_features + modules[0].in_features) * 4
    assert steps["mix"]["estimated_output_bytes"] == bound
    assert steps["merged"]["estimated_output_bytes"] == sum(
        p.stat().st_size for p in (INPUTS / "tiny-llama-64").glob("*.safetensors")
    )
    assert list(tmp_path.iterdir()) == []


def test_runs_are_deterministic(tmp_path: Path) -> None:
    recipe = Path(__file__).parent.parent / "recipes" / "dora.yaml"
    run_recipe(recipe, output_dir=tmp_path / "one")
    run_recipe(recipe, output_dir=tmp_path / "two")
    for out in ("dora-as-lora", "dora-blend", "dora-negated"):
        digests = {
            hashlib.sha256(
                (tmp_path / run / "out" / out / "adapter_model.safetensors").read_bytes()
            ).hexdigest()
            for run in ("one", "two")
        }
        assert len(digests) == 1, out


@pytest.mark.hub
@pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")
def test_recipe_steps_can_push_and_the_card_holds_the_recipe(
    fake_hub: FakeHub, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", "t")
    recipe = tmp_path / "push.yaml"
    recipe.write_text(
        f"inputs: {{a: {INPUTS / 'style-a'}}}\nsteps:\n  - name: half\n    scale: {{input: a, by: 0.5}}\n"
        "    output: half\n    push: me/half\n"
    )
    (result,) = run_recipe(recipe)
    assert result.pushed and "me/half" in result.pushed
    card = fake_hub.files("me/half")["README.md"].decode()
    assert "scale: {input: a, by: 0.5}" in card


def test_info_names_the_recipe_step_that_made_an_output(tmp_path: Path) -> None:
    recipe = Path(__file__).parent.parent / "recipes" / "layer-gradient.yaml"
    run_recipe(recipe, output_dir=tmp_path)
    result = CliRunner().invoke(cli, ["info", str(tmp_path / "out" / "gradient")])
    assert result.exit_code == 0
    assert "made by: recipe step gradient (combine)" in result.stdout
