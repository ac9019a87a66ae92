"""Planning a merge or unmerge: every adapter module mapped onto exactly one checkpoint tensor.

``plan_merge`` reads only headers and adapter factors and decides, for every checkpoint tensor,
whether it is copied byte for byte or rewritten (and with which terms). The plan is data: its
``describe()`` prints what will happen without touching the disk again.

Two kinds of checkpoint change what "the tensor a module updates" means:

- **tied embeddings.** A tied ``lm_head`` reads the embedding, so a merge that changes one side
  only (an embedding LoRA, or a LoRA on the head) unties them: the embedding and
  ``lm_head.weight`` are written separately and ``tie_word_embeddings`` becomes false, so the
  merged model computes what the adapter computed. An adapter that updates both sides alike
  (PEFT's ``ensure_weight_tying``) keeps them tied.
- **quantized weights** (``io.quantization``). By default the merged weights are written in the
  checkpoint's own format, with new scales and the rounding error reported; ``dtype`` writes
  every quantized weight dequantized instead and drops the quantization from config.json.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import torch

from adapterops.adapter import Adapter, LoraModule
from adapterops.errors import IncompatibleAdaptersError, InvalidInputError, UnsupportedAdapterError, param
from adapterops.io import load_adapter
from adapterops.io.checkpoint import Checkpoint, TiedHead, open_checkpoint
from adapterops.io.quantization import Quantization, QuantizedTensor
from adapterops.io.safetensors_file import TensorEntry
from adapterops.merging.layout import OutputShard, output_layout
from adapterops.ops.combine import check_weights
from adapterops.options import MergeDtype
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
    module (merged alone), ``replacement`` a whole tensor (modules_to_save).

    ``reads`` names the base tensor the values start from where that is another one (an untied
    ``lm_head.weight`` starts from the embedding); ``quantized`` says how that tensor is stored
    when it is quantized.
    """

    key: str
    terms: Terms = ()
    bias_terms: Terms = ()
    dora: LoraModule | None = None
    replacement: torch.Tensor | None = None
    source: str = ""
    experts: tuple[tuple[int, Terms], ...] = ()
    reads: str | None = None
    quantized: QuantizedTensor | None = None

    @property
    def base_key(self) -> str:
        """The base tensor this update starts from."""
        return self.reads or self.key

    @property
    def changes(self) -> bool:
        """Whether anything is added to or replaces the values (else they are carried over)."""
        return bool(
            self.terms
            or self.bias_terms
            or self.experts
            or self.dora is not None
            or self.replacement is not None
        )


