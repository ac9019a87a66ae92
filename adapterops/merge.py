"""Streaming merge and unmerge of adapters into safetensors checkpoints: plan, then execute.

``plan_merge`` reads only headers and adapter factors and decides, for every checkpoint tensor,
whether it is copied byte for byte or rewritten (and how). ``execute`` streams the checkpoint shard
by shard, tensor by tensor: untouched tensors are copied by the kernel, touched ones are read
(prefetched by a thread), updated on the device in float64 and written. Peak memory is about one
tensor in float64 plus the adapters. The output appears atomically; see ``io.atomic``.

The output carries a record (safetensors metadata ``adapterops`` in every shard and
``adapterops_merge.json``) of the adapters merged into it, and for DoRA the row norms unmerge needs
(``adapterops_dora_norms.safetensors``).
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from adapterops.adapter import Adapter, LoraModule, ModuleKind
from adapterops.errors import IncompatibleAdaptersError, InvalidInputError, UnsupportedAdapterError
from adapterops.io.atomic import atomic_output_dir, check_output_path
from adapterops.io.checkpoint import INDEX_NAME, Checkpoint, Shard, ShardWriter, TensorEntry, read_tensor
from adapterops.ops import apply
from adapterops.ops.combine import check_weight_count

RECORD_NAME = "adapterops_merge.json"
TORCH_BASELINE_BYTES = 220 * 2**20  # resident after `import torch` (CPU build), measured
NORMS_NAME = "adapterops_dora_norms.safetensors"
RECORD_KEY = "adapterops"
# model types whose linear layers are GPT-2 Conv1D (weight stored in x out), whatever the adapter says
CONV1D_MODEL_TYPES = {"gpt2", "openai-gpt", "imagegpt"}

Progress = Callable[[int, str], None]  # (bytes done, tensor name)


class Direction(str, Enum):
    MERGE = "merge"
    UNMERGE = "unmerge"


@dataclass(frozen=True)
class Update:
    """What happens to one checkpoint tensor. ``terms`` are (weight, module) pairs."""

    key: str
    terms: tuple[tuple[float, LoraModule], ...] = ()
    bias_terms: tuple[tuple[float, LoraModule], ...] = ()
    dora: LoraModule | None = None
    replacement: torch.Tensor | None = None
    source: str = ""


@dataclass(frozen=True)
class MergePlan:
    """Everything ``execute`` will do, decided from headers alone; printable with ``describe``."""

    direction: Direction
    checkpoint: Checkpoint
    adapters: tuple[Adapter, ...]
    weights: tuple[float, ...]
    updates: Mapping[str, Update]
    record: Mapping[str, Any]
    dora_norms: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        located = self.checkpoint.locate()
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
            "other_files": [str(p.relative_to(self.checkpoint.root)) for p in self.checkpoint.other_files()],
        }


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


# --------------------------------------------------------------------------------------------- planning


def plan_merge(
    checkpoint: Checkpoint,
    adapters: Sequence[Adapter],
    weights: Sequence[float] | None = None,
    *,
    direction: Direction | str = Direction.MERGE,
    force: bool = False,
) -> MergePlan:
    """Map every adapter module onto exactly one checkpoint tensor and check shapes; no tensor data is read."""
    direction = Direction(direction)
    adapters = tuple(adapters)
    if not adapters:
        raise InvalidInputError(f"{direction.value} needs at least one adapter")
    weights = tuple(float(w) for w in weights) if weights else (1.0,) * len(adapters)
    check_weight_count(weights, adapters)
    located = checkpoint.locate()
    keys = set(located)
    tied = bool(checkpoint.config.get("tie_word_embeddings", False))

    updates: dict[str, dict[str, Any]] = {}

    def slot_for(key: str) -> dict[str, Any]:
        return updates.setdefault(key, {"terms": [], "bias_terms": [], "dora": None, "sources": []})

    for weight, adapter in zip(weights, adapters, strict=True):
        for module in adapter.modules.values():
            module = resolve_layout(module, checkpoint)
            key = match_key(module.name, keys, ".weight", checkpoint, tied)
            entry = located[key][1]
            check_shape(module, entry, adapter, checkpoint)
            slot = slot_for(key)
            slot["sources"].append(adapter.describe())
            if module.is_dora:
                if len(adapters) > 1 or weight != 1.0 or slot["terms"] or slot["dora"]:
                    raise UnsupportedAdapterError(
                        f"{adapter.describe()}: DoRA module {module.name} rescales whole rows of {key}, so it can "
                        "only be merged alone and at weight 1; merge DoRA adapters one at a time"
                    )
                slot["dora"] = module
            else:
                if slot["dora"] is not None:
                    raise UnsupportedAdapterError(
                        f"{key}: a DoRA module and a LoRA module cannot be merged together"
                    )
                slot["terms"].append((weight, module))
            if module.bias is not None:
                bias_slot = slot_for(match_key(module.name, keys, ".bias", checkpoint, tied))
                bias_slot["bias_terms"].append((weight, module))
                bias_slot["sources"].append(adapter.describe())
        for name, tensor in adapter.full_tensors.items():
            module_name, _, leaf = name.replace(".base_layer.", ".").rpartition(".")
            key = match_key(module_name, keys, f".{leaf}", checkpoint, tied)
            entry = located[key][1]
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
            slot = slot_for(key)
            if slot.get("replacement") is not None and not torch.equal(slot["replacement"], tensor):
                raise IncompatibleAdaptersError(
                    f"two adapters carry different replacements (modules_to_save) for {key}"
                )
            # PEFT loads the stored tensor first and applies LoRA on top of it: so does _apply
            slot["replacement"] = tensor
            slot["sources"].append(adapter.describe())

    prior = read_record(checkpoint)
    record = _next_record(prior, adapters, weights, direction, force)
    norms: dict[str, torch.Tensor] = {}
    if direction is Direction.UNMERGE and any(s["dora"] is not None for s in updates.values()):
        norms = _recorded_norms(checkpoint, adapters[0])
    plan_updates = {
        key: Update(
            key=key,
            terms=tuple(s["terms"]),
            bias_terms=tuple(s["bias_terms"]),
            dora=s["dora"],
            replacement=s.get("replacement"),
            source=", ".join(dict.fromkeys(s["sources"])),
        )
        for key, s in updates.items()
    }
    return MergePlan(direction, checkpoint, adapters, weights, plan_updates, record, norms)


def match_key(module: str, keys: set[str], suffix: str, checkpoint: Checkpoint, tied: bool) -> str:
    """The one checkpoint tensor an adapter module name refers to.

    Tried in order: ``<module><suffix>``; the module name with leading components dropped (adapter
    trained on a wrapper, checkpoint of the inner model); checkpoint keys that end with
    ``.<module><suffix>`` (checkpoint saved from a wrapper). Anything else is an error naming it.
    """
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
            f"module {module} matches several tensors in {checkpoint.describe()}: {sorted(ends)}"
        )
    if tied and parts[-1] == "lm_head":
        raise UnsupportedAdapterError(
            f"module {module}: {checkpoint.describe()} ties lm_head to the input embedding (tie_word_embeddings), "
            "so there is no separate lm_head tensor to merge into; untie the weights first"
        )
    raise IncompatibleAdaptersError(
        f"module {module}: no tensor {exact} in {checkpoint.describe()}; the adapter was trained on another model "
        "(check base_model_name_or_path in its adapter_config.json)"
    )


def resolve_layout(module: LoraModule, checkpoint: Checkpoint) -> LoraModule:
    """The module with its layout fixed by the checkpoint: GPT-2 style models store linear weights
    as Conv1D (in x out), whatever the adapter config's fan_in_fan_out says (PEFT corrects it too)."""
    conv1d = checkpoint.config.get("model_type") in CONV1D_MODEL_TYPES
    if conv1d and module.kind is ModuleKind.LINEAR and not module.transposed:
        return replace(module, transposed=True)
    return module


