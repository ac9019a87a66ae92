"""What a merge writes where: the output's shards, tensor by tensor, before any tensor is computed.

Most outputs have the base's layout exactly. Three things change it: dequantizing (a quantized
weight becomes a float tensor of its logical shape, and its scales and other companions go),
untying (``lm_head.weight`` is added to the shard that holds the embedding it was tied to), and
both together. Every offset is fixed here, so each shard's header is written first and its tensors
follow in order (``io.safetensors_file.ShardWriter``).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace

import torch

from adapterops.io.checkpoint import Checkpoint
from adapterops.io.quantization import Quantization
from adapterops.io.safetensors_file import DTYPES, TensorEntry

DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


@dataclass(frozen=True)
class OutputTensor:
    """One tensor of an output shard: its entry there, and the base tensor whose bytes it copies
    unchanged (None: it is computed)."""

    entry: TensorEntry
    copy_from: str | None


@dataclass(frozen=True)
class OutputShard:
    name: str  # the file name, as in the base
    tensors: tuple[OutputTensor, ...]

    @property
    def data_size(self) -> int:
        return self.tensors[-1].entry.end if self.tensors else 0


def output_layout(
    checkpoint: Checkpoint,
    computed: Collection[str],
    *,
    quantization: Quantization | None = None,
    dtype: torch.dtype | None = None,
    sources: Mapping[str, str] | None = None,
) -> tuple[OutputShard, ...]:
    """The output's shards, in the base's shard and tensor order.

    ``computed`` names the tensors written from a computation (updates, dequantized weights, new
    scales); the others are copied. With ``dtype``, every quantized weight is written dequantized
    in ``dtype`` and every tensor of the quantization dropped. ``sources`` maps an output tensor to
    the base tensor it is made from where that is another one (an untied ``lm_head.weight`` from the
    embedding): a name the base lacks goes into that tensor's shard, after the others.
    """
    dequantize = quantization is not None and dtype is not None
    quantized = quantization.tensors if quantization is not None else {}
    dropped = quantization.dropped if dequantize and quantization is not None else frozenset()
    sources = sources or {}
    located = checkpoint.tensors
    shards = []
    for shard in checkpoint.shards:
        names = [e.name for e in shard.entries if e.name not in dropped]
        names += [
            new for new, source in sources.items() if new not in located and located[source][0] is shard
        ]
        tensors = []
        for name in names:
            source = sources.get(name, name)
            base = replace(located[source][1], name=name)
            written = base
            if dequantize and source in quantized:
                written = replace(base, dtype=DTYPE_NAMES[dtype], shape=quantized[source].shape)  # type: ignore[index]
            copy = None if name in computed or written is not base else source
            tensors.append(OutputTensor(written, copy))
        shards.append(OutputShard(shard.path.name, _placed(tensors)))
    return tuple(shards)


def _placed(tensors: list[OutputTensor]) -> tuple[OutputTensor, ...]:
    """The tensors with contiguous offsets, in order."""
    placed, position = [], 0
    for tensor in tensors:
        entry = tensor.entry
        size = torch.empty((), dtype=entry.torch_dtype).element_size()
        for d in entry.shape:
            size *= d
        placed.append(replace(tensor, entry=replace(entry, begin=position, end=position + size)))
        position += size
    return tuple(placed)
