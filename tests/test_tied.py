"""Tied embeddings: a merge computes what the adapted model computed.

With ``tie_word_embeddings`` the output layer reads the input embedding. A LoRA on one side only
changes that side in the adapted model, so merging it into the one shared tensor would change both
(PEFT's own ``merge_and_unload`` does, and the tests show its logits move). adapterops unties them
instead: ``lm_head.weight`` is written separately, and ``tie_word_embeddings`` becomes false. An
adapter that updates both sides alike (``ensure_weight_tying``) keeps them tied.

Judged by logits: ``AutoModelForCausalLM.from_pretrained`` on the merged output against the
PEFT-wrapped base's forward, both in float64.
"""

from __future__ import annotations

import json
import warnings
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import adapterops as ao
from tests.support.factories import (
    make_adapter,
    peft_logits,
    peft_merge_and_unload_logits,
    save_base_checkpoint,
    tiny_gemma3,
    tiny_llama,
)

IDS = torch.tensor([[1, 5, 9, 30, 64, 100, 127, 3]])
CASES = {
    "embedding": dict(target_modules=["embed_tokens", "q_proj"]),
    "head": dict(target_modules=["lm_head", "v_proj"]),
    "both": dict(target_modules=["embed_tokens", "lm_head"]),
    "tied adapters": dict(target_modules=["embed_tokens"], ensure_weight_tying=True),
}
tied_llama = partial(tiny_llama, tie_word_embeddings=True)
tied_llama.__name__ = "tiny_llama_tied"  # type: ignore[attr-defined]


def merged_logits(path: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    # merged weights are float32 (correctly rounded): logits agree to float32 precision
    return float((a - b).abs().max()) <= 1e-5 * float(b.abs().max())


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_base_checkpoint(
        tied_llama, tmp_path_factory.mktemp("tied") / "base", dtype=torch.float32, max_shard_size="20KB"
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_merge_into_a_tied_llama_computes_what_the_adapter_computed(
    base: Path, tmp_path: Path, case: str
) -> None:
    adapter = make_adapter(tied_llama, tmp_path / "adapter", seed=5, r=2, lora_alpha=4, **CASES[case])
    expected = peft_logits(tied_llama, adapter, IDS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = ao.merge(base, [adapter], out=tmp_path / "m")
    untie = case != "tied adapters"
    assert close(merged_logits(tmp_path / "m"), expected)
    # PEFT's own merge changes both sides of the tied pair (or, with tied adapters, adds the update twice)
    assert not close(peft_merge_and_unload_logits(tied_llama, adapter, IDS), expected)

    notes = [
        str(w.message)
        for w in caught
        if "untied lm_head.weight from model.embed_tokens.weight" in str(w.message)
    ]
    assert len(notes) == int(untie) and list(result.notes) == notes
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["tie_word_embeddings"] is not untie
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())["weight_map"]
    base_index = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    assert ("lm_head.weight" in index) is untie
    if untie:  # beside the embedding, in its shard, and in the index
        assert index["lm_head.weight"] == base_index["model.embed_tokens.weight"]
        shard = load_file(str(tmp_path / "m" / index["lm_head.weight"]))
        embedding = load_file(str(base / base_index["model.embed_tokens.weight"]))[
            "model.embed_tokens.weight"
        ]
        if case == "embedding":  # the head is the original embedding, bit for bit
            assert torch.equal(shard["lm_head.weight"], embedding)
        if case == "head":  # and here the embedding is
            assert torch.equal(shard["model.embed_tokens.weight"], embedding)
    record = json.loads((tmp_path / "m" / "adapterops_merge.json").read_text())
    assert record["history"][-1].get("notes", []) == notes
    assert ao.verify(base, [adapter], tmp_path / "m").passed()


def test_verify_fails_an_untied_merge_whose_config_still_ties(base: Path, tmp_path: Path) -> None:
    adapter = make_adapter(tied_llama, tmp_path / "adapter", seed=6, r=2, target_modules=["embed_tokens"])
    with pytest.warns(UserWarning, match="untied"):
        ao.merge(base, [adapter], out=tmp_path / "m")
    config_path = tmp_path / "m" / "config.json"
    config_path.write_text(
        config_path.read_text().replace('"tie_word_embeddings": false', '"tie_word_embeddings": true')
    )
    report = ao.verify(base, [adapter], tmp_path / "m")
    assert not report.passed() and "tie_word_embeddings false" in report.config_problems[0]


@pytest.mark.parametrize("targets", [["embed_tokens", "q_proj"], ["lm_head"]])
def test_a_merge_into_a_tied_gemma3_computes_what_the_adapter_computed(
    tmp_path: Path, targets: list[str]
) -> None:
    base = save_base_checkpoint(tiny_gemma3, tmp_path / "base", dtype=torch.float32)
    assert json.loads((base / "config.json").read_text())["tie_word_embeddings"] is True
    adapter = make_adapter(tiny_gemma3, tmp_path / "adapter", seed=2, r=2, target_modules=targets)
    expected = peft_logits(tiny_gemma3, adapter, IDS)
    with pytest.warns(UserWarning, match="untied lm_head.weight from model.embed_tokens.weight"):
        ao.merge(base, [adapter], out=tmp_path / "m")
    assert close(merged_logits(tmp_path / "m"), expected)
    assert not close(peft_merge_and_unload_logits(tiny_gemma3, adapter, IDS), expected)


def test_unmerge_of_an_untied_merge_gives_the_base_weights_back(base: Path, tmp_path: Path) -> None:
    adapter = make_adapter(
        tied_llama, tmp_path / "adapter", seed=7, r=2, target_modules=["embed_tokens", "lm_head"]
    )
    with pytest.warns(UserWarning, match="untied"):
        ao.merge(base, [adapter], out=tmp_path / "m")
    ao.unmerge(tmp_path / "m", [adapter], out=tmp_path / "u")
    before, after = merged_logits(tmp_path / "m"), merged_logits(tmp_path / "u")
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64).eval()
    with torch.no_grad():
        want = original(input_ids=IDS).logits
    assert close(after, want) and not close(before, want)


def test_a_tied_embedding_of_an_unknown_output_layer_is_refused(base: Path, tmp_path: Path) -> None:
    """Tied, but the architecture is not one whose head is lm_head, and transformers (which does not
    know it) cannot say what is tied to the embedding: neither untying nor merging is safe."""
    other = tmp_path / "other"
    other.mkdir()
    for path in base.iterdir():
        (other / path.name).write_bytes(path.read_bytes())
    config = json.loads((other / "config.json").read_text())
    config["architectures"] = ["LlamaForMaskedLM"]
    (other / "config.json").write_text(json.dumps(config))
    adapter = make_adapter(tied_llama, tmp_path / "adapter", seed=8, r=2, target_modules=["embed_tokens"])
    with pytest.raises(ao.UnsupportedAdapterError, match=r"ties to an output layer .* that is not lm_head"):
        ao.merge(other, [adapter], out=tmp_path / "m")
