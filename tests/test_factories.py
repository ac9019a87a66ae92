"""The test factories build real models/adapters and PEFT's own deltas match hand-computed ones."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.support.factories import (
    base_logits,
    make_adapter,
    peft_bias_deltas,
    peft_deltas,
    peft_logits,
    peft_merged_state_dict,
    save_base_checkpoint,
    tiny_conv,
    tiny_gpt2,
    tiny_llama,
)

PREFIX = "base_model.model."


def _factors(adapter_dir: Path, module: str, *, embedding: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) in float64 from the saved safetensors file, for a module name relative to the base model."""
    sd = load_file(str(adapter_dir / "adapter_model.safetensors"))
    if embedding:
        a, b = sd[f"{PREFIX}{module}.lora_embedding_A"], sd[f"{PREFIX}{module}.lora_embedding_B"]
    else:
        a, b = sd[f"{PREFIX}{module}.lora_A.weight"], sd[f"{PREFIX}{module}.lora_B.weight"]
    return a.double(), b.double()


def _assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == torch.float64
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


def test_models_are_seeded_and_leave_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a, b, c = tiny_llama(), tiny_llama(), tiny_llama(seed=1)
    assert torch.equal(torch.rand(3), expected)

    key = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(a.state_dict()[key], b.state_dict()[key])
    assert not torch.equal(a.state_dict()[key], c.state_dict()[key])
    assert a.config.hidden_size == 32 and a.config.num_key_value_heads == 2 and a.config.vocab_size == 128
    assert tiny_llama(dtype=torch.bfloat16).dtype == torch.bfloat16

    tied = tiny_llama(tie_word_embeddings=True)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight

    gpt2 = tiny_gpt2()
    assert gpt2.state_dict()["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)  # Conv1D: (in, out)
    assert torch.equal(
        gpt2.state_dict()["transformer.wte.weight"], tiny_gpt2().state_dict()["transformer.wte.weight"]
    )

    conv = tiny_conv()
    assert isinstance(conv.conv1, torch.nn.Conv2d) and conv(torch.randn(2, 3, 6, 6)).shape == (2, 10)


# --------------------------------------------------------------------------------------------------
# Adapters and reference deltas
# --------------------------------------------------------------------------------------------------


def test_adapters_differ_by_seed_and_are_reproducible(tmp_path: Path) -> None:
    kwargs: dict[str, Any] = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    a = load_file(
        str(make_adapter(tiny_llama, tmp_path / "a", seed=1, **kwargs) / "adapter_model.safetensors")
    )
    a2 = load_file(
        str(make_adapter(tiny_llama, tmp_path / "a2", seed=1, **kwargs) / "adapter_model.safetensors")
    )
    b = load_file(
        str(make_adapter(tiny_llama, tmp_path / "b", seed=2, **kwargs) / "adapter_model.safetensors")
    )
    assert a.keys() == b.keys() == a2.keys()
    assert all(torch.equal(a[k], a2[k]) for k in a)
    assert all(not torch.equal(a[k], b[k]) for k in a)
    assert all(v.abs().max() > 0 for v in a.values())  # lora_B is not zero

    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny-llama"
    assert config["r"] == 4 and config["lora_alpha"] == 8


def test_llama_delta_is_scaled_b_times_a(tmp_path: Path) -> None:
    adapter = make_adapter(
        tiny_llama, tmp_path / "ad", seed=3, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]
    )
    deltas = peft_deltas(tiny_llama, adapter)
    assert sorted(deltas) == [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]
    for name, delta in deltas.items():
        a, b = _factors(adapter, name)
        _assert_close(delta, (8 / 4) * b @ a)
    assert deltas["model.layers.0.self_attn.v_proj"].shape == (16, 32)  # 2 kv heads x head_dim 8

    # merge_and_unload agrees, and the unmerged forward actually uses the adapter.
    merged = peft_merged_state_dict(tiny_llama, adapter)
    base = tiny_llama().double().state_dict()
    for name, delta in deltas.items():
        _assert_close(merged[f"{name}.weight"] - base[f"{name}.weight"], delta)
    ids = torch.tensor([[1, 5, 9, 64, 127]])
    logits = peft_logits(tiny_llama, adapter, ids)
    assert logits.dtype == torch.float64 and logits.shape == (1, 5, 128)
    assert not torch.allclose(logits, base_logits(tiny_llama, ids))


def test_bf16_adapter_loads_into_float64(tmp_path: Path) -> None:
    adapter = make_adapter(
        tiny_llama,
        tmp_path / "ad",
        seed=4,
        save_dtype=torch.bfloat16,
        r=2,
        lora_alpha=2,
        target_modules=["o_proj"],
    )
    sd = load_file(str(adapter / "adapter_model.safetensors"))
    assert {v.dtype for v in sd.values()} == {torch.bfloat16}
    for name, delta in peft_deltas(tiny_llama, adapter).items():
        a, b = _factors(adapter, name)  # exact: bf16 values are representable in float64
        _assert_close(delta, b @ a)


def test_gpt2_fan_in_fan_out_delta_is_transposed(tmp_path: Path) -> None:
    adapter = make_adapter(
        tiny_gpt2,
        tmp_path / "ad",
        seed=5,
        r=4,
        lora_alpha=16,
        target_modules=["c_attn", "c_fc"],
        fan_in_fan_out=True,
    )
    deltas = peft_deltas(tiny_gpt2, adapter)
    assert len(deltas) == 4
    for name, delta in deltas.items():
        a, b = _factors(adapter, name)
        _assert_close(delta, ((16 / 4) * b @ a).T)
    assert deltas["transformer.h.0.attn.c_attn"].shape == (32, 96)  # Conv1D layout (in, out)


