"""PEFT LoRA adapter directories: read into an ``Adapter``, write an ``Adapter`` back.

A directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or the pickle-based
``adapter_model.bin``, read with ``torch.load(weights_only=True)`` so no code runs). Keys are
``base_model.model.<module>.<part>`` with part one of ``lora_A.weight``, ``lora_B.weight``,
``lora_B.bias``, ``lora_embedding_A``, ``lora_embedding_B``, ``lora_magnitude_vector``; any other
key is a tensor PEFT stores whole and puts into the base model on load (modules_to_save and the like).

Per-module rank and alpha follow PEFT's own resolution (``peft.utils.other.get_pattern_key``):
the first key of rank_pattern / alpha_pattern that matches ``(.*\\.)?(key)$`` wins.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from adapterops.adapter import Adapter, LoraModule, ModuleKind, Source
from adapterops.errors import AdapterFormatError, NotFoundError, UnsupportedAdapterError
from adapterops.io.atomic import atomic_output_dir
from adapterops.io.checkpoint import save_tensors

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
PROVENANCE_KEY = "adapterops"

_PARTS = {
    "lora_A.weight": ("A", ModuleKind.LINEAR),
    "lora_B.weight": ("B", ModuleKind.LINEAR),
    "lora_B.bias": ("bias", ModuleKind.LINEAR),
    "lora_embedding_A": ("A", ModuleKind.EMBEDDING),
    "lora_embedding_B": ("B", ModuleKind.EMBEDDING),
    "lora_magnitude_vector": ("magnitude", None),
    "lora_magnitude_vector.weight": ("magnitude", None),  # PEFT < 0.12 spelling
}
_PART_RE = re.compile(r"^(?P<module>.+)\.(?P<part>" + "|".join(re.escape(p) for p in _PARTS) + r")$")

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


# ----------------------------------------------------------------------------------------- reading


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


def read_tensors(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """The adapter's tensors, its safetensors metadata and the sha256 of the weights file."""
    st_path, bin_path = directory / SAFETENSORS_NAME, directory / BIN_NAME
    if st_path.is_file():
        # hash first (sequential read), then parse through mmap: the second pass hits the page cache
        sha256 = file_sha256(st_path)
        try:
            with safe_open(str(st_path), framework="pt") as handle:
                metadata = dict(handle.metadata() or {})
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        except (SafetensorError, OSError, ValueError) as exc:
            raise AdapterFormatError(
                f"{st_path}: not a readable safetensors file ({exc}); the download or save was "
                "probably cut short: fetch or save it again"
            ) from exc
        return tensors, metadata, sha256
    if bin_path.is_file():
        data = bin_path.read_bytes()
        try:
            import io

            tensors = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise AdapterFormatError(
                f"{bin_path}: cannot be read safely with torch.load(weights_only=True) ({exc}); "
                "adapterops does not execute pickled code: convert the adapter to safetensors"
            ) from exc
        if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
            raise AdapterFormatError(f"{bin_path}: expected a dict of tensors")
        return dict(tensors), {}, hashlib.sha256(data).hexdigest()
    raise NotFoundError(f"{directory}: no {SAFETENSORS_NAME} (or {BIN_NAME}) beside {CONFIG_NAME}")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def read_adapter(directory: Path, source: Source | None = None) -> Adapter:
    """Parse a local PEFT adapter directory. See the module docstring for the format."""
    config = read_config(directory)
    tensors, metadata, sha256 = read_tensors(directory)
    where = directory / (SAFETENSORS_NAME if (directory / SAFETENSORS_NAME).is_file() else BIN_NAME)

    parts: dict[str, dict[str, Any]] = {}
    full_tensors: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        name = key.removeprefix(PREFIX)
        match = _PART_RE.match(name)
        if match is None:
            full_tensors[name] = tensor
            continue
        slot, kind = _PARTS[match["part"]]
        entry = parts.setdefault(match["module"], {})
        entry[slot] = tensor
        if kind is not None:
            entry["kind"] = kind

    use_rslora = bool(config.get("use_rslora", False))
    use_dora = bool(config.get("use_dora", False))
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    modules = {}
    for name, entry in sorted(parts.items()):
        module = _build_module(name, entry, config, use_rslora, fan_in_fan_out, where)
        if use_dora != module.is_dora:
            raise AdapterFormatError(
                f"{where}: module {name} {'has no' if use_dora else 'has a'} lora_magnitude_vector but "
                f"use_dora is {str(use_dora).lower()} in {CONFIG_NAME}; the file and config disagree"
            )
        modules[name] = module
    if not modules:
        raise AdapterFormatError(
            f"{where}: no LoRA tensors (keys ending in lora_A.weight / lora_B.weight) found"
        )

    if source is None:
        source = Source(path=str(directory))
    source = Source(path=source.path, repo_id=source.repo_id, revision=source.revision, sha256=sha256)
    kept = {k: v for k, v in config.items() if k in PASSTHROUGH_FIELDS}
    provenance = json.loads(metadata[PROVENANCE_KEY]) if PROVENANCE_KEY in metadata else None
    return Adapter(
        modules=modules, full_tensors=full_tensors, config=kept, source=source, provenance=provenance
    )


