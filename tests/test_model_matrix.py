"""A merge matrix over the model families people fine-tune and merge into.

Each family is a tiny random transformers 5 model (hidden 32, 1-2 layers, vocab 128, seeded), saved
with ``save_pretrained`` in bf16 (sharded) and in float32. Each variant is a PEFT adapter made with
``get_peft_model`` on that model, every LoRA (and ``modules_to_save``) parameter drawn at random.
adapterops merges it, and the result is judged against PEFT and transformers themselves:

* every tensor of the bf16 merge, loaded with ``from_pretrained``, is within 1 ulp of PEFT's float32
  ``merge_and_unload`` of the bf16 base rounded to bf16; the merge rewrites exactly the tensors of the
  modules PEFT wrapped, and every other stored tensor is bit for bit the base's;
* the float32 merge, loaded with ``from_pretrained``, gives the output (LM logits, or the task head's)
  of the PEFT-wrapped float32 base;
* ``verify`` passes, and ``unmerge`` gives back the base within one bf16 step (or is refused, where
  the adapter replaced a tensor through ``modules_to_save``).

Families: qwen2 (attention biases, and ``lora_bias`` on them), qwen3, mistral, phi3 (fused
``qkv_proj`` / ``gate_up_proj``), falcon (fused ``query_key_value``), opt, BERT sequence
classification (``task_type=SEQ_CLS``: the classifier is a ``modules_to_save`` replacement), T5
(encoder-decoder, attention and feed-forward linears) and Mixtral / Qwen3-MoE with attention-only
adapters (their experts are fused at load time and not targeted here).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

import adapterops as ao
from tests.support.hf import build_seeded, from_pretrained, stored, ulp_bf16
from tests.support.rounding import nearest

TEXT: dict[str, Any] = dict(
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
    tie_word_embeddings=False,
    attn_implementation="eager",
)
SHARD = "8KB"  # several shards even for these tiny models
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def qwen2() -> Any:  # q/k/v carry biases
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return build_seeded(lambda: Qwen2ForCausalLM(Qwen2Config(**TEXT)))


def qwen3() -> Any:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return build_seeded(lambda: Qwen3ForCausalLM(Qwen3Config(**TEXT, head_dim=8)))


def mistral() -> Any:
    from transformers import MistralConfig, MistralForCausalLM

    return build_seeded(lambda: MistralForCausalLM(MistralConfig(**TEXT, sliding_window=16)))


def phi3() -> Any:  # fused qkv_proj and gate_up_proj, stored fused
    from transformers import Phi3Config, Phi3ForCausalLM

    return build_seeded(lambda: Phi3ForCausalLM(Phi3Config(**TEXT)))


def falcon() -> Any:  # fused query_key_value (multi-query attention)
    from transformers import FalconConfig, FalconForCausalLM

    config = FalconConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=128,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    return build_seeded(lambda: FalconForCausalLM(config))


def opt() -> Any:
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=128,
        max_position_embeddings=64,
        word_embed_proj_dim=32,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=2,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    return build_seeded(lambda: OPTForCausalLM(config))


def bert() -> Any:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=128,
        max_position_embeddings=64,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation="eager",
    )
    return build_seeded(lambda: BertForSequenceClassification(config))


def t5() -> Any:  # shared input embedding, tied to both stacks' embed_tokens and to lm_head
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=4,
        vocab_size=128,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
        dropout_rate=0.0,
        attn_implementation="eager",
    )
    return build_seeded(lambda: T5ForConditionalGeneration(config))


def mixtral() -> Any:
    from transformers import MixtralConfig, MixtralForCausalLM

    return build_seeded(
        lambda: MixtralForCausalLM(MixtralConfig(**TEXT, num_local_experts=2, num_experts_per_tok=1))
    )


def qwen3_moe() -> Any:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        **TEXT, head_dim=8, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=32
    )
    return build_seeded(lambda: Qwen3MoeForCausalLM(config))


@dataclass(frozen=True)
class Family:
    factory: Callable[[], Any]
    variants: dict[str, dict[str, Any]]  # variant -> LoraConfig keyword arguments
    inputs: Callable[[torch.Tensor], dict[str, torch.Tensor]] = lambda ids: {"input_ids": ids}
    # variants adapterops refuses: variant -> (error class, a regular expression its message matches)
    refused: dict[str, tuple[type[Exception], str]] = field(default_factory=dict)


def _with_embedding(variants: dict[str, dict[str, Any]], targets: list[str]) -> dict[str, dict[str, Any]]:
    return {**variants, "embedding": {"target_modules": targets}}


STANDARD = {
    "lora": {"target_modules": "all-linear"},
    "dora": {"target_modules": "all-linear", "use_dora": True},
}
MOE = {"lora": {"target_modules": ATTENTION}, "dora": {"target_modules": ATTENTION, "use_dora": True}}
FAMILIES: dict[str, Family] = {
    "qwen2": Family(
        qwen2,
        {
            **_with_embedding(STANDARD, ["embed_tokens", "q_proj", "v_proj"]),
            "lora_bias": {"target_modules": ["q_proj", "k_proj", "v_proj"], "lora_bias": True},
        },
    ),
    "qwen3": Family(qwen3, _with_embedding(STANDARD, ["embed_tokens", "q_proj", "v_proj"])),
    "mistral": Family(mistral, _with_embedding(STANDARD, ["embed_tokens", "q_proj", "v_proj"])),
    "phi3": Family(phi3, _with_embedding(STANDARD, ["embed_tokens", "qkv_proj", "gate_up_proj"])),
    "falcon": Family(falcon, _with_embedding(STANDARD, ["word_embeddings", "query_key_value"])),
    "opt": Family(opt, _with_embedding(STANDARD, ["embed_tokens", "q_proj", "fc1"])),
    "bert": Family(
        bert,
        {
            name: {**kwargs, "task_type": "SEQ_CLS"}
            for name, kwargs in _with_embedding(STANDARD, ["word_embeddings", "query", "value"]).items()
        },
        inputs=lambda ids: {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
    ),
    "t5": Family(
        t5,
        {
            "lora": {"target_modules": ["q", "k", "v", "o", "wi", "wo"]},
            "dora": {"target_modules": ["q", "k", "v", "o", "wi", "wo"], "use_dora": True},
            # tied: shared is also encoder/decoder.embed_tokens and lm_head, while PEFT wraps one of them
            "embedding": {"target_modules": ["shared", "q", "v"]},
            "stack_embedding": {"target_modules": ["embed_tokens", "q", "v"]},
        },
        inputs=lambda ids: {"input_ids": ids, "decoder_input_ids": ids.flip(-1)},
        refused={
            "embedding": (
                ao.UnsupportedAdapterError,
                r"^module shared: transformers \S+ \(T5ForConditionalGeneration\) ties shared\.weight of \S+ to "
                r"decoder\.embed_tokens\.weight, encoder\.embed_tokens\.weight, lm_head\.weight \(tied weights\)"
                r".*untie the weights first, or train the adapter without shared$",
            ),
            "stack_embedding": (
                ao.UnsupportedAdapterError,
                r"^module (de|en)coder\.embed_tokens: transformers \S+ \(T5ForConditionalGeneration\) ties "
                r"(de|en)coder\.embed_tokens\.weight of \S+ to .*shared\.weight \(tied weights\)",
            ),
        },
    ),
    "mixtral": Family(mixtral, _with_embedding(MOE, ["embed_tokens", "q_proj", "v_proj"])),
    "qwen3_moe": Family(qwen3_moe, _with_embedding(MOE, ["embed_tokens", "q_proj", "v_proj"])),
}
CASES = [(family, variant) for family in FAMILIES for variant in FAMILIES[family].variants]
IDS = torch.tensor([[3, 5, 9, 33, 64, 100, 7, 4]])


# --------------------------------------------------------------------------------------------------
# Building: checkpoints and adapters, once per family / variant
# --------------------------------------------------------------------------------------------------


def _make_adapter(family: Family, out: Path, seed: int, **kwargs: Any) -> dict[str, list[str]]:
    """A PEFT adapter for ``family``'s model, every trainable parameter random; returns the names of the
    modules PEFT wrapped with LoRA and of its modules_to_save (names of the loaded model)."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper

    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(family.factory(), config)
    trainable = sorted((n, p) for n, p in model.named_parameters() if p.requires_grad)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for name, param in trainable:
            if "lora_magnitude_vector" in name:  # PEFT's row norms, jittered: positive, and they matter
                param.mul_(0.75 + 0.5 * torch.rand_like(param))
            else:
                param.copy_(0.1 * torch.randn_like(param))
    model.peft_config["default"].base_model_name_or_path = "tiny"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(str(out), save_embedding_layers=False)
    inner = model.get_base_model()
    return {
        "lora": sorted(n for n, m in inner.named_modules() if isinstance(m, LoraLayer)),
        "saved": sorted(n for n, m in inner.named_modules() if isinstance(m, ModulesToSaveWrapper)),
    }


