"""MLX-LM adapters (Apple's ``mlx_lm.lora``): a directory read into an ``Adapter`` and written back.

The directory holds ``adapters.safetensors`` and ``adapter_config.json`` (mlx-lm 0.32.2,
``mlx_lm/tuner/utils.py: load_adapters`` and ``linear_to_lora_layers``)::

    {"fine_tune_type": "lora" | "dora", "num_layers": N,
     "lora_parameters": {"rank": r, "scale": s, "dropout": p, "keys": [...]?}}

``scale`` is the absolute scale (not an alpha), one ``rank`` and one ``scale`` for the whole file.
Per module ``<module>.lora_a`` (in, r) and ``<module>.lora_b`` (r, out), stored transposed
against PEFT, and for DoRA ``<module>.m`` (out,) (``tuner/lora.py: LoRALinear``,
``tuner/dora.py: DoRALinear``)::

    dW = scale * (lora_a @ lora_b).T = scale * lora_b.T @ lora_a.T
    A = lora_a.T  (r, in)     B = lora_b.T  (out, r)     magnitude = m

DoRA's ``m`` is the row norm (``mx.linalg.norm(W + dW, axis=1)``, one per output row), as PEFT's
``lora_magnitude_vector``. An ``Embedding`` (``LoRAEmbedding``) has lora_a (num_embeddings, r),
lora_b (r, dim) and adds ``scale * lora_a @ lora_b`` to its (num_embeddings, dim) weight: the same
A, B in the math layout with ``transposed=True``, as PEFT's lora_embedding_A / _B.

Module names are mlx-lm's parameter paths, which equal transformers' module paths for the models
checked (llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3_text: ``model.layers.0.self_attn.q_proj``,
``model.embed_tokens``), so the map is the identity.

Writing pads every module's factors with zero rows of A / columns of B up to the largest rank
(exact) and uses the most common scale for the file; a module whose scale differs has the ratio
folded into its lora_b, in float64, rounded once to float32 (``file_scale``). ``keys`` lists
every module's full path and ``num_layers`` is -1, so mlx-lm turns exactly those modules into
LoRA layers (its top-level ``named_modules`` pass) and no others.

Refused with one line: SwitchLinear (``switch_mlp``) experts, full fine-tunes, lora_B bias,
modules stored whole, parameter targets, conv and Conv1D modules, DoRA on embeddings, a file mixing
DoRA and LoRA modules, float64 factors, and files mlx-lm itself would not load.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from adapterops.adapter import Adapter, LoraModule, ModuleKind, Source
from adapterops.errors import AdapterFormatError, InvalidInputError, NotFoundError, UnsupportedAdapterError
from adapterops.io.atomic import atomic_output_dir
from adapterops.io.peft_config import PASSTHROUGH_FIELDS
from adapterops.io.refs import inside
from adapterops.io.safetensors_file import load_all, save_tensors

FORMAT = "mlx"
WEIGHTS_NAME = "adapters.safetensors"
CONFIG_NAME = "adapter_config.json"
PROVENANCE_KEY = "adapterops"  # safetensors metadata, as in PEFT files
CONFIG_KEY = "adapterops"  # adapter_config.json: the PEFT passthrough fields (mlx-lm ignores unknown keys)
_PART = re.compile(r"^(?P<module>.+)\.(?P<part>lora_a|lora_b|m)$")
_LAYER = re.compile(r"^(?:.+\.)?layers\.\d+\.(?P<rest>.+)$")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def detect(path: Path) -> bool:
    """A directory with ``adapters.safetensors`` beside ``adapter_config.json``."""
    return path.is_dir() and (path / WEIGHTS_NAME).is_file() and (path / CONFIG_NAME).is_file()


def _is_embedding(name: str) -> bool:
    # every mlx-lm model checked names its token embedding embed_tokens, as transformers does
    return name.rsplit(".", 1)[-1] == "embed_tokens"


# ----------------------------------------------------------------------------------------------- reading


def _config(directory: Path) -> dict[str, Any]:
    path = inside(directory, directory / CONFIG_NAME)
    try:
        config = json.loads(path.read_text())
    except (ValueError, OSError, RecursionError) as exc:
        raise AdapterFormatError(f"{path}: not valid JSON ({str(exc)[:200]})") from None
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{path}: expected a JSON object")
    kind = config.get("fine_tune_type", "lora")  # mlx-lm's default
    if kind == "full":
        raise UnsupportedAdapterError(
            f"{path}: fine_tune_type is full: the file holds fine-tuned weights, not a LoRA adapter; "
            "use it as a checkpoint (extract an adapter from it with adapterops extract)"
        )
    if kind not in ("lora", "dora"):
        raise AdapterFormatError(f"{path}: fine_tune_type {kind!r}; mlx-lm writes lora, dora or full")
    params = config.get("lora_parameters")
    if not isinstance(params, dict):
        raise AdapterFormatError(f"{path}: no lora_parameters object (rank, scale) as mlx-lm writes it")
    rank, scale, keys = params.get("rank"), params.get("scale"), params.get("keys")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise AdapterFormatError(f"{path}: lora_parameters.rank {rank!r} is not a positive integer")
    if "scale" not in params and "alpha" in params:
        raise AdapterFormatError(
            f"{path}: lora_parameters has alpha but no scale; mlx-lm reads the absolute scale (alpha / rank): "
            "set scale"
        )
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise AdapterFormatError(f"{path}: lora_parameters.scale {scale!r} is not a finite number")
    if keys is not None and not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
        raise AdapterFormatError(f"{path}: lora_parameters.keys is not a list of module names")
    num_layers = config.get("num_layers")
    if isinstance(num_layers, bool) or not isinstance(num_layers, int):
        raise AdapterFormatError(f"{path}: num_layers {num_layers!r} is not an integer (mlx-lm needs it)")
    return config


def _tensors(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    return load_all(inside(directory, directory / WEIGHTS_NAME))


def read_adapter(directory: Path, source: Source | None = None) -> Adapter:
    """Parse an mlx-lm adapter directory (see the module docstring) into an ``Adapter``."""
    from adapterops.io.peft import provenance_from_metadata

    if not detect(directory):
        raise NotFoundError(f"{directory}: no {WEIGHTS_NAME} beside {CONFIG_NAME} (an mlx-lm adapter)")
    config = _config(directory)
    dora = config.get("fine_tune_type", "lora") == "dora"
    params = config["lora_parameters"]
    rank, scale, keys = int(params["rank"]), float(params["scale"]), params.get("keys")
    tensors, metadata, sha256 = _tensors(directory)
    where = directory / WEIGHTS_NAME

    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _PART.match(key)
        if match is None:
            raise UnsupportedAdapterError(
                f"{where}: tensor {key[:200]!r} is not a <module>.lora_a / lora_b / m adapter tensor"
            )
        parts.setdefault(match["module"], {})[match["part"]] = tensor
    modules: dict[str, LoraModule] = {}
    for name, entry in sorted(parts.items()):
        modules[name] = _module(name, entry, rank, scale, dora, keys, where)
    if not modules:
        raise AdapterFormatError(f"{where}: no LoRA tensors (<module>.lora_a / lora_b)")

    kept = config.get(CONFIG_KEY)
    passthrough = {k: v for k, v in kept.items() if k in PASSTHROUGH_FIELDS} if isinstance(kept, dict) else {}
    if isinstance(config.get("model"), str) and "base_model_name_or_path" not in passthrough:
        passthrough["base_model_name_or_path"] = config["model"]  # mlx-lm records its base model as "model"
    passthrough["format"] = FORMAT
    src = source or Source(path=str(directory))
    src = Source(path=src.path, repo_id=src.repo_id, revision=src.revision, sha256=sha256)
    return Adapter(
        modules=modules, config=passthrough, source=src, provenance=provenance_from_metadata(where, metadata)
    )


def _module(
    name: str,
    entry: dict[str, torch.Tensor],
    rank: int,
    scale: float,
    dora: bool,
    keys: list[str] | None,
    where: Path,
) -> LoraModule:
    if "lora_a" not in entry or "lora_b" not in entry:
        missing = "lora_a" if "lora_a" not in entry else "lora_b"
        raise AdapterFormatError(f"{where}: module {name} has {missing} missing")
    lora_a, lora_b = entry["lora_a"], entry["lora_b"]
    if lora_a.dim() == 3 or name.split(".")[-2:-1] == ["switch_mlp"]:
        raise UnsupportedAdapterError(
            f"{where}: module {name} is a SwitchLinear (switch_mlp, lora_a (experts, r, in)) LoRA; adapterops "
            "does not map mlx-lm's stacked experts onto the transformers model's expert weights"
        )
    if lora_a.dim() != 2 or lora_b.dim() != 2 or lora_a.shape[1] != lora_b.shape[0]:
        raise AdapterFormatError(
            f"{where}: module {name}: lora_a {tuple(lora_a.shape)} and lora_b {tuple(lora_b.shape)} are not "
            "(in, r) and (r, out)"
        )
    if lora_a.shape[1] != rank:
        raise AdapterFormatError(
            f"{where}: module {name} has rank {lora_a.shape[1]} but lora_parameters.rank is {rank}; mlx-lm "
            "refuses the file (one rank per file)"
        )
    if lora_a.dtype not in _DTYPES.values() or lora_b.dtype not in _DTYPES.values():
        raise UnsupportedAdapterError(
            f"{where}: module {name} is {lora_a.dtype}/{lora_b.dtype}; adapterops reads float32, float16 and "
            "bfloat16 mlx factors"
        )
    if keys is not None:
        layer = _LAYER.match(name)
        if name not in keys and (layer is None or layer["rest"] not in keys):
            raise AdapterFormatError(
                f"{where}: module {name} is not in lora_parameters.keys, so mlx-lm does not load it: "
                "add it to keys"
            )
    elif _LAYER.match(name) is None:
        raise AdapterFormatError(
            f"{where}: module {name} is outside the model's layers and lora_parameters has no keys, so mlx-lm "
            "does not load it: add it to keys"
        )
    magnitude = entry.get("m")
    if (magnitude is not None) != dora:
        raise AdapterFormatError(
            f"{where}: module {name} {'has no' if dora else 'has an'} m (DoRA magnitude) but fine_tune_type "
            f"is {'dora' if dora else 'lora'}; the file and config disagree"
        )
    embedding = _is_embedding(name)
    if magnitude is not None:
        if embedding:
            raise UnsupportedAdapterError(
                f"{where}: module {name} is a DoRA embedding; adapterops reads DoRA on linear layers only"
            )
        if magnitude.shape != (lora_b.shape[1],):
            raise AdapterFormatError(
                f"{where}: module {name}: m {tuple(magnitude.shape)} is not one entry per output row "
                f"({lora_b.shape[1]},)"
            )
    for tensor in (lora_a, lora_b, *([magnitude] if magnitude is not None else [])):
        if not torch.isfinite(tensor).all():
            raise AdapterFormatError(f"{where}: module {name}: tensors contain NaN or Inf values")
    return LoraModule(
        name=name,
        A=lora_a.T.contiguous(),
        B=lora_b.T.contiguous(),
        scale=scale,
        kind=ModuleKind.EMBEDDING if embedding else ModuleKind.LINEAR,
        transposed=embedding,
        magnitude=magnitude,
    )


# ----------------------------------------------------------------------------------------------- writing


def file_scale(adapter: Adapter) -> tuple[float, list[str]]:
    """The file's scale (the most common module scale) and the modules whose scale is folded into lora_b."""
    scales = Counter(m.scale for m in adapter.modules.values())
    scale = scales.most_common(1)[0][0] if scales else 1.0
    if scale == 0.0:  # a zero scale cannot carry the others; every folded module gets its own ratio
        scale = 1.0
    return scale, [n for n, m in sorted(adapter.modules.items()) if m.scale != scale]


