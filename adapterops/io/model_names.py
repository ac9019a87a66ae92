"""The names transformers gives a checkpoint's tensors once it is loaded: the names adapters use.

transformers 5 renames some models' tensors when it loads a checkpoint, and renames them back when it
saves one (its ``conversion_mapping``). The Hub keeps the stored layout, while PEFT adapters name the
modules of the loaded model. For example, LLaVA-family, Gemma 3 and Mistral 3 checkpoints store
``language_model.model.layers.0.self_attn.q_proj.weight`` for the module
``model.language_model.layers.0.self_attn.q_proj``, Qwen2-VL stores ``model.layers.*`` for it, and
GPT-NeoX (Pythia) stores ``embed_out`` for ``lm_head``.

``load_names`` asks the installed transformers what it calls each stored tensor, in the way
``from_pretrained`` decides it. It builds the architecture that config.json names on the meta device
(no memory, no weights), collects the transforms transformers would apply to it
(``get_model_conversion_mapping``), and runs every stored key through them (``rename_source_key``,
base-model prefix included). No table is copied from transformers, so the answer always matches the
installed version. The layout follows from the checkpoint's own keys: keys that transformers leaves
unchanged are already in-memory names, and keys it renames are in the stored (Hub) layout.

The same meta model says what each module is (``LoadNames.layers``: the LoRA layer PEFT would make
of it, by the isinstance tests of PEFT's ``dispatch_default``), which ``extract`` needs to write
each module's LoRA in the right layout.

transformers is imported here only, and only when an adapter name is not a stored key, so
``adapterops --help`` and merges of checkpoints whose names already match never import it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch

INSTALL_HINT = "pip install 'adapterops[transformers]'"


class LayerKind(str, Enum):
    """Which PEFT LoRA layer a module becomes (PEFT's ``dispatch_default`` tests the same classes)."""

    LINEAR = "linear"  # nn.Linear and subclasses
    CONV1D = "conv1d"  # transformers' GPT-2 style Conv1D: weight stored (in, out)
    EMBEDDING = "embedding"  # nn.Embedding and subclasses
    CONV = "conv"  # nn.Conv1d, nn.Conv2d, nn.Conv3d with groups=1
    OTHER = "other"  # anything else: norms, grouped convolutions, custom layers


@dataclass(frozen=True)
class Layer:
    """One module of the loaded model: its ``kind`` for LoRA, and its class name (for messages)."""

    kind: LayerKind
    cls: str


@dataclass(frozen=True)
class LoadNames:
    """What transformers calls a checkpoint's stored tensors.

    ``renamed`` maps the in-memory name to the stored key for every key that transformers renames (an
    exact, one-to-one map). ``converted`` maps an in-memory name to the stored keys that transformers
    fuses, splits or otherwise transforms into it, and ``clashes`` lists in-memory names that several
    stored keys would load into. ``origin`` says where the names come from. ``problem`` is set when they
    could not be derived, and says why and how to fix it. In that case the maps are empty.
    """

    origin: str
    renamed: Mapping[str, str] = field(default_factory=dict)
    converted: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    clashes: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    tied: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    problem: str | None = None
    layers: Mapping[str, Layer] = field(default_factory=dict)

    @property
    def layout(self) -> str:
        """``stored`` when transformers renames some keys (the Hub layout), else ``in-memory``."""
        return "stored" if self.renamed or self.converted else "in-memory"


def load_names(config: Mapping[str, Any], keys: Iterable[str]) -> LoadNames:
    """What the installed transformers calls each of ``keys``, for a checkpoint with ``config``
    (config.json as a dict). Never raises: ``problem`` says why the names are unknown.

    Example: for a LLaVA checkpoint, ``load_names(config, keys).renamed[
    "model.language_model.layers.0.self_attn.q_proj.weight"]`` is
    ``"language_model.model.layers.0.self_attn.q_proj.weight"``.
    """
    try:
        import transformers
    except ImportError:
        return LoadNames(
            "no transformers",
            problem="transformers is not installed: the stored names may differ from the adapter's only in "
            f"layout, and adapterops reads transformers' load-time renames to map them: {INSTALL_HINT}",
        )
    origin = f"transformers {transformers.__version__}"
    try:
        from transformers import conversion_mapping, core_model_loading
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    except ImportError:  # transformers 4 kept its renames elsewhere
        return LoadNames(
            origin,
            problem=f"adapterops reads the load-time renames of transformers 5 or later: {INSTALL_HINT}",
        )
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    custom = bool(config.get("auto_map"))
    if not model_type:
        # not a transformers checkpoint: from_pretrained cannot load it, so nothing renames its tensors
        return LoadNames(origin)
    if model_type not in CONFIG_MAPPING:
        if custom:  # remote code: transformers applies no conversion to it
            return LoadNames(origin)
        return LoadNames(
            origin,
            problem=f"{origin} does not know model_type {model_type!r}; if it is a newer model, upgrade "
            "transformers (pip install -U transformers) so adapterops can read its load-time renames",
        )
    if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
        return LoadNames(
            origin,
            problem=f"config.json's architectures must be a list of class names, got {architectures!r}",
        )
    if not architectures:
        return LoadNames(
            origin,
            problem="config.json names no architecture, and transformers' load-time renames depend on it; "
            'add the class of the model it was saved from (e.g. "LlamaForCausalLM") to "architectures"',
        )
    name = str(architectures[0])
    model_class = getattr(transformers, name, None)
    if model_class is None:
        if custom:
            return LoadNames(origin)
        return LoadNames(
            origin,
            problem=f"{origin} has no model class {name} (from config.json); upgrade transformers "
            "(pip install -U transformers) so adapterops can read its load-time renames",
        )
    origin = f"{origin} ({name})"
    try:
        with _quiet(transformers):
            model = _meta_model(CONFIG_MAPPING[model_type], model_class, config)
            transforms = conversion_mapping.get_model_conversion_mapping(model)
            in_memory = model.state_dict()
            ties = dict(getattr(model, "all_tied_weights_keys", None) or {})
            layers = {name: _layer(module) for name, module in model.named_modules() if name}
    except Exception as exc:  # a config transformers itself cannot build: say so, and what it said
        return LoadNames(
            origin,
            problem=f"transformers could not build {name} from config.json ({type(exc).__name__}: {exc})",
        )
    renamings = [t for t in transforms if isinstance(t, core_model_loading.WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, core_model_loading.WeightConverter)]
    prefix = model.base_model_prefix
    targets: dict[str, list[str]] = {}
    converted: dict[str, list[str]] = {}
    for key in keys:
        # what from_pretrained does with each stored key (transformers' convert_and_load_state_dict_in_model)
        new, pattern = core_model_loading.rename_source_key(key, renamings, converters, prefix, in_memory)
        if new not in in_memory and key in in_memory:
            new, pattern = core_model_loading.rename_source_key(key, [], [], prefix, in_memory)
        if pattern is not None:
            converted.setdefault(new, []).append(key)
        elif new != key:
            targets.setdefault(new, []).append(key)
    return LoadNames(
        origin,
        renamed={new: old[0] for new, old in targets.items() if len(old) == 1},
        converted={new: tuple(old) for new, old in converted.items()},
        clashes={new: tuple(old) for new, old in targets.items() if len(old) > 1},
        tied=_tie_groups(ties),
        layers=layers,
    )


def _layer(module: torch.nn.Module) -> Layer:
    """What ``module`` becomes under LoRA, by the isinstance tests PEFT's ``dispatch_default`` makes."""
    from transformers.pytorch_utils import Conv1D

    nn = torch.nn
    kind = LayerKind.OTHER
    if isinstance(module, nn.Embedding):
        kind = LayerKind.EMBEDDING
    elif isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        kind = LayerKind.CONV if module.groups == 1 else LayerKind.OTHER
    elif isinstance(module, nn.Linear):
        kind = LayerKind.LINEAR
    elif isinstance(module, Conv1D):
        kind = LayerKind.CONV1D
    return Layer(kind, type(module).__name__)


def transformers_knows(config: Mapping[str, Any]) -> bool:
    """Whether ``config`` names a model type the installed transformers has (True where transformers
    is not installed: it might have it). False for checkpoints that are not transformers models."""
    try:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    except ImportError:
        return True
    model_type = config.get("model_type")
    return bool(model_type) and model_type in CONFIG_MAPPING


def _tie_groups(ties: Mapping[str, str]) -> dict[str, tuple[str, ...]]:
    """``{name: the other names sharing its tensor}`` from transformers' ``{tied name: source name}``."""
    groups: dict[str, set[str]] = {}
    for target, source in ties.items():
        group = groups.get(source, {source}) | groups.get(target, {target})
        for name in group:
            groups[name] = group
    return {name: tuple(sorted(group - {name})) for name, group in groups.items()}


@contextmanager
def _quiet(transformers: Any) -> Iterator[None]:
    """No log lines or warnings from transformers about a model that is only being named."""
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        transformers.logging.set_verbosity(verbosity)


def _meta_model(config_class: Any, model_class: Any, config: Mapping[str, Any]) -> Any:
    """``model_class`` built from ``config`` on the meta device: names and shapes, no memory, no weights."""
    built = config_class.from_dict(dict(config))
    if getattr(built, "use_pretrained_backbone", False):
        built.use_pretrained_backbone = False  # would download a backbone's weights
    with torch.device("meta"):
        return model_class(built)
