"""Check a merged checkpoint against float64 recomputation: per-tensor error in units in the last place."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adapterops.adapter import Adapter
from adapterops.io.checkpoint import Checkpoint, open_checkpoint
from adapterops.io.safetensors_file import read_tensor
from adapterops.merging import Direction, apply_update, load_inputs, plan_merge
from adapterops.ops.rounding import MANTISSA_BITS, ulp
from adapterops.options import VerifyOptions
from adapterops.provenance import read_record, weights_for


@dataclass(frozen=True)
class TensorCheck:
    key: str
    updated: bool
    max_ulp: float  # |merged - expected| / spacing of the stored dtype at expected; 0 when bit-identical


@dataclass(frozen=True)
class VerifyReport:
    checks: tuple[TensorCheck, ...]
    missing_in_merged: tuple[str, ...]
    extra_in_merged: tuple[str, ...]
    layout_changed: tuple[str, ...]  # dtype or shape differs
    changed_untouched: tuple[str, ...]  # tensors no adapter touches whose bytes differ
    max_ulp_allowed: float = 0.5
    non_finite: tuple[str, ...] = ()  # updated tensors holding NaN or Inf where the exact result is finite

    @property
    def max_ulp(self) -> float:
        return max((c.max_ulp for c in self.checks if c.updated), default=0.0)

    @property
    def ok(self) -> bool:
        """Key coverage and layout are right, and no tensor the adapters leave alone has changed."""
        return not (
            self.missing_in_merged
            or self.extra_in_merged
            or self.layout_changed
            or self.changed_untouched
            or self.non_finite
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
            "per_tensor": [c.__dict__ for c in self.checks if c.updated],
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

    Example:
        >>> verify("./base", ["./lora"], "./merged").passed()
    """
    opts = VerifyOptions(weights=weights, max_ulp=max_ulp, ignore_record=ignore_record)
    checkpoint, loaded = load_inputs(base, adapters)
    result = merged if isinstance(merged, Checkpoint) else open_checkpoint(merged)
    given = [float(w) for w in opts.weights] if opts.weights else None
    chosen = weights_for(read_record(result), loaded, given, opts.ignore_record, result.describe())
    plan = plan_merge(checkpoint, loaded, chosen, direction=Direction.MERGE, remerge=True)
    ours, theirs = checkpoint.locate(), result.locate()
    missing = tuple(sorted(set(ours) - set(theirs)))
    extra = tuple(sorted(set(theirs) - set(ours)))
    layout, changed, checks, non_finite = [], [], [], []
    for key in sorted(set(ours) & set(theirs)):
        (bs, be), (ms, me) = ours[key], theirs[key]
        if (be.dtype, be.shape) != (me.dtype, me.shape):
            layout.append(key)
            continue
        with bs.path.open("rb") as fb, ms.path.open("rb") as fm:
            W, Wm = read_tensor(fb, bs, be), read_tensor(fm, ms, me)
        update = plan.updates.get(key)
        if update is None:
            if not torch.equal(W.view(torch.uint8) if W.dtype == torch.bool else W, Wm):
                changed.append(key)
            checks.append(TensorCheck(key, False, 0.0))
        else:
            expected = apply_update(update, W.double())[0]
            got = Wm.double()
            # equal values (infinities the base already had included) are no error; NaN or Inf
            # where the exact result is finite is a failure of its own, not a number of ulps
            same = (got == expected) | (torch.isnan(got) & torch.isnan(expected))
            if bool((~torch.isfinite(got) & ~same).any()):
                non_finite.append(key)
            finite = torch.isfinite(got) & torch.isfinite(expected) & ~same
            if W.is_floating_point() and W.dtype in MANTISSA_BITS:
                err = (got - expected).abs()[finite] / ulp(expected[finite], W.dtype)
            else:
                err = (got - expected).abs()[finite]
            checks.append(TensorCheck(key, True, float(err.max()) if err.numel() else 0.0))
        if progress:
            progress(be.nbytes, key)
    return VerifyReport(
        tuple(checks), missing, extra, tuple(layout), tuple(changed), opts.max_ulp, tuple(non_finite)
    )
