"""Hugging Face safetensors checkpoints: which tensors a directory holds, and where.

A checkpoint is a directory with ``model.safetensors``, or shards listed in
``model.safetensors.index.json`` (``weight_map``: tensor name -> shard file), plus ``config.json``
and other files (tokenizer, generation config) that outputs copy as they are.

``Checkpoint.find_tensor`` maps an adapter's module name onto the one tensor it updates (through
transformers' load-time names where they differ from the stored ones, ``io.model_names``), and
``layout_for`` fixes the module's layout from the checkpoint's config (GPT-2 Conv1D).
``Checkpoint.placements`` says where each module's update lands, expert weights included:
transformers 5 names mixture-of-experts weights as fused (E, out, in) parameters in memory
(``mlp.experts.gate_up_proj``) while many checkpoints store one 2-D tensor per expert and
projection (``block_sparse_moe.experts.3.w1.weight``); ``moe_layouts`` (derived from transformers'
conversion mapping) says how, and which key renamings transformers applies on load.
``Checkpoint.tied_head`` says which stored embedding an ``lm_head`` tied to it reads, and
``Checkpoint.quantization`` which tensors are quantized (``io.quantization``).
``BaseWeights`` reads single base weights, dequantized, for the operations that need them (DoRA).

Every file of a checkpoint is untrusted: the index and config.json are type-checked, shard names
must be plain file names, and no file is read or copied through a link leading out of the
checkpoint directory (``inside``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from adapterops.adapter import LoraModule, ModuleKind
from adapterops.errors import (
    AdapterFormatError,
    IncompatibleAdaptersError,
    NotFoundError,
    UnsupportedAdapterError,
)
from adapterops.io.model_names import LoadNames, load_names
from adapterops.io.moe_layouts import EXPERTS, RENAMINGS, TRANSPOSED
from adapterops.io.quantization import Quantization, dequantize, detect
from adapterops.io.refs import inside, resolve
from adapterops.io.safetensors_file import Shard, TensorEntry, read_header, read_tensor

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# diffusers names a model component's weights (a UNet, a transformer) this way instead
DIFFUSERS_SINGLE = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = DIFFUSERS_SINGLE + ".index.json"
# weight files in other formats would hold the *unmerged* weights: never copied into an output
FOREIGN_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.h5", "*.msgpack", "*.ckpt", "*.gguf", "*.onnx", "*.ot")

# where original-layout single files (Stable Diffusion sgm, ComfyUI) keep their models: the denoiser
# under DENOISER_ROOT (BFL's Flux files have no prefix), the first text encoder as a transformers
# CLIPTextModel under one of TE1_ROOTS; adapters name them without (kohya: ``text_encoder.`` before
# the text encoder's own names)
DENOISER_ROOT = "model.diffusion_model."
TE1_ROOTS = (
    "conditioner.embedders.0.transformer.",  # SDXL
    "cond_stage_model.transformer.",  # SD 1.x
    "text_encoders.clip_l.transformer.",  # ComfyUI's Flux checkpoints
)
# text encoders stored in OpenCLIP's layout (fused in_proj): no adapter module name reaches them
OPENCLIP_ROOTS = ("conditioner.embedders.1.model.", "cond_stage_model.model.")
_STORED_ROOTS = (("text_encoder.", TE1_ROOTS), ("", (DENOISER_ROOT,)))

# model types whose linear layers are GPT-2 Conv1D (weight stored in x out), whatever the adapter says
CONV1D_MODEL_TYPES = {"gpt2", "openai-gpt", "imagegpt"}
# the output head of causal LMs, and the names of the word embedding a tied head reads
HEAD_KEY = "lm_head.weight"
WORD_EMBEDDINGS = ("embed_tokens", "wte", "word_embeddings", "tok_embeddings", "embed_in")
# architectures whose output head is the top-level ``lm_head`` module
LM_HEAD_ARCHITECTURES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


@dataclass(frozen=True)
class TiedHead:
    """``lm_head`` tied to the input embedding: it reads the stored ``embedding``; untied, it is
    written as ``head``."""

    embedding: str
    head: str = HEAD_KEY


@dataclass(frozen=True)
class Placement:
    """Where (part of) a module's update lands: tensor ``key``, or its slice ``[expert]`` for a fused
    (E, ., .) tensor. ``module`` is the part that lands there, in that tensor's layout (for a
    projection stored per expert, the rows of B that belong to it)."""

    key: str
    module: LoraModule
    expert: int | None = None


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint directory: its shards (file order), tensor locations and its config."""

    root: Path
    shards: tuple[Shard, ...]
    index: Mapping[str, Any] | None
    config: Mapping[str, Any]
    repo_id: str | None = None
    revision: str | None = None
    # one .safetensors file named as the checkpoint itself (no directory, index or config around it)
    single_file: bool = False

    @property
    def index_name(self) -> str:
        """The index file name this checkpoint uses (transformers' or diffusers')."""
        return (
            DIFFUSERS_INDEX
            if self.shards and self.shards[0].path.name.startswith("diffusion_")
            else INDEX_NAME
        )

    @cached_property
    def tensors(self) -> Mapping[str, tuple[Shard, TensorEntry]]:
        """Every tensor name -> (its shard, its entry)."""
        return {e.name: (shard, e) for shard in self.shards for e in shard.entries}

    def locate(self) -> dict[str, tuple[Shard, TensorEntry]]:
        return dict(self.tensors)

    @property
    def tied(self) -> bool:
        """An output layer shares the word embedding's tensor: ``tie_word_embeddings`` (top level, else
        in ``text_config``) is true, or, where the config does not say, a word embedding is stored
        and no lm_head (the head must then read the embedding)."""
        flag = self.tie_flag
        if flag is not None:
            return flag
        return HEAD_KEY not in self.tensors and bool(self.word_embeddings)

    @property
    def word_embeddings(self) -> list[str]:
        """Stored tensors named like a word embedding (``WORD_EMBEDDINGS``)."""
        return [
            key
            for key in self.tensors
            if key.endswith(".weight") and key.removesuffix(".weight").rpartition(".")[2] in WORD_EMBEDDINGS
        ]

    @property
    def tie_flag(self) -> bool | None:
        """``tie_word_embeddings`` as config.json states it, None where it does not."""
        for config in (self.config, self.config.get("text_config")):
            if isinstance(config, Mapping) and config.get("tie_word_embeddings") is not None:
                return bool(config["tie_word_embeddings"])
        return None

    @cached_property
    def tied_head(self) -> TiedHead | None:
        """The embedding a tied ``lm_head`` reads, or None: not tied, no single stored tensor named
        like a word embedding, or an architecture whose head is not ``lm_head`` (config
        ``architectures``: ...ForCausalLM, ...LMHeadModel, ...ForConditionalGeneration, or none given)."""
        architectures = self.config.get("architectures") or []
        lm_head = not architectures or any(str(a).endswith(LM_HEAD_ARCHITECTURES) for a in architectures)
        found = self.word_embeddings
        return TiedHead(found[0]) if self.tied and lm_head and len(found) == 1 else None

    @cached_property
    def quantization(self) -> Quantization | None:
        """What is quantized here (``io.quantization.detect``); refuses formats it cannot decode exactly."""
        return detect(self.config, self.tensors, self.read, self.describe())

    def entry(self, key: str) -> TensorEntry:
        """Stored tensor ``key``'s entry, with the shape of the values it stands for where it is
        quantized (bitsandbytes packs 4-bit weights into a column)."""
        entry = self.tensors[key][1]
        quantized = self.quantization.tensors.get(key) if self.quantization is not None else None
        return entry if quantized is None else replace(entry, shape=quantized.shape)

    def read(self, key: str) -> torch.Tensor:
        """One stored tensor, as stored."""
        shard, entry = self.tensors[key]
        with shard.path.open("rb") as handle:
            return read_tensor(handle, shard, entry)

    @property
    def total_size(self) -> int:
        return sum(shard.data_size for shard in self.shards)

    @property
    def file_size(self) -> int:
        return sum(shard.path.stat().st_size for shard in self.shards)

    def describe(self) -> str:
        if self.single_file:
            return str(self.shards[0].path)
        return f"{self.repo_id}@{self.revision}" if self.repo_id else str(self.root)

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type") or "")

    @cached_property
    def loaded_names(self) -> Mapping[str, str]:
        """Tensor names as transformers names them on load (its key renamings, e.g. Mixtral's
        ``.block_sparse_moe.`` -> ``.mlp.``) -> the stored name; only names that change."""
        renamings = [(re.compile(p), r) for p, r in RENAMINGS.get(self.model_type, ())]
        names = {}
        for key in self.tensors:
            name = key
            for pattern, replacement in renamings:  # as transformers' rename_source_key does
                match = pattern.search(name)
                if match:
                    name = name.replace(match.group(0), replacement, 1)
            if name != key and name not in self.tensors:
                names[name] = key
        return names

    def lookup(self, module: str, suffix: str = ".weight") -> str | None:
        """The stored tensor for a loaded-model name through the generated MoE renamings
        (``moe_layouts.RENAMINGS``), or None: how expert placements find per-expert tensors, which
        transformers fuses at load and ``find_tensor`` therefore refuses."""
        keys = self.tensors
        exact = f"{module}{suffix}"
        if exact in keys:
            return exact
        renamed = self.loaded_names
        if exact in renamed:
            return renamed[exact]
        parts = module.split(".")
        for i in range(1, len(parts)):
            candidate = ".".join(parts[i:]) + suffix
            if candidate in keys:
                return candidate
            if candidate in renamed:
                return renamed[candidate]
        ends = [k for k in keys if k.endswith(f".{exact}")] or [
            v for k, v in renamed.items() if k.endswith(f".{exact}")
        ]
        if len(ends) > 1:
            raise IncompatibleAdaptersError(
                f"module {module} matches several tensors in {self.describe()}: {sorted(ends)}"
            )
        return ends[0] if ends else None

    @cached_property
    def load_names(self) -> LoadNames:
        """What transformers calls this checkpoint's tensors once loaded (``io.model_names``); built on
        first use, which imports transformers."""
        return load_names(self.config, self.tensors)

    @property
    def asked_transformers(self) -> str | None:
        """Whose load-time names were read (``load_names.origin``), if any have been: None while every
        name asked for was found as stored."""
        names = self.__dict__.get("load_names")
        return names.origin if isinstance(names, LoadNames) else None

    def find_tensor(self, module: str, suffix: str = ".weight") -> str:
        """The one stored tensor an adapter module name refers to.

        Adapters name the modules of the loaded model, and transformers renames some checkpoints'
        tensors at load time (``io.model_names``). Tried in order: the stored key ``<module><suffix>``;
        the stored key that transformers loads under that name; then, among stored names and then
        loaded names, the module name with leading components dropped (adapter trained on a wrapper,
        checkpoint of the inner model) and names that end with ``.<module><suffix>`` (checkpoint saved
        from a wrapper). Anything else is an error naming the module and the way to fix it.

        Examples: module ``model.layers.0.q_proj`` finds ``model.layers.0.q_proj.weight``; in a LLaVA
        checkpoint, module ``model.language_model.layers.0.self_attn.q_proj`` finds
        ``language_model.model.layers.0.self_attn.q_proj.weight``.
        """
        exact = f"{module}{suffix}"
        if exact in self.tensors:
            return exact
        if self.single_file:  # a model inside an original-layout file, under its root
            for prefix, roots in _STORED_ROOTS:
                if module.startswith(prefix):
                    found = [
                        k for r in roots if (k := r + module.removeprefix(prefix) + suffix) in self.tensors
                    ]
                    if len(found) == 1:
                        return found[0]
        if self.tied_head is not None and module.split(".")[-1] == "lm_head" and suffix == ".weight":
            return self.tied_head.embedding  # what the tied head reads; a merge writes it untied
        names = self.load_names
        if exact in names.renamed:
            return names.renamed[exact]
        if exact in names.clashes:
            raise IncompatibleAdaptersError(
                f"module {module}: {names.origin} loads several tensors of {self.describe()} into {exact} "
                f"({', '.join(names.clashes[exact])}); keep one of them in the checkpoint"
            )
        if exact in names.converted:
            built = names.converted[exact]
            listed = ", ".join(built[:2]) + (f" and {len(built) - 2} more" if len(built) > 2 else "")
            raise UnsupportedAdapterError(
                f"module {module}: {names.origin} builds {exact} at load time from {len(built)} stored "
                f"tensor(s) of {self.describe()} ({listed}) that it fuses or transforms, and adapterops "
                "merges only into tensors as they are stored; merge this adapter with PEFT (merge_and_unload)"
            )
        # loose matches, first among stored names, then among loaded ones (stored -> loaded name)
        sources = set(names.renamed.values())
        stored_as = {**{key: key for key in self.tensors if key not in sources}, **names.renamed}
        found = _near(module, suffix, self.tensors) or sorted(
            {stored_as[k] for k in _near(module, suffix, stored_as)}
        )
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise IncompatibleAdaptersError(
                f"module {module} matches several tensors in {self.describe()}: {found}"
            )
        if self.tied and module.split(".")[-1] == "lm_head" and suffix == ".weight":
            raise UnsupportedAdapterError(
                f"module {module}: {self.describe()} ties lm_head to the input embedding (tie_word_embeddings), "
                f"but no single stored tensor is named like a word embedding ({', '.join(WORD_EMBEDDINGS)}); "
                "save the base with its lm_head untied (tie_word_embeddings false, lm_head.weight stored)"
            )
        if exact in names.tied:
            raise UnsupportedAdapterError(self._tied_message(module, exact, names.tied[exact], names.origin))
        missing = f"module {module}: no tensor {exact} in {self.describe()}"
        if names.problem is not None:
            raise IncompatibleAdaptersError(f"{missing}; {names.problem}")
        missing += f", nor one that {names.origin} loads under that name"
        if names.converted:
            raise IncompatibleAdaptersError(
                f"{missing}; it builds {len(names.converted)} tensors at load time from stored ones that it "
                f"fuses or transforms (such as {next(iter(names.converted))}), and adapterops merges only into "
                "tensors as stored. Unless the adapter targets one of those, it was trained on another model "
                "(check base_model_name_or_path in its adapter_config.json)"
            )
        raise IncompatibleAdaptersError(
            f"{missing}; the adapter was trained on another model "
            "(check base_model_name_or_path in its adapter_config.json)"
        )

    def placements(self, module: LoraModule, who: str) -> list[Placement]:
        """Where ``module``'s update lands, shape-checked: one tensor, or for one expert of a fused
        parameter either that expert's slice of the stored (E, ., .) tensor or the per-expert tensors
        the checkpoint stores instead (rows of the update, in ``moe_layouts`` order)."""
        target = module.target
        if target is None:
            module = self.layout_for(module)
            key = self.find_tensor(module.name, ".weight")
            self.check_shape(module, self.entry(key), who)
            return [Placement(key, module)]
        fused = self.lookup(target.tensor, "")
        if fused is not None:
            return [self._fused_placement(module, fused, who)]
        if target.expert is not None:
            split = self._per_expert_placements(module, who)
            if split:
                return split
        layout = f" (model_type {self.model_type!r} stores no per-expert layout adapterops knows)"
        raise IncompatibleAdaptersError(
            f"{who}: module {module.name}: no tensor {target.tensor}"
            f"{'' if target.expert is None else ' or per-expert tensors'} in {self.describe()}"
            f"{layout if target.expert is not None and self.model_type not in EXPERTS else ''}; the adapter was "
            "trained on another model (check base_model_name_or_path in its adapter_config.json)"
        )

    def _fused_placement(self, module: LoraModule, key: str, who: str) -> Placement:
        """Expert ``e`` of a parameter stored whole: the slice [e] of an (E, out, in) or (E, in, out)
        tensor; the orientation from the shape, or where that is square from ``moe_layouts.TRANSPOSED``."""
        target = module.target
        assert target is not None
        shape = self.entry(key).shape
        plain = (module.out_features, module.in_features)
        if target.expert is None:
            if shape in (plain, (1, *plain)):
                return Placement(key, module, None if len(shape) == 2 else 0)
            raise IncompatibleAdaptersError(
                f"{who}: parameter {target.tensor} updates a {plain} weight but {key} in {self.describe()} is "
                f"{shape}; the adapter was trained on another model"
            )
        fits = [t for t in (False, True) if shape == (target.num_experts, *(plain[::-1] if t else plain))]
        if not fits:
            raise IncompatibleAdaptersError(
                f"{who}: parameter {target.tensor} has {target.num_experts} experts of {plain} (out, in) but "
                f"{key} in {self.describe()} is {shape}; the adapter was trained on another model"
            )
        transposed = fits[0] if len(fits) == 1 else self.model_type in TRANSPOSED
        return Placement(key, replace(module, transposed=transposed), target.expert)

    def _per_expert_placements(self, module: LoraModule, who: str) -> list[Placement]:
        """Expert ``e`` of a fused parameter stored as ``<experts>.<e>.<projection>.weight`` tensors
        whose rows, stacked in ``moe_layouts.EXPERTS`` order, are the expert's (out, in) weight."""
        target = module.target
        assert target is not None and target.expert is not None
        layout = EXPERTS.get(self.model_type, {})
        fused = [p for p in layout if target.tensor == p or target.tensor.endswith(f".{p}")]
        if len(fused) != 1:
            return []
        keys = [self.lookup(f"{target.module}.{target.expert}.{leaf}", "") for leaf in layout[fused[0]]]
        if None in keys:
            return []
        placements, row = [], 0
        for key in keys:
            assert key is not None
            shape = self.entry(key).shape
            rows = shape[0] if len(shape) == 2 else -1
            if shape[1:] != (module.in_features,) or row + rows > module.out_features:
                raise IncompatibleAdaptersError(
                    f"{who}: module {module.name} updates a {module.weight_shape} weight, but {key} in "
                    f"{self.describe()} is {shape}; the adapter was trained on another model"
                )
            part = replace(module, B=module.B[row : row + rows], bias=None)
            placements.append(Placement(key, part))
            row += rows
        if row != module.out_features:
            raise IncompatibleAdaptersError(
                f"{who}: module {module.name} updates {module.out_features} rows, but "
                f"{', '.join(k for k in keys if k)} in {self.describe()} hold {row}; the adapter was trained on "
                "another model"
            )
        return placements

    def check_untied(self, module: LoraModule, key: str, allowed: Collection[str] = ()) -> None:
        """An embedding LoRA is merged only into a tensor no other module shares once loaded, but the
        ``allowed`` ones (the tied ``lm_head`` a merge unties: ``merging.plan``).

        transformers ties some embeddings to other modules (T5's ``shared`` is also both stacks'
        ``embed_tokens`` and ``lm_head``). PEFT applies a LoRA to the one module it wraps, while a merge
        into the shared tensor would change every module tied to it: no merge is exact there. Only
        embeddings are checked, since only they are stored under their own name while tied (a tied
        ``lm_head`` has no tensor of its own: ``find_tensor`` gives the embedding it reads), and only
        they need transformers to be asked.
        """
        if module.kind is not ModuleKind.EMBEDDING:
            return
        names = self.load_names
        loaded = next((new for new, old in names.renamed.items() if old == key), key)
        if set(names.tied.get(loaded, ())) - set(allowed):
            raise UnsupportedAdapterError(
                self._tied_message(module.name, loaded, names.tied[loaded], names.origin)
            )

    def _tied_message(self, module: str, name: str, others: Collection[str], origin: str) -> str:
        listed = ", ".join(others)
        return (
            f"module {module}: {origin} ties {name} of {self.describe()} to {listed} (tied weights), so a merge "
            f"would change those too, while PEFT applies the LoRA to {module} alone; untie the weights first, "
            f"or train the adapter without {module}"
        )

    def layout_for(self, module: LoraModule) -> LoraModule:
        """The module with its layout fixed by this checkpoint: GPT-2 style models store linear weights
        as Conv1D (in x out), whatever the adapter config's fan_in_fan_out says (PEFT corrects it too)."""
        conv1d = self.config.get("model_type") in CONV1D_MODEL_TYPES
        if conv1d and module.kind is ModuleKind.LINEAR and not module.transposed:
            return replace(module, transposed=True)
        return module

    def check_shape(self, module: LoraModule, entry: TensorEntry, who: str) -> None:
        """``module`` (from adapter ``who``) updates a weight of ``entry``'s shape, or an error says why not."""
        if module.weight_shape == entry.shape:
            return
        hint = ""
        if module.kind is ModuleKind.LINEAR and module.weight_shape[::-1] == entry.shape:
            hint = " (stored transposed: set fan_in_fan_out in the adapter config to match the base model)"
        raise IncompatibleAdaptersError(
            f"{who}: module {module.name} updates a {module.weight_shape} weight but {entry.name} in "
            f"{self.describe()} is {entry.shape}{hint}; the adapter was trained on another model"
        )

    def other_files(self) -> Iterator[Path]:
        """Files to copy into an output as they are: everything but the weights and their index.

        Each is a regular file inside the checkpoint directory: a link leading out of it, or a pipe,
        socket or broken link, is an ``AdapterFormatError`` (an output must copy nothing else).
        """
        if self.single_file:  # the file's directory holds other things, not this checkpoint's
            return
        skip = {shard.path.name for shard in self.shards} | {INDEX_NAME, DIFFUSERS_INDEX}
        for path in sorted(self.root.rglob("*")):
            rel = path.relative_to(self.root)
            if path.is_dir() or rel.parts[0].startswith(".") or rel.name in skip:
                continue
            if any(rel.match(pattern) for pattern in FOREIGN_WEIGHTS) or rel.suffix == ".safetensors":
                continue
            if rel.name.startswith("adapterops_"):  # an earlier merge's record: the new one replaces it
                continue
            if not inside(self.root, path).is_file():
                raise AdapterFormatError(
                    f"{path}: not a regular file (a pipe, socket, device or broken link), so it cannot be "
                    "copied into the output; remove it from the checkpoint directory"
                )
            yield path


