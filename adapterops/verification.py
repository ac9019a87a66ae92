"""Check a merged checkpoint against float64 recomputation: per-tensor error in units in the last place."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adapterops.adapter import Adapter
from adapterops.io.checkpoint import Checkpoint, open_checkpoint
from adapterops.io.quantization import dequantize
from adapterops.io.safetensors_file import read_tensor
from adapterops.merging import Direction, MergePlan, apply_update, load_inputs, plan_merge
from adapterops.ops.quantize import expand, grid_step
from adapterops.ops.rounding import MANTISSA_BITS, ulp
from adapterops.options import MergeDtype, VerifyOptions
from adapterops.provenance import read_record, recorded_quantization, weights_for


@dataclass(frozen=True)
class TensorCheck:
    key: str
    updated: bool
    max_ulp: float  # |merged - expected| / spacing of the stored dtype at expected; 0 when bit-identical
    # tensors stored quantized: the spacing is the quantized grid's (its block scale times the float8
    # or int8 step), rel_error is ||merged - expected||_F / ||expected||_F, and reported_rel_error what
    # the merge's record says it was
    rel_error: float | None = None
    reported_rel_error: float | None = None


@dataclass(frozen=True)
class VerifyReport:
    checks: tuple[TensorCheck, ...]
    missing_in_merged: tuple[str, ...]
    extra_in_merged: tuple[str, ...]
    layout_changed: tuple[str, ...]  # dtype or shape differs
    changed_untouched: tuple[str, ...]  # tensors no adapter touches whose bytes differ
    max_ulp_allowed: float = 0.5
    non_finite: tuple[str, ...] = ()  # updated tensors holding NaN or Inf where the exact result is finite
    config_problems: tuple[
        str, ...
    ] = ()  # config.json contradicting the weights (still tied, still quantized)

    @property
    def max_ulp(self) -> float:
        return max((c.max_ulp for c in self.checks if c.updated), default=0.0)

    @property
    def over_reported(self) -> tuple[str, ...]:
        """Quantized tensors whose error exceeds what the merge reported (relative slack 1e-6)."""
        return tuple(
            c.key
            for c in self.checks
            if c.rel_error is not None
            and c.reported_rel_error is not None
            and c.rel_error > c.reported_rel_error * (1 + 1e-6) + 1e-12
        )

    @property
    def ok(self) -> bool:
        """Key coverage, layout and config are right, no tensor the adapters leave alone has changed,
        and no quantized tensor is further off than its merge reported."""
        return not (
            self.missing_in_merged
            or self.extra_in_merged
            or self.layout_changed
            or self.changed_untouched
            or self.non_finite
            or self.config_problems
            or self.over_reported
        )

    def passed(self, max_ulp: float | None = None) -> bool:
        """``ok``, and every updated tensor within ``max_ulp`` (default: what ``verify`` was given; 0.5 is
        correctly rounded) of the exact result.

        The ulp ratios carry float64 rounding, so the bound gets a relative slack of 1e-9.
        """
        bound = self.max_ulp_allowed if max_ulp is None else max_ulp
        return self.ok and self.max_ulp <= bound * (1 + 1e-9)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "passed": self.passed(),
            "max_ulp": self.max_ulp,
            "max_ulp_allowed": self.max_ulp_allowed,
            "tensors": len(self.checks),
            "tensors_updated": sum(c.updated for c in self.checks),
            "missing_in_merged": list(self.missing_in_merged),
            "extra_in_merged": list(self.extra_in_merged),
            "layout_changed": list(self.layout_changed),
            "changed_untouched": list(self.changed_untouched),
            "non_finite": list(self.non_finite),
            **({"config_problems": list(self.config_problems)} if self.config_problems else {}),
            **({"over_reported": list(self.over_reported)} if self.over_reported else {}),
            "per_tensor": [
                {k: v for k, v in c.__dict__.items() if v is not None} for c in self.checks if c.updated
            ],
        }


def verify(
    base: str | Path | Checkpoint,
    adapters: Sequence[str | Path | Adapter],
    merged: str | Path | Checkpoint,
    weights: Sequence[float] | None = None,
    *,
    max_ulp: float = 0.5,
    ignore_record: bool = False,
    progress: Any = None,
) -> VerifyReport:
    """Recompute every updated tensor of ``merged`` from ``base`` and the adapters in float64.

    Args:
        base, adapters, weights: what ``merge`` was given (paths, Hub ids or loaded objects).
        merged: the merged checkpoint to check.
        max_ulp: the error an updated tensor may have for ``passed()`` (0.5: correctly rounded).
        ignore_record: use the given ``weights`` even where ``merged``'s merge record lists others
            (by default, weights left out are taken from that record).
        progress: called with (bytes, tensor name) per tensor checked.

    Returns:
        A ``VerifyReport``: per-tensor error in ulps, key coverage; ``report.passed(max_ulp)``.

    Quantized bases: a merged tensor written back quantized is decoded, and its error measured in
    steps of its own grid (0.5: rounded to nearest given its new scales) and relative to the exact
    result, which must not exceed what the merge reported; one written dequantized is measured in
    ulps of its dtype. An lm_head the merge untied is checked against the embedding it was tied to.

    Example:
        >>> verify("./base", ["./lora"], "./merged").passed()
    """
    opts = VerifyOptions(weights=weights, max_ulp=max_ulp, ignore_record=ignore_record)
    checkpoint, loaded = load_inputs(base, adapters)
    result = merged if isinstance(merged, Checkpoint) else open_checkpoint(merged)
    given = [float(w) for w in opts.weights] if opts.weights else None
    record = read_record(result)
    chosen = weights_for(record, loaded, given, opts.ignore_record, result.describe())
    dtype = _written_dtype(checkpoint, result)
    plan = plan_merge(checkpoint, loaded, chosen, direction=Direction.MERGE, remerge=True, dtype=dtype)
    reported = recorded_quantization(record)
    expected = {t.entry.name: t for shard in plan.shards for t in shard.tensors}
    theirs = result.locate()
    missing = tuple(sorted(set(expected) - set(theirs)))
    extra = tuple(sorted(set(theirs) - set(expected)))
    scales = {u.quantized.scale_key for u in plan.updates.values() if u.quantized is not None}
    layout, changed, checks, non_finite = [], [], [], []
    for key in sorted(set(expected) & set(theirs)):
        want, (ms, me) = expected[key], theirs[key]
        if (want.entry.dtype, want.entry.shape) != (me.dtype, me.shape):
            layout.append(key)
            continue
        if want.copy_from is not None:
            bs, be = checkpoint.tensors[want.copy_from]
            with bs.path.open("rb") as fb, ms.path.open("rb") as fm:
                W, Wm = read_tensor(fb, bs, be), read_tensor(fm, ms, me)
            if not torch.equal(W.view(torch.uint8) if W.dtype == torch.bool else W, Wm):
                changed.append(key)
            checks.append(TensorCheck(key, False, 0.0))
        elif key not in scales or plan.dtype is not None:  # a new scale is checked with its weight
            check = _check(plan, result, key, reported.get(key, {}).get("rel_error"))
            if check is None:
                non_finite.append(key)
            else:
                checks.append(check)
        if progress:
            progress(me.nbytes, key)
    return VerifyReport(
        tuple(checks),
        missing,
        extra,
        tuple(layout),
        tuple(changed),
        opts.max_ulp,
        tuple(non_finite),
        _config_problems(plan, result),
    )


def _written_dtype(base: Checkpoint, merged: Checkpoint) -> MergeDtype:
    """How a merge of quantized ``base`` wrote ``merged``: in the base's format (auto), or dequantized
    in the dtype its formerly quantized weights now have."""
    quantization = base.quantization
    if quantization is None or not quantization.tensors:
        return MergeDtype.AUTO
    if merged.quantization is not None and merged.quantization.tensors:
        return MergeDtype.AUTO
    for key in quantization.tensors:
        if key in merged.tensors:
            name = str(merged.tensors[key][1].torch_dtype).removeprefix("torch.")
            if name in {d.value for d in MergeDtype}:
                return MergeDtype(name)
    return MergeDtype.BFLOAT16


def _check(plan: MergePlan, merged: Checkpoint, key: str, reported: float | None) -> TensorCheck | None:
    """The error of one computed tensor of ``merged`` against its float64 recomputation; None where it
    holds NaN or Inf and the exact result does not."""
    checkpoint = plan.checkpoint
    update = plan.updates.get(key)
    if update is not None:
        quantized = update.quantized
    else:  # a quantized weight no adapter touches, written dequantized
        assert checkpoint.quantization is not None  # the plan dequantizes only quantized tensors
        quantized = checkpoint.quantization.tensors[key]
    if quantized is not None:
        W = dequantize(quantized, checkpoint.read)
    else:
        W = checkpoint.read(update.base_key if update is not None else key)
    exact = apply_update(update, W.double())[0] if update is not None else W.double()
    written = merged.quantization.tensors.get(key) if merged.quantization is not None else None
    got = dequantize(written, merged.read) if written is not None else merged.read(key).double()
    dtype = merged.tensors[key][1].torch_dtype
    if written is None and _all_finite(got) and _all_finite(exact):  # the usual case: no masks needed
        diff = got.sub_(exact).abs_()
        err = diff.div_(ulp(exact, dtype)) if dtype in MANTISSA_BITS else diff
        return TensorCheck(key, True, float(err.max()) if err.numel() else 0.0)
    # equal values (infinities the base already had included) are no error; NaN or Inf where the exact
    # result is finite is a failure of its own, not a number of ulps
    same = (got == exact) | (torch.isnan(got) & torch.isnan(exact))
    if bool((~torch.isfinite(got) & ~same).any()):
        return None
    finite = torch.isfinite(got) & torch.isfinite(exact) & ~same
    diff = (got - exact).abs()
    if written is not None and written.scaling is not None:
        stored = merged.read(written.scale_key).double().reshape(written.scaling.grid(tuple(got.shape)))
        step = grid_step(exact, expand(stored, tuple(got.shape), written.scaling.block), written.dtype)
        err = diff[finite] / step[finite]
        norm = float(torch.linalg.vector_norm(exact))
        rel = float(torch.linalg.vector_norm(got - exact)) / norm if norm > 0 else 0.0
        return TensorCheck(key, True, float(err.max()) if err.numel() else 0.0, rel, reported)
    err = diff[finite] / ulp(exact[finite], dtype) if dtype in MANTISSA_BITS else diff[finite]
    return TensorCheck(key, True, float(err.max()) if err.numel() else 0.0)


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in ``t``: its sum is finite (one vectorized pass; a sum that overflows only sends
    the caller down its careful path)."""
    return bool(torch.isfinite(t.sum()))


def _config_problems(plan: MergePlan, merged: Checkpoint) -> tuple[str, ...]:
    """config.json settings that would make transformers read the merged weights differently."""
    problems = []
    tied = plan.checkpoint.tied_head
    if tied is not None and tied.head in plan.updates and merged.tie_flag is not False:
        problems.append(
            f"{tied.head} is written untied but config.json does not set tie_word_embeddings false: "
            f"transformers would tie it to {tied.embedding} again"
        )
    if plan.dtype is not None and "quantization_config" in merged.config:
        problems.append("the weights are dequantized but config.json still has a quantization_config")
    return tuple(problems)
