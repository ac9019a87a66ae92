"""Shared fixtures: a zoo of tiny PEFT-made adapters, built once per test session, on demand."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.support.factories import make_adapter, tiny_conv, tiny_gpt2, tiny_llama
from tests.support.fakehub import fake_hf_api, fake_snapshots  # noqa: F401  (fixtures)
from tests.support.hubserver import fake_hub  # noqa: F401  (fixture)

LLAMA_ATTN = ["q_proj", "v_proj"]


@dataclass(frozen=True)
class Spec:
    factory: Callable[..., Any]
    seed: int
    kwargs: dict[str, Any]


ZOO: dict[str, Spec] = {
    # rank/alpha patterns: v_proj at r=2, layer-1 q_proj at alpha 3
    "llama_a": Spec(
        tiny_llama,
        1,
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "down_proj"],
            rank_pattern={"v_proj": 2},
            alpha_pattern={"layers.1.self_attn.q_proj": 3},
        ),
    ),
    # rsLoRA, other targets, other rank
    "llama_b": Spec(
        tiny_llama,
        2,
        dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "k_proj", "up_proj"]),
    ),
    "llama_emb": Spec(tiny_llama, 3, dict(r=4, lora_alpha=4, target_modules=["embed_tokens", "q_proj"])),
    "llama_emb_b": Spec(tiny_llama, 13, dict(r=2, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])),
    "llama_mts": Spec(
        tiny_llama, 4, dict(r=4, lora_alpha=8, target_modules=LLAMA_ATTN, modules_to_save=["lm_head"])
    ),
    "llama_bf16": Spec(
        tiny_llama, 6, dict(r=4, lora_alpha=8, target_modules=LLAMA_ATTN, save_dtype=torch.bfloat16)
    ),
    "llama_bf16_b": Spec(
        tiny_llama, 7, dict(r=6, lora_alpha=6, target_modules=LLAMA_ATTN, save_dtype=torch.bfloat16)
    ),
    "llama_fp16": Spec(
        tiny_llama, 14, dict(r=4, lora_alpha=8, target_modules=LLAMA_ATTN, save_dtype=torch.float16)
    ),
    "llama_fp16_b": Spec(
        tiny_llama, 15, dict(r=2, lora_alpha=4, target_modules=["q_proj"], save_dtype=torch.float16)
    ),
    "llama_dora": Spec(tiny_llama, 8, dict(r=4, lora_alpha=8, target_modules=LLAMA_ATTN, use_dora=True)),
    "gpt2_a": Spec(
        tiny_gpt2, 9, dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    ),
    "gpt2_b": Spec(tiny_gpt2, 10, dict(r=2, lora_alpha=2, target_modules=["c_attn"], fan_in_fan_out=True)),
    "gpt2_bias": Spec(
        tiny_gpt2, 5, dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, lora_bias=True)
    ),
    "conv_a": Spec(tiny_conv, 11, dict(r=2, lora_alpha=4, target_modules=["conv1", "conv2"])),
    "conv_b": Spec(tiny_conv, 12, dict(r=3, lora_alpha=3, target_modules=["conv1", "conv2"])),
}


class Zoo:
    """``zoo["llama_a"]`` builds that adapter the first time it is asked for, under one session folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.paths: dict[str, Path] = {}

    def __getitem__(self, name: str) -> Path:
        if name not in self.paths:
            spec = ZOO[name]
            self.paths[name] = make_adapter(
                spec.factory, self.root / name, seed=spec.seed, **dict(spec.kwargs)
            )
        return self.paths[name]

    def factory(self, name: str) -> Callable[..., Any]:
        return ZOO[name].factory


@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    return Zoo(tmp_path_factory.mktemp("zoo"))
