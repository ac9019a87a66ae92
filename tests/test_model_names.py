"""Checkpoints whose stored tensor names differ from the module names adapters use.

transformers 5 renames some models' tensors at load time and back at save time, so Hub checkpoints of
LLaVA, Gemma 3, Mistral 3 and Qwen2-VL store their language model under other names than the loaded
model (and PEFT) gives it, and GPT-NeoX stores ``lm_head`` as ``embed_out``. Each case below builds a
tiny random model, saves it with ``save_pretrained`` (which writes the stored layout: the test checks
that it does), trains nothing but draws a PEFT LoRA on the loaded model's modules, merges it with
adapterops, and judges the result against PEFT and transformers themselves:

* every tensor of the merged checkpoint, loaded with ``from_pretrained``, is within 1 ulp of PEFT's
  ``merge_and_unload`` in float32 rounded to bf16; every stored tensor the adapter leaves alone is
  bit for bit the base's;
* a float32 merge loads with ``from_pretrained`` and gives the logits of the PEFT-wrapped base;
* unmerge, verify, ``info --base`` and ``to_dora`` find the same stored tensors;
* an adapter for another model still gets "trained on another model", and without transformers the
  error says how to install it rather than blaming the adapter.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import torch

import adapterops as ao
from adapterops.io.checkpoint import open_checkpoint
from tests.support.factories import make_adapter, peft_merged_state_dict
from tests.support.hf import build_seeded, from_pretrained, stored, ulp_bf16
from tests.support.rounding import nearest

TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=16)
IMAGE_TOKEN = 127
SHARD = "8KB"  # several shards even for these tiny models


def llava(seed: int = 0, intermediate: int = 64) -> Any:
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    text = {**TEXT, "intermediate_size": intermediate}
    config = LlavaConfig(
        text_config={"model_type": "llama", **text},
        vision_config={"model_type": "clip_vision_model", **VISION, "patch_size": 8, "projection_dim": 32},
        image_token_index=IMAGE_TOKEN,
        vision_feature_layer=-1,
        attn_implementation="eager",
    )
    return build_seeded(lambda: LlavaForConditionalGeneration(config), seed)


def gemma3(seed: int = 0) -> Any:
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    config = Gemma3Config(
        text_config={"model_type": "gemma3_text", **TEXT, "head_dim": 8, "sliding_window": 16},
        vision_config={"model_type": "siglip_vision_model", **VISION, "patch_size": 8},
        mm_tokens_per_image=4,
        image_token_index=IMAGE_TOKEN,
        attn_implementation="eager",
    )
    return build_seeded(lambda: Gemma3ForConditionalGeneration(config), seed)


def gemma3_text(seed: int = 0) -> Any:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(**TEXT, head_dim=8, sliding_window=16, attn_implementation="eager")
    return build_seeded(lambda: Gemma3ForCausalLM(config), seed)


def qwen2_vl(seed: int = 0) -> Any:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    config = Qwen2VLConfig(
        text_config={**TEXT, "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]}},
        vision_config={
            "depth": 1,
            "embed_dim": 32,
            "hidden_size": 32,
            "num_heads": 4,
            "patch_size": 2,
            "spatial_merge_size": 1,
            "temporal_patch_size": 1,
        },
        attn_implementation="eager",
    )
    return build_seeded(lambda: Qwen2VLForConditionalGeneration(config), seed)


def mistral3(seed: int = 0) -> Any:
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    config = Mistral3Config(
        text_config={"model_type": "mistral", **TEXT},
        vision_config={"model_type": "pixtral", **VISION, "patch_size": 8, "head_dim": 8},
        image_token_index=IMAGE_TOKEN,
        spatial_merge_size=1,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    return build_seeded(lambda: Mistral3ForConditionalGeneration(config), seed)


def gpt_neox(seed: int = 0) -> Any:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(
        **{k: v for k, v in TEXT.items() if k != "num_key_value_heads"}, attn_implementation="eager"
    )
    return build_seeded(lambda: GPTNeoXForCausalLM(config), seed)


@dataclass(frozen=True)
class Case:
    factory: Callable[..., Any]
    targets: str | list[str]  # PEFT target_modules: names of the loaded model
    stored: dict[str, str]  # a loaded module name -> the tensor the checkpoint stores for it


LM = r"model\.language_model\.layers\.\d+\.(self_attn\.(q_proj|v_proj)|mlp\.down_proj)"
CASES = {
    "llava": Case(
        llava,
        rf"{LM}|lm_head|model\.multi_modal_projector\.linear_1",
        {
            "model.language_model.layers.0.self_attn.q_proj": "language_model.model.layers.0.self_attn.q_proj",
            "lm_head": "language_model.lm_head",
            "model.multi_modal_projector.linear_1": "multi_modal_projector.linear_1",
        },
    ),
    "gemma3": Case(  # lm_head is tied to the embedding: not a target
        gemma3,
        LM,
        {"model.language_model.layers.1.mlp.down_proj": "language_model.model.layers.1.mlp.down_proj"},
    ),
    "gemma3_text": Case(
        gemma3_text,
        ["q_proj", "v_proj", "down_proj"],
        {"model.layers.0.self_attn.q_proj": "model.layers.0.self_attn.q_proj"},
    ),
    "qwen2_vl": Case(
        qwen2_vl,
        rf"{LM}|lm_head",
        {
            "model.language_model.layers.0.self_attn.v_proj": "model.layers.0.self_attn.v_proj",
            "lm_head": "lm_head",
        },
    ),
    "mistral3": Case(
        mistral3,
        rf"{LM}|lm_head",
        {"model.language_model.layers.0.self_attn.q_proj": "language_model.model.layers.0.self_attn.q_proj"},
    ),
    "gpt_neox": Case(
        gpt_neox,
        ["query_key_value", "dense_4h_to_h", "lm_head"],
        {
            "lm_head": "embed_out",
            "gpt_neox.layers.0.attention.query_key_value": "gpt_neox.layers.0.attention.query_key_value",
        },
    ),
}


@functools.cache
def built(name: str, tmp: Path) -> dict[str, Path]:
    """The case's bf16 sharded checkpoint, float32 checkpoint and adapter (built once per module)."""
    case = CASES[name]
    root = tmp / name
    for dtype in (torch.bfloat16, torch.float32):
        model = case.factory().to(dtype)
        shard = {"max_shard_size": SHARD} if dtype == torch.bfloat16 else {}
        model.save_pretrained(root / str(dtype).removeprefix("torch."), **shard)
    make_adapter(
        case.factory,
        root / "lora",
        seed=7,
        r=4,
        lora_alpha=8,
        target_modules=case.targets,
        base_model_name_or_path=f"tiny-{name}",
        save_embedding_layers=False,
    )
    return {"bf16": root / "bfloat16", "f32": root / "float32", "lora": root / "lora"}


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], dict[str, Path]]:
    tmp = tmp_path_factory.mktemp("model-names")
    return lambda name: built(name, tmp)