@dataclass
class _Slot:
    """An ``Update`` while the plan is being built. ``shared`` is PEFT's saved copy of a tied base
    layer (``...base_layer.weight``): it replaces both sides of a tied pair on load."""

    terms: list[tuple[float, LoraModule]] = field(default_factory=list)
    bias_terms: list[tuple[float, LoraModule]] = field(default_factory=list)
    dora: LoraModule | None = None
    replacement: torch.Tensor | None = None
    sources: list[str] = field(default_factory=list)
    experts: dict[int, list[tuple[float, LoraModule]]] = field(default_factory=dict)
    shared: torch.Tensor | None = None
    reads: str | None = None

    def freeze(self, key: str, quantized: QuantizedTensor | None = None) -> Update:
        source = ", ".join(dict.fromkeys(self.sources))
        experts = tuple((e, tuple(terms)) for e, terms in sorted(self.experts.items()))
        return Update(
            key,
            tuple(self.terms),
            tuple(self.bias_terms),
            self.dora,
            self.replacement,
            source,
            experts=experts,
            reads=self.reads,
            quantized=quantized,
        )

    @property
    def empty(self) -> bool:
        return not (
            self.terms
            or self.bias_terms
            or self.experts
            or self.dora is not None
            or self.replacement is not None
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
    shards: tuple[OutputShard, ...] = ()  # the output's layout (``merging.layout``)
    dtype: torch.dtype | None = None  # quantized weights written dequantized in this dtype; None: as stored
    quantization: Quantization | None = None
    dequantized: frozenset[str] = frozenset()  # quantized weights no adapter touches, written in ``dtype``
    config: Mapping[str, Any] | None = None  # the output's config.json where it changes (untied, dequantized)
    notes: tuple[
        str, ...
    ] = ()  # what the merge did beyond adding updates (untying), for the user and the record

    def describe(self) -> dict[str, Any]:
        """What the plan does, as JSON-ready data (no disk access)."""
        located = self.checkpoint.tensors
        touched = sum(located[u.base_key][1].nbytes for u in self.updates.values())
        adapter_bytes = sum(m.A.nbytes + m.B.nbytes for a in self.adapters for m in a.modules.values())
        peak = estimate_peak(
            self.checkpoint,
            adapter_bytes,
            [located[u.base_key][1] for u in self.updates.values()],
            quantized=bool(self.quantization and self.quantization.tensors),
        )
        described: dict[str, Any] = {
            "operation": self.direction.value,
            "checkpoint": self.checkpoint.describe(),
            "adapters": [a.describe() for a in self.adapters],
            "weights": list(self.weights),
            "shards": [s.path.name for s in self.checkpoint.shards],
            "tensors": len(located),
            "tensors_updated": len(self.updates),
            "bytes_updated": touched,
            "bytes_copied": self.checkpoint.total_size - touched,
            "output_bytes": self.output_bytes - sum(size for _, size in self.other_files),
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
        if self.quantization is not None:
            described["quantization"] = self.quantization.describe()
            described["dtype"] = str(self.dtype).removeprefix("torch.") if self.dtype else "as stored"
            described["tensors_dequantized"] = len(self.dequantized) + (
                sum(u.quantized is not None for u in self.updates.values()) if self.dtype else 0
            )
        if self.notes:
            described["notes"] = list(self.notes)
        return described

    @property
    def output_bytes(self) -> int:
        """Bytes the output will take: the shards (headers estimated) plus the copied files."""
        if not self.shards:
            return self.checkpoint.file_size + sum(size for _, size in self.other_files)
        headers = sum(s.data_start for s in self.checkpoint.shards) + 200 * len(self.notes)
        return headers + sum(s.data_size for s in self.shards) + sum(size for _, size in self.other_files)


def estimate_peak(
    checkpoint: Checkpoint,
    adapter_bytes: int,
    updated: Sequence[TensorEntry] | None = None,
    *,
    quantized: bool = False,
) -> int:
    """Resident memory of a merge: per element of the largest updated tensor, the float32 sum and
    bound (8 bytes), the output and two rounding probes in the stored dtype, three read buffers;
    plus the adapters and torch itself. ``updated`` defaults to every floating-point tensor.
    A quantized checkpoint's tensors are decoded and re-encoded in float64: about six float64
    copies per element (the decoded weight, the sum, its scales in full, the re-decoded result and
    the error) instead."""
    if updated is None:
        updated = [e for shard in checkpoint.shards for e in shard.entries if e.torch_dtype.is_floating_point]
    largest = max(updated, key=lambda e: e.nbytes, default=None)
    if quantized:
        biggest = max((e for s in checkpoint.shards for e in s.entries), key=lambda e: e.nbytes, default=None)
        elements = biggest.nbytes // biggest.torch_dtype.itemsize if biggest is not None else 0
        return adapter_bytes + elements * 48 + TORCH_BASELINE_BYTES
    if largest is None:
        return adapter_bytes + TORCH_BASELINE_BYTES
    itemsize = largest.torch_dtype.itemsize
    return adapter_bytes + largest.nbytes // itemsize * (8 + 6 * itemsize) + TORCH_BASELINE_BYTES


def load_inputs(
    base: str | Path | Checkpoint, adapters: Sequence[str | Path | Adapter]
) -> tuple[Checkpoint, list[Adapter]]:
    """The checkpoint (headers only) and the adapters, each given as a path, Hub id or loaded object."""
    checkpoint = base if isinstance(base, Checkpoint) else open_checkpoint(base)
    # the checkpoint names a kohya file's modules (SDXL, Flux): its flattened names are mapped onto its keys
    return checkpoint, [a if isinstance(a, Adapter) else load_adapter(a, base=checkpoint) for a in adapters]


def plan_merge(
    base: str | Path | Checkpoint,
    adapters: Sequence[str | Path | Adapter],
    weights: Sequence[float] | None = None,
    *,
    direction: Direction | str = Direction.MERGE,
    remerge: bool = False,
    ignore_record: bool = False,
    command: str | None = None,
    dtype: MergeDtype | str = MergeDtype.AUTO,
) -> MergePlan:
    """Map every adapter module onto exactly one checkpoint tensor and check shapes; no tensor data is read.

    ``base`` and ``adapters`` are paths, Hub ids or loaded objects. ``remerge`` allows merging an
    adapter the checkpoint's merge record already lists. Unmerging without ``weights`` uses the
    weights the record lists; given weights that contradict it need ``ignore_record``. ``dtype``
    (quantized checkpoints only) writes every quantized weight dequantized in that dtype.
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
    quantization = checkpoint.quantization  # refuses formats that cannot be decoded exactly
    out_dtype = _output_dtype(checkpoint, quantization, MergeDtype(dtype), direction)
    prior = read_record(checkpoint)
    if direction is Direction.UNMERGE:
        given = weights_for(prior, inputs, given, ignore_record, checkpoint.describe())
    weights = tuple(float(w) for w in (given or checked) if not callable(w))
    slots: dict[str, _Slot] = {}
    for weight, adapter in zip(weights, inputs, strict=True):
        _plan_modules(checkpoint, adapter, weight, len(inputs), slots)
        _plan_full_tensors(checkpoint, adapter, direction, slots)
    notes = _resolve_tied(checkpoint, slots, direction, quantization, out_dtype)
    quantized = quantization.tensors if quantization is not None else {}
    _check_targets(checkpoint, slots, quantized)
    step: dict[str, Any] = {"dtype": str(out_dtype).removeprefix("torch.")} if out_dtype is not None else {}
    if notes:
        step["notes"] = list(notes)
    record = next_record(prior, checkpoint, inputs, weights, direction.value, remerge, command, step)
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
    updates = {key: slot.freeze(key, quantized.get(slot.reads or key)) for key, slot in slots.items()}
    dequantized = frozenset(quantized) - set(updates) if out_dtype is not None else frozenset()
    computed = {k for k, u in updates.items() if u.changes or u.quantized is not None} | set(dequantized)
    if out_dtype is None:  # requantized weights get new scales
        computed |= {u.quantized.scale_key for u in updates.values() if u.quantized is not None}
    sources = {k: u.reads for k, u in updates.items() if u.reads}
    shards = output_layout(checkpoint, computed, quantization=quantization, dtype=out_dtype, sources=sources)
    config = _output_config(
        checkpoint, bool(sources), quantization if out_dtype is not None else None, out_dtype
    )
    return MergePlan(
        direction, checkpoint, inputs, weights, updates, record, other, norms, shards, out_dtype, quantization,
        dequantized, config, notes,
    )  # fmt: skip


_FLOAT_DTYPES = {
    MergeDtype.BFLOAT16: torch.bfloat16,
    MergeDtype.FLOAT16: torch.float16,
    MergeDtype.FLOAT32: torch.float32,
}


def _output_dtype(
    checkpoint: Checkpoint, quantization: Quantization | None, dtype: MergeDtype, direction: Direction
) -> torch.dtype | None:
    """The dtype quantized weights are written in (None: their own format), or an error saying why not."""
    where = checkpoint.describe()
    if dtype is MergeDtype.AUTO:
        if quantization is not None and quantization.bitsandbytes:
            how = (
                "an unmerge cannot write it back either: use the original 16-bit checkpoint"
                if direction is Direction.UNMERGE
                else (
                    f"pass {param('dtype', 'bfloat16')} (or float16) to dequantize its weights exactly as bitsandbytes "
                    "does, add the update, and write the merged model unquantized"
                )
            )
            raise UnsupportedAdapterError(
                f"{where} is quantized with {quantization.describe()}: a LoRA update is far smaller "
                f"than a quantization step, so merging back into that format would throw most of it away; {how}"
            )
        return None
    if quantization is None:
        raise InvalidInputError(
            f"{param('dtype', dtype.value)} dequantizes a quantized checkpoint, but {where} is not quantized (its "
            f"weights are written in their own dtype); drop {param('dtype')}"
        )
    if direction is Direction.UNMERGE:
        raise InvalidInputError(
            f"unmerge writes a checkpoint in its own format; {param('dtype')} applies to merge"
        )
    return _FLOAT_DTYPES[dtype]


def _output_config(
    checkpoint: Checkpoint, untied: bool, dequantized: Quantization | None, dtype: torch.dtype | None
) -> dict[str, Any] | None:
    """config.json as the output needs it: untied, without its quantization; None when unchanged."""
    if not (untied or dequantized is not None):
        return None
    config = json.loads(json.dumps(checkpoint.config))
    if untied:
        config["tie_word_embeddings"] = False
        text = config.get("text_config")
        if isinstance(text, dict) and "tie_word_embeddings" in text:
            text["tie_word_embeddings"] = False
    if dequantized is not None and dtype is not None:
        config.pop("quantization_config", None)
        config.pop("compression_config", None)
        for key in ("dtype", "torch_dtype"):
            if key in config:
                config[key] = str(dtype).removeprefix("torch.")
    return config


def _check_targets(checkpoint: Checkpoint, slots: Mapping[str, _Slot], quantized: Mapping[str, Any]) -> None:
    """Every tensor an update writes holds floating-point values, or is quantized in a known way."""
    for key, slot in slots.items():
        base = slot.reads or key
        entry = checkpoint.tensors[base][1]
        if base in quantized or (entry.torch_dtype.is_floating_point and entry.torch_dtype.itemsize > 1):
            continue
        raise UnsupportedAdapterError(
            f"{checkpoint.describe()}: {base} is stored as {entry.dtype} with no scale tensor beside it "
            f"({base}_scale or {base}_scale_inv), so what it stands for is unknown and an update cannot be added to "
            "it; merge into a checkpoint with floating-point weights"
        )


def _plan_modules(
    checkpoint: Checkpoint, adapter: Adapter, weight: float, count: int, slots: dict[str, _Slot]
) -> None:
    tied = checkpoint.tied_head
    for original in adapter.modules.values():
        for placement in checkpoint.placements(original, adapter.describe()):
            key, module = placement.key, placement.module
            # ties transformers knows of, but the embedding-lm_head pair that _resolve_tied unties
            untied = (tied.head,) if tied is not None and key == tied.embedding else ()
            checkpoint.check_untied(module, key, allowed=untied)
            if tied is None and checkpoint.tied and key in checkpoint.word_embeddings:
                problem = checkpoint.load_names.problem  # no transformers to say what is tied to it
                if problem is not None:
                    raise UnsupportedAdapterError(
                        f"{adapter.describe()}: module {module.name} updates {key}, which {checkpoint.describe()} "
                        f"ties to an output layer (tie_word_embeddings) that is not lm_head, or not only it, "
                        f"and {problem}"
                    )
            if tied is not None and placement.expert is None and module.name.rpartition(".")[2] == "lm_head":
                key = tied.head  # the head reads the embedding; it is written as a tensor of its own
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
        tied = checkpoint.tied_head
        if tied is not None and leaf == "weight" and key in (tied.embedding, tied.head):
            _plan_tied_tensor(tied, module_name, name, tensor, adapter, slots)
            continue
        slot = slots.setdefault(key, _Slot())
        if slot.replacement is not None and not torch.equal(slot.replacement, tensor):
            raise IncompatibleAdaptersError(
                f"two adapters carry different replacements (modules_to_save) for {key}"
            )
        # PEFT loads the stored tensor first and applies LoRA on top of it: so does apply_update
        slot.replacement = tensor
        slot.sources.append(adapter.describe())


# ---------------------------------------------------------------------------------------- tied heads


def _plan_tied_tensor(
    tied: TiedHead,
    module_name: str,
    name: str,
    tensor: torch.Tensor,
    adapter: Adapter,
    slots: dict[str, _Slot],
) -> None:
    """A whole tensor for one side of a tied pair. PEFT's saved base layer (``...base_layer.weight``)
    is the one tensor both sides read; a modules_to_save copy replaces its own side only."""
    head = module_name.rpartition(".")[2] == "lm_head"
    slot = slots.setdefault(tied.head if head else tied.embedding, _Slot())
    slot.sources.append(adapter.describe())
    if ".base_layer." in name:
        other = slots.get(tied.embedding if head else tied.head)
        for known in (slot.shared, other.shared if other else None):
            if known is not None and not torch.equal(known, tensor):
                raise IncompatibleAdaptersError(
                    f"{adapter.describe()}: {name} differs from another saved copy of the tied weight {tied.embedding}"
                )
        slot.shared = tensor
        return
    if slot.replacement is not None and not torch.equal(slot.replacement, tensor):
        raise IncompatibleAdaptersError(
            f"two adapters carry different replacements (modules_to_save) for {name}"
        )
    slot.replacement = tensor


def _resolve_tied(
    checkpoint: Checkpoint,
    slots: dict[str, _Slot],
    direction: Direction,
    quantization: Quantization | None,
    dtype: torch.dtype | None,
) -> tuple[str, ...]:
    """Keep a tied pair tied when the adapters change both sides alike, else untie it: the embedding
    and ``lm_head.weight`` each get their own values, as the adapted model computes them. Returns
    the notes that say so."""
    tied = checkpoint.tied_head
    if tied is None or (tied.embedding not in slots and tied.head not in slots):
        return ()
    emb, head = slots.pop(tied.embedding, None) or _Slot(), slots.pop(tied.head, None) or _Slot()
    changed = (bool(emb.terms or emb.dora), bool(head.terms or head.dora))
    shared = emb.shared if emb.shared is not None else head.shared
    if emb.replacement is None:
        emb.replacement = shared
    if head.replacement is None:
        head.replacement = shared
    emb.shared = head.shared = None
    if _alike(emb, head):
        slots[tied.embedding] = emb
        return ()
    where = f"{checkpoint.describe()} ties {tied.head} to {tied.embedding}"
    if direction is Direction.UNMERGE:
        raise UnsupportedAdapterError(
            f"{where}, and the adapters change the two differently, so an unmerge cannot tell what the merge "
            "did; unmerge from a checkpoint merged by adapterops (it unties them) or use the original base"
        )
    if quantization is not None and dtype is None and tied.embedding in quantization.tensors:
        raise UnsupportedAdapterError(
            f"{where}; the adapters change the two differently, so they must be untied, and the embedding is "
            f"quantized: pass {param('dtype', 'bfloat16')} to write them dequantized"
        )
    if not emb.empty:
        slots[tied.embedding] = emb
    head.reads = tied.embedding
    slots[tied.head] = head
    side = {
        (True, False): "the embedding and not the output layer",
        (False, True): "the output layer and not the embedding",
    }.get(changed, "the embedding and the output layer differently")
    return (
        f"untied {tied.head} from {tied.embedding}: the adapters change {side}, so a tied merge would not "
        f"compute what the adapted model computes; {tied.head} is written separately and config.json's "
        "tie_word_embeddings is false",
    )


def _alike(emb: _Slot, head: _Slot) -> bool:
    """Both sides of a tied pair end up equal: the same starting tensor and, term by term, the same
    update (in the stored layout: the embedding's A^T, B^T are the head's B, A, as PEFT ties them)."""
    if emb.dora is not None or head.dora is not None or emb.bias_terms or head.bias_terms:
        return False
    if emb.replacement is None or head.replacement is None:
        if emb.replacement is not head.replacement:
            return False
    elif not torch.equal(emb.replacement, head.replacement):
        return False
    if len(emb.terms) != len(head.terms):
        return False
    return all(_stored_factors(*a) == _stored_factors(*b) for a, b in zip(emb.terms, head.terms, strict=True))


def _stored_factors(weight: float, module: LoraModule) -> tuple[float, bytes, bytes, tuple[int, ...]]:
    """(coefficient, left, right) with dW in the stored layout = coefficient * left @ right; as bytes."""
    left, right = (module.A.T, module.B.T) if module.transposed else (module.B, module.A)
    data = [t.detach().contiguous().cpu() for t in (left, right)]
    return (
        weight * module.scale,
        data[0].view(torch.uint8).numpy().tobytes() + str(data[0].dtype).encode(),
        data[1].view(torch.uint8).numpy().tobytes() + str(data[1].dtype).encode(),
        tuple(data[0].shape) + tuple(data[1].shape),
    )
