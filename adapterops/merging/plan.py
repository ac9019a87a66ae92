"""Planning a merge or unmerge: every adapter module mapped onto exactly one checkpoint tensor.

``plan_merge`` reads only headers and adapter factors and decides, for every checkpoint tensor,
whether it is copied byte for byte or rewritten (and with which terms). The plan is data: its
``describe()`` prints what will happen without touching the disk again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import torch

from adapterops.adapter import Adapter, LoraModule
from adapterops.errors import IncompatibleAdaptersError, InvalidInputError, UnsupportedAdapterError
from adapterops.io import load_adapter
from adapterops.io.checkpoint import Checkpoint, open_checkpoint
from adapterops.io.safetensors_file import TensorEntry
from adapterops.ops.combine import check_weights
from adapterops.provenance import next_record, read_record, recorded_norms, weights_for

TORCH_BASELINE_BYTES = 220 * 2**20  # resident after `import torch` (CPU build), measured


class Direction(str, Enum):
    MERGE = "merge"
    UNMERGE = "unmerge"


Terms = tuple[tuple[float, LoraModule], ...]


@dataclass(frozen=True)
class Update:
    """What happens to one checkpoint tensor: ``terms`` and ``bias_terms`` are (weight, module) pairs,
    ``experts`` such pairs per expert slice ``W[e]`` of a fused (E, ., .) tensor, ``dora`` a DoRA
    module (merged alone), ``replacement`` a whole tensor (modules_to_save)."""

    key: str
    terms: Terms = ()
    bias_terms: Terms = ()
    dora: LoraModule | None = None
    replacement: torch.Tensor | None = None
    source: str = ""
    experts: tuple[tuple[int, Terms], ...] = ()


@dataclass
class _Slot:
    """An ``Update`` while the plan is being built."""

    terms: list[tuple[float, LoraModule]] = field(default_factory=list)
    bias_terms: list[tuple[float, LoraModule]] = field(default_factory=list)
    dora: LoraModule | None = None
    replacement: torch.Tensor | None = None
    sources: list[str] = field(default_factory=list)
    experts: dict[int, list[tuple[float, LoraModule]]] = field(default_factory=dict)

    def freeze(self, key: str) -> Update:
        source = ", ".join(dict.fromkeys(self.sources))
        experts = tuple((e, tuple(terms)) for e, terms in sorted(self.experts.items()))
        return Update(
            key, tuple(self.terms), tuple(self.bias_terms), self.dora, self.replacement, source, experts
        )


@dataclass(frozen=True)
class MergePlan:
    """Everything ``execute`` will do, decided from headers alone; printable with ``describe``."""

    direction: Direction
    checkpoint: Checkpoint
    adapters: tuple[Adapter, ...]
    weights: tuple[float, ...]
    updates: Mapping[str, Update]
    record: Mapping[str, Any]
    other_files: tuple[tuple[Path, int], ...]  # (path, size) of files copied as they are
    dora_norms: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """What the plan does, as JSON-ready data (no disk access)."""
        located = self.checkpoint.tensors
        touched = sum(located[k][1].nbytes for k in self.updates)
        adapter_bytes = sum(m.A.nbytes + m.B.nbytes for a in self.adapters for m in a.modules.values())
        peak = estimate_peak(self.checkpoint, adapter_bytes, [located[k][1] for k in self.updates])
        return {
            "operation": self.direction.value,
            "checkpoint": self.checkpoint.describe(),
            "adapters": [a.describe() for a in self.adapters],
            "weights": list(self.weights),
            "shards": [s.path.name for s in self.checkpoint.shards],
            "tensors": len(located),
            "tensors_updated": len(self.updates),
            "bytes_updated": touched,
            "bytes_copied": self.checkpoint.total_size - touched,
            "output_bytes": self.checkpoint.file_size,
            "estimated_peak_memory_bytes": peak,
            "other_files": [str(p.relative_to(self.checkpoint.root)) for p, _ in self.other_files],
            # modules whose tensor is stored under another name, and who said so (transformers' load-time
            # names, when it was asked: io/model_names.py)
            "renamed_modules": sum(
                f"{module.name}.weight" != key
                for key, update in self.updates.items()
                for module in (*(m for _, m in update.terms), *([update.dora] if update.dora else []))
            ),
            "load_names": self.checkpoint.asked_transformers,
        }

    @property
    def output_bytes(self) -> int:
        """Bytes the output will take: the shards plus the copied files."""
        return self.checkpoint.file_size + sum(size for _, size in self.other_files)


def estimate_peak(
    checkpoint: Checkpoint, adapter_bytes: int, updated: Sequence[TensorEntry] | None = None
) -> int:
    """Resident memory of a merge: per element of the largest updated tensor, the float32 sum and
    bound (8 bytes), the output and two rounding probes in the stored dtype, three read buffers;
    plus the adapters and torch itself. ``updated`` defaults to every floating-point tensor."""
    if updated is None:
        updated = [e for shard in checkpoint.shards for e in shard.entries if e.torch_dtype.is_floating_point]
    largest = max(updated, key=lambda e: e.nbytes, default=None)
    if largest is None:
        return adapter_bytes + TORCH_BASELINE_BYTES
    itemsize = largest.torch_dtype.itemsize
    return adapter_bytes + largest.nbytes // itemsize * (8 + 6 * itemsize) + TORCH_BASELINE_BYTES


def load_inputs(
    base: str | Path | Checkpoint, adapters: Sequence[str | Path | Adapter]
) -> tuple[Checkpoint, list[Adapter]]:
    """The checkpoint (headers only) and the adapters, each given as a path, Hub id or loaded object."""
    checkpoint = base if isinstance(base, Checkpoint) else open_checkpoint(base)
    return checkpoint, [a if isinstance(a, Adapter) else load_adapter(a) for a in adapters]


def plan_merge(
    base: str | Path | Checkpoint,
    adapters: Sequence[str | Path | Adapter],
    weights: Sequence[float] | None = None,
    *,
    direction: Direction | str = Direction.MERGE,
    remerge: bool = False,
    ignore_record: bool = False,
    command: str | None = None,
) -> MergePlan:
    """Map every adapter module onto exactly one checkpoint tensor and check shapes; no tensor data is read.

    ``base`` and ``adapters`` are paths, Hub ids or loaded objects. ``remerge`` allows merging an
    adapter the checkpoint's merge record already lists. Unmerging without ``weights`` uses the
    weights the record lists; given weights that contradict it need ``ignore_record``.
    ``plan.describe()`` says what a merge would do.

    Example:
        >>> plan_merge("./base", ["./lora"]).describe()["tensors_updated"]
    """
    direction = Direction(direction)
    checkpoint, loaded = load_inputs(base, adapters)
    inputs = tuple(loaded)
    if not inputs:
        raise InvalidInputError(f"{direction.value} needs at least one adapter")
    given = list(weights) if weights else None
    checked = check_weights(given, len(inputs))
    if any(callable(w) for w in checked):
        raise InvalidInputError(
            f"{direction.value} takes one number per adapter; per-module weights apply to combine: combine first"
        )
    prior = read_record(checkpoint)
    if direction is Direction.UNMERGE:
        given = weights_for(prior, inputs, given, ignore_record, checkpoint.describe())
    weights = tuple(float(w) for w in (given or checked) if not callable(w))
    slots: dict[str, _Slot] = {}
    for weight, adapter in zip(weights, inputs, strict=True):
        _plan_modules(checkpoint, adapter, weight, len(inputs), slots)
        _plan_full_tensors(checkpoint, adapter, direction, slots)
    record = next_record(prior, checkpoint, inputs, weights, direction.value, remerge, command)
    norms: dict[str, torch.Tensor] = {}
    if direction is Direction.UNMERGE and any(s.dora is not None for s in slots.values()):
        norms = recorded_norms(checkpoint, inputs[0])
        for key, slot in slots.items():
            if slot.dora is not None and (key not in norms or norms[key].numel() != slot.dora.out_features):
                raise InvalidInputError(
                    f"{checkpoint.describe()}: the recorded DoRA row norms of {key} are missing or do not have one "
                    f"entry per output row ({slot.dora.out_features}); restore them from the merge"
                )
    other = tuple((p, p.stat().st_size) for p in checkpoint.other_files())
    updates = {key: slot.freeze(key) for key, slot in slots.items()}
    return MergePlan(direction, checkpoint, inputs, weights, updates, record, other, norms)


def _plan_modules(
    checkpoint: Checkpoint, adapter: Adapter, weight: float, count: int, slots: dict[str, _Slot]
) -> None:
    for original in adapter.modules.values():
        for placement in checkpoint.placements(original, adapter.describe()):
            key, module = placement.key, placement.module
            checkpoint.check_untied(module, key)
            slot = slots.setdefault(key, _Slot())
            slot.sources.append(adapter.describe())
            if placement.expert is not None:
                slot.experts.setdefault(placement.expert, []).append((weight, module))
            elif module.is_dora:
                if count > 1 or weight != 1.0 or slot.terms or slot.dora:
                    raise UnsupportedAdapterError(
                        f"{adapter.describe()}: DoRA module {module.name} rescales whole rows of {key}, so it "
                        "can only be merged alone and at weight 1; merge DoRA adapters one at a time"
                    )
                slot.dora = module
            else:
                if slot.dora is not None:
                    raise UnsupportedAdapterError(
                        f"{key}: a DoRA module and a LoRA module cannot be merged together"
                    )
                slot.terms.append((weight, module))
            if module.bias is not None:
                bias_slot = slots.setdefault(checkpoint.find_tensor(module.name, ".bias"), _Slot())
                bias_slot.bias_terms.append((weight, module))
                bias_slot.sources.append(adapter.describe())


def _plan_full_tensors(
    checkpoint: Checkpoint, adapter: Adapter, direction: Direction, slots: dict[str, _Slot]
) -> None:
    for name, tensor in adapter.full_tensors.items():
        module_name, _, leaf = name.replace(".base_layer.", ".").rpartition(".")
        key = checkpoint.find_tensor(module_name, f".{leaf}")
        entry = checkpoint.tensors[key][1]
        if tuple(tensor.shape) != entry.shape:
            raise IncompatibleAdaptersError(
                f"{adapter.describe()}: stored tensor {name} has shape {tuple(tensor.shape)} but {key} in "
                f"{checkpoint.describe()} has {entry.shape}; the adapter is for another model"
            )
        if ".base_layer." in name and direction is Direction.UNMERGE:
            continue  # PEFT's saved copy of a LoRA-targeted base layer: undone by the LoRA unmerge itself
        if direction is Direction.UNMERGE:
            raise UnsupportedAdapterError(
                f"{adapter.describe()} carries {name} (modules_to_save): it replaced {key} on merge, and the "
                "original cannot be recovered from the merged checkpoint; use the original base checkpoint instead"
            )
        slot = slots.setdefault(key, _Slot())
        if slot.replacement is not None and not torch.equal(slot.replacement, tensor):
            raise IncompatibleAdaptersError(
                f"two adapters carry different replacements (modules_to_save) for {key}"
            )
        # PEFT loads the stored tensor first and applies LoRA on top of it: so does apply_update
        slot.replacement = tensor
        slot.sources.append(adapter.describe())