def check_shape(module: LoraModule, entry: TensorEntry, adapter: Adapter, checkpoint: Checkpoint) -> None:
    if module.weight_shape == entry.shape:
        return
    hint = ""
    if module.kind is ModuleKind.LINEAR and module.weight_shape[::-1] == entry.shape:
        hint = " (stored transposed: set fan_in_fan_out in the adapter config to match the base model)"
    raise IncompatibleAdaptersError(
        f"{adapter.describe()}: module {module.name} updates a {module.weight_shape} weight but {entry.name} in "
        f"{checkpoint.describe()} is {entry.shape}{hint}; the adapter was trained on another model"
    )


# ----------------------------------------------------------------------------------------------- record


def read_record(checkpoint: Checkpoint) -> dict[str, Any]:
    """The merge record a checkpoint carries (sidecar file, else shard metadata); empty if none."""
    path = checkpoint.root / RECORD_NAME
    if path.is_file():
        return dict(json.loads(path.read_text()))
    for shard in checkpoint.shards:
        if RECORD_KEY in shard.metadata:
            return dict(json.loads(shard.metadata[RECORD_KEY]))
    return {}


def _adapter_entry(adapter: Adapter, weight: float) -> dict[str, Any]:
    entry = adapter.source.as_dict() if adapter.source else {"path": "<in memory>"}
    return {**entry, "weight": weight, "modules": len(adapter.modules), "dora": adapter.is_dora}


