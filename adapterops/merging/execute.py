"""Executing a merge plan: the checkpoint streamed shard by shard, tensor by tensor.

Untouched tensors are copied by the kernel; touched ones are read (prefetched by a thread),
updated on the device by the kernels in ``ops`` (``apply_update``) and written. Peak memory is
about one tensor's scratch plus the adapters. The output appears atomically (``io.atomic``) and
carries its merge record (``provenance``) in ``adapterops_merge.json`` and in every shard's
``__metadata__``, except in a shard whose header the record would push over safetensors' 100,000,000
byte limit: that shard is written without it, with a warning, rather than unloadable.
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from adapterops.card import lineage_section, render_card, with_lineage
from adapterops.errors import InvalidInputError, OutputWriteError, UnsupportedAdapterError
from adapterops.io.atomic import atomic_output_dir, check_output_path
from adapterops.io.checkpoint import INDEX_NAME
from adapterops.io.safetensors_file import MAX_HEADER, Shard, ShardWriter, TensorEntry, read_tensor
from adapterops.merging.plan import Direction, MergePlan, Update
from adapterops.ops.dora import dora_merge, dora_unmerge
from adapterops.ops.kernels import Workspace, add_bias_updates, add_updates
from adapterops.provenance import (
    NORMS_NAME,
    RECORD_KEY,
    RECORD_NAME,
    norms_file,
    norms_prefix,
    shard_sha256s,
    with_shard_sha256s,
)

Progress = Callable[[int, str], None]  # (bytes done, tensor name)


@dataclass(frozen=True)
class MergeResult:
    """What a merge or unmerge did; with ``dry_run``, what it would do (``plan``), nothing written."""

    output: Path
    tensors_updated: int
    bytes_written: int
    seconds: float
    device: str
    dry_run: bool = False
    plan: Mapping[str, Any] | None = None
    pushed: str | None = None  # the commit URL, when pushed

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "output": str(self.output), "plan": dict(self.plan) if self.plan else None}


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
    need = plan.output_bytes
    free = shutil.disk_usage(target.parent).free
    if free < need * 1.02:
        raise OutputWriteError(
            f"{target.parent}: {free / 2**30:.2f} GiB free but the output needs {need / 2**30:.2f} GiB; free space "
            "or choose another output path"
        )
    record_json = json.dumps(plan.record, sort_keys=True)
    norms_out: dict[str, torch.Tensor] = {}
    workspace = Workspace()
    written = 0
    # the base's shard hashes go into the sidecar record; computed while the merge runs
    hashing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapterops-hash")
    hashes = hashing.submit(shard_sha256s, plan.checkpoint)
    hashing.shutdown(wait=False)
    with atomic_output_dir(target, force=force) as tmp:
        for path, _ in plan.other_files:
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
        record = with_shard_sha256s(plan.record, hashes.result())
        (tmp / RECORD_NAME).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        _write_card(plan, record, tmp, target.name)
        _write_norms(plan, tmp, norms_out)
    return MergeResult(target, len(plan.updates), written, time.perf_counter() - start, str(dev))


def _write_card(plan: MergePlan, record: Mapping[str, Any], tmp: Path, title: str) -> None:
    """README.md: the base's card with its lineage section added or replaced, else a new card."""
    readme = tmp / "README.md"
    base = (record.get("history") or [{}])[0].get("base") or {}
    if readme.is_file():
        readme.write_text(with_lineage(readme.read_text(), lineage_section(record)))
    else:
        readme.write_text(render_card("checkpoint", title, record, base_model=base.get("repo_id")))


def _write_norms(plan: MergePlan, tmp: Path, new: Mapping[str, torch.Tensor]) -> None:
    """Keep the norms of DoRA adapters still merged; add this merge's; drop an unmerged adapter's."""
    old_path = norms_file(plan.checkpoint.root)
    kept = load_file(old_path) if old_path is not None else {}
    if plan.direction is Direction.UNMERGE:
        drop = tuple(norms_prefix(a) for a in plan.adapters if a.source)
        kept = {k: v for k, v in kept.items() if not k.startswith(drop)}
    kept.update(new)
    if kept:
        (tmp / NORMS_NAME).parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in kept.items()}, tmp / NORMS_NAME)


