"""PEFT LoRA adapter directories: read into an ``Adapter``, write an ``Adapter`` back.

A directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or the pickle-based
``adapter_model.bin``, read with ``torch.load(weights_only=True)`` so no code runs). Keys are
``base_model.model.<module>.<part>`` with part one of ``lora_A.weight``, ``lora_B.weight``,
``lora_B.bias``, ``lora_embedding_A``, ``lora_embedding_B``, ``lora_magnitude_vector``; any other
key is a tensor PEFT stores whole and puts into the base model on load (modules_to_save and the like).

LoRA on parameters (``target_parameters``) is stored under the module holding the parameter:
``<module>.lora_A.weight`` (r*E, in) and ``lora_B.weight`` (out, r*E) for E experts, and when two
parameters of one module are targeted the inner wrapper's under ``<module>.base_layer.lora_A.weight``.
Reading splits them into one module per expert (``adapter.split_experts``), writing joins them.

What the config means (ranks, alphas, refused variants) is ``io.peft_config``'s business.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from adapterops.adapter import (
    Adapter,
    LoraModule,
    ModuleKind,
    ParameterTarget,
    Source,
    join_experts,
    parameter_groups,
    split_experts,
)
from adapterops.card import render_card
from adapterops.errors import AdapterFormatError, NotFoundError, UnsupportedAdapterError
from adapterops.io.atomic import atomic_output_dir
from adapterops.io.peft_config import (
    BASE_LAYER,
    CONFIG_NAME,
    PASSTHROUGH_FIELDS,
    WRAP_ORDER,
    lora_scale,
    module_rank_alpha,
    output_config,
    parameter_targets,
    read_config,
)
from adapterops.io.refs import inside
from adapterops.io.safetensors_file import file_sha256, load_all, save_tensors

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


def read_tensors(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """The adapter's tensors, its safetensors metadata and the sha256 of the weights file."""
    st_path, bin_path = directory / SAFETENSORS_NAME, directory / BIN_NAME
    for path in (st_path, bin_path):
        if path.is_symlink() or path.exists():
            inside(directory, path)  # a link that leads out of the adapter directory is not followed
    if st_path.is_file():
        return load_all(st_path)
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
    shapes = {
        name: (int(e["A"].shape[-1]), int(e["B"].shape[0]))
        for name, e in parts.items()
        if e.get("A") is not None and e.get("B") is not None and e["A"].dim() == 2
    }
    targets = parameter_targets(config, shapes, where)
    modules = {}
    for name, entry in sorted(parts.items()):
        if name in targets:
            for module in _parameter_modules(*targets[name], entry, config, use_rslora, where):
                modules[module.name] = module
            continue
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
    provenance = provenance_from_metadata(where, metadata)
    return Adapter(
        modules=modules, full_tensors=full_tensors, config=kept, source=source, provenance=provenance
    )


def provenance_from_metadata(where: Path, metadata: Mapping[str, str]) -> dict[str, Any] | None:
    """The record adapterops wrote into the metadata, if any: a JSON object, or the file is refused."""
    if PROVENANCE_KEY not in metadata:
        return None
    try:
        record = json.loads(metadata[PROVENANCE_KEY])
    except (ValueError, RecursionError):
        record = None
    if not isinstance(record, dict):
        raise AdapterFormatError(
            f"{where}: metadata {PROVENANCE_KEY!r} is not the JSON object adapterops writes; the file was "
            f"modified: remove that metadata entry or save the adapter again"
        )
    return record


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
    r, alpha = module_rank_alpha(config, name, where.parent / CONFIG_NAME)
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


def _parameter_modules(
    module: str,
    parameter: str,
    entry: Mapping[str, Any],
    config: Mapping[str, Any],
    use_rslora: bool,
    where: Path,
) -> list[LoraModule]:
    """One module per expert of a ``target_parameters`` wrapper (one module for a 2-D parameter)."""
    tensor = f"{module}.{parameter}"
    A, B = entry.get("A"), entry.get("B")
    if A is None or B is None:
        missing = "lora_A" if A is None else "lora_B"
        raise AdapterFormatError(
            f"{where}: parameter {tensor} has no {missing} tensor; the file is incomplete"
        )
    if entry.get("magnitude") is not None or entry.get("bias") is not None:
        raise UnsupportedAdapterError(
            f"{where}: parameter {tensor} carries DoRA magnitudes or lora_B.bias, which PEFT's ParamWrapper "
            "does not support; the adapter was not written by PEFT"
        )
    if A.dim() != 2 or B.dim() != 2 or B.shape[1] != A.shape[0]:
        raise AdapterFormatError(
            f"{where}: parameter {tensor}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} are not a LoRA pair"
        )
    r, alpha = module_rank_alpha(config, tensor)
    experts, rest = divmod(int(A.shape[0]), r)
    if rest or experts == 0:
        raise AdapterFormatError(
            f"{where}: parameter {tensor}: lora_A has {A.shape[0]} rows, not a multiple of r={r} from "
            f"{CONFIG_NAME} (r / rank_pattern; PEFT stores r rows per expert); the config does not belong to "
            "these weights"
        )
    for label, tensor_ in (("lora_A", A), ("lora_B", B)):
        if not tensor_.is_floating_point():
            raise AdapterFormatError(
                f"{where}: parameter {tensor}: {label} is {tensor_.dtype}; expected floating point"
            )
        if not torch.isfinite(tensor_).all():
            raise AdapterFormatError(f"{where}: parameter {tensor}: {label} contains NaN or Inf values")
    scale = lora_scale(r, alpha, use_rslora)
    if experts == 1:
        target = ParameterTarget(module, parameter)
        return [LoraModule(target.module_name, A, B, scale, ModuleKind.PARAMETER, target=target)]
    out = []
    for e, (A_e, B_e) in enumerate(split_experts(A, B, experts)):
        target = ParameterTarget(module, parameter, e, experts)
        out.append(LoraModule(target.module_name, A_e, B_e, scale, ModuleKind.PARAMETER, target=target))
    return out


