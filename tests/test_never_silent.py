"""Never silently wrong: results that cannot be right are refused, records hold what a user needs
later, cards carry no local paths, and lossy conversions say so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import adapterops as ao
from adapterops.cli import cli
from tests.conftest import Zoo
from tests.support.factories import save_base_checkpoint, tiny_llama

INPUTS = Path(__file__).parent.parent / "recipes" / "inputs"
BASE = INPUTS / "tiny-llama-64"


def run(*args: object) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def fp16_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_base_checkpoint(tiny_llama, tmp_path_factory.mktemp("fp16") / "base", dtype=torch.float16)


def test_a_merge_that_overflows_the_dtype_is_refused(zoo: Zoo, fp16_base: Path, tmp_path: Path) -> None:
    ao.save_adapter(ao.scale(zoo["llama_a"], 1e9), tmp_path / "huge")
    code, out, err = run("merge", fp16_base, tmp_path / "huge", "-o", tmp_path / "merged")
    assert (code, out) == (2, "")
    assert err.startswith("error: model.") and "would write NaN or Inf" in err and "overflows float16" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["huge"]


def test_verify_fails_on_nan_or_inf_in_a_merged_tensor(zoo: Zoo, tmp_path: Path) -> None:
    base = save_base_checkpoint(tiny_llama, tmp_path / "base", dtype=torch.float32)
    ao.merge(base, [zoo["llama_a"]], out=tmp_path / "merged")
    shard = tmp_path / "merged" / "model.safetensors"
    tensors = load_file(shard)
    key = "model.layers.0.self_attn.q_proj.weight"
    tensors[key][0, 0] = float("nan")
    metadata = json.loads(shard.read_bytes()[8 : 8 + int.from_bytes(shard.read_bytes()[:8], "little")])
    save_file(tensors, shard, metadata=metadata["__metadata__"])
    report = ao.verify(base, [zoo["llama_a"]], tmp_path / "merged")
    assert not report.passed() and report.non_finite == (key,)
    code, out, _ = run("verify", base, zoo["llama_a"], tmp_path / "merged")
    assert code == 1 and f"non finite: {key}" in out and "FAILED" in out


def test_unmerge_takes_the_recorded_weights_and_refuses_contradicting_ones(zoo: Zoo, tmp_path: Path) -> None:
    base = save_base_checkpoint(tiny_llama, tmp_path / "base", dtype=torch.float32)
    ao.merge(base, [zoo["llama_a"], zoo["llama_b"]], [0.7, -0.3], out=tmp_path / "merged")
    ao.unmerge(tmp_path / "merged", [zoo["llama_a"], zoo["llama_b"]], out=tmp_path / "back")
    original, back = load_file(base / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert all(torch.allclose(back[k], v, atol=1e-6, rtol=0) for k, v in original.items())
    code, _, err = run(
        "unmerge", tmp_path / "merged", zoo["llama_a"], zoo["llama_b"], "-w", "1", "1", "-o", tmp_path / "x"
    )
    assert (
        code == 2
        and "with weight 0.7 (its merge record says so), not 1.0" in err
        and "--ignore-record" in err
    )
    assert not (tmp_path / "x").exists()
    with pytest.warns(UserWarning, match="has no merge record; assuming weight 1"):
        ao.unmerge(base, [zoo["llama_a"]], out=tmp_path / "y")


def test_a_merge_record_that_lies_is_a_clean_error(zoo: Zoo, tmp_path: Path) -> None:
    base = save_base_checkpoint(tiny_llama, tmp_path / "base", dtype=torch.float32)
    ao.merge(base, [zoo["llama_a"]], out=tmp_path / "merged")
    record = tmp_path / "merged" / "adapterops_merge.json"
    for text, message in [
        ("[1, 2]", "the merge record is not a JSON object"),
        ('{"merged": {"a": 1}}', "the merge record's 'merged' is not a list of objects"),
        ('{"merged": [{"sha256": 5, "weight": 1}]}', "the merge record lists an adapter with a malformed"),
        ("{not json", "the merge record is not valid JSON"),
    ]:
        record.write_text(text)
        code, out, err = run("unmerge", tmp_path / "merged", zoo["llama_a"], "-o", tmp_path / "x")
        assert (
            (code, out) == (2, "") and err.startswith(f"error: {record}: {message}") and err.count("\n") == 1
        )


def test_dora_row_norms_live_in_a_subfolder_and_lying_norms_are_refused(zoo: Zoo, tmp_path: Path) -> None:
    base = save_base_checkpoint(tiny_llama, tmp_path / "base", dtype=torch.float32)
    ao.merge(base, [zoo["llama_dora"]], out=tmp_path / "merged")
    top_level = sorted(p.name for p in (tmp_path / "merged").glob("*.safetensors"))
    assert top_level == ["model.safetensors"]  # what a serving engine would load as weights
    norms = tmp_path / "merged" / "adapterops" / "dora_norms.safetensors"
    stored = load_file(norms)
    key = next(iter(stored))
    stored[key] = -stored[key]
    save_file(stored, norms)
    code, _, err = run("unmerge", tmp_path / "merged", zoo["llama_dora"], "-o", tmp_path / "x")
    assert code == 2 and "are not a vector of positive finite numbers" in err
    # outputs of adapterops 0.1.0 kept the norms at the top level: still read
    stored[key] = -stored[key]
    save_file(stored, tmp_path / "merged" / "adapterops_dora_norms.safetensors")
    norms.unlink()
    ao.unmerge(tmp_path / "merged", [zoo["llama_dora"]], out=tmp_path / "back")


def test_a_merge_records_its_base_shards_and_writes_a_card_without_local_paths(
    zoo: Zoo, tmp_path: Path
) -> None:
    import hashlib

    base = save_base_checkpoint(tiny_llama, tmp_path / "base", dtype=torch.float32)
    (base / "README.md").write_text("# My base model\n\nNotes the author wrote.\n")
    code, _, err = run("merge", base, zoo["llama_a"], "-o", tmp_path / "merged", "-q")
    assert code == 0, err
    record = json.loads((tmp_path / "merged" / "adapterops_merge.json").read_text())
    step = record["history"][-1]
    assert step["base"]["shards"] == {
        "model.safetensors": hashlib.sha256((base / "model.safetensors").read_bytes()).hexdigest()
    }
    assert step["command"].startswith("adapterops merge ") and " -q" not in step["command"]
    card = (tmp_path / "merged" / "README.md").read_text()
    assert card.startswith("# My base model\n\nNotes the author wrote.\n")  # the author's text is kept
    assert "## Lineage" in card and step["base"]["shards"]["model.safetensors"] in card
    assert str(tmp_path) not in card  # no absolute local paths in a card
    # merging again into the output replaces the lineage section instead of adding a second one
    ao.merge(tmp_path / "merged", [zoo["llama_b"]], out=tmp_path / "twice")
    assert (tmp_path / "twice" / "README.md").read_text().count("## Lineage") == 1


def test_cosmetic_flags_do_not_change_a_single_byte(zoo: Zoo, tmp_path: Path, monkeypatch) -> None:
    common = ["combine", zoo["llama_a"], zoo["llama_b"], "-w", "0.7", "0.3", "-o", "out"]
    for folder, flags in (("plain", []), ("loud", ["--json", "--force", "-v"]), ("quiet", ["-q"])):
        (tmp_path / folder).mkdir()
        if "--force" in flags:  # something to replace
            (tmp_path / folder / "out").mkdir()
        monkeypatch.chdir(tmp_path / folder)
        assert run(*common, *flags)[0] == 0
    for name in ("adapter_model.safetensors", "adapter_config.json", "README.md"):
        files = {(tmp_path / f / "out" / name).read_bytes() for f in ("plain", "loud", "quiet")}
        assert len(files) == 1, name


def test_recipe_merges_record_the_steps_they_merged(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
inputs: {{a: {INPUTS / "style-a"}, b: {INPUTS / "style-b"}, base: {BASE}}}
steps:
  - name: mix
    combine: {{inputs: [a, b], weights: [0.5, 0.5]}}
  - name: merged
    merge: {{base: base, inputs: [mix]}}
    output: merged
""")
    ao.run_recipe(recipe)
    text = (tmp_path / "merged" / "adapterops_merge.json").read_text()
    assert "<in memory>" not in text
    entry = json.loads(text)["merged"][0]
    assert entry["path"] == "r.yaml#mix" and len(entry["content_sha256"]) == 64


