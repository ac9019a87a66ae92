"""Merging adapters into safetensors checkpoints and taking them out again: plan, then execute.

``merge`` and ``unmerge`` are what the CLI calls: they load the inputs, plan (``plan``), and
either return the plan (``dry_run``) or stream the output (``execute``), uploading each shard as
soon as it is written when ``push_to`` names a Hub repo.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import cast

from adapterops.adapter import Adapter
from adapterops.errors import ApproximationWarning, InvalidInputError, param
from adapterops.hub import ShardUploader, push_to_hub
from adapterops.io.atomic import check_output_path
from adapterops.io.checkpoint import Checkpoint
from adapterops.merging.execute import MergeResult, Progress, apply_update, check_single_file_output, execute
from adapterops.merging.plan import Direction, MergePlan, Update, estimate_peak, load_inputs, plan_merge
from adapterops.options import MergeDtype, MergeOptions, UnmergeOptions

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
    dtype: MergeDtype | str = MergeDtype.AUTO,
    workers: int = 1,
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
        dtype: for a quantized base: ``auto`` writes the merged weights in its format (FP8/int8 with
            new scales; each tensor's rounding error is in the result and the record, and a warning
            says when it exceeds the update); ``bfloat16``, ``float16`` or ``float32`` write every
            quantized weight dequantized, the update added, rounded once (required for bitsandbytes).
        workers: write the shards of a sharded checkpoint in this many processes at once (CPU
            only); the output is byte for byte the same as with 1.

    Returns:
        A ``MergeResult``: tensors updated, bytes written, time, device, the commit URL if pushed,
        the quantization error per requantized tensor, and notes (an lm_head untied).

    A merge that would change only one side of an lm_head tied to the embedding unties them (the
    adapted model computes them apart) and warns; see ``plan_merge``.

    Example:
        >>> merge("./base", ["./a", "./b"], [0.7, 0.3], out="./merged")
    """
    # the record checks and converts a str dtype
    opts = MergeOptions(
        weights=weights, device=device, remerge=remerge, dtype=cast(MergeDtype, dtype), workers=workers
    )
    return _stream(
        Direction.MERGE, base, adapters, opts.weights, out, opts.device, {"remerge": opts.remerge}, force,
        dry_run, push_to, private, progress, command, opts.dtype, opts.workers,
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
    workers: int = 1,
) -> MergeResult:
    """Write ``merged`` with the adapters' updates taken out again: W = W' - sum_i w_i dW_i.

    Exact up to one step of the stored dtype; DoRA needs the row norms its merge recorded.
    ``weights`` default to those the merge record lists; given weights that contradict the record
    need ``ignore_record``. The other arguments are ``merge``'s.
    """
    opts = UnmergeOptions(weights=weights, device=device, ignore_record=ignore_record, workers=workers)
    return _stream(
        Direction.UNMERGE, merged, adapters, opts.weights, out, opts.device,
        {"ignore_record": opts.ignore_record}, force, dry_run, push_to, private, progress, command,
        workers=opts.workers,
    )  # fmt: skip


def _stream(
    direction: Direction,
    base: CheckpointRef,
    adapters: Sequence[AdapterRef],
    weights: Sequence[float] | None,
    out: str | Path,
    device: str,
    record_flags: dict[str, bool],  # plan_merge's remerge (merge) or ignore_record (unmerge)
    force: bool,
    dry_run: bool,
    push_to: str | None,
    private: bool,
    progress: Progress | None,
    command: str | None,
    dtype: MergeDtype = MergeDtype.AUTO,
    workers: int = 1,
) -> MergeResult:
    target = Path(out).absolute()
    single = base.single_file if isinstance(base, Checkpoint) else Path(base).expanduser().is_file()
    if push_to is not None and single:
        raise InvalidInputError(
            f"{base}: {param('push_to')} uploads checkpoint directories; a single-file merge is one file: "
            "upload it with `hf upload`"
        )
    if not dry_run:
        check_output_path(target, force=force, file=single)  # before any download or planning
    checkpoint, loaded = load_inputs(base, adapters)
    if not dry_run:
        check_single_file_output(checkpoint, target)
    plan = plan_merge(
        checkpoint, loaded, weights, direction=direction, command=command, dtype=dtype, **record_flags
    )
    for note in plan.notes:
        warnings.warn(note, UserWarning, stacklevel=3)
    if dry_run:
        return MergeResult(
            target, len(plan.updates), 0, 0.0, device, dry_run=True, plan=plan.describe(), notes=plan.notes
        )
    if push_to is None:
        return _warn_quantization(
            execute(plan, target, device=device, force=force, progress=progress, workers=workers), plan
        )
    uploader = ShardUploader(push_to, private=private)
    try:
        result = execute(
            plan,
            target,
            device=device,
            force=force,
            progress=progress,
            on_shard=uploader.submit,
            workers=workers,
        )
    except BaseException:
        uploader.close()
        raise
    url = push_to_hub(target, push_to, private=private, uploader=uploader)
    return _warn_quantization(replace(result, pushed=url), plan)


def _warn_quantization(result: MergeResult, plan: MergePlan) -> MergeResult:
    """Say what writing the merged weights back in a quantized format cost (``ApproximationWarning``)."""
    if not result.quantization or plan.quantization is None:
        return result
    worst_key, worst = max(result.quantization.items(), key=lambda item: item[1].rel_error)
    lost = [k for k, e in result.quantization.items() if e.update_ratio is not None and e.update_ratio > 1]
    message = (
        f"{len(result.quantization)} tensor(s) written back as {plan.quantization.describe()} with new scales: "
        f"relative error up to {worst.rel_error:.3g} ({worst_key}) against the exact merged weights"
    )
    if lost:
        message += (
            f"; in {len(lost)} of them the rounding error is larger than the update itself (e.g. {lost[0]}), so "
            f"much of the update is lost: {param('dtype', 'bfloat16')} keeps it exactly"
        )
    warnings.warn(message, ApproximationWarning, stacklevel=3)
    return result
