"""Hugging Face safetensors checkpoints: which tensors a directory holds, and where.

A checkpoint is a directory with ``model.safetensors``, or shards listed in
``model.safetensors.index.json`` (``weight_map``: tensor name -> shard file), plus ``config.json``
and other files (tokenizer, generation config) that outputs copy as they are.

``Checkpoint.find_tensor`` maps an adapter's module name onto the one tensor it updates, and
``layout_for`` fixes the module's layout from the checkpoint's config (GPT-2 Conv1D).
``BaseWeights`` reads single base weights for the operations that need them (DoRA).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
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
from adapterops.io.refs import resolve
from adapterops.io.safetensors_file import Shard, TensorEntry, read_header, read_tensor

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# weight files in other formats would hold the *unmerged* weights: never copied into an output
FOREIGN_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.h5", "*.msgpack", "*.ckpt", "*.gguf", "*.onnx", "*.ot")

# model types whose linear layers are GPT-2 Conv1D (weight stored in x out), whatever the adapter says
CONV1D_MODEL_TYPES = {"gpt2", "openai-gpt", "imagegpt"}


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint directory: its shards (file order), tensor locations and its config."""

    root: Path
    shards: tuple[Shard, ...]
    index: Mapping[str, Any] | None
    config: Mapping[str, Any]
    repo_id: str | None = None
    revision: str | None = None

    @cached_property
    def tensors(self) -> Mapping[str, tuple[Shard, TensorEntry]]:
        """Every tensor name -> (its shard, its entry)."""
        return {e.name: (shard, e) for shard in self.shards for e in shard.entries}

    def locate(self) -> dict[str, tuple[Shard, TensorEntry]]:
        return dict(self.tensors)

    @property
    def tied(self) -> bool:
        """lm_head shares the input embedding's tensor (``tie_word_embeddings``)."""
        return bool(self.config.get("tie_word_embeddings", False))

    @property
    def total_size(self) -> int:
        return sum(shard.data_size for shard in self.shards)

    @property
    def file_size(self) -> int:
        return sum(shard.path.stat().st_size for shard in self.shards)

    def describe(self) -> str:
        return f"{self.repo_id}@{self.revision}" if self.repo_id else str(self.root)

    def find_tensor(self, module: str, suffix: str = ".weight") -> str:
        """The one tensor an adapter module name refers to.

        Tried in order: ``<module><suffix>``; the module name with leading components dropped (adapter
        trained on a wrapper, checkpoint of the inner model); checkpoint keys that end with
        ``.<module><suffix>`` (checkpoint saved from a wrapper). Anything else is an error naming it.

        Example: module ``base_model.model.model.layers.0.q_proj`` finds ``model.layers.0.q_proj.weight``.
        """
        keys = self.tensors
        exact = f"{module}{suffix}"
        if exact in keys:
            return exact
        parts = module.split(".")
        for i in range(1, len(parts)):
            candidate = ".".join(parts[i:]) + suffix
            if candidate in keys:
                return candidate
        ends = [k for k in keys if k.endswith(f".{exact}")]
        if len(ends) == 1:
            return ends[0]
        if len(ends) > 1:
            raise IncompatibleAdaptersError(
                f"module {module} matches several tensors in {self.describe()}: {sorted(ends)}"
            )
        if self.tied and parts[-1] == "lm_head":
            raise UnsupportedAdapterError(
                f"module {module}: {self.describe()} ties lm_head to the input embedding (tie_word_embeddings), "
                "so there is no separate lm_head tensor to merge into; untie the weights first"
            )
        raise IncompatibleAdaptersError(
            f"module {module}: no tensor {exact} in {self.describe()}; the adapter was trained on another model "
            "(check base_model_name_or_path in its adapter_config.json)"
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
        """Files to copy into an output as they are: everything but the weights and their index."""
        skip = {shard.path.name for shard in self.shards} | {INDEX_NAME}
        for path in sorted(self.root.rglob("*")):
            rel = path.relative_to(self.root)
            if path.is_dir() or rel.parts[0].startswith(".") or rel.name in skip:
                continue
            if any(rel.match(pattern) for pattern in FOREIGN_WEIGHTS) or rel.suffix == ".safetensors":
                continue
            if rel.name.startswith("adapterops_"):  # an earlier merge's record: the new one replaces it
                continue
            yield path


def open_checkpoint(ref: str | Path) -> Checkpoint:
    """A local checkpoint directory or a Hub id; reads headers and config, no tensor data."""
    resolved = resolve(ref, allow_patterns=["*"], what="checkpoint", ignore_patterns=list(FOREIGN_WEIGHTS))
    root = resolved.path
    index_path, single_path = root / INDEX_NAME, root / SINGLE_NAME
    index: dict[str, Any] | None = None
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
            weight_map: dict[str, str] = dict(index["weight_map"])
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise AdapterFormatError(f"{index_path}: not a valid safetensors index ({exc})") from exc
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (root / n).is_file()]
        if missing:
            raise NotFoundError(
                f"{root}: shard {missing[0]} listed in {INDEX_NAME} is missing; download it again"
            )
        shards = tuple(read_header(root / n) for n in names)
        on_disk = {e.name: s.path.name for s in shards for e in s.entries}
        if on_disk != weight_map:
            wrong = sorted(set(on_disk.items()) ^ set(weight_map.items()))[0][0]
            raise AdapterFormatError(f"{index_path}: weight_map and the shards disagree about tensor {wrong}")
    elif single_path.is_file():
        shards = (read_header(single_path),)
    else:
        raise NotFoundError(
            f"{root}: no {SINGLE_NAME} or {INDEX_NAME}; adapterops merges safetensors checkpoints "
            "(re-save a .bin checkpoint with save_pretrained(safe_serialization=True))"
        )
    config_path = root / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    return Checkpoint(root, shards, index, config, resolved.repo_id, resolved.revision)


class BaseWeights:
    """A checkpoint seen as ``module -> W`` in math layout (out, in), float64, one tensor per call."""

    def __init__(self, ref: str | Path | Checkpoint) -> None:
        self.checkpoint = ref if isinstance(ref, Checkpoint) else open_checkpoint(ref)

    def resolve(self, module: LoraModule) -> LoraModule:
        """The module with its layout fixed by the checkpoint (``Checkpoint.layout_for``)."""
        return self.checkpoint.layout_for(module)

    def weight(self, module: LoraModule, who: str) -> torch.Tensor:
        """W for ``module`` (already resolved) as a contiguous float64 (out, in) matrix, shape-checked."""
        key = self.checkpoint.find_tensor(module.name)
        shard, entry = self.checkpoint.tensors[key]
        self.checkpoint.check_shape(module, entry, who)
        with shard.path.open("rb") as handle:
            W = read_tensor(handle, shard, entry).double()
        W = W.T if module.transposed else W.reshape(W.shape[0], -1)
        return W.contiguous()
