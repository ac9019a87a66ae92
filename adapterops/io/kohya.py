"""kohya LoRA / LoCon single files (sd-scripts ``networks/lora.py``) for Stable Diffusion UNets and text encoders.

One ``.safetensors`` file, three tensors per module, keyed by the module's path with dots flattened
to underscores behind a prefix that says which model it belongs to::

    lora_unet_<flat>.lora_down.weight   (r, in) linear, (r, in, k, k) conv (LoCon: any k)
    lora_unet_<flat>.lora_up.weight     (out, r) linear, (out, r, 1, 1) conv
    lora_unet_<flat>.alpha              a scalar; missing means alpha = r

    dW = (alpha / r) * lora_up @ lora_down     (conv: lora_down flattened to (r, in * k * k))

Prefixes: ``lora_unet_`` (the diffusers UNet2DConditionModel, which sd-scripts trains SD 1.x/2.x
on), ``lora_te_`` / ``lora_te1_`` (the first text encoder), ``lora_te2_`` (the second).

In memory a module is named by its diffusers module path: ``down_blocks.0.attentions.0.
transformer_blocks.0.attn1.to_q`` for the UNet (the name its weight has in
``diffusion_pytorch_model.safetensors``), ``text_encoder.text_model.encoder.layers.0.self_attn.q_proj``
and ``text_encoder_2.<...>`` for the text encoders. Flattening loses the dots, so reading puts them
back exactly or refuses:

- with a base (a diffusers UNet folder or a state dict), through the base's own module names: each
  flattened name must be the flattening of exactly one of them;
- without, through the closed vocabulary of attribute names of the SD UNet and CLIP text encoder
  (``_WORDS``): the flattened name must split into those words and numbers in exactly one way.
  SDXL (sgm names such as ``input_blocks_4_1``) and other models fall outside it and are refused
  with a line asking for the base.

The file's metadata (``ss_*`` training facts, ``modelspec.*``) is kept. Hashes of the tensors
(``sshs_model_hash``, ``sshs_legacy_hash``, ``modelspec.hash_sha256``) are kept only when the
tensors written are exactly those read; otherwise they are dropped (not recomputed), and
``ss_network_dim`` / ``ss_network_alpha`` are set from what is written (``Dynamic`` when modules
differ, as sd-scripts' resize_lora.py writes).

What reading records for writing back goes into ``Adapter.config``: ``format: kohya`` and
``kohya: {te_prefix, metadata, alphas, tensors_sha256}``; ``alphas`` is, per module, the dtype of
its stored alpha, or None when it had none.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from adapterops.adapter import Adapter, LoraModule, ModuleKind, Source
from adapterops.errors import (
    AdapterFormatError,
    AdapterOpsError,
    InvalidInputError,
    UnsupportedAdapterError,
)
from adapterops.io.atomic import atomic_output_file
from adapterops.io.peft import PROVENANCE_KEY, provenance_from_metadata
from adapterops.io.safetensors_file import read_header, save_tensors

FORMAT = "kohya"
UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
TE1, TE2 = "text_encoder.", "text_encoder_2."

_KEY = re.compile(
    r"^(?P<prefix>lora_unet_|lora_te1_|lora_te2_|lora_te_)(?P<flat>[A-Za-z0-9_]+)"
    r"\.(?P<part>lora_down\.weight|lora_up\.weight|alpha)$"
)
_PREFIX_MODEL = {"lora_unet_": "", "lora_te_": TE1, "lora_te1_": TE1, "lora_te2_": TE2}
# sd-scripts' hashes of the tensor bytes; stale once a tensor changes
_HASH_KEYS = ("sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256")
_DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_DTYPES = {**_DTYPE_NAMES, "float64": torch.float64}

# attribute names of diffusers' UNet2DConditionModel (SD 1.x/2.x) and transformers' CLIPTextModel
_WORDS = frozenset(
    [
        "down_blocks",
        "up_blocks",
        "mid_block",
        "attentions",
        "resnets",
        "downsamplers",
        "upsamplers",
        "transformer_blocks",
        "attn1",
        "attn2",
        "to_q",
        "to_k",
        "to_v",
        "to_out",
        "ff",
        "net",
        "proj",
        "proj_in",
        "proj_out",
        "conv",
        "conv1",
        "conv2",
        "conv_shortcut",
        "time_emb_proj",
        "conv_in",
        "conv_out",
        "time_embedding",
        "linear_1",
        "linear_2",
        "add_embedding",
        "text_model",
        "encoder",
        "layers",
        "self_attn",
        "q_proj",
        "k_proj",
        "v_proj",
        "out_proj",
        "mlp",
        "fc1",
        "fc2",
    ]
)


def detect(path: Path) -> bool:
    """A local ``.safetensors`` file whose tensor names carry kohya's prefixes."""
    if not path.is_file() or path.suffix.lower() != ".safetensors":
        return False
    try:
        names = [e.name for e in read_header(path).entries]
    except (AdapterOpsError, OSError):
        return False
    return any(n.startswith(("lora_unet_", "lora_te")) for n in names)