@pytest.mark.parametrize("name", sorted(CASES))
def test_merge_into_the_stored_layout_is_what_peft_merges(name: str, cases, tmp_path: Path) -> None:
    case, paths = CASES[name], cases(name)
    base = stored(paths["bf16"])
    # save_pretrained writes the layout Hub checkpoints have: the stored names, not the loaded ones
    for module, key in case.stored.items():
        assert f"{key}.weight" in base, (module, sorted(base)[:5])
    assert len(list(paths["bf16"].glob("model-*.safetensors"))) > 1

    ao.merge(paths["bf16"], [paths["lora"]], out=tmp_path / "merged", device="cpu")
    merged = stored(tmp_path / "merged")
    assert {k: (v.dtype, v.shape) for k, v in merged.items()} == {
        k: (v.dtype, v.shape) for k, v in base.items()
    }
    changed = {k for k in base if not torch.equal(base[k].view(torch.int16), merged[k].view(torch.int16))}
    modules = ao.load_adapter(paths["lora"]).modules
    assert len(changed) == len(modules)  # one stored tensor per module; every other one bit for bit
    for module, key in case.stored.items():
        assert (f"{key}.weight" in changed) == (module in modules)

    # PEFT's merge_and_unload, in float32 on the bf16 base, rounded to bf16: within 1 ulp of each tensor
    def bf16_base() -> Any:
        return case.factory().to(torch.bfloat16).float()

    reference = peft_merged_state_dict(bf16_base, paths["lora"], dtype=torch.float32)
    loaded = from_pretrained(tmp_path / "merged").state_dict()
    assert set(loaded) == set(reference)
    worst = 0.0
    for key, want in reference.items():
        got = loaded[key]
        rounded = nearest(want.double(), torch.bfloat16).double()
        step = ulp_bf16(rounded)
        worst = max(worst, float(((got.double() - rounded).abs() / step).max()))
    assert worst <= 1.0, worst

    assert ao.verify(paths["bf16"], [paths["lora"]], tmp_path / "merged").passed()
    ao.unmerge(tmp_path / "merged", [paths["lora"]], out=tmp_path / "back", device="cpu")
    back = stored(tmp_path / "back")
    undone = {k for k in base if not torch.equal(back[k].view(torch.int16), merged[k].view(torch.int16))}
    assert undone <= changed
    for key in changed:  # round(round(W + d) - d): within half an ulp of each rounded value of W
        scale = torch.maximum(merged[key].double().abs(), back[key].double().abs())
        assert float(((back[key].double() - base[key].double()).abs() / ulp_bf16(scale)).max()) <= 1


