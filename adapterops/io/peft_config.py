"""PEFT's adapter_config.json semantics: which configs adapterops can reproduce exactly, each
module's r and lora_alpha (``rank_pattern``/``alpha_pattern`` resolved the way PEFT resolves
them), and the config that states an output's scales exactly.

Per-module rank and alpha follow PEFT's own resolution (``peft.utils.other.get_pattern_key``):
the first key of rank_pattern / alpha_pattern that matches ``(.*\\.)?(key)$`` wins. The config is
untrusted: r and lora_alpha must be real numbers in range (Python's json reads NaN and Infinity),
and a key can neither hang the matcher nor be read differently from PEFT (see "Pattern keys" below).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapterops.adapter import Adapter, join_experts, parameter_groups
from adapterops.errors import AdapterFormatError, NotFoundError, UnsupportedAdapterError
from adapterops.io.patterns import MAX_PATTERN, matcher, shown
from adapterops.io.refs import inside

CONFIG_NAME = "adapter_config.json"
MAX_CONFIG_BYTES = 10_000_000  # PEFT writes a few kB; reading more would only spend memory

# init_lora_weights values whose adapters are deltas against a *modified* base weight.
_BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
# Config fields that change what a module computes beyond dW = scale * B @ A (value: why).
_UNSUPPORTED_FIELDS = {
    "use_qalora": "QA-LoRA pools inputs before A",
    "use_bdlora": "BD-LoRA uses block-diagonal factors",
    "alora_invocation_tokens": "activated LoRA applies its update only after invocation tokens",
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
    "ensure_weight_tying",  # written only when true: PEFT ties the adapter's copies of tied layers
)


# The order in which a module's parameters are wrapped when several are targeted: the order the
# module registers them (PEFT walks ``named_parameters``), the first innermost. transformers'
# fused experts register gate_up_proj before down_proj; PEFT's own v4 -> v5 conversion assumes the
# same ("the gate_up_proj is the inner PEFT ParamWrapper"). tests/test_experts.py checks it.
WRAP_ORDER = ("gate_up_proj", "down_proj")
BASE_LAYER = ".base_layer"


def get_pattern_key(pattern_keys: Iterable[str], key_to_match: str) -> str:
    r"""PEFT's matcher, verbatim in behaviour: the first key whose ``(.*\.)?(key)$`` matches wins.

    Matching cannot hang on a hostile key (see ``patterns.matcher``). Raises ``AdapterFormatError`` for a
    key that is not a usable pattern, or a module name too long to match patterns against.
    """
    keys = list(pattern_keys)
    if keys and len(key_to_match) > MAX_PATTERN:
        raise AdapterFormatError(
            f"module name {key_to_match[:60]!r}... is {len(key_to_match):,} characters, more than the "
            f"{MAX_PATTERN:,} adapterops matches patterns against; no real module name is that long"
        )
    for key in keys:
        if matcher(key)(key_to_match):
            return key
    return key_to_match


def module_rank_alpha(
    config: Mapping[str, Any], module: str, where: Path | str = CONFIG_NAME
) -> tuple[int, float]:
    """(r, lora_alpha) PEFT gives ``module`` under ``config``, patterns resolved; ``where`` names the
    config file in errors. ``config`` is assumed checked (``check_config``)."""
    found = []
    for field, default in (
        ("rank_pattern", config.get("r", 8)),
        ("alpha_pattern", config.get("lora_alpha", 8)),
    ):
        pattern = config.get(field) or {}
        try:
            found.append(pattern.get(get_pattern_key(pattern.keys(), module), default))
        except AdapterFormatError as exc:
            raise AdapterFormatError(f"{where}: {field}: {exc}; fix {CONFIG_NAME}") from None
    return int(found[0]), float(found[1])


def _targets_module(config: Mapping[str, Any], module: str) -> bool:
    """PEFT's target_modules test for one module name (a list: exact or ``.name`` suffix; a string: regex)."""
    targets = config.get("target_modules")
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith(f".{t}") for t in targets or ())


def _matches_parameter(module: str, entry: str) -> bool:
    key = f"{module}.{entry.rpartition('.')[2]}"
    return key == entry or key.endswith(f".{entry}")


