"""kohya LoRA / LoCon single files (sd-scripts ``networks/lora.py``) for Stable Diffusion UNets and text encoders.

One ``.safetensors`` file, three tensors per module, keyed by the module's path with dots flattened
to underscores behind a prefix that says which model it belongs to::

    lora_unet_<flat>.lora_down.weight   (r, in) linear, (r, in, k, k) conv (LoCon: any k)
    lora_unet_<flat>.lora_up.weight     (out, r) linear, (out, r, 1, 1) conv
    lora_unet_<flat>.alpha              a scalar; missing (or 0, as sd-scripts reads it) means alpha = r

    dW = (alpha / r) * lora_up @ lora_down     (conv: lora_down flattened to (r, in * k * k))

Prefixes: ``lora_unet_`` (the denoiser: SD 1.x/2.x's diffusers UNet, SDXL's sgm UNet, Flux's BFL
transformer, as sd-scripts trains them), ``lora_te_`` / ``lora_te1_`` (the first text encoder),
``lora_te2_`` (the second).

In memory a denoiser module is named by its path in the model it was trained on, without the
model's root in a single file (``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``,
``input_blocks.4.1.transformer_blocks.0.attn1.to_q``, ``double_blocks.0.img_attn.qkv``), text
encoders' as ``text_encoder.text_model.encoder.layers.0.self_attn.q_proj`` and
``text_encoder_2.<...>``. Flattening loses the dots, so reading puts them back exactly or refuses
(``targets``):

- with a base (``read_base``: a diffusers folder, an original-layout single file, a state dict),
  through the base's own weight names: each flattened name must be the flattening of exactly one;
  an SDXL (sgm) name against a diffusers UNet through the sgm name of each of its modules
  (``sgm_name``); a BFL Flux name against a diffusers FluxTransformer2DModel onto its modules, a
  fused layer (qkv, linear1) split by rows of lora_up at the base's widths, lora_down shared (exact);
- without, through the closed vocabulary of attribute names of the SD UNet and CLIP text encoder
  (``_WORDS``): the flattened name must split into those words and numbers in exactly one way.
  SDXL and Flux names fall outside it and are refused with a line asking for the base.

The file's metadata (``ss_*`` training facts, ``modelspec.*``) is kept. Hashes of the tensors
(``sshs_model_hash``, ``sshs_legacy_hash``, ``modelspec.hash_sha256``) are kept only when the
tensors written are exactly those read; otherwise they are dropped (not recomputed), and
``ss_network_dim`` / ``ss_network_alpha`` are set from what is written (``Dynamic`` when modules
differ, as sd-scripts' resize_lora.py writes).

What reading records for writing back goes into ``Adapter.config``: ``format: kohya`` and
``kohya: {te_prefix, metadata, alphas, tensors_sha256, keys}``; ``alphas`` is, per module, the dtype
of its stored alpha, or None when it had none; ``keys`` the file's key of each module whose name
flattens back to it (written back as read even outside the vocabulary: SDXL, Flux); ``renamed``
the modules named in a base's other layout (not written as kohya).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import warnings
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from adapterops.adapter import Adapter, LoraModule, ModuleKind, Source
from adapterops.errors import (
    AdapterFormatError,
    AdapterOpsError,
    UnsupportedAdapterError,
)
from adapterops.io.atomic import atomic_output_file
from adapterops.io.checkpoint import DENOISER_ROOT, OPENCLIP_ROOTS, TE1_ROOTS, Checkpoint, open_checkpoint
from adapterops.io.peft import PROVENANCE_KEY, provenance_from_metadata
from adapterops.io.safetensors_file import load_all, read_header, save_tensors

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

# sgm's UNetModel (SD 1.x/2.x/XL original layout, ldm/modules/diffusionmodules/openaimodel.py) attributes
_SGM_WORDS = frozenset(
    [
        "input_blocks",
        "middle_block",
        "output_blocks",
        "in_layers",
        "emb_layers",
        "out_layers",
        "skip_connection",
        "op",
        "conv",
        "proj_in",
        "proj_out",
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
        "time_embed",
        "label_emb",
        "out",
    ]
)
# BFL's Flux (flux/model.py, flux/modules/layers.py) attributes
_BFL_WORDS = frozenset(
    [
        "double_blocks",
        "single_blocks",
        "img_in",
        "txt_in",
        "time_in",
        "vector_in",
        "guidance_in",
        "in_layer",
        "out_layer",
        "img_mod",
        "txt_mod",
        "lin",
        "img_attn",
        "txt_attn",
        "qkv",
        "proj",
        "img_mlp",
        "txt_mlp",
        "linear1",
        "linear2",
        "modulation",
        "final_layer",
        "linear",
        "adaLN_modulation",
    ]
)


def model_family(adapter: Adapter) -> str | None:
    """What model a kohya-keyed adapter is for, as far as its names and metadata say: ``flux`` (BFL
    names), ``sgm`` (SD/SDXL original layout names), ``unet`` (diffusers UNet names); with
    sd-scripts' ``ss_base_model_version`` after it when the file recorded one. None: no such names."""
    record = adapter.config.get(str(adapter.config.get("format")))
    metadata = record.get("metadata") if isinstance(record, dict) else None
    version = metadata.get("ss_base_model_version") if isinstance(metadata, dict) else None
    names = [n for n in adapter.modules if not n.startswith((TE1, TE2))]
    flat = [flatten(n) for n in names]
    family = (
        "flux"
        if any(f.startswith(_BFL) for f in flat)
        else "sgm"
        if any(f.startswith(_SGM_ALL) for f in flat)
        else "unet"
        if names
        else None
    )
    if version and family:
        return f"{family}, {version}"
    return family or (str(version) if version else None)


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


