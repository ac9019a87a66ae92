"""Adding adapters into base weights and taking them out again: pure tensor kernels.

All math happens in the checkpoint tensor's *math layout* (rows = outputs, see
``adapterops.adapter``), on a float64 (by default) copy of the stored tensor, and is rounded once to
the stored dtype at the end:

    merge    W' = W + sum_i c_i s_i B_i A_i
    unmerge  W  = W' - sum_i c_i s_i B_i A_i
    DoRA     W' = m / n * (W + s B A),   n = ||W + s B A||_row   (PEFT's merge, per output row)
    DoRA^-1  W  = W' * n / m - s B A     (needs n, which the merge records)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from adapterops.adapter import LoraModule


def math_view(X: torch.Tensor, module: LoraModule) -> torch.Tensor:
    """``X`` (a stored weight) seen as (out, in): transposed or flattened as the module says; shares memory."""
    if module.transposed:
        return X.T
    return X.reshape(X.shape[0], -1)


def add_updates(
    W: torch.Tensor,
    terms: Sequence[tuple[float, LoraModule]],
    *,
    sign: float = 1.0,
    compute: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``W + sign * sum_i c_i dW_i`` in ``compute`` on ``device``, rounded once to W's dtype, on the CPU."""
    X = W.to(device=device, dtype=compute, copy=True)
    for weight, module in terms:
        M = math_view(X, module)
        M.addmm_(
            module.B.to(device=device, dtype=compute),
            module.A.to(device=device, dtype=compute),
            alpha=sign * weight * module.scale,
        )
    return X.to(W.dtype).cpu()


def add_bias_updates(
    bias: torch.Tensor,
    terms: Sequence[tuple[float, LoraModule]],
    *,
    sign: float = 1.0,
    compute: torch.dtype = torch.float64,
) -> torch.Tensor:
    """``bias + sign * sum_i c_i s_i lora_B.bias_i``, rounded once."""
    total = bias.to(compute).clone()
    for weight, module in terms:
        if module.bias is not None:
            total += sign * weight * module.scale * module.bias.to(compute)
    return total.to(bias.dtype)


def dora_merge(
    W: torch.Tensor,
    module: LoraModule,
    *,
    compute: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's DoRA merge: returns (W' in W's dtype, the row norms n in ``compute``, on the CPU)."""
    if module.magnitude is None:
        raise ValueError(f"module {module.name} is not a DoRA module")
    X = W.to(device=device, dtype=compute, copy=True)
    M = math_view(X, module)
    M.addmm_(
        module.B.to(device=device, dtype=compute),
        module.A.to(device=device, dtype=compute),
        alpha=module.scale,
    )
    norm = torch.linalg.vector_norm(M, dim=1)
    M.mul_((module.magnitude.to(device=device, dtype=compute) / norm)[:, None])
    return X.to(W.dtype).cpu(), norm.cpu()


def dora_unmerge(
    W: torch.Tensor,
    module: LoraModule,
    norm: torch.Tensor,
    *,
    compute: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Inverse of ``dora_merge`` given the row norms it returned."""
    if module.magnitude is None:
        raise ValueError(f"module {module.name} is not a DoRA module")
    X = W.to(device=device, dtype=compute, copy=True)
    M = math_view(X, module)
    M.mul_(
        (norm.to(device=device, dtype=compute) / module.magnitude.to(device=device, dtype=compute))[:, None]
    )
    M.addmm_(
        module.B.to(device=device, dtype=compute),
        module.A.to(device=device, dtype=compute),
        alpha=-module.scale,
    )
    return X.to(W.dtype).cpu()


MANTISSA_BITS = {torch.float64: 52, torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` at each value of ``x`` (float64), subnormals included."""
    bits = MANTISSA_BITS[dtype]
    info = torch.finfo(dtype)
    _, exponent = torch.frexp(x.double().abs())
    # frexp: |x| = f * 2**e with f in [0.5, 1), so the spacing is 2**(e - 1 - bits)
    spacing = torch.ldexp(torch.ones_like(x, dtype=torch.float64), exponent - 1 - bits)
    return torch.clamp(spacing, min=info.smallest_normal * 2.0**-bits)