@functools.cache
def _checkpoints(name: str, root: Path) -> dict[str, Path]:
    model = FAMILIES[name].factory()
    paths = {"bf16": root / name / "bf16", "f32": root / name / "f32"}
    model.to(torch.bfloat16).save_pretrained(paths["bf16"], max_shard_size=SHARD)
    model.to(torch.float32).save_pretrained(paths["f32"])
    return paths


@functools.cache
def _adapter(name: str, variant: str, root: Path) -> tuple[Path, dict[str, list[str]]]:
    out = root / name / variant
    seed = 1 + sorted(FAMILIES).index(name) * 10 + sorted(FAMILIES[name].variants).index(variant)
    return out, _make_adapter(FAMILIES[name], out, seed, **FAMILIES[name].variants[variant])


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("matrix")


# --------------------------------------------------------------------------------------------------
# Reading back: the safetensors library and transformers, never adapterops
# --------------------------------------------------------------------------------------------------


def peft_model(base: Path, adapter: Path) -> Any:
    """``from_pretrained(base)`` in float32 wrapped by ``PeftModel.from_pretrained`` (the task's class)."""
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(from_pretrained(base), str(adapter)).eval()


def dora_row_factors(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """``{stored key: n / m}`` per output row of each DoRA module, from PEFT in float64: n the row norm
    of ``W + s B A``, m the magnitude (how much DoRA scales a row of the merged weight back on unmerge)."""
    from peft.tuners.lora import LoraLayer

    model = peft_model(base, adapter).double()
    out = {}
    with torch.no_grad():
        for name, layer in model.get_base_model().named_modules():
            if isinstance(layer, LoraLayer) and layer.use_dora.get("default", False):
                W = layer.get_base_layer().weight.double()
                norm = torch.linalg.vector_norm(W + layer.get_delta_weight("default"), dim=1)
                out[f"{name}.weight"] = norm / layer.lora_magnitude_vector["default"].weight.double()
    return out


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.view(torch.uint8).equal(b.view(torch.uint8))


# --------------------------------------------------------------------------------------------------
# The matrix
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "variant"), [c for c in CASES if c[1] not in FAMILIES[c[0]].refused])
def test_merge_is_what_peft_merges(name: str, variant: str, root: Path, tmp_path: Path) -> None:
    family = FAMILIES[name]
    paths = _checkpoints(name, root)
    adapter, wrapped = _adapter(name, variant, root)
    assert wrapped["lora"]
    base = stored(paths["bf16"])
    assert len(list(paths["bf16"].glob("model-*.safetensors"))) > 1

    ao.merge(paths["bf16"], [adapter], out=tmp_path / "merged", device="cpu")
    merged = stored(tmp_path / "merged")
    assert {k: (v.dtype, v.shape) for k, v in merged.items()} == {
        k: (v.dtype, v.shape) for k, v in base.items()
    }
    # exactly the tensors PEFT wrapped are rewritten (their stored names are the module names here)
    lora_bias = bool(family.variants[variant].get("lora_bias"))
    touched = {f"{m}.weight" for m in wrapped["lora"]} | {f"{m}.bias" for m in wrapped["lora"] if lora_bias}
    touched |= {k for m in wrapped["saved"] for k in base if k.startswith(f"{m}.")}
    assert touched <= set(base), sorted(touched - set(base))
    assert set(ao.plan_merge(paths["bf16"], [adapter]).updates) == touched
    for key in set(base) - touched:
        assert same_bits(merged[key], base[key]), key

    # PEFT's merge_and_unload in float32 of the bf16 base, rounded once to bf16: within 1 ulp
    with torch.no_grad():
        reference = peft_model(paths["bf16"], adapter).merge_and_unload().state_dict()
    loaded = from_pretrained(tmp_path / "merged").state_dict()
    assert set(loaded) == set(reference)
    worst = 0.0
    for key, want in reference.items():
        rounded = nearest(want.double(), torch.bfloat16).double()
        worst = max(worst, float(((loaded[key].double() - rounded).abs() / ulp_bf16(rounded)).max()))
    assert worst <= 1.0, worst

    assert ao.verify(paths["bf16"], [adapter], tmp_path / "merged").passed()

    if wrapped["saved"]:  # a modules_to_save replacement cannot be taken back out of a merged checkpoint
        with pytest.raises(ao.UnsupportedAdapterError, match=r"modules_to_save.*use the original base"):
            ao.unmerge(tmp_path / "merged", [adapter], out=tmp_path / "back", device="cpu")
        return
    ao.unmerge(tmp_path / "merged", [adapter], out=tmp_path / "back", device="cpu")
    back = stored(tmp_path / "back")
    row_factors = dora_row_factors(paths["bf16"], adapter)
    for key in base:
        if key not in touched:
            assert same_bits(back[key], base[key]), key
            continue
        error = (back[key].double() - base[key].double()).abs()
        if key in row_factors:
            # DoRA: W = W' n/m - sBA, so half a step of the merged W' comes back times n/m (its row's
            # factor), plus half a step of rounding W again
            bound = (
                row_factors[key][:, None] * ulp_bf16(merged[key].double()) / 2
                + ulp_bf16(back[key].double()) / 2
            )
            assert bool((error <= bound * (1 + 1e-9)).all()), key
            continue
        # round(round(W + d) - d): within one bf16 step of W
        scale = torch.maximum(merged[key].double().abs(), back[key].double().abs())
        assert float((error / ulp_bf16(scale)).max()) <= 1, key