def _next_record(
    prior: Mapping[str, Any],
    adapters: Sequence[Adapter],
    weights: Sequence[float],
    direction: Direction,
    force: bool,
) -> dict[str, Any]:
    from adapterops import __version__

    merged = [dict(e) for e in prior.get("merged", [])]
    for adapter, weight in zip(adapters, weights, strict=True):
        sha = adapter.source.sha256 if adapter.source else None
        listed = [e for e in merged if sha and e.get("sha256") == sha]
        if direction is Direction.MERGE:
            if listed and not force:
                raise InvalidInputError(
                    f"{adapter.describe()} is already merged into this checkpoint (its record lists sha256 {sha}); "
                    "pass --force to merge it again"
                )
            merged.append(_adapter_entry(adapter, weight))
        elif listed:
            merged.remove(listed[0])
        else:
            warnings.warn(
                f"{adapter.describe()} is not listed in the checkpoint's merge record; unmerging it anyway",
                UserWarning,
                stacklevel=4,
            )
    history = [
        *prior.get("history", []),
        {
            "operation": direction.value,
            "adapters": [_adapter_entry(a, w) for a, w in zip(adapters, weights, strict=True)],
            "adapterops_version": __version__,
        },
    ]
    return {"merged": merged, "history": history}


def _recorded_norms(checkpoint: Checkpoint, adapter: Adapter) -> dict[str, torch.Tensor]:
    path = checkpoint.root / NORMS_NAME
    sha = adapter.source.sha256 if adapter.source else ""
    if not path.is_file():
        raise UnsupportedAdapterError(
            f"{checkpoint.describe()}: no {NORMS_NAME}; a DoRA merge cannot be undone without the row norms its "
            "merge recorded (merge with adapterops to keep them)"
        )
    prefix = f"{(sha or '')[:16]}/"
    norms = {k.removeprefix(prefix): v for k, v in load_file(path).items() if k.startswith(prefix)}
    if not norms:
        raise UnsupportedAdapterError(
            f"{path}: no row norms recorded for {adapter.describe()} (sha256 {sha})"
        )
    return norms


# ---------------------------------------------------------------------------------------------- execute


@dataclass(frozen=True)
class MergeResult:
    output: Path
    tensors_updated: int
    bytes_written: int
    seconds: float
    device: str

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "output": str(self.output)}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise InvalidInputError(f"unknown device {device!r}; use auto, cpu or cuda[:N]") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError(f"device {device} asked for but CUDA is not available here; use --device cpu")
    return resolved