@pytest.mark.parametrize("name", sorted(CASES))
def test_merged_float32_checkpoint_gives_the_peft_models_logits(name: str, cases, tmp_path: Path) -> None:
    from peft import PeftModel

    paths = cases(name)
    ao.merge(paths["f32"], [paths["lora"]], out=tmp_path / "merged", device="cpu")
    ids = torch.tensor([[1, 5, 9, 33, 64, 100, 7, 3]])
    with torch.no_grad():
        got = from_pretrained(tmp_path / "merged")(input_ids=ids).logits
        peft_model = PeftModel.from_pretrained(from_pretrained(paths["f32"]), str(paths["lora"])).eval()
        want = peft_model(input_ids=ids).logits
        bare = from_pretrained(paths["f32"])(input_ids=ids).logits
    assert (want - bare).abs().max() > 1e-2  # the adapter changes the output
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_base_weights_of_renamed_tensors_feed_info_and_the_dora_verbs(cases) -> None:
    paths = cases("llava")
    adapter = ao.load_adapter(paths["lora"])
    base = stored(paths["bf16"])
    info = {m["name"]: m for m in ao.describe(adapter, base=paths["bf16"])["modules"]}
    dora = ao.to_dora(adapter, base=paths["bf16"])
    for module, key in CASES["llava"].stored.items():
        W = base[f"{key}.weight"].double()
        assert info[module]["norm_base"] == pytest.approx(float(torch.linalg.matrix_norm(W)), rel=1e-12)
        lora = adapter.modules[module]
        merged = W + lora.scale * lora.B.double() @ lora.A.double()
        magnitude = dora.modules[module].magnitude
        assert magnitude is not None
        torch.testing.assert_close(
            magnitude.double(), torch.linalg.vector_norm(merged, dim=1), rtol=1e-6, atol=0
        )