@pytest.mark.parametrize(("name", "variant"), [c for c in CASES if c[1] not in FAMILIES[c[0]].refused])
def test_merged_float32_checkpoint_gives_the_peft_models_output(
    name: str, variant: str, root: Path, tmp_path: Path
) -> None:
    family = FAMILIES[name]
    paths = _checkpoints(name, root)
    adapter, _ = _adapter(name, variant, root)
    ao.merge(paths["f32"], [adapter], out=tmp_path / "merged", device="cpu")
    inputs = family.inputs(IDS)
    with torch.no_grad():
        got = from_pretrained(tmp_path / "merged")(**inputs).logits
        want = peft_model(paths["f32"], adapter)(**inputs).logits
        bare = from_pretrained(paths["f32"])(**inputs).logits
    assert (want - bare).abs().max() > 1e-3  # the adapter changes the output
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("name", "variant"), [(n, v) for n in FAMILIES for v in FAMILIES[n].refused])
def test_refused_with_one_clear_line(name: str, variant: str, root: Path, tmp_path: Path) -> None:
    error, pattern = FAMILIES[name].refused[variant]
    paths = _checkpoints(name, root)
    adapter, _ = _adapter(name, variant, root)
    with pytest.raises(error, match=pattern) as raised:
        ao.merge(paths["bf16"], [adapter], out=tmp_path / "merged", device="cpu")
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "merged").exists()