# --------------------------------------------------------------------------------------------- names


def _segmentations(tokens: list[str], start: int, memo: dict[int, list[list[str]]]) -> list[list[str]]:
    """Every way to join ``tokens[start:]`` into vocabulary words and numbers (at most 2 kept)."""
    if start == len(tokens):
        return [[]]
    if start in memo:
        return memo[start]
    out: list[list[str]] = []
    for end in range(start + 1, len(tokens) + 1):
        word = "_".join(tokens[start:end])
        if word in _WORDS or (end == start + 1 and word.isdigit()):
            out += [[word, *rest] for rest in _segmentations(tokens, end, memo)]
            if len(out) > 1:
                break
    memo[start] = out[:2]
    return memo[start]


def unflatten(flat: str) -> str | None:
    """The dotted module path ``flat`` flattens, when the vocabulary gives exactly one; else None."""
    found = _segmentations(flat.split("_"), 0, {})
    return ".".join(found[0]) if len(found) == 1 else None


def flatten(name: str) -> str:
    return name.replace(".", "_")


def base_shapes(base: str | Path | Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Module name -> weight shape of a base: a diffusers UNet folder (or a pipeline folder with
    ``unet/``), a ``.safetensors`` state dict, or a mapping of names to tensors."""
    if isinstance(base, Mapping):
        items: Iterable[tuple[str, tuple[int, ...]]] = ((k, tuple(v.shape)) for k, v in base.items())
    else:
        path = Path(base)
        for candidate in (path / UNET_WEIGHTS, path / "unet" / UNET_WEIGHTS, path):
            if candidate.is_file():
                break
        else:
            raise InvalidInputError(
                f"{base}: no {UNET_WEIGHTS} (or unet/{UNET_WEIGHTS}); give the diffusers UNet folder or its "
                "safetensors state dict as the base"
            )
        items = ((e.name, tuple(e.shape)) for e in read_header(candidate).entries)
    return {k.removesuffix(".weight"): s for k, s in items if k.endswith(".weight")}


# --------------------------------------------------------------------------------------------- read


def _read_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, TypeError, RuntimeError, OverflowError) as exc:
        detail = str(exc).split("\n", 1)[0][:300]
        raise AdapterFormatError(
            f"{path}: not a readable safetensors file ({detail if detail.isprintable() else repr(detail)}); "
            "it is corrupt, or the download or save was cut short: fetch or save it again"
        ) from None
    return tensors, metadata, digest.hexdigest()


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 of names, dtypes, shapes and bytes in name order: says whether two files hold the same tensors."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        data = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)}".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def read_adapter(
    path: Path, source: Source | None = None, base: str | Path | Mapping[str, Any] | None = None
) -> Adapter:
    """Parse a kohya LoRA / LoCon file. See the module docstring for the format and the naming."""
    tensors, metadata, sha256 = _read_file(path)
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise UnsupportedAdapterError(
                f"{path}: tensor {key[:120]!r} is not a kohya LoRA key (lora_unet_* / lora_te*_* with "
                ".lora_down.weight, .lora_up.weight or .alpha); LyCORIS, DoRA and other variants are not read"
            )
        parts.setdefault((match["prefix"], match["flat"]), {})[match["part"]] = tensor
    if not parts:
        raise AdapterFormatError(f"{path}: no kohya LoRA tensors (lora_unet_* / lora_te* keys) found")
    shapes = base_shapes(base) if base is not None else None
    by_flat: dict[str, list[str]] = {}
    for name in shapes or {}:
        by_flat.setdefault(flatten(name), []).append(name)
    te_prefixes = {prefix for prefix, _ in parts if prefix in ("lora_te_", "lora_te1_")}
    if len(te_prefixes) > 1:
        raise AdapterFormatError(
            f"{path}: has both lora_te_ and lora_te1_ keys; one file names one first text encoder"
        )

    modules: dict[str, LoraModule] = {}
    alphas: dict[str, str | None] = {}
    for (prefix, flat), entry in sorted(parts.items()):
        key = prefix + flat
        model = _PREFIX_MODEL[prefix]
        if shapes is not None and not model:
            names = by_flat.get(flat, [])
            if len(names) != 1:
                why = (
                    "matches no module"
                    if not names
                    else f"matches {len(names)} modules ({', '.join(names[:3])})"
                )
                raise AdapterFormatError(
                    f"{path}: {key} {why} of the base; the file does not belong to this base"
                )
            module_path = names[0]
        else:
            unflattened = unflatten(flat)
            if unflattened is None:
                raise UnsupportedAdapterError(
                    f"{path}: {key} cannot be mapped back to one module name without the base model (its "
                    "'_' may be '.' or part of a name): read it with its base's UNet folder, "
                    "adapterops.load_adapter(path, base=...)"
                )
            module_path = unflattened
        name = model + module_path
        down, up, alpha = entry.get("lora_down.weight"), entry.get("lora_up.weight"), entry.get("alpha")
        if down is None or up is None:
            missing = "lora_down.weight" if down is None else "lora_up.weight"
            raise AdapterFormatError(f"{path}: {key} has no {missing}; the file is incomplete")
        module = _module(path, key, name, down, up, alpha)
        if shapes is not None and not model and shapes[module_path] != module.weight_shape:
            raise AdapterFormatError(
                f"{path}: {key} updates a weight of shape {module.weight_shape} but the base's "
                f"{module_path}.weight is {shapes[module_path]}; the file does not belong to this base"
            )
        modules[name] = module
        alphas[name] = None if alpha is None else str(alpha.dtype).removeprefix("torch.")

    if source is None:
        source = Source(path=str(path))
    source = Source(path=source.path, repo_id=source.repo_id, revision=source.revision, sha256=sha256)
    kohya = {
        "te_prefix": next(iter(te_prefixes), "lora_te_"),
        "metadata": {k: v for k, v in metadata.items() if k != PROVENANCE_KEY},
        "alphas": alphas,
        "tensors_sha256": tensors_sha256(tensors),
    }
    return Adapter(
        modules=modules,
        config={"format": FORMAT, FORMAT: kohya},
        source=source,
        provenance=provenance_from_metadata(path, metadata),
    )


def _module(
    path: Path, key: str, name: str, down: torch.Tensor, up: torch.Tensor, alpha: torch.Tensor | None
) -> LoraModule:
    shapes = f"lora_down {tuple(down.shape)} and lora_up {tuple(up.shape)}"
    for label, tensor in (("lora_down", down), ("lora_up", up), ("alpha", alpha)):
        if tensor is not None and not tensor.is_floating_point():
            raise AdapterFormatError(f"{path}: {key}: {label} is {tensor.dtype}; expected floating point")
        if tensor is not None and not torch.isfinite(tensor).all():
            raise AdapterFormatError(f"{path}: {key}: {label} contains NaN or Inf values")
    kernel: tuple[int, ...] = ()
    if down.dim() == 4 and up.dim() == 4 and tuple(up.shape[2:]) == (1, 1):
        kernel = tuple(int(k) for k in down.shape[2:])
        A, B = down.reshape(down.shape[0], -1), up.reshape(up.shape[0], up.shape[1])
    elif down.dim() == 2 and up.dim() == 2:
        A, B = down, up
    else:
        raise UnsupportedAdapterError(
            f"{path}: {key}: {shapes} are neither a linear pair nor a conv pair with a 1x1 lora_up"
        )
    rank = int(A.shape[0])
    if int(B.shape[1]) != rank or rank == 0:
        raise AdapterFormatError(f"{path}: {key}: {shapes} do not share a rank")
    if alpha is not None and alpha.numel() != 1:
        raise AdapterFormatError(f"{path}: {key}: alpha has shape {tuple(alpha.shape)}; expected a scalar")
    alpha_value = float(alpha.double()) if alpha is not None else float(rank)
    return LoraModule(
        name=name,
        A=A,
        B=B,
        scale=alpha_value / rank,
        kind=ModuleKind.CONV if kernel else ModuleKind.LINEAR,
        kernel_size=kernel,
    )


# --------------------------------------------------------------------------------------------- write


def kohya_key(name: str, te_prefix: str = "lora_te_") -> str:
    """The key prefix of module ``name`` (see the module docstring for the naming)."""
    if name.startswith(TE2):
        return "lora_te2_" + flatten(name.removeprefix(TE2))
    if name.startswith(TE1):
        return te_prefix + flatten(name.removeprefix(TE1))
    return "lora_unet_" + flatten(name)


def _alpha(value: float, stored: str | None, rank: int) -> torch.Tensor | None:
    """alpha = scale * r, in the dtype the input stored it in when that holds it exactly (float32 otherwise);
    None (no alpha key) where the input had none and alpha is still r."""
    if stored is None and value == rank:
        return None
    as_float32 = torch.tensor(value, dtype=torch.float32)
    dtype = _DTYPES.get(stored or "", torch.float32)
    kept = as_float32.to(dtype)
    return kept if float(kept) == float(as_float32) else as_float32


def state_dict(adapter: Adapter, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The tensors of ``adapter`` under kohya's keys (factors cast to ``dtype``, alphas as ``_alpha``)."""
    kohya: Mapping[str, Any] = adapter.config.get(FORMAT) or {}
    te_prefix = kohya.get("te_prefix", "lora_te_")
    stored: Mapping[str, str | None] = kohya.get("alphas") or {}
    if adapter.full_tensors:
        raise UnsupportedAdapterError(
            f"tensors stored whole ({', '.join(sorted(adapter.full_tensors)[:3])}) have no place in a kohya "
            "LoRA file: save as PEFT (--format peft)"
        )
    out: dict[str, torch.Tensor] = {}
    owners: dict[str, str] = {}
    for name, m in adapter.modules.items():
        if (
            m.kind not in (ModuleKind.LINEAR, ModuleKind.CONV)
            or m.transposed
            or m.bias is not None
            or m.is_dora
        ):
            raise UnsupportedAdapterError(
                f"module {name}: a {m.kind.value} module{' with lora_bias' if m.bias is not None else ''}"
                f"{' (DoRA)' if m.is_dora else ''}{' (transposed)' if m.transposed else ''} cannot be "
                "written as kohya LoRA (linear and conv layers only): save as PEFT"
            )
        own = name.removeprefix(TE2) if name.startswith(TE2) else name.removeprefix(TE1)
        if unflatten(flatten(own)) != own:
            raise UnsupportedAdapterError(
                f"module {name} is not a module of a Stable Diffusion UNet or CLIP text encoder, so its kohya "
                "key could not be read back (kohya files hold only those): save as PEFT, or convert --to gguf "
                "for a language model"
            )
        key = kohya_key(name, te_prefix)
        if key in owners:
            raise UnsupportedAdapterError(
                f"modules {owners[key]} and {name} both flatten to the kohya key {key}: save as PEFT"
            )
        owners[key] = name
        cast = dtype or m.A.dtype
        A, B = m.A, m.B
        if m.kind is ModuleKind.CONV:
            in_channels = m.in_features // math.prod(m.kernel_size)
            A = A.reshape(m.rank, in_channels, *m.kernel_size)
            B = B.reshape(*B.shape, *(1 for _ in m.kernel_size))
        out[f"{key}.lora_down.weight"] = A.to(cast).contiguous()
        out[f"{key}.lora_up.weight"] = B.to(cast).contiguous()
        alpha = _alpha(m.scale * m.rank, stored.get(name) if name in stored else "float32", m.rank)
        if alpha is not None:
            out[f"{key}.alpha"] = alpha
    return out


def _metadata(adapter: Adapter, tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    kohya: Mapping[str, Any] = adapter.config.get(FORMAT) or {}
    metadata = {str(k): str(v) for k, v in (kohya.get("metadata") or {}).items()}
    if kohya.get("tensors_sha256") != tensors_sha256(tensors):
        for key in _HASH_KEYS:
            metadata.pop(key, None)
        if "ss_network_dim" in metadata or "ss_network_alpha" in metadata:
            ranks = {m.rank for m in adapter.modules.values()}
            alphas = {float(m.scale * m.rank) for m in adapter.modules.values()}
            metadata["ss_network_dim"] = str(ranks.pop()) if len(ranks) == 1 else "Dynamic"
            metadata["ss_network_alpha"] = f"{alphas.pop():g}" if len(alphas) == 1 else "Dynamic"
    if adapter.provenance:
        metadata[PROVENANCE_KEY] = json.dumps(adapter.provenance, sort_keys=True)
    return metadata


def save_adapter(
    adapter: Adapter, path: str | Path, *, force: bool = False, dtype: torch.dtype | str | None = None
) -> Path:
    """Write ``adapter`` as one kohya LoRA ``.safetensors`` file at ``path``, atomically.

    Each module's alpha is ``scale * r`` (so ``alpha / r`` is its scale); metadata as in the
    module docstring. ``dtype`` casts the factors (None or ``"auto"`` keeps them).

    Example:
        >>> save_adapter(resize("lora.safetensors", rank=4), "small.safetensors")
    """
    target = Path(path)
    if isinstance(dtype, str):
        dtype = None if dtype == "auto" else _DTYPES[dtype]
    tensors = state_dict(adapter, dtype)
    metadata = _metadata(adapter, tensors)
    with atomic_output_file(target, force=force) as tmp:
        save_tensors(tmp, tensors, metadata)
    return target