def _parameter_state_dict(adapter: Adapter, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """PEFT's keys for the parameter targets: one (lora_A, lora_B) pair per parameter, nested wrappers
    of one module under ``.base_layer`` (``peft_config.WRAP_ORDER``: the first innermost)."""
    groups = parameter_groups(adapter.modules.values())
    by_module: dict[str, list[str]] = {}
    for experts in groups.values():
        target = experts[0].target
        assert target is not None
        by_module.setdefault(target.module, []).append(target.parameter)
    out: dict[str, torch.Tensor] = {}
    for module, parameters in by_module.items():
        if len(parameters) > 1 and not set(parameters) <= set(WRAP_ORDER):
            raise UnsupportedAdapterError(
                f"module {module}: LoRA on parameters {sorted(parameters)} of one module; PEFT nests their "
                f"weights in the order the module registers them, which adapterops knows for "
                f"{' and '.join(WRAP_ORDER)} only"
            )
        order = [p for p in WRAP_ORDER if p in parameters] if len(parameters) > 1 else parameters
        for position, parameter in enumerate(order):
            A, B, _ = join_experts(groups[f"{module}.{parameter}"])
            prefix = module + BASE_LAYER * (len(order) - 1 - position)
            cast = dtype or A.dtype
            out[f"{PREFIX}{prefix}.lora_A.weight"] = A.to(cast).contiguous()
            out[f"{PREFIX}{prefix}.lora_B.weight"] = B.to(cast).contiguous()
    return out


def adapter_state_dict(adapter: Adapter, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The tensors of ``adapter`` under PEFT's key names, cast to ``dtype`` (factors only)."""
    out = _parameter_state_dict(adapter, dtype)
    for name, module in adapter.modules.items():
        if module.target is not None:
            continue
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


_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def save_adapter(
    adapter: Adapter,
    path: str | Path,
    *,
    force: bool = False,
    dtype: torch.dtype | str | None = None,
    target_modules: Sequence[str] | None = None,
) -> Path:
    """Write ``adapter`` as a PEFT adapter directory at ``path``, atomically.

    Args:
        adapter: what to write; its ``provenance`` goes into the safetensors metadata and README.md.
        path: the output directory; it appears complete or not at all.
        force: replace an existing ``path``.
        dtype: storage dtype of the factors (a torch dtype or its name); None or ``"auto"`` keeps them.
        target_modules: the config's target_modules instead of the full module names, e.g. their last
            components (``q_proj``), as serving engines match them; each module must match one the
            way PEFT matches (its name, or a suffix after a dot).

    Example:
        >>> save_adapter(combine(["./a", "./b"]), "./mix")
    """
    target = Path(path)
    if isinstance(dtype, str):
        dtype = None if dtype == "auto" else _DTYPES[dtype]
    config = output_config(adapter)
    if target_modules is not None:
        config["target_modules"] = _checked_targets(adapter, target_modules)
    metadata = {"format": "pt"}
    if adapter.provenance:
        metadata[PROVENANCE_KEY] = json.dumps(adapter.provenance, sort_keys=True)
    with atomic_output_dir(target, force=force) as tmp:
        save_tensors(tmp / SAFETENSORS_NAME, adapter_state_dict(adapter, dtype), metadata)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        sha256 = file_sha256(tmp / SAFETENSORS_NAME)
        facts = [
            f"modules: {len(adapter.modules)}, ranks {sorted({m.rank for m in adapter.modules.values()})}",
            f"{SAFETENSORS_NAME} sha256: `{sha256}`",
        ]
        card = render_card(
            "adapter",
            target.name,
            adapter.provenance or {},
            base_model=config.get("base_model_name_or_path"),
            facts=facts,
        )
        (tmp / "README.md").write_text(card)
    return target


def _checked_targets(adapter: Adapter, targets: Sequence[str]) -> list[str]:
    """``targets`` as a sorted list, once each module is known to match one (PEFT's rule for a list:
    the module's name equals the entry or ends with ``.`` + entry)."""
    for name in adapter.modules:
        if not any(name == t or name.endswith("." + t) for t in targets):
            raise AdapterFormatError(
                f"module {name} matches none of target_modules {sorted(targets)}; PEFT would not load it"
            )
    return sorted(set(targets))