def execute(
    plan: MergePlan,
    output: str | Path,
    *,
    device: str = "auto",
    force: bool = False,
    progress: Progress | None = None,
    on_shard: Callable[[Path], None] | None = None,
) -> MergeResult:
    """Write the planned checkpoint to ``output``, atomically. See the module docstring.

    ``on_shard`` is called with each finished shard's (temporary) path, e.g. to start uploading it
    while the next shard is computed.
    """
    start = time.perf_counter()
    target = Path(output).absolute()
    check_output_path(target, force=force)
    dev = resolve_device(device)
    need = plan.checkpoint.file_size + sum(p.stat().st_size for p in plan.checkpoint.other_files())
    free = shutil.disk_usage(target.parent).free
    if free < need * 1.02:
        raise InvalidInputError(
            f"{target.parent}: {free / 2**30:.2f} GiB free but the output needs {need / 2**30:.2f} GiB; free space "
            "or choose another output path"
        )
    record_json = json.dumps(plan.record, sort_keys=True)
    norms_out: dict[str, torch.Tensor] = {}
    workspace = apply.Workspace()
    written = 0
    with atomic_output_dir(target, force=force) as tmp:
        for path in plan.checkpoint.other_files():
            destination = tmp / path.relative_to(plan.checkpoint.root)
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, destination)
        for shard in plan.checkpoint.shards:
            written += _write_shard(plan, shard, tmp, dev, record_json, norms_out, workspace, progress)
            if on_shard:
                on_shard(tmp / shard.path.name)
        if plan.checkpoint.index is not None:
            index = dict(plan.checkpoint.index)
            index["metadata"] = {
                **dict(index.get("metadata") or {}),
                "total_size": plan.checkpoint.total_size,
            }
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        (tmp / RECORD_NAME).write_text(json.dumps(plan.record, indent=2, sort_keys=True) + "\n")
        _write_norms(plan, tmp, norms_out)
    return MergeResult(target, len(plan.updates), written, time.perf_counter() - start, str(dev))


def _write_norms(plan: MergePlan, tmp: Path, new: Mapping[str, torch.Tensor]) -> None:
    """Keep the norms of DoRA adapters still merged; add this merge's; drop an unmerged adapter's."""
    old_path = plan.checkpoint.root / NORMS_NAME
    kept = load_file(old_path) if old_path.is_file() else {}
    if plan.direction is Direction.UNMERGE:
        drop = tuple(f"{(a.source.sha256 or '')[:16]}/" for a in plan.adapters if a.source)
        kept = {k: v for k, v in kept.items() if not k.startswith(drop)}
    kept.update(new)
    if kept:
        save_file({k: v.contiguous() for k, v in kept.items()}, tmp / NORMS_NAME)


def _write_shard(
    plan: MergePlan,
    shard: Shard,
    tmp: Path,
    device: torch.device,
    record_json: str,
    norms_out: dict[str, torch.Tensor],
    workspace: apply.Workspace,
    progress: Progress | None,
) -> int:
    metadata = {**dict(shard.metadata), RECORD_KEY: record_json}
    writer = ShardWriter(tmp / shard.path.name, shard.entries, metadata)
    pin = device.type == "cuda"
    try:
        with shard.path.open("rb") as source:
            for entry, tensor in _prefetched(shard, source, plan.updates, pin):
                update = plan.updates.get(entry.name)
                if update is None:
                    writer.copy(entry, source, shard)
                else:
                    assert tensor is not None  # prefetched for every update
                    writer.write(entry, _apply(plan, update, tensor, device, norms_out, workspace))
                if progress:
                    progress(entry.nbytes, entry.name)
    finally:
        writer.close()
    return shard.data_size