def check_writable(adapter: Adapter) -> None:
    """One error line for what an mlx-lm adapter cannot hold."""
    if adapter.full_tensors:
        first = sorted(adapter.full_tensors)[0]
        raise UnsupportedAdapterError(
            f"tensor {first} is stored whole (modules_to_save / trained embeddings); an mlx-lm adapter holds "
            "lora_a/lora_b pairs only: drop it from the adapter or merge it into the base model"
        )
    for name, m in sorted(adapter.modules.items()):
        what = None
        if m.bias is not None:
            what = "has a lora_B bias"
        elif m.kind is ModuleKind.PARAMETER:
            what = "targets a parameter (target_parameters; mlx-lm's switch_mlp experts are not mapped)"
        elif m.kind is ModuleKind.CONV:
            what = "is a convolution"
        elif m.kind is ModuleKind.LINEAR and m.transposed:
            what = "is a Conv1D (fan_in_fan_out) layer"
        elif m.kind is ModuleKind.EMBEDDING and (m.is_dora or not _is_embedding(name)):
            what = (
                "is an embedding mlx-lm does not name embed_tokens"
                if not m.is_dora
                else "is a DoRA embedding"
            )
        if what:
            raise UnsupportedAdapterError(
                f"module {name} {what}; an mlx-lm adapter holds LoRA/DoRA on linear layers and LoRA on "
                "embed_tokens: leave it out (adapterops combine --include ...)"
            )
    if len({m.is_dora for m in adapter.modules.values()}) > 1:
        raise UnsupportedAdapterError(
            "the adapter mixes DoRA and LoRA modules; mlx-lm's fine_tune_type is one for the file: "
            "convert with adapterops to-lora (or to-dora) first"
        )


