"""PEFT's adapter_config.json semantics: which configs adapterops can reproduce exactly, each
module's r and lora_alpha (``rank_pattern``/``alpha_pattern`` resolved the way PEFT resolves
them), and the config that states an output's scales exactly.

Per-module rank and alpha follow PEFT's own resolution (``peft.utils.other.get_pattern_key``):
the first key of rank_pattern / alpha_pattern that matches ``(.*\\.)?(key)$`` wins.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from adapterops.adapter import Adapter
from adapterops.errors import AdapterFormatError, NotFoundError, UnsupportedAdapterError

CONFIG_NAME = "adapter_config.json"

# init_lora_weights values whose adapters are deltas against a *modified* base weight.
_BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
# Config fields that change what a module computes beyond dW = scale * B @ A (value: why).
_UNSUPPORTED_FIELDS = {
    "use_qalora": "QA-LoRA pools inputs before A",
    "use_bdlora": "BD-LoRA uses block-diagonal factors",
    "alora_invocation_tokens": "activated LoRA applies its update only after invocation tokens",
    "target_parameters": "LoRA on nn.Parameter targets (MoE experts) uses a different layout",
    "layer_replication": "layer replication changes the base model's layer list",
    "trainable_token_indices": "trainable tokens store sparse embedding rows, not LoRA factors",
    "arrow_config": "Arrow routing mixes adapters per token",
    "velora_config": "VeLoRA changes the forward pass",
    "monteclora_config": "MonteCLoRA samples its factors",
    "kasa_config": "KaSA adds a singular-value scaling between A and B",
}
# Fields of the source config that describe the base model and carry over to outputs unchanged.
PASSTHROUGH_FIELDS = (
    "base_model_name_or_path",
    "revision",
    "task_type",
    "fan_in_fan_out",
    "modules_to_save",
    "bias",
    "auto_mapping",
)


def get_pattern_key(pattern_keys: Iterable[str], key_to_match: str) -> str:
    """PEFT's matcher, verbatim in behaviour: the first pattern matching the module name wins."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", key_to_match):
            return key
    return key_to_match


def module_rank_alpha(config: Mapping[str, Any], module: str) -> tuple[int, float]:
    """(r, lora_alpha) PEFT gives ``module`` under ``config``, patterns resolved."""
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), config.get("r", 8))
    alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), config.get("lora_alpha", 8))
    return int(r), float(alpha)


def lora_scale(r: int, alpha: float, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def read_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise NotFoundError(
            f"{directory}: no {CONFIG_NAME}; expected a PEFT adapter directory "
            "(the folder PeftModel.save_pretrained writes)"
        )
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFormatError(f"{path}: not valid JSON ({exc}); re-save the adapter with PEFT") from exc
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{path}: expected a JSON object, found {type(config).__name__}")
    check_config(config, path)
    return config


def check_config(config: Mapping[str, Any], path: Path | str) -> None:
    """Refuse configs whose modules do not mean dW = scale * B @ A (plus DoRA, handled elsewhere)."""
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise UnsupportedAdapterError(
            f"{path}: peft_type is {peft_type}; adapterops handles LoRA adapters (peft_type LORA) only"
        )
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_MODIFYING_INITS):
        raise UnsupportedAdapterError(
            f"{path}: init_lora_weights={init!r} trains against a modified base weight, so its factors are "
            "not a delta on the original base; convert it to a plain LoRA first with PEFT's "
            "save_pretrained(path_initial_model_for_weight_conversion=...)"
        )
    if isinstance(init, str) and init.lower() == "mica":
        raise UnsupportedAdapterError(
            f"{path}: init_lora_weights='mica' is a LoRA variant adapterops cannot reproduce"
        )
    for key in ("r", "lora_alpha"):
        value = config.get(key, 8)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise AdapterFormatError(
                f"{path}: {key} must be a positive number, got {value!r}; fix {CONFIG_NAME}"
            )
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and v > 0 for v in pattern.values()
        ):
            raise AdapterFormatError(
                f"{path}: {key} must map module patterns to positive numbers, got {pattern!r}; fix {CONFIG_NAME}"
            )
    for name, why in _UNSUPPORTED_FIELDS.items():
        if config.get(name):
            raise UnsupportedAdapterError(
                f"{path}: {name} is set ({why}); adapterops cannot reproduce this adapter exactly"
            )


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else float(value)


def output_config(adapter: Adapter) -> dict[str, Any]:
    """An adapter_config.json that reproduces every module's scale exactly, without rsLoRA.

    Each module's lora_alpha is ``scale * r``; the most common r and alpha become the defaults and
    the rest go into rank_pattern / alpha_pattern, keyed by full module name.
    """
    modules = adapter.modules.values()
    ranks = {m.name: m.rank for m in modules}
    alphas = {m.name: _number(m.scale * m.rank) for m in modules}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "base_model_name_or_path": None,
        "task_type": None,
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {n: v for n, v in ranks.items() if v != r},
        "alpha_pattern": {n: v for n, v in alphas.items() if v != alpha},
        "target_modules": sorted(ranks),
        "use_rslora": False,
        "use_dora": adapter.is_dora,
        "lora_bias": any(m.bias is not None for m in modules),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    config.update({k: v for k, v in adapter.config.items() if k in PASSTHROUGH_FIELDS})
    for name in ranks:  # the patterns must resolve back to what we mean, the way PEFT reads them
        got_r, got_alpha = module_rank_alpha(config, name)
        if got_r != ranks[name] or not math.isclose(got_alpha, alphas[name], rel_tol=1e-15):
            raise AdapterFormatError(
                f"module {name}: rank/alpha patterns would resolve to r={got_r}, alpha={got_alpha} instead of "
                f"r={ranks[name]}, alpha={alphas[name]} (module names overlap); please report this"
            )
    return config