def _prefetched(
    shard: Shard, source: Any, updates: Mapping[str, Update], pin: bool
) -> Iterator[tuple[TensorEntry, torch.Tensor | None]]:
    """Entries in file order, with the tensors to update read ahead by one thread (two in flight)."""
    wanted = [e for e in shard.entries if e.name in updates]
    # three reusable read buffers: one being computed on, two read ahead (entry k uses slot k % 3)
    size = max((e.nbytes for e in wanted), default=0)
    slots = [torch.empty(size, dtype=torch.uint8, pin_memory=pin) for _ in range(3 if wanted else 0)]

    def read(k: int, entry: TensorEntry) -> torch.Tensor:  # pread: no shared file offset with the copies
        return read_tensor(source, shard, entry, into=slots[k % 3])

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapterops-read") as pool:
        pending: dict[str, Future[torch.Tensor]] = {}
        queue = iter(enumerate(wanted))

        def top_up() -> None:
            while len(pending) < 2:
                nxt = next(queue, None)
                if nxt is None:
                    return
                pending[nxt[1].name] = pool.submit(read, *nxt)

        top_up()
        for entry in shard.entries:
            if entry.name in updates:
                tensor = pending.pop(entry.name).result()
                top_up()  # reads k+1 and k+2 while k is computed: three distinct slots
                yield entry, tensor
            else:
                yield entry, None


def _apply(
    plan: MergePlan,
    update: Update,
    tensor: torch.Tensor,
    device: torch.device,
    norms_out: dict[str, torch.Tensor],
    workspace: apply.Workspace,
) -> torch.Tensor:
    sign = 1.0 if plan.direction is Direction.MERGE else -1.0
    if update.replacement is not None:
        tensor = update.replacement.to(tensor.dtype)
        if not (update.terms or update.dora or update.bias_terms):
            return tensor
    if update.bias_terms:
        return apply.add_bias_updates(tensor, update.bias_terms, sign=sign)
    if update.dora is not None:
        sha = (plan.adapters[0].source.sha256 if plan.adapters[0].source else "") or ""
        if plan.direction is Direction.MERGE:
            merged, norm = apply.dora_merge(tensor, update.dora, device=device)
            norms_out[f"{sha[:16]}/{update.key}"] = norm
            return merged
        if update.key not in plan.dora_norms:
            raise UnsupportedAdapterError(f"{update.key}: no recorded DoRA row norms; cannot unmerge it")
        return apply.dora_unmerge(tensor, update.dora, plan.dora_norms[update.key], device=device)
    return apply.add_updates(tensor, update.terms, sign=sign, device=device, workspace=workspace)


# ------------------------------------------------------------------------------------------- public API


def load_inputs(
    base: str | Path | Checkpoint, adapters: Sequence[str | Path | Adapter]
) -> tuple[Checkpoint, list[Adapter]]:
    from adapterops.io import load_adapter
    from adapterops.io.checkpoint import open_checkpoint

    checkpoint = base if isinstance(base, Checkpoint) else open_checkpoint(base)
    return checkpoint, [a if isinstance(a, Adapter) else load_adapter(a) for a in adapters]


def merge(
    base: str | Path | Checkpoint,
    adapters: Sequence[str | Path | Adapter],
    weights: Sequence[float] | None = None,
    *,
    out: str | Path,
    device: str = "auto",
    force: bool = False,
    progress: Progress | None = None,
) -> MergeResult:
    """Write ``base`` with ``sum_i weights[i] * dW_i`` added (DoRA: PEFT's merge) to ``out``.

    ``base`` is a checkpoint directory or Hub id; ``adapters`` are adapter paths, Hub ids or
    ``Adapter`` objects. ``force`` replaces an existing ``out`` and allows merging an adapter the
    base's merge record already lists.
    """
    checkpoint, loaded = load_inputs(base, adapters)
    plan = plan_merge(checkpoint, loaded, weights, direction=Direction.MERGE, force=force)
    return execute(plan, out, device=device, force=force, progress=progress)


def unmerge(
    merged: str | Path | Checkpoint,
    adapters: Sequence[str | Path | Adapter],
    weights: Sequence[float] | None = None,
    *,
    out: str | Path,
    device: str = "auto",
    force: bool = False,
    progress: Progress | None = None,
) -> MergeResult:
    """Write ``merged`` with the adapters' updates taken out again (DoRA needs the merge's record)."""
    checkpoint, loaded = load_inputs(merged, adapters)
    plan = plan_merge(checkpoint, loaded, weights, direction=Direction.UNMERGE, force=force)
    return execute(plan, out, device=device, force=force, progress=progress)
