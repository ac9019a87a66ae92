"""Serving profiles: an adapter written so that one engine reads it exactly as PEFT does.

``convert --for ENGINE`` (``verbs.convert(..., engine=...)``) looks the engine up in ``PROFILES``,
refuses with one line what the engine cannot read (``check``), makes the factors fit what it reads
(``prepare``: ``ops.uniform`` folds every module's scale into B and zero-pads ranks to one), and
writes the format the engine loads (a PEFT directory, a GGUF file, a kohya file).

What each engine reads, and which source was read to say so, is in docs/serving.md; the profiles
below are that table as data. Where the source left a doubt, the profile refuses.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from adapterops.adapter import Adapter, LoraModule, ModuleKind, ModuleReport
from adapterops.errors import InvalidInputError, UnsupportedAdapterError, param
from adapterops.ops.uniform import make_uniform
from adapterops.options import Engine
from adapterops.provenance import operation_record

# the decoder-layer projections every engine here knows by name (Llama, Mistral, Qwen2 and kin)
_PROJECTIONS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_MERGE_HINT = "merge it into the base instead (adapterops merge BASE ADAPTER -o OUT)"


@dataclass(frozen=True)
class Profile:
    """What one engine reads (docs/serving.md), as the checks and the writer use it.

    ``format``: the adapter format written (a name in ``adapterops.io.FORMATS``). ``unit_scale``:
    every module's scale folded into B so the config says ``lora_alpha = r`` (scale 1); otherwise
    the most common scale is kept and the others are folded to it (one alpha per file). ``one_rank``:
    ranks zero-padded to the largest. ``kinds``: module kinds read. ``suffixes``: the last name
    component a module may have (None: any). ``max_rank``: the largest rank the engine can be
    configured for. ``layered``: every module must sit in a decoder layer (``layers.N.``).
    ``whole_types``: a module type in one layer must be in every layer (TGI drops the type otherwise).
    ``together``: projections the engine stacks, so a layer has all of a group or none.
    ``short_targets``: target_modules written as the modules' last name components (the form the
    engines match), not full names. ``needs_base``: the base's config.json is needed (GGUF: the
    architecture; TGI: ``num_hidden_layers``, to see that each module type is in every layer).
    ``names``: the full module names the engine looks up (None: any with an allowed suffix).
    """

    engine: Engine
    format: str
    read: str  # the engine source read, for messages and the docs
    unit_scale: bool = True
    one_rank: bool = True
    kinds: frozenset[ModuleKind] = frozenset({ModuleKind.LINEAR})
    suffixes: frozenset[str] | None = None
    max_rank: int | None = None
    layered: bool = False
    whole_types: bool = False
    together: tuple[frozenset[str], ...] = ()
    short_targets: bool = True
    needs_base: bool = False
    names: re.Pattern[str] | None = None


PROFILES: dict[Engine, Profile] = {
    Engine.VLLM: Profile(
        Engine.VLLM,
        "peft",
        "vllm-project/vllm vllm/lora/peft_helper.py, lora_model.py, utils.py",
        kinds=frozenset({ModuleKind.LINEAR, ModuleKind.EMBEDDING}),
        max_rank=512,  # LoRAConfig's largest --max-lora-rank
    ),
    Engine.SGLANG: Profile(
        Engine.SGLANG,
        "peft",
        "sgl-project/sglang python/sglang/srt/lora/lora_config.py, lora.py",
        suffixes=_PROJECTIONS,
        layered=True,
        together=(frozenset({"q_proj", "k_proj", "v_proj"}), frozenset({"gate_proj", "up_proj"})),
    ),
    Engine.TGI: Profile(
        Engine.TGI,
        "peft",
        "huggingface/text-generation-inference server/text_generation_server/adapters/lora.py",
        suffixes=_PROJECTIONS,
        whole_types=True,
        needs_base=True,
        # utils/adapter.py build_layer_weight_lookup: the only names it maps LoRA weights to
        names=re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"),
    ),
    Engine.LLAMA_CPP: Profile(
        Engine.LLAMA_CPP,
        "gguf",
        "llama.cpp convert_lora_to_gguf.py (adapterops.io.gguf)",
        unit_scale=False,
        one_rank=False,
        suffixes=_PROJECTIONS,
        short_targets=False,
        needs_base=True,
    ),
    Engine.DIFFUSERS: Profile(
        Engine.DIFFUSERS,
        "kohya",
        "diffusers 0.42.1 loaders/lora_pipeline.py, utils/peft_utils.py get_peft_kwargs",
        unit_scale=False,
        kinds=frozenset({ModuleKind.LINEAR, ModuleKind.CONV}),
        short_targets=False,
    ),
}


@dataclass(frozen=True)
class Served:
    """What serving an adapter did: the engine, the one rank every module has (None: ranks kept, as
    GGUF does), the one alpha of the output (``alpha / rank`` is every module's scale), the modules
    whose scale was folded into lora_B or whose rank was zero-padded, and the largest relative error
    ``||dW' - dW||_F / ||dW||_F`` folding made (0.0: every update is bit-exact)."""

    engine: Engine
    format: str
    rank: int | None
    alpha: float
    folded: tuple[str, ...]
    padded: tuple[str, ...]
    max_rel_error: float
    reports: tuple[ModuleReport, ...] = field(default=(), repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {
            "engine": self.engine.value,
            "format": self.format,
            "rank": self.rank,
            "alpha": self.alpha,
            "folded": list(self.folded),
            "padded": list(self.padded),
            "max_rel_error": self.max_rel_error,
        }


def _refuse(profile: Profile, what: str) -> UnsupportedAdapterError:
    return UnsupportedAdapterError(f"{profile.engine.value} cannot read {what}; {_MERGE_HINT}")


def _short(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def check(adapter: Adapter, profile: Profile, layers: int | None = None) -> None:
    """Refuse, with one line naming the first offending module, what ``profile``'s engine cannot read.

    ``layers``: the base model's number of decoder layers, where the profile needs it (TGI).
    """
    if not adapter.modules:
        raise UnsupportedAdapterError(f"{adapter.describe()}: the adapter has no LoRA modules to serve")
    if adapter.full_tensors:
        name = sorted(adapter.full_tensors)[0]
        raise _refuse(profile, f"tensors stored whole (modules_to_save or saved embeddings: {name})")
    for name, module in sorted(adapter.modules.items()):
        _check_module(name, module, profile)
    if profile.whole_types or profile.together:
        _check_layers(adapter, profile, layers)


def _check_module(name: str, module: LoraModule, profile: Profile) -> None:
    if module.is_dora:
        raise _refuse(profile, f"DoRA (lora_magnitude_vector of {name})")
    if module.bias is not None:
        raise _refuse(profile, f"lora_B bias (lora_bias=True: {name})")
    if module.kind not in profile.kinds:
        kinds = ", ".join(sorted(k.value for k in profile.kinds))
        raise _refuse(profile, f"{module.kind.value} LoRA ({name}; it reads {kinds} modules)")
    if module.transposed and module.kind is ModuleKind.LINEAR:
        raise _refuse(profile, f"fan_in_fan_out (Conv1D) modules ({name}): not verified against its loader")
    if profile.suffixes is not None and _short(name) not in profile.suffixes:
        known = ", ".join(sorted(profile.suffixes))
        raise _refuse(profile, f"LoRA on {name} (it applies LoRA to {known} only)")
    if profile.names is not None and not profile.names.fullmatch(name):
        raise _refuse(
            profile, f"LoRA on {name} (it looks up model.layers.N.self_attn.q/k/v/o_proj and mlp.*_proj)"
        )
    if profile.layered and not _LAYER.search(name):
        raise _refuse(profile, f"LoRA on {name}, outside the decoder layers (model.layers.N.)")
    if profile.max_rank is not None and module.rank > profile.max_rank:
        raise _refuse(profile, f"rank {module.rank} ({name}; at most {profile.max_rank})")


def _check_layers(adapter: Adapter, profile: Profile, layers: int | None) -> None:
    by_layer: dict[tuple[str, int], set[str]] = {}  # (prefix before "layers.N.", N) -> module types
    for name in adapter.modules:
        match = _LAYER.search(name)
        if match:
            by_layer.setdefault((name[: match.start()], int(match.group(1))), set()).add(_short(name))
    for (_, layer), types in sorted(by_layer.items()):
        for group in profile.together:
            if types & group and not group <= types:
                missing = ", ".join(sorted(group - types))
                raise _refuse(
                    profile,
                    f"layer {layer} with LoRA on {', '.join(sorted(types & group))} but not on {missing} "
                    "(it stacks them into one projection)",
                )
    if not profile.whole_types:
        return
    if layers is None:
        raise InvalidInputError(
            f"{profile.engine.value} drops a module type's LoRA in every layer when one layer lacks it: "
            f"pass the base model ({param('base', 'BASE')}) so its num_hidden_layers can be checked"
        )
    for prefix in sorted({p for p, _ in by_layer}):
        every: set[str] = set().union(*(t for (p, _), t in by_layer.items() if p == prefix))
        for layer in range(layers):
            lacking = every - by_layer.get((prefix, layer), set())
            if lacking:
                raise _refuse(
                    profile,
                    f"layer {layer} without LoRA on {', '.join(sorted(lacking))} while other layers have it "
                    "(it then drops that module type in every layer)",
                )
        beyond = sorted(n for (p, n) in by_layer if p == prefix and n >= layers)
        if beyond:
            raise InvalidInputError(
                f"the adapter has LoRA in layer {beyond[0]} but the base has {layers} layers; "
                "check base_model_name_or_path and --base"
            )


def prepare(adapter: Adapter, engine: Engine | str, *, layers: int | None = None) -> tuple[Adapter, Served]:
    """``adapter`` made to fit ``engine``'s loader, and what was done (``Served``).

    Checks first (``check``: one error line naming ``adapterops merge`` as the way out). Then, where
    the engine reads one ``r`` and one ``lora_alpha``, every module's ranks are zero-padded to the
    largest (exact) and its scale folded into lora_B (``ops.uniform``: one rounding to B's dtype,
    the relative error of each update measured): to scale 1 for the PEFT engines (the config says
    ``lora_alpha = r``), to the most common scale for diffusers (one alpha in the file, and the
    modules that had it are written bit for bit). The config loses rank/alpha patterns and rsLoRA.
    llama.cpp's GGUF writer keeps ranks and folds to its own alpha (io/gguf.py); its rounding
    error is measured here the same way.
    """
    profile = PROFILES[Engine(engine)]
    check(adapter, profile, layers)
    modules = adapter.modules
    if profile.format == "gguf":
        served = _gguf_served(adapter, profile)
        return replace(adapter, provenance=_record(adapter, served)), served
    scale = 1.0 if profile.unit_scale else Counter(m.scale for m in modules.values()).most_common(1)[0][0]
    rank = max(m.rank for m in modules.values()) if profile.one_rank else None
    uniform, reports = make_uniform(modules, rank=rank, scale=scale)
    served = Served(
        profile.engine,
        profile.format,
        rank,
        scale * rank if rank is not None else scale,
        tuple(n for n, m in sorted(modules.items()) if m.scale != scale),
        tuple(n for n, m in sorted(modules.items()) if rank is not None and m.rank != rank),
        max((r.rel_error for r in reports), default=0.0),
        reports,
    )
    config = {k: v for k, v in adapter.config.items() if k not in ("rank_pattern", "alpha_pattern")}
    # check() refused tensors stored whole, so these name nothing the file holds
    config.update(use_rslora=False, modules_to_save=None, bias="none")
    record = _record(adapter, served)
    return replace(adapter, modules=uniform, config=config, report=reports, provenance=record), served


def _record(adapter: Adapter, served: Served) -> dict[str, Any]:
    fields = {k: v for k, v in served.as_dict().items() if k not in ("folded", "padded")}
    return operation_record("convert", [adapter], **fields)


def _gguf_served(adapter: Adapter, profile: Profile) -> Served:
    from adapterops.io.gguf import file_alpha

    alpha, folded = file_alpha(adapter)
    reports = float32_fold_reports(adapter, folded, lambda m: alpha / m.rank)
    return Served(
        profile.engine,
        profile.format,
        None,
        alpha,
        tuple(folded),
        (),
        max((r.rel_error for r in reports), default=0.0),
        reports,
    )


def float32_fold_reports(
    adapter: Adapter, folded: Sequence[str], target: Callable[[LoraModule], float]
) -> tuple[ModuleReport, ...]:
    """What a writer that folds a module's scale into lora_b in float32 does to each ``folded``
    module (GGUF, mlx: ``B * s / target(module)`` in float64, rounded once to float32): one report
    each, its ``rel_error`` measured in float64 (``ops.uniform.fold_scale``, the same rounding)."""
    reports = []
    for name in folded:
        module = adapter.modules[name]
        as_float32 = replace(module, B=module.B.float())
        reports.append(make_uniform({name: as_float32}, rank=None, scale=target(module))[1][0])
    return tuple(reports)


def write(
    adapter: Adapter, output: str | Path, engine: Engine | str, *, base: Any = None, force: bool = False
) -> tuple[Path, Served]:
    """``prepare`` the adapter for ``engine`` and write it at ``output`` in the format the engine
    loads (PEFT directory, GGUF file with ``base``'s config.json, kohya file). Returns the path
    and the ``Served`` record."""
    from adapterops.io import FORMATS, save_adapter
    from adapterops.io.atomic import check_output_path

    profile = PROFILES[Engine(engine)]
    check_output_path(Path(output).absolute(), force=force, file=FORMATS[profile.format].writes_file(output))
    if base is not None and not profile.needs_base and adapter.config.get("format") != "kohya":
        raise InvalidInputError(  # a kohya input was named through the base: that is its use
            f"{param('base')} is not used by {param('engine', profile.engine.value)}; drop it"
        )
    layers = None
    if profile.whole_types and base is not None:
        layers = _num_layers(base)
    prepared, served = prepare(adapter, profile.engine, layers=layers)
    options: dict[str, Any] = {"force": force}
    if profile.format == "gguf":
        options["base"] = base
    if profile.short_targets:
        options["target_modules"] = sorted({_short(n) for n in prepared.modules})
    return save_adapter(prepared, output, format=profile.format, **options), served


def _num_layers(base: Any) -> int:
    from adapterops.io.refs import base_config

    config = base_config(base)
    layers = config.get("num_hidden_layers", (config.get("text_config") or {}).get("num_hidden_layers"))
    if isinstance(layers, bool) or not isinstance(layers, int) or not 0 < layers < 100_000:
        raise InvalidInputError(
            f"{base}: config.json has no num_hidden_layers (a whole number); is it a decoder?"
        )
    return layers
