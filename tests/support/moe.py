"""Tiny mixture-of-experts models, and what PEFT computes for LoRA on their expert weights.

transformers 5 keeps experts fused in memory: ``mlp.experts.gate_up_proj`` (E, 2I, H) and
``mlp.experts.down_proj`` (E, H, I) for Mixtral and Qwen3-MoE (their ``save_pretrained`` writes
per-expert ``block_sparse_moe.experts.N.w1/w3/w2`` resp. ``mlp.experts.N.gate_proj/up_proj/down_proj``
2-D tensors), and (E, H, 2I) / (E, I, H) for gpt-oss (``is_transposed``; saved fused as they are).
PEFT targets them with ``target_parameters`` (its ``ParamWrapper``); ``target_modules="all-linear"``
adds them, and the router's ``gate.weight``, by itself.

Each factory builds one decoder layer (hidden 32, 4 experts, top 2, vocab 128) from a seed without
touching the global RNG, like ``tests.support.factories``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tests.support.factories import _EAGER, HIDDEN_SIZE, VOCAB_SIZE, _load_peft, _quiet, _seeded

EXPERTS = 4
_COMMON: dict[str, Any] = {
    "hidden_size": HIDDEN_SIZE,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": VOCAB_SIZE,
    "max_position_embeddings": 64,
    "num_experts_per_tok": 2,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "experts_implementation": "eager",  # the grouped_mm kernels take no float64
    **_EAGER,
}


def _build(model_class: Any, config: Any, seed: int) -> Any:
    with _seeded(seed), _quiet():
        model = model_class(config)
    return model.eval()


def tiny_mixtral(seed: int = 0) -> Any:
    """Mixtral: 4 experts of intermediate size 24 (gate_up_proj (4, 48, 32), down_proj (4, 32, 24))."""
    from transformers import MixtralConfig, MixtralForCausalLM

    return _build(
        MixtralForCausalLM, MixtralConfig(intermediate_size=24, num_local_experts=EXPERTS, **_COMMON), seed
    )


def tiny_qwen3_moe(seed: int = 0) -> Any:
    """Qwen3-MoE: 4 experts of intermediate size 24, head_dim 8."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        intermediate_size=64, moe_intermediate_size=24, num_experts=EXPERTS, head_dim=8, **_COMMON
    )
    return _build(Qwen3MoeForCausalLM, config, seed)


def tiny_gpt_oss(seed: int = 0) -> Any:
    """gpt-oss: 4 experts of intermediate size 16, stored (E, in, out): gate_up_proj (4, 32, 32) is
    square, so only the model type says which way round it is; down_proj (4, 16, 32) is not."""
    from transformers import GptOssConfig, GptOssForCausalLM

    config = GptOssConfig(
        intermediate_size=16,
        num_local_experts=EXPERTS,
        head_dim=8,
        layer_types=["full_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        **_COMMON,
    )
    return _build(GptOssForCausalLM, config, seed)


def in_dtype(factory: Callable[..., Any], dtype: torch.dtype) -> Callable[[], Any]:
    """``factory``'s model rounded to ``dtype`` (what a checkpoint saved in ``dtype`` holds)."""

    def build() -> Any:
        return factory().to(dtype)

    build.__name__ = getattr(factory, "__name__", "model")
    return build


def peft_parameter_deltas(factory: Callable[..., Any], adapter_dir: str | Path) -> dict[str, torch.Tensor]:
    """``{parameter name: float64 delta}`` from PEFT's ``ParamWrapper.get_delta_weight``, as (E, out, in)
    (transposed back where the parameter is stored (E, in, out)); (out, in) for a 2-D parameter."""
    from peft.tuners.lora.layer import ParamWrapper

    peft_model = _load_peft(factory, adapter_dir, torch.float64)
    out = {}
    with torch.no_grad():
        for name, layer in peft_model.get_base_model().named_modules():
            if not isinstance(layer, ParamWrapper):
                continue
            delta = layer.get_delta_weight("default").detach().clone()
            assert delta.dtype == torch.float64
            if layer.num_experts > 1 and not layer._did_swap_in_out_features:
                delta = delta.transpose(1, 2)
            out[f"{name.replace('.base_layer', '')}.{layer.parameter_name}"] = delta
    return out


def wrapper_order(factory: Callable[..., Any], adapter_dir: str | Path) -> dict[str, list[str]]:
    """``{module: its wrapped parameter names, innermost first}`` as PEFT nests them."""
    from peft.tuners.lora.layer import ParamWrapper

    peft_model = _load_peft(factory, adapter_dir, torch.float32)
    depths: dict[str, dict[int, str]] = {}
    for name, layer in peft_model.get_base_model().named_modules():
        if isinstance(layer, ParamWrapper):
            depths.setdefault(name.replace(".base_layer", ""), {})[name.count(".base_layer")] = (
                layer.parameter_name
            )
    return {module: [by[d] for d in sorted(by, reverse=True)] for module, by in depths.items()}