def test_dora_into_a_lora_warns_with_its_error_and_the_default_is_exact(tmp_path: Path) -> None:
    dora, lora = INPUTS / "style-dora", INPUTS / "style-a"
    code, _, err = run("combine", dora, lora, "--base", BASE, "--form", "lora", "-o", tmp_path / "approx")
    assert code == 0 and err.startswith("warning: DoRA inputs written as a LoRA are an approximation")
    assert "the default, --form auto, writes the exact DoRA" in err
    code, _, err = run("combine", dora, lora, "--base", BASE, "-o", tmp_path / "exact")
    assert (code, err) == (0, "") and ao.load_adapter(tmp_path / "exact").is_dora


def test_resize_of_a_dora_points_to_to_lora_not_to_a_missing_option(tmp_path: Path) -> None:
    code, _, err = run("resize", INPUTS / "style-dora", "--rank", "2", "-o", tmp_path / "x")
    assert code == 2 and "use to_lora (adapterops to-lora)" in err and "--base" not in err.split("to-lora")[0]


def test_a_typo_is_no_such_directory_and_single_files_say_what_they_are(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "adapters").mkdir()
    for typo in ("./typo", "typo", "adapters/typo", str(tmp_path / "typo")):
        code, _, err = run("info", typo)
        assert (code, err) == (3, f"error: {typo}: no such adapter directory\n"), typo
    save_file({"lora_unet_down_blocks_0.lora_down.weight": torch.zeros(2, 4)}, tmp_path / "kohya.safetensors")
    code, _, err = run("info", tmp_path / "kohya.safetensors")  # read as kohya, and its gap named
    assert code != 0 and err.count("\n") == 1 and "lora_unet_down_blocks_0 has no lora_up.weight" in err
    save_file({"unet.down.lora_A.weight": torch.zeros(2, 4)}, tmp_path / "pytorch_lora_weights.safetensors")
    code, _, err = run("info", tmp_path / "pytorch_lora_weights.safetensors")  # read as diffusers, gap named
    assert code == 2 and err.count("\n") == 1 and "unet.down has no lora_B" in err
    peft_file = INPUTS / "style-a" / "adapter_model.safetensors"
    code, _, err = run("info", peft_file)
    assert code == 3 and "is a PEFT adapter's weights file; pass the adapter directory that holds it" in err


def test_a_recipe_filter_that_matches_no_module_is_an_error(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
inputs: {{a: {INPUTS / "style-a"}, b: {INPUTS / "style-b"}}}
steps:
  - name: mix
    combine:
      inputs: [a, b]
      weights: [{{default: 1, filters: [{{match: "mpl", value: 0}}]}}, 1]
    output: mix
""")
    with pytest.raises(
        ao.RecipeError, match=r"r\.yaml:4: step 'mix': filter 'mpl' matches no module of its inputs"
    ):
        ao.run_recipe(recipe)
    assert not (tmp_path / "mix").exists()


def test_errors_are_json_too_under_json(tmp_path: Path) -> None:
    code, out, err = run("negate", tmp_path / "missing", "-o", tmp_path / "x", "--json")
    assert code == 3 and err == f"error: {tmp_path / 'missing'}: no such adapter directory\n"
    assert json.loads(out) == {
        "error": {
            "exit_code": 3,
            "message": f"{tmp_path / 'missing'}: no such adapter directory",
            "type": "NotFoundError",
        }
    }
