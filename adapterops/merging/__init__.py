"""Merging adapters into safetensors checkpoints and taking them out again: plan, then execute.

``merge`` and ``unmerge`` are what the CLI calls: they load the inputs, plan (``plan``), and
either return the plan (``dry_run``) or stream the output (``execute``), uploading each shard as
soon as it is written when ``push_to`` names a Hub repo.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from adapterops.adapter import Adapter
from adapterops.hub import ShardUploader, push_to_hub
from adapterops.io.atomic import check_output_path
from adapterops.io.checkpoint import Checkpoint
from adapterops.merging.execute import MergeResult, Progress, apply_update, execute
from adapterops.merging.plan import Direction, MergePlan, Update, estimate_peak, load_inputs, plan_merge
from adapterops.options import MergeOptions, UnmergeOptions

__all__ = [
    "Direction",
    "MergePlan",
    "MergeResult",
    "Update",
    "apply_update",
    "estimate_peak",
    "load_inputs",
    "merge",
    "plan_merge",
    "unmerge",
]

CheckpointRef = str | Path | Checkpoint
AdapterRef = str | Path | Adapter


def merge(
    base: CheckpointRef,
    adapters: Sequence[AdapterRef],
    weights: Sequence[float] | None = None,
    *,
    out: str | Path,
    device: str = "auto",
    remerge: bool = False,
    force: bool = False,
    dry_run: bool = False,
    push_to: str | None = None,
    private: bool = False,
    progress: Progress | None = None,
    command: str | None = None,
) -> MergeResult:
    """Write ``base`` with ``sum_i weights[i] * dW_i`` added (DoRA: PEFT's merge) to ``out``.

    Args:
        base: a checkpoint directory, Hub id or ``Checkpoint``.
        adapters: adapter paths, Hub ids or ``Adapter`` objects.
        weights: one per adapter, default 1 each.
        out: the output directory; it appears whole or not at all.
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``.
        remerge: merge an adapter the base's merge record already lists.
        force: replace an existing ``out``.
        dry_run: plan only; the result's ``plan`` says what would be written, nothing is.
        push_to: a Hub repo to upload the output to, shard by shard while the merge runs.
        private: create the ``push_to`` repo private.
        progress: called with (bytes done, tensor name) as tensors are written.
        command: the command line that asked for this merge, kept in the merge record.

    Returns:
        A ``MergeResult``: tensors updated, bytes written, time, device, and the commit URL if pushed.

    Example:
        >>> merge("./base", ["./a", "./b"], [0.7, 0.3], out="./merged")
    """
    opts = MergeOptions(weights=weights, device=device, remerge=remerge)
    return _stream(
        Direction.MERGE, base, adapters, opts.weights, out, opts.device, opts.remerge, force, dry_run, push_to,
        private, progress, command,
    )  # fmt: skip


def unmerge(
    merged: CheckpointRef,
    adapters: Sequence[AdapterRef],
    weights: Sequence[float] | None = None,
    *,
    out: str | Path,
    device: str = "auto",
    ignore_record: bool = False,
    force: bool = False,
    dry_run: bool = False,
    push_to: str | None = None,
    private: bool = False,
    progress: Progress | None = None,
    command: str | None = None,
) -> MergeResult:
    """Write ``merged`` with the adapters' updates taken out again: W = W' - sum_i w_i dW_i.

    Exact up to one step of the stored dtype; DoRA needs the row norms its merge recorded.
    ``weights`` default to those the merge record lists; given weights that contradict the record
    need ``ignore_record``. The other arguments are ``merge``'s.
    """
    opts = UnmergeOptions(weights=weights, device=device, ignore_record=ignore_record)
    return _stream(
        Direction.UNMERGE, merged, adapters, opts.weights, out, opts.device, opts.ignore_record, force, dry_run,
        push_to, private, progress, command,
    )  # fmt: skip


def _stream(
    direction: Direction,
    base: CheckpointRef,
    adapters: Sequence[AdapterRef],
    weights: Sequence[float] | None,
    out: str | Path,
    device: str,
    record_flag: bool,  # remerge for a merge, ignore_record for an unmerge
    force: bool,
    dry_run: bool,
    push_to: str | None,
    private: bool,
    progress: Progress | None,
    command: str | None,
) -> MergeResult:
    target = Path(out).absolute()
    if not dry_run:
        check_output_path(target, force=force)  # before any download or planning
    checkpoint, loaded = load_inputs(base, adapters)
    flags = {"remerge": record_flag} if direction is Direction.MERGE else {"ignore_record": record_flag}
    plan = plan_merge(checkpoint, loaded, weights, direction=direction, command=command, **flags)
    if dry_run:
        return MergeResult(target, len(plan.updates), 0, 0.0, device, dry_run=True, plan=plan.describe())
    if push_to is None:
        return execute(plan, target, device=device, force=force, progress=progress)
    uploader = ShardUploader(push_to, private=private)
    try:
        result = execute(
            plan, target, device=device, force=force, progress=progress, on_shard=uploader.submit
        )
    except BaseException:
        uploader.close()
        raise
    url = push_to_hub(target, push_to, private=private, uploader=uploader)
    return MergeResult(
        result.output, result.tensors_updated, result.bytes_written, result.seconds, result.device, pushed=url
    )