def _segmentations(
    tokens: list[str], start: int, memo: dict[int, list[list[str]]], words: frozenset[str]
) -> list[list[str]]:
    """Every way to join ``tokens[start:]`` into ``words`` and numbers (at most 2 kept)."""
    if start == len(tokens):
        return [[]]
    if start in memo:
        return memo[start]
    out: list[list[str]] = []
    for end in range(start + 1, len(tokens) + 1):
        word = "_".join(tokens[start:end])
        if word in words or (end == start + 1 and word.isdigit()):
            out += [[word, *rest] for rest in _segmentations(tokens, end, memo, words)]
            if len(out) > 1:
                break
    memo[start] = out[:2]
    return memo[start]


def unflatten(flat: str) -> str | None:
    """The dotted module path ``flat`` flattens, when the vocabulary gives exactly one; else None.

    The vocabulary is the model's the name belongs to: sgm's SD/SDXL UNet for original-layout names
    (``input_blocks_4_1_...``), BFL's Flux for ``double_blocks_...`` and kin, else diffusers' UNet
    and CLIP. So SDXL and Flux modules read without a base keep their original-layout names, the
    names the original single-file checkpoint gives them.
    """
    words = _SGM_WORDS if flat.startswith(_SGM_ALL) else _BFL_WORDS if flat.startswith(_BFL) else _WORDS
    found = _segmentations(flat.split("_"), 0, {}, words)
    return ".".join(found[0]) if len(found) == 1 else None


def flatten(name: str) -> str:
    return name.replace(".", "_")


_NOT_DENOISER = ("conditioner.", "cond_stage_model.", "first_stage_model.", "text_encoders.", "vae.")
# flattened names of the original layouts, for saying which base a file needs
_SGM = ("input_blocks_", "middle_block_", "output_blocks_")
_BFL = (
    "double_blocks_",
    "single_blocks_",
    "img_in",
    "txt_in",
    "time_in_",
    "vector_in_",
    "guidance_in_",
    "final_layer_",
)

