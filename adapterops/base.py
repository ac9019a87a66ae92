"""Base weights for the operations that need them (DoRA), read one module at a time."""

from __future__ import annotations

from pathlib import Path

import torch

from adapterops.adapter import Adapter, LoraModule
from adapterops.io.checkpoint import Checkpoint, open_checkpoint, read_tensor
from adapterops.merge import check_shape, match_key, resolve_layout


class BaseWeights:
    """A checkpoint seen as ``module -> W`` in math layout (out, in), float64, one tensor per call."""

    def __init__(self, ref: str | Path | Checkpoint) -> None:
        self.checkpoint = ref if isinstance(ref, Checkpoint) else open_checkpoint(ref)
        self.located = self.checkpoint.locate()
        self.tied = bool(self.checkpoint.config.get("tie_word_embeddings", False))

    def resolve(self, module: LoraModule) -> LoraModule:
        """The module with its layout fixed by the checkpoint (GPT-2 Conv1D stores weights in x out)."""
        return resolve_layout(module, self.checkpoint)

    def weight(self, module: LoraModule, adapter: Adapter) -> torch.Tensor:
        """W for ``module`` as a contiguous float64 (out, in) matrix; shape-checked against the adapter."""
        key = match_key(module.name, set(self.located), ".weight", self.checkpoint, self.tied)
        shard, entry = self.located[key]
        check_shape(module, entry, adapter, self.checkpoint)
        with shard.path.open("rb") as handle:
            W = read_tensor(handle, shard, entry).double()
        W = W.T if module.transposed else W.reshape(W.shape[0], -1)
        return W.contiguous()