def test_gpt2_lora_bias(tmp_path: Path) -> None:
    adapter = make_adapter(
        tiny_gpt2, tmp_path / "ad", seed=6, r=2, lora_alpha=4, target_modules=["c_attn"], lora_bias=True
    )
    sd = load_file(str(adapter / "adapter_model.safetensors"))
    for name, delta in peft_bias_deltas(tiny_gpt2, adapter).items():
        _assert_close(delta, 2.0 * sd[f"{PREFIX}{name}.lora_B.bias"].double())


def test_rslora_scale(tmp_path: Path) -> None:
    adapter = make_adapter(
        tiny_llama, tmp_path / "ad", seed=7, r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj"]
    )
    for name, delta in peft_deltas(tiny_llama, adapter).items():
        a, b = _factors(adapter, name)
        _assert_close(delta, (8 / math.sqrt(4)) * b @ a)


def test_rank_and_alpha_patterns(tmp_path: Path) -> None:
    adapter = make_adapter(
        tiny_llama,
        tmp_path / "ad",
        seed=8,
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        rank_pattern={"model.layers.0.self_attn.q_proj": 2, "v_proj": 6},
        alpha_pattern={"model.layers.1.self_attn.q_proj": 3},
    )
    expected = {  # module -> (r, alpha)
        "model.layers.0.self_attn.q_proj": (2, 8),
        "model.layers.1.self_attn.q_proj": (4, 3),
        "model.layers.0.self_attn.v_proj": (6, 8),
        "model.layers.1.self_attn.v_proj": (6, 8),
    }
    deltas = peft_deltas(tiny_llama, adapter)
    assert deltas.keys() == expected.keys()
    for name, (r, alpha) in expected.items():
        a, b = _factors(adapter, name)
        assert a.shape[0] == b.shape[1] == r
        _assert_close(deltas[name], (alpha / r) * b @ a)


def test_embedding_lora(tmp_path: Path) -> None:
    adapter = make_adapter(
        tiny_llama, tmp_path / "ad", seed=9, r=4, lora_alpha=4, target_modules=["embed_tokens"]
    )
    sd = load_file(str(adapter / "adapter_model.safetensors"))
    # PEFT also saves the (base) embedding weight whenever an embedding layer is targeted.
    assert set(sd) == {
        f"{PREFIX}model.embed_tokens.{k}"
        for k in ("lora_embedding_A", "lora_embedding_B", "base_layer.weight")
    }
    a, b = _factors(adapter, "model.embed_tokens", embedding=True)
    assert a.shape == (4, 128) and b.shape == (32, 4)
    (delta,) = peft_deltas(tiny_llama, adapter).values()
    assert delta.shape == (128, 32)
    _assert_close(delta, (b @ a).T)


@pytest.mark.parametrize("use_dora", [False, True])
def test_conv_lora(tmp_path: Path, use_dora: bool) -> None:
    adapter = make_adapter(
        tiny_conv,
        tmp_path / "ad",
        seed=10,
        r=2,
        lora_alpha=4,
        target_modules=["conv1", "conv2"],
        use_dora=use_dora,
    )
    deltas = peft_deltas(tiny_conv, adapter)
    assert deltas["conv1"].shape == (8, 3, 3, 3) and deltas["conv2"].shape == (8, 8, 1, 1)
    merged = peft_merged_state_dict(tiny_conv, adapter)
    base = tiny_conv().double().state_dict()
    for name, delta in deltas.items():
        _assert_close(merged[f"{name}.weight"] - base[f"{name}.weight"], delta)
    if not use_dora:  # conv2 is 1x1: delta = s * B[:, :, 0, 0] @ A[:, :, 0, 0]
        a, b = _factors(adapter, "conv2")
        _assert_close(deltas["conv2"][:, :, 0, 0], 2.0 * b[:, :, 0, 0] @ a[:, :, 0, 0])
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    assert peft_logits(tiny_conv, adapter, x).shape == (2, 10)


# --------------------------------------------------------------------------------------------------
# Base checkpoints
# --------------------------------------------------------------------------------------------------


def test_save_base_checkpoint(tmp_path: Path) -> None:
    single = save_base_checkpoint(tiny_llama, tmp_path / "single")
    assert (single / "model.safetensors").exists() and (single / "config.json").exists()
    sd = load_file(str(single / "model.safetensors"))
    assert {v.dtype for v in sd.values()} == {torch.bfloat16}
    assert torch.equal(sd["model.norm.weight"], tiny_llama().state_dict()["model.norm.weight"].bfloat16())

    sharded = save_base_checkpoint(tiny_llama, tmp_path / "sharded", max_shard_size="20KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((sharded / s).exists() for s in shards)
    assert set(index["weight_map"]) == set(sd)

    tied = save_base_checkpoint(functools.partial(tiny_llama, tie_word_embeddings=True), tmp_path / "tied")
    assert "lm_head.weight" not in load_file(str(tied / "model.safetensors"))

    conv = save_base_checkpoint(tiny_conv, tmp_path / "conv", dtype=torch.float32, max_shard_size=300)
    conv_index = json.loads((conv / "model.safetensors.index.json").read_text())
    assert set(conv_index["weight_map"]) == set(tiny_conv().state_dict())