def _build_module(
    name: str,
    entry: Mapping[str, Any],
    config: Mapping[str, Any],
    use_rslora: bool,
    fan_in_fan_out: bool,
    where: Path,
) -> LoraModule:
    A, B = entry.get("A"), entry.get("B")
    if A is None or B is None:
        missing = "lora_A" if A is None else "lora_B"
        raise AdapterFormatError(f"{where}: module {name} has no {missing} tensor; the file is incomplete")
    kind: ModuleKind = entry["kind"]
    kernel: tuple[int, ...] = ()
    if A.dim() > 2:
        kind = ModuleKind.CONV
        kernel = tuple(int(k) for k in A.shape[2:])
        if B.dim() != A.dim() or any(int(k) != 1 for k in B.shape[2:]):
            raise UnsupportedAdapterError(
                f"{where}: module {name}: conv lora_B of shape {tuple(B.shape)} is not a 1x1 kernel; "
                "only PEFT's standard conv LoRA (1x1 lora_B) is supported"
            )
        A = A.reshape(A.shape[0], -1)
        B = B.reshape(B.shape[0], B.shape[1])
    if A.dim() != 2 or B.dim() != 2:
        raise AdapterFormatError(
            f"{where}: module {name}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} must be matrices"
        )
    if B.shape[1] != A.shape[0]:
        groups = A.shape[0] // max(int(B.shape[1]), 1)
        hint = (
            f" (a grouped conv, groups={groups}, which PEFT itself cannot merge)"
            if kind is ModuleKind.CONV
            else ""
        )
        raise UnsupportedAdapterError(
            f"{where}: module {name}: lora_A has rank {A.shape[0]} but lora_B has {B.shape[1]} columns{hint}"
        )
    r, alpha = module_rank_alpha(config, name)
    if r != A.shape[0]:
        raise AdapterFormatError(
            f"{where}: module {name} has rank {A.shape[0]} in its tensors but r={r} from {CONFIG_NAME} "
            "(r / rank_pattern); the config does not belong to these weights"
        )
    for label, tensor in (("lora_A", A), ("lora_B", B), ("lora_B.bias", entry.get("bias"))):
        if tensor is not None and not torch.isfinite(tensor).all():
            raise AdapterFormatError(f"{where}: module {name}: {label} contains NaN or Inf values")
    if not (A.is_floating_point() and B.is_floating_point()):
        raise AdapterFormatError(f"{where}: module {name}: factors are {A.dtype}; expected floating point")
    magnitude = entry.get("magnitude")
    if magnitude is not None:
        magnitude = magnitude.reshape(-1)
        if magnitude.numel() != B.shape[0]:
            raise AdapterFormatError(
                f"{where}: module {name}: lora_magnitude_vector has {magnitude.numel()} entries, "
                f"expected one per output row ({B.shape[0]})"
            )
    return LoraModule(
        name=name,
        A=A,
        B=B,
        scale=lora_scale(r, alpha, use_rslora),
        kind=kind,
        transposed=kind is ModuleKind.EMBEDDING or (kind is ModuleKind.LINEAR and fan_in_fan_out),
        kernel_size=kernel,
        bias=entry.get("bias"),
        magnitude=magnitude,
    )