def _near(module: str, suffix: str, names: Collection[str]) -> list[str]:
    """Names that ``module`` matches loosely: the module name without its leading components, or,
    failing that, every name that ends with ``.<module><suffix>``."""
    parts = module.split(".")
    for i in range(1, len(parts)):
        candidate = ".".join(parts[i:]) + suffix
        if candidate in names:
            return [candidate]
    return [name for name in names if name.endswith(f".{module}{suffix}")]


def open_checkpoint(ref: str | Path) -> Checkpoint:
    """A local checkpoint directory, a single ``.safetensors`` file, or a Hub id; reads headers and
    config, no tensor data.

    A directory holds ``model.safetensors`` or shards listed in ``model.safetensors.index.json``,
    or diffusers' names for the same (``diffusion_pytorch_model.safetensors[.index.json]``). A single
    file (an original-layout Stable Diffusion or Flux checkpoint) is a checkpoint of one shard with
    no index and no config (``single_file``).

    Everything on disk is untrusted: the index, each shard header and config.json are checked
    before use, and no file outside the checkpoint directory is read (``inside``). Errors are
    ``AdapterFormatError`` (malformed) or ``NotFoundError`` (missing), each naming the file.
    """
    local = Path(ref).expanduser()
    if local.is_file() and local.suffix.lower() == ".safetensors":
        return Checkpoint(local.parent, (read_header(local),), None, {}, single_file=True)
    resolved = resolve(ref, allow_patterns=["*"], what="checkpoint", ignore_patterns=list(FOREIGN_WEIGHTS))
    root = resolved.path
    index_path = next((root / n for n in (INDEX_NAME, DIFFUSERS_INDEX) if (root / n).is_file()), None)
    single_path = next((root / n for n in (SINGLE_NAME, DIFFUSERS_SINGLE) if (root / n).is_file()), None)
    index: dict[str, Any] | None = None
    if index_path is not None:
        index, weight_map = _read_index(root, index_path)
        names = sorted(set(weight_map.values()))
        paths = [_shard_path(root, n, index_path) for n in names]  # all checked before any is read
        missing = [n for n, path in zip(names, paths, strict=True) if not path.is_file()]
        if missing:
            raise NotFoundError(
                f"{root}: shard {missing[0]} listed in {index_path.name} is missing; download it again"
            )
        shards = tuple(read_header(path) for path in paths)
        on_disk = {e.name: name for name, s in zip(names, shards, strict=True) for e in s.entries}
        if on_disk != weight_map:
            wrong = sorted(set(on_disk.items()) ^ set(weight_map.items()))[0][0]
            raise AdapterFormatError(
                f"{index_path}: weight_map and the shards disagree about tensor {wrong[:200]!r}; download "
                "the checkpoint again"
            )
    elif single_path is not None:
        shards = (read_header(inside(root, single_path)),)
    else:
        raise NotFoundError(
            f"{root}: no {SINGLE_NAME} or {INDEX_NAME} (nor diffusers' {DIFFUSERS_SINGLE}); adapterops merges "
            "safetensors checkpoints (re-save a .bin checkpoint with save_pretrained(safe_serialization=True))"
        )
    config_path = root / "config.json"
    config = _read_config(root, config_path) if config_path.is_file() else {}
    return Checkpoint(root, shards, index, config, resolved.repo_id, resolved.revision)


