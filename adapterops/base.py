"""Base weights for the operations that need them (DoRA), read one module at a time."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from adapterops.adapter import Adapter, LoraModule, ModuleKind
from adapterops.io.checkpoint import Checkpoint, open_checkpoint, read_tensor
from adapterops.merge import CONV1D_MODEL_TYPES, _check_shape, match_key


class BaseWeights:
    """A checkpoint seen as ``module -> W`` in math layout (out, in), float64, one tensor per call."""

    def __init__(self, ref: str | Path | Checkpoint) -> None:
        self.checkpoint = ref if isinstance(ref, Checkpoint) else open_checkpoint(ref)
        self.located = self.checkpoint.locate()
        self.conv1d = self.checkpoint.config.get("model_type") in CONV1D_MODEL_TYPES
        self.tied = bool(self.checkpoint.config.get("tie_word_embeddings", False))

    def resolve(self, module: LoraModule) -> LoraModule:
        """The module with its layout fixed by the checkpoint (GPT-2 Conv1D stores weights in x out)."""
        if self.conv1d and module.kind is ModuleKind.LINEAR and not module.transposed:
            return replace(module, transposed=True)
        return module

    def weight(self, module: LoraModule, adapter: Adapter) -> torch.Tensor:
        """W for ``module`` as a contiguous float64 (out, in) matrix; shape-checked against the adapter."""
        key = match_key(module.name, set(self.located), ".weight", self.checkpoint, self.tied)
        shard, entry = self.located[key]
        _check_shape(module, entry, adapter, self.checkpoint)
        with shard.path.open("rb") as handle:
            W = read_tensor(handle, shard, entry).double()
        W = W.T if module.transposed else W.reshape(W.shape[0], -1)
        return W.contiguous()