# BFL Flux module (flattened, after ``lora_unet_``) -> the diffusers FluxTransformer2DModel modules
# it becomes: several where BFL fuses layers (their lora_up rows in this order). The names are those
# of diffusers 0.42.1 loaders/lora_conversion_utils.py ``_convert_kohya_flux_lora_to_diffusers``
# and single_file_utils.py ``convert_flux_transformer_checkpoint_to_diffusers``.
_FLUX_DOUBLE = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn_proj": ("attn.to_out.0",),
    "img_mlp_0": ("ff.net.0.proj",),
    "img_mlp_2": ("ff.net.2",),
    "img_mod_lin": ("norm1.linear",),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn_proj": ("attn.to_add_out",),
    "txt_mlp_0": ("ff_context.net.0.proj",),
    "txt_mlp_2": ("ff_context.net.2",),
    "txt_mod_lin": ("norm1_context.linear",),
}
_FLUX_SINGLE = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation_lin": ("norm.linear",),
}
_FLUX_TOP = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in_in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in_out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in_in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in_out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in_in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in_out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer_linear": "proj_out",
    "final_layer_adaLN_modulation_1": "norm_out.linear",  # rows (shift, scale) -> (scale, shift)
}
_SGM_ALL = (*_SGM, "time_embed_", "label_emb_", "out_0", "out_2")
# diffusers UNet2DConditionModel -> sgm (original SD/SDXL) names: the blocks are numbered through
# (``layers_per_block`` + 1 slots per block, the last for a down/upsampler), a ResBlock's layers are
# named by position; the same map as diffusers 0.42.1 ``_maybe_map_sgm_blocks_to_diffusers`` +
# ``_convert_unet_lora_key`` and sd-scripts' ``sdxl_model_util.make_unet_conversion_map``
_SGM_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_SGM_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_DIFFUSERS_BLOCK = re.compile(
    r"^(?P<where>down_blocks|up_blocks)\.(?P<b>\d+)\.(?P<kind>resnets|attentions|downsamplers|upsamplers)"
    r"\.(?P<l>\d+)(?:\.(?P<rest>.+))?$"
)


def sgm_name(name: str, per_block: int, attended_up: Collection[int] = ()) -> str | None:
    """The sgm name of diffusers UNet module ``name`` (``per_block`` = layers_per_block + 1 slots per
    block; ``attended_up``: the up blocks with attentions, whose upsampler is the third layer of its
    slot, not the second); None for a name outside the UNet's structure."""
    if name in _SGM_TOP:
        return _SGM_TOP[name]
    mid = re.match(r"^mid_block\.(resnets|attentions)\.(\d)(?:\.(.+))?$", name)
    if mid is not None:
        kind, index, rest = mid.groups()
        slot = {("resnets", "0"): 0, ("attentions", "0"): 1, ("resnets", "1"): 2}.get((kind, index))
        return None if slot is None else _sgm_join(f"middle_block.{slot}", kind, rest)
    block = _DIFFUSERS_BLOCK.match(name)
    if block is None:
        return None
    b, layer, kind, rest = int(block["b"]), int(block["l"]), block["kind"], block["rest"]
    if block["where"] == "down_blocks":
        if kind == "downsamplers":
            return f"input_blocks.{1 + b * per_block + per_block - 1}.0.op" if rest == "conv" else None
        return _sgm_join(f"input_blocks.{1 + b * per_block + layer}.{int(kind == 'attentions')}", kind, rest)
    if kind == "upsamplers":
        inner = 2 if b in attended_up else 1
        return f"output_blocks.{b * per_block + per_block - 1}.{inner}.conv" if rest == "conv" else None
    return _sgm_join(f"output_blocks.{b * per_block + layer}.{int(kind == 'attentions')}", kind, rest)


def _sgm_join(root: str, kind: str, rest: str | None) -> str | None:
    if rest is None:
        return None
    if kind == "resnets":
        first, _, tail = rest.partition(".")
        if first not in _SGM_RESNET or tail:
            return None
        rest = _SGM_RESNET[first]
    return f"{root}.{rest}"


_FLUX_BLOCK = re.compile(r"^(?P<kind>double|single)_blocks_(?P<i>\d+)_(?P<part>\w+)$")


