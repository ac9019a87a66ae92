"""diffusers pipeline LoRA files (``pytorch_lora_weights.safetensors``, what ``save_lora_weights`` writes).

One ``.safetensors`` file; each tensor key is a pipeline component, the module's path inside it and
a factor (PEFT's spelling; diffusers reads the older spellings too, and so does adapterops)::

    <component>.<module>.lora_A.weight     (r, in) linear, (r, in, k, k) conv
    <component>.<module>.lora_B.weight     (out, r) linear, (out, r, 1, 1) conv
      older: <module>.lora.down.weight / .lora.up.weight              (unet, transformer)
             <module>.lora_linear_layer.down.weight / .up.weight      (text encoders)

    component: unet | transformer | text_encoder | text_encoder_2

The scales are in the safetensors metadata entry ``lora_adapter_metadata`` (diffusers >= 0.33): a
JSON object of each component's ``LoraConfig`` fields under ``<component>.<field>`` (``unet.r``,
``unet.lora_alpha``, ``unet.rank_pattern``, ...). diffusers builds ``LoraConfig(**fields)`` from it,
so a module's scale is PEFT's: ``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``), patterns
resolved by ``peft_config.module_rank_alpha``. Without that entry diffusers gives every module
``lora_alpha = r`` (``utils/peft_utils.py: get_peft_kwargs``), i.e. scale 1::

    dW = scale · lora_B @ lora_A          (conv: lora_A flattened to (r, in·k·k))

In memory the denoiser's modules (``unet.`` or ``transformer.``) go by their bare module path, as
kohya's reader names the UNet's (``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``,
``transformer_blocks.0.attn.to_q`` for Flux / SD3), and the text encoders' keep their component
(``text_encoder.text_model.encoder.layers.0.self_attn.q_proj``). Which denoiser a file had is
recorded; an adapter read elsewhere goes under ``unet.`` when every bare module starts with an
attribute of ``UNet2DConditionModel`` (``_UNET_CHILDREN``), under ``transformer.`` otherwise.

Writing states every module's scale in ``lora_adapter_metadata``: ``lora_alpha = scale · r``
(``alpha / r == scale`` in float64), the most common r and alpha as defaults, the others in
``rank_pattern`` / ``alpha_pattern``; so no factor is changed and nothing is folded.

What reading records for writing back goes into ``Adapter.config``: ``format: diffusers`` and
``diffusers: {denoiser, metadata}`` (other safetensors metadata entries, kept). A kohya record
(``config["kohya"]``) travels in the metadata entry ``adapterops.kohya`` so kohya -> diffusers ->
kohya gives the kohya file back byte for byte.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from adapterops.adapter import Adapter, LoraModule, ModuleKind, Source
from adapterops.errors import AdapterFormatError, AdapterOpsError, UnsupportedAdapterError
from adapterops.io.atomic import atomic_output_dir, atomic_output_file
from adapterops.io.kohya import check_plain
from adapterops.io.patterns import shown
from adapterops.io.peft import PROVENANCE_KEY, provenance_from_metadata
from adapterops.io.peft_config import check_config, get_pattern_key, lora_scale
from adapterops.io.refs import inside
from adapterops.io.safetensors_file import load_all, read_header, save_tensors

FORMAT = "diffusers"
WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
KOHYA_KEY = "adapterops.kohya"
DENOISERS = ("unet", "transformer")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
COMPONENTS = (*DENOISERS, *TEXT_ENCODERS)
_TEXT_MODEL = "text_model."  # transformers >= 5 flattens CLIPTextModel; diffusers strips this prefix

_KEY = re.compile(
    r"^(?P<component>unet|transformer|text_encoder_2|text_encoder)\.(?P<module>[^\s]+?)"
    r"\.(?P<part>lora_A\.weight|lora_B\.weight|lora\.down\.weight|lora\.up\.weight"
    r"|lora_linear_layer\.down\.weight|lora_linear_layer\.up\.weight)$"
)
_PARTS = {
    "lora_A.weight": ("A", "peft"),
    "lora_B.weight": ("B", "peft"),
    "lora.down.weight": ("A", "lora.down/up"),
    "lora.up.weight": ("B", "lora.down/up"),
    "lora_linear_layer.down.weight": ("A", "lora_linear_layer"),
    "lora_linear_layer.up.weight": ("B", "lora_linear_layer"),
}
# the spellings diffusers 0.42 turns into PEFT's for each kind of component (state_dict_utils.py:
# UNET_TO_DIFFUSERS in load_lora_adapter, DIFFUSERS_TO_PEFT in _load_lora_into_text_encoder)
_FORMS = {"unet": ("peft", "lora.down/up"), "transformer": ("peft", "lora.down/up")}
_FORMS |= {te: ("peft", "lora_linear_layer") for te in TEXT_ENCODERS}
# LoraConfig fields that decide which modules get LoRA or what it computes, beyond r / alpha / rsLoRA
_REFUSED_FIELDS = {
    "use_dora": "DoRA",
    "lora_bias": "a lora_B bias",
    "fan_in_fan_out": "transposed (Conv1D) weights",
    "modules_to_save": "modules stored whole",
    "exclude_modules": "excluded modules",
    "layers_to_transform": "a subset of layers",
    "layers_pattern": "a subset of layers",
    "target_parameters": "LoRA on parameters",
}
# the attributes of diffusers' UNet2DConditionModel: a bare module under one of them is a UNet's
_UNET_CHILDREN = frozenset(
    [
        "conv_in",
        "time_proj",
        "time_embedding",
        "class_embedding",
        "add_embedding",
        "add_time_proj",
        "encoder_hid_proj",
        "down_blocks",
        "up_blocks",
        "mid_block",
        "conv_norm_out",
        "conv_act",
        "conv_out",
    ]
)


# top-level attributes of transformers' language models (Llama's model, lm_head; GPT-2's transformer):
# no diffusers UNet or transformer has them
_LANGUAGE_MODEL = frozenset(("model", "base_model", "lm_head", "transformer", "embed_tokens"))


def weights_file(path: Path) -> Path | None:
    """The weights file ``path`` names: itself (a ``.safetensors`` file) or ``WEIGHTS_NAME`` in a folder."""
    if path.is_file() and path.suffix.lower() == ".safetensors":
        return path
    if path.is_dir() and not (path / "adapter_config.json").exists() and (path / WEIGHTS_NAME).is_file():
        return path / WEIGHTS_NAME
    return None


def detect(path: Path) -> bool:
    """A ``.safetensors`` file (or a folder with ``pytorch_lora_weights.safetensors``) keyed by pipeline
    components (``unet.`` / ``transformer.`` / ``text_encoder.`` / ``text_encoder_2.``)."""
    file = weights_file(path)
    if file is None:
        return False
    try:
        names = [e.name for e in read_header(file).entries]
    except (AdapterOpsError, OSError):
        return path.is_dir()  # the folder is diffusers'; reading says what is wrong with its file
    return any(n.split(".", 1)[0] in COMPONENTS for n in names)


# --------------------------------------------------------------------------------------------- read


def _json_object(where: Path, key: str, text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise AdapterFormatError(
            f"{where}: metadata {key!r} is not valid JSON ({shown(str(exc)[:120])}); the file was modified: "
            f"remove that metadata entry or save the adapter again"
        ) from None
    if not isinstance(value, dict):
        raise AdapterFormatError(
            f"{where}: metadata {key!r} is {type(value).__name__}, expected a JSON object; remove that "
            "metadata entry or save the adapter again"
        )
    return value


def component_configs(where: Path, metadata: Mapping[str, str], components: set[str]) -> dict[str, Any]:
    """Each component's LoraConfig fields from ``lora_adapter_metadata`` (None: no entry, scale 1).

    A component with tensors but no fields gets ``{}``, as in diffusers, i.e. PEFT's defaults r = 8,
    lora_alpha = 8. Fields that change which modules get LoRA or what it computes are refused.
    """
    if METADATA_KEY not in metadata:
        return dict.fromkeys(components)
    packed = _json_object(where, METADATA_KEY, metadata[METADATA_KEY])
    configs: dict[str, Any] = {c: {} for c in components}
    for key, value in packed.items():
        component, _, field = key.partition(".")
        if component not in COMPONENTS or not field:
            raise AdapterFormatError(
                f"{where}: {METADATA_KEY} has the entry {shown(key)}; diffusers writes <component>.<field> with "
                f"component one of {', '.join(COMPONENTS)}: remove that entry or save the adapter again"
            )
        if component in configs:
            configs[component][field] = value
    for component, config in configs.items():
        what = f"{where}: {METADATA_KEY} ({component})"
        check_config(config, what)
        for field, why in _REFUSED_FIELDS.items():
            if config.get(field):
                raise UnsupportedAdapterError(
                    f"{what}: {field} is set ({why}); adapterops reads diffusers LoRA without it"
                )
        targets = config.get("target_modules")
        if targets is not None and not (
            isinstance(targets, list) and all(isinstance(t, str) for t in targets)
        ):
            raise UnsupportedAdapterError(
                f"{what}: target_modules is {shown(targets)}; adapterops reads a list of module names "
                "(what diffusers writes), not a regular expression"
            )
    return configs


def _names_seen(component: str, module: str) -> tuple[str, ...]:
    """The names PEFT may see for ``module``: text encoders lose ``text_model.`` under transformers >= 5."""
    if component in TEXT_ENCODERS and module.startswith(_TEXT_MODEL):
        return module, module.removeprefix(_TEXT_MODEL)
    return (module,)


def _rank_alpha(where: Path, component: str, module: str, config: Mapping[str, Any]) -> tuple[int, float]:
    """(r, lora_alpha) diffusers' LoraConfig gives ``module``; the same under every name PEFT may see."""
    found = set()
    for name in _names_seen(component, module):
        got = []
        for field, default in (
            ("rank_pattern", config.get("r", 8)),
            ("alpha_pattern", config.get("lora_alpha", 8)),
        ):
            pattern = config.get(field) or {}
            try:
                got.append(pattern.get(get_pattern_key(pattern.keys(), name), default))
            except AdapterFormatError as exc:
                raise AdapterFormatError(f"{where}: {METADATA_KEY} ({component}) {field}: {exc}") from None
        found.add((int(got[0]), float(got[1])))
    if len(found) > 1:
        raise AdapterFormatError(
            f"{where}: {METADATA_KEY} ({component}): the patterns give {module} a different r or alpha with and "
            "without its text_model. prefix, so its scale depends on the transformers version; fix the metadata"
        )
    return found.pop()