def save_adapter(
    adapter: Adapter, path: str | Path, *, force: bool = False, dtype: torch.dtype | str | None = None
) -> Path:
    """Write ``adapter`` as an mlx-lm adapter directory at ``path``, atomically.

    ``dtype`` (a torch dtype or its name; None/"auto" keeps the factors' dtypes, and a folded
    lora_b is float32) casts every tensor once. float64 factors are refused (mlx-lm trains and
    runs in float32 or lower): save with ``--dtype float32``.
    """
    check_writable(adapter)
    if isinstance(dtype, str):
        if dtype != "auto" and dtype not in _DTYPES:
            raise InvalidInputError(f"mlx output dtype {dtype!r}: choose auto, {', '.join(_DTYPES)}")
        dtype = _DTYPES.get(dtype)
    if dtype is not None and dtype not in _DTYPES.values():
        raise InvalidInputError(f"mlx output dtype {dtype}: choose auto, {', '.join(_DTYPES)}")
    if not adapter.modules:
        raise InvalidInputError("the adapter has no LoRA modules; nothing to write")
    scale, folded = file_scale(adapter)
    rank = max(m.rank for m in adapter.modules.values())
    tensors: dict[str, torch.Tensor] = {}
    for name, m in sorted(adapter.modules.items()):
        A, B, magnitude = m.A, m.B, m.magnitude
        if name in folded:
            B = (B.double() * (m.scale / scale)).to(dtype or torch.float32)
        if dtype is not None:
            A, B = A.to(dtype), B.to(dtype)
            magnitude = magnitude.to(dtype) if magnitude is not None else None
        for what, tensor in (("lora_a", A), ("lora_b", B), ("m", magnitude)):
            if tensor is not None and tensor.dtype not in _DTYPES.values():
                raise UnsupportedAdapterError(
                    f"module {name}: {what} is {tensor.dtype}; mlx-lm adapters are float32, float16 or "
                    "bfloat16: save with --dtype float32"
                )
        pad = rank - m.rank  # zero rows of A and columns of B add nothing to B @ A
        A = torch.cat([A, A.new_zeros(pad, A.shape[1])]) if pad else A
        B = torch.cat([B, B.new_zeros(B.shape[0], pad)], dim=1) if pad else B
        tensors[f"{name}.lora_a"] = A.T.contiguous()
        tensors[f"{name}.lora_b"] = B.T.contiguous()
        if magnitude is not None:
            tensors[f"{name}.m"] = magnitude.contiguous()
    passthrough = {k: v for k, v in adapter.config.items() if k in PASSTHROUGH_FIELDS and v is not None}
    config: dict[str, Any] = {
        "fine_tune_type": "dora" if adapter.is_dora else "lora",
        "num_layers": -1,
        "lora_parameters": {"rank": rank, "scale": scale, "dropout": 0.0, "keys": sorted(adapter.modules)},
        CONFIG_KEY: passthrough,
    }
    if adapter.base_model:
        config["model"] = adapter.base_model
    metadata = {"format": "mlx"}
    if adapter.provenance:
        metadata[PROVENANCE_KEY] = json.dumps(adapter.provenance, sort_keys=True)
    target = Path(path)
    with atomic_output_dir(target, force=force) as tmp:
        save_tensors(tmp / WEIGHTS_NAME, tensors, metadata)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
    return target
