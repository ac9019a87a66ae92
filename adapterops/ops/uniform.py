"""One rank and one scale for every module: what serving engines that read a single ``r`` and
``lora_alpha`` per adapter need (docs/serving.md).

Two exact-or-measured moves on a module's factors (``dW = s · B @ A``, adapter.py):

- ``pad_rank``: zero rows of A and zero columns of B up to a rank ``R``. ``B @ A`` is unchanged,
  bit for bit.
- ``fold_scale``: the module's scale ``s`` moved into B so that its scale becomes ``t``:
  ``B' = round(B · s / t)``, computed in float64 and rounded once to B's dtype. Exact when ``s / t``
  is a power of two (and nothing overflows or underflows); otherwise each entry of B' is correctly
  rounded, and the relative error of the update, ``||s·B@A - t·B'@A||_F / ||s·B@A||_F``, is measured
  in float64 from the factors (through the r x r Gram matrix ``A @ A.T``, never the dense update).

Example (by hand): B = [[3]], A = [[1]], s = 0.5, t = 1 -> B' = [[1.5]] (exact, error 0); B = [[1]],
s = 1/3, t = 1 in float32 -> B' = [[float32(1/3)]], error |float32(1/3) - 1/3| / (1/3) ~ 3e-8 (< 2^-24).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from adapterops.adapter import LoraModule, ModuleReport
from adapterops.ops.rounding import round_to


def pad_rank(module: LoraModule, rank: int) -> LoraModule:
    """``module`` with its factors zero-padded to ``rank`` (>= its own): the same ``B @ A`` exactly."""
    extra = rank - module.rank
    if extra < 0:
        raise ValueError(f"module {module.name}: cannot pad rank {module.rank} down to {rank}")
    if extra == 0:
        return module
    A = torch.cat([module.A, module.A.new_zeros(extra, module.A.shape[1])])
    B = torch.cat([module.B, module.B.new_zeros(module.B.shape[0], extra)], dim=1)
    return module.with_factors(A, B, module.scale, module.bias)


def fold_scale(module: LoraModule, scale: float) -> tuple[LoraModule, float]:
    """``module`` with scale ``scale`` and its own scale's ratio folded into B (one rounding to B's
    dtype), and the relative error of the update that rounding made (0.0 when exact)."""
    if module.magnitude is not None:  # DoRA's update depends on the base weight, not on B @ A alone
        raise ValueError(f"module {module.name}: a DoRA module's scale cannot be folded into its factors")
    if module.scale == scale:
        return module, 0.0
    ratio = module.scale / scale
    exact = module.B.double() * module.scale
    B = round_to(module.B.double() * ratio, module.B.dtype)
    gram = module.A.double() @ module.A.double().T  # (r, r): ||X @ A||_F^2 = sum((X @ G) * X)
    residual = exact - B.double() * scale
    norm2 = float(((exact @ gram) * exact).sum())
    error2 = float(((residual @ gram) * residual).sum())
    rel = (max(error2, 0.0) / norm2) ** 0.5 if norm2 > 0 else 0.0
    bias = module.bias  # lora_B.bias adds scale * bias: it is folded the same way
    if bias is not None:
        bias = round_to(bias.double() * ratio, bias.dtype)
    return module.with_factors(module.A, B, scale, bias), rel


def make_uniform(
    modules: Mapping[str, LoraModule], *, rank: int | None, scale: float
) -> tuple[dict[str, LoraModule], tuple[ModuleReport, ...]]:
    """Every module with scale ``scale`` and, when ``rank`` is given, zero-padded to it.

    Returns the modules and one ``ModuleReport`` per module (``rank_in`` / ``rank_out``, the
    measured ``rel_error`` of folding, a ``note`` saying what changed).
    """
    out: dict[str, LoraModule] = {}
    reports = []
    for name, module in modules.items():
        folded, rel = fold_scale(module, scale)
        padded = pad_rank(folded, rank) if rank is not None else folded
        notes = []
        if module.scale != scale:
            notes.append(f"scale {module.scale:.6g} folded into B ({module.B.dtype})".replace("torch.", ""))
        if padded.rank != module.rank:
            notes.append(f"zero-padded from rank {module.rank}")
        out[name] = padded
        reports.append(
            ModuleReport(name, module.rank, padded.rank, rel_error=rel, note="; ".join(notes) or None)
        )
    return out, tuple(reports)