def parameter_targets(
    config: Mapping[str, Any], shapes: Mapping[str, tuple[int, int]], where: Path | str
) -> dict[str, tuple[str, str]]:
    """Which LoRA key prefixes are ``target_parameters`` wrappers: ``{prefix: (module, parameter)}``.

    ``shapes`` maps each key prefix of the file (``model.layers.0.mlp.experts.base_layer``) to its
    (lora_A columns, lora_B rows), i.e. (in, out). PEFT nests the wrappers of several parameters of
    one module, the first wrapped innermost (most ``.base_layer``); ``WRAP_ORDER`` says which that
    is. A module that target_modules names is a module target, as PEFT allows no parameter
    wrapper on it. A bare entry (``down_proj``) could name a parameter of any module: where entries
    that name the module (``gate.weight``) account for all its wrappers, they decide.
    """
    wanted = list(config.get("target_parameters") or ())
    if not wanted:
        return {}
    depths: dict[str, dict[int, str]] = {}
    for prefix in shapes:
        module, depth = prefix, 0
        while module.endswith(BASE_LAYER):
            module, depth = module.removesuffix(BASE_LAYER), depth + 1
        depths.setdefault(module, {})[depth] = prefix
    found: dict[str, tuple[str, str]] = {}
    for module, by_depth in depths.items():
        # PEFT's match: <module>.<parameter> equals an entry or ends with "." + entry
        matching = [t for t in wanted if _matches_parameter(module, t)]
        candidates = list(dict.fromkeys(t.rpartition(".")[2] for t in matching))
        specific = list(dict.fromkeys(t.rpartition(".")[2] for t in matching if "." in t))
        if len(specific) == len(by_depth):  # entries that name the module ("gate.weight") beat bare names
            candidates = specific
        if not candidates or (set(by_depth) == {0} and _targets_module(config, module)):
            if set(by_depth) != {0}:
                raise AdapterFormatError(
                    f"{where}: {by_depth[max(by_depth)]} holds nested LoRA weights but no target_parameters "
                    f"entry names a parameter of {module}; the config does not belong to these weights"
                )
            continue
        count = len(by_depth)
        if sorted(by_depth) != list(range(count)):
            raise AdapterFormatError(
                f"{where}: the LoRA weights of {module} skip a nesting level (base_layer)"
            )
        if count == len(candidates) == 1:
            found[by_depth[0]] = (module, candidates[0])
            continue
        order = [p for p in WRAP_ORDER if p in candidates]
        if count != len(candidates) or len(order) != count:
            raise UnsupportedAdapterError(
                f"{where}: {module} has {count} LoRA-wrapped parameter(s) and target_parameters names {candidates} "
                f"for it; adapterops cannot tell which weights belong to which parameter (it knows the nesting "
                f"order of {' and '.join(WRAP_ORDER)} only)"
            )
        for position, parameter in enumerate(order):  # the first in WRAP_ORDER is the innermost
            found[by_depth[count - 1 - position]] = (module, parameter)
        if order == list(WRAP_ORDER):
            inner, outer = shapes[by_depth[1]], shapes[by_depth[0]]
            if inner[0] != outer[1]:  # gate_up_proj reads the hidden state that down_proj writes
                raise AdapterFormatError(
                    f"{where}: {module}: gate_up_proj takes inputs of size {inner[0]} but down_proj writes "
                    f"{outer[1]}; the nesting of its LoRA weights is not PEFT's"
                )
    return found