def test_an_adapter_for_another_model_is_still_refused(cases, tmp_path: Path) -> None:
    paths = cases("llava")
    # the names map, the shapes do not: a LLaVA with a wider MLP
    wider = make_adapter(
        functools.partial(llava, intermediate=96),
        tmp_path / "wider",
        seed=3,
        r=2,
        lora_alpha=2,
        target_modules=LM,
        base_model_name_or_path="tiny-llava-wider",
        save_embedding_layers=False,
    )
    with pytest.raises(ao.IncompatibleAdaptersError, match="trained on another model"):
        ao.merge(paths["bf16"], [wider], out=tmp_path / "out")
    # names transformers does not load either: another architecture
    with pytest.raises(
        ao.IncompatibleAdaptersError,
        match=r"nor one that transformers .* loads under that name; the adapter was trained on another model",
    ):
        ao.merge(paths["bf16"], [cases("gpt_neox")["lora"]], out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_without_transformers_the_error_says_how_to_install_it(cases, tmp_path: Path, monkeypatch) -> None:
    paths = cases("qwen2_vl")
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    with pytest.raises(ao.IncompatibleAdaptersError) as error:
        ao.merge(paths["bf16"], [paths["lora"]], out=tmp_path / "out")
    message = str(error.value)
    assert "pip install 'adapterops[transformers]'" in message and "another model" not in message
    assert message.startswith("module model.language_model.layers.") and ": no tensor " in message
    # names that match as stored need no transformers
    assert ao.plan_merge(cases("gemma3_text")["bf16"], [cases("gemma3_text")["lora"]]).updates


def test_the_layout_is_read_from_the_checkpoints_own_keys(cases, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    paths = cases("llava")
    # the same model saved under its loaded names (as a raw state_dict save would): those match as they are
    model = llava().to(torch.bfloat16)
    (tmp_path / "loaded").mkdir()
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        tmp_path / "loaded" / "model.safetensors",
        metadata={"format": "pt"},
    )
    (tmp_path / "loaded" / "config.json").write_text((paths["bf16"] / "config.json").read_text())
    assert open_checkpoint(tmp_path / "loaded").load_names.layout == "in-memory"
    assert open_checkpoint(paths["bf16"]).load_names.layout == "stored"
    # a dry run says how many modules are stored under other names, and whose names those are
    plans = {
        where: ao.merge(path, [paths["lora"]], out=tmp_path / "x", dry_run=True).plan
        for where, path in (("loaded", tmp_path / "loaded"), ("stored", paths["bf16"]))
    }
    modules = len(ao.load_adapter(paths["lora"]).modules)
    assert plans["loaded"] is not None and plans["stored"] is not None
    assert (plans["loaded"]["renamed_modules"], plans["loaded"]["load_names"]) == (0, None)
    assert plans["stored"]["renamed_modules"] == modules
    assert (
        plans["stored"]["load_names"]
        == f"transformers {version('transformers')} (LlavaForConditionalGeneration)"
    )
    ao.merge(tmp_path / "loaded", [paths["lora"]], out=tmp_path / "merged")
    ao.merge(paths["bf16"], [paths["lora"]], out=tmp_path / "merged-stored")
    # the same merge, whichever names the tensors are stored under
    loaded, hub = (
        from_pretrained(tmp_path / "merged").state_dict(),
        from_pretrained(tmp_path / "merged-stored").state_dict(),
    )
    assert all(torch.equal(loaded[k], hub[k]) for k in hub)


def test_names_that_match_as_stored_never_import_transformers(cases) -> None:
    paths = cases("gemma3_text")
    probe = (
        "import sys, adapterops as ao; "
        f"plan = ao.plan_merge({str(paths['bf16'])!r}, [{str(paths['lora'])!r}]); "
        "print(len(plan.updates), 'transformers' in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, env=env
    )
    assert result.stdout.split() == ["6", "False"]


def test_tensors_transformers_fuses_at_load_are_refused_by_name(tmp_path: Path) -> None:
    # Mixtral stores each expert's w1/w2/w3; transformers 5 fuses them into experts.gate_up_proj/down_proj
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(**TEXT, num_local_experts=2, num_experts_per_tok=1)
    build_seeded(lambda: MixtralForCausalLM(config), 0).save_pretrained(tmp_path / "mixtral")
    checkpoint = open_checkpoint(tmp_path / "mixtral")
    assert "model.layers.0.block_sparse_moe.experts.1.w3.weight" in checkpoint.tensors
    # the router is renamed (block_sparse_moe.gate -> mlp.gate): found
    assert checkpoint.find_tensor("model.layers.0.mlp.gate") == "model.layers.0.block_sparse_moe.gate.weight"
    with pytest.raises(ao.UnsupportedAdapterError) as error:
        checkpoint.find_tensor("model.layers.1.mlp.experts", ".gate_up_proj")
    assert str(error.value).startswith(
        "module model.layers.1.mlp.experts: transformers "
    ) and "builds model.layers.1.mlp.experts.gate_up_proj at load time from 4 stored tensor(s)" in str(
        error.value
    )


def test_architectures_that_are_not_a_list_of_names_are_said_to_be_so() -> None:
    from adapterops.io.model_names import load_names

    names = load_names({"model_type": "llama", "architectures": "LlamaForCausalLM"}, {})
    assert (
        names.problem == "config.json's architectures must be a list of class names, got 'LlamaForCausalLM'"
    )