@dataclass(frozen=True)
class BaseModules:
    """A base's weights as kohya reading needs them: for the denoiser (``""``) and each text
    encoder (``TE1``, ``TE2``), module name -> weight shape, each name as it is in memory (the
    stored key without ``.weight`` and without the model's root in the file).

    ``layout``: the denoiser's naming, ``"sgm"`` (original SD/SDXL single files: ``input_blocks.*``),
    ``"bfl"`` (original Flux: ``double_blocks.*``) or ``"diffusers"``. ``openclip``: a text encoder
    is stored in OpenCLIP's layout, which kohya's names do not reach.
    """

    what: str
    layout: str
    models: Mapping[str, Mapping[str, tuple[int, ...]]]
    openclip: bool = False

    def by_flat(self, model: str) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        for name in self.models.get(model, {}):
            found.setdefault(flatten(name), []).append(name)
        return found

    @cached_property
    def sgm_by_flat(self) -> dict[str, list[str]]:
        """For a diffusers UNet: the flattened sgm name of each of its modules -> the module(s)."""
        names = self.models.get("", {})
        found: dict[str, list[str]] = {}
        resnets = [int(m[1]) for n in names if (m := re.match(r"^down_blocks\.0\.resnets\.(\d+)\.", n))]
        if not resnets:
            return found
        per_block = max(resnets) + 2  # layers_per_block + 1 slots (the last for a downsampler)
        attended = {int(m[1]) for n in names if (m := re.match(r"^up_blocks\.(\d+)\.attentions\.", n))}
        for name in names:
            sgm = sgm_name(name, per_block, attended)
            if sgm is not None:
                found.setdefault(flatten(sgm), []).append(name)
        return found


@dataclass(frozen=True)
class Target:
    """Where (part of) a kohya module's update lands: module ``name``; ``rows`` (start, stop) of
    lora_up where one fused layer of the file is several layers of the base (lora_down shared);
    ``swap_halves``: the two halves of those rows exchanged (BFL's shift, scale -> diffusers'
    scale, shift)."""

    name: str
    rows: tuple[int, int] | None = None
    swap_halves: bool = False


def _split_models(
    items: Iterable[tuple[str, tuple[int, ...]]],
) -> tuple[dict[str, dict[str, tuple[int, ...]]], bool]:
    """One state dict's weights split into the models kohya names: denoiser, first text encoder."""
    weights = [(k.removesuffix(".weight"), s) for k, s in items if k.endswith(".weight")]
    root = DENOISER_ROOT if any(k.startswith(DENOISER_ROOT) for k, _ in weights) else ""
    models: dict[str, dict[str, tuple[int, ...]]] = {"": {}, TE1: {}}
    openclip = False
    for module, shape in weights:
        te = next((r for r in TE1_ROOTS if module.startswith(r)), None)
        if te is not None:
            models[TE1][module.removeprefix(te)] = shape
        elif module.startswith(OPENCLIP_ROOTS):
            openclip = True
        elif module.startswith(root) and (root or not module.startswith(_NOT_DENOISER)):
            models[""][module.removeprefix(root)] = shape
    return models, openclip


def _layout(names: Iterable[str]) -> str:
    names = list(names)
    if any(n.startswith("input_blocks.") for n in names):
        return "sgm"
    if any(n.startswith(("double_blocks.", "single_blocks.")) for n in names):
        return "bfl"
    return "diffusers"


def _entries(ref: str | Path | Checkpoint) -> list[tuple[str, tuple[int, ...]]]:
    checkpoint = ref if isinstance(ref, Checkpoint) else open_checkpoint(ref)
    return [(e.name, tuple(e.shape)) for shard in checkpoint.shards for e in shard.entries]


def read_base(base: str | Path | Checkpoint | Mapping[str, Any] | BaseModules) -> BaseModules:
    """The module names and shapes of a base, from its headers only.

    ``base`` is a diffusers pipeline folder (``unet/`` or ``transformer/``, ``text_encoder/``,
    ``text_encoder_2/``), one model's folder (diffusers or transformers names, sharded or not), an
    original-layout single ``.safetensors`` file (SD/SDXL sgm keys, BFL or ComfyUI Flux keys), a Hub
    id of a model folder, an open ``Checkpoint``, or a mapping of names to tensors.
    """
    if isinstance(base, BaseModules):
        return base
    openclip = False
    if isinstance(base, Mapping):
        models, openclip = _split_models((k, tuple(v.shape)) for k, v in base.items())
        what = "the base state dict"
    elif isinstance(base, Checkpoint):
        models, openclip = _split_models(_entries(base))
        what = base.describe()
    else:
        path = Path(base).expanduser()
        what = str(base)
        denoiser = next((path / c for c in ("unet", "transformer") if (path / c).is_dir()), None)
        if denoiser is not None:  # a diffusers pipeline: one folder per model
            models = {"": dict(_split_models(_entries(denoiser))[0][""])}
            for model, folder in ((TE1, "text_encoder"), (TE2, "text_encoder_2")):
                if (path / folder).is_dir():
                    models[model] = {
                        k.removesuffix(".weight"): s
                        for k, s in _entries(path / folder)
                        if k.endswith(".weight")
                    }
        else:
            models, openclip = _split_models(_entries(base))
    return BaseModules(what, _layout(models.get("", {})), models, openclip)