def _write_shard(
    plan: MergePlan,
    shard: Shard,
    tmp: Path,
    device: torch.device,
    record_json: str,
    norms_out: dict[str, torch.Tensor],
    workspace: Workspace,
    progress: Progress | None,
) -> int:
    # the record goes into each shard's metadata only while the header stays loadable (safetensors
    # refuses headers over MAX_HEADER bytes); the sidecar RECORD_NAME always carries it. An earlier
    # merge's record is never kept in its place: it would describe the wrong weights.
    metadata = {k: v for k, v in shard.metadata.items() if k != RECORD_KEY}
    writer = ShardWriter(tmp / shard.path.name, shard.entries, metadata, optional={RECORD_KEY: record_json})
    if writer.dropped:
        warnings.warn(
            f"{shard.path.name}: the merge record would push its safetensors header over {MAX_HEADER:,} "
            f"bytes (safetensors' limit), so the record is written to {RECORD_NAME} only; keep that file with "
            "the shards",
            UserWarning,
            stacklevel=2,
        )
    pin = device.type == "cuda"
    try:
        with shard.path.open("rb") as source:
            for entry, tensor in _prefetched(shard, source, plan.updates, pin):
                update = plan.updates.get(entry.name)
                if update is None:
                    writer.copy(entry, source, shard)
                else:
                    assert tensor is not None  # prefetched for every update
                    writer.write(entry, _update(plan, update, tensor, device, norms_out, workspace))
                if progress:
                    progress(entry.nbytes, entry.name)
    finally:
        writer.close()
    return shard.data_size


def _update(
    plan: MergePlan,
    update: Update,
    tensor: torch.Tensor,
    device: torch.device,
    norms_out: dict[str, torch.Tensor],
    workspace: Workspace,
) -> torch.Tensor:
    sign = 1.0 if plan.direction is Direction.MERGE else -1.0
    result, norms = apply_update(
        update,
        tensor,
        sign=sign,
        device=device,
        workspace=workspace,
        dora_norms=plan.dora_norms.get(update.key),
    )
    check_finite(update.key, tensor, result, plan.direction.value)
    if norms is not None:
        norms_out[norms_prefix(plan.adapters[0]) + update.key] = norms
    return result


def check_finite(key: str, before: torch.Tensor, after: torch.Tensor, operation: str) -> None:
    """Refuse to write NaN or Inf where the stored tensor had a finite value: an overflow of the
    stored dtype, or non-finite factors, would otherwise be written silently."""
    if not after.is_floating_point() or bool(torch.isfinite(after).all()):
        return
    bad = ~torch.isfinite(after) & torch.isfinite(before.to(after.device))
    count = int(bad.sum())
    if count:
        raise InvalidInputError(
            f"{key}: the {operation} would write NaN or Inf in {count} element(s) where the stored value is "
            f"finite (the result overflows {str(after.dtype).removeprefix('torch.')}); check the adapters' "
            "scales and weights, or merge into a wider dtype"
        )


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


def apply_update(
    update: Update,
    W: torch.Tensor,
    *,
    sign: float = 1.0,
    device: torch.device | str = "cpu",
    workspace: Workspace | None = None,
    dora_norms: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The one dispatcher from a planned ``Update`` to a kernel: (new tensor in W's dtype, DoRA row norms).

    ``sign`` -1 unmerges. A float64 ``W`` gives the exact float64 result (``verify`` uses that as
    its reference). The row norms are returned by a DoRA merge, and a DoRA unmerge needs them.
    """
    if update.replacement is not None:
        W = update.replacement.to(W.dtype)
        if not (update.terms or update.dora or update.bias_terms or update.experts):
            return W, None
    if update.bias_terms:
        return add_bias_updates(W, update.bias_terms, sign=sign), None
    if update.experts:
        # a fused (E, ., .) tensor: each expert's slice is a weight of its own, rounded on its own
        out = W.clone()
        for expert, terms in update.experts:
            out[expert] = add_updates(W[expert], terms, sign=sign, device=device, workspace=workspace)
        return out, None
    if update.dora is not None:
        if sign > 0:
            return dora_merge(W, update.dora, device=device)
        if dora_norms is None:
            raise UnsupportedAdapterError(f"{update.key}: no recorded DoRA row norms; cannot unmerge it")
        return dora_unmerge(W, update.dora, dora_norms, device=device), None
    if not update.terms:
        return W, None
    return add_updates(W, update.terms, sign=sign, device=device, workspace=workspace), None