def _targeted(module: str, component: str, targets: list[str] | None) -> bool:
    if targets is None:
        return True
    return any(n == t or n.endswith(f".{t}") for n in _names_seen(component, module) for t in targets)


def read_adapter(path: Path, source: Source | None = None) -> Adapter:
    """Parse a diffusers LoRA file, or a folder holding ``pytorch_lora_weights.safetensors``.

    See the module docstring for the keys, the scales and the names.
    """
    file = weights_file(path)
    if file is None:
        raise AdapterFormatError(f"{path}: no {WEIGHTS_NAME}; expected a diffusers LoRA file or its folder")
    if file != path:
        inside(path, file)  # a link that leads out of the folder is not followed
    tensors, metadata, sha256 = load_all(file)
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    forms: dict[str, dict[str, str]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None or _PARTS[match["part"]][1] not in _FORMS[match["component"]]:
            hint = (
                "diffusers ignores .alpha keys in this format (scales live in lora_adapter_metadata)"
                if key.endswith(".alpha")
                else "expected <component>.<module>.lora_A.weight / lora_B.weight (or diffusers' older "
                ".lora.down/.lora.up for unet/transformer, .lora_linear_layer.down/.up for text encoders); "
                "DoRA, lora_B.bias, attention-processor and other variants are not read"
            )
            raise UnsupportedAdapterError(
                f"{file}: tensor {shown(key[:120])} is not a diffusers LoRA key: {hint}"
            )
        slot, form = _PARTS[match["part"]]
        forms.setdefault(match["component"], {}).setdefault(form, key)
        parts.setdefault((match["component"], match["module"]), {})[slot] = tensor
    if not parts:
        raise AdapterFormatError(
            f"{file}: no diffusers LoRA tensors (unet. / transformer. / text_encoder. keys)"
        )
    for component, seen in forms.items():
        if len(seen) > 1:  # diffusers converts a component's keys by its first key's spelling only
            a, b = list(seen.values())[:2]
            raise AdapterFormatError(
                f"{file}: {component} mixes two key spellings ({shown(a)} and {shown(b)}); diffusers would "
                "skip part of it: save the adapter again in one spelling"
            )
    denoisers = sorted({c for c, _ in parts if c in DENOISERS})
    if len(denoisers) > 1:
        raise AdapterFormatError(f"{file}: has both unet. and transformer. keys; a pipeline has one denoiser")
    configs = component_configs(file, metadata, {c for c, _ in parts})

    modules: dict[str, LoraModule] = {}
    for (component, module), entry in sorted(parts.items()):
        name = module if component in DENOISERS else f"{component}.{module}"
        config = configs[component]
        where = f"{file}: {component}.{module}"
        if config is None:
            rank = _module_rank(where, entry)
            r, alpha, rslora = rank, float(rank), False
        else:
            if not _targeted(module, component, config.get("target_modules")):
                raise AdapterFormatError(
                    f"{where} is not in {METADATA_KEY}'s {component}.target_modules, so diffusers would not load "
                    "it; the metadata does not belong to these tensors"
                )
            r, alpha = _rank_alpha(file, component, module, config)
            rslora = bool(config.get("use_rslora", False))
        modules[name] = _module(where, name, entry, r, lora_scale(r, alpha, rslora))

    kept = {k: v for k, v in metadata.items() if k not in (METADATA_KEY, PROVENANCE_KEY, KOHYA_KEY, "format")}
    adapter_config: dict[str, Any] = {
        "format": FORMAT,
        FORMAT: {"denoiser": denoisers[0] if denoisers else None, "metadata": kept},
    }
    if KOHYA_KEY in metadata:
        adapter_config["kohya"] = _kohya_record(file, metadata[KOHYA_KEY])
    if source is None:
        source = Source(path=str(path))
    source = Source(path=source.path, repo_id=source.repo_id, revision=source.revision, sha256=sha256)
    return Adapter(
        modules=modules,
        config=adapter_config,
        source=source,
        provenance=provenance_from_metadata(file, metadata),
    )


def _module_rank(where: str, entry: Mapping[str, torch.Tensor]) -> int:
    A = entry.get("A")
    if A is None or A.dim() < 2:
        return 0  # _module says what is wrong
    return int(A.shape[0])


def _module(where: str, name: str, entry: Mapping[str, torch.Tensor], r: int, scale: float) -> LoraModule:
    A, B = entry.get("A"), entry.get("B")
    if A is None or B is None:
        raise AdapterFormatError(
            f"{where} has no {'lora_A' if A is None else 'lora_B'}; the file is incomplete"
        )
    for label, tensor in (("lora_A", A), ("lora_B", B)):
        if not tensor.is_floating_point():
            raise AdapterFormatError(f"{where}: {label} is {tensor.dtype}; expected floating point")
        if not torch.isfinite(tensor).all():
            raise AdapterFormatError(f"{where}: {label} contains NaN or Inf values")
    shapes = f"lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}"
    kernel: tuple[int, ...] = ()
    if A.dim() == 4 and B.dim() == 4 and tuple(B.shape[2:]) == (1, 1):
        kernel = (int(A.shape[2]), int(A.shape[3]))
        A, B = A.reshape(A.shape[0], -1), B.reshape(B.shape[0], B.shape[1])
    elif A.dim() != 2 or B.dim() != 2:
        raise UnsupportedAdapterError(
            f"{where}: {shapes} are neither a linear pair nor a conv pair with a 1x1 lora_B"
        )
    if int(B.shape[1]) != int(A.shape[0]) or A.shape[0] == 0:
        raise AdapterFormatError(f"{where}: {shapes} do not share a rank")
    if int(A.shape[0]) != r:
        raise AdapterFormatError(
            f"{where} has rank {A.shape[0]} but {METADATA_KEY} gives it r={r} (r / rank_pattern); diffusers "
            "cannot load it: the metadata does not belong to these tensors"
        )
    return LoraModule(
        name=name,
        A=A,
        B=B,
        scale=scale,
        kind=ModuleKind.CONV if kernel else ModuleKind.LINEAR,
        kernel_size=kernel,
    )


def _kohya_record(where: Path, text: str) -> dict[str, Any]:
    """The kohya record a diffusers file carries (see the module docstring), checked."""
    record = _json_object(where, KOHYA_KEY, text)
    ok = (
        record.get("te_prefix") in ("lora_te_", "lora_te1_")
        and isinstance(record.get("metadata"), dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in record["metadata"].items())
        and isinstance(record.get("alphas"), dict)
        and all(v in (None, "float32", "float16", "bfloat16", "float64") for v in record["alphas"].values())
        and isinstance(record.get("tensors_sha256"), str)
    )
    if not ok:
        raise AdapterFormatError(
            f"{where}: metadata {KOHYA_KEY!r} is not the record adapterops writes; the file was modified: "
            "remove that metadata entry or save the adapter again"
        )
    return record


# --------------------------------------------------------------------------------------------- write


def denoiser_of(adapter: Adapter) -> str:
    """``unet`` or ``transformer``: the component the adapter's bare module names go under."""
    recorded = (
        (adapter.config.get(FORMAT) or {}).get("denoiser") if adapter.config.get("format") == FORMAT else None
    )
    if recorded in DENOISERS:
        return str(recorded)
    bare = [n for n in adapter.modules if not n.startswith(tuple(f"{te}." for te in TEXT_ENCODERS))]
    return "unet" if all(n.split(".", 1)[0] in _UNET_CHILDREN for n in bare) else "transformer"


def _alpha(scale: float, r: int) -> float:
    """A lora_alpha with ``alpha / r == scale`` in float64 (PEFT's ``scaling = lora_alpha / r``)."""
    alpha = scale * r
    for candidate in (alpha, math.nextafter(alpha, math.inf), math.nextafter(alpha, -math.inf)):
        if candidate / r == scale:
            return candidate
    return alpha  # off by at most one float64 ulp of the scale


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() and abs(value) < 2**53 else float(value)


def _pattern_key(component: str, module: str) -> str:
    """A rank/alpha pattern key that matches ``module`` and nothing else, under every name PEFT may see:
    anchored for the denoiser (Flux has ``proj_out`` and ``*.proj_out``), a full suffix for text encoders."""
    if component in TEXT_ENCODERS:
        return re.escape(module.removeprefix(_TEXT_MODEL))
    return "^" + re.escape(module)


def lora_metadata(adapter: Adapter) -> dict[str, Any]:
    """``lora_adapter_metadata`` stating every module's r and scale (see the module docstring)."""
    denoiser = denoiser_of(adapter)
    by_component: dict[str, dict[str, LoraModule]] = {}
    for name, m in adapter.modules.items():
        component = next((te for te in TEXT_ENCODERS if name.startswith(f"{te}.")), denoiser)
        module = name.removeprefix(f"{component}.") if component in TEXT_ENCODERS else name
        by_component.setdefault(component, {})[module] = m
    packed: dict[str, Any] = {}
    for component, modules in sorted(by_component.items()):
        ranks = {n: m.rank for n, m in modules.items()}
        alphas = {n: _number(_alpha(m.scale, m.rank)) for n, m in modules.items()}
        r = Counter(ranks.values()).most_common(1)[0][0]
        alpha = Counter(alphas.values()).most_common(1)[0][0]
        targets = sorted({n.removeprefix(_TEXT_MODEL) if component in TEXT_ENCODERS else n for n in modules})
        config = {
            "r": r,
            "lora_alpha": alpha,
            "rank_pattern": {_pattern_key(component, n): v for n, v in ranks.items() if v != r},
            "alpha_pattern": {_pattern_key(component, n): v for n, v in alphas.items() if v != alpha},
            "target_modules": targets,
            "use_rslora": False,
            "use_dora": False,
            "lora_bias": False,
            "init_lora_weights": True,
        }
        for n in modules:  # the patterns must resolve back to what we mean, the way PEFT reads them
            got = _rank_alpha(Path(WEIGHTS_NAME), component, n, config)
            if got != (ranks[n], float(alphas[n])):
                raise AdapterFormatError(
                    f"module {n}: rank/alpha patterns would resolve to r={got[0]}, alpha={got[1]} instead of "
                    f"r={ranks[n]}, alpha={alphas[n]}; please report this"
                )
        packed |= {f"{component}.{k}": v for k, v in config.items()}
    return packed


# the first attribute names of sgm's UNet and BFL's Flux (what kohya SDXL / Flux files name without a base)
_ORIGINAL_LAYOUT = frozenset(
    [
        "input_blocks",
        "middle_block",
        "output_blocks",
        "time_embed",
        "label_emb",
        "out",
        "double_blocks",
        "single_blocks",
        "img_in",
        "txt_in",
        "time_in",
        "vector_in",
        "guidance_in",
        "final_layer",
    ]
)


def state_dict(adapter: Adapter, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The tensors of ``adapter`` under diffusers' keys (PEFT spelling), factors cast to ``dtype``."""
    if adapter.full_tensors:
        raise UnsupportedAdapterError(
            f"tensors stored whole ({', '.join(sorted(adapter.full_tensors)[:3])}) have no place in a diffusers "
            "LoRA file: save as PEFT (--format peft)"
        )
    denoiser = denoiser_of(adapter)
    language = next((n for n in adapter.modules if n.split(".", 1)[0] in _LANGUAGE_MODEL), None)
    if adapter.config.get("task_type") or language:
        raise UnsupportedAdapterError(
            f"the adapter is for a language model ({language or adapter.config['task_type']}), which has no "
            "place in a diffusers pipeline LoRA file: save as PEFT, or convert --to gguf"
        )
    original = next((n for n in adapter.modules if n.split(".", 1)[0] in _ORIGINAL_LAYOUT), None)
    if original is not None:  # diffusers' loaders look modules up by its own models' names
        raise UnsupportedAdapterError(
            f"module {original} is named in an original single-file layout (SDXL sgm or Flux BFL), not in "
            "diffusers' models: read the file with --base pointing at the diffusers unet/ or transformer/ "
            "folder, which maps it to diffusers' names"
        )
    out: dict[str, torch.Tensor] = {}
    for name, m in adapter.modules.items():
        check_plain(name, m, "a diffusers LoRA file (linear and conv layers, plain LoRA only)")
        key = name if name.startswith(tuple(f"{te}." for te in TEXT_ENCODERS)) else f"{denoiser}.{name}"
        cast = dtype or m.A.dtype
        A, B = m.A, m.B
        if m.kind is ModuleKind.CONV:
            in_channels = m.in_features // math.prod(m.kernel_size)
            A = A.reshape(m.rank, in_channels, *m.kernel_size)
            B = B.reshape(*B.shape, *(1 for _ in m.kernel_size))
        out[f"{key}.lora_A.weight"] = A.to(cast).contiguous()
        out[f"{key}.lora_B.weight"] = B.to(cast).contiguous()
    return out


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def save_adapter(
    adapter: Adapter, path: str | Path, *, force: bool = False, dtype: torch.dtype | str | None = None
) -> Path:
    """Write ``adapter`` as a diffusers LoRA file, atomically.

    ``path`` ending in ``.safetensors`` is written as that one file; any other ``path`` is a folder
    holding ``pytorch_lora_weights.safetensors``, the layout ``save_lora_weights`` writes and
    ``pipe.load_lora_weights(path)`` reads. ``dtype`` casts the factors (None or ``"auto"`` keeps them).

    Example:
        >>> save_adapter(load_adapter("style.safetensors"), "./style-diffusers")   # a kohya file, converted
    """
    target = Path(path)
    if isinstance(dtype, str):
        dtype = None if dtype == "auto" else _DTYPES[dtype]
    tensors = state_dict(adapter, dtype)
    recorded = (adapter.config.get(FORMAT) or {}) if adapter.config.get("format") == FORMAT else {}
    metadata = {str(k): str(v) for k, v in (recorded.get("metadata") or {}).items()}
    metadata |= {"format": "pt", METADATA_KEY: json.dumps(lora_metadata(adapter), indent=2, sort_keys=True)}
    if adapter.config.get("kohya"):
        metadata[KOHYA_KEY] = json.dumps(adapter.config["kohya"], sort_keys=True)
    if adapter.provenance:
        metadata[PROVENANCE_KEY] = json.dumps(adapter.provenance, sort_keys=True)
    if target.suffix.lower() == ".safetensors":
        with atomic_output_file(target, force=force) as tmp:
            save_tensors(tmp, tensors, metadata)
    else:
        with atomic_output_dir(target, force=force) as tmp:
            save_tensors(tmp / WEIGHTS_NAME, tensors, metadata)
    return target