def base_shapes(
    base: str | Path | Checkpoint | Mapping[str, Any] | BaseModules,
) -> dict[str, tuple[int, ...]]:
    """Module name (as in memory: ``text_encoder.``/``text_encoder_2.`` before text encoders' names)
    -> weight shape of a base (see ``read_base`` for what a base may be)."""
    modules = read_base(base)
    return {model + name: shape for model, names in modules.models.items() for name, shape in names.items()}


def targets(key: str, base: BaseModules | None, path: Path | str = "") -> list[Target]:
    """The module(s) the kohya module ``key`` (``lora_unet_<flat>`` etc., no ``.lora_down.weight``)
    updates; one unless a fused layer of the file is several layers of the base. Refuses (one
    line) a name that maps to no module, or to more than one, of the base or the vocabulary."""
    match = re.match(r"^(lora_unet_|lora_te1_|lora_te2_|lora_te_)(.+)$", key)
    if match is None:
        raise AdapterFormatError(
            f"{path}: {key} has no kohya prefix (lora_unet_, lora_te_, lora_te1_, lora_te2_)"
        )
    prefix, flat = match.groups()
    model = _PREFIX_MODEL[prefix]
    names = base.models.get(model) if base is not None else None
    if base is not None and names:
        found = base.by_flat(model).get(flat, [])
        if len(found) == 1:
            return [Target(model + found[0])]
        if len(found) > 1:
            raise AdapterFormatError(
                f"{path}: {key} is the flattening of {len(found)} modules of {base.what} "
                f"({', '.join(found[:3])}); it cannot say which, so the file is refused"
            )
        if not model and base.layout == "diffusers" and flat.startswith(_SGM_ALL):
            sgm = base.sgm_by_flat.get(flat, [])
            if len(sgm) == 1:
                return [Target(sgm[0])]
            raise UnsupportedAdapterError(
                f"{path}: {key} is named in the original SD/SDXL (sgm) layout and is no module of {base.what} "
                f"({'several' if sgm else 'none'} of its diffusers modules has that sgm name); pass the original "
                "single-file checkpoint (model.diffusion_model.* keys) as the base"
            )
        if not model and base.layout == "diffusers" and flat.startswith(_BFL):
            return _flux_targets(path, key, flat, names)
        raise AdapterFormatError(
            f"{path}: {key} matches no module of {base.what}; the file does not belong to this base"
        )
    unflattened = unflatten(flat)
    if unflattened is None:
        known = (
            " (an SDXL name: the base is its original single-file checkpoint)"
            if flat.startswith(_SGM)
            else " (a Flux name: the base is its BFL single file or diffusers transformer)"
            if flat.startswith(_BFL)
            else ""
        )
        if base is not None and model == TE2 and base.openclip:
            known = f" ({base.what} stores this text encoder in OpenCLIP's layout, which kohya's names do not reach)"
        raise UnsupportedAdapterError(
            f"{path}: {key} cannot be mapped back to one module name without the base model{known} (its "
            "'_' may be '.' or part of a name): read it with its base, "
            "adapterops.load_adapter(path, base=...) or --base"
        )
    return [Target(model + unflattened)]