# ----------------------------------------------------------------------------------------- writing


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


def adapter_state_dict(adapter: Adapter, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The tensors of ``adapter`` under PEFT's key names, cast to ``dtype`` (factors only)."""
    out: dict[str, torch.Tensor] = {}
    for name, module in adapter.modules.items():
        A, B = module.A, module.B
        if module.kind is ModuleKind.CONV:
            in_channels = module.in_features // math.prod(module.kernel_size)
            A = A.reshape(module.rank, in_channels, *module.kernel_size)
            B = B.reshape(*B.shape, *(1 for _ in module.kernel_size))
        if module.kind is ModuleKind.EMBEDDING:
            keys = {"A": "lora_embedding_A", "B": "lora_embedding_B"}
        else:
            keys = {"A": "lora_A.weight", "B": "lora_B.weight"}
        cast = dtype or module.A.dtype
        out[f"{PREFIX}{name}.{keys['A']}"] = A.to(cast).contiguous()
        out[f"{PREFIX}{name}.{keys['B']}"] = B.to(cast).contiguous()
        if any(m.bias is not None for m in adapter.modules.values()):
            bias = module.bias if module.bias is not None else torch.zeros(module.out_features)
            out[f"{PREFIX}{name}.lora_B.bias"] = bias.to(cast).contiguous()
        if module.magnitude is not None:
            magnitude = module.magnitude
            if module.kind is ModuleKind.CONV:  # PEFT keeps conv magnitudes as (1, out, 1, ...)
                magnitude = magnitude.reshape(1, -1, *(1 for _ in module.kernel_size))
            out[f"{PREFIX}{name}.lora_magnitude_vector"] = magnitude.to(cast).contiguous()
    for name, tensor in adapter.full_tensors.items():
        out[f"{PREFIX}{name}"] = tensor.contiguous()
    return out


def save_adapter(
    adapter: Adapter, path: str | Path, *, force: bool = False, dtype: torch.dtype | None = None
) -> Path:
    """Write ``adapter`` as a PEFT adapter directory at ``path``, atomically.

    The directory appears complete or not at all; an existing ``path`` is replaced only with ``force``.
    """
    target = Path(path)
    config = output_config(adapter)
    metadata = {"format": "pt"}
    if adapter.provenance:
        metadata[PROVENANCE_KEY] = json.dumps(adapter.provenance, sort_keys=True)
    with atomic_output_dir(target, force=force) as tmp:
        save_tensors(tmp / SAFETENSORS_NAME, adapter_state_dict(adapter, dtype), metadata)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(model_card(adapter, config, file_sha256(tmp / SAFETENSORS_NAME)))
    return target


def model_card(adapter: Adapter, config: Mapping[str, Any], sha256: str) -> str:
    """A README.md that says what the adapter is and how it was made."""
    from adapterops import __version__

    base = config.get("base_model_name_or_path")
    lines = ["---", "library_name: peft"]
    if base:
        lines.append(f"base_model: {base}")
    lines += ["tags:", "- adapterops", "- lora", "---", "", "# LoRA adapter made with adapterops", ""]
    prov = adapter.provenance or {}
    if prov.get("command"):
        lines += ["```", str(prov["command"]), "```", ""]
    if prov.get("operation"):
        lines.append(f"- operation: `{prov['operation']}`")
    for key in ("method", "weights", "rank", "energy", "sv_ratio", "by"):
        if prov.get(key) is not None:
            lines.append(f"- {key}: `{prov[key]}`")
    for item in prov.get("inputs", []):
        lines.append(
            f"- input: `{item.get('repo_id') or item.get('path')}`"
            + (f" @ `{item['revision']}`" if item.get("revision") else "")
            + (f" (sha256 `{item['sha256']}`)" if item.get("sha256") else "")
        )
    if prov.get("summary"):
        lines.append(f"- result: {prov['summary']}")
    lines += [
        f"- modules: {len(adapter.modules)}, ranks {sorted({m.rank for m in adapter.modules.values()})}",
        f"- adapter_model.safetensors sha256: `{sha256}`",
        f"- adapterops version: {__version__}",
        "",
        "Load it with `PeftModel.from_pretrained(base_model, path)`.",
        "",
    ]
    return "\n".join(lines)