def lora_scale(r: int, alpha: float, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def read_config(directory: Path) -> dict[str, Any]:
    """``adapter_config.json`` of ``directory``, parsed and checked (``check_config``)."""
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise NotFoundError(
            f"{directory}: no {CONFIG_NAME}; expected a PEFT adapter directory "
            "(the folder PeftModel.save_pretrained writes)"
        )
    inside(directory, path)  # a link that leads out of the adapter directory is not followed
    if (size := path.stat().st_size) > MAX_CONFIG_BYTES:
        raise AdapterFormatError(
            f"{path}: {size:,} bytes, far more than any adapter config (limit {MAX_CONFIG_BYTES:,}); "
            "re-save the adapter with PEFT"
        )
    try:
        config = json.loads(path.read_bytes().decode("utf-8"))
    except RecursionError:  # json's C parser recurses once per nesting level
        raise AdapterFormatError(f"{path}: JSON nested too deeply; re-save the adapter with PEFT") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4300 digits
        raise AdapterFormatError(
            f"{path}: not valid JSON ({shown(str(exc))}); re-save the adapter with PEFT"
        ) from None
    if not isinstance(config, dict):
        raise AdapterFormatError(
            f"{path}: expected a JSON object, found {type(config).__name__}; re-save the adapter with PEFT"
        )
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
    for key, rule in (("r", _RANK), ("lora_alpha", _ALPHA)):
        value = config.get(key, 8)
        if not rule.holds(value):
            raise AdapterFormatError(
                f"{path}: {key} must be a positive number, got {shown(value)} ({rule.text}); "
                f"fix {CONFIG_NAME}"
            )
    for key, rule in (("rank_pattern", _RANK), ("alpha_pattern", _ALPHA)):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict):
            raise AdapterFormatError(
                f"{path}: {key} must map module patterns to positive numbers, got {shown(pattern)}; "
                f"fix {CONFIG_NAME}"
            )
        for name, value in pattern.items():
            if not rule.holds(value):
                raise AdapterFormatError(
                    f"{path}: {key} must map module patterns to positive numbers, got {shown(value)} for "
                    f"{shown(name)} ({rule.text}); fix {CONFIG_NAME}"
                )
            try:
                matcher(name)
            except AdapterFormatError as exc:
                raise AdapterFormatError(f"{path}: {key}: {exc}; fix {CONFIG_NAME}") from None
    # each of these changes the math: a string such as "false" is refused, not read as truthy
    for key in ("use_rslora", "use_dora", "fan_in_fan_out"):
        value = config.get(key)
        if value is not None and not isinstance(value, bool):
            raise AdapterFormatError(
                f"{path}: {key} must be true or false, got {shown(value)}; fix {CONFIG_NAME}"
            )
    targets = config.get("target_parameters")
    if targets is not None and not (isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        # a string would be read character by character, as a list of one-letter parameter names
        raise AdapterFormatError(
            f"{path}: target_parameters must be a list of parameter names, got {shown(targets)}; fix {CONFIG_NAME}"
        )
    for name, why in _UNSUPPORTED_FIELDS.items():
        if config.get(name):
            raise UnsupportedAdapterError(
                f"{path}: {name} is set ({why}); adapterops cannot reproduce this adapter exactly"
            )


@dataclass(frozen=True)
class _Rule:
    """What a rank or an alpha may be: JSON numbers only (booleans are not), finite, within bounds."""

    whole: bool
    text: str

    def holds(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if self.whole:
            return isinstance(value, int) and 0 < value <= MAX_RANK
        return math.isfinite(value) and 0 < value <= MAX_ALPHA


MAX_RANK = 2**31 - 1  # torch sizes a LoRA factor by r: beyond this no adapter exists
# NaN, Infinity and 1e308 parse as JSON numbers in Python: none is a real lora_alpha. Scaling an adapter
# (adapterops scale --by F) multiplies alpha, so the bound is generous: beyond 1e30 any float32 update
# overflows anyway, and the merge refuses non-finite results on its own.
MAX_ALPHA = 1e30
_RANK = _Rule(whole=True, text=f"a whole number from 1 to {MAX_RANK:,}")
_ALPHA = _Rule(whole=False, text=f"a finite number above 0, at most {MAX_ALPHA:g}")


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else float(value)


def output_config(adapter: Adapter) -> dict[str, Any]:
    """An adapter_config.json that reproduces every module's scale exactly, without rsLoRA.

    Each module's lora_alpha is ``scale * r``; the most common r and alpha become the defaults and
    the rest go into rank_pattern / alpha_pattern, keyed by full module name. Parameter targets
    (``ModuleKind.PARAMETER``) are listed in target_parameters and keyed by the parameter's name,
    with the r and scale that ``join_experts`` gives all of its experts.
    """
    modules = [m for m in adapter.modules.values() if m.target is None]
    groups = parameter_groups(adapter.modules.values())
    ranks = {m.name: m.rank for m in modules}
    alphas = {m.name: _number(m.scale * m.rank) for m in modules}
    for tensor, experts in groups.items():
        ranks[tensor] = max(m.rank for m in experts)
        alphas[tensor] = _number(join_experts(experts)[2] * ranks[tensor])
    holders = {m.target.module for experts in groups.values() for m in experts if m.target is not None}
    clash = holders & {m.name for m in modules}
    if clash:
        raise AdapterFormatError(
            f"module {sorted(clash)[0]} is targeted both as a layer and for a parameter (target_parameters); "
            "PEFT cannot load such an adapter: save them as separate adapters"
        )
    if groups and (adapter.is_dora or any(m.bias is not None for m in modules)):
        raise UnsupportedAdapterError(
            "an adapter with target_parameters (LoRA on expert weights) cannot also use DoRA or lora_bias: "
            "PEFT's ParamWrapper supports neither; save them as separate adapters"
        )
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
        "target_modules": sorted(m.name for m in modules),
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
    if groups:
        config["target_parameters"] = sorted(groups)
    config.update({k: v for k, v in adapter.config.items() if k in PASSTHROUGH_FIELDS})
    if not config.get("ensure_weight_tying"):
        config.pop("ensure_weight_tying", None)
    for name in ranks:  # the patterns must resolve back to what we mean, the way PEFT reads them
        got_r, got_alpha = module_rank_alpha(config, name)
        if got_r != ranks[name] or not math.isclose(got_alpha, alphas[name], rel_tol=1e-15):
            raise AdapterFormatError(
                f"module {name}: rank/alpha patterns would resolve to r={got_r}, alpha={got_alpha} instead of "
                f"r={ranks[name]}, alpha={alphas[name]} (module names overlap); please report this"
            )
    return config