# an index lists each tensor once (a few MB for the largest models); a config.json is kilobytes
MAX_INDEX_BYTES, MAX_CONFIG_BYTES = 100_000_000, 10_000_000


def read_json(root: Path, path: Path, what: str, limit: int) -> Any:
    """``path`` (inside ``root``, at most ``limit`` bytes) parsed as JSON, or one ``AdapterFormatError``."""
    size = inside(root, path).stat().st_size
    if size > limit:
        raise AdapterFormatError(
            f"{path}: {size:,} bytes is too large for {what} (limit {limit:,}); it is not one: remove it"
        )
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except RecursionError:  # json's C parser recurses once per nesting level
        raise AdapterFormatError(f"{path}: {what} nests JSON too deeply; download or save it again") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4300 digits
        message = str(exc).splitlines()[0][:200]
        raise AdapterFormatError(
            f"{path}: {what} is not valid JSON ({message}); download or save it again"
        ) from None


def _read_index(root: Path, path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """The index and its weight_map (tensor name -> shard file name), their types checked."""
    index = read_json(root, path, "a safetensors index", MAX_INDEX_BYTES)
    fix = "download or save the checkpoint again"
    if not isinstance(index, dict):
        raise AdapterFormatError(
            f"{path}: expected a JSON object with a weight_map, found {_kind(index)}; {fix}"
        )
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise AdapterFormatError(
            f"{path}: weight_map must be a non-empty object mapping tensor names to shard files, found "
            f"{_kind(weight_map)}; {fix}"
        )
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise AdapterFormatError(
                f"{path}: weight_map maps {name[:100]!r} to {_kind(shard)}, not a shard file name; {fix}"
            )
    if not isinstance(index.get("metadata", {}), dict):
        raise AdapterFormatError(
            f"{path}: metadata must be a JSON object, found {_kind(index['metadata'])}; {fix}"
        )
    return index, weight_map


def _read_config(root: Path, path: Path) -> dict[str, Any]:
    """config.json: an object whose fields adapterops reads (model_type, tie_word_embeddings) typed right."""
    config = read_json(root, path, "a model config", MAX_CONFIG_BYTES)
    if not isinstance(config, dict):
        raise AdapterFormatError(
            f"{path}: expected a JSON object, found {_kind(config)}; fix or remove config.json"
        )
    for key, types, spelled in (
        ("model_type", (str,), "a string"),
        ("tie_word_embeddings", (bool,), "true or false"),
    ):
        if key in config and not isinstance(config[key], types):
            raise AdapterFormatError(
                f"{path}: {key} must be {spelled}, found {_kind(config[key])}; fix config.json"
            )
    return config


def _kind(value: Any) -> str:
    """How a JSON value is described in messages: ``a JSON array``, ``the number 3``."""
    if isinstance(value, bool) or value is None:
        return f"JSON {json.dumps(value)}"
    if isinstance(value, int | float):
        return f"the number {value!r}"[:60]
    names: dict[type, str] = {dict: "object", list: "array", str: "string"}
    return f"a JSON {names.get(type(value), type(value).__name__)}"


def _shard_path(root: Path, name: str, index_path: Path) -> Path:
    """The file a weight_map entry names: a plain file name in ``root`` (as transformers writes them),
    not a path, and not a link leading out (an index must not make adapterops read any other file)."""
    if not name or name in (".", "..") or any(c in name for c in "/\\\0") or re.match("[A-Za-z]:", name):
        raise AdapterFormatError(
            f"{index_path}: weight_map names the shard {name[:200]!r}, which is not a file name in the "
            "checkpoint directory (no paths, no '..'); fix the index"
        )
    return inside(root, root / name)


class BaseWeights:
    """A checkpoint seen as ``module -> W`` in math layout (out, in), float64, one tensor per call."""

    def __init__(self, ref: str | Path | Checkpoint) -> None:
        self.checkpoint = ref if isinstance(ref, Checkpoint) else open_checkpoint(ref)

    def resolve(self, module: LoraModule) -> LoraModule:
        """The module with its layout fixed by the checkpoint (``Checkpoint.layout_for``)."""
        return self.checkpoint.layout_for(module)

    def weight(self, module: LoraModule, who: str) -> torch.Tensor:
        """W for ``module`` (already resolved) as a contiguous float64 (out, in) matrix, shape-checked;
        quantized weights dequantized (``io.quantization.dequantize``).

        One expert of a fused parameter is its slice of the stored tensor, or its per-expert
        tensors stacked by rows (``Checkpoint.placements``).
        """
        if module.target is not None:
            parts = []
            for placement in self.checkpoint.placements(module, who):
                W = self._read(placement.key)
                W = W if placement.expert is None else W[placement.expert]
                parts.append(W.T if placement.module.transposed else W)
            return torch.cat(parts).contiguous()
        key = self.checkpoint.find_tensor(module.name)
        self.checkpoint.check_shape(module, self.checkpoint.entry(key), who)
        W = self._read(key)
        W = W.T if module.transposed else W.reshape(W.shape[0], -1)
        return W.contiguous()

    def _read(self, key: str) -> torch.Tensor:
        """The values of stored tensor ``key``, float64: dequantized where it is quantized."""
        checkpoint = self.checkpoint
        quantized = checkpoint.quantization.tensors.get(key) if checkpoint.quantization else None
        if quantized is not None:
            return dequantize(quantized, checkpoint.read)
        entry = checkpoint.tensors[key][1]
        if not entry.torch_dtype.is_floating_point or entry.torch_dtype.itemsize == 1:
            raise UnsupportedAdapterError(
                f"{checkpoint.describe()}: {key} is stored as {entry.dtype} with no scale tensor beside it, so "
                "its values are unknown; use a checkpoint with floating-point weights"
            )
        return checkpoint.read(key).double()