def _flux_targets(
    path: Path | str, key: str, flat: str, names: Mapping[str, tuple[int, ...]]
) -> list[Target]:
    """A BFL Flux module on a diffusers FluxTransformer2DModel: its modules, and the lora_up rows of
    each, sized by the base's own weights (so any width is exact)."""
    block = _FLUX_BLOCK.match(flat)
    parts: tuple[str, ...] | None
    if block is not None:
        table = _FLUX_DOUBLE if block["kind"] == "double" else _FLUX_SINGLE
        root = ("transformer_blocks." if block["kind"] == "double" else "single_transformer_blocks.") + block[
            "i"
        ]
        found = table.get(block["part"])
        parts = tuple(f"{root}.{p}" for p in found) if found else None
    else:
        parts = (_FLUX_TOP[flat],) if flat in _FLUX_TOP else None
    if parts is None or any(p not in names for p in parts):
        missing = "no diffusers module" if parts is None else f"no {next(p for p in parts if p not in names)}"
        raise AdapterFormatError(
            f"{path}: {key} is a Flux module with {missing} in the base; the file does not belong to this base"
        )
    out, start = [], 0
    for part in parts:
        rows = names[part][0]
        out.append(
            Target(
                part,
                (start, start + rows) if len(parts) > 1 else None,
                flat == "final_layer_adaLN_modulation_1",
            )
        )
        start += rows
    return out


# --------------------------------------------------------------------------------------------- read


def _read_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    return load_all(path)


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 of names, dtypes, shapes and bytes in name order: says whether two files hold the same tensors."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        data = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)}".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def read_adapter(
    path: Path,
    source: Source | None = None,
    base: str | Path | Checkpoint | Mapping[str, Any] | BaseModules | None = None,
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
    modules_of_base = read_base(base) if base is not None else None
    shapes = base_shapes(modules_of_base) if modules_of_base is not None else {}
    te_prefixes = {prefix for prefix, _ in parts if prefix in ("lora_te_", "lora_te1_")}
    if len(te_prefixes) > 1:
        raise AdapterFormatError(
            f"{path}: has both lora_te_ and lora_te1_ keys; one file names one first text encoder"
        )

    modules: dict[str, LoraModule] = {}
    alphas: dict[str, str | None] = {}
    keys: dict[str, str] = {}  # module -> its key in the file, where writing it back gives that key
    renamed: list[str] = []  # modules named in the base's layout, not the file's (not written as kohya)
    zero_alpha: list[str] = []
    for (prefix, flat), entry in sorted(parts.items()):
        key = prefix + flat
        down, up, alpha = entry.get("lora_down.weight"), entry.get("lora_up.weight"), entry.get("alpha")
        if alpha is not None and alpha.numel() == 1 and float(alpha.double()) == 0:
            zero_alpha.append(key)
        if down is None or up is None:
            missing = "lora_down.weight" if down is None else "lora_up.weight"
            raise AdapterFormatError(f"{path}: {key} has no {missing}; the file is incomplete")
        found = targets(key, modules_of_base, path)
        fused = _module(path, key, found[0].name, down, up, alpha)
        for target in place(path, key, fused, found, shapes, modules, "kohya"):
            alphas[target.name] = None if alpha is None else str(alpha.dtype).removeprefix("torch.")
            if len(found) == 1 and kohya_key(target.name, prefix) == key and not target.swap_halves:
                keys[target.name] = key
            else:
                renamed.append(target.name)

    if zero_alpha:
        warnings.warn(
            f"{path}: {len(zero_alpha)} module(s) store alpha 0 ({zero_alpha[0]}"
            f"{', ...' if len(zero_alpha) > 1 else ''}), read as alpha = rank (scale 1) as sd-scripts and "
            "LyCORIS train them; diffusers and ComfyUI apply such modules with scale 0",
            UserWarning,
            stacklevel=2,
        )
    if source is None:
        source = Source(path=str(path))
    source = Source(path=source.path, repo_id=source.repo_id, revision=source.revision, sha256=sha256)
    kohya = {
        "te_prefix": next(iter(te_prefixes), "lora_te_"),
        "metadata": {k: v for k, v in metadata.items() if k != PROVENANCE_KEY},
        "alphas": alphas,
        "tensors_sha256": tensors_sha256(tensors),
        "keys": keys,
        "renamed": renamed,
    }
    return Adapter(
        modules=modules,
        config={"format": FORMAT, FORMAT: kohya},
        source=source,
        provenance=provenance_from_metadata(path, metadata),
    )


def place(
    path: Path | str,
    key: str,
    whole: LoraModule,
    found: list[Target],
    shapes: Mapping[str, tuple[int, ...]],
    modules: dict[str, LoraModule],
    what: str,
) -> list[Target]:
    """Put the file module ``key`` (read as ``whole``) into ``modules`` as its ``found`` targets, each
    checked against the base's ``shapes``; returns ``found``. Refuses (one line) a fused module whose
    rows do not add up to its targets', a target two file modules (``what``: the format) map to, and
    a shape that does not fit the base."""
    if found[-1].rows is not None and found[-1].rows[1] != whole.out_features:
        raise AdapterFormatError(
            f"{path}: {key} updates {whole.out_features} rows but the base's "
            f"{', '.join(t.name for t in found)} have {found[-1].rows[1]} together; the file does not "
            "belong to this base"
        )
    for target in found:
        module = part(whole, target)
        if target.name in modules:
            raise AdapterFormatError(f"{path}: two {what} modules map to {target.name}; the file is refused")
        if target.name in shapes and shapes[target.name] != module.weight_shape:
            raise AdapterFormatError(
                f"{path}: {key} updates a weight of shape {module.weight_shape} but the base's "
                f"{target.name}.weight is {shapes[target.name]}; the file does not belong to this base"
            )
        modules[target.name] = module
    return found


def check_plain(name: str, m: LoraModule, written_as: str) -> None:
    """Refuse (one line) what an image-model LoRA file cannot hold: a module that is not a plain LoRA
    on a linear or conv layer (lora_bias, DoRA, transposed Conv1D, embeddings, parameters)."""
    if m.kind not in (ModuleKind.LINEAR, ModuleKind.CONV) or m.transposed or m.bias is not None or m.is_dora:
        raise UnsupportedAdapterError(
            f"module {name}: a {m.kind.value} module{' with lora_bias' if m.bias is not None else ''}"
            f"{' (DoRA)' if m.is_dora else ''}{' (transposed)' if m.transposed else ''} cannot be "
            f"written as {written_as}: save as PEFT"
        )


def part(module: LoraModule, target: Target) -> LoraModule:
    """``module`` as ``target`` has it: renamed, its lora_up rows (and DoRA magnitudes, which are per
    row) cut out and swapped as said. Rows are independent in ``W + dW`` and in DoRA's row norm, so
    each part is exactly its rows of the whole."""

    def rows(t: torch.Tensor) -> torch.Tensor:
        t = t if target.rows is None else t[target.rows[0] : target.rows[1]]
        if target.swap_halves:
            half = t.shape[0] // 2
            t = torch.cat([t[half:], t[:half]])
        return t.contiguous()

    magnitude = None if module.magnitude is None else rows(module.magnitude)
    return replace(module, name=target.name, B=rows(module.B), magnitude=magnitude)


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
    if alpha_value == 0:  # sd-scripts' LoRAModule (and LyCORIS): ``alpha = lora_dim if alpha == 0``
        alpha_value = float(rank)
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
    read_keys: Mapping[str, str] = kohya.get("keys") or {}
    renamed = frozenset(kohya.get("renamed") or ())
    if adapter.full_tensors:
        raise UnsupportedAdapterError(
            f"tensors stored whole ({', '.join(sorted(adapter.full_tensors)[:3])}) have no place in a kohya "
            "LoRA file: save as PEFT (--format peft)"
        )
    out: dict[str, torch.Tensor] = {}
    owners: dict[str, str] = {}
    for name, m in adapter.modules.items():
        check_plain(name, m, "kohya LoRA (linear and conv layers only)")
        own = name.removeprefix(TE2) if name.startswith(TE2) else name.removeprefix(TE1)
        key = kohya_key(name, te_prefix)
        if name in renamed:
            raise UnsupportedAdapterError(
                f"module {name} was read from a kohya file of another layout (SDXL's sgm or Flux's BFL names) "
                "against a diffusers base, so it is in diffusers' names: save as PEFT, or read the file against "
                "its original single-file checkpoint to write kohya back"
            )
        if read_keys.get(name) != key and unflatten(flatten(own)) != own:
            raise UnsupportedAdapterError(
                f"module {name} is not a module of a Stable Diffusion UNet or CLIP text encoder, nor one a "
                "kohya file named as it is read, so its kohya key could not be read back (a kohya file read "
                "against a base of another layout is in that base's names): save as PEFT, or convert --to gguf "
                "for a language model"
            )
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
